//! A0: where the next heap-profile sample falls, for the stocks (A3) and for the allocator's
//! paths that bypass them (`profile`, through `alloc/global.rs`).
//!
//! Sampling is by bytes: every allocated byte is a sample point with the same small
//! probability, so the distances between points are exponentially distributed with mean
//! [`mean`] bytes, and a block of `n` bytes holds at least one point (is sampled) with
//! probability `1 - exp(-n / mean)`. Because the distribution is memoryless, every stream of
//! allocations (a stock entry's, a thread's direct charges) may count down to its own point
//! and start afresh whenever it likes: each byte is still a point with the same probability.
//!
//! The stocks count down without a step on the fast path: an entry lets its owner take at
//! most the bytes before its next point, so the point's allocation is one the fast path
//! refuses (see `stock.rs`). While sampling is off, the countdowns are [`OFF`].

// Plain atomics: the mean and epoch are settings, not part of a protocol loom explores.
use core::sync::atomic::Ordering::Relaxed;
use core::sync::atomic::{AtomicU32, AtomicU64};

/// The tag bit of a sampled block: a block's tag is the slot index it is charged to, with
/// this bit while the profile keeps a sample of it. No entry ever holds such an index, so the
/// free of a sampled block always takes the slow path, where the sample is dropped. Slot
/// and record indices stay far below it.
pub(crate) const SAMPLED: u32 = 1 << 30;
const _: () = assert!(super::registry::MAX_CAPACITY < SAMPLED);

/// A countdown that never ends: sampling is off.
pub(crate) const OFF: u64 = u64::MAX;

/// The mean distance between sample points in bytes; 0 while sampling is off.
static MEAN: AtomicU64 = AtomicU64::new(0);
/// Bumped at every start and stop, so that countdowns drawn before are drawn again.
static EPOCH: AtomicU32 = AtomicU32::new(0);

/// The mean distance between sample points, 0 while sampling is off.
#[inline]
pub(crate) fn mean() -> u64 {
    MEAN.load(Relaxed)
}

/// The sampling epoch: a countdown drawn in another epoch is drawn again.
#[inline]
pub(crate) fn epoch() -> u32 {
    EPOCH.load(Relaxed)
}

/// Sets the mean distance between sample points (0: off) and starts a new epoch.
#[cfg(all(feature = "profile", not(beancounter_loom)))]
pub(crate) fn set_mean(bytes: u64) {
    MEAN.store(bytes, Relaxed);
    EPOCH.fetch_add(1, Relaxed);
}

/// Counts `bytes` allocated on a stream whose next sample point is `point` bytes away:
/// whether the point falls in them, and the distance to the next point after them (`fresh`
/// draws a new one when it did; the exponential is memoryless, so it starts after them).
pub(crate) fn count(point: u64, bytes: u64, fresh: impl FnOnce() -> u64) -> (bool, u64) {
    match point {
        OFF => (false, OFF),
        p if p < bytes => (true, fresh()),
        p => (false, p - bytes),
    }
}

/// A stream's random state for xorshift64*, from a per-stream salt.
fn seed(salt: u64) -> u64 {
    // SplitMix64 of the salt: distinct, well-mixed, never zero in practice.
    let mut z = salt.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) | 1
}

/// Bytes to the next sample point of a stream whose random state is `state` (advanced; a
/// state of 0 is first seeded from `salt`): an exponential draw with mean [`mean`], or
/// [`OFF`] while sampling is off.
pub(crate) fn draw(state: &mut u64, salt: u64) -> u64 {
    let mean = mean();
    if mean == 0 {
        return OFF;
    }
    let mut x = if *state == 0 { seed(salt) } else { *state };
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    *state = x;
    // 53 random bits as a uniform in (0, 1]; -ln(u) is exponential with mean 1.
    let u = ((x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) + 1) as f64 / (1u64 << 53) as f64;
    let d = -u.ln() * mean as f64;
    // `as` saturates; a distance of 0 would mean "this byte", which the next one serves.
    (d as u64).max(1)
}

#[cfg(all(test, not(beancounter_loom)))]
mod tests {
    use super::*;

    #[test]
    fn draws_have_the_mean_and_are_off_without_one() {
        let mut s = 0;
        assert_eq!(draw(&mut s, 7), OFF, "sampling is off by default");
        MEAN.store(1000, Relaxed);
        let n = 200_000;
        let sum: u64 = (0..n).map(|_| draw(&mut s, 7)).sum();
        MEAN.store(0, Relaxed);
        let mean = sum as f64 / n as f64;
        assert!(
            (mean - 1000.0).abs() < 15.0,
            "mean distance {mean}, want 1000"
        );
    }
}
