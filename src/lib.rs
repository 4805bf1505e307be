#![doc = include_str!("../README.md")]
//!
//! # Layers
//!
//! Two stacks, each using only the layers below it (`DESIGN.md` §5). `sync` and `os` are the
//! common floor.
//!
//! ```text
//! accounting (who pays)                  allocator (where bytes live)
//! API accounting/handle.rs, api.rs: the  L4 alloc/global.rs: GlobalAlloc, BcAllocator;
//!    public calls over A1-A3 (handle        the only module that uses both stacks (with
//!    methods, lookup, stat, checkpoint,     its child global/realloc.rs: `realloc`)
//!    retire)                             L3 alloc/thread_cache.rs: per-thread heaps,
//!                                           bins, abandon/reclaim at thread exit
//! A3 accounting/stock.rs: a thread's     L2 alloc/slab.rs, remote.rs: one size class
//!    stock entries, one per tenant;         per slab, owner tags, batched remote
//!    reclaim.rs: taking them back           frees
//!    before refusing; stock_table.rs:    L1 alloc/run.rs, page_map.rs, size_class.rs:
//!    the process's slots and the            segments, page runs, huge blocks, purging
//!    thread's own                           by age, pointer -> metadata
//! A2 accounting/context.rs, spawn.rs,
//!    future.rs: exec/fork, guards,
//!    severity scopes, spawn, futures
//! A1 accounting/registry/: table.rs
//!    (records, slots, the id map),
//!    walk.rs (the hierarchy walk,
//!    through retired records),
//!    lifetime.rs (create, lookup,
//!    references, reap, retire),
//!    hazard.rs (what guards publish
//!    to keep a tenant without a
//!    reference);
//!    reference.rs: the `Beancounter`
//!    handle type
//! A0 accounting/beancounter.rs, types.rs:
//!    one counter: add, check, publish;
//!    fence.rs: the stock protocol's
//!    fences and waits
//! report.rs: snapshots, the /proc/user_beancounters table, Prometheus text, event
//!    watching; above the accounting stack, for host threads only
//! profile/ (feature `profile`): sampling heap profiles. samples.rs is the store of live
//!    samples and the stack capture, called by L4 from its slow paths (the only way down
//!    into it); mod.rs, symbolize.rs, format.rs build a tenant's profile over the public
//!    API, above the accounting stack like report.rs. The sample countdowns are A0
//!    (accounting/sampling.rs), carried by the stock entries (A3).
//! integrations/: tokio.rs (features `tokio`), tower.rs (`tower`): thin adapters over A2
//!    (spawn in the fork beancounter, a layer entering the request's tenant); above the
//!    accounting stack like report.rs
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
#[cfg(any(feature = "tokio", feature = "tower"))]
mod integrations;
mod os;
#[cfg(feature = "profile")]
pub mod profile;
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

/// Tokio tasks that start in the spawning context's fork beancounter and keep it, whichever
/// worker polls them (feature `tokio`).
///
/// A plain `tokio::spawn` starts the task with nothing of the spawner's context: it runs in
/// whatever tenant the worker thread runs for (the root, unless the runtime's workers
/// [adopted](crate::Beancounter::adopt) one).
///
/// # Examples
/// ```
/// use beancounter::BcId;
/// let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).build().unwrap();
/// let t = beancounter::find_or_create(BcId(62)).unwrap();
/// let _rt = rt.enter(); // spawn onto `rt` from this thread
/// let guard = t.enter(); // as a request handler in tenant 62 would be
/// let task = beancounter::tokio::spawn(async {
///     let ours = beancounter::tokio::spawn(async { beancounter::current_id() });
///     let plain = tokio::spawn(async { beancounter::current_id() });
///     (ours.await.unwrap(), plain.await.unwrap())
/// });
/// drop(guard);
/// let (ours, plain) = rt.block_on(task).unwrap();
/// assert_eq!(ours, BcId(62)); // inherited from the task that spawned it
/// assert_eq!(plain, BcId::ROOT); // whatever the worker runs for
/// ```
#[cfg(feature = "tokio")]
pub mod tokio {
    pub use crate::integrations::tokio::{spawn, spawn_blocking};
}

/// A tower `Layer` that runs each request in the tenant a closure picks from it, and can
/// refuse the requests of a tenant over its barrier (feature `tower`).
///
/// For each request, the closure of [`TenantLayer`](tower::TenantLayer) returns
/// `Some(tenant)` or `None`. With a tenant, the inner service's `call` and every poll (and
/// the drop) of its response future run inside it, as exec and fork beancounter, whichever
/// worker polls it: what the handler allocates is charged to the tenant, and tasks it spawns
/// with [`beancounter::tokio::spawn`](crate::tokio::spawn) start there. With `None` the
/// request runs where it already runs.
///
/// [`refuse_with`](tower::TenantLayer::refuse_with) adds the guarded behaviour: a request of
/// a tenant over its barrier is answered with the response a closure builds from the
/// [`Exceeded`], before the inner service sees it or at the first poll after the tenant
/// crossed its barrier. The service's error type stays the inner service's, so the layer
/// fits axum's `Router::layer` with no `HandleErrorLayer`.
///
/// # Examples
/// ```
/// use axum::{body::Body, extract::Path, http::{Request, StatusCode}, response::IntoResponse};
/// use axum::{routing::get, Router};
/// use beancounter::{tower::TenantLayer, BcId, Beancounter, Exceeded};
///
/// /// `/t/<id>/...` runs in tenant `<id>`; everything else in the host.
/// fn tenant_of(req: &Request<Body>) -> Option<Beancounter> {
///     let id = req.uri().path().strip_prefix("/t/")?.split('/').next()?.parse().ok()?;
///     beancounter::lookup(BcId(id))
/// }
///
/// let app: Router = Router::new()
///     .route("/t/{id}/hello", get(|Path(id): Path<u32>| async move { format!("hello {id}") }))
///     .route("/health", get(|| async { "ok" }))
///     .layer(TenantLayer::new(tenant_of).refuse_with(|e: Exceeded| {
///         (StatusCode::INSUFFICIENT_STORAGE, e.to_string()).into_response()
///     }));
/// # let _ = app;
/// ```
#[cfg(feature = "tower")]
pub mod tower {
    pub use crate::integrations::tower::{
        GuardedTenantFuture, TenantFuture, TenantLayer, TenantService, Unguarded,
    };
}
