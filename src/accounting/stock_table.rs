//! A3: the process's stock slots and the calling thread's own; what the allocator calls to
//! charge and uncharge objects through the stock, and what `stat` and reclaimers read.
//!
//! A thread claims a slot at its first charge: one mapping of its own (a `StockSlot` and
//! its entries), kept in a table of [`SLOTS`] pointers and reused by later threads once
//! this one exits. More threads than slots, or a kernel without `membarrier`, charge
//! directly.

use super::fence::membarrier;
use super::reclaim::{reclaim, Target};
use super::registry::registry;
use super::sampling;
use super::stock::{charge_pair, charge_pair_counted, charge_pair_undo, GiveBack, StockSlot};
use super::stock::{ALLOCATIONS, MEMORY, NONE};
use super::types::{Exceeded, Resource, Severity, MAX_DEPTH};
use crate::sync::{AtomicPtr, AtomicUsize, Mutex, Ordering};
use core::cell::Cell;
use core::ptr;

/// Threads that can hold a stock at once; more threads charge directly.
const SLOTS: usize = 16 << 10;

/// `next_free` of a slot that a thread owns.
const IN_USE: u32 = u32::MAX - 1;

struct Table {
    /// Slots at or above `hwm` were never used.
    hwm: usize,
    /// Head of the free list of slots (through `next_free`), `NONE` if empty.
    free: u32,
}

static TABLE: Mutex<Table> = Mutex::new(Table { hwm: 0, free: NONE });
/// The slots: each a mapping of its own, made when first claimed, never unmapped.
static SLOT_PTRS: [AtomicPtr<StockSlot>; SLOTS] =
    [const { AtomicPtr::new(ptr::null_mut()) }; SLOTS];
/// `Table::hwm`, readable without the lock by `stocked` and reclaimers.
static HWM: AtomicUsize = AtomicUsize::new(0);
/// Serialises reclaimers (each locks many slots).
static RECLAIM: Mutex<()> = Mutex::new(());

/// The slot of a thread without one of its own (not claimed yet, the table full, no
/// `membarrier`, or exiting): closed, so its charges go direct.
static CLOSED: StockSlot = StockSlot::closed();

/// `MINE` of a thread whose charges go direct.
fn direct() -> *const StockSlot {
    &CLOSED
}

thread_local! {
    /// The sample countdown of this thread's allocations outside its stock entries: bytes
    /// to the next point, random state, and the sampling epoch it was drawn in.
    static COUNTDOWN: (Cell<u64>, Cell<u64>, Cell<u32>) =
        const { (Cell::new(sampling::OFF), Cell::new(0), Cell::new(0)) };
    /// This thread's slot, or [`CLOSED`].
    static MINE: Cell<*const StockSlot> = const { Cell::new(&raw const CLOSED) };
    /// Whether this thread tried to claim a slot.
    static CLAIMED: Cell<bool> = const { Cell::new(false) };
}

/// This thread's slot, or the closed one: what the fast paths use, with no test.
#[inline(always)]
fn mine_or_closed() -> &'static StockSlot {
    let s = MINE.try_with(|m| m.get()).unwrap_or(direct());
    // SAFETY: `CLOSED`, or a claimed slot, which is never unmapped, used by this thread as
    // owner until it exits.
    unsafe { &*s }
}

/// This thread's slot, if it has one.
#[inline]
fn mine() -> Option<&'static StockSlot> {
    let s = mine_or_closed();
    (!ptr::eq(s, &CLOSED)).then_some(s)
}

fn all_slots() -> impl Iterator<Item = &'static StockSlot> + Clone {
    let hwm = HWM.load(Ordering::Acquire);
    (0..hwm).map(|i| {
        // SAFETY: `i < hwm`: the slot was mapped and initialised before `hwm` grew past it
        // (Release store in `claim`, Acquire load above), and is never unmapped.
        unsafe { &*SLOT_PTRS[i].load(Ordering::Acquire) }
    })
}

/// Once per thread, out of line: a new slot is built in a frame of its own size (32 KiB), which
/// must not be the frame of every stock refill that calls [`claim_mine`].
#[cold]
#[inline(never)]
fn claim() -> *const StockSlot {
    membarrier::register();
    if !membarrier::available() {
        // Reclaimers could not fence owners: no stocks, every charge goes direct.
        return direct();
    }
    let mut t = TABLE.lock();
    let index = if t.free != NONE {
        let i = t.free as usize;
        // SAFETY: free-list entries are below `hwm`: mapped slots.
        t.free = unsafe { &*SLOT_PTRS[i].load(Ordering::Relaxed) }
            .next_free
            .load(Ordering::Relaxed);
        i
    } else if t.hwm < SLOTS {
        let Some(at) = crate::os::map(core::mem::size_of::<StockSlot>()) else {
            return direct();
        };
        let at = at.as_ptr().cast::<StockSlot>();
        // SAFETY: a fresh mapping of the slot's size, page-aligned; nobody reads it before
        // `hwm` grows past it.
        unsafe { at.write(StockSlot::new(t.hwm as u32)) };
        SLOT_PTRS[t.hwm].store(at, Ordering::Release);
        t.hwm += 1;
        HWM.store(t.hwm, Ordering::Release);
        t.hwm - 1
    } else {
        return direct();
    };
    // SAFETY: `index < hwm`, a slot nobody owns; this thread takes it.
    let slot = unsafe { &*SLOT_PTRS[index].load(Ordering::Relaxed) };
    slot.next_free.store(IN_USE, Ordering::Relaxed);
    slot
}

/// Charges `bytes` of `Memory` and one of `Allocations` for a new object to the beancounter
/// of charge key `key` (`context::key`), from this thread's stock, or returns false (then
/// call [`charge_object_slow`]). Only a `Limit` key can match a stock entry. Calls nothing,
/// so that the allocator's fast path needs no stack frame.
#[inline]
pub(crate) fn try_charge_object(key: u32, bytes: u64) -> bool {
    mine_or_closed().try_consume(key, bytes)
}

/// Charges a new object when [`try_charge_object`] could not: refills the stock, or
/// charges directly; a refusal is counted. Returns the index charged (`bc`, or, if `bc`
/// was retired, its heir (`Registry::charge_target`), which the object must be tagged
/// with) and whether a heap-profile sample point falls in the object.
#[cold]
#[inline(never)]
pub(crate) fn charge_object_slow(
    bc: u32,
    bytes: u64,
    severity: Severity,
) -> Result<(u32, bool), Exceeded> {
    let reg = registry();
    let bc = reg.charge_target(bc);
    claim_mine();
    let (first, sampled) = match mine() {
        Some(s) if severity == Severity::Limit => match s.alloc_slow(reg, bc, bytes, 1) {
            Ok(sampled) => return Ok((bc, sampled)),
            Err(e) => (Err(e), false),
        },
        Some(s) => (
            s.charge_slow(reg, bc, bytes, 1, severity, sampling::OFF),
            sample_direct(bytes),
        ),
        None => (
            charge_pair_counted(reg, bc, bytes, 1, severity, false),
            sample_direct(bytes),
        ),
    };
    first
        .or_else(|e| reclaim_and_retry(e, bc, bytes, 1, severity))
        .map(|()| (bc, sampled))
}

/// Charges `bytes` of `Memory` and no object to `bc` for one of its blocks of pages growing
/// in place, checked as charge key `key` (`bc` with its severity) says: from this thread's
/// entry for `bc` like an object's charge (with a refill when it holds too little), or
/// directly when the thread has no entry to use (no stock, a severity other than `Limit`,
/// `bc` retired). Tentative: a refusal is not counted and reclaims nothing, since moving the
/// block may still succeed and decides. Returns whether a heap-profile sample point falls in
/// the growth.
#[inline]
pub(crate) fn charge_growth(key: u32, bytes: u64) -> Result<bool, Exceeded> {
    if try_charge_growth(key, bytes) {
        return Ok(false);
    }
    charge_growth_slow(key, bytes)
}

/// The fast path of [`charge_growth`] alone: takes `bytes` from this thread's entry for
/// charge key `key` if it holds that much (never with a sample point in them); false, with
/// nothing charged, otherwise.
#[inline(always)]
pub(crate) fn try_charge_growth(key: u32, bytes: u64) -> bool {
    mine_or_closed().try_consume_bytes(key, bytes)
}

#[cold]
#[inline(never)]
fn charge_growth_slow(key: u32, bytes: u64) -> Result<bool, Exceeded> {
    let (bc, severity) = super::context::split(key);
    let reg = registry();
    match mine() {
        Some(s) if severity == Severity::Limit && reg.charge_target(bc) == bc => {
            s.alloc_slow(reg, bc, bytes, 0)
        }
        _ => reg
            .charge_counted(bc, Resource::Memory, MEMORY, bytes, severity, false)
            .map(|()| false),
    }
}

/// Counts `bytes` allocated by this thread outside its stock entries (checked against a
/// barrier or forced, without a stock, or a block of pages) on the thread's own sample
/// countdown: true if a sample point falls in them.
pub(crate) fn sample_direct(bytes: u64) -> bool {
    COUNTDOWN
        .try_with(|(left, rng, epoch)| {
            let mut until = left.get();
            if epoch.get() != sampling::epoch() {
                epoch.set(sampling::epoch());
                until = draw(rng);
            }
            let (sampled, next) = sampling::count(until, bytes, || draw(rng));
            left.set(next);
            sampled
        })
        .unwrap_or(false)
}

/// A fresh countdown from a thread's random state, seeded at first use.
fn draw(rng: &Cell<u64>) -> u64 {
    let mut state = rng.get();
    let d = sampling::draw(&mut state, rng as *const Cell<u64> as u64);
    rng.set(state);
    d
}

/// Charges a block directly (no stock): `mem` bytes and `objs` objects. Returns the index
/// charged, as [`charge_object_slow`] does.
pub(crate) fn charge_block(
    bc: u32,
    mem: u64,
    objs: u64,
    severity: Severity,
) -> Result<u32, Exceeded> {
    let bc = registry().charge_target(bc);
    charge_pair_counted(registry(), bc, mem, objs, severity, false)
        .or_else(|e| reclaim_and_retry(e, bc, mem, objs, severity))
        .map(|()| bc)
}

/// After a tentative refusal: takes back every stock of the refusing level and retries.
/// The retry can be refused higher up, by an ancestor whose headroom stocks in other
/// subtrees hold (they were not the refusing level's), so this repeats for each new
/// refusing level, at most once per level of the hierarchy; a level that refuses again
/// after its stocks were taken back refuses for real. The last attempt's refusal is the
/// one that counts.
#[cold]
fn reclaim_and_retry(
    first: Exceeded,
    bc: u32,
    mem: u64,
    objs: u64,
    severity: Severity,
) -> Result<(), Exceeded> {
    let reg = registry();
    if severity != Severity::Force {
        let mut refused = first.id;
        for _ in 0..=MAX_DEPTH {
            let Some(target) = reg.index_of(refused, bc) else {
                break;
            };
            reclaim_all(target);
            match charge_pair_counted(reg, bc, mem, objs, severity, false) {
                Ok(()) => return Ok(()),
                Err(e) if e.id == refused => break,
                Err(e) => refused = e.id,
            }
        }
    }
    charge_pair(reg, bc, mem, objs, severity)
}

/// Takes back every stock held for `target` or its descendants, this thread's included.
pub(crate) fn reclaim_all(target: u32) -> usize {
    let reg = registry();
    let _one_at_a_time = RECLAIM.lock();
    reclaim(reg, all_slots(), mine(), Target::of(reg, target))
}

/// Takes back every stock held for a beancounter that no handle or context refers to
/// any more, so that it can be freed once its objects are.
pub(crate) fn reclaim_unreferenced() -> usize {
    let _one_at_a_time = RECLAIM.lock();
    reclaim(registry(), all_slots(), mine(), Target::Unreferenced)
}

/// Gives back what a freed object was charged: into this thread's stock if it holds that
/// beancounter, else to the beancounter directly.
#[inline]
pub(crate) fn uncharge_object(bc: u32, bytes: u64) {
    let done = try_uncharge_object(bc, bytes);
    if done != GiveBack::Done {
        uncharge_object_slow(done, bc, bytes);
    }
}

/// The fast path of [`uncharge_object`]: puts the charge into this thread's entry for the
/// object's beancounter. Anything but `Done` must be passed to [`uncharge_object_slow`].
/// Calls nothing.
#[inline]
pub(crate) fn try_uncharge_object(bc: u32, bytes: u64) -> GiveBack {
    mine_or_closed().try_give_back(bc, bytes)
}

/// Finishes [`try_uncharge_object`]: trims the entry it overfilled, or uncharges directly
/// what it could not take.
#[cold]
#[inline(never)]
pub(crate) fn uncharge_object_slow(outcome: GiveBack, bc: u32, bytes: u64) {
    if outcome == GiveBack::NotMine {
        // A thread that frees before it ever allocates (a consumer) gets its stock now.
        if claim_mine() {
            if let outcome @ (GiveBack::Done | GiveBack::Trim) = try_uncharge_object(bc, bytes) {
                return uncharge_object_slow(outcome, bc, bytes);
            }
        }
        if mine().is_some_and(|s| s.adopt(bc, bytes)) {
            return;
        }
    }
    match (outcome, mine()) {
        (GiveBack::Done, _) => {}
        (GiveBack::Trim, Some(s)) => s.trim(registry(), bc),
        _ => charge_pair_undo(registry(), bc, bytes),
    }
}

/// Claims a slot for this thread if it has not tried yet; true if it got one now.
#[inline]
fn claim_mine() -> bool {
    if CLAIMED.try_with(|c| c.replace(true)).unwrap_or(true) {
        return false;
    }
    let s = claim();
    let _ = MINE.try_with(|m| m.set(s));
    !ptr::eq(s, direct())
}

/// Drains this thread's stock.
pub(crate) fn drain_current() {
    if let Some(s) = mine() {
        s.drain(registry());
    }
}

/// Thread exit: drains the stock, frees the slot, and makes later charges of this thread
/// direct.
pub(crate) fn thread_exit() {
    let s = mine();
    let _ = MINE.try_with(|m| m.set(direct()));
    let Some(slot) = s else { return };
    slot.drain(registry());
    let mut t = TABLE.lock();
    slot.next_free.store(t.free, Ordering::Relaxed);
    t.free = slot.index;
}

/// What stocks hold of counter `ri` for beancounter `index` (its own and those of its
/// descendants, which were charged to it too): charged, but not in use.
pub(crate) fn stocked(index: u32, ri: usize) -> u64 {
    if ri != MEMORY && ri != ALLOCATIONS {
        return 0;
    }
    let reg = registry();
    let leaf = !reg.has_children(index);
    all_slots().map(|s| s.stocked(reg, index, ri, leaf)).sum()
}

/// Around `fork()`: takes the reclaim and table locks and every slot's lock, and waits
/// for every owner to leave its fast path, so the child inherits stocks that agree with
/// the counters.
pub(crate) fn lock_for_fork() {
    core::mem::forget(RECLAIM.lock());
    core::mem::forget(TABLE.lock());
    for s in all_slots() {
        s.lock();
        s.steal.store(1, Ordering::Relaxed);
    }
    super::fence::reclaimer_fence();
    for s in all_slots() {
        while s.busy.load(Ordering::Acquire) != 0 {
            super::fence::spin();
        }
    }
}

/// Releases what [`lock_for_fork`] took. In the child, the stocks of threads that do
/// not exist there are given back to their beancounters and their slots freed.
///
/// # Safety
/// Only after `lock_for_fork`, in the parent (`child == false`) or the child.
pub(crate) unsafe fn unlock_after_fork(child: bool) {
    let me = MINE.try_with(|m| m.get()).unwrap_or(direct());
    // SAFETY: `lock_for_fork` took the table lock; its guard was forgotten, and in the
    // child this is the only thread, so nothing else can touch the table.
    let t = unsafe { &mut *TABLE.data_ptr() };
    for (i, s) in all_slots().enumerate() {
        if child && !ptr::eq(s, me) && s.next_free.load(Ordering::Relaxed) == IN_USE {
            s.drain_locked(registry());
            s.next_free.store(t.free, Ordering::Relaxed);
            t.free = i as u32;
        }
        s.steal.store(0, Ordering::Release);
        s.unlock();
    }
    // SAFETY: locked by `lock_for_fork`, guards forgotten.
    unsafe {
        TABLE.force_unlock();
        RECLAIM.force_unlock();
    }
}
