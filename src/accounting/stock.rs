//! A3: per-thread charge stocks, so that the common allocation and free touch no shared
//! cache line.
//!
//! A thread pre-charges a batch of `Memory` and `Allocations` to its exec beancounter (and
//! every ancestor, with the severity of the charge that needed it) and serves later charges
//! of that beancounter from it; frees of objects owned by the stocked beancounter go back
//! into it. The stock lives in a slot of a process-wide table that only its thread writes
//! (plain loads and stores, no read-modify-write), and that `stat()` reads to report true
//! usage: `held` minus what stocks hold.
//!
//! Hard rule: a stock is charged with the same add-check-publish as any charge, so `held`,
//! which includes every stock, never passes a bound that a charge was checked against, and
//! true usage is at most `held`.
//!
//! Slack: a charge is refused while true usage plus the request is under the bound only if
//! other threads' stocks hold the difference: at most [`STOCK_BYTES`] + [`STOCK_OBJECTS`]
//! per thread that has a stock for that beancounter. (Bounding this independently of the
//! number of threads is the next step: batches that shrink with headroom, and reclaiming
//! other threads' stock before refusing.)
//!
//! A stock is given back (*drained*) when its thread charges another beancounter, and when
//! the thread exits; the slot is then reused.

use super::handle::registry;
use super::registry::Registry;
use super::types::{Exceeded, Resource, Severity};
use crate::sync::{AtomicU32, AtomicU64, Mutex, Ordering::Relaxed};
use core::cell::Cell;
use core::ptr;

/// Bytes of `Memory` a stock takes at once: 128 KiB, a quarter of Linux's per-CPU memcg
/// stock (64 pages), so that a few dozen threads' stocks stay small next to a tenant limit.
pub const STOCK_BYTES: u64 = 128 << 10;
/// `Allocations` a stock takes at once: one per 512 bytes of `STOCK_BYTES`.
pub const STOCK_OBJECTS: u64 = 256;

/// Threads that can hold a stock at once; more threads charge directly.
const SLOTS: usize = 16 << 10;
const NONE: u32 = u32::MAX;

#[repr(align(64))]
struct Slot {
    /// Slot index of the stocked beancounter, or `NONE`.
    bc: AtomicU32,
    /// Free-list link while the slot is unused.
    next_free: AtomicU32,
    mem: AtomicU64,
    objs: AtomicU64,
}

struct Table {
    slots: *mut Slot,
    /// Slots at or above `hwm` were never used.
    hwm: usize,
    free: u32,
}

// SAFETY: the pointer is to the table's own mapping; the table is reached through a lock.
unsafe impl Send for Table {}

static TABLE: Mutex<Table> = Mutex::new(Table {
    slots: ptr::null_mut(),
    hwm: 0,
    free: NONE,
});
/// Same as `Table::slots`/`hwm`, readable without the lock by `stocked`.
static SLOTS_PTR: crate::sync::AtomicPtr<Slot> = crate::sync::AtomicPtr::new(ptr::null_mut());
static HWM: crate::sync::AtomicUsize = crate::sync::AtomicUsize::new(0);

/// Not claimed yet.
const UNCLAIMED: *const Slot = ptr::null();
/// No stock for this thread (table full, or the thread is exiting): charge directly.
const DIRECT: *const Slot = ptr::dangling();

thread_local! {
    static MINE: Cell<*const Slot> = const { Cell::new(UNCLAIMED) };
}

#[inline]
fn mine() -> *const Slot {
    MINE.try_with(|m| m.get()).unwrap_or(DIRECT)
}

fn claim() -> *const Slot {
    let mut t = TABLE.lock();
    if t.slots.is_null() {
        match crate::os::map(SLOTS * core::mem::size_of::<Slot>()) {
            Some(p) => {
                t.slots = p.as_ptr().cast();
                SLOTS_PTR.store(t.slots, crate::sync::Ordering::Release);
            }
            None => return DIRECT,
        }
    }
    let index = if t.free != NONE {
        let i = t.free as usize;
        // SAFETY: free-list entries are below `hwm`, inside the table.
        t.free = unsafe { (*t.slots.add(i)).next_free.load(Relaxed) };
        i
    } else if t.hwm < SLOTS {
        t.hwm += 1;
        HWM.store(t.hwm, crate::sync::Ordering::Release);
        t.hwm - 1
    } else {
        return DIRECT;
    };
    // SAFETY: `index < hwm <= SLOTS`; the slot is unused, so this thread may take it.
    let slot = unsafe { &*t.slots.add(index) };
    slot.bc.store(NONE, Relaxed);
    slot
}

/// Charges `bytes` of `Memory` and one of `Allocations` to slot `bc` for a new object.
#[inline]
pub(crate) fn charge_object(bc: u32, bytes: u64, severity: Severity) -> Result<(), Exceeded> {
    let s = mine();
    if s as usize > DIRECT as usize && severity == Severity::Limit {
        // SAFETY: a claimed slot, used only by this thread until it exits.
        let s = unsafe { &*s };
        if s.bc.load(Relaxed) == bc {
            let (m, o) = (s.mem.load(Relaxed), s.objs.load(Relaxed));
            if m >= bytes && o >= 1 {
                s.mem.store(m - bytes, Relaxed);
                s.objs.store(o - 1, Relaxed);
                return Ok(());
            }
        }
    }
    charge_object_slow(bc, bytes, severity)
}

#[cold]
#[inline(never)]
fn charge_object_slow(bc: u32, bytes: u64, severity: Severity) -> Result<(), Exceeded> {
    let reg = registry();
    let mut s = mine();
    if s == UNCLAIMED {
        s = claim();
        let _ = MINE.try_with(|m| m.set(s));
    }
    if s == DIRECT || severity != Severity::Limit {
        return charge_direct(reg, bc, bytes, 1, severity);
    }
    // SAFETY: a claimed slot, used only by this thread until it exits.
    let s = unsafe { &*s };
    if s.bc.load(Relaxed) != bc {
        drain(s);
    }
    // Refill with a batch on top of this charge; if that does not fit, charge exactly.
    if charge_direct(reg, bc, bytes + STOCK_BYTES, 1 + STOCK_OBJECTS, severity).is_ok() {
        s.mem.store(s.mem.load(Relaxed) + STOCK_BYTES, Relaxed);
        s.objs.store(s.objs.load(Relaxed) + STOCK_OBJECTS, Relaxed);
        s.bc.store(bc, Relaxed);
        return Ok(());
    }
    charge_direct(reg, bc, bytes, 1, severity)
}

fn charge_direct(
    reg: &Registry,
    bc: u32,
    bytes: u64,
    objs: u64,
    severity: Severity,
) -> Result<(), Exceeded> {
    reg.charge(bc, Resource::Memory, 0, bytes, severity)?;
    if let Err(e) = reg.charge(bc, Resource::Allocations, 1, objs, severity) {
        reg.uncharge(bc, 0, bytes);
        return Err(e);
    }
    Ok(())
}

/// Gives back what a freed object was charged: into this thread's stock if it holds that
/// beancounter, else to the beancounter directly.
#[inline]
pub(crate) fn uncharge_object(bc: u32, bytes: u64) {
    let s = mine();
    if s as usize > DIRECT as usize {
        // SAFETY: a claimed slot, used only by this thread until it exits.
        let s = unsafe { &*s };
        if s.bc.load(Relaxed) == bc {
            let (m, o) = (s.mem.load(Relaxed) + bytes, s.objs.load(Relaxed) + 1);
            s.mem.store(m, Relaxed);
            s.objs.store(o, Relaxed);
            if m > 2 * STOCK_BYTES || o > 2 * STOCK_OBJECTS {
                trim(s, bc);
            }
            return;
        }
    }
    let reg = registry();
    reg.uncharge(bc, 0, bytes);
    reg.uncharge(bc, 1, 1);
}

/// Gives back what a stock holds beyond one batch.
#[cold]
fn trim(s: &Slot, bc: u32) {
    let reg = registry();
    let (m, o) = (s.mem.load(Relaxed), s.objs.load(Relaxed));
    if m > STOCK_BYTES {
        s.mem.store(STOCK_BYTES, Relaxed);
        reg.uncharge(bc, 0, m - STOCK_BYTES);
    }
    if o > STOCK_OBJECTS {
        s.objs.store(STOCK_OBJECTS, Relaxed);
        reg.uncharge(bc, 1, o - STOCK_OBJECTS);
    }
}

/// Gives a stock back to its beancounter.
fn drain(s: &Slot) {
    let bc = s.bc.load(Relaxed);
    if bc == NONE {
        return;
    }
    let reg = registry();
    let (m, o) = (s.mem.load(Relaxed), s.objs.load(Relaxed));
    // Zero the stock before uncharging, so `stocked` never counts more than is charged.
    s.mem.store(0, Relaxed);
    s.objs.store(0, Relaxed);
    s.bc.store(NONE, Relaxed);
    reg.uncharge(bc, 0, m);
    reg.uncharge(bc, 1, o);
}

/// Drains this thread's stock (when it leaves a tenant for good, or before a check that
/// must see exact counters).
pub(crate) fn drain_current() {
    let s = mine();
    if s as usize > DIRECT as usize {
        // SAFETY: a claimed slot, used only by this thread.
        drain(unsafe { &*s });
    }
}

/// Thread exit: drains the stock, frees the slot, and makes later charges of this thread
/// direct.
pub(crate) fn thread_exit() {
    let s = mine();
    let _ = MINE.try_with(|m| m.set(DIRECT));
    if s as usize <= DIRECT as usize {
        return;
    }
    // SAFETY: a claimed slot, used only by this thread, which is giving it up.
    let slot = unsafe { &*s };
    drain(slot);
    let mut t = TABLE.lock();
    let index = (s as usize - t.slots as usize) / core::mem::size_of::<Slot>();
    slot.next_free.store(t.free, Relaxed);
    t.free = index as u32;
}

/// What stocks hold of counter `ri` for beancounter `index` (its own stocks and those of
/// its descendants, which were charged to it too).
pub(crate) fn stocked(index: u32, ri: usize) -> u64 {
    if ri > 1 {
        return 0;
    }
    let base = SLOTS_PTR.load(crate::sync::Ordering::Acquire);
    let hwm = HWM.load(crate::sync::Ordering::Acquire);
    let reg = registry();
    let mut sum = 0;
    for i in 0..hwm {
        // SAFETY: `i < hwm`: a slot of the mapped table (mapped before `hwm` grew).
        let s = unsafe { &*base.add(i) };
        let bc = s.bc.load(Relaxed);
        if bc != NONE && reg.is_self_or_descendant(bc, index) {
            sum += if ri == 0 {
                s.mem.load(Relaxed)
            } else {
                s.objs.load(Relaxed)
            };
        }
    }
    sum
}

/// Takes the stock-table lock around `fork()`.
pub(crate) fn lock_for_fork() {
    core::mem::forget(TABLE.lock());
}

/// Releases the lock taken by [`lock_for_fork`].
///
/// # Safety
/// Only after `lock_for_fork`, in the parent or the child.
pub(crate) unsafe fn unlock_after_fork() {
    // SAFETY: locked by `lock_for_fork`, guard forgotten.
    unsafe { TABLE.force_unlock() }
}
