//! `beancounter::tokio::{spawn, spawn_blocking}` on a two-worker multi-thread runtime: a
//! task, the tasks it spawns and the closures it sends to the blocking pool all run in the
//! spawner's fork beancounter, whichever worker polls them, and what they allocate is charged
//! there (checked with `stat()`); a plain `tokio::spawn` runs where the worker runs.
//!
//! Every check holds the memory it measures while it reads `stat()`, so none depends on
//! timing; buffers are 32 KiB multiples (a size class of its own, so charged exactly).

mod common;

use beancounter::{BcId, BeanAlloc};
use common::tasks::{hopping_chunks, runtime, CHUNK, CHUNKS, TASK_BYTES};
use common::{memory, Runner};

#[global_allocator]
static ALLOC: BeanAlloc = BeanAlloc::new();

/// A "request handler" spawned through the crate from inside tenant 400 allocates, spawns
/// subtasks (one of which spawns a subtask of its own) and a blocking job, all through the
/// crate: every one runs in tenant 400 and everything they return is charged to it. Once it
/// is freed, the tenant holds (almost) nothing again.
fn handler_and_its_subtasks_charge_the_spawning_tenant() {
    const T: BcId = BcId(400);
    const SUBTASKS: usize = 4;
    let tenant = common::tenant(T.0);
    let rt = runtime();
    let _rt = rt.enter();
    let before = memory(&tenant);
    let handler = {
        let _g = tenant.enter(); // as a request in tenant 400
        beancounter::tokio::spawn(async {
            let mut held = vec![hopping_chunks(T).await];
            let subtasks: Vec<_> = (0..SUBTASKS)
                .map(|i| {
                    beancounter::tokio::spawn(async move {
                        let mut mine = hopping_chunks(T).await;
                        if i == 0 {
                            // A subtask of a subtask inherits in turn.
                            let nested = beancounter::tokio::spawn(hopping_chunks(T));
                            mine.extend(nested.await.unwrap());
                        }
                        mine
                    })
                })
                .collect();
            let blocking = beancounter::tokio::spawn_blocking(|| {
                assert_eq!(
                    beancounter::current_id(),
                    T,
                    "blocking job outside the tenant"
                );
                (0..CHUNKS)
                    .map(|i| vec![i as u8; CHUNK])
                    .collect::<Vec<_>>()
            });
            for s in subtasks {
                held.push(s.await.unwrap());
            }
            held.push(blocking.await.unwrap());
            held
        })
    };
    let held = rt.block_on(handler).expect("the handler panicked");
    // The handler, SUBTASKS subtasks, the nested one and the blocking job.
    let tasks = 1 + SUBTASKS as u64 + 1 + 1;
    let total: usize = held.iter().flatten().map(Vec::len).sum();
    assert_eq!(total as u64, tasks * TASK_BYTES);
    let now = memory(&tenant) - before;
    assert!(
        now >= tasks * TASK_BYTES,
        "tenant charged {now} bytes for {tasks} x {TASK_BYTES} allocated by its tasks"
    );
    drop(held);
    drop(_rt);
    drop(rt); // the blocking pool's thread, started from inside the tenant, exits
    let after = memory(&tenant);
    assert!(
        after < before + CHUNK as u64,
        "tenant holds {after} bytes (before: {before}) once its tasks' memory is freed"
    );
}

/// A plain `tokio::spawn` from inside a tenant's task runs where the worker runs: the root
/// for a default runtime (its memory is not the tenant's), the adopted tenant for a runtime
/// whose workers adopted one. A task spawned through the crate from the host runs in the
/// root even there.
fn plain_tokio_spawn_runs_where_the_worker_runs() {
    const T: BcId = BcId(401);
    const W: BcId = BcId(402);
    let tenant = common::tenant(T.0);
    let rt = runtime();
    let _rt = rt.enter();
    let task = {
        let _g = tenant.enter();
        beancounter::tokio::spawn(async {
            let before = memory(&beancounter::current());
            let (id, chunks) = tokio::spawn(async {
                let chunks = hopping_chunks(BcId::ROOT).await;
                (beancounter::current_id(), chunks)
            })
            .await
            .unwrap();
            let grew = memory(&beancounter::current()).saturating_sub(before);
            (id, chunks, grew)
        })
    };
    let (id, chunks, grew) = rt.block_on(task).unwrap();
    assert_eq!(
        id,
        BcId::ROOT,
        "a plain tokio::spawn runs in the worker's root"
    );
    assert!(
        grew < TASK_BYTES,
        "the plain task's {TASK_BYTES} bytes were charged to the spawning tenant ({grew})"
    );
    drop(chunks);
    drop(_rt);
    drop(rt);

    let worker_tenant = common::tenant(W.0);
    let adopted = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .on_thread_start(move || worker_tenant.adopt())
        .build()
        .unwrap();
    let (plain, ours) = adopted.block_on(async {
        let plain = tokio::spawn(async { beancounter::current_id() });
        let ours = beancounter::tokio::spawn(async { beancounter::current_id() });
        (plain.await.unwrap(), ours.await.unwrap())
    });
    assert_eq!(
        plain, W,
        "a plain task runs in the tenant its worker adopted"
    );
    assert_eq!(
        ours,
        BcId::ROOT,
        "a task spawned by the host stays in the root"
    );
}

/// The spawned task starts in the *fork* beancounter, as threads do: `enter_exec` charges
/// someone else without changing what children inherit.
fn spawn_follows_the_fork_beancounter() {
    let fork = common::tenant(403);
    let exec = common::tenant(404);
    let rt = runtime();
    let _rt = rt.enter();
    let (task, job) = {
        let _f = fork.enter();
        let _e = exec.enter_exec();
        assert_eq!(beancounter::current_id(), BcId(404));
        (
            beancounter::tokio::spawn(async { beancounter::current_id() }),
            beancounter::tokio::spawn_blocking(beancounter::current_id),
        )
    };
    assert_eq!(rt.block_on(task).unwrap(), BcId(403));
    assert_eq!(rt.block_on(job).unwrap(), BcId(403));
}

fn main() {
    let mut r = Runner::new();
    r.check(
        "handler_and_its_subtasks_charge_the_spawning_tenant",
        handler_and_its_subtasks_charge_the_spawning_tenant,
    );
    r.check(
        "plain_tokio_spawn_runs_where_the_worker_runs",
        plain_tokio_spawn_runs_where_the_worker_runs,
    );
    r.check(
        "spawn_follows_the_fork_beancounter",
        spawn_follows_the_fork_beancounter,
    );
    r.finish();
}
