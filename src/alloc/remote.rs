//! L2: frees from other threads, batched: a thread that frees objects of another thread's
//! heap gathers them in an *outbox* for that heap and hands them over a batch at a time
//! into the heap's *inbox*, one compare-and-swap per batch rather than per object.
//!
//! ```text
//! freeing thread                              owning heap
//! outboxes[hash(heap)]: head → … → tail       inbox: LANES words, each a stack of chains
//!   add(object): link it, count it  (plain)
//!   flush(): tail.next = lane; CAS lane ─────▶ take(): swap each lane that holds a chain
//!            head (Release); next lane           with null (Acquire), then walk the chains
//!                                                side by side, freeing each object into
//!                                                its slab
//! ```
//!
//! A batch goes out when it holds [`BATCH`] objects, when its outbox is wanted for another
//! heap, at the freeing thread's next slow path (a bin refill), and when the thread exits.
//! So a thread holds at most `OUTBOXES × (BATCH − 1)` objects of other heaps between its
//! slow paths; they stay counted in their slabs' `used` meanwhile, which is all the owner
//! needs to know (the charge was already given back when the object was freed).
//!
//! Why lanes: the owner reads each object's link to find the next, and the objects are
//! wherever the program freed them, in its order, rarely in this core's cache. One chain
//! is a walk of dependent loads, one memory latency per object (a program that frees a
//! million strings of a pool's threads, sorted, made the pool threads spend more time
//! walking than allocating). An outbox sends its batches to the lanes in turn, so the
//! owner walks [`LANES`] chains at once and keeps that many loads in flight.
//!
//! Each lane is a Treiber stack whose only consumer takes everything at once, so there is
//! no ABA. Ordering: a freeing thread writes the chain's links, then publishes the chain
//! with a Release CAS; the owner's Acquire swap makes every link it walks visible.

use crate::sync::{AtomicPtr, Ordering};
use core::cell::Cell;
use core::ptr;

/// Objects an outbox gathers before it hands them over: one CAS per 64 remote frees.
pub(crate) const BATCH: u32 = 64;

/// A free object, linked through its first word.
#[repr(C)]
pub(crate) struct Block {
    pub(crate) next: *mut Block,
}

/// Chains an inbox keeps apart, so that its owner can walk them side by side (see the
/// module docs): eight words, one cache line. Two under loom.
#[cfg(not(beancounter_loom))]
pub(crate) const LANES: usize = 8;
#[cfg(beancounter_loom)]
pub(crate) const LANES: usize = 2;

/// What [`Inbox::take`] hands the owner: the chains it took, at the front of the array,
/// and how many there are.
pub(crate) type Lanes = ([*mut Block; LANES], usize);

/// A heap's inbox: chains of objects other threads freed, for the owner to take back.
pub(crate) struct Inbox {
    lanes: [AtomicPtr<Block>; LANES],
}

impl Inbox {
    #[cfg(not(beancounter_loom))]
    pub(crate) const fn new() -> Self {
        Inbox {
            lanes: [const { AtomicPtr::new(ptr::null_mut()) }; LANES],
        }
    }

    #[cfg(beancounter_loom)]
    pub(crate) fn new() -> Self {
        Inbox {
            lanes: core::array::from_fn(|_| AtomicPtr::new(ptr::null_mut())),
        }
    }

    /// Pushes the chain `first..=last` (linked through `Block::next`) onto lane
    /// `lane % LANES`.
    ///
    /// # Safety
    /// The chain is freed objects, 8-aligned, that nobody else uses, and `last` ends it.
    pub(crate) unsafe fn push(&self, lane: usize, first: *mut Block, last: *mut Block) {
        let head = &self.lanes[lane % LANES];
        let mut cur = head.load(Ordering::Relaxed);
        loop {
            // SAFETY: the caller owns the chain; the link is published by the CAS below.
            unsafe { (*last).next = cur };
            match head.compare_exchange_weak(cur, first, Ordering::Release, Ordering::Relaxed) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Owner: every object handed over so far, one chain per lane that held any (linked
    /// through `next`); a count of 0 if there was none.
    #[inline]
    pub(crate) fn take(&self) -> Lanes {
        let mut taken = [ptr::null_mut(); LANES];
        let mut n = 0;
        for lane in &self.lanes {
            if !lane.load(Ordering::Relaxed).is_null() {
                taken[n] = lane.swap(ptr::null_mut(), Ordering::Acquire);
                n += 1;
            }
        }
        (taken, n)
    }
}

/// Asks the CPU to start loading the line of `b` (any pointer, null included: a prefetch
/// never faults and changes nothing the program can see).
#[inline(always)]
pub(crate) fn prefetch(b: *const Block) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: PREFETCHT0 is a hint: it reads nothing architecturally and never faults,
    // whatever the address; SSE is part of the x86_64 baseline.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(b.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = b;
}

/// A freeing thread's batch of objects for one heap. Used only by the thread that owns
/// the heap the outbox belongs to.
pub(crate) struct Outbox {
    /// The heap the batch is for (its inbox), or null.
    dest: Cell<*const Inbox>,
    head: Cell<*mut Block>,
    tail: Cell<*mut Block>,
    count: Cell<u32>,
    /// The lane the next batch goes to: they take the lanes in turn.
    lane: Cell<u32>,
}

impl Outbox {
    pub(crate) const fn new() -> Self {
        Outbox {
            dest: Cell::new(ptr::null()),
            head: Cell::new(ptr::null_mut()),
            tail: Cell::new(ptr::null_mut()),
            count: Cell::new(0),
            lane: Cell::new(0),
        }
    }

    /// The inbox this outbox gathers for (null if none).
    #[inline]
    pub(crate) fn dest(&self) -> *const Inbox {
        self.dest.get()
    }

    /// Adds freed object `block` for `dest`, which must be this outbox's destination or, if
    /// the outbox is empty, becomes it. Returns true when the batch is full: flush it.
    ///
    /// # Safety
    /// `block` is a freed object, 8-aligned, of a slab of the heap `dest` belongs to, that
    /// nobody else uses; `dest` lives for good.
    #[inline]
    pub(crate) unsafe fn add(&self, dest: *const Inbox, block: *mut Block) -> bool {
        debug_assert!(self.count.get() == 0 || self.dest.get() == dest);
        let n = self.count.get();
        // SAFETY: the caller gives `block` up; it joins this thread's private chain.
        unsafe { (*block).next = self.head.get() };
        if n == 0 {
            self.tail.set(block);
            self.dest.set(dest);
        }
        self.head.set(block);
        self.count.set(n + 1);
        n + 1 >= BATCH
    }

    /// Is nothing waiting here?
    #[inline]
    pub(crate) fn is_empty(&self) -> bool {
        self.count.get() == 0
    }

    /// Hands the batch to its heap's inbox; the outbox is empty afterwards.
    pub(crate) fn flush(&self) {
        if self.count.get() == 0 {
            return;
        }
        // SAFETY: the chain is objects this thread freed for `dest` (see `add`), linked by
        // `add` from `head` to `tail`; inboxes live for good.
        unsafe {
            (*self.dest.get()).push(self.lane.get() as usize, self.head.get(), self.tail.get())
        };
        self.lane.set(self.lane.get().wrapping_add(1));
        self.count.set(0);
        self.head.set(ptr::null_mut());
        self.tail.set(ptr::null_mut());
    }
}
