//! Every bad input of DESIGN §7 in one table: the right `BcError` (for the allocator, a null
//! pointer, reported here as `BcError::OutOfMemory`), and no state change.
//!
//! The OS refusing memory is not in the table: a refused mapping is charged first and
//! rolled back, which leaves the attempt in `maxheld`; `tests/alloc_faults.rs` checks it.

use beancounter::{
    find_or_create, BcError, BcId, BeanAlloc, Beancounter, Limits, Resource, ResourceStat,
    Severity, MAX, MAX_CUSTOM_RESOURCES, MAX_DEPTH,
};
use std::alloc::{GlobalAlloc, Layout};

/// Everything a bad call could disturb, as seen through the public API.
#[derive(Debug, PartialEq)]
struct State {
    live: u32,
    stats: Vec<(BcId, Resource, ResourceStat)>,
    warnings: Vec<(BcId, Resource, u64)>,
    parents: Vec<(BcId, Option<BcId>)>,
    present: Vec<(BcId, bool)>,
    defaults: Vec<(Resource, Limits)>,
    names: Vec<Option<&'static str>>,
    invariants: Result<(), &'static str>,
}

fn snapshot(bcs: &[&Beancounter], resources: &[Resource], probes: &[BcId]) -> State {
    let mut stats = Vec::new();
    let mut warnings = Vec::new();
    for b in bcs {
        for &r in resources {
            stats.push((b.id(), r, beancounter::stat(b.id(), r).unwrap()));
            warnings.push((b.id(), r, b.uncharge_warnings(r)));
        }
    }
    State {
        live: beancounter::live_count(),
        stats,
        warnings,
        parents: bcs
            .iter()
            .map(|b| (b.id(), b.parent().map(|p| p.id())))
            .collect(),
        present: probes
            .iter()
            .map(|&id| (id, beancounter::lookup(id).is_some()))
            .collect(),
        defaults: resources
            .iter()
            .map(|&r| (r, beancounter::default_limits(r).unwrap()))
            .collect(),
        names: (0..=u8::MAX).map(|n| Resource::Custom(n).name()).collect(),
        invariants: beancounter::check_invariants(),
    }
}

/// The allocator, called directly (it need not be the global one to be tested).
static HEAP: BeanAlloc = BeanAlloc::new();

type Call<'a> = Box<dyn Fn() -> Result<(), BcError> + 'a>;

/// This binary holds a single test: the state checks read process-wide counts
/// (`live_count`, `check_invariants`), which a test running alongside would disturb.
#[test]
fn every_bad_input_is_an_error_and_changes_nothing() {
    // ---- fixture: beancounters with limits, charges, a failure count and children ----
    let sockets = beancounter::register_resource("bad-sockets").unwrap();
    let a = find_or_create(BcId(7001)).unwrap();
    a.set_limits(Resource::Memory, Limits::new(40, 50).unwrap())
        .unwrap();
    a.set_limits(sockets, Limits::new(3, 4).unwrap()).unwrap();
    let b = a.new_child(BcId(7002)).unwrap();
    let other = find_or_create(BcId(7003)).unwrap();
    let _held = [
        b.charge(Resource::Memory, 30, Severity::Limit).unwrap(),
        a.charge(sockets, 2, Severity::Limit).unwrap(),
        other.charge(Resource::Threads, 1, Severity::Force).unwrap(),
    ];
    assert!(b.charge(Resource::Memory, 30, Severity::Limit).is_err());
    let mut chain = vec![find_or_create(BcId(7100)).unwrap()];
    while chain.len() < MAX_DEPTH {
        let next = chain
            .last()
            .unwrap()
            .new_child(BcId(7100 + chain.len() as u32))
            .unwrap();
        chain.push(next);
    }
    let deepest = chain.last().unwrap();
    // An id that existed once and was freed is as unknown as one never used.
    drop(find_or_create(BcId(7998)).unwrap());
    let unknown = BcId(7999);
    let freed = BcId(7998);
    let too_deep = BcId(7100 + MAX_DEPTH as u32);

    let mut bcs = vec![&a, &b, &other];
    bcs.extend(chain.iter());
    let mut resources = Resource::BUILTIN.to_vec();
    resources.push(sockets);
    let probes = [unknown, freed, too_deep, BcId(7002), BcId(7100)];

    // ---- the table -------------------------------------------------------------------
    let valid = Limits::new(1, 2).unwrap();
    let bad_limits = [
        Limits {
            barrier: 2,
            limit: 1,
        },
        Limits {
            barrier: 0,
            limit: MAX + 1,
        },
        Limits {
            barrier: MAX,
            limit: u64::MAX,
        },
        Limits {
            barrier: u64::MAX,
            limit: MAX + 1,
        },
    ];
    let unregistered = Resource::Custom(MAX_CUSTOM_RESOURCES as u8 - 1);
    let unknown_resources = [
        unregistered,
        Resource::Custom(MAX_CUSTOM_RESOURCES as u8),
        Resource::Custom(u8::MAX),
    ];
    let bad_names: [&'static str; 9] = [
        "",
        " ",
        "two words",
        "tab\there",
        "line\n",
        "naïve",
        "del\u{7f}",
        "x23456789012345678901234567890123",
        "\0",
    ];

    let mut cases: Vec<(String, Call, BcError)> = Vec::new();
    for l in bad_limits {
        let err = BcError::InvalidLimits {
            barrier: l.barrier,
            limit: l.limit,
        };
        let tag = format!("{}/{}", l.barrier, l.limit);
        cases.push((
            format!("Limits::new({tag})"),
            Box::new(move || Limits::new(l.barrier, l.limit).map(drop)),
            err,
        ));
        cases.push((
            format!("Limits::validate({tag})"),
            Box::new(move || l.validate()),
            err,
        ));
        for &r in &resources {
            cases.push((
                format!("set_limits(7001, {r}, {tag})"),
                Box::new(move || beancounter::set_limits(BcId(7001), r, l)),
                err,
            ));
            let a = &a;
            cases.push((
                format!("Beancounter::set_limits({r}, {tag})"),
                Box::new(move || a.set_limits(r, l)),
                err,
            ));
            cases.push((
                format!("set_default_limits({r}, {tag})"),
                Box::new(move || beancounter::set_default_limits(r, l)),
                err,
            ));
        }
        cases.push((
            format!("root set_limits({tag})"),
            Box::new(move || beancounter::root().set_limits(Resource::Memory, l)),
            err,
        ));
    }
    for id in [unknown, freed] {
        cases.push((
            format!("set_limits({id})"),
            Box::new(move || beancounter::set_limits(id, Resource::Memory, valid)),
            BcError::NotFound(id),
        ));
        for &r in &resources {
            cases.push((
                format!("stat({id}, {r})"),
                Box::new(move || beancounter::stat(id, r).map(drop)),
                BcError::NotFound(id),
            ));
        }
    }
    for r in unknown_resources {
        let err = BcError::UnknownResource(r);
        let a = &a;
        let b = &b;
        cases.push((
            format!("set_limits(7001, {r:?})"),
            Box::new(move || beancounter::set_limits(BcId(7001), r, valid)),
            err,
        ));
        cases.push((
            format!("Beancounter::set_limits({r:?})"),
            Box::new(move || a.set_limits(r, valid)),
            err,
        ));
        cases.push((
            format!("stat(7001, {r:?})"),
            Box::new(move || beancounter::stat(BcId(7001), r).map(drop)),
            err,
        ));
        for s in [Severity::Barrier, Severity::Limit, Severity::Force] {
            cases.push((
                format!("charge({r:?}, {s})"),
                Box::new(move || b.charge(r, 1, s).map(drop)),
                err,
            ));
        }
        cases.push((
            format!("set_default_limits({r:?})"),
            Box::new(move || beancounter::set_default_limits(r, valid)),
            err,
        ));
        cases.push((
            format!("default_limits({r:?})"),
            Box::new(move || beancounter::default_limits(r).map(drop)),
            err,
        ));
    }
    for name in bad_names {
        cases.push((
            format!("register_resource({name:?})"),
            Box::new(move || beancounter::register_resource(name).map(drop)),
            BcError::InvalidName(name),
        ));
    }
    {
        let (a, other, deepest) = (&a, &other, deepest);
        cases.push((
            "new_child of a child of another parent".into(),
            Box::new(move || other.new_child(BcId(7002)).map(drop)),
            BcError::AlreadyExists {
                id: BcId(7002),
                parent: Some(BcId(7001)),
            },
        ));
        cases.push((
            "new_child of a top-level id".into(),
            Box::new(move || other.new_child(BcId(7100)).map(drop)),
            BcError::AlreadyExists {
                id: BcId(7100),
                parent: None,
            },
        ));
        cases.push((
            "new_child(0)".into(),
            Box::new(move || a.new_child(BcId::ROOT).map(drop)),
            BcError::InvalidId(BcId::ROOT),
        ));
        cases.push((
            "new_child past MAX_DEPTH".into(),
            Box::new(move || deepest.new_child(too_deep).map(drop)),
            BcError::TooDeep,
        ));
    }

    // Layouts Rust forbids a real allocation from having (larger than the address space can
    // hold, or aligned past what any run serves): null, with nothing charged, through every
    // `GlobalAlloc` method, for a tenant with no bounds (so only the layout can refuse).
    let block_layout = Layout::from_size_align(100, 8).unwrap();
    let block = {
        let _g = other.enter();
        // SAFETY: a non-zero-size layout.
        unsafe { HEAP.alloc(block_layout) }
    };
    assert!(!block.is_null());
    let impossible = [
        Layout::from_size_align(isize::MAX as usize - 4095, 4096).unwrap(),
        Layout::from_size_align(1 << 47, 8).unwrap(),
        Layout::from_size_align(8, 4 << 20).unwrap(),
        Layout::from_size_align(1 << 30, 1 << 30).unwrap(),
    ];
    let null = |p: *mut u8| {
        if p.is_null() {
            Err(BcError::OutOfMemory)
        } else {
            Ok(())
        }
    };
    {
        let other = &other;
        for layout in impossible {
            for zeroed in [false, true] {
                cases.push((
                    format!("alloc(zeroed: {zeroed}, {layout:?})"),
                    Box::new(move || {
                        let _g = other.enter();
                        // SAFETY: a non-zero-size layout; a non-null result would be a bug
                        // and is reported, not freed.
                        null(unsafe {
                            if zeroed {
                                HEAP.alloc_zeroed(layout)
                            } else {
                                HEAP.alloc(layout)
                            }
                        })
                    }),
                    BcError::OutOfMemory,
                ));
            }
        }
        for new_size in [isize::MAX as usize - 4095, 1 << 47] {
            cases.push((
                format!("realloc(100 B block, {new_size})"),
                Box::new(move || {
                    let _g = other.enter();
                    // SAFETY: `block` is live with `block_layout`; `new_size` rounded up to
                    // the alignment does not overflow isize. On null the block stays
                    // as it was (checked below).
                    null(unsafe { HEAP.realloc(block, block_layout, new_size) })
                }),
                BcError::OutOfMemory,
            ));
        }
    }

    // ---- run it ----------------------------------------------------------------------
    let mut failures = Vec::new();
    for (name, call, expected) in &cases {
        let before = snapshot(&bcs, &resources, &probes);
        let got = call();
        let after = snapshot(&bcs, &resources, &probes);
        if got.as_ref().err() != Some(expected) {
            failures.push(format!("{name}: expected Err({expected:?}), got {got:?}"));
        }
        if let Err(e) = &got {
            // Every error explains itself.
            assert!(!e.to_string().is_empty());
        }
        if before != after {
            failures.push(format!(
                "{name}: state changed\n  before {before:?}\n  after  {after:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert!(cases.len() > 80, "the table lost cases: {}", cases.len());
    // The block the refused reallocs were given is untouched, and still frees cleanly.
    {
        let _g = other.enter();
        // SAFETY: `block` is still live with `block_layout` (every realloc returned null).
        unsafe { HEAP.dealloc(block, block_layout) };
    }

    // The fixture is what the cases were checked against: make sure it is not trivial.
    let s = b.stat(Resource::Memory);
    assert_eq!((s.held, s.limit, s.failcnt), (30, MAX, 0));
    assert_eq!(a.stat(Resource::Memory).failcnt, 1);
    assert_eq!(beancounter::check_invariants(), Ok(()));

    // An unregistered custom resource reads as zeros through a handle (documented), and
    // has no warnings.
    assert_eq!(a.stat(unregistered), ResourceStat::default());
    assert_eq!(a.uncharge_warnings(unregistered), 0);
    // The rejected names used no custom slot: the next registration is number 1.
    assert_eq!(
        beancounter::register_resource("bad-after").unwrap(),
        Resource::Custom(1)
    );
    // A name of exactly 32 printable characters is the longest accepted.
    let longest = "x2345678901234567890123456789012";
    assert_eq!(longest.len(), 32);
    assert!(beancounter::register_resource(longest).is_ok());
}
