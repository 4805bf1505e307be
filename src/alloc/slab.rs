//! L2: a slab: one size class carved from a run, its free lists, and an owner tag per
//! object.
//!
//! Layout of a slab run (objects start on the run's first page, so a class whose size is a
//! multiple of an alignment up to 4 KiB serves that alignment):
//!
//! ```text
//! [ object 0 | object 1 | … | object cap-1 | tag 0 | … | tag cap-1 | (tail) ]
//! ```
//!
//! The `Slab` itself lives in the run's payload space in the segment header.
//!
//! A tag is 4 opaque bytes the layer above stores per object (the accounting owner); the
//! slab never interprets it. There is no header in front of objects.
//!
//! Objects are handed out from `free` (objects freed by the owner, or collected from the
//! remote list), then from `bump` (never used since the run was taken; these read as zero
//! when the run was fresh from the OS, so `alloc_zeroed` can skip clearing them).
//!
//! Invariant (owner's view; checked by [`Slab::check_invariants`]):
//! `used + |free| + (capacity - bump) + |remote| == capacity`, where `|remote|` is what
//! other threads freed and the owner has not collected yet.

use super::remote::{Block, Linked, RemoteList};
use super::run::RUN_PAYLOAD;
use super::run::{self, Run};
use super::size_class::{Class, CLASSES};
use crate::os::PAGE;
use crate::sync::AtomicUsize;
use core::cell::Cell;
use core::ptr::{self, NonNull};

/// Where a slab is, from its owner's point of view.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Place {
    /// Its bin's current slab.
    Current,
    /// On its bin's list of slabs with free objects.
    Partial,
    /// Set aside as full; a remote free hands it back.
    Parked,
    /// Empty, kept by its bin for the next refill.
    Spare,
}

/// A slab's metadata, in its run's payload space in the segment header.
#[repr(C, align(64))]
pub(crate) struct Slab {
    // Owner fields, read on every allocation and local free.
    free: Cell<*mut Block>,
    used: Cell<u32>,
    bump: Cell<u32>,
    capacity: u32,
    size: u32,
    magic: u64,
    base: *mut u8,
    tags: *mut u32,
    class: u8,
    /// Objects from `bump` on read as zero.
    fresh: Cell<bool>,
    pub(crate) place: Cell<Place>,
    /// Bin list links (owner).
    pub(crate) next: Cell<*mut Slab>,
    pub(crate) prev: Cell<*mut Slab>,
    // Shared fields, on their own cache line: other threads write them on remote frees.
    pub(crate) remote: RemoteList,
    /// Opaque owner identity (the owning heap's address), compared on free.
    pub(crate) owner: AtomicUsize,
    /// Link on the owner's stack of handed-back slabs.
    returned_next: Cell<*mut Slab>,
}

const _: () = assert!(core::mem::size_of::<Slab>() <= RUN_PAYLOAD);

// SAFETY: owner fields are used only by the owning thread (or under the lock that stands
// in for it); shared fields are atomics, or (`returned_next`) written only by the one
// thread that wins the right to hand the slab back, before publishing it.
unsafe impl Sync for Slab {}

impl Linked for Slab {
    unsafe fn set_link(this: *mut Self, next: *mut Self) {
        // SAFETY: the caller guarantees `this` is live.
        unsafe { (*this).returned_next.set(next) }
    }
    unsafe fn link(this: *mut Self) -> *mut Self {
        // SAFETY: the caller guarantees `this` is live.
        unsafe { (*this).returned_next.get() }
    }
}

/// The slab that owns nothing: every bin starts with it, so the allocation fast path needs
/// no null check (an empty slab simply fails over to the slow path).
pub(crate) static EMPTY: Slab = Slab {
    free: Cell::new(ptr::null_mut()),
    used: Cell::new(0),
    bump: Cell::new(0),
    capacity: 0,
    size: 0,
    magic: 0,
    base: ptr::null_mut(),
    tags: ptr::null_mut(),
    class: 0,
    fresh: Cell::new(false),
    place: Cell::new(Place::Current),
    next: Cell::new(ptr::null_mut()),
    prev: Cell::new(ptr::null_mut()),
    remote: RemoteList::new(),
    owner: AtomicUsize::new(0),
    returned_next: Cell::new(ptr::null_mut()),
};

impl Slab {
    /// Takes a run for a new slab of `class`, owned by `owner`.
    pub(crate) fn create(class: usize, owner: usize) -> Option<&'static Slab> {
        let k: &Class = &CLASSES[class];
        let (run, zeroed) = run::alloc_run(k.pages as usize, PAGE, run::Kind::Slab)?;
        let head = run::head_of(run as *const Run as *const u8);
        let base = head.run_start(run);
        // SAFETY: the run's payload space is RUN_PAYLOAD bytes, 64-aligned, and ours with the
        // run; the new slab is not yet reachable by anyone else.
        let slab = unsafe {
            let at = head.payload(run) as *mut Slab;
            at.write(Slab {
                free: Cell::new(ptr::null_mut()),
                used: Cell::new(0),
                bump: Cell::new(0),
                capacity: k.capacity,
                size: k.size,
                magic: k.magic,
                base,
                tags: base.add(k.capacity as usize * k.size as usize) as *mut u32,
                class: class as u8,
                fresh: Cell::new(zeroed),
                place: Cell::new(Place::Current),
                next: Cell::new(ptr::null_mut()),
                prev: Cell::new(ptr::null_mut()),
                remote: RemoteList::new(),
                owner: AtomicUsize::new(owner),
                returned_next: Cell::new(ptr::null_mut()),
            });
            &*at
        };
        Some(slab)
    }

    /// Gives the run back to the run layer. The slab must hold no object.
    pub(crate) fn destroy(&'static self) {
        debug_assert_eq!(self.used.get(), 0);
        let head = run::head_of(self.base);
        run::free_run(head.run_of(self.base));
    }

    #[inline]
    pub(crate) fn class(&self) -> usize {
        self.class as usize
    }

    #[inline]
    pub(crate) fn size(&self) -> usize {
        self.size as usize
    }

    /// Bytes of the slab's run.
    pub(crate) fn run_bytes(&self) -> usize {
        CLASSES[self.class as usize].pages as usize * PAGE
    }

    #[inline]
    pub(crate) fn used(&self) -> u32 {
        self.used.get()
    }

    /// Owner: an object, and whether it reads as zero.
    #[inline]
    pub(crate) fn pop(&self) -> Option<(NonNull<u8>, bool)> {
        let b = self.free.get();
        if !b.is_null() {
            // SAFETY: objects on `free` are freed objects of this slab, owned by the owner.
            self.free.set(unsafe { (*b).next });
            self.used.set(self.used.get() + 1);
            // SAFETY: `b` is non-null.
            return Some((unsafe { NonNull::new_unchecked(b.cast()) }, false));
        }
        let i = self.bump.get();
        if i < self.capacity {
            self.bump.set(i + 1);
            self.used.set(self.used.get() + 1);
            // SAFETY: `i < capacity`: the object lies inside the slab's object area, whose
            // base is a run address, non-null.
            let p =
                unsafe { NonNull::new_unchecked(self.base.add(i as usize * self.size as usize)) };
            return Some((p, self.fresh.get()));
        }
        None
    }

    /// Owner: takes back an object. Returns the number of objects still in use.
    ///
    /// # Safety
    /// `p` is an object of this slab in use, and the caller owns the slab.
    #[inline]
    pub(crate) unsafe fn push_local(&self, p: *mut u8) -> u32 {
        let b = p as *mut Block;
        // SAFETY: the object is being freed; its first word becomes the link.
        unsafe { (*b).next = self.free.get() };
        self.free.set(b);
        let used = self.used.get() - 1;
        self.used.set(used);
        used
    }

    /// Owner: moves objects freed by other threads onto `free`; returns how many.
    pub(crate) fn collect(&self) -> u32 {
        self.splice(self.remote.take())
    }

    /// Owner: the same for a slab handed back after parking.
    pub(crate) fn collect_returned(&self) -> u32 {
        self.splice(self.remote.take_returned())
    }

    fn splice(&self, list: *mut Block) -> u32 {
        if list.is_null() {
            return 0;
        }
        let mut n = 1;
        let mut tail = list;
        // SAFETY: the remote list holds freed objects of this slab, published with Release
        // and taken with Acquire; they are the owner's now.
        unsafe {
            while !(*tail).next.is_null() {
                tail = (*tail).next;
                n += 1;
            }
            (*tail).next = self.free.get();
        }
        self.free.set(list);
        self.used.set(self.used.get() - n);
        n
    }

    #[inline]
    fn index(&self, p: *const u8) -> usize {
        let off = (p as usize - self.base as usize) as u64;
        ((off * self.magic) >> 32) as usize
    }

    /// Stores the owner tag of object `p`.
    #[inline]
    pub(crate) fn set_tag(&self, p: *const u8, tag: u32) {
        // SAFETY: `p` is an object of this slab, so its index is below `capacity` and the
        // tag lies in the tag array; only the object's current holder touches its tag.
        unsafe { self.tags.add(self.index(p)).write(tag) }
    }

    /// The owner tag of object `p`.
    #[inline]
    pub(crate) fn tag(&self, p: *const u8) -> u32 {
        // SAFETY: as in `set_tag`; the tag was written when the object was handed out,
        // before the pointer reached whoever frees it.
        unsafe { self.tags.add(self.index(p)).read() }
    }

    /// The owner's invariant, for a slab whose remote list was just collected.
    pub(crate) fn check_invariants(&self) -> Result<(), &'static str> {
        let handed_out = self.base as usize + self.bump.get() as usize * self.size as usize;
        let mut free = 0u32;
        let mut b = self.free.get();
        while !b.is_null() {
            let off = b as usize - self.base as usize;
            if off % self.size as usize != 0 || b as usize >= handed_out {
                return Err("a free-list entry is not a handed-out object of its slab");
            }
            free += 1;
            if free > self.capacity {
                return Err("the free list has a cycle");
            }
            // SAFETY: checked above to be an object of this slab on the owner's free list.
            b = unsafe { (*b).next };
        }
        if self.used.get() + free + (self.capacity - self.bump.get()) != self.capacity {
            return Err("used + free + unbumped != capacity");
        }
        Ok(())
    }
}
