//! The child side: one workload, one allocator, one timed iteration, one line on stdout.

use beancounter::{BcId, Beancounter, ExecGuard, Resource};
use std::time::Duration;

/// What the parent asked this child to run.
pub struct Mode {
    /// The column: an allocator name, or a `beancounter_*` variant of the switching group.
    pub variant: String,
    /// Smoke-test sizes (a twentieth), for `cargo test --benches` and quick checks.
    pub quick: bool,
}

impl Mode {
    /// `beancounter` (and `beancounter_profiled`): every workload thread works inside a
    /// tenant of its own.
    pub fn tenants(&self) -> bool {
        matches!(
            self.variant.as_str(),
            "beancounter" | "beancounter_profiled"
        )
    }

    /// `full`, or a twentieth of it in quick mode.
    pub fn size(&self, full: usize) -> usize {
        if self.quick {
            (full / 20).max(1)
        } else {
            full
        }
    }

    /// In `beancounter` mode: tenants `first..first + n` (created now), else none.
    pub fn make_tenants(&self, first: u32, n: u32) -> Vec<Beancounter> {
        if !self.tenants() {
            return Vec::new();
        }
        (first..first + n)
            .map(|id| beancounter::find_or_create(BcId(id)).expect("create a tenant"))
            .collect()
    }
}

/// The calling thread enters the first tenant, if there is one, until the guard drops.
pub fn enter_first(tenants: &[Beancounter]) -> Option<ExecGuard> {
    tenants.first().map(Beancounter::enter)
}

/// Which run of the workload this is: the warm-up (untimed) or the measured one.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    WarmUp,
    Timed,
}

/// What one iteration measured itself.
pub struct Iteration {
    /// Wall time of the timed part (set-up such as building a thread pool excluded).
    pub wall: Duration,
    /// Operations in it (requests, polls); 1 for a whole-program iteration.
    pub units: u64,
    /// Resident bytes one second after the workload freed everything, where measured.
    pub rss_after_1s: Option<u64>,
}

impl Iteration {
    /// A whole-program iteration that took `wall`.
    pub fn program(wall: Duration) -> Self {
        Iteration {
            wall,
            units: 1,
            rss_after_1s: None,
        }
    }
}

/// The timed iteration and the minor page faults it caused.
pub struct Measured {
    pub it: Iteration,
    pub minflt: u64,
}

/// Runs `iteration` once to warm up, then once timed; in between and after, reads every
/// tenant's `Memory` and `Allocations` `held` (true usage, what stocks hold excluded: no
/// drain needed), and
/// exits with status 3 if the timed iteration did not give back exactly what it charged.
pub fn measure(tenants: &[Beancounter], mut iteration: impl FnMut(Phase) -> Iteration) -> Measured {
    // Both readings fill buffers allocated here, so neither charges anything itself.
    let mut before = Vec::with_capacity(tenants.len());
    let mut after = Vec::with_capacity(tenants.len());
    iteration(Phase::WarmUp);
    read_held(tenants, &mut before);
    let faults = minor_faults();
    let it = iteration(Phase::Timed);
    let minflt = minor_faults() - faults;
    read_held(tenants, &mut after);
    if before != after {
        for (t, (b, a)) in tenants.iter().zip(before.iter().zip(&after)) {
            if b != a {
                eprintln!(
                    "tenant {}: (Memory, Allocations) held {b:?} before the timed iteration, \
                     {a:?} after it freed everything",
                    t.id()
                );
            }
        }
        eprintln!("accounting check failed: a tenant's held did not return to its start");
        std::process::exit(3);
    }
    Measured { it, minflt }
}

fn read_held(tenants: &[Beancounter], out: &mut Vec<(u64, u64)>) {
    if tenants.is_empty() {
        return;
    }
    out.clear();
    for t in tenants {
        let m = t.stat(Resource::Memory).held;
        let a = t.stat(Resource::Allocations).held;
        out.push((m, a)); // within the capacity reserved in `measure`: no allocation
    }
}

fn rusage() -> libc::rusage {
    // SAFETY: `rusage` is plain old data; all zeros is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a valid, writable `rusage`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    assert_eq!(rc, 0, "getrusage");
    ru
}

/// Minor page faults of the whole process so far.
pub fn minor_faults() -> u64 {
    rusage().ru_minflt as u64
}

/// Peak resident set of the whole process so far, in KiB.
pub fn peak_rss_kib() -> u64 {
    rusage().ru_maxrss as u64
}

/// Resident bytes now, from `/proc/self/statm`.
pub fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|f| f.parse().ok())
        .expect("statm: resident pages");
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page as u64
}

/// The line the parent parses.
pub const RESULT_TAG: &str = "BC_BENCH_RESULT";

/// Prints the result line for the parent.
pub fn report(m: &Measured) {
    let rss_after = m.it.rss_after_1s.map_or(-1, |b| (b / 1024) as i64);
    println!(
        "{RESULT_TAG} wall_ns={} units={} minflt={} maxrss_kib={} rss_after_1s_kib={rss_after}",
        m.it.wall.as_nanos(),
        m.it.units,
        m.minflt,
        peak_rss_kib(),
    );
}

/// xorshift64*: deterministic inputs, cheap enough not to show in the profile.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below((hi - lo + 1) as u64) as usize
    }
}

/// splitmix64: a stateless hash of an index, for inputs that must be the same whichever
/// thread or order produces them.
pub fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Appends `len` lowercase letters and digits drawn from `seed`.
pub fn push_word(out: &mut String, mut seed: u64, len: usize) {
    const ALPHABET: &[u8; 32] = b"abcdefghijklmnopqrstuvwxyz012345";
    for i in 0..len {
        if i % 12 == 11 {
            seed = mix(seed);
        }
        out.push(ALPHABET[(seed >> ((i % 12) * 5)) as usize & 31] as char);
    }
}
