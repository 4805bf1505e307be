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

use super::registry::Registry;
use super::stock::{StockSlot, NONE};
#[cfg(not(beancounter_loom))]
use crate::sync::compiler_fence;
use crate::sync::Ordering::{Acquire, Release};
use crate::sync::{fence, Ordering};

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

pub(crate) fn spin() {
    #[cfg(beancounter_loom)]
    loom::thread::yield_now();
    #[cfg(not(beancounter_loom))]
    std::thread::yield_now();
}

/// The owner's side of the asymmetric fence: a compiler fence, which the reclaimer's
/// membarrier turns into a full one. (Without membarrier there are no stocks at all: every
/// thread charges directly, see `stock_table::claim`.)
#[inline]
pub(crate) fn owner_fence() {
    #[cfg(beancounter_loom)]
    fence(Ordering::SeqCst);
    #[cfg(not(beancounter_loom))]
    compiler_fence(Ordering::SeqCst);
}

/// The reclaimer's side: a full fence on every CPU running this process.
pub(crate) fn reclaimer_fence() {
    #[cfg(beancounter_loom)]
    fence(Ordering::SeqCst);
    #[cfg(not(beancounter_loom))]
    {
        fence(Ordering::SeqCst);
        membarrier::run();
    }
}

#[cfg(beancounter_loom)]
pub(crate) fn cpus() -> u64 {
    1
}

#[cfg(not(beancounter_loom))]
pub(crate) fn cpus() -> u64 {
    use crate::sync::{AtomicU32, Ordering::Relaxed};
    static CPUS: AtomicU32 = AtomicU32::new(0);
    let n = CPUS.load(Relaxed);
    if n != 0 {
        return n as u64;
    }
    // SAFETY: sysconf has no preconditions; it reads the CPU count without allocating.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.clamp(1, 4096) as u32;
    CPUS.store(n, Relaxed);
    n as u64
}

/// `membarrier(2)`: a full fence on every CPU that runs a thread of this process, issued by
/// one thread. Registered on first use; where the kernel refuses, there are no stocks.
#[cfg(not(beancounter_loom))]
pub(crate) mod membarrier {
    use crate::sync::{AtomicU32, Ordering::Relaxed};

    const CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    const CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

    /// 0 = not tried, 1 = registered, 2 = unavailable.
    static STATE: AtomicU32 = AtomicU32::new(0);

    /// Whether reclaimers can fence owners; settled (by `register`) before any stock
    /// exists, and without it no stock is handed out.
    #[inline]
    pub(crate) fn available() -> bool {
        STATE.load(Relaxed) == 1
    }

    /// Registers the process for expedited membarriers; called before the first stock.
    pub(crate) fn register() {
        if STATE.load(Relaxed) != 0 {
            return;
        }
        // SAFETY: membarrier takes no pointers; an unknown command just fails.
        let ok =
            unsafe { libc::syscall(libc::SYS_membarrier, CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) }
                == 0;
        STATE.store(if ok { 1 } else { 2 }, Relaxed);
    }

    pub(super) fn run() {
        if available() {
            // SAFETY: as in `register`; registered, so this command is allowed.
            unsafe { libc::syscall(libc::SYS_membarrier, CMD_PRIVATE_EXPEDITED, 0, 0) };
        }
    }
}
