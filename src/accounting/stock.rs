//! A3: per-thread charge stocks, so that the common allocation and free touch no shared
//! cache line, whichever tenant the thread works for at the moment.
//!
//! A thread keeps, per beancounter it recently charged or freed objects of, an *entry*:
//! `Memory` and `Allocations` charged to that beancounter (and every ancestor) and not in
//! use. Allocations for the beancounter are taken from its entry and frees of its objects
//! go back into it, so a thread that switches tenant per request or per poll finds the
//! tenant's entry where it left it, and the switch costs no shared atomic. Entries are
//! direct-mapped by slot index, [`ENTRIES`] per thread: the entry of beancounter slot `i` is
//! `entries[i % ENTRIES]`, and two beancounters that map to the same entry take turns (a
//! refill evicts the other one; a free of the other one's object is uncharged directly).
//!
//! An entry is filled two ways:
//! - a *refill* charges a batch ahead of use, checked like any charge (the charge that
//!   needed it, with its severity);
//! - a *give-back*: a free of an object whose beancounter has its entry here (or a free
//!   one) puts the object's charge there instead of uncharging it: freeing a consumer
//!   thread's stream of other tenants' objects costs no shared atomic either.
//!
//! Both are charged and not in use: `held` includes them and `stat()` subtracts them.
//!
//! Invariant: an entry whose `bc` is `NONE` holds nothing (`mem == objs == 0`).
//!
//! # Hard rule and slack
//! An entry is charged like any charge (checked against the bound of the charge that
//! needed it), so `held`, which includes every entry, never passes a bound a charge was
//! checked against, and true usage is at most `held`.
//!
//! A charge can be refused while true usage plus the request would fit only because other
//! threads hold stock of the refusing beancounter. Two things bound that slack
//! independently of the number of threads and of entries:
//! - **Batches shrink with headroom.** A refill takes at most
//!   `min(STOCK_BYTES, headroom / (2 × CPUs))` bytes (and the same share of `Allocations`
//!   headroom), as OpenVZ's precharge does: near a bound, stocks are small.
//! - **Reclaim before refusing.** A charge the counters refuse is retried once after every
//!   entry of the refusing beancounter (and of its descendants, whose charges it carries)
//!   has been taken back from every thread (`reclaim.rs`). What can still stand in the way
//!   at the retry is stock that threads running at that moment took again since: a refill
//!   charges only the thread's current tenant, so at most one batch per CPU,
//!   `min(CPUs × STOCK_BYTES, headroom / 2)`. (A give-back does not raise `held`.)
//!
//! An entry grows past two batches only through give-backs; the free that does so trims it
//! to one batch. So a thread keeps at most two batches per entry, and what it keeps of a
//! tenant it stopped serving stays until a refill evicts it, a reclaim takes it, or the
//! thread exits or calls [`drain`](StockSlot::drain).
//!
//! # The owner and the reclaimers
//! The owner uses its entries with plain loads and stores inside the busy/steal handshake
//! of [`StockSlot::fast`] (the reclaimer's side is in `reclaim.rs`): no lock, no atomic
//! read-modify-write. Its slow paths (refill, trim, drain) and reclaimers take the slot's
//! lock.

use super::registry::Registry;
use super::types::{Exceeded, Resource, Severity};
use crate::sync::Ordering::{Acquire, Relaxed, Release};
use crate::sync::{const_fn, AtomicU32, AtomicU64};

/// Bytes of `Memory` a refill takes at most at once: 128 KiB, half of Linux's per-CPU memcg
/// stock (64 pages); measured in `benches/README.md` to keep the shared counter off the
/// small-object path.
///
/// # Examples
/// ```
/// #[global_allocator]
/// static A: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
/// # fn main() {
/// use beancounter::{BcId, Resource};
/// let t = beancounter::find_or_create(BcId(150)).unwrap();
/// let _g = t.enter();
/// let b = Box::new(0u64);
/// t.reset_window(); // maxheld = what is charged now, this thread's stock included
/// let s = t.stat(Resource::Memory);
/// assert_eq!(s.held, 8); // true usage: one 8-byte object
/// assert!(s.maxheld <= s.held + beancounter::STOCK_BYTES);
/// # drop(b);
/// # }
/// ```
pub const STOCK_BYTES: u64 = 128 << 10;
/// `Allocations` a refill takes at most at once: one per 512 bytes of `STOCK_BYTES`.
///
/// # Examples
/// ```
/// #[global_allocator]
/// static A: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
/// # fn main() {
/// use beancounter::{BcId, Resource};
/// let t = beancounter::find_or_create(BcId(151)).unwrap();
/// let _g = t.enter();
/// let b = Box::new(0u64);
/// t.reset_window(); // maxheld = what is charged now, this thread's stock included
/// let s = t.stat(Resource::Allocations);
/// assert_eq!(s.held, 1); // true usage: one object
/// assert!(s.maxheld <= s.held + beancounter::STOCK_OBJECTS);
/// # drop(b);
/// # }
/// ```
pub const STOCK_OBJECTS: u64 = 256;

/// Entries per thread: 1 024, so a thread can serve that many tenants in turn (tenants
/// numbered densely, as slot indices are) without a shared atomic when it switches. 16 KiB
/// per thread, mapped with its slot. Two under loom, so that models see entries collide.
#[cfg(not(beancounter_loom))]
pub(crate) const ENTRIES: usize = 1024;
#[cfg(beancounter_loom)]
pub(crate) const ENTRIES: usize = 2;

/// Slot index meaning "no beancounter"; also the end of the table's free list.
pub(crate) const NONE: u32 = u32::MAX;

pub(crate) const MEMORY: usize = 0;
pub(crate) const ALLOCATIONS: usize = 1;

/// What one thread holds of one beancounter: charged, not in use.
pub(crate) struct Entry {
    /// Slot index of the beancounter, or `NONE` (then `mem` and `objs` are 0).
    bc: AtomicU32,
    objs: AtomicU32,
    mem: AtomicU64,
}

impl Entry {
    const_fn! {
        fn new() -> Self {
            Entry {
                bc: AtomicU32::new(NONE),
                objs: AtomicU32::new(0),
                mem: AtomicU64::new(0),
            }
        }
    }

    /// The beancounter and amounts (racy unless the owner is out of its fast path).
    pub(crate) fn peek(&self) -> (u32, u64, u64) {
        (
            self.bc.load(Relaxed),
            self.mem.load(Relaxed),
            self.objs.load(Relaxed) as u64,
        )
    }

    /// Uncharges what the entry holds and empties it. The amounts are zeroed before the
    /// uncharge, so a reader never counts more than is charged. The caller holds the slot's
    /// lock and no fast path is running.
    pub(crate) fn give_back(&self, reg: &Registry) {
        let owner = self.bc.load(Relaxed);
        if owner == NONE {
            return;
        }
        let (m, o) = (self.mem.load(Relaxed), self.objs.load(Relaxed));
        self.mem.store(0, Relaxed);
        self.objs.store(0, Relaxed);
        self.bc.store(NONE, Relaxed);
        // An entry used up to exactly nothing holds no charge, so nothing keeps `owner`
        // alive: it may be freed (and its index reused) by now. Touch it only with a charge.
        if m > 0 {
            reg.uncharge(owner, MEMORY, m);
        }
        if o > 0 {
            reg.uncharge(owner, ALLOCATIONS, o as u64);
        }
    }
}

/// One thread's stocks.
#[repr(C, align(64))]
pub(crate) struct StockSlot {
    /// 1 while the owner uses its entries on its fast path.
    pub(crate) busy: AtomicU32,
    /// 1 while a reclaimer takes entries.
    pub(crate) steal: AtomicU32,
    /// Held by the owner's slow paths and by reclaimers.
    lock: AtomicU32,
    /// Table free-list link while the slot is unused.
    pub(crate) next_free: AtomicU32,
    /// Where the slot is in the process's table (`stock_table`).
    pub(crate) index: u32,
    entries: [Entry; ENTRIES],
}

/// What giving a freed object back to the stock did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum GiveBack {
    /// Another beancounter holds the entry (or a reclaimer is at work): uncharge directly.
    NotMine,
    /// Taken into the entry.
    Done,
    /// Taken, and the entry now holds more than two batches: trim it.
    Trim,
}

impl StockSlot {
    /// Slot `index` of the table, every entry empty.
    #[cfg(not(beancounter_loom))]
    pub(crate) const fn new(index: u32) -> Self {
        StockSlot {
            busy: AtomicU32::new(0),
            steal: AtomicU32::new(0),
            lock: AtomicU32::new(0),
            next_free: AtomicU32::new(NONE),
            index,
            entries: [const { Entry::new() }; ENTRIES],
        }
    }

    /// Slot `index` of the table, every entry empty.
    #[cfg(beancounter_loom)]
    pub(crate) fn new(index: u32) -> Self {
        StockSlot {
            busy: AtomicU32::new(0),
            steal: AtomicU32::new(0),
            lock: AtomicU32::new(0),
            next_free: AtomicU32::new(NONE),
            index,
            entries: core::array::from_fn(|_| Entry::new()),
        }
    }

    /// The entry beancounter slot `bc` maps to.
    #[inline]
    pub(crate) fn entry(&self, bc: u32) -> &Entry {
        &self.entries[bc as usize % ENTRIES]
    }

    /// Every entry (for reclaimers and `stat`).
    pub(crate) fn entries(&self) -> &[Entry] {
        &self.entries
    }

    /// Runs `f` on the owner's fast path, unless a reclaimer is at work (then `None`).
    #[inline]
    fn fast<R>(&self, f: impl FnOnce() -> R) -> Option<R> {
        self.busy.store(1, Relaxed);
        super::fence::owner_fence();
        // Acquire: if this reads the 0 a reclaimer stores when it is done, what it did to
        // the entries (emptied them) must be visible here.
        if self.steal.load(Acquire) != 0 {
            self.busy.store(0, Release);
            return None;
        }
        let r = f();
        self.busy.store(0, Release);
        Some(r)
    }

    /// Owner: takes `bytes` and one object from the entry of `bc`, if it holds that much.
    /// Calls nothing.
    #[inline]
    pub(crate) fn try_consume(&self, bc: u32, bytes: u64) -> bool {
        self.fast(|| {
            let e = self.entry(bc);
            let (m, o) = (e.mem.load(Relaxed), e.objs.load(Relaxed));
            if e.bc.load(Relaxed) != bc || m < bytes || o == 0 {
                return false;
            }
            e.mem.store(m - bytes, Relaxed);
            e.objs.store(o - 1, Relaxed);
            true
        })
        .unwrap_or(false)
    }

    /// Owner: puts back what a freed object of `bc` was charged, into the entry of `bc` if
    /// it holds `bc` or nothing. Calls nothing: a call here would give the allocator's
    /// free path a stack frame.
    #[inline]
    pub(crate) fn try_give_back(&self, bc: u32, bytes: u64) -> GiveBack {
        self.fast(|| {
            let e = self.entry(bc);
            let (m, o) = match e.bc.load(Relaxed) {
                held if held == bc => (e.mem.load(Relaxed) + bytes, e.objs.load(Relaxed) + 1),
                NONE => (bytes, 1),
                _ => return GiveBack::NotMine,
            };
            e.mem.store(m, Relaxed);
            e.objs.store(o, Relaxed);
            e.bc.store(bc, Relaxed);
            if m > 2 * STOCK_BYTES || o as u64 > 2 * STOCK_OBJECTS {
                GiveBack::Trim
            } else {
                GiveBack::Done
            }
        })
        .unwrap_or(GiveBack::NotMine)
    }

    pub(crate) fn lock(&self) {
        while self
            .lock
            .compare_exchange_weak(0, 1, Acquire, Relaxed)
            .is_err()
        {
            super::fence::spin();
        }
    }

    pub(crate) fn unlock(&self) {
        self.lock.store(0, Release);
    }

    /// What the entry of `bc` holds of it, `(mem, objs)` (racy unless quiescent).
    pub(crate) fn peek(&self, bc: u32) -> (u64, u64) {
        match self.entry(bc).peek() {
            (held, m, o) if held == bc => (m, o),
            _ => (0, 0),
        }
    }

    /// Owner, slow path: charges `bytes` and one object to `bc`, refilling its entry with a
    /// batch on top when `severity` is `Limit` and the headroom allows (evicting another
    /// beancounter's entry first). Tentative: a refusal here is not counted, the caller
    /// decides (after reclaiming stocks).
    pub(crate) fn charge_slow(
        &self,
        reg: &Registry,
        bc: u32,
        bytes: u64,
        severity: Severity,
    ) -> Result<(), Exceeded> {
        self.lock();
        let e = self.entry(bc);
        let (mem, objs) = if severity == Severity::Limit {
            batch(reg, bc)
        } else {
            (0, 0)
        };
        let result = match charge_pair_counted(reg, bc, bytes + mem, 1 + objs, severity, false) {
            Ok(()) if mem + objs > 0 => {
                if e.bc.load(Relaxed) != bc {
                    e.give_back(reg);
                }
                // Owner under its own lock: no reclaimer is at work on this slot.
                e.mem.store(e.mem.load(Relaxed) + mem, Relaxed);
                e.objs.store(e.objs.load(Relaxed) + objs as u32, Relaxed);
                e.bc.store(bc, Relaxed);
                Ok(())
            }
            Ok(()) => Ok(()),
            Err(_) if mem + objs > 0 => charge_pair_counted(reg, bc, bytes, 1, severity, false),
            Err(e) => Err(e),
        };
        self.unlock();
        result
    }

    /// Owner, slow path: gives back what the entry of `bc` holds beyond one batch.
    pub(crate) fn trim(&self, reg: &Registry, bc: u32) {
        self.lock();
        let e = self.entry(bc);
        let (m, o) = (e.mem.load(Relaxed), e.objs.load(Relaxed) as u64);
        if e.bc.load(Relaxed) == bc {
            if m > STOCK_BYTES {
                e.mem.store(STOCK_BYTES, Relaxed);
                reg.uncharge(bc, MEMORY, m - STOCK_BYTES);
            }
            if o > STOCK_OBJECTS {
                e.objs.store(STOCK_OBJECTS as u32, Relaxed);
                reg.uncharge(bc, ALLOCATIONS, o - STOCK_OBJECTS);
            }
        }
        self.unlock();
    }

    /// Owner (or, in a forked child, for a thread that is gone): gives every entry back.
    pub(crate) fn drain(&self, reg: &Registry) {
        self.lock();
        self.drain_locked(reg);
        self.unlock();
    }

    /// Gives every entry back; the caller holds the lock and no fast path is running.
    pub(crate) fn drain_locked(&self, reg: &Registry) {
        for e in &self.entries {
            e.give_back(reg);
        }
    }

    /// What this slot's entries hold of counter `ri` (0 `Memory`, 1 `Allocations`) for
    /// beancounter `index`, or, unless `leaf`, for it and its descendants, whose charges it
    /// carries (racy unless quiescent).
    pub(crate) fn stocked(&self, reg: &Registry, index: u32, ri: usize, leaf: bool) -> u64 {
        let pick = |(_, m, o): (u32, u64, u64)| if ri == MEMORY { m } else { o };
        if leaf {
            let (m, o) = self.peek(index);
            return pick((index, m, o));
        }
        self.entries
            .iter()
            .map(Entry::peek)
            .filter(|&(bc, _, _)| bc != NONE && reg.is_self_or_descendant(bc, index))
            .map(pick)
            .sum()
    }
}

/// Charges `mem` bytes and `objs` objects, both or neither; a refusal is counted.
pub(crate) fn charge_pair(
    reg: &Registry,
    bc: u32,
    mem: u64,
    objs: u64,
    severity: Severity,
) -> Result<(), Exceeded> {
    charge_pair_counted(reg, bc, mem, objs, severity, true)
}

/// [`charge_pair`]; with `count == false` for an attempt that may be followed by another
/// (a refill batch, a try before reclaiming stocks), whose refusal is not counted.
pub(crate) fn charge_pair_counted(
    reg: &Registry,
    bc: u32,
    mem: u64,
    objs: u64,
    severity: Severity,
    count: bool,
) -> Result<(), Exceeded> {
    reg.charge_counted(bc, Resource::Memory, MEMORY, mem, severity, count)?;
    if let Err(e) = reg.charge_counted(
        bc,
        Resource::Allocations,
        ALLOCATIONS,
        objs,
        severity,
        count,
    ) {
        reg.uncharge(bc, MEMORY, mem);
        return Err(e);
    }
    Ok(())
}

/// Uncharges what one object was charged, directly.
pub(crate) fn charge_pair_undo(reg: &Registry, bc: u32, bytes: u64) {
    reg.uncharge(bc, MEMORY, bytes);
    reg.uncharge(bc, ALLOCATIONS, 1);
}

/// The batch a refill for `bc` may take: at most `STOCK_BYTES`/`STOCK_OBJECTS`, and at
/// most `headroom / (2 × CPUs)` of the tightest limit on the way up.
fn batch(reg: &Registry, bc: u32) -> (u64, u64) {
    let share = 2 * super::fence::cpus();
    let mem = reg.headroom(bc, MEMORY) / share;
    let objs = reg.headroom(bc, ALLOCATIONS) / share;
    (mem.min(STOCK_BYTES), objs.min(STOCK_OBJECTS))
}
