//! Two tenants with limits, work under guards, threads that inherit their tenant, and the
//! counters printed at the end.
//!
//! The allocator (`#[global_allocator]`) is not part of the crate yet; this demo counts
//! resources explicitly, the way a host counts connections or worker threads per tenant.

use beancounter::{BcError, BcId, Limits, Resource, Severity};
use std::sync::{Arc, RwLock};

fn main() -> Result<(), BcError> {
    let connections = beancounter::register_resource("connections")?;

    let alice = beancounter::find_or_create(BcId(1))?;
    let bob = beancounter::find_or_create(BcId(2))?;
    // Alice may hold 3 connections gracefully and 4 at most; Bob gets 2 threads.
    alice.set_limits(connections, Limits::new(3, 4)?)?;
    bob.set_limits(Resource::Threads, Limits::new(2, 2)?)?;

    // A request handler works for Alice: graceful requests stop at the barrier.
    let mut open = Vec::new();
    {
        let _g = alice.enter();
        assert_eq!(beancounter::current_id(), BcId(1));
        for _ in 0..5 {
            match beancounter::current().charge(connections, 1, Severity::Barrier) {
                Ok(c) => open.push(c),
                Err(e) => println!("alice: refused: {e}"),
            }
        }
    }
    assert_eq!(open.len(), 3);

    // Threads spawned under Bob's guard start in Bob and count against his Threads limit.
    // They wait at the gate until all three were tried, so all run at once.
    let gate = Arc::new(RwLock::new(()));
    let closed = gate.write().unwrap();
    let _g = bob.enter();
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let gate = gate.clone();
            beancounter::thread::spawn(move || {
                drop(gate.read().unwrap());
                beancounter::current_id()
            })
        })
        .collect();
    drop(closed);
    let refused = workers.iter().filter(|w| w.is_err()).count();
    assert_eq!(refused, 1);
    for w in workers.into_iter().flatten() {
        assert_eq!(w.join().unwrap(), BcId(2));
    }
    println!("bob: {refused} thread(s) refused by his Threads limit");

    println!(
        "{:>4} {:<12} {:>5} {:>7} {:>7} {:>7} {:>7}",
        "id", "resource", "held", "maxheld", "barrier", "limit", "failcnt"
    );
    for bc in [&alice, &bob] {
        for r in [connections, Resource::Threads] {
            let s = bc.stat(r);
            println!(
                "{:>4} {:<12} {:>5} {:>7} {:>7} {:>7} {:>7}",
                bc.id().to_string(),
                r.to_string(),
                s.held,
                s.maxheld,
                s.barrier,
                s.limit,
                s.failcnt
            );
        }
    }
    assert_eq!(alice.stat(connections).failcnt, 2);
    drop(open);
    assert_eq!(alice.stat(connections).held, 0);
    Ok(())
}
