//! A1 storage: records (what an index names), slots (a live beancounter's counters), and
//! the id map; all mapped from the OS, none of it from the global allocator.
//!
//! ```text
//! index ──▶ Record { state, id, link, slot, children, pins, left }   64 bytes, growable
//!                          │ slot (while live)
//!                          ▼
//!                    Slot { counters[resource] }                      2.5 KiB, capacity
//! id ──map──▶ index   (live, not retired)
//! ```
//!
//! Records are what tags, stocks, contexts and handles hold; a live beancounter has one
//! record and one slot. A retired one keeps only its record, for as long as something is
//! still charged through it, and gives its slot back at once: the slots bound how many
//! beancounters are alive ([`capacity`](super::Registry::capacity)), the records grow in
//! chunks as retired tenants leave leftovers behind.

use super::super::beancounter::ResourceCounter;
use super::super::types::NUM_RESOURCES;
use crate::sync::{AtomicI64, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use core::ptr;

/// `link` of a top-level record.
pub(crate) const NO_PARENT: u32 = u32::MAX;
/// `slot` of a record with no counters (free or retired).
pub(crate) const NO_SLOT: u32 = u32::MAX;

pub(crate) const LIVE: u64 = 1 << 31;
pub(crate) const RETIRED: u64 = 1 << 30;
pub(crate) const REFS: u64 = RETIRED - 1;

#[inline]
pub(crate) const fn refs(state: u64) -> u64 {
    state & REFS
}
#[inline]
pub(crate) const fn generation(state: u64) -> u32 {
    (state >> 32) as u32
}
#[inline]
pub(crate) const fn pack(generation: u32, live: bool, refs: u64) -> u64 {
    (generation as u64) << 32 | (live as u64) << 31 | refs
}

/// What an index names: a live beancounter (with a slot), a retired one whose leftovers are
/// still charged through it, or nothing (free). One cache line, so that two tenants'
/// reference counts never share one.
#[repr(C, align(64))]
pub(crate) struct Record {
    /// `generation << 32 | LIVE | RETIRED | refs`. `refs` counts handles, thread contexts,
    /// RAII charges and children.
    pub(crate) state: AtomicU64,
    /// Retired: what is still charged through this record (every resource's amount added
    /// up); the record is freed when this and `refs` are both zero.
    pub(crate) left: AtomicI64,
    /// The host's id; meaningful while LIVE.
    pub(crate) id: AtomicU32,
    /// Parent index, `NO_PARENT` for top level; the next free record while free.
    pub(crate) link: AtomicU32,
    /// The slot of a live record, else `NO_SLOT`.
    pub(crate) slot: AtomicU32,
    /// Records (live or retired) whose parent this is; changed under the registry lock.
    pub(crate) children: AtomicU32,
    /// Charges and uncharges at work on this record's slot right now (see `walk.rs`).
    pub(crate) pins: AtomicU32,
}

impl Record {
    crate::sync::const_fn! {
        /// A free record: the value zeroed memory holds, but for `slot`.
        pub(crate) fn free() -> Self {
            Record {
                state: AtomicU64::new(0),
                left: AtomicI64::new(0),
                id: AtomicU32::new(0),
                link: AtomicU32::new(0),
                slot: AtomicU32::new(NO_SLOT),
                children: AtomicU32::new(0),
                pins: AtomicU32::new(0),
            }
        }
    }

    crate::sync::const_fn! {
        /// The root: LIVE, one reference that is never released, slot 0.
        pub(crate) fn root() -> Self {
            Record {
                state: AtomicU64::new(pack(0, true, 1)),
                left: AtomicI64::new(0),
                id: AtomicU32::new(0),
                link: AtomicU32::new(NO_PARENT),
                slot: AtomicU32::new(0),
                children: AtomicU32::new(0),
                pins: AtomicU32::new(0),
            }
        }
    }
}

/// A live beancounter's counters, one per resource.
#[repr(C, align(64))]
pub(crate) struct Slot {
    pub(crate) counters: [ResourceCounter; NUM_RESOURCES],
    /// The record this slot belongs to; the next free slot while free.
    pub(crate) record: AtomicU32,
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
    crate::sync::const_fn! {
        /// The root's slot: unlimited.
        pub(crate) fn root() -> Self {
            Slot {
                counters: counters!(super::super::types::MAX),
                record: AtomicU32::new(0),
            }
        }
    }

    /// A free slot: the value zeroed memory holds.
    #[cfg(beancounter_loom)]
    pub(crate) fn free() -> Self {
        Slot {
            counters: counters!(0),
            record: AtomicU32::new(0),
        }
    }

    pub(crate) fn nothing_held(&self) -> bool {
        self.counters.iter().all(|c| c.held() == 0)
    }

    /// Every resource's `held`, added up (what a retiring record has left to give back).
    pub(crate) fn total_held(&self) -> i64 {
        self.counters.iter().map(|c| c.held() as i64).sum()
    }
}

/// Records per chunk of the record table: 16 Ki records, 1 MiB, mapped at a time.
#[cfg(not(beancounter_loom))]
pub(crate) const CHUNK_SHIFT: u32 = 14;
#[cfg(beancounter_loom)]
pub(crate) const CHUNK_SHIFT: u32 = 2;
const CHUNK: usize = 1 << CHUNK_SHIFT;
/// Chunks at most: 16 Mi records (1 GiB of address space, touched only as used).
#[cfg(not(beancounter_loom))]
const MAX_CHUNKS: usize = 1024;
#[cfg(beancounter_loom)]
const MAX_CHUNKS: usize = 4;
/// The most records there can be (index `u32::MAX` and its neighbours are markers).
pub(crate) const MAX_RECORDS: usize = CHUNK * MAX_CHUNKS;

/// The record table: chunks mapped as the record count grows, never unmapped, so a record
/// reference stays valid for the registry's life.
pub(crate) struct Records {
    chunks: [AtomicPtr<Record>; MAX_CHUNKS],
}

impl Records {
    #[cfg(not(beancounter_loom))]
    pub(crate) const fn new() -> Self {
        Records {
            chunks: [const { AtomicPtr::new(ptr::null_mut()) }; MAX_CHUNKS],
        }
    }

    #[cfg(beancounter_loom)]
    pub(crate) fn new() -> Self {
        Records {
            chunks: core::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
        }
    }

    /// Record `index`, which `ensure` made exist.
    #[inline]
    pub(crate) fn get(&self, index: u32) -> &Record {
        let chunk = self.chunks[(index >> CHUNK_SHIFT) as usize].load(Ordering::Acquire);
        debug_assert!(!chunk.is_null());
        // SAFETY: indices are handed out only below the table's high-water mark, after
        // `ensure` mapped (and published with Release) the chunk that holds them; chunks
        // are never unmapped while the registry lives.
        unsafe { &*chunk.add(index as usize & (CHUNK - 1)) }
    }

    /// Makes record `index` exist (mapping its chunk). Under the registry lock.
    pub(crate) fn ensure(&self, index: usize) -> bool {
        let c = index >> CHUNK_SHIFT;
        if c >= MAX_CHUNKS {
            return false;
        }
        if !self.chunks[c].load(Ordering::Relaxed).is_null() {
            return true;
        }
        match storage::map_records(CHUNK) {
            Some(p) => {
                self.chunks[c].store(p, Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// Gives the chunks back (loom: the registry is dropped after each model).
    #[cfg(beancounter_loom)]
    pub(crate) fn unmap(&mut self) {
        for c in &self.chunks {
            let p = c.load(Ordering::Relaxed);
            if !p.is_null() {
                storage::unmap_records(p, CHUNK);
            }
        }
    }
}

/// Ids to record indices, and custom names: changed only under the registry lock.
pub(crate) struct IdMap {
    /// Open addressing, linear probing: `id << 32 | index`, 0 = empty (index is never 0).
    map: *mut u64,
    mask: usize,
}

impl IdMap {
    pub(crate) const fn new() -> Self {
        IdMap {
            map: ptr::null_mut(),
            mask: 0,
        }
    }

    pub(crate) fn is_mapped(&self) -> bool {
        !self.map.is_null()
    }

    /// Maps room for `len` entries (a power of two, at least twice the live beancounters).
    pub(crate) fn map(&mut self, len: usize) -> bool {
        match storage::map_words(len) {
            Some(p) => {
                self.map = p;
                self.mask = len - 1;
                true
            }
            None => false,
        }
    }

    #[cfg(beancounter_loom)]
    pub(crate) fn unmap(&mut self) {
        if !self.map.is_null() {
            storage::unmap_words(self.map, self.mask + 1);
        }
    }

    fn hash(&self, id: u32) -> usize {
        // Fibonacci hashing: multiply by 2^64 / φ and keep the high bits, so consecutive
        // tenant numbers spread over the table.
        ((id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & self.mask
    }

    fn entry(&self, pos: usize) -> u64 {
        // SAFETY: `pos <= mask`, inside the map of `mask + 1` entries, which is mapped
        // before any entry is read (`find_pos` returns early while it is null).
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
            pos = (pos + 1) & self.mask;
        }
    }

    /// The record of live (not retired) beancounter `id`.
    pub(crate) fn find(&self, id: u32) -> Option<u32> {
        self.find_pos(id).map(|pos| self.entry(pos) as u32)
    }

    pub(crate) fn insert(&mut self, id: u32, index: u32) {
        // The map has at least twice as many entries as there can be live beancounters, so
        // it is never more than half full and the probe ends.
        let mut pos = self.hash(id);
        while self.entry(pos) != 0 {
            pos = (pos + 1) & self.mask;
        }
        self.set_entry(pos, (id as u64) << 32 | index as u64);
    }

    /// Linear-probing deletion by backward shift: no tombstones, so probes stay short.
    pub(crate) fn remove(&mut self, id: u32) {
        let Some(mut hole) = self.find_pos(id) else {
            return;
        };
        let mut pos = hole;
        loop {
            pos = (pos + 1) & self.mask;
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
}

// SAFETY: the map pointer is the registry's own mapping, reached only under its lock.
unsafe impl Send for IdMap {}

/// Where records, slots and the map come from: anonymous mappings, or (under loom) boxes of
/// loom atomics.
#[cfg(not(beancounter_loom))]
pub(crate) mod storage {
    use super::{Record, Slot};

    /// `n` zeroed slots. A zeroed slot is a valid free slot (its fields are atomics, for
    /// which zero bytes are a valid value).
    pub(crate) fn map_slots(n: usize) -> Option<*mut Slot> {
        let bytes = n.checked_mul(core::mem::size_of::<Slot>())?;
        // Page alignment covers the 64-byte alignment of `Slot`.
        Some(crate::os::map(bytes)?.as_ptr().cast())
    }

    /// `n` free records.
    pub(crate) fn map_records(n: usize) -> Option<*mut Record> {
        let p: *mut Record = crate::os::map(n * core::mem::size_of::<Record>())?
            .as_ptr()
            .cast();
        for i in 0..n {
            // SAFETY: `i < n`, inside the fresh mapping, 64-aligned (page-aligned base,
            // 64-byte records); nobody else sees it yet.
            unsafe { p.add(i).write(Record::free()) };
        }
        Some(p)
    }

    /// `n` zeroed words.
    pub(crate) fn map_words(n: usize) -> Option<*mut u64> {
        Some(crate::os::map(n.checked_mul(8)?)?.as_ptr().cast())
    }
}

/// Under loom the tables are ordinary heap memory of loom atomics, freed with the registry.
#[cfg(beancounter_loom)]
pub(crate) mod storage {
    use super::{Record, Slot};

    pub(crate) fn map_slots(n: usize) -> Option<*mut Slot> {
        let b: Box<[Slot]> = (0..n).map(|_| Slot::free()).collect();
        Some(Box::into_raw(b).cast())
    }

    pub(crate) fn unmap_slots(p: *mut Slot, n: usize) {
        // SAFETY: from `Box::into_raw` in `map_slots` with this length.
        drop(unsafe { Box::from_raw(core::ptr::slice_from_raw_parts_mut(p, n)) });
    }

    pub(crate) fn map_records(n: usize) -> Option<*mut Record> {
        let b: Box<[Record]> = (0..n).map(|_| Record::free()).collect();
        Some(Box::into_raw(b).cast())
    }

    pub(crate) fn unmap_records(p: *mut Record, n: usize) {
        // SAFETY: from `Box::into_raw` in `map_records` with this length.
        drop(unsafe { Box::from_raw(core::ptr::slice_from_raw_parts_mut(p, n)) });
    }

    pub(crate) fn map_words(n: usize) -> Option<*mut u64> {
        let b: Box<[u64]> = vec![0; n].into_boxed_slice();
        Some(Box::into_raw(b).cast())
    }

    pub(crate) fn unmap_words(p: *mut u64, n: usize) {
        // SAFETY: from `Box::into_raw` in `map_words` with this length.
        drop(unsafe { Box::from_raw(core::ptr::slice_from_raw_parts_mut(p, n)) });
    }
}
