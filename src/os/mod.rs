//! L0: OS pages. Anonymous mappings straight from the kernel; nothing here allocates.
//!
//! Glossary: an *OS page* is the kernel's unit (4 KiB on the targets this crate supports);
//! everything above this layer asks for whole mappings and never assumes more than
//! zero-filled, page-aligned memory.

use core::ptr::NonNull;

pub(crate) mod event;

/// The OS page size this crate is built for (x86_64 and aarch64 Linux with 4 KiB pages).
pub(crate) const PAGE: usize = 4096;

/// Maps `size` bytes of zero-filled, read-write, private anonymous memory.
///
/// The mapping is `MAP_NORESERVE`: pages cost nothing until first touched. Returns `None`
/// when the kernel refuses (address space or `RLIMIT_AS` exhausted) or `size` is zero.
pub(crate) fn map(size: usize) -> Option<NonNull<u8>> {
    if size == 0 || failpoint::hit() {
        return None;
    }
    // SAFETY: an anonymous private mapping with a null hint touches no existing memory;
    // the result is checked against MAP_FAILED before use.
    let ptr = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if ptr == libc::MAP_FAILED {
        None
    } else {
        NonNull::new(ptr.cast())
    }
}

/// Maps `size` bytes (a multiple of `align`, itself a power of two `>= PAGE`) at an address
/// that is a multiple of `align`, by mapping `size + align` and trimming both ends.
pub(crate) fn map_aligned(size: usize, align: usize) -> Option<NonNull<u8>> {
    debug_assert!(align.is_power_of_two() && align >= PAGE && size % PAGE == 0);
    let total = size.checked_add(align)?;
    let base = map(total)?.as_ptr() as usize;
    let start = (base + align - 1) & !(align - 1);
    let end = start + size;
    // SAFETY: both trimmed ranges lie inside the mapping just made, are page-aligned (base,
    // start and end are), and nothing refers to them.
    unsafe {
        unmap(base as *mut u8, start - base);
        unmap(end as *mut u8, base + total - end);
    }
    NonNull::new(start as *mut u8)
}

/// Gives a mapping (or a page-aligned part of one) back to the kernel. Zero sizes are
/// ignored.
///
/// # Safety
/// `ptr..ptr + size` must be mapped by this module and no longer used.
pub(crate) unsafe fn unmap(ptr: *mut u8, size: usize) {
    if size != 0 {
        // SAFETY: the caller gives up a range this module mapped. munmap of a valid range
        // only fails for invalid arguments, which would be a bug here: nothing to recover.
        unsafe { libc::munmap(ptr.cast(), size) };
    }
}

/// Tells the kernel the pages' contents are no longer needed: they stop counting in RSS and
/// read as zero when next touched.
///
/// # Safety
/// `ptr..ptr + size` must be page-aligned, mapped by this module, and hold nothing in use.
pub(crate) unsafe fn purge(ptr: *mut u8, size: usize) {
    // SAFETY: as the caller promises; MADV_DONTNEED on private anonymous memory only drops
    // pages, and a failure leaves them as they were (still correct, only not purged).
    unsafe { libc::madvise(ptr.cast(), size, libc::MADV_DONTNEED) };
}

/// Asks the kernel to back `ptr..ptr + size` with transparent huge pages (2 MiB) where it
/// can: one page fault and one TLB entry for 2 MiB instead of 512 of each. It takes effect
/// where THP is in `madvise` or `always` mode (`/sys/kernel/mm/transparent_hugepage`), as
/// for mimalloc's arenas; `BEANCOUNTER_THP=0` in the environment turns it off (resident
/// memory then grows and shrinks in 4 KiB steps only).
///
/// # Safety
/// `ptr..ptr + size` must be page-aligned and mapped by this module.
pub(crate) unsafe fn advise_huge(ptr: *mut u8, size: usize) {
    if huge_pages_wanted() {
        // SAFETY: as the caller promises; MADV_HUGEPAGE changes no contents, and a failure
        // (THP compiled out or disabled) leaves 4 KiB pages.
        unsafe { libc::madvise(ptr.cast(), size, libc::MADV_HUGEPAGE) };
    }
}

/// Whether `BEANCOUNTER_THP` leaves huge pages on (read once).
fn huge_pages_wanted() -> bool {
    use crate::sync::{AtomicU32, Ordering::Relaxed};
    // 0 = not read yet, 1 = on, 2 = off.
    static WANTED: AtomicU32 = AtomicU32::new(0);
    match WANTED.load(Relaxed) {
        1 => true,
        2 => false,
        _ => {
            // SAFETY: a NUL-terminated name; getenv does not allocate, and the result is
            // read at once (the environment is not changed by this crate).
            let v = unsafe { libc::getenv(c"BEANCOUNTER_THP".as_ptr()) };
            // SAFETY: a non-null result is a NUL-terminated string.
            let off = !v.is_null() && unsafe { *v } == b'0' as libc::c_char;
            WANTED.store(if off { 2 } else { 1 }, Relaxed);
            !off
        }
    }
}

/// Resizes a mapping that starts at an `align`-aligned address to `new_size`, keeping the
/// alignment, moving pages (not bytes) if it cannot grow in place. Returns the new address.
///
/// # Safety
/// `ptr..ptr + old_size` must be a whole mapping made by this module, aligned to `align`.
pub(crate) unsafe fn remap_aligned(
    ptr: *mut u8,
    old_size: usize,
    new_size: usize,
    align: usize,
) -> Option<NonNull<u8>> {
    if failpoint::hit() {
        return None;
    }
    // SAFETY: the caller owns the whole mapping; without MREMAP_MAYMOVE the kernel either
    // resizes it in place or fails and leaves it alone.
    let same = unsafe { libc::mremap(ptr.cast(), old_size, new_size, 0) };
    if same != libc::MAP_FAILED {
        return NonNull::new(ptr);
    }
    // Reserve an aligned destination, then move the pages there: the kernel moves page
    // table entries, so no byte is copied.
    let dest = map_aligned(new_size, align)?;
    // SAFETY: `dest` is a fresh mapping of `new_size` bytes that MREMAP_FIXED replaces; the
    // source is the caller's whole mapping, which the kernel unmaps on success.
    let moved = unsafe {
        libc::mremap(
            ptr.cast(),
            old_size,
            new_size,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dest.as_ptr().cast::<libc::c_void>(),
        )
    };
    if moved == libc::MAP_FAILED {
        // SAFETY: `dest` was mapped above and is unused.
        unsafe { unmap(dest.as_ptr(), new_size) };
        return None;
    }
    Some(dest)
}

/// A test-only way to make the next mappings fail, for fault-injection tests: the OS
/// refusing memory must leave every charge rolled back and the allocator usable.
pub(crate) mod failpoint {
    use crate::sync::{AtomicU32, Ordering};

    /// How many of the next `map`/`remap` calls fail.
    static FAIL_NEXT: AtomicU32 = AtomicU32::new(0);

    #[inline]
    pub(crate) fn hit() -> bool {
        FAIL_NEXT.load(Ordering::Relaxed) != 0
            && FAIL_NEXT
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
    }

    /// Makes the next `n` OS mappings fail.
    pub(crate) fn fail_next_maps(n: u32) {
        FAIL_NEXT.store(n, Ordering::Relaxed);
    }
}

/// Milliseconds of the coarse monotonic clock (`CLOCK_MONOTONIC_COARSE`: a few milliseconds'
/// resolution, read from the vDSO without a system call), for ageing free memory.
pub(crate) fn now_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; the clock exists on every Linux since 2.6.32, and reading
    // it cannot fail otherwise (a failure would leave zero: memory ages later, nothing more).
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}
