//! Sampling heap profiles per tenant: where a tenant's memory is (`DESIGN.md` §3.7).
//!
//! While profiling is on, an allocation is sampled with a probability that grows with its
//! size: every allocated byte is a sample point with probability `1 / sample_bytes`, so a
//! block of `n` bytes is sampled with probability `p = 1 - exp(-n / sample_bytes)`, as
//! jemalloc, tcmalloc and Go sample. A sampled block stands for `1 / p` blocks and `n / p`
//! bytes: summed per call stack, that is an unbiased estimate of the live objects and bytes
//! each stack allocated. A sample lives until its block is freed, whichever thread frees it,
//! and belongs to the tenant the block is charged to (the one [`Beancounter::stat`](crate::Beancounter::stat)
//! counts it in), whatever thread allocated it.
//!
//! # Cost
//! Off, nothing: the sampling decision rides the allocator's slow paths. A thread's stock
//! entry for a tenant lets its fast path allocate only up to the next sample point, so the
//! allocation that holds the point is one the fast path refuses anyway (see the stock's
//! `take`/`back` split); allocations that never take the fast path (blocks of pages,
//! charges checked against a barrier or forced) count down on the thread's own countdown.
//! On, a sample costs a stack walk with the unwinder Rust binaries carry (about a
//! microsecond per 20 frames), once per `sample_bytes` allocated; `benches/README.md`
//! measures both.
//!
//! # Starting, stopping, bad input
//! - [`start`] with 0 is [`BcError::InvalidSampleBytes`]; nothing changes.
//! - [`start`] while on sets the new mean for the distances drawn from then on; samples
//!   already taken keep the weight they were taken with, so nothing is lost or re-weighted.
//! - Each thread notices a start or stop at its next slow path (at most one stock batch,
//!   [`STOCK_BYTES`](crate::STOCK_BYTES), of allocation per tenant later).
//! - [`stop`] when off does nothing. After [`stop`], no new samples are taken, and the
//!   samples of blocks still live stay in [`heap`] until the blocks are freed.
//! - The first [`heap`] that resolves names loads the binary's symbol table and debug info
//!   into the calling process (about 40 MiB resident for the tenant server's release build,
//!   which carries std's line tables); later calls reuse them and cache resolved addresses.
//! - [`heap`] of an id with no live beancounter is [`BcError::NotFound`].
//! - A retired tenant's leftover blocks stay charged to its retired record, so their
//!   samples appear in no profile, not even that of a fresh tenant with the same id.
//! - A stack deeper than 64 frames keeps its 64 leaf-most frames and is marked: its
//!   folded stack starts with a `[truncated]` frame.
//! - At most 32 768 samples are live at once (16 GiB of live memory at the default rate);
//!   a sample beyond that is not taken, and [`dropped`] counts it.
//!
//! # Examples
//! ```
//! #[global_allocator]
//! static A: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
//! # fn main() {
//! use beancounter::{profile, BcId};
//! let t = beancounter::find_or_create(BcId(9_000)).unwrap();
//! profile::start(64 << 10).unwrap(); // one sample per 64 KiB on average
//! let kept: Vec<Vec<u8>> = {
//!     let _g = t.enter();
//!     (0..64).map(|_| vec![1u8; 64 << 10]).collect() // 4 MiB in tenant 9000
//! };
//! let p = profile::heap(BcId(9_000)).unwrap();
//! assert!(p.estimated_bytes() > 2 << 20, "about 4 MiB: {}", p.estimated_bytes());
//! assert!(p.folded().lines().all(|l| l.rsplit_once(' ').is_some()));
//! profile::stop();
//! # drop(kept);
//! # }
//! ```

use crate::accounting::sampling;
use crate::{BcError, BcId};
use std::collections::HashMap;
mod format;
pub(crate) mod samples;
mod symbolize;

pub(crate) use symbolize::symbolize;

/// The default mean distance between samples: one per 512 KiB allocated, as jemalloc's
/// and Go's.
pub const DEFAULT_SAMPLE_BYTES: u64 = 512 << 10;

/// Starts sampling with a mean of one sample per `sample_bytes` allocated (see the module
/// docs for a start while on). `Err(InvalidSampleBytes(0))` for 0, `Err(OutOfMemory)` if
/// the OS refuses the sample store (about 30 MiB of address space, touched as used).
pub fn start(sample_bytes: u64) -> Result<(), BcError> {
    if sample_bytes == 0 {
        return Err(BcError::InvalidSampleBytes(0));
    }
    if !samples::ensure_store() {
        return Err(BcError::OutOfMemory);
    }
    sampling::set_mean(sample_bytes);
    Ok(())
}

/// Stops sampling; the samples of blocks still live stay until the blocks are freed.
pub fn stop() {
    if sampling::mean() != 0 {
        sampling::set_mean(0);
    }
}

/// Whether sampling is on, and at what mean distance: `Some(sample_bytes)` or `None`.
pub fn sample_bytes() -> Option<u64> {
    Some(sampling::mean()).filter(|&m| m != 0)
}

/// Samples not taken because 32 768 were live at once.
pub fn dropped() -> usize {
    samples::dropped()
}

/// The live samples of tenant `id`, grouped by call stack and symbolized: what the tenant
/// holds now, and where it was allocated. `Err(NotFound)` if no live beancounter has the id.
pub fn heap(id: BcId) -> Result<HeapProfile, BcError> {
    let bc = crate::lookup(id).ok_or(BcError::NotFound(id))?;
    let index = bc.index();
    // Copy the tenant's samples out under the store's lock, into room reserved before it
    // (the lock must not be held across an allocation); retry if more appeared meanwhile.
    let mut mine: Vec<samples::Sample> = Vec::new();
    loop {
        mine.clear();
        mine.reserve(samples::live() + 64);
        let room = mine.capacity();
        let mut more = false;
        samples::for_each(|s| {
            if s.bc == index {
                if mine.len() < room {
                    mine.push(*s);
                } else {
                    more = true;
                }
            }
        });
        if !more {
            break;
        }
    }
    // Group by stack, then resolve each distinct address once.
    let mut groups: HashMap<(&[usize], bool), Site> = HashMap::new();
    for s in &mine {
        let (objects, bytes) = weight(s.bytes, s.mean);
        let site = groups
            .entry((&s.frames[..usize::from(s.depth)], s.truncated))
            .or_insert_with(|| Site {
                frames: Vec::new(),
                truncated: s.truncated,
                bytes: 0.0,
                objects: 0.0,
                samples: 0,
            });
        site.bytes += bytes;
        site.objects += objects;
        site.samples += 1;
    }
    let mut sites = Vec::with_capacity(groups.len());
    for ((addrs, _), mut site) in groups {
        site.frames = symbolize(addrs);
        strip_allocator_frames(&mut site.frames);
        sites.push(site);
    }
    sites.sort_by(|a, b| b.bytes.total_cmp(&a.bytes));
    Ok(HeapProfile {
        id,
        sample_bytes: sample_bytes().unwrap_or(DEFAULT_SAMPLE_BYTES),
        sites,
    })
}

/// What one sample of a block of `bytes` stands for, `(objects, bytes)`, when one byte in
/// `mean` on average is a sample point: `1 / p` blocks, `p = 1 - exp(-bytes / mean)`.
fn weight(bytes: u64, mean: u64) -> (f64, f64) {
    let p = -(-(bytes as f64) / mean as f64).exp_m1();
    (1.0 / p, bytes as f64 / p)
}

/// Drops the leaf-side frames of the allocator itself (the sampling, the allocator's
/// paths, `__rust_alloc` and the `alloc::alloc` shims): a stack starts where the program
/// asked for memory.
fn strip_allocator_frames(frames: &mut Vec<Frame>) {
    const INTERNAL: &[&str] = &[
        "beancounter::profile::",
        "beancounter::alloc::",
        "<beancounter::alloc::",
        "__rust_alloc",
        "__rust_realloc",
        "__rustc::",
        "__rdl_",
        "alloc::alloc::",
        "<alloc::alloc::Global as ",
        "std::alloc::",
        "_Unwind_Backtrace",
    ];
    let internal = |f: &Frame| INTERNAL.iter().any(|p| f.name.starts_with(p));
    let keep_from = frames.iter().position(|f| !internal(f)).unwrap_or(0);
    frames.drain(..keep_from);
}

impl HeapProfile {
    /// The tenant's id.
    pub fn id(&self) -> BcId {
        self.id
    }

    /// The mean distance between samples the profile was taken with, in bytes.
    pub fn sample_bytes(&self) -> u64 {
        self.sample_bytes
    }

    /// Estimated live bytes the tenant holds in sampled call stacks: converges to what
    /// `stat(Memory).held` says as samples accumulate.
    pub fn estimated_bytes(&self) -> u64 {
        self.sites.iter().map(|s| s.bytes).sum::<f64>().round() as u64
    }

    /// Estimated live objects.
    pub fn estimated_objects(&self) -> u64 {
        self.sites.iter().map(|s| s.objects).sum::<f64>().round() as u64
    }

    /// Live samples behind the estimate.
    pub fn samples(&self) -> u64 {
        self.sites.iter().map(|s| s.samples).sum()
    }

    /// The estimated live bytes of every call stack whose frames include a function whose
    /// name contains `name`.
    pub fn bytes_in(&self, name: &str) -> u64 {
        self.sites
            .iter()
            .filter(|s| s.frames.iter().any(|f| f.name.contains(name)))
            .map(|s| s.bytes)
            .sum::<f64>()
            .round() as u64
    }
}

/// One frame of a call stack, symbolized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    /// The return address (instruction pointer) of the frame.
    pub addr: usize,
    /// The demangled function name, or `0x<addr>` when no symbol covers it.
    pub name: String,
    /// Source file, if debug info says.
    pub file: Option<String>,
    /// Source line, if debug info says.
    pub line: Option<u32>,
}

/// One call stack with the live memory estimated for it.
#[derive(Clone, Debug)]
pub(crate) struct Site {
    /// Frames from the leaf (the allocating function) to the root (`main`, thread start).
    pub frames: Vec<Frame>,
    /// True if the capture limit cut the stack short (the root-most frames are missing).
    pub truncated: bool,
    /// Estimated live bytes allocated here.
    pub bytes: f64,
    /// Estimated live objects allocated here.
    pub objects: f64,
    /// Samples behind the estimate.
    pub samples: u64,
}

/// A tenant's heap profile: its live samples grouped by call stack.
#[derive(Clone, Debug)]
pub struct HeapProfile {
    id: BcId,
    sample_bytes: u64,
    sites: Vec<Site>,
}
