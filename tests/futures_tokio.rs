//! Futures carry their tenant across the worker threads of a tokio multi-thread runtime:
//! what they allocate is charged to their tenant whichever worker polls them, and a guarded
//! future of a tenant that blows its barrier ends with `Err` while other tenants finish.

mod common;

use beancounter::{BcId, BeanAlloc, FutureExt, Limits, Resource};
use common::tasks::runtime;
use common::Runner;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[global_allocator]
static ALLOC: BeanAlloc = BeanAlloc::new();

/// 32 tasks of one tenant each hold 64 KiB across many awaits, hopping between workers;
/// while they all hold their buffers the tenant's true usage covers all of them, and once
/// they are done it is back to zero (stocks of the workers excluded by `stat`).
///
/// Which worker polls a task is the scheduler's choice: on a loaded machine one worker may
/// run everything. The scenario is repeated until the tasks were seen on both workers.
fn allocations_follow_the_future_across_workers() {
    let spread = (0..20).any(|_| tasks_on_workers() >= 2);
    assert!(spread, "in 20 runs, the tasks never ran on both workers");
}

/// One run of [`allocations_follow_the_future_across_workers`]; returns how many worker
/// threads polled the tasks.
fn tasks_on_workers() -> usize {
    const TASKS: usize = 32;
    const BYTES: usize = 64 << 10;
    let tenant = beancounter::find_or_create(BcId(300)).unwrap();
    let rt = runtime();
    let threads = Arc::new(Mutex::new(HashSet::new()));
    let all_hold = Arc::new(tokio::sync::Barrier::new(TASKS + 1));
    // Closed until the peak is measured; tasks wait on it after the barrier.
    let gate = Arc::new(tokio::sync::RwLock::new(()));
    let peak = rt.block_on(async {
        let closed = gate.clone().write_owned().await;
        let mut handles = Vec::new();
        for _ in 0..TASKS {
            let (threads, all_hold, gate) = (threads.clone(), all_hold.clone(), gate.clone());
            let fut = async move {
                let mut buf = Vec::with_capacity(BYTES);
                for i in 0..20u8 {
                    threads.lock().unwrap().insert(std::thread::current().id());
                    buf.push(i);
                    // Keep this worker busy a moment, so the other one steals tasks.
                    std::thread::sleep(Duration::from_micros(100));
                    tokio::task::yield_now().await;
                }
                buf.resize(BYTES, 1);
                all_hold.wait().await;
                drop(gate.read().await);
                assert_eq!(beancounter::current_id(), BcId(300));
                buf.len()
            };
            handles.push(tokio::spawn(fut.in_beancounter(&tenant)));
        }
        all_hold.wait().await;
        let peak = tenant.stat(Resource::Memory).held;
        drop(closed);
        for h in handles {
            assert_eq!(h.await.unwrap(), BYTES);
        }
        peak
    });
    assert!(
        peak >= (TASKS * BYTES) as u64,
        "tenant held {peak} with {TASKS} x {BYTES} live"
    );
    let workers = threads.lock().unwrap().len();
    drop(rt);
    let after = tenant.stat(Resource::Memory);
    assert!(
        after.held < BYTES as u64,
        "tenant still holds {} after its futures ended",
        after.held
    );
    workers
}

/// A tenant whose futures grow past its barrier has them stopped with `Err(Exceeded)` at
/// their next poll (their memory freed with them); another tenant's futures complete.
fn guarded_futures_stop_at_the_barrier() {
    let noisy = beancounter::find_or_create(BcId(301)).unwrap();
    let calm = beancounter::find_or_create(BcId(302)).unwrap();
    noisy
        .set_limits(Resource::Memory, Limits::new(1 << 20, 64 << 20).unwrap())
        .unwrap();
    calm.set_limits(Resource::Memory, Limits::new(1 << 20, 64 << 20).unwrap())
        .unwrap();
    let rt = runtime();
    let (noisy_results, calm_results) = rt.block_on(async {
        let grow = |step: usize, steps: usize| async move {
            let mut chunks = Vec::new();
            for _ in 0..steps {
                chunks.push(vec![7u8; step]);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            chunks.len()
        };
        let noisy_tasks: Vec<_> = (0..4)
            .map(|_| tokio::spawn(grow(256 << 10, 64).guarded(&noisy)))
            .collect();
        let calm_tasks: Vec<_> = (0..4)
            .map(|_| tokio::spawn(grow(4 << 10, 16).guarded(&calm)))
            .collect();
        let mut n = Vec::new();
        for t in noisy_tasks {
            n.push(t.await.unwrap());
        }
        let mut c = Vec::new();
        for t in calm_tasks {
            c.push(t.await.unwrap());
        }
        (n, c)
    });
    for r in &noisy_results {
        let e = r
            .as_ref()
            .expect_err("a noisy future past its barrier must be stopped");
        assert_eq!(
            (e.id, e.resource, e.bound),
            (BcId(301), Resource::Memory, 1 << 20)
        );
    }
    assert!(
        calm_results
            .iter()
            .all(|r| r.as_ref().is_ok_and(|&n| n == 16)),
        "{calm_results:?}"
    );
    drop(rt);
    assert!(
        noisy.stat(Resource::Memory).held < 1 << 20,
        "stopped futures freed their memory"
    );
    assert!(noisy.events(Resource::Memory).barrier_crossings >= 1);
}

fn main() {
    let mut r = Runner::new();
    r.check(
        "allocations_follow_the_future_across_workers",
        allocations_follow_the_future_across_workers,
    );
    r.check(
        "guarded_futures_stop_at_the_barrier",
        guarded_futures_stop_at_the_barrier,
    );
    r.finish();
}
