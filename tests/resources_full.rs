//! Registering more than MAX_CUSTOM_RESOURCES names: process-wide and permanent, so alone.

use beancounter::{find_or_create, BcError, BcId, Limits, Resource, Severity};
use beancounter::{MAX, MAX_CUSTOM_RESOURCES};

#[test]
fn registering_past_the_last_custom_resource_is_too_many_resources() {
    const NAMES: [&str; 17] = [
        "r0", "r1", "r2", "r3", "r4", "r5", "r6", "r7", "r8", "r9", "r10", "r11", "r12", "r13",
        "r14", "r15", "r16",
    ];
    assert_eq!(NAMES.len(), MAX_CUSTOM_RESOURCES + 1);
    let mut registered = Vec::new();
    for (n, name) in NAMES[..MAX_CUSTOM_RESOURCES].iter().enumerate() {
        let r = beancounter::register_resource(name).unwrap();
        assert_eq!(
            r,
            Resource::Custom(n as u8),
            "resources are numbered densely"
        );
        registered.push(r);
    }

    let t = find_or_create(BcId(1)).unwrap();
    let last = *registered.last().unwrap();
    t.set_limits(last, Limits::new(1, 2).unwrap()).unwrap();
    let _c = t.charge(last, 2, Severity::Limit).unwrap();
    let stat_before = t.stat(last);
    let live_before = beancounter::live_count();
    let names_before: Vec<_> = (0..=u8::MAX).map(|n| Resource::Custom(n).name()).collect();

    // Full: a new name is refused, again and again, and changes nothing.
    for _ in 0..2 {
        assert_eq!(
            beancounter::register_resource(NAMES[MAX_CUSTOM_RESOURCES]),
            Err(BcError::TooManyResources)
        );
        assert_eq!(
            beancounter::register_resource("another"),
            Err(BcError::TooManyResources)
        );
    }
    let names_after: Vec<_> = (0..=u8::MAX).map(|n| Resource::Custom(n).name()).collect();
    assert_eq!(names_after, names_before);
    assert_eq!(Resource::Custom(MAX_CUSTOM_RESOURCES as u8).name(), None);
    assert_eq!(t.stat(last), stat_before);
    assert_eq!(beancounter::live_count(), live_before);
    // The next index still does not exist.
    let next = Resource::Custom(MAX_CUSTOM_RESOURCES as u8);
    assert_eq!(
        t.charge(next, 1, Severity::Force).unwrap_err(),
        BcError::UnknownResource(next)
    );

    // Names already registered are still found: registration is idempotent even when full.
    for (n, name) in NAMES[..MAX_CUSTOM_RESOURCES].iter().enumerate() {
        assert_eq!(beancounter::register_resource(name).unwrap(), registered[n]);
        assert_eq!(registered[n].name(), Some(*name));
    }
    // An invalid name is still reported as such, not as "too many".
    assert_eq!(
        beancounter::register_resource("bad name"),
        Err(BcError::InvalidName("bad name"))
    );
    // Every registered resource works, with the default (unlimited) limits.
    for &r in &registered[..MAX_CUSTOM_RESOURCES - 1] {
        assert_eq!(t.stat(r).limit, MAX);
        let c = t.charge(r, 5, Severity::Limit).unwrap();
        assert_eq!(t.stat(r).held, 5);
        drop(c);
    }
    assert_eq!(beancounter::check_invariants(), Ok(()));
}
