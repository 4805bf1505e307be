#![doc = include_str!("../README.md")]
//!
//! # Layers
//!
//! Two stacks, each using only the layers below it (`DESIGN.md` §5). `sync` and `os` are the
//! common floor.
//!
//! ```text
//! accounting (who pays)                       allocator (where bytes live)
//! A2 accounting/context.rs, spawn.rs          (next: L4 alloc/global.rs joins both stacks)
//!    per-thread exec/fork, guards, spawn      (next: L3 thread heaps, L2 slabs, L1 runs)
//! A1 accounting/registry.rs, handle.rs
//!    slot table, ids, lifetime, hierarchy
//! A0 accounting/beancounter.rs, types.rs
//!    one counter: add, check, roll back
//! ------------------------------------------------------------------------------------
//! L0 os/        anonymous mappings, never allocates
//!    sync.rs    the one switch between std and loom primitives
//! ```
//!
//! # Glossary
//!
//! - *tenant*: the host's customer, whose work must not take down the others.
//! - *beancounter* (BC): a tenant's accounting object: an id and, per resource, `held`,
//!   `maxheld`, `minheld`, `barrier`, `limit`, `failcnt`.
//! - *slot*: the registry entry a beancounter lives in, addressed by a `u32` index.
//! - *context*: a thread's exec beancounter (charged now) and fork beancounter (inherited
//!   by threads it spawns).
//! - *charge* / *uncharge*: add to / subtract from `held`, checked by a *severity*.

#![warn(missing_debug_implementations)]

// Segments, page maps and size limits assume a 64-bit address space (and 4 KiB pages).
#[cfg(not(all(target_pointer_width = "64", target_os = "linux")))]
compile_error!("beancounter supports 64-bit Linux");

mod accounting;
mod alloc;
mod os;
mod sync;

pub use accounting::beancounter::Events;
pub use accounting::context::{current, current_id, fallible, forced, ExecGuard};
pub use accounting::future::{FutureExt, Guarded, InBeancounter};
pub use accounting::handle::{
    capacity, check_invariants, checkpoint, default_limits, find_or_create, live_count, lookup,
    reap, register_resource, root, set_default_limits, set_limits, stat, Beancounter, Charge,
};
pub use accounting::registry::{DEFAULT_CAPACITY, MAX_CAPACITY};
pub use accounting::stock::{STOCK_BYTES, STOCK_OBJECTS};
pub use accounting::types::{
    BcError, BcId, Exceeded, Limits, Resource, ResourceStat, Severity, MAX, MAX_CUSTOM_RESOURCES,
    MAX_DEPTH,
};
#[cfg(feature = "allocator-api2")]
pub use alloc::global::BcAllocator;
pub use alloc::global::{check_heap, drain_stock, fail_next_os_maps, mapped_bytes, BeanAlloc};

/// Threads that start in the spawning thread's fork beancounter.
pub mod thread {
    pub use crate::accounting::spawn::{spawn, Builder};
}
