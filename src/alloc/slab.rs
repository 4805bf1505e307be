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
//! While every object in use carries the same tag, the slab keeps that one tag in `sole`
//! (its first cache line) and leaves the side array alone: a thread that works for one
//! tenant at a time never writes or reads a tag line. The first object handed out with
//! another tag while others are in use makes the slab *mixed*: the side array is filled
//! with the old tag, `sole` becomes [`MIXED`], and from then on every object's tag is in
//! the array, until the slab is empty again and the next object's tag becomes `sole`.
//!
//! Objects are handed out from `free` (objects freed by the owner, or by other threads
//! and taken back through the owner's inbox, see `remote.rs`), then from `bump` (never
//! used since the run was taken; these read as zero when the run was fresh from the OS, so
//! `alloc_zeroed` can skip clearing them). Only the owner touches the free list.
//!
//! Invariant (owner's view; checked by [`Slab::check_invariants`]):
//! `used + |free| + (capacity - bump) == capacity`, where `used` counts the objects other
//! threads freed and the owner has not taken back yet.

use super::remote::Block;
use super::run::RUN_PAYLOAD;
use super::run::{self, Run};
use super::size_class::{Class, CLASSES};
use crate::os::PAGE;
use crate::sync::{AtomicU32, AtomicUsize, Ordering};
use core::cell::Cell;
use core::ptr::{self, NonNull};

/// Where a slab is, from its owner's point of view.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Place {
    /// Its bin's current slab.
    Current,
    /// On its bin's list of slabs with free objects.
    Partial,
    /// Full: on no list until one of its objects is freed back to the owner.
    Full,
    /// Empty, kept by its bin for the next refill.
    Spare,
}

/// A slab's metadata, in its run's payload space in the segment header.
///
/// Two cache lines. The first holds what every free reads, from any thread, and nobody
/// writes while objects are out: the geometry, the owner's identity and the sole tag. The
/// second holds what the owner writes on every allocation and local free. So a thread
/// freeing another thread's objects reads a line that the owner, allocating meanwhile,
/// does not keep taking away from it (a producer → consumer pair would otherwise move the
/// line between cores on every object).
#[repr(C, align(64))]
pub(crate) struct Slab {
    // First line: what every free reads, never written while objects are out.
    base: *mut u8,
    tags: *mut u32,
    magic: u64,
    /// Opaque owner identity (the owning heap's address), compared on every free.
    pub(crate) owner: AtomicUsize,
    /// The tag of every object in use, or [`MIXED`] when the side array holds them. Written
    /// by the owner only; read by whoever frees an object.
    sole: AtomicU32,
    capacity: u32,
    size: u32,
    class: u8,
    _line: LineBreak,
    // Second line: what the owner writes.
    free: Cell<*mut Block>,
    used: Cell<u32>,
    bump: Cell<u32>,
    /// Objects from `bump` on read as zero.
    fresh: Cell<bool>,
    pub(crate) place: Cell<Place>,
    /// Bin list links (owner).
    pub(crate) next: Cell<*mut Slab>,
    pub(crate) prev: Cell<*mut Slab>,
}

/// A zero-sized field that starts a new cache line.
#[repr(align(64))]
struct LineBreak;

const _: () = assert!(core::mem::offset_of!(Slab, class) < 64);
const _: () = assert!(core::mem::offset_of!(Slab, free) >= 64);
const _: () = assert!(core::mem::size_of::<Slab>() <= RUN_PAYLOAD);

// SAFETY: owner fields are used only by the owning thread (or under the lock that stands
// in for it); the fields other threads read (`owner`, `sole`, and the constant geometry)
// are atomics or never change while the slab lives.
unsafe impl Sync for Slab {}

/// `sole` of a slab whose objects' tags are in the side array.
pub(crate) const MIXED: u32 = u32::MAX;
/// `sole` of a new slab: the first object's tag is taken as the slab's.
const UNTAGGED: u32 = u32::MAX - 1;

/// `sole` of the stand-in slab of a block of pages that a slab-sized layout names (see
/// [`Slab::mark_grown`]). Never a tag a stock entry holds, so its free leaves the fast path.
pub(crate) const GROWN: u32 = u32::MAX - 2;

/// The slab that owns nothing: every bin starts with it, so the allocation fast path needs
/// no null check (an empty slab simply fails over to the slow path).
pub(crate) static EMPTY: Slab = Slab::stand_in(UNTAGGED);

impl Slab {
    /// A slab of no objects and no run, whose one tag is `sole`.
    const fn stand_in(sole: u32) -> Slab {
        Slab {
            free: Cell::new(ptr::null_mut()),
            used: Cell::new(0),
            bump: Cell::new(0),
            capacity: 0,
            size: 0,
            magic: 0,
            base: ptr::null_mut(),
            tags: ptr::null_mut(),
            class: 0,
            _line: LineBreak,
            fresh: Cell::new(false),
            place: Cell::new(Place::Current),
            next: Cell::new(ptr::null_mut()),
            prev: Cell::new(ptr::null_mut()),
            owner: AtomicUsize::new(0),
            sole: AtomicU32::new(sole),
        }
    }

    /// Writes a stand-in slab tagged [`GROWN`] in `payload`, the payload space of a large
    /// run whose sized free leads there (`run::SegmentHead::payload_for_sized_free`): a
    /// free or `realloc` whose layout says "slab object" finds it, sees [`GROWN`], and
    /// treats the block as the block of pages it is.
    ///
    /// # Safety
    /// `payload` is the payload space of a large run the caller owns.
    pub(crate) unsafe fn mark_grown(payload: *mut u8) {
        // SAFETY: RUN_PAYLOAD bytes, 64-aligned, the caller's with its run.
        unsafe { (payload as *mut Slab).write(Slab::stand_in(GROWN)) };
    }

    /// Whether this is the stand-in of a grown block ([`Slab::mark_grown`]).
    #[inline]
    pub(crate) fn is_grown(&self) -> bool {
        self.sole.load(Ordering::Relaxed) == GROWN
    }

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
                _line: LineBreak,
                fresh: Cell::new(zeroed),
                place: Cell::new(Place::Current),
                next: Cell::new(ptr::null_mut()),
                prev: Cell::new(ptr::null_mut()),
                owner: AtomicUsize::new(owner),
                sole: AtomicU32::new(UNTAGGED),
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

    /// Objects in use, those other threads freed and the owner has not taken back included.
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

    #[inline]
    fn index(&self, p: *const u8) -> usize {
        let off = (p as usize - self.base as usize) as u64;
        ((off * self.magic) >> 32) as usize
    }

    /// Owner: the tag every object in use carries, or [`MIXED`]. An object just handed out
    /// whose tag equals it needs nothing stored; the only object in use makes its tag the
    /// slab's ([`take_over`](Self::take_over)); with `MIXED`, store it with
    /// [`write_tag`](Self::write_tag); otherwise the slab becomes mixed
    /// ([`mix`](Self::mix)). [`set_tag`](Self::set_tag) does all of it.
    #[inline]
    pub(crate) fn sole(&self) -> u32 {
        self.sole.load(Ordering::Relaxed)
    }

    /// Owner, on a mixed slab: stores the tag of object `p`, just handed out.
    #[inline]
    pub(crate) fn write_tag(&self, p: *const u8, tag: u32) {
        // SAFETY: `p` is an object of this slab, so its index is below `capacity` and the
        // tag lies in the tag array; only the object's current holder touches its tag.
        unsafe { self.tags.add(self.index(p)).write(tag) }
    }

    /// Owner: makes `tag` the slab's, for the object just handed out when it is the only
    /// object in use (`used == 1`; a mixed slab that emptied becomes single-tagged again).
    /// No other object is in use or on its way back from another thread (those still count
    /// in `used`): nobody can read the old tag any more.
    #[inline]
    pub(crate) fn take_over(&self, tag: u32) {
        debug_assert_eq!(self.used.get(), 1);
        self.sole.store(tag, Ordering::Relaxed);
    }

    /// Owner: gives object `p`, just handed out while other objects are in use, a tag other
    /// than the slab's sole one: the slab becomes mixed.
    #[cold]
    #[inline(never)]
    pub(crate) fn mix(&self, p: *const u8, tag: u32) {
        let old = self.sole();
        debug_assert!(old != MIXED && self.used.get() > 1);
        for i in 0..self.capacity as usize {
            // SAFETY: `i < capacity`: inside the tag array, which the owner alone writes.
            unsafe { self.tags.add(i).write(old) };
        }
        // Release: a thread that reads MIXED reads the array filled above.
        self.sole.store(MIXED, Ordering::Release);
        self.write_tag(p, tag);
    }

    /// Stores the owner tag of object `p`, just handed out (the cases above).
    #[inline]
    pub(crate) fn set_tag(&self, p: *const u8, tag: u32) {
        match self.sole() {
            sole if sole == tag => {}
            _ if self.used.get() == 1 => self.take_over(tag),
            MIXED => self.write_tag(p, tag),
            _ => self.mix(p, tag),
        }
    }

    /// The owner tag of object `p`, from any thread.
    #[inline]
    pub(crate) fn tag(&self, p: *const u8) -> u32 {
        // Acquire: pairs with the Release in `mix`.
        let sole = self.sole.load(Ordering::Acquire);
        if sole != MIXED {
            return sole;
        }
        // SAFETY: as in `write_tag`; the tag was written when the object was handed out,
        // before the pointer reached whoever frees it.
        unsafe { self.tags.add(self.index(p)).read() }
    }

    /// The owner's invariant.
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
        let span = self.capacity as usize * self.size as usize;
        for at in (0..span).step_by(PAGE).chain(span.checked_sub(1)) {
            if !ptr::eq(super::page_map::slab_of(self.base.wrapping_add(at)), self) {
                return Err("a page of the slab does not lead back to it");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alloc::size_class::class_of;

    /// Hands out `n` objects of `s` tagged `tag`.
    fn take(s: &Slab, n: usize, tag: u32) -> Vec<*mut u8> {
        (0..n)
            .map(|_| {
                let (p, _) = s.pop().expect("an object");
                s.set_tag(p.as_ptr(), tag);
                p.as_ptr()
            })
            .collect()
    }

    fn give_back(s: &Slab, ps: &[*mut u8]) {
        for &p in ps {
            // SAFETY: objects of `s` handed out by `take`, freed once by their owner.
            unsafe { s.push_local(p) };
        }
    }

    #[test]
    fn one_tag_stays_in_the_slab_until_a_second_tag_mixes_it() {
        let s = Slab::create(class_of(48), 1).expect("a slab");
        let a = take(s, 10, 7);
        assert_eq!(s.sole(), 7, "a single tag is kept once for the slab");
        assert!(a.iter().all(|&p| s.tag(p) == 7));
        let b = take(s, 5, 9);
        assert_eq!(s.sole(), MIXED);
        assert!(a.iter().all(|&p| s.tag(p) == 7), "mixing kept the old tags");
        assert!(b.iter().all(|&p| s.tag(p) == 9));
        let c = take(s, 3, 7);
        assert!(c.iter().all(|&p| s.tag(p) == 7));
        give_back(s, &a);
        give_back(s, &b);
        give_back(s, &c);
        assert_eq!(s.used(), 0);
        // Empty again: the next object's tag becomes the slab's.
        let d = take(s, 4, 3);
        assert_eq!(s.sole(), 3);
        assert!(d.iter().all(|&p| s.tag(p) == 3));
        give_back(s, &d);
        // The last object in use may change hands without mixing the slab.
        let e = take(s, 1, 5);
        assert_eq!(s.sole(), 5);
        give_back(s, &e);
        assert_eq!(s.check_invariants(), Ok(()));
        s.destroy();
    }

    #[test]
    fn an_object_on_its_way_back_keeps_its_tag_while_the_slab_mixes() {
        let s = Slab::create(class_of(64), 1).expect("a slab");
        let a = take(s, 2, 11);
        // a[1] freed by another thread and not taken back yet: still counted in `used`,
        // so a second tag must mix the slab, not replace the first.
        give_back(s, &a[..1]);
        assert_eq!(s.used(), 1);
        let b = take(s, 1, 12);
        assert_eq!(s.sole(), MIXED);
        assert_eq!(s.tag(a[1]), 11);
        assert_eq!(s.tag(b[0]), 12);
        give_back(s, &a[1..]);
        give_back(s, &b);
        assert_eq!(s.used(), 0);
        s.destroy();
    }
}
