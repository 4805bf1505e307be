//! The harness's model of the process: the tenant tree and its zones, tracked blocks and the
//! calls that allocate, resize and free them while keeping the ledger of what every tenant
//! must hold, the refusals each tenant may see, and the counters the run reports.
//!
//! The ledger: `own[t]` is what blocks charged to tenant `t` itself occupy (their size class
//! or page-rounded run, `common::charged_bytes`, and one object each). A tenant's `held` must
//! equal the sum of `own` over its subtree, because every charge is applied to each ancestor
//! too. Nothing else may be charged to a tenant: the harness's own bookkeeping (vectors,
//! channels, thread handles, futures) is always allocated in the root, under
//! `root().enter_exec()` where a tenant guard is active. Leaves are retired and created again
//! during the run (`lifecycle.rs`): what a retired incarnation's blocks are charged belongs to
//! its parent's `own` from then on.

use crate::common::{
    all_zero, charged_after_realloc, charged_bytes, fill, verify, verify_prefix, Rng, SendPtr,
};
use crate::lifecycle::{Counted, Life};
use crate::A;
use beancounter::{BcError, BcId, Limits, Resource, Severity, MAX};
use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::fmt;
use std::io;
use std::mem::ManuallyDrop;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::sync::atomic::{fence, AtomicBool, AtomicI64, AtomicU64};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Mutex, RwLock};
use std::thread::JoinHandle;

pub const KIB: usize = 1 << 10;
pub const MIB: usize = 1 << 20;
/// The capped zone's top-level `Memory` limit: fixed for the whole run, never forced past,
/// its window never reset, so its lifetime `maxheld` must stay at or under it.
pub const CAP: u64 = 8 << 20;
/// Tenant ids start here (any range no other part of the process uses).
const FIRST_ID: u32 = 7_000;

/// Panics with `msg`. The message is formatted into a fresh allocation of whatever tenant is
/// current, so it is charged under `forced`: a tenant at its limit must not turn the report
/// of a failure into an abort without a message.
pub fn fail_with(msg: fmt::Arguments<'_>) -> ! {
    beancounter::forced(|| panic!("{msg}"));
    unreachable!("a panic returned")
}

/// `panic!` for the harness's threads; see [`fail_with`].
macro_rules! fail {
    ($($arg:tt)*) => { $crate::model::fail_with(format_args!($($arg)*)) };
}
pub(crate) use fail;

/// Picks from `(weight, value)` pairs in proportion to the weights.
pub fn weighted<T: Copy>(rng: &mut Rng, table: &[(u64, T)]) -> T {
    let mut x = rng.below(table.iter().map(|&(w, _)| w).sum());
    for &(w, v) in table {
        if x < w {
            return v;
        }
        x -= w;
    }
    unreachable!("x is below the total weight")
}

/// Request sizes, `(weight, (smallest, largest))`: mostly small, one request in 40 a page
/// run above the 32 KiB slab limit, one in 1 000 a huge mapping above 2 MiB.
const SIZES: [(u64, (usize, usize)); 5] = [
    (8_800, (1, 256)),
    (950, (257, 32 * KIB)),
    (200, (32 * KIB + 1, 256 * KIB)),
    (40, (256 * KIB + 1, 2 * MIB)),
    (10, (2 * MIB + 1, 4 * MIB)),
];
/// Alignments, `(weight, (lowest, highest power of two))`: the usual 8 and 16, any up to a
/// page, and now and then up to 64 KiB (served by page runs whatever the size).
const ALIGNS: [(u64, (u32, u32)); 4] = [(80, (3, 3)), (10, (0, 4)), (8, (5, 12)), (2, (13, 16))];

pub fn random_size(rng: &mut Rng) -> usize {
    let (lo, hi) = weighted(rng, &SIZES);
    lo + rng.below((hi - lo + 1) as u64) as usize
}

pub fn random_layout(rng: &mut Rng) -> Layout {
    let (lo, hi) = weighted(rng, &ALIGNS);
    let align = 1usize << (lo + rng.below((hi - lo + 1) as u64) as u32);
    Layout::from_size_align(random_size(rng), align).expect("layout")
}

/// How the limits of a top-level tenant and its subtree behave during the run.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Zone {
    /// Never limited: no request there may ever be refused.
    Free,
    /// The top has a fixed limit ([`CAP`]) and a `Threads` limit; the controller moves the
    /// descendants' limits. Nothing is forced here.
    Capped,
    /// The controller moves every limit, often below what is held.
    Squeezed,
    /// Barriers only, limits at `MAX`: ordinary allocations are never refused; fallible ones
    /// and guarded futures stop at the barrier.
    Soft,
}

impl Zone {
    /// May an ordinary (limit-checked) allocation be refused here?
    pub fn limits_ordinary(self) -> bool {
        matches!(self, Zone::Capped | Zone::Squeezed)
    }

    /// May a fallible (barrier-checked) request be refused here?
    pub fn has_barrier(self) -> bool {
        self != Zone::Free
    }
}

pub struct Node {
    /// The live incarnation (see `lifecycle.rs`): `bc()`, `current()`, `life()`.
    pub life: RwLock<Life>,
    pub id: BcId,
    pub parent: Option<usize>,
    pub zone: Zone,
    pub depth: usize,
}

/// 22 tenants: four top-level ones, one per zone, each with two children that have one child
/// each; in the two limited zones one of those grandchildren has a child too (depth 4).
pub struct Tree {
    pub nodes: Vec<Node>,
}

impl Tree {
    pub fn build(rng: &mut Rng) -> Tree {
        let mut tree = Tree { nodes: Vec::new() };
        for zone in [Zone::Free, Zone::Capped, Zone::Squeezed, Zone::Soft] {
            let top = tree.add(None, zone);
            for m in 0..2 {
                let mid = tree.add(Some(top), zone);
                let leaf = tree.add(Some(mid), zone);
                if m == 0 && zone.limits_ordinary() {
                    tree.add(Some(leaf), zone);
                }
            }
        }
        for t in 0..tree.len() {
            if tree.controlled(t) {
                let l = tree.random_limits(t, rng, 0);
                tree.nodes[t].bc().set_limits(Resource::Memory, l).unwrap();
            }
        }
        let capped = tree.capped_top();
        let bc = tree.nodes[capped].bc();
        bc.set_limits(Resource::Memory, Limits::new(CAP / 4 * 3, CAP).unwrap())
            .unwrap();
        bc.set_limits(Resource::Threads, Limits::new(3, 3).unwrap())
            .unwrap();
        // A squeezed child that admits one thread of its subtree at a time.
        let squeezed_mid = tree
            .nodes
            .iter()
            .position(|n| n.zone == Zone::Squeezed && n.depth == 2)
            .unwrap();
        tree.nodes[squeezed_mid]
            .bc()
            .set_limits(Resource::Threads, Limits::new(1, 1).unwrap())
            .unwrap();
        tree
    }

    fn add(&mut self, parent: Option<usize>, zone: Zone) -> usize {
        let id = BcId(FIRST_ID + self.nodes.len() as u32);
        let bc = match parent {
            None => beancounter::find_or_create(id),
            Some(p) => self.nodes[p].bc().new_child(id),
        }
        .unwrap_or_else(|e| fail!("creating tenant {id}: {e}"));
        let depth = parent.map_or(1, |p| self.nodes[p].depth + 1);
        if bc.parent().map(|p| p.id()) != parent.map(|p| self.nodes[p].id) {
            fail!("tenant {id} does not name its parent");
        }
        self.nodes.push(Node {
            life: RwLock::new(Life { bc, inc: 0 }),
            id,
            parent,
            zone,
            depth,
        });
        self.nodes.len() - 1
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// `t` and its ancestors, bottom up: the levels a charge to `t` is applied to.
    pub fn chain(&self, t: usize) -> impl Iterator<Item = usize> + '_ {
        std::iter::successors(Some(t), |&u| self.nodes[u].parent)
    }

    /// Has `t` no children (a tenant the run retires and creates again)?
    pub fn is_leaf(&self, t: usize) -> bool {
        self.nodes.iter().all(|n| n.parent != Some(t))
    }

    /// Is `t` in the subtree of `of`?
    pub fn within(&self, t: usize, of: usize) -> bool {
        self.chain(t).any(|u| u == of)
    }

    pub fn index_of(&self, id: BcId) -> Option<usize> {
        self.nodes.iter().position(|n| n.id == id)
    }

    pub fn capped_top(&self) -> usize {
        self.nodes
            .iter()
            .position(|n| n.zone == Zone::Capped)
            .unwrap()
    }

    /// Does the controller move this tenant's `Memory` limits?
    pub fn controlled(&self, t: usize) -> bool {
        let n = &self.nodes[t];
        match n.zone {
            Zone::Free => false,
            Zone::Capped => n.depth > 1,
            Zone::Squeezed | Zone::Soft => true,
        }
    }

    /// New `Memory` limits for a controlled tenant that holds `held` now: a random range, a
    /// limit below what is held, a generous one, or none; barriers only in the soft zone.
    pub fn random_limits(&self, t: usize, rng: &mut Rng, held: u64) -> Limits {
        let mut between = |lo: u64, hi: u64| lo + rng.below(hi - lo + 1);
        if self.nodes[t].zone == Zone::Soft {
            let barrier = if held > 0 && between(0, 2) == 0 {
                held / 2
            } else {
                between(256 << 10, 6 << 20)
            };
            return Limits::new(barrier, MAX).unwrap();
        }
        let limit = match between(0, 9) {
            0..=3 => between(512 << 10, 12 << 20),
            4..=6 => held / 100 * between(20, 90),
            7 | 8 => 64 << 20,
            _ => MAX,
        };
        let barrier = if limit == MAX {
            MAX
        } else {
            limit / 100 * between(50, 100)
        };
        Limits::new(barrier, limit).unwrap()
    }
}

/// A live block the harness owns: where, its layout, its canary tag, the tenant it was
/// charged to (and the incarnation of the handle it was charged through) and what it was
/// charged to `Memory`.
#[derive(Clone, Copy, Debug)]
pub struct Block {
    pub p: SendPtr,
    pub layout: Layout,
    pub tag: u64,
    pub owner: usize,
    pub inc: u64,
    pub charge: u64,
}

/// What the allocator charges `Memory` for a block of `layout` (its size class or its
/// page-rounded run). `common::charged_bytes` builds its class table on the heap, so it runs
/// in the root: the current tenant may be at its limit.
fn charge_of(layout: Layout) -> u64 {
    let _exec = beancounter::root().enter_exec();
    charged_bytes(layout)
}

/// How an allocation is checked.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum How {
    Plain,
    Zeroed,
    Forced,
}

/// Declares [`Count`] and the names the run's figures print.
macro_rules! counts {
    ($($name:ident),* $(,)?) => {
        /// What the run counts, for its closing figures.
        #[derive(Clone, Copy, Debug)]
        pub enum Count { $($name),* }
        pub const COUNT_NAMES: &[&str] = &[$(stringify!($name)),*];
    };
}

counts!(
    Ops,
    Alloc,
    AllocZeroed,
    Forced,
    Large,
    Huge,
    Realloc,
    Free,
    Sent,
    Received,
    FallibleOk,
    FallibleRefused,
    OrdinaryRefused,
    Switch,
    EnterExec,
    Adopt,
    WorkersCrate,
    WorkersStd,
    HelpersCrate,
    HelpersStd,
    ThreadsRefused,
    TasksInBeancounter,
    TasksGuarded,
    TasksDone,
    GuardedStopped,
    TasksMigrated,
    LimitsSet,
    LimitsBelowHeld,
    Samples,
    Checkpoints,
    Drained,
    Probes,
    Retired,
    LateCharges,
    LeftoversFreed,
);

/// The counters, sharded by thread so that counting does not make every thread of the run
/// contend for one cache line (which would serialise them and hide interleavings).
pub struct Tally([Shard; SHARDS]);

const SHARDS: usize = 16;

/// One thread's counters, on cache lines of their own.
#[repr(align(128))]
struct Shard([AtomicU64; COUNT_NAMES.len()]);

thread_local! {
    /// This thread's number in the run (0 until it first needs one).
    static THREAD_NO: Cell<u64> = const { Cell::new(0) };
}
static THREADS_SEEN: AtomicU64 = AtomicU64::new(0);

/// A number for the calling thread, unique in the run, without allocating.
fn thread_no() -> u64 {
    THREAD_NO.with(|n| {
        if n.get() == 0 {
            n.set(THREADS_SEEN.fetch_add(1, Relaxed) + 1);
        }
        n.get()
    })
}

impl Tally {
    fn new() -> Tally {
        Tally(std::array::from_fn(|_| {
            Shard(std::array::from_fn(|_| AtomicU64::new(0)))
        }))
    }

    pub fn add(&self, c: Count, n: u64) {
        let shard = &self.0[thread_no() as usize % SHARDS];
        shard.0[c as usize].fetch_add(n, Relaxed);
    }

    pub fn get(&self, c: Count) -> u64 {
        self.0.iter().map(|s| s.0[c as usize].load(Relaxed)).sum()
    }

    pub fn all(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        COUNT_NAMES.iter().enumerate().map(|(i, &name)| {
            let total = self.0.iter().map(|s| s.0[i].load(Relaxed)).sum();
            (name, total)
        })
    }
}

/// A canary tag unique in the run: the thread's number and a count of its own.
fn next_tag() -> u64 {
    thread_local! {
        static MADE: Cell<u64> = const { Cell::new(0) };
    }
    let made = MADE.with(|m| {
        m.set(m.get() + 1);
        m.get()
    });
    thread_no() << 40 | made
}

/// The bound a tenant's `maxheld` is held to in the current window: the larger of what it
/// held when the window began and the largest limit in force at any time since.
#[derive(Clone, Copy, Debug)]
pub struct Window {
    pub base: u64,
    pub max_limit: u64,
}

/// Everything the harness's threads share.
pub struct Shared {
    pub tree: Tree,
    pub tally: Tally,
    pub gate: crate::gate::Gate,
    /// Workers and the controller end; slots are not respawned.
    pub stop: AtomicBool,
    /// Workers are gone: executors end once the last task is done.
    pub tasks_closed: AtomicBool,
    pub inboxes: Vec<SyncSender<Block>>,
    /// Per tenant: `Memory` and `Allocations` its own blocks are charged, with, for a
    /// parent, what its retired children left to it.
    own: Vec<[AtomicI64; 2]>,
    /// Per tenant: what its retired incarnations counted.
    pub past: Vec<Mutex<Counted>>,
    /// Per requesting tenant: refused fallible requests and refused ordinary allocations.
    pub refused_fallible: Vec<AtomicU64>,
    pub refused_ordinary: Vec<AtomicU64>,
    /// Per refusing tenant: refused `Threads` charges of spawns.
    pub threads_refused: Vec<AtomicU64>,
    /// Per tenant: a forced charge reached it in this window (its bound may be passed).
    pub forced: Vec<AtomicBool>,
    pub windows: Mutex<Vec<Window>>,
}

fn atomics<T>(n: usize, f: impl Fn() -> T) -> Vec<T> {
    (0..n).map(|_| f()).collect()
}

impl Shared {
    pub fn new(tree: Tree, inboxes: Vec<SyncSender<Block>>) -> Shared {
        let n = tree.len();
        let windows = (0..n)
            .map(|t| {
                let s = tree.nodes[t].bc().stat(Resource::Memory);
                Window {
                    base: s.maxheld,
                    max_limit: s.limit,
                }
            })
            .collect();
        Shared {
            tree,
            tally: Tally::new(),
            gate: crate::gate::Gate::new(),
            stop: AtomicBool::new(false),
            tasks_closed: AtomicBool::new(false),
            inboxes,
            own: atomics(n, || [AtomicI64::new(0), AtomicI64::new(0)]),
            past: atomics(n, || Mutex::new(Counted::default())),
            refused_fallible: atomics(n, || AtomicU64::new(0)),
            refused_ordinary: atomics(n, || AtomicU64::new(0)),
            threads_refused: atomics(n, || AtomicU64::new(0)),
            forced: atomics(n, || AtomicBool::new(false)),
            windows: Mutex::new(windows),
        }
    }

    /// Enters a charge through incarnation `inc` of tenant `t` in the ledger: `t`'s while it
    /// is the live one, its parent's once retired. Returns whose it was.
    fn ledger(&self, t: usize, inc: u64, bytes: i64, objects: i64) -> usize {
        self.ledger_in(&self.tree.nodes[t].life(), t, inc, bytes, objects)
    }

    /// [`ledger`](Self::ledger) with `t`'s live incarnation locked by the caller.
    fn ledger_in(&self, life: &Life, t: usize, inc: u64, bytes: i64, objects: i64) -> usize {
        let to = self.heir(t, inc, life);
        self.own[to][0].fetch_add(bytes, Relaxed);
        self.own[to][1].fetch_add(objects, Relaxed);
        to
    }

    /// Tenant `t` is retired: what its blocks are charged is its parent `p`'s from now on.
    /// The caller holds `t`'s lifecycle lock for writing, so no entry of `t` is in flight.
    pub fn bequeath(&self, t: usize, p: usize) {
        for k in 0..2 {
            let left = self.own[t][k].swap(0, Relaxed);
            self.own[p][k].fetch_add(left, Relaxed);
        }
    }

    /// What tenant `t` must hold of `Memory` and `Allocations`: its subtree's blocks.
    pub fn expected(&self, t: usize) -> (u64, u64) {
        let (mut bytes, mut objects) = (0i64, 0i64);
        for u in (0..self.tree.len()).filter(|&u| self.tree.within(u, t)) {
            bytes += self.own[u][0].load(Relaxed);
            objects += self.own[u][1].load(Relaxed);
        }
        (bytes as u64, objects as u64)
    }

    /// The calling thread must be charging tenant `t`.
    fn expect_current(&self, t: usize, doing: &str) {
        let now = beancounter::current_id();
        if now != self.tree.nodes[t].id {
            fail!(
                "{doing} for tenant {} while the thread charges {now}",
                self.tree.nodes[t].id
            );
        }
    }

    /// Allocates `layout` for tenant `owner`, which must be the current one (entered through
    /// its incarnation `inc`); `None` when the allocator refused (which must be allowed in the
    /// owner's zone).
    pub fn alloc(&self, owner: usize, inc: u64, layout: Layout, how: How) -> Option<Block> {
        self.expect_current(owner, "allocating");
        if how == How::Forced {
            self.mark_forced(owner);
        }
        // No retirement of `owner` while the request is in flight (`lifecycle.rs`).
        let life = self.tree.nodes[owner].life();
        let p = match how {
            // SAFETY: the harness never asks for a zero size.
            How::Plain => unsafe { A.alloc(layout) },
            // SAFETY: the harness never asks for a zero size.
            How::Zeroed => unsafe { A.alloc_zeroed(layout) },
            // SAFETY: the harness never asks for a zero size.
            How::Forced => beancounter::forced(|| unsafe { A.alloc(layout) }),
        };
        if p.is_null() {
            if how == How::Forced {
                fail!("a forced allocation of {layout:?} returned null");
            }
            self.refusal(owner, Severity::Limit);
            return None;
        }
        // SAFETY: a fresh block of `layout.size()` bytes.
        if how == How::Zeroed && !unsafe { all_zero(p, layout.size()) } {
            fail!("alloc_zeroed({layout:?}) returned a block that is not zero");
        }
        self.tally.add(
            match how {
                How::Plain => Count::Alloc,
                How::Zeroed => Count::AllocZeroed,
                How::Forced => Count::Forced,
            },
            1,
        );
        Some(self.adopt(&life, p, layout, owner, inc))
    }

    /// Takes a fresh block charged through incarnation `inc` of `owner` (`life`, locked by
    /// the caller) into the ledger: checks its alignment, writes its canary.
    fn adopt(&self, life: &Life, p: *mut u8, layout: Layout, owner: usize, inc: u64) -> Block {
        self.adopt_charged(life, p, layout, owner, inc, charge_of(layout))
    }

    /// [`adopt`](Self::adopt) for a block charged `charge` bytes of `Memory`.
    fn adopt_charged(
        &self,
        life: &Life,
        p: *mut u8,
        layout: Layout,
        owner: usize,
        inc: u64,
        charge: u64,
    ) -> Block {
        if p as usize % layout.align() != 0 {
            fail!("{p:p} is not aligned for {layout:?}");
        }
        if layout.size() > 2 * MIB {
            self.tally.add(Count::Huge, 1);
        } else if layout.size() > 32 * KIB {
            self.tally.add(Count::Large, 1);
        }
        let tag = next_tag();
        // SAFETY: a fresh block of `layout.size()` bytes that only the caller knows of.
        unsafe { fill(p, layout.size(), tag) };
        let b = Block {
            p: SendPtr(p),
            layout,
            tag,
            owner,
            inc,
            charge,
        };
        if self.ledger_in(life, owner, inc, b.charge as i64, 1) != owner {
            // Through a handle of a retired incarnation: charged to the parent.
            self.tally.add(Count::LateCharges, 1);
        }
        b
    }

    /// Fails unless `b`'s canary is intact.
    pub fn check(&self, b: &Block, doing: &str) {
        // SAFETY: a live block of `b.layout.size()` bytes, held by the caller.
        if let Err(at) = unsafe { verify(b.p.0, b.layout.size(), b.tag) } {
            fail!(
                "canary of {:?} (tenant {}) damaged at offset {at}, seen before {doing}",
                b.layout,
                self.tree.nodes[b.owner].id
            );
        }
    }

    /// Checks the canary and frees `b`, from any thread and tenant.
    pub fn free(&self, b: Block) {
        self.check(&b, "free");
        // SAFETY: a live block allocated with `b.layout`, given up by its holder.
        unsafe { A.dealloc(b.p.0, b.layout) };
        if self.ledger(b.owner, b.inc, -(b.charge as i64), -1) != b.owner {
            // A block its retired owner left behind: given back to the parent.
            self.tally.add(Count::LeftoversFreed, 1);
        }
        self.tally.add(Count::Free, 1);
    }

    /// Resizes `b` while `owner` (incarnation `inc`) is current: in place (only for the
    /// block's own tenant) or by a move, the result is charged to `owner` either way.
    /// `Err(b)` when refused.
    pub fn realloc(
        &self,
        b: Block,
        owner: usize,
        inc: u64,
        new_size: usize,
    ) -> Result<Block, Block> {
        self.expect_current(owner, "reallocating");
        self.check(&b, "realloc");
        let life = self.tree.nodes[owner].life();
        // SAFETY: a live block with its layout; `new_size` is non-zero, and rounded to the
        // alignment it stays far below `isize::MAX`.
        let q = unsafe { A.realloc(b.p.0, b.layout, new_size) };
        if q.is_null() {
            self.refusal(owner, Severity::Limit);
            return Err(b);
        }
        let keep = b.layout.size().min(new_size);
        // SAFETY: `q` holds `new_size` bytes, the first `keep` of them copied or kept.
        if let Err(at) = unsafe { verify_prefix(q, b.layout.size(), keep, b.tag) } {
            fail!("realloc of {:?} to {new_size} lost byte {at}", b.layout);
        }
        self.tally.add(Count::Realloc, 1);
        let layout = Layout::from_size_align(new_size, b.layout.align()).unwrap();
        // In place, a slab object keeps its class's charge; a slab object grown past 4 KiB
        // moves to a block of pages (`common::charged_after_realloc`).
        let charge = {
            let _exec = beancounter::root().enter_exec();
            charged_after_realloc(b.layout, b.charge, new_size, q == b.p.0)
        };
        let moved = self.adopt_charged(&life, q, layout, owner, inc, charge);
        // The old block leaves the ledger under its own owner's lock (not nested in this one).
        drop(life);
        self.ledger(b.owner, b.inc, -(b.charge as i64), -1);
        Ok(moved)
    }

    /// `Vec::try_reserve_exact(n)` inside `beancounter::fallible` for tenant `owner` (the
    /// current one, incarnation `inc`): the vector's buffer, as a block, or `None` if it was
    /// refused.
    pub fn try_reserve(&self, owner: usize, inc: u64, n: usize) -> Option<Block> {
        self.expect_current(owner, "reserving");
        let life = self.tree.nodes[owner].life();
        let mut v: Vec<u8> = Vec::new();
        if beancounter::fallible(|| v.try_reserve_exact(n)).is_err() {
            self.refusal(owner, Severity::Barrier);
            return None;
        }
        self.tally.add(Count::FallibleOk, 1);
        // The buffer is freed as a block of `Layout::array::<u8>(capacity)`, as `Vec` would.
        let mut v = ManuallyDrop::new(v);
        let layout = Layout::array::<u8>(v.capacity()).unwrap();
        Some(self.adopt(&life, v.as_mut_ptr(), layout, owner, inc))
    }

    /// Hands `b` to the inbox of worker slot `to`; frees it here if that inbox is full.
    pub fn send(&self, to: usize, b: Block) {
        self.check(&b, "sending");
        match self.inboxes[to].try_send(b) {
            Ok(()) => self.tally.add(Count::Sent, 1),
            Err(TrySendError::Full(b) | TrySendError::Disconnected(b)) => self.free(b),
        }
    }

    /// Counts a refused request of `owner`, which its zone must allow.
    fn refusal(&self, owner: usize, severity: Severity) {
        let zone = self.tree.nodes[owner].zone;
        let (allowed, per_tenant, count) = match severity {
            Severity::Barrier => (
                zone.has_barrier(),
                &self.refused_fallible,
                Count::FallibleRefused,
            ),
            _ => (
                zone.limits_ordinary(),
                &self.refused_ordinary,
                Count::OrdinaryRefused,
            ),
        };
        if !allowed {
            fail!(
                "tenant {} ({zone:?}: no {severity:?} bound on its chain) was refused a request",
                self.tree.nodes[owner].id
            );
        }
        per_tenant[owner].fetch_add(1, Relaxed);
        self.tally.add(count, 1);
    }

    /// Records that a forced charge is about to reach `t` and its ancestors. The fence pairs
    /// with the one in the controller's samples: a sample that sees the charge sees the flag.
    pub fn mark_forced(&self, t: usize) {
        for u in self.tree.chain(t) {
            self.forced[u].store(true, SeqCst);
        }
        fence(SeqCst);
    }

    /// Counts a spawn the crate refused for its `Threads` charge, at the refusing tenant
    /// (which must have a `Threads` limit); fails on any other error.
    pub fn spawn_refused(&self, e: &io::Error) {
        let refused = match e.get_ref().and_then(|e| e.downcast_ref::<BcError>()) {
            Some(BcError::Exceeded(x)) if x.resource == Resource::Threads => x,
            _ => fail!("spawn failed: {e}"),
        };
        let Some(t) = self.tree.index_of(refused.id) else {
            fail!(
                "a spawn was refused by {}, not a tenant of the run",
                refused.id
            );
        };
        let limit = self.tree.nodes[t].bc().stat(Resource::Threads).limit;
        if limit == MAX || refused.held + refused.requested <= refused.bound {
            fail!(
                "tenant {} refused a thread without reason: {refused:?}",
                refused.id
            );
        }
        self.threads_refused[t].fetch_add(1, Relaxed);
        self.tally.add(Count::ThreadsRefused, 1);
    }
}

/// Starts a thread of the run: with `beancounter::thread::spawn` into tenant `into` if it is
/// given, else (or if that tenant's `Threads` charge is refused, which is counted) with
/// `std::thread`. `body(Some(inc))` is the closure for the crate's wrapper, which starts the
/// thread in incarnation `inc` of `into`; `body(None)` the one for std. Counts the thread as
/// `counts.0` (crate) or `counts.1` (std); returns the handle and, if the crate's wrapper
/// started it, the incarnation it started in.
///
/// The crate's wrapper starts the thread in `into` and counts it in its `Threads`; what the
/// spawn allocates here (the thread's handle, name and closure) is charged to the root
/// through an exec-only guard, so the tenant holds only what the harness tracks.
pub fn spawn_thread<T, F>(
    sh: &Shared,
    into: Option<usize>,
    name: String,
    counts: (Count, Count),
    body: impl Fn(Option<u64>) -> F,
) -> (JoinHandle<T>, Option<u64>)
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    if let Some(t) = into {
        let spawned = {
            let (bc, inc) = sh.tree.nodes[t].current();
            let _fork = bc.enter();
            let _exec = beancounter::root().enter_exec();
            beancounter::thread::Builder::new()
                .name(name.clone())
                .spawn(body(Some(inc)))
                .map(|h| (h, inc))
        };
        match spawned {
            Ok((h, inc)) => {
                sh.tally.add(counts.0, 1);
                return (h, Some(inc));
            }
            Err(e) => sh.spawn_refused(&e),
        }
    }
    sh.tally.add(counts.1, 1);
    let h = std::thread::Builder::new()
        .name(name)
        .spawn(body(None))
        .unwrap_or_else(|e| fail!("spawn: {e}"));
    (h, None)
}
