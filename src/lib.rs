//! Batch normalization as plain functions over `f32` slices, for firmware,
//! inference runtimes and on-device training: per-channel moments in one
//! pass, fused normalization with explicit SIMD lanes, the moving-average
//! update, the backward pass and folding into the previous layer. `no_std`,
//! no allocator, no panic on any input.
//!
//! The contract is numbered as the product specification it implements:
//! §1 semantics, §2 errors and edge cases, §3 numerics, §4 performance,
//! §5 portability and firmware, §7 the public surface; comments across the
//! repository refer to these sections of these crate docs.
//!
//! # Start here: the layer
//!
//! [`BatchNorm`] is a layer over its moving statistics ([`MovingStats`]). A
//! training step is the batch moments, the normalization and the moving
//! update **in one call**, so the moving statistics cannot be left behind
//! (the TensorFlow 1.x `UPDATE_OPS` mistake). `scale` and `offset` belong to
//! the optimizer and are borrowed per call ([`ScaleOffset`]); the step
//! leaves the batch statistics in a [`Batch`], which the backward pass reads.
//!
//! ```
//! use batchnorm::{Batch, BatchNorm, Config, Gradients, MovingStats, ScaleOffset, Shape};
//!
//! let shape = Shape::nhwc(2, 3, 4); // batch, spatial (H*W), channels
//! let x: Vec<f32> = (0..24).map(|i| (i % 7) as f32).collect();
//! let mut y = vec![0.0f32; x.len()];
//!
//! // State: what a checkpoint saves. Parameters: what the optimizer updates.
//! let (mut moving_mean, mut moving_var) = ([0.0f32; 4], [1.0f32; 4]);
//! let (mut gamma, mut beta) = ([1.0f32; 4], [0.0f32; 4]);
//! let moving = MovingStats { mean: &mut moving_mean, variance: &mut moving_var, batches: 0 };
//! let mut bn = BatchNorm::new(Config::pytorch(), moving)?;
//!
//! // A training step, then its backward pass and an SGD step on gamma, beta.
//! let (mut bm, mut bv) = ([0.0f32; 4], [0.0f32; 4]);
//! let mut batch = Batch { mean: &mut bm, variance: &mut bv };
//! bn.train(&x, &mut y, shape, ScaleOffset::new(&gamma, &beta), &mut batch)?;
//! let dy = vec![0.1f32; x.len()]; // the loss's gradient w.r.t. y
//! let (mut dx, mut dgamma, mut dbeta) = (vec![0.0f32; x.len()], [0.0f32; 4], [0.0f32; 4]);
//! let grads = Gradients { dx: &mut dx, dscale: &mut dgamma, doffset: &mut dbeta };
//! bn.backward(&x, &dy, shape, ScaleOffset::new(&gamma, &beta), &batch, grads)?;
//! for c in 0..4 {
//!     gamma[c] -= 0.01 * dgamma[c];
//!     beta[c] -= 0.01 * dbeta[c];
//! }
//!
//! // Inference uses the moving statistics and needs only `&self`.
//! bn.infer(&x, &mut y, shape, ScaleOffset::new(&gamma, &beta))?;
//! assert_eq!(bn.moving().batches, 1);
//! # Ok::<(), batchnorm::Error>(())
//! ```
//!
//! [`BatchNormArray`] is the owned twin (`[f32; C]` arrays), for firmware
//! that keeps a trained layer in a plain `static`.
//!
//! # The kernels one by one (§7)
//!
//! | function | what it computes |
//! |---|---|
//! | [`moments`] | per-channel mean and population variance (`tf.nn.moments`) |
//! | [`accumulate`], [`Moments`] | mergeable per-channel records, for streams, threads and workers |
//! | [`fold`] | per-channel `a = scale / sqrt(var + eps)`, `b = offset - mean * a` |
//! | [`affine`] | `y = act(x * a + b)` with given coefficients |
//! | [`normalize`] | `tf.nn.batch_normalization` (+ a fused activation), no caller scratch |
//! | [`update_moving`] | the moving-average update of a [`Config`] |
//! | [`backward`] | `dx`, `dscale`, `doffset`, training or inference mode |
//! | [`fold_into_weights`] | batch norm folded into a dense or convolution layer's weights and bias |
//! | [`reference`](mod@reference) | the plain `f64` two-pass reference of every kernel (the tests' oracle) |
//!
//! Each has an `_in_place` twin where it maps a tensor, and is also a method
//! of [`Simd`] to force a lane width (`Simd::X4.moments(..)`, for tests and
//! benchmarks); the free functions use [`Simd::detect`].
//!
//! Argument order: inputs first, outputs last; the one exception is an
//! output tensor `y`, which follows the input tensor `x` it mirrors.
//!
//! # Semantics (§1)
//!
//! A tensor is `batch x spatial x channels` in one [`Layout`]:
//! [`Layout::Nhwc`] (channels last, TensorFlow's default and any `[rows, C]`
//! matrix: element `(n, s, c)` at `(n * S + s) * C + c`) or [`Layout::Nchw`]
//! (channels first, PyTorch and ONNX: `(n * C + c) * S + s`). `S` is the
//! product of the spatial dimensions, 1 for a dense layer. Each channel has
//! `count = batch * spatial` elements. [`Shape::nhwc`] and [`Shape::nchw`]
//! take their sizes in memory order, so the channel count is last for one
//! and in the middle for the other.
//!
//! * Moments: `mean`, and the population variance `Σ(x - mean)² / count`.
//! * Normalization: `y = (x - mean) / sqrt(var + eps) * scale + offset`,
//!   computed in the folded form `y = x * a + b` above (TensorFlow's and
//!   PyTorch's CPU form), then the [`Activation`]: none, ReLU, ReLU6 or a
//!   clamp.
//! * Training step: batch moments, normalization with them (population
//!   variance), then `moving = moving * d + batch * (1 - d)`, where the
//!   variance fed in is the population or the sample (Bessel,
//!   `count / (count - 1)`, 1 at `count == 1`) variance.
//! * Backward: with `x̂ = (x - mean) / sqrt(var + eps)`, `doffset = Σ dy`,
//!   `dscale = Σ dy x̂`, and in training mode `dx = scale / sqrt(var + eps)
//!   / count * (count dy - doffset - x̂ dscale)` (inference mode: `dx = dy
//!   scale / sqrt(var + eps)`); a fused activation masks `dy` by its
//!   derivative first.
//!
//! Presets ([`Config`]), each checked against that framework's own output
//! (vectors from real runs in `tests/data/`):
//!
//! | preset | eps | decay | moving variance fed with |
//! |---|---|---|---|
//! | [`Config::keras`] (Keras 3, `tf.keras`) | 1e-3 | 0.99 | population |
//! | [`Config::tf_fused`]`(f)` (`FusedBatchNormV3`) | 1e-3 | `1 - f` | sample |
//! | [`Config::tf_layers`]`(fused)` (TF 1.x) | 1e-3 | 0.99 | sample if fused, else population |
//! | [`Config::pytorch`] (`BatchNorm2d`) | 1e-5 | 0.9 | sample |
//! | [`Config::pytorch_momentum`]`(None)` | 1e-5 | cumulative, `1 - 1/b` | sample |
//! | [`Config::onnx`] (opset 15) | 1e-5 | 0.9 | population |
//!
//! # Numerical contract (§3)
//!
//! Against the [`reference`](mod@reference) (plain two-pass `f64`), for `count` up to 10⁷,
//! finite inputs with `|x| <= 1e17`, every build (SSE2, AVX2+FMA,
//! AVX-512, NEON, the scalar fallback), with `ε = f32::EPSILON`:
//!
//! * mean: `|m - m_ref| <= 1e-6 (|m_ref| + σ_ref)`;
//! * variance: relative error `<= 1e-5` when `|mean| <= 10 σ`, `<= 1e-3`
//!   when `|mean| <= 1e4 σ` (e.g. `1e4 + N(0, 1)`, where `E[x²] - E[x]²`
//!   in `f32` returns garbage or a negative number);
//! * normalize, given the same statistics: `|y - y_ref| <= 4 ε (|x a| +
//!   |mean a| + |offset|)`;
//! * backward: the bounds in the [`backward`] docs.
//!
//! [`Moments`] records keep `f64` state, so records streamed chunk by chunk
//! or merged in any tree order keep the same bounds.
//!
//! # Errors and edge cases (§2)
//!
//! Bad input returns an [`Error`] naming what was wrong (expected against
//! actual) and writes nothing to any output or state: slice lengths that do
//! not match the shape, zero channels, a shape whose size overflows
//! `usize`, an `epsilon` that is not finite and positive, a decay outside
//! `[0, 1]`, a `Clamp` with `min > max` or a NaN bound, a record count past
//! `u64::MAX`. Statistics of an empty batch ([`moments`], a training step,
//! [`backward`] in training mode) are [`Error::EmptyBatch`]; the mapping
//! kernels ([`affine`], [`normalize`], inference) write nothing and return
//! `Ok` on an empty batch. NaN and infinities propagate into their own
//! channel only. A constant channel normalizes to `offset` (then the
//! activation). No input makes a kernel panic, on any target (a link test in
//! CI proves no panic path survives optimization).
//!
//! # Firmware (§5)
//!
//! The crate is `#![no_std]` with no allocator, and no `unsafe` is
//! compiled for any target but x86-64 (see [Run-time
//! selection](#run-time-selection-on-x86-64)). CI
//! measures, on `thumbv7em-none-eabihf` (Cortex-M4F) under
//! `qemu-system-arm`, the stack of every kernel (at most 4 KiB for any
//! shape: 3.5 KB for a training step, 2.7 KB for its backward pass) and the
//! flash of an inference-only binary (5.8 KB of `.text`) and of a training
//! one (22.2 KB), and checks every kernel's results on the device.
//!
//! ## Compact builds
//!
//! On every target but x86, x86-64 and aarch64 (microcontrollers such as
//! `thumbv7em-none-eabihf`, and every other target, wasm32 included) the
//! build is *compact*: one lane width, one-lane `f32` ([`Simd::detect`]
//! returns [`Simd::Scalar`], and every [`Simd`] value runs it), one
//! normalization kernel for every [`Activation`] (an exact identity clamp
//! for `None`), and the fold in `f32` arithmetic (within the same bound;
//! `f64` is software on a Cortex-M4F). Only the code a microcontroller runs
//! goes into its flash. The `all-widths` feature compiles every width and
//! activation kernel there too (for wasm32 with `simd128`, say, where
//! `Simd::X4` is native); `--cfg batchnorm_compact` makes any build compact
//! (CI tests the compact code on the host with it).
//!
//! On x86 and aarch64 a build compiles the widths it runs in native
//! registers: `Scalar` and `X4`, plus `X8` with `avx` and `X16` with
//! `avx512f` on x86 ([`Simd::effective`] says which width a forced
//! [`Simd`] runs); `all-widths` compiles the emulated ones too, which is how
//! the test suite runs every code path on any machine. x86-64 compiles
//! every width and picks at run time:
//!
//! ## Run-time selection on x86-64
//!
//! A plain `cargo build` for x86-64 is SSE2, and `wide`'s wider types are
//! then several 128-bit registers. So on x86-64 [`Simd::X8`] and
//! [`Simd::X16`] are the crate's own lane types over `core::arch`: one
//! `ymm` register with AVX2 and FMA, one `zmm` register with AVX-512F. The
//! kernels instantiated with them run inside `#[target_feature]`
//! functions, so they are compiled with those instructions whatever the
//! build's flags, and [`Simd::detect`] chooses them only after the CPU
//! reported the features (`cpuid` and `xgetbv`, asked once and cached; no
//! `std` needed, so `no_std` builds select at run time too). A build with
//! `-C target-cpu=native` runs the same code and skips the question. This
//! is the crate's one module with `unsafe` (the calls into
//! `#[target_feature]` code and intrinsics, each justified by the
//! detection), and CI disassembles the test binaries to check that no
//! kernel code of those widths was left compiled without its instructions
//! (`.ci/dispatch`).
//!
//! With those two widths, normalization (`normalize`, `affine`, inference,
//! the training step's second pass) of a channels-last tensor, or of an
//! NCHW tensor with fewer positions than lanes (the same periodic path),
//! writes an output of 16 MiB or more with streaming stores (`vmovntps`):
//! past the caches, without first reading each line it writes, a third less
//! memory traffic once the tensors no longer fit the last-level cache. That
//! is for every channel count whose pattern (`lcm(C, lanes)` elements) is
//! at most 2048 long (C = 1000 with sixteen lanes: two rows), and every
//! multiple of 16 (a 64-byte line; rows longer than 2048 only when the
//! output starts on a line). Such a call ends with an `sfence`, so the
//! output is ordered before anything the caller does next (a lock, a
//! channel). Smaller outputs, and NCHW runs of a vector or more, go through
//! the caches, where the next layer finds them. The size is each call's (a
//! threaded call decides per chunk); the results are the same bits either
//! way.
//!
//! On every target but x86-64 and aarch64 (i686 included) the
//! stack-resident windows are small, so that every kernel stays within
//! 4 KiB of stack for any shape; on x86-64 and aarch64 they are larger
//! (tens of KiB at most, never growing with the tensor), for speed.
//!
//! # Threads
//!
//! With the optional `rayon` feature, the module `parallel` runs moments,
//! normalization, a training step and inference on a rayon thread pool,
//! with results that are the same bits for every number of threads (fixed
//! chunks, fixed merge tree). Without it the crate is `no_std` and uses no
//! allocator; with it, only that module uses `std`. Across processes, see
//! `docs/sync-batchnorm.md` for the synchronized batch-norm protocol.
//!
//! # Performance (§4)
//!
//! Speed is measured by the criterion benches in `benches/`, as a ratio to
//! the machine's own limit measured in the same run: a plain 4-accumulator
//! SIMD sum over the same bytes for moments, a SIMD `x * a + b` for
//! normalization, their sum for a training step. The targets, from L2- to
//! DRAM-sized tensors, every layout and channel count: moments and
//! normalization at 0.9 or more of their limit, a training step at 0.85 or
//! more, the backward pass at 0.85 or more of one read pass plus one
//! read+write pass; where a layout's structural bound (the simplest kernel
//! with the same access pattern, also measured) is lower, 0.9 of that
//! bound. `benches/README.md` has the tables, the CPU, the commands, and
//! the cells that miss their target.
#![no_std]
#![deny(unsafe_code)]
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
#[cfg(all(target_arch = "x86_64", not(batchnorm_compact)))]
mod x86;

pub use backward::{backward, backward_in_place, Gradients, Mode};
pub use ema::{update_moving, Config, Momentum, MovingStats};
pub use error::Error;
pub use fold::{fold_into_weights, WeightLayout};
pub use lanes::Simd;
pub use layer::{Batch, BatchNorm, BatchNormArray, ScaleOffset};
pub use moments::{accumulate, moments, Moments};
pub use normalize::{
    affine, affine_in_place, fold, normalize, normalize_in_place, Activation, Params,
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

/// The README's code blocks, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
