//! Futures: a small executor of two threads, and tasks that allocate for their tenant across
//! them through `in_beancounter` and `guarded`.
//!
//! The queue is reserved up front and every task is in it at most once, so waking a task
//! (which happens inside its poll, in its tenant) never allocates: what the executor and the
//! tasks' frames cost is charged to the root, where they are made.

use crate::common::Rng;
use crate::model::{fail, Block, Count, How, Shared, KIB};
use beancounter::FutureExt;
use std::cell::Cell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

/// Executor threads.
pub const EXECUTORS: usize = 2;
/// Tasks alive at once at most.
const MAX_TASKS: usize = 32;
/// Blocks a task holds at most.
const BAG: usize = 16;

type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

struct Task {
    job: Mutex<Option<Job>>,
    queued: AtomicBool,
    /// Bit `i`: executor `i` polled it.
    seen: AtomicU8,
}

static QUEUE: Mutex<VecDeque<Arc<Task>>> = Mutex::new(VecDeque::new());
static LIVE: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static EXECUTOR: Cell<u8> = const { Cell::new(0) };
}

/// Reserves the queue; call before any task exists.
pub fn init() {
    QUEUE.lock().unwrap().reserve(2 * MAX_TASKS);
}

fn push(task: Arc<Task>) {
    let mut q = QUEUE.lock().unwrap();
    if q.len() == q.capacity() {
        fail!("the task queue would grow (and allocate in a tenant)");
    }
    q.push_back(task);
}

impl Wake for Task {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.queued.swap(true, SeqCst) {
            push(self.clone());
        }
    }
}

/// Ready on its second poll, after waking itself: the task goes back to the queue, and the
/// other executor may take it.
struct YieldNow(bool);

impl Future for YieldNow {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

/// A task's blocks; freed when the task ends or is dropped, which happens inside its tenant
/// (`in_beancounter` and `guarded` drop the inner future there).
struct Bag {
    sh: Arc<Shared>,
    t: usize,
    /// The incarnation of `t` the task runs in (retired meanwhile, it charges the parent).
    inc: u64,
    blocks: Vec<Block>,
}

impl Drop for Bag {
    fn drop(&mut self) {
        let id = self.sh.tree.nodes[self.t].id;
        if beancounter::current_id() != id {
            fail!("a task of {id} was dropped outside its tenant");
        }
        for b in self.blocks.drain(..) {
            self.sh.free(b);
        }
    }
}

/// The task's work: a few steps, each checking that the task runs in its tenant, then
/// allocating, freeing, reserving fallibly, or sending a block to a worker, and yielding.
async fn work(mut bag: Bag, seed: u64) {
    let mut rng = Rng::new(seed);
    let (sh, t, inc) = (bag.sh.clone(), bag.t, bag.inc);
    for _ in 0..4 + rng.below(24) {
        if beancounter::current_id() != sh.tree.nodes[t].id {
            fail!(
                "a task of {} was polled in {}",
                sh.tree.nodes[t].id,
                beancounter::current_id()
            );
        }
        let room = bag.blocks.len() < BAG;
        let largest = if rng.below(8) == 0 { 96 * KIB } else { 512 };
        let size = 1 + rng.below(largest as u64) as usize;
        match rng.below(8) {
            0..=2 if room => {
                let layout = std::alloc::Layout::from_size_align(size, 8).unwrap();
                bag.blocks.extend(sh.alloc(t, inc, layout, How::Plain));
            }
            3 if room => bag.blocks.extend(sh.try_reserve(t, inc, size)),
            4 if !bag.blocks.is_empty() => {
                let b = bag.blocks.swap_remove(0);
                sh.send(rng.below(sh.inboxes.len() as u64) as usize, b);
            }
            _ => {
                if let Some(b) = bag.blocks.pop() {
                    sh.free(b);
                }
            }
        }
        YieldNow(false).await;
    }
}

/// Starts a task for tenant `t` if fewer than [`MAX_TASKS`] are alive. Call in the root.
pub fn spawn(sh: &Arc<Shared>, t: usize, seed: u64) {
    if LIVE
        .fetch_update(SeqCst, SeqCst, |n| (n < MAX_TASKS).then_some(n + 1))
        .is_err()
    {
        return;
    }
    let (bc, inc) = sh.tree.nodes[t].current();
    let bag = Bag {
        sh: sh.clone(),
        t,
        inc,
        blocks: Vec::with_capacity(BAG),
    };
    let sh = sh.clone();
    let job: Job = if seed % 2 == 0 {
        sh.tally.add(Count::TasksInBeancounter, 1);
        Box::pin(async move {
            work(bag, seed).in_beancounter(&bc).await;
            sh.tally.add(Count::TasksDone, 1);
        })
    } else {
        sh.tally.add(Count::TasksGuarded, 1);
        Box::pin(async move {
            match work(bag, seed).guarded(&bc).await {
                Ok(()) => sh.tally.add(Count::TasksDone, 1),
                Err(e) => {
                    // Stopped: the tenant, or an ancestor, was over its barrier.
                    let chain_ids: Vec<_> = sh.tree.chain(t).map(|u| sh.tree.nodes[u].id).collect();
                    if !chain_ids.contains(&e.id) || e.held <= e.bound {
                        fail!("a guarded task of {} stopped with {e:?}", bc.id());
                    }
                    sh.tally.add(Count::GuardedStopped, 1);
                }
            }
        })
    };
    push(Arc::new(Task {
        job: Mutex::new(Some(job)),
        queued: AtomicBool::new(true),
        seen: AtomicU8::new(0),
    }));
}

fn run(task: &Arc<Task>, sh: &Shared) {
    task.queued.store(false, SeqCst);
    let mut job = task.job.lock().unwrap();
    let Some(fut) = job.as_mut() else {
        return;
    };
    task.seen.fetch_or(1 << EXECUTOR.get(), Relaxed);
    let waker = Waker::from(task.clone());
    if fut
        .as_mut()
        .poll(&mut Context::from_waker(&waker))
        .is_ready()
    {
        *job = None;
        if task.seen.load(Relaxed).count_ones() > 1 {
            sh.tally.add(Count::TasksMigrated, 1);
        }
        LIVE.fetch_sub(1, SeqCst);
    }
}

/// Executor thread `me`: polls tasks until the workers are gone and no task is left.
pub fn executor(sh: Arc<Shared>, me: u8) {
    EXECUTOR.set(me);
    loop {
        sh.gate.poll(|_| {});
        let next = QUEUE.lock().unwrap().pop_front();
        match next {
            Some(task) => run(&task, &sh),
            None if sh.tasks_closed.load(SeqCst) && LIVE.load(SeqCst) == 0 => return,
            None => std::thread::sleep(Duration::from_micros(200)),
        }
    }
}

/// Tasks alive now.
pub fn live() -> usize {
    LIVE.load(SeqCst)
}
