//! A1: the hierarchical charge and uncharge walks, headroom, and ancestry.
//!
//! A charge of `n` to index `i` is applied to `i` and every ancestor, each checked with the
//! charge's severity; a refusal at any level unrolls the levels below it and is counted only
//! where it happened (A0 has the rule per counter). A retired record on the way has no
//! counters and no bounds: the walk adds `n` to its `left` and goes on to its parent, and
//! an uncharge takes `n` off `left` the same way, so that what retirement moved to the
//! parent stays exact, and a retired record is freed once nothing is charged through it.
//!
//! # Pins
//! A retirement gives the record's slot back, and the slot may then serve another tenant.
//! A walk that read "live, slot S" must not touch S after that. So a walk *pins* the record
//! while it works on its slot, and the retirement, after marking the record RETIRED, waits
//! until no pin is left before it reads the slot's `held` into `left` and frees it:
//!
//! ```text
//! walk                                   retire (registry lock held)
//! pins += 1              (SeqCst)        state |= RETIRED   (SeqCst)
//! state: live? → use slot S              wait until pins == 0
//!        retired? → left ± n             left += Σ S.held;  free S
//! pins -= 1              (Release)
//! ```
//! Either the walk's pin is seen and waited for (its change to S is then in `Σ S.held`), or
//! the walk sees RETIRED and changes `left` instead. Pins are taken only on the slow paths
//! that reach the registry (refills, large blocks, explicit charges), never per object.

use super::super::beancounter::ResourceCounter;
use super::super::types::{BcId, Exceeded, Resource, Severity, MAX_DEPTH};
use super::table::{refs, Record, Slot, LIVE, NO_PARENT, RETIRED};
use super::{Registry, ROOT};
use crate::sync::Ordering;

/// What a pinned record is, for the walk that pinned it.
enum Pinned<'a> {
    Live(&'a Slot),
    Retired(&'a Record),
}

impl Registry {
    /// Runs `f` on the record's state while it is pinned (see the module docs).
    fn pinned<R>(&self, index: u32, f: impl FnOnce(Pinned<'_>) -> R) -> R {
        let rec = self.record(index);
        if index == ROOT {
            // The root is never retired.
            return f(Pinned::Live(&self.root_slot));
        }
        rec.pins.fetch_add(1, Ordering::SeqCst);
        crate::sync::fence(Ordering::SeqCst);
        let state = rec.state.load(Ordering::SeqCst);
        let r = if state & RETIRED != 0 {
            f(Pinned::Retired(rec))
        } else {
            f(Pinned::Live(self.slot_at(rec.slot.load(Ordering::Relaxed))))
        };
        rec.pins.fetch_sub(1, Ordering::Release);
        r
    }

    /// Runs `f` on the slot of `index` if it is live (pinned meanwhile); `None` if retired.
    pub(crate) fn with_slot<R>(&self, index: u32, f: impl FnOnce(&Slot) -> R) -> Option<R> {
        self.pinned(index, |p| match p {
            Pinned::Live(slot) => Some(f(slot)),
            Pinned::Retired(_) => None,
        })
    }

    /// Where a charge made on behalf of `index` goes: `index` itself while it is live; for a
    /// retired one, its nearest live ancestor, or the root for a top-level one. Objects are
    /// tagged, and stocks filled, with what this returns.
    pub(crate) fn charge_target(&self, index: u32) -> u32 {
        let mut at = index;
        for _ in 0..=MAX_DEPTH {
            if !self.is_retired(at) {
                return at;
            }
            match self.parent_of(at) {
                Some(p) => at = p,
                None => return ROOT,
            }
        }
        ROOT
    }

    /// Charges `n` of resource `r` (counter `ri`) to `index` and every ancestor, each checked
    /// with `severity`; a refusal at any level unrolls the levels below it and is counted
    /// only where it happened.
    #[inline]
    pub(crate) fn charge(
        &self,
        index: u32,
        r: Resource,
        ri: usize,
        n: u64,
        severity: Severity,
    ) -> Result<(), Exceeded> {
        self.charge_counted(index, r, ri, n, severity, true)
    }

    /// [`charge`](Self::charge), with `count == false` for an attempt the caller may follow
    /// with another (a stock batch, a try before reclaiming stocks, growing in place before
    /// moving): such a refusal is not counted, because the request is not refused yet.
    pub(crate) fn charge_counted(
        &self,
        index: u32,
        r: Resource,
        ri: usize,
        n: u64,
        severity: Severity,
        count: bool,
    ) -> Result<(), Exceeded> {
        let mut peaks = [None; MAX_DEPTH];
        let mut at = index;
        let mut level = 0;
        loop {
            let added = self.pinned(at, |p| match p {
                Pinned::Live(slot) => slot.counters[ri].try_add(n, severity, count).map(Some),
                Pinned::Retired(rec) => {
                    rec.left.fetch_add(n as i64, Ordering::SeqCst);
                    Ok(None)
                }
            });
            match added {
                Ok(peak) => peaks[level] = peak,
                Err(refusal) => {
                    // Unroll the levels below the one that refused.
                    self.uncharge_below(index, at, ri, n);
                    return Err(Exceeded {
                        id: self.id_of(at),
                        resource: r,
                        severity,
                        requested: n,
                        held: refusal.held,
                        bound: refusal.bound,
                    });
                }
            }
            level += 1;
            match self.parent_of(at) {
                Some(p) => at = p,
                None => break,
            }
        }
        // Every level accepted: only now do the windows record it.
        let mut at = index;
        for peak in &peaks[..level] {
            if let Some(peak) = *peak {
                self.with_counter(at, ri, |c| c.record_peak(peak));
            }
            at = self.parent_of(at).unwrap_or(NO_PARENT);
        }
        Ok(())
    }

    /// Gives `n` of counter `ri` back to `index` and every ancestor.
    pub(crate) fn uncharge(&self, index: u32, ri: usize, n: u64) {
        self.uncharge_below(index, NO_PARENT, ri, n);
    }

    /// Gives `n` of counter `ri` back to `index` and its ancestors below `stop`.
    fn uncharge_below(&self, index: u32, stop: u32, ri: usize, n: u64) {
        let mut at = index;
        while at != stop {
            // Read before the uncharge: once it is done, nothing keeps the record from being
            // freed by another thread (its last reference released, or `reap`), which reuses
            // `link` for the free list.
            let next = self.parent_of(at).unwrap_or(NO_PARENT);
            let emptied = self.pinned(at, |p| match p {
                Pinned::Live(slot) => {
                    slot.counters[ri].uncharge(n);
                    false
                }
                Pinned::Retired(rec) => {
                    let emptied = rec.left.fetch_sub(n as i64, Ordering::SeqCst) == n as i64;
                    crate::sync::fence(Ordering::SeqCst);
                    emptied
                }
            });
            if emptied {
                self.retired_emptied(at);
            }
            at = next;
        }
    }

    /// A retired record's `left` just reached zero: free it if nothing refers to it either
    /// (the release of its last reference frees it otherwise).
    fn retired_emptied(&self, index: u32) {
        let state = self.record(index).state.load(Ordering::SeqCst);
        if refs(state) == 0 && state & LIVE != 0 {
            self.free_if_unused(index, super::table::generation(state));
        }
    }

    /// The room a stock refill for `index` may draw on in counter `ri`: the smallest, over
    /// `index` and its live ancestors, of the headroom below the barrier while `held` is
    /// under it (so that stocks do not push a tenant over its barrier), and below the limit
    /// once it is over.
    pub(crate) fn headroom(&self, index: u32, ri: usize) -> u64 {
        let mut room = u64::MAX;
        let mut at = index;
        loop {
            let here =
                self.with_counter(at, ri, |c: &ResourceCounter| match c.barrier_headroom() {
                    0 => c.headroom(),
                    below_barrier => below_barrier,
                });
            room = room.min(here.unwrap_or(u64::MAX));
            match self.parent_of(at) {
                Some(p) => at = p,
                None => return room,
            }
        }
    }

    /// The index of beancounter `id` among `index` and its ancestors.
    pub(crate) fn index_of(&self, id: BcId, index: u32) -> Option<u32> {
        let mut at = index;
        loop {
            if self.id_of(at) == id && !self.is_retired(at) {
                return Some(at);
            }
            at = self.parent_of(at)?;
        }
    }

    /// Is `of` the beancounter `index` or one of its descendants?
    pub(crate) fn is_self_or_descendant(&self, of: u32, index: u32) -> bool {
        let mut at = of;
        loop {
            if at == index {
                return true;
            }
            match self.parent_of(at) {
                Some(p) => at = p,
                None => return false,
            }
        }
    }

    /// Does `index` have child records (live, zombie or retired)?
    pub(crate) fn has_children(&self, index: u32) -> bool {
        self.record(index).children.load(Ordering::Relaxed) != 0
    }

    /// Is `index` a beancounter no handle, context or child refers to any more, kept only
    /// because something is still charged to it (a zombie, or a retired record)?
    pub(crate) fn is_unreferenced(&self, index: u32) -> bool {
        let state = self.record(index).state.load(Ordering::Acquire);
        index != ROOT && state & LIVE != 0 && refs(state) == 0
    }

    pub(super) fn depth(&self, index: u32) -> usize {
        let mut depth = 1;
        let mut at = index;
        while let Some(p) = self.parent_of(at) {
            depth += 1;
            at = p;
        }
        depth
    }
}
