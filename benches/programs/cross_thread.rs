//! Frees on other threads: larson (two threads replacing random objects in arrays they swap
//! every round) and producer → consumer (every free remote), through the global allocator,
//! each thread in a tenant of its own in the `beancounter` column.

use crate::child::{measure, Iteration, Measured, Mode};
use beancounter::Beancounter;
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

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

/// A block of `size` bytes (8..=1024) with its first and last byte written.
fn block(size: usize, tag: u8) -> Box<[u8]> {
    let mut b = vec![0u8; size].into_boxed_slice();
    b[0] = tag;
    b[size - 1] = tag;
    b
}

/// Objects per thread's array.
const SLOTS: usize = 1000;
/// Replacements per thread and round.
const STEPS: usize = 4 * SLOTS;

/// Larson: two threads each own an array of `SLOTS` objects, replace random ones (free +
/// allocate 8..1024 bytes) `STEPS` times a round, and swap arrays every round, so about
/// half of all frees are of the other thread's objects. ns per replacement.
pub fn larson(mode: &Mode) -> Measured {
    let rounds = mode.size(400);
    let tenants = mode.make_tenants(1, 2);
    measure(&tenants, |_| {
        let arrays: Vec<Mutex<Vec<Box<[u8]>>>> = (0..2)
            .map(|t| Mutex::new((0..SLOTS).map(|i| block(8 + i % 1017, t as u8)).collect()))
            .collect();
        let barrier = Barrier::new(2);
        let wall = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2usize)
                .map(|t| {
                    let (arrays, barrier, tenants) = (&arrays, &barrier, &tenants);
                    s.spawn(move || {
                        let _g = tenants.get(t).map(Beancounter::enter);
                        let mut rng = Rng(0x2545_F491_4F6C_DD1D + t as u64);
                        barrier.wait();
                        let t0 = Instant::now();
                        for round in 0..rounds {
                            let mut arr = arrays[(t + round) % 2].lock().unwrap();
                            for _ in 0..STEPS {
                                let r = rng.next();
                                let slot = (r as usize >> 20) % SLOTS;
                                arr[slot] = block(8 + r as usize % 1017, r as u8);
                            }
                            drop(arr);
                            barrier.wait();
                        }
                        t0.elapsed()
                    })
                })
                .collect();
            let times: Vec<Duration> = hs.into_iter().map(|h| h.join().unwrap()).collect();
            times.into_iter().max().unwrap()
        });
        // Freed here: each block is uncharged from the tenant that allocated it.
        drop(arrays);
        Iteration {
            wall,
            units: (rounds * STEPS) as u64,
            rss_after_1s: None,
        }
    })
}

/// Producer → consumer: one thread allocates 16..1024-byte blocks and hands them through a
/// ring of 1 024 slots to another, which frees them (every free remote). ns per block.
pub fn producer_consumer(mode: &Mode) -> Measured {
    let n = mode.size(4_000_000);
    let tenants = mode.make_tenants(1, 2);
    measure(&tenants, |_| {
        let slots: Vec<AtomicUsize> = (0..1024).map(|_| AtomicUsize::new(0)).collect();
        let (head, tail) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let start = Barrier::new(2);
        let wall = std::thread::scope(|s| {
            let consumer = s.spawn(|| {
                let _g = tenants.get(1).map(Beancounter::enter);
                start.wait();
                let mut sum = 0usize;
                for seen in 0..n {
                    let t = tail.load(Ordering::Relaxed);
                    while t == head.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                    }
                    let p = slots[t % 1024].load(Ordering::Relaxed) as *mut u8;
                    let len = 16 + (seen * 48) % 1009;
                    // SAFETY: the producer leaked this box of `len` bytes and handed it over.
                    let b = unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(p, len)) };
                    sum += b[len - 1] as usize;
                    drop(b);
                    tail.store(t + 1, Ordering::Release);
                }
                black_box(sum);
            });
            let _g = tenants.first().map(Beancounter::enter);
            start.wait();
            let t0 = Instant::now();
            for i in 0..n {
                let b = block(16 + (i * 48) % 1009, i as u8);
                let h = head.load(Ordering::Relaxed);
                while h - tail.load(Ordering::Acquire) >= 1024 {
                    std::hint::spin_loop();
                }
                slots[h % 1024].store(Box::into_raw(b) as *mut u8 as usize, Ordering::Relaxed);
                head.store(h + 1, Ordering::Release);
            }
            consumer.join().unwrap();
            t0.elapsed()
        });
        Iteration {
            wall,
            units: n as u64,
            rss_after_1s: None,
        }
    })
}
