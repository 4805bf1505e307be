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

/// `n` blocks of `size` bytes, every page written with 1 + the block's number mod 255 (never
/// zero, so a block on reused pages can be told from one on new pages).
fn take(n: usize, size: usize) -> Vec<*mut u8> {
    let l = Layout::from_size_align(size, 8).unwrap();
    (0..n)
        .map(|i| {
            // SAFETY: a non-zero size.
            let p = unsafe { ALLOC.alloc(l) };
            assert!(!p.is_null());
            for off in (0..size).step_by(4 * KIB) {
                // SAFETY: inside the block.
                unsafe { p.add(off).write((i % 255) as u8 + 1) };
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

/// Takes `n` blocks of `size` bytes, frees them, waits 1.2 s and takes one slow path (a
/// large block); checks, by the resident set, that the blocks were resident, that nothing
/// was given back at once, and that it was given back after the second. Returns the mapped
/// bytes before, once freed, and after.
fn freed_then_idle(n: usize, size: usize) -> [usize; 3] {
    let (before, mapped_before) = (rss(), beancounter::mapped_bytes());
    let blocks = take(n, size);
    let used = rss();
    give(blocks, size);
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
    assert!(used >= before + 20 * MIB, "the blocks were not resident");
    assert!(
        freed + 4 * MIB >= used,
        "freed memory was given back at once"
    );
    assert!(
        after + 20 * MIB <= freed,
        "memory free for a second was not given back"
    );
    [mapped_before, mapped_freed, mapped_after]
}

fn given_back_after_a_second() {
    // 24 MiB of large runs.
    freed_then_idle(48, 512 * KIB);
}

/// Takes `n` blocks of `size` bytes and frees them all: what stays resident is at most half
/// the peak (plus `slack` for rounding to huge pages) and at least the 64 MiB always kept.
/// Returns the resident set before.
fn kept_within_half_the_peak(n: usize, size: usize, slack: usize) -> usize {
    let before = rss();
    let blocks = take(n, size);
    let used = rss();
    give(blocks, size);
    let freed = rss();
    println!(
        "    rss before {} MiB, with {} x {} KiB in use {} MiB, all freed {} MiB",
        before / MIB,
        n,
        size / KIB,
        used / MIB,
        freed / MIB
    );
    assert!(
        used >= before + n * size / 16 * 15,
        "the blocks were not resident"
    );
    assert!(
        freed <= before + n * size / 2 + slack,
        "{} MiB of free memory kept resident",
        (freed - before) / MIB
    );
    assert!(
        freed >= before + 64 * MIB,
        "the working set was not kept for reuse"
    );
    before
}

fn within_the_bound() {
    let before = kept_within_half_the_peak(256, MIB, 16 * MIB);
    std::thread::sleep(Duration::from_millis(1200));
    give(take(1, 64 * KIB), 64 * KIB);
    let later = rss();
    println!("    a second later {} MiB", later / MIB);
    // Unused for a second: given back at the next slow path.
    assert!(
        later <= before + 8 * MIB,
        "{} MiB still resident a second later",
        (later - before) / MIB
    );
}

fn huge_reused() {
    const SIZE: usize = 24 * MIB;
    let l = Layout::from_size_align(SIZE, 8).unwrap();
    give(take(1, SIZE), SIZE);
    // Taken again at once: the same pages, still holding what was written (a new mapping
    // would read as zero).
    // SAFETY: a non-zero size.
    let p = unsafe { ALLOC.alloc(l) };
    assert!(!p.is_null());
    let kept = (0..SIZE)
        .step_by(4 * KIB)
        // SAFETY: inside the block.
        .filter(|&off| unsafe { p.add(off).read() } == 1)
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
    // A request far smaller than the cached mapping does not take it: it gets a mapping of
    // its own (the cached one stays mapped, so no new one can overlap it).
    let small = take(1, 4 * MIB);
    assert_ne!(small[0], z, "a 4 MiB block took a 24 MiB mapping");
    give(small, 4 * MIB);
}

fn huge_given_back() {
    const SIZE: usize = 24 * MIB;
    let [before, freed, after] = freed_then_idle(1, SIZE);
    assert!(freed >= before + SIZE, "the freed mapping was not kept");
    assert!(after < before + SIZE, "its mapping is still counted");
}

/// Huge blocks (16 MiB, a mapping each) kept once freed count against the same bound: of 192
/// MiB freed, at most half the peak stays, whatever the cache could hold (8 mappings).
fn huge_within_the_bound() {
    kept_within_half_the_peak(12, 16 * MIB, 8 * MIB);
}
