//! A full beancounter table (BEANCOUNTER_CAPACITY=8): TableFull, no state change, reuse.

use beancounter::{find_or_create, lookup, BcError, BcId, Limits, Resource, Severity, MAX};

const CAPACITY: u32 = 8;

/// One test only: the capacity is read from the environment once, at the first creation,
/// so it must be set before anything in this process creates a beancounter.
#[test]
fn a_full_table_refuses_creation_and_recovers() {
    // Edition 2021: `set_var` is safe; nothing else runs in this process yet.
    std::env::set_var("BEANCOUNTER_CAPACITY", CAPACITY.to_string());
    assert_eq!(beancounter::capacity(), 0, "the table is mapped lazily");
    // Root and lookups need no table.
    assert!(lookup(BcId(1)).is_none());
    assert_eq!(beancounter::root().id(), BcId::ROOT);

    // Root is one slot: CAPACITY - 1 tenants fit.
    let mut live = Vec::new();
    let mut id = 1;
    let err = loop {
        match find_or_create(BcId(id)) {
            Ok(b) => live.push(b),
            Err(e) => break e,
        }
        id += 1;
        assert!(id < 100, "the capacity of {CAPACITY} was not applied");
    };
    assert_eq!(err, BcError::TableFull);
    assert_eq!(live.len() as u32, CAPACITY - 1);
    assert_eq!(beancounter::capacity(), CAPACITY);
    assert_eq!(beancounter::live_count(), CAPACITY - 1);
    let full_id = BcId(id);

    // Give the first tenant some history, to check a reused slot starts clean.
    let first = &live[0];
    first
        .set_limits(Resource::Memory, Limits::new(1, 1).unwrap())
        .unwrap();
    let c = first.charge(Resource::Memory, 1, Severity::Limit).unwrap();
    assert!(first.charge(Resource::Memory, 1, Severity::Limit).is_err());
    drop(c);

    // Every way of creating is refused while full, and nothing changes.
    let stats = |bs: &[beancounter::Beancounter]| -> Vec<_> {
        bs.iter()
            .map(|b| (b.id(), b.stat(Resource::Memory), b.parent().map(|p| p.id())))
            .collect()
    };
    let before = stats(&live);
    for _ in 0..3 {
        assert_eq!(find_or_create(full_id).unwrap_err(), BcError::TableFull);
        assert_eq!(live[1].new_child(full_id).unwrap_err(), BcError::TableFull);
        assert_eq!(
            beancounter::root().new_child(full_id).unwrap_err(),
            BcError::TableFull
        );
    }
    assert!(lookup(full_id).is_none());
    assert_eq!(stats(&live), before);
    assert_eq!(beancounter::live_count(), CAPACITY - 1);
    assert_eq!(beancounter::capacity(), CAPACITY);
    assert_eq!(beancounter::check_invariants(), Ok(()));
    // Existing ids are still found while full (no new slot needed).
    for b in &live {
        assert_eq!(&find_or_create(b.id()).unwrap(), b);
    }
    // The root keeps working.
    let r = beancounter::root();
    drop(r.charge(Resource::Threads, 1, Severity::Limit).unwrap());

    // Free one: the next creation succeeds, in a clean slot with default limits.
    let freed = live.remove(0);
    let freed_id = freed.id();
    drop(freed);
    assert!(lookup(freed_id).is_none());
    assert_eq!(beancounter::live_count(), CAPACITY - 2);
    let new = find_or_create(full_id).unwrap();
    let s = new.stat(Resource::Memory);
    assert_eq!(
        (s.held, s.maxheld, s.failcnt, s.barrier, s.limit),
        (0, 0, 0, MAX, MAX)
    );
    assert_eq!(beancounter::live_count(), CAPACITY - 1);
    assert_eq!(find_or_create(freed_id).unwrap_err(), BcError::TableFull);
    live.push(new);

    // A child also fits once a slot is free, and is refused again when full.
    drop(live.pop());
    let child = live[0].new_child(full_id).unwrap();
    assert_eq!(child.parent().unwrap(), live[0]);
    assert_eq!(
        live[1].new_child(BcId(500)).unwrap_err(),
        BcError::TableFull
    );
    drop(child);

    // Everything freed: all slots are usable again.
    drop(live);
    assert_eq!(beancounter::live_count(), 0);
    let again: Vec<_> = (1000..1000 + CAPACITY - 1)
        .map(|i| find_or_create(BcId(i)).unwrap())
        .collect();
    assert_eq!(find_or_create(BcId(2000)).unwrap_err(), BcError::TableFull);
    drop(again);
    assert_eq!(beancounter::check_invariants(), Ok(()));
}
