//! Allocator workloads, each run against `BeanAlloc` (accounting on: a tenant entered),
//! `BeanAlloc` in the root (no tenant), glibc `System`, mimalloc and jemalloc, all called
//! through `GlobalAlloc` on instances so one binary compares them. Groups are named
//! `alloc/<workload>/<allocator>`; `benches/README.md` has the table.

use beancounter::{BcId, BeanAlloc};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use mimalloc::MiMalloc;
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};
use tikv_jemallocator::Jemalloc;

static BEAN: BeanAlloc = BeanAlloc::new();
static MI: MiMalloc = MiMalloc;
static JE: Jemalloc = Jemalloc;
static SYS: System = System;

/// An allocator under test, and whether the bench threads work inside a tenant.
#[derive(Clone, Copy)]
struct Subject {
    name: &'static str,
    alloc: &'static (dyn GlobalAlloc + Sync),
    tenant: Option<u32>,
}

const SUBJECTS: [Subject; 5] = [
    Subject {
        name: "beancounter",
        alloc: &BEAN,
        tenant: Some(1),
    },
    Subject {
        name: "beancounter_root",
        alloc: &BEAN,
        tenant: None,
    },
    Subject {
        name: "system",
        alloc: &SYS,
        tenant: None,
    },
    Subject {
        name: "mimalloc",
        alloc: &MI,
        tenant: None,
    },
    Subject {
        name: "jemalloc",
        alloc: &JE,
        tenant: None,
    },
];

/// Runs `f` inside the subject's tenant (thread-local, so call it on every bench thread).
fn in_tenant<R>(s: Subject, thread: u32, f: impl FnOnce() -> R) -> R {
    match s.tenant {
        Some(t) => {
            let bc = beancounter::find_or_create(BcId(t + thread)).unwrap();
            let _g = bc.enter();
            f()
        }
        None => f(),
    }
}

/// xorshift: cheap, deterministic sizes and slots.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn layout(size: usize) -> Layout {
    Layout::from_size_align(size, 8).unwrap()
}

/// Allocates `n` objects of 16..1024 bytes, touches each, frees them in reverse order.
fn lifo(a: &dyn GlobalAlloc, n: usize, ptrs: &mut Vec<(*mut u8, Layout)>) {
    for i in 0..n {
        let l = layout(16 + (i * 48) % 1009);
        // SAFETY: non-zero size.
        let p = unsafe { a.alloc(l) };
        assert!(!p.is_null());
        // SAFETY: fresh block of at least one byte.
        unsafe { p.write(i as u8) };
        ptrs.push((p, l));
    }
    while let Some((p, l)) = ptrs.pop() {
        // SAFETY: allocated above with `l`.
        unsafe { a.dealloc(black_box(p), l) };
    }
}

/// `steps` random steps over `slots` slots: free the occupant, or allocate 8..2048 bytes.
fn random(a: &dyn GlobalAlloc, steps: usize, slots: &mut [(*mut u8, Layout)], rng: &mut Rng) {
    for _ in 0..steps {
        let r = rng.next();
        let slot = &mut slots[(r as usize >> 16) % slots.len()];
        if slot.0.is_null() {
            let l = layout(8 + (r as usize % 2041));
            // SAFETY: non-zero size.
            let p = unsafe { a.alloc(l) };
            assert!(!p.is_null());
            // SAFETY: fresh block of at least 8 bytes.
            unsafe { p.cast::<u64>().write(r) };
            *slot = (p, l);
        } else {
            // SAFETY: allocated here with `slot.1`.
            unsafe { a.dealloc(slot.0, slot.1) };
            slot.0 = std::ptr::null_mut();
        }
    }
}

fn free_all(a: &dyn GlobalAlloc, slots: &mut [(*mut u8, Layout)]) {
    for slot in slots.iter_mut().filter(|s| !s.0.is_null()) {
        // SAFETY: allocated with `slot.1`.
        unsafe { a.dealloc(slot.0, slot.1) };
        slot.0 = std::ptr::null_mut();
    }
}

const SLOTS: usize = 1000;
/// Replacements per larson round: enough that the allocator, not the barrier between
/// rounds, dominates.
const LARSON_STEPS: usize = 4 * SLOTS;

/// Runs `per_thread(iters)` on two threads at once; returns the slower thread's time.
fn two_threads(
    s: Subject,
    iters: u64,
    same_tenant: bool,
    per_thread: fn(Subject, u64),
) -> Duration {
    let start = Barrier::new(2);
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2u32)
            .map(|t| {
                let start = &start;
                sc.spawn(move || {
                    in_tenant(s, if same_tenant { 0 } else { t }, || {
                        start.wait();
                        let t0 = Instant::now();
                        per_thread(s, iters);
                        t0.elapsed()
                    })
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).max().unwrap()
    })
}

fn random_iters(s: Subject, iters: u64) {
    let mut slots = vec![(std::ptr::null_mut(), layout(8)); SLOTS];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    random(s.alloc, iters as usize, &mut slots, &mut rng);
    free_all(s.alloc, &mut slots);
}

/// A single-producer single-consumer ring of block pointers.
struct Ring {
    slots: Vec<AtomicUsize>,
    head: AtomicUsize,
    tail: AtomicUsize,
}

fn producer_consumer(s: Subject, n: u64) -> Duration {
    let ring = Arc::new(Ring {
        slots: (0..1024).map(|_| AtomicUsize::new(0)).collect(),
        head: AtomicUsize::new(0),
        tail: AtomicUsize::new(0),
    });
    let start = Arc::new(Barrier::new(2));
    let consumer = {
        let (ring, start) = (ring.clone(), start.clone());
        std::thread::spawn(move || {
            in_tenant(s, 1, || {
                start.wait();
                let mut seen = 0;
                while seen < n {
                    let t = ring.tail.load(Ordering::Relaxed);
                    if t == ring.head.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                        continue;
                    }
                    let p = ring.slots[t % 1024].load(Ordering::Relaxed) as *mut u8;
                    let l = layout(16 + (seen as usize * 48) % 1009);
                    // SAFETY: the producer allocated `p` with this layout and handed it over.
                    unsafe { s.alloc.dealloc(p, l) };
                    ring.tail.store(t + 1, Ordering::Release);
                    seen += 1;
                }
            })
        })
    };
    let took = in_tenant(s, 0, || {
        start.wait();
        let t0 = Instant::now();
        for i in 0..n {
            let l = layout(16 + (i as usize * 48) % 1009);
            // SAFETY: non-zero size.
            let p = unsafe { s.alloc.alloc(l) };
            assert!(!p.is_null());
            let h = ring.head.load(Ordering::Relaxed);
            while h - ring.tail.load(Ordering::Acquire) >= 1024 {
                std::hint::spin_loop();
            }
            ring.slots[h % 1024].store(p as usize, Ordering::Relaxed);
            ring.head.store(h + 1, Ordering::Release);
        }
        t0.elapsed()
    });
    consumer.join().unwrap();
    took
}

/// Grows one block from 4 KiB to 1 MiB in 4 KiB steps, writing its last byte each time.
fn realloc_growth(a: &dyn GlobalAlloc) {
    let mut l = layout(4096);
    // SAFETY: non-zero size.
    let mut p = unsafe { a.alloc(l) };
    for size in (8192..=(1 << 20)).step_by(4096) {
        // SAFETY: `p` was allocated with `l`; `size` is non-zero.
        p = unsafe { a.realloc(p, l, size) };
        assert!(!p.is_null());
        // SAFETY: the block has `size` bytes.
        unsafe { p.add(size - 1).write(1) };
        l = layout(size);
    }
    // SAFETY: allocated with `l`.
    unsafe { a.dealloc(p, l) };
}

/// Larson-like: two threads each keep `SLOTS` objects, replace random ones (free + alloc of
/// 8..1024 bytes) `LARSON_STEPS` times a round, and swap arrays every round, so many frees
/// are remote.
fn larson(s: Subject, rounds: u64) -> Duration {
    let arrays: Vec<std::sync::Mutex<Vec<(usize, usize)>>> = (0..2)
        .map(|_| std::sync::Mutex::new(vec![(0usize, 0usize); SLOTS]))
        .collect();
    let barrier = Barrier::new(2);
    std::thread::scope(|sc| {
        let hs: Vec<_> = (0..2usize)
            .map(|t| {
                let (arrays, barrier) = (&arrays, &barrier);
                sc.spawn(move || {
                    in_tenant(s, t as u32, || {
                        let mut rng = Rng(0x2545_F491_4F6C_DD1D + t as u64);
                        barrier.wait();
                        let t0 = Instant::now();
                        for round in 0..rounds {
                            let mut arr = arrays[(t + round as usize) % 2].lock().unwrap();
                            for _ in 0..LARSON_STEPS {
                                let r = rng.next();
                                let slot = &mut arr[(r as usize >> 20) % SLOTS];
                                if slot.0 != 0 {
                                    // SAFETY: allocated below with that size.
                                    unsafe { s.alloc.dealloc(slot.0 as *mut u8, layout(slot.1)) };
                                }
                                let size = 8 + r as usize % 1017;
                                // SAFETY: non-zero size.
                                let p = unsafe { s.alloc.alloc(layout(size)) };
                                assert!(!p.is_null());
                                *slot = (p as usize, size);
                            }
                            drop(arr);
                            barrier.wait();
                        }
                        t0.elapsed()
                    })
                })
            })
            .collect();
        let took = hs.into_iter().map(|h| h.join().unwrap()).max().unwrap();
        for arr in &arrays {
            for &(p, size) in arr.lock().unwrap().iter().filter(|e| e.0 != 0) {
                // SAFETY: allocated in the rounds above with that size.
                unsafe { s.alloc.dealloc(p as *mut u8, layout(size)) };
            }
        }
        took
    })
}

fn benches(c: &mut Criterion) {
    let mut g = c.benchmark_group("alloc");
    g.measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500));
    for s in SUBJECTS {
        g.throughput(Throughput::Elements(2000));
        g.bench_function(BenchmarkId::new("small_lifo", s.name), |b| {
            in_tenant(s, 0, || {
                let mut ptrs = Vec::with_capacity(1000);
                b.iter(|| lifo(s.alloc, 1000, &mut ptrs))
            })
        });
        g.throughput(Throughput::Elements(1000));
        g.bench_function(BenchmarkId::new("random_8_2048", s.name), |b| {
            in_tenant(s, 0, || {
                let mut slots = vec![(std::ptr::null_mut(), layout(8)); SLOTS];
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
                b.iter(|| random(s.alloc, 1000, &mut slots, &mut rng));
                free_all(s.alloc, &mut slots);
            })
        });
        g.throughput(Throughput::Elements(1));
        g.bench_function(BenchmarkId::new("two_threads_own_tenant", s.name), |b| {
            b.iter_custom(|iters| two_threads(s, iters, false, random_iters))
        });
        g.bench_function(BenchmarkId::new("two_threads_one_tenant", s.name), |b| {
            b.iter_custom(|iters| two_threads(s, iters, true, random_iters))
        });
        g.bench_function(BenchmarkId::new("producer_consumer", s.name), |b| {
            b.iter_custom(|iters| producer_consumer(s, iters))
        });
        g.bench_function(BenchmarkId::new("realloc_growth", s.name), |b| {
            in_tenant(s, 0, || b.iter(|| realloc_growth(s.alloc)))
        });
        g.throughput(Throughput::Elements(LARSON_STEPS as u64));
        g.bench_function(BenchmarkId::new("larson", s.name), |b| {
            b.iter_custom(|iters| larson(s, iters))
        });
    }
    g.finish();
}

criterion_group!(alloc, benches);
criterion_main!(alloc);
