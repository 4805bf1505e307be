//! Shared pieces of the allocator test binaries (`harness = false`): a runner that prints one
//! line per check and the closing `N passed, M failed` line, tenant counters, patterns, and a
//! small deterministic random generator.
#![allow(dead_code)]

pub mod tasks;

use beancounter::{Beancounter, Resource};
use std::alloc::Layout;
use std::panic::{self, AssertUnwindSafe};
use std::time::Instant;

/// Runs named checks in order, catching panics, and reports like libtest does.
pub struct Runner {
    passed: usize,
    failed: Vec<&'static str>,
    filter: Option<String>,
}

impl Runner {
    /// A runner; the first command-line argument that is not a flag filters checks by name.
    pub fn new() -> Runner {
        let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
        // One line per panic, without the backtrace RUST_BACKTRACE may ask for: the check's
        // name and message say what broke.
        panic::set_hook(Box::new(|info| {
            let thread = std::thread::current();
            eprintln!(
                "thread '{}' panicked at {}:\n{}",
                thread.name().unwrap_or("<unnamed>"),
                info.location().map_or_else(String::new, |l| l.to_string()),
                info.payload()
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| info.payload().downcast_ref::<&str>().copied())
                    .unwrap_or("(non-string payload)")
            );
        }));
        Runner {
            passed: 0,
            failed: Vec::new(),
            filter,
        }
    }

    /// Runs `f` as the check `name`; a panic fails it.
    pub fn check(&mut self, name: &'static str, f: impl FnOnce()) {
        if child_role().is_some() {
            return;
        }
        if let Some(filter) = &self.filter {
            if !name.contains(filter.as_str()) {
                return;
            }
        }
        let start = Instant::now();
        let result = panic::catch_unwind(AssertUnwindSafe(f));
        let secs = start.elapsed().as_secs_f64();
        match result {
            Ok(()) => {
                println!("check {name} ... ok ({secs:.2} s)");
                self.passed += 1;
            }
            Err(_) => {
                println!("check {name} ... FAILED ({secs:.2} s)");
                self.failed.push(name);
            }
        }
    }

    /// Runs `f` as the check `name` in a child process (this binary again, with
    /// [`CHILD_ENV`] set), so that an abort or a hang fails the check, not the whole binary.
    /// The child must print `child ok` and exit 0 within `timeout_secs`.
    pub fn isolated(&mut self, name: &'static str, timeout_secs: u64, f: impl FnOnce()) {
        match child_role() {
            Some(role) if role == name => {
                f();
                println!("child ok");
                std::process::exit(0);
            }
            Some(_) => {}
            None => self.check(name, || expect_child_ok(name, timeout_secs)),
        }
    }

    /// Prints the closing line and exits: status 0 only if every check passed.
    pub fn finish(self) -> ! {
        if let Some(role) = child_role() {
            println!("unknown child role {role}");
            std::process::exit(2);
        }
        if !self.failed.is_empty() {
            println!("failed checks:");
            for name in &self.failed {
                println!("    {name}");
            }
        }
        println!("{} passed, {} failed", self.passed, self.failed.len());
        std::process::exit(if self.failed.is_empty() { 0 } else { 1 });
    }
}

/// A fresh top-level tenant (panics if the id is taken by a live beancounter with a charge).
pub fn tenant(id: u32) -> Beancounter {
    beancounter::find_or_create(beancounter::BcId(id)).expect("tenant")
}

/// True `Memory` held by `bc` (stocks excluded).
pub fn memory(bc: &Beancounter) -> u64 {
    bc.stat(Resource::Memory).held
}

/// True `Memory` and `Allocations` held by `bc` (stocks excluded).
pub fn held(bc: &Beancounter) -> (u64, u64) {
    (
        bc.stat(Resource::Memory).held,
        bc.stat(Resource::Allocations).held,
    )
}

/// The slab class size the allocator charges for a small request (`DESIGN.md` §3.2 and
/// `size_class.rs`: every 8 bytes to 64, every 16 to 128, then four per doubling to 32 KiB),
/// or `None` for a request served by page runs.
pub fn class_size(size: usize, align: usize) -> Option<usize> {
    const SMALL_MAX: usize = 32 << 10;
    let classes = || {
        let mut v: Vec<usize> = (1..=8).map(|c| c * 8).collect();
        v.extend((5..=8).map(|c| c * 16));
        let mut base = 128;
        while base < SMALL_MAX {
            for q in 1..=4 {
                v.push(base + base / 4 * q);
            }
            base *= 2;
        }
        v
    };
    if align > 4096 {
        return None;
    }
    let need = if align <= 8 {
        size.max(1)
    } else {
        size.max(align).next_multiple_of(align)
    };
    if need > SMALL_MAX {
        return None;
    }
    classes()
        .into_iter()
        .find(|&c| c >= need && c % align.min(4096) == 0)
}

/// What the allocator charges to `Memory` for a block of this layout.
pub fn charged_bytes(layout: Layout) -> u64 {
    match class_size(layout.size(), layout.align()) {
        Some(c) => c as u64,
        None => layout.size().next_multiple_of(4096).max(4096) as u64,
    }
}

/// What a block of layout `old`, charged `charge` bytes of `Memory`, is charged after
/// `realloc` to `new_size` by the tenant that owns it, `in_place` or moved. In place, a slab
/// object keeps its class's charge and a block of pages is charged its new pages. Moved, a
/// slab object grown past 4 KiB to a size a slab serves becomes a block of pages (a grown
/// block) charged its pages; anything else is charged as a block of the new layout.
pub fn charged_after_realloc(old: Layout, charge: u64, new_size: usize, in_place: bool) -> u64 {
    let pages = new_size.next_multiple_of(4096) as u64;
    let new_class = class_size(new_size, old.align());
    if in_place {
        // A slab object stays only within the class it occupies (its charge); a grown block
        // growing in place is charged its pages, as a large block resized in place is.
        return match class_size(old.size(), old.align()) {
            Some(_) if new_size as u64 <= charge => charge,
            _ => pages,
        };
    }
    if new_size > old.size() && new_size > 4096 && new_class.is_some() {
        return pages;
    }
    charged_bytes(Layout::from_size_align(new_size, old.align()).unwrap())
}

/// xorshift64*: deterministic, allocation-free.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The canary byte at offset `i` of a block tagged `tag`.
#[inline]
pub fn canary(tag: u64, i: usize) -> u8 {
    let x = tag
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((i as u64).wrapping_mul(0xD6E8_FEB8_6659_FD93));
    (x >> 56) as u8 ^ (i as u8)
}

/// Offsets of `len` bytes that patterns are written at: every byte of a short block, else the
/// first and last 64 bytes and one byte in every 4 KiB page (every 64 KiB above 4 MiB): enough
/// to see a block overlap or a lost page without touching every byte of 64 MiB in a debug
/// build.
pub fn sample_offsets(len: usize) -> impl Iterator<Item = usize> {
    let dense = len <= 1024;
    let head = if dense { len } else { 64 };
    let tail_start = if dense { len } else { len - 64 };
    let stride = if len > 4 << 20 { 64 << 10 } else { 4096 };
    (0..head)
        .chain(
            (head..tail_start)
                .step_by(stride)
                .map(move |o| o + (o / 4096) % 61),
        )
        .chain(tail_start..len)
        .filter(move |&o| o < len)
}

/// Writes the canary of `tag` at the sampled offsets of `p[..len]`.
///
/// # Safety
/// `p..p + len` must be writable.
pub unsafe fn fill(p: *mut u8, len: usize, tag: u64) {
    for i in sample_offsets(len) {
        // SAFETY: `i < len`, inside the block the caller vouches for.
        unsafe { p.add(i).write(canary(tag, i)) };
    }
}

/// Checks the canary of `tag` at the sampled offsets of `p[..len]`; returns the first bad
/// offset.
///
/// # Safety
/// `p..p + len` must be readable.
pub unsafe fn verify(p: *const u8, len: usize, tag: u64) -> Result<(), usize> {
    for i in sample_offsets(len) {
        // SAFETY: `i < len`, inside the block the caller vouches for.
        if unsafe { p.add(i).read() } != canary(tag, i) {
            return Err(i);
        }
    }
    Ok(())
}

/// Is every byte of `p[..len]` zero? (Compares whole slices, which is a `memcmp` even in a
/// debug build.)
///
/// # Safety
/// `p..p + len` must be readable and initialised.
pub unsafe fn all_zero(p: *const u8, len: usize) -> bool {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(ZEROS.len());
        // SAFETY: `off + n <= len`, inside the block the caller vouches for.
        let s = unsafe { std::slice::from_raw_parts(p.add(off), n) };
        if s != &ZEROS[..n] {
            return false;
        }
        off += n;
    }
    true
}

/// Resident and virtual size of this process, in bytes, from `/proc/self/statm`.
pub fn statm() -> (usize, usize) {
    let s = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let mut it = s
        .split_whitespace()
        .map(|x| x.parse::<usize>().unwrap() * 4096);
    let virt = it.next().unwrap();
    let rss = it.next().unwrap();
    (rss, virt)
}

/// A raw block pointer that may cross threads (the tests own what it points to).
#[derive(Clone, Copy, Debug)]
pub struct SendPtr(pub *mut u8);

// SAFETY: the pointer is only a token for a block the receiving thread then owns.
unsafe impl Send for SendPtr {}

/// Checks the canary that `fill(p, len, tag)` wrote, on the bytes below `keep` only (what a
/// `realloc` to `keep` bytes must have kept).
///
/// # Safety
/// `p..p + keep` must be readable.
pub unsafe fn verify_prefix(p: *const u8, len: usize, keep: usize, tag: u64) -> Result<(), usize> {
    for i in sample_offsets(len).take_while(|&i| i < keep) {
        // SAFETY: `i < keep`, inside the block the caller vouches for.
        if unsafe { p.add(i).read() } != canary(tag, i) {
            return Err(i);
        }
    }
    Ok(())
}

/// The environment variable that makes a test binary run one check as a child process.
pub const CHILD_ENV: &str = "BEANCOUNTER_TEST_CHILD";

/// In a child started by [`run_child`]: the name of the check to run.
pub fn child_role() -> Option<String> {
    std::env::var(CHILD_ENV).ok()
}

/// Runs this test binary again with [`CHILD_ENV`] set to `role`, waits at most `timeout`
/// (killing it after that), and returns its exit status (`None` if killed) and output.
pub fn run_child(
    role: &str,
    timeout: std::time::Duration,
) -> (Option<std::process::ExitStatus>, String) {
    let exe = std::env::current_exe().expect("current_exe");
    let path = std::env::temp_dir().join(format!(
        "beancounter-child-{}-{role}.log",
        std::process::id()
    ));
    let log = std::fs::File::create(&path).expect("child log");
    let mut child = std::process::Command::new(exe)
        .env(CHILD_ENV, role)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("spawn child");
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    let out = std::fs::read_to_string(&path).unwrap_or_default();
    let _ = std::fs::remove_file(&path);
    (status, out)
}

/// Runs check `role` in a child process (for checks that may abort the process or change
/// process-wide limits) and fails unless it printed `child ok` and exited with status 0.
pub fn expect_child_ok(role: &str, timeout_secs: u64) {
    let (status, out) = run_child(role, std::time::Duration::from_secs(timeout_secs));
    for line in out.lines() {
        println!("    | {line}");
    }
    let status = status.unwrap_or_else(|| panic!("child {role} hung for {timeout_secs} s"));
    assert!(
        status.success() && out.contains("child ok"),
        "child {role} failed: {status}"
    );
}

/// Waits for `pid` up to `timeout`; kills it after that. Returns the wait status, or `None`
/// if it had to be killed.
pub fn wait_for(pid: libc::pid_t, timeout: std::time::Duration) -> Option<i32> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let mut status = 0;
        // SAFETY: a child of this process; `status` is a valid out-pointer.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            return Some(status);
        }
        assert_eq!(r, 0, "waitpid failed");
        if std::time::Instant::now() > deadline {
            // SAFETY: killing and reaping our own child.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
