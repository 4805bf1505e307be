//! Loom models of beancounter's concurrent protocols.
//!
//! The modules below are the crate's own source files, compiled here with
//! `cfg(beancounter_loom)` (set by this package's build script), so `crate::sync` resolves
//! to loom's primitives and the models explore the code that ships. Nothing is copied.
//! Parts of those files that the models do not call are dead code in this crate.
#![allow(dead_code, missing_docs)]

#[path = "../../src/sync.rs"]
mod sync;

#[path = "../../src/accounting/mod.rs"]
mod accounting;

/// The remote-free inbox (`src/alloc/remote.rs`): it needs nothing of the allocator but
/// `crate::sync`.
#[path = "../../src/alloc/remote.rs"]
mod remote;

#[cfg(test)]
mod inbox;
#[cfg(test)]
mod models;
#[cfg(test)]
mod retire;
