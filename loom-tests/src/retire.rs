//! Models of tenant retirement (`DESIGN.md` §3.6, §6.7): a retirement racing what can still
//! reach the retired tenant — a free of a block charged to it, a charge through a handle
//! another thread still holds, a re-creation of its id — and the last free racing the last
//! release, which between them free the retired record.
//!
//! Each model starts from a parent P and its child T holding a leftover block, in a table of
//! capacity 3 (the root, P, T): a fresh tenant with T's id can only get a slot once the
//! retirement gave T's back, so the walks that race the retirement run next to the slot's
//! reuse. Bounded like the others (`models::model`): three spawned threads at most, two
//! preemptions unless `LOOM_MAX_PREEMPTIONS` says otherwise.
//!
//! Both models found bugs before they passed, and guard their fixes:
//! - the walks' pins against a retirement (`walk.rs`, `pinned`; `lifetime.rs`, `retire`) and
//!   `left` against the last reference (`walk.rs`, `uncharge_below` and `retired_emptied`;
//!   `lifetime.rs`, `release_slow` and the end of `retire`) are store-then-load handshakes
//!   between two threads, with a `fence(SeqCst)` between the store and the load on each side
//!   (loom 0.7 treats `SeqCst` accesses as `AcqRel`, so without the fences it reports
//!   executions that `SeqCst` forbids);
//! - `uncharge_below` reads a record's parent link before the uncharge that may let another
//!   thread free the record (which reuses the link for the free list): read after, the
//!   leftover went back to the wrong beancounter and the parent kept it.

use crate::accounting::registry::{Registry, ROOT};
use crate::accounting::types::{BcId, ResourceStat, Severity, MAX};
use crate::models::{limits, model, MEM, MEM_INDEX};
use loom::sync::Arc;
use loom::thread;

const PARENT: BcId = BcId(1);
const TENANT: BcId = BcId(2);
/// The tenant's own limit: the leftover and the late charge together do not fit in it.
const TENANT_LIMIT: u64 = 4;
/// The parent's limit: everything the models charge fits in it.
const PARENT_LIMIT: u64 = 8;
/// A block charged to the tenant before it retires, freed by another thread.
const LEFTOVER: u64 = 2;
/// What a thread charges through a handle of the tenant it still holds.
const LATE: u64 = 3;
/// What the thread that asks for the tenant's id charges to what it got.
const FRESH: u64 = 1;

/// The common start: P with room for everything, T under it with its own limit and the
/// leftover charged. Returns `(registry, P, T)`, the caller holding one reference on each.
fn parent_and_tenant() -> (Arc<Registry>, u32, u32) {
    let reg = Arc::new(Registry::new(3));
    let p = reg.find_or_create(PARENT, None).unwrap();
    let t = reg.find_or_create(TENANT, Some(p)).unwrap();
    reg.set_limits(p, MEM_INDEX, limits(PARENT_LIMIT, PARENT_LIMIT))
        .unwrap();
    reg.set_limits(t, MEM_INDEX, limits(TENANT_LIMIT, TENANT_LIMIT))
        .unwrap();
    reg.charge(t, MEM, MEM_INDEX, LEFTOVER, Severity::Limit)
        .unwrap();
    (reg, p, t)
}

/// No uncharge of `index` was ever clamped: nothing was given back twice, or to the wrong
/// beancounter.
fn no_clamped_uncharge(reg: &Registry, index: u32) {
    let warnings = reg
        .with_counter(index, MEM_INDEX, |c| c.events().uncharge_warnings)
        .expect("a live beancounter");
    assert_eq!(warnings, 0, "an uncharge of slot {index} was clamped");
}

/// T retires while one thread frees T's leftover block, one charges through a handle of T
/// it still holds (as `Beancounter::charge` does: to T, or to its heir P once T is retired),
/// and one asks for T's id (finding T before the retirement, or creating a fresh tenant in
/// T's old slot after it) and charges what it got. Whatever the interleaving:
/// - P holds exactly what is still charged: the late and fresh charges, and the leftover
///   not at all (given back exactly once, from P's chain, wherever the free landed);
/// - T's own limit bounds the late charge only while T is live; P never refuses;
/// - a fresh tenant holds exactly its own charge: neither the free nor the late charge,
///   which name the retired T, ever reached its counters (in the slot T gave back);
/// - once everything is given back and every reference released, the retired record and
///   the slots are free again.
#[test]
fn retire_races_free_late_charge_and_recreate() {
    model("retire_races_free_late_charge_and_recreate", || {
        let (reg, p, t) = parent_and_tenant();
        // The handle the late thread still holds.
        reg.retain(t);

        let freer = {
            let reg = reg.clone();
            thread::spawn(move || reg.uncharge(t, MEM_INDEX, LEFTOVER))
        };
        let late = {
            let reg = reg.clone();
            thread::spawn(move || {
                let to = reg.charge_target(t);
                (to, reg.charge(to, MEM, MEM_INDEX, LATE, Severity::Limit))
            })
        };
        let asker = {
            let reg = reg.clone();
            thread::spawn(move || {
                let got = reg
                    .find_or_create(TENANT, Some(p))
                    .expect("the id is T's, or free again with a slot for it");
                let to = reg.charge_target(got);
                reg.charge(to, MEM, MEM_INDEX, FRESH, Severity::Force)
                    .unwrap();
                (got, to)
            })
        };
        // This thread's reference goes to the registry.
        // Let the spawned threads go first too: loom explored no interleaving in which a
        // spawned thread's first step came before this thread's next (see `model`).
        thread::yield_now();
        reg.retire(t).unwrap();
        freer.join().unwrap();
        let (late_to, late) = late.join().unwrap();
        let (got, fresh_to) = asker.join().unwrap();

        assert!(
            late_to == t || late_to == p,
            "late charge went to {late_to}"
        );
        let late_held = match late {
            Ok(()) => LATE,
            Err(e) => {
                // Only T's own limit can refuse, and only with the leftover still in it.
                assert_eq!(late_to, t);
                assert_eq!((e.id, e.bound), (TENANT, TENANT_LIMIT), "{e:?}");
                assert!(e.held >= LEFTOVER && e.held + LATE > TENANT_LIMIT, "{e:?}");
                0
            }
        };
        assert!(reg.is_retired(t));
        assert_eq!(reg.stat(t, MEM_INDEX), ResourceStat::default());
        // Still referenced by the late thread's handle.
        assert_eq!(reg.retired(), 1);
        let stat = reg.stat(p, MEM_INDEX);
        assert_eq!(
            stat.held,
            late_held + FRESH,
            "P holds what is still charged (late {late_held}, fresh {FRESH}); the \
             leftover was given back exactly once"
        );
        assert!(stat.maxheld <= PARENT_LIMIT);
        assert_eq!(stat.failcnt, 0, "P had room for everything");
        no_clamped_uncharge(&reg, p);
        let fresh = reg.lookup(TENANT);
        match fresh {
            Some(f) => {
                // Re-created after the retirement, in the slot T gave back.
                assert_eq!((f, fresh_to), (got, got));
                assert_ne!(f, t, "a fresh tenant has a record of its own");
                assert_eq!(reg.live(), 2);
                let s = reg.stat(f, MEM_INDEX);
                assert_eq!(
                    (s.held, s.maxheld, s.failcnt),
                    (FRESH, FRESH, 0),
                    "the fresh tenant holds its own charge, nothing of the retired one's"
                );
                assert_eq!(s.limit, MAX, "default limits");
                no_clamped_uncharge(&reg, f);
            }
            None => {
                // Found T before it retired: nobody created the id again.
                assert_eq!(got, t);
                assert!(fresh_to == t || fresh_to == p);
                assert_eq!(reg.live(), 1);
            }
        }
        reg.check_invariants().unwrap();

        // Give everything back: P (and a fresh tenant) back to zero, every record freed.
        reg.uncharge(late_to, MEM_INDEX, late_held);
        reg.uncharge(fresh_to, MEM_INDEX, FRESH);
        assert_eq!(reg.stat(p, MEM_INDEX).held, 0);
        no_clamped_uncharge(&reg, p);
        if let Some(f) = fresh {
            assert_eq!(reg.stat(f, MEM_INDEX).held, 0);
            no_clamped_uncharge(&reg, f);
            reg.release(f);
        }
        reg.release(t);
        reg.release(got);
        assert_eq!(reg.retired(), 0, "the retired record outlived its charges");
        assert_eq!(reg.live(), 1);
        reg.release(p);
        assert_eq!(reg.live(), 0);
        reg.check_invariants().unwrap();
        assert_eq!(reg.lookup(TENANT), None);
    });
}

/// The retired record is freed by whichever comes last of three: the retirement itself,
/// the free of the last leftover block (its `left` reaching zero) and the release of the
/// last other handle. Whatever the order it is freed exactly once (the free lists stay
/// sound), the leftover is given back to the parent exactly (the walk must not follow the
/// record's link once the record may be freed: freeing reuses it for the free list), and
/// the record and the slot serve a new tenant.
#[test]
fn retired_record_freed_once_by_last_free_or_release() {
    model("retired_record_freed_once_by_last_free_or_release", || {
        let (reg, p, t) = parent_and_tenant();
        // The handle another thread drops.
        reg.retain(t);

        let freer = {
            let reg = reg.clone();
            thread::spawn(move || reg.uncharge(t, MEM_INDEX, LEFTOVER))
        };
        let dropper = {
            let reg = reg.clone();
            thread::spawn(move || reg.release(t))
        };
        // Let the spawned threads go first too: loom explored no interleaving in which a
        // spawned thread's first step came before this thread's next (see `model`).
        thread::yield_now();
        reg.retire(t).unwrap();
        freer.join().unwrap();
        dropper.join().unwrap();

        assert_eq!(
            reg.stat(p, MEM_INDEX).held,
            0,
            "the leftover went back to P"
        );
        no_clamped_uncharge(&reg, p);
        no_clamped_uncharge(&reg, ROOT);
        assert_eq!(reg.retired(), 0, "the retired record was not freed");
        assert_eq!(reg.live(), 1);
        reg.check_invariants().unwrap();
        // The id, the record and the slot are free: a new tenant takes them, fresh.
        let again = reg.find_or_create(TENANT, Some(p)).unwrap();
        assert_eq!(again, t, "the freed record is reused");
        let s = reg.stat(again, MEM_INDEX);
        assert_eq!((s.held, s.maxheld, s.failcnt, s.limit), (0, 0, 0, MAX));
        reg.release(again);
        reg.release(p);
        assert_eq!(reg.live(), 0);
        reg.check_invariants().unwrap();
    });
}
