//! Compiles the crate's source included by this package against loom's primitives:
//! `src/sync.rs` switches on `cfg(beancounter_loom)`, which is set here for this package
//! only, so the main crate and its tests keep std's primitives in the same workspace build.
fn main() {
    println!("cargo:rustc-cfg=beancounter_loom");
    println!("cargo:rerun-if-changed=build.rs");
}
