//! The allocator stack, L0 (in `os`) to L4. See `global.rs` for the walkthrough of a first
//! allocation and of a remote free.

pub(crate) mod global;
pub(crate) mod page_map;
pub(crate) mod remote;
pub(crate) mod run;
pub(crate) mod size_class;
pub(crate) mod slab;
pub(crate) mod thread_cache;
