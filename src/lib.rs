//! Batch-normalization kernels over `f32` slices: per-channel moments in one
//! pass, fused normalization with explicit SIMD lanes, the moving-average
//! update, the backward pass ([`backward`]) and folding into the previous
//! layer's weights ([`fold_into_weights`]), with no allocator and no `std`.
//!
//! See the README for the design, the numerical and performance contracts
//! and how the results compare with TensorFlow, Keras, PyTorch and ONNX.
//!
//! # Layouts
//!
//! Every kernel takes a flat slice and a [`Shape`]: `batch x spatial x
//! channels` in [`Layout::Nhwc`] (channels last) or [`Layout::Nchw`]
//! (channels first). Statistics are per channel over `batch * spatial`
//! elements.
//!
//! # Errors
//!
//! Bad input returns an [`Error`] naming what was wrong and leaves every
//! output untouched; no input makes a kernel panic (a link test, `.ci/nopanic`,
//! proves that no panic path survives in any public function).
//!
//! # Compact builds
//!
//! On every target but x86, x86-64 and aarch64 (microcontrollers such as
//! `thumbv7em-none-eabihf`, and every other target, wasm32 included) the
//! build is *compact*: one lane width, one-lane
//! `f32` ([`Simd::detect`] returns [`Simd::Scalar`], and every [`Simd`]
//! value runs it), and one normalization kernel for every [`Activation`]
//! (an exact identity clamp for `None`). Only the code a microcontroller
//! runs goes into its flash. The `all-widths` feature compiles every width
//! and activation kernel there too (for wasm32 with `simd128`, say, where
//! `Simd::X4` is native); `--cfg batchnorm_compact` makes any build compact
//! (CI tests the compact code on the host with it).
//!
//! On every target but x86-64 and aarch64 (i686 included) the
//! stack-resident windows are small
//! ([`GROUP_CHANNELS`], [`SEGMENT`] and the panel windows), so that every
//! kernel stays within 4 KiB of stack for any shape on a Cortex-M4
//! (`.ci/firmware` measures it under `qemu-system-arm`).
//!
//! # Threads
//!
//! With the optional `rayon` feature, the module `parallel` runs moments,
//! normalization, a training step and inference on a rayon thread pool,
//! with results that are the same bits for every number of threads (fixed
//! chunks, fixed merge tree). Without it the crate is `no_std` and uses no
//! allocator; with it, only that module uses `std`.
#![no_std]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(clippy::all)]

mod backward;
mod ema;
mod error;
mod fold;
mod lanes;
mod layer;
mod moments;
mod normalize;
#[cfg(feature = "rayon")]
pub mod parallel;
pub mod reference;
mod shape;

pub use backward::{backward, backward_in_place, Gradients, Mode};
pub use ema::{update_moving, Config, Momentum, MovingStats};
pub use error::Error;
pub use fold::{fold_into_weights, WeightLayout};
pub use lanes::Simd;
pub use layer::{Batch, BatchNorm, BatchNormArray, ScaleOffset};
pub use moments::{accumulate, moments, Moments, BLOCK_ROWS, GROUP_CHANNELS};
pub use normalize::{
    affine, affine_in_place, fold, normalize, normalize_in_place, Activation, Params, SEGMENT,
};
pub use shape::{Layout, Shape};

/// Which variance a statistic means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Variance {
    /// The biased variance `Σ(x - mean)² / count` (what batch normalization
    /// normalizes with; Keras and ONNX also feed it to the moving average).
    Population,
    /// The unbiased (Bessel) variance `Σ(x - mean)² / (count - 1)`, with the
    /// factor clamped to 1 at `count == 1` as TensorFlow does (TensorFlow's
    /// fused op and PyTorch feed it to the moving average).
    Sample,
}
