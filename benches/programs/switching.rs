//! Tenant switching: per request (a guard around each request, or the request run in
//! `in_scope`) and per poll (tokio tasks wrapped with `in_beancounter`), against the same
//! work without switching.

use crate::child::{measure, Iteration, Measured, Mode};
use beancounter::{Beancounter, FutureExt};
use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

/// Tenants the requests and tasks are spread over.
const TENANTS: u32 = 1000;

/// In the switching variants (`beancounter`): the 1 000 tenants, ids 1..=1000.
fn tenants(mode: &Mode) -> Vec<Beancounter> {
    mode.make_tenants(1, TENANTS)
}

const TEXT: &str = "GET /api/v1/users/0000/orders?page=2 HTTP/1.1 host: example.com accept: */* ";

/// One request's work: 16 allocations of 16..=512 bytes (8 strings, 8 byte vectors), a
/// 4 KiB buffer, every byte written, a few read back; all freed before it returns.
#[inline(never)]
fn request(i: usize) -> usize {
    let len = |j: usize| 16 + (i.wrapping_mul(31) + j * 97) % 497;
    let strings: [String; 8] = std::array::from_fn(|j| {
        let n = len(j);
        let mut s = String::with_capacity(n);
        while s.len() < n {
            let take = (n - s.len()).min(TEXT.len());
            s.push_str(&TEXT[..take]);
        }
        s
    });
    let bytes: [Vec<u8>; 8] = std::array::from_fn(|j| {
        let mut v = Vec::with_capacity(len(8 + j));
        v.resize(len(8 + j), (i + j) as u8);
        v
    });
    let mut buf = Vec::with_capacity(4096);
    buf.resize(4096, i as u8);
    let mut sum = buf[i % 4096] as usize;
    for (s, v) in strings.iter().zip(&bytes) {
        sum += s.len() + s.as_bytes()[i % s.len()] as usize + v[v.len() - 1] as usize;
    }
    black_box((&strings, &bytes, &buf));
    sum
}

/// How a request enters its tenant.
#[derive(Clone, Copy)]
enum Enter {
    /// A guard: `let _g = bc.enter();`.
    Guard,
    /// A closure: `bc.in_scope(|| ..)`.
    InScope,
}

/// `n` requests numbered from `first`, each inside tenant `i % 1000` if there are tenants.
fn requests(tenants: &[Beancounter], first: usize, n: usize, how: Enter) -> usize {
    let mut sum = 0;
    for i in first..first + n {
        let t = i % TENANTS as usize;
        if let Some(bc) = tenants.get(t) {
            sum += match how {
                Enter::Guard => {
                    let _g = bc.enter();
                    request(i)
                }
                Enter::InScope => bc.in_scope(|| request(i)),
            };
        } else {
            sum += request(black_box(t) + i - t);
        }
    }
    sum
}

/// Requests on `threads` std threads at once, `per_thread` each; ns per request per thread.
fn per_request(mode: &Mode, threads: usize, how: Enter) -> Measured {
    let per_thread = mode.size(800_000);
    let tenants = tenants(mode);
    measure(&tenants, |_| {
        let wall = if threads == 1 {
            let t0 = Instant::now();
            black_box(requests(&tenants, 0, per_thread, how));
            t0.elapsed()
        } else {
            let start = Barrier::new(threads);
            std::thread::scope(|s| {
                let hs: Vec<_> = (0..threads)
                    .map(|t| {
                        let (tenants, start) = (&tenants, &start);
                        s.spawn(move || {
                            start.wait();
                            let t0 = Instant::now();
                            black_box(requests(tenants, t * per_thread, per_thread, how));
                            t0.elapsed()
                        })
                    })
                    .collect();
                let times: Vec<Duration> = hs.into_iter().map(|h| h.join().unwrap()).collect();
                times.into_iter().max().unwrap()
            })
        };
        Iteration {
            wall,
            units: per_thread as u64,
            rss_after_1s: None,
        }
    })
}

/// One request per iteration on one thread.
pub fn per_request_1thread(mode: &Mode) -> Measured {
    per_request(mode, 1, Enter::Guard)
}

/// Two threads doing requests at once.
pub fn per_request_2threads(mode: &Mode) -> Measured {
    per_request(mode, 2, Enter::Guard)
}

/// One request per iteration on one thread, each in `in_scope` instead of a guard.
pub fn per_request_in_scope_1thread(mode: &Mode) -> Measured {
    per_request(mode, 1, Enter::InScope)
}

/// Two threads doing requests at once, each in `in_scope`.
pub fn per_request_in_scope_2threads(mode: &Mode) -> Measured {
    per_request(mode, 2, Enter::InScope)
}

/// Yields per task: a task is polled `YIELDS + 1` times.
const YIELDS: usize = 10;

/// A task: at every poll a temporary vector and box freed in the poll, and a string kept
/// until the task ends (so some frees happen on another worker than the allocation).
async fn task(i: usize) -> u64 {
    let mut kept: Vec<String> = Vec::new();
    let mut sum = 0u64;
    for p in 0..YIELDS {
        {
            let tmp: Vec<u32> = (0..(8 + (i + p) % 24) as u32).collect();
            let b = Box::new([p as u64; 4]);
            kept.push(format!("task-{i}-poll-{p}"));
            sum += tmp.iter().map(|&x| x as u64).sum::<u64>() + b[3] + kept.len() as u64;
            black_box(&b);
        }
        tokio::task::yield_now().await;
    }
    sum + kept.iter().map(|s| s.len() as u64).sum::<u64>()
}

/// tokio, 2 workers: batches of 20 000 tasks, task `i` wrapped with `in_beancounter` of
/// tenant `i % 1000` in the `beancounter` variant; ns per poll. The runtime is built and
/// shut down (its threads joined) outside the timed part, in every iteration, so the
/// accounting check sees no worker still holding a tenant's block.
pub fn per_poll_tokio(mode: &Mode) -> Measured {
    let tasks = mode.size(20_000);
    let batches = 8;
    let tenants = tenants(mode);
    measure(&tenants, |_| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .expect("build the runtime");
        let t0 = Instant::now();
        let sum = rt.block_on(async {
            let mut sum = 0u64;
            for batch in 0..batches {
                let handles: Vec<_> = (batch * tasks..(batch + 1) * tasks)
                    .map(|i| match tenants.get(i % TENANTS as usize) {
                        Some(bc) => tokio::spawn(task(i).in_beancounter(bc)),
                        None => tokio::spawn(task(i)),
                    })
                    .collect();
                for h in handles {
                    sum += h.await.expect("task");
                }
            }
            sum
        });
        let wall = t0.elapsed();
        black_box(sum);
        drop(rt);
        Iteration {
            wall,
            units: (batches * tasks * (YIELDS + 1)) as u64,
            rss_after_1s: None,
        }
    })
}
