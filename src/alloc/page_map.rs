//! L1/L2: pointer → metadata. The one routine by which a free (or a realloc) finds what
//! owns a block, without a table that grows with allocations: every block lies in a
//! 4 MiB-aligned mapping whose head says whether it is a huge block; otherwise the segment's
//! page table names the run, and a slab run keeps its `Slab` at its end.
//!
//! ```text
//! ptr ──mask──▶ SegmentHead ──huge?──▶ Huge(head)
//!                    │ page = (ptr - base) / 4 KiB
//!                    ▼
//!              back[page] ──▶ first page ──▶ runs[first].kind ──▶ Large(run)
//!                                                   └──────────▶ Slab(payload[first])
//! ```

use super::run::{self, Kind, Run, SegmentHead};
use super::slab::Slab;

/// What owns a block.
pub(crate) enum Owner {
    /// A slab object: its layout says so too, and [`slab_of`] finds its slab.
    Slab,
    Large(&'static Run),
    Huge(&'static SegmentHead),
}

/// The slab of `ptr`, an object handed out from a slab and not yet freed (the sized-free
/// fast path: the layout already says it is a slab object).
#[inline]
pub(crate) fn slab_of(ptr: *const u8) -> &'static Slab {
    // SAFETY: `ptr` lies in a slab run, whose payload holds its `Slab` for as long as the
    // run lives, i.e. while any of its objects does.
    unsafe { &*(run::head_of(ptr).slab_payload_of(ptr) as *const Slab) }
}

/// The owner of `ptr`, a block handed out by this allocator and not yet freed.
#[inline]
pub(crate) fn owner_of(ptr: *const u8) -> Owner {
    let head = run::head_of(ptr);
    if head.is_huge() {
        return Owner::Huge(head);
    }
    let run = head.run_of(ptr);
    match run.kind() {
        Kind::Slab => Owner::Slab,
        _ => {
            debug_assert_eq!(run.kind(), Kind::Large);
            Owner::Large(run)
        }
    }
}
