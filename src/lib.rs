#![doc = include_str!("../README.md")]
//!
//! # Layers
//!
//! Two stacks, each using only the layers below it (`DESIGN.md` §5). `sync` and `os` are the
//! common floor.
//!
//! ```text
//! accounting (who pays)                  allocator (where bytes live)
//!                                        L4 alloc/global.rs: GlobalAlloc, BcAllocator;
//!                                           the only module that uses both stacks
//! A3 accounting/stock.rs: a thread's     L3 alloc/thread_cache.rs: per-thread heaps,
//!    stock entries, one per tenant;         bins, abandon/reclaim at thread exit
//!    reclaim.rs: taking them back        L2 alloc/slab.rs, remote.rs: one size class
//!    before refusing; stock_table.rs:       per slab, owner tags, lock-free remote
//!    the process's slots and the            frees
//!    thread's own                        L1 alloc/run.rs, page_map.rs, size_class.rs:
//! A2 accounting/context.rs, spawn.rs,       segments, page runs, huge blocks, purging
//!    future.rs: exec/fork, guards,          by age, pointer -> metadata
//!    severity scopes, spawn, futures
//! A1 accounting/registry.rs: slots, ids,
//!    lifetime, hierarchy walk;
//!    handle.rs: the public API over
//!    A1-A3 (handles, stat, checkpoint)
//! A0 accounting/beancounter.rs, types.rs:
//!    one counter: add, check, publish
//! report.rs: snapshots, the /proc/user_beancounters table, Prometheus text, event
//!    watching; above the accounting stack, for host threads only
//! ------------------------------------------------------------------------------------
//! L0 os/        anonymous mappings, madvise, mremap, the coarse clock; never allocates
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
//! - *stock*: what a thread holds charged to a beancounter and not in use, in one *entry*
//!   per beancounter: charged ahead of its allocations, or given back by its frees.
//! - *OS page* (4 KiB) vs *run* (consecutive pages of a 4 MiB *segment*) vs *slab* (a run
//!   cut into objects of one size class) vs *huge block* (a mapping of its own).

#![warn(missing_debug_implementations)]

// Segments, page maps and size limits assume a 64-bit address space (and 4 KiB pages).
#[cfg(not(all(target_pointer_width = "64", target_os = "linux")))]
compile_error!("beancounter supports 64-bit Linux");

mod accounting;
mod alloc;
mod os;
pub mod report;
mod sync;

pub use accounting::api::{
    capacity, check_invariants, checkpoint, default_limits, find_or_create, live_count, lookup,
    reap, register_resource, retired_count, root, set_default_limits, set_limits, stat,
};
pub use accounting::beancounter::Events;
pub use accounting::context::{current, current_id, fallible, forced, ExecGuard};
pub use accounting::future::{FutureExt, Guarded, InBeancounter};
pub use accounting::handle::Charge;
pub use accounting::reference::Beancounter;
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
///
/// # Examples
/// ```
/// use beancounter::BcId;
/// let t = beancounter::find_or_create(BcId(6)).unwrap();
/// let _g = t.enter();
/// let ours = beancounter::thread::spawn(beancounter::current_id).unwrap();
/// let plain = std::thread::spawn(beancounter::current_id);
/// assert_eq!(ours.join().unwrap(), BcId(6));
/// assert_eq!(plain.join().unwrap(), BcId::ROOT); // std threads start in the root
/// ```
pub mod thread {
    pub use crate::accounting::spawn::{spawn, Builder};
}
