//! Threads and the allocator (DESIGN §6.2, §6.3, §7): objects outlive the thread (and the
//! tenant guard) that allocated them and are uncharged from their owner wherever they are
//! freed; a thread's heap and stock are handed back at exit and reused; 1 000 short-lived
//! threads leave mapped bytes and RSS flat.

mod common;

use beancounter::{BeanAlloc, Beancounter, Limits, Resource};
use common::{fill, held, tenant, verify, Rng, Runner, SendPtr};
use std::alloc::{GlobalAlloc, Layout};
use std::sync::mpsc;

#[global_allocator]
static ALLOC: BeanAlloc = BeanAlloc::new();

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

fn main() {
    let mut r = Runner::new();
    // Each check in a child process: a null from the allocator aborts, and should fail one
    // check, not the binary.
    r.isolated(
        "objects_outlive_their_thread_and_are_freed_elsewhere",
        60,
        outlive_thread,
    );
    r.isolated(
        "a_free_uncharges_the_owner_not_the_current_tenant",
        60,
        free_uncharges_owner,
    );
    r.isolated("an_exited_threads_stock_is_given_back", 60, exited_stock);
    r.isolated(
        "a_heap_adopted_with_a_full_slab_serves_its_class",
        60,
        adopt_full_slab,
    );
    r.isolated(
        "thousand_short_lived_threads_leave_memory_flat",
        120,
        thousand_threads,
    );
    r.finish();
}

/// Sizes on every route: slab classes, large runs, huge mappings.
fn layouts(rng: &mut Rng, n: usize) -> Vec<Layout> {
    (0..n)
        .map(|_| {
            let size = match rng.below(1000) {
                0..=849 => 1 + rng.below(1024),
                850..=949 => 1 + rng.below(32 * KIB as u64),
                950..=996 => 32 * KIB as u64 + 1 + rng.below(512 * KIB as u64),
                _ => 2 * MIB as u64 + 1 + rng.below(2 * MIB as u64),
            } as usize;
            Layout::from_size_align(size, 1 << rng.below(7)).unwrap()
        })
        .collect()
}

type Blocks = Vec<(SendPtr, Layout, u64)>;

/// Allocates `layouts` (under whatever tenant is current), each with its canary, into `out`
/// (allocated by the caller, so that its own block is charged where the caller wants).
fn allocate_into(out: &mut Blocks, layouts: &[Layout], tag0: u64) {
    for (i, &l) in layouts.iter().enumerate() {
        // SAFETY: a non-zero size.
        let p = unsafe { ALLOC.alloc(l) };
        assert!(!p.is_null(), "alloc({l:?}) returned null");
        // SAFETY: a fresh block of `l.size()` bytes.
        unsafe { fill(p, l.size(), tag0 + i as u64) };
        out.push((SendPtr(p), l, tag0 + i as u64));
    }
}

/// [`allocate_into`] a new vector.
fn allocate(layouts: &[Layout], tag0: u64) -> Blocks {
    let mut out = Vec::with_capacity(layouts.len());
    allocate_into(&mut out, layouts, tag0);
    out
}

/// Checks each block's canary and frees it.
fn verify_and_free(blocks: Blocks) {
    for (p, l, tag) in blocks {
        // SAFETY: a live block of `l.size()` bytes.
        let intact = unsafe { verify(p.0, l.size(), tag) };
        assert_eq!(intact, Ok(()), "{l:?} corrupted");
        // SAFETY: allocated with `l`.
        unsafe { ALLOC.dealloc(p.0, l) };
    }
}

/// Threads under tenant A allocate on every route and exit, leaving their heaps (slabs with
/// live objects) abandoned; new threads adopt those heaps and allocate the same classes while
/// the old objects are alive (no overlap: every canary survives); threads under tenant B
/// free the old objects. A goes back to exactly zero and B is never charged for A's objects.
fn outlive_thread() {
    let (a, b) = (tenant(1), tenant(2));
    let mut rng = Rng::new(1);
    let plans: Vec<Vec<Layout>> = (0..4).map(|_| layouts(&mut rng, 3000)).collect();
    let producers: Vec<_> = plans
        .into_iter()
        .enumerate()
        .map(|(i, plan)| {
            let a = a.clone();
            std::thread::spawn(move || {
                let mut blocks = Vec::with_capacity(plan.len());
                let g = a.enter();
                allocate_into(&mut blocks, &plan, i as u64 * 1_000_000);
                drop(g);
                blocks
            })
        })
        .collect();
    let produced: Vec<Blocks> = producers.into_iter().map(|h| h.join().unwrap()).collect();
    let a_live = held(&a);
    assert_eq!(a_live.1, 12_000, "A holds {a_live:?}");

    // New threads (adopting the abandoned heaps) allocate the same mix while the old
    // objects live, then the old objects are checked and freed under B, half of them by the
    // new threads and half by others.
    let (tx, rx) = mpsc::channel::<Blocks>();
    let mut adopters = Vec::new();
    for (i, blocks) in produced.into_iter().enumerate() {
        let (b, tx) = (b.clone(), tx.clone());
        let mut rng = Rng::new(100 + i as u64);
        let plan = layouts(&mut rng, 3000);
        adopters.push(std::thread::spawn(move || {
            let mine = allocate(&plan, 50_000_000 + i as u64 * 1_000_000);
            let (keep, give): (Blocks, Blocks) = {
                let mut keep = Vec::with_capacity(blocks.len());
                let mut give = Vec::with_capacity(blocks.len());
                for (n, blk) in blocks.into_iter().enumerate() {
                    if n % 2 == 0 {
                        keep.push(blk)
                    } else {
                        give.push(blk)
                    }
                }
                (keep, give)
            };
            tx.send(give).unwrap();
            let g = b.enter();
            verify_and_free(keep);
            drop(g);
            verify_and_free(mine);
        }));
    }
    drop(tx);
    let freers: Vec<_> = rx
        .into_iter()
        .map(|blocks| {
            let b = b.clone();
            std::thread::spawn(move || {
                let g = b.enter();
                verify_and_free(blocks);
                drop(g);
            })
        })
        .collect();
    for h in adopters.into_iter().chain(freers) {
        h.join().unwrap();
    }
    assert_eq!(held(&a), (0, 0), "A after every object was freed elsewhere");
    assert_eq!(held(&b), (0, 0), "B was charged for frees of A's objects");
    assert_eq!(a.uncharge_warnings(Resource::Memory), 0);
    assert_eq!(b.uncharge_warnings(Resource::Memory), 0);
}

/// DESIGN §6.3 on one thread: objects allocated under A, freed while B is current (same
/// thread, stock of B) — A is uncharged, B untouched.
fn free_uncharges_owner() {
    let (a, b) = (tenant(3), tenant(4));
    let mut rng = Rng::new(3);
    let plan = layouts(&mut rng, 2000);
    let mut blocks = Vec::with_capacity(plan.len());
    let ga = a.enter();
    allocate_into(&mut blocks, &plan, 0);
    drop(ga);
    let gb = b.enter();
    // B takes a stock, so frees of A's objects are tempted to go into it.
    let v = vec![0u8; 100];
    let b_before = held(&b);
    verify_and_free(blocks);
    let b_after = held(&b);
    drop(v);
    drop(gb);
    beancounter::drain_stock();
    assert_eq!(b_after, b_before, "freeing A's objects changed B");
    assert_eq!(held(&a), (0, 0));
    assert_eq!(held(&b), (0, 0));
}

/// A thread that charged a tenant and exited has given its stock back: the tenant's limit is
/// entirely usable by the next thread (a leaked stock would hold 128 KiB of it).
fn exited_stock() {
    let t = tenant(5);
    let lim = 512 * KIB;
    t.set_limits(
        Resource::Memory,
        Limits::new(lim as u64, lim as u64).unwrap(),
    )
    .unwrap();
    let l = Layout::from_size_align(64, 8).unwrap();
    let kept: Vec<SendPtr> = (0..8)
        .map(|_| {
            let t = t.clone();
            std::thread::spawn(move || {
                let g = t.enter();
                // SAFETY: a non-zero size.
                let p = unsafe { ALLOC.alloc(l) };
                drop(g);
                SendPtr(p)
            })
            .join()
            .unwrap()
        })
        .collect();
    assert!(kept.iter().all(|p| !p.0.is_null()));
    assert_eq!(held(&t), (8 * 64, 8));
    // The rest of the limit, in one large block (charged directly, not through a stock).
    let rest = Layout::from_size_align(lim - 4096, 4096).unwrap();
    let g = t.enter();
    // SAFETY: a non-zero size.
    let p = unsafe { ALLOC.alloc(rest) };
    drop(g);
    let ok = !p.is_null();
    if ok {
        // SAFETY: allocated just above.
        unsafe { ALLOC.dealloc(p, rest) };
    }
    for p in kept {
        // SAFETY: allocated by the threads with `l`.
        unsafe { ALLOC.dealloc(p.0, l) };
    }
    assert_eq!(held(&t), (0, 0));
    assert!(
        ok,
        "the exited threads' stocks still hold part of the limit"
    );
    // Nothing is charged any more, stocks included: the last handle frees the tenant.
    beancounter::drain_stock();
    drop(t);
    assert!(
        beancounter::lookup(beancounter::BcId(5)).is_none(),
        "the tenant outlived its handles: an exited thread's stock is still charged to it"
    );
}

/// In a child process (a null here would abort): thread A allocates k objects of 1 KiB and
/// exits with them alive, so for some k its heap is abandoned with a full current slab; the
/// next thread adopts that heap, and its first allocation of the class must not be null.
fn adopt_full_slab() {
    let l = Layout::from_size_align(1024, 8).unwrap();
    let mut nulls = Vec::new();
    for k in 1..=100usize {
        let blocks: Vec<SendPtr> = std::thread::spawn(move || {
            (0..k)
                // SAFETY: a non-zero size.
                .map(|_| SendPtr(unsafe { ALLOC.alloc(l) }))
                .collect()
        })
        .join()
        .unwrap();
        let null = std::thread::spawn(move || {
            // SAFETY: a non-zero size.
            let p = unsafe { ALLOC.alloc(l) };
            if !p.is_null() {
                // SAFETY: allocated just above.
                unsafe { ALLOC.dealloc(p, l) };
            }
            p.is_null()
        })
        .join()
        .unwrap();
        if null {
            nulls.push(k);
        }
        for p in blocks {
            assert!(!p.0.is_null());
            // SAFETY: allocated by the thread with `l`.
            unsafe { ALLOC.dealloc(p.0, l) };
        }
    }
    assert!(
        nulls.is_empty(),
        "a 1 KiB allocation returned null in the thread after one that left k objects \
         alive, for k in {nulls:?}"
    );
}

/// 1 000 threads, eight at a time, spawned into a tenant with the crate's spawn wrapper: each
/// allocates on every route, frees most, and hands some objects to the main thread. Mapped
/// bytes and RSS after the last batch stay close to what they were after the first 100
/// threads (heaps and slabs are reused), and the tenant's `Threads`, `Memory` and
/// `Allocations` go back to zero.
fn thousand_threads() {
    let t = tenant(6);
    let mut kept: Vec<Blocks> = Vec::with_capacity(1000);
    let mut marks = Vec::new();
    let mut spawned = 0;
    while spawned < 1000 {
        let g = t.enter();
        let batch: Vec<_> = (0..8)
            .map(|i| {
                let seed = (spawned + i) as u64;
                beancounter::thread::spawn(move || {
                    let mut rng = Rng::new(seed);
                    let plan = layouts(&mut rng, 200);
                    let mut blocks = allocate(&plan, seed * 1000);
                    let give = blocks.split_off(190);
                    verify_and_free(blocks);
                    give
                })
                .unwrap()
            })
            .collect();
        drop(g);
        for h in batch {
            kept.push(h.join().unwrap());
        }
        spawned += 8;
        if spawned % 200 == 0 {
            // Free what earlier threads handed over, from this thread.
            for blocks in kept.drain(..) {
                verify_and_free(blocks);
            }
        }
        if spawned == 104 || spawned >= 1000 {
            marks.push((beancounter::mapped_bytes(), common::statm().0));
        }
    }
    for blocks in kept.drain(..) {
        verify_and_free(blocks);
    }
    let (m0, r0) = marks[0];
    let (m1, r1) = marks[1];
    println!(
        "    after 104 threads: mapped {} MiB, rss {} MiB; after 1000: mapped {} MiB, rss {} MiB",
        m0 >> 20,
        r0 >> 20,
        m1 >> 20,
        r1 >> 20
    );
    // Allowance: which abandoned heaps the next threads adopt, and so how many segments
    // hold partly used runs, depends on scheduling (a loaded machine once showed 17 MiB
    // more); 32 MiB is eight segments, one per thread in flight. A leak of 40 KiB per
    // thread exceeds it; tests/short_threads.rs checks 10 000 threads more tightly.
    assert!(m1 <= m0 + 32 * MIB, "mapped bytes grew from {m0} to {m1}");
    assert!(r1 <= r0 + 32 * MIB, "rss grew from {r0} to {r1}");
    assert_eq!(t.stat(Resource::Threads).held, 0);
    assert_eq!(held(&t), (0, 0));
    let _: Option<Beancounter> = None;
}
