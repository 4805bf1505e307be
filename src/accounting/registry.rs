//! A1: the beancounter table. Ids to slots, slot lifetime, generations, the root, and the
//! hierarchical charge walk.
//!
//! # Storage
//! The table is one anonymous mapping of `capacity` slots (`BEANCOUNTER_CAPACITY`, default
//! [`DEFAULT_CAPACITY`]) plus an open-addressing id map, mapped on the first creation of a
//! tenant and never through the global allocator. Fresh OS pages are zero, and a zeroed slot
//! is a valid free slot, so only the slots ever used are touched. The root lives in the
//! registry itself (slot index 0), so it works before and without the table.
//!
//! # Slot index
//! A beancounter is addressed by its `u32` slot index. This is the owner tag the allocator
//! stores per object; it stays valid while the object is charged, because a slot with any
//! `held` is never freed (see below).
//!
//! # Lifetime
//! `state` packs `generation << 32 | LIVE | refs`. `refs` counts handles, thread contexts,
//! RAII charges and children. When `refs` falls to zero the releasing thread takes the lock
//! and frees the slot only if `state` still is exactly `(its generation, LIVE, 0)` and
//! nothing is held. A lookup may resurrect a zero-ref slot, but only under the lock, so
//! the release either sees the new reference or had already unmapped the id. Freeing bumps
//! the generation, so a release that lost the race to a free and a re-creation of the slot
//! compares unequal and leaves the new tenant alone. A slot whose refs reached zero while
//! something is still charged stays mapped (a *zombie*: `find_or_create` of its id revives
//! it) and is freed by [`Registry::reap`] once everything is uncharged.
//!
//! Invariants (checked by [`Registry::check_invariants`]):
//! - a slot is LIVE iff its id maps to it; ids map to at most one slot;
//! - a free slot has no refs and nothing held; a free slot is on the free list or past `hwm`;
//! - every LIVE child holds one reference on its parent;
//! - at rest, for every resource, `parent.held >= Σ children.held`.

use super::beancounter::ResourceCounter;
use super::types::{BcError, BcId, Exceeded, Limits, Resource, ResourceStat, Severity};
use super::types::{MAX, MAX_CUSTOM_RESOURCES, MAX_DEPTH, NUM_RESOURCES};
use crate::sync::{const_fn, fence, AtomicPtr, AtomicU32, AtomicU64, Mutex, Ordering};

/// Slot index of the root beancounter.
pub(crate) const ROOT: u32 = 0;

/// Default number of beancounter slots, root included. Set `BEANCOUNTER_CAPACITY` in the
/// environment to change it (read once, when the first tenant is created).
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

const NO_PARENT: u32 = u32::MAX;
const LIVE: u64 = 1 << 31;
const REFS: u64 = LIVE - 1;

#[inline]
const fn refs(state: u64) -> u64 {
    state & REFS
}
#[inline]
const fn generation(state: u64) -> u32 {
    (state >> 32) as u32
}
#[inline]
const fn pack(generation: u32, live: bool, refs: u64) -> u64 {
    (generation as u64) << 32 | (live as u64) << 31 | refs
}

/// One beancounter: lifetime word, identity, and one counter per resource.
#[repr(C, align(64))]
pub(crate) struct Slot {
    /// `generation << 32 | LIVE | refs`.
    state: AtomicU64,
    /// The host's id; meaningful while LIVE.
    id: AtomicU32,
    /// Parent slot index, `NO_PARENT` for top level; the next free slot while free.
    link: AtomicU32,
    /// Live children (zombies included); changed under the registry lock.
    children: AtomicU32,
    counters: [ResourceCounter; NUM_RESOURCES],
}

/// One counter per resource, all with the constant bound `$b`.
#[cfg(not(beancounter_loom))]
macro_rules! counters {
    ($b:expr) => {
        [const { ResourceCounter::new($b, $b) }; NUM_RESOURCES]
    };
}
#[cfg(beancounter_loom)]
macro_rules! counters {
    ($b:expr) => {
        core::array::from_fn(|_| ResourceCounter::new($b, $b))
    };
}

impl Slot {
    const_fn! {
        /// The root: LIVE, one reference that is never released, unlimited.
        fn root() -> Self {
            Slot {
                state: AtomicU64::new(pack(0, true, 1)),
                id: AtomicU32::new(0),
                link: AtomicU32::new(NO_PARENT),
                children: AtomicU32::new(0),
                counters: counters!(MAX),
            }
        }
    }

    /// A free slot of generation 0: the value zeroed memory holds.
    #[cfg(beancounter_loom)]
    fn free() -> Self {
        Slot {
            state: AtomicU64::new(0),
            id: AtomicU32::new(0),
            link: AtomicU32::new(0),
            children: AtomicU32::new(0),
            counters: counters!(0),
        }
    }

    fn nothing_held(&self) -> bool {
        self.counters.iter().all(|c| c.held() == 0)
    }
}

/// Ids and custom names, changed only under the registry lock.
struct Inner {
    /// Slots `1..capacity`; index 0 is never used here (the root lives in `Registry`).
    slots: *mut Slot,
    /// Open addressing, linear probing: `id << 32 | index`, 0 = empty (index is never 0).
    map: *mut u64,
    map_mask: usize,
    capacity: u32,
    /// Slots at or above `hwm` have never been used (still zero).
    hwm: u32,
    /// Head of the free list through `Slot::link`; 0 = empty.
    free_head: u32,
    /// Live beancounters besides the root.
    live: u32,
    custom_names: [&'static str; MAX_CUSTOM_RESOURCES],
    defaults: [Limits; NUM_RESOURCES],
}

// SAFETY: the raw pointers point into the registry's own mapping, which lives as long as the
// registry, and `Inner` is only reached through the registry's mutex.
unsafe impl Send for Inner {}

/// The beancounter table. One global instance serves the crate; the loom models build small
/// ones.
pub(crate) struct Registry {
    root: Slot,
    /// Same as `Inner::slots`, readable without the lock for the charge path.
    slots: AtomicPtr<Slot>,
    /// Number of custom resources registered (they are numbered densely).
    customs: AtomicU32,
    inner: Mutex<Inner>,
}

impl Registry {
    const_fn! {
        /// A registry holding only the root; its table of `capacity` slots (root included;
        /// 0 = `BEANCOUNTER_CAPACITY` or [`DEFAULT_CAPACITY`]) is mapped on first use.
        pub(crate) fn new(capacity: u32) -> Self {
            Registry {
                root: Slot::root(),
                slots: AtomicPtr::new(core::ptr::null_mut()),
                customs: AtomicU32::new(0),
                inner: Mutex::new(Inner {
                    slots: core::ptr::null_mut(),
                    map: core::ptr::null_mut(),
                    map_mask: 0,
                    capacity,
                    hwm: 1,
                    free_head: 0,
                    live: 0,
                    custom_names: [""; MAX_CUSTOM_RESOURCES],
                    defaults: [Limits::UNLIMITED; NUM_RESOURCES],
                }),
            }
        }
    }

    /// The slot at `index`.
    #[inline]
    pub(crate) fn slot(&self, index: u32) -> &Slot {
        if index == ROOT {
            return &self.root;
        }
        let base = self.slots.load(Ordering::Acquire);
        debug_assert!(!base.is_null());
        // SAFETY: non-root indices are handed out only by `find_or_create`, after the table
        // was mapped (this Acquire load pairs with the Release store in `ensure_table`), and
        // are below the capacity; the table is never unmapped while the registry lives.
        unsafe { &*base.add(index as usize) }
    }

    // ---- lifetime -----------------------------------------------------------------------

    /// Returns the slot of `id` with one reference taken, creating it if it does not exist:
    /// with `parent == None` as a top-level beancounter, and then an existing id is
    /// returned whatever its parent; with `Some(p)` as a child of `p` (referenced by the
    /// caller), and an existing id must already be `p`'s child. The root's children are the
    /// top-level beancounters: the root is the host's own context, not an ancestor that is
    /// charged.
    pub(crate) fn find_or_create(&self, id: BcId, parent: Option<u32>) -> Result<u32, BcError> {
        if id == BcId::ROOT {
            return if parent.is_none() {
                Ok(ROOT)
            } else {
                Err(BcError::InvalidId(id))
            };
        }
        // The link a new slot gets, and the one an existing slot must have (if any).
        let link = match parent {
            None | Some(ROOT) => NO_PARENT,
            Some(p) => p,
        };
        let mut inner = self.inner.lock();
        self.ensure_table(&mut inner)?;
        if let Some(index) = inner.find(id.0) {
            let slot = self.slot(index);
            let existing = slot.link.load(Ordering::Relaxed);
            if parent.is_some() && existing != link {
                let parent = (existing != NO_PARENT).then(|| self.id_of(existing));
                return Err(BcError::AlreadyExists { id, parent });
            }
            // Under the lock, so a release that saw refs fall to zero cannot free it now.
            self.take_ref(slot);
            return Ok(index);
        }
        if link != NO_PARENT && self.depth(link) >= MAX_DEPTH {
            return Err(BcError::TooDeep);
        }
        let index = match inner.take_free() {
            Some(index) => index,
            None => {
                self.reap_locked(&mut inner);
                inner.take_free().ok_or(BcError::TableFull)?
            }
        };
        let slot = self.slot(index);
        let gen = generation(slot.state.load(Ordering::Relaxed));
        for (counter, limits) in slot.counters.iter().zip(inner.defaults.iter()) {
            counter.reset(limits.barrier, limits.limit);
        }
        slot.id.store(id.0, Ordering::Relaxed);
        slot.link.store(link, Ordering::Relaxed);
        if link != NO_PARENT {
            let parent = self.slot(link);
            self.take_ref(parent);
            parent.children.fetch_add(1, Ordering::Relaxed);
        }
        slot.state.store(pack(gen, true, 1), Ordering::Release);
        inner.insert(id.0, index);
        inner.live += 1;
        Ok(index)
    }

    /// Returns the slot of `id` with one reference taken, if it is live.
    pub(crate) fn lookup(&self, id: BcId) -> Option<u32> {
        if id == BcId::ROOT {
            return Some(ROOT);
        }
        let inner = self.inner.lock();
        let index = inner.find(id.0)?;
        self.take_ref(self.slot(index));
        Some(index)
    }

    /// Takes one more reference on a slot the caller already references.
    #[inline]
    pub(crate) fn retain(&self, index: u32) {
        self.retain_n(index, 1);
    }

    /// Takes `n` more references at once (one atomic operation: a guard that sets both
    /// exec and fork takes two).
    #[inline]
    pub(crate) fn retain_n(&self, index: u32, n: u64) {
        if index != ROOT {
            self.take_refs(self.slot(index), n);
        }
    }

    #[inline]
    fn take_ref(&self, slot: &Slot) {
        self.take_refs(slot, 1);
    }

    #[inline]
    fn take_refs(&self, slot: &Slot, n: u64) {
        let prev = slot.state.fetch_add(n, Ordering::Relaxed);
        debug_assert!(prev & LIVE != 0);
        if refs(prev) >= REFS - n {
            // 2^31 references means references are being leaked; continuing would wrap
            // into the LIVE bit. Like `Arc`, stop the process rather than corrupt it.
            std::process::abort();
        }
    }

    /// Drops one reference; the last one frees the slot unless something is still charged.
    #[inline]
    pub(crate) fn release(&self, index: u32) {
        self.release_n(index, 1);
    }

    /// Drops `n` references at once.
    #[inline]
    pub(crate) fn release_n(&self, index: u32, n: u64) {
        if index == ROOT {
            return;
        }
        let prev = self.slot(index).state.fetch_sub(n, Ordering::Release);
        debug_assert!(refs(prev) >= n && prev & LIVE != 0);
        if refs(prev) == n {
            self.release_slow(index, generation(prev));
        }
    }

    #[cold]
    #[inline(never)]
    fn release_slow(&self, index: u32, gen: u32) {
        // Pairs with the Release decrements of the other holders: their uses of the slot
        // happen before it is freed.
        fence(Ordering::Acquire);
        let mut inner = self.inner.lock();
        self.free_locked(&mut inner, index, gen);
    }

    /// Frees `index` if it is still `(gen, LIVE, 0)` and holds nothing, then releases the
    /// reference it held on its parent, freeing up the chain.
    fn free_locked(&self, inner: &mut Inner, mut index: u32, mut gen: u32) {
        loop {
            let slot = self.slot(index);
            if slot.state.load(Ordering::Acquire) != pack(gen, true, 0) || !slot.nothing_held() {
                // Revived by a lookup, already freed and reused (the generation moved on),
                // or still charged (a zombie, for `reap`).
                return;
            }
            inner.remove(slot.id.load(Ordering::Relaxed));
            let parent = slot.link.load(Ordering::Relaxed);
            slot.link.store(inner.free_head, Ordering::Relaxed);
            slot.state
                .store(pack(gen.wrapping_add(1), false, 0), Ordering::Release);
            inner.free_head = index;
            inner.live -= 1;
            if parent == NO_PARENT {
                return;
            }
            self.slot(parent).children.fetch_sub(1, Ordering::Relaxed);
            let prev = self.slot(parent).state.fetch_sub(1, Ordering::Release);
            if refs(prev) != 1 {
                return;
            }
            fence(Ordering::Acquire);
            index = parent;
            gen = generation(prev);
        }
    }

    /// Frees every zombie whose charges have all been uncharged; returns how many.
    pub(crate) fn reap(&self) -> u32 {
        let mut inner = self.inner.lock();
        self.reap_locked(&mut inner)
    }

    fn reap_locked(&self, inner: &mut Inner) -> u32 {
        let before = inner.live;
        for index in 1..inner.hwm {
            let state = self.slot(index).state.load(Ordering::Acquire);
            if state & LIVE != 0 && refs(state) == 0 {
                self.free_locked(inner, index, generation(state));
            }
        }
        before - inner.live
    }

    /// Takes one reference on every live slot besides the root (zombies included, which
    /// this revives until the references are released) and pushes their indices, in slot
    /// order, without growing `out`: nothing allocates under the lock. Returns how many
    /// live slots there are; more than were pushed means `out` was too small.
    #[cfg(not(beancounter_loom))]
    pub(crate) fn retain_live(&self, out: &mut Vec<u32>) -> u32 {
        let inner = self.inner.lock();
        for index in 1..inner.hwm {
            let slot = self.slot(index);
            if slot.state.load(Ordering::Acquire) & LIVE != 0 && out.len() < out.capacity() {
                // Under the lock, so a release that saw refs fall to zero cannot free it now.
                self.take_ref(slot);
                out.push(index);
            }
        }
        inner.live
    }

    /// Maps the table on first use.
    fn ensure_table(&self, inner: &mut Inner) -> Result<(), BcError> {
        if !inner.slots.is_null() {
            return Ok(());
        }
        if inner.capacity == 0 {
            inner.capacity = configured_capacity();
        }
        let map_len = (inner.capacity as usize * 2).next_power_of_two();
        let (slots, map) =
            table::map(inner.capacity as usize, map_len).ok_or(BcError::OutOfMemory)?;
        inner.slots = slots;
        inner.map = map;
        inner.map_mask = map_len - 1;
        self.slots.store(slots, Ordering::Release);
        Ok(())
    }

    // ---- charging -----------------------------------------------------------------------

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
    #[inline]
    pub(crate) fn charge_counted(
        &self,
        index: u32,
        r: Resource,
        ri: usize,
        n: u64,
        severity: Severity,
        count: bool,
    ) -> Result<(), Exceeded> {
        let mut peaks = [0i64; MAX_DEPTH];
        let mut at = index;
        let mut level = 0;
        loop {
            let slot = self.slot(at);
            match slot.counters[ri].try_add(n, severity, count) {
                Ok(held) => peaks[level] = held,
                Err(refusal) => {
                    // Unroll the levels below the one that refused.
                    let mut below = index;
                    while below != at {
                        let s = self.slot(below);
                        s.counters[ri].uncharge(n);
                        below = s.link.load(Ordering::Relaxed);
                    }
                    return Err(Exceeded {
                        id: BcId(slot.id.load(Ordering::Relaxed)),
                        resource: r,
                        severity,
                        requested: n,
                        held: refusal.held,
                        bound: refusal.bound,
                    });
                }
            }
            level += 1;
            at = slot.link.load(Ordering::Relaxed);
            if at == NO_PARENT {
                break;
            }
        }
        // Every level accepted: only now do the windows record it.
        let mut at = index;
        for peak in &peaks[..level] {
            let slot = self.slot(at);
            slot.counters[ri].record_peak(*peak);
            at = slot.link.load(Ordering::Relaxed);
        }
        Ok(())
    }

    /// Gives `n` of counter `ri` back to `index` and every ancestor.
    #[inline]
    pub(crate) fn uncharge(&self, index: u32, ri: usize, n: u64) {
        let mut at = index;
        while at != NO_PARENT {
            let slot = self.slot(at);
            slot.counters[ri].uncharge(n);
            at = slot.link.load(Ordering::Relaxed);
        }
    }

    // ---- reading and setting ------------------------------------------------------------

    pub(crate) fn id_of(&self, index: u32) -> BcId {
        BcId(self.slot(index).id.load(Ordering::Relaxed))
    }

    /// The parent's slot index, without taking a reference.
    pub(crate) fn parent_of(&self, index: u32) -> Option<u32> {
        let link = self.slot(index).link.load(Ordering::Relaxed);
        (link != NO_PARENT).then_some(link)
    }

    /// The room a stock refill for `index` may draw on in counter `ri`: the smallest, over
    /// `index` and its ancestors, of the headroom below the barrier while `held` is under
    /// it (so that stocks do not push a tenant over its barrier), and below the limit once
    /// it is over.
    pub(crate) fn headroom(&self, index: u32, ri: usize) -> u64 {
        let mut room = u64::MAX;
        let mut at = index;
        loop {
            let c = &self.slot(at).counters[ri];
            let here = match c.barrier_headroom() {
                0 => c.headroom(),
                below_barrier => below_barrier,
            };
            room = room.min(here);
            match self.parent_of(at) {
                Some(p) => at = p,
                None => return room,
            }
        }
    }

    /// The slot of beancounter `id` among `index` and its ancestors.
    pub(crate) fn index_of(&self, id: BcId, index: u32) -> Option<u32> {
        let mut at = index;
        loop {
            if self.id_of(at) == id {
                return Some(at);
            }
            at = self.parent_of(at)?;
        }
    }

    /// Does `index` have children (live, or zombies still charged)?
    pub(crate) fn has_children(&self, index: u32) -> bool {
        self.slot(index).children.load(Ordering::Relaxed) != 0
    }

    /// Is `index` a beancounter no handle, context or child refers to any more, kept only
    /// because something is still charged to it (a zombie)?
    pub(crate) fn is_unreferenced(&self, index: u32) -> bool {
        let state = self.slot(index).state.load(Ordering::Acquire);
        index != ROOT && state & LIVE != 0 && refs(state) == 0
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

    fn depth(&self, index: u32) -> usize {
        let mut depth = 1;
        let mut at = index;
        while let Some(p) = self.parent_of(at) {
            depth += 1;
            at = p;
        }
        depth
    }

    #[cfg(beancounter_loom)]
    pub(crate) fn generation_of(&self, index: u32) -> u32 {
        generation(self.slot(index).state.load(Ordering::Acquire))
    }

    pub(crate) fn counter(&self, index: u32, ri: usize) -> &ResourceCounter {
        &self.slot(index).counters[ri]
    }

    pub(crate) fn stat(&self, index: u32, ri: usize) -> ResourceStat {
        self.counter(index, ri).stat()
    }

    /// Sets both bounds together (under the lock, so two setters cannot interleave into a
    /// barrier above the limit).
    pub(crate) fn set_limits(&self, index: u32, ri: usize, l: Limits) -> Result<(), BcError> {
        l.validate()?;
        let _inner = self.inner.lock();
        self.counter(index, ri).set_limits(l.barrier, l.limit);
        Ok(())
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

    /// Counters in use: the built-in resources and the registered custom ones.
    pub(crate) fn resource_count(&self) -> usize {
        3 + self.customs.load(Ordering::Acquire) as usize
    }

    /// Live beancounters besides the root.
    pub(crate) fn live(&self) -> u32 {
        self.inner.lock().live
    }

    /// Slots in the table, root included (0 before the table is mapped).
    pub(crate) fn capacity(&self) -> u32 {
        let inner = self.inner.lock();
        if inner.slots.is_null() {
            0
        } else {
            inner.capacity
        }
    }

    /// Checks the registry's invariants; meaningful when no charge or release is in flight.
    pub(crate) fn check_invariants(&self) -> Result<(), &'static str> {
        let inner = self.inner.lock();
        let mut live = 0;
        for index in 1..inner.hwm {
            let slot = self.slot(index);
            let state = slot.state.load(Ordering::Acquire);
            if state & LIVE == 0 {
                if refs(state) != 0 || !slot.nothing_held() {
                    return Err("a free slot has references or charges");
                }
                continue;
            }
            live += 1;
            if inner.find(slot.id.load(Ordering::Relaxed)) != Some(index) {
                return Err("a live slot is not what its id maps to");
            }
            let mut children = 0;
            for ri in 0..NUM_RESOURCES {
                slot.counters[ri].check_invariants()?;
                let mut below = 0u64;
                for child in 1..inner.hwm {
                    let c = self.slot(child);
                    if c.state.load(Ordering::Acquire) & LIVE != 0
                        && c.link.load(Ordering::Relaxed) == index
                    {
                        below += c.counters[ri].held();
                        if ri == 0 {
                            children += 1;
                        }
                    }
                }
                if below > slot.counters[ri].held() {
                    return Err("children hold more than their parent");
                }
            }
            if refs(state) < children {
                return Err("a parent has fewer references than live children");
            }
            if slot.children.load(Ordering::Relaxed) as u64 != children {
                return Err("a parent's child count differs from its live children");
            }
        }
        if live != inner.live {
            return Err("live count differs from the live slots");
        }
        let mut free = 0;
        let mut at = inner.free_head;
        while at != 0 {
            if self.slot(at).state.load(Ordering::Acquire) & LIVE != 0 {
                return Err("a live slot is on the free list");
            }
            free += 1;
            at = self.slot(at).link.load(Ordering::Relaxed);
            if free > inner.hwm {
                return Err("the free list has a cycle");
            }
        }
        if free + live + 1 != inner.hwm {
            return Err("slots are neither live nor free");
        }
        Ok(())
    }
}

impl Inner {
    fn hash(&self, id: u32) -> usize {
        // Fibonacci hashing: multiply by 2^64 / φ and keep the high bits, so consecutive
        // tenant numbers spread over the table.
        ((id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & self.map_mask
    }

    fn entry(&self, pos: usize) -> u64 {
        // SAFETY: `pos <= map_mask`, inside the map of `map_mask + 1` entries, which is
        // mapped before any entry is read (`find` returns early while it is null).
        unsafe { *self.map.add(pos) }
    }

    fn set_entry(&mut self, pos: usize, e: u64) {
        // SAFETY: as in `entry`; `&mut self` is the registry lock, held by this thread.
        unsafe { *self.map.add(pos) = e }
    }

    fn find_pos(&self, id: u32) -> Option<usize> {
        if self.map.is_null() {
            return None;
        }
        let mut pos = self.hash(id);
        loop {
            let e = self.entry(pos);
            if e == 0 {
                return None;
            }
            if (e >> 32) as u32 == id {
                return Some(pos);
            }
            pos = (pos + 1) & self.map_mask;
        }
    }

    fn find(&self, id: u32) -> Option<u32> {
        self.find_pos(id).map(|pos| self.entry(pos) as u32)
    }

    fn insert(&mut self, id: u32, index: u32) {
        // The map has at least twice as many entries as there are slots, so it is never
        // more than half full and the probe ends.
        let mut pos = self.hash(id);
        while self.entry(pos) != 0 {
            pos = (pos + 1) & self.map_mask;
        }
        self.set_entry(pos, (id as u64) << 32 | index as u64);
    }

    /// Linear-probing deletion by backward shift: no tombstones, so probes stay short.
    fn remove(&mut self, id: u32) {
        let Some(mut hole) = self.find_pos(id) else {
            return;
        };
        let mut pos = hole;
        loop {
            pos = (pos + 1) & self.map_mask;
            let e = self.entry(pos);
            if e == 0 {
                break;
            }
            let home = self.hash((e >> 32) as u32);
            // The entry may move into the hole unless its home lies cyclically in
            // (hole, pos]: then it would become unreachable.
            let stays = if hole <= pos {
                hole < home && home <= pos
            } else {
                hole < home || home <= pos
            };
            if !stays {
                self.set_entry(hole, e);
                hole = pos;
            }
        }
        self.set_entry(hole, 0);
    }

    fn take_free(&mut self) -> Option<u32> {
        if self.free_head != 0 {
            let index = self.free_head;
            // SAFETY: free-list indices are below `hwm <= capacity`, inside the table.
            let slot = unsafe { &*self.slots.add(index as usize) };
            self.free_head = slot.link.load(Ordering::Relaxed);
            Some(index)
        } else if self.hwm < self.capacity {
            self.hwm += 1;
            Some(self.hwm - 1)
        } else {
            None
        }
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

/// Storage for the slot table and the id map.
#[cfg(not(beancounter_loom))]
mod table {
    use super::Slot;

    /// Maps `slots` zeroed slots and `map_len` zeroed map entries. A zeroed slot is a free
    /// slot of generation 0 (all its fields are atomics, for which zero bytes are a valid
    /// value), so nothing needs initialising.
    pub(super) fn map(slots: usize, map_len: usize) -> Option<(*mut Slot, *mut u64)> {
        let slot_bytes = slots.checked_mul(core::mem::size_of::<Slot>())?;
        let map_bytes = map_len.checked_mul(8)?;
        // Both in one mapping: a second mmap could fail after the first succeeded.
        let base = crate::os::map(slot_bytes.checked_add(map_bytes)?)?.as_ptr();
        // SAFETY: `slot_bytes` is within the mapping just made; page alignment covers the
        // 64-byte alignment of `Slot` and the 8 of `u64` (slot_bytes is a multiple of 64).
        let map = unsafe { base.add(slot_bytes) };
        Some((base.cast(), map.cast()))
    }
}

/// Under loom the table is ordinary heap memory of loom atomics, freed with the registry.
#[cfg(beancounter_loom)]
mod table {
    use super::Slot;

    pub(super) fn map(slots: usize, map_len: usize) -> Option<(*mut Slot, *mut u64)> {
        let slots: Box<[Slot]> = (0..slots).map(|_| Slot::free()).collect();
        let map: Box<[u64]> = vec![0; map_len].into_boxed_slice();
        Some((Box::into_raw(slots).cast(), Box::into_raw(map).cast()))
    }

    pub(super) fn unmap(slots: *mut Slot, capacity: usize, map: *mut u64, map_len: usize) {
        // SAFETY: both pointers came from `Box::into_raw` in `map` with these lengths.
        unsafe {
            drop(Box::from_raw(core::ptr::slice_from_raw_parts_mut(
                slots, capacity,
            )));
            drop(Box::from_raw(core::ptr::slice_from_raw_parts_mut(
                map, map_len,
            )));
        }
    }
}

#[cfg(beancounter_loom)]
impl Drop for Registry {
    fn drop(&mut self) {
        let inner = self.inner.get_mut();
        if !inner.slots.is_null() {
            table::unmap(
                inner.slots,
                inner.capacity as usize,
                inner.map,
                inner.map_mask + 1,
            );
        }
    }
}

#[cfg(all(test, not(beancounter_loom)))]
mod tests {
    use super::*;

    /// Creates and frees ids in a scrambled order on a small private registry, so that the
    /// id map sees long probe chains, wrap-around and backward-shift deletions; after every
    /// step each live id must still be found and every invariant hold.
    #[test]
    fn map_survives_scrambled_create_and_free() {
        let reg = Registry::new(64);
        let mut live: Vec<(u32, u32)> = Vec::new();
        let mut x = 0x2545_F491_u32;
        for step in 0..4000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            // Ids in a narrow range collide often; multiples of 64 share a home slot.
            let id = 1 + (x % 96) * if step % 3 == 0 { 64 } else { 1 };
            if let Some(pos) = live.iter().position(|&(i, _)| i == id) {
                let (_, index) = live.swap_remove(pos);
                reg.release(index);
                assert_eq!(reg.lookup(BcId(id)), None, "freed id {id} still found");
            } else {
                match reg.find_or_create(BcId(id), None) {
                    Ok(index) => live.push((id, index)),
                    Err(BcError::TableFull) => assert_eq!(live.len(), 63),
                    Err(e) => panic!("{e:?}"),
                }
            }
            for &(id, index) in &live {
                let found = reg.lookup(BcId(id));
                assert_eq!(found, Some(index), "live id {id} lost at step {step}");
                reg.release(index);
            }
            if step % 40 == 0 {
                reg.check_invariants().unwrap();
            }
            assert_eq!(reg.live() as usize, live.len());
        }
    }

    #[test]
    fn capacity_parsing_rejects_what_it_cannot_use() {
        assert_eq!(parse_capacity(b"65536"), Some(65536));
        assert_eq!(parse_capacity(b"2"), Some(2));
        for bad in [
            &b""[..],
            b"1",
            b"0",
            b"-5",
            b"12a",
            b"16777217",
            b"9999999999",
        ] {
            assert_eq!(parse_capacity(bad), None, "{:?}", core::str::from_utf8(bad));
        }
    }

    #[test]
    fn children_keep_parents_and_free_up_the_chain() {
        let reg = Registry::new(8);
        let top = reg.find_or_create(BcId(1), None).unwrap();
        let mid = reg.find_or_create(BcId(2), Some(top)).unwrap();
        let leaf = reg.find_or_create(BcId(3), Some(mid)).unwrap();
        reg.release(top);
        reg.release(mid);
        assert_eq!(reg.live(), 3, "a child keeps its ancestors");
        reg.charge(leaf, Resource::Memory, 0, 5, Severity::Limit)
            .unwrap();
        reg.release(leaf);
        assert_eq!(
            reg.live(),
            3,
            "a charged leaf is a zombie, and keeps its ancestors"
        );
        assert_eq!(reg.reap(), 0);
        reg.uncharge(leaf, 0, 5);
        assert_eq!(
            reg.reap(),
            3,
            "reaping the leaf frees its ancestors through it"
        );
        assert_eq!(reg.live(), 0);
        reg.check_invariants().unwrap();
    }
}
