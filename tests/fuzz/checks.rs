//! Decode-and-check functions shared by the fuzz targets (`fuzz/fuzz_targets`)
//! and the stable regression test (`tests/fuzz_regression.rs`, which
//! includes this file with `#[path]`). Depends on `batchnorm` and `std` only.
//!
//! Every check panics on a violated property. The oracle is
//! `batchnorm::reference` (the f64 two-pass reference and its crate docs §3
//! bounds); NaN, infinities and signs are compared by class before any
//! magnitude (`reference::compare`).
//!
//! The byte decoder never fails: a short input reads as zeros, so every byte
//! string is a valid case. Sizes are capped at [`MAX_ELEMS`] elements.
#![allow(dead_code, clippy::neg_cmp_op_on_partial_ord)]

use batchnorm::reference::{self, Domain, Mismatch};
use batchnorm::{
    Activation, Batch, BatchNorm, BatchNormArray, Config, Error, Gradients, Layout, Mode, Moments,
    Momentum, MovingStats, Params, ScaleOffset, Shape, Simd, Variance, WeightLayout,
};

/// Largest tensor a case decodes to (keeps an execution around a millisecond
/// while still crossing every block, group, segment and super-row size).
pub const MAX_ELEMS: usize = 1 << 14;

const EPS: f64 = f32::EPSILON as f64;

// ---------------------------------------------------------------------------
// Byte decoder and generator

/// The fuzz bytes, read front to back; zeros once exhausted.
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }
    pub fn u8(&mut self) -> u8 {
        let v = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos = self.pos.saturating_add(1);
        v
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), self.u8()])
    }
    pub fn u64(&mut self) -> u64 {
        self.u32() as u64 | (self.u32() as u64) << 32
    }
    pub fn f32(&mut self) -> f32 {
        f32::from_bits(self.u32())
    }
    pub fn below(&mut self, n: usize) -> usize {
        self.u16() as usize % n.max(1)
    }
    pub fn pick<T: Copy>(&mut self, xs: &[T]) -> T {
        xs[self.u8() as usize % xs.len()]
    }
    pub fn remaining(&self) -> usize {
        self.data.len().saturating_sub(self.pos)
    }
}

/// SplitMix64: bulk data comes from a seed the fuzzer controls, so short
/// inputs still make large tensors.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }
}

/// `10^k` for `k` in `-45..=18` (subnormal to beyond `MAX_MAGNITUDE`).
fn magnitude(b: u8) -> f64 {
    10f64.powi((b % 64) as i32 - 45)
}

fn signed(b: u8, v: f64) -> f64 {
    if b & 0x80 != 0 {
        -v
    } else {
        v
    }
}

/// A special value: NaN, infinities, zeros, subnormals, the edges of
/// `MAX_MAGNITUDE` and of `f32`, raw bits.
pub fn special(kind: u8, rng: &mut Rng) -> f32 {
    let m = reference::MAX_MAGNITUDE;
    match kind % 24 {
        0 => f32::NAN,
        1 => f32::from_bits(0xffc0_0000), // negative quiet NaN
        2 => f32::from_bits(0x7f80_0001), // signalling NaN
        3 => f32::INFINITY,
        4 => f32::NEG_INFINITY,
        5 => 0.0,
        6 => -0.0,
        7 => f32::from_bits(1),
        8 => f32::from_bits(rng.next_u64() as u32 & 0x807f_ffff), // any subnormal
        9 => f32::MIN_POSITIVE,
        10 => 1e30,
        11 => -1e30,
        12 => m,
        13 => -m,
        14 => f32::from_bits(m.to_bits() + 1), // just beyond the promise
        15 => f32::MAX,
        16 => f32::MIN,
        17 => f32::from_bits(rng.next_u64() as u32), // raw bits
        18 => ((rng.uniform() * 2.0 - 1.0) * m as f64) as f32,
        19 => 1e-30,
        20 => 1e6,
        21 => -1e4,
        22 => 1.0,
        _ => rng.normal() as f32,
    }
}

/// How the bulk values of a channel are drawn.
#[derive(Clone, Copy, Debug)]
pub enum Dist {
    /// `mu + sd * N(0, 1)` rounded to `f32`.
    Normal { mu: f64, sd: f64 },
    /// Every element the same.
    Const(f32),
    /// Small integers `0..k` (exact sums, ties).
    Ints(u32),
    /// Uniformly random bits (every class of `f32`).
    Raw,
    /// Subnormals only.
    Subnormal,
}

impl Dist {
    pub fn decode(b0: u8, b1: u8, b2: u8) -> Dist {
        match b0 % 8 {
            0 => Dist::Normal { mu: 0.0, sd: 1.0 },
            // A large (or tiny) common offset and unit noise.
            1 => Dist::Normal {
                mu: signed(b1, magnitude(b1)),
                sd: 1.0,
            },
            // An offset and noise relative to it: `|mean| / σ` from 1 to 1e9.
            2 => {
                let mu = magnitude(b1);
                Dist::Normal {
                    mu: signed(b2, mu),
                    sd: mu * 10f64.powi(-((b2 % 10) as i32)),
                }
            }
            3 => Dist::Normal {
                mu: 0.0,
                sd: magnitude(b1),
            },
            4 => Dist::Const(signed(b2, magnitude(b1)) as f32),
            5 => Dist::Ints(1 + (b1 % 8) as u32),
            6 => Dist::Raw,
            _ => Dist::Subnormal,
        }
    }

    pub fn sample(&self, rng: &mut Rng) -> f32 {
        match *self {
            Dist::Normal { mu, sd } => (mu + sd * rng.normal()) as f32,
            Dist::Const(v) => v,
            Dist::Ints(k) => (rng.next_u64() % k as u64) as f32,
            Dist::Raw => f32::from_bits(rng.next_u64() as u32),
            Dist::Subnormal => f32::from_bits(rng.next_u64() as u32 & 0x807f_ffff),
        }
    }
}

/// A data generator: a distribution per channel (all the same, or varied),
/// a rate of special values, then explicit patches from the last bytes.
pub struct Gen {
    rng: Rng,
    base: Dist,
    varied: bool,
    special_rate: usize,
}

impl Gen {
    pub fn decode(inp: &mut Input) -> Gen {
        let (b0, b1, b2) = (inp.u8(), inp.u8(), inp.u8());
        let rate = inp.u8();
        Gen {
            rng: Rng::new(inp.u64()),
            base: Dist::decode(b0, b1, b2),
            varied: b0 & 0x80 != 0,
            special_rate: match rate % 4 {
                0 | 1 => 0,
                2 => 256,
                _ => 8,
            },
        }
    }

    /// A tensor of `shape`, channel by channel.
    pub fn tensor(&mut self, shape: Shape) -> Vec<f32> {
        let len = shape.batch * shape.spatial * shape.channels;
        let mut x = vec![0.0f32; len];
        for c in 0..shape.channels {
            let dist = if self.varied && self.rng.below(2) == 0 {
                let b = self.rng.next_u64().to_le_bytes();
                Dist::decode(b[0], b[1], b[2])
            } else {
                self.base
            };
            for n in 0..shape.batch {
                for s in 0..shape.spatial {
                    let v = if self.special_rate > 0 && self.rng.below(self.special_rate) == 0 {
                        let k = self.rng.next_u64() as u8;
                        special(k, &mut self.rng)
                    } else {
                        dist.sample(&mut self.rng)
                    };
                    x[reference::index(shape, n, s, c)] = v;
                }
            }
        }
        x
    }

    /// `len` per-channel parameters from the same distributions.
    pub fn params(&mut self, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| {
                if self.special_rate > 0 && self.rng.below(self.special_rate) == 0 {
                    let k = self.rng.next_u64() as u8;
                    special(k, &mut self.rng)
                } else {
                    self.base.sample(&mut self.rng)
                }
            })
            .collect()
    }

    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }
}

/// The rest of the input as patches `(position, special kind)`, at most 64.
pub fn patch(inp: &mut Input, rng: &mut Rng, x: &mut [f32]) {
    let mut k = 0;
    while !x.is_empty() && inp.remaining() >= 3 && k < 64 {
        let pos = inp.u16() as usize % x.len();
        let kind = inp.u8();
        x[pos] = special(kind, rng);
        k += 1;
    }
}

pub fn decode_simd(inp: &mut Input) -> Simd {
    Simd::ALL[inp.u8() as usize % Simd::ALL.len()]
}

/// A layout and dimensions that reach every path of the kernels: one to 1100
/// channels (group of 128, segment of 512, super-row of 1024), spatial sizes
/// around every lane width and unrolled chunk, batches long enough for full
/// 2048-row blocks, and (rarely) zero dimensions.
pub fn decode_shape(inp: &mut Input) -> Shape {
    let layout = if inp.u8() & 1 == 0 {
        Layout::Nhwc
    } else {
        Layout::Nchw
    };
    let c = match inp.u8() % 8 {
        0..=2 => 1 + inp.u8() as usize % 8,
        3 | 4 => 1 + inp.u8() as usize % 40,
        5 => 1 + inp.u16() as usize % 200,
        6 => 1 + inp.u16() as usize % 1100,
        _ => inp.pick(&[
            3, 16, 17, 31, 33, 64, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1000, 1023, 1024,
            1025,
        ]),
    };
    let s = match inp.u8() % 8 {
        0..=3 => 1,
        4 | 5 => 1 + inp.u8() as usize % 20,
        6 => 1 + inp.u8() as usize % 140,
        _ => inp.pick(&[
            0, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129,
        ]),
    };
    let n = match inp.u8() % 8 {
        0 | 1 => 1 + inp.u8() as usize % 4,
        2 | 3 => 1 + inp.u8() as usize % 40,
        4 | 5 => 1 + inp.u16() as usize % 300,
        6 => 1 + inp.u16() as usize % 9000,
        _ => inp.pick(&[0, 1, 2, 3, 5, 2047, 2048, 2049, 4095, 4096, 4097, 8193]),
    };
    let s = if s.max(1) * c > MAX_ELEMS {
        MAX_ELEMS / c
    } else {
        s
    };
    let n = n.min(MAX_ELEMS / (s.max(1) * c));
    Shape {
        layout,
        batch: n,
        spatial: s,
        channels: c,
    }
}

fn len_of(shape: Shape) -> usize {
    shape.batch * shape.spatial * shape.channels
}

/// A finite, non-negative epsilon (zero included).
fn decode_epsilon(inp: &mut Input) -> f32 {
    match inp.u8() % 8 {
        // The smallest valid epsilon (0 is an error: a constant channel
        // would normalize to 0 / 0).
        0 => f32::from_bits(1),
        1 => 1e-3,
        2 => 1e-5,
        3 => f32::from_bits(1),
        4 => 1.0,
        5 => 1e30,
        _ => magnitude(inp.u8()) as f32,
    }
}

/// Every activation, with valid `Clamp` bounds (any order of specials,
/// sorted; a NaN becomes an infinity).
fn decode_activation(inp: &mut Input, rng: &mut Rng) -> Activation {
    match inp.u8() % 5 {
        0 => Activation::None,
        1 => Activation::Relu,
        2 => Activation::Relu6,
        3 => {
            let (lo, hi) = (inp.u8(), inp.u8());
            let mut a = special(lo, rng);
            let mut b = special(hi, rng);
            if a.is_nan() {
                a = f32::NEG_INFINITY;
            }
            if b.is_nan() {
                b = f32::INFINITY;
            }
            if a > b {
                core::mem::swap(&mut a, &mut b);
            }
            Activation::Clamp { min: a, max: b }
        }
        _ => Activation::Clamp {
            min: -0.5,
            max: 0.25,
        },
    }
}

// ---------------------------------------------------------------------------
// Helpers

const SENTINEL: u32 = 0x7fc0_5a5a;

/// Distinct quiet-NaN bit patterns, so an untouched buffer is recognisable.
pub fn sentinel(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| f32::from_bits(SENTINEL ^ (i as u32 & 0xffff)))
        .collect()
}

pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

/// Bit-for-bit equality of two results computed by different code paths,
/// except that any NaN equals any NaN: Rust (like IEEE 754) leaves the sign
/// and payload of a NaN produced by arithmetic unspecified, and LLVM may
/// commute the operands of `x * a + b`, which picks the other operand's NaN
/// on x86. The fuzzers found this at once (normalize vs normalize_in_place).
fn assert_bits(what: &str, got: &[f32], want: &[f32], ctx: &dyn Fn() -> String) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ; {}", ctx());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g.to_bits() != w.to_bits() && !(g.is_nan() && w.is_nan()) {
            panic!(
                "{what}[{i}]: {g:e} ({:#010x}) differs from {w:e} ({:#010x}); {}",
                g.to_bits(),
                w.to_bits(),
                ctx()
            );
        }
    }
}

/// Strict bit equality: a buffer that must not have been written (sentinel
/// NaN payloads included).
fn assert_untouched(what: &str, got: &[f32], want: &[f32], ctx: &dyn Fn() -> String) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ; {}", ctx());
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        if g.to_bits() != w.to_bits() {
            panic!(
                "{what}[{i}] was written: {g:e} ({:#010x}), was {w:e} ({:#010x}); {}",
                g.to_bits(),
                w.to_bits(),
                ctx()
            );
        }
    }
}

/// A second sentinel, different from [`sentinel`] at every index.
pub fn sentinel_b(len: usize) -> Vec<f32> {
    (0..len)
        .map(|i| f32::from_bits(0xffc0_3c3c ^ (i as u32 & 0xffff)))
        .collect()
}

/// Every element of an output was written: `ya` started as [`sentinel`] and
/// `yb`, the same computation, as [`sentinel_b`]; an element still holding
/// both was never written. (One sentinel is not enough: a NaN coefficient
/// carries the payload of a NaN in `x`, and the fuzzer found a raw-bits NaN
/// whose payload equals the sentinel at one index.) The oracles skip
/// elements without a numerical promise (a channel whose `a` or `b` is not a
/// finite f32, results near overflow), which must still be computed.
fn assert_written(what: &str, ya: &[f32], yb: &[f32], ctx: &dyn Fn() -> String) {
    let (sa, sb) = (sentinel(ya.len()), sentinel_b(yb.len()));
    let pairs = ya.iter().zip(yb).zip(sa.iter().zip(&sb));
    for (i, ((a, b), (s1, s2))) in pairs.enumerate() {
        if a.to_bits() == s1.to_bits() && b.to_bits() == s2.to_bits() {
            panic!("{what}[{i}] was never written; {}", ctx());
        }
    }
}

/// Records compared bit for bit (`==` on `Moments` is false for NaN).
fn record_bits(r: &[Moments]) -> Vec<(u64, u64, u64)> {
    r.iter()
        .map(|m| (m.count, m.mean.to_bits(), m.m2.to_bits()))
        .collect()
}

fn fail(m: Mismatch, ctx: &dyn Fn() -> String) -> ! {
    panic!("oracle: {m}; {}", ctx())
}

fn half_ulp(r: f64) -> f64 {
    (r as f32 as f64 - r).abs()
}

// ---------------------------------------------------------------------------
// The oracle, with gradual underflow
//
// `reference::check_moments` and `reference::check_normalize` hold the
// kernels to the crate docs' §3 bounds, which are relative (the standard model
// `fl(z) = z (1 + δ)`, `|δ| <= ε/2`). In the subnormal range an f32
// rounding has an absolute error instead, up to `2^-150` (half the spacing
// `2^-149` of subnormals): no f32 kernel can meet a purely relative bound
// on a result whose intermediates underflow (a channel with σ below 1e-19,
// whose `(x - mean)²` is subnormal; a coefficient or product below 1.2e-38).
// The fuzzers found exactly that within seconds (see the report in the
// README). The checks below call the reference oracle first; only when it
// objects do they re-check with the same bounds plus the underflow term of
// the operations involved (derived in each function), which is below
// `1e-44` and so changes nothing for a normal-range result.

/// `2^-149`, the smallest subnormal `f32` (and their spacing).
pub const SUBNORMAL: f64 = 1.401298464324817e-45;

/// `reference::check_moments`, with an absolute allowance `uf_mean` on the
/// mean and `uf_var` on the variance for rounding in the subnormal range.
pub fn moments_oracle(
    x: &[f32],
    shape: Shape,
    mean: &[f32],
    variance: &[f32],
    uf_mean: f64,
    uf_var: f64,
) -> Result<(), Mismatch> {
    moments_oracle_with(x, shape, mean, variance, uf_mean, uf_var, &|_, _| 0.0)
}

/// [`moments_oracle`] with `extra(mean_ref, var_ref)` added to the variance
/// bound (the record merges' allowance beyond crate docs §3's range).
pub fn moments_oracle_with(
    x: &[f32],
    shape: Shape,
    mean: &[f32],
    variance: &[f32],
    uf_mean: f64,
    uf_var: f64,
    extra: &dyn Fn(f64, f64) -> f64,
) -> Result<(), Mismatch> {
    let first = reference::check_moments(x, shape, mean, variance);
    if first.is_ok() {
        return first;
    }
    for c in 0..shape.channels {
        let (m, v) = reference::channel_moments(x, shape, c);
        let (gm, gv) = (mean[c] as f64, variance[c] as f64);
        match reference::channel_domain(x, shape, c) {
            Domain::Huge => {}
            Domain::NonFinite => {
                if gm.is_finite() {
                    return reference::compare("mean", c, gm, f64::NAN, f64::NAN);
                }
                reference::compare("variance", c, gv, f64::NAN, 0.0)?;
            }
            Domain::Finite => {
                let mb = reference::mean_bound(m, v) + half_ulp(m) + uf_mean;
                reference::compare("mean", c, gm, m, mb)?;
                let vb =
                    reference::variance_rel_bound(m, v) * v + half_ulp(v) + uf_var + extra(m, v);
                reference::compare("variance", c, gv, v, vb)?;
            }
        }
    }
    Ok(())
}

/// The underflow allowance of the one-pass moments kernel's variance:
/// every `d²` rounded in the subnormal range is off by up to `2^-150`, so
/// `Σd² / n` by up to `2^-150`; doubled because the reference's slack is the
/// distance to its own rounding (a result on the other side of a rounding
/// midpoint is off by twice the computation's error), and doubled again
/// for margin: `2^-148`.
pub const MOMENTS_UF_VAR: f64 = 2.0 * SUBNORMAL;

/// `reference::check_normalize`, plus the underflow term of the folded
/// computation. `a` and `b` rounded to f32, the product `x a` and the sum
/// each add up to `2^-150` in the subnormal range (the first scaled by
/// `|x|`): `(|x| + 3) 2^-150`, doubled for the rounding-midpoint argument:
/// `(|x| + 3) 2^-149`. The skip rules are the reference's.
pub fn normalize_oracle(
    x: &[f32],
    shape: Shape,
    params: &Params<'_>,
    y: &[f32],
) -> Result<(), Mismatch> {
    let first = reference::check_normalize(x, shape, params, y);
    if first.is_ok() {
        return first;
    }
    let limit = f32::MAX as f64 / 2.0;
    for c in 0..shape.channels {
        let offset = params.offset.map_or(0.0, |o| o[c]);
        let (a, b) = reference::fold(
            params.mean[c],
            params.variance[c],
            params.scale.map_or(1.0, |s| s[c]),
            offset,
            params.epsilon,
        );
        // The reference's skip rule: `a` or `b` not a finite f32 (NaN too).
        let representable = |v: f64| v.abs() <= f32::MAX as f64;
        if !representable(a) || !representable(b) {
            continue;
        }
        for n in 0..shape.batch {
            for s in 0..shape.spatial {
                let i = reference::index(shape, n, s, c);
                let xa = x[i] as f64 * a;
                if xa.abs() + b.abs() >= limit {
                    continue;
                }
                let want = reference::activate(params.activation, xa + b);
                let bound = reference::normalize_bound(x[i], params.mean[c], a, offset)
                    + half_ulp(want)
                    + (x[i].abs() as f64 + 3.0) * SUBNORMAL;
                reference::compare("y", i, y[i] as f64, want, bound)?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// moments

/// `Simd::moments` on one decoded case against `reference::check_moments`.
pub fn check_moments(data: &[u8]) {
    let mut inp = Input::new(data);
    let simd = decode_simd(&mut inp);
    let shape = decode_shape(&mut inp);
    let off = inp.u8() as usize % 4;
    let mut gen = Gen::decode(&mut inp);
    let mut x = gen.tensor(shape);
    patch(&mut inp, gen.rng(), &mut x);
    let ctx = || format!("moments {simd:?} {shape:?} offset {off}");

    // A misaligned view of the data.
    let mut buf = sentinel(off);
    buf.extend_from_slice(&x);
    let xv = &buf[off..];

    let c = shape.channels;
    let (mut mean, mut var) = (sentinel(c), sentinel(c));
    let r = simd.moments(xv, shape, &mut mean, &mut var);
    if shape.batch * shape.spatial == 0 {
        assert_eq!(r, Err(Error::EmptyBatch), "{}", ctx());
        assert_untouched("mean", &mean, &sentinel(c), &ctx);
        assert_untouched("variance", &var, &sentinel(c), &ctx);
        return;
    }
    if let Err(e) = r {
        panic!("moments failed: {e}; {}", ctx());
    }
    if let Err(m) = moments_oracle(&x, shape, &mean, &var, 0.0, MOMENTS_UF_VAR) {
        fail(m, &ctx);
    }
}

// ---------------------------------------------------------------------------
// accumulate

/// `Simd::accumulate` over a random chunking of the batch (each chunk with
/// its own lane width), streamed into one set of records and, separately,
/// into one record set per chunk merged in a random order; both against the
/// one-pass records and the reference.
pub fn check_accumulate(data: &[u8]) {
    let mut inp = Input::new(data);
    let simd = decode_simd(&mut inp);
    let shape = decode_shape(&mut inp);
    let chunks = 1 + inp.u8() as usize % 8;
    let by_rows = inp.u8() & 1 == 1;
    let mut cut_bytes = [0u16; 8];
    let mut widths = [Simd::Scalar; 8];
    for i in 0..8 {
        cut_bytes[i] = inp.u16();
        widths[i] = decode_simd(&mut inp);
    }
    let order_seed = inp.u64();
    let mut gen = Gen::decode(&mut inp);
    let mut x = gen.tensor(shape);
    patch(&mut inp, gen.rng(), &mut x);
    let c = shape.channels;

    // Chunks along the batch (NCHW, or NHWC by images), or along rows of
    // an NHWC tensor (any split of `batch * spatial` rows).
    let (units, unit_shape) = match shape.layout {
        Layout::Nhwc if by_rows => (
            shape.batch * shape.spatial,
            Shape::nhwc(1, 1, shape.channels),
        ),
        _ => (shape.batch, Shape { batch: 1, ..shape }),
    };
    let unit_len = len_of(unit_shape);
    let mut cuts: Vec<usize> = (0..chunks - 1)
        .map(|i| cut_bytes[i] as usize % (units + 1))
        .collect();
    cuts.push(0);
    cuts.push(units);
    cuts.sort_unstable();
    let parts: Vec<(usize, usize)> = cuts.windows(2).map(|w| (w[0], w[1] - w[0])).collect();
    let ctx = || {
        format!(
            "accumulate {simd:?} {shape:?} parts {parts:?} widths {:?}",
            &widths[..parts.len()]
        )
    };

    // One pass.
    let mut whole = vec![Moments::EMPTY; c];
    simd.accumulate(&x, shape, &mut whole)
        .unwrap_or_else(|e| panic!("accumulate failed: {e}; {}", ctx()));
    let count = (shape.batch * shape.spatial) as u64;
    for (ch, m) in whole.iter().enumerate() {
        assert_eq!(m.count, count, "count[{ch}]; {}", ctx());
    }
    if count > 0 {
        // The one-pass record is the moments kernel's result: same mean bits.
        let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
        simd.moments(&x, shape, &mut mean, &mut var).unwrap();
        let rec_mean: Vec<f32> = whole.iter().map(|m| m.mean as f32).collect();
        assert_bits("one-pass record mean vs moments", &rec_mean, &mean, &ctx);
        check_records("one-pass", &x, shape, &whole, 1, &ctx);
    }

    // Streamed: chunk after chunk into the same records.
    let mut streamed = vec![Moments::EMPTY; c];
    let mut per_chunk = Vec::new();
    for (i, &(start, n)) in parts.iter().enumerate() {
        let chunk_shape = match shape.layout {
            Layout::Nhwc if by_rows => Shape::nhwc(n, 1, c),
            _ => Shape { batch: n, ..shape },
        };
        let xs = &x[start * unit_len..(start + n) * unit_len];
        let before = streamed.clone();
        widths[i]
            .accumulate(xs, chunk_shape, &mut streamed)
            .unwrap_or_else(|e| panic!("accumulate chunk {i} failed: {e}; {}", ctx()));
        if n == 0 {
            assert_eq!(
                record_bits(&before),
                record_bits(&streamed),
                "empty chunk changed records; {}",
                ctx()
            );
        }
        let mut own = vec![Moments::EMPTY; c];
        widths[i].accumulate(xs, chunk_shape, &mut own).unwrap();
        per_chunk.push(own);
    }
    for (ch, m) in streamed.iter().enumerate() {
        assert_eq!(m.count, count, "streamed count[{ch}]; {}", ctx());
    }
    if count > 0 {
        check_records("streamed", &x, shape, &streamed, parts.len(), &ctx);
    }

    // Merged in a random tree order.
    let mut rng = Rng::new(order_seed);
    while per_chunk.len() > 1 {
        let i = rng.below(per_chunk.len());
        let a = per_chunk.swap_remove(i);
        let j = rng.below(per_chunk.len());
        let b = &per_chunk[j];
        let merged: Vec<Moments> = if rng.below(2) == 0 {
            a.iter().zip(b).map(|(p, q)| p.merge(*q).unwrap()).collect()
        } else {
            b.iter()
                .zip(&a)
                .map(|(p, q)| p.merge(*q).unwrap())
                .collect()
        };
        per_chunk[j] = merged;
    }
    let merged = per_chunk.pop().unwrap();
    for (ch, m) in merged.iter().enumerate() {
        assert_eq!(m.count, count, "merged count[{ch}]; {}", ctx());
    }
    if count > 0 {
        check_records("merged", &x, shape, &merged, parts.len(), &ctx);
    }
}

/// Records against the reference: the crate docs' §3 bounds (`moments_oracle`)
/// on the mean and population variance, and the same relative bound on the
/// sample variance.
///
/// A record keeps the kernel's `f64` state, so streamed and merged records
/// are held to the bounds of one pass wherever they were split. (With `f32`
/// records the fuzzer had found, within a minute, 27 values `1e-3 ± 1e-9`,
/// `|mean| = 1.2e6 σ`, split 26 + 1, with the variance off by 1.5e-3.) In
/// the subnormal range each `f32` rounding of a chunk's input adds up to
/// `2^-150` absolute.
fn check_records(
    what: &str,
    x: &[f32],
    shape: Shape,
    recs: &[Moments],
    parts: usize,
    ctx: &dyn Fn() -> String,
) {
    let mean: Vec<f32> = recs.iter().map(|m| m.mean().unwrap() as f32).collect();
    let var: Vec<f32> = recs
        .iter()
        .map(|m| m.variance(Variance::Population).unwrap() as f32)
        .collect();
    let k = parts as f64;
    let (uf_mean, uf_var) = (k * SUBNORMAL, (k + 1.0) * MOMENTS_UF_VAR);
    if let Err(m) = moments_oracle_with(x, shape, &mean, &var, uf_mean, uf_var, &|_, _| 0.0) {
        panic!("{what}: oracle: {m}; {}", ctx());
    }
    let count = recs[0].count;
    for (c, r) in recs.iter().enumerate() {
        let sample = r.variance(Variance::Sample).unwrap() as f32 as f64;
        if reference::channel_domain(x, shape, c) != Domain::Finite {
            continue;
        }
        let (m, v) = reference::channel_moments(x, shape, c);
        let bessel = if count > 1 {
            count as f64 / (count - 1) as f64
        } else {
            1.0
        };
        let want = v * bessel;
        let bound = reference::variance_rel_bound(m, v) * want + half_ulp(want) + bessel * uf_var;
        if let Err(mm) = reference::compare("sample variance", c, sample, want, bound) {
            panic!("{what}: oracle: {mm}; {}", ctx());
        }
    }
}

// ---------------------------------------------------------------------------
// normalize / affine

/// Per-channel statistics for the normalize and backward checks: the
/// batch's own (rounded reference moments) when `param_mode & 1 == 0` and
/// the batch is not empty, else arbitrary values from the generator; with
/// `param_mode & 8`, arbitrary variances (signs and specials included).
fn decode_statistics(
    param_mode: u8,
    x: &[f32],
    shape: Shape,
    gen: &mut Gen,
) -> (Vec<f32>, Vec<f32>) {
    let c = shape.channels;
    let (mean, mut var) = if param_mode & 1 == 0 && shape.batch * shape.spatial > 0 {
        let (mut m, mut v) = (vec![0.0f64; c], vec![0.0f64; c]);
        reference::moments(x, shape, &mut m, &mut v);
        (
            m.iter().map(|&v| v as f32).collect::<Vec<f32>>(),
            v.iter().map(|&v| v as f32).collect::<Vec<f32>>(),
        )
    } else {
        let m = gen.params(c);
        let v = gen.params(c).iter().map(|v| v.abs()).collect();
        (m, v)
    };
    if param_mode & 8 != 0 {
        var = gen.params(c);
    }
    (mean, var)
}

/// `normalize`, `normalize_in_place`, `fold` + `affine`/`affine_in_place`
/// (bit for bit the same as `normalize`), and `affine` with arbitrary
/// coefficients, for every activation, against the reference.
pub fn check_normalize(data: &[u8]) {
    let mut inp = Input::new(data);
    let simd = decode_simd(&mut inp);
    let shape = decode_shape(&mut inp);
    let param_mode = inp.u8();
    let epsilon = decode_epsilon(&mut inp);
    let mut gen = Gen::decode(&mut inp);
    let activation = decode_activation(&mut inp, gen.rng());
    let mut x = gen.tensor(shape);
    let c = shape.channels;

    let (mean, var) = decode_statistics(param_mode, &x, shape, &mut gen);
    let scale_v = gen.params(c);
    let offset_v = gen.params(c);
    let scale = (param_mode & 2 != 0).then_some(&scale_v[..]);
    let offset = (param_mode & 4 != 0).then_some(&offset_v[..]);
    let ab_a = gen.params(c);
    let ab_b = gen.params(c);
    patch(&mut inp, gen.rng(), &mut x);
    let p = Params {
        mean: &mean,
        variance: &var,
        scale,
        offset,
        epsilon,
        activation,
    };
    let ctx = || format!("normalize {simd:?} {shape:?} eps {epsilon:e} {activation:?}");

    let len = x.len();
    let mut y = sentinel(len);
    simd.normalize(&x, &mut y, shape, &p)
        .unwrap_or_else(|e| panic!("normalize failed: {e}; {}", ctx()));
    let mut yb = sentinel_b(len);
    simd.normalize(&x, &mut yb, shape, &p).unwrap();
    assert_written("normalize y", &y, &yb, &ctx);
    if let Err(m) = normalize_oracle(&x, shape, &p, &y) {
        fail(m, &ctx);
    }

    let mut z = x.clone();
    simd.normalize_in_place(&mut z, shape, &p).unwrap();
    assert_bits("normalize_in_place vs normalize", &z, &y, &ctx);

    // fold: exactly the reference's f64 coefficients, rounded once.
    let (mut a, mut b) = (sentinel(c), sentinel(c));
    batchnorm::fold(&mean, &var, scale, offset, epsilon, &mut a, &mut b).unwrap();
    if let Err(m) = reference::check_fold(&p, &a, &b) {
        fail(m, &ctx);
    }
    let mut y2 = sentinel(len);
    simd.affine(&x, &mut y2, shape, &a, &b, activation).unwrap();
    assert_bits("affine(fold) vs normalize", &y2, &y, &ctx);
    let mut z2 = x.clone();
    simd.affine_in_place(&mut z2, shape, &a, &b, activation)
        .unwrap();
    assert_bits("affine_in_place(fold) vs normalize", &z2, &y, &ctx);

    // affine with arbitrary coefficients.
    let mut y3 = sentinel(len);
    simd.affine(&x, &mut y3, shape, &ab_a, &ab_b, activation)
        .unwrap();
    let mut y3b = sentinel_b(len);
    simd.affine(&x, &mut y3b, shape, &ab_a, &ab_b, activation)
        .unwrap();
    assert_written("affine y", &y3, &y3b, &ctx);
    check_affine(&x, shape, &ab_a, &ab_b, activation, &y3, &ctx);
    let mut z3 = x.clone();
    simd.affine_in_place(&mut z3, shape, &ab_a, &ab_b, activation)
        .unwrap();
    assert_bits("affine_in_place vs affine", &z3, &y3, &ctx);
}

/// `y = act(x a + b)` with given `a`, `b` against f64: with the coefficients
/// exact, the crate docs' §3 normalize bound reads `4 ε (|x a| + |b|)`
/// (`|b| <= |mean a| + |offset|`). Elements where `|x a| + |b|` reaches
/// `f32::MAX / 2` are not checked (as in `reference::check_normalize`).
fn check_affine(
    x: &[f32],
    shape: Shape,
    a: &[f32],
    b: &[f32],
    act: Activation,
    y: &[f32],
    ctx: &dyn Fn() -> String,
) {
    let limit = f32::MAX as f64 / 2.0;
    for c in 0..shape.channels {
        let (ac, bc) = (a[c] as f64, b[c] as f64);
        for n in 0..shape.batch {
            for s in 0..shape.spatial {
                let i = reference::index(shape, n, s, c);
                let xa = x[i] as f64 * ac;
                if xa.abs() + bc.abs() >= limit {
                    continue;
                }
                let want = reference::activate(act, xa + bc);
                // Underflow: the product and the sum each up to 2^-150,
                // doubled for the rounding midpoint.
                let bound = 4.0 * EPS * (xa.abs() + bc.abs()) + half_ulp(want) + 2.0 * SUBNORMAL;
                if let Err(m) = reference::compare("affine y", i, y[i] as f64, want, bound) {
                    fail(m, ctx);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// train

/// The presets, each as the framework has it, plus an activation and
/// (sometimes) another epsilon.
fn decode_config(inp: &mut Input, rng: &mut Rng) -> Config {
    let base = match inp.u8() % 10 {
        0 => Config::keras(),
        1 => Config::tf_fused(inp.pick(&[0.01, 0.1, 0.5, 1.0, 0.0, 0.7, 0.999])),
        2 => Config::tf_fused((inp.u16() as f32) / 65535.0),
        3 => Config::tf_layers(true),
        4 => Config::tf_layers(false),
        5 => Config::pytorch(),
        6 => Config::pytorch_momentum(None),
        7 => Config::pytorch_momentum(Some(inp.pick(&[0.1, 0.01, 1.0, 0.0, 0.3]))),
        8 => Config::onnx(),
        _ => Config {
            epsilon: 1e-3,
            momentum: Momentum::Decay((inp.u16() as f32) / 65535.0),
            moving_variance: if inp.u8() & 1 == 0 {
                Variance::Population
            } else {
                Variance::Sample
            },
            activation: Activation::None,
        },
    };
    let base = if inp.u8() & 3 == 0 {
        base.with_epsilon(decode_epsilon(inp))
    } else {
        base
    };
    base.with_activation(decode_activation(inp, rng))
}

/// `BatchNorm::train` for one to three steps with each preset: the batch
/// statistics against `reference::check_moments`, the output against
/// `reference::check_normalize` with those statistics, the moving statistics
/// against `reference::update_moving`, and bit-equality with the separate
/// kernels and with `train_in_place`; then `infer` against the reference
/// with the moving statistics.
pub fn check_train(data: &[u8]) {
    let mut inp = Input::new(data);
    let simd = decode_simd(&mut inp);
    let shape = decode_shape(&mut inp);
    let steps = 1 + inp.u8() as usize % 3;
    let batches: Vec<usize> = (0..steps)
        .map(|k| match inp.u8() % 4 {
            _ if k == 0 => shape.batch,
            0 => shape.batch,
            1 => 0,
            _ => shape.batch / 2 + 1,
        })
        .collect();
    let flags = inp.u8();
    let mut gen = Gen::decode(&mut inp);
    let config = decode_config(&mut inp, gen.rng());
    let c = shape.channels;
    let scale_v = gen.params(c);
    let offset_v = gen.params(c);
    let scale = (flags & 1 != 0).then_some(&scale_v[..]);
    let offset = (flags & 2 != 0).then_some(&offset_v[..]);
    let (mut mm, mut mv) = if flags & 4 != 0 {
        (
            gen.params(c),
            gen.params(c).iter().map(|v| v.abs()).collect(),
        )
    } else {
        (vec![0.0f32; c], vec![1.0f32; c])
    };
    let (mut mm2, mut mv2) = (mm.clone(), mv.clone());
    let (mut bm, mut bv) = (sentinel(c), sentinel(c));
    let (mut bm2, mut bv2) = (sentinel(c), sentinel(c));
    let mut xs: Vec<Vec<f32>> = batches
        .iter()
        .map(|&n| gen.tensor(Shape { batch: n, ..shape }))
        .collect();
    for x in xs.iter_mut() {
        let mut at = Input::new(&data[inp.pos.min(data.len())..]);
        patch(&mut at, gen.rng(), x);
    }
    let x_infer = gen.tensor(shape);
    let ctx = || format!("train {simd:?} {shape:?} batches {batches:?} {config:?}");

    let so = ScaleOffset { scale, offset };
    let mut bn = BatchNorm::new(config, moving(&mut mm, &mut mv))
        .unwrap()
        .with_simd(simd);
    let mut twin = BatchNorm::new(config, moving(&mut mm2, &mut mv2))
        .unwrap()
        .with_simd(simd);

    let mut taken = 0u64;
    for (k, x) in xs.iter().enumerate() {
        let sh = Shape {
            batch: batches[k],
            ..shape
        };
        let ctx = || format!("step {k} of {}", ctx());
        let prev_m = bn.moving().mean.to_vec();
        let prev_v = bn.moving().variance.to_vec();
        let (prev_bm, prev_bv) = (bm.clone(), bv.clone());
        let mut y = sentinel(x.len());
        let r = bn.train(x, &mut y, sh, so, &mut batch(&mut bm, &mut bv));
        let mut z = x.clone();
        let r2 = twin.train_in_place(&mut z, sh, so, &mut batch(&mut bm2, &mut bv2));
        if sh.batch * sh.spatial == 0 {
            assert_eq!(r, Err(Error::EmptyBatch), "{}", ctx());
            assert_eq!(r2, Err(Error::EmptyBatch), "{}", ctx());
            assert_untouched("moving mean", bn.moving().mean, &prev_m, &ctx);
            assert_untouched("moving variance", bn.moving().variance, &prev_v, &ctx);
            assert_untouched("batch mean", &bm, &prev_bm, &ctx);
            assert_untouched("batch variance", &bv, &prev_bv, &ctx);
            assert_eq!(bn.moving().batches, taken, "{}", ctx());
            continue;
        }
        r.unwrap_or_else(|e| panic!("train failed: {e}; {}", ctx()));
        r2.unwrap_or_else(|e| panic!("train_in_place failed: {e}; {}", ctx()));
        taken += 1;
        assert_eq!(bn.moving().batches, taken, "{}", ctx());

        // Batch statistics: the oracle, and the moments kernel bit for bit.
        if let Err(m) = moments_oracle(x, sh, &bm, &bv, 0.0, MOMENTS_UF_VAR) {
            fail(m, &ctx);
        }
        let (mut km, mut kv) = (vec![0.0; c], vec![0.0; c]);
        simd.moments(x, sh, &mut km, &mut kv).unwrap();
        assert_bits("batch mean vs moments", &bm, &km, &ctx);
        assert_bits("batch variance vs moments", &bv, &kv, &ctx);

        // Output: normalized with the batch statistics.
        let p = Params {
            mean: &bm,
            variance: &bv,
            scale,
            offset,
            epsilon: config.epsilon,
            activation: config.activation,
        };
        if let Err(m) = normalize_oracle(x, sh, &p, &y) {
            fail(m, &ctx);
        }
        let mut y2 = sentinel_b(x.len());
        simd.normalize(x, &mut y2, sh, &p).unwrap();
        assert_written("train y", &y, &y2, &ctx);
        assert_bits("train y vs normalize", &y, &y2, &ctx);

        // Moving statistics.
        let count = (sh.batch * sh.spatial) as u64;
        for ch in 0..c {
            let domain = reference::channel_domain(x, sh, ch);
            check_moving(
                ch,
                (prev_m[ch], prev_v[ch]),
                (bm[ch], bv[ch]),
                (bn.moving().mean[ch], bn.moving().variance[ch]),
                count,
                taken,
                &config,
                domain,
                &ctx,
            );
        }
        let (mut um, mut uv) = (prev_m.clone(), prev_v.clone());
        let mut upd = MovingStats {
            mean: &mut um,
            variance: &mut uv,
            batches: taken - 1,
        };
        batchnorm::update_moving(&bm, &bv, count, &config, &mut upd).unwrap();
        assert_eq!(upd.batches, taken, "{}", ctx());
        assert_bits("moving mean vs update_moving", bn.moving().mean, &um, &ctx);
        assert_bits(
            "moving variance vs update_moving",
            bn.moving().variance,
            &uv,
            &ctx,
        );

        // train_in_place: the same state and output.
        assert_bits("train_in_place y", &z, &y, &ctx);
        assert_bits(
            "twin moving mean",
            twin.moving().mean,
            bn.moving().mean,
            &ctx,
        );
        assert_bits(
            "twin moving var",
            twin.moving().variance,
            bn.moving().variance,
            &ctx,
        );
        assert_bits("twin batch mean", &bm2, &bm, &ctx);
        assert_bits("twin batch var", &bv2, &bv, &ctx);
    }

    // Inference with the moving statistics.
    let mut y = sentinel(x_infer.len());
    bn.infer(&x_infer, &mut y, shape, so)
        .unwrap_or_else(|e| panic!("infer failed: {e}; {}", ctx()));
    let mut yb = sentinel_b(x_infer.len());
    bn.infer(&x_infer, &mut yb, shape, so).unwrap();
    assert_written("infer y", &y, &yb, &ctx);
    let p = Params {
        mean: bn.moving().mean,
        variance: bn.moving().variance,
        scale,
        offset,
        epsilon: config.epsilon,
        activation: config.activation,
    };
    if let Err(m) = normalize_oracle(&x_infer, shape, &p, &y) {
        panic!("infer: oracle: {m}; {}", ctx());
    }
    let mut z = x_infer.clone();
    bn.infer_in_place(&mut z, shape, so).unwrap();
    assert_bits("infer_in_place vs infer", &z, &y, &ctx);

    // The owned twin for three channels runs the same code (with the
    // detected width, unit scale and zero offset), and a frozen copy of
    // its state infers through `&self` with the same bits.
    if c == 3 && simd == Simd::detect() && scale.is_none() && offset.is_none() && flags & 4 == 0 {
        let mut arr = BatchNormArray::<3>::new(config);
        for (k, x) in xs.iter().enumerate() {
            let sh = Shape {
                batch: batches[k],
                ..shape
            };
            let mut y = sentinel(x.len());
            let _ = arr.train(x, &mut y, sh);
        }
        assert_eq!(arr.batches, taken, "{}", ctx());
        assert_bits(
            "array moving mean",
            &arr.moving_mean,
            bn.moving().mean,
            &ctx,
        );
        assert_bits(
            "array moving var",
            &arr.moving_variance,
            bn.moving().variance,
            &ctx,
        );
        let frozen = &arr;
        let mut ya = sentinel(x_infer.len());
        frozen.infer(&x_infer, &mut ya, shape).unwrap();
        assert_bits("array infer vs layer infer", &ya, &y, &ctx);
    }
}

fn moving<'a>(mean: &'a mut [f32], variance: &'a mut [f32]) -> MovingStats<'a> {
    MovingStats {
        mean,
        variance,
        batches: 0,
    }
}

fn batch<'a>(mean: &'a mut [f32], variance: &'a mut [f32]) -> Batch<'a> {
    Batch { mean, variance }
}

/// One channel's moving statistics against `reference::update_moving`
/// (computed from the previous moving statistics and the layer's own batch
/// statistics). The f32 update `m d + b w` (with `w = 1 - d` and the Bessel
/// factor each rounded to f32) has at most five roundings of terms bounded
/// by `|m d| + |b bessel w|`; with the final rounding counted through the
/// reference's half ulp, `6 ε (|m d| + |b bessel w|)` bounds it, plus
/// `2^-147` for the absolute error of rounding in the subnormal range.
/// NaN and infinities are compared by class first. Not checked: a channel
/// whose batch is beyond `MAX_MAGNITUDE` (no numerical promise), and terms
/// within a factor 4 of `f32::MAX` (the f32 sum may overflow where the f64
/// one does not).
#[allow(clippy::too_many_arguments)]
fn check_moving(
    ch: usize,
    prev: (f32, f32),
    batch: (f32, f32),
    got: (f32, f32),
    count: u64,
    batches: u64,
    config: &Config,
    domain: Domain,
    ctx: &dyn Fn() -> String,
) {
    if domain == Domain::Huge {
        return;
    }
    let (wm, wv) = reference::update_moving(prev, batch, count, batches, config);
    let d = config.momentum.decay(batches) as f64;
    let w = 1.0 - d;
    let bessel = match config.moving_variance {
        Variance::Sample if count > 1 => count as f64 / (count - 1) as f64,
        _ => 1.0,
    };
    let tiny = 2f64.powi(-147);
    let check = |what, got: f32, want: f64, terms: [f64; 2]| {
        let got = got as f64;
        let t = terms[0].abs() + terms[1].abs();
        if !(want.is_finite() && got.is_finite()) {
            if let Err(m) = reference::compare(what, ch, got, want, f64::NAN) {
                fail(m, ctx);
            }
            return;
        }
        if !(t <= f32::MAX as f64 / 4.0) {
            return;
        }
        let bound = 6.0 * EPS * t + tiny + half_ulp(want);
        if let Err(m) = reference::compare(what, ch, got, want, bound) {
            fail(m, ctx);
        }
    };
    check(
        "moving mean",
        got.0,
        wm,
        [prev.0 as f64 * d, batch.0 as f64 * w],
    );
    check(
        "moving variance",
        got.1,
        wv,
        [prev.1 as f64 * d, batch.1 as f64 * bessel * w],
    );
}

// ---------------------------------------------------------------------------
// bad input

// ---------------------------------------------------------------------------
// backward

/// `Simd::backward` and `backward_in_place` on one decoded case against
/// `reference::check_backward`: both modes, every activation, the batch's
/// own statistics or arbitrary ones, specials in `x`, `dy` and the
/// parameters. The two entry points must agree bit for bit (NaN aside) and
/// write every output.
pub fn check_backward(data: &[u8]) {
    let mut inp = Input::new(data);
    let simd = decode_simd(&mut inp);
    let shape = decode_shape(&mut inp);
    let param_mode = inp.u8();
    let mode = if param_mode & 16 == 0 {
        Mode::Training
    } else {
        Mode::Inference
    };
    let epsilon = decode_epsilon(&mut inp);
    let mut gen = Gen::decode(&mut inp);
    let activation = decode_activation(&mut inp, gen.rng());
    let mut x = gen.tensor(shape);
    let mut dy = gen.tensor(shape);
    let c = shape.channels;
    let count = shape.batch * shape.spatial;
    let (mean, var) = decode_statistics(param_mode, &x, shape, &mut gen);
    let scale_v = gen.params(c);
    let offset_v = gen.params(c);
    let scale = (param_mode & 2 != 0).then_some(&scale_v[..]);
    let offset = (param_mode & 4 != 0).then_some(&offset_v[..]);
    if param_mode & 32 != 0 {
        patch(&mut inp, gen.rng(), &mut dy);
    } else {
        patch(&mut inp, gen.rng(), &mut x);
    }
    let p = Params {
        mean: &mean,
        variance: &var,
        scale,
        offset,
        epsilon,
        activation,
    };
    let ctx = || format!("backward {simd:?} {shape:?} {mode:?} eps {epsilon:e} {activation:?}");
    let len = x.len();
    let run = |dx: &mut [f32], ds: &mut [f32], dof: &mut [f32]| {
        let g = Gradients {
            dx,
            dscale: ds,
            doffset: dof,
        };
        simd.backward(&x, &dy, shape, &p, mode, g)
    };
    let (mut dx, mut ds, mut dof) = (sentinel(len), sentinel(c), sentinel(c));
    let r = run(&mut dx, &mut ds, &mut dof);
    if count == 0 && mode == Mode::Training {
        expect_err(r, &same_err(Error::EmptyBatch), "backward", &ctx);
        assert_untouched("dscale", &ds, &sentinel(c), &ctx);
        assert_untouched("doffset", &dof, &sentinel(c), &ctx);
        return;
    }
    r.unwrap_or_else(|e| panic!("backward failed: {e}; {}", ctx()));
    let (mut dxb, mut dsb, mut dofb) = (sentinel_b(len), sentinel_b(c), sentinel_b(c));
    run(&mut dxb, &mut dsb, &mut dofb).unwrap();
    assert_written("dx", &dx, &dxb, &ctx);
    assert_written("dscale", &ds, &dsb, &ctx);
    assert_written("doffset", &dof, &dofb, &ctx);
    if let Err(m) = reference::check_backward(&x, &dy, shape, &p, mode, &dx, &ds, &dof) {
        fail(m, &ctx);
    }
    let mut z = dy.clone();
    let (mut ds2, mut dof2) = (sentinel(c), sentinel(c));
    simd.backward_in_place(&x, &mut z, shape, &p, mode, &mut ds2, &mut dof2)
        .unwrap();
    assert_bits("backward_in_place dx", &z, &dx, &ctx);
    assert_bits("backward_in_place dscale", &ds2, &ds, &ctx);
    assert_bits("backward_in_place doffset", &dof2, &dof, &ctx);
}

fn bad_epsilon(inp: &mut Input) -> f32 {
    inp.pick(&[
        -1e-3,
        -f32::MIN_POSITIVE,
        -f32::from_bits(1),
        f32::NAN,
        -f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        -1.0,
        f32::MIN,
    ])
}

fn bad_decay(inp: &mut Input) -> f32 {
    inp.pick(&[
        -0.01,
        f32::from_bits(1.0f32.to_bits() + 1),
        -f32::from_bits(1),
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        2.0,
        -1.0,
    ])
}

/// A config rejected for its decay: a raw decay, or a framework argument
/// that maps outside `[0, 1]`.
fn bad_decay_config(inp: &mut Input) -> Config {
    match inp.u8() % 5 {
        0 => Config::tf_fused(2.0),
        1 => Config::tf_fused(inp.pick(&[-0.5, f32::NAN, f32::INFINITY])),
        2 => Config::pytorch_momentum(Some(inp.pick(&[1.5, -0.1, f32::NAN]))),
        _ => Config {
            momentum: Momentum::Decay(bad_decay(inp)),
            ..Config::keras()
        },
    }
}

fn bad_clamp(inp: &mut Input) -> Activation {
    let (min, max) = inp.pick(&[
        (1.0, 0.0),
        (f32::NAN, 0.0),
        (0.0, f32::NAN),
        (f32::NAN, f32::NAN),
        (f32::INFINITY, f32::NEG_INFINITY),
        (f32::from_bits(1), 0.0),
        (6.0, -6.0),
    ]);
    Activation::Clamp { min, max }
}

/// A wrong length for a buffer that should have `len` elements.
fn wrong_len(inp: &mut Input, len: usize) -> usize {
    match inp.u8() % 4 {
        0 if len > 0 => len - 1,
        1 => len + 1,
        2 if len > 0 => 0,
        _ => len + 2 + inp.u8() as usize,
    }
}

/// A shape no kernel accepts whatever the slices: zero channels, or a
/// product that overflows `usize`, with the error it must give.
fn bad_shape(inp: &mut Input, layout: Layout, c: usize) -> (Shape, Error) {
    let k = inp.u8();
    let sh = match k % 5 {
        0 => Shape {
            layout,
            batch: 1 + inp.u8() as usize,
            spatial: 1 + inp.u8() as usize,
            channels: 0,
        },
        1 => Shape {
            layout,
            batch: 0,
            spatial: usize::MAX,
            channels: 0,
        },
        2 => Shape {
            layout,
            batch: usize::MAX,
            spatial: 2 + inp.u8() as usize,
            channels: c,
        },
        3 => Shape {
            layout,
            batch: usize::MAX / 4 + 1 + inp.u8() as usize,
            spatial: 1,
            channels: 4 + c,
        },
        // `batch * spatial` is 2^(bits - 1) on every `usize` width (2^63
        // on 64-bit targets), so twice that overflows.
        _ => Shape {
            layout,
            batch: 1 << (usize::BITS / 2),
            spatial: 1 << (usize::BITS / 2 - 1),
            channels: 2 + c,
        },
    };
    let err = if sh.channels == 0 {
        Error::ZeroChannels
    } else {
        Error::ShapeOverflow {
            batch: sh.batch,
            spatial: sh.spatial,
            channels: sh.channels,
        }
    };
    (sh, err)
}

fn is_length(e: &Error, name: &str, expected: usize, actual: usize) -> bool {
    matches!(*e, Error::Length { what, expected: x, actual: a } if what == name && x == expected && a == actual)
}

/// Asserts `r` is the error `ok(e)` accepts.
fn expect_err<T: core::fmt::Debug>(
    r: Result<T, Error>,
    ok: &dyn Fn(&Error) -> bool,
    what: &str,
    ctx: &dyn Fn() -> String,
) {
    match r {
        Err(e) if ok(&e) => {}
        other => panic!("{what}: unexpected result {other:?}; {}", ctx()),
    }
}

fn length_err(name: &'static str, expected: usize, actual: usize) -> impl Fn(&Error) -> bool {
    move |e: &Error| is_length(e, name, expected, actual)
}

fn same_err(want: Error) -> impl Fn(&Error) -> bool {
    move |e: &Error| match (e, &want) {
        // NaN payloads make `==` false; compare the variant and the bits.
        (Error::Epsilon(a), Error::Epsilon(b)) | (Error::Decay(a), Error::Decay(b)) => {
            a.to_bits() == b.to_bits()
        }
        (Error::Clamp { min, max }, Error::Clamp { min: a, max: b }) => {
            min.to_bits() == a.to_bits() && max.to_bits() == b.to_bits()
        }
        _ => *e == want,
    }
}

/// Every error path with exactly one thing wrong: the call must return the
/// error that names it (expected vs actual for lengths) and leave every
/// output buffer and every piece of state bit for bit unchanged. Each case
/// also runs the corrected call once, which must succeed.
pub fn check_bad_input(data: &[u8]) {
    let mut inp = Input::new(data);
    let simd = decode_simd(&mut inp);
    let layout = if inp.u8() & 1 == 0 {
        Layout::Nhwc
    } else {
        Layout::Nchw
    };
    let n = 1 + inp.u8() as usize % 5;
    let s = 1 + inp.u8() as usize % 5;
    let c = 1 + inp.u8() as usize % 6;
    let shape = Shape {
        layout,
        batch: n,
        spatial: s,
        channels: c,
    };
    let len = n * s * c;
    let api = inp.u8() % 18;
    let defect = inp.u8();
    let ctx = || format!("bad_input api {api} defect {defect} {simd:?} {shape:?}");
    let mut rng = Rng::new(inp.u64());
    let x: Vec<f32> = (0..len).map(|_| rng.normal() as f32).collect();
    let pc = |rng: &mut Rng| -> Vec<f32> { (0..c).map(|_| 1.0 + rng.uniform() as f32).collect() };
    let (mean, var, scale, offset) = (pc(&mut rng), pc(&mut rng), pc(&mut rng), pc(&mut rng));
    let params = |activation| Params {
        mean: &mean,
        variance: &var,
        scale: Some(&scale),
        offset: Some(&offset),
        epsilon: 1e-3,
        activation,
    };

    match api {
        // moments
        0 => {
            let (mut lx, mut lm, mut lv, mut sh) = (len, c, c, shape);
            let want: Box<dyn Fn(&Error) -> bool> = match defect % 5 {
                0 => {
                    lx = wrong_len(&mut inp, len);
                    Box::new(length_err("x", len, lx))
                }
                1 => {
                    lm = wrong_len(&mut inp, c);
                    Box::new(length_err("mean", c, lm))
                }
                2 => {
                    lv = wrong_len(&mut inp, c);
                    Box::new(length_err("variance", c, lv))
                }
                3 => {
                    let (b, e) = bad_shape(&mut inp, layout, c);
                    sh = b;
                    lx = 0;
                    Box::new(same_err(e))
                }
                _ => {
                    // count 0: nothing to take statistics of.
                    sh = if inp.u8() & 1 == 0 {
                        Shape { batch: 0, ..shape }
                    } else {
                        Shape {
                            spatial: 0,
                            ..shape
                        }
                    };
                    lx = 0;
                    Box::new(same_err(Error::EmptyBatch))
                }
            };
            let xs = sentinel(lx);
            let (mut m, mut v) = (sentinel(lm), sentinel(lv));
            expect_err(
                simd.moments(&xs, sh, &mut m, &mut v),
                &*want,
                "moments",
                &ctx,
            );
            assert_untouched("mean", &m, &sentinel(lm), &ctx);
            assert_untouched("variance", &v, &sentinel(lv), &ctx);
            let (mut m, mut v) = (sentinel(c), sentinel(c));
            simd.moments(&x, shape, &mut m, &mut v).unwrap();
        }
        // accumulate
        1 => {
            let mut recs = vec![Moments::EMPTY; c];
            simd.accumulate(&x, shape, &mut recs).unwrap();
            let before = recs.clone();
            match defect % 4 {
                0 => {
                    let lx = wrong_len(&mut inp, len);
                    let r = simd.accumulate(&sentinel(lx), shape, &mut recs);
                    expect_err(r, &length_err("x", len, lx), "accumulate", &ctx);
                }
                1 => {
                    let li = wrong_len(&mut inp, c);
                    let mut other = vec![Moments::EMPTY; li];
                    for (i, m) in other.iter_mut().enumerate() {
                        *m = before[i % c];
                    }
                    let keep = other.clone();
                    let r = simd.accumulate(&x, shape, &mut other);
                    expect_err(r, &length_err("into", c, li), "accumulate", &ctx);
                    assert_eq!(
                        record_bits(&other),
                        record_bits(&keep),
                        "records changed; {}",
                        ctx()
                    );
                }
                2 => {
                    let (sh, e) = bad_shape(&mut inp, layout, c);
                    let r = simd.accumulate(&[], sh, &mut recs);
                    expect_err(r, &same_err(e), "accumulate", &ctx);
                }
                _ => {
                    // An empty chunk is fine and changes nothing.
                    let sh = if inp.u8() & 1 == 0 {
                        Shape { batch: 0, ..shape }
                    } else {
                        Shape {
                            spatial: 0,
                            ..shape
                        }
                    };
                    simd.accumulate(&[], sh, &mut recs)
                        .unwrap_or_else(|e| panic!("empty chunk: {e}; {}", ctx()));
                }
            }
            assert_eq!(
                record_bits(&recs),
                record_bits(&before),
                "records changed; {}",
                ctx()
            );
            // Empty records refuse statistics.
            assert_eq!(Moments::EMPTY.mean(), Err(Error::EmptyBatch));
            assert_eq!(
                Moments::EMPTY.variance(Variance::Population),
                Err(Error::EmptyBatch)
            );
            assert_eq!(
                Moments::EMPTY.variance(Variance::Sample),
                Err(Error::EmptyBatch)
            );
        }
        // fold
        2 => {
            let (mut lv, mut ls, mut lo, mut la, mut lb) = (c, c, c, c, c);
            let mut eps = 1e-3;
            let mut m = mean.clone();
            let want: Box<dyn Fn(&Error) -> bool> = match defect % 7 {
                0 => {
                    lv = wrong_len(&mut inp, c);
                    Box::new(length_err("variance", c, lv))
                }
                1 => {
                    ls = wrong_len(&mut inp, c);
                    Box::new(length_err("scale", c, ls))
                }
                2 => {
                    lo = wrong_len(&mut inp, c);
                    Box::new(length_err("offset", c, lo))
                }
                3 => {
                    la = wrong_len(&mut inp, c);
                    Box::new(length_err("a", c, la))
                }
                4 => {
                    lb = wrong_len(&mut inp, c);
                    Box::new(length_err("b", c, lb))
                }
                5 => {
                    eps = bad_epsilon(&mut inp);
                    Box::new(same_err(Error::Epsilon(eps)))
                }
                _ => {
                    m.clear();
                    (lv, ls, lo, la, lb) = (0, 0, 0, 0, 0);
                    Box::new(same_err(Error::ZeroChannels))
                }
            };
            let (v, sc, of) = (vec![1.0; lv], vec![1.0; ls], vec![0.0; lo]);
            let (mut a, mut b) = (sentinel(la), sentinel(lb));
            let r = batchnorm::fold(&m, &v, Some(&sc), Some(&of), eps, &mut a, &mut b);
            expect_err(r, &*want, "fold", &ctx);
            assert_untouched("a", &a, &sentinel(la), &ctx);
            assert_untouched("b", &b, &sentinel(lb), &ctx);
        }
        // affine, affine_in_place
        3 | 4 => {
            let in_place = api == 4;
            let (mut lx, mut ly, mut la, mut lb, mut sh) = (len, len, c, c, shape);
            let mut act = Activation::Relu;
            let want: Box<dyn Fn(&Error) -> bool> = match defect % 6 {
                0 => {
                    lx = wrong_len(&mut inp, len);
                    Box::new(length_err("x", len, lx))
                }
                1 if !in_place => {
                    ly = wrong_len(&mut inp, len);
                    Box::new(length_err("y", len, ly))
                }
                2 => {
                    la = wrong_len(&mut inp, c);
                    Box::new(length_err("a", c, la))
                }
                3 => {
                    lb = wrong_len(&mut inp, c);
                    Box::new(length_err("b", c, lb))
                }
                4 => {
                    let (b, e) = bad_shape(&mut inp, layout, c);
                    sh = b;
                    lx = 0;
                    ly = 0;
                    Box::new(same_err(e))
                }
                _ => {
                    act = bad_clamp(&mut inp);
                    let Activation::Clamp { min, max } = act else {
                        unreachable!()
                    };
                    Box::new(same_err(Error::Clamp { min, max }))
                }
            };
            let (a, b) = (vec![2.0; la], vec![1.0; lb]);
            if in_place {
                let mut xs = sentinel(lx);
                let r = simd.affine_in_place(&mut xs, sh, &a, &b, act);
                expect_err(r, &*want, "affine_in_place", &ctx);
                assert_untouched("x", &xs, &sentinel(lx), &ctx);
            } else {
                let mut y = sentinel(ly);
                let r = simd.affine(&sentinel(lx), &mut y, sh, &a, &b, act);
                expect_err(r, &*want, "affine", &ctx);
                assert_untouched("y", &y, &sentinel(ly), &ctx);
            }
        }
        // normalize, normalize_in_place
        5 | 6 => {
            let in_place = api == 6;
            let (mut lx, mut ly, mut sh) = (len, len, shape);
            let (mut lm, mut lv, mut ls, mut lo) = (c, c, c, c);
            let mut eps = 1e-3;
            let mut act = Activation::None;
            let want: Box<dyn Fn(&Error) -> bool> = match defect % 9 {
                0 => {
                    lx = wrong_len(&mut inp, len);
                    Box::new(length_err("x", len, lx))
                }
                1 if !in_place => {
                    ly = wrong_len(&mut inp, len);
                    Box::new(length_err("y", len, ly))
                }
                2 => {
                    lm = wrong_len(&mut inp, c);
                    Box::new(length_err("mean", c, lm))
                }
                3 => {
                    lv = wrong_len(&mut inp, c);
                    Box::new(length_err("variance", c, lv))
                }
                4 => {
                    ls = wrong_len(&mut inp, c);
                    Box::new(length_err("scale", c, ls))
                }
                5 => {
                    lo = wrong_len(&mut inp, c);
                    Box::new(length_err("offset", c, lo))
                }
                6 => {
                    let (b, e) = bad_shape(&mut inp, layout, c);
                    sh = b;
                    lx = 0;
                    ly = 0;
                    Box::new(same_err(e))
                }
                7 => {
                    eps = bad_epsilon(&mut inp);
                    Box::new(same_err(Error::Epsilon(eps)))
                }
                _ => {
                    act = bad_clamp(&mut inp);
                    let Activation::Clamp { min, max } = act else {
                        unreachable!()
                    };
                    Box::new(same_err(Error::Clamp { min, max }))
                }
            };
            let (m, v, sc, of) = (vec![0.0; lm], vec![1.0; lv], vec![1.0; ls], vec![0.0; lo]);
            let p = Params {
                mean: &m,
                variance: &v,
                scale: Some(&sc),
                offset: Some(&of),
                epsilon: eps,
                activation: act,
            };
            if in_place {
                let mut xs = sentinel(lx);
                let r = simd.normalize_in_place(&mut xs, sh, &p);
                expect_err(r, &*want, "normalize_in_place", &ctx);
                assert_untouched("x", &xs, &sentinel(lx), &ctx);
            } else {
                let mut y = sentinel(ly);
                let r = simd.normalize(&sentinel(lx), &mut y, sh, &p);
                expect_err(r, &*want, "normalize", &ctx);
                assert_untouched("y", &y, &sentinel(ly), &ctx);
            }
            // The valid call, and an empty batch, are fine.
            let mut y = sentinel(len);
            simd.normalize(&x, &mut y, shape, &params(Activation::Relu6))
                .unwrap();
            let mut y = sentinel(0);
            simd.normalize(
                &[],
                &mut y,
                Shape { batch: 0, ..shape },
                &params(Activation::None),
            )
            .unwrap();
        }
        // update_moving
        7 => {
            let (mut lv, mut lbm, mut lbv, mut lm) = (c, c, c, c);
            let mut count = len as u64;
            let mut config = Config::pytorch();
            let want: Box<dyn Fn(&Error) -> bool> = match defect % 8 {
                0 => {
                    lv = wrong_len(&mut inp, c);
                    Box::new(length_err("moving.variance", c, lv))
                }
                1 => {
                    lbm = wrong_len(&mut inp, c);
                    Box::new(length_err("batch_mean", c, lbm))
                }
                2 => {
                    lbv = wrong_len(&mut inp, c);
                    Box::new(length_err("batch_variance", c, lbv))
                }
                3 => {
                    (lm, lv, lbm, lbv) = (0, 0, 0, 0);
                    Box::new(same_err(Error::ZeroChannels))
                }
                4 => {
                    count = 0;
                    Box::new(same_err(Error::EmptyBatch))
                }
                5 => {
                    config.epsilon = bad_epsilon(&mut inp);
                    Box::new(same_err(Error::Epsilon(config.epsilon)))
                }
                6 => {
                    config = bad_decay_config(&mut inp);
                    let Momentum::Decay(d) = config.momentum else {
                        unreachable!()
                    };
                    Box::new(same_err(Error::Decay(d)))
                }
                _ => {
                    config.activation = bad_clamp(&mut inp);
                    let Activation::Clamp { min, max } = config.activation else {
                        unreachable!()
                    };
                    Box::new(same_err(Error::Clamp { min, max }))
                }
            };
            let (mut mm, mut mv) = (sentinel(lm), sentinel(lv));
            let (bm, bv) = (vec![1.0; lbm], vec![1.0; lbv]);
            let mut moving = MovingStats {
                mean: &mut mm,
                variance: &mut mv,
                batches: 3,
            };
            let r = batchnorm::update_moving(&bm, &bv, count, &config, &mut moving);
            expect_err(r, &*want, "update_moving", &ctx);
            assert_eq!(moving.batches, 3, "batches counted on error; {}", ctx());
            assert_untouched("moving mean", &mm, &sentinel(lm), &ctx);
            assert_untouched("moving variance", &mv, &sentinel(lv), &ctx);
        }
        // BatchNorm::new, and a training step's batch and parameter lengths
        8 | 9 => {
            let (mut lm, mut lv, mut lbm, mut lbv) = (c, c, c, c);
            let mut config = Config::keras();
            let (mut ls, mut lo) = (c, c);
            // Whether the defect is only seen by a training step.
            let mut at_step = false;
            let want: Box<dyn Fn(&Error) -> bool> = match defect % 8 {
                0 => {
                    lv = wrong_len(&mut inp, c);
                    Box::new(length_err("moving.variance", c, lv))
                }
                1 => {
                    lbm = wrong_len(&mut inp, c);
                    at_step = true;
                    Box::new(length_err("batch.mean", c, lbm))
                }
                2 => {
                    lbv = wrong_len(&mut inp, c);
                    at_step = true;
                    Box::new(length_err("batch.variance", c, lbv))
                }
                3 => {
                    (lm, lv) = (0, 0);
                    Box::new(same_err(Error::ZeroChannels))
                }
                4 => {
                    config.epsilon = bad_epsilon(&mut inp);
                    Box::new(same_err(Error::Epsilon(config.epsilon)))
                }
                5 => {
                    config = bad_decay_config(&mut inp);
                    let Momentum::Decay(d) = config.momentum else {
                        unreachable!()
                    };
                    Box::new(same_err(Error::Decay(d)))
                }
                6 if api == 8 => {
                    config.activation = bad_clamp(&mut inp);
                    let Activation::Clamp { min, max } = config.activation else {
                        unreachable!()
                    };
                    Box::new(same_err(Error::Clamp { min, max }))
                }
                6 => {
                    ls = wrong_len(&mut inp, c);
                    at_step = true;
                    Box::new(length_err("scale", c, ls))
                }
                _ => {
                    lo = wrong_len(&mut inp, c);
                    at_step = true;
                    Box::new(length_err("offset", c, lo))
                }
            };
            let (mut mm, mut mv, mut bm, mut bv) =
                (sentinel(lm), sentinel(lv), sentinel(lbm), sentinel(lbv));
            let (sc, of) = (vec![1.0; ls], vec![0.0; lo]);
            let mut y = sentinel(len);
            let r = BatchNorm::new(config, moving(&mut mm, &mut mv)).and_then(|mut l| {
                let so = ScaleOffset::new(&sc, &of);
                l.train(&x, &mut y, shape, so, &mut batch(&mut bm, &mut bv))
            });
            if !at_step {
                let r = BatchNorm::new(config, moving(&mut mm, &mut mv)).map(|_| ());
                expect_err(r, &*want, "BatchNorm::new", &ctx);
            }
            expect_err(r, &*want, "BatchNorm::train", &ctx);
            assert_untouched("y", &y, &sentinel(len), &ctx);
            assert_untouched("moving mean", &mm, &sentinel(lm), &ctx);
            assert_untouched("moving variance", &mv, &sentinel(lv), &ctx);
            assert_untouched("batch mean", &bm, &sentinel(lbm), &ctx);
            assert_untouched("batch variance", &bv, &sentinel(lbv), &ctx);
        }
        // train, train_in_place, infer, infer_in_place
        10..=13 => {
            let (mut mm, mut mv, mut bm, mut bv) =
                (vec![0.0; c], vec![1.0; c], sentinel(c), sentinel(c));
            let config = Config::onnx().with_activation(Activation::Relu);
            let so = ScaleOffset::new(&scale, &offset);
            let mut bn = BatchNorm::new(config, moving(&mut mm, &mut mv))
                .unwrap()
                .with_simd(simd);
            let mut y0 = sentinel(len);
            if inp.u8() & 1 == 0 {
                bn.train(&x, &mut y0, shape, so, &mut batch(&mut bm, &mut bv))
                    .unwrap();
            }
            let snap = |bn: &BatchNorm, bm: &[f32], bv: &[f32]| {
                (
                    bits(bn.moving().mean),
                    bits(bn.moving().variance),
                    bits(bm),
                    bits(bv),
                    bn.moving().batches,
                )
            };
            let before = snap(&bn, &bm, &bv);
            let (mut lx, mut ly, mut sh) = (len, len, shape);
            let infer = api >= 12;
            let in_place = api == 11 || api == 13;
            let mut ok_empty = false;
            let want: Box<dyn Fn(&Error) -> bool> = match defect % 5 {
                0 => {
                    lx = wrong_len(&mut inp, len);
                    Box::new(length_err("x", len, lx))
                }
                1 if !in_place => {
                    ly = wrong_len(&mut inp, len);
                    Box::new(length_err("y", len, ly))
                }
                2 => {
                    // A channel count that is not the layer's.
                    let c2 = if inp.u8() & 1 == 0 || c == 1 {
                        c + 1
                    } else {
                        c - 1
                    };
                    sh = Shape {
                        channels: c2,
                        ..shape
                    };
                    lx = n * s * c2;
                    ly = lx;
                    Box::new(length_err("shape.channels", c, c2))
                }
                3 => {
                    let (b, e) = bad_shape(&mut inp, layout, c);
                    sh = b;
                    lx = 0;
                    ly = 0;
                    Box::new(same_err(e))
                }
                _ => {
                    sh = if inp.u8() & 1 == 0 {
                        Shape { batch: 0, ..shape }
                    } else {
                        Shape {
                            spatial: 0,
                            ..shape
                        }
                    };
                    lx = 0;
                    ly = 0;
                    // Inference of nothing is fine; training on it is not.
                    ok_empty = infer;
                    Box::new(same_err(Error::EmptyBatch))
                }
            };
            let xs: Vec<f32> = (0..lx).map(|i| i as f32).collect();
            let mut y = sentinel(ly);
            let mut xi = xs.clone();
            let r = match (infer, in_place) {
                (false, false) => bn.train(&xs, &mut y, sh, so, &mut batch(&mut bm, &mut bv)),
                (false, true) => bn.train_in_place(&mut xi, sh, so, &mut batch(&mut bm, &mut bv)),
                (true, false) => bn.infer(&xs, &mut y, sh, so),
                (true, true) => bn.infer_in_place(&mut xi, sh, so),
            };
            if ok_empty {
                r.unwrap_or_else(|e| panic!("empty infer: {e}; {}", ctx()));
            } else {
                expect_err(r, &*want, "layer", &ctx);
            }
            assert_untouched("y", &y, &sentinel(ly), &ctx);
            assert_untouched("x (in place)", &xi, &xs, &ctx);
            assert_eq!(
                snap(&bn, &bm, &bv),
                before,
                "layer state changed; {}",
                ctx()
            );
            // Still usable.
            bn.train(&x, &mut y0, shape, so, &mut batch(&mut bm, &mut bv))
                .unwrap();
            assert_eq!(bn.moving().batches, before.4 + 1, "{}", ctx());
        }
        // BatchNormArray with a bad config or bad lengths
        14 => {
            let mut arr = BatchNormArray::<3>::new(Config::pytorch());
            let sh = Shape {
                channels: 3,
                ..shape
            };
            let l3 = n * s * 3;
            let x3: Vec<f32> = (0..l3).map(|i| (i % 7) as f32).collect();
            let mut y = sentinel(l3);
            arr.train(&x3, &mut y, sh).unwrap();
            let before = arr.clone();
            let same = |a: &BatchNormArray<3>, b: &BatchNormArray<3>| {
                bits(&a.moving_mean) == bits(&b.moving_mean)
                    && bits(&a.moving_variance) == bits(&b.moving_variance)
                    && bits(&a.batch_mean) == bits(&b.batch_mean)
                    && bits(&a.batch_variance) == bits(&b.batch_variance)
                    && a.batches == b.batches
            };
            let mut y = sentinel(l3);
            match defect % 3 {
                0 => {
                    arr.config = bad_decay_config(&mut inp);
                    let Momentum::Decay(d) = arr.config.momentum else {
                        unreachable!()
                    };
                    expect_err(
                        arr.train(&x3, &mut y, sh),
                        &same_err(Error::Decay(d)),
                        "array",
                        &ctx,
                    );
                }
                1 => {
                    arr.config.epsilon = bad_epsilon(&mut inp);
                    let e = arr.config.epsilon;
                    expect_err(
                        arr.infer(&x3, &mut y, sh),
                        &same_err(Error::Epsilon(e)),
                        "array",
                        &ctx,
                    );
                }
                _ => {
                    let lx = wrong_len(&mut inp, l3);
                    let xs = sentinel(lx);
                    expect_err(
                        arr.train(&xs, &mut y, sh),
                        &length_err("x", l3, lx),
                        "array",
                        &ctx,
                    );
                }
            }
            assert!(same(&arr, &before), "array state changed; {}", ctx());
            assert_untouched("y", &y, &sentinel(l3), &ctx);
        }
        // backward, backward_in_place
        16 => {
            let in_place = defect & 0x80 != 0;
            let mode = if defect & 0x40 != 0 {
                Mode::Training
            } else {
                Mode::Inference
            };
            let (mut lx, mut ldy, mut ldx, mut lds, mut ldo, mut lm) = (len, len, len, c, c, c);
            let (mut sh, mut eps, mut act) = (shape, 1e-3f32, Activation::Relu);
            let mut ok_empty = false;
            let want: Box<dyn Fn(&Error) -> bool> = match defect % 10 {
                0 => {
                    lx = wrong_len(&mut inp, len);
                    Box::new(length_err("x", len, lx))
                }
                1 => {
                    ldy = wrong_len(&mut inp, len);
                    Box::new(length_err("dy", len, ldy))
                }
                2 if !in_place => {
                    ldx = wrong_len(&mut inp, len);
                    Box::new(length_err("dx", len, ldx))
                }
                3 => {
                    lds = wrong_len(&mut inp, c);
                    Box::new(length_err("dscale", c, lds))
                }
                4 => {
                    ldo = wrong_len(&mut inp, c);
                    Box::new(length_err("doffset", c, ldo))
                }
                5 => {
                    lm = wrong_len(&mut inp, c);
                    Box::new(length_err("mean", c, lm))
                }
                6 => {
                    let (b, e) = bad_shape(&mut inp, layout, c);
                    sh = b;
                    (lx, ldy, ldx) = (0, 0, 0);
                    Box::new(same_err(e))
                }
                7 => {
                    eps = bad_epsilon(&mut inp);
                    Box::new(same_err(Error::Epsilon(eps)))
                }
                8 => {
                    act = bad_clamp(&mut inp);
                    let Activation::Clamp { min, max } = act else {
                        unreachable!()
                    };
                    Box::new(same_err(Error::Clamp { min, max }))
                }
                _ => {
                    sh = if inp.u8() & 1 == 0 {
                        Shape { batch: 0, ..shape }
                    } else {
                        Shape {
                            spatial: 0,
                            ..shape
                        }
                    };
                    (lx, ldy, ldx) = (0, 0, 0);
                    ok_empty = mode == Mode::Inference;
                    Box::new(same_err(Error::EmptyBatch))
                }
            };
            let m = vec![0.5f32; lm];
            let p = Params {
                mean: &m,
                epsilon: eps,
                activation: act,
                ..params(Activation::None)
            };
            let xs = sentinel(lx);
            let dys: Vec<f32> = (0..ldy).map(|i| i as f32).collect();
            let (mut ds, mut dof) = (sentinel(lds), sentinel(ldo));
            let mut dx = sentinel(ldx);
            let mut dyi = dys.clone();
            let r = if in_place {
                simd.backward_in_place(&xs, &mut dyi, sh, &p, mode, &mut ds, &mut dof)
            } else {
                let g = Gradients {
                    dx: &mut dx,
                    dscale: &mut ds,
                    doffset: &mut dof,
                };
                simd.backward(&xs, &dys, sh, &p, mode, g)
            };
            if ok_empty {
                r.unwrap_or_else(|e| panic!("empty inference backward: {e}; {}", ctx()));
                assert!(ds.iter().chain(&dof).all(|v| *v == 0.0), "{}", ctx());
            } else {
                expect_err(r, &*want, "backward", &ctx);
                assert_untouched("dscale", &ds, &sentinel(lds), &ctx);
                assert_untouched("doffset", &dof, &sentinel(ldo), &ctx);
            }
            assert_untouched("dx", &dx, &sentinel(ldx), &ctx);
            assert_untouched("dy (in place)", &dyi, &dys, &ctx);
        }
        // fold_into_weights
        17 => {
            let (mut lb, mut lbo, mut lw) = (c, c, c * (1 + defect as usize % 3));
            let mut eps = 1e-3f32;
            let mut layout_w = WeightLayout::OutFirst;
            let want: Box<dyn Fn(&Error) -> bool> = match defect % 7 {
                0 => {
                    lb = wrong_len(&mut inp, c);
                    Box::new(length_err("bias", c, lb))
                }
                1 => {
                    lbo = wrong_len(&mut inp, c);
                    Box::new(length_err("bias_out", c, lbo))
                }
                2 => {
                    eps = bad_epsilon(&mut inp);
                    Box::new(same_err(Error::Epsilon(eps)))
                }
                3 => {
                    lw = if c > 1 { c + 1 } else { 0 };
                    let lw2 = lw;
                    layout_w = if inp.u8() & 1 == 0 {
                        WeightLayout::OutFirst
                    } else {
                        WeightLayout::OutLast
                    };
                    Box::new(same_err(Error::Weights {
                        len: lw2,
                        channels: c,
                    }))
                }
                4 => {
                    layout_w = WeightLayout::Hwim { multiplier: 0 };
                    Box::new(same_err(Error::Weights {
                        len: lw,
                        channels: c,
                    }))
                }
                5 => {
                    layout_w = WeightLayout::OutSecond {
                        groups: inp.pick(&[0, c + 1]),
                        kernel: 1,
                    };
                    Box::new(same_err(Error::Weights {
                        len: lw,
                        channels: c,
                    }))
                }
                _ => {
                    layout_w = WeightLayout::OutSecond {
                        groups: 1,
                        kernel: 0,
                    };
                    Box::new(same_err(Error::Weights {
                        len: lw,
                        channels: c,
                    }))
                }
            };
            let p = Params {
                epsilon: eps,
                ..params(Activation::None)
            };
            let w0: Vec<f32> = (0..lw).map(|i| i as f32).collect();
            let mut w = w0.clone();
            let bias = vec![1.0f32; lb];
            let mut bo = sentinel(lbo);
            let r = batchnorm::fold_into_weights(&mut w, Some(&bias), layout_w, &p, &mut bo);
            expect_err(r, &*want, "fold_into_weights", &ctx);
            assert_untouched("weight", &w, &w0, &ctx);
            assert_untouched("bias_out", &bo, &sentinel(lbo), &ctx);
        }
        // Huge (non-overflowing) shapes with small slices.
        _ => {
            // 2^20 x 2^20 on 64-bit targets, 2^10 x 2^10 on 32-bit ones:
            // far larger than the slices, with room for `c` in `usize`.
            let half = usize::BITS * 5 / 16;
            let sh = Shape {
                layout,
                batch: 1 << half,
                spatial: 1 << half,
                channels: c,
            };
            let big = (1usize << (2 * half)) * c;
            let mut y = sentinel(len);
            let (mut m, mut v) = (sentinel(c), sentinel(c));
            let mut recs = vec![Moments::EMPTY; c];
            let e = simd.moments(&x, sh, &mut m, &mut v);
            expect_err(e, &length_err("x", big, len), "moments", &ctx);
            let e = simd.accumulate(&x, sh, &mut recs);
            expect_err(e, &length_err("x", big, len), "accumulate", &ctx);
            let e = simd.normalize(&x, &mut y, sh, &params(Activation::None));
            expect_err(e, &length_err("x", big, len), "normalize", &ctx);
            // Zero batch with a huge channel count: the per-channel slices
            // are what is wrong.
            let sh0 = Shape {
                layout,
                batch: 0,
                spatial: 3,
                channels: usize::MAX,
            };
            let e = simd.moments(&[], sh0, &mut m, &mut v);
            expect_err(e, &length_err("mean", usize::MAX, c), "moments", &ctx);
            let e = simd.normalize(&[], &mut [], sh0, &params(Activation::None));
            expect_err(e, &length_err("mean", usize::MAX, c), "normalize", &ctx);
            assert_untouched("y", &y, &sentinel(len), &ctx);
            assert_untouched("mean", &m, &sentinel(c), &ctx);
            assert_untouched("variance", &v, &sentinel(c), &ctx);
            assert_eq!(record_bits(&recs), record_bits(&vec![Moments::EMPTY; c]));
        }
    }
}
