//! Batch-normalization kernels over `f32` slices: per-channel moments in one
//! pass, fused normalization with explicit SIMD lanes, and the moving-average
//! update, with no allocator and no `std`.
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
//! output untouched; no input makes a kernel panic.
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
