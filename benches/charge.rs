//! Cost of one charge + uncharge pair through the public API: uncontended, and with two
//! threads hammering the same beancounter (the shared-counter worst case that per-thread
//! stocks will remove from the allocation path).

use beancounter::{BcId, Limits, Resource, Severity};
use criterion::{criterion_group, criterion_main, Criterion};
use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

fn pair(bc: &beancounter::Beancounter, severity: Severity) {
    let c = bc
        .charge(Resource::Memory, black_box(64), severity)
        .unwrap();
    drop(black_box(c));
}

/// Runs `iters` pairs on `mine` here and on `theirs` on another thread, started together;
/// returns this thread's time.
fn two_threads(
    mine: &beancounter::Beancounter,
    theirs: &beancounter::Beancounter,
    iters: u64,
) -> Duration {
    let start = Barrier::new(2);
    std::thread::scope(|s| {
        let other = s.spawn(|| {
            start.wait();
            for _ in 0..iters {
                pair(theirs, Severity::Limit);
            }
        });
        start.wait();
        let t = Instant::now();
        for _ in 0..iters {
            pair(mine, Severity::Limit);
        }
        let took = t.elapsed();
        other.join().unwrap();
        took
    })
}

fn charge(c: &mut Criterion) {
    let mut g = c.benchmark_group("charge");
    let top = beancounter::find_or_create(BcId(1)).unwrap();
    top.set_limits(Resource::Memory, Limits::new(1 << 40, 1 << 41).unwrap())
        .unwrap();
    let child = top.new_child(BcId(2)).unwrap();

    g.bench_function("uncontended/limit", |b| {
        b.iter(|| pair(&top, Severity::Limit))
    });
    g.bench_function("uncontended/force", |b| {
        b.iter(|| pair(&top, Severity::Force))
    });
    g.bench_function("uncontended/child_of_parent", |b| {
        b.iter(|| pair(&child, Severity::Limit))
    });

    // Two threads at once, on one beancounter and on one each: the time for `iters` pairs
    // on each thread, reported per pair of one thread (so equal to the uncontended figure
    // if nothing contended). Separate beancounters have separate cache lines.
    let other_bc = beancounter::find_or_create(BcId(3)).unwrap();
    g.bench_function("two_threads/same_bc", |b| {
        b.iter_custom(|iters| two_threads(&top, &top, iters))
    });
    g.bench_function("two_threads/own_bc", |b| {
        b.iter_custom(|iters| two_threads(&top, &other_bc, iters))
    });
    g.finish();
}

criterion_group!(benches, charge);
criterion_main!(benches);
