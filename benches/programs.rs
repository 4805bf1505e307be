//! Whole-program benchmarks: real libraries (serde_json, regex, rayon, std collections,
//! tokio) run as whole programs on each allocator, as `DESIGN.md` §8 asks.
//!
//! # Method
//!
//! Each measurement is a fresh child process (this binary, started again with
//! `BC_BENCH_CHILD=<group/workload>` and `BC_BENCH_ALLOC=<column>`), so that no allocator
//! inherits another's heap, page faults and peak RSS are per allocator, and one global
//! allocator serves the whole program (the binary's `#[global_allocator]` forwards to the
//! allocator chosen at the first allocation; see `programs/dispatch.rs`). The columns are
//! `beancounter` (`BeanAlloc`, every workload thread inside a tenant of its own),
//! `beancounter_root` (`BeanAlloc`, no tenant entered), `mimalloc`, `jemalloc` and
//! `system` (glibc); in the `switching` group the second column is the same work on
//! `BeanAlloc` without switching tenant (`beancounter_noguard` / `beancounter_nowrap`).
//!
//! A child runs the workload once to warm up, then once timed (generating the input is part
//! of each run, as in the program it stands for), and prints one line: the wall time of the
//! timed part (set-up such as building a thread pool left out), the minor page faults during it (`getrusage`), and the process's peak RSS
//! (`ru_maxrss`, the warm-up included); `fragmentation` adds the resident set one second
//! after it freed everything (`/proc/self/statm`). In the `beancounter` column the child
//! also checks that every tenant's `Memory` and `Allocations` `held` (true usage) is back
//! where it was before the timed iteration, and fails otherwise; so does the parent then.
//!
//! The parent runs rounds (5 by default, `BC_BENCH_ROUNDS=n` to change): in each round every
//! workload runs once on every column, in an order rotated by one each round, so that slow
//! drift of the machine spreads over all columns. Each table cell is the median over the
//! rounds; each ratio column is the median over the rounds of the ratio within the round
//! (paired, so a slow phase of a shared machine cancels). The tables (one per group) are
//! printed and written to `target/bench-programs.md`.
//!
//! Inputs are generated from fixed seeds, and every result is consumed (`black_box`). Sizes
//! are set so that one timed iteration takes 0.3-0.9 s with mimalloc on the 2-vCPU bench
//! machine (`fragmentation`, whose time matters less, ~0.07 s); the default run (9
//! workloads x 5 columns x 5 rounds = 225 children) takes about 4.5 minutes there.
//!
//! # Running
//!
//! ```text
//! cargo bench --bench programs                  # everything
//! cargo bench --bench programs -- hashmap       # the workloads whose name contains `hashmap`
//! BC_BENCH_ROUNDS=3 cargo bench --bench programs -- switching
//! BC_BENCH_QUICK=1 cargo bench --bench programs # smoke test: sizes / 20, 1 round
//! ```
//!
//! Without `--bench` (`cargo test --benches`) the binary runs the smoke test.

#[path = "programs/child.rs"]
mod child;
#[path = "programs/collections.rs"]
mod collections;
#[path = "programs/cross_thread.rs"]
mod cross_thread;
#[path = "programs/dispatch.rs"]
mod dispatch;
#[path = "programs/fragmentation.rs"]
mod fragmentation;
#[path = "programs/harness.rs"]
mod harness;
#[path = "programs/switching.rs"]
mod switching;
#[path = "programs/text.rs"]
mod text;

use child::Mode;
use harness::{Group, Workload};

#[global_allocator]
static ALLOC: dispatch::Dispatch = dispatch::Dispatch;

const ALLOCATORS: &[&str] = &[
    "beancounter",
    "beancounter_root",
    "mimalloc",
    "jemalloc",
    "system",
];

/// The programs also run with heap profiling on at the default rate (`profiled`).
const PROGRAM_COLUMNS: &[&str] = &[
    "beancounter",
    "beancounter_root",
    "mimalloc",
    "jemalloc",
    "system",
    "beancounter_profiled",
];

static PROGRAMS: Group = Group {
    name: "programs",
    columns: PROGRAM_COLUMNS,
    ratios: &[
        ("ours/mimalloc", 0, 2),
        ("root/mimalloc", 1, 2),
        ("ours/root", 0, 1),
        ("profiled/ours", 5, 0),
    ],
    rss_after: true,
    geomean: true,
};

static SWITCHING: Group = Group {
    name: "switching",
    columns: &["beancounter", "noswitch", "mimalloc", "jemalloc", "system"],
    ratios: &[("ours/noswitch", 0, 1), ("ours/mimalloc", 0, 2)],
    rss_after: false,
    geomean: false,
};

static CROSS_THREAD: Group = Group {
    name: "cross_thread",
    columns: ALLOCATORS,
    ratios: &[
        ("ours/mimalloc", 0, 2),
        ("root/mimalloc", 1, 2),
        ("ours/root", 0, 1),
    ],
    rss_after: false,
    geomean: false,
};

const PER_REQUEST: &[&str] = &[
    "beancounter",
    "beancounter_noguard",
    "mimalloc",
    "jemalloc",
    "system",
];
const PER_POLL: &[&str] = &[
    "beancounter",
    "beancounter_nowrap",
    "mimalloc",
    "jemalloc",
    "system",
];

fn program(name: &'static str, real_library: bool, run: fn(&Mode) -> child::Measured) -> Workload {
    Workload {
        group: &PROGRAMS,
        name,
        variants: PROGRAM_COLUMNS,
        unit: "ms",
        real_library,
        run,
    }
}

fn workloads() -> Vec<Workload> {
    let switching = |name, variants, unit, run| Workload {
        group: &SWITCHING,
        name,
        variants,
        unit,
        real_library: false,
        run,
    };
    vec![
        program("json_roundtrip", true, text::json_roundtrip),
        program("btree_strings", true, collections::btree_strings),
        program("hashmap_churn", true, collections::hashmap_churn),
        program("regex_log", true, text::regex_log),
        program("parallel_sort", true, collections::parallel_sort),
        program("fragmentation", false, fragmentation::fragmentation),
        Workload {
            group: &CROSS_THREAD,
            name: "larson",
            variants: ALLOCATORS,
            unit: "ns/op",
            real_library: false,
            run: cross_thread::larson,
        },
        Workload {
            group: &CROSS_THREAD,
            name: "producer_consumer",
            variants: ALLOCATORS,
            unit: "ns/op",
            real_library: false,
            run: cross_thread::producer_consumer,
        },
        switching(
            "per_request/1thread",
            PER_REQUEST,
            "ns/req",
            switching::per_request_1thread,
        ),
        switching(
            "per_request/2threads",
            PER_REQUEST,
            "ns/req",
            switching::per_request_2threads,
        ),
        switching(
            "per_request_in_scope/1thread",
            PER_REQUEST,
            "ns/req",
            switching::per_request_in_scope_1thread,
        ),
        switching(
            "per_request_in_scope/2threads",
            PER_REQUEST,
            "ns/req",
            switching::per_request_in_scope_2threads,
        ),
        switching(
            "per_poll/tokio",
            PER_POLL,
            "ns/poll",
            switching::per_poll_tokio,
        ),
    ]
}

fn main() {
    let workloads = workloads();
    let Ok(name) = std::env::var(harness::CHILD_VAR) else {
        let args: Vec<String> = std::env::args().skip(1).collect();
        harness::run(&workloads, &args);
        return;
    };
    let w = workloads
        .iter()
        .find(|w| w.full_name() == name)
        .unwrap_or_else(|| panic!("no workload named {name}"));
    let variant = std::env::var(dispatch::ALLOC_VAR).unwrap_or_else(|_| "beancounter".into());
    assert!(
        w.variants.contains(&variant.as_str()) && dispatch::allocator_of(&variant).is_some(),
        "{name} has no column {variant}"
    );
    if variant == "beancounter_profiled" {
        beancounter::profile::start(beancounter::profile::DEFAULT_SAMPLE_BYTES)
            .expect("start heap profiling");
    }
    let mode = Mode {
        variant,
        quick: harness::quick_env(),
    };
    let measured = (w.run)(&mode);
    child::report(&measured);
}
