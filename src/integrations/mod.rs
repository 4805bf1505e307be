//! Integrations: thin adapters over A2 (context, futures) for the runtimes servers use, each
//! behind its own feature. They sit above the accounting stack like `report`, and use only its
//! public contract plus `context::fork`.
//!
//! - `tokio` (feature `tokio`): tasks and blocking closures that start in the spawner's fork
//!   beancounter; published as [`crate::tokio`].
//! - `tower` (feature `tower`): a `Layer` that runs each request's service future in the
//!   tenant a closure picks from the request; published as [`crate::tower`].
//!
//! What a switch costs: one [`enter`](crate::Beancounter::enter) and its drop per poll (the
//! tenant's reference count taken and given back, and a few thread-local stores), plus, per
//! request or task, a clone of the tenant's handle; measured in `benches/README.md`.

#[cfg(feature = "tokio")]
pub(crate) mod tokio;
#[cfg(feature = "tower")]
pub(crate) mod tower;
