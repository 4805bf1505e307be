//! A1: the beancounter table. Ids to indices, records and slots, lifetime and retirement,
//! the root, and the hierarchical charge walk.
//!
//! # Index, record, slot
//! A beancounter is named by a `u32` *index*: it is the owner tag the allocator stores with
//! every object, and what stocks, thread contexts and handles hold. An index names a
//! *record* (64 bytes: reference count, id, parent, and state); a live beancounter's record
//! points to a *slot* that holds its counters. `table.rs` has the storage: records in
//! chunks mapped as they are needed, `BEANCOUNTER_CAPACITY` slots (default
//! [`DEFAULT_CAPACITY`]) in one mapping, and an open-addressing map from ids to indices, all
//! straight from the OS, never through the global allocator. Fresh pages are zero, and a
//! zeroed slot is a valid free slot, so only the slots ever used are touched. The root lives
//! in the registry itself (index 0), so it works before and without the tables.
//!
//! # Lifetime (`lifetime.rs`)
//! `state` packs `generation << 32 | LIVE | RETIRED | refs`. `refs` counts handles, thread
//! contexts, RAII charges and children. When `refs` falls to zero the releasing thread takes
//! the lock and frees the record only if `state` still is exactly `(its generation, LIVE,
//! 0)` and nothing is held. A lookup may resurrect a zero-ref record, but only under the
//! lock, so the release either sees the new reference or had already unmapped the id.
//! Freeing bumps the generation, so a release that lost the race to a free and a
//! re-creation compares unequal and leaves the new tenant alone. A record whose refs reached
//! zero while something is still charged stays (a *zombie*: `find_or_create` of its id
//! revives it) and is freed by [`Registry::reap`] once everything is uncharged.
//!
//! # Hazards (`hazard.rs`)
//! A thread inside a guard keeps its tenant alive without a reference: the guard publishes
//! the index in the thread's hazard slot, and a free that finds a hazard on its record
//! leaves it for the hazard's thread to finish when it leaves.
//!
//! # Retirement (`lifetime.rs`, `walk.rs`)
//! [`Registry::retire`] takes a beancounter out of the id map at once (its id can be created
//! again, fresh, right away) and gives its slot back; its record stays, marked RETIRED, for
//! what is still charged through it: objects that outlive the tenant, stocks, and anything
//! charged later through handles and threads that still name it. A retired record has no
//! counters of its own: the charge and uncharge walks pass through it to its parent (so the
//! ancestors' `held` is unchanged by the retirement and exact afterwards) and keep `left`,
//! what is still charged through it. When `left` and `refs` are both zero the record is
//! freed. Retired records use no slot, so a million short-lived tenants that each leave a
//! block behind never fill the table; each costs one 64-byte record until its blocks go.
//!
//! Invariants (checked by [`Registry::check_invariants`]):
//! - a record is LIVE and not RETIRED iff its id maps to it, and then it has a slot, whose
//!   `record` names it back; ids map to at most one record;
//! - a free record has no refs and no slot; a free slot holds nothing; free records and
//!   slots are on their free lists or past their high-water marks;
//! - every child record (live or retired) holds one reference on its parent, and the
//!   parent's `children` counts them;
//! - at rest, for every resource, `parent.held >= Σ live children's held`.

mod hazard;
mod lifetime;
mod table;
mod walk;

use hazard::Hazards;
#[cfg(not(beancounter_loom))]
pub(crate) use hazard::HAZARD_DEPTH;
#[cfg(all(test, not(beancounter_loom)))]
pub(crate) use hazard::HAZARD_THREADS;

use super::beancounter::ResourceCounter;
use super::types::{BcError, BcId, Limits, Resource, ResourceStat};
use super::types::{MAX_CUSTOM_RESOURCES, NUM_RESOURCES};
use crate::sync::{const_fn, AtomicPtr, AtomicU32, Mutex, Ordering};
use table::{refs, IdMap, Record, Records, Slot, LIVE, NO_PARENT, NO_SLOT, RETIRED};

/// Index of the root beancounter.
pub(crate) const ROOT: u32 = 0;

/// The process's beancounter table.
#[cfg(not(beancounter_loom))]
static REGISTRY: Registry = Registry::new(0);

/// The process's beancounter table.
#[cfg(not(beancounter_loom))]
#[inline]
pub(crate) fn registry() -> &'static Registry {
    &REGISTRY
}

/// Default number of beancounter slots, root included: how many beancounters can be alive
/// at once. Set `BEANCOUNTER_CAPACITY` in the environment to change it (read once, when the
/// first tenant is created). Retired beancounters do not count.
///
/// 65 536 slots of 2 496 bytes reserve 156 MiB of address space; only used slots are
/// touched, so a process with 100 tenants keeps about 250 KiB resident for the table.
///
/// # Examples
/// ```
/// std::env::remove_var("BEANCOUNTER_CAPACITY");
/// let _t = beancounter::find_or_create(beancounter::BcId(140)).unwrap();
/// assert_eq!(beancounter::capacity(), beancounter::DEFAULT_CAPACITY);
/// ```
pub const DEFAULT_CAPACITY: u32 = 65_536;

/// Largest accepted capacity (2^24 slots of 2 496 bytes: about 39 GiB of address space, plus
/// 256 MiB for the id map; only used slots are touched).
///
/// # Examples
/// ```
/// use beancounter::{DEFAULT_CAPACITY, MAX_CAPACITY};
/// // A larger setting is ignored: the table gets the default.
/// std::env::set_var("BEANCOUNTER_CAPACITY", (MAX_CAPACITY + 1).to_string());
/// let _t = beancounter::find_or_create(beancounter::BcId(141)).unwrap();
/// assert_eq!(beancounter::capacity(), DEFAULT_CAPACITY);
/// ```
pub const MAX_CAPACITY: u32 = 1 << 24;

/// Slots, record free list, ids and custom names: changed only under the registry lock.
struct Inner {
    ids: IdMap,
    /// Slots, root included; 0 until `BEANCOUNTER_CAPACITY` is read.
    capacity: u32,
    /// Slots at or above `slot_hwm` have never been used; free slots are linked through
    /// `Slot::record` from `slot_free` (0 = none; slot 0 is the root's).
    slot_hwm: u32,
    slot_free: u32,
    /// Records at or above `record_hwm` have never been used; free records are linked
    /// through `Record::link` from `record_free` (0 = none; record 0 is the root's).
    record_hwm: u32,
    record_free: u32,
    /// Live (not retired) beancounters besides the root.
    live: u32,
    /// Retired records still held (by charges or references).
    retired: u32,
    custom_names: [&'static str; MAX_CUSTOM_RESOURCES],
    defaults: [Limits; NUM_RESOURCES],
}

/// The beancounter table. One global instance serves the crate; the loom models build small
/// ones.
pub(crate) struct Registry {
    root: Record,
    root_slot: Slot,
    records: Records,
    /// What guards publish instead of taking references (see `hazard.rs`).
    hazards: Hazards,
    /// The slot table, readable without the lock for the charge path.
    slots: AtomicPtr<Slot>,
    /// Number of custom resources registered (they are numbered densely).
    customs: AtomicU32,
    inner: Mutex<Inner>,
}

impl Registry {
    const_fn! {
        /// A registry holding only the root; its slot table of `capacity` slots (root
        /// included; 0 = `BEANCOUNTER_CAPACITY` or [`DEFAULT_CAPACITY`]) is mapped on first
        /// use.
        pub(crate) fn new(capacity: u32) -> Self {
            Registry {
                root: Record::root(),
                root_slot: Slot::root(),
                records: Records::new(),
                hazards: Hazards::new(),
                slots: AtomicPtr::new(core::ptr::null_mut()),
                customs: AtomicU32::new(0),
                inner: Mutex::new(Inner {
                    ids: IdMap::new(),
                    capacity,
                    slot_hwm: 1,
                    slot_free: 0,
                    record_hwm: 1,
                    record_free: 0,
                    live: 0,
                    retired: 0,
                    custom_names: [""; MAX_CUSTOM_RESOURCES],
                    defaults: [Limits::UNLIMITED; NUM_RESOURCES],
                }),
            }
        }
    }

    /// The record at `index`.
    #[inline]
    fn record(&self, index: u32) -> &Record {
        if index == ROOT {
            &self.root
        } else {
            self.records.get(index)
        }
    }

    /// Slot `slot` of the slot table.
    #[inline]
    fn slot_at(&self, slot: u32) -> &Slot {
        if slot == 0 {
            return &self.root_slot;
        }
        let base = self.slots.load(Ordering::Acquire);
        debug_assert!(!base.is_null());
        // SAFETY: slot numbers are handed out only by `find_or_create`, after the table was
        // mapped (this Acquire load pairs with the Release store in `ensure_tables`), and
        // are below the capacity; the table is never unmapped while the registry lives.
        unsafe { &*base.add(slot as usize) }
    }

    /// Maps the slot table and the id map on first use.
    fn ensure_tables(&self, inner: &mut Inner) -> Result<(), BcError> {
        if inner.ids.is_mapped() {
            return Ok(());
        }
        if inner.capacity == 0 {
            inner.capacity = configured_capacity();
        }
        let slots =
            table::storage::map_slots(inner.capacity as usize).ok_or(BcError::OutOfMemory)?;
        if !inner
            .ids
            .map((inner.capacity as usize * 2).next_power_of_two())
        {
            return Err(BcError::OutOfMemory);
        }
        self.slots.store(slots, Ordering::Release);
        Ok(())
    }

    // ---- resources ----------------------------------------------------------------------

    /// The counter index of `r` if it is built in or registered.
    #[inline]
    pub(crate) fn resource_index(&self, r: Resource) -> Result<usize, BcError> {
        match (r, r.index()) {
            (Resource::Custom(n), Some(i)) if (n as u32) < self.customs.load(Ordering::Acquire) => {
                Ok(i)
            }
            (Resource::Custom(_), _) => Err(BcError::UnknownResource(r)),
            (_, Some(i)) => Ok(i),
            (_, None) => Err(BcError::UnknownResource(r)),
        }
    }

    /// Names a new custom resource, or returns the one already named so.
    pub(crate) fn register_resource(&self, name: &'static str) -> Result<Resource, BcError> {
        if name.is_empty() || name.len() > 32 || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(BcError::InvalidName(name));
        }
        let mut inner = self.inner.lock();
        let count = self.customs.load(Ordering::Relaxed) as usize;
        if let Some(n) = inner.custom_names[..count].iter().position(|&n| n == name) {
            return Ok(Resource::Custom(n as u8));
        }
        if count == MAX_CUSTOM_RESOURCES {
            return Err(BcError::TooManyResources);
        }
        inner.custom_names[count] = name;
        self.customs.store(count as u32 + 1, Ordering::Release);
        Ok(Resource::Custom(count as u8))
    }

    /// The name of a built-in or registered resource.
    pub(crate) fn resource_name(&self, r: Resource) -> Option<&'static str> {
        match r {
            Resource::Memory => Some("memory"),
            Resource::Allocations => Some("allocations"),
            Resource::Threads => Some("threads"),
            Resource::Custom(n) => {
                let inner = self.inner.lock();
                let count = self.customs.load(Ordering::Relaxed) as usize;
                inner.custom_names[..count].get(n as usize).copied()
            }
        }
    }

    /// Counters in use: the built-in resources and the registered custom ones.
    pub(crate) fn resource_count(&self) -> usize {
        3 + self.customs.load(Ordering::Acquire) as usize
    }

    // ---- reading and setting ------------------------------------------------------------

    pub(crate) fn id_of(&self, index: u32) -> BcId {
        BcId(self.record(index).id.load(Ordering::Relaxed))
    }

    /// The parent's index, without taking a reference.
    pub(crate) fn parent_of(&self, index: u32) -> Option<u32> {
        let link = self.record(index).link.load(Ordering::Relaxed);
        (link != NO_PARENT).then_some(link)
    }

    /// Is `index` retired?
    pub(crate) fn is_retired(&self, index: u32) -> bool {
        self.record(index).state.load(Ordering::Acquire) & RETIRED != 0
    }

    /// Runs `f` on counter `ri` of `index` if it is live (not retired); `None` otherwise.
    pub(crate) fn with_counter<R>(
        &self,
        index: u32,
        ri: usize,
        f: impl FnOnce(&ResourceCounter) -> R,
    ) -> Option<R> {
        self.with_slot(index, |slot| f(&slot.counters[ri]))
    }

    /// The counters of `index`, all zero once it is retired.
    pub(crate) fn stat(&self, index: u32, ri: usize) -> ResourceStat {
        self.with_counter(index, ri, ResourceCounter::stat)
            .unwrap_or_default()
    }

    /// Sets both bounds together (under the lock, so two setters cannot interleave into a
    /// barrier above the limit, and a retirement cannot take the slot meanwhile).
    ///
    /// # Errors
    /// [`BcError::InvalidLimits`]; [`BcError::Retired`] for a retired beancounter.
    pub(crate) fn set_limits(&self, index: u32, ri: usize, l: Limits) -> Result<(), BcError> {
        l.validate()?;
        let _inner = self.inner.lock();
        self.with_counter(index, ri, |c| c.set_limits(l.barrier, l.limit))
            .ok_or(BcError::Retired(self.id_of(index)))
    }

    /// Sets the limits new beancounters start with.
    pub(crate) fn set_default_limits(&self, ri: usize, l: Limits) -> Result<(), BcError> {
        l.validate()?;
        self.inner.lock().defaults[ri] = l;
        Ok(())
    }

    pub(crate) fn default_limits(&self, ri: usize) -> Limits {
        self.inner.lock().defaults[ri]
    }

    /// Takes the registry lock around `fork()`.
    #[cfg(not(beancounter_loom))]
    pub(crate) fn lock_for_fork(&self) {
        core::mem::forget(self.inner.lock());
    }

    /// Releases the lock taken by [`lock_for_fork`](Self::lock_for_fork).
    ///
    /// # Safety
    /// Only after `lock_for_fork`, in the parent or the child.
    #[cfg(not(beancounter_loom))]
    pub(crate) unsafe fn unlock_after_fork(&self) {
        // SAFETY: locked by `lock_for_fork`, guard forgotten.
        unsafe { self.inner.force_unlock() }
    }

    /// Live (not retired) beancounters besides the root.
    pub(crate) fn live(&self) -> u32 {
        self.inner.lock().live
    }

    /// Retired beancounters whose records are still held by charges or references.
    pub(crate) fn retired(&self) -> u32 {
        self.inner.lock().retired
    }

    /// Slots in the table, root included (0 before the table is mapped).
    pub(crate) fn capacity(&self) -> u32 {
        let inner = self.inner.lock();
        if inner.ids.is_mapped() {
            inner.capacity
        } else {
            0
        }
    }

    #[cfg(beancounter_loom)]
    pub(crate) fn generation_of(&self, index: u32) -> u32 {
        table::generation(self.record(index).state.load(Ordering::Acquire))
    }

    /// Checks the registry's invariants; meaningful when no charge or release is in flight.
    pub(crate) fn check_invariants(&self) -> Result<(), &'static str> {
        let inner = self.inner.lock();
        let (mut live, mut retired) = (0, 0);
        for index in 1..inner.record_hwm {
            let rec = self.record(index);
            let state = rec.state.load(Ordering::Acquire);
            let slot = rec.slot.load(Ordering::Relaxed);
            if state & LIVE == 0 {
                if refs(state) != 0 || slot != NO_SLOT {
                    return Err("a free record has references or a slot");
                }
                continue;
            }
            let children = (1..inner.record_hwm)
                .filter(|&c| {
                    let r = self.record(c);
                    r.state.load(Ordering::Acquire) & LIVE != 0
                        && r.link.load(Ordering::Relaxed) == index
                })
                .count() as u64;
            if refs(state) < children {
                return Err("a parent has fewer references than child records");
            }
            if rec.children.load(Ordering::Relaxed) as u64 != children {
                return Err("a parent's child count differs from its child records");
            }
            if state & RETIRED != 0 {
                retired += 1;
                if slot != NO_SLOT {
                    return Err("a retired record has a slot");
                }
                if rec.left.load(Ordering::Relaxed) < 0 {
                    return Err("a retired record gave back more than it had");
                }
                continue;
            }
            live += 1;
            if inner.ids.find(rec.id.load(Ordering::Relaxed)) != Some(index) {
                return Err("a live record is not what its id maps to");
            }
            if slot == NO_SLOT || self.slot_at(slot).record.load(Ordering::Relaxed) != index {
                return Err("a live record's slot does not name it back");
            }
            let s = self.slot_at(slot);
            for ri in 0..NUM_RESOURCES {
                s.counters[ri].check_invariants()?;
                let below: u64 = (1..inner.record_hwm)
                    .map(|c| self.record(c))
                    .filter(|r| {
                        r.state.load(Ordering::Acquire) & (LIVE | RETIRED) == LIVE
                            && r.link.load(Ordering::Relaxed) == index
                    })
                    .map(|r| self.slot_at(r.slot.load(Ordering::Relaxed)).counters[ri].held())
                    .sum();
                if below > s.counters[ri].held() {
                    return Err("children hold more than their parent");
                }
            }
        }
        if live != inner.live || retired != inner.retired {
            return Err("live or retired count differs from the records");
        }
        let mut free = 0;
        let mut at = inner.record_free;
        while at != 0 {
            if self.record(at).state.load(Ordering::Acquire) & LIVE != 0 {
                return Err("a live record is on the free list");
            }
            free += 1;
            at = self.record(at).link.load(Ordering::Relaxed);
            if free > inner.record_hwm {
                return Err("the record free list has a cycle");
            }
        }
        if free + live + retired + 1 != inner.record_hwm {
            return Err("records are neither live, retired nor free");
        }
        let mut free_slots = 0;
        let mut at = inner.slot_free;
        while at != 0 {
            if !self.slot_at(at).nothing_held() {
                return Err("a free slot holds charges");
            }
            free_slots += 1;
            at = self.slot_at(at).record.load(Ordering::Relaxed);
            if free_slots > inner.slot_hwm {
                return Err("the slot free list has a cycle");
            }
        }
        if free_slots + live + 1 != inner.slot_hwm {
            return Err("slots are neither in use nor free");
        }
        Ok(())
    }
}

/// Reads `BEANCOUNTER_CAPACITY` without allocating; falls back to the default when it is
/// unset or not a number in `2..=MAX_CAPACITY`.
#[cfg(not(beancounter_loom))]
fn configured_capacity() -> u32 {
    // SAFETY: the name is a NUL-terminated literal; getenv returns null or a NUL-terminated
    // string that stays valid while the environment is not modified, and is only read here.
    let value = unsafe { libc::getenv(c"BEANCOUNTER_CAPACITY".as_ptr()) };
    if value.is_null() {
        return DEFAULT_CAPACITY;
    }
    // SAFETY: non-null getenv results are NUL-terminated C strings.
    let bytes = unsafe { core::ffi::CStr::from_ptr(value) }.to_bytes();
    parse_capacity(bytes).unwrap_or(DEFAULT_CAPACITY)
}

#[cfg(beancounter_loom)]
fn configured_capacity() -> u32 {
    4
}

/// Parses a decimal capacity in `2..=MAX_CAPACITY`.
pub(crate) fn parse_capacity(bytes: &[u8]) -> Option<u32> {
    if bytes.is_empty() || bytes.len() > 9 || !bytes.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = bytes.iter().fold(0u32, |n, &b| n * 10 + (b - b'0') as u32);
    (2..=MAX_CAPACITY).contains(&n).then_some(n)
}

#[cfg(beancounter_loom)]
impl Drop for Registry {
    fn drop(&mut self) {
        let inner = self.inner.get_mut();
        let slots = self.slots.load(Ordering::Relaxed);
        if !slots.is_null() {
            table::storage::unmap_slots(slots, inner.capacity as usize);
        }
        inner.ids.unmap();
        self.records.unmap();
    }
}

#[cfg(all(test, not(beancounter_loom)))]
mod tests;
