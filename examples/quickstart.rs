//! Two tenants with memory limits share one process: work runs under each tenant's guard,
//! every allocation is charged to the tenant it runs for, and one tenant's overreach is
//! refused without touching the other.

use beancounter::{BcId, BeanAlloc, Limits, Resource};

#[global_allocator]
static ALLOC: BeanAlloc = BeanAlloc::new();

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let alice = beancounter::find_or_create(BcId(1))?;
    let bob = beancounter::find_or_create(BcId(2))?;
    alice.set_limits(Resource::Memory, Limits::new(8 << 20, 8 << 20)?)?;
    bob.set_limits(Resource::Memory, Limits::new(1 << 20, 1 << 20)?)?;

    // Alice builds a 4 MiB table: charged to her, well within her limit.
    let table = {
        let _g = alice.enter();
        vec![7u64; 512 << 10]
    };

    // Bob tries to reserve 16 MiB: his limit refuses it, and only his request fails.
    let refused = {
        let _g = bob.enter();
        let mut v: Vec<u8> = Vec::new();
        v.try_reserve(16 << 20).is_err()
    };
    assert!(refused, "bob's limit must refuse 16 MiB");

    // Threads spawned under a guard start in the same tenant.
    let worker = {
        let _g = bob.enter();
        beancounter::thread::spawn(|| {
            let names: Vec<String> = (0..1000).map(|i| format!("bob-{i}")).collect();
            names.len()
        })?
    };
    assert_eq!(worker.join().unwrap_or(0), 1000);

    println!(
        "{:>3} {:<12} {:>10} {:>10} {:>10} {:>8}",
        "id", "resource", "held", "maxheld", "limit", "failcnt"
    );
    for bc in [&alice, &bob] {
        for r in [Resource::Memory, Resource::Allocations] {
            let s = bc.stat(r);
            println!(
                "{:>3} {:<12} {:>10} {:>10} {:>10} {:>8}",
                bc.id().to_string(),
                r.to_string(),
                s.held,
                s.maxheld,
                if s.limit == beancounter::MAX {
                    "-".to_string()
                } else {
                    s.limit.to_string()
                },
                s.failcnt
            );
        }
    }
    let a = alice.stat(Resource::Memory);
    assert!(a.held >= 4 << 20 && a.held <= 8 << 20);
    assert_eq!(bob.stat(Resource::Memory).failcnt, 1);
    drop(table);
    assert!(
        alice.stat(Resource::Memory).held < 4 << 20,
        "freeing uncharges alice"
    );
    Ok(())
}
