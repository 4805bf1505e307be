//! A3: per-thread charge stocks, so that the common allocation and free touch no shared
//! cache line.
//!
//! A thread pre-charges a batch of `Memory` and `Allocations` to its exec beancounter (and
//! every ancestor) and serves later charges of that beancounter from it; frees of objects
//! owned by the stocked beancounter go back into it. The stock lives in a slot of a
//! process-wide table; `stat()` reads the slots to report true usage (`held` minus what
//! stocks hold).
//!
//! # Hard rule and slack
//! A stock is charged like any charge (checked against the bound of the charge that needed
//! it), so `held`, which includes every stock, never passes a bound a charge was checked
//! against, and true usage is at most `held`.
//!
//! A charge can be refused while true usage plus the request would fit only because other
//! threads hold stock. Two things bound that slack independently of the number of threads:
//! - **Batches shrink with headroom.** A refill takes at most
//!   `min(STOCK_BYTES, headroom / (2 × CPUs))` bytes (and the same share of `Allocations`
//!   headroom), as OpenVZ's precharge does: near a bound, stocks are small.
//! - **Reclaim before refusing.** A charge the counters refuse is retried once after
//!   every stock of the refusing beancounter (and of its descendants, whose charges it
//!   carries) has been taken back. What can still stand in the way at the retry is stock
//!   that threads running at that moment took again since: at most one batch per CPU, so at
//!   most `min(CPUs × STOCK_BYTES, headroom / 2)`.
//!
//! # Reclaiming without slowing the owner
//! The owner consumes and refills its stock with plain loads and stores: no lock, no atomic
//! read-modify-write. Another thread takes it back with an asymmetric handshake:
//!
//! ```text
//! owner (every charge/free)            reclaimer (rare: a refusal, a limit change)
//! busy = 1                             steal = 1
//! compiler fence                       membarrier(PRIVATE_EXPEDITED)  ← a full fence on
//! if steal: busy = 0, go slow          wait until busy == 0              every CPU running
//! use mem/objs                         take mem/objs, uncharge them      this process
//! busy = 0 (release)                   steal = 0
//! ```
//! The membarrier turns the owner's compiler fence into a full fence wherever the owner
//! was: either the owner's `busy = 1` is visible to the reclaimer (which waits for it to
//! clear), or the owner's next read of `steal` sees 1 (and it keeps off its stock). If the
//! kernel has no `membarrier`, threads get no stock and charge directly. Owner slow paths and
//! reclaimers also take the slot's lock, and reclaimers are serialised among themselves.
//! The loom model replaces the membarrier/compiler-fence pair by `SeqCst` fences on both
//! sides, which is the guarantee the pair gives.
//!
//! A stock is drained when its thread charges another beancounter, when the thread exits,
//! and by reclaim (refusals, limit changes).

use super::registry::Registry;
use super::types::{Exceeded, Resource, Severity};
#[cfg(not(beancounter_loom))]
use crate::sync::compiler_fence;
use crate::sync::Ordering::{Acquire, Relaxed, Release};
use crate::sync::{const_fn, fence, AtomicU32, AtomicU64, Ordering};

/// Bytes of `Memory` a stock takes at most at once: 128 KiB, half of Linux's per-CPU memcg
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
/// `Allocations` a stock takes at most at once: one per 512 bytes of `STOCK_BYTES`.
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

/// Slot index meaning "no beancounter"; also the end of the table's free list.
pub(crate) const NONE: u32 = u32::MAX;
/// `next_free` of a slot that a thread owns.
const IN_USE: u32 = u32::MAX - 1;

const MEMORY: usize = 0;
const ALLOCATIONS: usize = 1;

/// One thread's stock.
#[repr(align(64))]
pub(crate) struct StockSlot {
    /// Slot index of the stocked beancounter, or `NONE`. Changed only under `lock`.
    bc: AtomicU32,
    /// 1 while the owner uses `mem`/`objs` on its fast path.
    busy: AtomicU32,
    /// 1 while a reclaimer takes the stock.
    steal: AtomicU32,
    /// Held by the owner's slow path and by reclaimers.
    lock: AtomicU32,
    mem: AtomicU64,
    objs: AtomicU64,
    /// Uncharges owed to one other beancounter (objects of it freed by this thread), given
    /// back in batches: slot index or `NONE`, and the amounts.
    debt_bc: AtomicU32,
    debt_mem: AtomicU64,
    debt_objs: AtomicU64,
    /// Table free-list link while the slot is unused.
    pub(crate) next_free: AtomicU32,
}

/// What giving a freed object back to the stock did.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum GiveBack {
    /// The stock holds another beancounter (or is being reclaimed): uncharge directly.
    NotMine,
    /// Taken into the stock.
    Done,
    /// Taken, and the stock now holds more than two batches: trim it.
    Trim,
}

impl StockSlot {
    const_fn! {
        pub(crate) fn new() -> Self {
            StockSlot {
                bc: AtomicU32::new(NONE),
                busy: AtomicU32::new(0),
                steal: AtomicU32::new(0),
                lock: AtomicU32::new(0),
                mem: AtomicU64::new(0),
                objs: AtomicU64::new(0),
                debt_bc: AtomicU32::new(NONE),
                debt_mem: AtomicU64::new(0),
                debt_objs: AtomicU64::new(0),
                next_free: AtomicU32::new(NONE),
            }
        }
    }

    /// Runs `f` on the owner's fast path, unless a reclaimer is at work (then `None`).
    #[inline]
    fn fast<R>(&self, f: impl FnOnce() -> R) -> Option<R> {
        self.busy.store(1, Relaxed);
        owner_fence();
        // Acquire: if this reads the 0 a reclaimer stores when it is done, what it did to
        // the stock (emptied it, changed `bc`) must be visible here.
        if self.steal.load(Acquire) != 0 {
            self.busy.store(0, Release);
            return None;
        }
        let r = f();
        self.busy.store(0, Release);
        Some(r)
    }

    /// Owner: takes `bytes` and one object from the stock if it holds `bc`.
    #[inline]
    pub(crate) fn try_consume(&self, bc: u32, bytes: u64) -> bool {
        self.fast(|| {
            let (m, o) = (self.mem.load(Relaxed), self.objs.load(Relaxed));
            if self.bc.load(Relaxed) != bc || m < bytes || o == 0 {
                return false;
            }
            self.mem.store(m - bytes, Relaxed);
            self.objs.store(o - 1, Relaxed);
            true
        })
        .unwrap_or(false)
    }

    /// Owner: puts back what a freed object of `bc` was charged: into the stock if it
    /// holds `bc`, else onto the debt owed to `bc` (if the debt is owed to `bc` or to no
    /// one), so that freeing another tenant's objects (a consumer thread, a remote free)
    /// does not touch that tenant's counters each time either. Calls nothing.
    #[inline]
    pub(crate) fn try_give_back(&self, bc: u32, bytes: u64) -> GiveBack {
        self.fast(|| {
            if self.bc.load(Relaxed) != bc {
                return self.owe(bc, bytes);
            }
            let (m, o) = (self.mem.load(Relaxed) + bytes, self.objs.load(Relaxed) + 1);
            self.mem.store(m, Relaxed);
            self.objs.store(o, Relaxed);
            if m > 2 * STOCK_BYTES || o > 2 * STOCK_OBJECTS {
                GiveBack::Trim
            } else {
                GiveBack::Done
            }
        })
        .unwrap_or(GiveBack::NotMine)
    }

    /// Owner, on its fast path: adds a freed object of another beancounter to the debt, if
    /// the debt is owed to that beancounter or to no one. Inlined, like the rest of the fast
    /// path: a call here would give the allocator's free path a stack frame.
    #[inline]
    fn owe(&self, bc: u32, bytes: u64) -> GiveBack {
        let owed = self.debt_bc.load(Relaxed);
        if owed != bc && owed != NONE {
            return GiveBack::NotMine;
        }
        let (m, o) = (
            self.debt_mem.load(Relaxed) + bytes,
            self.debt_objs.load(Relaxed) + 1,
        );
        self.debt_mem.store(m, Relaxed);
        self.debt_objs.store(o, Relaxed);
        self.debt_bc.store(bc, Relaxed);
        if m > STOCK_BYTES || o > STOCK_OBJECTS {
            GiveBack::Trim
        } else {
            GiveBack::Done
        }
    }

    fn lock(&self) {
        while self
            .lock
            .compare_exchange_weak(0, 1, Acquire, Relaxed)
            .is_err()
        {
            spin();
        }
    }

    fn unlock(&self) {
        self.lock.store(0, Release);
    }

    /// The stocked beancounter and amounts (racy unless quiescent; for `stat`).
    pub(crate) fn peek(&self) -> (u32, u64, u64) {
        (
            self.bc.load(Relaxed),
            self.mem.load(Relaxed),
            self.objs.load(Relaxed),
        )
    }

    /// Owner, slow path: charges `bytes` and one object to `bc`, refilling the stock with a
    /// batch on top when `severity` is `Limit` and the headroom allows. Tentative: a
    /// refusal here is not counted, the caller decides (after reclaiming stocks).
    pub(crate) fn charge_slow(
        &self,
        reg: &Registry,
        bc: u32,
        bytes: u64,
        severity: Severity,
    ) -> Result<(), Exceeded> {
        self.lock();
        if self.bc.load(Relaxed) != bc {
            self.drain_locked(reg);
        }
        let (mem, objs) = if severity == Severity::Limit {
            batch(reg, bc)
        } else {
            (0, 0)
        };
        let result = match charge_pair_counted(reg, bc, bytes + mem, 1 + objs, severity, false) {
            Ok(()) if mem + objs > 0 => {
                // Owner under its own lock: no reclaimer is at work on this slot.
                self.mem.store(self.mem.load(Relaxed) + mem, Relaxed);
                self.objs.store(self.objs.load(Relaxed) + objs, Relaxed);
                self.bc.store(bc, Relaxed);
                Ok(())
            }
            Ok(()) => Ok(()),
            Err(_) if mem + objs > 0 => charge_pair_counted(reg, bc, bytes, 1, severity, false),
            Err(e) => Err(e),
        };
        self.unlock();
        result
    }

    /// Owner, slow path: gives back what the stock holds beyond one batch, and the debt.
    pub(crate) fn trim(&self, reg: &Registry) {
        self.lock();
        self.settle_debt(reg);
        let bc = self.bc.load(Relaxed);
        let (m, o) = (self.mem.load(Relaxed), self.objs.load(Relaxed));
        if bc != NONE {
            if m > STOCK_BYTES {
                self.mem.store(STOCK_BYTES, Relaxed);
                reg.uncharge(bc, MEMORY, m - STOCK_BYTES);
            }
            if o > STOCK_OBJECTS {
                self.objs.store(STOCK_OBJECTS, Relaxed);
                reg.uncharge(bc, ALLOCATIONS, o - STOCK_OBJECTS);
            }
        }
        self.unlock();
    }

    /// Owner: gives the whole stock back.
    pub(crate) fn drain(&self, reg: &Registry) {
        self.lock();
        self.drain_locked(reg);
        self.unlock();
    }

    /// Pays the debt: uncharges what this thread freed of the other beancounter. The caller
    /// holds the lock and no fast path is running.
    fn settle_debt(&self, reg: &Registry) {
        give_back(reg, &self.debt_bc, &self.debt_mem, &self.debt_objs);
    }

    /// The debt's beancounter and amounts (racy unless quiescent; for `stat`).
    pub(crate) fn peek_debt(&self) -> (u32, u64, u64) {
        (
            self.debt_bc.load(Relaxed),
            self.debt_mem.load(Relaxed),
            self.debt_objs.load(Relaxed),
        )
    }

    /// Gives the whole stock back, and the debt; the caller holds the lock and no fast path
    /// is running.
    fn drain_locked(&self, reg: &Registry) {
        self.settle_debt(reg);
        give_back(reg, &self.bc, &self.mem, &self.objs);
    }
}

/// Uncharges what a stock or a debt holds from its beancounter and empties it. The amounts
/// are zeroed before uncharging, so `stocked` never counts more than is charged.
fn give_back(reg: &Registry, bc: &AtomicU32, mem: &AtomicU64, objs: &AtomicU64) {
    let owner = bc.load(Relaxed);
    if owner == NONE {
        return;
    }
    let (m, o) = (mem.load(Relaxed), objs.load(Relaxed));
    mem.store(0, Relaxed);
    objs.store(0, Relaxed);
    bc.store(NONE, Relaxed);
    reg.uncharge(owner, MEMORY, m);
    reg.uncharge(owner, ALLOCATIONS, o);
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
fn charge_pair_counted(
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

/// The batch a refill for `bc` may take: at most `STOCK_BYTES`/`STOCK_OBJECTS`, and at
/// most `headroom / (2 × CPUs)` of the tightest limit on the way up.
fn batch(reg: &Registry, bc: u32) -> (u64, u64) {
    let share = 2 * cpus();
    let mem = reg.headroom(bc, MEMORY) / share;
    let objs = reg.headroom(bc, ALLOCATIONS) / share;
    (mem.min(STOCK_BYTES), objs.min(STOCK_OBJECTS))
}

/// Reclaimer: takes back every stock among `slots` that holds `target` or one of its
/// descendants. Returns how many stocks were taken. The caller serialises reclaimers.
pub(crate) fn reclaim<'a>(
    reg: &Registry,
    slots: impl Iterator<Item = &'a StockSlot> + Clone,
    target: u32,
) -> usize {
    let wanted = |s: &StockSlot| {
        [s.bc.load(Relaxed), s.debt_bc.load(Relaxed)]
            .into_iter()
            .any(|bc| bc != NONE && reg.is_self_or_descendant(bc, target))
    };
    // Lock and flag every candidate, then one fence for all of them.
    let mut flagged = 0;
    for s in slots.clone().filter(|s| wanted(s)) {
        s.lock();
        s.steal.store(1, Relaxed);
        flagged += 1;
    }
    if flagged == 0 {
        return 0;
    }
    reclaimer_fence();
    let mut taken = 0;
    for s in slots.filter(|s| s.steal.load(Relaxed) != 0) {
        while s.busy.load(Acquire) != 0 {
            spin();
        }
        // Under the slot's lock the stocked beancounter cannot change; re-check it.
        if wanted(s) {
            s.drain_locked(reg);
            taken += 1;
        }
        s.steal.store(0, Release);
        s.unlock();
    }
    taken
}

fn spin() {
    #[cfg(beancounter_loom)]
    loom::thread::yield_now();
    #[cfg(not(beancounter_loom))]
    std::thread::yield_now();
}

/// The owner's side of the asymmetric fence: a compiler fence, which the reclaimer's
/// membarrier turns into a full one. (Without membarrier there are no stocks at all: every
/// thread charges directly, see `claim`.)
#[inline]
fn owner_fence() {
    #[cfg(beancounter_loom)]
    fence(Ordering::SeqCst);
    #[cfg(not(beancounter_loom))]
    compiler_fence(Ordering::SeqCst);
}

/// The reclaimer's side: a full fence on every CPU running this process.
fn reclaimer_fence() {
    #[cfg(beancounter_loom)]
    fence(Ordering::SeqCst);
    #[cfg(not(beancounter_loom))]
    {
        fence(Ordering::SeqCst);
        membarrier::run();
    }
}

#[cfg(beancounter_loom)]
fn cpus() -> u64 {
    1
}

#[cfg(not(beancounter_loom))]
fn cpus() -> u64 {
    use crate::sync::AtomicU32 as A;
    static CPUS: A = A::new(0);
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
/// one thread. Registered on first use; where the kernel refuses, owners fence themselves.
#[cfg(not(beancounter_loom))]
mod membarrier {
    use crate::sync::{AtomicU32, Ordering::Relaxed};

    const CMD_PRIVATE_EXPEDITED: libc::c_long = 1 << 3;
    const CMD_REGISTER_PRIVATE_EXPEDITED: libc::c_long = 1 << 4;

    /// 0 = not tried, 1 = registered, 2 = unavailable.
    static STATE: AtomicU32 = AtomicU32::new(0);

    /// Whether reclaimers can fence owners; settled (by `register`) before any stock
    /// exists, and without it no stock is handed out.
    #[inline]
    pub(super) fn available() -> bool {
        STATE.load(Relaxed) == 1
    }

    /// Registers the process for expedited membarriers; called before the first stock.
    pub(super) fn register() {
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

// ---- the process's stock table and the thread's slot --------------------------------------

#[cfg(not(beancounter_loom))]
pub(crate) use table::*;

#[cfg(not(beancounter_loom))]
mod table {
    use super::{membarrier, reclaim, GiveBack, StockSlot, NONE};
    use crate::accounting::handle::registry;
    use crate::accounting::types::{Exceeded, Severity, MAX_DEPTH};
    use crate::sync::{AtomicPtr, AtomicUsize, Mutex, Ordering};
    use core::cell::Cell;
    use core::ptr;

    /// Threads that can hold a stock at once; more threads charge directly.
    const SLOTS: usize = 16 << 10;

    struct Table {
        slots: *mut StockSlot,
        /// Slots at or above `hwm` were never used.
        hwm: usize,
        free: u32,
    }

    // SAFETY: the pointer is to the table's own mapping; the table is reached through a
    // lock.
    unsafe impl Send for Table {}

    static TABLE: Mutex<Table> = Mutex::new(Table {
        slots: ptr::null_mut(),
        hwm: 0,
        free: NONE,
    });
    /// `Table::slots` and `hwm`, readable without the lock by `stocked` and reclaimers.
    static SLOTS_PTR: AtomicPtr<StockSlot> = AtomicPtr::new(ptr::null_mut());
    static HWM: AtomicUsize = AtomicUsize::new(0);
    /// Serialises reclaimers (each locks many slots).
    static RECLAIM: Mutex<()> = Mutex::new(());

    /// Not claimed yet.
    const UNCLAIMED: *const StockSlot = ptr::null();
    /// No stock for this thread (table full, or the thread is exiting): charge directly.
    const DIRECT: *const StockSlot = ptr::dangling();

    thread_local! {
        static MINE: Cell<*const StockSlot> = const { Cell::new(UNCLAIMED) };
    }

    /// This thread's slot, if it has one.
    #[inline]
    fn mine() -> Option<&'static StockSlot> {
        let s = MINE.try_with(|m| m.get()).unwrap_or(DIRECT);
        if s == UNCLAIMED || s == DIRECT {
            return None;
        }
        // SAFETY: a claimed slot of the table, which is never unmapped, used by this thread
        // as owner until it exits.
        Some(unsafe { &*s })
    }

    fn all_slots() -> impl Iterator<Item = &'static StockSlot> + Clone {
        let base = SLOTS_PTR.load(Ordering::Acquire);
        let hwm = HWM.load(Ordering::Acquire);
        // SAFETY: `i < hwm`: a slot of the mapped table, initialised before `hwm` grew past
        // it (Release store in `claim`, Acquire load above).
        (0..hwm).map(move |i| unsafe { &*base.add(i) })
    }

    fn claim() -> *const StockSlot {
        membarrier::register();
        if !membarrier::available() {
            // Reclaimers could not fence owners: no stocks, every charge goes direct.
            return DIRECT;
        }
        let mut t = TABLE.lock();
        if t.slots.is_null() {
            match crate::os::map(SLOTS * core::mem::size_of::<StockSlot>()) {
                Some(p) => {
                    t.slots = p.as_ptr().cast();
                    SLOTS_PTR.store(t.slots, Ordering::Release);
                }
                None => return DIRECT,
            }
        }
        let index = if t.free != NONE {
            let i = t.free as usize;
            // SAFETY: free-list entries are below `hwm`, inside the table.
            t.free = unsafe { (*t.slots.add(i)).next_free.load(Ordering::Relaxed) };
            i
        } else if t.hwm < SLOTS {
            // SAFETY: `hwm < SLOTS`: inside the mapping; nobody reads it before `hwm` grows.
            unsafe { t.slots.add(t.hwm).write(StockSlot::new()) };
            t.hwm += 1;
            HWM.store(t.hwm, Ordering::Release);
            t.hwm - 1
        } else {
            return DIRECT;
        };
        // SAFETY: `index < hwm`, a slot nobody owns; this thread takes it.
        let slot = unsafe { &*t.slots.add(index) };
        slot.next_free.store(super::IN_USE, Ordering::Relaxed);
        slot
    }

    /// Charges `bytes` of `Memory` and one of `Allocations` to slot `bc` for a new object,
    /// from this thread's stock, or returns false (then call [`charge_object_slow`]). Calls
    /// nothing, so that the allocator's fast path needs no stack frame.
    #[inline]
    pub(crate) fn try_charge_object(bc: u32, bytes: u64, severity: Severity) -> bool {
        severity == Severity::Limit && mine().is_some_and(|s| s.try_consume(bc, bytes))
    }

    /// Charges a new object when [`try_charge_object`] could not: refills the stock, or
    /// charges directly; a refusal is counted.
    #[cold]
    #[inline(never)]
    pub(crate) fn charge_object_slow(
        bc: u32,
        bytes: u64,
        severity: Severity,
    ) -> Result<(), Exceeded> {
        let reg = registry();
        if MINE.try_with(|m| m.get()).unwrap_or(DIRECT) == UNCLAIMED {
            let s = claim();
            let _ = MINE.try_with(|m| m.set(s));
        }
        let first = match mine() {
            Some(s) => s.charge_slow(reg, bc, bytes, severity),
            None => super::charge_pair_counted(reg, bc, bytes, 1, severity, false),
        };
        first.or_else(|e| reclaim_and_retry(e, bc, bytes, 1, severity))
    }

    /// Charges a block directly (no stock): `mem` bytes and `objs` objects.
    pub(crate) fn charge_block(
        bc: u32,
        mem: u64,
        objs: u64,
        severity: Severity,
    ) -> Result<(), Exceeded> {
        super::charge_pair_counted(registry(), bc, mem, objs, severity, false)
            .or_else(|e| reclaim_and_retry(e, bc, mem, objs, severity))
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
                match super::charge_pair_counted(reg, bc, mem, objs, severity, false) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.id == refused => break,
                    Err(e) => refused = e.id,
                }
            }
        }
        super::charge_pair(reg, bc, mem, objs, severity)
    }

    /// Takes back every stock held for `target` or its descendants, this thread's included.
    pub(crate) fn reclaim_all(target: u32) -> usize {
        let _one_at_a_time = RECLAIM.lock();
        reclaim(registry(), all_slots(), target)
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

    /// The fast path of [`uncharge_object`]: puts the charge into this thread's stock (or
    /// its debt). Anything but `Done` must be passed to [`uncharge_object_slow`]. Calls
    /// nothing.
    #[inline]
    pub(crate) fn try_uncharge_object(bc: u32, bytes: u64) -> GiveBack {
        match mine() {
            Some(s) => s.try_give_back(bc, bytes),
            None => GiveBack::NotMine,
        }
    }

    /// Finishes [`try_uncharge_object`]: trims the stock it overfilled, or uncharges
    /// directly what it could not take.
    #[cold]
    #[inline(never)]
    pub(crate) fn uncharge_object_slow(outcome: GiveBack, bc: u32, bytes: u64) {
        match (outcome, mine()) {
            (GiveBack::Done, _) => {}
            (GiveBack::Trim, Some(s)) => s.trim(registry()),
            _ => super::charge_pair_undo(registry(), bc, bytes),
        }
    }

    /// Drains this thread's stock.
    pub(crate) fn drain_current() {
        if let Some(s) = mine() {
            s.drain(registry());
        }
    }

    /// Thread exit: drains the stock, frees the slot, and makes later charges of this
    /// thread direct.
    pub(crate) fn thread_exit() {
        let s = mine();
        let _ = MINE.try_with(|m| m.set(DIRECT));
        let Some(slot) = s else { return };
        slot.drain(registry());
        let mut t = TABLE.lock();
        let index = (slot as *const StockSlot as usize - t.slots as usize)
            / core::mem::size_of::<StockSlot>();
        slot.next_free.store(t.free, Ordering::Relaxed);
        t.free = index as u32;
    }

    /// What stocks and debts hold of counter `ri` for beancounter `index` (its own and those
    /// of its descendants, which were charged to it too): charged, but not in use.
    pub(crate) fn stocked(index: u32, ri: usize) -> u64 {
        if ri > 1 {
            return 0;
        }
        let reg = registry();
        all_slots()
            .flat_map(|s| [s.peek(), s.peek_debt()])
            .filter(|&(bc, _, _)| bc != NONE && reg.is_self_or_descendant(bc, index))
            .map(|(_, m, o)| if ri == 0 { m } else { o })
            .sum()
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
        super::reclaimer_fence();
        for s in all_slots() {
            while s.busy.load(Ordering::Acquire) != 0 {
                super::spin();
            }
        }
    }

    /// Releases what [`lock_for_fork`] took. In the child, the stocks of threads that do
    /// not exist there are given back to their beancounters and their slots freed.
    ///
    /// # Safety
    /// Only after `lock_for_fork`, in the parent (`child == false`) or the child.
    pub(crate) unsafe fn unlock_after_fork(child: bool) {
        let me = MINE.try_with(|m| m.get()).unwrap_or(DIRECT);
        // SAFETY: `lock_for_fork` took the table lock; its guard was forgotten, and in the
        // child this is the only thread, so nothing else can touch the table.
        let t = unsafe { &mut *TABLE.data_ptr() };
        for (i, s) in all_slots().enumerate() {
            if child
                && !core::ptr::eq(s, me)
                && s.next_free.load(Ordering::Relaxed) == super::IN_USE
            {
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
}

/// Uncharges what one object was charged, directly.
pub(crate) fn charge_pair_undo(reg: &Registry, bc: u32, bytes: u64) {
    reg.uncharge(bc, MEMORY, bytes);
    reg.uncharge(bc, ALLOCATIONS, 1);
}
