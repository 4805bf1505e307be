//! Every public accounting call, the charging rules of DESIGN §3.1, hierarchy and lifetime.

use beancounter::{
    find_or_create, lookup, BcError, BcId, Beancounter, Charge, Exceeded, Limits, Resource,
    ResourceStat, Severity, MAX, MAX_CUSTOM_RESOURCES, MAX_DEPTH,
};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, RwLock, RwLockReadGuard, RwLockWriteGuard};

// ---- helpers ---------------------------------------------------------------------------

/// Tests run in parallel and share the process-wide registry. `live_count()` and
/// `check_invariants()` are only meaningful when nothing else creates, frees or charges, so
/// the tests that read them take this lock exclusively; every other test takes it shared.
static QUIESCE: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    QUIESCE.read().unwrap_or_else(|e| e.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    QUIESCE.write().unwrap_or_else(|e| e.into_inner())
}

fn bc(id: u32) -> Beancounter {
    find_or_create(BcId(id)).unwrap()
}

fn lim(barrier: u64, limit: u64) -> Limits {
    Limits::new(barrier, limit).unwrap()
}

fn exists(id: u32) -> bool {
    lookup(BcId(id)).is_some()
}

fn exceeded(r: Result<Charge, BcError>) -> Exceeded {
    match r {
        Err(BcError::Exceeded(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

const ALL_BUILTIN: [Resource; 3] = Resource::BUILTIN;

// ---- ids, lookup, root, current ------------------------------------------------------

#[test]
fn root_is_id_zero_unlimited_and_always_found() {
    let _q = shared();
    let root = beancounter::root();
    assert_eq!(root.id(), BcId::ROOT);
    assert_eq!(BcId::ROOT, BcId(0));
    assert_eq!(lookup(BcId::ROOT).unwrap(), root);
    assert_eq!(find_or_create(BcId::ROOT).unwrap(), root);
    assert!(root.parent().is_none());
    for r in ALL_BUILTIN {
        let s = root.stat(r);
        assert_eq!(
            (s.barrier, s.limit),
            (MAX, MAX),
            "root {r} is not unlimited"
        );
        assert_eq!(beancounter::stat(BcId::ROOT, r).unwrap().limit, MAX);
    }
    // A thread not started by the crate's spawn wrappers starts in the root.
    std::thread::spawn(|| {
        assert_eq!(beancounter::current_id(), BcId::ROOT);
        assert_eq!(beancounter::current(), beancounter::root());
    })
    .join()
    .unwrap();
}

#[test]
fn find_or_create_returns_one_beancounter_per_id() {
    let _q = shared();
    let a = bc(1001);
    let b = bc(1001);
    let other = bc(1002);
    assert_eq!(a, b);
    assert_ne!(a, other);
    assert_eq!(a.id(), BcId(1001));
    assert_eq!(other.id(), BcId(1002));
    assert_eq!(lookup(BcId(1001)).unwrap(), a);
    assert_eq!(a.clone(), a);
    assert_eq!(format!("{a:?}"), "Beancounter(BcId(1001))");
    assert_eq!(BcId(1001).to_string(), "1001");
    // Charges through one handle are seen through the other: same counters.
    let _c = a.charge(Resource::Memory, 5, Severity::Limit).unwrap();
    assert_eq!(b.stat(Resource::Memory).held, 5);
    assert_eq!(other.stat(Resource::Memory).held, 0);
    // A new beancounter starts empty and with the (untouched) unlimited defaults.
    for r in ALL_BUILTIN {
        assert_eq!(
            other.stat(r),
            ResourceStat {
                barrier: MAX,
                limit: MAX,
                ..ResourceStat::default()
            }
        );
    }
}

#[test]
fn lookup_of_unknown_id_is_none_and_creates_nothing() {
    let _q = shared();
    assert!(lookup(BcId(1101)).is_none());
    assert!(lookup(BcId(1101)).is_none());
    assert!(matches!(
        beancounter::stat(BcId(1101), Resource::Memory),
        Err(BcError::NotFound(BcId(1101)))
    ));
    assert!(lookup(BcId(u32::MAX)).is_none());
}

#[test]
fn current_follows_the_entered_beancounter() {
    let _q = shared();
    let t = bc(1201);
    assert_eq!(beancounter::current_id(), BcId::ROOT);
    {
        let _g = t.enter();
        assert_eq!(beancounter::current_id(), BcId(1201));
        assert_eq!(beancounter::current(), t);
    }
    assert_eq!(beancounter::current_id(), BcId::ROOT);
    assert_eq!(beancounter::current(), beancounter::root());
}

// ---- limits and stat -----------------------------------------------------------------

#[test]
fn set_limits_and_stat_free_functions_and_methods_agree() {
    let _q = shared();
    let t = bc(1301);
    let id = BcId(1301);

    beancounter::set_limits(id, Resource::Memory, lim(100, 200)).unwrap();
    let s = t.stat(Resource::Memory);
    assert_eq!((s.barrier, s.limit), (100, 200));
    assert_eq!(beancounter::stat(id, Resource::Memory).unwrap(), s);

    t.set_limits(Resource::Allocations, lim(7, 9)).unwrap();
    let s = beancounter::stat(id, Resource::Allocations).unwrap();
    assert_eq!((s.barrier, s.limit), (7, 9));
    assert_eq!(t.stat(Resource::Allocations), s);
    // Other resources are untouched.
    assert_eq!(t.stat(Resource::Threads).limit, MAX);

    // The extremes are accepted.
    t.set_limits(Resource::Threads, lim(0, 0)).unwrap();
    assert_eq!(
        (
            t.stat(Resource::Threads).barrier,
            t.stat(Resource::Threads).limit
        ),
        (0, 0)
    );
    t.set_limits(Resource::Threads, Limits::UNLIMITED).unwrap();
    assert_eq!(t.stat(Resource::Threads).barrier, MAX);
    assert_eq!(Limits::default(), Limits::UNLIMITED);

    // Lowering a limit below what is held is allowed and leaves held alone; new checked
    // charges are then refused.
    let c = t.charge(Resource::Memory, 150, Severity::Limit).unwrap();
    t.set_limits(Resource::Memory, lim(10, 20)).unwrap();
    let s = t.stat(Resource::Memory);
    assert_eq!((s.held, s.barrier, s.limit), (150, 10, 20));
    assert!(t.charge(Resource::Memory, 1, Severity::Limit).is_err());
    drop(c);
    assert_eq!(t.stat(Resource::Memory).held, 0);
    let _ok = t.charge(Resource::Memory, 20, Severity::Limit).unwrap();
}

// ---- resources -----------------------------------------------------------------------

#[test]
fn register_resource_is_idempotent_and_named() {
    let _q = shared();
    let sockets = beancounter::register_resource("api-sockets").unwrap();
    assert!(matches!(sockets, Resource::Custom(_)));
    assert_eq!(
        beancounter::register_resource("api-sockets").unwrap(),
        sockets
    );
    let files = beancounter::register_resource("api-files").unwrap();
    assert_ne!(files, sockets);
    assert_eq!(beancounter::register_resource("api-files").unwrap(), files);

    assert_eq!(sockets.name(), Some("api-sockets"));
    assert_eq!(files.name(), Some("api-files"));
    assert_eq!(sockets.to_string(), "api-sockets");
    assert_eq!(Resource::Memory.name(), Some("memory"));
    assert_eq!(Resource::Allocations.name(), Some("allocations"));
    assert_eq!(Resource::Threads.name(), Some("threads"));
    assert_eq!(Resource::Memory.to_string(), "memory");
    assert_eq!(Resource::Allocations.to_string(), "allocations");
    assert_eq!(Resource::Threads.to_string(), "threads");
    // This binary registers far fewer than MAX_CUSTOM_RESOURCES names.
    let unregistered = Resource::Custom(MAX_CUSTOM_RESOURCES as u8 - 1);
    assert_eq!(unregistered.name(), None);
    assert_eq!(
        unregistered.to_string(),
        format!("custom{}", MAX_CUSTOM_RESOURCES - 1)
    );
    assert_eq!(Resource::Custom(200).name(), None);

    // A registered resource is a counter like the built-in ones.
    let t = bc(1401);
    t.set_limits(sockets, lim(2, 3)).unwrap();
    let a = t.charge(sockets, 2, Severity::Barrier).unwrap();
    assert!(t.charge(sockets, 1, Severity::Barrier).is_err());
    let b = t.charge(sockets, 1, Severity::Limit).unwrap();
    assert_eq!(beancounter::stat(BcId(1401), sockets).unwrap().held, 3);
    assert_eq!(t.stat(sockets).failcnt, 1);
    assert_eq!(t.stat(files).held, 0, "resources share a counter");
    drop((a, b));
    assert_eq!(t.stat(sockets).held, 0);
}

// ---- charging ------------------------------------------------------------------------

#[test]
fn barrier_severity_refuses_above_the_barrier_only() {
    let _q = shared();
    let t = bc(1501);
    let r = Resource::Memory;
    t.set_limits(r, lim(10, 20)).unwrap();

    // Up to and including the barrier.
    let a = t.charge(r, 10, Severity::Barrier).unwrap();
    let before = t.stat(r);
    let e = exceeded(t.charge(r, 1, Severity::Barrier));
    assert_eq!(
        e,
        Exceeded {
            id: BcId(1501),
            resource: r,
            severity: Severity::Barrier,
            requested: 1,
            held: 10,
            bound: 10,
        }
    );
    let after = t.stat(r);
    assert_eq!(after.held, before.held, "a refused charge changed held");
    assert_eq!(after.maxheld, before.maxheld);
    assert_eq!(after.failcnt, before.failcnt + 1);

    // Limit severity may cross the barrier, up to and including the limit.
    let b = t.charge(r, 10, Severity::Limit).unwrap();
    assert_eq!(t.stat(r).held, 20);
    drop((a, b));
    assert_eq!(t.stat(r).held, 0);
}

#[test]
fn limit_severity_refuses_above_the_limit() {
    let _q = shared();
    let t = bc(1502);
    let r = Resource::Allocations;
    t.set_limits(r, lim(5, 8)).unwrap();
    let a = t.charge(r, 8, Severity::Limit).unwrap();
    let e = exceeded(t.charge(r, 1, Severity::Limit));
    assert_eq!(
        e,
        Exceeded {
            id: BcId(1502),
            resource: r,
            severity: Severity::Limit,
            requested: 1,
            held: 8,
            bound: 8,
        }
    );
    // One big charge that alone does not fit is refused too.
    drop(a);
    let e = exceeded(t.charge(r, 9, Severity::Limit));
    assert_eq!((e.held, e.requested, e.bound), (0, 9, 8));
    let s = t.stat(r);
    assert_eq!((s.held, s.failcnt), (0, 2));
}

#[test]
fn force_is_never_refused_below_max() {
    let _q = shared();
    let t = bc(1503);
    let r = Resource::Memory;
    t.set_limits(r, lim(1, 2)).unwrap();
    // Far over barrier and limit.
    let a = t.charge(r, 1000, Severity::Force).unwrap();
    assert_eq!(t.stat(r).held, 1000);
    assert_eq!(t.stat(r).failcnt, 0);
    // Once over, checked charges are refused (and counted); Force still is not.
    assert!(t.charge(r, 1, Severity::Barrier).is_err());
    assert!(t.charge(r, 1, Severity::Limit).is_err());
    let b = t.charge(r, MAX - 1000, Severity::Force).unwrap();
    let s = t.stat(r);
    assert_eq!((s.held, s.maxheld, s.failcnt), (MAX, MAX, 2));
    drop((a, b));
    assert_eq!(t.stat(r).held, 0);
    // A single request above MAX is refused at every severity.
    for s in [Severity::Force, Severity::Limit, Severity::Barrier] {
        let e = exceeded(t.charge(r, u64::MAX, s));
        assert_eq!((e.requested, e.held, e.severity), (u64::MAX, 0, s));
        let e = exceeded(t.charge(r, MAX + 1, s));
        assert_eq!(e.requested, MAX + 1);
    }
    let s = t.stat(r);
    assert_eq!((s.held, s.failcnt), (0, 8));
    assert_eq!(t.uncharge_warnings(r), 0);
}

#[test]
fn force_past_max_is_refused_and_changes_nothing() {
    let _q = shared();
    let t = bc(1504);
    let r = Resource::Memory;
    let full = t.charge(r, MAX, Severity::Force).unwrap();
    assert_eq!(t.stat(r).held, MAX);
    let e = exceeded(t.charge(r, 1, Severity::Force));
    assert_eq!(
        e,
        Exceeded {
            id: BcId(1504),
            resource: r,
            severity: Severity::Force,
            requested: 1,
            held: MAX,
            bound: MAX,
        }
    );
    let s = t.stat(r);
    assert_eq!(
        (s.held, s.failcnt),
        (MAX, 1),
        "the refused overflowing charge changed held"
    );
    assert_eq!(t.uncharge_warnings(r), 0);
    drop(full);
    assert_eq!(t.stat(r).held, 0);
    assert_eq!(t.uncharge_warnings(r), 0);
}

#[test]
fn charge_uncharges_on_drop() {
    let _q = shared();
    let t = bc(1601);
    let r = Resource::Threads;
    let a = t.charge(r, 3, Severity::Limit).unwrap();
    assert_eq!(a.beancounter(), &t);
    assert_eq!(a.resource(), r);
    assert_eq!(a.amount(), 3);
    assert!(format!("{a:?}").contains("1601"));
    let b = t.charge(r, 4, Severity::Barrier).unwrap();
    let c = t.charge(r, 0, Severity::Force).unwrap();
    assert_eq!(t.stat(r).held, 7);
    drop(a);
    assert_eq!(t.stat(r).held, 4);
    drop(c);
    assert_eq!(t.stat(r).held, 4);
    // The charge keeps working after the handle it came from is gone, and keeps the
    // beancounter alive until it is dropped.
    assert_eq!(t.uncharge_warnings(r), 0);
    drop(t);
    assert_eq!(beancounter::stat(BcId(1601), r).unwrap().held, 4);
    assert_eq!(b.beancounter().stat(r).held, 4);
    drop(b);
    assert!(lookup(BcId(1601)).is_none());
}

#[test]
fn failcnt_counts_exactly_the_refusals() {
    let _q = shared();
    let t = bc(1701);
    let r = Resource::Memory;
    t.set_limits(r, lim(50, 100)).unwrap();
    let mut held = Vec::new();
    let mut refusals = 0;
    for i in 0..200u64 {
        let severity = [Severity::Barrier, Severity::Limit][i as usize % 2];
        let before = t.stat(r).held;
        match t.charge(r, i % 13, severity) {
            Ok(c) => held.push(c),
            Err(BcError::Exceeded(e)) => {
                refusals += 1;
                assert_eq!(e.held, before);
                assert_eq!(t.stat(r).held, before, "a refused charge changed held");
            }
            Err(e) => panic!("{e}"),
        }
        if i % 5 == 0 {
            held.pop();
        }
        let s = t.stat(r);
        assert_eq!(s.failcnt, refusals);
        assert!(s.held <= 100);
    }
    assert!(
        refusals > 10,
        "the test should exercise refusals, saw {refusals}"
    );
    assert_eq!(t.stat(r).held, held.iter().map(|c| c.amount()).sum::<u64>());
    drop(held);
    assert_eq!(t.stat(r).held, 0);
    assert_eq!(t.stat(r).failcnt, refusals, "uncharging changed failcnt");
}

#[test]
fn maxheld_minheld_follow_changes_and_reset_window() {
    let _q = shared();
    let t = bc(1801);
    let r = Resource::Memory;
    let window = |t: &Beancounter| {
        let s = t.stat(r);
        (s.held, s.maxheld, s.minheld)
    };
    assert_eq!(window(&t), (0, 0, 0));
    let a = t.charge(r, 10, Severity::Limit).unwrap();
    assert_eq!(window(&t), (10, 10, 0));
    let b = t.charge(r, 5, Severity::Limit).unwrap();
    assert_eq!(window(&t), (15, 15, 0));
    drop(b);
    assert_eq!(window(&t), (10, 15, 0));

    t.reset_window();
    assert_eq!(window(&t), (10, 10, 10));
    let b = t.charge(r, 30, Severity::Limit).unwrap();
    assert_eq!(window(&t), (40, 40, 10));
    drop(b);
    assert_eq!(window(&t), (10, 40, 10));
    drop(a);
    assert_eq!(window(&t), (0, 40, 0));
    t.reset_window();
    assert_eq!(window(&t), (0, 0, 0));

    // A refused charge is not a change of held: the window does not move.
    t.set_limits(r, lim(5, 5)).unwrap();
    let a = t.charge(r, 4, Severity::Limit).unwrap();
    t.reset_window();
    assert!(t.charge(r, 2, Severity::Limit).is_err());
    assert_eq!(window(&t), (4, 4, 4));
    drop(a);
    assert_eq!(window(&t), (0, 4, 0));
}

#[test]
fn reset_window_covers_every_resource() {
    let _q = shared();
    let t = bc(1802);
    let sockets = beancounter::register_resource("api-sockets").unwrap();
    let rs = [
        Resource::Memory,
        Resource::Allocations,
        Resource::Threads,
        sockets,
    ];
    let held: Vec<_> = rs
        .iter()
        .map(|&r| {
            let big = t.charge(r, 100, Severity::Limit).unwrap();
            let keep = t.charge(r, 7, Severity::Limit).unwrap();
            drop(big);
            keep
        })
        .collect();
    for r in rs {
        assert_eq!(t.stat(r).maxheld, 107);
    }
    t.reset_window();
    for r in rs {
        let s = t.stat(r);
        assert_eq!((s.held, s.maxheld, s.minheld), (7, 7, 7), "{r}");
    }
    drop(held);
}

#[test]
fn uncharge_warnings_stay_zero_for_balanced_charges() {
    // Uncharging more than was held cannot be reached through `Charge`, which gives back
    // exactly what it took; this checks that balanced use never raises the warning.
    let _q = shared();
    let p = bc(1901);
    let c = p.new_child(BcId(1902)).unwrap();
    let r = Resource::Allocations;
    p.set_limits(r, lim(3, 3)).unwrap();
    for n in 0..50u64 {
        let a = c.charge(r, n % 4, Severity::Limit);
        let b = p.charge(r, n % 3, Severity::Limit);
        drop((b, a));
    }
    for r in [
        r,
        Resource::Memory,
        Resource::Custom(MAX_CUSTOM_RESOURCES as u8),
    ] {
        assert_eq!(p.uncharge_warnings(r), 0);
        assert_eq!(c.uncharge_warnings(r), 0);
    }
    assert_eq!(p.stat(r).held, 0);
}

#[test]
fn errors_and_refusals_display_their_numbers() {
    let _q = shared();
    let t = bc(1951);
    t.set_limits(Resource::Memory, lim(3, 4)).unwrap();
    let e = exceeded(t.charge(Resource::Memory, 9, Severity::Barrier));
    let text = e.to_string();
    for part in ["1951", "9", "3", "barrier"] {
        assert!(text.contains(part), "{text:?} lacks {part:?}");
    }
    assert_eq!(BcError::from(e), BcError::Exceeded(e));
    assert_eq!(BcError::Exceeded(e).to_string(), text);
    assert!(BcError::NotFound(BcId(77)).to_string().contains("77"));
    assert_eq!(Severity::Limit.to_string(), "limit");
    assert_eq!(Severity::Force.to_string(), "force");
    let err: Box<dyn std::error::Error> = Box::new(BcError::TableFull);
    assert!(!err.to_string().is_empty());
}

// ---- hierarchy -----------------------------------------------------------------------

#[test]
fn charges_propagate_to_every_ancestor() {
    let _q = shared();
    let top = bc(2001);
    let mid = top.new_child(BcId(2002)).unwrap();
    let leaf = mid.new_child(BcId(2003)).unwrap();
    let r = Resource::Memory;

    let a = leaf.charge(r, 10, Severity::Limit).unwrap();
    let b = mid.charge(r, 5, Severity::Limit).unwrap();
    let c = top.charge(r, 1, Severity::Limit).unwrap();
    let held = |b: &Beancounter| b.stat(r).held;
    assert_eq!((held(&top), held(&mid), held(&leaf)), (16, 15, 10));
    // Only the charged line: a sibling and the root are not charged.
    let sibling = top.new_child(BcId(2004)).unwrap();
    assert_eq!(held(&sibling), 0);
    drop(a);
    assert_eq!((held(&top), held(&mid), held(&leaf)), (6, 5, 0));
    drop((b, c));
    assert_eq!((held(&top), held(&mid), held(&leaf)), (0, 0, 0));
    assert_eq!(top.stat(r).maxheld, 16);
    assert_eq!(mid.stat(r).maxheld, 15);
}

#[test]
fn refusal_at_an_ancestor_unrolls_and_counts_only_there() {
    let _q = shared();
    let top = bc(2101);
    let mid = top.new_child(BcId(2102)).unwrap();
    let leaf = mid.new_child(BcId(2103)).unwrap();
    let r = Resource::Memory;
    mid.set_limits(r, lim(10, 20)).unwrap();

    let a = leaf.charge(r, 15, Severity::Limit).unwrap();
    let held = |b: &Beancounter| b.stat(r).held;
    let failcnt = |b: &Beancounter| b.stat(r).failcnt;

    let e = exceeded(leaf.charge(r, 6, Severity::Limit));
    assert_eq!(
        e,
        Exceeded {
            id: BcId(2102),
            resource: r,
            severity: Severity::Limit,
            requested: 6,
            held: 15,
            bound: 20,
        }
    );
    assert_eq!((held(&top), held(&mid), held(&leaf)), (15, 15, 15));
    assert_eq!((failcnt(&top), failcnt(&mid), failcnt(&leaf)), (0, 1, 0));

    // The same bound refuses a barrier charge against the middle level's barrier.
    let e = exceeded(leaf.charge(r, 1, Severity::Barrier));
    assert_eq!(
        (e.id, e.bound, e.severity),
        (BcId(2102), 10, Severity::Barrier)
    );
    assert_eq!((failcnt(&top), failcnt(&mid), failcnt(&leaf)), (0, 2, 0));

    // A refusal at the top unrolls both levels below it.
    top.set_limits(r, lim(16, 16)).unwrap();
    let e = exceeded(leaf.charge(r, 2, Severity::Limit));
    assert_eq!((e.id, e.held, e.bound), (BcId(2101), 15, 16));
    assert_eq!((held(&top), held(&mid), held(&leaf)), (15, 15, 15));
    assert_eq!((failcnt(&top), failcnt(&mid), failcnt(&leaf)), (1, 2, 0));

    // The leaf's own bound refuses before any ancestor is touched.
    leaf.set_limits(r, lim(15, 15)).unwrap();
    let e = exceeded(leaf.charge(r, 1, Severity::Limit));
    assert_eq!(e.id, BcId(2103));
    assert_eq!((failcnt(&top), failcnt(&mid), failcnt(&leaf)), (1, 2, 1));
    assert_eq!((held(&top), held(&mid), held(&leaf)), (15, 15, 15));
    drop(a);
    assert_eq!((held(&top), held(&mid), held(&leaf)), (0, 0, 0));
}

#[test]
fn refusal_at_an_ancestor_leaves_the_child_window_unchanged() {
    // DESIGN §3.1: a refused charge leaves `held` unchanged, and `maxheld` follows changes
    // of `held`. A charge refused by the parent never completed at the child, so the
    // child's window must not record it.
    let _q = shared();
    let parent = bc(2151);
    let child = parent.new_child(BcId(2152)).unwrap();
    let r = Resource::Memory;
    parent.set_limits(r, lim(5, 5)).unwrap();
    let a = child.charge(r, 2, Severity::Limit).unwrap();
    assert!(child.charge(r, 10, Severity::Limit).is_err());
    let s = child.stat(r);
    assert_eq!(s.held, 2);
    assert_eq!(
        s.maxheld, 2,
        "the child's maxheld recorded a charge its parent refused"
    );
    assert_eq!(parent.stat(r).maxheld, 2);
    drop(a);
}

#[test]
fn parent_and_new_child() {
    let _q = shared();
    let top = bc(2201);
    let child = top.new_child(BcId(2202)).unwrap();
    assert_eq!(child.id(), BcId(2202));
    assert_eq!(child.parent().unwrap(), top);
    assert!(top.parent().is_none());
    // Finding the child again, under the same parent or by id, gives the same one.
    assert_eq!(top.new_child(BcId(2202)).unwrap(), child);
    assert_eq!(find_or_create(BcId(2202)).unwrap(), child);
    assert_eq!(lookup(BcId(2202)).unwrap().parent().unwrap(), top);
    // The root's children are top level.
    let t = beancounter::root().new_child(BcId(2203)).unwrap();
    assert!(t.parent().is_none());
    let _c = t.charge(Resource::Memory, 1, Severity::Limit).unwrap();
    assert_eq!(find_or_create(BcId(2203)).unwrap(), t);
}

#[test]
fn new_child_of_an_id_under_another_parent_is_already_exists() {
    let _q = shared();
    let p1 = bc(2301);
    let p2 = bc(2302);
    let child = p1.new_child(BcId(2303)).unwrap();
    let top = bc(2304);
    assert_eq!(
        p2.new_child(BcId(2303)).unwrap_err(),
        BcError::AlreadyExists {
            id: BcId(2303),
            parent: Some(BcId(2301))
        }
    );
    assert_eq!(
        p2.new_child(BcId(2304)).unwrap_err(),
        BcError::AlreadyExists {
            id: BcId(2304),
            parent: None
        }
    );
    // A beancounter cannot become its own child, nor its parent's.
    assert!(matches!(
        child.new_child(BcId(2301)),
        Err(BcError::AlreadyExists { .. })
    ));
    // Nothing moved.
    assert_eq!(child.parent().unwrap(), p1);
    assert!(top.parent().is_none());
    assert!(p1.parent().is_none());
}

#[test]
fn new_child_with_the_root_id_is_invalid() {
    let _q = shared();
    let p = bc(2401);
    assert_eq!(
        p.new_child(BcId::ROOT).unwrap_err(),
        BcError::InvalidId(BcId::ROOT)
    );
    let child = p.new_child(BcId(2402)).unwrap();
    assert_eq!(
        child.new_child(BcId(0)).unwrap_err(),
        BcError::InvalidId(BcId(0))
    );
}

#[test]
fn root_new_child_with_the_root_id_is_invalid() {
    // `Beancounter::new_child` documents `InvalidId` for id 0; the root is not its own child.
    let _q = shared();
    let r = beancounter::root().new_child(BcId::ROOT);
    assert_eq!(r.unwrap_err(), BcError::InvalidId(BcId::ROOT));
}

#[test]
fn root_new_child_of_a_nested_id_is_already_exists() {
    // The root's children are the top-level beancounters; an id that lives under another
    // parent is not one of them (`new_child` documents AlreadyExists for that case).
    let _q = shared();
    let p = bc(2451);
    let _child = p.new_child(BcId(2452)).unwrap();
    let r = beancounter::root().new_child(BcId(2452));
    assert_eq!(
        r.unwrap_err(),
        BcError::AlreadyExists {
            id: BcId(2452),
            parent: Some(BcId(2451))
        }
    );
}

#[test]
fn nesting_stops_at_max_depth() {
    let _q = shared();
    let mut chain = vec![bc(2500)];
    for depth in 2..=MAX_DEPTH {
        let next = chain
            .last()
            .unwrap()
            .new_child(BcId(2500 + depth as u32))
            .unwrap();
        chain.push(next);
    }
    assert_eq!(chain.len(), MAX_DEPTH);
    let deepest = chain.last().unwrap();
    let too_deep = BcId(2500 + MAX_DEPTH as u32 + 1);
    assert_eq!(deepest.new_child(too_deep).unwrap_err(), BcError::TooDeep);
    assert!(lookup(too_deep).is_none(), "a refused child was created");
    // The full depth charges every level.
    let c = deepest
        .charge(Resource::Memory, 3, Severity::Limit)
        .unwrap();
    for level in &chain {
        assert_eq!(level.stat(Resource::Memory).held, 3);
    }
    drop(c);
    for level in &chain {
        assert_eq!(level.stat(Resource::Memory).held, 0);
    }
    // Walking up from the deepest reaches the top in MAX_DEPTH - 1 steps.
    let mut at = deepest.clone();
    let mut steps = 0;
    while let Some(p) = at.parent() {
        at = p;
        steps += 1;
    }
    assert_eq!((steps, at.id()), (MAX_DEPTH - 1, BcId(2500)));
}

// ---- lifetime (exclusive: reads live_count and check_invariants) ----------------------

#[test]
fn dropping_the_last_handle_frees_an_empty_beancounter() {
    let _q = exclusive();
    beancounter::check_invariants().unwrap();
    let live = beancounter::live_count();
    let a = bc(3001);
    assert_eq!(beancounter::live_count(), live + 1);
    let b = a.clone();
    let c = lookup(BcId(3001)).unwrap();
    beancounter::check_invariants().unwrap();
    drop(a);
    drop(c);
    assert!(exists(3001), "freed while a handle is alive");
    assert_eq!(beancounter::live_count(), live + 1);
    drop(b);
    assert!(lookup(BcId(3001)).is_none());
    assert_eq!(beancounter::live_count(), live);
    assert!(matches!(
        beancounter::stat(BcId(3001), Resource::Memory),
        Err(BcError::NotFound(_))
    ));
    beancounter::check_invariants().unwrap();
    // The root is never freed and never counted.
    drop(beancounter::root());
    drop(find_or_create(BcId::ROOT).unwrap());
    assert_eq!(beancounter::live_count(), live);
    assert!(lookup(BcId::ROOT).is_some());
}

#[test]
fn a_live_charge_keeps_its_beancounter() {
    let _q = exclusive();
    let live = beancounter::live_count();
    let t = bc(3101);
    t.set_limits(Resource::Memory, lim(50, 60)).unwrap();
    let c = t.charge(Resource::Memory, 40, Severity::Limit).unwrap();
    drop(t);
    // No handle left, but a charge: the beancounter stays, with its counters and limits.
    let found = lookup(BcId(3101)).expect("freed while charged");
    let s = found.stat(Resource::Memory);
    assert_eq!((s.held, s.barrier, s.limit), (40, 50, 60));
    drop(found);
    assert_eq!(beancounter::live_count(), live + 1);
    beancounter::reap();
    assert!(exists(3101), "reaped while charged");
    assert_eq!(beancounter::live_count(), live + 1);
    beancounter::check_invariants().unwrap();
    drop(c);
    beancounter::reap();
    assert!(lookup(BcId(3101)).is_none());
    assert_eq!(beancounter::live_count(), live);
    beancounter::check_invariants().unwrap();
}

#[test]
fn a_recreated_id_starts_fresh() {
    let _q = exclusive();
    let t = bc(3201);
    t.set_limits(Resource::Memory, lim(1, 1)).unwrap();
    let c = t.charge(Resource::Memory, 1, Severity::Limit).unwrap();
    assert!(t.charge(Resource::Memory, 1, Severity::Limit).is_err());
    drop(c);
    drop(t);
    assert!(lookup(BcId(3201)).is_none());
    let t = bc(3201);
    assert_eq!(
        t.stat(Resource::Memory),
        ResourceStat {
            barrier: MAX,
            limit: MAX,
            ..ResourceStat::default()
        }
    );
}

#[test]
fn a_child_keeps_its_parent_and_frees_the_chain() {
    let _q = exclusive();
    let live = beancounter::live_count();
    let top = bc(3301);
    let mid = top.new_child(BcId(3302)).unwrap();
    let leaf = mid.new_child(BcId(3303)).unwrap();
    assert_eq!(beancounter::live_count(), live + 3);
    drop(top);
    drop(mid);
    assert!(
        exists(3301) && exists(3302),
        "an ancestor of a live child was freed"
    );
    let c = leaf.charge(Resource::Memory, 8, Severity::Limit).unwrap();
    drop(leaf);
    assert!(exists(3301) && exists(3302) && exists(3303));
    assert_eq!(
        beancounter::stat(BcId(3301), Resource::Memory)
            .unwrap()
            .held,
        8
    );
    beancounter::check_invariants().unwrap();
    drop(c);
    beancounter::reap();
    assert!(!exists(3303) && !exists(3302) && !exists(3301));
    assert_eq!(beancounter::live_count(), live);
    beancounter::check_invariants().unwrap();
}

#[test]
fn capacity_is_the_default_table_size() {
    let _q = shared();
    let _t = bc(3401);
    if std::env::var_os("BEANCOUNTER_CAPACITY").is_none() {
        assert_eq!(beancounter::capacity(), beancounter::DEFAULT_CAPACITY);
    }
    let cap = beancounter::capacity();
    assert!(
        (2..=beancounter::MAX_CAPACITY).contains(&cap),
        "capacity {cap}"
    );
}

// ---- concurrency ---------------------------------------------------------------------

const THREADS: u64 = 4;
const ROUNDS: u64 = 100_000;

/// Charges that succeed concurrently never add up above the limit, refused ones never
/// change `held`, and `failcnt` counts every refusal.
#[test]
fn concurrent_charges_never_exceed_the_limit() {
    let _q = shared();
    let t = bc(4001);
    let r = Resource::Memory;
    const LIMIT: u64 = 40;
    const MAX_N: u64 = 16;
    t.set_limits(r, lim(LIMIT / 2, LIMIT)).unwrap();
    // Sum of the charges that succeeded and are not yet dropped: raised after a success,
    // lowered before the drop, so it never exceeds what the counter really holds for us.
    let outstanding = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(THREADS as usize));
    let workers: Vec<_> = (0..THREADS)
        .map(|w| {
            let t = t.clone();
            let (outstanding, start) = (outstanding.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let mut refusals = 0u64;
                let mut successes = 0u64;
                let mut kept = None;
                for i in 0..ROUNDS {
                    let n = 1 + (i * 7 + w) % MAX_N;
                    let severity = if i % 3 == 0 {
                        Severity::Barrier
                    } else {
                        Severity::Limit
                    };
                    let bound = if severity == Severity::Barrier {
                        LIMIT / 2
                    } else {
                        LIMIT
                    };
                    match t.charge(r, n, severity) {
                        Ok(c) => {
                            successes += 1;
                            let now = outstanding.fetch_add(n, Ordering::SeqCst) + n;
                            assert!(now <= LIMIT, "successful charges add up to {now}");
                            let s = t.stat(r);
                            // A refused charge never shows in `held`, not even for an
                            // instant: what any thread reads is within the limit.
                            assert!(s.held <= LIMIT, "{s:?}");
                            assert!(s.maxheld <= LIMIT, "maxheld {} > limit", s.maxheld);
                            // Hold every fourth charge across the next round, so
                            // charges overlap in time, not just in the counter.
                            if let Some((old, m)) = kept.take() {
                                outstanding.fetch_sub(m, Ordering::SeqCst);
                                drop::<Charge>(old);
                            }
                            if i % 4 == 0 {
                                kept = Some((c, n));
                            } else {
                                outstanding.fetch_sub(n, Ordering::SeqCst);
                                drop(c);
                            }
                        }
                        Err(BcError::Exceeded(e)) => {
                            refusals += 1;
                            assert_eq!((e.id, e.requested, e.bound), (BcId(4001), n, bound));
                            // Refused only when it really did not fit at that moment.
                            assert!(e.held + n > bound, "refused although it fitted: {e:?}");
                            assert_eq!(e.severity, severity);
                        }
                        Err(e) => panic!("{e}"),
                    }
                }
                if let Some((c, n)) = kept.take() {
                    outstanding.fetch_sub(n, Ordering::SeqCst);
                    drop::<Charge>(c);
                }
                (successes, refusals)
            })
        })
        .collect();
    let (mut successes, mut refusals) = (0, 0);
    for w in workers {
        let (s, f) = w.join().unwrap();
        successes += s;
        refusals += f;
    }
    assert_eq!(successes + refusals, THREADS * ROUNDS);
    assert!(refusals > 0, "the limit was never reached");
    let s = t.stat(r);
    assert_eq!(s.held, 0);
    assert_eq!(s.failcnt, refusals);
    assert!(s.maxheld <= LIMIT);
    assert_eq!(t.uncharge_warnings(r), 0);
    // Both outcomes happened. How many of each depends on how the threads were scheduled
    // (a preempted thread holding a kept charge makes others refuse, rightly): every refusal
    // was checked above to be one that really did not fit.
    assert!(successes > 0, "no charge succeeded");
}

/// Siblings charging concurrently under one parent with a limit: the parent never holds
/// more than its limit, each refusal is counted at the level that refused, and everything
/// returns to zero.
#[test]
fn concurrent_hierarchical_charges_respect_the_parent_limit() {
    let _q = shared();
    let parent = bc(4101);
    let r = Resource::Allocations;
    const LIMIT: u64 = 20;
    parent.set_limits(r, lim(LIMIT, LIMIT)).unwrap();
    let children: Vec<_> = (0..THREADS as u32)
        .map(|i| {
            let c = parent.new_child(BcId(4102 + i)).unwrap();
            c.set_limits(r, lim(12, 12)).unwrap();
            c
        })
        .collect();
    let outstanding = Arc::new(AtomicU64::new(0));
    let start = Arc::new(Barrier::new(THREADS as usize));
    let workers: Vec<_> = children
        .iter()
        .cloned()
        .map(|child| {
            let (outstanding, start) = (outstanding.clone(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                let (mut at_parent, mut at_child) = (0u64, 0u64);
                let mut keep = Vec::new();
                for i in 0..ROUNDS / 2 {
                    let n = 1 + i % 5;
                    match child.charge(r, n, Severity::Limit) {
                        Ok(c) => {
                            let now = outstanding.fetch_add(n, Ordering::SeqCst) + n;
                            assert!(now <= LIMIT, "children hold {now} under a limit of {LIMIT}");
                            keep.push(c);
                        }
                        Err(BcError::Exceeded(e)) if e.id == BcId(4101) => at_parent += 1,
                        Err(BcError::Exceeded(e)) if e.id == child.id() => at_child += 1,
                        Err(e) => panic!("{e}"),
                    }
                    // Hold up to four charges (up to 20 per child, 80 together), so
                    // both the children's limit (12) and the parent's (20) are reached.
                    if (keep.len() >= 4 || i % 5 == 0) && !keep.is_empty() {
                        let c = keep.remove(0);
                        outstanding.fetch_sub(c.amount(), Ordering::SeqCst);
                    }
                }
                for c in keep.drain(..) {
                    outstanding.fetch_sub(c.amount(), Ordering::SeqCst);
                }
                (at_parent, at_child)
            })
        })
        .collect();
    let (mut at_parent, mut child_fails) = (0, Vec::new());
    for w in workers {
        let (p, c) = w.join().unwrap();
        at_parent += p;
        child_fails.push(c);
    }
    let ps = parent.stat(r);
    assert_eq!(ps.held, 0);
    assert!(ps.maxheld <= LIMIT, "parent maxheld {}", ps.maxheld);
    assert_eq!(ps.failcnt, at_parent);
    assert!(at_parent > 0, "the parent limit was never reached");
    for (c, fails) in children.iter().zip(child_fails) {
        let s = c.stat(r);
        assert_eq!((s.held, s.failcnt), (0, fails), "child {}", c.id());
        assert_eq!(c.uncharge_warnings(r), 0);
    }
}

/// Runs `contender` on another thread, hammering charges that are always refused (so the
/// counter keeps swinging up by a transient amount and back), while `f` runs here.
fn with_refused_contender<R>(t: &Beancounter, r: Resource, f: impl FnOnce() -> R) -> R {
    let stop = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(AtomicI64::new(0));
    let contender = {
        let (t, stop, attempts) = (t.clone(), stop.clone(), attempts.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                assert!(t.charge(r, 1_000, Severity::Limit).is_err());
                attempts.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    while attempts.load(Ordering::Relaxed) < 100 {
        std::thread::yield_now();
    }
    let out = f();
    stop.store(true, Ordering::Relaxed);
    contender.join().unwrap();
    out
}

/// DESIGN §3.1: `maxheld`/`minheld` follow every change of `held`, and a refused charge
/// changes nothing. Refused charges racing with uncharges must therefore not leave the
/// window claiming a `minheld` above what is held at rest.
#[test]
fn refused_charges_racing_uncharges_keep_the_window_exact() {
    let _q = shared();
    let t = bc(4201);
    let r = Resource::Memory;
    t.set_limits(r, lim(100, 100)).unwrap();
    let mut bad = None;
    for round in 0..1000 {
        let base = t.charge(r, 10, Severity::Force).unwrap();
        t.reset_window();
        with_refused_contender(&t, r, || drop(base));
        let s = t.stat(r);
        assert_eq!(s.held, 0);
        if s.minheld != 0 {
            bad = Some((round, s));
            break;
        }
    }
    if let Some((round, s)) = bad {
        panic!(
            "round {round}: at rest held 0 but minheld {} ({s:?})",
            s.minheld
        );
    }
}

/// `reset_window` starts the window at what is held; a charge about to be refused is not
/// held, so a reset racing with refused charges must not set `maxheld` above the limit.
#[test]
fn reset_window_racing_refused_charges_keeps_maxheld_within_the_limit() {
    let _q = shared();
    let t = bc(4301);
    let r = Resource::Memory;
    t.set_limits(r, lim(100, 100)).unwrap();
    let _base = t.charge(r, 10, Severity::Limit).unwrap();
    let mut bad = None;
    for round in 0..300 {
        with_refused_contender(&t, r, || {
            for _ in 0..100 {
                t.reset_window();
                let s = t.stat(r);
                if s.maxheld > 100 && bad.is_none() {
                    bad = Some((round, s));
                }
            }
        });
        if bad.is_some() {
            break;
        }
    }
    if let Some((round, s)) = bad {
        panic!(
            "round {round}: maxheld {} above the limit 100 ({s:?})",
            s.maxheld
        );
    }
}

/// Errors read as what happened: a refused charge names the request, a checkpoint report
/// (nothing requested) says the tenant is over its barrier, not that 0 was refused.
#[test]
fn exceeded_reads_as_what_happened() {
    let t = bc(4401);
    let r = Resource::Threads;
    t.set_limits(r, lim(1, 3)).unwrap();
    let _g = t.enter();
    let held = t.charge(r, 2, Severity::Limit).unwrap();
    let refused = match t.charge(r, 2, Severity::Limit) {
        Err(BcError::Exceeded(e)) => e,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(
        refused.to_string(),
        "beancounter 4401 refused 2 threads: held 2 + 2 > limit 3"
    );
    let over = beancounter::checkpoint().unwrap_err();
    assert_eq!(
        over.to_string(),
        "beancounter 4401 is over its threads barrier: held 2 > barrier 1"
    );
    drop(held);
}
