//! Tokio tasks that start in the spawner's tenant and keep it, whichever worker polls them.
//!
//! `tokio::spawn` starts a task with nothing of the spawner's context: the task runs in
//! whatever tenant the worker thread runs for (the root, unless the worker adopted one). The
//! wrappers here capture the spawning context's *fork* beancounter, as
//! [`thread::spawn`](crate::thread::spawn) does for threads, and attach it with
//! [`FutureExt::in_beancounter`]: every poll and the drop of the task enter it, so a task
//! spawned from inside such a task (or from a request run by the tower layer) inherits in turn.

use crate::accounting::context;
use crate::{Beancounter, ExecGuard, FutureExt};
use ::tokio::task::JoinHandle;
use core::future::Future;

/// Enters `fork` as exec beancounter too unless it already is: the memory tokio takes for the
/// task itself (its cell, the future's state) is charged to the task's tenant. The caller's
/// `fork` outlives the guard, which borrows its reference.
fn enter_for_spawn(fork: &Beancounter) -> Option<ExecGuard> {
    (context::exec_index() != fork.index()).then(|| fork.enter_lent())
}

/// Spawns `future` on the current tokio runtime, like [`tokio::spawn`], in the
/// spawning context's fork beancounter: every poll of the task, and its drop, run inside that
/// beancounter (as exec and fork), whichever worker thread polls it. What the task allocates
/// is charged there, and tasks it spawns with this function start there too.
///
/// The task's own memory (tokio's task cell, which holds the future) is charged to the same
/// beancounter. Spawned from the host (outside any tenant) the task runs in the root, even on
/// a worker that [adopted](crate::Beancounter::adopt) a tenant.
///
/// # Panics
/// As `tokio::spawn`: when called outside a tokio runtime.
///
/// # Examples
/// ```
/// #[global_allocator]
/// static A: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
/// # fn main() {
/// use beancounter::{BcId, Resource};
/// let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
/// let tenant = beancounter::find_or_create(BcId(60)).unwrap();
/// let (id, bytes) = rt.block_on(async {
///     let guard = tenant.enter(); // a request handler would be inside its tenant already
///     let task = beancounter::tokio::spawn(async {
///         tokio::task::yield_now().await; // maybe resumed on the other worker: still inside
///         // A subtask spawned from here inherits the tenant in turn:
///         let sub = beancounter::tokio::spawn(async { vec![1u8; 1 << 20] });
///         (beancounter::current_id(), sub.await.unwrap())
///     });
///     drop(guard); // guards belong to a thread: never hold one across an `.await`
///     task.await.unwrap()
/// });
/// assert_eq!(id, BcId(60));
/// assert!(tenant.stat(Resource::Memory).held >= 1 << 20); // the subtask's vector
/// drop(bytes);
/// # }
/// ```
pub fn spawn<F>(future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let fork = context::fork();
    let _in_fork = enter_for_spawn(&fork);
    ::tokio::task::spawn(future.in_beancounter(&fork))
}

/// Runs `f` on tokio's blocking thread pool, like
/// [`tokio::task::spawn_blocking`], entered into the spawning
/// context's fork beancounter (as exec and fork) for as long as it runs: what it allocates is
/// charged there, and threads or tasks it spawns through this crate start there.
///
/// The pool's threads are tokio's: they are not charged to `Threads` (unlike
/// [`thread::spawn`](crate::thread::spawn)), and they go back to where they were after `f`.
/// When tokio starts a new pool thread for `f`, it does so in this call, inside the fork
/// beancounter: what it allocates for that thread is charged there too, until the thread
/// exits.
///
/// # Panics
/// As `tokio::task::spawn_blocking`: when called outside a tokio runtime.
///
/// # Examples
/// ```
/// #[global_allocator]
/// static A: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
/// # fn main() {
/// use beancounter::{BcId, Resource};
/// let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).build().unwrap();
/// let tenant = beancounter::find_or_create(BcId(61)).unwrap();
/// let _rt = rt.enter(); // spawn from this thread onto the runtime
/// let guard = tenant.enter();
/// let job = beancounter::tokio::spawn_blocking(|| {
///     let parsed: Vec<u64> = (0..100_000).collect(); // a CPU-bound job, 800 KB
///     (beancounter::current_id(), parsed)
/// });
/// drop(guard);
/// let (id, parsed) = rt.block_on(job).unwrap();
/// assert_eq!(id, BcId(61));
/// assert!(tenant.stat(Resource::Memory).held >= 800_000);
/// drop(parsed);
/// # }
/// ```
pub fn spawn_blocking<F, R>(f: F) -> JoinHandle<R>
where
    F: FnOnce() -> R + Send + 'static,
    R: Send + 'static,
{
    let fork = context::fork();
    let _in_fork = enter_for_spawn(&fork);
    let tenant = fork.clone();
    ::tokio::task::spawn_blocking(move || tenant.in_scope(f))
}
