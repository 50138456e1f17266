//! Fused normalization: per-channel `y = act(x * a + b)` in one pass.
//!
//! `a = scale / sqrt(var + eps)` and `b = offset - mean * a` is the folded
//! form TensorFlow's and PyTorch's CPU kernels use. [`fold`] computes it into
//! caller slices; [`normalize`] computes it on the fly, a channel (or a
//! stack-resident segment of at most [`SEGMENT`] channel positions) at a
//! time, so no caller scratch is needed.
//!
//! The coefficients are computed in `f64` and rounded once, so `a` and `b`
//! are within half an ulp of exact and the only other rounding is the
//! kernel's own `x * a + b` (one rounding with FMA, two without): well inside
//! crate docs §3's `4 ε (|x a| + |mean a| + |offset|)`. A
//! [compact](crate#compact-builds) build computes them in `f32` (software
//! `f64` is large and slow on a microcontroller), which stays inside the
//! same bound (the proof is at `fold_f32`).
//!
//! # Layouts
//!
//! * NCHW with at least one vector of spatial positions: each channel run is
//!   `x * splat(a) + splat(b)`, with the coefficients of up to [`SEGMENT`]
//!   channels folded onto the stack first so that runs are visited in memory
//!   order.
//! * Otherwise the tensor is periodic (NHWC, or NCHW with short runs): the
//!   per-position coefficients of one period are laid out in a stack
//!   pattern, repeated over a super-row of `lcm(period, lanes)` elements
//!   when that is at most [`SEGMENT`] long (on x86-64 and aarch64, up to
//!   2048 on a tensor of at least 16 super-rows), and streamed alongside
//!   the data. Longer NHWC rows use the caller's `a` and `b` slices
//!   directly.
//!
//! Tails (the end of a run, of a row, or a partial super-row) go through the
//! same code with half-width lanes, down to one-lane `f32`.
//!
//! # Stack
//!
//! Two patterns of [`SEGMENT`] `f32` (8 KiB; super-rows or rows of more
//! than 1024 positions take two of 2048 instead, 16 KiB), and 0.5 KiB to
//! stage the coefficients of 64 channels while they are spread over NCHW
//! positions (fewer spatial positions than lanes). No heap. On every target
//! but x86-64 and aarch64 the segment is 256 positions (2 KiB) and the
//! staging 32 channels (256 B): on a Cortex-M4, `normalize` and `affine`
//! use at most 2.7 KiB of stack, whatever the shape (`.ci/firmware` paints
//! it).

use crate::error::{check_epsilon, Error};
use crate::lanes::{
    enabled, inlined, store_fence, with_lane, Lane, Line, Simd, COMPACT, SMALL_STACK, STREAMS,
};
use crate::shape::{Layout, Shape};
use wide::f64x4;

/// Largest number of positions whose coefficients sit in a stack pattern:
/// 1024 on x86-64 and aarch64, 256 on every other target (microcontrollers
/// and 32-bit targets, where two patterns must fit a few KiB of stack).
pub(crate) const SEGMENT: usize = if SMALL_STACK { 256 } else { 1024 };

/// Positions per segment of a row longer than [`SEGMENT`] on x86-64 and
/// aarch64 (see [`long_rows`]), so that a row of up to 2048 channels is one
/// segment read in memory order. With 1024, a 2048-channel NHWC row was
/// read as two half rows, each swept over every row: 32×7×7×2048
/// inference ran at 16–17 GB/s, 21–22 as one segment (AMD Zen 4,
/// `benches/README.md`).
const LONG_SEGMENT: usize = 2048;

/// Largest tensor (elements, 4 MiB of `f32`) whose rows [`Io::map_pattern`]
/// takes two at a time per pass over the coefficients. Two rows save a
/// coefficient load per output vector, which is what bounds rows from L1
/// and L2; from L3 and memory the stream prefetchers bound them, and two
/// interleaved streams per tensor lost: NHWC C = 256 normalization at
/// 8 MiB 16.4 against 18.4 GB/s one row at a time, at 32 MiB 5.4 against
/// 7.2; equal at 4 MiB, ahead below (AMD Zen 3, `benches/README.md`).
const PAIRED_ROWS_MAX: usize = 1 << 20;

/// Widest lanes whose rows [`Io::map_pattern`] takes two at a time. The
/// saved coefficient load paid with AVX2 on AMD Zen 3 (NHWC C = 1000 at
/// 256 KiB 19.1–19.4 against 17.5–17.9 GB/s) and cost on an Intel Xeon
/// with AVX-512, at 256 KiB: 16 lanes one row at a time ran NHWC C = 1000
/// normalization in half the time (0.48 to 0.93 of the roofline), with 8
/// lanes 0.59 to 0.86 there; with AVX-512 on AMD Zen 4 the two were even
/// (`benches/README.md`). So 16 lanes take one row at a time everywhere.
const PAIRED_WIDTH_MAX: usize = 8;

/// Whether [`Io::map_pattern`] takes `rows` rows of `len` elements,
/// `stride` apart, two at a time: rows that do not overlap, on a tensor of
/// at most [`PAIRED_ROWS_MAX`] elements, with at most [`PAIRED_WIDTH_MAX`]
/// lanes.
#[inline(always)]
pub(crate) fn paired_rows<V: Lane>(rows: usize, stride: usize, len: usize) -> bool {
    V::WIDTH <= PAIRED_WIDTH_MAX && stride >= len && rows.saturating_mul(stride) <= PAIRED_ROWS_MAX
}

/// Channels whose coefficients are folded at a time while they are spread
/// over the positions of NCHW rows with fewer spatial positions than lanes.
const CHUNK: usize = if SMALL_STACK { 32 } else { 64 };

/// An elementwise activation fused into the normalization pass.
///
/// NaN inputs stay NaN through every activation (the comparisons are
/// false), so a poisoned channel stays visibly poisoned.
///
/// ```
/// use batchnorm::Activation;
///
/// assert_eq!(Activation::Relu6.apply(7.5), 6.0);
/// assert_eq!(Activation::Relu.apply(-2.0), 0.0);
/// assert!(Activation::Relu.apply(f32::NAN).is_nan());
/// let bounded = Activation::Clamp { min: -1.0, max: 1.0 };
/// assert_eq!(bounded.apply(-3.0), -1.0);
/// assert!(Activation::Clamp { min: 1.0, max: -1.0 }.validate().is_err());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum Activation {
    /// `y`.
    #[default]
    None,
    /// `max(y, 0)`.
    Relu,
    /// `min(max(y, 0), 6)`.
    Relu6,
    /// `min(max(y, min), max)`; needs `min <= max`, neither NaN.
    Clamp {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
}

impl Activation {
    /// `Err(Error::Clamp)` for a `Clamp` with NaN bounds or `min > max`.
    pub fn validate(&self) -> Result<(), Error> {
        match *self {
            // Written so that a NaN bound fails too.
            Activation::Clamp { min, max } if min.partial_cmp(&max).is_none_or(|o| o.is_gt()) => {
                Err(Error::Clamp { min, max })
            }
            _ => Ok(()),
        }
    }

    /// The activation applied to one value (the scalar definition the kernels
    /// and the reference share).
    pub fn apply(&self, y: f32) -> f32 {
        match *self {
            Activation::None => y,
            Activation::Relu => Lane::floor_at(y, 0.0),
            Activation::Relu6 => Lane::ceil_at(Lane::floor_at(y, 0.0), 6.0),
            Activation::Clamp { min, max } => Lane::ceil_at(Lane::floor_at(y, min), max),
        }
    }
}

/// The activation, resolved once per call so the inner loop has no branch.
pub(crate) trait Act: Copy {
    fn apply<V: Lane>(self, y: V) -> V;
}

#[derive(Clone, Copy)]
struct Identity;
impl Act for Identity {
    #[inline(always)]
    fn apply<V: Lane>(self, y: V) -> V {
        y
    }
}

#[derive(Clone, Copy)]
struct Floor(f32);
impl Act for Floor {
    #[inline(always)]
    fn apply<V: Lane>(self, y: V) -> V {
        y.floor_at(V::splat(self.0))
    }
}

#[derive(Clone, Copy)]
struct Band(f32, f32);
impl Act for Band {
    #[inline(always)]
    fn apply<V: Lane>(self, y: V) -> V {
        y.floor_at(V::splat(self.0)).ceil_at(V::splat(self.1))
    }
}

/// Where the kernel reads `x` and writes `y`: two slices, or one in place.
/// Each method walks `len` elements from `start` in whole vectors of `V`
/// with `chunks_exact`, so the hot loop has no bounds checks; `len` must be
/// a multiple of `V::WIDTH` (tails go through narrower lanes). The ranges
/// lie inside the tensor on every call; each is taken with `get`, so that
/// no panic path exists (a range outside would be left unwritten).
pub(crate) trait Io {
    /// NCHW runs: in every batch element (`item` elements), the `pa.len()`
    /// runs of `s` elements from element `first` on, run `j` as
    /// `act(x * pa[j] + pb[j])`. The elements and runs are split off once
    /// with `chunks_exact`, and each run goes through [`aligned_run`] as a
    /// slice, so a short run pays no range checks of its own.
    fn map_runs<V: Lane, A: Act>(
        &mut self,
        item: usize,
        first: usize,
        s: usize,
        pa: &[f32],
        pb: &[f32],
        act: A,
    );
    /// `y = f(x, a, b)` with per-element coefficients `pa`, `pb` on `rows`
    /// rows of `pa.len()` elements, `stride` apart from `start`.
    fn map_pattern<V: Lane>(
        &mut self,
        start: usize,
        rows: usize,
        stride: usize,
        pa: &[f32],
        pb: &[f32],
        f: impl Fn(V, V, V) -> V,
    );
    /// Whether the output is written with streaming stores
    /// ([`STREAM_MIN_BYTES`]).
    fn streams(&self) -> bool;
    /// Elements before the first vector-aligned element of the output.
    fn head<V: Lane>(&self) -> usize;
    /// The input's vector at element `at` (zeros past the end: no caller).
    fn load_at<V: Lane>(&self, at: usize) -> V;
    /// Stores `v` to the output at element `at` (nothing past the end).
    fn store_at<V: Lane>(&mut self, at: usize, v: V);
    /// `rows` back-to-back rows of `NV` vectors, vector `v` of every row
    /// with coefficients `pa[v]`, `pb[v]` held in registers.
    fn map_rows<V: Lane, const NV: usize>(
        &mut self,
        start: usize,
        rows: usize,
        pa: &[V; NV],
        pb: &[V; NV],
        f: impl Fn(V, V, V) -> V,
    );
}

/// `s[start..start + len]`, or `None` (no panic path).
#[inline(always)]
fn span(s: &[f32], start: usize, len: usize) -> Option<&[f32]> {
    s.get(start..)?.get(..len)
}

/// `s[start..start + len]` mutably, or `None` (no panic path).
#[inline(always)]
fn span_mut(s: &mut [f32], start: usize, len: usize) -> Option<&mut [f32]> {
    s.get_mut(start..)?.get_mut(..len)
}

/// Outputs of at least this many bytes are written with streaming stores
/// ([`Lane::stream`]) where the lanes have them, by the loops of
/// channels-last rows whose stores cover whole cache lines of their own
/// ([`streams_rows`]). With its input, a tensor this size fills the
/// 32 MiB last-level cache of an AMD Zen 4 or Zen 5 core complex, and a
/// store through the caches then costs a read of the line as well: on a
/// Zen 5, batch-32 NHWC inference of 19-26 MB went from 18-32 to 35-42
/// GB/s; at 8 MiB, where input and output stay in that cache, streaming
/// ran 1.4-1.7 times slower. On an Intel Xeon with AVX-512, NHWC C = 3 and
/// 64 at 64 MiB went from 14.6-16.5 to 26.2-26.7 GB/s, and 32x144x56x56
/// inference from 7.6-7.8 to 9.6-10.7; at 26 MB (its last-level cache is
/// larger) streaming lost 2-7%. NCHW runs (lines at each run's ends are
/// written by both kinds of store) gained nothing, so they store through
/// the caches (benches/README.md). The caches' size is not asked of the
/// CPU: under a hypervisor `cpuid` may report what the guest does not get
/// (480 MiB of L3 on the Xeon measured).
pub(crate) const STREAM_MIN_BYTES: usize = 16 << 20;

/// Whether an output of `len` elements is written with streaming stores.
#[inline(always)]
fn streams(len: usize) -> bool {
    STREAMS && len >= STREAM_MIN_BYTES / 4
}

/// `v.stream(out)` when `stream`, else `v.store(out)`.
#[inline(always)]
fn put<V: Lane>(v: V, out: &mut [f32], stream: bool) {
    if stream {
        v.stream(out)
    } else {
        v.store(out)
    }
}

pub(crate) struct Split<'a> {
    x: &'a [f32],
    y: &'a mut [f32],
    stream: bool,
}

impl<'a> Split<'a> {
    /// `y` from `x`.
    #[inline(always)]
    pub(crate) fn new(x: &'a [f32], y: &'a mut [f32]) -> Self {
        let stream = streams(y.len());
        Split { x, y, stream }
    }
}

/// Elements from `s`'s start to its first element aligned to `V`.
#[inline(always)]
pub(crate) fn head_of<V: Lane>(s: &[f32]) -> usize {
    (V::WIDTH - (s.as_ptr() as usize / 4) % V::WIDTH) % V::WIDTH
}

impl Io for Split<'_> {
    #[inline(always)]
    fn streams(&self) -> bool {
        self.stream
    }
    #[inline(always)]
    fn head<V: Lane>(&self) -> usize {
        head_of::<V>(self.y)
    }
    #[inline(always)]
    fn load_at<V: Lane>(&self, at: usize) -> V {
        V::load(self.x.get(at..).unwrap_or_default())
    }
    #[inline(always)]
    fn store_at<V: Lane>(&mut self, at: usize, v: V) {
        v.store(self.y.get_mut(at..).unwrap_or_default());
    }
    #[inline(always)]
    fn map_rows<V: Lane, const NV: usize>(
        &mut self,
        start: usize,
        rows: usize,
        pa: &[V; NV],
        pb: &[V; NV],
        f: impl Fn(V, V, V) -> V,
    ) {
        let (w, len) = (V::WIDTH, rows * NV * V::WIDTH);
        let (Some(x), Some(y)) = (span(self.x, start, len), span_mut(self.y, start, len)) else {
            return;
        };
        // Back to back: every line is whole (see `streams_rows`). The flag
        // stays in the loop here: hoisted out of it, as in `map_pattern`,
        // the default build's 32x256x56x56 NHWC inference (sixteen vectors)
        // ran 11.7-12.2 against 12.9-13.3 GB/s.
        let stream = streams_rows::<V>(self.stream, len, len);
        // Not `zip`: with a hundred instantiations the compiler outlined
        // `Zip::new`, and with it a division by the chunk length that it
        // could no longer see is not zero (a panic path).
        let mut xs = x.chunks_exact(NV * w);
        for yr in y.chunks_exact_mut(NV * w) {
            let Some(xr) = xs.next() else {
                return;
            };
            for v in 0..NV {
                // `get` (no panic path): the compiler does not always see
                // that zipped chunks are `NV * w` long.
                let x = V::load(xr.get(v * w..).unwrap_or_default());
                put(
                    f(x, pa[v], pb[v]),
                    yr.get_mut(v * w..).unwrap_or_default(),
                    stream,
                );
            }
        }
    }
    #[inline(always)]
    fn map_runs<V: Lane, A: Act>(
        &mut self,
        item: usize,
        first: usize,
        s: usize,
        pa: &[f32],
        pb: &[f32],
        act: A,
    ) {
        // `item >= first + pa.len() * s` and `s >= 1` on every call; the
        // checks keep the divisions of `chunks_exact` free of a panic path.
        let len = pa.len() * s;
        if item == 0 || s == 0 {
            return;
        }
        // Not `zip` of two `chunks_exact` (see `map_rows`).
        let mut xs = self.x.chunks_exact(item);
        for ye in self.y.chunks_exact_mut(item) {
            let Some(xe) = xs.next() else {
                return;
            };
            let (Some(xw), Some(yw)) = (span(xe, first, len), span_mut(ye, first, len)) else {
                return;
            };
            let mut xr = xw.chunks_exact(s);
            for (yr, (&a, &b)) in yw.chunks_exact_mut(s).zip(pa.iter().zip(pb)) {
                let Some(xr) = xr.next() else {
                    return;
                };
                aligned_run::<V, A>(Some(xr), yr, a, b, act);
            }
        }
    }
    #[inline(always)]
    fn map_pattern<V: Lane>(
        &mut self,
        start: usize,
        rows: usize,
        stride: usize,
        pa: &[f32],
        pb: &[f32],
        f: impl Fn(V, V, V) -> V,
    ) {
        let (w, len) = (V::WIDTH, pa.len());
        let mut r = 0;
        // Two rows per pass over the coefficients: each coefficient vector,
        // loaded once, serves both, two loads per output vector instead of
        // three (the load ports, not the stores, bounded NHWC rows of many
        // vectors with AVX2), on tensors up to `PAIRED_ROWS_MAX` ([`paired_rows`]).
        let paired = paired_rows::<V>(rows, stride, len);
        while r + 2 <= rows && paired {
            let base = start + r * stride;
            let (Some(x), Some(y)) = (
                span(self.x, base, stride + len),
                span_mut(self.y, base, stride + len),
            ) else {
                return;
            };
            let Some((y0, y1)) = y.split_at_mut_checked(stride) else {
                return;
            };
            let (Some(x0), Some(x1), Some(y0)) = (x.get(..len), x.get(stride..), y0.get_mut(..len))
            else {
                return;
            };
            // Not `zip` (see `map_rows`): with the two-row loops beside
            // them the compiler outlined `Zip::new` of these loops, and with
            // it a division by the chunk length (a panic path).
            let (mut x0, mut x1) = (x0.chunks_exact(w), x1.chunks_exact(w));
            let (mut ys1, mut pas, mut pbs) = (
                y1.chunks_exact_mut(w),
                pa.chunks_exact(w),
                pb.chunks_exact(w),
            );
            for y0 in y0.chunks_exact_mut(w) {
                let (Some(x0), Some(x1), Some(y1), Some(ac), Some(bc)) =
                    (x0.next(), x1.next(), ys1.next(), pas.next(), pbs.next())
                else {
                    return;
                };
                let (a, b) = (V::load(ac), V::load(bc));
                f(V::load(x0), a, b).store(y0);
                f(V::load(x1), a, b).store(y1);
            }
            r += 2;
        }
        let rows = (start + r * stride, rows - r, stride);
        if streams_rows::<V>(self.stream, stride, len) {
            split_rows::<V, true>(self.x, self.y, rows, pa, pb, f);
        } else {
            split_rows::<V, false>(self.x, self.y, rows, pa, pb, f);
        }
    }
}

/// Elements of `f32` in a cache line (64 bytes on the x86-64 cores).
const LINE: usize = 16;

/// Whether rows of `len` elements, `stride` apart ([`Io::map_rows`],
/// [`Io::map_pattern`]), are written with streaming stores, given the
/// output's `stream` flag: when no cache line is written by both kinds of
/// store (but at the tensor's ends), that is, when the rows are back to
/// back or each starts where the first does against the line. Rows of
/// 1000 channels one at a time do not: every other row starts half a line
/// off, so the vectors of one row would stream and those of the next store
/// through the cache, into the same lines ([`long_rows`] takes them two
/// at a time). Paired rows never stream: they stop at
/// [`PAIRED_ROWS_MAX`] elements, far below [`STREAM_MIN_BYTES`].
/// `map_pattern` tests the flag once, outside two copies of its loop: a
/// branch per store there cost up to 25% at 256 KiB, where nothing
/// streams.
#[inline(always)]
fn streams_rows<V: Lane>(stream: bool, stride: usize, len: usize) -> bool {
    // `V::STREAMS` first, although the flag implies it of the widest
    // lanes: a struct field is not a constant to the compiler, and this
    // folds the streaming copy of the loops out of every lane type without
    // one (and so out of every firmware build).
    V::STREAMS && stream && (stride == len || stride.is_multiple_of(LINE))
}

/// The rows of [`split_rows`] and [`in_place_rows`] as one span: the step
/// from row to row and the span's length, so that the rows are cut from it
/// with `chunks`. Slicing each row out of the tensor with checks of its
/// own cost more than the row's work at L3 size: 32x144x28x28 NHWC
/// inference (rows of nine sixteen-lane vectors) ran at 23 against 38 GB/s
/// (AMD Zen 5, `benches/README.md`). `stride >= len` but for a single row,
/// whose `stride` is 0.
#[inline(always)]
fn row_span(rows: usize, stride: usize, len: usize) -> Option<(usize, usize)> {
    let step = stride.max(len).max(1);
    let total = rows.checked_sub(1)?.checked_mul(step)?.checked_add(len)?;
    Some((step, total))
}

/// `rows` rows of `pa.len()` elements, `stride` apart from `start`, one
/// at a time, `y = f(x, a, b)`, every store [`put`] with `STREAM`.
#[inline(always)]
fn split_rows<V: Lane, const STREAM: bool>(
    x: &[f32],
    y: &mut [f32],
    (start, rows, stride): (usize, usize, usize),
    pa: &[f32],
    pb: &[f32],
    f: impl Fn(V, V, V) -> V,
) {
    let (w, len) = (V::WIDTH, pa.len());
    let Some((step, total)) = row_span(rows, stride, len) else {
        return;
    };
    let (Some(x), Some(y)) = (span(x, start, total), span_mut(y, start, total)) else {
        return;
    };
    let mut xrs = x.chunks(step);
    for y in y.chunks_mut(step) {
        let (Some(x), Some(y)) = (xrs.next().and_then(|x| x.get(..len)), y.get_mut(..len)) else {
            return;
        };
        let (mut xs, mut pas, mut pbs) =
            (x.chunks_exact(w), pa.chunks_exact(w), pb.chunks_exact(w));
        for yc in y.chunks_exact_mut(w) {
            let (Some(xc), Some(ac), Some(bc)) = (xs.next(), pas.next(), pbs.next()) else {
                return;
            };
            put(f(V::load(xc), V::load(ac), V::load(bc)), yc, STREAM);
        }
    }
}

pub(crate) struct InPlace<'a>(&'a mut [f32], bool);

impl<'a> InPlace<'a> {
    /// `y` from itself.
    #[inline(always)]
    pub(crate) fn new(y: &'a mut [f32]) -> Self {
        let stream = streams(y.len());
        InPlace(y, stream)
    }
}

impl Io for InPlace<'_> {
    #[inline(always)]
    fn streams(&self) -> bool {
        self.1
    }
    #[inline(always)]
    fn head<V: Lane>(&self) -> usize {
        head_of::<V>(self.0)
    }
    #[inline(always)]
    fn load_at<V: Lane>(&self, at: usize) -> V {
        V::load(self.0.get(at..).unwrap_or_default())
    }
    #[inline(always)]
    fn store_at<V: Lane>(&mut self, at: usize, v: V) {
        v.store(self.0.get_mut(at..).unwrap_or_default());
    }
    #[inline(always)]
    fn map_rows<V: Lane, const NV: usize>(
        &mut self,
        start: usize,
        rows: usize,
        pa: &[V; NV],
        pb: &[V; NV],
        f: impl Fn(V, V, V) -> V,
    ) {
        let (w, len) = (V::WIDTH, rows * NV * V::WIDTH);
        let Some(y) = span_mut(self.0, start, len) else {
            return;
        };
        // The flag in the loop, as for `Split`.
        let stream = streams_rows::<V>(self.1, len, len);
        for yr in y.chunks_exact_mut(NV * w) {
            for v in 0..NV {
                put(
                    f(V::load(&yr[v * w..]), pa[v], pb[v]),
                    &mut yr[v * w..],
                    stream,
                );
            }
        }
    }
    #[inline(always)]
    fn map_runs<V: Lane, A: Act>(
        &mut self,
        item: usize,
        first: usize,
        s: usize,
        pa: &[f32],
        pb: &[f32],
        act: A,
    ) {
        let len = pa.len() * s;
        if item == 0 || s == 0 {
            return;
        }
        for ye in self.0.chunks_exact_mut(item) {
            let Some(yw) = span_mut(ye, first, len) else {
                return;
            };
            for (yr, (&a, &b)) in yw.chunks_exact_mut(s).zip(pa.iter().zip(pb)) {
                aligned_run::<V, A>(None, yr, a, b, act);
            }
        }
    }
    #[inline(always)]
    fn map_pattern<V: Lane>(
        &mut self,
        start: usize,
        rows: usize,
        stride: usize,
        pa: &[f32],
        pb: &[f32],
        f: impl Fn(V, V, V) -> V,
    ) {
        let (w, len) = (V::WIDTH, pa.len());
        let mut r = 0;
        // Two rows per pass over the coefficients, as for `Split`.
        let paired = paired_rows::<V>(rows, stride, len);
        while r + 2 <= rows && paired {
            let base = start + r * stride;
            let Some(y) = span_mut(self.0, base, stride + len) else {
                return;
            };
            let Some((y0, y1)) = y.split_at_mut_checked(stride) else {
                return;
            };
            let Some(y0) = y0.get_mut(..len) else {
                return;
            };
            let (mut ys1, mut pas, mut pbs) = (
                y1.chunks_exact_mut(w),
                pa.chunks_exact(w),
                pb.chunks_exact(w),
            );
            for y0 in y0.chunks_exact_mut(w) {
                let (Some(y1), Some(ac), Some(bc)) = (ys1.next(), pas.next(), pbs.next()) else {
                    return;
                };
                let (a, b) = (V::load(ac), V::load(bc));
                f(V::load(y0), a, b).store(y0);
                f(V::load(y1), a, b).store(y1);
            }
            r += 2;
        }
        let rows = (start + r * stride, rows - r, stride);
        if streams_rows::<V>(self.1, stride, len) {
            in_place_rows::<V, true>(self.0, rows, pa, pb, f);
        } else {
            in_place_rows::<V, false>(self.0, rows, pa, pb, f);
        }
    }
}

/// [`split_rows`] in place.
#[inline(always)]
fn in_place_rows<V: Lane, const STREAM: bool>(
    y: &mut [f32],
    (start, rows, stride): (usize, usize, usize),
    pa: &[f32],
    pb: &[f32],
    f: impl Fn(V, V, V) -> V,
) {
    let (w, len) = (V::WIDTH, pa.len());
    let Some((step, total)) = row_span(rows, stride, len) else {
        return;
    };
    let Some(y) = span_mut(y, start, total) else {
        return;
    };
    for y in y.chunks_mut(step) {
        let Some(y) = y.get_mut(..len) else {
            return;
        };
        let (mut pas, mut pbs) = (pa.chunks_exact(w), pb.chunks_exact(w));
        for yc in y.chunks_exact_mut(w) {
            let (Some(ac), Some(bc)) = (pas.next(), pbs.next()) else {
                return;
            };
            put(f(V::load(yc), V::load(ac), V::load(bc)), yc, STREAM);
        }
    }
}

/// `dst` from the start of `src` (as much of it as `src` has: no panic
/// path).
#[inline(always)]
pub(crate) fn copy_from(dst: &mut [f32], src: &[f32]) {
    let n = dst.len().min(src.len());
    if let (Some(d), Some(s)) = (dst.get_mut(..n), src.get(..n)) {
        d.copy_from_slice(s);
    }
}

/// Per-channel coefficients: given, or folded on the fly.
#[derive(Clone, Copy)]
pub(crate) enum Coef<'a> {
    Given { a: &'a [f32], b: &'a [f32] },
    Fold(&'a Params<'a>),
}

impl Coef<'_> {
    /// Coefficients of channels `c0 .. c0 + a.len()`.
    #[cfg_attr(all(target_arch = "x86_64", not(batchnorm_compact)), inline(always))]
    fn fill<V: Lane>(&self, c0: usize, a: &mut [f32], b: &mut [f32]) {
        match *self {
            Coef::Given { a: ga, b: gb } => {
                // Channels `c0 .. c0 + a.len()` exist on every call.
                // Two plain copies (`memcpy`).
                copy_from(a, ga.get(c0..).unwrap_or_default());
                copy_from(b, gb.get(c0..).unwrap_or_default());
            }
            Coef::Fold(p) => fold_span::<V>(p, c0, a, b),
        }
    }

    /// Coefficients of positions `p0 .. p0 + a.len()`, position `p` in
    /// channel `p / div`.
    #[cfg_attr(all(target_arch = "x86_64", not(batchnorm_compact)), inline(always))]
    fn fill_positions<V: Lane>(&self, p0: usize, div: usize, a: &mut [f32], b: &mut [f32]) {
        // `div >= 1` on every call (0 would be no layout at all).
        if div <= 1 {
            return self.fill::<V>(p0, a, b);
        }
        let (mut ta, mut tb) = ([0.0f32; CHUNK], [0.0f32; CHUNK]);
        // The last channel; `staged` are the channels in `ta` and `tb`.
        let last = (p0 + a.len()).saturating_sub(1) / div;
        let mut staged = 0..0;
        for ((a, b), p) in a.iter_mut().zip(b.iter_mut()).zip(p0..) {
            let c = p / div;
            if !staged.contains(&c) {
                let m = (last.saturating_sub(c) + 1).min(CHUNK);
                self.fill::<V>(c, &mut ta[..m], &mut tb[..m]);
                staged = c..c + m;
            }
            let j = c - staged.start;
            if let (Some(&ta), Some(&tb)) = (ta.get(j), tb.get(j)) {
                (*a, *b) = (ta, tb);
            }
        }
    }
}

/// `a = scale / sqrt(var + eps)`, `b = offset - mean * a` in `f64`, each
/// rounded once to `f32`, for channels `c0 .. c0 + a.len()`, four at a time:
/// the per-channel square root and division cost about as much as
/// normalizing a few dozen elements, which is all a channel has in a small
/// tensor with many channels. Every operation is correctly rounded (`wide`'s
/// `sqrt` is `sqrtpd` on x86, `fsqrt` on aarch64 and a correctly rounded
/// software square root elsewhere; no fused multiply-add), so the result is
/// `reference::fold` rounded to `f32`, NaN payloads aside. The last group of
/// fewer than four channels goes through the same code, its spare lanes
/// repeating its last channel and left unstored.
///
/// A [compact](crate#compact-builds) build folds in `f32` instead
/// ([`fold_f32`]): on a Cortex-M4F, `f64` arithmetic is software (3.5 KB of
/// flash for add, multiply, divide, square root and the conversions, and
/// hundreds of cycles per channel).
///
/// The square root and division go through `V` ([`Lane::quot_sqrt4`]), and
/// on x86-64 the function is inlined into the kernel that calls it, inside
/// its lanes' instructions: out of line and with `wide`'s `f64x4`, a
/// default build did them as two `sqrtpd` and two `divpd` per four
/// channels, and normalizing 1000 channels at 256 KiB ran at 0.82 of a
/// native build's speed (AMD Zen 4, `benches/README.md`).
#[cfg_attr(all(target_arch = "x86_64", not(batchnorm_compact)), inline(always))]
pub(crate) fn fold_span<V: Lane>(p: &Params<'_>, c0: usize, a: &mut [f32], b: &mut [f32]) {
    if COMPACT {
        // Channels `c0 .. c0 + a.len()` exist on validated input; `get`
        // keeps the panic paths out.
        let end = c0.saturating_add(a.len());
        let (Some(mean), Some(var)) = (p.mean.get(c0..end), p.variance.get(c0..end)) else {
            return;
        };
        let scale = p.scale.and_then(|s| s.get(c0..end));
        let offset = p.offset.and_then(|o| o.get(c0..end));
        for (j, ((a, b), (&m, &v))) in a.iter_mut().zip(b).zip(mean.iter().zip(var)).enumerate() {
            let scale = scale.and_then(|s| s.get(j)).copied().unwrap_or(1.0);
            let offset = offset.and_then(|o| o.get(j)).copied().unwrap_or(0.0);
            (*a, *b) = fold_f32(m, v, scale, offset, p.epsilon);
        }
        return;
    }
    let mut ga = a.chunks_exact_mut(4);
    let mut gb = b.chunks_exact_mut(4);
    let mut c = c0;
    for (xa, xb) in (&mut ga).zip(&mut gb) {
        fold4::<V>(p, c, xa, xb);
        c += 4;
    }
    let (ra, rb) = (ga.into_remainder(), gb.into_remainder());
    if !ra.is_empty() {
        fold4::<V>(p, c, ra, rb);
    }
}

/// One channel's `(a, b)` in `f32` arithmetic (compact builds), every
/// operation correctly rounded (`libm::sqrtf` included):
/// `a = scale / sqrt(var + eps)`, `b = offset - mean * a`.
///
/// # Why this still meets crate docs §3
///
/// With `u = ε / 2` the unit roundoff, `a = A (1 + α)` where `A` is the exact
/// coefficient: the sum `var + eps` (two non-negative terms in practice; a
/// single rounding in any case) is off by `u` relative, which the square
/// root halves, the square root rounds by `u` and the division by `u`, so
/// `|α| <= 2.5 u` (to first order; a subnormal `a` has the absolute error
/// `2^-150` that rounding the `f64` fold to `f32` also has). The product
/// `mean * a` adds `u` and the subtraction `u |b|`, so
/// `|b - B| <= 4.5 u |mean A| + u |offset|`. The kernel then computes
/// `x * a + b` with at most two roundings, `u |x a|` and `u |y|`, so
/// `|y - Y| <= 4.5 u |x A| + 5.5 u |mean A| + 2 u |offset|`, i.e.
/// `2.25 ε |x A| + 2.75 ε |mean A| + ε |offset|`: within crate docs §3's
/// `4 ε (|x a| + |mean a| + |offset|)`, with more than `ε` of room in every
/// term for the second-order products. The activations are clamps, which
/// never increase an error. `reference::check_fold` holds a compact build's
/// fold to these bounds (`2 ε |A|` and `3 ε (|mean A| + |offset|)`), and the
/// normalization tests, run with `--cfg batchnorm_compact` in CI, to §3's.
///
/// Where an `f32` intermediate leaves the standard model (overflow, or an
/// underflow whose absolute error a large factor would magnify), the
/// computation is rescaled by powers of two, which are exact:
///
/// * a sum `var + eps` above `f32::MAX`: `sqrt` of `var / 4 + eps / 4`,
///   times 2;
/// * an `a` below `f32::MIN_POSITIVE` (its absolute error `2^-150` times a
///   large mean would dominate `b`; the `f64` fold forms `b` from the exact
///   `A`): `mean * A` as `mean * (scale 2^100 / r) 2^-100`, where the root
///   `r` is finite, so `scale < 2^-61` and the scaling cannot overflow, and
///   `scale 2^100 / r` is normal for any `|A| >= 2^-214` (`|A|` is at least
///   `2^-149 / 2^65` for finite input);
/// * an `a` or a product `mean * a` that overflows: `p = mean A 2^-100`
///   (as `mean * (scale 2^-100 / r)` when `a` overflowed, `scale >= 2^53`
///   then; as `(mean 2^-100) a` otherwise, `|mean| > 1` then), and `b` is
///   `offset - p 2^100` or, when that product overflows too,
///   `(offset 2^-100 - p) 2^100` (an `offset` small enough to lose bits in
///   that scaling is below `ε` of `|mean A| >= 2^128`).
///
/// An infinite or NaN `mean` takes the same rescaled product, so that an
/// `a` that underflowed to 0 gives `b = ∓inf` as the exact `A` does, not
/// `inf * 0 = NaN`.
#[inline]
fn fold_f32(mean: f32, var: f32, scale: f32, offset: f32, eps: f32) -> (f32, f32) {
    const UP: f32 = f32::from_bits(227 << 23); // 2^100
    const DOWN: f32 = f32::from_bits(27 << 23); // 2^-100
    const BIG: f32 = f32::from_bits(155 << 23); // 2^28: UP * BIG overflows
    let mut sum = var + eps;
    let mut root = 1.0;
    if sum.is_infinite() && var.is_finite() && eps.is_finite() {
        (sum, root) = (var * 0.25 + eps * 0.25, 2.0);
    }
    let r = libm::sqrtf(sum) * root;
    let a = scale / r;
    let ma = mean * a;
    let rescalable = r > 0.0 && r.is_finite() && scale.is_finite();
    if !rescalable || (a.abs() >= f32::MIN_POSITIVE && ma.is_finite()) {
        return (a, offset - ma);
    }
    let b = if a.abs() < f32::MIN_POSITIVE {
        offset - mean * (scale * UP / r) * DOWN
    } else {
        let p = if a.is_infinite() {
            mean * (scale * DOWN / r)
        } else {
            mean * DOWN * a
        };
        if p.abs() < BIG {
            offset - p * UP
        } else {
            (offset * DOWN - p) * UP
        }
    };
    (a, b)
}

/// [`fold_span`] for the (one to four) channels from `c`, `a.len()` of them.
#[inline(always)]
fn fold4<V: Lane>(p: &Params<'_>, c: usize, a: &mut [f32], b: &mut [f32]) {
    // Channels `c .. c + a.len()` (one to four) exist on every call; a
    // missing one would read as 0 (`get`: no panic path).
    let m = a.len();
    let ch = |s: &[f32]| -> f64x4 {
        let s = s.get(c..).unwrap_or_default();
        if m == 4 {
            if let Some(v) = s.first_chunk::<4>() {
                return f64x4::new(v.map(|v| v as f64));
            }
        }
        let s = s.get(..m).unwrap_or(s);
        let mut t = [s.last().map_or(0.0, |&v| v as f64); 4];
        for (t, &v) in t.iter_mut().zip(s) {
            *t = v as f64;
        }
        f64x4::new(t)
    };
    let scale = p.scale.map_or(f64x4::splat(1.0), ch);
    let offset = p.offset.map_or(f64x4::splat(0.0), ch);
    let var = ch(p.variance) + f64x4::splat(p.epsilon as f64);
    let va = f64x4::new(V::quot_sqrt4(scale.to_array(), var.to_array()));
    let vb = offset - ch(p.mean) * va;
    let (va, vb) = (va.to_array(), vb.to_array());
    for ((a, b), (&va, &vb)) in a.iter_mut().zip(b.iter_mut()).zip(va.iter().zip(&vb)) {
        (*a, *b) = (va as f32, vb as f32);
    }
}

/// The parameters of [`normalize`], as `tf.nn.batch_normalization` takes
/// them: per-channel `mean` and `variance`, optional `scale` (1 when absent)
/// and `offset` (0 when absent), `epsilon` inside the square root, and a
/// fused activation.
///
/// ```
/// use batchnorm::{normalize, Activation, Params, Shape};
///
/// // Two channels, channels last: rows of (c0, c1).
/// let x = [1.0f32, 10.0, 3.0, 30.0];
/// let mut y = [0.0f32; 4];
/// let p = Params {
///     mean: &[2.0, 20.0],
///     variance: &[1.0, 100.0],
///     scale: Some(&[2.0, 1.0]),
///     offset: None,
///     epsilon: 1e-6,
///     activation: Activation::Relu,
/// };
/// normalize(&x, &mut y, Shape::rows(2, 2), &p)?;
/// // (x - mean) / sqrt(var + eps) * scale, then ReLU.
/// for (got, want) in y.iter().zip([0.0, 0.0, 2.0, 1.0]) {
///     assert!((got - want).abs() < 1e-5, "{got} {want}");
/// }
/// # Ok::<(), batchnorm::Error>(())
/// ```
#[derive(Clone, Copy, Debug)]
pub struct Params<'a> {
    /// Per-channel mean.
    pub mean: &'a [f32],
    /// Per-channel variance.
    pub variance: &'a [f32],
    /// Per-channel scale (`gamma`); `None` means 1.
    pub scale: Option<&'a [f32]>,
    /// Per-channel offset (`beta`); `None` means 0.
    pub offset: Option<&'a [f32]>,
    /// Added to the variance under the square root; finite and `> 0`.
    pub epsilon: f32,
    /// Applied to the normalized value.
    pub activation: Activation,
}

impl Params<'_> {
    pub(crate) fn validate(&self, shape: Shape) -> Result<(), Error> {
        shape.check_channels("mean", self.mean.len())?;
        shape.check_channels("variance", self.variance.len())?;
        if let Some(s) = self.scale {
            shape.check_channels("scale", s.len())?;
        }
        if let Some(o) = self.offset {
            shape.check_channels("offset", o.len())?;
        }
        check_epsilon(self.epsilon)?;
        self.activation.validate()
    }
}

/// Folds batch-norm parameters into per-channel `a` and `b` so that
/// `normalize(x) == x * a + b` (then [`affine`] applies them to any number
/// of tensors). `scale` defaults to 1 and `offset` to 0.
///
/// Errors (nothing written): a slice whose length differs from `mean`'s,
/// zero channels, or an `epsilon` that is not finite and positive.
///
/// Fold once, then run inference on many tensors with [`affine`]:
///
/// ```
/// use batchnorm::{affine, fold, Activation, Shape};
///
/// let (mean, var) = ([2.0f32, -1.0], [4.0f32, 0.25]);
/// let (mut a, mut b) = ([0.0f32; 2], [0.0f32; 2]);
/// fold(&mean, &var, None, Some(&[0.5, 0.0]), 1e-5, &mut a, &mut b)?;
/// // a = 1 / sqrt(var + eps), b = offset - mean * a
/// assert!((a[0] - 0.5).abs() < 1e-5 && (b[0] - (0.5 - 1.0)).abs() < 1e-5);
///
/// let shape = Shape::nchw(1, 2, 3); // batch 1, 2 channels, 3 positions
/// let x = [2.0f32, 4.0, 0.0, -1.0, -0.5, -1.5];
/// let mut y = [0.0f32; 6];
/// affine(&x, &mut y, shape, &a, &b, Activation::None)?;
/// assert!((y[1] - 1.5).abs() < 1e-4 && (y[4] - 1.0).abs() < 1e-4);
/// # Ok::<(), batchnorm::Error>(())
/// ```
pub fn fold(
    mean: &[f32],
    variance: &[f32],
    scale: Option<&[f32]>,
    offset: Option<&[f32]>,
    epsilon: f32,
    a: &mut [f32],
    b: &mut [f32],
) -> Result<(), Error> {
    let c = mean.len();
    let p = Params {
        mean,
        variance,
        scale,
        offset,
        epsilon,
        activation: Activation::None,
    };
    let shape = Shape::rows(1, c);
    shape.len()?;
    p.validate(shape)?;
    shape.check_channels("a", a.len())?;
    shape.check_channels("b", b.len())?;
    fold_span::<f32>(&p, 0, a, b);
    Ok(())
}

/// `y = activation(x * a[c] + b[c])` per channel `c`.
///
/// Errors (nothing written): `x`, `y`, `a` or `b` lengths that do not match
/// `shape`, a bad shape, or a bad `Clamp`.
pub fn affine(
    x: &[f32],
    y: &mut [f32],
    shape: Shape,
    a: &[f32],
    b: &[f32],
    activation: Activation,
) -> Result<(), Error> {
    Simd::detect().affine(x, y, shape, a, b, activation)
}

/// [`affine`] overwriting `x`.
pub fn affine_in_place(
    x: &mut [f32],
    shape: Shape,
    a: &[f32],
    b: &[f32],
    activation: Activation,
) -> Result<(), Error> {
    Simd::detect().affine_in_place(x, shape, a, b, activation)
}

/// `y = activation((x - mean) / sqrt(variance + epsilon) * scale + offset)`
/// per channel, like `tf.nn.batch_normalization` (folded on the fly, no
/// caller scratch).
///
/// Errors (nothing written): slice lengths that do not match `shape`, a bad
/// shape, a negative or non-finite `epsilon`, or a bad `Clamp`.
pub fn normalize(x: &[f32], y: &mut [f32], shape: Shape, params: &Params<'_>) -> Result<(), Error> {
    Simd::detect().normalize(x, y, shape, params)
}

/// [`normalize`] overwriting `x`.
pub fn normalize_in_place(x: &mut [f32], shape: Shape, params: &Params<'_>) -> Result<(), Error> {
    Simd::detect().normalize_in_place(x, shape, params)
}

impl Simd {
    /// [`affine`] with this lane width.
    pub fn affine(
        self,
        x: &[f32],
        y: &mut [f32],
        shape: Shape,
        a: &[f32],
        b: &[f32],
        activation: Activation,
    ) -> Result<(), Error> {
        shape.check("x", x.len())?;
        shape.check("y", y.len())?;
        check_affine(shape, a, b, activation)?;
        run(
            self,
            &mut Split::new(x, y),
            shape,
            Coef::Given { a, b },
            activation,
        );
        Ok(())
    }

    /// [`affine_in_place`] with this lane width.
    pub fn affine_in_place(
        self,
        x: &mut [f32],
        shape: Shape,
        a: &[f32],
        b: &[f32],
        activation: Activation,
    ) -> Result<(), Error> {
        shape.check("x", x.len())?;
        check_affine(shape, a, b, activation)?;
        run(
            self,
            &mut InPlace::new(x),
            shape,
            Coef::Given { a, b },
            activation,
        );
        Ok(())
    }

    /// [`normalize`] with this lane width.
    pub fn normalize(
        self,
        x: &[f32],
        y: &mut [f32],
        shape: Shape,
        params: &Params<'_>,
    ) -> Result<(), Error> {
        shape.check("x", x.len())?;
        shape.check("y", y.len())?;
        params.validate(shape)?;
        run_folded(self, &mut Split::new(x, y), shape, params);
        Ok(())
    }

    /// [`normalize_in_place`] with this lane width.
    pub fn normalize_in_place(
        self,
        x: &mut [f32],
        shape: Shape,
        params: &Params<'_>,
    ) -> Result<(), Error> {
        shape.check("x", x.len())?;
        params.validate(shape)?;
        run_folded(self, &mut InPlace::new(x), shape, params);
        Ok(())
    }
}

fn check_affine(shape: Shape, a: &[f32], b: &[f32], activation: Activation) -> Result<(), Error> {
    shape.check_channels("a", a.len())?;
    shape.check_channels("b", b.len())?;
    activation.validate()
}

/// Validated input: `normalize` with coefficients folded from `p`.
pub(crate) fn run_folded<IO: Io>(simd: Simd, io: &mut IO, shape: Shape, p: &Params<'_>) {
    run(simd, io, shape, Coef::Fold(p), p.activation);
}

/// Validated input: dispatch on width and activation.
pub(crate) fn run<IO: Io>(simd: Simd, io: &mut IO, shape: Shape, coef: Coef<'_>, act: Activation) {
    if COMPACT {
        // One kernel for every activation: `Band(lo, hi)` is
        // `if y < lo { lo } else { y }` then `if y > hi { hi } else { y }`,
        // and with `lo = -inf`, `hi = +inf` neither comparison is ever true
        // (NaN included), so it returns `y` bit for bit, signed zeros and
        // NaN payloads included: an exact identity, as `Band(0, +inf)` is
        // exactly `Floor(0)`. Two comparisons per element cost less flash
        // than four copies of every kernel.
        let (lo, hi) = match act {
            Activation::None => (f32::NEG_INFINITY, f32::INFINITY),
            Activation::Relu => (0.0, f32::INFINITY),
            Activation::Relu6 => (0.0, 6.0),
            Activation::Clamp { min, max } => (min, max),
        };
        return with_lane!(simd, V => layout::<V, _, IO>(io, shape, coef, Band(lo, hi)));
    }
    with_lane!(simd, V => match act {
        Activation::None => layout::<V, _, IO>(io, shape, coef, Identity),
        Activation::Relu => layout::<V, _, IO>(io, shape, coef, Floor(0.0)),
        Activation::Relu6 => layout::<V, _, IO>(io, shape, coef, Band(0.0, 6.0)),
        Activation::Clamp { min, max } => layout::<V, _, IO>(io, shape, coef, Band(min, max)),
    });
    if io.streams() {
        store_fence();
    }
}

fn layout<V: Lane, A: Act, IO: Io>(io: &mut IO, shape: Shape, coef: Coef<'_>, act: A) {
    enabled!(V => {
        let (n, s, c) = (shape.batch, shape.spatial, shape.channels);
        if n == 0 || s == 0 {
            return;
        }
        match shape.layout {
            Layout::Nchw if s >= V::WIDTH => {
                // Coefficients of a window of channels on the stack, then the
                // window's runs in memory order, batch element by batch element.
                let mut pa = [0.0f32; SEGMENT];
                let mut pb = [0.0f32; SEGMENT];
                let mut c0 = 0;
                while c0 < c {
                    let cw = (c - c0).min(SEGMENT);
                    coef.fill::<V>(c0, &mut pa[..cw], &mut pb[..cw]);
                    io.map_runs::<V, A>(c * s, c0 * s, s, &pa[..cw], &pb[..cw], act);
                    c0 += cw;
                }
            }
            Layout::Nchw => periodic::<V, A, IO>(io, c * s, s, n, coef, act),
            Layout::Nhwc => periodic::<V, A, IO>(io, c, 1, n * s, coef, act),
        }
    })
}

/// Shortest run, in vectors, that [`aligned_run`] aligns: a shorter one
/// would spend two end vectors on a body of one to three (not tuned; runs
/// of 49 elements, ResNet's 7 x 7 layers, stay as they are with sixteen
/// lanes).
const ALIGN_MIN_VECTORS: usize = 4;

/// Whether `n` elements go through `V` with aligned stores and an end
/// vector at each end ([`aligned_run`], and the same scheme in `backward`):
/// with eight and sixteen lanes, where a misaligned vector splits a cache
/// line on every access, and from [`ALIGN_MIN_VECTORS`] vectors on. A
/// constant `false` for narrower lanes (every firmware build).
#[inline(always)]
pub(crate) fn aligns<V: Lane>(n: usize) -> bool {
    V::WIDTH >= 8 && n >= ALIGN_MIN_VECTORS * V::WIDTH
}

/// One run as [`splat_run`], but with every store of its body aligned to
/// the vector (and every load too when `x` and `y` sit alike against the
/// vector size, as two buffers from one allocator usually do). With eight
/// and sixteen lanes a misaligned vector touches two cache lines on every
/// access: on an Intel Xeon with AVX-512 a read+write stream 64-byte
/// aligned ran 1.26-1.37x as fast as one 4 bytes off, and with this NCHW
/// normalization of misaligned buffers at 256 KiB ran about 1.2x as fast.
///
/// The elements before the first aligned vector and after the last are
/// covered by one whole (unaligned) vector at each end, overlapping the
/// body, so that every element goes through the same lanes whether the
/// buffers are aligned or not and the results do not depend on where they
/// sit. (Narrower lanes for a head or tail can round differently: the
/// scalar lane has no FMA, and the fuzz corpus has an exact cancellation
/// that it turns into 0.) Both end vectors are loaded before the body is
/// written and stored after it, which keeps the overlap right in place
/// too: the overlapped elements get the same value twice. Narrower lanes
/// (and every firmware build) skip this: the condition is a constant.
#[inline(always)]
fn aligned_run<V: Lane, A: Act>(x: Option<&[f32]>, y: &mut [f32], a: f32, b: f32, act: A) {
    let (w, n) = (V::WIDTH, y.len());
    // `x.len() == n` on every call.
    if !aligns::<V>(n) || x.is_some_and(|x| x.len() != n) {
        return splat_run::<V, A>(x, y, a, b, act);
    }
    let head = head_of::<V>(y);
    let end = head + (n - head) / w * w;
    let (va, vb) = (V::splat(a), V::splat(b));
    // Written out twice: a closure called twice went out of line, without
    // the lanes' target features.
    let src: &[f32] = x.unwrap_or(y);
    let first = act.apply(V::load(src).mul_add(va, vb));
    let last = act.apply(V::load(src.get(n - w..).unwrap_or_default()).mul_add(va, vb));
    let xb = match x {
        Some(x) => match x.get(head..end) {
            Some(xb) => Some(xb),
            None => return,
        },
        None => None,
    };
    let Some(yb) = y.get_mut(head..end) else {
        return;
    };
    vectors::<V, A>(xb, yb, va, vb, act);
    if head > 0 {
        first.store(y);
    }
    if end < n {
        last.store(y.get_mut(n - w..).unwrap_or_default());
    }
}

/// One run, `y = act(x * a + b)` (in place when `x` is `None`): whole
/// vectors with `chunks_exact`, then the tail through half-width lanes, as
/// slices (no range checks: a run of 65 elements with sixteen lanes, NCHW
/// C = 1000 at 256 KiB, is four vectors and one `f32`). A tail shorter than
/// the next width goes straight to the width that has a whole vector of it.
#[inline(always)]
fn splat_run<V: Lane, A: Act>(x: Option<&[f32]>, y: &mut [f32], a: f32, b: f32, act: A) {
    let w = V::WIDTH;
    if w > 1 && y.len() < w {
        // Nothing for this width (a run's tail, or a run shorter than a
        // vector): no loop set up at all.
        return splat_run::<V::Half, A>(x, y, a, b, act);
    }
    let (x_tail, y_tail) = vectors::<V, A>(x, y, V::splat(a), V::splat(b), act);
    if w > 1 && !y_tail.is_empty() {
        splat_run::<V::Half, A>(x_tail, y_tail, a, b, act);
    }
}

/// The whole vectors of a run (see [`splat_run`]); returns the tails.
#[inline(always)]
fn vectors<'x, 'y, V: Lane, A: Act>(
    x: Option<&'x [f32]>,
    y: &'y mut [f32],
    va: V,
    vb: V,
    act: A,
) -> (Option<&'x [f32]>, &'y mut [f32]) {
    let w = V::WIDTH;
    // Both slices are split at their common length of whole vectors once,
    // so that the loop is a `zip` of two `chunks_exact`: one counted loop,
    // which the compiler unrolls. Stepping one iterator and checking the
    // other each time left a loop of one vector and two branches per
    // iteration (NCHW C = 16 at 256 KiB with AVX2, runs of 128 vectors:
    // 0.69 of the roofline against 0.94 unrolled, AMD Zen 3). `x.len() ==
    // y.len()` on every call; the checked splits keep the panic path out.
    let n = x.map_or(y.len(), |x| x.len().min(y.len())) / w * w;
    let Some((y_head, y_tail)) = y.split_at_mut_checked(n) else {
        return (None, &mut []);
    };
    let x_tail = match x {
        Some(x) => {
            let Some((x_head, x_tail)) = x.split_at_checked(n) else {
                return (None, &mut []);
            };
            for (yc, xc) in y_head.chunks_exact_mut(w).zip(x_head.chunks_exact(w)) {
                act.apply(V::load(xc).mul_add(va, vb)).store(yc);
            }
            Some(x_tail)
        }
        None => {
            for yc in y_head.chunks_exact_mut(w) {
                act.apply(V::load(yc).mul_add(va, vb)).store(yc);
            }
            None
        }
    };
    (x_tail, y_tail)
}

/// `rows` rows of `pa.len()` elements, `stride` apart from `start`, with
/// per-element coefficients `pa`, `pb`; the rows' tails cascade through
/// narrower lanes once for all rows.
#[inline(always)]
fn pattern_rows<V: Lane, A: Act, IO: Io>(
    io: &mut IO,
    start: usize,
    rows: usize,
    stride: usize,
    pa: &[f32],
    pb: &[f32],
    act: A,
) {
    let whole = pa.len() / V::WIDTH * V::WIDTH;
    // `pb.len() == pa.len()` on every call.
    let (Some((pa, ta)), Some((pb, tb))) = (pa.split_at_checked(whole), pb.split_at_checked(whole))
    else {
        return;
    };
    // Inlined: with the long patterns' second caller the compiler left this
    // closure out of line, compiled without the lanes' instructions.
    let f = inlined(
        #[inline(always)]
        |x: V, a: V, b: V| act.apply(x.mul_add(a, b)),
    );
    io.map_pattern::<V>(start, rows, stride, pa, pb, f);
    if V::WIDTH > 1 && !ta.is_empty() {
        pattern_rows::<V::Half, A, IO>(io, start + whole, rows, stride, ta, tb, act);
    }
}

/// `rows` super-rows of `NV` vectors from element `start`, the pattern in
/// registers.
#[inline(always)]
fn super_rows<V: Lane, A: Act, IO: Io, const NV: usize>(
    io: &mut IO,
    start: usize,
    rows: usize,
    pa: &[f32],
    pb: &[f32],
    act: A,
) {
    let w = V::WIDTH;
    // `pa` and `pb` have `NV` vectors on every call.
    let (mut va, mut vb) = ([V::splat(0.0); NV], [V::splat(0.0); NV]);
    // Indexed rather than a `zip` of `chunks_exact`: left out of line (as
    // it was on x86-64, with every width compiled), `zip` divides by a
    // chunk size it cannot see.
    for (k, (va, vb)) in va.iter_mut().zip(vb.iter_mut()).enumerate() {
        let (a, b) = (pa.get(k * w..), pb.get(k * w..));
        (*va, *vb) = (V::load(a.unwrap_or(&[])), V::load(b.unwrap_or(&[])));
    }
    io.map_rows::<V, NV>(start, rows, &va, &vb, |x, a, b| act.apply(x.mul_add(a, b)));
}

/// Repeats the first `period` values of `p` over the rest of it, with
/// iterators (an indexed copy kept a bounds check on x86-64).
fn repeat(p: &mut [f32], period: usize) {
    let Some((first, rest)) = p.split_at_mut_checked(period) else {
        return;
    };
    for chunk in rest.chunks_mut(period.max(1)) {
        for (d, &v) in chunk.iter_mut().zip(first.iter()) {
            *d = v;
        }
    }
}

/// Periodic tensors: `rows` rows of `period` elements, position `p` of a
/// row in channel `p / div`.
fn periodic<V: Lane, A: Act, IO: Io>(
    io: &mut IO,
    period: usize,
    div: usize,
    rows: usize,
    coef: Coef<'_>,
    act: A,
) {
    enabled!(V => {
        // `None` (longer than any pattern) when `lcm` does not fit in `usize`.
        let lcm = crate::moments::lcm(period, V::WIDTH);
        let long = |l: usize| l <= LONG_SEGMENT && rows * period / LONG_SUPERS_MIN >= l;
        if let Some(lcm) = lcm.filter(|&l| l <= SEGMENT) {
            let mut pa = Line([0.0f32; SEGMENT]);
            let mut pb = Line([0.0f32; SEGMENT]);
            supers::<V, A, IO>(io, (period, div, rows, lcm), coef, act, (&mut pa.0, &mut pb.0));
        } else if !SMALL_STACK && lcm.is_some_and(long) {
            long_rows::<V, A, IO>(io, period, div, rows, coef, act, lcm);
        } else if let (Coef::Given { a, b }, 1) = (coef, div) {
            // Long channels-last rows: the caller's coefficients are the pattern.
            pattern_rows::<V, A, IO>(io, 0, rows, period, a, b, act);
        } else if !SMALL_STACK && period > SEGMENT {
            long_rows::<V, A, IO>(io, period, div, rows, coef, act, None);
        } else {
            let mut pa = Line([0.0f32; SEGMENT]);
            let mut pb = Line([0.0f32; SEGMENT]);
            sweep::<V, A, IO>(io, period, div, rows, coef, act, (&mut pa.0, &mut pb.0));
        }
    })
}

/// Periodic rows whose super-row of `lcm` elements fits the pattern `pa`,
/// `pb`: super-rows share one pattern; the partial last super-row uses a
/// prefix of it.
#[inline(always)]
fn supers<V: Lane, A: Act, IO: Io>(
    io: &mut IO,
    (period, div, rows, lcm): (usize, usize, usize, usize),
    coef: Coef<'_>,
    act: A,
    (pa, pb): (&mut [f32], &mut [f32]),
) {
    // `1 <= period <= lcm <= pa.len()` on every call: the `min`s and `max`es
    // only let the compiler see it.
    let lcm = lcm.min(pa.len()).min(pb.len());
    let period = period.min(lcm).max(1);
    let (Some(pa), Some(pb)) = (pa.get_mut(..lcm), pb.get_mut(..lcm)) else {
        return;
    };
    let (Some(fa), Some(fb)) = (pa.get_mut(..period), pb.get_mut(..period)) else {
        return;
    };
    coef.fill_positions::<V>(0, div, fa, fb);
    repeat(pa, period);
    repeat(pb, period);
    let per = (lcm / period).max(1);
    let total = rows * period;
    if aligns::<V>(total) && total >= lcm {
        aligned_supers::<V, A, IO>(io, total, (pa, pb), act);
        return;
    }
    let supers = rows / per;
    some_supers::<V, A, IO>(io, 0, supers, (pa, pb), act);
    // Fewer than `per` rows are left, less than one pattern.
    let left = ((rows - supers * per) * period).min(lcm);
    pattern_rows::<V, A, IO>(io, supers * lcm, 1, 0, &pa[..left], &pb[..left], act);
}

/// Fewest super-rows for [`long_rows`]' long pattern, whose fill is a pass
/// over up to [`LONG_SEGMENT`] coefficients. NHWC C = 1000 `affine` (two
/// rows a super-row), one row at a time against the long pattern: 4 rows
/// 59-64 against 36 GB/s, 16 rows 77 against 65-67, 32 rows even (76-81),
/// 49 rows 66-70 against 96-99 (AMD Zen 5, `benches/README.md`).
const LONG_SUPERS_MIN: usize = 16;

/// `supers` super-rows of the pattern `pa`, `pb` (whole vectors) from
/// element `start`.
#[inline(always)]
fn some_supers<V: Lane, A: Act, IO: Io>(
    io: &mut IO,
    start: usize,
    supers: usize,
    (pa, pb): (&[f32], &[f32]),
    act: A,
) {
    // A compact build keeps the flash of the register kernels for the
    // shortest patterns only (one to four vectors: one to four channels,
    // RGB included); 0 takes the last arm.
    let lcm = pa.len();
    let nv = if COMPACT && lcm / V::WIDTH > 4 {
        0
    } else {
        lcm / V::WIDTH
    };
    match nv {
        // A short pattern lives in registers: one load per vector.
        1 => super_rows::<V, A, IO, 1>(io, start, supers, pa, pb, act),
        2 => super_rows::<V, A, IO, 2>(io, start, supers, pa, pb, act),
        3 => super_rows::<V, A, IO, 3>(io, start, supers, pa, pb, act),
        4 => super_rows::<V, A, IO, 4>(io, start, supers, pa, pb, act),
        5 => super_rows::<V, A, IO, 5>(io, start, supers, pa, pb, act),
        6 => super_rows::<V, A, IO, 6>(io, start, supers, pa, pb, act),
        7 => super_rows::<V, A, IO, 7>(io, start, supers, pa, pb, act),
        8 => super_rows::<V, A, IO, 8>(io, start, supers, pa, pb, act),
        16 => super_rows::<V, A, IO, 16>(io, start, supers, pa, pb, act),
        _ => pattern_rows::<V, A, IO>(io, start, supers, lcm, pa, pb, act),
    }
}

/// A periodic tensor of `total` elements (at least one pattern and
/// [`ALIGN_MIN_VECTORS`] vectors) with every store of its body aligned to
/// the vector, as [`aligned_run`] does for a run: the super-rows start at
/// the output's first aligned element, with the pattern rotated to match,
/// and one whole vector at each end, loaded first and stored last, covers
/// the elements before and after them. Every element goes through the
/// same lanes wherever the buffers sit (and the tail no longer through
/// narrower ones).
#[inline(always)]
fn aligned_supers<V: Lane, A: Act, IO: Io>(
    io: &mut IO,
    total: usize,
    (pa, pb): (&mut [f32], &mut [f32]),
    act: A,
) {
    let (w, lcm) = (V::WIDTH, pa.len().min(pb.len()));
    let (head, last) = (io.head::<V>(), total - w);
    // The last vector's coefficients: its positions may wrap around the
    // pattern's end. (`lcm >= w >= 8` and `head < w` on every call.)
    let (mut la, mut lb) = ([0.0f32; 16], [0.0f32; 16]);
    for (j, (a, b)) in la.iter_mut().zip(lb.iter_mut()).take(w).enumerate() {
        let p = (last + j) % lcm.max(1);
        (*a, *b) = (
            pa.get(p).copied().unwrap_or(0.0),
            pb.get(p).copied().unwrap_or(0.0),
        );
    }
    // Written out twice, not as a closure (see `aligned_run`).
    let first = act.apply(io.load_at::<V>(0).mul_add(V::load(pa), V::load(pb)));
    let end = act.apply(io.load_at::<V>(last).mul_add(V::load(&la), V::load(&lb)));
    pa.rotate_left(head.min(lcm));
    pb.rotate_left(head.min(lcm));
    let supers = (total - head) / lcm.max(1);
    some_supers::<V, A, IO>(io, head, supers, (pa, pb), act);
    // Less than a pattern is left; its whole vectors, then the end vector.
    let done = head + supers * lcm;
    let whole = ((total - done) / w * w).min(lcm);
    if let (Some(a), Some(b)) = (pa.get(..whole), pb.get(..whole)) {
        pattern_rows::<V, A, IO>(io, done, 1, 0, a, b, act);
    }
    if head > 0 {
        io.store_at::<V>(0, first);
    }
    if done + whole < total {
        io.store_at::<V>(last, end);
    }
}

/// Rows longer than a pattern: one segment of `pa.len()` positions at a
/// time, swept over every row.
#[inline(always)]
fn sweep<V: Lane, A: Act, IO: Io>(
    io: &mut IO,
    period: usize,
    div: usize,
    rows: usize,
    coef: Coef<'_>,
    act: A,
    (pa, pb): (&mut [f32], &mut [f32]),
) {
    let seg = pa.len().min(pb.len());
    let mut p0 = 0;
    while p0 < period {
        let len = (period - p0).min(seg);
        // `get_mut` (no panic path); an empty segment would not advance.
        let (Some(a), Some(b)) = (pa.get_mut(..len), pb.get_mut(..len)) else {
            return;
        };
        if len == 0 {
            return;
        }
        coef.fill_positions::<V>(p0, div, a, b);
        pattern_rows::<V, A, IO>(io, p0, rows, period, a, b, act);
        p0 += len;
    }
}

/// Periodic rows on x86-64 and aarch64 whose pattern needs more than
/// [`SEGMENT`] positions, with patterns of [`LONG_SEGMENT`], in a frame of
/// its own, so that only these rows clear the larger arrays (16 KiB); never
/// reached where stacks are small. With `lcm`, a super-row of that many
/// positions fits (NHWC C = 1000 with sixteen lanes: two rows), on a tensor
/// of at least [`LONG_SUPERS_MIN`] of them: [`supers`], so that every row's
/// stores are aligned. Rows one at a time alternated between aligned and
/// half a line off, and the caller's coefficients, loaded directly, were
/// wherever its allocator put them. Without, rows of more than [`SEGMENT`]
/// positions go in segments of [`LONG_SEGMENT`] ([`sweep`]).
#[inline(never)]
fn long_rows<V: Lane, A: Act, IO: Io>(
    io: &mut IO,
    period: usize,
    div: usize,
    rows: usize,
    coef: Coef<'_>,
    act: A,
    lcm: Option<usize>,
) {
    enabled!(V => {
        let mut pa = Line([0.0f32; LONG_SEGMENT]);
        let mut pb = Line([0.0f32; LONG_SEGMENT]);
        let pattern = (&mut pa.0[..], &mut pb.0[..]);
        match lcm {
            Some(lcm) => supers::<V, A, IO>(io, (period, div, rows, lcm), coef, act, pattern),
            None => sweep::<V, A, IO>(io, period, div, rows, coef, act, pattern),
        }
    })
}
