//! Audits at rest: with every thread of the run resting at the gate (or gone), what each
//! tenant holds, what it refused, and the bounds it kept must agree with the harness's own
//! record; and probes near each tenant's bounds must be admitted or refused as the numbers
//! say: exactly when no thread holds stock, and at least "admitted when it fits" when
//! resting threads still hold some (no thread runs, so none can take stock back in between).

use crate::model::{fail, Count, Shared, Window, CAP, KIB};
use crate::A;
use beancounter::{Beancounter, Events, Exceeded, FutureExt, Resource, ResourceStat, Severity};
use std::alloc::{GlobalAlloc, Layout};
use std::future::Future;
use std::mem::ManuallyDrop;
use std::sync::atomic::Ordering::{Relaxed, SeqCst};
use std::task::{Context, Poll, Waker};

/// Counters of one tenant at the end of an audit, to take differences against.
#[derive(Clone, Copy, Debug, Default)]
struct Snap {
    failcnt: u64,
    at_barrier: u64,
    at_limit: u64,
    objects_failcnt: u64,
    threads_failcnt: u64,
    seen_fallible: u64,
    seen_ordinary: u64,
    seen_threads: u64,
}

/// Counters over every incarnation of each tenant (`Shared::counted`), so that a retirement
/// between two audits loses nothing.
fn snaps(sh: &Shared) -> Vec<Snap> {
    (0..sh.tree.len())
        .map(|t| {
            let c = sh.counted(t);
            Snap {
                failcnt: c.failcnt,
                at_barrier: c.at_barrier,
                at_limit: c.at_limit,
                objects_failcnt: c.objects_failcnt,
                threads_failcnt: c.threads_failcnt,
                seen_fallible: sh.refused_fallible[t].load(Relaxed),
                seen_ordinary: sh.refused_ordinary[t].load(Relaxed),
                seen_threads: sh.threads_refused[t].load(Relaxed),
            }
        })
        .collect()
}

pub struct Audit {
    last: Vec<Snap>,
}

impl Audit {
    pub fn new(sh: &Shared) -> Audit {
        Audit { last: snaps(sh) }
    }

    /// Runs every check; `threads` are the tenants (and incarnations) the live
    /// crate-spawned workers were started in; `drained`: no thread holds stock, so every
    /// probe's outcome is exact (otherwise only requests within the bounds are probed, which
    /// must be admitted).
    pub fn check(&mut self, sh: &Shared, threads: &[(usize, u64)], drained: bool) {
        held(sh, threads);
        self.refusals(sh);
        bounds(sh);
        beancounter::check_invariants().unwrap_or_else(|e| fail!("registry invariant: {e}"));
        beancounter::drain_stock();
        for t in 0..sh.tree.len() {
            probe(sh, t, drained);
        }
        new_window(sh);
        self.last = snaps(sh);
    }

    /// Every refusal the allocator counted was one the harness saw, and the other way round:
    /// in total at the barrier and at the limit, and tenant by tenant as far as it can be
    /// told (a refusal counts where it was refused, which is the requesting tenant or one of
    /// its ancestors; `Threads` refusals name their tenant).
    fn refusals(&self, sh: &Shared) {
        let now = snaps(sh);
        let n = sh.tree.len();
        let d = |t: usize, f: fn(&Snap) -> u64| f(&now[t]) - f(&self.last[t]);
        let total = |f: fn(&Snap) -> u64| (0..n).map(|t| d(t, f)).sum::<u64>();
        let pairs = [
            (
                "fallible",
                total(|s| s.at_barrier),
                total(|s| s.seen_fallible),
            ),
            (
                "ordinary",
                total(|s| s.at_limit),
                total(|s| s.seen_ordinary),
            ),
        ];
        for (what, counted, seen) in pairs {
            if counted != seen {
                fail!("{seen} {what} refusals seen since the last audit, the tenants counted {counted}");
            }
        }
        for t in 0..n {
            let id = sh.tree.nodes[t].id;
            let failcnt = d(t, |s| s.failcnt);
            if failcnt != d(t, |s| s.at_barrier) + d(t, |s| s.at_limit) {
                fail!("tenant {id}: failcnt grew by {failcnt}, not by its refusals");
            }
            let below: u64 = (0..n)
                .filter(|&u| sh.tree.within(u, t))
                .map(|u| d(u, |s| s.seen_fallible) + d(u, |s| s.seen_ordinary))
                .sum();
            if failcnt > below {
                fail!("tenant {id} counted {failcnt} refusals, its subtree saw {below}");
            }
            if d(t, |s| s.objects_failcnt) != 0 {
                fail!("tenant {id} refused Allocations, which have no bound");
            }
            let (threads, seen) = (d(t, |s| s.threads_failcnt), d(t, |s| s.seen_threads));
            if threads != seen {
                fail!("tenant {id} counted {threads} Threads refusals, spawns saw {seen}");
            }
        }
    }
}

/// Every tenant holds exactly what its subtree's live blocks are charged, and a `Threads`
/// per live crate-spawned worker started in its subtree (a worker started in a retired
/// incarnation counts for its parent); no uncharge was ever clamped.
fn held(sh: &Shared, threads: &[(usize, u64)]) {
    let threads: Vec<usize> = threads
        .iter()
        .map(|&(f, inc)| sh.heir_now(f, inc))
        .collect();
    for (t, node) in sh.tree.nodes.iter().enumerate() {
        let bc = node.bc();
        let want = sh.expected(t);
        let got = (
            bc.stat(Resource::Memory).held,
            bc.stat(Resource::Allocations).held,
        );
        if got != want {
            fail!(
                "tenant {} holds {got:?} (Memory, Allocations); its subtree's live blocks make \
                 {want:?}",
                node.id
            );
        }
        let want = threads.iter().filter(|&&f| sh.tree.within(f, t)).count() as u64;
        let got = bc.stat(Resource::Threads).held;
        if got != want {
            fail!(
                "tenant {} holds {got} Threads, {want} workers run in it",
                node.id
            );
        }
        for r in [Resource::Memory, Resource::Allocations] {
            if bc.uncharge_warnings(r) != 0 {
                fail!("tenant {}: an uncharge of {r} was clamped", node.id);
            }
        }
    }
}

/// `maxheld` over the window within the window's bound (see `controller::sample`), and the
/// capped top's lifetime `maxheld` within [`CAP`].
fn bounds(sh: &Shared) {
    crate::controller::sample(sh);
    let capped = sh.tree.capped_top();
    let s = sh.tree.nodes[capped].bc().stat(Resource::Memory);
    if s.maxheld > CAP {
        fail!(
            "the capped top held {} over its life, above {CAP}",
            s.maxheld
        );
    }
}

/// Starts the next window of every tenant but the capped top: `maxheld` back to `held`, the
/// bound back to the present limit, no forced charge yet.
fn new_window(sh: &Shared) {
    let capped = sh.tree.capped_top();
    let mut windows = sh.windows.lock().unwrap();
    for (t, node) in sh.tree.nodes.iter().enumerate() {
        if t == capped {
            continue;
        }
        let bc = node.bc();
        bc.reset_window();
        let s = bc.stat(Resource::Memory);
        windows[t] = Window {
            base: s.maxheld,
            max_limit: s.limit,
        };
        sh.forced[t].store(false, SeqCst);
    }
}

const PAGE: u64 = 4096;
/// Probe sizes, page multiples: the smallest is above the 32 KiB slab limit (so a probe is
/// charged exactly its size), admitted probes take at most `PROBE_OK_MAX`, and a bound with
/// more room than `PROBE_MAX` is not probed.
const PROBE_MIN: u64 = 36 * KIB as u64;
const PROBE_OK_MAX: u64 = 8 << 20;
const PROBE_MAX: u64 = 64 << 20;

/// One level of a tenant's chain, read at rest.
#[derive(Clone, Copy, Debug)]
struct Level {
    t: usize,
    mem: ResourceStat,
    events: Events,
    objects: u64,
}

fn levels(sh: &Shared, t: usize) -> Vec<Level> {
    sh.tree
        .chain(t)
        .map(|u| {
            let bc = sh.tree.nodes[u].bc();
            Level {
                t: u,
                mem: bc.stat(Resource::Memory),
                events: bc.events(Resource::Memory),
                objects: bc.stat(Resource::Allocations).held,
            }
        })
        .collect()
}

/// The least room under `bound` along the chain (0 if a level is already past it), if it
/// is small enough to probe.
fn room(levels: &[Level], bound: fn(&ResourceStat) -> u64) -> Option<u64> {
    let r = levels
        .iter()
        .map(|l| bound(&l.mem).saturating_sub(l.mem.held))
        .min()?;
    (r < PROBE_MAX).then_some(r)
}

/// The smallest probe above `room`.
fn over(room: u64) -> u64 {
    (room / PAGE + 1).max(PROBE_MIN / PAGE) * PAGE
}

/// The largest probe within `room`, if there is one.
fn under(room: u64) -> Option<u64> {
    let n = room.min(PROBE_OK_MAX) / PAGE * PAGE;
    (n >= PROBE_MIN).then_some(n)
}

/// Requests near tenant `t`'s bounds: fallible ones just within and just past the barriers,
/// ordinary ones just within and past the limits, and a forced one past the limits; then what
/// `check_barrier`, `checkpoint` and a guarded future say.
///
/// When resting threads still hold stock (`drained` false), only the requests within the
/// bounds are made: no thread is running, so no stock can be taken again between the
/// reclaim and the retry a refusal makes, and the README's bound leaves no room for a
/// refusal. (What a refusal or an admission counts then depends on the stocks: not checked.)
fn probe(sh: &Shared, t: usize, drained: bool) {
    let before = levels(sh, t);
    flags(sh, t, &before);
    for severity in [Severity::Barrier, Severity::Limit] {
        let bound = match severity {
            Severity::Barrier => |s: &ResourceStat| s.barrier,
            _ => |s: &ResourceStat| s.limit,
        };
        let Some(room) = room(&before, bound) else {
            continue;
        };
        if let Some(n) = under(room) {
            attempt(sh, t, n, severity, drained);
        }
        if !drained {
            continue;
        }
        attempt(sh, t, over(room), severity, true);
        // Nothing is forced past the capped top, whose lifetime peak is checked.
        let capped = sh.tree.nodes[t].zone == crate::model::Zone::Capped;
        if severity == Severity::Limit && !capped {
            attempt(sh, t, over(room), Severity::Force, true);
        }
    }
}

/// Asks for `n` bytes as tenant `t` with `severity` (fallible `try_reserve_exact`, an
/// ordinary allocation, a forced one) and checks the outcome against the chain as it was:
/// admitted iff every level has room, and then charged `n` at every level, with barrier
/// crossings and forced passes of the limit counted where they happened; refused at the
/// lowest level without room, counted there alone. Without `exact`, stocks may be held:
/// events, which count on what is charged (stocks included), are not checked.
fn attempt(sh: &Shared, t: usize, n: u64, severity: Severity, exact: bool) {
    sh.tally.add(Count::Probes, 1);
    let before = levels(sh, t);
    let bound = |l: &Level| match severity {
        Severity::Barrier => l.mem.barrier,
        Severity::Limit => l.mem.limit,
        Severity::Force => u64::MAX,
    };
    let refusing = before.iter().position(|l| l.mem.held + n > bound(l));
    let got = request(sh, t, n, severity);
    let what = format!(
        "tenant {}: {severity:?} request of {n} with chain {before:?}",
        sh.tree.nodes[t].id
    );
    let Some(at) = refusing else {
        let Some((p, layout)) = got else {
            fail!("{what}: refused with room on every level and no thread running");
        };
        compare(sh, &what, &before, |_, l| {
            let (held, barrier) = (l.mem.held, l.mem.barrier);
            let crossed = held <= barrier && held + n > barrier;
            let passed = held + n > l.mem.limit;
            let events = [crossed as u64, passed as u64].map(|e| Some(e).filter(|_| exact));
            [
                Some(n),
                Some(1),
                Some(0),
                events[0],
                events[1],
                Some(0),
                Some(0),
            ]
        });
        // SAFETY: the block `request` returned, with its layout.
        unsafe { A.dealloc(p, layout) };
        compare(sh, &what, &before, |_, _| {
            [Some(0), Some(0), None, None, None, None, None]
        });
        return;
    };
    if got.is_some() {
        fail!("{what}: admitted past the bound of level {at}");
    }
    compare(sh, &what, &before, |i, _| {
        let here = (i == at) as u64;
        let (barrier, limit) = match severity {
            Severity::Barrier => (here, 0),
            _ => (0, here),
        };
        // Levels below the refusing one were charged and unrolled: they may have counted a
        // barrier crossing on the way.
        let crossings = (i >= at).then_some(0);
        [
            Some(0),
            Some(0),
            Some(here),
            crossings,
            Some(0),
            Some(barrier),
            Some(limit),
        ]
    });
}

/// What a probe may change on a level: `Memory` held, `Allocations` held, `failcnt`,
/// barrier crossings, forced passes of the limit, refusals at the barrier and at the limit.
fn fields(l: &Level) -> [u64; 7] {
    let e = &l.events;
    [
        l.mem.held,
        l.objects,
        l.mem.failcnt,
        e.barrier_crossings,
        e.forced_past_limit,
        e.refused_at_barrier,
        e.refused_at_limit,
    ]
}

/// Reads the chain again and checks each level against `before` plus the change `delta(i,
/// level)` says it should show (`None`: any change).
fn compare(
    sh: &Shared,
    what: &str,
    before: &[Level],
    delta: impl Fn(usize, &Level) -> [Option<u64>; 7],
) {
    let after = levels(sh, before[0].t);
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        let (was, now, change) = (fields(b), fields(a), delta(i, b));
        let wrong = (0..7).any(|k| change[k].is_some_and(|d| now[k] != was[k] + d));
        if wrong {
            fail!(
                "{what}: level {} went from {was:?} to {now:?}, expected changes {change:?} \
                 (held, objects, failcnt, crossings, forced past limit, refused at barrier, \
                 refused at limit)",
                sh.tree.nodes[b.t].id
            );
        }
    }
}

/// Makes the probe's request inside tenant `t`; the block and its layout if admitted.
fn request(sh: &Shared, t: usize, n: u64, severity: Severity) -> Option<(*mut u8, Layout)> {
    let layout = Layout::from_size_align(n as usize, PAGE as usize).unwrap();
    let _g = sh.tree.nodes[t].bc().enter();
    let p = match severity {
        Severity::Barrier => {
            let mut v: Vec<u8> = Vec::new();
            beancounter::fallible(|| v.try_reserve_exact(n as usize)).ok()?;
            let mut v = ManuallyDrop::new(v);
            return Some((v.as_mut_ptr(), Layout::array::<u8>(v.capacity()).unwrap()));
        }
        // SAFETY: a non-zero size.
        Severity::Limit => unsafe { A.alloc(layout) },
        // SAFETY: a non-zero size.
        Severity::Force => beancounter::forced(|| unsafe { A.alloc(layout) }),
    };
    (!p.is_null()).then_some((p, layout))
}

/// `check_barrier`, `checkpoint` inside the tenant, and a guarded future's first poll all
/// report the lowest level of the chain that holds more than its barrier, with its numbers,
/// or nothing if none does.
fn flags(sh: &Shared, t: usize, before: &[Level]) {
    let node = &sh.tree.nodes[t];
    let bc = node.bc();
    let over = before.iter().find(|l| l.mem.held > l.mem.barrier);
    let seen = [
        ("check_barrier", bc.check_barrier().err()),
        ("checkpoint", {
            let _g = bc.enter();
            beancounter::checkpoint().err()
        }),
        ("guarded", first_poll(&bc)),
    ];
    for (how, e) in seen {
        let right = match (over, e) {
            (None, None) => true,
            (Some(l), Some(e)) => {
                e.id == sh.tree.nodes[l.t].id
                    && e.resource == Resource::Memory
                    && e.severity == Severity::Barrier
                    && (e.held, e.bound) == (l.mem.held, l.mem.barrier)
            }
            _ => false,
        };
        if !right {
            fail!(
                "{how} in tenant {}: got {e:?}, the chain is {before:?}",
                node.id
            );
        }
    }
}

/// What an empty future guarded by `bc` resolves to at its first poll.
fn first_poll(bc: &Beancounter) -> Option<Exceeded> {
    let fut = std::pin::pin!(async {}.guarded(bc));
    match fut.poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(r) => r.err(),
        Poll::Pending => fail!("an empty guarded future is pending"),
    }
}
