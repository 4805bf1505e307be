//! Tenant lifecycle (DESIGN §3.6, §6.7, issue 11): `Beancounter::retire` takes a tenant out
//! of the id map, `lookup` and every report at once, changes no `held` anywhere, and leaves
//! what the tenant still holds charged to its parent chain until it is freed, when the
//! chain is uncharged exactly once and never the fresh tenant that took the id. Handles and
//! threads still inside a retired tenant charge its nearest live ancestor. Bad input is an
//! error that changes nothing, and `reap()` frees zombies and retired records alike.
//!
//! The scale check is the issue's: with `BEANCOUNTER_CAPACITY=1000`, a million per-request
//! children (one in four leaving a short string in a shared cache, each retired when its
//! request ends) never get `TableFull`, `live_count()` stays at the live tenants, and what
//! the retired tenants keep is one record each; it prints the bytes kept per retired tenant
//! with leftovers and the time the million requests took.
//!
//! Every check runs in a child process of its own: the table's capacity is read once per
//! process, the counts (`live_count`, `retired_count`) are process-wide, and an abort should
//! fail one check, not the binary. Blocks are allocated with `GlobalAlloc` calls of known
//! layouts, so what each tenant holds is known exactly (`common::charged_bytes`), and the
//! vectors that keep them are allocated before a tenant is entered (in the root).

mod common;

use beancounter::{
    find_or_create, lookup, report, BcError, BcId, BeanAlloc, Beancounter, Limits, Resource,
    ResourceStat, Severity,
};
use common::{charged_after_realloc, charged_bytes, held, tenant, Runner, SendPtr};
use std::alloc::{GlobalAlloc, Layout};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Instant;

#[global_allocator]
static ALLOC: BeanAlloc = BeanAlloc::new();

/// `(size, align)` of the blocks a tenant allocates: slab classes (8 B to 20 KB, aligned up
/// to 64), a page run (100 KiB, page-aligned) and a huge block of its own mapping (3 MiB), so
/// every place an owner is recorded (slab tag, run tag, huge head) is covered.
const SHAPES: [(usize, usize); 8] = [
    (8, 8),
    (24, 8),
    (100, 16),
    (640, 64),
    (3000, 8),
    (20_000, 8),
    (100 << 10, 4096),
    (3 << 20, 8),
];

/// Bytes of one retired tenant's record: `Record` in `src/accounting/registry/table.rs` is
/// `#[repr(C, align(64))]`, one cache line (state, left, id, link, slot, children, pins).
const RECORD_BYTES: u64 = 64;

fn main() {
    let mut r = Runner::new();
    r.isolated(
        "retirement_changes_no_held_and_leftovers_uncharge_the_parent_chain_once",
        60,
        leftovers_go_to_the_parent_chain,
    );
    r.isolated(
        "a_top_level_tenant_is_retired_to_the_root_and_its_id_is_fresh_at_once",
        60,
        top_level_retirement,
    );
    r.isolated(
        "a_retired_tenant_leaves_lookup_and_every_report_at_once",
        60,
        reports_exclude_retired,
    );
    r.isolated(
        "a_thread_inside_a_retired_tenant_charges_the_nearest_live_ancestor_exactly",
        60,
        thread_inside_retired_tenant,
    );
    r.isolated(
        "a_child_of_a_retired_tenant_is_charged_to_its_grandparent",
        60,
        child_of_retired_tenant,
    );
    r.isolated(
        "bad_retirements_are_errors_that_change_nothing",
        60,
        bad_input,
    );
    r.isolated(
        "reap_frees_zombies_and_retired_records_nothing_is_charged_through",
        60,
        reap_frees_zombies_and_retired,
    );
    r.isolated(
        "a_million_retired_request_children_never_fill_a_table_of_1000",
        600,
        million_request_children,
    );
    r.finish();
}

// ---- blocks ------------------------------------------------------------------------------

/// A block from the allocator, freed when dropped (on whatever thread drops it).
struct Block {
    p: SendPtr,
    layout: Layout,
    /// What it is charged to `Memory`.
    charge: u64,
}

impl Block {
    /// Allocates `size` bytes aligned to `align` for the current thread's tenant.
    fn new(size: usize, align: usize) -> Block {
        let layout = Layout::from_size_align(size, align).unwrap();
        // SAFETY: a non-zero size.
        let p = unsafe { ALLOC.alloc(layout) };
        assert!(!p.is_null(), "alloc({layout:?}) returned null");
        // SAFETY: a fresh block of at least one byte.
        unsafe { p.write(0xA5) };
        Block {
            p: SendPtr(p),
            layout,
            charge: charged_bytes(layout),
        }
    }

    /// What the allocator charged for it: `(Memory, Allocations)`.
    fn charged(&self) -> (u64, u64) {
        (self.charge, 1)
    }

    /// Grows it with `realloc` (in place or moved, charged to the current tenant either
    /// way).
    fn grow(&mut self, new_size: usize) {
        // SAFETY: allocated with `self.layout`; `new_size` is non-zero and, rounded up to
        // the alignment, does not overflow.
        let p = unsafe { ALLOC.realloc(self.p.0, self.layout, new_size) };
        assert!(!p.is_null(), "realloc to {new_size} returned null");
        self.charge = charged_after_realloc(self.layout, self.charge, new_size, p == self.p.0);
        self.p = SendPtr(p);
        self.layout = Layout::from_size_align(new_size, self.layout.align()).unwrap();
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: allocated by `ALLOC` with `self.layout`, freed once.
        unsafe { ALLOC.dealloc(self.p.0, self.layout) };
    }
}

/// Allocates one block of every shape into `out` (which must have room: pushing then does
/// not allocate, so nothing but the blocks is charged to the current tenant).
fn allocate_shapes(out: &mut Vec<Block>) {
    assert!(
        out.capacity() - out.len() >= SHAPES.len(),
        "no room in {out:p}"
    );
    for (size, align) in SHAPES {
        out.push(Block::new(size, align));
    }
}

/// `(Memory, Allocations)` the blocks were charged.
fn sum(blocks: &[Block]) -> (u64, u64) {
    blocks.iter().map(Block::charged).fold((0, 0), add)
}

fn add(a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
    (a.0 + b.0, a.1 + b.1)
}

fn sub(a: (u64, u64), b: (u64, u64)) -> (u64, u64) {
    (
        a.0.checked_sub(b.0).expect("held went below zero"),
        a.1.checked_sub(b.1).expect("held went below zero"),
    )
}

/// Every tenant given has no uncharge warning: nothing gave back more than it held.
fn no_uncharge_warnings(bcs: &[&Beancounter]) {
    for bc in bcs {
        for r in [Resource::Memory, Resource::Allocations, Resource::Threads] {
            assert_eq!(bc.uncharge_warnings(r), 0, "tenant {} {r}", bc.id());
        }
    }
}

/// A fresh tenant: nothing held or refused, no history, the default limits.
fn assert_fresh(bc: &Beancounter) {
    for r in [Resource::Memory, Resource::Allocations, Resource::Threads] {
        let s = bc.stat(r);
        let d = beancounter::default_limits(r).unwrap();
        assert_eq!(
            (s.held, s.maxheld, s.minheld, s.failcnt, s.barrier, s.limit),
            (0, 0, 0, 0, d.barrier, d.limit),
            "tenant {} {r} is not fresh: {s:?}",
            bc.id()
        );
        assert_eq!(bc.uncharge_warnings(r), 0);
    }
}

/// Gives `bc` a history a fresh tenant must not inherit: limits off the defaults and a
/// refused charge (`failcnt` 1).
fn give_history(bc: &Beancounter) {
    bc.set_limits(Resource::Memory, Limits::new(48 << 20, 64 << 20).unwrap())
        .unwrap();
    bc.set_limits(Resource::Threads, Limits::new(1, 1).unwrap())
        .unwrap();
    let one = bc.charge(Resource::Threads, 1, Severity::Limit).unwrap();
    assert!(bc.charge(Resource::Threads, 1, Severity::Limit).is_err());
    drop(one);
    assert_eq!(bc.stat(Resource::Threads).failcnt, 1);
}

// ---- checks ------------------------------------------------------------------------------

/// G → P → C. C allocates on this thread (whose stock keeps some of C's charge), keeps
/// blocks in a cache and is retired: G's and P's `held` do not move. The id is created
/// again at once, fresh, and the new tenant allocates too. Another thread frees the
/// leftovers: P and G go down by exactly the leftovers, the new C not at all.
fn leftovers_go_to_the_parent_chain() {
    let g = tenant(100);
    let p = g.new_child(BcId(101)).unwrap();
    let c = p.new_child(BcId(102)).unwrap();
    give_history(&c);
    let root = beancounter::root();

    // P holds blocks of its own, so its held is not only C's.
    let mut p_own = Vec::with_capacity(SHAPES.len());
    {
        let _g = p.enter();
        allocate_shapes(&mut p_own);
    }
    // C allocates three rounds, frees one block in three at once and keeps the rest.
    let mut cache = Vec::with_capacity(3 * SHAPES.len());
    let mut scratch = Vec::with_capacity(3 * SHAPES.len());
    {
        let _g = c.enter();
        for _ in 0..3 {
            allocate_shapes(&mut scratch);
        }
        for (i, b) in scratch.drain(..).enumerate() {
            if i % 3 == 0 {
                drop(b);
            } else {
                cache.push(b);
            }
        }
    }
    let left = sum(&cache);
    assert_eq!(held(&c), left, "C holds exactly its leftovers");
    let g_before = held(&g);
    let p_before = held(&p);
    assert_eq!(p_before, add(sum(&p_own), left));
    assert_eq!(g_before, p_before);
    let root_before = held(&root);
    let (live, retired) = (beancounter::live_count(), beancounter::retired_count());

    c.retire().unwrap();

    assert_eq!(held(&g), g_before, "retirement changed G's held");
    assert_eq!(held(&p), p_before, "retirement changed P's held");
    assert_eq!(
        held(&root),
        root_before,
        "retirement changed the root's held"
    );
    assert_eq!(beancounter::live_count(), live - 1);
    assert_eq!(
        beancounter::retired_count(),
        retired + 1,
        "a retired tenant with leftovers keeps its record"
    );
    assert!(lookup(BcId(102)).is_none());
    beancounter::check_invariants().unwrap();

    // The id is free at once: a fresh child, which then allocates for itself.
    let fresh = p.new_child(BcId(102)).unwrap();
    assert_fresh(&fresh);
    assert_eq!(lookup(BcId(102)).as_ref(), Some(&fresh));
    let mut fresh_own = Vec::with_capacity(SHAPES.len());
    {
        let _g = fresh.enter();
        allocate_shapes(&mut fresh_own);
    }
    let fresh_held = held(&fresh);
    assert_eq!(fresh_held, sum(&fresh_own));
    let p_mid = add(p_before, fresh_held);
    assert_eq!(held(&p), p_mid);
    assert_eq!(held(&g), p_mid);

    // The leftovers are freed later, on another thread.
    std::thread::spawn(move || drop(cache)).join().unwrap();
    assert_eq!(held(&p), sub(p_mid, left), "P was not uncharged exactly");
    assert_eq!(held(&g), sub(p_mid, left), "G was not uncharged exactly");
    assert_eq!(held(&fresh), fresh_held, "the fresh tenant was credited");
    no_uncharge_warnings(&[&g, &p, &fresh]);
    beancounter::check_invariants().unwrap();

    // Nothing is charged through the retired record any more, once this thread's stock of
    // it is taken back (reap does that): the record goes.
    beancounter::reap();
    assert_eq!(beancounter::retired_count(), retired);

    drop(fresh_own);
    drop(p_own);
    beancounter::drain_stock();
    assert_eq!(held(&fresh), (0, 0));
    assert_eq!(held(&p), (0, 0));
    assert_eq!(held(&g), (0, 0));
    no_uncharge_warnings(&[&g, &p, &fresh]);
    drop((fresh, p, g));
    beancounter::reap();
    assert_eq!(beancounter::live_count(), 0);
    assert_eq!(beancounter::retired_count(), 0);
    beancounter::check_invariants().unwrap();
}

/// A top-level tenant's parent is the root, which is not charged for tenants: its leftovers
/// stay charged to no one, and freeing them uncharges no one (not the root, not the fresh
/// tenant with the same id). A handle of the retired tenant charges the root.
fn top_level_retirement() {
    let t = tenant(200);
    give_history(&t);
    let mut cache = Vec::with_capacity(SHAPES.len());
    {
        let _g = t.enter();
        allocate_shapes(&mut cache);
    }
    let left = sum(&cache);
    assert_eq!(held(&t), left);
    let stale = t.clone();
    let root = beancounter::root();
    let root_before = held(&root);
    let root_threads = root.stat(Resource::Threads).held;

    t.retire().unwrap();

    assert_eq!(
        held(&root),
        root_before,
        "retirement changed the root's held"
    );
    assert!(lookup(BcId(200)).is_none());
    assert_eq!(
        beancounter::stat(BcId(200), Resource::Memory),
        Err(BcError::NotFound(BcId(200)))
    );
    assert_eq!(beancounter::retired_count(), 1);
    assert_eq!(beancounter::live_count(), 0);

    let fresh = find_or_create(BcId(200)).unwrap();
    assert_ne!(fresh, stale, "the fresh tenant is a new beancounter");
    assert_fresh(&fresh);
    assert_eq!(beancounter::live_count(), 1);

    // The stale handle charges its heir, the root, and never the fresh tenant.
    let c = stale.charge(Resource::Threads, 3, Severity::Limit).unwrap();
    assert_eq!(c.beancounter().id(), BcId::ROOT);
    assert_eq!(root.stat(Resource::Threads).held, root_threads + 3);
    assert_eq!(fresh.stat(Resource::Threads).held, 0);
    drop(c);
    assert_eq!(root.stat(Resource::Threads).held, root_threads);
    // Read through the stale handle, the retired tenant holds nothing.
    assert_eq!(stale.stat(Resource::Memory), ResourceStat::default());

    let mut fresh_own = Vec::with_capacity(SHAPES.len());
    {
        let _g = fresh.enter();
        allocate_shapes(&mut fresh_own);
    }
    let fresh_held = held(&fresh);
    assert_eq!(fresh_held, sum(&fresh_own));

    // Freed here, on this thread, with nothing else running: `clear` frees the blocks and
    // keeps the vector, so nothing the root holds moves either.
    let root_before = held(&root);
    cache.clear();
    assert_eq!(
        held(&root),
        root_before,
        "the root was uncharged for the leftovers"
    );
    assert_eq!(held(&fresh), fresh_held, "the fresh tenant was credited");
    no_uncharge_warnings(&[&root, &fresh]);

    drop(stale);
    beancounter::reap();
    assert_eq!(beancounter::retired_count(), 0);
    drop(fresh_own);
    beancounter::drain_stock();
    assert_eq!(held(&fresh), (0, 0));
    beancounter::check_invariants().unwrap();
}

/// Is tenant `id` in the snapshot, the `/proc` table, the Prometheus text, `lookup`?
fn reported(id: u32) -> [bool; 4] {
    let in_snapshot = report::snapshot().iter().any(|b| b.id == BcId(id));
    // The table starts each beancounter's first line with its id right-aligned in 10.
    let prefix = format!("{id:>10}: ");
    let in_table = report::user_beancounters()
        .lines()
        .any(|l| l.starts_with(&prefix));
    let label = format!("{{id=\"{id}\",");
    let in_prometheus = report::prometheus().contains(&label);
    [
        in_snapshot,
        in_table,
        in_prometheus,
        lookup(BcId(id)).is_some(),
    ]
}

/// A retired tenant (with leftovers, and with another handle still held) leaves the id map,
/// `lookup`, the snapshot, the `/proc` table and the Prometheus text at once; its parent
/// stays in them, and the same id created again is reported afresh.
fn reports_exclude_retired() {
    let parent = tenant(300);
    let child = parent.new_child(BcId(301)).unwrap();
    let other_handle = child.clone();
    let mut cache = Vec::with_capacity(SHAPES.len());
    {
        let _g = child.enter();
        allocate_shapes(&mut cache);
    }
    assert_eq!(reported(300), [true; 4]);
    assert_eq!(reported(301), [true; 4]);

    child.retire().unwrap();

    assert_eq!(
        reported(301),
        [false; 4],
        "snapshot, table, prometheus, lookup"
    );
    assert_eq!(reported(300), [true; 4]);
    assert_eq!(
        beancounter::stat(BcId(301), Resource::Memory),
        Err(BcError::NotFound(BcId(301)))
    );
    let limits = Limits::new(1 << 20, 2 << 20).unwrap();
    assert_eq!(
        beancounter::set_limits(BcId(301), Resource::Memory, limits),
        Err(BcError::NotFound(BcId(301)))
    );
    // The parent's row still shows the leftovers.
    let snap = report::snapshot();
    let row = snap.iter().find(|b| b.id == BcId(300)).unwrap();
    let mem = row.resource(Resource::Memory).unwrap().stat.held;
    assert_eq!(mem, sum(&cache).0);

    // Created again (top level this time): reported, fresh.
    let again = find_or_create(BcId(301)).unwrap();
    assert_eq!(reported(301), [true; 4]);
    let snap = report::snapshot();
    let row = snap.iter().find(|b| b.id == BcId(301)).unwrap();
    assert_eq!(row.parent, None);
    for r in &row.resources {
        assert_eq!(
            (r.stat.held, r.stat.maxheld, r.stat.failcnt),
            (0, 0, 0),
            "{r:?}"
        );
    }
    let sample = "beancounter_held{id=\"301\",resource=\"memory\"} 0\n";
    assert!(report::prometheus().contains(sample));

    drop((cache, other_handle, again));
    beancounter::reap();
    assert_eq!(beancounter::retired_count(), 0);
    beancounter::check_invariants().unwrap();
}

/// A worker thread enters C (G → P → C) and allocates; C is retired through another handle
/// while the worker is still inside. The worker keeps allocating, growing and freeing
/// (blocks from before and after the retirement): P's and G's `held` stay exactly what the
/// worker's live blocks were charged, the fresh tenant with C's id is never charged, and a
/// stale handle charges P. When the worker is done, everything is back to zero.
fn thread_inside_retired_tenant() {
    let g = tenant(400);
    let p = g.new_child(BcId(401)).unwrap();
    let c = p.new_child(BcId(402)).unwrap();
    let stale = c.clone();
    let steps = Arc::new(Barrier::new(2));
    // What the worker's live blocks were charged, published at each step.
    let live = Arc::new(Mutex::new((0u64, 0u64)));

    let worker = {
        let (c, steps, live) = (c.clone(), steps.clone(), live.clone());
        std::thread::spawn(move || {
            let mut before = Vec::with_capacity(3 * SHAPES.len());
            let mut after = Vec::with_capacity(3 * SHAPES.len());
            let guard = c.enter();
            for _ in 0..3 {
                allocate_shapes(&mut before);
            }
            *live.lock().unwrap() = sum(&before);
            steps.wait(); // 1: allocated before the retirement
            steps.wait(); // 2: C is retired
            assert_eq!(beancounter::current(), c, "the thread is still inside C");
            // Grow blocks from before (a page run, which may grow in place, charged through
            // C; a slab object, which moves and is charged to P), free a third of the rest,
            // allocate again, grow a new block, free some of the new ones.
            before[6].grow(300 << 10);
            before[3].grow(5000);
            let mut i = 0;
            before.retain(|_| {
                i += 1;
                i % 3 != 0
            });
            for _ in 0..3 {
                allocate_shapes(&mut after);
            }
            after[6].grow(200 << 10);
            after.truncate(after.len() - 4);
            *live.lock().unwrap() = add(sum(&before), sum(&after));
            steps.wait(); // 3: allocated after the retirement
            steps.wait(); // 4: checked
            drop(before);
            drop(after);
            drop(guard);
        })
    };

    steps.wait(); // 1
    let first = *live.lock().unwrap();
    assert_eq!(held(&p), first);
    assert_eq!(held(&g), first);
    let (p_threads, g_threads) = (
        p.stat(Resource::Threads).held,
        g.stat(Resource::Threads).held,
    );

    c.retire().unwrap();
    assert_eq!(held(&p), first, "retirement changed P's held");
    assert_eq!(held(&g), first, "retirement changed G's held");
    let fresh = p.new_child(BcId(402)).unwrap();
    assert_fresh(&fresh);
    steps.wait(); // 2

    steps.wait(); // 3
    let now = *live.lock().unwrap();
    assert_eq!(
        held(&p),
        now,
        "P's held differs from the worker's live blocks"
    );
    assert_eq!(
        held(&g),
        now,
        "G's held differs from the worker's live blocks"
    );
    assert_eq!(held(&fresh), (0, 0), "the fresh tenant was charged");
    // A stale handle: reads nothing, charges P (the nearest live ancestor).
    assert_eq!(stale.stat(Resource::Memory), ResourceStat::default());
    let charge = stale.charge(Resource::Threads, 2, Severity::Limit).unwrap();
    assert_eq!(charge.beancounter(), &p);
    assert_eq!(p.stat(Resource::Threads).held, p_threads + 2);
    assert_eq!(g.stat(Resource::Threads).held, g_threads + 2);
    assert_eq!(fresh.stat(Resource::Threads).held, 0);
    drop(charge);
    assert_eq!(p.stat(Resource::Threads).held, p_threads);
    beancounter::check_invariants().unwrap();
    steps.wait(); // 4

    worker.join().unwrap();
    assert_eq!(held(&p), (0, 0));
    assert_eq!(held(&g), (0, 0));
    assert_eq!(held(&fresh), (0, 0));
    no_uncharge_warnings(&[&g, &p, &fresh]);
    drop(stale);
    beancounter::reap();
    assert_eq!(beancounter::retired_count(), 0);
    beancounter::check_invariants().unwrap();
}

/// G → P → C → D; C is retired while D lives. D keeps its counters and stays in `lookup`;
/// what D allocates after the retirement is charged to D, then to P and G (C has no counters
/// any more), and never to the fresh tenant with C's id.
fn child_of_retired_tenant() {
    let g = tenant(500);
    let p = g.new_child(BcId(501)).unwrap();
    let c = p.new_child(BcId(502)).unwrap();
    let d = c.new_child(BcId(503)).unwrap();
    let mut blocks = Vec::with_capacity(2 * SHAPES.len());
    {
        let _g = d.enter();
        allocate_shapes(&mut blocks);
    }
    let x = sum(&blocks);
    assert_eq!((held(&d), held(&c), held(&p), held(&g)), (x, x, x, x));

    c.retire().unwrap();
    assert_eq!((held(&d), held(&p), held(&g)), (x, x, x));
    assert_eq!(lookup(BcId(503)).as_ref(), Some(&d), "the child stays");
    // Its parent is now where its charges go; and it cannot be retired under a retired
    // parent (bad input: an error naming the parent, nothing changes).
    assert_eq!(d.parent().as_ref(), Some(&p));
    let parent_in_snapshot = |id| {
        let snap = report::snapshot();
        snap.iter().find(|b| b.id == BcId(id)).map(|b| b.parent)
    };
    assert_eq!(parent_in_snapshot(503), Some(Some(BcId(501))));
    let ids = [500, 501, 502, 503];
    let before = state(&ids);
    assert_eq!(d.clone().retire(), Err(BcError::Retired(BcId(502))));
    assert_eq!(
        state(&ids),
        before,
        "retiring a child of a retired tenant changed something"
    );
    let fresh = p.new_child(BcId(502)).unwrap();
    assert_fresh(&fresh);
    {
        let _g = d.enter();
        allocate_shapes(&mut blocks);
    }
    let y = sum(&blocks);
    assert_eq!((held(&d), held(&p), held(&g)), (y, y, y));
    assert_eq!(held(&fresh), (0, 0));

    std::thread::spawn(move || drop(blocks)).join().unwrap();
    beancounter::drain_stock();
    assert_eq!((held(&d), held(&p), held(&g)), ((0, 0), (0, 0), (0, 0)));
    assert_eq!(held(&fresh), (0, 0));
    no_uncharge_warnings(&[&d, &p, &g, &fresh]);
    assert_eq!(beancounter::retired_count(), 1, "D still names C");
    drop(d); // the last reference on C's record
    beancounter::reap();
    assert_eq!(beancounter::retired_count(), 0);
    beancounter::check_invariants().unwrap();
}

/// Everything a bad call could disturb, through the public API (the root's own figures
/// move with this thread's allocations and are left out).
#[derive(Debug, PartialEq)]
struct State {
    live: u32,
    retired: u32,
    snapshot: Vec<report::BcSnapshot>,
    ids: Vec<(u32, bool)>,
    invariants: Result<(), &'static str>,
}

fn state(ids: &[u32]) -> State {
    let mut snapshot = report::snapshot();
    snapshot.retain(|b| b.id != BcId::ROOT);
    State {
        live: beancounter::live_count(),
        retired: beancounter::retired_count(),
        snapshot,
        ids: ids
            .iter()
            .map(|&i| (i, lookup(BcId(i)).is_some()))
            .collect(),
        invariants: beancounter::check_invariants(),
    }
}

/// Retiring the root, retiring a tenant already retired through another handle, creating a
/// child of a retired tenant, and changing a retired tenant's limits: each is its error, and
/// nothing changes.
fn bad_input() {
    let parent = tenant(600);
    let t = parent.new_child(BcId(601)).unwrap();
    let mut cache = Vec::with_capacity(SHAPES.len());
    {
        let _g = t.enter();
        allocate_shapes(&mut cache);
    }
    let ids = [600, 601, 602, 603];

    let before = state(&ids);
    assert_eq!(
        beancounter::root().retire(),
        Err(BcError::InvalidId(BcId::ROOT))
    );
    assert_eq!(state(&ids), before, "retiring the root changed something");
    let root = beancounter::root();
    assert_eq!(root.id(), BcId::ROOT);
    drop(root.charge(Resource::Threads, 1, Severity::Limit).unwrap());

    let handles = [t.clone(), t.clone(), t.clone()];
    t.retire().unwrap();
    let fresh = parent.new_child(BcId(601)).unwrap();
    let before = state(&ids);
    let [h1, h2, h3] = handles;
    assert_eq!(h1.retire(), Err(BcError::Retired(BcId(601))));
    assert_eq!(state(&ids), before, "retiring twice changed something");
    assert_eq!(
        lookup(BcId(601)).as_ref(),
        Some(&fresh),
        "the fresh tenant was retired"
    );

    assert_eq!(h2.new_child(BcId(602)), Err(BcError::Retired(BcId(601))));
    // Even with an id that exists elsewhere.
    assert_eq!(h2.new_child(BcId(600)), Err(BcError::Retired(BcId(601))));
    let limits = Limits::new(1 << 20, 2 << 20).unwrap();
    assert_eq!(
        h2.set_limits(Resource::Memory, limits),
        Err(BcError::Retired(BcId(601)))
    );
    assert_eq!(
        state(&ids),
        before,
        "a child of a retired tenant changed something"
    );
    // The refused id was not taken: it can be created now.
    let created = parent.new_child(BcId(602)).unwrap();
    assert_fresh(&created);
    assert_fresh(&fresh);

    drop((h2, h3, cache, created, fresh));
    beancounter::reap();
    assert_eq!(beancounter::retired_count(), 0);
    beancounter::check_invariants().unwrap();
}

/// `reap()` frees zombies (no handle left, charges given back) and retired records that
/// nothing refers to or is charged through, both kept meanwhile by what this thread's stock
/// holds of them; it frees neither while a block is still charged.
fn reap_frees_zombies_and_retired() {
    let zombie = tenant(700);
    let retiring = tenant(701);
    let mut blocks = Vec::with_capacity(2 * SHAPES.len());
    {
        let _g = zombie.enter();
        allocate_shapes(&mut blocks);
    }
    {
        let _g = retiring.enter();
        allocate_shapes(&mut blocks);
    }
    drop(zombie);
    retiring.retire().unwrap();
    assert_eq!(beancounter::live_count(), 1, "the zombie");
    assert_eq!(beancounter::retired_count(), 1);

    // Blocks still charged: nothing to reap.
    assert_eq!(beancounter::reap(), 0);
    assert_eq!(beancounter::live_count(), 1);
    assert_eq!(beancounter::retired_count(), 1);
    assert!(lookup(BcId(700)).is_some());

    // Freed on this thread: its stock now holds (part of) what both were charged, which
    // keeps both until something takes it back.
    blocks.clear();
    assert!(beancounter::live_count() <= 1);
    assert!(beancounter::retired_count() <= 1);
    let reaped = beancounter::reap();
    assert_eq!(beancounter::live_count(), 0, "reap left the zombie");
    assert_eq!(
        beancounter::retired_count(),
        0,
        "reap left the retired record"
    );
    // Both are counted: the zombie, and the retired record, which the uncharge that takes
    // this thread's stock back frees before the registry's own pass.
    assert_eq!(reaped, 2, "reap counts the zombie and the retired record");
    assert!(lookup(BcId(700)).is_none());
    assert_fresh(&find_or_create(BcId(701)).unwrap());
    beancounter::check_invariants().unwrap();
}

// ---- scale -------------------------------------------------------------------------------

/// Requests: a million in release, as the issue asks. A debug build runs the same loop with
/// a fifth of them, 200 times the table's capacity, so that `cargo test` stays within a few
/// seconds: a million took 9.3 s in a debug build on 2 vCPUs (measured), 200 000 take 2.4 s.
const REQUESTS: u32 = if cfg!(debug_assertions) {
    200_000
} else {
    1_000_000
};
/// Slots in the table for this check (root included).
const CAPACITY: u32 = 1000;
/// Long-lived tenants the requests are children of.
const PARENTS: u32 = 8;
/// Threads serving requests at once.
const WORKERS: u32 = 2;
const PARENT0: u32 = 800;
/// Request ids: worker `w` uses `FIRST + w * IDS .. FIRST + (w + 1) * IDS`, round robin, so
/// ids are created again while their previous holders' leftovers are still charged.
const FIRST: u32 = 1_000_000;
const IDS: u32 = 5_000;

/// One request: a child of `parent`, entered, a few blocks, one in four leaving a short
/// string in the shared cache; then the guard goes and the child is retired.
fn request(parent: &Beancounter, id: BcId, n: u32, cache: &Mutex<Vec<String>>) {
    let child = parent
        .new_child(id)
        .unwrap_or_else(|e| panic!("request {n}: creating child {id} failed: {e}"));
    {
        let _g = child.enter();
        let body = vec![n as u8; 100 + (n % 7) as usize * 40];
        let header = Box::new([n as u64; 6]);
        let mut key = String::with_capacity(24);
        use std::fmt::Write;
        write!(key, "request {n}").unwrap();
        std::hint::black_box((&body, &header));
        if n % 4 == 0 {
            // Room was reserved: the push does not allocate.
            cache.lock().unwrap().push(key);
        }
    }
    child.retire().unwrap();
}

fn million_request_children() {
    // Read when the first tenant is created: below.
    std::env::set_var("BEANCOUNTER_CAPACITY", CAPACITY.to_string());
    let parents: Vec<Beancounter> = (0..PARENTS).map(|i| tenant(PARENT0 + i)).collect();
    assert_eq!(beancounter::capacity(), CAPACITY, "capacity not applied");
    let cache = Arc::new(Mutex::new(Vec::with_capacity(REQUESTS as usize / 4 + 1)));
    let (rss0, _) = common::statm();
    let start = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (parents, cache) = (parents.clone(), cache.clone());
            std::thread::spawn(move || {
                let mut max_live = 0;
                let mut max_retired = 0;
                for n in (w..REQUESTS).step_by(WORKERS as usize) {
                    let id = BcId(FIRST + w * IDS + (n / WORKERS) % IDS);
                    request(&parents[(n % PARENTS) as usize], id, n, &cache);
                    if n % 1024 < WORKERS {
                        // Live now: the parents and at most the other worker's request.
                        let live = beancounter::live_count();
                        assert!(
                            (PARENTS..PARENTS + WORKERS).contains(&live),
                            "after request {n}: {live} live"
                        );
                        max_live = max_live.max(live);
                        max_retired = max_retired.max(beancounter::retired_count());
                    }
                }
                (max_live, max_retired)
            })
        })
        .collect();
    let maxima: Vec<(u32, u32)> = workers
        .into_iter()
        .map(|h| h.join().expect("a worker failed"))
        .collect();
    let secs = start.elapsed().as_secs_f64();
    let (rss1, _) = common::statm();

    // The workers have exited (their stocks are given back): the only charges left are
    // the cached strings, on the parents, through one retired record each.
    let mut cache = Arc::try_unwrap(cache).unwrap().into_inner().unwrap();
    let leftovers = cache.len() as u32;
    assert_eq!(leftovers, REQUESTS.div_ceil(4));
    let mut expected = (0, 0);
    for s in &cache {
        expected = add(
            expected,
            (charged_bytes(Layout::array::<u8>(s.capacity()).unwrap()), 1),
        );
    }
    let on_parents = parents.iter().map(held).fold((0, 0), add);
    assert_eq!(
        on_parents, expected,
        "the parents hold other than the leftovers"
    );
    assert_eq!(beancounter::live_count(), PARENTS);
    let retired = beancounter::retired_count();
    assert_eq!(
        retired, leftovers,
        "one record per retired tenant with a leftover, none for the others"
    );
    let kept = retired as u64 * RECORD_BYTES;
    // Measured: resident growth over the run, less the leftovers' own bytes and the cache's
    // slots for them. What is left is the registry's records, the tag arrays of slabs whose
    // objects belong to many tenants, and whatever else the run left resident.
    let cache_slots = leftovers as u64 * std::mem::size_of::<String>() as u64;
    let grown = rss1 as i64 - rss0 as i64 - expected.0 as i64 - cache_slots as i64;
    let per_tenant = grown / leftovers as i64;
    println!(
        "    {REQUESTS} requests in {secs:.2} s ({:.2} us each, {WORKERS} threads), \
         table of {CAPACITY}: max live {}, max retired {}",
        secs * 1e6 / REQUESTS as f64,
        maxima.iter().map(|m| m.0).max().unwrap(),
        maxima.iter().map(|m| m.1).max().unwrap(),
    );
    println!(
        "    {leftovers} retired tenants with leftovers keep {retired} records of \
         {RECORD_BYTES} B ({kept} B); resident growth besides the leftovers: {grown} B, \
         {per_tenant} B per retired tenant with leftovers"
    );
    // A slot (2 496 B) kept per retired tenant, or anything else of that order, would be
    // far above this bound; the record is 64 B (measured: 56 to 64 B of growth per tenant;
    // the slack is for resident memory that moves in 2 MiB steps with huge pages).
    // Under a sanitizer RSS counts the sanitizer's own memory (see `short_threads.rs`).
    if std::env::var_os("BEANCOUNTER_SANITIZER").is_none() {
        assert!(
            per_tenant < 8 * RECORD_BYTES as i64,
            "{per_tenant} B resident per retired tenant with leftovers"
        );
    }

    // Free the cache here (another thread than the workers'): everything back to zero.
    cache.clear();
    beancounter::drain_stock();
    beancounter::reap();
    for p in &parents {
        assert_eq!(held(p), (0, 0), "tenant {}", p.id());
    }
    no_uncharge_warnings(&parents.iter().collect::<Vec<_>>());
    assert_eq!(beancounter::retired_count(), 0);
    assert_eq!(beancounter::live_count(), PARENTS);
    beancounter::check_invariants().unwrap();
    drop(parents);
    assert_eq!(beancounter::live_count(), 0);
}
