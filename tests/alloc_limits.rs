//! A tenant with a limit (DESIGN §3.1, §3.3, §3.5, §6.1): allocations past the limit are
//! refused with null (so `Vec::try_reserve` fails and nothing aborts), `held` never passes the
//! limit, refusals leave `held` alone and count in `failcnt`, and stocks leave no more slack
//! than the stated bound.

mod common;

use beancounter::{BeanAlloc, Limits, Resource, ResourceStat, STOCK_BYTES, STOCK_OBJECTS};
use common::{held, tenant, Rng, Runner, SendPtr};
use std::alloc::{GlobalAlloc, Layout};
use std::sync::{Arc, Barrier};

#[global_allocator]
static ALLOC: BeanAlloc = BeanAlloc::new();

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn main() {
    let mut r = Runner::new();
    r.check(
        "try_reserve_fails_at_the_limit_and_held_never_passes_it",
        try_reserve,
    );
    r.check(
        "try_reserve_of_small_vectors_at_the_limit",
        try_reserve_small,
    );
    r.check(
        "refused_allocation_is_null_and_leaves_held_alone",
        refused_is_null,
    );
    r.check(
        "one_thread_can_use_its_whole_memory_limit",
        whole_memory_limit,
    );
    r.check(
        "one_thread_can_use_its_whole_allocations_limit",
        whole_allocations_limit,
    );
    r.check(
        "failcnt_counts_refused_allocations_only",
        failcnt_counts_refusals,
    );
    r.check(
        "a_block_grown_a_page_at_a_time_stops_at_the_limit",
        page_steps_to_the_limit,
    );
    r.check("limit_holds_under_concurrent_allocation", concurrent_limit);
    r.check("other_threads_stocks_leave_bounded_slack", bounded_slack);
    r.finish();
}

fn limit(t: &beancounter::Beancounter, r: Resource, n: u64) {
    t.set_limits(r, Limits::new(n, n).unwrap()).unwrap();
}

/// A 4 KiB slab object grown one page per `realloc` under a 1 MiB limit (it becomes a block
/// of pages at its first step, a large block past 32 KiB; growth in place is charged through
/// the stock and may take the run's reserve): every step is charged exactly,
/// `held` never passes the limit, the growth is refused only where the limit leaves no room
/// (within two pages of it, or for a move, which holds both blocks) with the block intact and
/// `held` unchanged, and freeing gives everything back.
fn page_steps_to_the_limit() {
    const PAGE: usize = 4096;
    let t = tenant(9);
    let lim = MIB;
    limit(&t, Resource::Memory, lim);
    let _g = t.enter();
    let base = held(&t);
    let mut size = 4 * KIB as usize;
    let mut l = Layout::from_size_align(size, 8).unwrap();
    // SAFETY: non-zero sizes; every block is used within its size and freed with its layout.
    unsafe {
        let mut p = ALLOC.alloc(l);
        assert!(!p.is_null());
        p.write_bytes(7, size);
        loop {
            let before = t.stat(Resource::Memory);
            let q = ALLOC.realloc(p, l, size + PAGE);
            let after = t.stat(Resource::Memory);
            assert!(
                after.maxheld <= lim,
                "{size}: maxheld {} over",
                after.maxheld
            );
            if q.is_null() {
                assert_eq!(after.held, before.held, "{size}: the refusal changed held");
                break;
            }
            p = q;
            size += PAGE;
            l = Layout::from_size_align(size, 8).unwrap();
            p.add(size - PAGE).write_bytes(7, PAGE);
            assert_eq!(held(&t), (base.0 + size as u64, base.1 + 1), "{size}");
            assert!(size as u64 <= lim, "grown past the limit");
        }
        // Refused in place only near the limit; where the run cannot grow in place (the
        // pages after it are taken), a move holds old and new block at once.
        let (size, page) = (size as u64, PAGE as u64);
        assert!(
            size + 2 * page > lim || 2 * size + page > lim,
            "refused at {size}, below what the limit allows"
        );
        let size = size as usize;
        assert!((0..size).all(|i| p.add(i).read() == 7), "contents lost");
        ALLOC.dealloc(p, l);
    }
    assert_eq!(held(&t), base);
}

/// `Vec::try_reserve` under an 8 MiB limit, on every route: new vectors of one size until the
/// limit refuses one, then one vector growing by doubling. Growth stops with `Err` (nothing
/// aborts), every refusal counts in `failcnt` and leaves `held` as it was, `held` and `maxheld`
/// never pass the limit, the contents survive every move, and everything is given back.
///
/// Nothing asserts while the tenant is current: a panic message needs memory the tenant no
/// longer has.
fn try_reserve() {
    let t = tenant(1);
    let lim = 8 * MIB;
    limit(&t, Resource::Memory, lim);
    for (i, step) in [24usize, 3000, 40_000, 700_000, 3 << 20]
        .into_iter()
        .enumerate()
    {
        let mut vecs: Vec<Vec<u8>> = Vec::with_capacity(400_000);
        let mut over = None;
        let g = t.enter();
        let (before, after) = loop {
            let before = t.stat(Resource::Memory);
            let mut v: Vec<u8> = Vec::new();
            if v.try_reserve_exact(step).is_err() {
                break (before, t.stat(Resource::Memory));
            }
            v.resize(step, i as u8);
            vecs.push(v);
            let s = t.stat(Resource::Memory);
            if s.held > lim || s.maxheld > lim {
                over = Some(s);
            }
            if vecs.len() == vecs.capacity() {
                break (before, t.stat(Resource::Memory));
            }
        };
        drop(g);
        let n = vecs.len();
        assert!(vecs.iter().all(|v| v.iter().all(|&b| b == i as u8)));
        drop(vecs);
        assert_eq!(over, None, "step {step}: over the limit");
        assert!(n < 400_000, "step {step}: never refused");
        assert!(n > 0, "step {step}: the first vector was refused");
        assert_eq!(
            after.held, before.held,
            "step {step}: the refusal changed held"
        );
        assert!(
            after.failcnt > before.failcnt,
            "step {step}: refusal not in failcnt"
        );
        assert!(after.maxheld <= lim);
        beancounter::drain_stock();
        assert_eq!(held(&t), (0, 0), "step {step}");
    }

    // One vector growing by doubling: realloc refuses it, the old block stays intact.
    let mut v: Vec<u64> = Vec::new();
    let mut over = None;
    let mut grew = 0;
    let g = t.enter();
    let (before, after, err) = loop {
        let before = t.stat(Resource::Memory);
        if let Err(e) = v.try_reserve(v.capacity().max(1)) {
            break (before, t.stat(Resource::Memory), Some(e));
        }
        let n = v.capacity();
        let start = v.len() as u64;
        v.extend(start..n as u64);
        grew += 1;
        let s = t.stat(Resource::Memory);
        if s.held > lim || s.maxheld > lim {
            over = Some(s);
        }
        if grew > 64 {
            break (before, t.stat(Resource::Memory), None);
        }
    };
    drop(g);
    assert!(
        err.is_some(),
        "a vector doubled past the limit without refusal"
    );
    assert_eq!(over, None);
    assert_eq!(after.held, before.held, "the refused realloc changed held");
    assert!(after.failcnt > before.failcnt);
    assert!(
        v.iter().enumerate().all(|(i, &x)| x == i as u64),
        "contents lost"
    );
    assert!(
        v.capacity() * 8 > lim as usize / 4,
        "stopped early: {}",
        v.capacity()
    );
    drop(v);
    beancounter::drain_stock();
    assert_eq!(held(&t), (0, 0));
}

/// Many small vectors (slab objects, charged through the thread's stock) under a 1 MiB limit:
/// the first refusal comes as `Err` from `try_reserve`, not an abort, and not before the
/// tenant's true usage is within one object of the limit.
fn try_reserve_small() {
    let t = tenant(2);
    let lim = MIB;
    limit(&t, Resource::Memory, lim);
    let mut vecs: Vec<Vec<u64>> = Vec::with_capacity(100_000);
    let g = t.enter();
    let refused_at = loop {
        let mut v: Vec<u64> = Vec::new();
        // 16 u64: the 128-byte class.
        if v.try_reserve_exact(16).is_err() {
            break Some(t.stat(Resource::Memory));
        }
        vecs.push(v);
        if vecs.len() == vecs.capacity() {
            break None;
        }
    };
    drop(g);
    let count = vecs.len() as u64;
    drop(vecs);
    beancounter::drain_stock();
    assert_eq!(held(&t), (0, 0));
    let refused_at = refused_at.expect("no refusal under a 1 MiB limit");
    assert!(refused_at.held <= lim);
    assert!(
        refused_at.held + 128 > lim,
        "refused at true usage {} of {lim} ({count} objects of 128 bytes)",
        refused_at.held
    );
}

/// Allocates `layout` under `t` until null or `max` blocks; returns the blocks and the stats
/// just before and just after the refusal (no assertion runs while `t` is current).
fn fill_until_null(
    t: &beancounter::Beancounter,
    r: Resource,
    layout: Layout,
    max: usize,
) -> (Vec<*mut u8>, Option<(ResourceStat, ResourceStat)>) {
    let mut live: Vec<*mut u8> = Vec::with_capacity(max);
    let g = t.enter();
    let refusal = loop {
        let before = t.stat(r);
        // SAFETY: a non-zero size.
        let p = unsafe { ALLOC.alloc(layout) };
        if p.is_null() {
            break Some((before, t.stat(r)));
        }
        live.push(p);
        if live.len() == max {
            break None;
        }
    };
    drop(g);
    (live, refusal)
}

fn free_all(live: Vec<*mut u8>, layout: Layout) {
    for p in live {
        // SAFETY: allocated by `fill_until_null` with `layout`.
        unsafe { ALLOC.dealloc(p, layout) };
    }
}

/// Allocating through the `GlobalAlloc` directly: past the limit the answer is null, and
/// `held` is unchanged, `maxheld` within the limit and `failcnt` bumped, on every route.
fn refused_is_null() {
    let t = tenant(3);
    let lim = 4 * MIB;
    limit(&t, Resource::Memory, lim);
    for size in [64usize, 20_000, 100_000, 3 << 20] {
        let layout = Layout::from_size_align(size, 8).unwrap();
        let (live, refusal) = fill_until_null(&t, Resource::Memory, layout, 100_000);
        free_all(live, layout);
        beancounter::drain_stock();
        assert_eq!(held(&t), (0, 0));
        let (before, after) = refusal.unwrap_or_else(|| panic!("size {size}: never refused"));
        assert_eq!(
            after.held, before.held,
            "size {size}: the refusal changed held"
        );
        assert!(
            after.maxheld <= lim,
            "size {size}: maxheld {}",
            after.maxheld
        );
        assert!(
            after.failcnt > before.failcnt,
            "size {size}: failcnt not bumped"
        );
    }
}

/// With no other thread charging the tenant, a thread's own stock must not strand headroom:
/// 64-byte objects fill a 200 000-byte limit exactly (DESIGN §3.5: a charge may be refused
/// below the bound only because of stock held by *other* threads).
fn whole_memory_limit() {
    let t = tenant(4);
    let lim = 200_000u64;
    limit(&t, Resource::Memory, lim);
    let layout = Layout::from_size_align(64, 8).unwrap();
    let (live, refusal) = fill_until_null(&t, Resource::Memory, layout, 10_000);
    let n = live.len() as u64;
    free_all(live, layout);
    beancounter::drain_stock();
    assert_eq!(held(&t), (0, 0));
    let (before, _) = refusal.expect("never refused");
    assert_eq!(
        n,
        lim / 64,
        "refused after {n} objects of 64 bytes (true usage {} of {lim})",
        before.held
    );
}

/// The same for an `Allocations` limit: 1 000 live objects of 4 KiB, then null.
fn whole_allocations_limit() {
    let t = tenant(5);
    limit(&t, Resource::Allocations, 1000);
    let layout = Layout::from_size_align(4096, 8).unwrap();
    let (live, refusal) = fill_until_null(&t, Resource::Allocations, layout, 10_000);
    let n = live.len();
    free_all(live, layout);
    beancounter::drain_stock();
    assert_eq!(held(&t), (0, 0));
    let (_, after) = refusal.expect("never refused");
    assert!(after.maxheld <= 1000);
    assert_eq!(n, 1000, "refused after {n} live objects (limit 1000)");
}

/// `failcnt` is the number of refused charges (DESIGN §2): allocations that succeed must not
/// count as refusals, and each refused allocation counts once. 64-byte objects up to the
/// limit, then three refused ones.
fn failcnt_counts_refusals() {
    let t = tenant(6);
    let lim = 300_000u64;
    limit(&t, Resource::Memory, lim);
    let layout = Layout::from_size_align(64, 8).unwrap();
    let mut live: Vec<*mut u8> = Vec::with_capacity(10_000);
    let mut nulls = 0;
    let mut first_null_failcnt = None;
    let g = t.enter();
    while nulls < 3 && live.len() < 10_000 {
        let before = t.stat(Resource::Memory).failcnt;
        // SAFETY: a non-zero size.
        let p = unsafe { ALLOC.alloc(layout) };
        if p.is_null() {
            nulls += 1;
            first_null_failcnt.get_or_insert(before);
        } else {
            live.push(p);
        }
    }
    let end = t.stat(Resource::Memory).failcnt;
    drop(g);
    let n = live.len();
    free_all(live, layout);
    beancounter::drain_stock();
    assert_eq!(held(&t), (0, 0));
    assert_eq!(nulls, 3, "not refused");
    let before_first = first_null_failcnt.unwrap();
    assert_eq!(
        (before_first, end),
        (0, 3),
        "failcnt {before_first} after {n} successful allocations and no refused one, \
         {end} after 3 refused ones"
    );
}

/// Four threads allocate blocks of every route under one tenant with a 4 MiB limit, far more
/// than it allows: `held` sampled while they run and `maxheld` (which includes stocks) never
/// pass the limit; some allocations are refused; everything comes back.
fn concurrent_limit() {
    let t = tenant(7);
    let lim = 4 * MIB;
    limit(&t, Resource::Memory, lim);
    let threads = 4;
    let barrier = Arc::new(Barrier::new(threads));
    let handles: Vec<_> = (0..threads)
        .map(|i| {
            let (t, barrier) = (t.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut live: Vec<(SendPtr, Layout)> = Vec::with_capacity(20_000);
                let mut rng = Rng::new(i as u64 + 1);
                let (mut nulls, mut over, mut ok) = (0u64, 0u64, 0u64);
                barrier.wait();
                let g = t.enter();
                for n in 0..50_000 {
                    let size = match rng.below(100) {
                        0..=89 => 1 + rng.below(2000),
                        90..=98 => 32 * KIB + rng.below(200 * KIB),
                        _ => 2 * MIB + rng.below(MIB),
                    } as usize;
                    let layout = Layout::from_size_align(size, 8).unwrap();
                    if !live.is_empty() && rng.below(3) == 0 {
                        let (p, l) = live.swap_remove(rng.below(live.len() as u64) as usize);
                        // SAFETY: allocated below with `l`.
                        unsafe { ALLOC.dealloc(p.0, l) };
                    }
                    // SAFETY: a non-zero size.
                    let p = unsafe { ALLOC.alloc(layout) };
                    if p.is_null() {
                        // Refused: make room by freeing a block.
                        nulls += 1;
                        if !live.is_empty() {
                            let (p, l) = live.swap_remove(rng.below(live.len() as u64) as usize);
                            // SAFETY: allocated below with `l`.
                            unsafe { ALLOC.dealloc(p.0, l) };
                        }
                        continue;
                    }
                    ok += 1;
                    if live.len() < live.capacity() {
                        live.push((SendPtr(p), layout));
                    } else {
                        // SAFETY: just allocated with `layout`.
                        unsafe { ALLOC.dealloc(p, layout) };
                    }
                    if n % 64 == 0 && t.stat(Resource::Memory).held > lim {
                        over += 1;
                    }
                }
                for (p, l) in live {
                    // SAFETY: allocated above with `l`.
                    unsafe { ALLOC.dealloc(p.0, l) };
                }
                drop(g);
                beancounter::drain_stock();
                (nulls, over, ok)
            })
        })
        .collect();
    let (mut nulls, mut over, mut ok) = (0, 0, 0);
    for h in handles {
        let (n, o, k) = h.join().unwrap();
        nulls += n;
        over += o;
        ok += k;
    }
    println!("    {ok} allocations served, {nulls} refused");
    let s = t.stat(Resource::Memory);
    assert_eq!(over, 0, "held sampled above the limit {over} times");
    assert!(s.maxheld <= lim, "maxheld {} > limit {lim}", s.maxheld);
    assert!(nulls > 0, "the limit never refused anything");
    assert!(ok > 100_000, "only {ok} allocations served");
    assert!(s.failcnt >= nulls);
    assert_eq!(held(&t), (0, 0));
}

/// DESIGN §3.5: a charge may be refused while true usage + request is under the bound only by
/// stock held by other threads, and that slack is bounded independently of the number of
/// threads. Eight threads each take a stock of the tenant and park; then this thread fills
/// the 2 MiB limit with 16 KiB blocks: it must get within a constant (one stock batch, whatever
/// the thread count) of the limit.
fn bounded_slack() {
    let t = tenant(8);
    let lim = 2 * MIB;
    limit(&t, Resource::Memory, lim);
    let threads = 8;
    let parked = Arc::new(Barrier::new(threads + 1));
    let release = Arc::new(Barrier::new(threads + 1));
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let (t, parked, release) = (t.clone(), parked.clone(), release.clone());
            std::thread::spawn(move || {
                let layout = Layout::from_size_align(64, 8).unwrap();
                let g = t.enter();
                // SAFETY: a non-zero size.
                let p = unsafe { ALLOC.alloc(layout) };
                assert!(!p.is_null());
                // SAFETY: allocated just above.
                unsafe { ALLOC.dealloc(p, layout) };
                drop(g);
                parked.wait();
                release.wait();
            })
        })
        .collect();
    parked.wait();
    let layout = Layout::from_size_align(16 << 10, 8).unwrap();
    let (live, refusal) = fill_until_null(&t, Resource::Memory, layout, 1000);
    free_all(live, layout);
    beancounter::drain_stock();
    release.wait();
    for h in handles {
        h.join().unwrap();
    }
    assert_eq!(held(&t), (0, 0));
    let true_usage = refusal.expect("never refused").0.held;
    let slack = lim - true_usage;
    let bound = STOCK_BYTES + STOCK_OBJECTS + (16 << 10);
    assert!(
        slack <= bound,
        "refused at true usage {true_usage} of {lim}: {slack} bytes of slack with {threads} \
         stocked threads (bound {bound}, independent of the thread count)"
    );
}
