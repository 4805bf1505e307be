//! Worker threads: the operation stream of one slot, and the short helper threads a worker
//! starts and joins.
//!
//! A worker lives for a random number of operations, then frees half of its blocks and hands
//! the rest, with its inbox, to the next thread of its slot (the coordinator spawns it, with
//! the crate's spawn wrapper or with plain `std::thread`). Everything it does for the harness
//! is charged to the root: it runs under a root guard, and takes an exec-only root guard for
//! bookkeeping while a tenant guard is active.

use crate::common::Rng;
use crate::model::{fail, random_layout, random_size, spawn_thread};
use crate::model::{Block, Count, How, Shared, Zone, KIB, MIB};
use beancounter::{BcId, ExecGuard};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};

/// Worker slots: threads running operation streams at any time.
pub const SLOTS: usize = 8;
/// Blocks a worker holds at most.
pub const MAX_LIVE: usize = 512;

/// What a slot keeps from one worker thread to the next.
pub struct Slot {
    pub index: usize,
    pub rng: Rng,
    pub live: Vec<Block>,
    pub inbox: Receiver<Block>,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Alloc,
    AllocZeroed,
    Free,
    Send,
    Receive,
    Realloc,
    Fallible,
    Forced,
    Helper,
    Task,
}

/// The operation mix, `(weight, op)`: allocations and frees balance, one in eight blocks
/// crosses to another thread, and the rare kinds (helpers, tasks) still come by the
/// thousand in a run.
const OPS: [(u64, Op); 10] = [
    (2_900, Op::Alloc),
    (250, Op::AllocZeroed),
    (2_300, Op::Free),
    (1_100, Op::Send),
    (900, Op::Receive),
    (1_000, Op::Realloc),
    (250, Op::Fallible),
    (80, Op::Forced),
    (4, Op::Helper),
    (40, Op::Task),
];
/// One operation in this many switches tenant.
const SWITCH_EVERY: u64 = 48;

struct Worker {
    sh: Arc<Shared>,
    slot: Slot,
    /// The tenant the crate's spawn wrapper started this thread in.
    fork: Option<usize>,
    /// The tenant charged now, the incarnation of the handle entered (which may be retired
    /// meanwhile: the thread then charges its parent), and the guard that made it so.
    cur: usize,
    inc: u64,
    guard: Option<ExecGuard>,
}

/// Runs one worker thread of `slot` for at most `budget` operations; returns the slot for
/// the next one.
pub fn run(sh: Arc<Shared>, slot: Slot, fork: Option<usize>, budget: u64) -> Slot {
    let started = beancounter::current_id();
    let want = fork.map_or(BcId::ROOT, |t| sh.tree.nodes[t].id);
    if started != want {
        fail!("worker {} started in {started}, not {want}", slot.index);
    }
    let _home = beancounter::root().enter();
    let mut w = Worker {
        sh,
        slot,
        fork,
        cur: 0,
        inc: 0,
        guard: None,
    };
    w.switch();
    for _ in 0..budget {
        if w.sh.stop.load(std::sync::atomic::Ordering::Relaxed) {
            break;
        }
        w.sh.gate.poll(|deep| w.rest(deep));
        w.step();
    }
    w.retire()
}

impl Worker {
    fn rng(&mut self) -> &mut Rng {
        &mut self.slot.rng
    }

    fn pick_live(&mut self) -> Block {
        let n = self.slot.live.len() as u64;
        let i = self.rng().below(n) as usize;
        self.slot.live.swap_remove(i)
    }

    fn keep_or_free(&mut self, b: Block) {
        if self.slot.live.len() < MAX_LIVE {
            self.slot.live.push(b);
        } else {
            self.sh.free(b);
        }
    }

    /// Before an audit: on a deep one, every block's canary.
    fn rest(&self, deep: bool) {
        if deep {
            for b in &self.slot.live {
                self.sh.check(b, "a deep audit");
            }
        }
    }

    fn step(&mut self) {
        self.sh.tally.add(Count::Ops, 1);
        if self.rng().below(SWITCH_EVERY) == 0 {
            self.switch();
        }
        let full = self.slot.live.len() >= MAX_LIVE;
        let op = match weighted_op(self.rng()) {
            _ if self.slot.live.is_empty() => Op::Alloc,
            Op::Alloc | Op::AllocZeroed | Op::Forced | Op::Fallible if full => Op::Free,
            op => op,
        };
        let (t, inc) = (self.cur, self.inc);
        match op {
            Op::Alloc => self.alloc(How::Plain),
            Op::AllocZeroed => self.alloc(How::Zeroed),
            // Nothing is forced in the capped zone: its top's lifetime peak is checked.
            Op::Forced if self.sh.tree.nodes[t].zone == Zone::Capped => self.alloc(How::Plain),
            Op::Forced => self.alloc(How::Forced),
            Op::Free => {
                let b = self.pick_live();
                self.sh.free(b);
            }
            Op::Send => self.send(),
            Op::Receive => self.receive(),
            Op::Realloc => {
                let b = self.pick_live();
                let to = random_size(self.rng());
                match self.sh.realloc(b, t, inc, to) {
                    Ok(b) | Err(b) => self.slot.live.push(b),
                }
            }
            Op::Fallible => self.fallible(),
            Op::Helper => self.helper(),
            Op::Task => {
                let _exec = beancounter::root().enter_exec();
                let seed = self.rng().next();
                crate::tasks::spawn(&self.sh, t, seed);
            }
        }
    }

    fn alloc(&mut self, how: How) {
        let layout = random_layout(self.rng());
        if let Some(b) = self.sh.alloc(self.cur, self.inc, layout, how) {
            self.slot.live.push(b);
        }
    }

    /// Hands a block to another slot (which frees it, or keeps it and frees it later).
    fn send(&mut self) {
        let b = self.pick_live();
        let to = (self.slot.index + 1 + self.rng().below(SLOTS as u64 - 1) as usize) % SLOTS;
        self.sh.send(to, b);
    }

    fn receive(&mut self) {
        for _ in 0..8 {
            let Ok(b) = self.slot.inbox.try_recv() else {
                return;
            };
            self.sh.tally.add(Count::Received, 1);
            if self.rng().below(3) == 0 {
                self.sh.check(&b, "keeping a received block");
                self.keep_or_free(b);
            } else {
                self.sh.free(b);
            }
        }
    }

    /// A `try_reserve` inside `fallible`: usually an ordinary size, now and then one of
    /// 6–24 MiB that only generous barriers admit (freed at once if it was).
    fn fallible(&mut self) {
        let n = if self.rng().below(10) == 0 {
            6 * MIB + self.rng().below(18 * MIB as u64) as usize
        } else {
            random_size(self.rng())
        };
        match self.sh.try_reserve(self.cur, self.inc, n) {
            Some(b) if n > 4 * MIB => self.sh.free(b),
            Some(b) => self.slot.live.push(b),
            None => {}
        }
    }

    /// Leaves the current tenant and works for another: with `enter` (exec and fork), with
    /// `enter_exec`, or by adopting it inside another tenant's guard (which restores the
    /// thread when dropped). Now and then the tenant the thread was spawned into.
    fn switch(&mut self) {
        drop(self.guard.take());
        let n = self.sh.tree.len() as u64;
        let fork = self.fork;
        let t = match fork {
            Some(f) if self.rng().below(4) == 0 => f,
            _ => self.rng().below(n) as usize,
        };
        let sh = self.sh.clone();
        let (bc, inc) = sh.tree.nodes[t].current();
        let guard = match self.rng().below(10) {
            0..=6 => bc.enter(),
            7 | 8 => {
                sh.tally.add(Count::EnterExec, 1);
                bc.enter_exec()
            }
            _ => {
                let other = self.rng().below(n) as usize;
                let g = sh.tree.nodes[other].bc().enter();
                bc.adopt();
                sh.tally.add(Count::Adopt, 1);
                g
            }
        };
        self.guard = Some(guard);
        (self.cur, self.inc) = (t, inc);
        sh.tally.add(Count::Switch, 1);
        if beancounter::current() != bc {
            fail!(
                "after switching to {}, the thread charges {}",
                sh.tree.nodes[t].id,
                beancounter::current_id()
            );
        }
    }

    /// Starts a short thread for the current tenant, with the crate's wrapper (it starts in
    /// the tenant) or with `std::thread` (it enters the tenant itself): it frees blocks this
    /// worker gives it, allocates new ones, and hands those back when joined.
    fn helper(&mut self) {
        let t = self.cur;
        let _exec = beancounter::root().enter_exec();
        let give: Vec<Block> = (0..self.slot.live.len().min(6))
            .map(|_| self.pick_live())
            .collect();
        let plan: Vec<_> = (0..8).map(|_| random_layout(self.rng())).collect();
        let parcel = Arc::new(Mutex::new((give, Vec::with_capacity(plan.len()))));
        let body = |fork: Option<u64>| {
            let (sh, parcel, plan) = (self.sh.clone(), parcel.clone(), plan.clone());
            move || helper_main(&sh, t, fork, &parcel, plan)
        };
        let into = (self.slot.rng.below(3) != 0).then_some(t);
        let name = format!("helper-{}", self.slot.index);
        let counts = (Count::HelpersCrate, Count::HelpersStd);
        let (handle, _) = spawn_thread(&self.sh, into, name, counts, body);
        if handle.join().is_err() {
            fail!("helper of worker {} panicked", self.slot.index);
        }
        let made = std::mem::take(&mut parcel.lock().unwrap().1);
        for b in made {
            self.keep_or_free(b);
        }
    }

    /// Frees half of the blocks (the rest go to the slot's next thread), in the root.
    fn retire(mut self) -> Slot {
        drop(self.guard.take());
        for _ in 0..self.slot.live.len() / 2 {
            let b = self.pick_live();
            self.sh.free(b);
        }
        self.slot
    }
}

fn weighted_op(rng: &mut Rng) -> Op {
    crate::model::weighted(rng, &OPS)
}

/// The body of a helper thread; see [`Worker::helper`]. `fork`: the incarnation of `t` the
/// crate's wrapper started it in; without it, the helper enters `t` itself.
fn helper_main(
    sh: &Shared,
    t: usize,
    fork: Option<u64>,
    parcel: &Mutex<(Vec<Block>, Vec<Block>)>,
    plan: Vec<std::alloc::Layout>,
) {
    let node = &sh.tree.nodes[t];
    let started = beancounter::current_id();
    let want = if fork.is_some() { node.id } else { BcId::ROOT };
    if started != want {
        fail!("a helper started in {started}, not {want}");
    }
    let (_g, inc) = match fork {
        Some(inc) => (None, inc),
        None => {
            let (bc, inc) = node.current();
            (Some(bc.enter()), inc)
        }
    };
    let mut p = parcel.lock().unwrap();
    for b in std::mem::take(&mut p.0) {
        sh.free(b);
    }
    for layout in plan {
        // Helpers keep to slab and small run sizes: what they make is handed back.
        let layout = if layout.size() > 256 * KIB {
            std::alloc::Layout::from_size_align(layout.size() % (256 * KIB) + 1, layout.align())
                .unwrap()
        } else {
            layout
        };
        if let Some(b) = sh.alloc(t, inc, layout, How::Plain) {
            p.1.push(b);
        }
    }
}
