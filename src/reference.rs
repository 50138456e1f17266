//! The `f64` scalar reference: one plain function per kernel, obviously
//! correct, used by the tests, the fuzz targets and the benchmarks as the
//! oracle. Two passes, one loop each, no cleverness, no SIMD.
//!
//! Inputs are the same `f32` slices the kernels take (widened exactly to
//! `f64`); outputs are `f64` so that callers see the reference's own error,
//! not a second rounding.

use crate::shape::{Layout, Shape};

/// Flat index of element `(n, s, c)` of `shape`.
pub fn index(shape: Shape, n: usize, s: usize, c: usize) -> usize {
    match shape.layout {
        Layout::Nhwc => (n * shape.spatial + s) * shape.channels + c,
        Layout::Nchw => (n * shape.channels + c) * shape.spatial + s,
    }
}

/// Mean and population variance of channel `c`, two-pass. NaN for an empty
/// channel.
pub fn channel_moments(x: &[f32], shape: Shape, c: usize) -> (f64, f64) {
    let count = (shape.batch * shape.spatial) as f64;
    let mut sum = 0.0;
    for n in 0..shape.batch {
        for s in 0..shape.spatial {
            sum += x[index(shape, n, s, c)] as f64;
        }
    }
    let mean = sum / count;
    let mut ss = 0.0;
    for n in 0..shape.batch {
        for s in 0..shape.spatial {
            let d = x[index(shape, n, s, c)] as f64 - mean;
            ss += d * d;
        }
    }
    (mean, ss / count)
}

/// Per-channel mean and population variance, two-pass, in `f64`.
///
/// Panics if the slices do not match `shape` (it is a test oracle, not a
/// kernel).
pub fn moments(x: &[f32], shape: Shape, mean: &mut [f64], variance: &mut [f64]) {
    assert_eq!(x.len(), shape.batch * shape.spatial * shape.channels);
    for c in 0..shape.channels {
        let (m, v) = channel_moments(x, shape, c);
        mean[c] = m;
        variance[c] = v;
    }
}

/// Largest input magnitude for which the kernels promise finite results and
/// the crate docs' §3 bounds; beyond it `(x - shift)²` summed over a block may
/// overflow `f32` (TensorFlow's `E[x²]` overflows near `1.8e19`).
pub const MAX_MAGNITUDE: f32 = 1.0e17;

/// Bound on the mean error: `1e-6 * (|mean_ref| + σ_ref)` (crate docs §3).
pub fn mean_bound(mean_ref: f64, var_ref: f64) -> f64 {
    1e-6 * (mean_ref.abs() + libm::sqrt(var_ref))
}

/// Bound on the variance's relative error: `1e-5` when the channel is well
/// conditioned (`|mean| <= 10 σ`), `1e-3` otherwise (crate docs §3 promises it
/// up to `|mean| <= 1e4 σ`; one `moments` or `accumulate` call keeps it
/// beyond, and [`check_moments`] holds them to it, but a chain of merged
/// `f32` `Moments` records only keeps it inside that range).
pub fn variance_rel_bound(mean_ref: f64, var_ref: f64) -> f64 {
    if mean_ref.abs() <= 10.0 * libm::sqrt(var_ref) {
        1e-5
    } else {
        1e-3
    }
}

/// A value that fails an oracle check.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Mismatch {
    /// What was compared (`"mean"`, `"variance"`, `"y"`, ...).
    pub what: &'static str,
    /// Channel (or element) index.
    pub index: usize,
    /// The kernel's value.
    pub got: f64,
    /// The reference value.
    pub want: f64,
    /// The allowed absolute error (NaN for a class mismatch: NaN versus a
    /// number, or an infinity of the wrong sign).
    pub bound: f64,
}

impl core::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "{}[{}]: got {:e}, want {:e}, |error| {:e} > bound {:e}",
            self.what,
            self.index,
            self.got,
            self.want,
            (self.got - self.want).abs(),
            self.bound
        )
    }
}

/// Compares `got` with `want` within `bound`, after the special values
/// (libm's order): a NaN must meet a NaN, an infinity the same infinity, and
/// only then are magnitudes compared.
pub fn compare(
    what: &'static str,
    index: usize,
    got: f64,
    want: f64,
    bound: f64,
) -> Result<(), Mismatch> {
    let fail = |bound| {
        Err(Mismatch {
            what,
            index,
            got,
            want,
            bound,
        })
    };
    if want.is_nan() || got.is_nan() {
        return if want.is_nan() && got.is_nan() {
            Ok(())
        } else {
            fail(f64::NAN)
        };
    }
    if want.is_infinite() || got.is_infinite() {
        return if want == got { Ok(()) } else { fail(f64::NAN) };
    }
    if (got - want).abs() <= bound {
        Ok(())
    } else {
        fail(bound)
    }
}

/// What an input channel promises: `Finite` when every element is finite
/// with `|x| <= MAX_MAGNITUDE`, `NonFinite` when some element is NaN or
/// infinite, `Huge` otherwise (no numerical promise, only no panic).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Domain {
    /// Inside the numerical contract.
    Finite,
    /// Holds a NaN or an infinity.
    NonFinite,
    /// Finite, but some `|x| > MAX_MAGNITUDE`.
    Huge,
}

/// The [`Domain`] of channel `c` of `x`.
pub fn channel_domain(x: &[f32], shape: Shape, c: usize) -> Domain {
    let mut d = Domain::Finite;
    for n in 0..shape.batch {
        for s in 0..shape.spatial {
            let v = x[index(shape, n, s, c)];
            if !v.is_finite() {
                return Domain::NonFinite;
            }
            if v.abs() > MAX_MAGNITUDE {
                d = Domain::Huge;
            }
        }
    }
    d
}

/// The oracle for the moments kernels: checks the per-channel `mean` and
/// population `variance` a kernel produced for `x` against the two-pass
/// reference and the crate docs' §3 bounds.
///
/// A channel holding a NaN or an infinity must come out with a NaN variance
/// and a mean that is NaN or infinite; a channel beyond [`MAX_MAGNITUDE`] is
/// not checked.
pub fn check_moments(
    x: &[f32],
    shape: Shape,
    mean: &[f32],
    variance: &[f32],
) -> Result<(), Mismatch> {
    for c in 0..shape.channels {
        let (m, v) = channel_moments(x, shape, c);
        let (gm, gv) = (mean[c] as f64, variance[c] as f64);
        match channel_domain(x, shape, c) {
            Domain::Huge => {}
            Domain::NonFinite => {
                if gm.is_finite() {
                    return compare("mean", c, gm, f64::NAN, f64::NAN);
                }
                compare("variance", c, gv, f64::NAN, 0.0)?;
            }
            Domain::Finite => {
                // The reference rounded to f32 is the best a kernel can
                // return; allow that rounding on top of the bound.
                let half_ulp = |r: f64| (r as f32 as f64 - r).abs();
                compare("mean", c, gm, m, mean_bound(m, v) + half_ulp(m))?;
                compare(
                    "variance",
                    c,
                    gv,
                    v,
                    variance_rel_bound(m, v) * v + half_ulp(v),
                )?;
            }
        }
    }
    Ok(())
}

/// The folded coefficients in `f64`: `a = scale / sqrt(var + eps)`,
/// `b = offset - mean * a`.
pub fn fold(mean: f32, variance: f32, scale: f32, offset: f32, epsilon: f32) -> (f64, f64) {
    let a = scale as f64 / libm::sqrt(variance as f64 + epsilon as f64);
    (a, offset as f64 - mean as f64 * a)
}

/// The oracle for [`crate::fold`]: every `a[c]`, `b[c]` is the [`fold`] of
/// channel `c` rounded once to `f32`, bit for bit (a NaN may be any NaN).
///
/// A [compact](crate#compact-builds) build folds in `f32` arithmetic; there
/// the oracle holds it to the bounds proved beside that fold in
/// `src/normalize.rs`: `|a - A| <= 2 ε |A|` and
/// `|b - B| <= 3 ε (|mean A| + |offset|)` (plus `2^-149` for subnormal
/// results), NaN and infinities of the rounded reference matched by class.
pub fn check_fold(params: &crate::Params<'_>, a: &[f32], b: &[f32]) -> Result<(), Mismatch> {
    if crate::lanes::COMPACT {
        return check_fold_f32(params, a, b);
    }
    for c in 0..params.mean.len() {
        let (ra, rb) = channel_fold(params, c);
        for (what, got, want) in [("a", a[c], ra), ("b", b[c], rb)] {
            let same = got.to_bits() == (want as f32).to_bits() || got.is_nan() && want.is_nan();
            if !same {
                return Err(Mismatch {
                    what,
                    index: c,
                    got: got as f64,
                    want: want as f32 as f64,
                    bound: 0.0,
                });
            }
        }
    }
    Ok(())
}

/// [`check_fold`] for a compact build's `f32` fold.
fn check_fold_f32(params: &crate::Params<'_>, a: &[f32], b: &[f32]) -> Result<(), Mismatch> {
    let eps = f32::EPSILON as f64;
    let tiny = libm::ldexp(1.0, -149);
    for c in 0..params.mean.len() {
        let (ra, rb) = channel_fold(params, c);
        let offset = params.offset.map_or(0.0, |o| o[c]) as f64;
        let ma = (params.mean[c] as f64 * ra).abs();
        let bounds = [
            ("a", a[c], ra, 2.0 * eps * ra.abs() + tiny),
            ("b", b[c], rb, 3.0 * eps * (ma + offset.abs()) + tiny),
        ];
        for (what, got, want, bound) in bounds {
            let rounded = want as f32;
            if !rounded.is_finite() || !got.is_finite() {
                // The class of the rounded reference, as the f64 fold has.
                let same = got.to_bits() == rounded.to_bits() || got.is_nan() && rounded.is_nan();
                if !same {
                    return Err(Mismatch {
                        what,
                        index: c,
                        got: got as f64,
                        want: rounded as f64,
                        bound: f64::NAN,
                    });
                }
                continue;
            }
            compare(what, c, got as f64, want, bound)?;
        }
    }
    Ok(())
}

/// One activation in `f64` (the same comparisons as the kernels, so NaN
/// stays NaN).
pub fn activate(activation: crate::Activation, y: f64) -> f64 {
    let (lo, hi) = match activation {
        crate::Activation::None => return y,
        crate::Activation::Relu => (0.0, f64::INFINITY),
        crate::Activation::Relu6 => (0.0, 6.0),
        crate::Activation::Clamp { min, max } => (min as f64, max as f64),
    };
    let y = if y < lo { lo } else { y };
    if y > hi {
        hi
    } else {
        y
    }
}

/// `activation((x - mean) / sqrt(var + eps) * scale + offset)` for every
/// element, in `f64`, in the folded form crate docs §1 defines. Panics on
/// lengths that do not match.
pub fn normalize(x: &[f32], shape: Shape, params: &crate::Params<'_>, y: &mut [f64]) {
    for c in 0..shape.channels {
        let (a, b) = channel_fold(params, c);
        for n in 0..shape.batch {
            for s in 0..shape.spatial {
                let i = index(shape, n, s, c);
                y[i] = activate(params.activation, x[i] as f64 * a + b);
            }
        }
    }
}

fn channel_fold(p: &crate::Params<'_>, c: usize) -> (f64, f64) {
    fold(
        p.mean[c],
        p.variance[c],
        p.scale.map_or(1.0, |s| s[c]),
        p.offset.map_or(0.0, |o| o[c]),
        p.epsilon,
    )
}

/// The crate docs' §3 bound on one normalized element:
/// `4 ε (|x a| + |mean a| + |offset|)`.
pub fn normalize_bound(x: f32, mean: f32, a: f64, offset: f32) -> f64 {
    4.0 * f32::EPSILON as f64
        * ((x as f64 * a).abs() + (mean as f64 * a).abs() + (offset as f64).abs())
}

/// The oracle for the normalization kernels: `y` against [`normalize`]
/// within [`normalize_bound`], NaN and infinities compared by class first.
///
/// Elements are not checked where the contract makes no numerical promise:
/// a channel whose `a` is not a finite `f32` (zero `variance + epsilon`, an
/// infinite scale) and an element whose `|x a| + |b|` reaches `f32::MAX / 2`
/// (the `f32` result may overflow where the `f64` one does not).
pub fn check_normalize(
    x: &[f32],
    shape: Shape,
    params: &crate::Params<'_>,
    y: &[f32],
) -> Result<(), Mismatch> {
    let limit = f32::MAX as f64 / 2.0;
    for c in 0..shape.channels {
        let (a, b) = channel_fold(params, c);
        let representable = |v: f64| v.abs() <= f32::MAX as f64; // false for NaN
        if !representable(a) || !representable(b) {
            continue;
        }
        let offset = params.offset.map_or(0.0, |o| o[c]);
        for n in 0..shape.batch {
            for s in 0..shape.spatial {
                let i = index(shape, n, s, c);
                let xa = x[i] as f64 * a;
                if xa.abs() + b.abs() >= limit {
                    continue;
                }
                let want = activate(params.activation, xa + b);
                let bound = normalize_bound(x[i], params.mean[c], a, offset);
                compare(
                    "y",
                    i,
                    y[i] as f64,
                    want,
                    bound + (want as f32 as f64 - want).abs(),
                )?;
            }
        }
    }
    Ok(())
}

/// The moving-statistics update in `f64`: returns the new `(mean,
/// variance)` of one channel.
pub fn update_moving(
    moving: (f32, f32),
    batch: (f32, f32),
    count: u64,
    batches: u64,
    config: &crate::Config,
) -> (f64, f64) {
    let (d, w) = match config.momentum {
        crate::Momentum::Decay(d) => (d as f64, 1.0 - d as f64),
        crate::Momentum::Cumulative => {
            let w = 1.0 / batches.max(1) as f64;
            (1.0 - w, w)
        }
    };
    let bessel = match config.moving_variance {
        crate::Variance::Sample if count > 1 => count as f64 / (count - 1) as f64,
        _ => 1.0,
    };
    (
        moving.0 as f64 * d + batch.0 as f64 * w,
        moving.1 as f64 * d + batch.1 as f64 * bessel * w,
    )
}

/// Whether the backward pass lets `dy` through at the forward's
/// pre-activation output `y`: always without an activation, `y > 0` for
/// ReLU, strictly inside the band for ReLU6 and `Clamp` (false for NaN).
pub fn passes(activation: crate::Activation, y: f64) -> bool {
    match activation {
        crate::Activation::None => true,
        crate::Activation::Relu => y > 0.0,
        crate::Activation::Relu6 => 0.0 < y && y < 6.0,
        crate::Activation::Clamp { min, max } => (min as f64) < y && y < max as f64,
    }
}

/// The activation mask's coefficients of channel `c`: the forward's folded
/// `a`, `b` rounded to `f32` (what [`crate::fold`] returns, bit for bit).
fn mask_fold(p: &crate::Params<'_>, c: usize) -> (f64, f64) {
    let (a, b) = channel_fold(p, c);
    (a as f32 as f64, b as f32 as f64)
}

/// The per-channel quantities of the backward pass, in `f64` (see
/// [`backward`]).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BackwardChannel {
    /// `1 / sqrt(var + eps)`.
    pub inv: f64,
    /// `Σ g`.
    pub doffset: f64,
    /// `Σ g (x - mean) inv`.
    pub dscale: f64,
    /// `scale * inv`.
    pub p: f64,
    /// `-p inv dscale / count` (0 in inference mode).
    pub q: f64,
    /// `-p doffset / count` (0 in inference mode).
    pub r: f64,
}

/// `g`, the incoming gradient `dy` of element `i` of channel `c` after the
/// activation mask (the mask from `y = x a + b` evaluated exactly with the
/// `f32` coefficients).
fn masked(x: &[f32], dy: &[f32], params: &crate::Params<'_>, c: usize, i: usize) -> f64 {
    let (a, b) = mask_fold(params, c);
    if passes(params.activation, x[i] as f64 * a + b) {
        dy[i] as f64
    } else {
        0.0
    }
}

/// The backward quantities of channel `c`, two passes (the first sums `g`
/// and `g (x - mean)`).
pub fn backward_channel(
    x: &[f32],
    dy: &[f32],
    shape: Shape,
    params: &crate::Params<'_>,
    mode: crate::Mode,
    c: usize,
) -> BackwardChannel {
    let count = (shape.batch * shape.spatial) as f64;
    let mean = params.mean[c] as f64;
    let inv = 1.0 / libm::sqrt(params.variance[c] as f64 + params.epsilon as f64);
    let scale = params.scale.map_or(1.0, |s| s[c] as f64);
    let (mut sg, mut sgd) = (0.0, 0.0);
    for n in 0..shape.batch {
        for s in 0..shape.spatial {
            let i = index(shape, n, s, c);
            let g = masked(x, dy, params, c, i);
            sg += g;
            sgd += g * (x[i] as f64 - mean);
        }
    }
    let dscale = sgd * inv;
    let p = scale * inv;
    let (q, r) = match mode {
        crate::Mode::Training => (-p * inv * dscale / count, -p * sg / count),
        crate::Mode::Inference => (0.0, 0.0),
    };
    BackwardChannel {
        inv,
        doffset: sg,
        dscale,
        p,
        q,
        r,
    }
}

/// The backward pass in `f64` (crate docs §1): per channel `doffset = Σ g`,
/// `dscale = Σ g x̂` with `x̂ = (x - mean) inv`, and `dx = scale inv / count
/// (count g - doffset - x̂ dscale)` in training mode, `dx = g scale inv` in
/// inference mode; `g` is `dy` masked by the activation's derivative at
/// `y = x a + b` (the forward's `f32` coefficients, exact arithmetic).
/// Panics on lengths that do not match (a test oracle, not a kernel).
#[allow(clippy::too_many_arguments)]
pub fn backward(
    x: &[f32],
    dy: &[f32],
    shape: Shape,
    params: &crate::Params<'_>,
    mode: crate::Mode,
    dx: &mut [f64],
    dscale: &mut [f64],
    doffset: &mut [f64],
) {
    let count = (shape.batch * shape.spatial) as f64;
    for c in 0..shape.channels {
        let k = backward_channel(x, dy, shape, params, mode, c);
        dscale[c] = k.dscale;
        doffset[c] = k.doffset;
        let scale = params.scale.map_or(1.0, |s| s[c] as f64);
        for n in 0..shape.batch {
            for s in 0..shape.spatial {
                let i = index(shape, n, s, c);
                let g = masked(x, dy, params, c, i);
                dx[i] = match mode {
                    crate::Mode::Training => {
                        let xhat = (x[i] as f64 - params.mean[c] as f64) * k.inv;
                        scale * k.inv / count * (count * g - k.doffset - xhat * k.dscale)
                    }
                    crate::Mode::Inference => g * scale * k.inv,
                };
            }
        }
    }
}

/// The error bound's constant on the backward pass's sums: `37 ε` of `Σ|t|`
/// (see [`crate::backward`] for the derivation).
pub const BACKWARD_SUM: f64 = 37.0 * f32::EPSILON as f64;

/// The sum bounds of [`crate::backward`] for one channel, given the
/// reference's quantities `k` and the sums `Σ|g|`, `Σ|g d|`: returns
/// `(doffset bound, dscale bound)`.
pub fn backward_sum_bounds(k: &BackwardChannel, abs_g: f64, abs_gd: f64) -> (f64, f64) {
    (BACKWARD_SUM * abs_g, BACKWARD_SUM * k.inv * abs_gd)
}

/// The bound of [`crate::backward`] on one `dx` (before its final
/// rounding): `4 ε (|p g| + |q d| + |r|) + 37 ε |p| / count (Σ|g| + inv²
/// |d| Σ|g d|)` in training mode, `4 ε |p g|` in inference mode.
pub fn backward_dx_bound(
    k: &BackwardChannel,
    mode: crate::Mode,
    g: f64,
    d: f64,
    count: f64,
    abs_g: f64,
    abs_gd: f64,
) -> f64 {
    let eps = f32::EPSILON as f64;
    match mode {
        crate::Mode::Training => {
            4.0 * eps * ((k.p * g).abs() + (k.q * d).abs() + k.r.abs())
                + BACKWARD_SUM * k.p.abs() / count * (abs_g + k.inv * k.inv * d.abs() * abs_gd)
        }
        crate::Mode::Inference => 4.0 * eps * (k.p * g).abs(),
    }
}

/// The oracle for [`crate::backward`]: `dx`, `dscale` and `doffset`
/// against [`backward`] within the bounds documented on [`crate::backward`] (plus the final rounding
/// to `f32` and, for results in the subnormal range, `2^-149` per rounding
/// involved).
///
/// The mask: an element whose exact `y = x a + b` is so close to a bound of
/// the activation that the forward's `f32` rounding (fused or not) may put
/// it on either side is *ambiguous*: its `g` may be `dy` or 0, and the
/// bounds of its channel grow by what that changes.
///
/// Channels without a numerical promise are skipped: any non-finite input
/// or parameter, `|x| > MAX_MAGNITUDE`, or sums or coefficients that reach
/// `f32::MAX / 4` (the `f32` intermediates may overflow where `f64` does
/// not).
#[allow(clippy::too_many_arguments)]
pub fn check_backward(
    x: &[f32],
    dy: &[f32],
    shape: Shape,
    params: &crate::Params<'_>,
    mode: crate::Mode,
    dx: &[f32],
    dscale: &[f32],
    doffset: &[f32],
) -> Result<(), Mismatch> {
    const TINY: f64 = 1.401298464324817e-45; // 2^-149
    let u = f32::EPSILON as f64 / 2.0;
    let big = f32::MAX as f64 / 4.0;
    let count = (shape.batch * shape.spatial) as f64;
    let half_ulp = |r: f64| (r as f32 as f64 - r).abs();
    for c in 0..shape.channels {
        let scale = params.scale.map_or(1.0, |s| s[c]);
        let offset = params.offset.map_or(0.0, |o| o[c]);
        let finite_params = [params.mean[c], params.variance[c], scale, offset]
            .iter()
            .all(|v| v.is_finite());
        if !finite_params || channel_domain(x, shape, c) != Domain::Finite {
            continue;
        }
        let k = backward_channel(x, dy, shape, params, mode, c);
        let (a, b) = mask_fold(params, c);
        let mean = params.mean[c] as f64;
        let (mut abs_g, mut abs_gd, mut amb_g, mut amb_gd) = (0.0, 0.0, 0.0, 0.0);
        let mut ok = [k.inv, k.p, k.q, k.r, k.dscale, k.doffset]
            .iter()
            .all(|v| v.abs() < big)
            && a.is_finite()
            && b.is_finite();
        let ambiguous = |i: usize| -> bool {
            let (lo, hi) = match params.activation {
                crate::Activation::None => return false,
                crate::Activation::Relu => (0.0, f64::INFINITY),
                crate::Activation::Relu6 => (0.0, 6.0),
                crate::Activation::Clamp { min, max } => (min as f64, max as f64),
            };
            let xa = x[i] as f64 * a;
            let y = xa + b;
            let slack = 2.01 * u * (xa.abs() + b.abs()) + 2.0 * TINY;
            xa.abs() + b.abs() >= big || (y - lo).abs() <= slack || (y - hi).abs() <= slack
        };
        for n in 0..shape.batch {
            for s in 0..shape.spatial {
                let i = index(shape, n, s, c);
                if !dy[i].is_finite() {
                    ok = false;
                }
                let d = (x[i] as f64 - mean).abs();
                let g = masked(x, dy, params, c, i).abs();
                abs_g += g;
                abs_gd += g * d;
                if ambiguous(i) {
                    amb_g += (dy[i] as f64).abs();
                    amb_gd += (dy[i] as f64).abs() * d;
                }
            }
        }
        if !ok || abs_g + amb_g >= big || (abs_gd + amb_gd) * k.inv.max(1.0) >= big {
            continue;
        }
        // An ambiguous element's term may be in the kernel's sums.
        let (all_g, all_gd) = (abs_g + amb_g, abs_gd + amb_gd);
        let (bo, bs) = backward_sum_bounds(&k, all_g, all_gd);
        // The kernel's own sums, and the q and r it forms from them, may be
        // that far from the reference's: no promise where they may
        // overflow f32.
        let dq = k.p.abs() * k.inv * k.inv / count * (bs / k.inv.max(f64::MIN_POSITIVE) + amb_gd);
        let dr = k.p.abs() / count * (bo + amb_g);
        if k.doffset.abs() + bo + amb_g >= big
            || k.dscale.abs() + bs + k.inv * amb_gd >= big
            || k.q.abs() + dq >= big
            || k.r.abs() + dr >= big
        {
            continue;
        }
        let uf_sum = (count + 8.0) * TINY;
        compare(
            "doffset",
            c,
            doffset[c] as f64,
            k.doffset,
            bo + amb_g + half_ulp(k.doffset) + uf_sum,
        )?;
        compare(
            "dscale",
            c,
            dscale[c] as f64,
            k.dscale,
            bs + k.inv * (amb_gd + uf_sum) + half_ulp(k.dscale) + uf_sum,
        )?;
        for n in 0..shape.batch {
            for s in 0..shape.spatial {
                let i = index(shape, n, s, c);
                let g = masked(x, dy, params, c, i);
                let d = x[i] as f64 - mean;
                let want = g * k.p + d * k.q + k.r;
                let mut bound = backward_dx_bound(&k, mode, g, d, count, all_g, all_gd)
                    + half_ulp(want)
                    + (g.abs() + d.abs() + 8.0) * TINY;
                if mode == crate::Mode::Training {
                    // What the ambiguous terms move `r` and `q d` by, with
                    // the 4 ε of those terms and the final rounding.
                    bound += (1.0 + 8.0 * f32::EPSILON as f64) * k.p.abs() / count
                        * (amb_g + k.inv * k.inv * d.abs() * (amb_gd + uf_sum) + uf_sum);
                }
                if ambiguous(i) {
                    // Either g: the other one's value, its 4 ε bound and
                    // its final rounding.
                    bound += (1.0 + 8.0 * f32::EPSILON as f64) * (k.p * dy[i] as f64).abs();
                }
                // f32 intermediates that may overflow: no promise.
                let terms = (k.p * g).abs() + (k.q * d).abs() + k.r.abs();
                if want.abs() + bound >= big || terms >= big || bound.is_nan() {
                    continue;
                }

                compare("dx", i, dx[i] as f64, want, bound)?;
            }
        }
    }
    Ok(())
}
