//! A1: hazards, how a thread keeps a beancounter alive without counting a reference.
//!
//! A guard from `enter` may outlive the handle it came from, so it must keep the record
//! alive; a reference does, but taking and giving it back are two atomic read-modify-writes
//! on the record's line, which every thread entering that tenant shares (two threads
//! serving one tenant's requests bounce it between them). Instead, a thread claims one
//! *hazard slot* (a cache line of its own in the registry) and the guard publishes the
//! index it entered there, at its nesting depth: a plain store, and leaving is one swap on
//! the thread's own line.
//!
//! A record's last release (refs falling to zero) frees it only if no hazard names it:
//! `free_locked` (`lifetime.rs`) scans the claimed slots under the registry
//! lock. A hazard it finds, it marks [`DEFERRED`] with a compare-and-swap and leaves the
//! record; the thread that unpublishes a deferred hazard finishes the free itself.
//!
//! ```text
//! entering thread                            releasing thread
//! hazard[d] = index      (Release)           refs -= 1 → 0        (SeqCst)
//! ... use the record ...                     lock; refs == 0, nothing held?
//! v = hazard[d].swap(0)  (AcqRel)            CAS hazard[d]: index → index|DEFERRED
//! v & DEFERRED → free it if still unused     found (CAS won, or already deferred) → keep
//! ```
//!
//! Why the scan cannot miss a hazard that is still in use: a guard is made from a handle
//! (`&Beancounter`), so its store happens before that handle is dropped, and so before the
//! last release, which happens after every other one. The swap and the CAS are the one
//! place the two threads meet, so exactly one of them sees the other: either the CAS finds
//! the hazard (the entering thread then sees `DEFERRED` and frees), or it finds it gone
//! (the entering thread is done with the record, and its swap's Release orders its uses
//! before the free). While a hazard names a record, its thread may also take a reference
//! from the record with a count of zero (`current()` inside a guard): the scan that sees
//! the hazard keeps the record, so the count cannot be freed from under it.
//!
//! Threads past [`HAZARD_THREADS`] at once, and guards nested deeper than [`HAZARD_DEPTH`],
//! take references as before.

use super::{Registry, ROOT};
use crate::sync::{AtomicU32, Ordering};

/// Threads that can hold a hazard slot at once.
#[cfg(not(beancounter_loom))]
pub(crate) const HAZARD_THREADS: usize = 256;
#[cfg(beancounter_loom)]
pub(crate) const HAZARD_THREADS: usize = 2;

/// Guard depths per thread that publish a hazard (a slot is one cache line: the owner flag
/// and these).
#[cfg(not(beancounter_loom))]
pub(crate) const HAZARD_DEPTH: usize = 15;
#[cfg(beancounter_loom)]
pub(crate) const HAZARD_DEPTH: usize = 2;

/// Set in a hazard by a release that found it: the record is the hazard's thread's to free.
const DEFERRED: u32 = 1 << 31;
const _: () = assert!(super::MAX_CAPACITY < DEFERRED);

/// Index 0 is the root, never freed, never published: an empty hazard.
const EMPTY: u32 = ROOT;

/// One thread's hazards, on a line of their own.
#[repr(C, align(64))]
pub(crate) struct HazardSlot {
    /// 1 while a thread owns the slot.
    owned: AtomicU32,
    /// The index a guard at each depth entered, or [`EMPTY`].
    at: [AtomicU32; HAZARD_DEPTH],
}

/// The process's hazard slots.
pub(crate) struct Hazards {
    slots: [HazardSlot; HAZARD_THREADS],
    /// Slots at or above this were never claimed: the scan stops there.
    hwm: AtomicU32,
}

impl HazardSlot {
    crate::sync::const_fn! {
        fn new() -> Self {
            HazardSlot {
                owned: AtomicU32::new(0),
                #[cfg(not(beancounter_loom))]
                at: [const { AtomicU32::new(EMPTY) }; HAZARD_DEPTH],
                #[cfg(beancounter_loom)]
                at: core::array::from_fn(|_| AtomicU32::new(EMPTY)),
            }
        }
    }
}

impl Hazards {
    crate::sync::const_fn! {
        pub(crate) fn new() -> Self {
            Hazards {
                #[cfg(not(beancounter_loom))]
                slots: [const { HazardSlot::new() }; HAZARD_THREADS],
                #[cfg(beancounter_loom)]
                slots: core::array::from_fn(|_| HazardSlot::new()),
                hwm: AtomicU32::new(0),
            }
        }
    }

    /// Whether a hazard names `index`; each one found is marked [`DEFERRED`], so that its
    /// thread frees the record when it leaves. Called under the registry lock.
    fn defer_if_held(&self, index: u32) -> bool {
        let hwm = self.hwm.load(Ordering::Acquire) as usize;
        let mut held = false;
        for slot in &self.slots[..hwm.min(HAZARD_THREADS)] {
            for at in &slot.at {
                let mut v = at.load(Ordering::Acquire);
                while v & !DEFERRED == index {
                    if v & DEFERRED != 0 {
                        held = true;
                        break;
                    }
                    match at.compare_exchange(v, v | DEFERRED, Ordering::AcqRel, Ordering::Acquire)
                    {
                        Ok(_) => {
                            held = true;
                            break;
                        }
                        Err(now) => v = now,
                    }
                }
            }
        }
        held
    }
}

impl Registry {
    /// Claims a hazard slot for the calling thread; `None` if all are taken.
    pub(crate) fn claim_hazards(&self) -> Option<u32> {
        let h = &self.hazards;
        let slot = h.slots.iter().position(|s| {
            s.owned.load(Ordering::Relaxed) == 0
                && s.owned
                    .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                    .is_ok()
        })?;
        h.hwm.fetch_max(slot as u32 + 1, Ordering::Release);
        Some(slot as u32)
    }

    /// Gives a slot back (its thread exits with no guard alive), finishing any free its
    /// leftover hazards deferred.
    pub(crate) fn release_hazards(&self, slot: u32) {
        let s = &self.hazards.slots[slot as usize];
        for depth in 0..HAZARD_DEPTH {
            self.clear_hazard(slot, depth);
        }
        s.owned.store(0, Ordering::Release);
    }

    /// Publishes that this thread's guard at `depth` (below [`HAZARD_DEPTH`]) entered
    /// `index` (not the root), which the caller references (through the handle it enters).
    #[inline]
    pub(crate) fn set_hazard(&self, slot: u32, depth: usize, index: u32) {
        debug_assert_ne!(index, ROOT);
        self.hazards.slots[slot as usize].at[depth].store(index, Ordering::Release);
    }

    /// Takes back the hazard at `depth`, if there is one (see [`leave_hazard`]).
    ///
    /// [`leave_hazard`]: Self::leave_hazard
    pub(crate) fn clear_hazard(&self, slot: u32, depth: usize) {
        if self.hazards.slots[slot as usize].at[depth].load(Ordering::Relaxed) != EMPTY {
            self.leave_hazard(slot, depth);
        }
    }

    /// Takes back the hazard this thread's guard set at `depth`: the thread no longer uses
    /// what it named. If a release found it meanwhile, frees that record now (if nothing
    /// took it back since).
    #[inline]
    pub(crate) fn leave_hazard(&self, slot: u32, depth: usize) {
        let v = self.hazards.slots[slot as usize].at[depth].swap(EMPTY, Ordering::AcqRel);
        if v & DEFERRED != 0 {
            self.free_deferred(v & !DEFERRED);
        }
    }

    #[cold]
    #[inline(never)]
    fn free_deferred(&self, index: u32) {
        self.free_if_released(index);
    }

    /// Whether a hazard names `index` (marking it deferred): see the module docs.
    pub(super) fn hazard_held(&self, index: u32) -> bool {
        self.hazards.defer_if_held(index)
    }

    /// The index published at `depth` in `slot` (for tests).
    #[cfg(test)]
    pub(crate) fn hazard_at(&self, slot: u32, depth: usize) -> u32 {
        self.hazards.slots[slot as usize].at[depth].load(Ordering::SeqCst)
    }
}
