//! Limits and the `/proc/user_beancounters` table, with exact numbers: default limits, a
//! shop with two child beancounters, a custom `connections` resource, a `Threads` limit,
//! fallible requests refused at a child's barrier and at the parent's, and an ordinary
//! allocation that crosses a barrier without being refused.
//!
//! ```sh
//! cargo run --release --example limits_table
//! ```
//!
//! It prints each step, then the table of one snapshot (`report::snapshot()`, rendered
//! with `report::render_user_beancounters`), and asserts every number of that snapshot.
//! Blocks of 1 MiB and more are charged exactly their size (page runs and huge blocks
//! charge whole 4 KiB pages), so the `memory` rows come out in whole MiB. `cargo test` runs
//! it too.

use beancounter::report::{self, BcSnapshot};
use beancounter::{BcError, BcId, BeanAlloc, Charge, Limits, Resource, Severity, MAX};
use std::error::Error;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

#[global_allocator]
static ALLOC: BeanAlloc = BeanAlloc::new();

const MIB: u64 = 1 << 20;
const SHOP: BcId = BcId(10);
const CART: BcId = BcId(11);
const SEARCH: BcId = BcId(12);
const GUEST: BcId = BcId(13);

/// A buffer of `mib` MiB, allocated by the current tenant.
fn buffer(mib: u64) -> Vec<u8> {
    Vec::with_capacity((mib * MIB) as usize)
}

/// A buffer of `kib` KiB for the current tenant, checked against its barrier: `None` if
/// refused.
fn request(kib: u64) -> Option<Vec<u8>> {
    let mut v = Vec::new();
    beancounter::fallible(|| v.try_reserve_exact((kib << 10) as usize)).ok()?;
    Some(v)
}

fn run() -> Result<(), Box<dyn Error>> {
    // Every beancounter created from now on starts with these; bad limits change nothing.
    let defaults = Limits::new(4 * MIB, 8 * MIB)?;
    beancounter::set_default_limits(Resource::Memory, defaults)?;
    let bad = beancounter::set_default_limits(
        Resource::Memory,
        Limits {
            barrier: 9 * MIB,
            limit: 8 * MIB,
        },
    );
    println!("bad default limits: {}", bad.as_ref().unwrap_err());
    assert!(matches!(bad, Err(BcError::InvalidLimits { .. })));
    assert_eq!(beancounter::default_limits(Resource::Memory)?, defaults);

    let shop = beancounter::find_or_create(SHOP)?;
    shop.set_limits(Resource::Memory, Limits::new(6 * MIB, 16 * MIB)?)?;
    let cart = shop.new_child(CART)?;
    let search = shop.new_child(SEARCH)?;
    let guest = beancounter::find_or_create(GUEST)?;
    let conns = beancounter::register_resource("connections")?;
    shop.set_limits(conns, Limits::new(2, 3)?)?;
    cart.set_limits(Resource::Threads, Limits::new(1, 1)?)?;

    // Connections: counted explicitly. Children's charges count in the shop too.
    let mut open: Vec<Charge> = vec![
        cart.charge(conns, 1, Severity::Barrier)?,
        cart.charge(conns, 1, Severity::Barrier)?,
    ];
    let third = search.charge(conns, 1, Severity::Barrier);
    println!("3rd connection, graceful: {}", third.as_ref().unwrap_err());
    open.push(search.charge(conns, 1, Severity::Limit)?); // up to the shop's limit
    let fourth = search.charge(conns, 1, Severity::Limit);
    println!(
        "4th connection, even up to the limit: {}",
        fourth.as_ref().unwrap_err()
    );

    // Threads: spawned in the cart (its fork beancounter), while the spawn's own bookkeeping
    // is the host's (`enter_exec` changes only what is charged now).
    let release = Arc::new(AtomicBool::new(false));
    let (worker, refused_thread) = {
        let _tenant = cart.enter();
        let _host = beancounter::root().enter_exec();
        let r = release.clone();
        let worker = beancounter::thread::spawn(move || {
            while !r.load(Ordering::Acquire) {
                std::thread::park();
            }
            beancounter::current_id()
        })?;
        (worker, beancounter::thread::spawn(|| BcId::ROOT).err())
    };
    println!(
        "2nd cart thread: {}",
        refused_thread
            .as_ref()
            .map_or("spawned".into(), |e| e.to_string())
    );

    // Memory: everything allocated under a guard is charged to that tenant and its parents.
    let items = {
        let _g = cart.enter();
        buffer(1)
    };
    let index = {
        let _g = search.enter();
        buffer(3)
    };
    // Fallible requests of the cart: 5 MiB passes the cart's own barrier (1 + 5 > 4),
    // 2.5 MiB fits the cart (3.5) but not the shop (1 + 3 + 2.5 > 6), 1 MiB fits both.
    let failcnt = |bc: &beancounter::Beancounter| bc.stat(Resource::Memory).failcnt;
    let asked = {
        let _g = cart.enter();
        [5 << 10, 5 << 9, 1 << 10].map(|kib| (kib, request(kib), failcnt(&cart), failcnt(&shop)))
    };
    for (kib, got, c, s) in &asked {
        let answer = if got.is_some() { "granted" } else { "refused" };
        println!("cart asks for {kib} KiB: {answer} (failcnt: cart {c}, shop {s})");
    }
    assert_eq!(
        asked.each_ref().map(|a| a.1.is_some()),
        [false, false, true]
    );

    // An ordinary allocation is checked against the limit only: over the barrier it is
    // granted, and the tenant is flagged until it is back under.
    let (guest_data, flagged) = {
        let _g = guest.enter();
        let data = buffer(5);
        (data, beancounter::checkpoint())
    };
    println!(
        "guest after 5 MiB: {}",
        flagged
            .as_ref()
            .map_or_else(|e| e.to_string(), |_| "ok".into())
    );
    assert!(flagged.is_err_and(|e| e.id == GUEST && e.bound == 4 * MIB));

    let snap = report::snapshot();
    println!();
    print!("{}", report::render_user_beancounters(&snap));
    let (mem, threads, m) = (Resource::Memory, Resource::Threads, |mib: u64| mib * MIB);
    // held, maxheld, barrier, limit, failcnt
    let expected = [
        (SHOP, mem, [m(5), m(5), m(6), m(16), 1]),
        (CART, mem, [m(2), m(2), m(4), m(8), 1]),
        (SEARCH, mem, [m(3), m(3), m(4), m(8), 0]),
        (GUEST, mem, [m(5), m(5), m(4), m(8), 0]),
        (SHOP, Resource::Allocations, [3, 3, MAX, MAX, 0]),
        (SHOP, conns, [3, 3, 2, 3, 2]),
        (CART, conns, [2, 2, MAX, MAX, 0]),
        (SEARCH, conns, [1, 1, MAX, MAX, 0]),
        (CART, threads, [1, 1, 1, 1, 1]),
        (SHOP, threads, [1, 1, MAX, MAX, 0]),
    ];
    for (id, r, want) in expected {
        let bc: &BcSnapshot = snap
            .iter()
            .find(|b| b.id == id)
            .expect("a live beancounter");
        let s = bc.resource(r).expect("a counted resource").stat;
        assert_eq!(
            [s.held, s.maxheld, s.barrier, s.limit, s.failcnt],
            want,
            "{id} {r}"
        );
    }
    assert_eq!(
        snap.iter().find(|b| b.id == CART).and_then(|b| b.parent),
        Some(SHOP)
    );

    release.store(true, Ordering::Release);
    worker.thread().unpark();
    assert_eq!(worker.join().ok(), Some(CART), "the thread ran in the cart");
    drop((open, items, index, asked, guest_data));
    for bc in [&shop, &cart, &search, &guest] {
        assert_eq!(bc.stat(Resource::Memory).held, 0, "{}: all freed", bc.id());
        assert_eq!(bc.stat(conns).held + bc.stat(threads).held, 0);
    }
    println!("\nok: every number as expected; all given back");
    Ok(())
}

fn main() -> Result<(), Box<dyn Error>> {
    run()
}

#[cfg(test)]
mod tests {
    #[test]
    fn numbers_as_expected() {
        super::run().unwrap();
    }
}
