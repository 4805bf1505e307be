//! Unit tests of the registry on small private tables.

use super::*;
use crate::accounting::types::{Resource, Severity};

/// Creates and frees ids in a scrambled order on a small private registry, so that the
/// id map sees long probe chains, wrap-around and backward-shift deletions; after every
/// step each live id must still be found and every invariant hold.
#[test]
fn map_survives_scrambled_create_and_free() {
    let reg = Registry::new(64);
    let mut live: Vec<(u32, u32)> = Vec::new();
    let mut x = 0x2545_F491_u32;
    for step in 0..4000 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        // Ids in a narrow range collide often; multiples of 64 share a home slot.
        let id = 1 + (x % 96) * if step % 3 == 0 { 64 } else { 1 };
        if let Some(pos) = live.iter().position(|&(i, _)| i == id) {
            let (_, index) = live.swap_remove(pos);
            reg.release(index);
            assert_eq!(reg.lookup(BcId(id)), None, "freed id {id} still found");
        } else {
            match reg.find_or_create(BcId(id), None) {
                Ok(index) => live.push((id, index)),
                Err(BcError::TableFull) => assert_eq!(live.len(), 63),
                Err(e) => panic!("{e:?}"),
            }
        }
        for &(id, index) in &live {
            let found = reg.lookup(BcId(id));
            assert_eq!(found, Some(index), "live id {id} lost at step {step}");
            reg.release(index);
        }
        if step % 40 == 0 {
            reg.check_invariants().unwrap();
        }
        assert_eq!(reg.live() as usize, live.len());
    }
}

#[test]
fn capacity_parsing_rejects_what_it_cannot_use() {
    assert_eq!(parse_capacity(b"65536"), Some(65536));
    assert_eq!(parse_capacity(b"2"), Some(2));
    for bad in [
        &b""[..],
        b"1",
        b"0",
        b"-5",
        b"12a",
        b"16777217",
        b"9999999999",
    ] {
        assert_eq!(parse_capacity(bad), None, "{:?}", core::str::from_utf8(bad));
    }
}

#[test]
fn children_keep_parents_and_free_up_the_chain() {
    let reg = Registry::new(8);
    let top = reg.find_or_create(BcId(1), None).unwrap();
    let mid = reg.find_or_create(BcId(2), Some(top)).unwrap();
    let leaf = reg.find_or_create(BcId(3), Some(mid)).unwrap();
    reg.release(top);
    reg.release(mid);
    assert_eq!(reg.live(), 3, "a child keeps its ancestors");
    reg.charge(leaf, Resource::Memory, 0, 5, Severity::Limit)
        .unwrap();
    reg.release(leaf);
    assert_eq!(
        reg.live(),
        3,
        "a charged leaf is a zombie, and keeps its ancestors"
    );
    assert_eq!(reg.reap(), 0);
    reg.uncharge(leaf, 0, 5);
    assert_eq!(
        reg.reap(),
        3,
        "reaping the leaf frees its ancestors through it"
    );
    assert_eq!(reg.live(), 0);
    reg.check_invariants().unwrap();
}

/// A hazard keeps a record whose last reference is released; leaving the hazard frees it,
/// and a reference taken meanwhile (as `current()` inside a guard does) keeps it longer.
#[test]
fn a_hazard_defers_the_free_to_its_thread() {
    let reg = Registry::new(8);
    let slot = reg.claim_hazards().expect("a hazard slot");
    let t = reg.find_or_create(BcId(1), None).unwrap();
    reg.set_hazard(slot, 0, t);
    reg.release(t);
    assert_eq!(reg.live(), 1, "freed under a hazard");
    assert_eq!(reg.id_of(t), BcId(1));
    assert_eq!(reg.hazard_at(slot, 0) & !(1 << 31), t);
    assert_ne!(
        reg.hazard_at(slot, 0),
        t,
        "the release did not mark the hazard deferred"
    );
    // A reference taken under the hazard, from a count of zero.
    reg.retain(t);
    reg.clear_hazard(slot, 0);
    assert_eq!(reg.live(), 1, "freed with a reference");
    assert_eq!(reg.hazard_at(slot, 0), 0);
    reg.release(t);
    assert_eq!(
        reg.live(),
        0,
        "not freed by the last release after the hazard left"
    );

    // A hazard the release never saw: the release frees, and leaving does nothing more.
    let u = reg.find_or_create(BcId(2), None).unwrap();
    reg.set_hazard(slot, 1, u);
    reg.clear_hazard(slot, 1);
    reg.release(u);
    assert_eq!(reg.live(), 0);

    // A hazard on a zombie is not marked: its free is `reap`'s, once it is uncharged.
    let z = reg.find_or_create(BcId(3), None).unwrap();
    reg.charge(z, Resource::Memory, 0, 5, Severity::Limit)
        .unwrap();
    reg.set_hazard(slot, 0, z);
    reg.release(z);
    assert_eq!(reg.hazard_at(slot, 0), z, "a zombie's hazard was marked");
    reg.clear_hazard(slot, 0);
    reg.uncharge(z, 0, 5);
    assert_eq!(reg.reap(), 1);

    // A slot given back clears what it holds and can be claimed again.
    let v = reg.find_or_create(BcId(4), None).unwrap();
    reg.set_hazard(slot, 2, v);
    reg.release(v);
    assert_eq!(reg.live(), 1);
    reg.release_hazards(slot);
    assert_eq!(reg.live(), 0, "a released slot's deferred free was lost");
    assert_eq!(reg.claim_hazards(), Some(slot));
    reg.check_invariants().unwrap();
}

/// Slots are claimed once each until given back.
#[test]
fn hazard_slots_are_claimed_once() {
    let reg = Registry::new(4);
    let a = reg.claim_hazards().unwrap();
    let b = reg.claim_hazards().unwrap();
    assert_ne!(a, b);
    reg.release_hazards(a);
    assert_eq!(reg.claim_hazards(), Some(a));
}
