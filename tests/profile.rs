//! `beancounter::profile`: per-tenant heap profiles estimate each call site's live memory,
//! show only the tenant's own blocks, follow blocks across threads until they are freed,
//! and export to tools (`go tool pprof` reads the pprof output).
//!
//! The checks sample at one point per 32 KiB on average (not the default 512 KiB) so that
//! the 22-26 MiB each estimated site allocates give 700-800 samples: the relative standard
//! error of a site's estimate is then under 4%, and the 15% tolerance is about four of
//! them (a 4 MiB site, tried first, has a standard error near 9% and failed a run in a
//! dozen). Large blocks (256 KiB) are sampled with probability 1 - exp(-8), almost surely.

mod common;

use beancounter::{profile, BcError, BcId, BeanAlloc, Beancounter};
use common::{class_size, memory, Runner};
use std::hint::black_box;

#[global_allocator]
static ALLOC: BeanAlloc = BeanAlloc::new();

const MEAN: u64 = 32 << 10;
/// The small objects of the checks: 100 bytes, a 112-byte class.
const SMALL: usize = 100;
const LARGE: usize = 256 << 10;

#[inline(never)]
fn site_small(into: &mut Vec<Box<[u8]>>, n: usize) {
    for i in 0..n {
        into.push(black_box(vec![i as u8; SMALL]).into_boxed_slice());
    }
}

#[inline(never)]
fn site_large(into: &mut Vec<Box<[u8]>>, n: usize) {
    for i in 0..n {
        into.push(black_box(vec![i as u8; LARGE]).into_boxed_slice());
    }
}

/// `n` blocks of `LARGE` bytes allocated at `site_large` in tenant `t`.
fn large_in(t: &Beancounter, n: usize) -> Vec<Box<[u8]>> {
    let mut blocks = Vec::with_capacity(n);
    let _g = t.enter();
    site_large(&mut blocks, n);
    blocks
}

#[inline(never)]
fn site_other(into: &mut Vec<Box<[u8]>>, n: usize) {
    for i in 0..n {
        into.push(black_box(vec![i as u8; 4000]).into_boxed_slice());
    }
}

#[inline(never)]
fn site_on_a_thread(n: usize) -> Vec<Box<[u8]>> {
    let mut v = Vec::with_capacity(n);
    for i in 0..n {
        v.push(black_box(vec![i as u8; 3000]).into_boxed_slice());
    }
    v
}

/// Recurses `depth` frames, then allocates `n` large blocks.
#[inline(never)]
fn deep(depth: u32, into: &mut Vec<Box<[u8]>>, n: usize) {
    if depth == 0 {
        site_large(into, n);
    } else {
        deep(black_box(depth - 1), into, n);
    }
    black_box(depth);
}

fn small_bytes(n: usize) -> u64 {
    (n * class_size(SMALL, 1).unwrap()) as u64
}

fn within(estimate: u64, truth: u64, tolerance: f64) -> bool {
    (estimate as f64 - truth as f64).abs() <= tolerance * truth as f64
}

fn profile_of(t: &Beancounter) -> profile::HeapProfile {
    profile::heap(t.id()).expect("profile of a live tenant")
}

/// Two call sites of one tenant, 22 MiB of small objects and 24 MiB of large blocks: each
/// estimated within 15%, the whole profile within 10% of the tenant's `held`.
fn two_sites_estimated() {
    let t = common::tenant(700);
    profile::start(MEAN).unwrap();
    let (n_small, n_large) = (200_000, 96);
    let mut small = Vec::with_capacity(n_small);
    let mut large = Vec::with_capacity(n_large);
    {
        let _g = t.enter();
        site_small(&mut small, n_small);
        site_large(&mut large, n_large);
    }
    let p = profile_of(&t);
    let (est_small, est_large) = (p.bytes_in("site_small"), p.bytes_in("site_large"));
    let truth_large = (n_large * LARGE) as u64;
    println!(
        "  small: estimated {est_small}, true {}; large: estimated {est_large}, true {truth_large}; \
         total estimated {}, held {}; {} samples",
        small_bytes(n_small),
        p.estimated_bytes(),
        memory(&t),
        p.samples()
    );
    assert!(within(est_small, small_bytes(n_small), 0.15));
    assert!(within(est_large, truth_large, 0.15));
    assert!(within(p.estimated_bytes(), memory(&t), 0.10));
    // The folded stacks name both sites, root first (the site before its leaf-most frame).
    let folded = p.folded();
    let line = folded
        .lines()
        .find(|l| l.contains("site_small"))
        .expect("a folded stack through site_small");
    let (stack, bytes) = line.rsplit_once(' ').unwrap();
    assert!(bytes.parse::<u64>().unwrap() > 0);
    let frames: Vec<&str> = stack.split(';').collect();
    let at = frames
        .iter()
        .position(|f| f.contains("site_small"))
        .unwrap();
    assert!(
        frames[..at]
            .iter()
            .any(|f| f.contains("two_sites_estimated")),
        "the caller comes before the site: {line}"
    );
    assert!(
        !frames.iter().any(|f| f.starts_with("beancounter::alloc")),
        "allocator frames are stripped: {line}"
    );
    // Freed blocks leave the profile.
    drop(small);
    let p = profile_of(&t);
    assert_eq!(
        p.bytes_in("site_small"),
        0,
        "freed objects still in the profile"
    );
    assert!(within(p.bytes_in("site_large"), truth_large, 0.15));
    drop(large);
    assert_eq!(profile_of(&t).bytes_in("site_large"), 0);
    profile::stop();
    assert_eq!(
        memory(&t),
        0,
        "the tenant holds nothing once everything is freed"
    );
}

/// Another tenant's call site never appears in a tenant's profile, even while both
/// allocate on the same thread, in the same size classes, alternately.
fn other_tenants_stay_out() {
    let (a, b) = (common::tenant(701), common::tenant(702));
    profile::start(MEAN).unwrap();
    let mut mine = Vec::with_capacity(200_000);
    let mut theirs = Vec::with_capacity(4_000);
    for _ in 0..40 {
        {
            let _g = a.enter();
            site_small(&mut mine, 5000);
        }
        let _g = b.enter();
        site_other(&mut theirs, 100);
    }
    let (pa, pb) = (profile_of(&a), profile_of(&b));
    assert_eq!(pa.bytes_in("site_other"), 0, "b's site in a's profile");
    assert_eq!(pb.bytes_in("site_small"), 0, "a's site in b's profile");
    assert!(within(
        pa.bytes_in("site_small"),
        small_bytes(200_000),
        0.15
    ));
    assert!(pb.bytes_in("site_other") > 0);
    drop((mine, theirs));
    profile::stop();
    assert_eq!((memory(&a), memory(&b)), (0, 0));
}

/// A thread spawned in a tenant (its fork beancounter) allocates and exits; its blocks stay
/// in the tenant's profile, and leave it when another thread frees them. Blocks allocated
/// here and freed on another thread leave it too.
fn threads_and_cross_thread_frees() {
    let t = common::tenant(703);
    profile::start(MEAN).unwrap();
    let n = 9000; // 9000 x 3 KiB class (3072): 26 MiB
    let got = {
        let _g = t.enter();
        beancounter::thread::spawn(move || site_on_a_thread(n))
            .unwrap()
            .join()
            .unwrap()
    };
    let truth = (n * class_size(3000, 1).unwrap()) as u64;
    let p = profile_of(&t);
    assert!(
        within(p.bytes_in("site_on_a_thread"), truth, 0.15),
        "estimated {} of {truth}",
        p.bytes_in("site_on_a_thread")
    );
    // Freed here, allocated on the exited thread.
    drop(got);
    assert_eq!(profile_of(&t).bytes_in("site_on_a_thread"), 0);
    // Allocated here, freed on another thread.
    let large = large_in(&t, 64);
    assert!(profile_of(&t).bytes_in("site_large") > 0);
    std::thread::spawn(move || drop(large)).join().unwrap();
    assert_eq!(profile_of(&t).bytes_in("site_large"), 0);
    profile::stop();
    assert_eq!(memory(&t), 0);
}

/// `fork` while two threads take and drop samples all the time (one per 4 KiB): every child
/// can sample, read its profile and forget samples (no lock is left held by a thread the
/// child does not have), and the parent's samples are intact after.
fn fork_while_sampling() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;
    let t = common::tenant(707);
    profile::start(4 << 10).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (t, stop) = (t.clone(), stop.clone());
            std::thread::spawn(move || {
                let _g = t.enter();
                let mut held = Vec::with_capacity(64);
                while !stop.load(Ordering::Relaxed) {
                    site_other(&mut held, 16);
                    held.truncate(32);
                }
            })
        })
        .collect();
    let kept = large_in(&t, 8);
    let mut failures = Vec::new();
    for n in 0..50 {
        // SAFETY: the child only allocates through this crate and calls `_exit`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut mine = Vec::with_capacity(64);
            {
                let _g = t.enter();
                site_large(&mut mine, 64);
            }
            let sampled = profile::heap(t.id()).unwrap().bytes_in("site_large");
            drop(mine);
            let after = profile::heap(t.id()).unwrap().bytes_in("site_large");
            // The parent's 8 blocks are still live in the child's copy of the heap.
            let ok = sampled >= after + 32 * LARGE as u64 && after <= 16 * LARGE as u64;
            // SAFETY: ends the child without running the parent's destructors or atexit.
            unsafe { libc::_exit(i32::from(!ok)) };
        }
        assert!(pid > 0, "fork failed");
        match common::wait_for(pid, Duration::from_secs(10)) {
            Some(s) if libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0 => {}
            other => failures.push(format!("fork {n}: {other:?}")),
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    assert!(failures.is_empty(), "{failures:#?}");
    assert!(within(
        profile_of(&t).bytes_in("site_large"),
        8 * LARGE as u64,
        0.01
    ));
    drop(kept);
    profile::stop();
    assert_eq!(profile_of(&t).samples(), 0);
    assert_eq!(memory(&t), 0);
}

/// A retired tenant's leftover blocks keep their samples on its retired record: its id is
/// `NotFound`, and a fresh tenant with the same id shows none of them.
fn retired_leftovers_stay_out_of_profiles() {
    let t = common::tenant(708);
    profile::start(MEAN).unwrap();
    let leftovers = large_in(&t, 16);
    assert!(profile_of(&t).bytes_in("site_large") > 0);
    t.retire().unwrap();
    assert!(matches!(
        profile::heap(BcId(708)),
        Err(BcError::NotFound(BcId(708)))
    ));
    let fresh = common::tenant(708);
    assert_eq!(
        profile_of(&fresh).samples(),
        0,
        "leftovers in the fresh tenant"
    );
    drop(leftovers);
    profile::stop();
    assert_eq!(memory(&fresh), 0);
}

/// A stack deeper than the capture limit keeps its leaf-most frames and is marked
/// `[truncated]`, never a crash.
fn deep_stacks_are_truncated() {
    let t = common::tenant(704);
    profile::start(MEAN).unwrap();
    let mut blocks = Vec::with_capacity(16);
    {
        let _g = t.enter();
        deep(200, &mut blocks, 16);
    }
    let folded = profile_of(&t).folded();
    let line = folded
        .lines()
        .find(|l| l.contains("site_large"))
        .expect("the deep site is sampled");
    assert!(line.starts_with("[truncated];"), "{line}");
    drop(blocks);
    profile::stop();
}

/// `go tool pprof -top` reads the pprof output and names both call sites.
fn go_pprof_reads_the_profile() {
    let t = common::tenant(705);
    profile::start(MEAN).unwrap();
    let mut blocks = Vec::with_capacity(50_100);
    {
        let _g = t.enter();
        site_small(&mut blocks, 50_000);
        site_large(&mut blocks, 40);
    }
    let pb = profile_of(&t).pprof();
    let path = std::env::temp_dir().join(format!("beancounter-{}.pb.gz", std::process::id()));
    std::fs::write(&path, pb).unwrap();
    let out = std::process::Command::new("go")
        .args(["tool", "pprof", "-top", "-sample_index=inuse_space"])
        .arg(&path)
        .env("HOME", std::env::temp_dir())
        .output()
        .expect("`go` not found: install Debian's golang-go (.ci/run does)");
    let _ = std::fs::remove_file(&path);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "go tool pprof failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{}", text.lines().take(8).collect::<Vec<_>>().join("\n"));
    assert!(
        text.contains("site_small") && text.contains("site_large"),
        "{text}"
    );
    drop(blocks);
    profile::stop();
}

/// Bad input: a zero distance is refused and changes nothing; an unknown tenant is
/// `NotFound`; stopping twice is harmless; a new distance while on keeps the samples.
fn bad_input() {
    profile::stop();
    assert_eq!(profile::start(0), Err(BcError::InvalidSampleBytes(0)));
    assert_eq!(
        profile::sample_bytes(),
        None,
        "a refused start turned sampling on"
    );
    assert!(matches!(
        profile::heap(BcId(987_654)),
        Err(BcError::NotFound(BcId(987_654)))
    ));
    profile::stop();
    profile::stop();
    let t = common::tenant(706);
    profile::start(MEAN).unwrap();
    let large = large_in(&t, 32);
    let before = profile_of(&t).samples();
    assert!(before > 0);
    assert_eq!(profile::start(0), Err(BcError::InvalidSampleBytes(0)));
    assert_eq!(
        profile::sample_bytes(),
        Some(MEAN),
        "a refused start changed the rate"
    );
    profile::start(4 * MEAN).unwrap();
    assert_eq!(profile::sample_bytes(), Some(4 * MEAN));
    assert_eq!(profile_of(&t).samples(), before, "a new rate lost samples");
    profile::stop();
    assert_eq!(
        profile_of(&t).samples(),
        before,
        "stop dropped live samples"
    );
    drop(large);
    assert_eq!(profile_of(&t).samples(), 0);
    // Off: nothing is sampled.
    let more = large_in(&t, 32);
    assert_eq!(profile_of(&t).samples(), 0, "sampled while off");
    drop(more);
    assert_eq!(memory(&t), 0);
}

/// Grows `n` blocks one page per `realloc` from 64 KiB to `to` bytes, all live at once.
#[inline(never)]
fn site_grown(into: &mut Vec<Vec<u8>>, n: usize, to: usize) {
    for _ in 0..n {
        let mut v: Vec<u8> = Vec::with_capacity(64 << 10);
        while v.capacity() < to {
            v.reserve_exact(v.capacity() + 4096 - v.len());
            v.resize(v.capacity(), 1);
        }
        into.push(v);
    }
}

/// Blocks of pages grown a page at a time, in place (their growth charged through the
/// stock): a sample point in a growth samples the block, so 150 MiB of them, each grown
/// from 64 KiB (which a 1 MiB mean would rarely sample), are estimated within 15%.
fn grown_blocks_estimated() {
    let t = common::tenant(709);
    profile::start(1 << 20).unwrap();
    let (n, to) = (100, 1536 << 10);
    let mut grown = Vec::with_capacity(n);
    {
        let _g = t.enter();
        site_grown(&mut grown, n, to);
    }
    let p = profile_of(&t);
    let (est, truth) = (p.bytes_in("site_grown"), (n * to) as u64);
    println!("  estimated {est}, true {truth}; {} samples", p.samples());
    profile::stop();
    drop(grown);
    assert!(within(est, truth, 0.15));
}

fn main() {
    let mut r = Runner::new();
    r.check("two_sites_estimated", two_sites_estimated);
    r.check("grown_blocks_estimated", grown_blocks_estimated);
    r.check("other_tenants_stay_out", other_tenants_stay_out);
    r.check(
        "threads_and_cross_thread_frees",
        threads_and_cross_thread_frees,
    );
    r.check("fork_while_sampling", fork_while_sampling);
    r.check(
        "retired_leftovers_stay_out_of_profiles",
        retired_leftovers_stay_out_of_profiles,
    );
    r.check("deep_stacks_are_truncated", deep_stacks_are_truncated);
    r.check("go_pprof_reads_the_profile", go_pprof_reads_the_profile);
    r.check("bad_input", bad_input);
    r.finish();
}
