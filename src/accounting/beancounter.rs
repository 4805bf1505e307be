//! A0: the counters of one resource of one beancounter, and the charging rule.
//!
//! Charging is signed add-then-check, published with one compare-and-swap: the new `held`
//! is computed, checked against the bound, and stored only if it passes. A refused charge
//! therefore never changes `held`, not even for an instant, which is what keeps three
//! promises exact under concurrency that a `fetch_add` followed by a rollback (Linux's
//! `mm/page_counter.c`) only keeps at rest: a charge is never refused because of another
//! charge that is itself being refused (`DESIGN.md` §3.5 allows false refusals only for
//! stock), `stat()` never shows `held` above a bound a checked charge was held to, and
//! `maxheld`/`minheld` and `reset_window()` never record a refused amount. Uncontended, the
//! CAS costs what the `fetch_add` did; contended, it retries instead of failing. Counters
//! are signed so that nothing can wrap, and the unsigned subtract-and-refund trick (which
//! admits charges past the limit under contention) is not used anywhere.
//!
//! In a hierarchy each level is charged this way, from the charged beancounter up; when an
//! ancestor refuses, the levels below it are rolled back (uncharged). Until then those
//! levels show the charge, and a concurrent charge there may see less headroom than there
//! is; their `maxheld` is only raised once every level accepted.
//!
//! Invariants (checked by [`ResourceCounter::check_invariants`]):
//! - at rest, `0 <= minheld <= held <= maxheld` within a window;
//! - `held` never goes below zero: an uncharge of more than is held clamps to zero and
//!   counts one `warnings`;
//! - `barrier <= limit <= MAX`.

use super::types::{ResourceStat, Severity, MAX};
use crate::sync::{const_fn, AtomicI64, AtomicU64, Ordering::Relaxed};

/// Wakes hosts waiting for events (`report::EventWatcher`); the loom models have no
/// process-wide event word.
#[inline]
fn note_event() {
    #[cfg(not(beancounter_loom))]
    crate::os::event::bump();
}

/// A refused charge, seen from one counter.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Refusal {
    /// `held` just before the refused charge added to it.
    pub(crate) held: u64,
    /// The bound the charge was checked against.
    pub(crate) bound: u64,
}

/// One resource of one beancounter.
///
/// The fields a charge reads sit in the first cache line, the event counts (written only
/// on crossings, refusals and forced charges) in the second; aligned so that two
/// resources, or two beancounters, never share a line: charges of different tenants must
/// not contend.
#[repr(align(64))]
pub(crate) struct ResourceCounter {
    /// What is held now. Signed so nothing can wrap.
    held: AtomicI64,
    /// Highest `held` since the window was reset.
    maxheld: AtomicI64,
    /// Lowest `held` since the window was reset.
    minheld: AtomicI64,
    /// Soft bound, `<= limit`.
    barrier: AtomicI64,
    /// Hard bound, `<= MAX`.
    limit: AtomicI64,
    /// Refused charges.
    failcnt: AtomicU64,
    /// Uncharges of more than was held (a caller bug), clamped to zero.
    warnings: AtomicU64,
    /// Charges that took `held` from at or below the barrier to above it.
    crossings: AtomicU64,
    /// Refusals of `Barrier` charges.
    refused_barrier: AtomicU64,
    /// Refusals of `Limit` charges.
    refused_limit: AtomicU64,
    /// `Force` charges that left `held` above the limit.
    forced_past: AtomicU64,
}

/// Event counts of one resource of one beancounter, since it was created.
///
/// # Examples
/// ```
/// use beancounter::{BcId, Limits, Resource, Severity};
/// let t = beancounter::find_or_create(BcId(90)).unwrap();
/// t.set_limits(Resource::Threads, Limits::new(1, 1).unwrap()).unwrap();
/// let _a = t.charge(Resource::Threads, 1, Severity::Limit).unwrap(); // at the barrier, not over
/// assert!(t.charge(Resource::Threads, 1, Severity::Barrier).is_err());
/// let _b = t.charge(Resource::Threads, 1, Severity::Force).unwrap(); // over both bounds
/// let e = t.events(Resource::Threads);
/// assert_eq!((e.refused_at_barrier, e.barrier_crossings, e.forced_past_limit), (1, 1, 1));
/// assert_eq!(e.refused_at_limit, 0);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Default)]
pub struct Events {
    /// Charges that took `held` over the barrier (from at or below it).
    pub barrier_crossings: u64,
    /// Charges checked against the barrier (fallible requests) that were refused.
    pub refused_at_barrier: u64,
    /// Charges checked against the limit (ordinary allocations) that were refused.
    pub refused_at_limit: u64,
    /// `Force` charges that left `held` above the limit.
    pub forced_past_limit: u64,
    /// Uncharges of more than was held (a caller bug; the counter was clamped at zero).
    pub uncharge_warnings: u64,
}

impl Events {
    /// The events between `earlier` and `self`, field by field; a count that went down (the
    /// beancounter was freed and created again in between) counts from zero.
    ///
    /// # Examples
    /// ```
    /// use beancounter::Events;
    /// let a = Events { barrier_crossings: 2, ..Events::default() };
    /// let b = Events { barrier_crossings: 5, refused_at_limit: 1, ..Events::default() };
    /// assert_eq!(b.since(&a), Events { barrier_crossings: 3, refused_at_limit: 1, ..Events::default() });
    /// ```
    pub fn since(&self, earlier: &Events) -> Events {
        let d = |now: u64, then: u64| if now >= then { now - then } else { now };
        Events {
            barrier_crossings: d(self.barrier_crossings, earlier.barrier_crossings),
            refused_at_barrier: d(self.refused_at_barrier, earlier.refused_at_barrier),
            refused_at_limit: d(self.refused_at_limit, earlier.refused_at_limit),
            forced_past_limit: d(self.forced_past_limit, earlier.forced_past_limit),
            uncharge_warnings: d(self.uncharge_warnings, earlier.uncharge_warnings),
        }
    }
}

impl ResourceCounter {
    const_fn! {
        /// A counter holding nothing, with the given bounds. With both bounds 0 it is all
        /// zero bytes, which lets the registry's table start as fresh zeroed OS pages.
        pub(crate) fn new(barrier: u64, limit: u64) -> Self {
            ResourceCounter {
                held: AtomicI64::new(0),
                maxheld: AtomicI64::new(0),
                minheld: AtomicI64::new(0),
                barrier: AtomicI64::new(barrier as i64),
                limit: AtomicI64::new(limit as i64),
                failcnt: AtomicU64::new(0),
                warnings: AtomicU64::new(0),
                crossings: AtomicU64::new(0),
                refused_barrier: AtomicU64::new(0),
                refused_limit: AtomicU64::new(0),
                forced_past: AtomicU64::new(0),
            }
        }
    }

    /// Prepares the counter for a new beancounter: nothing held, fresh window and counts.
    /// Called only while no other thread can reach the counter.
    pub(crate) fn reset(&self, barrier: u64, limit: u64) {
        self.held.store(0, Relaxed);
        self.maxheld.store(0, Relaxed);
        self.minheld.store(0, Relaxed);
        self.failcnt.store(0, Relaxed);
        self.warnings.store(0, Relaxed);
        self.crossings.store(0, Relaxed);
        self.refused_barrier.store(0, Relaxed);
        self.refused_limit.store(0, Relaxed);
        self.forced_past.store(0, Relaxed);
        self.set_limits(barrier, limit);
    }

    /// Stores new bounds. The caller validated `barrier <= limit <= MAX`.
    pub(crate) fn set_limits(&self, barrier: u64, limit: u64) {
        debug_assert!(barrier <= limit && limit <= MAX);
        self.barrier.store(barrier as i64, Relaxed);
        self.limit.store(limit as i64, Relaxed);
    }

    /// Adds `n` if the result stays within the bound of `severity`, in one compare-and-swap;
    /// otherwise leaves `held` as it was and (if `count`) counts the refusal in `failcnt`. Returns the new
    /// `held`, which the caller passes to [`record_peak`](Self::record_peak) once the whole
    /// charge (every level) succeeded.
    ///
    /// `Force` is bounded only by `MAX`, so that `held` can never overflow.
    #[inline]
    pub(crate) fn try_add(&self, n: u64, severity: Severity, count: bool) -> Result<i64, Refusal> {
        let barrier = self.barrier.load(Relaxed);
        let limit = self.limit.load(Relaxed);
        let bound = match severity {
            Severity::Barrier => barrier,
            Severity::Limit => limit,
            Severity::Force => i64::MAX,
        };
        let mut cur = self.held.load(Relaxed);
        loop {
            // `0 <= cur <= MAX`, so the sum fits in u64 unless `n` is absurd.
            let new = match (cur as u64).checked_add(n) {
                Some(new) if new <= bound as u64 => new as i64,
                _ => return Err(self.refuse(cur, bound, severity, count)),
            };
            match self.held.compare_exchange_weak(cur, new, Relaxed, Relaxed) {
                Ok(_) => {
                    if new > barrier && (cur <= barrier || new > limit) {
                        self.note_bound_passed(cur, new, barrier, limit);
                    }
                    return Ok(new);
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// Counts a charge that crossed the barrier, or a forced one past the limit.
    #[cold]
    fn note_bound_passed(&self, before: i64, after: i64, barrier: i64, limit: i64) {
        if before <= barrier {
            self.crossings.fetch_add(1, Relaxed);
        }
        if after > limit {
            self.forced_past.fetch_add(1, Relaxed);
        }
        note_event();
    }

    /// Records a value `held` reached through a completed charge.
    #[inline]
    pub(crate) fn record_peak(&self, held: i64) {
        // Read first: a new peak is rare, and a plain load is far cheaper than the CAS loop
        // that `fetch_max` compiles to.
        if held > self.maxheld.load(Relaxed) {
            self.maxheld.fetch_max(held, Relaxed);
        }
    }

    /// [`try_add`](Self::try_add) and [`record_peak`](Self::record_peak) for a one-level
    /// charge.
    #[cfg(test)]
    pub(crate) fn try_charge(&self, n: u64, severity: Severity) -> Result<(), Refusal> {
        let held = self.try_add(n, severity, true)?;
        self.record_peak(held);
        Ok(())
    }

    #[cold]
    fn refuse(&self, held: i64, bound: i64, severity: Severity, count: bool) -> Refusal {
        if !count {
            return Refusal {
                held: held.max(0) as u64,
                bound: bound as u64,
            };
        }
        self.failcnt.fetch_add(1, Relaxed);
        match severity {
            Severity::Barrier => self.refused_barrier.fetch_add(1, Relaxed),
            Severity::Limit => self.refused_limit.fetch_add(1, Relaxed),
            // Only a charge past MAX: counted in failcnt alone.
            Severity::Force => 0,
        };
        note_event();
        Refusal {
            held: held.max(0) as u64,
            bound: bound as u64,
        }
    }

    /// Subtracts `n` from what is held, clamping at zero and counting a warning if the
    /// caller gave back more than was held.
    #[inline]
    pub(crate) fn uncharge(&self, n: u64) {
        let new = self.sub_clamped(n);
        // An uncharge, or the rollback of a level whose ancestor refused a charge.
        if new < self.minheld.load(Relaxed) {
            self.minheld.fetch_min(new, Relaxed);
        }
    }

    /// `held = max(held - n, 0)` in one atomic step; returns the new value.
    #[inline]
    fn sub_clamped(&self, n: u64) -> i64 {
        let n = n.min(MAX) as i64;
        let mut cur = self.held.load(Relaxed);
        loop {
            let new = if cur >= n { cur - n } else { 0 };
            match self.held.compare_exchange_weak(cur, new, Relaxed, Relaxed) {
                Ok(_) => {
                    if cur < n {
                        self.warnings.fetch_add(1, Relaxed);
                        note_event();
                    }
                    return new;
                }
                Err(actual) => cur = actual,
            }
        }
    }

    /// How much more a `Limit` charge could add now.
    pub(crate) fn headroom(&self) -> u64 {
        (self.limit.load(Relaxed) - self.held.load(Relaxed)).max(0) as u64
    }

    /// What is held now (never negative).
    #[inline]
    pub(crate) fn held(&self) -> u64 {
        self.held.load(Relaxed).max(0) as u64
    }

    /// Starts a new window: `maxheld = minheld = held`.
    pub(crate) fn reset_window(&self) {
        let held = self.held.load(Relaxed);
        self.maxheld.store(held, Relaxed);
        self.minheld.store(held, Relaxed);
    }

    /// How many uncharges gave back more than was held.
    #[cfg(test)]
    pub(crate) fn warnings(&self) -> u64 {
        self.warnings.load(Relaxed)
    }

    /// How much more a charge could add before passing the barrier.
    pub(crate) fn barrier_headroom(&self) -> u64 {
        (self.barrier.load(Relaxed) - self.held.load(Relaxed)).max(0) as u64
    }

    /// The event counts.
    pub(crate) fn events(&self) -> Events {
        Events {
            barrier_crossings: self.crossings.load(Relaxed),
            refused_at_barrier: self.refused_barrier.load(Relaxed),
            refused_at_limit: self.refused_limit.load(Relaxed),
            forced_past_limit: self.forced_past.load(Relaxed),
            uncharge_warnings: self.warnings.load(Relaxed),
        }
    }

    /// Reads every field. Fields are read one by one, so a stat taken while charges run is
    /// a consistent value for each field, not a snapshot of all of them at one instant:
    /// `held` may then include a charge about to be refused (and so exceed `maxheld` or a
    /// bound for a moment), while `maxheld` records only charges that succeeded.
    pub(crate) fn stat(&self) -> ResourceStat {
        ResourceStat {
            held: self.held(),
            maxheld: self.maxheld.load(Relaxed).max(0) as u64,
            minheld: self.minheld.load(Relaxed).max(0) as u64,
            barrier: self.barrier.load(Relaxed) as u64,
            limit: self.limit.load(Relaxed) as u64,
            failcnt: self.failcnt.load(Relaxed),
        }
    }

    /// The counter's invariants, valid when no charge is in flight.
    pub(crate) fn check_invariants(&self) -> Result<(), &'static str> {
        let held = self.held.load(Relaxed);
        let (barrier, limit) = (self.barrier.load(Relaxed), self.limit.load(Relaxed));
        if held < 0 {
            return Err("held below zero");
        }
        if self.minheld.load(Relaxed) > held || self.maxheld.load(Relaxed) < held {
            return Err("held outside [minheld, maxheld]");
        }
        if barrier < 0 || barrier > limit {
            return Err("barrier outside [0, limit]");
        }
        Ok(())
    }
}

#[cfg(all(test, not(beancounter_loom)))]
mod tests {
    use super::*;

    #[test]
    fn bounds_by_severity() {
        let c = ResourceCounter::new(10, 20);
        c.try_charge(10, Severity::Barrier).unwrap();
        let r = c.try_charge(1, Severity::Barrier).unwrap_err();
        assert_eq!((r.held, r.bound), (10, 10));
        c.try_charge(10, Severity::Limit).unwrap();
        assert!(c.try_charge(1, Severity::Limit).is_err());
        c.try_charge(1000, Severity::Force).unwrap();
        assert_eq!(c.held(), 1020);
        assert_eq!(c.stat().failcnt, 2);
        c.check_invariants().unwrap();
    }

    #[test]
    fn force_refuses_only_overflow() {
        let c = ResourceCounter::new(MAX, MAX);
        c.try_charge(MAX, Severity::Force).unwrap();
        let r = c.try_charge(1, Severity::Force).unwrap_err();
        assert_eq!(r.held, MAX);
        assert_eq!(c.held(), MAX, "the overflowing charge changed nothing");
        assert!(
            c.try_charge(MAX + 1, Severity::Force).is_err(),
            "more than MAX at once"
        );
        assert_eq!(c.stat().failcnt, 2);
    }

    #[test]
    fn uncharging_too_much_clamps_and_warns() {
        let c = ResourceCounter::new(MAX, MAX);
        c.try_charge(5, Severity::Limit).unwrap();
        c.uncharge(7);
        assert_eq!(c.held(), 0);
        assert_eq!(c.warnings(), 1);
        c.uncharge(u64::MAX);
        assert_eq!((c.held(), c.warnings()), (0, 2));
        c.check_invariants().unwrap();
    }

    #[test]
    fn window_follows_held() {
        let c = ResourceCounter::new(MAX, MAX);
        c.try_charge(8, Severity::Limit).unwrap();
        c.uncharge(6);
        let s = c.stat();
        assert_eq!((s.held, s.maxheld, s.minheld), (2, 8, 0));
        c.reset_window();
        c.try_charge(1, Severity::Limit).unwrap();
        let s = c.stat();
        assert_eq!((s.held, s.maxheld, s.minheld), (3, 3, 2));
    }
}
