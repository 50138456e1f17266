//! The fuzz oracle of `batchnorm`: one `check_*` function per fuzz target.
//!
//! Each function decodes the fuzz bytes into a layout, a shape, parameters
//! and `f32` data, runs the kernels and panics on any violated property. The
//! same file is compiled into the main crate's `tests/fuzz_regression.rs`, so
//! the committed corpus runs under `cargo test` on stable too.
#[path = "../../tests/fuzz/checks.rs"]
mod checks;
pub use checks::*;
