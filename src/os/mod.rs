//! L0: OS pages. Anonymous mappings straight from the kernel; nothing here allocates.
//!
//! Glossary: an *OS page* is the kernel's unit (4 KiB here); everything above this layer
//! asks for whole mappings and never assumes more than zero-filled, page-aligned memory.

use core::ptr::NonNull;

/// Maps `size` bytes of zero-filled, read-write, private anonymous memory.
///
/// The mapping is `MAP_NORESERVE`: pages cost nothing until first touched, so tables sized
/// for the worst case (the beancounter registry) only occupy what is used. Returns `None`
/// when the kernel refuses (address space or `RLIMIT_AS` exhausted) or `size` is zero.
pub(crate) fn map(size: usize) -> Option<NonNull<u8>> {
    if size == 0 {
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
