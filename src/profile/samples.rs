//! The live samples: which blocks were sampled, how big, charged to whom, and the call
//! stack that allocated them. Written from the allocator's slow paths, so nothing here
//! allocates: the store is one anonymous mapping, an open-addressing table keyed by the
//! block's address behind a spin lock that no allocation path holds while it allocates.
//!
//! The stack is taken with the unwinder every Rust binary on Linux links (libgcc's
//! `_Unwind_Backtrace`, the one panics use), so a default `cargo build --release` needs
//! neither frame pointers nor debug info; only return addresses are kept, and names are
//! resolved later, outside the allocation path (`symbolize.rs`). A thread that allocates
//! while it takes a stack (the unwinder may, the first time it reads a library's tables)
//! does not sample that allocation.

use crate::os;
use crate::sync::Mutex;
use core::cell::Cell;
use core::ffi::{c_int, c_void};
use core::ptr::NonNull;
use core::sync::atomic::{AtomicUsize, Ordering::Relaxed};

/// Return addresses kept per sample; a deeper stack keeps its leaf-most frames and is
/// marked truncated.
pub(crate) const MAX_FRAMES: usize = 64;
/// Live samples the store holds at most (a table of twice as many places): 32 768, which
/// at the default rate covers 16 GiB of live sampled memory. A sample that finds the store
/// full is not taken (counted in [`dropped`]).
const CAPACITY: usize = 1 << 15;
const PLACES: usize = 2 * CAPACITY;

/// One sampled block.
#[derive(Clone, Copy)]
pub(crate) struct Sample {
    /// The block's address; 0 marks a free place.
    pub(crate) addr: usize,
    /// What the block is charged (its size class, or its pages).
    pub(crate) bytes: u64,
    /// The mean distance between samples when it was taken: its weight.
    pub(crate) mean: u64,
    /// The record index the block is charged to (its tag, without the sampled bit).
    pub(crate) bc: u32,
    /// Frames in `frames`.
    pub(crate) depth: u16,
    /// The stack was deeper than [`MAX_FRAMES`].
    pub(crate) truncated: bool,
    /// Return addresses, leaf first.
    pub(crate) frames: [usize; MAX_FRAMES],
}

/// The table: `PLACES` samples, mapped at the first [`start`](super::start).
struct Store {
    places: Option<NonNull<Sample>>,
    live: usize,
}

// SAFETY: the store is only reached through its mutex; the mapping it points to is the
// process's and lives forever.
unsafe impl Send for Store {}

static STORE: Mutex<Store> = Mutex::new(Store {
    places: None,
    live: 0,
});
/// Samples not taken because the store was full.
static DROPPED: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Set while this thread takes a sample: its allocations meanwhile are not sampled.
    static TAKING: Cell<bool> = const { Cell::new(false) };
}

/// Maps the store if it is not yet: false if the OS refuses the memory.
pub(crate) fn ensure_store() -> bool {
    let mut store = STORE.lock();
    if store.places.is_none() {
        store.places = os::map(PLACES * size_of::<Sample>()).map(NonNull::cast);
    }
    store.places.is_some()
}

/// Takes the store's lock across `fork` (see `alloc/global.rs`), so that the child never
/// starts with it held by a thread it does not have.
pub(crate) fn lock_for_fork() {
    core::mem::forget(STORE.lock());
}

/// Releases the lock taken by [`lock_for_fork`], in the parent and in the child.
///
/// # Safety
/// Only after `lock_for_fork` on this thread (or in the child of the thread that did).
pub(crate) unsafe fn unlock_after_fork() {
    // SAFETY: as the caller promises, the lock is held by the fork protocol.
    unsafe { STORE.force_unlock() };
}

/// Samples that could not be kept because the store was full.
pub(crate) fn dropped() -> usize {
    DROPPED.load(Relaxed)
}

/// Records block `addr` of `bytes`, charged to record `bc`, with the calling stack and
/// `mean` as its weight. False if it was not recorded (the thread is already taking a
/// sample, or the store is full or not mapped): then the block must not be marked sampled.
pub(crate) fn record(addr: usize, bytes: u64, bc: u32, mean: u64) -> bool {
    let Ok(false) = TAKING.try_with(|t| t.replace(true)) else {
        return false;
    };
    let mut sample = Sample {
        addr,
        bytes,
        mean,
        bc,
        depth: 0,
        truncated: false,
        frames: [0; MAX_FRAMES],
    };
    capture(&mut sample);
    let kept = insert(&sample);
    if !kept {
        DROPPED.fetch_add(1, Relaxed);
    }
    let _ = TAKING.try_with(|t| t.set(false));
    kept
}

/// The block of sample `addr` was resized in place: its sample now stands for `bytes`.
pub(crate) fn resize(addr: usize, bytes: u64) {
    let store = STORE.lock();
    let Some(places) = store.places else { return };
    let at = |i: usize| places.as_ptr().wrapping_add(i % PLACES);
    let mut i = home(addr);
    loop {
        // SAFETY: `at(i)` is a place of the mapping (see `forget`), used under the lock.
        let place = unsafe { &mut *at(i) };
        match place.addr {
            0 => return,
            a if a == addr => {
                place.bytes = bytes;
                return;
            }
            _ => i = (i + 1) % PLACES,
        }
    }
}

/// Forgets the sample of block `addr`, if there is one (the block is being freed).
pub(crate) fn forget(addr: usize) {
    let mut store = STORE.lock();
    let Some(places) = store.places else { return };
    // Indices are taken modulo `PLACES`, so `at(i)` lies in the mapping of `PLACES`
    // samples; the lock makes this thread the only one touching them.
    let at = |i: usize| places.as_ptr().wrapping_add(i % PLACES);
    let mut i = home(addr);
    loop {
        // SAFETY: `at(i)` is a place of the mapping (above), read under the lock.
        let a = unsafe { (*at(i)).addr };
        if a == 0 {
            return;
        }
        if a == addr {
            break;
        }
        i = (i + 1) % PLACES;
    }
    // Backward-shift deletion: pull every later sample of the probe run whose home lies
    // at or before the gap into it, so lookups never need tombstones.
    let mut gap = i;
    let mut j = (i + 1) % PLACES;
    loop {
        // SAFETY: as above.
        let next = unsafe { *at(j) };
        if next.addr == 0 {
            break;
        }
        let h = home(next.addr);
        // `next` may move to `gap` if its home is not in the cyclic range (gap, j].
        if (j > gap && (h <= gap || h > j)) || (j < gap && h <= gap && h > j) {
            // SAFETY: as above; `gap` and `j` are distinct places.
            unsafe { at(gap).write(next) };
            gap = j;
        }
        j = (j + 1) % PLACES;
    }
    // SAFETY: as above.
    unsafe { (*at(gap)).addr = 0 };
    store.live -= 1;
}

/// Calls `f` on every live sample, under the store's lock: `f` must not allocate.
pub(crate) fn for_each(mut f: impl FnMut(&Sample)) {
    let store = STORE.lock();
    let Some(places) = store.places else { return };
    for i in 0..PLACES {
        // SAFETY: `i < PLACES`, inside the mapping; the lock keeps writers out.
        let s = unsafe { &*places.as_ptr().add(i) };
        if s.addr != 0 {
            f(s);
        }
    }
}

/// Live samples now.
pub(crate) fn live() -> usize {
    STORE.lock().live
}

fn home(addr: usize) -> usize {
    // Fibonacci hashing of the address without its alignment bits.
    ((addr >> 4).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) % PLACES
}

fn insert(sample: &Sample) -> bool {
    let mut store = STORE.lock();
    let Some(places) = store.places else {
        return false;
    };
    if store.live >= CAPACITY {
        return false;
    }
    let mut i = home(sample.addr);
    loop {
        // SAFETY: `i < PLACES`, inside the mapping; the lock makes this thread the only
        // one touching it. Fewer than half the places are taken, so a free one is found.
        let at = unsafe { &mut *places.as_ptr().add(i) };
        if at.addr == 0 || at.addr == sample.addr {
            if at.addr == 0 {
                store.live += 1;
            }
            *at = *sample;
            return true;
        }
        i = (i + 1) % PLACES;
    }
}

/// `_Unwind_Reason_Code` values the trace callback returns.
const URC_NO_REASON: c_int = 0;
const URC_END_OF_STACK: c_int = 5;

#[repr(C)]
struct UnwindContext {
    _opaque: [u8; 0],
}

type Trace = extern "C" fn(*mut UnwindContext, *mut c_void) -> c_int;

extern "C" {
    // libgcc's unwinder (libgcc_s), which std links on Linux for panics.
    fn _Unwind_Backtrace(trace: Trace, arg: *mut c_void) -> c_int;
    fn _Unwind_GetIP(ctx: *mut UnwindContext) -> usize;
}

/// Fills `sample`'s frames with the calling stack, leaf first.
#[inline(never)]
fn capture(sample: &mut Sample) {
    extern "C" fn frame(ctx: *mut UnwindContext, arg: *mut c_void) -> c_int {
        // SAFETY: `arg` is the `&mut Sample` passed to `_Unwind_Backtrace` below, which
        // calls back only while that borrow is live.
        let sample = unsafe { &mut *(arg as *mut Sample) };
        // SAFETY: `ctx` is the context the unwinder passes to its callback.
        let ip = unsafe { _Unwind_GetIP(ctx) };
        if ip == 0 {
            return URC_END_OF_STACK;
        }
        if usize::from(sample.depth) == MAX_FRAMES {
            sample.truncated = true;
            return URC_END_OF_STACK;
        }
        sample.frames[usize::from(sample.depth)] = ip;
        sample.depth += 1;
        URC_NO_REASON
    }
    // SAFETY: `frame` matches the callback type libgcc declares; `sample` outlives the
    // call. The unwinder reads the stack and the loaded objects' unwind tables only.
    unsafe { _Unwind_Backtrace(frame, sample as *mut Sample as *mut c_void) };
}
