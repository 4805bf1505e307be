//! L2: the lock-free list other threads free a slab's objects into, and the stack of slabs
//! handed back to their owner.
//!
//! A slab's remote list is one word: the head of a list of freed objects (linked through
//! their first word) in the high bits, and a state in the low two bits (objects are at least
//! 8-byte aligned):
//!
//! | state | meaning | a remote free… |
//! |---|---|---|
//! | `NORMAL` | the owner will look at this slab again | pushes the object |
//! | `PARKED` | the owner set the slab aside as full and will not look again | pushes the object, sets `NOTIFIED`, and hands the slab back to the owner |
//! | `NOTIFIED` | the slab was handed back; the owner will collect it | pushes the object |
//!
//! Park and notify race on the same word, so exactly one of them wins: either the owner
//! parks an empty list, and the first free after it hands the slab back, or a free lands
//! first and the owner collects it instead of parking. A slab is therefore never stranded
//! full of free objects. The owner takes the whole list with one swap, which also resets
//! the state to `NORMAL`.
//!
//! Ordering: a pusher writes the object's link and then publishes it with a Release CAS;
//! the owner's Acquire swap makes every link it walks visible.

use crate::sync::{AtomicPtr, AtomicUsize, Ordering};
use core::ptr;

const STATE: usize = 0b11;
const NORMAL: usize = 0;
const PARKED: usize = 1;
const NOTIFIED: usize = 2;

/// A free object, linked through its first word.
#[repr(C)]
pub(crate) struct Block {
    pub(crate) next: *mut Block,
}

/// The remote-free word of one slab.
pub(crate) struct RemoteList {
    word: AtomicUsize,
}

impl RemoteList {
    pub(crate) const fn new() -> Self {
        RemoteList {
            word: AtomicUsize::new(NORMAL),
        }
    }

    /// Pushes a freed object. Returns true if the slab was parked: the caller must then
    /// hand the slab back to its owner (exactly one pusher gets true per parking).
    ///
    /// # Safety
    /// `block` is a freed object of this slab that nobody else uses, at least 8-aligned.
    #[inline]
    pub(crate) unsafe fn push(&self, block: *mut Block) -> bool {
        let mut cur = self.word.load(Ordering::Relaxed);
        loop {
            let state = cur & STATE;
            // SAFETY: the caller owns `block`; the link is published by the CAS below.
            unsafe { (*block).next = (cur & !STATE) as *mut Block };
            let new_state = if state == PARKED { NOTIFIED } else { state };
            match self.word.compare_exchange_weak(
                cur,
                block as usize | new_state,
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return state == PARKED,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Owner: takes every object freed remotely (null if none) and resets the state.
    #[inline]
    pub(crate) fn take(&self) -> *mut Block {
        if self.word.load(Ordering::Relaxed) & !STATE == 0 {
            // Nothing to take; keep a PARKED/NOTIFIED state as it is.
            return ptr::null_mut();
        }
        (self.word.swap(NORMAL, Ordering::Acquire) & !STATE) as *mut Block
    }

    /// Owner: sets a full slab aside. Fails (returns false) if an object was freed into it
    /// meanwhile; the owner then takes that instead.
    pub(crate) fn park(&self) -> bool {
        self.word
            .compare_exchange(NORMAL, PARKED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Owner: takes a parked slab back before any remote free. Fails if a remote free
    /// already handed it back (it is then on, or on its way to, the returned stack).
    pub(crate) fn unpark(&self) -> bool {
        self.word
            .compare_exchange(PARKED, NORMAL, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
    }

    /// Owner: resets a handed-back slab to `NORMAL`, taking what was freed into it.
    pub(crate) fn take_returned(&self) -> *mut Block {
        (self.word.swap(NORMAL, Ordering::Acquire) & !STATE) as *mut Block
    }
}

/// A Treiber stack of items handed back to an owner; many pushers, one taker that takes
/// everything at once (so no ABA: nothing is ever popped singly).
pub(crate) struct ReturnStack<T> {
    head: AtomicPtr<T>,
}

/// Items kept on a [`ReturnStack`] link through a field of their own.
pub(crate) trait Linked {
    /// # Safety
    /// `this` must point to a live item.
    unsafe fn set_link(this: *mut Self, next: *mut Self);
    /// # Safety
    /// `this` must point to a live item.
    unsafe fn link(this: *mut Self) -> *mut Self;
}

impl<T: Linked> ReturnStack<T> {
    pub(crate) const fn new() -> Self {
        ReturnStack {
            head: AtomicPtr::new(ptr::null_mut()),
        }
    }

    /// # Safety
    /// `item` is live and on no stack.
    pub(crate) unsafe fn push(&self, item: *mut T) {
        let mut cur = self.head.load(Ordering::Relaxed);
        loop {
            // SAFETY: the caller hands `item` over; the link is published by the CAS.
            unsafe { T::set_link(item, cur) };
            match self
                .head
                .compare_exchange_weak(cur, item, Ordering::Release, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Takes every item (null if none); walk them with [`Linked::link`].
    #[inline]
    pub(crate) fn take_all(&self) -> *mut T {
        if self.head.load(Ordering::Relaxed).is_null() {
            return ptr::null_mut();
        }
        self.head.swap(ptr::null_mut(), Ordering::Acquire)
    }
}
