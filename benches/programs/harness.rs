//! The parent side: runs every (workload, column) pair as a child process, round after
//! round, and prints one table per group of the medians.

use crate::child::{Measured, Mode, RESULT_TAG};
use crate::dispatch::ALLOC_VAR;
use std::collections::BTreeMap;
use std::fmt::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

/// Set in a child: the full name of the workload it runs.
pub const CHILD_VAR: &str = "BC_BENCH_CHILD";
/// Set in a child for smoke-test sizes.
pub const QUICK_VAR: &str = "BC_BENCH_QUICK";
/// Overrides the number of rounds.
pub const ROUNDS_VAR: &str = "BC_BENCH_ROUNDS";
const DEFAULT_ROUNDS: usize = 5;

/// A table: its columns (one per allocator, in the order printed) and its ratio columns.
pub struct Group {
    pub name: &'static str,
    /// Column labels.
    pub columns: &'static [&'static str],
    /// `(label, numerator column, denominator column)` of median times.
    pub ratios: &'static [(&'static str, usize, usize)],
    /// Whether the table has an `rss_after_1s` column per allocator.
    pub rss_after: bool,
    /// Whether the table ends with the geometric mean of each ratio over its real-library
    /// workloads.
    pub geomean: bool,
}

/// One row of a table.
pub struct Workload {
    pub group: &'static Group,
    pub name: &'static str,
    /// The variant (`BC_BENCH_ALLOC` value) of each of the group's columns.
    pub variants: &'static [&'static str],
    /// `ms` (per whole-program iteration) or `ns/<unit>`.
    pub unit: &'static str,
    /// Counts in the group's geometric mean.
    pub real_library: bool,
    pub run: fn(&Mode) -> Measured,
}

impl Workload {
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.group.name, self.name)
    }
}

/// `BC_BENCH_QUICK=1`: smoke-test sizes.
pub fn quick_env() -> bool {
    std::env::var(QUICK_VAR).is_ok_and(|v| v == "1")
}

/// One child's report.
#[derive(Clone, Copy)]
struct Sample {
    round: usize,
    /// Wall time per unit, in the workload's unit.
    time: f64,
    minflt: f64,
    peak_mib: f64,
    rss_after_mib: Option<f64>,
}

fn parse(stdout: &str, unit: &str, round: usize) -> Option<Sample> {
    let line = stdout.lines().find(|l| l.starts_with(RESULT_TAG))?;
    let mut fields = BTreeMap::new();
    for kv in line.split_whitespace().skip(1) {
        let (k, v) = kv.split_once('=')?;
        fields.insert(k, v.parse::<f64>().ok()?);
    }
    let per_unit = fields.get("wall_ns")? / fields.get("units")?;
    let after = *fields.get("rss_after_1s_kib")?;
    Some(Sample {
        round,
        time: if unit == "ms" {
            per_unit / 1e6
        } else {
            per_unit
        },
        minflt: *fields.get("minflt")?,
        peak_mib: fields.get("maxrss_kib")? / 1024.0,
        rss_after_mib: (after >= 0.0).then(|| after / 1024.0),
    })
}

fn median(mut xs: Vec<f64>) -> Option<f64> {
    if xs.is_empty() {
        return None;
    }
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    Some(if xs.len() % 2 == 1 {
        xs[m]
    } else {
        (xs[m - 1] + xs[m]) / 2.0
    })
}

/// The median over the rounds of `num`'s time divided by `den`'s in the same round. The
/// columns of a round run back to back, so a slow phase of the machine (another process,
/// frequency changes) cancels out of the ratio, where a ratio of medians would keep it.
fn paired_ratio(num: &[Sample], den: &[Sample]) -> Option<f64> {
    let ratios = num
        .iter()
        .filter_map(|n| {
            let d = den.iter().find(|d| d.round == n.round)?;
            Some(n.time / d.time)
        })
        .collect();
    median(ratios)
}

/// The medians of one cell.
struct Cell {
    time: Option<f64>,
    minflt: Option<f64>,
    peak_mib: Option<f64>,
    rss_after_mib: Option<f64>,
}

fn cell(samples: &[Sample]) -> Cell {
    let col = |f: fn(&Sample) -> Option<f64>| median(samples.iter().filter_map(f).collect());
    Cell {
        time: col(|s| Some(s.time)),
        minflt: col(|s| Some(s.minflt)),
        peak_mib: col(|s| Some(s.peak_mib)),
        rss_after_mib: col(|s| s.rss_after_mib),
    }
}

/// The parent's `main`: `args` are the bench binary's arguments.
pub fn run(workloads: &[Workload], args: &[String]) {
    let started = Instant::now();
    // `cargo bench` passes `--bench`; without it (`cargo test --benches`) this is a smoke
    // test: one round at a twentieth of the sizes, and no table written.
    let quick = !args.iter().any(|a| a == "--bench") || quick_env();
    let rounds = match std::env::var(ROUNDS_VAR) {
        Ok(r) => r.parse().expect("BC_BENCH_ROUNDS: a number"),
        Err(_) if quick => 1,
        Err(_) => DEFAULT_ROUNDS,
    };
    // Like criterion: the first argument that is not a flag filters by substring.
    let filter = args.iter().find(|a| !a.starts_with('-')).cloned();
    let selected: Vec<&Workload> = workloads
        .iter()
        .filter(|w| {
            filter
                .as_ref()
                .is_none_or(|f| w.full_name().contains(f.as_str()))
        })
        .collect();
    if selected.is_empty() {
        eprintln!("programs: no workload matches {filter:?}");
        return;
    }
    let (samples, failures) = run_children(&selected, rounds, quick);
    let summary = format!(
        "`cargo bench --bench programs`: {rounds} round(s), each cell the median over them; \
         {} workload(s){}; run took {:.0} s.{}",
        selected.len(),
        filter.map_or(String::new(), |f| format!(" matching `{f}`")),
        started.elapsed().as_secs_f64(),
        if quick { " Quick run: sizes / 20." } else { "" }
    );
    let doc = render(&selected, &samples, &summary);
    print!("\n{doc}");
    if quick {
        eprintln!("quick run: target/bench-programs.md not written");
    } else {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/target");
        let path = format!("{dir}/bench-programs.md");
        std::fs::create_dir_all(dir).expect("create target/");
        std::fs::write(&path, &doc).expect("write target/bench-programs.md");
        eprintln!("written to {path}");
    }
    if !failures.is_empty() {
        eprintln!("\n{} child run(s) FAILED:", failures.len());
        for f in &failures {
            eprintln!("{f}");
        }
        std::process::exit(1);
    }
}

/// The samples of each (workload full name, column).
type Samples = BTreeMap<(String, usize), Vec<Sample>>;

/// Runs `rounds` rounds of one child per workload and column, columns rotated each round.
/// Returns the samples and a description of each failed child.
fn run_children(selected: &[&Workload], rounds: usize, quick: bool) -> (Samples, Vec<String>) {
    let exe = std::env::current_exe().expect("the bench binary's path");
    let mut samples = Samples::new();
    let mut failures = Vec::new();
    for round in 0..rounds {
        for w in selected {
            let n = w.variants.len();
            // Every column once per round, starting one further each round.
            for c in (0..n).map(|k| (k + round) % n) {
                let variant = w.variants[c];
                let out = Command::new(&exe)
                    .env(CHILD_VAR, w.full_name())
                    .env(ALLOC_VAR, variant)
                    .env(QUICK_VAR, if quick { "1" } else { "" })
                    .stdin(Stdio::null())
                    .output()
                    .expect("start a child");
                let stdout = String::from_utf8_lossy(&out.stdout);
                let label = format!("[round {}/{rounds}] {} {variant}", round + 1, w.full_name());
                match parse(&stdout, w.unit, round).filter(|_| out.status.success()) {
                    Some(s) => {
                        eprintln!("{label}: {:.1} {}", s.time, w.unit);
                        samples.entry((w.full_name(), c)).or_default().push(s);
                    }
                    None => {
                        let stderr = String::from_utf8_lossy(&out.stderr);
                        eprintln!("{label}: FAILED ({})\n{stdout}{stderr}", out.status);
                        failures.push(format!("{label}: {}\n{stderr}", out.status));
                    }
                }
            }
        }
    }
    (samples, failures)
}

/// The markdown document: a summary line, the machine, the legend, one table per group.
fn render(selected: &[&Workload], samples: &Samples, summary: &str) -> String {
    let mut doc = String::new();
    writeln!(doc, "# Whole-program benchmarks\n\n{summary}\n").unwrap();
    writeln!(doc, "Machine: {}.\n", machine()).unwrap();
    writeln!(doc, "{LEGEND}").unwrap();
    let mut groups: Vec<&Group> = Vec::new();
    for w in selected {
        if !groups.iter().any(|g| std::ptr::eq(*g, w.group)) {
            groups.push(w.group);
        }
    }
    for g in groups {
        let rows: Vec<&Workload> = selected
            .iter()
            .copied()
            .filter(|w| std::ptr::eq(w.group, g))
            .collect();
        table(&mut doc, g, &rows, samples);
    }
    doc
}

/// CPU model, cores, memory and kernel, from `/proc`.
fn machine() -> String {
    let read = |path| std::fs::read_to_string(path).unwrap_or_default();
    let field = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_owned())
            .unwrap_or_else(|| "?".to_owned())
    };
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kib: u64 = field(&read("/proc/meminfo"), "MemTotal")
        .trim_end_matches(" kB")
        .parse()
        .unwrap_or(0);
    format!(
        "{cpus} CPUs ({}), {} GiB, Linux {}",
        field(&read("/proc/cpuinfo"), "model name"),
        (mem_kib + (1 << 19)) >> 20,
        read("/proc/sys/kernel/osrelease").trim()
    )
}

const LEGEND: &str = "\
Each column group is one allocator: the median wall time (`ms` per whole-program \
iteration, or `ns` per request / poll, per thread), `minflt` = minor page faults during the \
timed iteration, `peak` = peak RSS of the child process in MiB, and for `programs` \
`rss 1s` = resident MiB one second after the workload freed everything (`fragmentation` \
only). `beancounter` runs every workload thread in a tenant of its own; `beancounter_root` \
the same allocator with no tenant entered; `beancounter_profiled` the `beancounter` column \
with heap profiling on at the default rate (`profile::start(DEFAULT_SAMPLE_BYTES)`, one \
sample per 512 KiB). In `switching`, `noswitch` is the same work on \
`BeanAlloc` without the guard or `in_scope` (`per_request`, `per_request_in_scope`) or without `in_beancounter` (`per_poll`). \
Ratios are of times: the median over the rounds of the ratio within each round (the \
columns of a round run back to back, so slow phases of the machine cancel); `ours` = \
`beancounter`, `root` = `beancounter_root`. \
FAIL marks a cell whose runs failed.
";

fn fmt(x: Option<f64>, decimals: usize) -> String {
    x.map_or_else(|| "FAIL".to_owned(), |x| format!("{x:.decimals$}"))
}

fn table(doc: &mut String, g: &Group, rows: &[&Workload], samples: &Samples) {
    writeln!(doc, "\n## {}\n", g.name).unwrap();
    let mut head = String::from("| workload | unit |");
    let mut rule = String::from("|---|---|");
    for c in g.columns {
        write!(head, " {c} | minflt | peak |").unwrap();
        rule.push_str("---:|---:|---:|");
        if g.rss_after {
            head.push_str(" rss 1s |");
            rule.push_str("---:|");
        }
    }
    for (label, _, _) in g.ratios {
        write!(head, " {label} |").unwrap();
        rule.push_str("---:|");
    }
    writeln!(doc, "{head}\n{rule}").unwrap();
    let mut logs = vec![Vec::new(); g.ratios.len()];
    for w in rows {
        let of = |c: usize| {
            samples
                .get(&(w.full_name(), c))
                .map_or(&[][..], Vec::as_slice)
        };
        let cells: Vec<Cell> = (0..g.columns.len()).map(|c| cell(of(c))).collect();
        let decimals = if w.unit == "ms" { 1 } else { 0 };
        let mut line = format!("| `{}` | {} |", w.name, w.unit);
        for c in &cells {
            write!(
                line,
                " {} | {} | {} |",
                fmt(c.time, decimals),
                fmt(c.minflt, 0),
                fmt(c.peak_mib, 0)
            )
            .unwrap();
            if g.rss_after {
                let after = match (c.rss_after_mib, c.time) {
                    (None, Some(_)) => "-".to_owned(),
                    (after, _) => fmt(after, 0),
                };
                write!(line, " {after} |").unwrap();
            }
        }
        for (k, &(_, num, den)) in g.ratios.iter().enumerate() {
            let ratio = paired_ratio(of(num), of(den));
            if let Some(r) = ratio.filter(|_| w.real_library) {
                logs[k].push(r.ln());
            }
            write!(line, " {} |", fmt(ratio, 2)).unwrap();
        }
        writeln!(doc, "{line}").unwrap();
    }
    if g.geomean && logs.iter().any(|l| l.len() > 1) {
        let mut line = String::from("| geomean (real libraries) | |");
        let per_column = if g.rss_after { 4 } else { 3 };
        line.push_str(&" |".repeat(per_column * g.columns.len()));
        for l in &logs {
            let gm = (!l.is_empty()).then(|| (l.iter().sum::<f64>() / l.len() as f64).exp());
            write!(line, " {} |", fmt(gm, 2)).unwrap();
        }
        writeln!(doc, "{line}").unwrap();
    }
}
