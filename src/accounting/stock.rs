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
//! An entry's `take` (what allocations use) is at most one batch (of bytes and of objects),
//! and its `back` (what frees gave back) grows past one batch only through give-backs; the
//! free that does so trims `back` to half a batch. So a thread keeps at most two batches per entry, and what it keeps of a
//! tenant it stopped serving stays until a refill evicts it, a reclaim takes it, or the
//! thread exits or calls [`drain`](StockSlot::drain).
//!
//! # The owner and the reclaimers
//! The owner uses its entries with plain loads and stores inside the busy/steal handshake
//! of [`StockSlot::fast`] (the reclaimer's side is in `reclaim.rs`): no lock, no atomic
//! read-modify-write. Its slow paths (refill, trim, drain) and reclaimers take the slot's
//! lock.

use super::registry::Registry;
use super::sampling;
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
/// numbered densely, as slot indices are) without a shared atomic when it switches. 32 KiB
/// per thread, mapped with its slot. Two under loom, so that models see entries collide.
#[cfg(not(beancounter_loom))]
pub(crate) const ENTRIES: usize = 1024;
#[cfg(beancounter_loom)]
pub(crate) const ENTRIES: usize = 2;

/// Slot index meaning "no beancounter"; also the end of the table's free list.
pub(crate) const NONE: u32 = u32::MAX;

pub(crate) const MEMORY: usize = 0;
pub(crate) const ALLOCATIONS: usize = 1;

/// `bytes` of `Memory` and `objs` of `Allocations` in one word: objects in the high half,
/// bytes in the low half, each kept below 2^31.
const fn pack(bytes: u64, objs: u64) -> u64 {
    objs << 32 | bytes
}

/// The `(bytes, objs)` of a packed word.
const fn unpack(w: u64) -> (u64, u64) {
    (w & 0xffff_ffff, w >> 32)
}

/// What one object takes from an entry and gives back to it: its bytes and one object.
#[inline(always)]
const fn unit(bytes: u64) -> u64 {
    pack(bytes, 1)
}

/// Bit 31 and bit 63: the sign of each half of a packed word.
const SIGNS: u64 = 1 << 63 | 1 << 31;

/// What `back` is stored plus: each half biased so that its sign bit is set exactly when
/// the half passes its trim point (`STOCK_BYTES`, `STOCK_OBJECTS`). A free adds its
/// [`unit()`] and tests [`SIGNS`]: one add, one test, for both bounds.
const BACK_BIAS: u64 = pack((1 << 31) - 1 - STOCK_BYTES, (1 << 31) - 1 - STOCK_OBJECTS);

/// What one thread holds of one beancounter: charged, not in use.
///
/// It is held in two parts: `take`, which the fast path allocates from, and `back`, which
/// frees give back to and the slow path moves into `take`. Each is a packed word of bytes
/// and objects, so that the fast paths take or give one object with one subtraction or
/// addition and one test ([`SIGNS`]):
/// - `take` holds at most one batch, `pack(bytes, objs)`; an allocation subtracts its
///   [`unit()`], and either half going negative (a borrow out of the byte half takes the
///   object half down too) refuses it.
/// - `back` holds `pack(bytes, objs) + BACK_BIAS`; a free adds its unit, and either half
///   passing its trim point asks for a trim.
///
/// The fast path thus only ever lowers `take`, and what it allocated between two slow
/// paths is exactly what `take` lost: the entry counts down to its next heap-profile sample
/// point for free (`sampling.rs`), by holding `take` at most at `left` bytes before the
/// point.
///
/// 32 bytes, aligned to 32: an entry never straddles two cache lines, so the fast paths
/// touch one line of it.
#[repr(C, align(32))]
pub(crate) struct Entry {
    take: AtomicU64,
    back: AtomicU64,
    /// Bytes from the end of `take` to the next sample point ([`sampling::OFF`]: none).
    left: AtomicU64,
    /// Slot index of the beancounter, or `NONE` (then `take` and `back` hold nothing).
    bc: AtomicU32,
}

#[cfg(not(beancounter_loom))]
const _: () = assert!(core::mem::size_of::<Entry>() == 32);

impl Entry {
    const_fn! {
        fn new() -> Self {
            Entry {
                take: AtomicU64::new(0),
                back: AtomicU64::new(BACK_BIAS),
                left: AtomicU64::new(sampling::OFF),
                bc: AtomicU32::new(NONE),
            }
        }
    }

    /// The beancounter and amounts (racy unless the owner is out of its fast path).
    pub(crate) fn peek(&self) -> (u32, u64, u64) {
        let (m, o) = self.held();
        (self.bc.load(Relaxed), m, o)
    }

    /// What `take` holds, `(bytes, objs)`.
    fn take(&self) -> (u64, u64) {
        unpack(self.take.load(Relaxed))
    }

    /// What `back` holds, `(bytes, objs)`.
    fn back(&self) -> (u64, u64) {
        unpack(self.back.load(Relaxed) - BACK_BIAS)
    }

    /// What the entry holds, `(bytes, objs)`: `take` and `back`.
    fn held(&self) -> (u64, u64) {
        let ((tm, to), (bm, bo)) = (self.take(), self.back());
        (tm + bm, to + bo)
    }

    /// Holds `mem` bytes and `objs` objects with the next sample point `until` bytes of
    /// allocation away: `take` gets at most one batch, and never reaches the point. The
    /// owner, under its lock.
    fn hold(&self, mem: u64, objs: u64, until: u64) {
        let take = mem.min(STOCK_BYTES).min(until);
        let take_objs = objs.min(STOCK_OBJECTS);
        self.take.store(pack(take, take_objs), Relaxed);
        self.back
            .store(pack(mem - take, objs - take_objs) + BACK_BIAS, Relaxed);
        self.left.store(until - take, Relaxed);
    }

    /// Uncharges what the entry holds and empties it. The amounts are zeroed before the
    /// uncharge, so a reader never counts more than is charged. The caller holds the slot's
    /// lock and no fast path is running.
    pub(crate) fn give_back(&self, reg: &Registry) {
        let owner = self.bc.load(Relaxed);
        if owner == NONE {
            return;
        }
        let (m, o) = self.held();
        self.take.store(0, Relaxed);
        self.back.store(BACK_BIAS, Relaxed);
        self.bc.store(NONE, Relaxed);
        // An entry used up to exactly nothing holds no charge, so nothing keeps `owner`
        // alive: it may be freed (and its index reused) by now. Touch it only with a charge.
        if m > 0 {
            reg.uncharge(owner, MEMORY, m);
        }
        if o > 0 {
            reg.uncharge(owner, ALLOCATIONS, o);
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
    /// The random state of the entries' sample countdowns, and the sampling epoch they
    /// were drawn in (the owner's, under its lock).
    rng: AtomicU64,
    epoch: AtomicU32,
    entries: [Entry; ENTRIES],
}

/// What [`StockSlot::take_slow`] did.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TakeSlow {
    /// The allocation was taken from the entry.
    pub(crate) served: bool,
    /// A sample point falls in the allocation.
    pub(crate) sampled: bool,
    /// The entry's countdown after the allocation, for a refill to install.
    pub(crate) until: u64,
}

/// What giving a freed object back to the stock did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum GiveBack {
    /// Another beancounter holds the entry (or a reclaimer is at work): uncharge directly.
    NotMine,
    /// Taken into the entry.
    Done,
    /// Taken, and the entry's `back` now holds more than one batch: trim it.
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
            rng: AtomicU64::new(0),
            epoch: AtomicU32::new(0),
            entries: [const { Entry::new() }; ENTRIES],
        }
    }

    /// A slot no thread owns and every fast path refuses (`steal` is set for good): what
    /// a thread without a slot of its own uses, so that the fast paths need no test for
    /// "no slot".
    #[cfg(not(beancounter_loom))]
    pub(crate) const fn closed() -> Self {
        StockSlot {
            steal: AtomicU32::new(1),
            ..StockSlot::new(NONE)
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
            rng: AtomicU64::new(0),
            epoch: AtomicU32::new(0),
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
        self.consume(bc, unit(bytes))
    }

    /// Owner: takes `bytes` and no object from the entry of `bc` (a block of pages growing
    /// in place), if it holds that much. Calls nothing.
    #[inline]
    pub(crate) fn try_consume_bytes(&self, bc: u32, bytes: u64) -> bool {
        self.consume(bc, pack(bytes, 0))
    }

    /// Owner: takes packed `amount` from the entry of `bc`, if it holds that much.
    #[inline(always)]
    fn consume(&self, bc: u32, amount: u64) -> bool {
        self.fast(|| {
            let e = self.entry(bc);
            let left = e.take.load(Relaxed).wrapping_sub(amount);
            if e.bc.load(Relaxed) != bc || left & SIGNS != 0 {
                return false;
            }
            e.take.store(left, Relaxed);
            true
        })
        .unwrap_or(false)
    }

    /// Owner: puts back what a freed object of `bc` was charged, into the entry of `bc` if
    /// it holds `bc`. Calls nothing: a call here would give the allocator's free path a
    /// stack frame. A tag with [`sampling::SAMPLED`] never matches an entry.
    #[inline]
    pub(crate) fn try_give_back(&self, bc: u32, bytes: u64) -> GiveBack {
        self.fast(|| {
            let e = self.entry(bc);
            if e.bc.load(Relaxed) != bc {
                return GiveBack::NotMine;
            }
            let back = e.back.load(Relaxed) + unit(bytes);
            e.back.store(back, Relaxed);
            if back & SIGNS != 0 {
                GiveBack::Trim
            } else {
                GiveBack::Done
            }
        })
        .unwrap_or(GiveBack::NotMine)
    }

    /// Owner, slow path of a free that [`try_give_back`](Self::try_give_back) refused: if
    /// the entry of `bc` is empty, it takes `bc` and the object's charge, so that the frees
    /// of a consumer thread's stream of another tenant's objects go back to its stock too.
    /// True if taken.
    pub(crate) fn adopt(&self, bc: u32, bytes: u64) -> bool {
        if bc >= sampling::SAMPLED {
            return false;
        }
        self.fast(|| {
            let e = self.entry(bc);
            if e.bc.load(Relaxed) != NONE {
                return false;
            }
            e.back.store(unit(bytes) + BACK_BIAS, Relaxed);
            e.bc.store(bc, Relaxed);
            true
        })
        .unwrap_or(false)
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

    /// Owner, slow path of an allocation of `bytes` and `objs` objects (1 for a new block,
    /// 0 for a block of pages growing in place) for `bc`, checked with `Limit`, that the
    /// fast path refused: served from the entry if it holds enough
    /// ([`take_slow`](Self::take_slow)), or charged with a refill
    /// ([`charge_slow`](Self::charge_slow)). Returns whether a sample point falls in it.
    /// Tentative, as `charge_slow`.
    pub(crate) fn alloc_slow(
        &self,
        reg: &Registry,
        bc: u32,
        bytes: u64,
        objs: u64,
    ) -> Result<bool, Exceeded> {
        let t = self.take_slow(bc, bytes, objs);
        if t.served {
            return Ok(t.sampled);
        }
        self.charge_slow(reg, bc, bytes, objs, Severity::Limit, t.until)
            .map(|()| t.sampled)
    }

    /// Owner, slow path of an allocation of `bytes` and `objs` objects for `bc` that the
    /// fast path refused: counts it on the entry's sample countdown, and serves it from what
    /// the entry holds (`take`, and `back` moved into `take`) if it can.
    pub(crate) fn take_slow(&self, bc: u32, bytes: u64, objs: u64) -> TakeSlow {
        self.lock();
        if self.epoch.load(Relaxed) != sampling::epoch() {
            self.redraw();
        }
        let e = self.entry(bc);
        let mine = e.bc.load(Relaxed) == bc;
        // Where the entry's next sample point is; a new stream starts afresh.
        let point = if mine {
            e.take().0.saturating_add(e.left.load(Relaxed))
        } else {
            self.draw()
        };
        let (sampled, until) = sampling::count(point, bytes, || self.draw());
        let (held, held_objs) = e.held();
        let served = mine && held >= bytes && held_objs >= objs;
        if served {
            e.hold(held - bytes, held_objs - objs, until);
        } else if mine {
            e.hold(held, held_objs, until);
        }
        self.unlock();
        TakeSlow {
            served,
            sampled,
            until,
        }
    }

    /// A fresh sample countdown for one entry. Under the lock.
    fn draw(&self) -> u64 {
        let mut state = self.rng.load(Relaxed);
        let d = sampling::draw(&mut state, self as *const Self as u64);
        self.rng.store(state, Relaxed);
        d
    }

    /// Sampling started or stopped: every entry counts down afresh. Under the lock.
    #[cold]
    fn redraw(&self) {
        self.epoch.store(sampling::epoch(), Relaxed);
        for e in &self.entries {
            if e.bc.load(Relaxed) != NONE {
                let (mem, objs) = e.held();
                e.hold(mem, objs, self.draw());
            }
        }
    }

    /// What the entry of `bc` holds of it, `(mem, objs)` (racy unless quiescent).
    pub(crate) fn peek(&self, bc: u32) -> (u64, u64) {
        match self.entry(bc).peek() {
            (held, m, o) if held == bc => (m, o),
            _ => (0, 0),
        }
    }

    /// Owner, slow path: charges `bytes` and `objs` objects to `bc`, refilling its entry
    /// with a batch on top when `severity` is `Limit` and the headroom allows (evicting
    /// another beancounter's entry first). Tentative: a refusal here is not counted, the
    /// caller decides (after reclaiming stocks).
    ///
    /// `until` is the sample countdown [`take_slow`](Self::take_slow) left for the entry.
    pub(crate) fn charge_slow(
        &self,
        reg: &Registry,
        bc: u32,
        bytes: u64,
        objs: u64,
        severity: Severity,
        until: u64,
    ) -> Result<(), Exceeded> {
        self.lock();
        let e = self.entry(bc);
        let (mem, more) = if severity == Severity::Limit {
            batch(reg, bc)
        } else {
            (0, 0)
        };
        let result = match charge_pair_counted(reg, bc, bytes + mem, objs + more, severity, false) {
            Ok(()) if mem + more > 0 => {
                if e.bc.load(Relaxed) != bc {
                    e.give_back(reg);
                }
                // Owner under its own lock: no reclaimer is at work on this slot.
                let (held, held_objs) = e.held();
                e.hold(held + mem, held_objs + more, until);
                e.bc.store(bc, Relaxed);
                Ok(())
            }
            Ok(()) => Ok(()),
            Err(_) if mem + more > 0 => charge_pair_counted(reg, bc, bytes, objs, severity, false),
            Err(e) => Err(e),
        };
        self.unlock();
        result
    }

    /// Owner, slow path: gives back what the entry of `bc` holds in `back` beyond half a
    /// batch, of bytes and of objects.
    pub(crate) fn trim(&self, reg: &Registry, bc: u32) {
        self.lock();
        let e = self.entry(bc);
        let (back, o) = e.back();
        if e.bc.load(Relaxed) == bc {
            let (keep, keep_objs) = (back.min(STOCK_BYTES / 2), o.min(STOCK_OBJECTS / 2));
            e.back.store(pack(keep, keep_objs) + BACK_BIAS, Relaxed);
            if back > keep {
                reg.uncharge(bc, MEMORY, back - keep);
            }
            if o > keep_objs {
                reg.uncharge(bc, ALLOCATIONS, o - keep_objs);
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
