//! Stress (DESIGN §6.1–6.3): a million mixed operations — alloc, alloc_zeroed, realloc, local
//! and cross-thread frees — on four threads and six tenants (one a child of another, one with
//! a limit), every block carrying a canary. No corruption, nothing refused below a limit, the
//! limited tenant never above its limit, and afterwards every tenant's `Memory` and
//! `Allocations` exactly back to where they started.

mod common;

use beancounter::{BcId, BeanAlloc, Beancounter, Limits, Resource};
use common::{fill, held, tenant, verify, verify_prefix, Rng, Runner, SendPtr};
use std::alloc::{GlobalAlloc, Layout};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Barrier};
use std::time::Instant;

#[global_allocator]
static ALLOC: BeanAlloc = BeanAlloc::new();

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const THREADS: usize = 4;
/// Operations per thread: 4 × 250 000 = 10^6.
const OPS: usize = 250_000;
/// Live blocks a thread keeps at most.
const MAX_LIVE: usize = 2048;
/// Index of the tenant with a limit, and the limit.
const LIMITED: usize = 4;
const LIMIT: u64 = 4 * MIB as u64;

fn main() {
    let mut r = Runner::new();
    // In a child process: a null from the allocator aborts, and should fail this check with
    // its message, not take the binary down silently.
    r.isolated(
        "million_mixed_operations_leave_every_tenant_exact",
        120,
        stress,
    );
    r.finish();
}

/// A live block: where, its layout, its canary tag, and the tenant index it was charged to.
#[derive(Clone, Copy)]
struct Block {
    p: SendPtr,
    layout: Layout,
    tag: u64,
}

fn random_layout(rng: &mut Rng) -> Layout {
    let size = match rng.below(10_000) {
        0..=8_999 => 1 + rng.below(256),
        9_000..=9_799 => 257 + rng.below(32 * KIB as u64 - 256),
        9_800..=9_994 => 32 * KIB as u64 + 1 + rng.below(256 * KIB as u64),
        _ => 2 * MIB as u64 + 1 + rng.below(2 * MIB as u64),
    } as usize;
    let align = match rng.below(100) {
        0..=79 => 8,
        80..=89 => 16,
        90..=97 => 1 << rng.below(13),
        _ => 1 << rng.below(17),
    };
    Layout::from_size_align(size, align).unwrap()
}

/// What a worker saw go wrong (recorded without allocating, reported after its guards).
#[derive(Default, Debug)]
struct Report {
    ops: u64,
    allocs: u64,
    reallocs: u64,
    sent: u64,
    received: u64,
    refused_limited: u64,
    refused_unlimited: u64,
    corrupt: u64,
    misaligned: u64,
    not_zero: u64,
    first_error: Option<(&'static str, usize, Layout)>,
}

impl Report {
    fn error(&mut self, what: &'static str, at: usize, layout: Layout) {
        self.first_error.get_or_insert((what, at, layout));
    }
}

struct Worker {
    id: usize,
    rng: Rng,
    live: Vec<Block>,
    outboxes: Vec<SyncSender<Block>>,
    inbox: Receiver<Block>,
    tenants: Vec<Beancounter>,
    next_tag: u64,
    report: Report,
}

impl Worker {
    fn tag(&mut self) -> u64 {
        self.next_tag += 1;
        (self.id as u64) << 48 | self.next_tag
    }

    /// Checks a block's canary before it is freed, moved or handed on.
    fn check(&mut self, b: &Block) {
        // SAFETY: a live block of `b.layout.size()` bytes, owned by this thread now.
        if let Err(at) = unsafe { verify(b.p.0, b.layout.size(), b.tag) } {
            self.report.corrupt += 1;
            self.report.error("canary", at, b.layout);
        }
    }

    fn free(&mut self, b: Block) {
        self.check(&b);
        // SAFETY: allocated with `b.layout`, owned by this thread now.
        unsafe { ALLOC.dealloc(b.p.0, b.layout) };
    }

    fn alloc(&mut self, tenant: usize, zeroed: bool) {
        let layout = random_layout(&mut self.rng);
        // SAFETY: a non-zero size.
        let p = unsafe {
            if zeroed {
                ALLOC.alloc_zeroed(layout)
            } else {
                ALLOC.alloc(layout)
            }
        };
        if p.is_null() {
            if tenant == LIMITED {
                self.report.refused_limited += 1;
            } else {
                self.report.refused_unlimited += 1;
                self.report.error("null below any limit", 0, layout);
            }
            return;
        }
        self.report.allocs += 1;
        if p as usize % layout.align() != 0 {
            self.report.misaligned += 1;
            self.report.error("misaligned", p as usize, layout);
        }
        // SAFETY: a fresh block of `layout.size()` bytes.
        if zeroed && !unsafe { common::all_zero(p, layout.size()) } {
            self.report.not_zero += 1;
            self.report.error("alloc_zeroed not zero", 0, layout);
        }
        let tag = self.tag();
        // SAFETY: as above.
        unsafe { fill(p, layout.size(), tag) };
        self.live.push(Block {
            p: SendPtr(p),
            layout,
            tag,
        });
    }

    fn realloc(&mut self, tenant: usize) {
        let i = self.rng.below(self.live.len() as u64) as usize;
        let b = self.live[i];
        self.check(&b);
        let to = random_layout(&mut self.rng).size();
        // SAFETY: a live block with its layout; `to` is a valid size for its alignment.
        let q = unsafe { ALLOC.realloc(b.p.0, b.layout, to) };
        if q.is_null() {
            // Refused: the old block is untouched and still ours.
            if tenant == LIMITED {
                self.report.refused_limited += 1;
            } else {
                self.report.refused_unlimited += 1;
                self.report
                    .error("realloc null below any limit", 0, b.layout);
            }
            return;
        }
        self.report.reallocs += 1;
        let layout = Layout::from_size_align(to, b.layout.align()).unwrap();
        if q as usize % layout.align() != 0 {
            self.report.misaligned += 1;
            self.report.error("realloc misaligned", q as usize, layout);
        }
        let keep = b.layout.size().min(to);
        // SAFETY: `q` holds `to` bytes, the first `keep` of them kept from the old block.
        if let Err(at) = unsafe { verify_prefix(q, b.layout.size(), keep, b.tag) } {
            self.report.corrupt += 1;
            self.report.error("realloc lost contents", at, layout);
        }
        let tag = self.tag();
        // SAFETY: as above.
        unsafe { fill(q, to, tag) };
        self.live[i] = Block {
            p: SendPtr(q),
            layout,
            tag,
        };
    }

    fn send(&mut self) {
        let i = self.rng.below(self.live.len() as u64) as usize;
        let b = self.live.swap_remove(i);
        self.check(&b);
        let to = (self.id + 1 + self.rng.below(THREADS as u64 - 1) as usize) % THREADS;
        if let Err(e) = self.outboxes[to].try_send(b) {
            // That inbox is full: free it here instead.
            let (std::sync::mpsc::TrySendError::Full(b)
            | std::sync::mpsc::TrySendError::Disconnected(b)) = e;
            self.free(b);
        } else {
            self.report.sent += 1;
        }
    }

    /// Takes up to `max` blocks other threads sent: frees half, keeps the rest.
    fn receive(&mut self, max: usize) {
        for _ in 0..max {
            let Ok(b) = self.inbox.try_recv() else { return };
            self.report.received += 1;
            if self.live.len() < MAX_LIVE && self.rng.below(2) == 0 {
                self.check(&b);
                self.live.push(b);
            } else {
                self.free(b);
            }
        }
    }

    fn run(&mut self, start: &Barrier, stop_sending: &Barrier, done: &Barrier) {
        start.wait();
        let mut current = self.rng.below(self.tenants.len() as u64) as usize;
        let tenants = self.tenants.clone();
        let mut guard = Some(tenants[current].enter());
        for _ in 0..OPS {
            self.report.ops += 1;
            if self.rng.below(64) == 0 {
                // Switch tenant: blocks allocated so far stay charged to their owners.
                drop(guard.take());
                current = self.rng.below(tenants.len() as u64) as usize;
                guard = Some(tenants[current].enter());
            }
            let full = self.live.len() >= MAX_LIVE;
            match self.rng.below(100) {
                _ if self.live.is_empty() => self.alloc(current, false),
                0..=36 if !full => self.alloc(current, false),
                37..=39 if !full => self.alloc(current, true),
                40..=64 => {
                    let i = self.rng.below(self.live.len() as u64) as usize;
                    let b = self.live.swap_remove(i);
                    self.free(b);
                }
                65..=79 => self.send(),
                80..=89 => self.realloc(current),
                _ => self.receive(8),
            }
        }
        drop(guard);
        // Everyone stops sending; then inboxes are emptied and live blocks freed, from the
        // root, wherever they were allocated.
        stop_sending.wait();
        self.receive(usize::MAX);
        for b in std::mem::take(&mut self.live) {
            self.free(b);
        }
        done.wait();
    }
}

fn stress() {
    let root_children: Vec<Beancounter> = (1..=5).map(tenant).collect();
    let child = root_children[0].new_child(BcId(16)).expect("child tenant");
    let mut tenants = root_children.clone();
    tenants.push(child);
    tenants[LIMITED]
        .set_limits(Resource::Memory, Limits::new(LIMIT, LIMIT).unwrap())
        .unwrap();
    let start: Vec<(u64, u64)> = tenants.iter().map(held).collect();

    let (senders, receivers): (Vec<_>, Vec<_>) = (0..THREADS).map(|_| sync_channel(4096)).unzip();
    let barriers = (
        Arc::new(Barrier::new(THREADS)),
        Arc::new(Barrier::new(THREADS)),
        Arc::new(Barrier::new(THREADS)),
    );
    let began = Instant::now();
    let handles: Vec<_> = receivers
        .into_iter()
        .enumerate()
        .map(|(id, inbox)| {
            let mut w = Worker {
                id,
                rng: Rng::new(id as u64 + 1234),
                live: Vec::with_capacity(MAX_LIVE + 1),
                outboxes: senders.clone(),
                inbox,
                tenants: tenants.clone(),
                next_tag: 0,
                report: Report::default(),
            };
            let (a, b, c) = (barriers.0.clone(), barriers.1.clone(), barriers.2.clone());
            std::thread::spawn(move || {
                w.run(&a, &b, &c);
                beancounter::drain_stock();
                w.report
            })
        })
        .collect();
    drop(senders);
    let reports: Vec<Report> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    let secs = began.elapsed().as_secs_f64();

    let total_ops: u64 = reports.iter().map(|r| r.ops).sum();
    let sum = |f: fn(&Report) -> u64| reports.iter().map(f).sum::<u64>();
    println!(
        "    {total_ops} operations in {secs:.1} s: {} allocs, {} reallocs, {} sent, {} received, \
         {} refused (limited tenant)",
        sum(|r| r.allocs),
        sum(|r| r.reallocs),
        sum(|r| r.sent),
        sum(|r| r.received),
        sum(|r| r.refused_limited),
    );
    for (i, r) in reports.iter().enumerate() {
        assert_eq!(
            (r.corrupt, r.misaligned, r.not_zero, r.refused_unlimited),
            (0, 0, 0, 0),
            "thread {i}: first error {:?}",
            r.first_error
        );
    }
    assert!(total_ops >= 1_000_000);
    assert!(sum(|r| r.received) > 10_000, "too few cross-thread frees");

    // Every block is freed and every thread has exited (their stocks given back): each
    // tenant holds exactly what it held before, and no uncharge was clamped.
    for (i, t) in tenants.iter().enumerate() {
        assert_eq!(held(t), start[i], "tenant {:?}", t.id());
        for r in [Resource::Memory, Resource::Allocations] {
            assert_eq!(t.uncharge_warnings(r), 0, "tenant {:?} {r:?}", t.id());
        }
    }
    let limited = tenants[LIMITED].stat(Resource::Memory);
    assert!(limited.maxheld <= LIMIT, "limited tenant: {limited:?}");
    // The parent saw its child's charges: its maxheld covers at least the child's.
    assert!(tenants[0].stat(Resource::Memory).maxheld >= tenants[5].stat(Resource::Memory).maxheld);
    beancounter::check_heap().unwrap();
    // The raw counters (stocks included) are zero too: with the last handle gone, every
    // tenant is freed rather than kept as a zombie with a charge.
    drop((tenants, root_children));
    for id in [1, 2, 3, 4, 5, 16] {
        assert!(
            beancounter::lookup(BcId(id)).is_none(),
            "tenant {id} outlived its handles: something is still charged to it"
        );
    }
}
