//! Giving memory back by age, within a bound (`DESIGN.md` §8; `src/alloc/run.rs`): pages
//! freed and taken again within a second are not faulted in again; pages left free for a
//! second go back to the OS at the next slow path; and free pages kept resident never
//! exceed the larger of 64 MiB and half of the most memory in use over the last second or
//! two. The same holds for huge blocks (over 2 MiB, a mapping each): a freed one is kept
//! for the next that fits, within the same bound and for the same second. Each check runs
//! in a fresh child process, so no other check's free pages are in the way.

mod common;

use beancounter::BeanAlloc;
use common::Runner;
use std::alloc::{GlobalAlloc, Layout};
use std::time::Duration;

#[global_allocator]
static ALLOC: BeanAlloc = BeanAlloc::new();

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

fn main() {
    let mut r = Runner::new();
    r.isolated(
        "memory_freed_and_taken_again_within_a_second_is_not_faulted_in_again",
        60,
        reuse_without_faults,
    );
    r.isolated(
        "memory_free_for_a_second_goes_back_at_the_next_slow_path",
        60,
        given_back_after_a_second,
    );
    r.isolated(
        "free_memory_kept_resident_stays_within_its_bound",
        60,
        within_the_bound,
    );
    r.isolated(
        "a_freed_huge_block_is_taken_again_without_new_pages",
        60,
        huge_reused,
    );
    r.isolated(
        "a_huge_block_free_for_a_second_is_unmapped_at_the_next_slow_path",
        60,
        huge_given_back,
    );
    r.isolated(
        "freed_huge_blocks_kept_stay_within_the_bound",
        60,
        huge_within_the_bound,
    );
    r.finish();
}

/// `n` blocks of `size` bytes (large runs, below the 2 MiB of a huge block), every page
/// written.
fn take(n: usize, size: usize) -> Vec<*mut u8> {
    let l = Layout::from_size_align(size, 8).unwrap();
    (0..n)
        .map(|i| {
            // SAFETY: a non-zero size.
            let p = unsafe { ALLOC.alloc(l) };
            assert!(!p.is_null());
            for off in (0..size).step_by(4 * KIB) {
                // SAFETY: inside the block.
                unsafe { p.add(off).write(i as u8) };
            }
            p
        })
        .collect()
}

fn give(blocks: Vec<*mut u8>, size: usize) {
    let l = Layout::from_size_align(size, 8).unwrap();
    for p in blocks {
        // SAFETY: allocated by `take` with this layout.
        unsafe { ALLOC.dealloc(p, l) };
    }
}

fn minor_faults() -> i64 {
    // SAFETY: a valid out-pointer for getrusage.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    ru.ru_minflt
}

fn rss() -> usize {
    common::statm().0
}

fn reuse_without_faults() {
    const SIZE: usize = 512 * KIB;
    const N: usize = 48; // 24 MiB, within the 64 MiB always kept
    give(take(N, SIZE), SIZE);
    let faults = minor_faults();
    let again = take(N, SIZE);
    let refaulted = minor_faults() - faults;
    println!("    24 MiB freed and taken again: {refaulted} minor faults");
    // 6 144 pages were written; taken again at once, they are still resident.
    assert!(refaulted < 300, "{refaulted} pages faulted in again");
    give(again, SIZE);
}

fn given_back_after_a_second() {
    const SIZE: usize = 512 * KIB;
    const N: usize = 48;
    let before = rss();
    let blocks = take(N, SIZE);
    let used = rss();
    give(blocks, SIZE);
    let freed = rss();
    std::thread::sleep(Duration::from_millis(1200));
    let idle = rss();
    // Any slow path of the allocator purges what is due: here a large block.
    give(take(1, 64 * KIB), 64 * KIB);
    let after = rss();
    println!(
        "    rss before {} MiB, in use {} MiB, freed {} MiB, after 1.2 s {} MiB, after the next slow path {} MiB",
        before / MIB,
        used / MIB,
        freed / MIB,
        idle / MIB,
        after / MIB
    );
    assert!(used >= before + 20 * MIB, "the blocks were not resident");
    assert!(
        freed + 4 * MIB >= used,
        "freed memory was given back at once"
    );
    assert!(
        after + 20 * MIB <= freed,
        "memory free for a second was not given back"
    );
}

fn within_the_bound() {
    const SIZE: usize = MIB;
    const N: usize = 256;
    let before = rss();
    let blocks = take(N, SIZE);
    let used = rss();
    give(blocks, SIZE);
    let freed = rss();
    std::thread::sleep(Duration::from_millis(1200));
    give(take(1, 64 * KIB), 64 * KIB);
    let later = rss();
    println!(
        "    rss before {} MiB, with 256 MiB in use {} MiB, all freed {} MiB, a second later {} MiB",
        before / MIB,
        used / MIB,
        freed / MIB,
        later / MIB
    );
    assert!(used >= before + 240 * MIB, "the blocks were not resident");
    // Just freed: at most half of the peak stays (and some rounding to huge pages).
    assert!(
        freed <= before + 128 * MIB + 16 * MIB,
        "{} MiB of free memory kept resident",
        (freed - before) / MIB
    );
    assert!(
        freed >= before + 64 * MIB,
        "the working set was not kept for reuse"
    );
    // Unused for a second: given back at the next slow path.
    assert!(
        later <= before + 8 * MIB,
        "{} MiB still resident a second later",
        (later - before) / MIB
    );
}

/// A huge block of `size` bytes (over 2 MiB), every page written with `byte`.
fn take_huge(size: usize, byte: u8) -> *mut u8 {
    let l = Layout::from_size_align(size, 8).unwrap();
    // SAFETY: a non-zero size.
    let p = unsafe { ALLOC.alloc(l) };
    assert!(!p.is_null());
    for off in (0..size).step_by(4 * KIB) {
        // SAFETY: inside the block.
        unsafe { p.add(off).write(byte) };
    }
    p
}

fn give_huge(p: *mut u8, size: usize) {
    // SAFETY: allocated by `take_huge` with this size and alignment 8.
    unsafe { ALLOC.dealloc(p, Layout::from_size_align(size, 8).unwrap()) };
}

fn huge_reused() {
    const SIZE: usize = 24 * MIB;
    let l = Layout::from_size_align(SIZE, 8).unwrap();
    give_huge(take_huge(SIZE, 0xA5), SIZE);
    // Taken again at once: the same pages, still holding what was written (a new mapping
    // would read as zero).
    // SAFETY: a non-zero size.
    let p = unsafe { ALLOC.alloc(l) };
    assert!(!p.is_null());
    let kept = (0..SIZE)
        .step_by(4 * KIB)
        // SAFETY: inside the block.
        .filter(|&off| unsafe { p.add(off).read() } == 0xA5)
        .count();
    println!(
        "    24 MiB huge block freed and taken again: {kept} of {} pages kept",
        SIZE / (4 * KIB)
    );
    assert_eq!(kept, SIZE / (4 * KIB), "the freed mapping was not reused");
    // SAFETY: allocated above with `l`.
    unsafe { ALLOC.dealloc(p, l) };
    // Zeroed allocations of a reused mapping still read as zero.
    // SAFETY: a non-zero size.
    let z = unsafe { ALLOC.alloc_zeroed(l) };
    assert!(!z.is_null());
    let zero = |off: usize| {
        // SAFETY: inside the block.
        unsafe { z.add(off).read() == 0 }
    };
    assert!((0..SIZE).step_by(512).all(zero));
    // SAFETY: allocated above with `l`.
    unsafe { ALLOC.dealloc(z, l) };
    // A request far smaller than a cached mapping does not take it.
    let small = take_huge(4 * MIB, 1);
    // SAFETY: inside the block, written by `take_huge`.
    assert_eq!(unsafe { small.add(4 * KIB).read() }, 1);
    give_huge(small, 4 * MIB);
}

fn huge_given_back() {
    const SIZE: usize = 24 * MIB;
    let (before, mapped_before) = (rss(), beancounter::mapped_bytes());
    let p = take_huge(SIZE, 7);
    let used = rss();
    give_huge(p, SIZE);
    let (freed, mapped_freed) = (rss(), beancounter::mapped_bytes());
    std::thread::sleep(Duration::from_millis(1200));
    // Any slow path of the allocator purges what is due: here a large block.
    give(take(1, 64 * KIB), 64 * KIB);
    let (after, mapped_after) = (rss(), beancounter::mapped_bytes());
    println!(
        "    rss before {} MiB, in use {} MiB, freed {} MiB, after 1.2 s and a slow path {} MiB",
        before / MIB,
        used / MIB,
        freed / MIB,
        after / MIB
    );
    assert!(used >= before + 20 * MIB, "the block was not resident");
    assert!(
        freed + 4 * MIB >= used,
        "the freed block was unmapped at once"
    );
    assert!(
        mapped_freed >= mapped_before + SIZE,
        "the freed mapping was not kept"
    );
    assert!(
        after + 20 * MIB <= freed,
        "a huge block free for a second was not given back"
    );
    assert!(
        mapped_after < mapped_before + SIZE,
        "its mapping is still counted"
    );
}

fn huge_within_the_bound() {
    const SIZE: usize = 16 * MIB;
    const N: usize = 12;
    let before = rss();
    let blocks: Vec<*mut u8> = (0..N).map(|i| take_huge(SIZE, i as u8 + 1)).collect();
    let used = rss();
    for p in blocks {
        give_huge(p, SIZE);
    }
    let freed = rss();
    println!(
        "    rss before {} MiB, with 192 MiB of huge blocks {} MiB, all freed {} MiB",
        before / MIB,
        used / MIB,
        freed / MIB
    );
    assert!(used >= before + 180 * MIB, "the blocks were not resident");
    // At most half of the peak stays resident (96 MiB), whatever the cache could hold.
    assert!(
        freed <= before + 96 * MIB + 8 * MIB,
        "{} MiB of freed huge blocks kept resident",
        (freed - before) / MIB
    );
    assert!(
        freed >= before + 64 * MIB,
        "no freed huge block was kept for reuse"
    );
}
