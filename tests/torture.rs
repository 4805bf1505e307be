//! Torture (issue 6, DESIGN §6.1–6.4): eight worker slots allocate, resize and free blocks of
//! 1 B to 4 MiB with canaries for 22 tenants nested four deep, switching tenant with guards
//! mid-stream, handing blocks to each other through channels, reserving fallibly and
//! allocating forced; workers end and are replaced all the time (by the crate's spawn
//! wrapper or `std::thread`) and start short helper threads; two executor threads run
//! futures for the tenants with `in_beancounter` and `guarded`; a controller moves the
//! tenants' limits, often below what they hold, samples their bounds, and retires leaf
//! tenants and creates them again while their blocks are still being used, handed around and
//! freed on other threads, and while threads and tasks still work inside them.
//!
//! Every two seconds every thread rests at a gate and the audit checks, against the
//! harness's ledger of live blocks: each tenant's `held` of `Memory`, `Allocations` and
//! `Threads` exactly; every refusal counted by a tenant seen by the harness, and the other
//! way round; `maxheld` within the limits in force during the window; the registry's
//! invariants; and requests probing each tenant's barrier and limit: every other audit,
//! with every stock given back, admitted or refused (and counted) exactly as the numbers
//! say; in the others, with stocks held by resting threads, admitted whenever they fit. A
//! retired tenant's leftovers count for its parent from the retirement on, and the fresh
//! tenant of the same id starts at zero (`torture/lifecycle.rs`). At the end every tenant is
//! back exactly where it started and gone once its handles are dropped, and every retired
//! one is freed.
//!
//! `BEANCOUNTER_TORTURE_SECS=<n>` sets how long the workers run (default 35 s).
//! The harness's modules live in `tests/torture/`.

#[path = "torture/audit.rs"]
mod audit;
mod common;
#[path = "torture/controller.rs"]
mod controller;
#[path = "torture/gate.rs"]
mod gate;
#[path = "torture/lifecycle.rs"]
mod lifecycle;
#[path = "torture/model.rs"]
mod model;
#[path = "torture/tasks.rs"]
mod tasks;
#[path = "torture/worker.rs"]
mod worker;

use common::{statm, Rng, Runner};
use model::{fail, spawn_thread, Count, Shared, Tree};
use std::sync::atomic::Ordering::SeqCst;
use std::sync::mpsc::sync_channel;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use worker::{Slot, SLOTS};

#[global_allocator]
static A: beancounter::BeanAlloc = beancounter::BeanAlloc::new();

/// How long the workers run by default: about 45 s for the whole check in a debug build on
/// two cores.
const DEFAULT_SECS: u64 = 35;
const AUDIT_EVERY: Duration = Duration::from_secs(2);
/// Blocks an inbox holds at most (a full inbox makes the sender free the block itself).
const INBOX: usize = 1024;

fn run_secs() -> u64 {
    match std::env::var("BEANCOUNTER_TORTURE_SECS") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|_| panic!("BEANCOUNTER_TORTURE_SECS={s}: not a number")),
        Err(_) => DEFAULT_SECS,
    }
}

fn main() {
    let secs = run_secs();
    let mut r = Runner::new();
    // In a child process: an abort (a null for an ordinary allocation outside the harness's
    // control) fails the check with its output instead of taking the binary down.
    r.isolated(
        "torture_every_tenant_exact_under_churn_limits_and_futures",
        secs + 240,
        || torture(secs),
    );
    r.finish();
}

/// A worker slot: its thread (and the tenant and incarnation the crate's wrapper started it
/// in), or what the last thread left while no thread runs.
enum Seat {
    Busy(JoinHandle<Slot>, Option<(usize, u64)>),
    Idle(Slot),
    /// Only while the seat's value is moved out.
    Moving,
}

struct Run {
    sh: Arc<Shared>,
    rng: Rng,
    seats: Vec<Seat>,
    /// Executors and the controller.
    fixed: Vec<JoinHandle<()>>,
    audit: audit::Audit,
}

impl Run {
    fn start(rng: &mut Rng) -> Run {
        tasks::init();
        let tree = Tree::build(rng);
        let (senders, inboxes): (Vec<_>, Vec<_>) = (0..SLOTS).map(|_| sync_channel(INBOX)).unzip();
        let sh = Arc::new(Shared::new(tree, senders));
        let seats = inboxes
            .into_iter()
            .enumerate()
            .map(|(index, inbox)| {
                Seat::Idle(Slot {
                    index,
                    rng: Rng::new(rng.next()),
                    live: Vec::with_capacity(worker::MAX_LIVE + 8),
                    inbox,
                })
            })
            .collect();
        let mut fixed = Vec::new();
        for me in 0..tasks::EXECUTORS as u8 {
            let sh = sh.clone();
            let run = move || tasks::executor(sh, me);
            fixed.push(thread(format!("executor-{me}"), run));
        }
        let (sh2, seed) = (sh.clone(), rng.next());
        fixed.push(thread("controller".into(), move || {
            controller::controller(sh2, seed)
        }));
        Run {
            audit: audit::Audit::new(&sh),
            sh,
            rng: Rng::new(rng.next()),
            seats,
            fixed,
        }
    }

    /// Starts the next thread of a slot, for a random number of operations.
    fn spawn_worker(&mut self, slot: Slot) -> Seat {
        let budget = 2_000 + self.rng.below(30_000);
        let name = format!("worker-{}", slot.index);
        let into =
            (self.rng.below(3) != 0).then(|| self.rng.below(self.sh.tree.len() as u64) as usize);
        let parcel = Arc::new(Mutex::new(Some(slot)));
        let body = |fork_inc: Option<u64>| {
            let (sh, parcel) = (self.sh.clone(), parcel.clone());
            let fork = into.filter(|_| fork_inc.is_some());
            move || {
                let slot = parcel.lock().unwrap().take().expect("the slot");
                worker::run(sh, slot, fork, budget)
            }
        };
        let counts = (Count::WorkersCrate, Count::WorkersStd);
        let (h, fork_inc) = spawn_thread(&self.sh, into, name, counts, body);
        Seat::Busy(h, into.zip(fork_inc))
    }

    /// Joins the workers that ended (they are replaced by `refill`).
    fn reap_workers(&mut self) {
        for seat in &mut self.seats {
            if matches!(seat, Seat::Busy(h, _) if h.is_finished()) {
                let Seat::Busy(h, _) = std::mem::replace(seat, Seat::Moving) else {
                    unreachable!()
                };
                *seat = Seat::Idle(join(h));
            }
        }
    }

    fn refill(&mut self) {
        for i in 0..self.seats.len() {
            if matches!(self.seats[i], Seat::Idle(_)) {
                let Seat::Idle(slot) = std::mem::replace(&mut self.seats[i], Seat::Moving) else {
                    unreachable!()
                };
                self.seats[i] = self.spawn_worker(slot);
            }
        }
    }

    /// Fails if an executor or the controller ended (it panicked).
    fn check_fixed(&mut self) {
        if let Some(i) = self.fixed.iter().position(|h| h.is_finished()) {
            join(self.fixed.swap_remove(i));
            fail!("an executor or the controller ended early");
        }
    }

    fn busy(&self) -> usize {
        self.seats
            .iter()
            .filter(|s| matches!(s, Seat::Busy(..)))
            .count()
    }

    /// Brings every thread to rest and audits; every other audit with stocks given back (and
    /// probes), every fourth with every block's canary checked.
    fn audit(&mut self) {
        let n = self.sh.tally.get(Count::Checkpoints);
        let (drained, deep) = (n % 2 == 0, n % 4 == 0);
        self.sh.gate.close(drained, deep);
        loop {
            // A worker may end instead of resting: it is joined, and replaced after.
            self.reap_workers();
            self.check_fixed();
            let running = self.busy() + self.fixed.len();
            if self.sh.gate.resting(Duration::from_millis(2)) == running {
                break;
            }
        }
        let forks: Vec<(usize, u64)> = self
            .seats
            .iter()
            .filter_map(|s| match s {
                Seat::Busy(_, fork) => *fork,
                _ => None,
            })
            .collect();
        self.audit.check(&self.sh, &forks, drained);
        self.sh.tally.add(Count::Checkpoints, 1);
        self.sh.tally.add(Count::Drained, drained as u64);
        self.sh.gate.open();
    }

    /// Stops every thread, audits once more, frees every block left, and checks that every
    /// tenant is back where it started.
    fn finish(mut self) -> Arc<Shared> {
        self.sh.stop.store(true, SeqCst);
        while self.busy() > 0 {
            self.reap_workers();
            std::thread::sleep(Duration::from_millis(5));
        }
        self.sh.tasks_closed.store(true, SeqCst);
        for h in self.fixed.drain(..) {
            join(h);
        }
        if tasks::live() != 0 {
            fail!("{} tasks outlived the executors", tasks::live());
        }
        self.audit.check(&self.sh, &[], true);
        for seat in self.seats.drain(..) {
            let Seat::Idle(slot) = seat else {
                unreachable!("every worker was joined")
            };
            while let Ok(b) = slot.inbox.try_recv() {
                self.sh.free(b);
            }
            for b in slot.live {
                self.sh.free(b);
            }
        }
        beancounter::drain_stock();
        for (t, node) in self.sh.tree.nodes.iter().enumerate() {
            let held = [
                beancounter::Resource::Memory,
                beancounter::Resource::Allocations,
                beancounter::Resource::Threads,
            ]
            .map(|r| node.bc().stat(r).held);
            if held != [0; 3] || self.sh.expected(t) != (0, 0) {
                fail!("tenant {} holds {held:?} with every block freed", node.id);
            }
        }
        beancounter::check_invariants().unwrap_or_else(|e| fail!("registry invariant: {e}"));
        beancounter::check_heap().unwrap_or_else(|e| fail!("heap invariant: {e}"));
        self.sh
    }
}

fn thread(name: String, f: impl FnOnce() + Send + 'static) -> JoinHandle<()> {
    std::thread::Builder::new()
        .name(name)
        .spawn(f)
        .expect("spawn")
}

/// Joins `h`, failing with its panic if it panicked.
fn join<T>(h: JoinHandle<T>) -> T {
    h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1 << 20) as f64
}

fn torture(secs: u64) {
    let (rss0, mapped0, live0, retired0) = (
        statm().0,
        beancounter::mapped_bytes(),
        beancounter::live_count(),
        beancounter::retired_count(),
    );
    let mut rng = Rng::new(0x7047_7572_6521);
    let began = Instant::now();
    let mut run = Run::start(&mut rng);
    let deadline = began + Duration::from_secs(secs);
    let report_every = Duration::from_secs((secs / 12).max(10));
    let (mut next_audit, mut next_report) = (began + AUDIT_EVERY, began + report_every);
    let mut peak_mapped = beancounter::mapped_bytes();
    while Instant::now() < deadline {
        run.reap_workers();
        run.refill();
        run.check_fixed();
        peak_mapped = peak_mapped.max(beancounter::mapped_bytes());
        if Instant::now() >= next_audit {
            run.audit();
            next_audit = Instant::now() + AUDIT_EVERY;
        }
        if Instant::now() >= next_report {
            let t = &run.sh.tally;
            println!(
                "    {:>5.0} s: {} ops, {} audits, rss {:.0} MiB, mapped {:.0} MiB",
                began.elapsed().as_secs_f64(),
                t.get(Count::Ops),
                t.get(Count::Checkpoints),
                mib(statm().0),
                mib(beancounter::mapped_bytes()),
            );
            next_report += report_every;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let sh = run.finish();
    let secs = began.elapsed().as_secs_f64();
    let (rss1, mapped1) = (statm().0, beancounter::mapped_bytes());
    let t = &sh.tally;
    println!(
        "    {} operations in {secs:.1} s ({:.0}/s); rss {:.1} -> {:.1} MiB; mapped {:.1} -> \
         {:.1} MiB (peak {:.1})",
        t.get(Count::Ops),
        t.get(Count::Ops) as f64 / secs,
        mib(rss0),
        mib(rss1),
        mib(mapped0),
        mib(mapped1),
        mib(peak_mapped),
    );
    let all: Vec<String> = t.all().map(|(n, v)| format!("{n} {v}")).collect();
    for line in all.chunks(6) {
        println!("    {}", line.join(", "));
    }
    // The run did what it is meant to: every kind of event happened.
    for c in [
        Count::Huge,
        Count::FallibleRefused,
        Count::OrdinaryRefused,
        Count::Received,
        Count::WorkersCrate,
        Count::WorkersStd,
        Count::HelpersCrate,
        Count::HelpersStd,
        Count::TasksDone,
        Count::GuardedStopped,
        Count::TasksMigrated,
        Count::LimitsBelowHeld,
        Count::Drained,
        Count::Probes,
        Count::Retired,
        Count::LateCharges,
        Count::LeftoversFreed,
    ] {
        if t.get(c) == 0 {
            fail!("the run never did {c:?}");
        }
    }
    let ids: Vec<_> = sh.tree.nodes.iter().map(|n| n.id).collect();
    drop(Arc::into_inner(sh).expect("the run's threads are gone"));
    for id in ids {
        if beancounter::lookup(id).is_some() {
            fail!("tenant {id} outlived its handles: something is still charged to it");
        }
    }
    if beancounter::live_count() != live0 {
        fail!(
            "{} beancounters live, {live0} before the run",
            beancounter::live_count()
        );
    }
    // Every retired incarnation is freed once nothing is charged through it and nothing
    // refers to it.
    if beancounter::retired_count() != retired0 {
        fail!(
            "{} retired beancounters are still kept, {retired0} before the run",
            beancounter::retired_count()
        );
    }
}
