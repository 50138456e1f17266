//! The backward pass of batch normalization (crate docs §1, Backward): the
//! gradients `dx`, `dscale` and `doffset` of a loss given its gradient `dy`
//! with respect to the forward output.
//!
//! Per channel, with `inv = 1 / sqrt(var + eps)`, `x̂ = (x - mean) * inv` and
//! `g` the incoming gradient masked by the fused activation's derivative:
//!
//! * `doffset = Σ g`, `dscale = Σ g * x̂` (both modes);
//! * [`Mode::Training`] (the forward normalized with the batch's own
//!   statistics, so they depend on `x`):
//!   `dx = scale * inv / count * (count * g - doffset - x̂ * dscale)`;
//! * [`Mode::Inference`] (the statistics are constants, e.g. the moving
//!   averages of a frozen layer): `dx = g * scale * inv`.
//!
//! `mean` and `variance` are the ones the forward pass normalized with (the
//! batch statistics a training step returns, or the moving statistics); the
//! backward pass does not recompute them.
//!
//! # Algorithm
//!
//! Two passes over each window of channels: the first reads `x` and `dy`
//! and sums `g` and `g * (x - mean)` per channel; the second reads them
//! again and writes `dx = g * p + ((x - mean) * q + r)`, with per-channel
//! `p = scale * inv`, `q = -p * inv * dscale / count`, `r = -p * doffset /
//! count` (`q = r = 0` in inference mode) computed in `f64` from the `f64`
//! sums and rounded once. Subtracting the mean before scaling keeps the
//! result accurate for channels whose mean is far larger than their spread
//! (`1e3 σ` is tested): the folded `x * q + (r - mean * q)` would lose
//! `|mean| / σ` ulps to cancellation.
//!
//! The sums are `f32` lane sums over blocks of at most [`INNER`] terms per
//! lane (joined in a few more `f32` additions), then moved to `f64`: no
//! `f32` sum ever grows over more than ~72 terms however large the batch.
//! Periodic rows are read in memory order: a row of up to `2 * SLOTS`
//! vectors (`SLOTS / 2` with an activation mask, whose two coefficients
//! per vector spilled a wider group) is one register group (a shorter one
//! unrolled over several rows in separate slots), a wider one is read in
//! panels of [`PANEL_ROWS`] rows by column groups; with sixteen registers
//! (SSE2, AVX2) a row wider than one column group is instead read
//! [`SUMS_ROWS`] rows at a time front to back, its sums kept in the window.
//! The `dx` pass of a wide row goes row by row (two rows per pass over the
//! coefficients on tensors of up to 4 MiB, but for small-stack targets, as
//! `normalize` does), loading each vector's coefficients beside it, in
//! inference mode without a mask (one coefficient) and, with sixteen
//! registers, wherever that is at most four loads; otherwise in panels of
//! [`DX_PANEL`] rows by column groups of `SLOTS / 2` vectors with their
//! coefficients in registers (with AVX-512, loading them beside each
//! vector, six loads per output vector or eight with a mask, and reading a
//! block of 64 rows once per column group both ran at 0.4-0.6 of the limit
//! at 8 and 64 MiB with 256 channels; with AVX2 the panels were the slower,
//! see [`dx_strip`]).
//! Layouts are walked as in [`normalize`](crate::normalize): contiguous
//! NCHW runs with splatted coefficients; periodic tensors (NHWC, or NCHW
//! with fewer spatial positions than lanes) by super-rows of `lcm(period,
//! lanes)` elements when that is at most [`WINDOW`] positions, else by
//! strips of whole channels of at most [`WINDOW`] positions swept over the
//! rows. Tails go through the same code with half-width lanes; with eight
//! and sixteen lanes, NCHW runs of eight vectors and more and periodic
//! tensors whose pattern fits the window instead write `dx` from its first
//! aligned element, an end vector at each end covering the rest, as
//! `normalize` does.
//!
//! The activation mask, the error bound, the edge cases and the stack are
//! documented on [`backward`].

use crate::error::Error;
use crate::lanes::{enabled, inlined, with_lane, Lane, Line, Simd, COMPACT, SMALL_STACK};
use crate::normalize::{aligns, copy_from, fold_span, head_of, paired_rows, Activation, Params};
use crate::shape::{Layout, Shape};
use wide::f64x4;

/// Positions (and at most as many channels) whose coefficients and sums sit
/// on the stack at once: 1024 on 64-bit hosts (x86-64, aarch64), where a
/// channels-last row of up to 1024 channels is then read whole, row after
/// row (with 256, NHWC C = 1000 went in strips of 1 KiB per row: 0.28-0.33
/// of the limit at 8 and 64 MiB against 0.48-0.62 whole, AMD EPYC Zen 4);
/// 32 on small-stack targets (microcontrollers, 32-bit targets, and
/// `--cfg batchnorm_compact`): a 1.3 KB window, and 4.1 KB of stack in all
/// on a Cortex-M4 with 64.
pub(crate) const WINDOW: usize = if SMALL_STACK { 32 } else { 1024 };

/// Channels of the window of NCHW runs when the tensor has at most that
/// many. Safe Rust zeroes a window on every call (43 KB at [`WINDOW`]),
/// though the call writes every position it reads: on an AMD Zen 5, NCHW
/// with 3 to 64 channels at 256 KiB ran up to 1.17 times as fast with this
/// one (crate bench, default build; native up to 1.09). Not for periodic
/// tensors: their code (`periodic` and what it calls) is most of
/// `backward`'s, and a second window size doubled it (+1.1 MB of x86-64
/// code). One window on small-stack targets.
const SMALL_WINDOW: usize = if SMALL_STACK { WINDOW } else { 128 };

/// Rows a column group of the sums pass sums in registers before the next
/// group takes the same rows, when a row needs several groups (wider than
/// `2 * SLOTS` vectors): the panel's rows are read as that many sequential
/// streams. A row that fits one group is read in memory order, [`INNER`]
/// rows at a time.
const PANEL_ROWS: usize = 16;

/// Terms an `f32` lane sum takes before it is moved to `f64`.
pub(crate) const INNER: usize = 64;

/// Which statistics the forward pass normalized with.
///
/// ```
/// use batchnorm::{backward, Activation, Gradients, Mode, Params, Shape};
/// let x = [0.0f32, 2.0];
/// let dy = [1.0f32, 3.0];
/// let p = Params {
///     mean: &[1.0],
///     variance: &[1.0],
///     scale: None,
///     offset: None,
///     epsilon: 3.0, // inv = 1 / sqrt(1 + 3) = 0.5
///     activation: Activation::None,
/// };
/// let (mut dx, mut ds, mut dof) = ([0.0; 2], [0.0; 1], [0.0; 1]);
/// let g = Gradients { dx: &mut dx, dscale: &mut ds, doffset: &mut dof };
/// backward(&x, &dy, Shape::rows(2, 1), &p, Mode::Inference, g).unwrap();
/// assert_eq!(dx, [0.5, 1.5]); // dy * inv: the statistics are constants
/// let g = Gradients { dx: &mut dx, dscale: &mut ds, doffset: &mut dof };
/// backward(&x, &dy, Shape::rows(2, 1), &p, Mode::Training, g).unwrap();
/// assert_eq!(dx.iter().sum::<f32>(), 0.0); // the batch mean absorbs shifts
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Mode {
    /// The batch's own mean and population variance (a training step):
    /// `dx` includes the gradient through the statistics.
    #[default]
    Training,
    /// Constant statistics (the moving averages, a frozen layer): `dx = g *
    /// scale / sqrt(var + eps)`.
    Inference,
}

/// The outputs of [`backward`]: `dx` has the shape of `x`; `dscale` and
/// `doffset` have one entry per channel.
///
/// ```
/// use batchnorm::Gradients;
/// let (mut dx, mut dscale, mut doffset) = (vec![0.0f32; 12], [0.0f32; 3], [0.0f32; 3]);
/// let grads = Gradients { dx: &mut dx, dscale: &mut dscale, doffset: &mut doffset };
/// assert_eq!(grads.dx.len(), 12);
/// ```
#[derive(Debug)]
pub struct Gradients<'a> {
    /// Gradient with respect to the input `x`.
    pub dx: &'a mut [f32],
    /// Gradient with respect to `scale` (`gamma`).
    pub dscale: &'a mut [f32],
    /// Gradient with respect to `offset` (`beta`).
    pub doffset: &'a mut [f32],
}

/// The backward pass: `dx`, `dscale` and `doffset` from the forward input
/// `x`, the gradient `dy` of the loss with respect to the forward output,
/// and the forward's [`Params`] (the `mean` and `variance` it normalized
/// with, `scale`, `offset`, `epsilon`, and the fused `activation`, whose
/// mask is applied to `dy`).
///
/// Per channel, with `inv = 1 / sqrt(var + eps)`, `x̂ = (x - mean) * inv` and
/// `g` the incoming gradient masked by the activation's derivative:
/// `doffset = Σ g`, `dscale = Σ g * x̂` (both modes); [`Mode::Training`]:
/// `dx = scale * inv / count * (count * g - doffset - x̂ * dscale)`;
/// [`Mode::Inference`]: `dx = g * scale * inv`.
///
/// # Activation mask
///
/// With a fused activation, `g = dy` where the forward's pre-activation
/// output `y` was strictly inside the activation's linear range and `0`
/// elsewhere, as PyTorch's autograd does for `relu(batch_norm(x))`: ReLU
/// keeps `y > 0`, ReLU6 `0 < y < 6`, `Clamp { min, max }` `min < y < max`;
/// a NaN `y` gives `0`. `y` is recomputed from `x` with the forward's own
/// folded form `y = x * a + b` (`a = scale / sqrt(var + eps)`, `b = offset -
/// mean * a`, rounded to `f32` as [`fold`](crate::fold) and
/// [`normalize`](crate::normalize) round them), so the caller need not keep
/// `y`. `x * a + b` is one fused multiply-add where the target has FMA,
/// except in the one-lane tails, which round twice (as `normalize`'s do):
/// an element whose exact `y` is within a rounding of a bound of the band
/// (for example `x == mean` with no offset, where `y` is 0 or the rounding
/// error of `mean * a`) may be masked differently by different widths and
/// builds. `reference::check_backward` accepts either for such elements.
///
/// # Numerical bound
///
/// Against [`reference::backward`](crate::reference::backward) (exact
/// arithmetic on the same `f32` inputs, the same mask), with `ε =
/// f32::EPSILON`, `d = x - mean`, and the reference's per-channel `p`, `q`,
/// `r` above, for finite data whose intermediate sums stay finite in `f32`:
///
/// * `|doffset - ref| <= 37 ε Σ|g|`;
/// * `|dscale - ref| <= 37 ε inv Σ|g d|`;
/// * `|dx - ref| <= 4 ε (|p g| + |q d| + |r|) + 37 ε |p| / count (Σ|g| +
///   inv² |d| Σ|g d|)` (training; inference: `4 ε |p g|`),
///
/// each plus the final rounding to `f32`
/// ([`reference::backward_sum_bounds`](crate::reference::backward_sum_bounds)
/// and [`reference::backward_dx_bound`](crate::reference::backward_dx_bound)
/// compute them; [`reference::check_backward`](crate::reference::check_backward)
/// applies them). Derivation: a term `g` or `g d` enters an `f32` lane sum
/// of at most 64 terms (63 roundings), then, on contiguous runs, two `f32`
/// additions joining four accumulators and at most five reducing the lanes
/// (`wide`'s `reduce_add`: a tree of depth 4 with AVX-512, pairs of halves
/// summed in order elsewhere), on periodic rows at most three joining row
/// slots pairwise and one adding to a block sum that is zero (or, for rows
/// wider than one register group, sums of 16 terms, two joins and at most
/// four panel sums: 21 roundings), then `f64`; with `u = ε / 2` that is at most
/// 70 roundings of relative size `u` of partial sums bounded by `Σ|t|`, plus
/// `d = fl(x - mean)` and the product (`2u |g d|`), and the `f64` summation
/// (`count * 2^-53 <= 0.01 u` for `count <= 10^7`): `72.01 u <= 37 ε` of
/// `Σ|t|` (Higham, Accuracy and Stability, §4.2). `dscale` adds
/// the `f64` `inv` (negligible). In `dx`, `p`, `q` and `r` are rounded to
/// `f32` (`u` each), `fl(x - mean)`, `d * q + r` and `g * p + (..)` add a
/// rounding each (unfused: two more): at most `7u` of `|p g| + |q d| + |r|`
/// (`<= 4 ε`), and the sums' errors move `r` by `|p| / count` times the
/// `doffset` error and `q` by `|p| inv / count` times the `dscale` error.
///
/// # Edge cases
///
/// NaN or infinities in `x`, `dy`, or the parameters of a channel propagate
/// into that channel's outputs only. An empty batch (`count == 0`) is
/// [`Error::EmptyBatch`] in training mode (no statistics to differentiate);
/// in inference mode it writes `dscale = doffset = 0` and returns `Ok`.
///
/// # Stack
///
/// One window of positions: six `f32` coefficients per position (`a`, `b`,
/// `mean`, `p`, `q`, `r`; `p` and `q` hold the `f32` block sums during the
/// first pass), two `f64` sums per channel and a two-byte
/// position-to-channel index, 42 bytes per position: 1.3 KiB for the 32
/// positions of a microcontroller or 32-bit build (3.5 KiB in all on a
/// Cortex-M4, measured by `.ci/firmware`), 42 KiB for the 1024 of an x86-64
/// or aarch64 build; plus the register groups' sums and coefficients where
/// they spill. No heap.
///
/// Errors (nothing written): a slice whose length does not match `shape`, a
/// bad shape, a negative or non-finite `epsilon`, a bad `Clamp`, or, in
/// [`Mode::Training`], [`Error::EmptyBatch`] when `batch * spatial == 0`. In
/// [`Mode::Inference`] an empty batch sets `dscale` and `doffset` to 0.
///
/// ```
/// use batchnorm::{backward, moments, Activation, Gradients, Mode, Params, Shape};
/// // Two rows of two channels; the loss is Σ y * dy.
/// let x = [1.0, 10.0, 3.0, 30.0];
/// let dy = [1.0, 0.5, -1.0, 0.5];
/// let shape = Shape::rows(2, 2);
/// let (mut mean, mut var) = ([0.0; 2], [0.0; 2]);
/// moments(&x, shape, &mut mean, &mut var).unwrap();
/// let params = Params {
///     mean: &mean,
///     variance: &var,
///     scale: None,
///     offset: None,
///     epsilon: 1e-5,
///     activation: Activation::None,
/// };
/// let (mut dx, mut dscale, mut doffset) = ([0.0; 4], [0.0; 2], [0.0; 2]);
/// let grads = Gradients { dx: &mut dx, dscale: &mut dscale, doffset: &mut doffset };
/// backward(&x, &dy, shape, &params, Mode::Training, grads).unwrap();
/// assert_eq!(doffset, [0.0, 1.0]);
/// assert!((dscale[0] + 2.0).abs() < 1e-4); // x̂ = -1, +1 (almost: eps)
/// // A constant gradient on a channel has no effect on its inputs.
/// assert!(dx[1].abs() < 1e-6 && dx[3].abs() < 1e-6);
/// ```
pub fn backward(
    x: &[f32],
    dy: &[f32],
    shape: Shape,
    params: &Params<'_>,
    mode: Mode,
    grads: Gradients<'_>,
) -> Result<(), Error> {
    Simd::detect().backward(x, dy, shape, params, mode, grads)
}

/// [`backward`] overwriting `dy` with `dx`.
///
/// ```
/// use batchnorm::{backward_in_place, Activation, Mode, Params, Shape};
/// // Inference mode with a ReLU: dx = dy * scale / sqrt(var + eps) where
/// // the forward output was positive.
/// let x = [-1.0f32, 2.0];
/// let mut dy = [1.0f32, 1.0];
/// let params = Params {
///     mean: &[0.0],
///     variance: &[3.0],
///     scale: Some(&[2.0]),
///     offset: None,
///     epsilon: 1.0,
///     activation: Activation::Relu,
/// };
/// let (mut dscale, mut doffset) = ([0.0], [0.0]);
/// let shape = Shape::rows(2, 1);
/// backward_in_place(&x, &mut dy, shape, &params, Mode::Inference, &mut dscale, &mut doffset)
///     .unwrap();
/// assert_eq!(dy, [0.0, 1.0]);
/// assert_eq!((dscale[0], doffset[0]), (1.0, 1.0));
/// ```
pub fn backward_in_place(
    x: &[f32],
    dy: &mut [f32],
    shape: Shape,
    params: &Params<'_>,
    mode: Mode,
    dscale: &mut [f32],
    doffset: &mut [f32],
) -> Result<(), Error> {
    Simd::detect().backward_in_place(x, dy, shape, params, mode, dscale, doffset)
}

impl Simd {
    /// [`backward`] with this lane width (every width runs on every machine;
    /// the results agree within the bound on [`backward`], not bit for bit).
    ///
    /// ```
    /// use batchnorm::{Activation, Gradients, Mode, Params, Shape, Simd};
    /// let x: Vec<f32> = (0..40).map(|i| (i % 7) as f32).collect();
    /// let dy: Vec<f32> = (0..40).map(|i| (i % 3) as f32 - 1.0).collect();
    /// let p = Params {
    ///     mean: &[3.5; 4], // no x sits on the ReLU's kink
    ///     variance: &[4.0; 4],
    ///     scale: None,
    ///     offset: None,
    ///     epsilon: 1e-3,
    ///     activation: Activation::Relu,
    /// };
    /// let mut out = [[0.0f32; 40]; 2];
    /// for (simd, dx) in [Simd::Scalar, Simd::X16].into_iter().zip(&mut out) {
    ///     let (mut ds, mut dof) = ([0.0; 4], [0.0; 4]);
    ///     let g = Gradients { dx, dscale: &mut ds, doffset: &mut dof };
    ///     simd.backward(&x, &dy, Shape::rows(10, 4), &p, Mode::Training, g).unwrap();
    /// }
    /// assert!(out[0].iter().zip(&out[1]).all(|(a, b)| (a - b).abs() < 1e-5));
    /// ```
    pub fn backward(
        self,
        x: &[f32],
        dy: &[f32],
        shape: Shape,
        params: &Params<'_>,
        mode: Mode,
        grads: Gradients<'_>,
    ) -> Result<(), Error> {
        shape.check("x", x.len())?;
        shape.check("dy", dy.len())?;
        shape.check("dx", grads.dx.len())?;
        let outs = Outs {
            dscale: grads.dscale,
            doffset: grads.doffset,
        };
        if prepare(shape, params, mode, &outs)? {
            let mut io = Split {
                x,
                dy,
                dx: grads.dx,
            };
            run(self, &mut io, shape, params, mode, outs);
        } else {
            outs.dscale.fill(0.0);
            outs.doffset.fill(0.0);
        }
        Ok(())
    }

    /// [`backward_in_place`] with this lane width.
    ///
    /// ```
    /// use batchnorm::{Activation, Mode, Params, Shape, Simd};
    /// let x = [1.0f32, 2.0, 3.0];
    /// let mut dy = [1.0f32, 1.0, 1.0];
    /// let p = Params {
    ///     mean: &[2.0],
    ///     variance: &[0.0],
    ///     scale: None,
    ///     offset: None,
    ///     epsilon: 1.0,
    ///     activation: Activation::None,
    /// };
    /// let (mut ds, mut dof) = ([0.0], [0.0]);
    /// Simd::X4
    ///     .backward_in_place(&x, &mut dy, Shape::rows(3, 1), &p, Mode::Training, &mut ds, &mut dof)
    ///     .unwrap();
    /// assert_eq!(dy, [0.0; 3]); // a constant gradient moves nothing
    /// assert_eq!((ds[0], dof[0]), (0.0, 3.0));
    /// ```
    #[allow(clippy::too_many_arguments)]
    pub fn backward_in_place(
        self,
        x: &[f32],
        dy: &mut [f32],
        shape: Shape,
        params: &Params<'_>,
        mode: Mode,
        dscale: &mut [f32],
        doffset: &mut [f32],
    ) -> Result<(), Error> {
        shape.check("x", x.len())?;
        shape.check("dy", dy.len())?;
        let outs = Outs { dscale, doffset };
        if prepare(shape, params, mode, &outs)? {
            run(self, &mut InPlace { x, dy }, shape, params, mode, outs);
        } else {
            outs.dscale.fill(0.0);
            outs.doffset.fill(0.0);
        }
        Ok(())
    }
}

/// The per-channel outputs.
struct Outs<'a> {
    dscale: &'a mut [f32],
    doffset: &'a mut [f32],
}

/// Validates everything but the tensors' lengths; `Ok(false)` for an empty
/// batch in inference mode (nothing to walk).
fn prepare(shape: Shape, params: &Params<'_>, mode: Mode, outs: &Outs<'_>) -> Result<bool, Error> {
    params.validate(shape)?;
    shape.check_channels("dscale", outs.dscale.len())?;
    shape.check_channels("doffset", outs.doffset.len())?;
    if shape.count()? == 0 {
        return match mode {
            Mode::Training => Err(Error::EmptyBatch),
            Mode::Inference => Ok(false),
        };
    }
    Ok(true)
}

// ---------------------------------------------------------------------------
// Inputs and outputs

/// Where the kernel reads `x` and `dy` and writes `dx`.
trait Io {
    fn x(&self) -> &[f32];
    fn dy(&self) -> &[f32];
    /// `dx = f(x, dy)` on `len` elements from `start` (a multiple of the
    /// width).
    fn map<V: Lane>(&mut self, start: usize, len: usize, f: impl Fn(V, V) -> V);
    /// `rows` rows of `NV` vectors, `stride` apart from `start`: vector `k`
    /// of each row is `dx = f(k, x, dy)`.
    fn map_rows<V: Lane, const NV: usize>(
        &mut self,
        start: usize,
        rows: usize,
        stride: usize,
        f: impl Fn(usize, V, V) -> V,
    );
    /// `rows` rows of `pat`'s length, `stride` apart from `start`: `dx =
    /// f(x, dy, coefficients)` vector by vector, the coefficients read from
    /// `pat` at the same offset.
    fn map_rows_pat<V: Lane>(
        &mut self,
        start: usize,
        rows: usize,
        stride: usize,
        pat: Pat<'_>,
        f: impl Fn(V, V, Coefs<V>) -> V,
    );
    /// Elements from `at` to the first element of `dx` from `at` on that
    /// is aligned to `V`.
    fn head<V: Lane>(&self, at: usize) -> usize;
    /// `x`'s and `dy`'s vectors at element `at` (zeros past the end: no
    /// caller).
    #[inline(always)]
    fn load_at<V: Lane>(&self, at: usize) -> (V, V) {
        let (x, dy) = (self.x().get(at..), self.dy().get(at..));
        (
            V::load(x.unwrap_or_default()),
            V::load(dy.unwrap_or_default()),
        )
    }
    /// Stores `v` to `dx` at element `at` (nothing past the end).
    fn store_at<V: Lane>(&mut self, at: usize, v: V);
}

/// `V::WIDTH` positions of each of the six coefficient slices of a
/// [`Pat`].
type CoefChunks<'a> = (
    ((&'a [f32], &'a [f32]), (&'a [f32], &'a [f32])),
    (&'a [f32], &'a [f32]),
);

/// The coefficient chunks of `pat`, `V::WIDTH` positions each, for [`coefs`]. No
/// `map` here: `Map`'s out-of-line `__iterator_get_unchecked` would hold the
/// loads, compiled without the lane's instructions on x86-64.
#[inline(always)]
fn coef_chunks<V: Lane>(pat: Pat<'_>) -> impl Iterator<Item = CoefChunks<'_>> {
    let w = V::WIDTH;
    let ab = pat.a.chunks_exact(w).zip(pat.b.chunks_exact(w));
    let mp = pat.m.chunks_exact(w).zip(pat.p.chunks_exact(w));
    let qr = pat.q.chunks_exact(w).zip(pat.r.chunks_exact(w));
    ab.zip(mp).zip(qr)
}

/// The coefficient vectors of one item of [`coef_chunks`].
#[inline(always)]
fn coefs<V: Lane>((((a, b), (m, p)), (q, r)): CoefChunks<'_>) -> Coefs<V> {
    Coefs {
        a: V::load(a),
        b: V::load(b),
        m: V::load(m),
        p: V::load(p),
        q: V::load(q),
        r: V::load(r),
    }
}

struct Split<'a> {
    x: &'a [f32],
    dy: &'a [f32],
    dx: &'a mut [f32],
}

struct InPlace<'a> {
    x: &'a [f32],
    dy: &'a mut [f32],
}

/// The six coefficients of a vector of positions.
#[derive(Clone, Copy)]
struct Coefs<V> {
    a: V,
    b: V,
    m: V,
    p: V,
    q: V,
    r: V,
}

/// A run of per-position coefficients (all six slices the same length).
#[derive(Clone, Copy)]
struct Pat<'a> {
    a: &'a [f32],
    b: &'a [f32],
    m: &'a [f32],
    p: &'a [f32],
    q: &'a [f32],
    r: &'a [f32],
}

impl<'a> Pat<'a> {
    fn slice(&self, from: usize, to: usize) -> Option<Pat<'a>> {
        Some(Pat {
            a: self.a.get(from..to)?,
            b: self.b.get(from..to)?,
            m: self.m.get(from..to)?,
            p: self.p.get(from..to)?,
            q: self.q.get(from..to)?,
            r: self.r.get(from..to)?,
        })
    }
}

impl Io for Split<'_> {
    fn x(&self) -> &[f32] {
        self.x
    }
    fn dy(&self) -> &[f32] {
        self.dy
    }
    #[inline(always)]
    fn head<V: Lane>(&self, at: usize) -> usize {
        head_of::<V>(self.dx.get(at..).unwrap_or_default())
    }
    #[inline(always)]
    fn store_at<V: Lane>(&mut self, at: usize, v: V) {
        v.store(self.dx.get_mut(at..).unwrap_or_default());
    }
    #[inline(always)]
    fn map<V: Lane>(&mut self, start: usize, len: usize, f: impl Fn(V, V) -> V) {
        let w = V::WIDTH;
        let r = start..start + len;
        let (Some(x), Some(dy), Some(dx)) = (
            self.x.get(r.clone()),
            self.dy.get(r.clone()),
            self.dx.get_mut(r),
        ) else {
            return;
        };
        let ins = x.chunks_exact(w).zip(dy.chunks_exact(w));
        for ((xc, dc), oc) in ins.zip(dx.chunks_exact_mut(w)) {
            f(V::load(xc), V::load(dc)).store(oc);
        }
    }
    #[inline(always)]
    fn map_rows<V: Lane, const NV: usize>(
        &mut self,
        start: usize,
        rows: usize,
        stride: usize,
        f: impl Fn(usize, V, V) -> V,
    ) {
        let w = V::WIDTH;
        if stride == NV * w {
            // Back-to-back rows: one slice (inside the tensors on every
            // call), walked in steps the compiler knows.
            let span = start..start + rows * stride;
            let (Some(x), Some(dy), Some(dx)) = (
                self.x.get(span.clone()),
                self.dy.get(span.clone()),
                self.dx.get_mut(span),
            ) else {
                return;
            };
            let n = NV * w;
            for (i, x) in x.chunks_exact(n).enumerate() {
                let (Some(dy), Some(dx)) = (dy.get(i * n..i * n + n), dx.get_mut(i * n..i * n + n))
                else {
                    return;
                };
                for k in 0..NV {
                    let o = k * w;
                    let (Some(xs), Some(ds), Some(out)) =
                        (x.get(o..), dy.get(o..), dx.get_mut(o..))
                    else {
                        continue;
                    };
                    f(k, V::load(xs), V::load(ds)).store(out);
                }
            }
            return;
        }
        for r in 0..rows {
            let base = start + r * stride;
            let span = base..base + NV * w;
            let (Some(x), Some(dy), Some(dx)) = (
                self.x.get(span.clone()),
                self.dy.get(span.clone()),
                self.dx.get_mut(span),
            ) else {
                return;
            };
            for k in 0..NV {
                let o = k * w;
                f(k, V::load(&x[o..]), V::load(&dy[o..])).store(&mut dx[o..]);
            }
        }
    }
    #[inline(always)]
    fn map_rows_pat<V: Lane>(
        &mut self,
        start: usize,
        rows: usize,
        stride: usize,
        pat: Pat<'_>,
        f: impl Fn(V, V, Coefs<V>) -> V,
    ) {
        let (w, len) = (V::WIDTH, pat.m.len());
        let mut r0 = 0;
        // Two rows per pass over the coefficients, as in `normalize`
        // ([`paired_rows`]): four loads per output vector instead of six in
        // training mode. Not on small-stack targets: the pair's slices
        // took 168 B more of a Cortex-M4 frame (3,724 B of 4,096).
        let paired = !SMALL_STACK && paired_rows::<V>(rows, stride, len);
        while paired && r0 + 2 <= rows {
            let base = start + r0 * stride;
            let span = base..base + stride + len;
            let (Some(x), Some(dy), Some(dx)) = (
                self.x.get(span.clone()),
                self.dy.get(span.clone()),
                self.dx.get_mut(span),
            ) else {
                return;
            };
            let (Some((x0, x1)), Some((g0, g1)), Some((d0, d1))) = (
                x.split_at_checked(stride),
                dy.split_at_checked(stride),
                dx.split_at_mut_checked(stride),
            ) else {
                return;
            };
            let xs = x0.chunks_exact(w).zip(x1.chunks_exact(w));
            let gs = g0.chunks_exact(w).zip(g1.chunks_exact(w));
            let ds = d0.chunks_exact_mut(w).zip(d1.chunks_exact_mut(w));
            let outs = ds.zip(coef_chunks::<V>(pat));
            for (((a0, a1), (b0, b1)), ((o0, o1), k)) in xs.zip(gs).zip(outs) {
                let k = coefs(k);
                f(V::load(a0), V::load(b0), k).store(o0);
                f(V::load(a1), V::load(b1), k).store(o1);
            }
            r0 += 2;
        }
        for r in r0..rows {
            let base = start + r * stride;
            let span = base..base + len;
            let (Some(x), Some(dy), Some(dx)) = (
                self.x.get(span.clone()),
                self.dy.get(span.clone()),
                self.dx.get_mut(span),
            ) else {
                return;
            };
            let ins = x.chunks_exact(w).zip(dy.chunks_exact(w));
            let outs = dx.chunks_exact_mut(w).zip(coef_chunks::<V>(pat));
            for ((xc, dc), (oc, k)) in ins.zip(outs) {
                f(V::load(xc), V::load(dc), coefs(k)).store(oc);
            }
        }
    }
}

impl Io for InPlace<'_> {
    fn x(&self) -> &[f32] {
        self.x
    }
    fn dy(&self) -> &[f32] {
        self.dy
    }
    #[inline(always)]
    fn head<V: Lane>(&self, at: usize) -> usize {
        head_of::<V>(self.dy.get(at..).unwrap_or_default())
    }
    #[inline(always)]
    fn store_at<V: Lane>(&mut self, at: usize, v: V) {
        v.store(self.dy.get_mut(at..).unwrap_or_default());
    }
    #[inline(always)]
    fn map<V: Lane>(&mut self, start: usize, len: usize, f: impl Fn(V, V) -> V) {
        let w = V::WIDTH;
        let r = start..start + len;
        let (Some(x), Some(dy)) = (self.x.get(r.clone()), self.dy.get_mut(r)) else {
            return;
        };
        for (xc, dc) in x.chunks_exact(w).zip(dy.chunks_exact_mut(w)) {
            f(V::load(xc), V::load(dc)).store(dc);
        }
    }
    #[inline(always)]
    fn map_rows<V: Lane, const NV: usize>(
        &mut self,
        start: usize,
        rows: usize,
        stride: usize,
        f: impl Fn(usize, V, V) -> V,
    ) {
        let w = V::WIDTH;
        if stride == NV * w {
            // Back-to-back rows: as for `Split`.
            let span = start..start + rows * stride;
            let (Some(x), Some(dy)) = (self.x.get(span.clone()), self.dy.get_mut(span)) else {
                return;
            };
            let n = NV * w;
            for (i, x) in x.chunks_exact(n).enumerate() {
                let Some(dy) = dy.get_mut(i * n..i * n + n) else {
                    return;
                };
                for k in 0..NV {
                    let o = k * w;
                    let (Some(xs), Some(ds)) = (x.get(o..), dy.get_mut(o..)) else {
                        continue;
                    };
                    let v = f(k, V::load(xs), V::load(ds));
                    v.store(ds);
                }
            }
            return;
        }
        for r in 0..rows {
            let base = start + r * stride;
            let span = base..base + NV * w;
            let (Some(x), Some(dy)) = (self.x.get(span.clone()), self.dy.get_mut(span)) else {
                return;
            };
            for k in 0..NV {
                let o = k * w;
                let v = f(k, V::load(&x[o..]), V::load(&dy[o..]));
                v.store(&mut dy[o..]);
            }
        }
    }
    #[inline(always)]
    fn map_rows_pat<V: Lane>(
        &mut self,
        start: usize,
        rows: usize,
        stride: usize,
        pat: Pat<'_>,
        f: impl Fn(V, V, Coefs<V>) -> V,
    ) {
        let (w, len) = (V::WIDTH, pat.m.len());
        let mut r0 = 0;
        // Two rows per pass over the coefficients, as for `Split`.
        let paired = !SMALL_STACK && paired_rows::<V>(rows, stride, len);
        while paired && r0 + 2 <= rows {
            let base = start + r0 * stride;
            let span = base..base + stride + len;
            let (Some(x), Some(dy)) = (self.x.get(span.clone()), self.dy.get_mut(span)) else {
                return;
            };
            let (Some((x0, x1)), Some((d0, d1))) =
                (x.split_at_checked(stride), dy.split_at_mut_checked(stride))
            else {
                return;
            };
            let xs = x0.chunks_exact(w).zip(x1.chunks_exact(w));
            let ds = d0.chunks_exact_mut(w).zip(d1.chunks_exact_mut(w));
            for ((a0, a1), ((o0, o1), k)) in xs.zip(ds.zip(coef_chunks::<V>(pat))) {
                let k = coefs(k);
                f(V::load(a0), V::load(o0), k).store(o0);
                f(V::load(a1), V::load(o1), k).store(o1);
            }
            r0 += 2;
        }
        for r in r0..rows {
            let base = start + r * stride;
            let span = base..base + len;
            let (Some(x), Some(dy)) = (self.x.get(span.clone()), self.dy.get_mut(span)) else {
                return;
            };
            let rows = x.chunks_exact(w).zip(dy.chunks_exact_mut(w));
            for ((xc, dc), k) in rows.zip(coef_chunks::<V>(pat)) {
                f(V::load(xc), V::load(dc), coefs(k)).store(dc);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// The activation mask and the two forms of dx

/// The activation's derivative, resolved once per call.
trait Mask: Copy {
    /// Per-position coefficients the mask reads (`a`, `b`).
    const COEFS: usize;
    /// `g` where the forward's `y = x * a + b` passes, 0 elsewhere.
    fn keep<V: Lane>(self, x: V, a: V, b: V, g: V) -> V;
}

/// No activation: every `dy` passes.
#[derive(Clone, Copy)]
struct All;
impl Mask for All {
    const COEFS: usize = 0;
    #[inline(always)]
    fn keep<V: Lane>(self, _: V, _: V, _: V, g: V) -> V {
        g
    }
}

/// ReLU: `y > lo`.
#[derive(Clone, Copy)]
struct Above(f32);
impl Mask for Above {
    const COEFS: usize = 2;
    #[inline(always)]
    fn keep<V: Lane>(self, x: V, a: V, b: V, g: V) -> V {
        x.mul_add(a, b).keep_above(V::splat(self.0), g)
    }
}

/// ReLU6 and Clamp: `lo < y < hi`.
#[derive(Clone, Copy)]
struct Inside(f32, f32);
impl Mask for Inside {
    const COEFS: usize = 2;
    #[inline(always)]
    fn keep<V: Lane>(self, x: V, a: V, b: V, g: V) -> V {
        let y = x.mul_add(a, b);
        y.keep_below(V::splat(self.1), y.keep_above(V::splat(self.0), g))
    }
}

/// `dx` from the masked gradient `g`.
trait Form: Copy {
    const MODE: Mode;
    /// Per-position coefficients `dx` reads.
    const COEFS: usize;
    fn dx<V: Lane>(self, g: V, x: V, k: Coefs<V>) -> V;
}

/// Training: `g p + ((x - m) q + r)`.
#[derive(Clone, Copy)]
struct Train;
impl Form for Train {
    const MODE: Mode = Mode::Training;
    const COEFS: usize = 4;
    #[inline(always)]
    fn dx<V: Lane>(self, g: V, x: V, k: Coefs<V>) -> V {
        g.mul_add(k.p, x.sub(k.m).mul_add(k.q, k.r))
    }
}

/// Inference: `g p`.
#[derive(Clone, Copy)]
struct Infer;
impl Form for Infer {
    const MODE: Mode = Mode::Inference;
    const COEFS: usize = 1;
    #[inline(always)]
    fn dx<V: Lane>(self, g: V, _: V, k: Coefs<V>) -> V {
        g.mul(k.p)
    }
}

// ---------------------------------------------------------------------------
// Windows

/// The stack state of one window of `WIN` positions ([`WINDOW`], or
/// [`SMALL_WINDOW`] for NCHW runs of few channels): per-position
/// coefficients, per-channel `f64` sums, and which window channel each
/// position belongs to. The coefficient patterns start on a cache line
/// ([`Line`]), loaded a vector at a time beside the data.
struct Win<const WIN: usize = WINDOW> {
    a: Line<f32, WIN>,
    b: Line<f32, WIN>,
    m: Line<f32, WIN>,
    p: Line<f32, WIN>,
    q: Line<f32, WIN>,
    r: Line<f32, WIN>,
    ch: [u16; WIN],
    sg: [f64; WIN],
    sgd: [f64; WIN],
    /// Whether position `j` is window channel `j` for every position of
    /// the window (NHWC, and NCHW runs).
    ident: bool,
}

impl<const WIN: usize> Win<WIN> {
    fn new() -> Self {
        Win {
            a: Line([0.0; WIN]),
            b: Line([0.0; WIN]),
            m: Line([0.0; WIN]),
            p: Line([0.0; WIN]),
            q: Line([0.0; WIN]),
            r: Line([0.0; WIN]),
            ch: [0; WIN],
            sg: [0.0; WIN],
            sgd: [0.0; WIN],
            ident: false,
        }
    }

    fn pat(&self, from: usize, to: usize) -> Option<Pat<'_>> {
        Pat {
            a: &self.a.0,
            b: &self.b.0,
            m: &self.m.0,
            p: &self.p.0,
            q: &self.q.0,
            r: &self.r.0,
        }
        .slice(from, to)
    }

    /// Adds the `f32` block sums of positions `off .. off + len` (kept in
    /// `p` and `q` during pass 1) to their channels' `f64` sums and clears
    /// them.
    fn flush_block(&mut self, off: usize, len: usize) {
        let Win {
            p,
            q,
            ch,
            sg,
            sgd,
            ident,
            ..
        } = self;
        if *ident {
            let end = off.saturating_add(len);
            if let (Some(p), Some(q), Some(sg), Some(sgd)) = (
                p.get_mut(off..end),
                q.get_mut(off..end),
                sg.get_mut(off..end),
                sgd.get_mut(off..end),
            ) {
                for ((s, t), (bg, bgd)) in sg.iter_mut().zip(sgd).zip(p.iter_mut().zip(q)) {
                    *s += *bg as f64;
                    *t += *bgd as f64;
                    (*bg, *bgd) = (0.0, 0.0);
                }
                return;
            }
        }
        let blocks = p.iter_mut().zip(q.iter_mut()).zip(ch.iter());
        for ((bg, bgd), &k) in blocks.skip(off).take(len) {
            let k = k as usize;
            if let (Some(s), Some(t)) = (sg.get_mut(k), sgd.get_mut(k)) {
                *s += *bg as f64;
                *t += *bgd as f64;
            }
            (*bg, *bgd) = (0.0, 0.0);
        }
    }

    /// Before pass 1 of window channels `c0 .. c0 + cw` with `npos`
    /// positions: the mask's `a`, `b` and the mean per position, sums zeroed.
    /// Runs inside the lane type's instructions ([`enabled!`]), so that its
    /// fold is `V`'s (`ymm` square roots with AVX2 and AVX-512), not the
    /// build's baseline.
    fn start<V: Lane>(
        &mut self,
        params: &Params<'_>,
        c0: usize,
        cw: usize,
        npos: usize,
        mask: bool,
    ) {
        enabled!(V => {
        // Positions and channels of a window are within it; `get` and the
        // iterators keep the panic paths out.
        let Win {
            a,
            b,
            m,
            p,
            q,
            ch,
            sg,
            sgd,
            ..
        } = self;
        if mask {
            // Fold per channel into p, q (free until pass 2), then spread.
            if let (Some(pc), Some(qc)) = (p.get_mut(..cw), q.get_mut(..cw)) {
                fold_span::<V>(params, c0, pc, qc);
            }
        }
        // Not `all`: a loop without an early exit is vectorized (the
        // scan took 13% of a call on one row of 1000 channels).
        let chans = ch.iter().take(npos).enumerate();
        let ident = chans.fold(true, |id, (j, &k)| id & (k as usize == j));
        let mean = params.mean.get(c0..).unwrap_or_default();
        if ident {
            // Position `j` is channel `j`: copies.
            copy_from(m.get_mut(..npos).unwrap_or_default(), mean);
            if mask {
                copy_from(a.get_mut(..npos).unwrap_or_default(), &p[..]);
                copy_from(b.get_mut(..npos).unwrap_or_default(), &q[..]);
            }
        } else {
            let positions = ch
                .iter()
                .zip(a.iter_mut().zip(b.iter_mut()))
                .zip(m.iter_mut());
            for ((&k, (a, b)), m) in positions.take(npos) {
                let k = k as usize;
                if mask {
                    *a = p.get(k).copied().unwrap_or(0.0);
                    *b = q.get(k).copied().unwrap_or(0.0);
                }
                *m = mean.get(k).copied().unwrap_or(0.0);
            }
        }
        // `p` and `q` hold pass 1's `f32` block sums.
        let blocks = p.iter_mut().take(npos).chain(q.iter_mut().take(npos));
        blocks.for_each(|s| *s = 0.0);
        let sums = sg.iter_mut().take(cw).chain(sgd.iter_mut().take(cw));
        sums.for_each(|s| *s = 0.0);
        self.ident = ident;
        })
    }

    /// After pass 1: writes `dscale`, `doffset` of the window's channels and
    /// the per-position `p`, `q`, `r` of pass 2: computed per channel into
    /// the first `cw` entries, then spread to the positions from the last
    /// down (a position's channel is never after it, so no channel entry is
    /// overwritten before it is read). Inside the lane type's instructions,
    /// as [`Win::start`] is.
    #[allow(clippy::too_many_arguments)]
    fn finish<V: Lane>(
        &mut self,
        params: &Params<'_>,
        mode: Mode,
        count: f64,
        c0: usize,
        cw: usize,
        npos: usize,
        outs: &mut Outs<'_>,
    ) {
        enabled!(V => {
        let training = mode == Mode::Training;
        let per_count = 1.0 / count;
        let eps = params.epsilon as f64;
        let end = c0.saturating_add(cw);
        // Channels `c0 .. c0 + cw` exist on validated input, and `cw <=
        // npos <= WINDOW`: `get` keeps the panic paths out.
        let (Some(var), Some(ds), Some(dof)) = (
            params.variance.get(c0..end),
            outs.dscale.get_mut(c0..end),
            outs.doffset.get_mut(c0..end),
        ) else {
            return;
        };
        let scale = params.scale.and_then(|s| s.get(c0..end));
        let Win {
            p,
            q,
            r,
            ch,
            sg,
            sgd,
            ..
        } = self;
        // Four channels at a time in `f64x4` (one vector square root and
        // division, the same operations as one at a time, so the same
        // results); the rest, and compact builds, one at a time.
        let mut k0 = 0;
        if !COMPACT {
            let f4 = |s: &[f32]| {
                f64x4::new(core::array::from_fn(|j| {
                    s.get(j).map_or(0.0, |&v| v as f64)
                }))
            };
            let g4 =
                |s: &[f64]| f64x4::new(core::array::from_fn(|j| s.get(j).copied().unwrap_or(0.0)));
            let put = |o: &mut [f32], v: f64x4| {
                for (o, v) in o.iter_mut().zip(v.to_array()) {
                    *o = v as f32;
                }
            };
            let (one, neg, pc, e) = (
                f64x4::splat(1.0),
                f64x4::splat(-1.0),
                f64x4::splat(per_count),
                f64x4::splat(eps),
            );
            let outs4 = ds.chunks_exact_mut(4).zip(dof.chunks_exact_mut(4));
            let sums4 = sg.chunks_exact(4).zip(sgd.chunks_exact(4));
            let coefs4 = p.chunks_exact_mut(4).zip(q.chunks_exact_mut(4));
            let ins4 = var.chunks_exact(4).zip(outs4);
            for (((v, (ds, dof)), (sg, sgd)), ((p, q), r)) in
                ins4.zip(sums4).zip(coefs4.zip(r.chunks_exact_mut(4)))
            {
                let inv = f64x4::new(V::quot_sqrt4([1.0; 4], (f4(v) + e).to_array()));
                let sc = match scale.and_then(|s| s.get(k0..k0 + 4)) {
                    Some(s) => f4(s),
                    None => one,
                };
                let (sg, sgd) = (g4(sg), g4(sgd));
                let dscale = sgd * inv;
                let pk = sc * inv;
                put(dof, sg);
                put(ds, dscale);
                put(p, pk);
                if training {
                    put(q, pk * inv * dscale * pc * neg);
                    put(r, pk * sg * pc * neg);
                } else {
                    q.fill(0.0);
                    r.fill(0.0);
                }
                k0 += 4;
            }
        }
        let sums = sg.iter().zip(sgd.iter());
        let coefs = p.iter_mut().zip(q.iter_mut()).zip(r.iter_mut());
        let chans = var.iter().zip(ds.iter_mut().zip(dof.iter_mut()));
        let mut inv4 = [0.0f64; 4];
        for (k, ((&v, (ds, dof)), ((&sg, &sgd), ((p, q), r)))) in
            chans.zip(sums.zip(coefs)).enumerate().skip(k0)
        {
            // `1 / sqrt(var + eps)` four channels at a time (one vector
            // square root and division), one at a time in compact builds.
            let inv = if COMPACT {
                1.0 / libm::sqrt(v as f64 + eps)
            } else {
                if k % 4 == 0 {
                    let v4: [f64; 4] =
                        core::array::from_fn(|j| var.get(k + j).copied().unwrap_or(0.0) as f64);
                    inv4 = V::quot_sqrt4([1.0; 4], (f64x4::new(v4) + f64x4::splat(eps)).to_array());
                }
                inv4.get(k % 4).copied().unwrap_or(0.0)
            };
            let sc = scale.and_then(|s| s.get(k)).copied().unwrap_or(1.0) as f64;
            let dscale = sgd * inv;
            let pk = sc * inv;
            let (qk, rk) = if training {
                (-pk * inv * dscale * per_count, -pk * sg * per_count)
            } else {
                (0.0, 0.0)
            };
            (*dof, *ds) = (sg as f32, dscale as f32);
            (*p, *q, *r) = (pk as f32, qk as f32, rk as f32);
        }
        // Spread the channels' coefficients to their positions (none to
        // move where position `j` is channel `j`).
        let spread = if self.ident { 0 } else { npos.min(WIN) };
        for j in (0..spread).rev() {
            let k = ch.get(j).copied().unwrap_or(0) as usize;
            if k == j {
                continue;
            }
            if let (Some(&pk), Some(&qk), Some(&rk)) = (p.get(k), q.get(k), r.get(k)) {
                if let (Some(pj), Some(qj), Some(rj)) = (p.get_mut(j), q.get_mut(j), r.get_mut(j)) {
                    (*pj, *qj, *rj) = (pk, qk, rk);
                }
            }
        }
        })
    }
}

// ---------------------------------------------------------------------------
// Dispatch and layouts

fn run<IO: Io>(simd: Simd, io: &mut IO, shape: Shape, p: &Params<'_>, mode: Mode, outs: Outs<'_>) {
    with_lane!(simd, V => match (p.activation, mode) {
        (Activation::None, Mode::Training) => walk::<V, _, _, IO>(io, shape, p, All, Train, outs),
        (Activation::None, Mode::Inference) => walk::<V, _, _, IO>(io, shape, p, All, Infer, outs),
        (Activation::Relu, Mode::Training) => {
            walk::<V, _, _, IO>(io, shape, p, Above(0.0), Train, outs)
        }
        (Activation::Relu, Mode::Inference) => {
            walk::<V, _, _, IO>(io, shape, p, Above(0.0), Infer, outs)
        }
        (Activation::Relu6, Mode::Training) => {
            walk::<V, _, _, IO>(io, shape, p, Inside(0.0, 6.0), Train, outs)
        }
        (Activation::Relu6, Mode::Inference) => {
            walk::<V, _, _, IO>(io, shape, p, Inside(0.0, 6.0), Infer, outs)
        }
        (Activation::Clamp { min, max }, Mode::Training) => {
            walk::<V, _, _, IO>(io, shape, p, Inside(min, max), Train, outs)
        }
        (Activation::Clamp { min, max }, Mode::Inference) => {
            walk::<V, _, _, IO>(io, shape, p, Inside(min, max), Infer, outs)
        }
    })
}

/// `a / b`, 0 for `b == 0` (never the case for validated shapes).
fn div(a: usize, b: usize) -> usize {
    a.checked_div(b).unwrap_or(0)
}

/// `ch[j] = (j % period) / dv`, counted: a division per position took 5%
/// of the time of NHWC C = 1000 at 256 KiB (AMD Zen 3).
fn channels_of(ch: &mut [u16], period: usize, dv: usize) {
    if dv == 1 && period >= ch.len() {
        // Channels last, a window within one row: position `j` is channel
        // `j`. A loop the compiler vectorizes; the general one took a sixth
        // of a call on one row of 1000 channels.
        for (j, c) in ch.iter_mut().enumerate() {
            *c = j as u16;
        }
        return;
    }
    let (mut k, mut in_ch, mut in_row) = (0u16, 0, 0);
    for c in ch {
        *c = k;
        (in_ch, in_row) = (in_ch + 1, in_row + 1);
        if in_row >= period {
            (k, in_ch, in_row) = (0, 0, 0);
        } else if in_ch >= dv {
            (k, in_ch) = (k.wrapping_add(1), 0);
        }
    }
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while let Some(r) = a.checked_rem(b) {
        (a, b) = (b, r);
    }
    a
}

/// Validated, non-empty input: NCHW runs ([`runs`], with a window of
/// [`SMALL_WINDOW`] channels where there are at most that many) or a
/// periodic tensor ([`walk_periodic`]).
#[inline(always)]
fn walk<V: Lane, M: Mask, F: Form, IO: Io>(
    io: &mut IO,
    shape: Shape,
    params: &Params<'_>,
    mask: M,
    form: F,
    outs: Outs<'_>,
) {
    let (s, c) = (shape.spatial, shape.channels);
    match shape.layout {
        Layout::Nchw if s >= V::WIDTH && c <= SMALL_WINDOW => {
            runs::<V, M, F, IO, SMALL_WINDOW>(io, shape, params, mask, form, outs)
        }
        Layout::Nchw if s >= V::WIDTH => {
            runs::<V, M, F, IO, WINDOW>(io, shape, params, mask, form, outs)
        }
        _ => walk_periodic::<V, M, F, IO>(io, shape, params, mask, form, outs),
    }
}

/// NCHW runs (`s >= V::WIDTH`) with a window of `WIN` channels: one run
/// per window channel, position `k` is channel `k`.
// Never inlined, as `walk_periodic`.
#[inline(never)]
fn runs<V: Lane, M: Mask, F: Form, IO: Io, const WIN: usize>(
    io: &mut IO,
    shape: Shape,
    params: &Params<'_>,
    mask: M,
    form: F,
    mut outs: Outs<'_>,
) {
    enabled!(V => {
    let (n, s, c) = (shape.batch, shape.spatial, shape.channels);
    let count = (n * s) as f64;
    let mode = F::MODE;
    let masked = params.activation != Activation::None;
    let mut win = Win::<WIN>::new();
    channels_of(&mut win.ch, WIN, 1);
    let mut c0 = 0;
    while c0 < c {
        let cw = (c - c0).min(WIN);
        win.start::<V>(params, c0, cw, cw, masked);
        let (x, dy) = (io.x(), io.dy());
        for i in 0..n {
            // The window's runs of image `i` cut from one span, not each
            // range checked on its own (`s >= V::WIDTH`: the `max` only
            // keeps `chunks_exact`'s panic for a zero length out).
            let span = (i * c + c0) * s..(i * c + c0 + cw) * s;
            let (Some(xi), Some(di)) = (x.get(span.clone()), dy.get(span)) else {
                continue;
            };
            let runs = xi.chunks_exact(s.max(1)).zip(di.chunks_exact(s.max(1)));
            for (k, (xr, dr)) in (0..cw).zip(runs) {
                let (g, gd) = run_sums::<V, M>(xr, dr, (win.a[k], win.b[k], win.m[k]), mask);
                win.sg[k] += g;
                win.sgd[k] += gd;
            }
        }
        win.finish::<V>(params, mode, count, c0, cw, cw, &mut outs);
        for i in 0..n {
            for k in 0..cw {
                let one = Coefs {
                    a: win.a[k],
                    b: win.b[k],
                    m: win.m[k],
                    p: win.p[k],
                    q: win.q[k],
                    r: win.r[k],
                };
                run_dx::<V, M, F, IO>(io, (i * c + c0 + k) * s, s, one, mask, form);
            }
        }
        c0 += cw;
    }
    })
}

/// Periodic tensors: NHWC, and NCHW with fewer spatial positions than
/// lanes.
// Never inlined: each mask and mode is an instance with its own window,
// and an instance inlined into the caller kept its window in the caller's
// frame below the one it calls (7.0 KB instead of 4.4 KB on a Cortex-M4).
#[inline(never)]
fn walk_periodic<V: Lane, M: Mask, F: Form, IO: Io>(
    io: &mut IO,
    shape: Shape,
    params: &Params<'_>,
    mask: M,
    form: F,
    outs: Outs<'_>,
) {
    enabled!(V => {
    let (n, s, c) = (shape.batch, shape.spatial, shape.channels);
    let count = (n * s) as f64;
    let mut win = Win::new();
    // One call: two were both inlined, the code of `periodic` twice.
    let (period, dv, rows) = match shape.layout {
        Layout::Nchw => (c * s, s, n),
        Layout::Nhwc => (c, 1, n * s),
    };
    periodic::<V, M, F, IO>(io, period, dv, rows, count, params, &mut win, mask, form, outs)
    })
}

/// One strip of a periodic walk: `rows` rows of `len` positions, `stride`
/// apart from `start`, the first at window position `off`.
#[derive(Clone, Copy)]
struct Strip {
    start: usize,
    rows: usize,
    stride: usize,
    len: usize,
    off: usize,
}

/// Periodic tensors: `rows` rows of `period` elements, position `p` of a
/// row in channel `p / div`.
#[allow(clippy::too_many_arguments)]
fn periodic<V: Lane, M: Mask, F: Form, IO: Io>(
    io: &mut IO,
    period: usize,
    dv: usize,
    rows: usize,
    count: f64,
    params: &Params<'_>,
    win: &mut Win,
    mask: M,
    form: F,
    mut outs: Outs<'_>,
) {
    enabled!(V => {
    let w = V::WIDTH;
    let mode = F::MODE;
    let masked = params.activation != Activation::None;
    let lcm = div(period, gcd(period, w)) * w;
    let channels = div(period, dv);
    // Pass 1 over `strips` and the window's coefficients of pass 2; each
    // caller runs pass 2 (a `dx` pass in here went out of line, compiled
    // without the lane's instructions: `.ci/dispatch`).
    let mut sums = |io: &mut IO, win: &mut Win, c0: usize, cw: usize, strips: &[Strip]| {
        let npos = strips.first().map_or(0, |t| t.len.max(t.off));
        let npos = strips.iter().fold(npos, |a, t| a.max(t.off + t.len));
        win.start::<V>(params, c0, cw, npos, masked);
        for &t in strips {
            sums_strip::<V, M>(io.x(), io.dy(), t, win, mask);
        }
        win.finish::<V>(params, mode, count, c0, cw, npos, &mut outs);
    };
    if lcm <= WINDOW {
        // Super-rows of `lcm` elements share one pattern; the partial last
        // super-row is one row of a prefix of it.
        channels_of(win.ch.get_mut(..lcm).unwrap_or_default(), period, dv);
        let per = div(lcm, period);
        let supers = div(rows, per);
        let left = (rows - supers * per) * period;
        let strips = [
            Strip {
                start: 0,
                rows: supers,
                stride: lcm,
                len: lcm,
                off: 0,
            },
            Strip {
                start: supers * lcm,
                rows: 1,
                stride: lcm,
                len: left,
                off: 0,
            },
        ];
        sums(io, win, 0, channels, &strips);
        let total = rows * period;
        if aligns::<V>(total) && total >= lcm {
            aligned_dx::<V, M, F, IO>(io, total, lcm, win, mask, form);
        } else {
            for t in strips {
                dx_strip::<V, M, F, IO>(io, t, win, mask, form);
            }
        }
    } else {
        // Strips of whole channels swept over every row.
        let cmax = div(WINDOW, dv).max(1);
        channels_of(&mut win.ch, WINDOW, dv);
        let mut c0 = 0;
        while c0 < channels {
            let cw = (channels - c0).min(cmax);
            let strip = Strip {
                start: c0 * dv,
                rows,
                stride: period,
                len: cw * dv,
                off: 0,
            };
            sums(io, win, c0, cw, &[strip]);
            dx_strip::<V, M, F, IO>(io, strip, win, mask, form);
            c0 += cw;
        }
    }
    })
}

// ---------------------------------------------------------------------------
// Pass 1: sums

/// One vector of pass 1: adds `g` (the mask applied to `dy`) and `g (x - m)`
/// to the sums `(sg, sgd)`. Every form of pass 1 (runs, register groups,
/// rows in memory order) goes through it, so they do the same operations.
#[inline(always)]
fn sum_step<V: Lane, M: Mask>(mask: M, x: V, dy: V, (a, b, m): (V, V, V), s: &mut (V, V)) {
    let g = mask.keep(x, a, b, dy);
    s.0 = s.0.add(g);
    s.1 = g.mul_add(x.sub(m), s.1);
}

/// Sums of `g` and `g (x - mean)` of one contiguous run with one channel's
/// coefficients `(a, b, mean)`: four accumulators, each flushed after
/// [`INNER`] vectors; the at most three whole vectors left in one more;
/// the tail, shorter than a vector, through narrower lanes.
///
/// Those whole vectors had gone to the narrower lanes with the tail, a
/// reduction at each width: with sixteen lanes a run of 49 (7 x 7 images)
/// was summed in vectors of eight and four and one lane: the crate bench's
/// `backward/Nchw/runs49` (AMD Zen 5, native build, training mode) took
/// 18.3 µs, now 15.4.
///
/// Always inlined into [`runs`], whose body runs inside the lane type's
/// [`Lane::enabled`]: called once per run, a function of its own (with
/// its own trampoline) cost a call per run of 65 elements, and the default
/// x86-64 build took 1.5 times the native build's time for 1000 channels.
#[inline(always)]
fn run_sums<V: Lane, M: Mask>(
    x: &[f32],
    dy: &[f32],
    (a, b, m): (f32, f32, f32),
    mask: M,
) -> (f64, f64) {
    const K: usize = 4;
    let w = V::WIDTH;
    let (va, vb, vm) = (V::splat(a), V::splat(b), V::splat(m));
    let (mut tg, mut tgd) = (0.0f64, 0.0f64);
    let mut xs = x.chunks_exact(K * w);
    let mut ds = dy.chunks_exact(K * w);
    loop {
        let mut sg = [V::splat(0.0); K];
        let mut sgd = [V::splat(0.0); K];
        let mut taken = 0;
        for (xc, dc) in (&mut xs).zip(&mut ds).take(INNER) {
            for k in 0..K {
                let (xv, dv) = (V::load(&xc[k * w..]), V::load(&dc[k * w..]));
                let mut s = (sg[k], sgd[k]);
                sum_step(mask, xv, dv, (va, vb, vm), &mut s);
                (sg[k], sgd[k]) = s;
            }
            taken += 1;
        }
        if taken == 0 {
            break;
        }
        // Two f32 levels join the accumulators, at most five the lanes.
        tg += sg[0].add(sg[1]).add(sg[2].add(sg[3])).reduce_add() as f64;
        tgd += sgd[0].add(sgd[1]).add(sgd[2].add(sgd[3])).reduce_add() as f64;
        if taken < INNER {
            break;
        }
    }
    let (mut rx, mut rd) = (xs.remainder(), ds.remainder());
    if rx.is_empty() {
        return (tg, tgd);
    }
    if w > 1 && rx.len() >= w {
        // At most K - 1 whole vectors left: one accumulator (of at most
        // three terms) and one reduction, where the narrower widths would
        // take them with a reduction each.
        let mut s = (V::splat(0.0), V::splat(0.0));
        let (xc, dc) = (rx.chunks_exact(w), rd.chunks_exact(w));
        (rx, rd) = (xc.remainder(), dc.remainder());
        for (xv, dv) in xc.zip(dc) {
            sum_step(mask, V::load(xv), V::load(dv), (va, vb, vm), &mut s);
        }
        tg += s.0.reduce_add() as f64;
        tgd += s.1.reduce_add() as f64;
        if rx.is_empty() {
            return (tg, tgd);
        }
    }
    // A tail of fewer than four elements goes to one lane at once (the
    // narrower widths would each find no whole vector).
    if w == 1 || rx.len() < 4 {
        for (&xv, &dv) in rx.iter().zip(rd) {
            let g = mask.keep(xv, a, b, dv);
            tg += g as f64;
            tgd += (g * (xv - m)) as f64;
        }
        (tg, tgd)
    } else {
        let (g, gd) = run_sums::<V::Half, M>(rx, rd, (a, b, m), mask);
        (tg + g, tgd + gd)
    }
}

/// Largest number of `V` vectors in one register group of the sums pass:
/// `2 * SLOTS` (the shifts spill, the sums stay), `SLOTS / 2` with a mask
/// (with the mask's coefficients, 16 vectors spilled the sums: 0.56 -> 0.40
/// of the limit with 256 channels at 256 KiB; 8 lost another 26%).
const fn one_group<V: Lane, M: Mask>() -> usize {
    if M::COEFS == 0 {
        2 * V::SLOTS
    } else {
        col_group::<V, M>()
    }
}

/// Largest number of `V` vectors in one column group of a wider row.
const fn col_group<V: Lane, M: Mask>() -> usize {
    if M::COEFS == 0 {
        V::SLOTS
    } else {
        let g = V::SLOTS / 2;
        if g == 0 {
            1
        } else {
            g
        }
    }
}

/// Pass 1 over a strip: blocks of at most [`INNER`] rows. A row of at most
/// [`one_group`] vectors is summed in one register group, rows in memory
/// order; wider rows in panels of [`PANEL_ROWS`] rows, each swept by
/// balanced column groups of at most [`col_group`] vectors. Register sums go to
/// the `f32` block sums, and those to the `f64` sums after every block.
/// Then the tail columns with narrower lanes.
fn sums_strip<V: Lane, M: Mask>(x: &[f32], dy: &[f32], t: Strip, win: &mut Win, mask: M) {
    enabled!(V => {
    let w = V::WIDTH;
    let nv = t.len / w;
    let one = nv <= one_group::<V, M>();
    let groups = if one {
        1
    } else {
        nv.div_ceil(col_group::<V, M>())
    };
    let (size, longer) = (div(nv, groups), nv % groups.max(1));
    // A short group sums `unroll` rows at once, each in its own slot: a
    // block is `INNER` rows per slot.
    let unroll = if one {
        (V::SLOTS / nv.max(1)).max(1)
    } else {
        1
    };
    let block = INNER * unroll;
    // With sixteen registers, a row wider than one column group goes in
    // memory order, [`SUMS_ROWS`] rows at a time (see `sums_rows`); such a
    // row is never short, so its block is `INNER` rows.
    let by_rows = w > 1 && V::SLOTS <= 4 && nv > col_group::<V, M>();
    let panel = if by_rows {
        SUMS_ROWS
    } else if one {
        block
    } else {
        PANEL_ROWS
    };
    let mut r0 = 0;
    while nv > 0 && r0 < t.rows {
        let rb = (t.rows - r0).min(block);
        let mut p0 = 0;
        while p0 < rb {
            let pr = (rb - p0).min(panel);
            let start = t.start + (r0 + p0) * t.stride;
            if by_rows {
                let sub = |r: usize| Strip {
                    start: start + r * t.stride,
                    ..t
                };
                if pr == SUMS_ROWS {
                    sums_rows::<V, M, SUMS_ROWS>(x, dy, sub(0), nv * w, win, mask);
                } else {
                    for r in 0..pr {
                        sums_rows::<V, M, 1>(x, dy, sub(r), nv * w, win, mask);
                    }
                }
            } else {
                let mut v0 = 0;
                for gi in 0..groups {
                    let n = size + usize::from(gi < longer);
                    let sub = Strip {
                        start: start + v0 * w,
                        rows: pr,
                        len: n * w,
                        off: t.off + v0 * w,
                        ..t
                    };
                    sums_nv::<V, M>(n, x, dy, sub, win, mask);
                    v0 += n;
                }
            }
            p0 += pr;
        }
        win.flush_block(t.off, nv * w);
        r0 += rb;
    }
    let whole = nv * w;
    if w > 1 && whole < t.len {
        let tail = Strip {
            start: t.start + whole,
            len: t.len - whole,
            off: t.off + whole,
            ..t
        };
        sums_strip::<V::Half, M>(x, dy, tail, win, mask);
    }
    })
}

/// Rows [`sums_rows`] takes per pass over the window's block sums.
/// Two and four measured alike, eight lower (NHWC C = 256 and 1000 at
/// 256 KiB, AMD Zen 3).
const SUMS_ROWS: usize = 4;

/// Pass 1 over `R` rows of `len` positions (whole vectors) from `t.start`,
/// `t.stride` apart, in memory order: per vector of positions, the block
/// sums are loaded, the `R` rows added, and the sums stored; 2.75 loads and
/// half a store per vector against the panels' two loads, but every row
/// read front to back. With sixteen registers the panels (16 rows by four
/// vectors, two with a mask) ran at about 0.6 of the read roofline for
/// NHWC C = 256 and 1000; this pass, measured with the paired `dx` rows,
/// took training mode with 256 channels at 256 KiB from 8.3 to 9.9 GB/s
/// (AMD Zen 3, `benches/README.md`).
#[inline(always)]
fn sums_rows<V: Lane, M: Mask, const R: usize>(
    x: &[f32],
    dy: &[f32],
    t: Strip,
    len: usize,
    win: &mut Win,
    mask: M,
) {
    let w = V::WIDTH;
    let mut xs: [&[f32]; R] = [&[]; R];
    let mut ds: [&[f32]; R] = [&[]; R];
    for (r, (xr, dr)) in xs.iter_mut().zip(ds.iter_mut()).enumerate() {
        let b = t.start + r * t.stride;
        let (Some(xv), Some(dv)) = (x.get(b..b + len), dy.get(b..b + len)) else {
            return;
        };
        (*xr, *dr) = (xv, dv);
    }
    let Win { a, b, m, p, q, .. } = win;
    let span = t.off..t.off + len;
    let (Some(a), Some(b), Some(m), Some(p), Some(q)) = (
        a.get(span.clone()),
        b.get(span.clone()),
        m.get(span.clone()),
        p.get_mut(span.clone()),
        q.get_mut(span),
    ) else {
        return;
    };
    let ab = a.chunks_exact(w).zip(b.chunks_exact(w));
    let pq = p.chunks_exact_mut(w).zip(q.chunks_exact_mut(w));
    for (i, ((ac, bc), (mc, (pc, qc)))) in ab.zip(m.chunks_exact(w).zip(pq)).enumerate() {
        let k = (V::load(ac), V::load(bc), V::load(mc));
        let mut acc = (V::load(pc), V::load(qc));
        let o = i * w;
        for (xr, dr) in xs.iter().zip(&ds) {
            let xv = V::load(xr.get(o..).unwrap_or_default());
            sum_step(
                mask,
                xv,
                V::load(dr.get(o..).unwrap_or_default()),
                k,
                &mut acc,
            );
        }
        acc.0.store(pc);
        acc.1.store(qc);
    }
}

/// [`sums_group`] for `nv` (1 to [`one_group`]) vectors.
#[inline(always)]
fn sums_nv<V: Lane, M: Mask>(nv: usize, x: &[f32], dy: &[f32], t: Strip, win: &mut Win, mask: M) {
    match nv.min(one_group::<V, M>().max(col_group::<V, M>())) {
        1 => sums_group::<V, M, 1>(x, dy, t, win, mask),
        2 => sums_group::<V, M, 2>(x, dy, t, win, mask),
        3 => sums_group::<V, M, 3>(x, dy, t, win, mask),
        4 => sums_group::<V, M, 4>(x, dy, t, win, mask),
        5 => sums_group::<V, M, 5>(x, dy, t, win, mask),
        6 => sums_group::<V, M, 6>(x, dy, t, win, mask),
        7 => sums_group::<V, M, 7>(x, dy, t, win, mask),
        8 => sums_group::<V, M, 8>(x, dy, t, win, mask),
        9 => sums_group::<V, M, 9>(x, dy, t, win, mask),
        10 => sums_group::<V, M, 10>(x, dy, t, win, mask),
        11 => sums_group::<V, M, 11>(x, dy, t, win, mask),
        12 => sums_group::<V, M, 12>(x, dy, t, win, mask),
        13 => sums_group::<V, M, 13>(x, dy, t, win, mask),
        14 => sums_group::<V, M, 14>(x, dy, t, win, mask),
        15 => sums_group::<V, M, 15>(x, dy, t, win, mask),
        _ => sums_group::<V, M, 16>(x, dy, t, win, mask),
    }
}

/// Register sums of a group: up to 16 vectors (a group of `NV` vectors
/// unrolled over `SLOTS / NV` rows).
const GROUP_SUMS: usize = 16;

/// `NV` vectors of at most [`INNER`] rows of a strip, summed in registers
/// (a short group over several rows at once, so that the additions of
/// consecutive rows do not wait for each other), then added to the window's
/// `f32` block sums.
#[inline(always)]
fn sums_group<V: Lane, M: Mask, const NV: usize>(
    x: &[f32],
    dy: &[f32],
    t: Strip,
    win: &mut Win,
    mask: M,
) {
    let w = V::WIDTH;
    let unroll = (V::SLOTS / NV).max(1);
    let load = inlined(
        #[inline(always)]
        |arr: &[f32; WINDOW]| -> [V; NV] {
            // A loop, not `core::array::from_fn`: its internal closures
            // stay out of line, compiled without the lane's instructions.
            let mut v = [V::splat(0.0); NV];
            for (k, v) in v.iter_mut().enumerate() {
                *v = V::load(arr.get(t.off + k * w..).unwrap_or(&[0.0; 16]));
            }
            v
        },
    );
    let (a, b, m) = (load(&win.a), load(&win.b), load(&win.m));
    let mut sg = [V::splat(0.0); GROUP_SUMS];
    let mut sgd = [V::splat(0.0); GROUP_SUMS];
    let mut add = inlined(
        #[inline(always)]
        |u: usize, xr: &[f32], dr: &[f32]| {
            for k in 0..NV {
                let (Some(xs), Some(ds)) = (xr.get(k * w..), dr.get(k * w..)) else {
                    continue;
                };
                let i = (u * NV + k) % GROUP_SUMS;
                let mut acc = (sg[i], sgd[i]);
                sum_step(mask, V::load(xs), V::load(ds), (a[k], b[k], m[k]), &mut acc);
                (sg[i], sgd[i]) = acc;
            }
        },
    );
    let row = NV * w;
    if t.stride == row {
        // Back-to-back rows: one slice (inside the tensors on every call),
        // walked in steps the compiler knows; the rows left over one per
        // slot.
        let span = t.start..t.start + t.rows * row;
        let (Some(xa), Some(da)) = (x.get(span.clone()), dy.get(span)) else {
            return;
        };
        let mut xs = xa.chunks_exact(unroll * row);
        let mut ds = da.chunks_exact(unroll * row);
        for (xc, dc) in (&mut xs).zip(&mut ds) {
            for u in 0..unroll {
                let r = u * row..(u + 1) * row;
                if let (Some(xr), Some(dr)) = (xc.get(r.clone()), dc.get(r)) {
                    add(u, xr, dr);
                }
            }
        }
        let (xc, dc) = (xs.remainder(), ds.remainder());
        for u in 0..unroll {
            let r = u * row..(u + 1) * row;
            if let (Some(xr), Some(dr)) = (xc.get(r.clone()), dc.get(r)) {
                add(u, xr, dr);
            }
        }
    } else {
        // Strided rows, `unroll` at a time so that every slot index is a
        // constant (a run-time index kept the sums in memory).
        let mut at = inlined(
            #[inline(always)]
            |u: usize, r: usize| {
                let base = t.start + r * t.stride;
                let span = base..base + row;
                if let (Some(xr), Some(dr)) = (x.get(span.clone()), dy.get(span)) {
                    add(u, xr, dr);
                }
            },
        );
        let mut r = 0;
        while r + unroll <= t.rows {
            for u in 0..unroll {
                at(u, r + u);
            }
            r += unroll;
        }
        for u in 0..unroll {
            if r + u < t.rows {
                at(u, r + u);
            }
        }
    }
    // Slots joined pairwise (`unroll` is 1, 2, 4 or 8): three levels at most.
    let mut step = 1;
    while step < unroll {
        for u in (0..unroll).step_by(2 * step) {
            if u + step < unroll {
                for k in 0..NV {
                    let (i, j) = (
                        (u * NV + k) % GROUP_SUMS,
                        ((u + step) * NV + k) % GROUP_SUMS,
                    );
                    sg[i] = sg[i].add(sg[j]);
                    sgd[i] = sgd[i].add(sgd[j]);
                }
            }
        }
        step *= 2;
    }
    let blocks = win.p.get_mut(t.off..).unwrap_or_default();
    for (bg, &v) in blocks.chunks_exact_mut(w).zip(&sg).take(NV) {
        V::load(bg).add(v).store(bg);
    }
    let blocks = win.q.get_mut(t.off..).unwrap_or_default();
    for (bgd, &v) in blocks.chunks_exact_mut(w).zip(&sgd).take(NV) {
        V::load(bgd).add(v).store(bgd);
    }
}

// ---------------------------------------------------------------------------
// Pass 2: dx

/// `dx` of one contiguous run with one channel's coefficients `one`, read
/// from the window once (not sliced out of it again for the tail). Always
/// inlined into [`runs`], as [`run_sums`] is.
#[inline(always)]
fn run_dx<V: Lane, M: Mask, F: Form, IO: Io>(
    io: &mut IO,
    start: usize,
    len: usize,
    one: Coefs<f32>,
    mask: M,
    form: F,
) {
    let k = Coefs {
        a: V::splat(one.a),
        b: V::splat(one.b),
        m: V::splat(one.m),
        p: V::splat(one.p),
        q: V::splat(one.q),
        r: V::splat(one.r),
    };
    if aligns::<V>(len) && len >= RUN_ALIGN_MIN_VECTORS * V::WIDTH {
        return aligned_run_dx::<V, M, F, IO>(io, start, len, k, mask, form);
    }
    let whole = len / V::WIDTH * V::WIDTH;
    io.map::<V>(start, whole, |x, dy| {
        form.dx(mask.keep(x, k.a, k.b, dy), x, k)
    });
    if V::WIDTH > 1 && whole + 4 <= len {
        run_dx::<V::Half, M, F, IO>(io, start + whole, len - whole, one, mask, form);
    } else if V::WIDTH > 1 && whole < len {
        run_dx::<f32, M, F, IO>(io, start + whole, len - whole, one, mask, form);
    }
}

/// Shortest NCHW run, in vectors, whose `dx` [`aligned_run_dx`] writes:
/// each end vector costs a whole computation of `dx`, more than
/// `normalize`'s `x * a + b`. On an Intel Xeon with AVX-512 at 256 KiB,
/// runs of 65 elements (four vectors and one `f32`) lost up to 13%
/// aligned (most with ReLU); runs of 256 gained 0-7% in training mode and
/// with ReLU and lost 4-6% in inference mode; runs of 1024 gained 4-14%.
/// Eight is between the measured lengths, not tuned.
const RUN_ALIGN_MIN_VECTORS: usize = 8;

/// [`run_dx`] with every store of the body aligned to the vector, as
/// `normalize`'s runs are: the body from `dx`'s first aligned element of
/// the run, and one whole vector at each end, loaded before the body is
/// written and stored after it (right in place too), covers the elements
/// before and after it. Every element goes through `V` wherever the
/// buffers sit, so `dx` does not depend on alignment (nor is masked
/// through the one-lane tail's two roundings).
#[inline(always)]
fn aligned_run_dx<V: Lane, M: Mask, F: Form, IO: Io>(
    io: &mut IO,
    start: usize,
    len: usize,
    k: Coefs<V>,
    mask: M,
    form: F,
) {
    let w = V::WIDTH;
    let (head, last) = (io.head::<V>(start), start + len - w);
    let body = (len - head) / w * w;
    // Written out twice, not as a closure (see `normalize::aligned_run`).
    let (x, dy) = io.load_at::<V>(start);
    let first = form.dx(mask.keep(x, k.a, k.b, dy), x, k);
    let (x, dy) = io.load_at::<V>(last);
    let end = form.dx(mask.keep(x, k.a, k.b, dy), x, k);
    io.map::<V>(start + head, body, |x, dy| {
        form.dx(mask.keep(x, k.a, k.b, dy), x, k)
    });
    if head > 0 {
        io.store_at::<V>(start, first);
    }
    if head + body < len {
        io.store_at::<V>(last, end);
    }
}

/// The coefficients of the `V::WIDTH` positions from `p0` of a pattern of
/// `lcm` positions held at the start of `win`, wrapping around its end.
#[inline(always)]
fn coefs_at<V: Lane>(win: &Win, p0: usize, lcm: usize) -> Coefs<V> {
    let mut g = [[0.0f32; 16]; 6];
    let pat = [&win.a, &win.b, &win.m, &win.p, &win.q, &win.r];
    for (g, pat) in g.iter_mut().zip(pat) {
        for (j, v) in g.iter_mut().take(V::WIDTH).enumerate() {
            *v = pat.get((p0 + j) % lcm.max(1)).copied().unwrap_or(0.0);
        }
    }
    let [a, b, m, p, q, r] = g;
    Coefs {
        a: V::load(&a),
        b: V::load(&b),
        m: V::load(&m),
        p: V::load(&p),
        q: V::load(&q),
        r: V::load(&r),
    }
}

/// The `dx` pass of a periodic tensor of `total` elements (at least one
/// pattern and `ALIGN_MIN_VECTORS` vectors) whose pattern, the first `lcm`
/// positions of `win`, fits the window, with every store of its body
/// aligned, as `normalize`'s `aligned_supers` does: the super-rows start
/// at `dx`'s first aligned element with the pattern rotated to match, and
/// one whole vector at each end, loaded first and stored last, covers the
/// elements before and after them. Rotates the window's coefficients.
#[inline(always)]
fn aligned_dx<V: Lane, M: Mask, F: Form, IO: Io>(
    io: &mut IO,
    total: usize,
    lcm: usize,
    win: &mut Win,
    mask: M,
    form: F,
) {
    let w = V::WIDTH;
    let (head, last) = (io.head::<V>(0), total - w);
    let (k0, k1) = (coefs_at::<V>(win, 0, lcm), coefs_at::<V>(win, last, lcm));
    // Written out twice, not as a closure (see `normalize::aligned_run`).
    let (x, dy) = io.load_at::<V>(0);
    let first = form.dx(mask.keep(x, k0.a, k0.b, dy), x, k0);
    let (x, dy) = io.load_at::<V>(last);
    let end = form.dx(mask.keep(x, k1.a, k1.b, dy), x, k1);
    let Win {
        a, b, m, p, q, r, ..
    } = win;
    for pat in [a, b, m, p, q, r] {
        if let Some(pat) = pat.get_mut(..lcm) {
            pat.rotate_left(head.min(lcm));
        }
    }
    let supers = div(total - head, lcm);
    let done = head + supers * lcm;
    let whole = ((total - done) / w * w).min(lcm);
    let strips = [
        Strip {
            start: head,
            rows: supers,
            stride: lcm,
            len: lcm,
            off: 0,
        },
        Strip {
            start: done,
            rows: 1,
            stride: lcm,
            len: whole,
            off: 0,
        },
    ];
    for t in strips {
        dx_strip::<V, M, F, IO>(io, t, win, mask, form);
    }
    if head > 0 {
        io.store_at::<V>(0, first);
    }
    if done + whole < total {
        io.store_at::<V>(last, end);
    }
}

/// `dx` of a strip: a row of up to one register group of vectors with its
/// coefficients in registers, rows in memory order; a wider one either row
/// by row with the coefficients loaded from the window beside each vector
/// (few coefficients, or fewer rows than a panel) or in panels of
/// [`DX_PANEL`] rows by column groups, coefficients in registers; then the
/// tail columns with narrower lanes.
fn dx_strip<V: Lane, M: Mask, F: Form, IO: Io>(io: &mut IO, t: Strip, win: &Win, mask: M, form: F) {
    enabled!(V => {
    let w = V::WIDTH;
    let nv = t.len / w;
    let sub = Strip { len: nv * w, ..t };
    let coefs = F::COEFS + M::COEFS;
    // With sixteen registers (`SLOTS` 4: SSE, AVX2) a group holds as many
    // vectors as thirteen registers hold coefficients for, which leaves
    // three for the loads and a temporary (training mode without a mask:
    // four per vector, three vectors); with thirty-two, `SLOTS / 2`.
    let most = if V::SLOTS <= 4 {
        (13 / coefs).clamp(1, 4)
    } else {
        V::SLOTS / 2
    };
    // Wider rows go in memory order, each vector's coefficients loaded
    // beside it, where that is at most four loads (inference without a
    // mask on every lane type, up to four coefficients with sixteen
    // registers) or, with sixteen vector registers, where the row is more
    // than two groups wide; else in panels. With sixteen registers panels of two
    // vectors ran at 0.40-0.59 of the limit in training mode (NHWC C = 3 to
    // 1000, 256 KiB and 8 MiB, AMD EPYC Zen 3), in memory order at 0.44-0.78;
    // with the ReLU mask (six coefficients) 256 channels at 8 MiB went from
    // 0.33 to 0.45 in memory order, and 3 channels (three vectors) lost.
    let row_order = if V::SLOTS <= 4 {
        coefs <= 4 || (w > 1 && nv > 2 * most)
    } else {
        coefs <= 1
    };
    let panels = !row_order && t.rows >= DX_PANEL;
    if nv > most && !panels {
        if let Some(pat) = win.pat(t.off, t.off + nv * w) {
            // Always inlined: called twice per vector by the paired rows, the
            // closure was left out of line, compiled without the lane's
            // instructions in a default x86-64 build (`.ci/dispatch`).
            io.map_rows_pat::<V>(
                t.start,
                t.rows,
                t.stride,
                pat,
                #[inline(always)]
                |x, dy, c| form.dx(mask.keep(x, c.a, c.b, dy), x, c),
            );
        }
    } else if nv > most {
        // Panels of `DX_PANEL` rows, each swept by balanced column groups
        // of at most `most` vectors with their coefficients in registers.
        let groups = nv.div_ceil(most);
        let (size, longer) = (div(nv, groups), nv % groups.max(1));
        let mut r0 = 0;
        while r0 < t.rows {
            let pr = (t.rows - r0).min(DX_PANEL);
            let mut v0 = 0;
            for gi in 0..groups {
                let n = size + usize::from(gi < longer);
                let g = Strip {
                    start: t.start + r0 * t.stride + v0 * w,
                    rows: pr,
                    len: n * w,
                    off: t.off + v0 * w,
                    ..t
                };
                dx_nv::<V, M, F, IO>(n, io, g, win, mask, form);
                v0 += n;
            }
            r0 += pr;
        }
    } else {
        dx_nv::<V, M, F, IO>(nv, io, sub, win, mask, form);
    }
    let whole = nv * w;
    if w > 1 && whole < t.len {
        let tail = Strip {
            start: t.start + whole,
            len: t.len - whole,
            off: t.off + whole,
            ..t
        };
        dx_strip::<V::Half, M, F, IO>(io, tail, win, mask, form);
    }
    })
}

/// Rows of a panel of the `dx` pass for rows wider than `SLOTS / 2`
/// vectors: each column group's coefficients are loaded once per panel
/// (4, 8 and 16 rows measured alike with 256 channels at 256 KiB; 16 lost
/// 10% with 1000 channels, AMD EPYC Zen 4).
const DX_PANEL: usize = 4;

/// [`dx_group`] for `nv` (0 to 4) vectors.
#[inline(always)]
fn dx_nv<V: Lane, M: Mask, F: Form, IO: Io>(
    nv: usize,
    io: &mut IO,
    t: Strip,
    win: &Win,
    mask: M,
    form: F,
) {
    match nv {
        0 => {}
        1 => dx_group::<V, M, F, IO, 1>(io, t, win, mask, form),
        2 => dx_group::<V, M, F, IO, 2>(io, t, win, mask, form),
        3 => dx_group::<V, M, F, IO, 3>(io, t, win, mask, form),
        _ => dx_group::<V, M, F, IO, 4>(io, t, win, mask, form),
    }
}

/// `dx` of `NV` vectors of a block of rows.
#[inline(always)]
fn dx_group<V: Lane, M: Mask, F: Form, IO: Io, const NV: usize>(
    io: &mut IO,
    t: Strip,
    win: &Win,
    mask: M,
    form: F,
) {
    let w = V::WIDTH;
    let ld = inlined(
        #[inline(always)]
        |arr: &[f32; WINDOW], k: usize| V::load(arr.get(t.off + k * w..).unwrap_or(&[0.0; 16])),
    );
    // A loop, not `core::array::from_fn` (see `sums_group`).
    let z = V::splat(0.0);
    let mut ks = [Coefs {
        a: z,
        b: z,
        m: z,
        p: z,
        q: z,
        r: z,
    }; NV];
    for (k, c) in ks.iter_mut().enumerate() {
        *c = Coefs {
            a: ld(&win.a, k),
            b: ld(&win.b, k),
            m: ld(&win.m, k),
            p: ld(&win.p, k),
            q: ld(&win.q, k),
            r: ld(&win.r, k),
        };
    }
    io.map_rows::<V, NV>(
        t.start,
        t.rows,
        t.stride,
        #[inline(always)]
        |k, x, dy| {
            let Some(&c) = ks.get(k) else {
                return dy;
            };
            form.dx(mask.keep(x, c.a, c.b, dy), x, c)
        },
    );
}
