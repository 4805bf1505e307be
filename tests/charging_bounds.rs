//! Fast, exact charging at the bounds (DESIGN.md §3.3, §3.5): stocks of many threads never
//! cause a refusal that reclaiming them would avoid, `fallible` scopes fail at the barrier,
//! `forced` scopes never fail, and `checkpoint` reports a tenant over its barrier.

mod common;

use beancounter::{BcId, BeanAlloc, Limits, Resource, STOCK_BYTES};
use common::Runner;
use std::alloc::{GlobalAlloc, Layout};
use std::sync::{Arc, Barrier};

#[global_allocator]
static ALLOC: BeanAlloc = BeanAlloc::new();

const MIB: u64 = 1 << 20;

fn tenant(id: u32, barrier: u64, limit: u64) -> beancounter::Beancounter {
    let t = beancounter::find_or_create(BcId(id)).unwrap();
    t.set_limits(Resource::Memory, Limits::new(barrier, limit).unwrap())
        .unwrap();
    t
}

/// 64 threads each hold a stock of one tenant; a block that fits the tenant's true usage
/// but not its charged usage (stocks included) must still be granted: the refusal path
/// reclaims the other threads' stocks first. Afterwards every byte is accounted exactly.
fn sixty_four_stocks_do_not_cause_a_refusal() {
    const THREADS: usize = 64;
    let t = tenant(100, 16 * MIB, 16 * MIB);
    let hold = Arc::new(Barrier::new(THREADS + 1));
    let release = Arc::new(Barrier::new(THREADS + 1));
    let workers: Vec<_> = (0..THREADS)
        .map(|_| {
            let (t, hold, release) = (t.clone(), hold.clone(), release.clone());
            std::thread::spawn(move || {
                let _g = t.enter();
                // One small object: the first charge refills this thread's stock.
                let b = std::hint::black_box(Box::new([0u8; 64]));
                hold.wait();
                release.wait();
                drop(b);
            })
        })
        .collect();
    hold.wait();
    let m = t.stat(Resource::Memory);
    let charged = beancounter::stat(BcId(100), Resource::Memory).unwrap();
    assert_eq!(
        m.held,
        THREADS as u64 * 64,
        "true usage: 64 objects of 64 bytes"
    );
    // Charged usage (held + stocks) is what the counter holds; the stocks are what the
    // true usage does not explain. They must be large enough to matter for this test.
    let stocked = raw_held(&t) - charged.held;
    assert!(stocked > 4 * MIB, "stocks hold only {stocked} bytes");
    assert!(stocked <= THREADS as u64 * STOCK_BYTES);

    // 12 MiB fits next to 4 KiB of true usage, but not next to the stocks.
    let need = 16 * MIB - stocked / 2;
    assert!(need + raw_held(&t) > 16 * MIB && need + m.held <= 16 * MIB);
    let big = {
        let _g = t.enter();
        let mut v: Vec<u8> = Vec::new();
        v.try_reserve_exact(need as usize - 8192)
            .expect("refused although only stocks were in the way");
        v
    };
    let after = t.stat(Resource::Memory);
    assert!(after.held <= 16 * MIB && raw_held(&t) <= 16 * MIB);
    assert_eq!(
        after.failcnt, 0,
        "the charge succeeded on its retry; nothing was refused for real"
    );
    drop(big);
    release.wait();
    for w in workers {
        w.join().unwrap();
    }
    beancounter::drain_stock();
    assert_eq!(t.stat(Resource::Memory).held, 0);
    assert_eq!(
        raw_held(&t),
        0,
        "every stock was drained: threads exited or were reclaimed"
    );
}

/// `held` as charged, stocks included: what the counter itself holds. `stat()` reports true
/// usage; `maxheld` right after `reset_window` is the charged value.
fn raw_held(t: &beancounter::Beancounter) -> u64 {
    t.reset_window();
    t.stat(Resource::Memory).maxheld
}

/// Inside `fallible`, allocations are checked against the barrier: `try_reserve` fails
/// gracefully there and succeeds outside, and the refusal is counted as such.
fn fallible_fails_at_the_barrier() {
    let t = tenant(101, MIB, 32 * MIB);
    let _g = t.enter();
    let mut v: Vec<u8> = Vec::new();
    assert!(beancounter::fallible(|| v.try_reserve_exact(2 * MIB as usize)).is_err());
    let e = t.events(Resource::Memory);
    assert_eq!((e.refused_at_barrier, e.refused_at_limit), (1, 0));
    assert!(
        v.try_reserve_exact(2 * MIB as usize).is_ok(),
        "outside fallible the limit applies"
    );
    assert!(
        beancounter::checkpoint().is_err(),
        "2 MiB is over the 1 MiB barrier"
    );
    assert!(t.events(Resource::Memory).barrier_crossings >= 1);
    drop(v);
    assert!(
        beancounter::checkpoint().is_ok(),
        "back under the barrier once freed"
    );
}

/// Inside `forced`, allocations pass even the limit, are still counted, and the forced
/// charge past the limit is visible in the events.
fn forced_never_fails_and_is_counted() {
    let t = tenant(102, MIB / 2, MIB);
    let _g = t.enter();
    let layout = Layout::from_size_align(3 * MIB as usize, 8).unwrap();
    // SAFETY: non-zero size.
    let refused = unsafe { ALLOC.alloc(layout) };
    assert!(refused.is_null(), "over the limit outside forced");
    // SAFETY: non-zero size.
    let p = beancounter::forced(|| unsafe { ALLOC.alloc(layout) });
    assert!(!p.is_null(), "forced allocations are never refused");
    let s = t.stat(Resource::Memory);
    assert!(s.held >= 3 * MIB && s.held > s.limit, "{s:?}");
    assert!(t.events(Resource::Memory).forced_past_limit >= 1);
    let err = beancounter::checkpoint().unwrap_err();
    assert_eq!(
        (err.id, err.resource, err.bound),
        (BcId(102), Resource::Memory, MIB / 2)
    );
    // SAFETY: allocated above with `layout`.
    unsafe { ALLOC.dealloc(p, layout) };
    assert!(t.stat(Resource::Memory).held < MIB / 2);
}

/// A limit lowered while threads hold stock takes the stocks back at once.
fn limit_change_reclaims_stocks() {
    let t = tenant(103, 64 * MIB, 64 * MIB);
    let ready = Arc::new(Barrier::new(5));
    let done = Arc::new(Barrier::new(5));
    let workers: Vec<_> = (0..4)
        .map(|_| {
            let (t, ready, done) = (t.clone(), ready.clone(), done.clone());
            std::thread::spawn(move || {
                let _g = t.enter();
                let b = std::hint::black_box(Box::new(1u64));
                ready.wait();
                done.wait();
                drop(b);
            })
        })
        .collect();
    ready.wait();
    assert!(raw_held(&t) > 4 * 8, "the workers hold stock");
    t.set_limits(Resource::Memory, Limits::new(MIB, MIB).unwrap())
        .unwrap();
    assert_eq!(
        raw_held(&t),
        t.stat(Resource::Memory).held,
        "no stock left after the change"
    );
    done.wait();
    for w in workers {
        w.join().unwrap();
    }
}

/// Stocks in other subtrees count against a shared ancestor too: a child's charge first
/// refused at the child (its own stocks) and then, after those were taken back, at the
/// parent (whose headroom the siblings' stocks hold) must reclaim at the parent as well,
/// and be granted, when true usage leaves room at every level.
fn siblings_stocks_do_not_cause_a_refusal_at_the_parent() {
    const SIBLINGS: u32 = 8;
    let parent = tenant(200, 1536 << 10, 1536 << 10);
    let child = parent.new_child(BcId(201)).unwrap();
    child
        .set_limits(Resource::Memory, Limits::new(MIB, MIB).unwrap())
        .unwrap();
    let mut holders: Vec<_> = (0..SIBLINGS)
        .map(|i| parent.new_child(BcId(210 + i)).unwrap())
        .collect();
    holders.push(child.clone());
    let hold = Arc::new(Barrier::new(holders.len() + 1));
    let release = Arc::new(Barrier::new(holders.len() + 1));
    let workers: Vec<_> = holders
        .into_iter()
        .map(|t| {
            let (hold, release) = (hold.clone(), release.clone());
            std::thread::spawn(move || {
                let g = t.enter();
                let b = std::hint::black_box(Box::new([0u8; 16])); // takes a stock of `t`, charged to the parent too
                drop(g);
                hold.wait();
                release.wait();
                drop(b);
            })
        })
        .collect();
    hold.wait();
    // Every other thread waits: no stock can be taken again meanwhile.
    let (c, p) = (child.stat(Resource::Memory), parent.stat(Resource::Memory));
    let stocked = raw_held(&parent) - p.held;
    assert!(
        stocked > 512 << 10,
        "the siblings' stocks must crowd the parent: {stocked}"
    );
    let room = (c.limit - c.held).min(p.limit - p.held) / 4096 * 4096;
    let layout = Layout::from_size_align(room as usize, 4096).unwrap();
    let block = {
        let _g = child.enter();
        // SAFETY: a non-zero-size layout.
        unsafe { ALLOC.alloc(layout) }
    };
    assert!(
        !block.is_null(),
        "refused although only stocks were in the way"
    );
    assert_eq!(child.stat(Resource::Memory).failcnt, 0);
    assert_eq!(parent.stat(Resource::Memory).failcnt, 0);
    // SAFETY: allocated above with `layout`.
    unsafe { ALLOC.dealloc(block, layout) };
    release.wait();
    for w in workers {
        w.join().unwrap();
    }
}

/// A thread that switches tenant keeps each tenant's stock: back in A after serving B, its
/// next allocations come from A's entry without a charge reaching A's counter (its
/// `maxheld` does not move after a window reset), and `stat()` is exact throughout with no
/// drain.
fn stocks_survive_tenant_switches() {
    let (a, b) = (
        tenant(110, 64 * MIB, 64 * MIB),
        tenant(111, 64 * MIB, 64 * MIB),
    );
    let (a0, b0) = (a.stat(Resource::Memory).held, b.stat(Resource::Memory).held);
    let x = {
        let _g = a.enter();
        std::hint::black_box(Box::new([1u8; 64]))
    };
    let y = {
        let _g = b.enter();
        std::hint::black_box(Box::new([2u8; 64]))
    };
    a.reset_window();
    let charged = a.stat(Resource::Memory).maxheld;
    let z = {
        let _g = a.enter();
        std::hint::black_box(Box::new([3u8; 64]))
    };
    assert_eq!(
        a.stat(Resource::Memory).maxheld,
        charged,
        "A's allocation after serving B reached A's counter: its stock was drained"
    );
    assert_eq!(a.stat(Resource::Memory).held, a0 + 128, "A's true usage");
    assert_eq!(b.stat(Resource::Memory).held, b0 + 64, "B's true usage");
    assert_eq!(a.stat(Resource::Allocations).held, 2);
    // Freed on a thread that never worked for A: into that thread's entry for A.
    std::thread::spawn(move || drop((x, z))).join().unwrap();
    drop(y);
    assert_eq!(a.stat(Resource::Memory).held, a0);
    assert_eq!(b.stat(Resource::Memory).held, b0);
    assert_eq!(a.stat(Resource::Allocations).held, 0);
}

/// A tenant whose last handle is gone, kept charged only by what threads' stocks hold of
/// it, is freed by `reap()`: the stocks are taken back first.
fn reap_takes_back_the_stocks_of_unreferenced_tenants() {
    let t = beancounter::find_or_create(BcId(112)).unwrap();
    {
        let _g = t.enter();
        drop(std::hint::black_box(Box::new([0u8; 64])));
    }
    assert_eq!(t.stat(Resource::Memory).held, 0, "true usage");
    drop(t);
    assert!(
        beancounter::lookup(BcId(112)).is_some(),
        "the stock keeps it charged"
    );
    assert!(beancounter::reap() >= 1);
    assert!(beancounter::lookup(BcId(112)).is_none(), "reaped");
}

fn main() {
    let mut r = Runner::new();
    r.check(
        "stocks_survive_tenant_switches",
        stocks_survive_tenant_switches,
    );
    r.check(
        "reap_takes_back_the_stocks_of_unreferenced_tenants",
        reap_takes_back_the_stocks_of_unreferenced_tenants,
    );
    r.check(
        "sixty_four_stocks_do_not_cause_a_refusal",
        sixty_four_stocks_do_not_cause_a_refusal,
    );
    r.check(
        "fallible_fails_at_the_barrier",
        fallible_fails_at_the_barrier,
    );
    r.check(
        "forced_never_fails_and_is_counted",
        forced_never_fails_and_is_counted,
    );
    r.check("limit_change_reclaims_stocks", limit_change_reclaims_stocks);
    r.check(
        "siblings_stocks_do_not_cause_a_refusal_at_the_parent",
        siblings_stocks_do_not_cause_a_refusal_at_the_parent,
    );
    r.finish();
}
