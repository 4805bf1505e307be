//! L3: per-thread heaps. One bin per size class, each with a current slab and a queue of
//! slabs that have free objects; refill from objects other threads freed, the queue, a
//! spare slab, or a new run; abandon at thread exit and reclaim by live threads.
//!
//! Call tree of a small allocation:
//!
//! ```text
//! alloc(class)                      fast: TLS heap → bin.cur → Slab::pop (no atomic RMW)
//! └─ alloc_slow(heap, class)        cold
//!    ├─ heap is EMPTY  → Uninit (the caller starts the thread: init_current)
//!    ├─ heap is DEAD   → the shared heap, under its lock
//!    └─ Heap::refill(class)
//!       ├─ run::decay_if_due()      purge runs freed a second ago (rarely anything)
//!       ├─ flush_outboxes()         hand other heaps the objects this thread freed of theirs
//!       ├─ take_inbox()             take back what other threads freed of ours
//!       ├─ cur, else next partial   a full slab goes on no list until a free reaches it
//!       ├─ spare, else reclaim_abandoned() and Slab::create()   a new run
//! ```
//!
//! A free by the owning thread pushes onto the slab's free list. A free by any other
//! thread goes into that thread's outbox for the owning heap, and a batch at a time into
//! the owner's inbox (`remote.rs`): one CAS per batch. The owner takes its inbox at its next
//! refill and frees each object as if locally.
//!
//! Thread exit ([`abandon_current`]): the outboxes are flushed, empty slabs go back to the
//! run layer, the rest stay with the heap, which goes on the abandoned list; a new thread
//! adopts an abandoned heap whole before making a new one, and live threads take
//! abandoned heaps' inboxes (returning emptied slabs) whenever they need a new slab.
//! Objects in abandoned slabs stay valid and can be freed from anywhere.

use super::page_map;
use super::remote::{self, Block, Inbox, Outbox};
use super::run::{self, Kind};
use super::size_class::NUM_CLASSES;
use super::slab::{self, Place, Slab};
use crate::os::PAGE;
use crate::sync::{AtomicBool, Mutex, Ordering};
use core::cell::Cell;
use core::ptr::{self, NonNull};

struct Bin {
    /// The slab allocations come from; `slab::EMPTY` when none.
    cur: Cell<*const Slab>,
    /// Slabs with free objects, oldest first (doubly linked through `Slab::next/prev`): a
    /// queue, so a slab that a free just took off the full list waits behind the others
    /// and gathers more frees before it is used again.
    partial: Cell<*mut Slab>,
    partial_tail: Cell<*mut Slab>,
    /// Empty slabs kept for the next refills (linked through `Slab::next`), so that a class
    /// whose objects come and go in waves does not take and return runs each time.
    spare: Cell<*mut Slab>,
}

impl Bin {
    const fn new() -> Bin {
        Bin {
            cur: Cell::new(&slab::EMPTY),
            partial: Cell::new(ptr::null_mut()),
            partial_tail: Cell::new(ptr::null_mut()),
            spare: Cell::new(ptr::null_mut()),
        }
    }

    /// Gives every spare slab back to the run layer; returns their bytes.
    fn drop_spares(&self) -> usize {
        let mut bytes = 0;
        while let Some(s) = self.pop_spare() {
            bytes += s.run_bytes();
            s.destroy();
        }
        bytes
    }

    fn pop_spare(&self) -> Option<&'static Slab> {
        let s = ptr_ref(self.spare.get())?;
        self.spare.set(s.next.get());
        Some(s)
    }

    /// Appends `s` to the partial queue.
    fn push_partial(&self, s: &Slab) {
        let me = s as *const Slab as *mut Slab;
        s.place.set(Place::Partial);
        s.next.set(ptr::null_mut());
        s.prev.set(self.partial_tail.get());
        match ptr_ref(self.partial_tail.get()) {
            Some(tail) => tail.next.set(me),
            None => self.partial.set(me),
        }
        self.partial_tail.set(me);
    }

    fn remove_partial(&self, s: &Slab) {
        debug_assert_eq!(s.place.get(), Place::Partial);
        match ptr_ref(s.prev.get()) {
            Some(prev) => prev.next.set(s.next.get()),
            None => self.partial.set(s.next.get()),
        }
        match ptr_ref(s.next.get()) {
            Some(next) => next.prev.set(s.prev.get()),
            None => self.partial_tail.set(s.prev.get()),
        }
    }

    fn pop_partial(&self) -> Option<&'static Slab> {
        let s = ptr_ref(self.partial.get())?;
        self.remove_partial(s);
        Some(s)
    }
}

/// Slabs linked from a heap are live runs; a null link is the end of a list.
fn ptr_ref(p: *const Slab) -> Option<&'static Slab> {
    // SAFETY: every non-null slab pointer kept in a bin list points to the metadata of a
    // slab run that is not freed while it is linked.
    unsafe { p.as_ref() }
}

/// Outboxes per heap: frees of objects of up to eight other heaps at a time are batched
/// (a consumer thread usually frees for one or two producers).
const OUTBOXES: usize = 8;

/// The outbox of a heap for objects of heap `owner`.
#[inline]
fn outbox_index(owner: usize) -> usize {
    // Heaps are page-aligned runs: mix the bits above the page offset.
    ((owner >> 12) ^ (owner >> 21)) % OUTBOXES
}

/// Bytes of empty slabs a heap keeps for reuse before it gives them back to the run layer:
/// the hysteresis that keeps a workload whose objects come and go in waves (1000 objects of
/// one class freed and taken again, in `benches/alloc.rs` `small_lifo`) off the run lock.
const SPARE_BYTES: usize = 1 << 20;

/// A thread's heap.
pub(crate) struct Heap {
    bins: [Bin; NUM_CLASSES],
    /// Bytes of the slabs on the bins' spare lists.
    spare_bytes: Cell<usize>,
    /// Objects this thread freed of other heaps, batched per heap.
    outboxes: [Outbox; OUTBOXES],
    /// Link on the abandoned list.
    next_abandoned: Cell<*mut Heap>,
    /// Objects of this heap other threads freed; on its own cache line, which they write.
    inbox: Padded<Inbox>,
}

/// Keeps what other threads write off the owner's lines.
#[repr(align(64))]
struct Padded<T>(T);

// SAFETY: a heap's cells are used by its one owner thread (or under the lock that makes a
// thread its temporary owner: the shared heap's, or the abandoned list's); `inbox` is a
// lock-free stack.
unsafe impl Sync for Heap {}

impl Heap {
    const fn new() -> Heap {
        Heap {
            bins: [const { Bin::new() }; NUM_CLASSES],
            spare_bytes: Cell::new(0),
            outboxes: [const { Outbox::new() }; OUTBOXES],
            next_abandoned: Cell::new(ptr::null_mut()),
            inbox: Padded(Inbox::new()),
        }
    }

    fn id(&self) -> usize {
        self as *const Heap as usize
    }

    /// Maps a new heap (metadata: not charged to anyone).
    fn create() -> Option<&'static Heap> {
        let pages = core::mem::size_of::<Heap>().div_ceil(PAGE);
        let (run, _) = run::alloc_run(pages, PAGE, Kind::Large)?;
        let at = run::head_of(run as *const run::Run as *const u8).run_start(run) as *mut Heap;
        // SAFETY: a fresh run of enough pages, page-aligned, used by nothing else.
        unsafe {
            at.write(Heap::new());
            Some(&*at)
        }
    }

    /// Owner: an object of `class`, and whether it reads as zero.
    #[inline]
    fn alloc(&self, class: usize) -> Option<(NonNull<u8>, &'static Slab, bool)> {
        let s = self.bins[class].cur.get();
        // SAFETY: `cur` is `slab::EMPTY` or a live slab owned by this heap.
        let s: &'static Slab = unsafe { &*s };
        match s.pop() {
            Some((p, zeroed)) => Some((p, s, zeroed)),
            None => self.refill(class),
        }
    }

    #[cold]
    #[inline(never)]
    fn refill(&self, class: usize) -> Option<(NonNull<u8>, &'static Slab, bool)> {
        // A slow path: the time to give back memory that has not been used for a while,
        // and to trade objects freed across threads.
        run::decay_if_due();
        self.flush_outboxes();
        self.take_inbox();
        let bin = &self.bins[class];
        let cur = ptr_ref(bin.cur.replace(&slab::EMPTY)).filter(|s| !ptr::eq(*s, &slab::EMPTY));
        // The current slab first (objects taken back from the inbox may be in it), then
        // slabs with free objects. A partial slab can turn out full: a heap adopted from an
        // exited thread has its current slabs on the partial queues.
        for s in cur
            .into_iter()
            .chain(core::iter::from_fn(|| bin.pop_partial()))
        {
            if let Some((p, z)) = s.pop() {
                s.place.set(Place::Current);
                bin.cur.set(s);
                return Some((p, s, z));
            }
            s.place.set(Place::Full);
        }
        let s = match bin.pop_spare() {
            Some(spare) => {
                self.spare_bytes
                    .set(self.spare_bytes.get() - spare.run_bytes());
                spare
            }
            None => {
                reclaim_abandoned();
                Slab::create(class, self.id())?
            }
        };
        s.place.set(Place::Current);
        bin.cur.set(s);
        s.pop().map(|(p, z)| (p, s, z))
    }

    /// Owner: an empty slab (already off every list) goes on its bin's spare list, or back
    /// to the run layer once the heap keeps `SPARE_BYTES` of spares.
    fn retire(&self, s: &'static Slab) {
        let bytes = s.run_bytes();
        if self.spare_bytes.get() + bytes > SPARE_BYTES {
            s.destroy();
            return;
        }
        let bin = &self.bins[s.class()];
        s.place.set(Place::Spare);
        s.next.set(bin.spare.get());
        bin.spare.set(s as *const Slab as *mut Slab);
        self.spare_bytes.set(self.spare_bytes.get() + bytes);
    }

    /// Owner: frees, into their slabs, the objects other threads handed over. The chains are
    /// walked side by side, one object of each in turn, and the next object of a chain is
    /// prefetched when its link is read: the loads of the chains overlap (`remote.rs`). A
    /// chain that ends leaves the walk.
    fn take_inbox(&self) {
        let (mut chains, mut live) = self.inbox.0.take();
        while live > 0 {
            let mut i = 0;
            while i < live {
                let p = chains[i];
                // SAFETY: the inbox holds freed objects of this heap's slabs, linked by the
                // threads that freed them and published to this owner (see `remote.rs`).
                // The link is read before the free below reuses it.
                let next = unsafe { (*p).next };
                remote::prefetch(next);
                if next.is_null() {
                    live -= 1;
                    chains[i] = chains[live];
                } else {
                    chains[i] = next;
                    i += 1;
                }
                let s = page_map::slab_of(p as *const u8);
                self.free_local(s, p.cast());
            }
        }
    }

    /// Hands every outbox's batch to its heap.
    fn flush_outboxes(&self) {
        for ob in &self.outboxes {
            ob.flush();
        }
    }

    /// Frees object `p` of slab `s`, which another heap owns: into this heap's outbox for
    /// that heap.
    #[inline]
    fn free_remote(&self, s: &'static Slab, owner: usize, p: *mut u8) {
        // SAFETY: slab owners are heaps from `Heap::create`, never unmapped.
        let dest = unsafe { &(*(owner as *const Heap)).inbox.0 } as *const Inbox;
        let ob = &self.outboxes[outbox_index(owner)];
        if ob.dest() != dest && !ob.is_empty() {
            ob.flush();
        }
        debug_assert!(ptr::eq(page_map::slab_of(p), s));
        // SAFETY: `p` is a freed object of `s`, whose heap's inbox is `dest` (classes are
        // multiples of 8, so it is 8-aligned), given up by the caller.
        if unsafe { ob.add(dest, p.cast::<Block>()) } {
            ob.flush();
        }
    }

    /// Owner: takes back an object of its own slab.
    #[inline]
    fn free_local(&self, s: &'static Slab, p: *mut u8) {
        // SAFETY: `p` is an object of `s` in use, and this heap owns `s`.
        let used = unsafe { s.push_local(p) };
        // The current slab stays where it is, empty or not: a request that frees all it
        // allocated empties several current slabs, which must not each cost a call. (Tested
        // after `used`, so that a free into a slab that stays in use reads `place` once.)
        if (used == 0 || s.place.get() == Place::Full) && s.place.get() != Place::Current {
            self.free_local_slow(s, used);
        }
    }

    #[cold]
    #[inline(never)]
    fn free_local_slow(&self, s: &'static Slab, used: u32) {
        let bin = &self.bins[s.class()];
        match s.place.get() {
            // Not full any more: it has a free object.
            Place::Full => {
                if used == 0 {
                    self.retire(s);
                } else {
                    bin.push_partial(s);
                }
            }
            Place::Partial if used == 0 => {
                bin.remove_partial(s);
                self.retire(s);
            }
            // A partial slab that still holds objects stays queued.
            _ => {}
        }
    }

    /// Owner: hands over what this heap's thread freed of others, takes back what others
    /// freed of it, and gives empty slabs back; the current slabs join the partial queues
    /// (for a heap whose thread exited).
    fn collect_all(&self) {
        self.flush_outboxes();
        self.take_inbox();
        for bin in &self.bins {
            self.spare_bytes
                .set(self.spare_bytes.get() - bin.drop_spares());
            if let Some(cur) = ptr_ref(bin.cur.get()).filter(|s| !ptr::eq(*s, &slab::EMPTY)) {
                bin.cur.set(&slab::EMPTY);
                bin.push_partial(cur);
            }
            let mut at = bin.partial.get();
            while let Some(s) = ptr_ref(at) {
                at = s.next.get();
                if s.used() == 0 {
                    bin.remove_partial(s);
                    s.destroy();
                }
            }
        }
    }
}

/// The heap a thread starts with: all bins empty, so its first allocation takes the slow
/// path, which gives the thread a heap of its own.
static EMPTY_HEAP: Heap = Heap::new();
/// The heap of a thread that has exited (or is between exit and teardown): allocations go
/// to the shared heap.
static DEAD_HEAP: Heap = Heap::new();

thread_local! {
    static HEAP: Cell<*const Heap> = const { Cell::new(&EMPTY_HEAP) };
}

/// A heap pointer kept under a lock.
struct HeapPtr(*mut Heap);

// SAFETY: heaps are mapped for good and used by one thread at a time (the lock's holder).
unsafe impl Send for HeapPtr {}

/// Threads whose heap is gone use this one, under its lock.
static SHARED: Mutex<HeapPtr> = Mutex::new(HeapPtr(ptr::null_mut()));

/// Heaps of exited threads, linked through `next_abandoned`.
static ABANDONED: Mutex<HeapPtr> = Mutex::new(HeapPtr(ptr::null_mut()));
static ANY_ABANDONED: AtomicBool = AtomicBool::new(false);

#[inline]
fn current() -> &'static Heap {
    let h = HEAP.try_with(|h| h.get()).unwrap_or(&DEAD_HEAP);
    // SAFETY: the TLS holds `EMPTY_HEAP`, `DEAD_HEAP`, or a heap mapped by `Heap::create`,
    // which is never unmapped.
    unsafe { &*h }
}

/// Why a small allocation failed.
pub(crate) enum AllocError {
    /// The thread has no heap yet: call [`init_current`] and retry.
    Uninit,
    /// The OS refused memory.
    OutOfMemory,
}

/// An object of `class` for the current thread, tagged `tag` (`Slab::set_tag`), its slab,
/// and whether it reads as zero. The tag is set here rather than by the caller: an exiting
/// thread's object comes from the shared heap, whose slabs are the caller's to change only
/// while it holds that heap's lock.
#[inline]
pub(crate) fn alloc(
    class: usize,
    tag: u32,
) -> Result<(NonNull<u8>, &'static Slab, bool), AllocError> {
    match try_alloc(class) {
        Some(got) => {
            got.1.set_tag(got.0.as_ptr(), tag);
            Ok(got)
        }
        None => alloc_slow(current(), class, tag),
    }
}

/// Gives object `p` of slab `s`, which the current thread just allocated, tag `tag` (under
/// the shared heap's lock if the object is from the shared heap: see [`alloc`]). For the
/// heap profile's sampled objects.
#[cfg(feature = "profile")]
pub(crate) fn retag(s: &'static Slab, p: *const u8, tag: u32) {
    if ptr::eq(current(), &DEAD_HEAP) {
        let _shared = SHARED.lock();
        s.set_tag(p, tag);
    } else {
        s.set_tag(p, tag);
    }
}

/// The fast path of [`alloc`]: an object from the current slab of `class`, if it has one.
/// Calls nothing.
#[inline]
pub(crate) fn try_alloc(class: usize) -> Option<(NonNull<u8>, &'static Slab, bool)> {
    let s = current().bins[class].cur.get();
    // SAFETY: `cur` is `slab::EMPTY` or a live slab owned by this thread's heap.
    let s: &'static Slab = unsafe { &*s };
    s.pop().map(|(p, zeroed)| (p, s, zeroed))
}

#[cold]
#[inline(never)]
fn alloc_slow(
    heap: &'static Heap,
    class: usize,
    tag: u32,
) -> Result<(NonNull<u8>, &'static Slab, bool), AllocError> {
    if ptr::eq(heap, &EMPTY_HEAP) {
        return Err(AllocError::Uninit);
    }
    if ptr::eq(heap, &DEAD_HEAP) {
        let mut shared = SHARED.lock();
        if shared.0.is_null() {
            let h = Heap::create().ok_or(AllocError::OutOfMemory)?;
            shared.0 = h as *const Heap as *mut Heap;
        }
        // SAFETY: set above or earlier to a heap that is never unmapped; the lock makes this
        // thread its owner for the call.
        let h = unsafe { &*shared.0 };
        let got = h.alloc(class).ok_or(AllocError::OutOfMemory)?;
        // Still under the lock: whether the slab's sole tag can be taken over depends on its
        // `used`, which other exiting threads change under this lock.
        got.1.set_tag(got.0.as_ptr(), tag);
        return Ok(got);
    }
    let got = heap.refill(class).ok_or(AllocError::OutOfMemory)?;
    got.1.set_tag(got.0.as_ptr(), tag);
    Ok(got)
}

/// Frees object `p` of slab `s`, from any thread.
///
/// # Safety
/// `p` is an object of `s` in use, given up by the caller.
#[inline]
pub(crate) unsafe fn free(s: &'static Slab, p: *mut u8) {
    let heap = current();
    let owner = s.owner.load(Ordering::Relaxed);
    if owner == heap.id() {
        heap.free_local(s, p);
    } else {
        free_remote(heap, s, owner, p);
    }
}

#[inline(never)]
fn free_remote(heap: &'static Heap, s: &'static Slab, owner: usize, p: *mut u8) {
    if ptr::eq(heap, &EMPTY_HEAP) || ptr::eq(heap, &DEAD_HEAP) {
        // A thread without a heap of its own (not started, or exiting) has no outboxes
        // (those statics are shared): hand the object over alone.
        // SAFETY: slab owners are heaps from `Heap::create`, never unmapped; `p` is a
        // freed object of one of its slabs, 8-aligned, a chain of one.
        unsafe {
            let b = p.cast::<Block>();
            (*(owner as *const Heap))
                .inbox
                .0
                .push(p as usize >> 6, b, b);
        }
        return;
    }
    heap.free_remote(s, owner, p);
}

/// Gives the current thread a heap: an abandoned one if any, else a new one. Returns false
/// if the OS refused memory (the thread stays without a heap and may retry).
pub(crate) fn init_current() -> bool {
    // Allocations made while this runs (none are expected) use the shared heap.
    let _ = HEAP.try_with(|h| h.set(&DEAD_HEAP));
    let heap = pop_abandoned().or_else(Heap::create);
    let _ = HEAP.try_with(|h| h.set(heap.map_or(&EMPTY_HEAP as *const Heap, |h| h as *const Heap)));
    heap.is_some()
}

/// Thread exit: returns empty slabs, then leaves the heap for another thread to adopt.
/// Later allocations of this thread use the shared heap.
pub(crate) fn abandon_current() {
    let heap = current();
    let _ = HEAP.try_with(|h| h.set(&DEAD_HEAP));
    if ptr::eq(heap, &EMPTY_HEAP) || ptr::eq(heap, &DEAD_HEAP) {
        return;
    }
    heap.collect_all();
    let mut list = ABANDONED.lock();
    heap.next_abandoned.set(list.0);
    list.0 = heap as *const Heap as *mut Heap;
    ANY_ABANDONED.store(true, Ordering::Relaxed);
}

fn pop_abandoned() -> Option<&'static Heap> {
    if !ANY_ABANDONED.load(Ordering::Relaxed) {
        return None;
    }
    let mut list = ABANDONED.lock();
    // SAFETY: heaps on the list are mapped for good; the lock gives us the list.
    let heap = unsafe { list.0.as_ref()? };
    list.0 = heap.next_abandoned.get();
    ANY_ABANDONED.store(!list.0.is_null(), Ordering::Relaxed);
    Some(heap)
}

/// Collects the remote frees of one abandoned heap and gives its emptied slabs back, then
/// puts it back at the end of the list (so successive calls visit every heap).
fn reclaim_abandoned() {
    let Some(heap) = pop_abandoned() else { return };
    // Popped: this thread is the heap's only owner until it is pushed back.
    heap.collect_all();
    let mut list = ABANDONED.lock();
    heap.next_abandoned.set(ptr::null_mut());
    match last_of(list.0) {
        Some(last) => last.next_abandoned.set(heap as *const Heap as *mut Heap),
        None => list.0 = heap as *const Heap as *mut Heap,
    }
    ANY_ABANDONED.store(true, Ordering::Relaxed);
}

fn last_of(mut at: *mut Heap) -> Option<&'static Heap> {
    // SAFETY: heaps on the abandoned list are mapped for good; the caller holds its lock.
    let mut last = unsafe { at.as_ref()? };
    while let Some(next) = {
        at = last.next_abandoned.get();
        // SAFETY: as above.
        unsafe { at.as_ref() }
    } {
        last = next;
    }
    Some(last)
}

/// Takes the heap locks around `fork()`, in the order the allocation paths nest them: an
/// allocation of an exited thread holds `SHARED` while its refill reclaims `ABANDONED`.
pub(crate) fn lock_for_fork() {
    core::mem::forget(SHARED.lock());
    core::mem::forget(ABANDONED.lock());
}

/// Releases the locks taken by [`lock_for_fork`].
///
/// # Safety
/// Only after `lock_for_fork`, in the parent or the child.
pub(crate) unsafe fn unlock_after_fork() {
    // SAFETY: both were locked by `lock_for_fork` and their guards forgotten.
    unsafe {
        ABANDONED.force_unlock();
        SHARED.force_unlock();
    }
}

/// The owner's invariants of every slab of the current thread's heap (for tests).
pub(crate) fn check_current() -> Result<(), &'static str> {
    let heap = current();
    if ptr::eq(heap, &EMPTY_HEAP) || ptr::eq(heap, &DEAD_HEAP) {
        return Ok(());
    }
    heap.flush_outboxes();
    heap.take_inbox();
    for bin in &heap.bins {
        let mut at = bin.partial.get();
        while let Some(s) = ptr_ref(at) {
            s.check_invariants()?;
            at = s.next.get();
        }
        if let Some(cur) = ptr_ref(bin.cur.get()) {
            cur.check_invariants()?;
        }
    }
    Ok(())
}
