//! L1: page runs. Segments are 4 MiB-aligned mappings split into runs of 4 KiB pages;
//! runs are split on allocation and coalesced with free neighbours on free; blocks above
//! [`LARGE_MAX`] get a mapping of their own (*huge*).
//!
//! Glossary: *OS page* 4 KiB; *segment* a 4 MiB-aligned mapping whose first pages hold its
//! metadata; *run* a span of consecutive pages of one segment, free or in use (a slab's
//! pages, or one large block); *huge block* a block with its own mapping.
//!
//! ```text
//! segment (4 MiB, aligned)                       huge mapping (aligned to 4 MiB)
//! +--------+------+------------+------+----+     +------+-------------------------+
//! | header | slab | large run  | free | .. |     | head | object (page-rounded)   |
//! +--------+------+------------+------+----+     +------+-------------------------+
//! header: SegmentHead, back[page], slab_at[page], runs[page], payload[page]
//! ```
//!
//! All run changes happen under one lock. Slabs amortise it over their objects (a slab of
//! 64-byte objects is taken once per ~250 allocations); large blocks take it on every
//! allocation and free, and a large block that `realloc` grows in place takes it about once
//! per quarter of growth (the run keeps a reserve, see [`grow_in_place`]). Free runs are
//! kept in bins by length, and a run is taken from the smallest that holds it, except for a
//! block that `realloc` grows and could not grow in place: that one goes to the front of a
//! free run four times its size if there is one ([`alloc_growing`]), where it can keep
//! growing in place instead of moving from hole to hole.
//!
//! # Giving memory back: by age, within a bound
//! A freed run is *dirty* (its pages are resident) until it is purged (`MADV_DONTNEED`, or
//! `munmap` for a whole free segment beyond [`CACHED_EMPTY_SEGMENTS`]). Dirty runs wait on a
//! list in the order they were freed, each with the time it was freed, so that memory freed
//! and taken again soon is not given back and faulted in again; purging takes the oldest
//! first:
//! - **By age:** a run dirty for [`PURGE_DELAY_MS`] (1 s) is purged at the next slow path of
//!   any thread (a run taken or freed, or a thread heap refilling a bin): memory a program
//!   stopped using goes back to the OS about a second later. No thread of its own is
//!   needed; a process that makes no allocation at all keeps its dirty memory until it does.
//! - **By amount:** dirty memory never exceeds [`dirty_bound`]: the larger of
//!   [`DIRTY_FLOOR`] (64 MiB) and half of the most memory in use (runs and huge blocks)
//!   over the last one to two seconds. A program that frees its working set and builds it
//!   again at once (a parsed document, a request's buffers) keeps up to half of it
//!   resident; one that frees most of its heap for good gives back all but that at once,
//!   whatever the age, whole free segments first (unmapping them splits no huge page).
//!
//! - **Huge blocks** are dirty memory too once freed: their mappings are kept whole (at most
//!   [`CACHED_HUGE`]) for the next huge block that fits (`HugeCache`), counted against the
//!   same bound, unmapped by the same age, and first when over the bound.
//!
//! Together: free pages kept resident are at most `max(64 MiB, recent peak / 2)` (plus the
//! spare slabs each thread heap keeps, see `thread_cache`), and a second after a program
//! stops allocating and freeing, what it freed is given back at its next allocator call.
//!
//! Invariants (checked by [`check_invariants`]): in every segment the runs tile the pages
//! after the header; no two free runs are adjacent; every free run is in the bin of its
//! length; `back[first] == 0` and `back[last] == pages - 1` for every run, and
//! `back[p] == p - first` for every page of a slab (and `slab_at[p]` is where the slab's
//! payload is, checked by `Slab::check_invariants`; a large run's first page has it too when
//! the run holds a grown block, see [`SegmentHead::payload_for_sized_free`]).

use crate::os::{self, PAGE};
use crate::sync::{AtomicU64, Mutex, Ordering};
use core::cell::Cell;
use core::ptr;

pub(crate) const SEGMENT_SHIFT: usize = 22;
/// Segment size and alignment.
pub(crate) const SEGMENT: usize = 1 << SEGMENT_SHIFT;
/// Pages per segment.
pub(crate) const PAGES: usize = SEGMENT / PAGE;
const _: () = assert!(PAGES.is_power_of_two());
/// Largest block served from a segment's runs; larger ones are huge blocks.
pub(crate) const LARGE_MAX: usize = 2 << 20;
/// Largest alignment served: objects must not start on a segment boundary, where the
/// metadata of the segment they belong to would be.
pub(crate) const MAX_ALIGN: usize = SEGMENT / 2;
/// Fully free segments kept mapped (purged) when their pages are given back, so a workload
/// that frees and reallocates a segment's worth of memory does not mmap/munmap each time.
pub(crate) const CACHED_EMPTY_SEGMENTS: usize = 1;
/// How long a freed run stays resident for reuse before it is purged: about a second, as
/// the design asks (`DESIGN.md` §8), between jemalloc's default decay of 10 s and mimalloc's
/// purge delay of tens of milliseconds.
pub(crate) const PURGE_DELAY_MS: u64 = 1000;
/// Freed huge mappings kept for reuse at most (see [`HugeCache`]).
pub(crate) const CACHED_HUGE: usize = 8;
/// Dirty bytes always allowed, whatever is in use: 64 MiB, sixteen segments; a program whose
/// working set is freed and built again (a parsed document, a request's buffers) reuses that
/// much without a page fault.
pub(crate) const DIRTY_FLOOR: usize = 64 << 20;

/// What a run is used for.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u8)]
pub(crate) enum Kind {
    Free = 0,
    Slab = 1,
    Large = 2,
    Header = 3,
}

/// Metadata of the run starting at one page. One cache line, so that the runs of a segment
/// never share one and a page's entry is found with a shift.
#[repr(C, align(64))]
pub(crate) struct Run {
    kind: Cell<Kind>,
    /// Free runs: every page reads zero (fresh or purged).
    zeroed: Cell<bool>,
    pages: Cell<u32>,
    /// Large runs: the opaque owner tag and bytes charged, set by the allocator.
    pub(crate) tag: Cell<u32>,
    pub(crate) charged: Cell<usize>,
    /// Dirty free runs: when the pages were freed (`os::now_ms`).
    dirty_since: Cell<u64>,
    /// Free-run bin links.
    next: Cell<*mut Run>,
    prev: Cell<*mut Run>,
    /// Dirty free runs: links on the list of dirty runs, oldest first.
    dirty_next: Cell<*mut Run>,
    dirty_prev: Cell<*mut Run>,
}

const _: () = assert!(core::mem::size_of::<Run>() == 64);

/// What every mapping this layer makes starts with.
#[repr(C)]
pub(crate) struct SegmentHead {
    huge: bool,
    /// Huge: the mapping's size and where the object starts in it.
    map_size: usize,
    offset: usize,
    /// Huge: owner tag and bytes charged.
    pub(crate) tag: Cell<u32>,
    pub(crate) charged: Cell<usize>,
    /// Normal: pages in use (not free), header excluded.
    used_pages: Cell<u32>,
}

/// Bytes of metadata space the layer above gets with every run (a slab keeps its `Slab`
/// there). In the segment header, not in the run: metadata at a fixed offset inside pages
/// would put every slab's hot line in the same L1 cache set.
pub(crate) const RUN_PAYLOAD: usize = 128;

/// The payload space of one run; zero when the segment is fresh.
#[repr(C, align(64))]
pub(crate) struct Payload([u8; RUN_PAYLOAD]);

/// A normal segment's header.
#[repr(C)]
struct Segment {
    head: SegmentHead,
    /// `back[p]`: how many pages before `p` its run starts (set for the first and last
    /// page of every run, and for every page of a slab).
    back: [Cell<u16>; PAGES],
    /// `slab_at[p]`, for every page `p` of a slab run (and the first page of a large run
    /// holding a grown block): where the run's payload space is, as an offset from the
    /// segment's base. The sized free of a slab object goes from its address to its `Slab`
    /// with one load (`back` would take a second step).
    slab_at: [Cell<u32>; PAGES],
    runs: [Run; PAGES],
    payload: [Payload; PAGES],
}

/// Pages taken by a segment's own header.
pub(crate) const HEADER_PAGES: usize = core::mem::size_of::<Segment>().div_ceil(PAGE);
const USABLE_PAGES: usize = PAGES - HEADER_PAGES;

// SAFETY: run and segment metadata are only changed under `RUNS`' lock, or by the one
// owner of an allocated run (its kind and length are then stable); see the module docs.
unsafe impl Sync for Run {}
// SAFETY: as for `Run`.
unsafe impl Sync for SegmentHead {}

/// Bins of free runs: exact lengths 1..=32 pages, then one bin per power of two.
const EXACT_BINS: usize = 32;
const NUM_BINS: usize = EXACT_BINS + 6;

fn bin_of(pages: usize) -> usize {
    if pages <= EXACT_BINS {
        pages - 1
    } else {
        // 33..=64 → 32, 65..=128 → 33, … , 513..=1024 → 36
        (EXACT_BINS - 1 + (usize::BITS - (pages - 1).leading_zeros()) as usize - 5)
            .min(NUM_BINS - 1)
    }
}

/// Dirty free runs in the order they were freed (through `Run::dirty_next/prev`).
struct DirtyList {
    head: *mut Run,
    tail: *mut Run,
}

impl DirtyList {
    const fn new() -> Self {
        DirtyList {
            head: ptr::null_mut(),
            tail: ptr::null_mut(),
        }
    }

    fn oldest(&self) -> Option<&'static Run> {
        // SAFETY: dirty lists hold free runs in mapped segments.
        unsafe { self.head.as_ref() }
    }

    fn push_back(&mut self, run: &Run) {
        let me = run as *const Run as *mut Run;
        run.dirty_next.set(ptr::null_mut());
        run.dirty_prev.set(self.tail);
        match self.tail.is_null() {
            true => self.head = me,
            // SAFETY: as in `oldest`.
            false => unsafe { (*self.tail).dirty_next.set(me) },
        }
        self.tail = me;
    }

    fn unlink(&mut self, run: &Run) {
        let (prev, next) = (run.dirty_prev.get(), run.dirty_next.get());
        match prev.is_null() {
            true => self.head = next,
            // SAFETY: as in `oldest`.
            false => unsafe { (*prev).dirty_next.set(next) },
        }
        match next.is_null() {
            true => self.tail = prev,
            // SAFETY: as in `oldest`.
            false => unsafe { (*next).dirty_prev.set(prev) },
        }
    }
}

/// A freed huge block's mapping, kept whole for the next huge block it fits.
#[derive(Clone, Copy)]
struct Cached {
    base: *mut u8,
    size: usize,
    /// When it was freed (`os::now_ms`).
    since: u64,
}

/// Freed huge mappings, oldest first: dirty memory like free runs (counted against the same
/// bound, given back by the same age), so that a program that frees a buffer of many
/// megabytes and takes one as big again (a document, a sort's scratch, a `Vec` collected
/// anew) reuses its pages instead of faulting in and zeroing fresh ones each time. A
/// request takes the smallest mapping that holds it and is at most a quarter larger.
struct HugeCache {
    held: [Cached; CACHED_HUGE],
    len: usize,
    bytes: usize,
}

impl HugeCache {
    const NONE: Cached = Cached {
        base: ptr::null_mut(),
        size: 0,
        since: 0,
    };

    fn oldest(&self) -> Option<Cached> {
        (self.len > 0).then(|| self.held[0])
    }

    fn remove(&mut self, i: usize) -> Cached {
        let c = self.held[i];
        self.held.copy_within(i + 1..self.len, i);
        self.len -= 1;
        self.bytes -= c.size;
        c
    }

    /// Takes the smallest mapping of at least `need` bytes and at most a quarter more.
    fn take(&mut self, need: usize) -> Option<Cached> {
        let fits = |c: &Cached| c.size >= need && c.size - need <= need / 4;
        let (i, _) = self.held[..self.len]
            .iter()
            .enumerate()
            .filter(|(_, c)| fits(c))
            .min_by_key(|(_, c)| c.size)?;
        Some(self.remove(i))
    }

    /// Keeps `c`; returns the oldest mapping if that made room for it.
    fn push(&mut self, c: Cached) -> Option<Cached> {
        let evicted = (self.len == CACHED_HUGE).then(|| self.remove(0));
        self.held[self.len] = c;
        self.len += 1;
        self.bytes += c.size;
        evicted
    }
}

struct State {
    bins: [*mut Run; NUM_BINS],
    /// Dirty free runs that are part of a segment, and those that are a whole segment;
    /// the second are given back first when dirty memory is over its bound (unmapping a
    /// whole segment splits no huge page). `dirty_pages` counts both.
    dirty: DirtyList,
    empty: DirtyList,
    dirty_pages: usize,
    /// Segments whose usable pages are one free run.
    empty_segments: usize,
    /// Pages of slabs and large runs.
    used_pages: usize,
    /// Bytes of huge blocks.
    huge_bytes: usize,
    /// Freed huge mappings kept for reuse (dirty, and counted in `mapped_bytes`).
    huge_cache: HugeCache,
    /// The most bytes in use (runs and huge blocks) in the current window of
    /// `PURGE_DELAY_MS` and in the one before, and when the current one started.
    peak: usize,
    prev_peak: usize,
    window_start: u64,
    /// Pages mapped in segments and huge blocks, for statistics.
    mapped_bytes: usize,
}

// SAFETY: the pointers refer to segment metadata, valid while mapped; `State` is only
// reached through the lock.
unsafe impl Send for State {}

static RUNS: Mutex<State> = Mutex::new(State {
    bins: [ptr::null_mut(); NUM_BINS],
    dirty: DirtyList::new(),
    empty: DirtyList::new(),
    dirty_pages: 0,
    empty_segments: 0,
    used_pages: 0,
    huge_bytes: 0,
    huge_cache: HugeCache {
        held: [HugeCache::NONE; CACHED_HUGE],
        len: 0,
        bytes: 0,
    },
    peak: 0,
    prev_peak: 0,
    window_start: 0,
    mapped_bytes: 0,
});

/// When the oldest dirty run is due to be purged (`os::now_ms`), `u64::MAX` if none: lets a
/// slow path outside the run lock tell whether there is anything to do.
static NEXT_DUE: AtomicU64 = AtomicU64::new(u64::MAX);

/// The head of the mapping `ptr` points into (any pointer handed out by this layer).
#[inline]
pub(crate) fn head_of(ptr: *const u8) -> &'static SegmentHead {
    let base = (ptr as usize) & !(SEGMENT - 1);
    // SAFETY: every pointer this layer hands out lies in a mapping aligned to SEGMENT that
    // starts with a SegmentHead (normal segments at their base; huge objects start at
    // most MAX_ALIGN < SEGMENT after theirs), and mappings live while their blocks do.
    unsafe { &*(base as *const SegmentHead) }
}

impl SegmentHead {
    #[inline]
    pub(crate) fn is_huge(&self) -> bool {
        self.huge
    }

    fn segment(&self) -> &Segment {
        debug_assert!(!self.huge);
        // SAFETY: a normal segment's head is the first field of its `Segment` header.
        unsafe { &*(self as *const SegmentHead as *const Segment) }
    }

    fn base(&self) -> usize {
        self as *const SegmentHead as usize
    }

    /// The first page of the run containing `ptr` (a slab's interior pointer, or a large
    /// block's start).
    #[inline]
    fn first_page(&self, ptr: *const u8) -> usize {
        let page = (ptr as usize - self.base()) >> 12;
        // `back[page] <= page`, so the mask changes nothing; it only shows the compiler the
        // index is in bounds (one `and` instead of a compare and branch on every free).
        (page - self.segment().back[page].get() as usize) & (PAGES - 1)
    }

    /// The run containing `ptr` (a slab's interior pointer, or a large block's start).
    #[inline]
    pub(crate) fn run_of(&self, ptr: *const u8) -> &Run {
        &self.segment().runs[self.first_page(ptr)]
    }

    /// The payload space of the slab run containing `ptr`: `RUN_PAYLOAD` bytes, 64-aligned,
    /// owned by whoever allocated the run. Only for a pointer into a slab run.
    #[inline]
    pub(crate) fn slab_payload_of(&self, ptr: *const u8) -> *mut u8 {
        let page = ((ptr as usize - self.base()) >> 12) & (PAGES - 1);
        (self.base() + self.segment().slab_at[page].get() as usize) as *mut u8
    }

    /// Points the sized free of large block `run` (its first page) at the run's payload
    /// space, as a slab object's is (`slab_at`), and returns that space: for a block of
    /// pages whose layout has a slab's size (a *grown block*, see `global/realloc.rs`). By
    /// the run's owner; `slab_at` of a page is read only by the sized free of a block on it.
    pub(crate) fn payload_for_sized_free(&self, run: &Run) -> *mut u8 {
        let first = self.page_of(run);
        let payload = core::mem::offset_of!(Segment, payload) + first * RUN_PAYLOAD;
        self.segment().slab_at[first].set(payload as u32);
        self.payload(run)
    }

    /// The payload space of `run`.
    pub(crate) fn payload(&self, run: &Run) -> *mut u8 {
        &self.segment().payload[self.page_of(run)] as *const Payload as *mut u8
    }

    fn page_of(&self, run: &Run) -> usize {
        (run as *const Run as usize - self.segment().runs.as_ptr() as usize)
            / core::mem::size_of::<Run>()
    }

    fn run_at(&self, page: usize) -> &Run {
        &self.segment().runs[page]
    }

    /// Address of the first byte of `run`.
    #[inline]
    pub(crate) fn run_start(&self, run: &Run) -> *mut u8 {
        (self.base() + self.page_of(run) * PAGE) as *mut u8
    }

    /// Huge: where the object starts.
    pub(crate) fn huge_object(&self) -> *mut u8 {
        (self.base() + self.offset) as *mut u8
    }
}

impl Run {
    #[inline]
    pub(crate) fn kind(&self) -> Kind {
        self.kind.get()
    }

    #[inline]
    pub(crate) fn pages(&self) -> usize {
        self.pages.get() as usize
    }

    #[inline]
    pub(crate) fn bytes(&self) -> usize {
        self.pages() * PAGE
    }
}

impl State {
    /// Puts free `run` in the bin of its length and, if dirty, at the end of the dirty list
    /// with the time its pages were freed.
    fn push(&mut self, run: &Run, since: u64) {
        if !run.zeroed.get() {
            run.dirty_since.set(since);
            self.dirty_list(run).push_back(run);
        }
        let b = bin_of(run.pages());
        let head = self.bins[b];
        run.prev.set(ptr::null_mut());
        run.next.set(head);
        if !head.is_null() {
            // SAFETY: bin entries are free runs in mapped segments.
            unsafe { (*head).prev.set(run as *const Run as *mut Run) };
        }
        self.bins[b] = run as *const Run as *mut Run;
        if !run.zeroed.get() {
            self.dirty_pages += run.pages();
        }
    }

    fn unlink(&mut self, run: &Run) {
        let (prev, next) = (run.prev.get(), run.next.get());
        if prev.is_null() {
            self.bins[bin_of(run.pages())] = next;
        } else {
            // SAFETY: bin neighbours are free runs in mapped segments.
            unsafe { (*prev).next.set(next) };
        }
        if !next.is_null() {
            // SAFETY: as above.
            unsafe { (*next).prev.set(prev) };
        }
        if !run.zeroed.get() {
            self.unlink_dirty(run);
        }
    }

    /// The dirty list `run` belongs on.
    fn dirty_list(&mut self, run: &Run) -> &mut DirtyList {
        if run.pages() == USABLE_PAGES {
            &mut self.empty
        } else {
            &mut self.dirty
        }
    }

    /// Takes dirty free `run` off its dirty list.
    fn unlink_dirty(&mut self, run: &Run) {
        self.dirty_list(run).unlink(run);
        self.dirty_pages -= run.pages();
    }

    /// Bytes of runs and huge blocks in use.
    fn in_use(&self) -> usize {
        self.used_pages * PAGE + self.huge_bytes
    }

    /// Notes what is in use now in the current window's peak.
    fn note_peak(&mut self) {
        self.peak = self.peak.max(self.in_use());
    }

    /// Dirty bytes: free runs not purged, and cached huge mappings.
    fn dirty_bytes(&self) -> usize {
        self.dirty_pages * PAGE + self.huge_cache.bytes
    }

    /// Most dirty bytes kept: see the module docs.
    fn dirty_bound(&self) -> usize {
        dirty_bound(self.peak.max(self.prev_peak))
    }

    /// Purges the oldest dirty runs while they are due, then whole free segments and then
    /// the oldest runs while dirty memory is over its bound; then publishes when the next
    /// one is due.
    fn decay(&mut self, now: u64) {
        if now.saturating_sub(self.window_start) >= PURGE_DELAY_MS {
            self.prev_peak = self.peak;
            self.peak = self.in_use();
            self.window_start = now;
        }
        let due = |run: &Run| now.saturating_sub(run.dirty_since.get()) >= PURGE_DELAY_MS;
        // Cached huge mappings first: due ones, then the oldest while over the bound (each is
        // one system call that gives back many pages, and splits no segment's huge page).
        while let Some(c) = self.huge_cache.oldest() {
            if now.saturating_sub(c.since) < PURGE_DELAY_MS
                && self.dirty_bytes() <= self.dirty_bound()
            {
                break;
            }
            self.huge_cache.remove(0);
            self.mapped_bytes -= c.size;
            // SAFETY: a freed huge block's whole mapping, which only the cache referred to.
            unsafe { os::unmap(c.base, c.size) };
        }
        loop {
            let oldest = match (self.dirty.oldest(), self.empty.oldest()) {
                (Some(d), Some(e)) if e.dirty_since.get() <= d.dirty_since.get() => Some(e),
                (Some(d), _) => Some(d),
                (None, e) => e,
            };
            let Some(oldest) = oldest else { break };
            if due(oldest) {
                self.purge_run(oldest);
            } else if self.dirty_bytes() > self.dirty_bound() {
                let run = self.empty.oldest().unwrap_or(oldest);
                self.purge_run(run);
            } else {
                break;
            }
        }
        let next = [self.dirty.oldest(), self.empty.oldest()]
            .into_iter()
            .flatten()
            .map(|r| r.dirty_since.get())
            .chain(self.huge_cache.oldest().map(|c| c.since))
            .min()
            .map_or(u64::MAX, |since| since + PURGE_DELAY_MS);
        NEXT_DUE.store(next, Ordering::Relaxed);
    }

    /// Gives the pages of dirty free `run` back to the OS: the whole segment if the run is
    /// all of it and enough empty segments stay mapped, else `MADV_DONTNEED` (the run then
    /// reads as zero).
    fn purge_run(&mut self, run: &'static Run) {
        let head = head_of(run as *const Run as *const u8);
        debug_assert!(
            run.kind() == Kind::Free && !run.zeroed.get(),
            "purging a run in use"
        );
        debug_assert!(run.pages() != USABLE_PAGES || head.used_pages.get() == 0);
        if run.pages() == USABLE_PAGES && self.empty_segments > CACHED_EMPTY_SEGMENTS {
            self.unlink(run);
            self.empty_segments -= 1;
            self.mapped_bytes -= SEGMENT;
            // SAFETY: every page of the segment is free, so no block refers to it, and its
            // only free run is now in no list.
            unsafe { os::unmap(head.base() as *mut u8, SEGMENT) };
            return;
        }
        self.unlink_dirty(run);
        // SAFETY: a free run's pages hold no block; they are page-aligned and inside the
        // segment's mapping.
        unsafe { os::purge(head.run_start(run), run.bytes()) };
        run.zeroed.set(true);
    }

    /// Carves the first `pages` pages of free `run` (unlinked) as `kind`, and purges what is
    /// due on the way: the run and whether its pages read as zero.
    fn take_front(&mut self, run: &'static Run, pages: usize, kind: Kind) -> (&'static Run, bool) {
        let zeroed = run.zeroed.get();
        self.carve(run, pages, kind);
        let now = os::now_ms();
        if now >= NEXT_DUE.load(Ordering::Relaxed) {
            self.decay(now);
        }
        (run, zeroed)
    }

    /// A free run of at least `pages` pages, unlinked.
    fn take_fit(&mut self, pages: usize) -> Option<&'static Run> {
        for b in bin_of(pages)..NUM_BINS {
            let mut at = self.bins[b];
            while !at.is_null() {
                // SAFETY: bin entries are free runs in mapped segments, which stay mapped
                // while they hold a free run.
                let run: &'static Run = unsafe { &*at };
                if run.pages() >= pages {
                    self.unlink(run);
                    if run.pages() == USABLE_PAGES {
                        self.empty_segments -= 1;
                    }
                    return Some(run);
                }
                at = run.next.get();
            }
        }
        None
    }

    /// Takes in a segment made by [`map_segment`]: its one free run, unlinked, for the
    /// caller to carve.
    fn add_segment(&mut self, run: &'static Run) -> &'static Run {
        self.mapped_bytes += SEGMENT;
        run
    }

    /// Marks `pages` pages at the start of free `run` as `kind` and returns the rest to
    /// the bins.
    fn carve(&mut self, run: &'static Run, pages: usize, kind: Kind) {
        let head = head_of(run as *const Run as *const u8);
        let seg = head.segment();
        let first = head.page_of(run);
        let rest = run.pages() - pages;
        if rest > 0 {
            let tail = &seg.runs[first + pages];
            tail.kind.set(Kind::Free);
            tail.pages.set(rest as u32);
            tail.zeroed.set(run.zeroed.get());
            seg.back[first + pages].set(0);
            seg.back[first + pages + rest - 1].set((rest - 1) as u16);
            // The rest keeps its age: carving pieces off a free run does not keep it young.
            self.push(tail, run.dirty_since.get());
        }
        run.kind.set(kind);
        run.pages.set(pages as u32);
        seg.back[first].set(0);
        if kind == Kind::Slab {
            let payload = core::mem::offset_of!(Segment, payload) + first * RUN_PAYLOAD;
            seg.slab_at[first].set(payload as u32);
            for p in 1..pages {
                seg.back[first + p].set(p as u16);
                seg.slab_at[first + p].set(payload as u32);
            }
        } else {
            seg.back[first + pages - 1].set((pages - 1) as u16);
        }
        head.used_pages.set(head.used_pages.get() + pages as u32);
        self.used_pages += pages;
        self.note_peak();
    }

    fn release(&mut self, run: &'static Run) {
        let head = head_of(run as *const Run as *const u8);
        let seg = head.segment();
        let mut first = head.page_of(run);
        let mut pages = run.pages();
        head.used_pages.set(head.used_pages.get() - pages as u32);
        self.used_pages -= pages;
        if first + pages < PAGES {
            let next = &seg.runs[first + pages];
            if next.kind() == Kind::Free {
                self.unlink(next);
                pages += next.pages();
            }
        }
        if first > HEADER_PAGES {
            let before = first - 1 - seg.back[first - 1].get() as usize;
            let prev = &seg.runs[before];
            if prev.kind() == Kind::Free {
                self.unlink(prev);
                first = before;
                pages += prev.pages();
            }
        }
        let run = &seg.runs[first];
        run.kind.set(Kind::Free);
        run.pages.set(pages as u32);
        // Coalescing with a zeroed neighbour still leaves the freed pages dirty.
        run.zeroed.set(false);
        seg.back[first].set(0);
        seg.back[first + pages - 1].set((pages - 1) as u16);
        if pages == USABLE_PAGES {
            self.empty_segments += 1;
        }
        let now = os::now_ms();
        self.push(run, now);
        self.decay(now);
    }

    /// Splits the pages of free, unlinked `run` before the first `align`-aligned one off
    /// into a free run of their own (back in a bin) and returns the aligned rest, unlinked.
    fn align_front(&mut self, run: &'static Run, align: usize) -> &'static Run {
        let head = head_of(run as *const Run as *const u8);
        let seg = head.segment();
        let start = head.run_start(run) as usize;
        let skip = (start.next_multiple_of(align) - start) / PAGE;
        if skip == 0 {
            return run;
        }
        let first = head.page_of(run);
        let total = run.pages();
        let rest = &seg.runs[first + skip];
        rest.kind.set(Kind::Free);
        rest.pages.set((total - skip) as u32);
        rest.zeroed.set(run.zeroed.get());
        seg.back[first + skip].set(0);
        seg.back[first + total - 1].set((total - skip - 1) as u16);
        // The skipped pages stay free; their neighbour before was not free (free runs are
        // never adjacent), so there is nothing to coalesce.
        run.pages.set(skip as u32);
        seg.back[first + skip - 1].set((skip - 1) as u16);
        self.push(run, run.dirty_since.get());
        rest
    }
}

/// Most dirty bytes kept when the most bytes in use (runs and huge blocks) over the last
/// one to two seconds was `peak`: the larger of [`DIRTY_FLOOR`] and half of `peak`.
pub(crate) fn dirty_bound(peak: usize) -> usize {
    DIRTY_FLOOR.max(peak / 2)
}

/// Maps a new segment and writes its header; returns its one free run (all its usable
/// pages), in no list yet. Done without the run lock: the mapping's system calls, and the
/// first write to the header, which faults in its pages (one huge page, where the kernel
/// backs the segment with one, so 2 MiB zeroed), took hundreds of microseconds during which
/// every other thread that needed a run waited on the lock.
fn map_segment() -> Option<&'static Run> {
    let base = os::map_aligned(SEGMENT, SEGMENT)?.as_ptr();
    // SAFETY: the segment's whole mapping, just made.
    unsafe { os::advise_huge(base, SEGMENT) };
    // SAFETY: a fresh, zeroed, SEGMENT-aligned mapping of SEGMENT bytes; zero bytes are a
    // valid `Segment` (false, 0, Cells of 0 and null, Kind::Free = 0), so the header can be
    // used in place; this thread is its only user until `add_segment`.
    let seg: &'static Segment = unsafe { &*(base as *const Segment) };
    let header = &seg.runs[0];
    header.kind.set(Kind::Header);
    header.pages.set(HEADER_PAGES as u32);
    let run = &seg.runs[HEADER_PAGES];
    run.pages.set(USABLE_PAGES as u32);
    run.zeroed.set(true);
    seg.back[PAGES - 1].set((USABLE_PAGES - 1) as u16);
    Some(run)
}

/// A run of `pages` pages for a slab or a large block, aligned to `align` bytes
/// (`PAGE <= align <= MAX_ALIGN`). Returns the run and whether its pages read as zero.
pub(crate) fn alloc_run(pages: usize, align: usize, kind: Kind) -> Option<(&'static Run, bool)> {
    debug_assert!((1..=USABLE_PAGES).contains(&pages) && kind != Kind::Free);
    let slack = align / PAGE - 1;
    if pages + slack > USABLE_PAGES {
        return None;
    }
    let mut st = RUNS.lock();
    let run = match st.take_fit(pages + slack) {
        Some(run) => run,
        None => {
            drop(st);
            let run = map_segment()?;
            st = RUNS.lock();
            st.add_segment(run)
        }
    };
    let run = if slack > 0 {
        st.align_front(run, align)
    } else {
        run
    };
    Some(st.take_front(run, pages, kind))
}

/// A large run of `pages` pages for a block that `realloc` is growing and could not grow in
/// place: at the front of a free run of at least [`GROWING_ROOM`] times as many pages when
/// there is one, so that the block goes on growing in place into the free pages after it
/// (which stay free for anyone meanwhile); else where [`alloc_run`] puts any run. The best
/// fit would put it in the smallest hole that holds it, from which the next step of its
/// growth must move it again.
pub(crate) fn alloc_growing(pages: usize) -> Option<(&'static Run, bool)> {
    debug_assert!((1..=USABLE_PAGES).contains(&pages));
    let room = (pages * GROWING_ROOM).min(USABLE_PAGES);
    {
        let mut st = RUNS.lock();
        if let Some(run) = st.take_fit(room) {
            return Some(st.take_front(run, pages, Kind::Large));
        }
    }
    alloc_run(pages, PAGE, Kind::Large)
}

/// How many times its size a free run must hold for [`alloc_growing`] to put a growing block
/// at its front.
pub(crate) const GROWING_ROOM: usize = 4;

/// Purges the dirty runs that are due (see the module docs), if any are and the run lock is
/// free (its holder purges on its way out). For the slow paths above this layer.
pub(crate) fn decay_if_due() {
    let due = NEXT_DUE.load(Ordering::Relaxed);
    if due == u64::MAX {
        return;
    }
    let now = os::now_ms();
    if now < due {
        return;
    }
    if let Some(mut st) = RUNS.try_lock() {
        st.decay(now);
    }
}

/// Returns an allocated run's pages.
pub(crate) fn free_run(run: &'static Run) {
    debug_assert!(matches!(run.kind(), Kind::Slab | Kind::Large));
    RUNS.lock().release(run);
}

/// Grows a large run in place to at least `pages` pages if the pages after it are free.
///
/// It takes up to a quarter more while they are free: a *reserve*, not charged (the block's
/// owner charges only what it grows into) and not touched, so that a block grown a few
/// pages at a time, a `realloc` per step, comes here about once per quarter of growth and
/// its other steps fit the run without the lock. A reserve wastes at most what a slab class
/// does (a quarter), never takes the run past [`LARGE_MAX`], and goes back with the block,
/// freed or shrunk.
pub(crate) fn grow_in_place(run: &'static Run, pages: usize) -> bool {
    let head = head_of(run as *const Run as *const u8);
    let first = head.page_of(run);
    let have = run.pages();
    if pages <= have {
        return true;
    }
    if first + pages > PAGES {
        return false;
    }
    let mut st = RUNS.lock();
    let next = head.run_at(first + have);
    if next.kind() != Kind::Free || have + next.pages() < pages {
        return false;
    }
    let pages = (pages + pages / 4)
        .min(LARGE_MAX / PAGE)
        .min(have + next.pages())
        .max(pages);
    st.unlink(next);
    // Take the pages needed from the front of `next` (`carve` returns the rest to a bin),
    // then merge them into `run`: only a run's first and last `back` entries matter.
    st.carve(next, pages - have, Kind::Large);
    run.pages.set(pages as u32);
    head.segment().back[first + pages - 1].set((pages - 1) as u16);
    true
}

/// Shrinks a large run in place to `pages` pages, freeing the tail.
pub(crate) fn shrink_in_place(run: &'static Run, pages: usize) {
    let have = run.pages();
    if pages >= have {
        return;
    }
    let head = head_of(run as *const Run as *const u8);
    let first = head.page_of(run);
    let seg = head.segment();
    let mut st = RUNS.lock();
    run.pages.set(pages as u32);
    seg.back[first + pages - 1].set((pages - 1) as u16);
    let tail = &seg.runs[first + pages];
    tail.kind.set(Kind::Large);
    tail.pages.set((have - pages) as u32);
    seg.back[first + pages].set(0);
    seg.back[first + have - 1].set((have - pages - 1) as u16);
    st.release(tail);
}

/// A huge block of at least `size` bytes aligned to `align`: a cached mapping it fits, else
/// a new one. Returns the head (with the object at `huge_object()`) and whether the object
/// reads as zero (a new mapping).
pub(crate) fn alloc_huge(size: usize, align: usize) -> Option<(&'static SegmentHead, bool)> {
    let offset = align.max(PAGE);
    let map_size = offset.checked_add(size.checked_next_multiple_of(PAGE)?)?;
    if map_size > isize::MAX as usize - SEGMENT {
        return None;
    }
    // The cache is looked at, and a new mapping's head written (its first page faulted in,
    // a huge page where the kernel gives one), outside the run lock's second hold.
    let cached = RUNS.lock().huge_cache.take(map_size);
    let (base, map_size, zeroed) = match cached {
        Some(c) => (c.base, c.size, false),
        None => {
            let base = os::map_aligned(map_size, SEGMENT)?.as_ptr();
            // SAFETY: the block's whole mapping, just made (a resize keeps the advice).
            unsafe { os::advise_huge(base, map_size) };
            (base, map_size, true)
        }
    };
    // SAFETY: a mapping of at least `map_size` bytes, SEGMENT-aligned, new (zeroed) or
    // cached by `free_huge` (its head still written); nothing else refers to it. Its first
    // bytes are the head.
    let head = unsafe { &mut *(base as *mut SegmentHead) };
    head.huge = true;
    head.map_size = map_size;
    head.offset = offset;
    let mut st = RUNS.lock();
    if zeroed {
        st.mapped_bytes += map_size;
    }
    st.huge_bytes += map_size;
    st.note_peak();
    Some((head, zeroed))
}

/// Frees a huge block: its mapping is cached for reuse (see [`HugeCache`]); the oldest
/// cached one is unmapped if the cache is full, and the cache is purged by age and bound
/// like free runs.
pub(crate) fn free_huge(head: &'static SegmentHead) {
    let (base, size) = (head.base() as *mut u8, head.map_size);
    let mut st = RUNS.lock();
    // Read under the lock, so that the cache stays in the order of the times.
    let now = os::now_ms();
    st.huge_bytes -= size;
    let evicted = st.huge_cache.push(Cached {
        base,
        size,
        since: now,
    });
    if let Some(c) = evicted {
        st.mapped_bytes -= c.size;
    }
    st.decay(now);
    drop(st);
    if let Some(c) = evicted {
        // SAFETY: a freed huge block's whole mapping, no longer cached: nothing refers to it.
        unsafe { os::unmap(c.base, c.size) };
    }
}

/// Resizes a huge block's mapping to hold `size` bytes from its object; moves the pages
/// (keeping the alignment) if it cannot grow in place. Returns the new head.
pub(crate) fn resize_huge(head: &'static SegmentHead, size: usize) -> Option<&'static SegmentHead> {
    let old = head.map_size;
    let new = head
        .offset
        .checked_add(size.checked_next_multiple_of(PAGE)?)?;
    let base = head.base() as *mut u8;
    // SAFETY: the mapping is this block's, whole, and SEGMENT-aligned.
    let moved = unsafe { os::remap_aligned(base, old, new, SEGMENT) }?;
    // SAFETY: the head moved with the mapping's first page; this thread owns the block.
    let head = unsafe { &mut *(moved.as_ptr() as *mut SegmentHead) };
    head.map_size = new;
    let mut st = RUNS.lock();
    st.mapped_bytes = st.mapped_bytes + new - old;
    st.huge_bytes = st.huge_bytes + new - old;
    st.note_peak();
    Some(head)
}

/// Bytes mapped for blocks and slabs (segments and huge mappings).
pub(crate) fn mapped_bytes() -> usize {
    RUNS.lock().mapped_bytes
}

/// Takes the run lock around `fork()` so the child does not inherit it held mid-change.
pub(crate) fn lock_for_fork() {
    core::mem::forget(RUNS.lock());
}

/// Releases the lock taken by [`lock_for_fork`], in the parent and in the child.
///
/// # Safety
/// Only after `lock_for_fork` on this thread (or in the child of the thread that did).
pub(crate) unsafe fn unlock_after_fork() {
    // SAFETY: as the caller promises, the lock is held by the fork protocol.
    unsafe { RUNS.force_unlock() };
}

/// Checks the free runs: each in the bin of its length, marked free, with its `back`
/// entries right, and with no free neighbour (free runs always coalesce). For tests.
pub(crate) fn check_invariants() -> Result<(), &'static str> {
    let st = RUNS.lock();
    let mut dirty = 0;
    for (b, &first) in st.bins.iter().enumerate() {
        let mut at = first;
        while !at.is_null() {
            // SAFETY: bin entries are free runs in mapped segments; the lock is held.
            let run = unsafe { &*at };
            if run.kind() != Kind::Free || bin_of(run.pages()) != b {
                return Err("a binned run is not free, or in the wrong bin");
            }
            let head = head_of(at as *const u8);
            let seg = head.segment();
            let p = head.page_of(run);
            let n = run.pages();
            if p < HEADER_PAGES || p + n > PAGES {
                return Err("a free run outside its segment's usable pages");
            }
            if seg.back[p].get() != 0 || seg.back[p + n - 1].get() as usize != n - 1 {
                return Err("a free run's back entries are wrong");
            }
            if p + n < PAGES && seg.runs[p + n].kind() == Kind::Free {
                return Err("two free runs are adjacent");
            }
            if !run.zeroed.get() {
                dirty += n;
            }
            at = run.next.get();
        }
    }
    if dirty != st.dirty_pages {
        return Err("dirty page count differs from the dirty free runs");
    }
    let cache = &st.huge_cache;
    let held = &cache.held[..cache.len];
    if held.iter().map(|c| c.size).sum::<usize>() != cache.bytes
        || held.windows(2).any(|w| w[0].since > w[1].since)
    {
        return Err("the huge cache's bytes or order are wrong");
    }
    let mut listed = 0;
    for (list, whole) in [(&st.dirty, false), (&st.empty, true)] {
        let (mut at, mut prev) = (list.head, ptr::null_mut());
        while !at.is_null() {
            // SAFETY: dirty lists hold free runs in mapped segments; the lock is held.
            let run = unsafe { &*at };
            if run.kind() != Kind::Free || run.zeroed.get() || run.dirty_prev.get() != prev {
                return Err("a dirty list holds a run that is not free and dirty, or is broken");
            }
            if (run.pages() == USABLE_PAGES) != whole {
                return Err("a dirty run is on the wrong dirty list");
            }
            listed += run.pages();
            prev = at;
            at = run.dirty_next.get();
        }
        if prev != list.tail {
            return Err("a dirty list's tail is not its last run");
        }
    }
    if listed != dirty {
        return Err("the dirty lists do not hold exactly the dirty free runs");
    }
    Ok(())
}

// SAFETY: the payload is plain bytes handed to the run's user; see `Run`.
unsafe impl Sync for Payload {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large run grown in place takes a quarter more than asked while the pages after it
    /// are free, and never more than `LARGE_MAX`; asking for pages inside the reserve takes
    /// none. (Other tests take runs meanwhile: an attempt whose pages were taken between the
    /// shrink and the growth is made again.)
    #[test]
    fn growing_in_place_takes_a_reserve_of_a_quarter() {
        let mut checked = false;
        for _ in 0..100 {
            let Some((run, _)) = alloc_run(PAGES / 2, PAGE, Kind::Large) else {
                continue;
            };
            let head = head_of(run as *const Run as *const u8);
            let first = head.page_of(run);
            shrink_in_place(run, 8);
            assert!(grow_in_place(run, 16));
            let got = run.pages();
            if got == 20 {
                assert!(grow_in_place(run, 18));
                assert_eq!(run.pages(), 20, "a growth inside the reserve took pages");
                if grow_in_place(run, LARGE_MAX / PAGE - 8) {
                    assert!(run.pages() <= LARGE_MAX / PAGE, "past LARGE_MAX");
                }
                checked = true;
            } else {
                // Under the lock: nobody takes or frees the pages after it meanwhile.
                let _st = RUNS.lock();
                let next = head.run_at(first + got);
                assert!(
                    next.kind() != Kind::Free,
                    "{got} pages taken for 16 with free pages after them"
                );
            }
            free_run(run);
            if checked {
                break;
            }
        }
        assert!(checked, "never had free pages after the run");
    }

    /// Runs taken, freed, grown and shrunk at random, with dirty runs purged as if a second
    /// had passed every few steps: a run in use is never purged (its bytes survive), and
    /// every invariant holds after every step.
    #[test]
    fn purging_never_touches_a_run_in_use() {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let mut rng = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut live: Vec<(&'static Run, usize, u8)> = Vec::new();
        let fill = |r: &Run, tag: u8| {
            let p = head_of(r as *const Run as *const u8).run_start(r);
            // SAFETY: the run is ours, `r.bytes()` long.
            unsafe { ptr::write_bytes(p, tag, r.bytes()) };
        };
        let intact = |r: &Run, tag: u8| {
            let p = head_of(r as *const Run as *const u8).run_start(r);
            // SAFETY: as in `fill`.
            (0..r.bytes())
                .step_by(PAGE)
                .all(|o| unsafe { p.add(o).read() } == tag)
        };
        let mut clock = os::now_ms();
        for step in 0..20_000u32 {
            let r = rng();
            match r % 8 {
                0..=3 => {
                    let pages = 1 + (r >> 8) as usize % if r % 5 == 0 { 600 } else { 24 };
                    let align = if r % 7 == 0 { 64 * PAGE } else { PAGE };
                    let kind = if r % 3 == 0 { Kind::Slab } else { Kind::Large };
                    if let Some((run, _)) = alloc_run(pages, align, kind) {
                        let tag = (step % 250) as u8 + 1;
                        fill(run, tag);
                        live.push((run, pages, tag));
                    }
                }
                4 | 5 if !live.is_empty() => {
                    let (run, _, tag) = live.swap_remove((r >> 8) as usize % live.len());
                    assert!(intact(run, tag), "a run in use was purged (step {step})");
                    free_run(run);
                }
                6 if !live.is_empty() => {
                    let i = (r >> 8) as usize % live.len();
                    let (run, pages, tag) = live[i];
                    if run.kind() == Kind::Large {
                        let want = pages + 1 + (r >> 20) as usize % 8;
                        if grow_in_place(run, want) {
                            fill(run, tag);
                            live[i].1 = want;
                        } else if pages > 1 {
                            shrink_in_place(run, pages / 2);
                            live[i].1 = pages / 2;
                        }
                    }
                }
                _ => {
                    // As if a second had passed: everything dirty is due.
                    clock += PURGE_DELAY_MS;
                    RUNS.lock().decay(clock);
                }
            }
            for &(run, _, tag) in live.iter().rev().take(3) {
                assert!(intact(run, tag), "a run in use was purged (step {step})");
            }
            if step % 64 == 0 {
                check_invariants().unwrap();
            }
        }
        for (run, _, tag) in live {
            assert!(intact(run, tag));
            free_run(run);
        }
        check_invariants().unwrap();
    }
}
