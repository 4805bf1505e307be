//! L4: [`BeanAlloc`], the `GlobalAlloc`. Routes each request by size, and is the only place
//! where the allocator stack and the accounting stack meet: every block is charged to the
//! current thread's exec beancounter before it is returned, and uncharged from the
//! beancounter recorded with it when it is freed.
//!
//! # The first allocation of a thread
//!
//! ```text
//! alloc(layout)                          size ≤ 32 KiB and align ≤ 4 KiB: a slab object
//! ├─ context::charge_key()               TLS read: the exec beancounter's slot index, with
//! │                                      the severity in its top bits (0 for `Limit`)
//! ├─ stock::try_charge_object(key, class size) → no entry for bc yet: charge_object_slow
//! │  └─ claim a stock slot (first time), charge size + one batch to bc and its ancestors
//! │     into the slot's entry for bc
//! ├─ thread_cache::alloc(class, bc)      TLS heap is the static empty heap: its bin's
//! │  │                                   current slab is the static empty slab → pop fails
//! │  └─ Err(Uninit)
//! ├─ start_thread()                      adopt an abandoned heap or map a new one; register
//! │                                      the thread-exit hook (pthread key) and fork hooks
//! └─ thread_cache::alloc(class, bc)      refill: Slab::create → run::alloc_run → (first
//!    │                                   time) os::map_aligned a 4 MiB segment
//!    └─ slab.set_tag(p, bc)              the owner tag: the slab's sole tag, or in its
//!                                        side array once the slab is mixed (set inside, so
//!                                        that for an exiting thread it happens under the
//!                                        shared heap's lock)
//! ```
//! Every later allocation of that class on that thread: TLS key, stock subtract, slab pop,
//! tag check — no lock, no atomic read-modify-write. Inside `fallible` or `forced` the key
//! matches no stock entry, and the slow path charges with the key's severity.
//!
//! # A remote free
//!
//! ```text
//! dealloc(p, layout)                     on another thread
//! ├─ page_map: mask p to its segment → page → the slab (`slab_at[page]`)
//! ├─ tag = slab.tag(p)                   whoever was charged, whatever thread allocated
//! ├─ stock::try_uncharge_object(tag, size) into this thread's entry for `tag` (if it is
//! │                                      `tag`'s; an empty one is taken on the slow path),
//! │                                      else straight to the beancounter
//! └─ thread_cache::free(slab, p)         slab.owner ≠ this heap → into this thread's
//!                                        outbox for the owning heap; every 64 objects
//!                                        (or at this thread's next refill) one CAS hands
//!                                        the batch to that heap's inbox, and the owner
//!                                        frees them into their slabs at its next refill
//! ```
//!
//! # Charging rules
//! - Slab objects charge their class size, large blocks their page-rounded size, huge blocks
//!   their page-rounded size (the head page is metadata). Every block charges one
//!   `Allocations`.
//! - The charge is checked before any memory is taken, against the limit
//!   (`Severity::Limit`), or the barrier inside `fallible`, or nothing inside `forced`; a
//!   refusal returns null and leaves nothing charged. If the OS then refuses memory, the
//!   charge is given back.
//! - `realloc` in place keeps the block's owner: it happens only when the current exec
//!   beancounter is that owner (the growth is charged to it); otherwise the block moves and
//!   the new block is charged to the current exec beancounter like any allocation. A large
//!   block's growth in place is charged through the thread's stock entry (bytes, no
//!   object), so a block grown a page per call pays no shared atomic per step; the pages
//!   its run keeps in reserve beyond the block are charged to nobody until it grows into
//!   them.
//! - A slab object that `realloc` grows past 4 KiB ([`realloc::GROWN_FROM`]) moves to a
//!   block of pages, a *grown block*, charged its pages like a large block: a buffer grown
//!   in steps then grows in place in its run (into the run's reserve, or the free pages
//!   after it) instead of being copied into each larger class and again into a run past
//!   32 KiB. Its layout still has a slab's size, so its free finds a stand-in `Slab` where
//!   a slab object's free looks (`Slab::mark_grown`), tagged so that the free leaves the
//!   fast path at its first test and goes to the block of pages. Allocations, and resizes
//!   that do not grow, take the slab class that fits. `realloc` is in [`realloc`].
//! - The allocator's metadata (segment headers, slab tails, heaps, stock and registry tables)
//!   is charged to nobody.
//!
//! # Heap-profile samples
//! The allocation a sample point falls in is always one of a slow path (a stock entry stops
//! its fast path before the point, see `stock.rs`); there [`sample_small`] and
//! [`sample_big`] record it (`profile/samples.rs`) and set [`SAMPLED`] in its tag. No stock
//! entry holds a tag with that bit, so its free takes the slow path too, which forgets the
//! sample and uncharges the tag without it. A sampled slab object never resizes in place
//! (its tag is not the current beancounter's): it moves. A sampled block of pages resizes in
//! place like any other, and its sample takes the new size; its growth is counted on the
//! stock's sample countdown like an allocation, and a point falling in it samples the block.

use super::page_map::{self, Owner};
use super::run::{self, Kind, LARGE_MAX, MAX_ALIGN};
use super::size_class::{self, CLASSES};
use super::slab::{self, Slab};
use super::thread_cache::{self, AllocError};
use crate::accounting::registry::registry;
use crate::accounting::sampling::SAMPLED;
use crate::accounting::stock::GiveBack;
use crate::accounting::types::Severity;
use crate::accounting::{context, stock_table as stock};
use crate::os::PAGE;
use crate::sync::{AtomicU32, Ordering};
use core::alloc::{GlobalAlloc, Layout};
use core::cell::Cell;
use core::ptr;

mod realloc;
use realloc::reallocate;

/// The allocator. Install it with `#[global_allocator]`; see the crate docs.
///
/// # Examples
/// ```
/// #[global_allocator]
/// static ALLOC: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
/// # fn main() {
/// let v = vec![0u8; 1000];
/// assert!(beancounter::root().stat(beancounter::Resource::Memory).held >= 1000);
/// # drop(v);
/// # }
/// ```
#[derive(Debug, Default)]
pub struct BeanAlloc {
    _private: (),
}

impl BeanAlloc {
    /// The allocator; every instance shares the same process-wide state.
    ///
    /// # Examples
    /// ```
    /// use std::alloc::{GlobalAlloc, Layout};
    /// // `const`: it can initialise the `static` that `#[global_allocator]` needs.
    /// #[global_allocator]
    /// static ALLOC: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
    /// # fn main() {
    /// let other = beancounter::BeanAlloc::new(); // the same process-wide allocator
    /// let layout = Layout::new::<u64>();
    /// // SAFETY: a non-zero size.
    /// let p = unsafe { other.alloc(layout) };
    /// assert!(!p.is_null());
    /// // SAFETY: a live block of this allocator, freed once, with its layout.
    /// unsafe { ALLOC.dealloc(p, layout) }; // either instance can free it
    /// # }
    /// ```
    pub const fn new() -> BeanAlloc {
        BeanAlloc { _private: () }
    }
}

// SAFETY: every method returns blocks that are valid for the layout asked (size and
// alignment, checked per route below), never overlapping a live block, or null; `dealloc`
// and `realloc` take only blocks this allocator returned; nothing here unwinds or calls
// back into the global allocator.
unsafe impl GlobalAlloc for BeanAlloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        allocate(layout, false)
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        allocate(layout, true)
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller hands back a block of this allocator, with its layout.
        unsafe { deallocate(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as the GlobalAlloc contract says for realloc.
        unsafe { reallocate(ptr, layout, new_size) }
    }
}

/// Allocates for this thread's exec beancounter, checked with its severity: both come in
/// one thread-local read, the charge key (`context::key`).
#[inline(always)]
fn allocate(layout: Layout, zero: bool) -> *mut u8 {
    allocate_key(context::charge_key(), layout, zero)
}

/// Allocates for beancounter slot `bc`, checking the charge with `severity`.
#[cfg(feature = "allocator-api2")]
#[inline]
fn allocate_for(bc: u32, severity: Severity, layout: Layout, zero: bool) -> *mut u8 {
    allocate_key(context::key(bc, severity), layout, zero)
}

/// Allocates for charge key `key`.
#[inline(always)]
fn allocate_key(key: u32, layout: Layout, zero: bool) -> *mut u8 {
    match size_class::class_for(layout.size(), layout.align()) {
        Some(class) => alloc_small(key, class, zero),
        None => {
            let (bc, severity) = context::split(key);
            alloc_big(bc, severity, layout.size(), layout.align(), zero)
        }
    }
}

/// The fast path of a slab object: stock subtract, slab pop, tag check. Everything that
/// can call out is a tail call to a cold function, so the fast path keeps nothing live
/// across a call and needs no stack frame. The stock serves only a key of severity
/// `Limit`, which is then the beancounter's index, the object's tag.
#[inline(always)]
fn alloc_small(key: u32, class: usize, zero: bool) -> *mut u8 {
    if !stock::try_charge_object(key, size_class::size_of(class)) {
        return alloc_small_charge_slow(key, class, zero);
    }
    alloc_small_charged(key, class, zero)
}

/// A slab object whose charge is taken.
#[inline(always)]
fn alloc_small_charged(bc: u32, class: usize, zero: bool) -> *mut u8 {
    match thread_cache::try_alloc(class) {
        Some((p, slab, zeroed)) => {
            // The slab's sole tag is the usual case; the only object in use takes the slab
            // over, and a mixed slab stores the tag, inline; a slab that becomes mixed is
            // the cold tail call.
            let sole = slab.sole();
            if sole != bc {
                if slab.used() == 1 {
                    slab.take_over(bc);
                } else if sole == slab::MIXED {
                    slab.write_tag(p.as_ptr(), bc);
                } else {
                    return alloc_small_mix(slab, p.as_ptr(), bc, class, zero && !zeroed);
                }
            }
            if zero && !zeroed {
                return zero_object(p.as_ptr(), class);
            }
            p.as_ptr()
        }
        None => alloc_small_refill(bc, class, zero),
    }
}

/// An object for `bc` from a slab whose other objects in use all carry another tag.
#[cold]
#[inline(never)]
fn alloc_small_mix(slab: &Slab, p: *mut u8, bc: u32, class: usize, zero: bool) -> *mut u8 {
    slab.mix(p, bc);
    if zero {
        return zero_object(p, class);
    }
    p
}

/// No stock for `bc` on this thread: refill it, or charge directly (the object is tagged
/// with whom the charge went to: `bc`, or, for a retired beancounter, its heir).
#[cold]
#[inline(never)]
fn alloc_small_charge_slow(key: u32, class: usize, zero: bool) -> *mut u8 {
    arm_exit_hook();
    let (bc, severity) = context::split(key);
    match stock::charge_object_slow(bc, size_class::size_of(class), severity) {
        Ok((charged, false)) => alloc_small_charged(charged, class, zero),
        Ok((charged, true)) => sample_small(alloc_small_charged(charged, class, zero), charged),
        Err(_) => ptr::null_mut(),
    }
}

/// Slab object `p` (or null), charged to `bc`, holds a sample point: recorded, and tagged.
#[cold]
#[inline(never)]
fn sample_small(p: *mut u8, bc: u32) -> *mut u8 {
    #[cfg(feature = "profile")]
    if !p.is_null() {
        let slab = page_map::slab_of(p);
        if record_sample(p, slab.size() as u64, bc) {
            thread_cache::retag(slab, p, bc | SAMPLED);
        }
    }
    #[cfg(not(feature = "profile"))]
    let _ = bc;
    p
}

/// Block `p` of pages (or null) holds a sample point: recorded, and tagged (once: a block
/// already sampled keeps its sample).
#[cold]
#[inline(never)]
fn sample_big(p: *mut u8) -> *mut u8 {
    #[cfg(feature = "profile")]
    if !p.is_null() {
        let (tag, charged) = match page_map::owner_of(p) {
            Owner::Large(r) => (&r.tag, r.charged.get()),
            Owner::Huge(head) => (&head.tag, head.charged.get()),
            Owner::Slab => return p,
        };
        if tag.get() & SAMPLED == 0 && record_sample(p, charged as u64, tag.get()) {
            tag.set(tag.get() | SAMPLED);
        }
    }
    p
}

/// Records a sample of block `p` of `bytes` charged to `bc`, unless sampling stopped since
/// the point was drawn; true if recorded.
#[cfg(feature = "profile")]
fn record_sample(p: *mut u8, bytes: u64, bc: u32) -> bool {
    let mean = crate::accounting::sampling::mean();
    mean != 0 && crate::profile::samples::record(p as usize, bytes, bc, mean)
}

/// Block `p` of pages, whose tag carries [`SAMPLED`], was resized in place to `bytes`: its
/// sample follows, so that it stands for what the block holds now (the growth went through
/// the same sample countdown as any allocation, see `stock::charge_growth`).
#[cold]
#[inline(never)]
fn resize_sample(p: *mut u8, bytes: usize) {
    #[cfg(feature = "profile")]
    crate::profile::samples::resize(p as usize, bytes as u64);
    #[cfg(not(feature = "profile"))]
    let _ = (p, bytes);
}

/// Block `p`, whose tag carries [`SAMPLED`], is being freed: its sample goes.
#[cold]
#[inline(never)]
fn unsample(p: *mut u8) {
    #[cfg(feature = "profile")]
    crate::profile::samples::forget(p as usize);
    #[cfg(not(feature = "profile"))]
    let _ = p;
}

/// The thread's bin is out of objects (or the thread has no heap yet); the charge is taken
/// and given back if no object can be had.
#[cold]
#[inline(never)]
fn alloc_small_refill(bc: u32, class: usize, zero: bool) -> *mut u8 {
    let got = match thread_cache::alloc(class, bc) {
        Ok(got) => Some(got),
        Err(AllocError::Uninit) if start_thread() => thread_cache::alloc(class, bc).ok(),
        Err(_) => None,
    };
    let Some((p, _, zeroed)) = got else {
        stock::uncharge_object(bc, size_class::size_of(class));
        return ptr::null_mut();
    };
    if zero && !zeroed {
        return zero_object(p.as_ptr(), class);
    }
    p.as_ptr()
}

/// Zeroes a slab object of `class` that is not known to be fresh, and returns it.
#[inline(never)]
fn zero_object(p: *mut u8, class: usize) -> *mut u8 {
    // SAFETY: `p` is an object of `class`, just allocated: `CLASSES[class].size` bytes.
    unsafe { ptr::write_bytes(p, 0, CLASSES[class].size as usize) };
    p
}

/// Largest request served: 128 TiB minus what a huge block adds (head and alignment).
const MAX_REQUEST: usize = (1 << 47) - 2 * run::SEGMENT;

#[cold]
#[inline(never)]
fn alloc_big(bc: u32, severity: Severity, size: usize, align: usize, zero: bool) -> *mut u8 {
    let p = alloc_pages(bc, severity, size, align, zero);
    if crate::accounting::sampling::mean() != 0
        && !p.is_null()
        && stock::sample_direct(size.next_multiple_of(PAGE) as u64)
    {
        return sample_big(p);
    }
    p
}

/// A block of pages: a large run, or a huge block of its own mapping.
fn alloc_pages(bc: u32, severity: Severity, size: usize, align: usize, zero: bool) -> *mut u8 {
    // Sizes no mapping can hold are refused before anything is charged, so that they leave
    // no trace in `maxheld`: more than the 128 TiB a user address space spans on x86_64
    // with 4-level page tables (the head and alignment slack of a huge block fit below it).
    if align > MAX_ALIGN || size > MAX_REQUEST {
        return ptr::null_mut();
    }
    let bytes = size.next_multiple_of(PAGE).max(PAGE);
    let Ok(bc) = stock::charge_block(bc, bytes as u64, 1, severity) else {
        return ptr::null_mut();
    };
    if bytes <= LARGE_MAX {
        if let Some((_, p)) = take_run(bc, bytes, align, zero) {
            return p;
        }
        // No segment can hold the run with its alignment slack: map it on its own.
    }
    match run::alloc_huge(size, align) {
        Some((head, zeroed)) => {
            head.tag.set(bc);
            head.charged.set(bytes);
            let p = head.huge_object();
            if zero && !zeroed {
                // SAFETY: `p` starts the block's `bytes` bytes, in its mapping (a reused one).
                unsafe { ptr::write_bytes(p, 0, bytes) };
            }
            p
        }
        None => {
            uncharge(bc, bytes);
            ptr::null_mut()
        }
    }
}

/// A large run of `bytes` bytes aligned to `align`, for a block charged to `bc` (zeroed if
/// `zero`): the run and the block's start.
fn take_run(
    bc: u32,
    bytes: usize,
    align: usize,
    zero: bool,
) -> Option<(&'static run::Run, *mut u8)> {
    let (r, zeroed) = run::alloc_run(bytes / PAGE, align.max(PAGE), Kind::Large)?;
    let p = own_run(r, bc, bytes);
    if zero && !zeroed {
        // SAFETY: `p` starts a fresh run of `bytes` bytes.
        unsafe { ptr::write_bytes(p, 0, bytes) };
    }
    Some((r, p))
}

/// Records large run `r`, just taken, as a block of `bytes` bytes charged to `bc`; returns
/// the block's start.
fn own_run(r: &'static run::Run, bc: u32, bytes: usize) -> *mut u8 {
    r.tag.set(bc);
    r.charged.set(bytes);
    run::head_of(r as *const run::Run as *const u8).run_start(r)
}

/// Uncharges block `p` of pages, tagged `tag`, being freed; forgets its sample if it has one.
fn uncharge_block(p: *mut u8, tag: u32, bytes: usize) {
    if tag & SAMPLED != 0 {
        unsample(p);
    }
    uncharge(tag & !SAMPLED, bytes);
}

fn uncharge(bc: u32, bytes: usize) {
    let reg = registry();
    reg.uncharge(bc, 0, bytes as u64);
    reg.uncharge(bc, 1, 1);
}

/// # Safety
/// `ptr` is a live block of this allocator and `layout` the one it was allocated with.
#[inline]
unsafe fn deallocate(ptr: *mut u8, layout: Layout) {
    // Sized free: the layout says whether this is a slab object, without reading the run.
    if size_class::class_for(layout.size(), layout.align()).is_some() {
        // SAFETY: as for this function; the layout says it is a slab object.
        return unsafe { free_small(page_map::slab_of(ptr), ptr) };
    }
    free_big(ptr);
}

/// Frees slab object `ptr` of `slab`: the uncharge into the stock, then the object back to
/// its slab.
///
/// # Safety
/// `ptr` is a live object of `slab`, given up by the caller.
#[inline(always)]
unsafe fn free_small(slab: &'static Slab, ptr: *mut u8) {
    let (bc, bytes) = (slab.tag(ptr), slab.size() as u64);
    let outcome = stock::try_uncharge_object(bc, bytes);
    if outcome != GiveBack::Done {
        // SAFETY: as for this function.
        return unsafe { free_small_slow(outcome, slab, ptr) };
    }
    // SAFETY: `ptr` is a live object of `slab`, given up by the caller.
    unsafe { thread_cache::free(slab, ptr) }
}

/// A slab object whose charge the stock could not take in full: finish the uncharge, then
/// free. Its tag and size are read again here rather than passed: fewer values live across
/// the fast path let it keep them all in scratch registers (no stack frame to save them).
///
/// # Safety
/// `ptr` is a live object of `slab`, given up by the caller.
#[cold]
#[inline(never)]
unsafe fn free_small_slow(outcome: GiveBack, slab: &'static Slab, ptr: *mut u8) {
    let (bc, bytes) = (slab.tag(ptr), slab.size() as u64);
    if bc == slab::GROWN {
        // A grown block: the stand-in's tag matched no stock entry.
        return free_big(ptr);
    }
    arm_exit_hook();
    if bc & SAMPLED != 0 {
        unsample(ptr);
        stock::uncharge_object(bc & !SAMPLED, bytes);
    } else {
        stock::uncharge_object_slow(outcome, bc, bytes);
    }
    // SAFETY: as for this function.
    unsafe { thread_cache::free(slab, ptr) }
}

#[cold]
#[inline(never)]
fn free_big(ptr: *mut u8) {
    match page_map::owner_of(ptr) {
        Owner::Large(r) => {
            uncharge_block(ptr, r.tag.get(), r.charged.get());
            run::free_run(r);
        }
        Owner::Huge(head) => {
            uncharge_block(ptr, head.tag.get(), head.charged.get());
            run::free_huge(head);
        }
        Owner::Slab => unreachable_slab(),
    }
}

/// A block whose layout says "large" but whose memory is a slab: the caller broke the
/// `GlobalAlloc` contract. Nothing sane can be done, and unwinding is not allowed.
#[cold]
fn unreachable_slab() {
    std::process::abort();
}

// ---- thread start and exit, fork ---------------------------------------------------------

/// The pthread key whose destructor runs at thread exit (0 = not created, else key + 1).
static EXIT_KEY: AtomicU32 = AtomicU32::new(0);
/// 0 = hooks not registered, 1 = being registered, 2 = registered.
static HOOKS: AtomicU32 = AtomicU32::new(0);

thread_local! {
    /// Set while `start_thread` runs, so an allocation it triggers does not start again.
    static STARTING: Cell<bool> = const { Cell::new(false) };
}

/// Gives this thread a heap and arranges for its heap and stock to be handed back at exit.
#[cold]
fn start_thread() -> bool {
    if STARTING.try_with(|s| s.replace(true)).unwrap_or(true) {
        return false;
    }
    let ok = thread_cache::init_current();
    if ok {
        arm_exit_hook();
    }
    let _ = STARTING.try_with(|s| s.set(false));
    ok
}

thread_local! {
    /// Set once this thread's exit hook is armed.
    static HOOKED: Cell<bool> = const { Cell::new(false) };
}

/// Arms the thread-exit hook for this thread (once): before it gets a heap, and before it
/// can claim a stock (a thread that only frees gets one too).
fn arm_exit_hook() {
    if HOOKED.try_with(|h| h.replace(true)).unwrap_or(true) {
        return;
    }
    register_hooks();
    if let Some(key) = exit_key() {
        // SAFETY: a valid key; the value only has to be non-null for the destructor to run.
        unsafe { libc::pthread_setspecific(key, ptr::dangling::<libc::c_void>()) };
    }
}

extern "C" fn on_thread_exit(_: *mut libc::c_void) {
    stock::thread_exit();
    thread_cache::abandon_current();
}

fn exit_key() -> Option<libc::pthread_key_t> {
    let k = EXIT_KEY.load(Ordering::Acquire);
    if k != 0 {
        return Some(k - 1);
    }
    None
}

fn register_hooks() {
    if HOOKS
        .compare_exchange(0, 1, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        while HOOKS.load(Ordering::Acquire) == 1 {
            std::thread::yield_now();
        }
        return;
    }
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: `key` is a valid out-pointer; the destructor is an `extern "C" fn` that never
    // unwinds. pthread_key_create does not allocate.
    if unsafe { libc::pthread_key_create(&mut key, Some(on_thread_exit)) } == 0 {
        EXIT_KEY.store(key + 1, Ordering::Release);
    }
    // SAFETY: the handlers are `extern "C" fn`s that never unwind. glibc keeps the first 48
    // fork handlers in static storage: no allocation.
    unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_parent), Some(fork_child)) };
    HOOKS.store(2, Ordering::Release);
}

extern "C" fn fork_prepare() {
    // Lock order: the sample store, the registry and the stock table (never held while
    // allocating), then the heap locks, then the run lock (taken under the heap locks).
    #[cfg(feature = "profile")]
    crate::profile::samples::lock_for_fork();
    registry().lock_for_fork();
    stock::lock_for_fork();
    thread_cache::lock_for_fork();
    run::lock_for_fork();
}

extern "C" fn fork_parent() {
    // SAFETY: `fork_prepare` took these locks on this thread.
    unsafe { unlock_all(false) }
}

extern "C" fn fork_child() {
    // SAFETY: the child is a copy of the thread that ran `fork_prepare`.
    unsafe { unlock_all(true) }
}

/// # Safety
/// Only after `fork_prepare`.
unsafe fn unlock_all(child: bool) {
    // SAFETY: each was locked by `fork_prepare` and its guard forgotten.
    unsafe {
        run::unlock_after_fork();
        thread_cache::unlock_after_fork();
        stock::unlock_after_fork(child);
        registry().unlock_after_fork();
        #[cfg(feature = "profile")]
        crate::profile::samples::unlock_after_fork();
    }
}

/// Bytes the allocator has mapped for blocks (segments and huge mappings; the registry and
/// stock tables excluded).
///
/// # Examples
/// ```
/// #[global_allocator]
/// static A: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
/// # fn main() {
/// let before = beancounter::mapped_bytes();
/// let big = vec![0u8; 8 << 20]; // over 2 MiB: a mapping of its own
/// assert!(beancounter::mapped_bytes() >= before + (8 << 20));
/// drop(big); // kept mapped for reuse, unmapped once unused for about a second
/// let again = vec![1u8; 8 << 20]; // takes the same mapping
/// assert!(beancounter::mapped_bytes() < before + (16 << 20));
/// # drop(again);
/// # }
/// ```
pub fn mapped_bytes() -> usize {
    run::mapped_bytes()
}

/// Checks the current thread's heap (every slab's free list against its counts) and the
/// page-run free lists of every segment ([`check_invariants`](crate::check_invariants)
/// checks the beancounter table). Meaningful when no other thread frees into this thread's slabs; for tests.
///
/// # Errors
/// A description of the first invariant found broken.
///
/// # Examples
/// ```
/// #[global_allocator]
/// static A: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
/// # fn main() {
/// let boxes: Vec<Box<u32>> = (0..100).map(Box::new).collect();
/// drop(boxes);
/// assert_eq!(beancounter::check_heap(), Ok(()));
/// # }
/// ```
pub fn check_heap() -> Result<(), &'static str> {
    thread_cache::check_current()?;
    run::check_invariants()
}

/// The OS refuses the next `n` mappings and remappings (test-only fault injection). The
/// count replaces any pending one rather than adding to it; `0` switches it off.
///
/// # Examples
/// ```
/// #[global_allocator]
/// static A: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
/// # fn main() {
/// let mut v: Vec<u8> = Vec::new();
/// beancounter::fail_next_os_maps(1);
/// // 8 MiB needs a mapping of its own; the OS refuses it: an error, not a crash.
/// assert!(v.try_reserve(8 << 20).is_err());
/// assert!(v.try_reserve(8 << 20).is_ok()); // only the next one failed
/// # }
/// ```
#[doc(hidden)]
pub fn fail_next_os_maps(n: u32) {
    crate::os::failpoint::fail_next_maps(n);
}

/// Gives this thread's stock back to its beancounter, so that `held` equals true usage.
///
/// # Examples
/// ```
/// #[global_allocator]
/// static A: beancounter::BeanAlloc = beancounter::BeanAlloc::new();
/// # fn main() {
/// use beancounter::{BcId, Resource};
/// let t = beancounter::find_or_create(BcId(61)).unwrap();
/// let _g = t.enter();
/// let b = Box::new([0u8; 100]);
/// beancounter::drain_stock();
/// t.reset_window(); // maxheld = what the counter holds now
/// let s = t.stat(Resource::Memory);
/// assert_eq!(s.maxheld, s.held); // no stock left: the counter is true usage
/// # drop(b);
/// # }
/// ```
pub fn drain_stock() {
    stock::drain_current();
}

/// An [`Allocator`](allocator_api2::alloc::Allocator) that charges one beancounter, checked
/// against its **barrier**: over it, allocation fails with `AllocError` instead of
/// aborting, so collections built on `allocator-api2` (hashbrown's `HashMap::new_in`,
/// `allocator_api2::vec::Vec::new_in`) stop growing at the barrier and report it. Blocks
/// come from the crate's allocator whatever the global allocator is, and are uncharged
/// from the beancounter when freed. Requires the `allocator-api2` feature.
///
/// # Examples
/// ```
/// use beancounter::{BcId, Limits, Resource};
/// let tenant = beancounter::find_or_create(BcId(60)).unwrap();
/// tenant.set_limits(Resource::Memory, Limits::new(64 << 10, 1 << 20).unwrap()).unwrap();
/// let mut map = hashbrown::HashMap::new_in(tenant.allocator());
/// let mut refused = None;
/// for i in 0..100_000u64 {
///     if let Err(e) = map.try_reserve(1) {
///         refused = Some(e);
///         break;
///     }
///     map.insert(i, i);
/// }
/// assert!(refused.is_some(), "the map stops growing at the barrier");
/// assert!(tenant.stat(Resource::Memory).held <= 64 << 10);
/// ```
#[cfg(feature = "allocator-api2")]
#[derive(Clone, Debug)]
pub struct BcAllocator {
    bc: crate::Beancounter,
}

#[cfg(feature = "allocator-api2")]
impl crate::Beancounter {
    /// An allocator handle that charges this beancounter; see [`BcAllocator`].
    ///
    /// # Examples
    /// ```
    /// use beancounter::{BcId, Resource};
    /// let t = beancounter::find_or_create(BcId(62)).unwrap();
    /// let mut map = hashbrown::HashMap::new_in(t.allocator());
    /// map.insert(1u64, [0u8; 1000]); // charged to `t`, whichever tenant the thread is in
    /// assert!(t.stat(Resource::Memory).held >= 1000);
    /// drop(map);
    /// assert_eq!(t.stat(Resource::Memory).held, 0);
    /// ```
    pub fn allocator(&self) -> BcAllocator {
        BcAllocator { bc: self.clone() }
    }
}

#[cfg(feature = "allocator-api2")]
// SAFETY: blocks are valid for their layout until deallocated, never overlap, and can be
// passed to any clone of the handle (they are plain blocks of the crate's allocator);
// zero-sized requests get a dangling, aligned pointer that is never freed.
unsafe impl allocator_api2::alloc::Allocator for BcAllocator {
    fn allocate(
        &self,
        layout: Layout,
    ) -> Result<ptr::NonNull<[u8]>, allocator_api2::alloc::AllocError> {
        if layout.size() == 0 {
            // SAFETY: an alignment is never zero.
            let dangling = unsafe { ptr::NonNull::new_unchecked(layout.align() as *mut u8) };
            return Ok(ptr::NonNull::slice_from_raw_parts(dangling, 0));
        }
        let p = allocate_for(self.bc.index(), Severity::Barrier, layout, false);
        ptr::NonNull::new(p)
            .map(|p| ptr::NonNull::slice_from_raw_parts(p, layout.size()))
            .ok_or(allocator_api2::alloc::AllocError)
    }

    unsafe fn deallocate(&self, ptr: ptr::NonNull<u8>, layout: Layout) {
        if layout.size() != 0 {
            // SAFETY: the caller hands back a block this allocator returned with `layout`.
            unsafe { deallocate(ptr.as_ptr(), layout) }
        }
    }
}
