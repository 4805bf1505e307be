//! The OS refusing memory and `fork()` (DESIGN §3.2, §7): a refused mapping gives null, rolls
//! the charge back, and leaves the allocator usable — by fault injection on every route, and
//! in a child process under a low `RLIMIT_AS`; a child forked while other threads allocate can
//! allocate and exit 0.

mod common;

use beancounter::{BcId, BeanAlloc, Beancounter, Limits, Resource, ResourceStat};
use common::{fill, held, tenant, verify, verify_prefix, Rng, Runner, SendPtr};
use std::alloc::{GlobalAlloc, Layout};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: BeanAlloc = BeanAlloc::new();

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

fn main() {
    let mut r = Runner::new();
    r.check(
        "injected_failure_of_a_huge_mapping_is_null_without_charge",
        huge_failure,
    );
    r.check(
        "injected_failures_on_every_route_are_null_without_charge",
        every_route,
    );
    r.check(
        "injected_failure_in_realloc_keeps_the_old_block",
        realloc_failure,
    );
    r.isolated("rlimit_as_refusals_are_null_without_charge", 120, rlimit_as);
    r.isolated("fork_while_other_threads_allocate", 120, fork_while_busy);
    r.isolated(
        "fork_while_exiting_threads_allocate",
        15,
        fork_while_threads_exit,
    );
    r.isolated(
        "forked_child_can_reclaim_stocks_while_others_charged",
        60,
        fork_then_reclaim,
    );
    r.check("heap_invariants_hold", || {
        beancounter::check_heap().unwrap()
    });
    r.finish();
}

fn stats(t: &Beancounter) -> (ResourceStat, ResourceStat) {
    (t.stat(Resource::Memory), t.stat(Resource::Allocations))
}

/// One refused mapping: an 8 MiB block from `alloc` and a 12 MiB one from `alloc_zeroed`
/// (each a mapping of its own) come back null, nothing stays charged or mapped, and the
/// same request then succeeds.
fn huge_failure() {
    let t = tenant(1);
    let _g = t.enter();
    // The second size is more than a quarter above the first: the first block's mapping,
    // kept for reuse once freed, cannot serve it, so the OS is asked again.
    for (zeroed, size) in [(false, 8 * MIB), (true, 12 * MIB)] {
        let l = Layout::from_size_align(size, 64).unwrap();
        let (before, mapped) = (held(&t), beancounter::mapped_bytes());
        beancounter::fail_next_os_maps(1);
        // SAFETY: a non-zero size.
        let p = unsafe {
            if zeroed {
                ALLOC.alloc_zeroed(l)
            } else {
                ALLOC.alloc(l)
            }
        };
        beancounter::fail_next_os_maps(0);
        assert!(
            p.is_null(),
            "served despite the refused mapping (zeroed: {zeroed})"
        );
        assert_eq!(
            held(&t),
            before,
            "a charge stayed behind (zeroed: {zeroed})"
        );
        assert_eq!(beancounter::mapped_bytes(), mapped);
        // SAFETY: a non-zero size.
        let p = unsafe { ALLOC.alloc_zeroed(l) };
        assert!(!p.is_null(), "not usable after the refusal");
        // SAFETY: `size` zeroed bytes.
        assert!(unsafe { common::all_zero(p, l.size()) });
        assert_eq!(held(&t), (before.0 + size as u64, before.1 + 1));
        // SAFETY: allocated just above.
        unsafe { ALLOC.dealloc(p, l) };
        assert_eq!(held(&t), before);
    }
}

/// With every mapping refused, each route is served from what is already mapped until it
/// runs out; the first null leaves `held` exactly as it was; once the OS gives memory again
/// the same request succeeds; freeing everything returns `held` to zero. Routes: small slab
/// objects, a slab of the largest class, large runs (one needing a 1 MiB-aligned run), huge
/// blocks.
fn every_route() {
    let t = tenant(2);
    for (size, align, max) in [
        (64usize, 8usize, 4_000_000usize),
        (24 * KIB, 8, 100_000),
        (100 * KIB, 8, 100_000),
        (MIB, MIB, 10_000),
        (8 * MIB, 8, 1_000),
    ] {
        let l = Layout::from_size_align(size, align).unwrap();
        let mut live: Vec<*mut u8> = Vec::with_capacity(max);
        let mapped = beancounter::mapped_bytes();
        let g = t.enter();
        beancounter::fail_next_os_maps(u32::MAX);
        let refusal = loop {
            let before = stats(&t);
            // SAFETY: a non-zero size.
            let p = unsafe { ALLOC.alloc(l) };
            if p.is_null() {
                break Some((before, stats(&t)));
            }
            live.push(p);
            if live.len() == max {
                break None;
            }
        };
        beancounter::fail_next_os_maps(0);
        let mapped_at_refusal = beancounter::mapped_bytes();
        // SAFETY: a non-zero size.
        let again = unsafe { ALLOC.alloc(l) };
        drop(g);
        let n = live.len();
        if !again.is_null() {
            live.push(again);
        }
        for p in live {
            // SAFETY: allocated above with `l`.
            unsafe { ALLOC.dealloc(p, l) };
        }
        beancounter::drain_stock();
        assert_eq!(held(&t), (0, 0), "({size}, {align}): held after freeing");
        let (before, after) =
            refusal.unwrap_or_else(|| panic!("({size}, {align}): {n} served, never refused"));
        assert_eq!(
            (after.0.held, after.1.held),
            (before.0.held, before.1.held),
            "({size}, {align}): the refused request left a charge"
        );
        assert!(
            mapped_at_refusal <= mapped,
            "({size}, {align}): mapped while every mapping was refused"
        );
        assert!(
            !again.is_null(),
            "({size}, {align}): still null once the OS gives memory"
        );
        println!("    ({size}, {align}): {n} served from mapped memory, then null");
    }
}

/// `realloc` of a huge block when the OS refuses both the resize and a new mapping: null, the
/// old block still valid and charged as before; then the same realloc succeeds with the
/// contents.
fn realloc_failure() {
    let t = tenant(3);
    let l = Layout::from_size_align(8 * MIB, 8).unwrap();
    let _g = t.enter();
    let base = held(&t);
    // SAFETY: a non-zero size; the block is used within its size.
    unsafe {
        let p = ALLOC.alloc(l);
        assert!(!p.is_null());
        fill(p, l.size(), 5);
        let charged = held(&t);
        beancounter::fail_next_os_maps(2);
        let q = ALLOC.realloc(p, l, 32 * MIB);
        beancounter::fail_next_os_maps(0);
        assert!(q.is_null(), "realloc served despite refused mappings");
        assert_eq!(held(&t), charged, "the refused realloc changed the charge");
        assert_eq!(verify(p, l.size(), 5), Ok(()), "the old block was damaged");
        let q = ALLOC.realloc(p, l, 32 * MIB);
        assert!(!q.is_null());
        assert_eq!(verify_prefix(q, l.size(), l.size(), 5), Ok(()));
        assert_eq!(held(&t), (base.0 + 32 * MIB as u64, base.1 + 1));
        ALLOC.dealloc(q, Layout::from_size_align(32 * MIB, 8).unwrap());
    }
    assert_eq!(held(&t), base);
}

/// Lowers this (child) process's address-space limit to what it uses plus 64 MiB.
fn lower_rlimit_as() {
    let (_, virt) = common::statm();
    let lim = libc::rlimit {
        rlim_cur: (virt + 64 * MIB) as libc::rlim_t,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit; lowering the soft limit only affects this process.
    assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &lim) }, 0);
}

/// In a child process with `RLIMIT_AS` at current use + 64 MiB: a 256 MiB block, then 1 MiB
/// blocks until refused, then 64-byte objects until refused. Each refusal is null and leaves
/// `held` unchanged; after freeing, `held` is zero and ordinary allocations work.
fn rlimit_as() {
    let t = tenant(4);
    let mut big: Vec<*mut u8> = Vec::with_capacity(1000);
    let mut small: Vec<*mut u8> = Vec::with_capacity(4_000_000);
    let (lb, ls) = (
        Layout::from_size_align(MIB, 8).unwrap(),
        Layout::from_size_align(64, 8).unwrap(),
    );
    // Warm up: the tenant, its stock and this thread's heap exist before the limit.
    let g = t.enter();
    // SAFETY: a non-zero size.
    unsafe { ALLOC.dealloc(ALLOC.alloc(ls), ls) };
    drop(g);
    lower_rlimit_as();

    let g = t.enter();
    let h0 = held(&t);
    let huge = Layout::from_size_align(256 * MIB, 8).unwrap();
    // SAFETY: a non-zero size.
    let p = unsafe { ALLOC.alloc(huge) };
    let h1 = held(&t);
    let mut refusals = Vec::new();
    for (layout, out) in [(lb, &mut big), (ls, &mut small)] {
        let r = loop {
            let before = held(&t);
            // SAFETY: a non-zero size.
            let p = unsafe { ALLOC.alloc(layout) };
            if p.is_null() {
                break Some((before, held(&t)));
            }
            // SAFETY: a fresh block: touch it, so the pages are really there.
            unsafe { p.write(1) };
            out.push(p);
            if out.len() == out.capacity() {
                break None;
            }
        };
        refusals.push(r);
    }
    drop(g);
    let counts = (big.len(), small.len());
    for p in big {
        // SAFETY: allocated above with `lb`.
        unsafe { ALLOC.dealloc(p, lb) };
    }
    for p in small {
        // SAFETY: allocated above with `ls`.
        unsafe { ALLOC.dealloc(p, ls) };
    }
    beancounter::drain_stock();
    println!(
        "    served {} blocks of 1 MiB, {} of 64 bytes before refusals",
        counts.0, counts.1
    );
    assert!(
        p.is_null(),
        "a 256 MiB block was served under a 64 MiB headroom"
    );
    assert_eq!(h1, h0, "the refused 256 MiB block left a charge");
    for (what, r) in ["1 MiB", "64 B"].iter().zip(refusals) {
        let (before, after) = r.unwrap_or_else(|| panic!("{what} blocks never refused"));
        assert_eq!(after, before, "the refused {what} block left a charge");
    }
    assert_eq!(held(&t), (0, 0));
    // Still usable, through ordinary collections, by the tenant.
    let g = t.enter();
    let v: Vec<u64> = (0..100_000).collect();
    let s: String = format!("{}", v.iter().sum::<u64>());
    let b = Box::new([7u8; 100]);
    drop(g);
    assert_eq!(s, "4999950000");
    assert_eq!(b[99], 7);
    assert!(held(&t).0 > 800_000);
    drop((v, s, b));
    beancounter::check_heap().unwrap();
}

/// What a forked child does: allocate on every route under a tenant, check the charges and
/// the heap, free. Returns the exit code (0 = fine). Nothing here may panic.
fn in_fork_child() -> i32 {
    let Ok(t) = beancounter::find_or_create(BcId(60)) else {
        return 2;
    };
    let g = t.enter();
    let mut blocks: [(*mut u8, Layout); 4] = [(std::ptr::null_mut(), Layout::new::<u8>()); 4];
    for (i, size) in [24usize, 3000, 100 * KIB, 5 * MIB].into_iter().enumerate() {
        let l = Layout::from_size_align(size, 16).unwrap();
        // SAFETY: a non-zero size.
        let p = unsafe { ALLOC.alloc(l) };
        if p.is_null() {
            return 3;
        }
        // SAFETY: `size` bytes.
        unsafe { fill(p, size, i as u64) };
        blocks[i] = (p, l);
    }
    // An ordinary collection too: a null here aborts, which the parent sees.
    let v: Vec<u32> = (0..10_000).collect();
    drop(v);
    drop(g);
    if held(&t).1 != 4 {
        return 4;
    }
    for (i, (p, l)) in blocks.into_iter().enumerate() {
        // SAFETY: live blocks of `l.size()` bytes.
        if unsafe { verify(p, l.size(), i as u64) }.is_err() {
            return 5;
        }
        // SAFETY: allocated above with `l`.
        unsafe { ALLOC.dealloc(p, l) };
    }
    beancounter::drain_stock();
    if held(&t) != (0, 0) {
        return 6;
    }
    if beancounter::check_heap().is_err() {
        return 7;
    }
    0
}

/// Forks 200 times while four threads allocate and free on every route under tenants, hand
/// blocks to each other, and start and end threads (so every allocator lock is busy). Every
/// child allocates, checks, and exits 0 within 10 s. Afterwards the workers' tenants are back
/// to zero.
fn fork_while_busy() {
    let stop = Arc::new(AtomicBool::new(false));
    let tenants: Vec<Beancounter> = (0..4).map(|i| tenant(10 + i)).collect();
    let (tx, rx) = mpsc::sync_channel::<(SendPtr, Layout)>(1024);
    let rx = Arc::new(std::sync::Mutex::new(rx));
    let mut workers = Vec::new();
    for (i, t) in tenants.iter().enumerate() {
        let (stop, t, tx, rx) = (stop.clone(), t.clone(), tx.clone(), rx.clone());
        workers.push(std::thread::spawn(move || {
            let mut rng = Rng::new(i as u64 + 7);
            let mut live: Vec<(SendPtr, Layout)> = Vec::with_capacity(512);
            while !stop.load(Ordering::Relaxed) {
                let size = match rng.below(100) {
                    0..=79 => 1 + rng.below(2048),
                    80..=97 => 32 * KIB as u64 + rng.below(300 * KIB as u64),
                    _ => 2 * MIB as u64 + rng.below(MIB as u64),
                } as usize;
                let l = Layout::from_size_align(size, 8).unwrap();
                let g = t.enter();
                // SAFETY: a non-zero size.
                let p = unsafe { ALLOC.alloc(l) };
                drop(g);
                assert!(!p.is_null());
                live.push((SendPtr(p), l));
                if live.len() == 512 || rng.below(4) == 0 {
                    let (p, l) = live.swap_remove(rng.below(live.len() as u64) as usize);
                    if rng.below(2) == 0 {
                        // SAFETY: allocated above with `l`.
                        unsafe { ALLOC.dealloc(p.0, l) };
                    } else if let Err(e) = tx.try_send((p, l)) {
                        let (mpsc::TrySendError::Full((p, l))
                        | mpsc::TrySendError::Disconnected((p, l))) = e;
                        // SAFETY: allocated above with `l`.
                        unsafe { ALLOC.dealloc(p.0, l) };
                    }
                }
                if let Ok((p, l)) = rx.lock().unwrap().try_recv() {
                    // SAFETY: sent by a worker that allocated it with `l`.
                    unsafe { ALLOC.dealloc(p.0, l) };
                }
                if rng.below(500) == 0 {
                    // A short thread: heap adoption and abandonment under the locks.
                    std::thread::spawn(|| drop(vec![0u8; 5000])).join().unwrap();
                }
            }
            for (p, l) in live {
                // SAFETY: allocated above with `l`.
                unsafe { ALLOC.dealloc(p.0, l) };
            }
        }));
    }
    drop(tx);
    std::thread::sleep(Duration::from_millis(50));
    let mut failures = Vec::new();
    for n in 0..200 {
        // SAFETY: the child only allocates through this crate and calls `_exit`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = in_fork_child();
            // SAFETY: ends the child without running the parent's destructors or atexit.
            unsafe { libc::_exit(code) };
        }
        assert!(pid > 0, "fork failed");
        match common::wait_for(pid, Duration::from_secs(10)) {
            None => failures.push(format!("fork {n}: child hung (killed after 10 s)")),
            Some(s) if libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0 => {}
            Some(s) => failures.push(format!(
                "fork {n}: child status {s:#x} (exit code {}, signal {})",
                libc::WEXITSTATUS(s),
                libc::WTERMSIG(s)
            )),
        }
        if n % 10 == 0 {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    while let Ok((p, l)) = rx.lock().unwrap().try_recv() {
        // SAFETY: sent by a worker that allocated it with `l`.
        unsafe { ALLOC.dealloc(p.0, l) };
    }
    assert!(failures.is_empty(), "{failures:#?}");
    for t in &tenants {
        assert_eq!(held(t), (0, 0), "{t:?}");
    }
}

/// A pthread key whose destructor allocates: it runs after the allocator's own thread-exit
/// hook (keys are destroyed in creation order), like any C library's or runtime's late
/// thread-exit work, so the thread allocates with its heap already handed back.
static LATE_KEY: OnceLock<libc::pthread_key_t> = OnceLock::new();

extern "C" fn late_destructor(_: *mut libc::c_void) {
    let l = Layout::from_size_align(16 * KIB, 8).unwrap();
    let mut blocks = [std::ptr::null_mut::<u8>(); 32];
    for b in blocks.iter_mut() {
        // SAFETY: a non-zero size.
        *b = unsafe { ALLOC.alloc(l) };
    }
    for b in blocks {
        if !b.is_null() {
            // SAFETY: allocated just above with `l`.
            unsafe { ALLOC.dealloc(b, l) };
        }
    }
}

/// Forks for two seconds while other threads keep starting and exiting, each allocating from
/// a thread-exit destructor that runs after the allocator's exit hook (DESIGN §7: "`fork()` in
/// a multi-threaded process: the child's allocator is usable (no lock left held)"; nor may the
/// fork handlers deadlock with an allocation in progress). Every fork must return and every
/// child exit 0.
fn fork_while_threads_exit() {
    let key = *LATE_KEY.get_or_init(|| {
        let mut key = 0;
        // SAFETY: a valid out-pointer; the destructor never unwinds.
        let r = unsafe { libc::pthread_key_create(&mut key, Some(late_destructor)) };
        assert_eq!(r, 0);
        key
    });
    let stop = Arc::new(AtomicBool::new(false));
    let spawners: Vec<_> = (0..3)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::spawn(move || {
                        // SAFETY: a key of this process; any non-null value arms the destructor.
                        unsafe {
                            libc::pthread_setspecific(key, std::ptr::dangling::<libc::c_void>())
                        };
                        let v: Vec<Box<[u8; 16000]>> =
                            (0..20).map(|_| Box::new([1; 16000])).collect();
                        drop(v);
                    })
                    .join()
                    .unwrap();
                }
            })
        })
        .collect();
    let start = Instant::now();
    let mut forks = 0;
    let mut failures = Vec::new();
    while start.elapsed() < Duration::from_secs(2) {
        // SAFETY: the child only allocates through this crate and calls `_exit`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let v = vec![1u8; 100];
            let code = i32::from(v[99] != 1);
            drop(v);
            // SAFETY: ends the child without running the parent's destructors or atexit.
            unsafe { libc::_exit(code) };
        }
        assert!(pid > 0, "fork failed");
        match common::wait_for(pid, Duration::from_secs(10)) {
            Some(s) if libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0 => {}
            other => failures.push(format!("fork {forks}: {other:?}")),
        }
        forks += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for s in spawners {
        s.join().unwrap();
    }
    println!("    {forks} forks");
    assert!(failures.is_empty(), "{failures:#?}");
}

/// Forks for two seconds while three threads charge two tenants through their stocks (each
/// allocation switches tenant, so stocks are drained and refilled all the time). Each child
/// then does what takes other threads' stocks back: sets a limit on one of those tenants and
/// allocates past it, expecting a refusal. The threads that held those stocks do not exist in
/// the child; it must neither wait for them nor hang. Every child exits 0 within 3 s.
fn fork_then_reclaim() {
    let (a, b) = (tenant(20), tenant(21));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let (stop, a, b) = (stop.clone(), a.clone(), b.clone());
            std::thread::spawn(move || {
                let l = Layout::from_size_align(64, 8).unwrap();
                while !stop.load(Ordering::Relaxed) {
                    for t in [&a, &b] {
                        let g = t.enter();
                        // SAFETY: a non-zero size; freed at once.
                        unsafe {
                            let p = ALLOC.alloc(l);
                            if !p.is_null() {
                                ALLOC.dealloc(p, l);
                            }
                        }
                        drop(g);
                    }
                }
            })
        })
        .collect();
    let start = Instant::now();
    let mut forks = 0;
    let mut failures = Vec::new();
    while start.elapsed() < Duration::from_secs(2) && failures.len() < 3 {
        // SAFETY: the child only uses this crate and calls `_exit`.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let code = reclaim_in_child(&a);
            // SAFETY: ends the child without running the parent's destructors or atexit.
            unsafe { libc::_exit(code) };
        }
        assert!(pid > 0, "fork failed");
        match common::wait_for(pid, Duration::from_secs(3)) {
            Some(s) if libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0 => {}
            None => failures.push(format!("fork {forks}: child hung (killed after 3 s)")),
            Some(s) => failures.push(format!("fork {forks}: child status {s:#x}")),
        }
        forks += 1;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.join().unwrap();
    }
    println!("    {forks} forks");
    assert!(failures.is_empty(), "{failures:#?}");
}

/// In a forked child: a 1 MiB limit on `t` (which takes stocks back), then a 2 MiB request
/// under it, which must be refused. Returns the exit code.
fn reclaim_in_child(t: &Beancounter) -> i32 {
    let mib = MIB as u64;
    if t.set_limits(Resource::Memory, Limits::new(mib, mib).unwrap())
        .is_err()
    {
        return 2;
    }
    let l = Layout::from_size_align(2 * MIB, 8).unwrap();
    let g = t.enter();
    // SAFETY: a non-zero size.
    let p = unsafe { ALLOC.alloc(l) };
    drop(g);
    if p.is_null() {
        0
    } else {
        3
    }
}
