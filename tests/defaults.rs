//! Default limits for new beancounters: process-global, so they get their own test binary.

use beancounter::{default_limits, find_or_create, set_default_limits, BcId, Limits, Resource};
use beancounter::{Severity, MAX};
use std::sync::{Mutex, MutexGuard};

/// The tests below change process-wide defaults; they take turns.
static DEFAULTS: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    DEFAULTS.lock().unwrap_or_else(|e| e.into_inner())
}

fn lim(barrier: u64, limit: u64) -> Limits {
    Limits::new(barrier, limit).unwrap()
}

fn limits_of(id: u32, r: Resource) -> Limits {
    let s = beancounter::stat(BcId(id), r).unwrap();
    Limits {
        barrier: s.barrier,
        limit: s.limit,
    }
}

#[test]
fn defaults_apply_to_beancounters_created_afterwards() {
    let _s = serial();
    for r in Resource::BUILTIN {
        assert_eq!(default_limits(r).unwrap(), Limits::UNLIMITED, "{r}");
    }
    let before = find_or_create(BcId(1)).unwrap();

    set_default_limits(Resource::Memory, lim(100, 200)).unwrap();
    set_default_limits(Resource::Threads, lim(2, 3)).unwrap();
    assert_eq!(default_limits(Resource::Memory).unwrap(), lim(100, 200));
    assert_eq!(default_limits(Resource::Threads).unwrap(), lim(2, 3));
    assert_eq!(
        default_limits(Resource::Allocations).unwrap(),
        Limits::UNLIMITED
    );

    // New top-level beancounters and new children take the defaults...
    let after = find_or_create(BcId(2)).unwrap();
    let child = before.new_child(BcId(3)).unwrap();
    for id in [2, 3] {
        assert_eq!(limits_of(id, Resource::Memory), lim(100, 200));
        assert_eq!(limits_of(id, Resource::Threads), lim(2, 3));
        assert_eq!(limits_of(id, Resource::Allocations), Limits::UNLIMITED);
    }
    // ...and are checked against them.
    let c = after
        .charge(Resource::Memory, 200, Severity::Limit)
        .unwrap();
    assert!(after.charge(Resource::Memory, 1, Severity::Limit).is_err());
    drop(c);
    // Existing ones and the root keep theirs.
    assert_eq!(limits_of(1, Resource::Memory), Limits::UNLIMITED);
    assert_eq!(limits_of(0, Resource::Memory), Limits::UNLIMITED);
    assert_eq!(limits_of(0, Resource::Threads), Limits::UNLIMITED);
    // Finding an existing id does not re-apply the defaults.
    before.set_limits(Resource::Memory, lim(5, 6)).unwrap();
    set_default_limits(Resource::Memory, lim(7, 8)).unwrap();
    drop(find_or_create(BcId(1)).unwrap());
    assert_eq!(limits_of(1, Resource::Memory), lim(5, 6));
    // An id created again after being freed takes the defaults of its new creation.
    drop(after);
    assert!(beancounter::lookup(BcId(2)).is_none());
    let again = find_or_create(BcId(2)).unwrap();
    assert_eq!(limits_of(2, Resource::Memory), lim(7, 8));

    // A rejected default leaves the old one.
    let bad = Limits {
        barrier: 9,
        limit: 8,
    };
    assert!(set_default_limits(Resource::Memory, bad).is_err());
    assert_eq!(default_limits(Resource::Memory).unwrap(), lim(7, 8));

    // Back to unlimited: new beancounters are unlimited again.
    for r in Resource::BUILTIN {
        set_default_limits(r, Limits::UNLIMITED).unwrap();
    }
    let last = find_or_create(BcId(4)).unwrap();
    assert_eq!(limits_of(4, Resource::Memory), Limits::UNLIMITED);
    assert_eq!(limits_of(4, Resource::Threads), Limits::UNLIMITED);
    drop((before, child, again, last));
}

#[test]
fn custom_resources_have_defaults_too() {
    let _s = serial();
    let conns = beancounter::register_resource("defaults-conns").unwrap();
    assert_eq!(default_limits(conns).unwrap(), Limits::UNLIMITED);
    set_default_limits(conns, lim(1, 1)).unwrap();
    assert_eq!(default_limits(conns).unwrap(), lim(1, 1));
    let t = find_or_create(BcId(11)).unwrap();
    assert_eq!(limits_of(11, conns), lim(1, 1));
    let c = t.charge(conns, 1, Severity::Limit).unwrap();
    assert!(t.charge(conns, 1, Severity::Limit).is_err());
    drop(c);
    // Built-in defaults are independent of the custom one.
    assert_eq!(limits_of(11, Resource::Memory).limit, MAX);
    set_default_limits(conns, Limits::UNLIMITED).unwrap();
    assert_eq!(default_limits(conns).unwrap(), Limits::UNLIMITED);
}
