//! The accounting stack, A0 to A3.
//!
//! Loom compiles this module from `loom-tests/` with `cfg(beancounter_loom)`: the layers
//! that need the process-wide registry or std threads are left out there, the protocols
//! they build on are what the models explore.

pub(crate) mod beancounter;
pub(crate) mod fence;
pub(crate) mod registry;
pub(crate) mod sampling;
pub(crate) mod types;

#[cfg(not(beancounter_loom))]
pub(crate) mod api;
#[cfg(not(beancounter_loom))]
pub(crate) mod context;
#[cfg(not(beancounter_loom))]
pub(crate) mod future;
#[cfg(not(beancounter_loom))]
pub(crate) mod handle;
pub(crate) mod reclaim;
#[cfg(not(beancounter_loom))]
pub(crate) mod reference;
#[cfg(not(beancounter_loom))]
pub(crate) mod spawn;
pub(crate) mod stock;
#[cfg(not(beancounter_loom))]
pub(crate) mod stock_table;
