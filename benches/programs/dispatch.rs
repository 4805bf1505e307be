//! The bench binary's global allocator: forwards every call to the one allocator this
//! process was started for.
//!
//! The choice is made once, at the first allocation, from `BC_BENCH_ALLOC` (read with
//! `libc::getenv`, which does not allocate), and never changes, so every block is freed,
//! resized and measured by the allocator that made it. The forwarding costs one load of a
//! static and one perfectly predicted branch per call; every allocator pays it alike, and
//! each is called through its own inlinable `GlobalAlloc` methods.

use beancounter::BeanAlloc;
use mimalloc::MiMalloc;
use std::alloc::{GlobalAlloc, Layout, System};
use std::ffi::CStr;
use std::sync::atomic::{AtomicU8, Ordering::Relaxed};
use tikv_jemallocator::Jemalloc;

/// The variable naming the allocator (a column name such as `mimalloc`; any name starting
/// with `beancounter` selects [`BeanAlloc`], which is also the default).
pub const ALLOC_VAR: &str = "BC_BENCH_ALLOC";
const ALLOC_VAR_C: &CStr = c"BC_BENCH_ALLOC";

const UNSET: u8 = 0;
const BEAN: u8 = 1;
const MI: u8 = 2;
const JE: u8 = 3;
const SYS: u8 = 4;

static CHOSEN: AtomicU8 = AtomicU8::new(UNSET);
static BEAN_ALLOC: BeanAlloc = BeanAlloc::new();

/// Which allocator a variant name selects; `None` for a name no column uses.
pub fn allocator_of(variant: &str) -> Option<&'static str> {
    match code_of(variant.as_bytes()) {
        Some(BEAN) => Some("beancounter"),
        Some(MI) => Some("mimalloc"),
        Some(JE) => Some("jemalloc"),
        Some(SYS) => Some("system"),
        _ => None,
    }
}

fn code_of(name: &[u8]) -> Option<u8> {
    match name {
        b"mimalloc" => Some(MI),
        b"jemalloc" => Some(JE),
        b"system" => Some(SYS),
        n if n.starts_with(b"beancounter") => Some(BEAN),
        _ => None,
    }
}

#[inline]
fn chosen() -> u8 {
    match CHOSEN.load(Relaxed) {
        UNSET => choose_slow(),
        c => c,
    }
}

#[cold]
#[inline(never)]
fn choose_slow() -> u8 {
    // SAFETY: the name is NUL-terminated; nothing in this program changes the environment
    // (no `set_var`), so the returned string stays valid while it is read just below.
    let value = unsafe { libc::getenv(ALLOC_VAR_C.as_ptr()) };
    let code = if value.is_null() {
        BEAN
    } else {
        // SAFETY: `getenv` returned a non-null pointer to a NUL-terminated string.
        let name = unsafe { CStr::from_ptr(value) };
        // An unknown name falls back to the default here; the child refuses it in `main`.
        code_of(name.to_bytes()).unwrap_or(BEAN)
    };
    // Two threads racing here read the same variable: either store is the same value.
    match CHOSEN.compare_exchange(UNSET, code, Relaxed, Relaxed) {
        Ok(_) => code,
        Err(earlier) => earlier,
    }
}

/// Forwards to the chosen allocator; see the module docs.
pub struct Dispatch;

macro_rules! forward {
    ($method:ident($($arg:expr),*)) => {
        match chosen() {
            // SAFETY: the caller's `GlobalAlloc` contract is passed on unchanged, and the
            // pointer (if any) came from this same allocator: the choice never changes
            // within the process. The same holds for the three arms below.
            MI => unsafe { MiMalloc.$method($($arg),*) },
            // SAFETY: as above.
            JE => unsafe { Jemalloc.$method($($arg),*) },
            // SAFETY: as above.
            SYS => unsafe { System.$method($($arg),*) },
            // SAFETY: as above.
            _ => unsafe { BEAN_ALLOC.$method($($arg),*) },
        }
    };
}

// SAFETY: every method forwards to one allocator that upholds `GlobalAlloc`, the same one
// for the whole process.
unsafe impl GlobalAlloc for Dispatch {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        forward!(alloc(layout))
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        forward!(alloc_zeroed(layout))
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        forward!(dealloc(ptr, layout))
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        forward!(realloc(ptr, layout, new_size))
    }
}
