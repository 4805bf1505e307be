//! Ten thousand short threads (DESIGN §6.3, §6.4, §7), eight at a time, each with a tenant of
//! its own: a thread creates a child (sometimes a grandchild) of one long-lived parent,
//! allocates for it, frees most of it, and leaves the rest in a mailbox for a later thread
//! to free; then it drops its handles and exits, leaving its tenant charged (a zombie) until
//! those objects are freed and the slot is reaped. Half the threads are started with the
//! crate's wrapper into the parent (they find it as `current()`), half with `std::thread`.
//!
//! The table has 256 slots here, so the 13 000 tenants only fit if slots are given back: a
//! failure to reap shows as `TableFull` within a few dozen threads, and as growth of
//! `live_count()` between the marks. Between the first 1 000 threads and the last, mapped
//! bytes and RSS must stay flat: heaps and slabs of exited threads are reused.

mod common;

use beancounter::{BcId, BeanAlloc, Beancounter, Limits, Resource};
use common::{charged_bytes, fill, held, statm, tenant, verify, Rng, Runner, SendPtr};
use std::alloc::{GlobalAlloc, Layout};
use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

#[global_allocator]
static A: BeanAlloc = BeanAlloc::new();

const MIB: usize = 1 << 20;
const THREADS: usize = 10_000;
const AT_ONCE: usize = 8;
/// Where the first mark is taken (and every later one, for the figures).
const EARLY: usize = 1_000;
/// Beancounter slots, root included: `BEANCOUNTER_CAPACITY` for this process.
const CAPACITY: u32 = 256;
/// The long-lived parent; the threads' tenants are numbered from `FIRST`.
const PARENT: u32 = 90;
const FIRST: u32 = 100_000;
/// Parcels in the mailbox before a thread takes one: a thread's leftovers are freed about
/// six batches later, by a thread that never saw it.
const BACKLOG: usize = 48;
/// Objects a thread leaves in its parcel.
const KEEP: usize = 6;
/// Growth allowed between the marks (measured: none). Mapped: two 4 MiB segments, the fully
/// free one the allocator keeps cached and one for slabs that the parcels in flight keep
/// alive elsewhere than at the first mark. RSS: the 16 MiB of free dirty pages the allocator
/// keeps before purging (README, "Memory back to the OS"), plus one segment. These bound
/// slack the allocator is allowed, not growth with the number of threads: a leak of one page
/// per thread (36 MiB over the 9 000 threads between the marks) fails.
const MAPPED_SLACK: usize = 8 * MIB;
const RSS_SLACK: usize = 20 * MIB;

fn main() {
    let mut r = Runner::new();
    // In a child process: the table's capacity is read once per process, and an abort
    // should fail the check, not the binary.
    r.isolated(
        "ten_thousand_short_threads_leave_memory_and_the_table_flat",
        600,
        short_threads,
    );
    r.finish();
}

type Blocks = Vec<(SendPtr, Layout, u64)>;

/// What one thread left behind: objects charged to its tenant, which it dropped.
struct Parcel {
    owner: BcId,
    blocks: Blocks,
}

type Mailbox = Arc<Mutex<VecDeque<Parcel>>>;

/// What a thread allocates: slab objects first (the parcel keeps the first [`KEEP`]), now and
/// then a large run (kept in the parcel in every other such thread) and a huge block.
fn plan(rng: &mut Rng, i: usize) -> Vec<Layout> {
    let mut sizes: Vec<usize> = (0..20).map(|_| 8 + rng.below(2041) as usize).collect();
    if i % 4 == 0 {
        sizes.push(4096 + rng.below(28 << 10) as usize);
    }
    if i % 8 == 0 {
        let large = (40 << 10) + rng.below(216 << 10) as usize;
        if i % 16 == 0 {
            sizes.insert(0, large);
        } else {
            sizes.push(large);
        }
    }
    if i % 64 == 0 {
        sizes.push(2 * MIB + 1 + rng.below(MIB as u64) as usize);
    }
    sizes
        .into_iter()
        .map(|s| Layout::from_size_align(s, 8).unwrap())
        .collect()
}

/// Checks each object's canary and frees it.
fn free_checked(blocks: impl Iterator<Item = (SendPtr, Layout, u64)>) {
    for (p, l, tag) in blocks {
        // SAFETY: a live object of `l.size()` bytes, handed over to this thread.
        let intact = unsafe { verify(p.0, l.size(), tag) };
        assert_eq!(
            intact,
            Ok(()),
            "an object of {l:?} left for another thread was damaged"
        );
        // SAFETY: allocated with `l`, freed once.
        unsafe { A.dealloc(p.0, l) };
    }
}

/// Frees a parcel an earlier thread left. When `look`, looks its tenant up (reviving the
/// zombie): it must hold nothing now, and be gone once that handle is dropped.
fn free_parcel(p: Parcel, look: bool) {
    free_checked(p.blocks.into_iter());
    if !look {
        return;
    }
    let zombie = beancounter::lookup(p.owner).expect("a tenant with objects charged was freed");
    assert_eq!(
        held(&zombie),
        (0, 0),
        "tenant {} after its objects were freed",
        p.owner
    );
    // This thread owes the uncharges of those frees to the tenant in a batch (a debt), and a
    // slot with anything charged, debts included, outlives its last handle: pay it first.
    beancounter::drain_stock();
    drop(zombie);
    assert!(
        beancounter::lookup(p.owner).is_none(),
        "tenant {} holds nothing and has no handle, but lives on",
        p.owner
    );
}

/// The body of thread `i`, working under `parent`.
fn thread_main(i: usize, parent: Beancounter, mailbox: Mailbox) {
    let mut rng = Rng::new(i as u64 + 1);
    let id = BcId(FIRST + i as u32);
    let child = parent
        .new_child(id)
        .unwrap_or_else(|e| panic!("thread {i}: creating {id}: {e} (slots are not reaped?)"));
    let grandchild = (i % 3 == 0).then(|| {
        let id = BcId(FIRST + (THREADS + i) as u32);
        child
            .new_child(id)
            .unwrap_or_else(|e| panic!("creating {id}: {e}"))
    });
    let owner = grandchild.as_ref().unwrap_or(&child);
    // Everything the thread keeps for itself is allocated before it enters its tenant, so the
    // tenant holds exactly its objects.
    let plan = plan(&mut rng, i);
    let charges: Vec<u64> = plan.iter().map(|&l| charged_bytes(l)).collect();
    let mut blocks: Blocks = Vec::with_capacity(plan.len());
    let taken = {
        let mut m = mailbox.lock().unwrap();
        if m.len() >= BACKLOG {
            m.pop_front()
        } else {
            None
        }
    };
    let g = owner.enter();
    for (k, &l) in plan.iter().enumerate() {
        // SAFETY: a non-zero size.
        let p = unsafe { A.alloc(l) };
        assert!(!p.is_null(), "thread {i}: alloc({l:?}) returned null");
        let tag = (i as u64) << 8 | k as u64;
        // SAFETY: a fresh block of `l.size()` bytes.
        unsafe { fill(p, l.size(), tag) };
        blocks.push((SendPtr(p), l, tag));
    }
    let all = (charges.iter().sum::<u64>(), plan.len() as u64);
    assert_eq!(held(owner), all, "thread {i}: a fresh tenant's objects");
    if let Some(p) = taken {
        // Freeing another tenant's objects while this one is current changes only theirs.
        free_parcel(p, i % 4 == 0);
        assert_eq!(
            held(owner),
            all,
            "thread {i}: freeing another tenant's objects"
        );
    }
    free_checked(blocks.drain(KEEP..));
    let kept = (charges[..KEEP].iter().sum::<u64>(), KEEP as u64);
    assert_eq!(
        held(owner),
        kept,
        "thread {i}: after freeing all but the parcel"
    );
    drop(g);
    let owner = owner.id();
    mailbox.lock().unwrap().push_back(Parcel { owner, blocks });
    // The tenants' handles go with the thread; their charges stay until the parcel is freed.
}

/// Starts thread `i`: even ones with the crate's wrapper into `parent` (counted in its
/// `Threads`), odd ones with `std::thread`, in the root.
fn start(i: usize, parent: &Beancounter, mailbox: &Mailbox) -> JoinHandle<()> {
    let mailbox = mailbox.clone();
    if i % 2 == 1 {
        let parent = parent.clone();
        return std::thread::spawn(move || {
            assert_eq!(beancounter::current_id(), BcId::ROOT);
            thread_main(i, parent, mailbox)
        });
    }
    let _fork = parent.enter();
    // What the spawn allocates here is the root's, not the parent's.
    let _exec = beancounter::root().enter_exec();
    let want = parent.id();
    beancounter::thread::spawn(move || {
        assert_eq!(
            beancounter::current_id(),
            want,
            "a thread started outside its parent"
        );
        thread_main(i, beancounter::current(), mailbox)
    })
    .expect("spawn into the parent")
}

/// After `threads` threads: slots reaped now, live beancounters, mapped bytes, RSS.
#[derive(Debug)]
struct Mark {
    threads: usize,
    reaped: u32,
    live: u32,
    mapped: usize,
    rss: usize,
}

impl Mark {
    fn take(threads: usize) -> Mark {
        let reaped = beancounter::reap();
        Mark {
            threads,
            reaped,
            live: beancounter::live_count(),
            mapped: beancounter::mapped_bytes(),
            rss: statm().0,
        }
    }
}

fn short_threads() {
    // Read when the first tenant is created: in this child process, that is below.
    std::env::set_var("BEANCOUNTER_CAPACITY", CAPACITY.to_string());
    let parent = tenant(PARENT);
    assert_eq!(
        beancounter::capacity(),
        CAPACITY,
        "BEANCOUNTER_CAPACITY was not applied"
    );
    let at_once = AT_ONCE as u64;
    let limits = Limits::new(at_once, at_once).unwrap();
    parent.set_limits(Resource::Threads, limits).unwrap();
    let start_held = held(&parent);
    let mailbox: Mailbox = Arc::new(Mutex::new(VecDeque::with_capacity(BACKLOG + 2 * AT_ONCE)));
    let mut marks = Vec::new();
    for first in (0..THREADS).step_by(AT_ONCE) {
        let batch: Vec<_> = (first..first + AT_ONCE)
            .map(|i| start(i, &parent, &mailbox))
            .collect();
        for h in batch {
            h.join().expect("a short thread failed");
        }
        if (first + AT_ONCE) % EARLY == 0 {
            marks.push(Mark::take(first + AT_ONCE));
        }
    }
    for m in &marks {
        println!(
            "    after {:>5} threads: reaped {:>3}, live {:>3}, mapped {:>3} MiB, rss {:>3} MiB",
            m.threads,
            m.reaped,
            m.live,
            m.mapped / MIB,
            m.rss / MIB
        );
    }
    let (early, last) = (&marks[0], &marks[marks.len() - 1]);
    // At a mark, live are the parent and the tenants (two for every third thread) whose
    // parcels wait in the mailbox: about BACKLOG of them, whatever the number of threads.
    let bound = 1 + 2 * (BACKLOG + AT_ONCE) as u32;
    assert!(
        early.live <= bound && last.live <= early.live + 2 * AT_ONCE as u32,
        "the beancounter table grows: {early:?} -> {last:?}"
    );
    assert!(
        last.mapped <= early.mapped + MAPPED_SLACK,
        "mapped bytes grow: {early:?} -> {last:?}"
    );
    // Under AddressSanitizer (.ci/asan sets BEANCOUNTER_SANITIZER) every thread leaves
    // ASan's own memory behind (batches of its malloc quarantine, measured), which
    // RSS counts and this crate cannot return; the crate's own pages are `mapped` above.
    if std::env::var_os("BEANCOUNTER_SANITIZER").is_none() {
        assert!(
            last.rss <= early.rss + RSS_SLACK,
            "RSS grows: {early:?} -> {last:?}"
        );
    } else {
        println!("    RSS not checked under a sanitizer (it counts the sanitizer's memory)");
    }

    // The last parcels, from here; then nothing is left but the parent, as it was.
    let left: Vec<Parcel> = mailbox.lock().unwrap().drain(..).collect();
    for (k, p) in left.into_iter().enumerate() {
        free_parcel(p, k % 2 == 0);
    }
    // Pay what this thread owes for those frees (see `free_parcel`), so nothing is charged.
    beancounter::drain_stock();
    beancounter::reap();
    assert_eq!(beancounter::live_count(), 1, "only the parent is left");
    assert_eq!(held(&parent), start_held);
    let threads = parent.stat(Resource::Threads);
    assert_eq!((threads.held, threads.failcnt), (0, 0), "{threads:?}");
    assert!(threads.maxheld <= at_once, "{threads:?}");
    for r in [Resource::Memory, Resource::Allocations] {
        assert_eq!(parent.uncharge_warnings(r), 0, "{r}");
    }
    beancounter::check_invariants().unwrap();
    drop(parent);
    assert_eq!(beancounter::live_count(), 0);
    assert!(beancounter::lookup(BcId(PARENT)).is_none());
}
