//! Return addresses to [`Frame`]s: function names, files and lines.
//!
//! The sampler records bare return addresses, because naming them takes locks and
//! allocates. They are named here, when a profile is read, on the reader's thread and
//! outside the allocation path, through the `backtrace` crate (the resolver std's own
//! backtraces use: DWARF debug info if the binary has it, else its symbol table).
//!
//! One address may give several frames: a call inlined into its caller shares the
//! caller's instructions, and debug info lists every function inlined at that address.
//! They come innermost first, so a stack of frames stays leaf first.
//!
//! Resolving is slow the first time (debug info is parsed on demand), so results are kept
//! for the life of the process in one cache: code addresses do not change meaning while a
//! library stays loaded, and the sampled call sites of a program are few.

use super::Frame;
use std::collections::BTreeMap;
use std::ffi::c_void;
use std::sync::{Mutex, PoisonError};

/// Frames already resolved, by return address. A `BTreeMap` because it can be built in a
/// constant. Invariant: every entry holds at least one frame, each with that `addr`.
static CACHE: Mutex<BTreeMap<usize, Vec<Frame>>> = Mutex::new(BTreeMap::new());

/// The frames of each return address in `addrs`, in order, inlined calls innermost first.
///
/// An address that no symbol covers gives one frame named `0x<hex>`.
pub(crate) fn symbolize(addrs: &[usize]) -> Vec<Frame> {
    // A panic while the lock was held cannot leave a half-written entry (entries go in
    // whole), so a poisoned cache is still a good one.
    let mut cache = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    let mut frames = Vec::with_capacity(addrs.len());
    for &addr in addrs {
        let resolved = cache.entry(addr).or_insert_with(|| resolve(addr));
        frames.extend(resolved.iter().cloned());
    }
    frames
}

/// Asks the resolver for the frames of one return address.
fn resolve(addr: usize) -> Vec<Frame> {
    let mut frames = Vec::new();
    // A return address points just past its call instruction, which may be the first
    // instruction of the next line or even of the next function. `backtrace::resolve`
    // already looks one byte back (`adjust_ip` in its `symbolize/mod.rs`, 0.3.74 to
    // 0.3.76), i.e. inside the call, so the address goes in as it is.
    backtrace::resolve(std::ptr::without_provenance_mut::<c_void>(addr), |symbol| {
        frames.push(Frame {
            addr,
            // `{:#}` leaves out the `::h<hash>` suffix of legacy Rust mangling.
            name: symbol
                .name()
                .map_or_else(|| unknown_name(addr), |name| format!("{name:#}")),
            file: symbol.filename().map(|path| path.display().to_string()),
            line: symbol.lineno(),
        });
    });
    if frames.is_empty() {
        frames.push(Frame {
            addr,
            name: unknown_name(addr),
            file: None,
            line: None,
        });
    }
    frames
}

/// The name of a frame no symbol covers: its address.
fn unknown_name(addr: usize) -> String {
    format!("{addr:#x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A function with a symbol of its own, to be found by address.
    #[inline(never)]
    fn symbolize_target() -> u64 {
        std::hint::black_box(42)
    }

    #[test]
    fn symbolize_names_a_function_by_return_address() {
        let target: fn() -> u64 = symbolize_target;
        assert_eq!(target(), 42);
        // As if a call had returned to the function's second byte: the resolver looks one
        // byte back, at the function's first instruction.
        let addr = target as usize + 1;
        let frames = symbolize(&[addr]);
        assert!(!frames.is_empty());
        assert!(frames.iter().all(|frame| frame.addr == addr), "{frames:?}");
        let innermost = &frames[0].name;
        assert!(innermost.contains("symbolize_target"), "{frames:?}");
        assert!(!innermost.contains("::h"), "hash left in {innermost}");
        // The second time comes from the cache, and says the same.
        assert_eq!(symbolize(&[addr]), frames);
    }

    #[test]
    fn symbolize_names_an_unknown_address_by_its_value() {
        // Heap memory belongs to no loaded object, so no symbol covers it.
        let heap = Box::new([0u8; 64]);
        let addr = heap.as_ptr() as usize + 1;
        let frames = symbolize(&[addr]);
        assert_eq!(
            frames,
            [Frame {
                addr,
                name: format!("{addr:#x}"),
                file: None,
                line: None,
            }]
        );
    }
}
