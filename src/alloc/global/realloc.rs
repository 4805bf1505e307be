//! L4, `realloc`: a block resized in place when its owner is the current exec beancounter
//! and its class, run or mapping allows it, else moved; grown blocks (a slab object grown
//! past 4 KiB becomes a block of pages); and where a block that must move to grow goes. The
//! charging rules are in the parent module's docs.

use super::page_map::{self, Owner};
use super::run::{self, LARGE_MAX};
use super::size_class;
use super::slab::Slab;
use super::{
    alloc_big, alloc_small, allocate_key, deallocate, free_small, own_run, resize_sample,
    sample_big, uncharge,
};
use crate::accounting::registry::registry;
use crate::accounting::sampling::SAMPLED;
use crate::accounting::types::Resource;
use crate::accounting::{context, stock_table as stock};
use crate::os::PAGE;
use core::alloc::Layout;
use core::ptr;

/// Routes by the layout alone, to two functions with frames of their own: this one keeps
/// none, so that neither kind of block pays the other's register saves.
///
/// # Safety
/// As `GlobalAlloc::realloc`.
#[inline(always)]
pub(super) unsafe fn reallocate(ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
    if size_class::class_for(layout.size(), layout.align()).is_some() {
        // SAFETY: as for this function; the layout says it is a slab object.
        return unsafe { realloc_object(ptr, layout, new_size) };
    }
    // SAFETY: as for this function; the layout says it is a block of pages.
    unsafe { realloc_big(ptr, layout, new_size) }
}

/// # Safety
/// As `GlobalAlloc::realloc`, with `ptr` a slab object.
#[inline(never)]
unsafe fn realloc_object(ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
    let slab = page_map::slab_of(ptr);
    if slab.is_grown() {
        // SAFETY: as for this function; `ptr` is a grown block, a block of pages.
        return unsafe { realloc_big(ptr, layout, new_size) };
    }
    // SAFETY: as for this function.
    unsafe { realloc_small(slab, ptr, layout, new_size, context::charge_key()) }
}

/// Resizes block of pages `ptr`: in place when the current exec beancounter (of charge key
/// `key`) owns it and the run or mapping can change size, else by moving it. Out of line,
/// so that the slab objects' `realloc` (most of them) keeps a small frame.
///
/// The common step of a growing buffer is served first, in a frame of its own: a large
/// block, not sampled, of the current beancounter checked with `Limit` (its tag equals the
/// key), growing into its run's reserve, with the growth in the thread's stock entry.
///
/// # Safety
/// As `GlobalAlloc::realloc`, with `ptr` a block of pages.
#[inline(never)]
unsafe fn realloc_big(ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
    let key = context::charge_key();
    if let Owner::Large(r) = page_map::owner_of(ptr) {
        let (have, want) = (r.charged.get(), new_size.next_multiple_of(PAGE));
        // `want <= r.bytes() <= LARGE_MAX`: the block stays a large run, whatever its
        // layout (a grown block's is a slab size, and it stays a grown block).
        if r.tag.get() == key
            && want > have
            && want <= r.bytes()
            && stock::try_charge_growth(key, (want - have) as u64)
        {
            r.charged.set(want);
            return ptr;
        }
    }
    // SAFETY: as for this function.
    unsafe { resize_big(ptr, layout, new_size, key) }
}

/// [`realloc_big`] for every case but the common step of a growing buffer.
///
/// # Safety
/// As `GlobalAlloc::realloc`, with `ptr` a block of pages.
#[inline(never)]
unsafe fn resize_big(ptr: *mut u8, layout: Layout, new_size: usize, key: u32) -> *mut u8 {
    let align = layout.align();
    let (bc, severity) = context::split(key);
    // A sample point fell in a growth that could not be made in place.
    let mut moved_sampled = false;
    match page_map::owner_of(ptr) {
        // In place when it stays a large block's size, or when a grown block grows.
        Owner::Large(r)
            if r.tag.get() & !SAMPLED == bc
                && (new_size > size_class::SMALL_MAX || new_size > layout.size())
                && new_size <= LARGE_MAX =>
        {
            let (have, want) = (r.charged.get(), new_size.next_multiple_of(PAGE));
            let was_sampled = r.tag.get() & SAMPLED != 0;
            if want <= have {
                run::shrink_in_place(r, want / PAGE);
                r.charged.set(want);
                if was_sampled {
                    resize_sample(ptr, want);
                }
                registry().uncharge(bc, 0, (have - want) as u64);
                return ptr;
            }
            // Charged through the stock like an object (a block grown a page at a time is
            // charged as often); tentative: if growing in place is refused, moving may still
            // succeed (after stocks are reclaimed), and only that decides.
            if let Ok(sampled) = stock::charge_growth(key, (want - have) as u64) {
                // The run's reserve (see `run::grow_in_place`) is the block's own: growing
                // into it takes no lock.
                if want <= r.bytes() || run::grow_in_place(r, want / PAGE) {
                    r.charged.set(want);
                    if was_sampled {
                        resize_sample(ptr, want);
                    }
                    return if sampled { sample_big(ptr) } else { ptr };
                }
                registry().uncharge(bc, 0, (want - have) as u64);
                moved_sampled = sampled;
            }
        }
        Owner::Huge(head) if head.tag.get() == bc && new_size > LARGE_MAX => {
            let (have, want) = (head.charged.get(), new_size.next_multiple_of(PAGE));
            let reg = registry();
            let grow = want.saturating_sub(have) as u64;
            if grow == 0
                || reg
                    .charge_counted(bc, Resource::Memory, 0, grow, severity, false)
                    .is_ok()
            {
                if let Some(moved) = run::resize_huge(head, new_size) {
                    moved.charged.set(want);
                    if want < have {
                        reg.uncharge(bc, 0, (have - want) as u64);
                    }
                    return moved.huge_object();
                }
                reg.uncharge(bc, 0, grow);
            }
        }
        _ => {}
    }
    // Move: a new block charged to the current exec beancounter.
    let Ok(new_layout) = Layout::from_size_align(new_size, align) else {
        return ptr::null_mut();
    };
    let mut new = if grows_to_pages(layout, new_size) {
        alloc_grown(key, new_size)
    } else {
        allocate_key(key, new_layout, false)
    };
    if moved_sampled {
        // The sample point fell in the growth refused in place: it samples the new block.
        new = sample_big(new);
    }
    if !new.is_null() {
        // SAFETY: both blocks are live, distinct, and at least min(old, new) bytes long.
        unsafe {
            ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            deallocate(ptr, layout);
        }
    }
    new
}

/// Resizes slab object `ptr` of `slab`. It stays in place when the current exec
/// beancounter owns it and the new size fits its class without leaving more than half of
/// it unused (what it is charged does not change); otherwise it moves to a block charged to
/// the current exec beancounter: a block of pages placed for growth if it grew past 4 KiB
/// (see [`grows_to_pages`]), else the class that fits. `key` is the thread's charge key.
///
/// # Safety
/// As `GlobalAlloc::realloc`, with `ptr` an object of `slab`.
#[inline]
unsafe fn realloc_small(
    slab: &'static Slab,
    ptr: *mut u8,
    layout: Layout,
    new_size: usize,
    key: u32,
) -> *mut u8 {
    let new_class = size_class::class_for(new_size, layout.align());
    let (bc, severity) = context::split(key);
    if let Some(c) = new_class {
        let fits = c == slab.class() || (c < slab.class() && 2 * new_size >= slab.size());
        if fits && slab.tag(ptr) == bc {
            return ptr;
        }
    }
    let new = match new_class {
        _ if grows_to_pages(layout, new_size) => alloc_grown(key, new_size),
        Some(c) => alloc_small(key, c, false),
        None if Layout::from_size_align(new_size, layout.align()).is_ok() => {
            alloc_big(bc, severity, new_size, layout.align(), false)
        }
        None => return ptr::null_mut(),
    };
    if !new.is_null() {
        // SAFETY: both blocks are live and distinct; the old one holds `layout.size()`
        // bytes, the new one at least `new_size`.
        unsafe {
            ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
            free_small(slab, ptr);
        }
    }
    new
}

/// Whether a block of `layout` that `realloc` resizes to `new_size` and cannot keep in
/// place moves to a block of pages placed for growth ([`alloc_grown`]): it grows, past
/// [`GROWN_FROM`], to a size a large run serves. A slab size makes it a grown block.
#[inline]
fn grows_to_pages(layout: Layout, new_size: usize) -> bool {
    new_size > layout.size()
        && new_size > GROWN_FROM
        && new_size <= LARGE_MAX
        && layout.align() <= PAGE
}

/// A slab object that `realloc` grows past this many bytes moves to a grown block.
pub(super) const GROWN_FROM: usize = PAGE;

/// A large block of `size` bytes for a block that `realloc` grows and cannot grow in place,
/// charged to the beancounter and severity of charge key `key`, placed where it can go on
/// growing (`run::alloc_growing`), with the stand-in slab that makes it a grown block while
/// its layout has a slab's size (see the parent module's docs). Null if the charge is
/// refused or the OS gives no memory.
#[cold]
#[inline(never)]
fn alloc_grown(key: u32, size: usize) -> *mut u8 {
    let (bc, severity) = context::split(key);
    let bytes = size.next_multiple_of(PAGE);
    let Ok(bc) = stock::charge_block(bc, bytes as u64, 1, severity) else {
        return ptr::null_mut();
    };
    let Some((r, _)) = run::alloc_growing(bytes / PAGE) else {
        uncharge(bc, bytes);
        return ptr::null_mut();
    };
    let p = own_run(r, bc, bytes);
    // SAFETY: the payload space of `r`, a large run just taken. Written whatever the size:
    // only a free or `realloc` with a slab-sized layout reads it.
    unsafe { Slab::mark_grown(run::head_of(p).payload_for_sized_free(r)) };
    if crate::accounting::sampling::mean() != 0 && stock::sample_direct(bytes as u64) {
        return sample_big(p);
    }
    p
}
