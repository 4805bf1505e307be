//! The models. Each builds a small registry inside the model, runs two or three threads
//! against it, and checks the invariants of `DESIGN.md` §6 in every explored interleaving.
//!
//! Bounded as `STYLE.md` asks: at most three threads, `LOOM_MAX_PREEMPTIONS=2` unless the
//! environment says otherwise. Each model prints how many interleavings it explored (see
//! them with `cargo test -p loom-tests -- --nocapture`).

use crate::accounting::registry::Registry;
use crate::accounting::types::{BcError, BcId, Limits, Resource, Severity};
use loom::sync::Arc;
use loom::thread;
use std::sync::atomic::{AtomicUsize, Ordering};

pub(crate) const MEM: Resource = Resource::Memory;
pub(crate) const MEM_INDEX: usize = 0;

/// Runs `f` under loom with the preemption bound defaulting to 2, and reports the number of
/// interleavings explored.
///
/// A model whose main thread spawns threads and then acts itself yields first
/// (`thread::yield_now()`): without it, loom 0.7.3 explored no interleaving in which a
/// spawned thread's first step came before the main thread's next one (a probe counted 0 of
/// 76 in `stock_consume_races_reclaim`; the inbox model saw no push before its first take).
/// With the yields the models explore 1.2-14 times as many interleavings. One model,
/// `stock_refill_races_limit_change`, explored fewer with it (403 against 1 139) and goes
/// without.
pub(crate) fn model<F>(name: &str, f: F)
where
    F: Fn() + Sync + Send + 'static,
{
    let iterations = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = iterations.clone();
    let mut builder = loom::model::Builder::new();
    if builder.preemption_bound.is_none() {
        builder.preemption_bound = Some(2);
    }
    // Creating a beancounter resets every field of every counter: each store is a branch
    // loom records, so paths are long even when the interesting part is short.
    builder.max_branches = 20_000;
    let bound = builder.preemption_bound;
    builder.check(move || {
        counted.fetch_add(1, Ordering::Relaxed);
        f();
    });
    println!(
        "loom model {name}: {} interleavings explored (preemption bound {bound:?})",
        iterations.load(Ordering::Relaxed)
    );
}

pub(crate) fn limits(barrier: u64, limit: u64) -> Limits {
    Limits::new(barrier, limit).unwrap()
}

/// Concurrent charges on one beancounter with a limit: no interleaving ends with `held`
/// above the limit or with a refused charge changing `held`, and `failcnt` counts exactly
/// the refusals. One thread also uncharges, so the limit is crossed in both directions.
#[test]
fn concurrent_charges_respect_limit() {
    model("concurrent_charges_respect_limit", || {
        let reg = Arc::new(Registry::new(4));
        let bc = reg.find_or_create(BcId(1), None).unwrap();
        reg.set_limits(bc, MEM_INDEX, limits(5, 5)).unwrap();
        // 2 is charged up front; the two threads each try 2 more then 2 again, and one
        // gives back its first charge in between: 2 + 2 + 2 = 6 never fits all at once.
        reg.charge(bc, MEM, MEM_INDEX, 2, Severity::Limit).unwrap();

        let threads: Vec<_> = (0..2)
            .map(|t| {
                let reg = reg.clone();
                thread::spawn(move || {
                    let mut ok = 0u64;
                    let mut refused = 0u64;
                    for round in 0..2 {
                        match reg.charge(bc, MEM, MEM_INDEX, 2, Severity::Limit) {
                            Ok(()) => {
                                ok += 2;
                                // What this thread just made succeed is within the bound
                                // now, as far as the counter's own order is concerned.
                                assert!(reg.stat(bc, MEM_INDEX).maxheld <= 5);
                            }
                            Err(e) => {
                                assert_eq!((e.id, e.requested, e.bound), (BcId(1), 2, 5));
                                assert!(e.held + 2 > 5, "refused although it fitted: {e:?}");
                                refused += 1;
                            }
                        }
                        if t == 0 && round == 0 && ok > 0 {
                            reg.uncharge(bc, MEM_INDEX, 2);
                            ok -= 2;
                        }
                    }
                    (ok, refused)
                })
            })
            .collect();
        let (mut ok, mut refused) = (2u64, 0u64);
        for t in threads {
            let (o, r) = t.join().unwrap();
            ok += o;
            refused += r;
        }
        let stat = reg.stat(bc, MEM_INDEX);
        assert_eq!(stat.held, ok, "held is exactly the successful charges");
        assert!(stat.held <= 5 && stat.maxheld <= 5);
        assert_eq!(stat.failcnt, refused, "failcnt counts exactly the refusals");
        reg.uncharge(bc, MEM_INDEX, ok);
        reg.release(bc);
        reg.check_invariants().unwrap();
        assert_eq!(reg.live(), 0);
    });
}

/// Hierarchy unroll: two children of one parent charge concurrently while the parent has
/// room for only one of them; a third charge goes to the parent directly. A refusal at the
/// parent unrolls the child's level, counts `failcnt` only at the parent, and no level ever
/// ends above its bound.
#[test]
fn hierarchy_unrolls_under_concurrent_charges() {
    model("hierarchy_unrolls_under_concurrent_charges", || {
        let reg = Arc::new(Registry::new(4));
        let parent = reg.find_or_create(BcId(10), None).unwrap();
        let a = reg.find_or_create(BcId(11), Some(parent)).unwrap();
        let b = reg.find_or_create(BcId(12), Some(parent)).unwrap();
        reg.set_limits(parent, MEM_INDEX, limits(4, 4)).unwrap();
        reg.set_limits(a, MEM_INDEX, limits(3, 3)).unwrap();
        reg.set_limits(b, MEM_INDEX, limits(3, 3)).unwrap();

        let spawn_charge = |index: u32, n: u64| {
            let reg = reg.clone();
            thread::spawn(move || reg.charge(index, MEM, MEM_INDEX, n, Severity::Limit))
        };
        let ta = spawn_charge(a, 3);
        let tb = spawn_charge(b, 3);
        // Let the spawned threads go first too: loom explored no interleaving in which a
        // spawned thread's first step came before this thread's next (see `model`).
        thread::yield_now();
        let direct = reg.charge(parent, MEM, MEM_INDEX, 1, Severity::Limit);
        let ra = ta.join().unwrap();
        let rb = tb.join().unwrap();

        let held = |i| reg.stat(i, MEM_INDEX).held;
        let failcnt = |i| reg.stat(i, MEM_INDEX).failcnt;
        for (r, child) in [(ra, a), (rb, b)] {
            match r {
                Ok(()) => assert_eq!(held(child), 3),
                Err(e) => {
                    // Only the parent can refuse: each child alone fits its own limit.
                    assert_eq!(e.id, BcId(10));
                    assert_eq!(held(child), 0, "the refused child level was unrolled");
                    assert_eq!(failcnt(child), 0, "failcnt is counted where it was refused");
                }
            }
        }
        assert!(ra.is_err() || rb.is_err(), "3 + 3 cannot both fit in 4");
        let direct_ok = direct.is_ok() as u64;
        assert_eq!(held(parent), held(a) + held(b) + direct_ok);
        assert!(held(parent) <= 4);
        let refusals = ra.is_err() as u64 + rb.is_err() as u64 + direct.is_err() as u64;
        assert_eq!(failcnt(parent), refusals);
        reg.check_invariants().unwrap();

        for (i, n) in [(a, held(a)), (b, held(b)), (parent, direct_ok)] {
            reg.uncharge(i, MEM_INDEX, n);
        }
        for i in [a, b, parent] {
            reg.release(i);
        }
        reg.check_invariants().unwrap();
        assert_eq!(reg.live(), 0);
    });
}

/// The last handle is dropped while another thread looks the id up, and a third creates it:
/// the count drops to zero and another thread may take the object back before it is freed.
/// Whatever the order, the slot a thread got is live and maps to its id while it is held,
/// nothing is freed under a holder, and nothing leaks once all are released.
#[test]
fn last_release_races_lookup_and_create() {
    model("last_release_races_lookup_and_create", || {
        let reg = Arc::new(Registry::new(4));
        let first = reg.find_or_create(BcId(7), None).unwrap();

        let dropper = {
            let reg = reg.clone();
            thread::spawn(move || reg.release(first))
        };
        let looker = {
            let reg = reg.clone();
            thread::spawn(move || {
                let found = reg.lookup(BcId(7));
                if let Some(i) = found {
                    assert_eq!(reg.id_of(i), BcId(7), "a looked-up slot is that id's");
                    // Charging works on what we hold: it cannot be freed under us.
                    reg.charge(i, MEM, MEM_INDEX, 1, Severity::Limit).unwrap();
                    reg.uncharge(i, MEM_INDEX, 1);
                    reg.release(i);
                }
            })
        };
        // Let the spawned threads go first too: loom explored no interleaving in which a
        // spawned thread's first step came before this thread's next (see `model`).
        thread::yield_now();
        let created = reg.find_or_create(BcId(7), None).unwrap();
        assert_eq!(reg.id_of(created), BcId(7));
        assert_eq!(
            reg.lookup(BcId(7)),
            Some(created),
            "the id maps to the slot we hold"
        );
        reg.release(created);
        dropper.join().unwrap();
        looker.join().unwrap();
        reg.release(created);
        reg.check_invariants().unwrap();
        assert_eq!(reg.live(), 0, "no slot leaked");
        assert_eq!(reg.lookup(BcId(7)), None);
    });
}

/// Slot reuse with generations: a release that saw the count fall to zero can be overtaken
/// by a lookup that revives the slot, a release that frees it, and a creation that reuses it
/// for another id. The late release must recognise the new generation and leave the new
/// tenant alone; a charged zombie is never freed.
#[test]
fn slot_reuse_is_told_apart_by_generation() {
    model("slot_reuse_is_told_apart_by_generation", || {
        // Capacity 2: the root and one slot, so a new id must reuse the freed slot.
        let reg = Arc::new(Registry::new(2));
        let old = reg.find_or_create(BcId(1), None).unwrap();
        let gen0 = reg.generation_of(old);

        let dropper = {
            let reg = reg.clone();
            thread::spawn(move || reg.release(old))
        };
        let reuser = {
            let reg = reg.clone();
            thread::spawn(move || {
                if let Some(i) = reg.lookup(BcId(1)) {
                    reg.release(i);
                }
                match reg.find_or_create(BcId(2), None) {
                    Ok(i) => {
                        assert_eq!(reg.id_of(i), BcId(2));
                        Some(i)
                    }
                    // The dropper has not freed id 1 yet: the only slot is taken.
                    Err(BcError::TableFull) => None,
                    Err(e) => panic!("unexpected {e:?}"),
                }
            })
        };
        dropper.join().unwrap();
        let new = reuser.join().unwrap();
        reg.check_invariants().unwrap();
        match new {
            Some(i) => {
                assert_eq!(i, old, "one slot only: it was reused");
                assert!(
                    reg.generation_of(i) != gen0,
                    "a reused slot has a new generation"
                );
                assert_eq!(
                    reg.lookup(BcId(2)),
                    Some(i),
                    "the late release left it alone"
                );
                assert_eq!(reg.lookup(BcId(1)), None);
                reg.release(i);
                reg.release(i);
            }
            None => assert_eq!(reg.lookup(BcId(1)), None),
        }
        assert_eq!(reg.live(), 0);

        // A zombie: released while charged stays, and is reaped once uncharged.
        let z = reg.find_or_create(BcId(3), None).unwrap();
        reg.charge(z, MEM, MEM_INDEX, 1, Severity::Force).unwrap();
        reg.release(z);
        assert_eq!(reg.live(), 1, "a charged slot is not freed");
        reg.uncharge(z, MEM_INDEX, 1);
        assert_eq!(reg.reap(), 1);
        assert_eq!(reg.live(), 0);
    });
}

/// A guard's hazard racing the last release of its tenant on another thread, and a third
/// thread that creates another tenant in the one slot (it can only succeed once the first
/// is freed, which reuses its record). While the hazard is published the record stays the
/// same generation and keeps its id, charges reach it, and a reference can be taken from a
/// count of zero (`current()` inside a guard); once the hazard is cleared and the handle
/// released, the record is freed exactly once, by whichever came last.
#[test]
fn last_release_races_a_hazard() {
    model("last_release_races_a_hazard", || {
        // Capacity 2: the root and one slot.
        let reg = Arc::new(Registry::new(2));
        let t = reg.find_or_create(BcId(7), None).unwrap();
        let gen0 = reg.generation_of(t);
        let slot = reg.claim_hazards().unwrap();
        // The guard is made from the handle before the handle goes to the other thread.
        reg.set_hazard(slot, 0, t);

        let dropper = {
            let reg = reg.clone();
            thread::spawn(move || reg.release(t))
        };
        let creator = {
            let reg = reg.clone();
            thread::spawn(move || match reg.find_or_create(BcId(8), None) {
                Ok(i) => {
                    reg.release(i);
                    true
                }
                Err(BcError::TableFull) => false,
                Err(e) => panic!("unexpected {e:?}"),
            })
        };
        thread::yield_now();
        // Inside the guard.
        reg.charge(t, MEM, MEM_INDEX, 1, Severity::Limit).unwrap();
        reg.uncharge(t, MEM_INDEX, 1);
        reg.retain(t);
        assert_eq!(reg.generation_of(t), gen0, "freed under a hazard");
        assert_eq!(reg.id_of(t), BcId(7));
        reg.release(t);
        // Leaving the guard.
        reg.leave_hazard(slot, 0);
        dropper.join().unwrap();
        let created = creator.join().unwrap();
        reg.check_invariants().unwrap();
        assert_eq!(reg.live(), 0, "the tenant leaked");
        assert_eq!(reg.lookup(BcId(7)), None);
        if created {
            assert_ne!(reg.generation_of(t), gen0);
        }
    });
}

/// A thread's stock racing a reclaimer (the path taken before a refusal and on a limit
/// change): whatever the interleaving, nothing is lost or counted twice (`held` equals
/// what the owner's objects hold plus what its entry holds), the
/// owner never uses a stock that was taken back, and `held` never passes the limit.
#[test]
fn stock_consume_races_reclaim() {
    use crate::accounting::reclaim::{reclaim, Target};
    use crate::accounting::stock::{charge_pair_undo, GiveBack, StockSlot};
    model("stock_consume_races_reclaim", || {
        let reg = Arc::new(Registry::new(4));
        let bc = reg.find_or_create(BcId(1), None).unwrap();
        reg.set_limits(bc, MEM_INDEX, limits(16, 16)).unwrap();
        let slot = Arc::new(StockSlot::new(0));
        // The owner's first charge refills: 2 for the object plus a batch of
        // headroom / 2 = 7 (one CPU under loom).
        slot.alloc_slow(&reg, bc, 2, 1).unwrap();

        let owner = {
            let (reg, slot) = (reg.clone(), slot.clone());
            thread::spawn(move || {
                let mut live = 2u64;
                for _ in 0..2 {
                    if slot.try_consume(bc, 2) || slot.alloc_slow(&reg, bc, 2, 1).is_ok() {
                        live += 2;
                    }
                }
                // Free one object: back into the entry (refilled, or, adopted, empty once a
                // reclaim took it), or directly while the reclaimer is at work.
                if slot.try_give_back(bc, 2) == GiveBack::NotMine && !slot.adopt(bc, 2) {
                    charge_pair_undo(&reg, bc, 2);
                }
                live - 2
            })
        };
        // Let the spawned threads go first too: loom explored no interleaving in which a
        // spawned thread's first step came before this thread's next (see `model`).
        thread::yield_now();
        let taken = reclaim(
            &reg,
            core::slice::from_ref(&*slot).iter(),
            None,
            Target::Leaf(bc),
        );
        let live = owner.join().unwrap();
        // Charged but not in use: what the entry holds (refilled, or given back by the
        // free).
        let (idle_mem, idle_objs) = slot.peek(bc);
        let stat = reg.stat(bc, MEM_INDEX);
        assert!(stat.maxheld <= 16);
        assert_eq!(stat.held, live + idle_mem, "taken {taken}");
        let allocs = reg.stat(bc, 1).held;
        assert_eq!(allocs, live / 2 + idle_objs);
        slot.drain(&reg);
        reg.uncharge(bc, MEM_INDEX, live);
        reg.uncharge(bc, 1, live / 2);
        assert_eq!(reg.stat(bc, MEM_INDEX).held, 0);
        assert_eq!(reg.stat(bc, 1).held, 0);
        reg.release(bc);
        reg.check_invariants().unwrap();
    });
}

/// A charge refused because another thread's stock holds the headroom reclaims that stock
/// and succeeds on the retry, while the stock's owner keeps allocating: the refusal is
/// only ever caused by real usage, and the limit is never passed.
#[test]
fn refused_charge_reclaims_other_stock() {
    use crate::accounting::reclaim::{reclaim, Target};
    use crate::accounting::stock::{charge_pair, StockSlot};
    model("refused_charge_reclaims_other_stock", || {
        let reg = Arc::new(Registry::new(4));
        let bc = reg.find_or_create(BcId(1), None).unwrap();
        reg.set_limits(bc, MEM_INDEX, limits(12, 12)).unwrap();
        let slot = Arc::new(StockSlot::new(0));
        // Owner: 2 used, 5 stocked (headroom 10 / 2).
        slot.alloc_slow(&reg, bc, 2, 1).unwrap();

        let owner = {
            let slot = slot.clone();
            thread::spawn(move || slot.try_consume(bc, 2))
        };
        // Another thread wants 6: 2 used + 6 fits in 12 once the stock is taken back.
        // Let the spawned threads go first too: loom explored no interleaving in which a
        // spawned thread's first step came before this thread's next (see `model`).
        thread::yield_now();
        let got = match charge_pair(&reg, bc, 6, 1, Severity::Limit) {
            Ok(()) => true,
            Err(_) => {
                reclaim(
                    &reg,
                    core::slice::from_ref(&*slot).iter(),
                    None,
                    Target::Leaf(bc),
                );
                charge_pair(&reg, bc, 6, 1, Severity::Limit).is_ok()
            }
        };
        let consumed = owner.join().unwrap();
        let used = 2 + if consumed { 2 } else { 0 };
        assert!(
            got,
            "refused although the stock could be reclaimed (used {used})"
        );
        let (stocked, _) = slot.peek(bc);
        let stat = reg.stat(bc, MEM_INDEX);
        assert_eq!(stat.held, used + 6 + stocked);
        assert!(stat.maxheld <= 12);
        slot.drain(&reg);
        reg.uncharge(bc, MEM_INDEX, used + 6);
        reg.uncharge(bc, 1, used / 2 + 1);
        assert_eq!(reg.stat(bc, MEM_INDEX).held, 0);
        reg.release(bc);
    });
}

/// A stock refill racing a limit change (which reclaims stocks): the old limit is never
/// passed, a refill that saw the new limit never takes more than its share of the new
/// headroom, and the books balance whatever the order.
#[test]
fn stock_refill_races_limit_change() {
    use crate::accounting::reclaim::{reclaim, Target};
    use crate::accounting::stock::StockSlot;
    model("stock_refill_races_limit_change", || {
        let reg = Arc::new(Registry::new(4));
        let bc = reg.find_or_create(BcId(1), None).unwrap();
        reg.set_limits(bc, MEM_INDEX, limits(16, 16)).unwrap();
        let slot = Arc::new(StockSlot::new(0));

        let owner = {
            let (reg, slot) = (reg.clone(), slot.clone());
            thread::spawn(move || {
                let mut live = 0;
                for _ in 0..2 {
                    if slot.try_consume(bc, 2) || slot.alloc_slow(&reg, bc, 2, 1).is_ok() {
                        live += 2;
                    }
                }
                live
            })
        };
        reg.set_limits(bc, MEM_INDEX, limits(8, 8)).unwrap();
        reclaim(
            &reg,
            core::slice::from_ref(&*slot).iter(),
            None,
            Target::Leaf(bc),
        );
        let live = owner.join().unwrap();

        let (stocked, _) = slot.peek(bc);
        let stat = reg.stat(bc, MEM_INDEX);
        assert!(stat.maxheld <= 16);
        assert_eq!(stat.held, live + stocked);
        // Any refill took at most half the headroom it saw (one CPU under loom), which was
        // at most 16, or 8 once the new limit was in place.
        assert!(stocked <= 8, "stock {stocked}");
        // From now on the new limit holds.
        let room = 8u64.saturating_sub(stat.held);
        assert!(reg
            .charge(bc, MEM, MEM_INDEX, room + 1, Severity::Limit)
            .is_err());
        slot.drain(&reg);
        reg.uncharge(bc, MEM_INDEX, live);
        reg.uncharge(bc, 1, live / 2);
        assert_eq!(reg.stat(bc, MEM_INDEX).held, 0);
        reg.release(bc);
    });
}

/// A thread that switches between tenants keeps an entry per tenant (two entries under
/// loom): it refills A, switches to B and refills it, frees one of A's objects into A's
/// entry and takes another of B's, while a reclaimer takes A's entries back (a refusal, a
/// limit change). Whatever the interleaving, each tenant's `held` is exactly what its live
/// objects and its entry hold, B's entry is never touched by A's reclaim, and nothing is
/// left charged once everything is given back.
#[test]
fn tenant_entries_race_a_reclaim() {
    use crate::accounting::reclaim::{reclaim, Target};
    use crate::accounting::stock::{charge_pair_undo, GiveBack, StockSlot};
    model("tenant_entries_race_a_reclaim", || {
        let reg = Arc::new(Registry::new(4));
        let a = reg.find_or_create(BcId(1), None).unwrap();
        let b = reg.find_or_create(BcId(2), None).unwrap();
        assert_ne!(a % 2, b % 2, "A and B map to different entries");
        reg.set_limits(a, MEM_INDEX, limits(16, 16)).unwrap();
        let slot = Arc::new(StockSlot::new(0));
        // A: 2 for the object and a batch of half the headroom (one CPU under loom).
        slot.alloc_slow(&reg, a, 2, 1).unwrap();

        let owner = {
            let (reg, slot) = (reg.clone(), slot.clone());
            thread::spawn(move || {
                // The switch to B: its own entry, A's stays.
                slot.alloc_slow(&reg, b, 2, 1).unwrap();
                // A's object freed while working for B.
                if slot.try_give_back(a, 2) == GiveBack::NotMine && !slot.adopt(a, 2) {
                    charge_pair_undo(&reg, a, 2);
                }
                let mut live_b = 2;
                if slot.try_consume(b, 2) || slot.alloc_slow(&reg, b, 2, 1).is_ok() {
                    live_b += 2;
                }
                live_b
            })
        };
        // Let the spawned threads go first too: loom explored no interleaving in which a
        // spawned thread's first step came before this thread's next (see `model`).
        thread::yield_now();
        reclaim(
            &reg,
            core::slice::from_ref(&*slot).iter(),
            None,
            Target::Leaf(a),
        );
        let live_b = owner.join().unwrap();

        let (a_mem, a_objs) = slot.peek(a);
        let (b_mem, b_objs) = slot.peek(b);
        assert_eq!(reg.stat(a, MEM_INDEX).held, a_mem, "A: nothing live");
        assert_eq!(reg.stat(a, 1).held, a_objs);
        assert!(reg.stat(a, MEM_INDEX).maxheld <= 16);
        assert_eq!(reg.stat(b, MEM_INDEX).held, live_b + b_mem);
        assert_eq!(reg.stat(b, 1).held, live_b / 2 + b_objs);
        slot.drain(&reg);
        reg.uncharge(b, MEM_INDEX, live_b);
        reg.uncharge(b, 1, live_b / 2);
        for bc in [a, b] {
            assert_eq!(reg.stat(bc, MEM_INDEX).held, 0);
            assert_eq!(reg.stat(bc, 1).held, 0);
            reg.release(bc);
        }
        reg.check_invariants().unwrap();
    });
}

/// Two tenants that map to the same entry take turns: the owner refills A, then C (which
/// evicts A's entry), then frees one of A's objects (uncharged directly: the entry is C's),
/// while a reclaim of the parent P of A and C (a subtree) runs. No interleaving loses or
/// double-counts a charge at any level, and P never passes its limit.
#[test]
fn colliding_entries_race_a_subtree_reclaim() {
    use crate::accounting::reclaim::{reclaim, Target};
    use crate::accounting::stock::{charge_pair_undo, GiveBack, StockSlot};
    model("colliding_entries_race_a_subtree_reclaim", || {
        let reg = Arc::new(Registry::new(5));
        let p = reg.find_or_create(BcId(1), None).unwrap();
        let a = reg.find_or_create(BcId(2), Some(p)).unwrap();
        // Takes the slot between, so that C lands on A's entry.
        let other = reg.find_or_create(BcId(3), None).unwrap();
        let c = reg.find_or_create(BcId(4), Some(p)).unwrap();
        assert_eq!(a % 2, c % 2, "A and C share an entry");
        assert!(reg.has_children(p) && !reg.has_children(a));
        reg.set_limits(p, MEM_INDEX, limits(16, 16)).unwrap();
        let slot = Arc::new(StockSlot::new(0));
        slot.alloc_slow(&reg, a, 2, 1).unwrap();

        let owner = {
            let (reg, slot) = (reg.clone(), slot.clone());
            thread::spawn(move || {
                let live_c = match slot.alloc_slow(&reg, c, 2, 1) {
                    Ok(_) => 2,
                    Err(_) => 0,
                };
                if slot.try_give_back(a, 2) == GiveBack::NotMine && !slot.adopt(a, 2) {
                    charge_pair_undo(&reg, a, 2);
                }
                live_c
            })
        };
        // Let the spawned threads go first too: loom explored no interleaving in which a
        // spawned thread's first step came before this thread's next (see `model`).
        thread::yield_now();
        reclaim(
            &reg,
            core::slice::from_ref(&*slot).iter(),
            None,
            Target::Subtree(p),
        );
        let live_c = owner.join().unwrap();

        let (a_mem, _) = slot.peek(a);
        let (c_mem, _) = slot.peek(c);
        assert_eq!(reg.stat(a, MEM_INDEX).held, a_mem);
        assert_eq!(reg.stat(c, MEM_INDEX).held, live_c + c_mem);
        assert_eq!(reg.stat(p, MEM_INDEX).held, live_c + a_mem + c_mem);
        assert!(reg.stat(p, MEM_INDEX).maxheld <= 16);
        slot.drain(&reg);
        reg.uncharge(c, MEM_INDEX, live_c);
        reg.uncharge(c, 1, live_c / 2);
        for bc in [a, c, p] {
            assert_eq!(reg.stat(bc, MEM_INDEX).held, 0, "slot {bc}");
            assert_eq!(reg.stat(bc, 1).held, 0, "slot {bc}");
        }
        for bc in [a, c, p, other] {
            reg.release(bc);
        }
        reg.check_invariants().unwrap();
    });
}
