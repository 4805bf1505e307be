//! A3: taking stocks back from other threads without slowing their owners: before a charge
//! is refused, when a limit changes, and for beancounters nobody refers to any more.
//!
//! The owner consumes and refills its entries with plain loads and stores: no lock, no
//! atomic read-modify-write. Another thread takes entries back with an asymmetric
//! handshake:
//!
//! ```text
//! owner (every charge/free)            reclaimer (rare)
//! busy = 1                             lock the slot; steal = 1
//! compiler fence                       membarrier(PRIVATE_EXPEDITED)  ← a full fence on
//! if steal: busy = 0, go slow          wait until busy == 0              every CPU running
//! use an entry                         take the entries, uncharge them   this process
//! busy = 0 (release)                   steal = 0; unlock
//! ```
//! The membarrier turns the owner's compiler fence into a full fence wherever the owner
//! was: either the owner's `busy = 1` is visible to the reclaimer (which waits for it to
//! clear), or the owner's next read of `steal` sees 1 (and it keeps off its entries). If the
//! kernel has no `membarrier`, threads get no stock and charge directly. Owner slow paths
//! and reclaimers also take the slot's lock, and reclaimers are serialised among
//! themselves. The reclaimer's own slot needs no fence (its owner is the reclaimer), so a
//! reclaim that finds entries only there makes no system call. The loom model replaces the
//! membarrier/compiler-fence pair by `SeqCst` fences on both sides, which is the guarantee
//! the pair gives.

use super::fence::{reclaimer_fence, spin};
use super::registry::Registry;
use super::stock::{StockSlot, NONE};
use crate::sync::Ordering;
use crate::sync::Ordering::{Acquire, Release};

/// Which entries a reclaim takes back.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Target {
    /// Those of one beancounter that has no children: one entry per slot to look at.
    Leaf(u32),
    /// Those of a beancounter and its descendants, whose charges it carries.
    Subtree(u32),
    /// Those of beancounters no handle or context refers to any more (for `reap`).
    Unreferenced,
}

impl Target {
    /// The beancounter whose headroom `reg` says `index` (or one of its descendants) uses.
    pub(crate) fn of(reg: &Registry, index: u32) -> Target {
        if reg.has_children(index) {
            Target::Subtree(index)
        } else {
            Target::Leaf(index)
        }
    }

    fn wants(self, reg: &Registry, bc: u32) -> bool {
        bc != NONE
            && match self {
                Target::Leaf(t) => bc == t,
                Target::Subtree(t) => reg.is_self_or_descendant(bc, t),
                Target::Unreferenced => reg.is_unreferenced(bc),
            }
    }

    /// Does `slot` hold anything this reclaim takes? (Racy: re-checked under the lock.)
    fn found_in(self, reg: &Registry, slot: &StockSlot) -> bool {
        match self {
            Target::Leaf(t) => slot.entry(t).peek().0 == t,
            _ => slot.entries().iter().any(|e| self.wants(reg, e.peek().0)),
        }
    }

    /// Takes back what `slot` holds for this reclaim; the caller holds the slot's lock and
    /// its owner is off its fast path.
    fn take_from(self, reg: &Registry, slot: &StockSlot) -> bool {
        let mut took = false;
        let mut take = |e: &super::stock::Entry| {
            if self.wants(reg, e.peek().0) {
                e.give_back(reg);
                took = true;
            }
        };
        match self {
            Target::Leaf(t) => take(slot.entry(t)),
            _ => slot.entries().iter().for_each(take),
        }
        took
    }
}

/// Reclaimer: takes back every entry among `slots` that `target` names. `mine` is the
/// calling thread's own slot, if it has one: its owner is the caller, so it needs no
/// fence. Returns how many slots had something taken. The caller serialises reclaimers.
pub(crate) fn reclaim<'a>(
    reg: &Registry,
    slots: impl Iterator<Item = &'a StockSlot> + Clone,
    mine: Option<&StockSlot>,
    target: Target,
) -> usize {
    let is_mine = |s: &StockSlot| mine.is_some_and(|m| core::ptr::eq(m, s));
    // Lock and flag every candidate, then one fence for all of them.
    let mut foreign = 0;
    let mut flagged = 0;
    for s in slots.clone().filter(|s| target.found_in(reg, s)) {
        s.lock();
        s.steal.store(1, Ordering::Relaxed);
        flagged += 1;
        if !is_mine(s) {
            foreign += 1;
        }
    }
    if flagged == 0 {
        return 0;
    }
    if foreign > 0 {
        reclaimer_fence();
    }
    let mut taken = 0;
    for s in slots.filter(|s| s.steal.load(Ordering::Relaxed) != 0) {
        while s.busy.load(Acquire) != 0 {
            spin();
        }
        // Under the slot's lock the entries cannot change hands; `take_from` re-checks.
        if target.take_from(reg, s) {
            taken += 1;
        }
        s.steal.store(0, Release);
        s.unlock();
    }
    taken
}
