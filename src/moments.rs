//! Per-channel moments in one pass: shifted block sums in SIMD registers,
//! blocks merged with Chan's formula.
//!
//! # Algorithm
//!
//! Every lane of every accumulator vector is pinned to one *position* (a
//! fixed place in a row, hence one channel) for the whole pass. Within a
//! *block* of rows a lane accumulates, in `f32`, `s = Σ(x - K)` and
//! `q = Σ(x - K)²` around a shift `K`: three vector operations per element
//! vector (sub, add, fused multiply-add), no division and no dependency
//! between elements beyond the accumulator. At the end of a block the sums
//! are turned, in `f64`, into the block's `(count, mean, m2)` and merged into
//! a running `f64` record with [`merge`](Acc::merge) (Chan et al., 1979).
//! The shift for the next block is the running mean, so `x - K` stays of the
//! order of the standard deviation and the shifted sums do not cancel,
//! however large the common offset (`1e6 + N(0, 1)` included). Panel walks
//! start with a block of one row and grow fourfold up to [`BLOCK_ROWS`], so
//! even an outlier in the first element does not leave a poor shift in place
//! for long; NCHW runs start with a block of a whole piece, shifted by its
//! first element or, when that is an outlier, by its mean ([`first_block`]).
//!
//! # Layouts
//!
//! * NHWC, and NCHW with fewer spatial positions than lanes, are *periodic*:
//!   position `p` of the flat tensor belongs to channel `(p mod P) / S`
//!   (`P = C`, `S = 1` for NHWC; `P = C * S` for NCHW). Rows are grouped
//!   into super-rows of `lcm(P, lanes)` elements so that every lane stays on
//!   one position and all lanes are used, even for an RGB input (`C = 3`).
//!   A super-row of up to `2 * Lane::SLOTS` vectors (C = 256 with AVX-512)
//!   is summed whole in registers and read in memory order, the one access
//!   pattern the hardware prefetchers follow at DRAM size. A wider one is
//!   read in *panels*: each column group (at most `Lane::SLOTS` vectors)
//!   sums its columns of the panel in registers and adds the sums to
//!   per-position `f32` block sums in memory, then the next group takes the
//!   next columns of the same rows, so the tensor is read once. Each
//!   position keeps its own record; a channel's positions are merged when
//!   the walk ends, with the rows left after the last whole super-row
//!   (fewer than one super-row) summed exactly in `f64`. A super-row of up to
//!   [`WINDOW`] positions is one window; a longer row is split into windows
//!   of whole channels, one pass each. A window whose length is not a
//!   multiple of the width ends with a vector that overlaps the one before;
//!   its duplicated lanes are not counted.
//! * NCHW with at least one vector of spatial positions is a set of
//!   contiguous runs: windows of up to [`GROUP_CHANNELS`] channels are walked
//!   batch element by batch element (memory order), each run reduced by a
//!   short loop with `RUN_SLOTS` accumulators into its channel's block sums.
//!   A channel's first block is its first piece (its first run, or the first
//!   `min(INNER_ROWS * RUN_SLOTS * lanes, RUN_PIECE)` elements of a longer
//!   one), shifted by its first element, or by its mean when that element
//!   is an outlier ([`first_block`]).
//!
//! Short column groups unroll over several rows, so a kernel always has
//! `SLOTS` independent dependency chains.
//!
//! # Stack
//!
//! Runs use one [`Group`]: for at most [`GROUP_CHANNELS`] = 128 channels, an
//! `f64` record (24 bytes), a shift (4) and the block's `f64` sums and count
//! (24), 6.5 KiB in all. A panel walk uses one [`Window`]: per position,
//! `f32` block sums and a shift (12 bytes) and an `f64` mean and `m2` (16
//! bytes), for 160 positions (4.4 KiB) when `lcm(P, lanes) <= 128` (C = 1,
//! 2, 3, 4, 7, 8, 16, 32, 64 and 128 on every width, for example), else for
//! 1056 positions (29 KiB). Only one of them is live at a time. A panel
//! kernel holds at most `2 * 16` sum vectors (2 KiB with AVX-512 lanes),
//! in registers but for the few the compiler spills. Nothing depends on the
//! tensor's size. No heap.
//!
//! # Domain
//!
//! For finite inputs with `|x| <= 1e17` every intermediate is finite and the
//! DESIGN §3 bounds hold. A NaN or infinity in a channel makes that channel's
//! variance NaN and its mean NaN or infinite; no other channel is affected.

use crate::error::Error;
use crate::lanes::{with_lane, Lane, Simd};
use crate::shape::{Layout, Shape};
use crate::Variance;

/// Rows per block once warmed up: `f32` block sums of this many rows keep a
/// relative rounding error near `sqrt(BLOCK_ROWS) * f32::EPSILON`, and the
/// per-block `f64` merge costs under 2% of the block's vector work.
pub const BLOCK_ROWS: usize = 2048;

/// Smallest block on the contiguous-run (NCHW) path after a channel's first.
/// A channel's first block is its first piece, shifted by its first element
/// unless that is an outlier ([`first_block`]); later blocks are shifted by
/// the mean of everything before and grow threefold of what was seen (at
/// least this, at most [`RUN_PIECE`]), so an outlier early in the channel
/// moves the shift of only a few elements far (tests/moments_sweep.rs
/// `outlier_first_element` pins it).
const WARM_UP: usize = 16;

/// Rows a lane sums in registers before the sum joins the block's: bounds
/// the `f32` rounding of one sum to about `INNER_ROWS * ε / 2` even when
/// every add rounds the same way, as it does for runs of equal values. 256
/// broke the §3 mean bound by 1.2x (128 by 1.1x) on values of ±1e17 that
/// change sign halfway through a block (tests/moments_sweep.rs
/// `sums_of_squares_stay_finite_at_the_domain_edge`).
const INNER_ROWS: usize = 64;

/// Channels whose NCHW runs are walked together, batch element by batch
/// element (their records and block sums are on the stack).
pub const GROUP_CHANNELS: usize = 128;

/// Largest `SLOTS` of any lane type.
const MAX_SLOTS: usize = 8;

/// Most whole vectors a super-row may have and still be summed by one
/// register group, read in memory order (see [`walk`]).
const fn one_group<V: Lane>() -> usize {
    2 * V::SLOTS
}

/// Register sums one panel kernel keeps of each kind: `SLOTS` rows of a
/// short group, or one row of up to [`one_group`] vectors.
const MAX_SUMS: usize = 2 * MAX_SLOTS;

const _: () = assert!(
    one_group::<f32>() <= MAX_SUMS
        && one_group::<wide::f32x4>() <= MAX_SUMS
        && one_group::<wide::f32x8>() <= MAX_SUMS
        && one_group::<wide::f32x16>() <= MAX_SUMS
);

/// A channel's running statistics in `f64`: the crate's one implementation of
/// Chan's parallel merge.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Acc {
    pub(crate) n: u64,
    pub(crate) mean: f64,
    pub(crate) m2: f64,
}

impl Acc {
    /// Chan, Golub and LeVeque's pairwise update:
    /// `mean = mean_a + δ n_b / n`, `m2 = m2_a + m2_b + δ² n_a n_b / n`, with
    /// `δ = mean_b - mean_a`. Exact for empty sides; NaN and infinities
    /// propagate.
    #[inline]
    pub(crate) fn merge(self, o: Acc) -> Acc {
        if o.n == 0 {
            return self;
        }
        if self.n == 0 {
            return o;
        }
        self.merge_weighted(o, o.n as f64 / (self.n + o.n) as f64)
    }

    /// [`merge`](Acc::merge) of two non-empty records with the weight
    /// `wb = o.n / (self.n + o.n)` already computed.
    #[inline]
    fn merge_weighted(self, o: Acc, wb: f64) -> Acc {
        let delta = o.mean - self.mean;
        Acc {
            n: self.n + o.n,
            mean: self.mean + delta * wb,
            m2: self.m2 + o.m2 + delta * delta * self.n as f64 * wb,
        }
    }

    /// The record of a block of `n` elements from its sums around `shift`,
    /// `s1 = Σ(x - shift)` and `s2 = Σ(x - shift)²`; `inv` is `1 / n`.
    #[inline(always)]
    fn from_shifted(n: u64, inv: f64, shift: f32, s1: f64, s2: f64) -> Acc {
        let d = s1 * inv;
        let m2 = s2 - s1 * d;
        // Rounding can leave a hair below zero for a constant channel; `<`
        // keeps a NaN.
        let m2 = if m2 < 0.0 { 0.0 } else { m2 };
        Acc {
            n,
            mean: shift as f64 + d,
            m2,
        }
    }

    /// Population variance `m2 / n` (callers ensure `n > 0`).
    #[inline]
    pub(crate) fn variance(self, kind: Variance) -> f64 {
        let d = match kind {
            Variance::Population => self.n,
            // TensorFlow's clamp: the Bessel factor is 1 at n == 1.
            Variance::Sample => self.n.saturating_sub(1).max(1),
        };
        self.m2 / d as f64
    }
}

/// Mergeable per-channel statistics: `count`, `mean` and `m2 = Σ(x - mean)²`.
///
/// The fields are `f64` because the record is an interchange format: an
/// `f32` `m2` overflows on in-domain data (40,000 values of ±1e17 have
/// `m2 ≈ 4e38`), and a chain of merges through `f32` fields loses the
/// DESIGN §3 bounds once `|mean|` is far beyond `1e4 σ`. A record built by
/// [`accumulate`] holds exactly the `f64` state the kernel keeps, so streamed
/// and tree-merged records give the moments of one pass.
///
/// `#[repr(C)]` and [`bytemuck::Pod`], 24 bytes with no padding (`count`,
/// then `mean`, then `m2`, each little-endian on the wire when sent with
/// [`Moments::to_le_bytes`]), so records can be sent as bytes between
/// threads, processes or the workers of a distributed job (through its own
/// all-gather) and merged on arrival:
///
/// ```
/// use batchnorm::{accumulate, Moments, Shape};
/// let x: Vec<f32> = (0..600).map(|i| (i % 7) as f32).collect();
/// let (a, b) = x.split_at(300);
/// let mut left = [Moments::EMPTY; 3];
/// let mut right = [Moments::EMPTY; 3];
/// accumulate(a, Shape::rows(100, 3), &mut left)?;
/// accumulate(b, Shape::rows(100, 3), &mut right)?;
/// // what a worker sends: 24 bytes per channel
/// let wire: Vec<u8> = right.iter().flat_map(|m| m.to_le_bytes()).collect();
/// let mut whole = [Moments::EMPTY; 3];
/// accumulate(&x, Shape::rows(200, 3), &mut whole)?;
/// for (c, bytes) in wire.chunks_exact(24).enumerate() {
///     let received = Moments::from_le_bytes(bytes.try_into().unwrap());
///     let merged = left[c].merge(received)?;
///     assert_eq!(merged.count, whole[c].count);
///     assert!((merged.mean - whole[c].mean).abs() < 1e-12);
/// }
/// # Ok::<(), batchnorm::Error>(())
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Moments {
    /// Number of elements seen.
    pub count: u64,
    /// Their mean (0 when `count == 0`).
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
}

impl Moments {
    /// The record of no elements.
    pub const EMPTY: Moments = Moments {
        count: 0,
        mean: 0.0,
        m2: 0.0,
    };

    /// Size of a record on the wire.
    pub const BYTES: usize = 24;

    /// Merges two records with Chan's formula: the result is the record of
    /// both element sets, whichever order they are merged in (up to `f64`
    /// rounding).
    ///
    /// Errors: [`Error::CountOverflow`] when the counts add up to more than
    /// `u64::MAX` (nothing wraps).
    ///
    /// ```
    /// use batchnorm::{Error, Moments};
    /// let a = Moments { count: 2, mean: 1.0, m2: 2.0 }; // {0, 2}
    /// let b = Moments { count: 1, mean: 4.0, m2: 0.0 }; // {4}
    /// let ab = a.merge(b)?;
    /// assert_eq!((ab.count, ab.mean, ab.m2), (3, 2.0, 8.0));
    /// let full = Moments { count: u64::MAX, ..a };
    /// assert_eq!(full.merge(b), Err(Error::CountOverflow));
    /// # Ok::<(), Error>(())
    /// ```
    pub fn merge(self, other: Moments) -> Result<Moments, Error> {
        if self.count.checked_add(other.count).is_none() {
            return Err(Error::CountOverflow);
        }
        Ok(Moments::from(Acc::from(self).merge(Acc::from(other))))
    }

    /// The mean, or [`Error::EmptyBatch`] for an empty record.
    pub fn mean(&self) -> Result<f64, Error> {
        if self.count == 0 {
            return Err(Error::EmptyBatch);
        }
        Ok(self.mean)
    }

    /// The population variance `m2 / count` or the sample variance
    /// `m2 / (count - 1)` (factor 1 at `count == 1`, as TensorFlow clamps it),
    /// or [`Error::EmptyBatch`] for an empty record.
    ///
    /// ```
    /// use batchnorm::{Moments, Variance};
    /// let r = Moments { count: 4, mean: 0.0, m2: 12.0 };
    /// assert_eq!(r.variance(Variance::Population), Ok(3.0));
    /// assert_eq!(r.variance(Variance::Sample), Ok(4.0));
    /// ```
    pub fn variance(&self, kind: Variance) -> Result<f64, Error> {
        if self.count == 0 {
            return Err(Error::EmptyBatch);
        }
        Ok(Acc::from(*self).variance(kind))
    }

    /// The record as 24 little-endian bytes: `count`, `mean`, `m2`.
    pub fn to_le_bytes(&self) -> [u8; 24] {
        let words = [
            self.count.to_le_bytes(),
            self.mean.to_le_bytes(),
            self.m2.to_le_bytes(),
        ];
        bytemuck::cast(words)
    }

    /// The record from [`to_le_bytes`](Moments::to_le_bytes)'s layout.
    pub fn from_le_bytes(bytes: [u8; 24]) -> Moments {
        let [count, mean, m2]: [[u8; 8]; 3] = bytemuck::cast(bytes);
        Moments {
            count: u64::from_le_bytes(count),
            mean: f64::from_le_bytes(mean),
            m2: f64::from_le_bytes(m2),
        }
    }

    /// Merges `other[c]` into `into[c]` for every channel `c`: bit for bit
    /// `into[c] = into[c].merge(other[c])?`, but the merge weight's division
    /// is done once per distinct pair of counts (every channel of a chunk
    /// has the same count), which makes merging the records of many chunks,
    /// threads or workers cheap for wide layers.
    ///
    /// Errors (nothing written): slices of different lengths, or
    /// [`Error::CountOverflow`] when some channel's counts add up past
    /// `u64::MAX`.
    ///
    /// ```
    /// use batchnorm::Moments;
    /// let mut mine = [Moments { count: 2, mean: 1.0, m2: 2.0 }; 2];
    /// let theirs = [Moments { count: 1, mean: 4.0, m2: 0.0 }; 2];
    /// Moments::merge_slice(&mut mine, &theirs)?;
    /// assert_eq!(mine[1], Moments { count: 3, mean: 2.0, m2: 8.0 });
    /// # Ok::<(), batchnorm::Error>(())
    /// ```
    pub fn merge_slice(into: &mut [Moments], other: &[Moments]) -> Result<(), Error> {
        crate::error::check_len("other", other.len(), into.len())?;
        let mut pairs = into.iter().zip(other);
        if pairs.any(|(a, b)| a.count.checked_add(b.count).is_none()) {
            return Err(Error::CountOverflow);
        }
        let mut w = Weights::default();
        for (a, &b) in into.iter_mut().zip(other) {
            let (x, y) = (Acc::from(*a), Acc::from(b));
            let merged = if y.n == 0 {
                x
            } else if x.n == 0 {
                y
            } else {
                x.merge_weighted(y, w.weight(x.n, y.n))
            };
            *a = Moments::from(merged);
        }
        Ok(())
    }
}

const _: () = assert!(core::mem::size_of::<Moments>() == Moments::BYTES);

impl From<Acc> for Moments {
    fn from(a: Acc) -> Moments {
        Moments {
            count: a.n,
            mean: a.mean,
            m2: a.m2,
        }
    }
}

impl From<Moments> for Acc {
    fn from(m: Moments) -> Acc {
        Acc {
            n: m.count,
            mean: m.mean,
            m2: m.m2,
        }
    }
}

/// Per-channel mean and population variance, like `tf.nn.moments` over every
/// axis but the channel axis.
///
/// `mean` and `variance` have one entry per channel. Errors (nothing written):
/// a slice length that does not match `shape`, zero channels, an overflowing
/// shape, or [`Error::EmptyBatch`] when `batch * spatial == 0`.
///
/// ```
/// use batchnorm::{moments, Shape};
/// // two rows of an RGB image with one pixel each
/// let x = [1.0, 10.0, 100.0, 3.0, 30.0, 300.0];
/// let (mut mean, mut var) = ([0.0; 3], [0.0; 3]);
/// moments(&x, Shape::nhwc(2, 1, 3), &mut mean, &mut var).unwrap();
/// assert_eq!(mean, [2.0, 20.0, 200.0]);
/// assert_eq!(var, [1.0, 100.0, 10000.0]);
/// ```
pub fn moments(
    x: &[f32],
    shape: Shape,
    mean: &mut [f32],
    variance: &mut [f32],
) -> Result<(), Error> {
    Simd::detect().moments(x, shape, mean, variance)
}

/// Adds the statistics of `x` to the per-channel records `into`, so that a
/// batch streamed in chunks, split across threads or across workers gives the
/// moments of one pass over the whole batch.
///
/// An empty chunk (`batch * spatial == 0`) leaves the records as they are.
/// Errors (nothing written): a slice length that does not match `shape`, zero
/// channels, an overflowing shape, or [`Error::CountOverflow`] when a
/// record's count would pass `u64::MAX`.
pub fn accumulate(x: &[f32], shape: Shape, into: &mut [Moments]) -> Result<(), Error> {
    Simd::detect().accumulate(x, shape, into)
}

impl Simd {
    /// [`moments`] with this lane width (every width works on every
    /// machine; widths the build does not run natively are emulated by
    /// `wide`).
    pub fn moments(
        self,
        x: &[f32],
        shape: Shape,
        mean: &mut [f32],
        variance: &mut [f32],
    ) -> Result<(), Error> {
        shape.check("x", x.len())?;
        shape.check_channels("mean", mean.len())?;
        shape.check_channels("variance", variance.len())?;
        if shape.count()? == 0 {
            return Err(Error::EmptyBatch);
        }
        mean_variance(self, x, shape, mean, variance);
        Ok(())
    }

    /// [`accumulate`] with this lane width.
    pub fn accumulate(self, x: &[f32], shape: Shape, into: &mut [Moments]) -> Result<(), Error> {
        shape.check("x", x.len())?;
        shape.check_channels("into", into.len())?;
        let count = shape.count()? as u64;
        if count == 0 {
            return Ok(());
        }
        if into.iter().any(|m| m.count.checked_add(count).is_none()) {
            return Err(Error::CountOverflow);
        }
        run(self, x, shape, &mut |c, acc| {
            if let Some(m) = into.get_mut(c) {
                *m = Moments::from(Acc::from(*m).merge(acc));
            }
        });
        Ok(())
    }
}

/// Every channel's mean and population variance. `shape` is validated,
/// `x.len() == shape.len()`, `count > 0`, and `mean` and `variance` have one
/// entry per channel. Every channel has `count` elements, so the variance
/// is `m2` times one reciprocal: a division per channel took about a fifth
/// of the time of NHWC C = 1000 at 256 KiB.
pub(crate) fn mean_variance(
    simd: Simd,
    x: &[f32],
    shape: Shape,
    mean: &mut [f32],
    variance: &mut [f32],
) {
    let inv = 1.0 / (shape.batch * shape.spatial) as f64;
    run(simd, x, shape, &mut |c, acc| {
        mean[c] = acc.mean as f32;
        variance[c] = (acc.m2 * inv) as f32;
    });
}

/// Computes every channel's record and hands it to `emit` exactly once per
/// channel. `shape` is validated, `x.len() == shape.len()`, `count > 0`.
pub(crate) fn run(simd: Simd, x: &[f32], shape: Shape, emit: &mut impl FnMut(usize, Acc)) {
    with_lane!(simd, V => dispatch::<V>(x, shape, emit))
}

fn dispatch<V: Lane>(x: &[f32], shape: Shape, emit: &mut impl FnMut(usize, Acc)) {
    let (n, s, c) = (shape.batch, shape.spatial, shape.channels);
    match shape.layout {
        Layout::Nhwc => periodic::<V>(x, c, 1, n * s, emit),
        Layout::Nchw if s < V::WIDTH => periodic::<V>(x, c * s, s, n, emit),
        Layout::Nchw => runs::<V>(x, n, c, s, emit),
    }
}

/// Per-channel state of one window of NCHW runs: records, shifts and the
/// `f64` sums of the current block, for channels `c0 .. c0 + GROUP_CHANNELS`.
struct Group {
    acc: [Acc; GROUP_CHANNELS],
    shift: [f32; GROUP_CHANNELS],
    s1: [f64; GROUP_CHANNELS],
    s2: [f64; GROUP_CHANNELS],
    n: [u64; GROUP_CHANNELS],
}

impl Group {
    fn new() -> Group {
        Group {
            acc: [Acc::default(); GROUP_CHANNELS],
            shift: [0.0; GROUP_CHANNELS],
            s1: [0.0; GROUP_CHANNELS],
            s2: [0.0; GROUP_CHANNELS],
            n: [0; GROUP_CHANNELS],
        }
    }

    /// Forgets channels `0..channels` (the only ones a window touched).
    fn clear(&mut self, channels: usize) {
        for c in 0..channels {
            self.acc[c] = Acc::default();
            self.shift[c] = 0.0;
        }
    }

    /// Adds one run's shifted sums of `len` elements to channel `c`'s block.
    #[inline(always)]
    fn add_sums(&mut self, c: usize, (s1, s2): (f64, f64), len: usize) {
        self.s1[c] += s1;
        self.s2[c] += s2;
        self.n[c] += len as u64;
    }

    /// Turns the block sums of each touched channel into a block record and
    /// merges it; the channel's new mean becomes its shift.
    fn end_block(&mut self, channels: usize, w: &mut Weights) {
        for c in 0..channels {
            self.end_channel(c, w);
        }
    }

    fn end_channel(&mut self, c: usize, w: &mut Weights) {
        let n = self.n[c];
        if n == 0 {
            return;
        }
        let block = Acc::from_shifted(n, w.recip(n), self.shift[c], self.s1[c], self.s2[c]);
        let a = self.acc[c];
        self.acc[c] = if a.n == 0 {
            block
        } else {
            a.merge_weighted(block, w.weight(a.n, n))
        };
        self.shift[c] = self.acc[c].mean as f32;
        self.s1[c] = 0.0;
        self.s2[c] = 0.0;
        self.n[c] = 0;
    }
}

/// The divisions of a block end, cached: the channels of one group nearly
/// always share their counts, so `1 / n` and the merge weight are computed
/// once per distinct count rather than per channel.
#[derive(Default)]
struct Weights {
    n: u64,
    inv: f64,
    a: u64,
    b: u64,
    wb: f64,
}

impl Weights {
    fn recip(&mut self, n: u64) -> f64 {
        if n != self.n {
            (self.n, self.inv) = (n, 1.0 / n as f64);
        }
        self.inv
    }

    /// `b / (a + b)`, the weight of the new block in Chan's merge.
    fn weight(&mut self, a: u64, b: u64) -> f64 {
        if (a, b) != (self.a, self.b) {
            (self.a, self.b, self.wb) = (a, b, b as f64 / (a + b) as f64);
        }
        self.wb
    }
}

/// The shifted sums of one row: `s += x - k`, `q += (x - k)²`, three
/// vector operations per vector of input.
#[inline(always)]
fn add_row<V: Lane, const NV: usize>(s: &mut [V], q: &mut [V], row: [V; NV], k: &[V; NV]) {
    for ((x, kv), (sv, qv)) in row.iter().zip(k).zip(s.iter_mut().zip(q.iter_mut())) {
        // `k - x`, not `x - k`: `x` is then the operand an x86 subtraction
        // may take straight from memory, so a group of up to eight vectors
        // keeps its shifts in registers instead of reloading them every row
        // (a sixteen-vector group has no registers left for them).
        // Negation is exact, so `s` and `q` are bit-identical.
        let d = kv.sub(*x);
        *sv = sv.sub(d);
        *qv = d.mul_add(d, *qv);
    }
}

/// `NV` vectors from the start of `s`. A plain loop rather than
/// `core::array::from_fn`, which the compiler left as a call for sixteen
/// vectors, forcing the row's sums into memory.
#[inline(always)]
fn load_n<V: Lane, const NV: usize>(s: &[f32]) -> [V; NV] {
    let mut row = [V::splat(0.0); NV];
    for (v, r) in row.iter_mut().enumerate() {
        *r = V::load(&s[v * V::WIDTH..]);
    }
    row
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Periodic tensors: flat position `p` belongs to channel `(p mod period) / div`;
/// `rows` rows of `period` elements. Small windows keep the stack small
/// for the channel counts firmware uses.
fn periodic<V: Lane>(
    x: &[f32],
    period: usize,
    div: usize,
    rows: usize,
    emit: &mut impl FnMut(usize, Acc),
) {
    let lcm = period / gcd(period, V::WIDTH) * V::WIDTH;
    if lcm <= SMALL_WINDOW {
        panels::<V, { SMALL_WINDOW + WINDOW_SLACK }>(x, period, div, rows, lcm, emit)
    } else {
        panels::<V, { WINDOW + WINDOW_SLACK }>(x, period, div, rows, lcm, emit)
    }
}

/// Row positions one panel walk keeps block sums and records for. A longer
/// row is walked in windows of whole channels, one pass over the rows each.
const WINDOW: usize = 1024;

/// The window of super-rows up to this length (every channel count up to
/// 128 with a power-of-two width, e.g. 3, 16 and 64): 4.4 KiB of stack.
const SMALL_WINDOW: usize = 128;

/// Room for a window that ends on a channel boundary past [`WINDOW`].
const WINDOW_SLACK: usize = 32;

/// Rows in a panel when a row needs several column groups: each group sums
/// this many rows in registers before it moves its sums to the block sums
/// in memory (two loads, two adds and two stores per vector, about one
/// operation in sixteen) and the next group takes its columns of the same
/// rows. Longer panels read memory in a longer stride pattern, which
/// measured slower at L3 and DRAM sizes on the machine of README
/// §Performance. A row that fits one group is read in order anyway; its
/// panel is the whole block, and the kernel moves its register sums to the
/// block sums every [`INNER_ROWS`] rows per lane without returning, since
/// each call of a panel kernel costs fixed work. Either way no `f32` sum
/// takes more than a few hundred terms: at most 64 rows in a register, then
/// at most `BLOCK_ROWS / 16` = 128 panel sums in a block sum.
const PANEL_ROWS: usize = 16;

/// State of one panel walk over `N` positions: per position the block's
/// `f32` sums, the shift, and the running `f64` mean and `m2`. Every
/// position has the same count, so one `n` serves all; channels are formed
/// by merging their positions' records at the end.
struct Window<const N: usize> {
    s: [f32; N],
    q: [f32; N],
    k: [f32; N],
    mean: [f64; N],
    m2: [f64; N],
    n: u64,
}

/// Where a window's elements are: row `r` is `x[start + r * stride ..][..len]`.
#[derive(Clone, Copy)]
struct Span {
    start: usize,
    stride: usize,
    len: usize,
    rows: usize,
}

/// Rows are read in *panels* of a few rows: every column group sums its
/// columns of a panel in registers and adds the sums to per-position `f32`
/// block sums, so the tensor is read once (per window of [`WINDOW`]
/// positions) however many channels it has. Blocks grow as described in the
/// module docs; each position keeps its own record and shift (a position is
/// a fixed lane of a fixed channel), and a channel's positions are merged
/// with Chan's formula when the walk ends.
fn panels<V: Lane, const N: usize>(
    x: &[f32],
    period: usize,
    div: usize,
    rows: usize,
    lcm: usize,
    emit: &mut impl FnMut(usize, Acc),
) {
    let mut st = Window::<N> {
        s: [0.0; N],
        q: [0.0; N],
        k: [0.0; N],
        mean: [0.0; N],
        m2: [0.0; N],
        n: 0,
    };
    let channels = period / div;
    if lcm + WINDOW_SLACK <= N {
        // Super-rows of `lcm` elements (position `p` is channel
        // `(p mod period) / div`), then the rows left over.
        let per = lcm / period;
        let supers = rows / per;
        let span = Span {
            start: 0,
            stride: lcm,
            len: lcm,
            rows: supers,
        };
        walk::<V, N>(x, span, &mut st);
        let tail = &x[supers * lcm..(supers * lcm + (rows - supers * per) * period)];
        for c in 0..channels {
            let mut acc = Acc::default();
            for r in 0..per {
                for t in 0..div {
                    acc = acc.merge(st.acc(r * period + c * div + t));
                }
            }
            emit(c, acc.merge(exact(tail, period, c * div, div)));
        }
        return;
    }
    // Windows of whole channels, at most WINDOW + div positions each, at
    // least WINDOW / 2 - div >= one vector.
    let windows = period.div_ceil(WINDOW);
    for i in 0..windows {
        let (c0, c1) = (i * channels / windows, (i + 1) * channels / windows);
        let span = Span {
            start: c0 * div,
            stride: period,
            len: (c1 - c0) * div,
            rows,
        };
        walk::<V, N>(x, span, &mut st);
        for c in 0..c1 - c0 {
            let mut acc = Acc::default();
            for t in 0..div {
                acc = acc.merge(st.acc(c * div + t));
            }
            emit(c0 + c, acc);
        }
    }
}

/// The record of the elements `offset .. offset + width` of every row of
/// `rows` (rows of `period` elements): plain two-pass `f64`, for the few
/// elements a super-row walk leaves over.
fn exact(rows: &[f32], period: usize, offset: usize, width: usize) -> Acc {
    // Most walks leave no rows: return before the division below, which
    // ran once per channel (most of the per-channel loop of NHWC C = 1000
    // at 256 KiB).
    if rows.is_empty() {
        return Acc::default();
    }
    let items = || {
        rows.chunks_exact(period)
            .flat_map(move |row| &row[offset..offset + width])
            .map(|&v| v as f64)
    };
    let n = rows.len() / period * width;
    if n == 0 {
        return Acc::default();
    }
    let mean = items().sum::<f64>() / n as f64;
    let m2 = items().map(|v| (v - mean) * (v - mean)).sum();
    Acc {
        n: n as u64,
        mean,
        m2,
    }
}

impl<const N: usize> Window<N> {
    fn acc(&self, p: usize) -> Acc {
        Acc {
            n: self.n,
            mean: self.mean[p],
            m2: self.m2[p],
        }
    }

    /// Turns the block sums of positions `0..len` (`n` elements each) into
    /// block records, merges them into the (non-empty) records, makes the
    /// new means the shifts and clears the sums. Straight loops over the
    /// arrays, which the compiler vectorizes: small tensors have few rows to
    /// spread a block end over.
    fn end_block(&mut self, len: usize, n: u64) {
        let inv = 1.0 / n as f64;
        let wb = n as f64 / (self.n + n) as f64;
        let na = self.n;
        let (s, q, k) = (&mut self.s[..len], &mut self.q[..len], &mut self.k[..len]);
        let (mean, m2) = (&mut self.mean[..len], &mut self.m2[..len]);
        for p in 0..len {
            let block = Acc::from_shifted(n, inv, k[p], s[p] as f64, q[p] as f64);
            let a = Acc {
                n: na,
                mean: mean[p],
                m2: m2[p],
            };
            let acc = a.merge_weighted(block, wb);
            mean[p] = acc.mean;
            m2[p] = acc.m2;
            k[p] = acc.mean as f32;
            s[p] = 0.0;
            q[p] = 0.0;
        }
        self.n += n;
    }
}

/// A span's rows through the panel kernels, block by block. Resets `st`.
fn walk<V: Lane, const N: usize>(x: &[f32], span: Span, st: &mut Window<N>) {
    let w = V::WIDTH;
    st.n = 0;
    if span.rows == 0 {
        return;
    }
    // The first row is the first block, whose sums around the shift (the
    // row itself) are zero, or NaN for a NaN or infinite value, as the sums
    // would be.
    let row = &x[span.start..span.start + span.len];
    st.k[..span.len].copy_from_slice(row);
    for ((&v, mean), m2) in row.iter().zip(&mut st.mean).zip(&mut st.m2) {
        let z = if v.is_finite() { 0.0 } else { f64::NAN };
        *mean = v as f64 + z;
        *m2 = z;
    }
    st.n = 1;
    let whole = span.len / w;
    let rem = span.len % w;
    // A row of up to 2 * SLOTS whole vectors is one group, read in memory
    // order: its sums take every register (the compiler spills a few),
    // but the hardware prefetchers follow one sequential stream at DRAM
    // size, which they do not when a panel's rows are visited once per
    // column group (with two groups of eight vectors, C = 256 with
    // AVX-512, 0.33 of the read roofline at 64 MiB). Wider rows: balanced
    // column groups, none much shorter than SLOTS vectors.
    let groups = if rem == 0 && (1..=one_group::<V>()).contains(&whole) {
        1
    } else {
        whole.div_ceil(V::SLOTS)
    };
    let (size, longer) = (whole / groups.max(1), whole % groups.max(1));
    let panel = if groups == 1 && rem == 0 {
        // Read in order anyway: as long as the block, the kernel moving its
        // register sums out every INNER_ROWS rows per lane by itself.
        BLOCK_ROWS
    } else {
        PANEL_ROWS
    };
    let mut done = 1;
    while done < span.rows {
        let block = (3 * done).min(BLOCK_ROWS).min(span.rows - done);
        let mut r = 0;
        while r < block {
            let pr = panel.min(block - r);
            let row0 = span.start + (done + r) * span.stride;
            // The panel's rows from column `o` of the window on.
            let tile = |o: usize| Tile {
                base: row0 + o,
                rows: pr,
                stride: span.stride,
            };
            let mut v0 = 0;
            for gi in 0..groups {
                let nv = size + usize::from(gi < longer);
                let (o, e) = (v0 * w, (v0 + nv) * w);
                let sums = Sums {
                    s: &mut st.s[o..e],
                    q: &mut st.q[o..e],
                    k: &st.k[o..e],
                };
                panel_nv::<V>(nv, x, tile(o), sums);
                v0 += nv;
            }
            if rem != 0 {
                // One vector ending at the row's end; its first `w - rem`
                // lanes are counted by the vector before.
                let o = span.len - w;
                let (mut s, mut q) = ([0.0f32; 16], [0.0f32; 16]);
                let sums = Sums {
                    s: &mut s[..w],
                    q: &mut q[..w],
                    k: &st.k[o..o + w],
                };
                panel_nv::<V>(1, x, tile(o), sums);
                for j in w - rem..w {
                    st.s[o + j] += s[j];
                    st.q[o + j] += q[j];
                }
            }
            r += pr;
        }
        st.end_block(span.len, block as u64);
        done += block;
    }
}

/// Rows of one panel: `rows` rows `stride` apart, the group's first vector
/// at `base`.
#[derive(Clone, Copy)]
struct Tile {
    base: usize,
    rows: usize,
    stride: usize,
}

/// A column group's block sums and shifts (one `f32` per lane).
struct Sums<'a> {
    s: &'a mut [f32],
    q: &'a mut [f32],
    k: &'a [f32],
}

/// [`panel_n`] for `nv` (1 to [`one_group`]) vectors. The bound lets the
/// compiler drop the arms a 16-register lane type never takes.
#[inline(always)]
fn panel_nv<V: Lane>(nv: usize, x: &[f32], tile: Tile, sums: Sums<'_>) {
    debug_assert!((1..=one_group::<V>()).contains(&nv));
    match nv.min(one_group::<V>()) {
        1 => panel_n::<V, 1>(x, tile, sums),
        2 => panel_n::<V, 2>(x, tile, sums),
        3 => panel_n::<V, 3>(x, tile, sums),
        4 => panel_n::<V, 4>(x, tile, sums),
        5 => panel_n::<V, 5>(x, tile, sums),
        6 => panel_n::<V, 6>(x, tile, sums),
        7 => panel_n::<V, 7>(x, tile, sums),
        8 => panel_n::<V, 8>(x, tile, sums),
        9 => panel_n::<V, 9>(x, tile, sums),
        10 => panel_n::<V, 10>(x, tile, sums),
        11 => panel_n::<V, 11>(x, tile, sums),
        12 => panel_n::<V, 12>(x, tile, sums),
        13 => panel_n::<V, 13>(x, tile, sums),
        14 => panel_n::<V, 14>(x, tile, sums),
        15 => panel_n::<V, 15>(x, tile, sums),
        _ => panel_n::<V, 16>(x, tile, sums),
    }
}

/// `NV` back-to-back vectors of each row of `tile`, summed around the shifts
/// in registers (short groups unrolled over rows) and added to the block
/// sums.
#[inline(always)]
fn panel_n<V: Lane, const NV: usize>(x: &[f32], tile: Tile, sums: Sums<'_>) {
    let Tile { base, rows, stride } = tile;
    let Sums { s, q, k } = sums;
    let w = V::WIDTH;
    let unroll = (V::SLOTS / NV).max(1);
    let kv: [V; NV] = load_n(k);
    let mut si = [V::splat(0.0); MAX_SUMS];
    let mut qi = [V::splat(0.0); MAX_SUMS];
    if stride == NV * w {
        // Back-to-back rows: one slice, walked in steps whose length the
        // compiler knows, so the loads carry no bounds checks.
        let all = &x[base..base + rows * stride];
        // A long panel (one group holds the row) leaves its registers for
        // the block sums every INNER_ROWS rows per lane, without leaving
        // this loop.
        for part in all.chunks(INNER_ROWS * unroll * NV * w) {
            let mut chunks = part.chunks_exact(unroll * NV * w);
            for chunk in &mut chunks {
                for u in 0..unroll {
                    let row = load_n(&chunk[u * NV * w..]);
                    add_row(&mut si[u * NV..], &mut qi[u * NV..], row, &kv);
                }
            }
            // Fewer than `unroll` rows left: one per slot, so that no slot
            // sums more than INNER_ROWS rows. `u` runs over the whole
            // constant range so that every index into the sums is a
            // constant: a run-time slot index kept the sums in memory, and
            // clearing them cost 2 * MAX_SUMS stores per flush (about a
            // tenth of a small tensor's time). With one slot per row
            // nothing is left over; saying so keeps the loop out of the
            // sixteen-vector kernel, whose registers are all taken.
            if unroll > 1 {
                let rest = chunks.remainder();
                for u in 0..unroll {
                    if let Some(seg) = rest.get(u * NV * w..(u + 1) * NV * w) {
                        add_row(&mut si[u * NV..], &mut qi[u * NV..], load_n(seg), &kv);
                    }
                }
            }
            flush::<V, NV>(&mut si, &mut qi, unroll, s, q);
        }
    } else {
        let mut pos = base;
        for _ in 0..rows / unroll {
            for u in 0..unroll {
                let seg = &x[pos + u * stride..pos + u * stride + NV * w];
                let row = load_n(seg);
                add_row(&mut si[u * NV..], &mut qi[u * NV..], row, &kv);
            }
            pos += unroll * stride;
        }
        for u in 0..unroll {
            if u < rows % unroll {
                let seg = &x[pos..pos + NV * w];
                add_row(&mut si[u * NV..], &mut qi[u * NV..], load_n(seg), &kv);
                pos += stride;
            }
        }
        flush::<V, NV>(&mut si, &mut qi, unroll, s, q);
    }
}

/// Adds the register sums of a panel's `unroll` slots to the block sums
/// and clears them.
#[inline(always)]
fn flush<V: Lane, const NV: usize>(
    si: &mut [V; MAX_SUMS],
    qi: &mut [V; MAX_SUMS],
    unroll: usize,
    s: &mut [f32],
    q: &mut [f32],
) {
    let w = V::WIDTH;
    for u in 1..unroll {
        for v in 0..NV {
            si[v] = si[v].add(si[u * NV + v]);
            qi[v] = qi[v].add(qi[u * NV + v]);
        }
    }
    for v in 0..NV {
        V::load(&s[v * w..]).add(si[v]).store(&mut s[v * w..]);
        V::load(&q[v * w..]).add(qi[v]).store(&mut q[v * w..]);
    }
    *si = [V::splat(0.0); MAX_SUMS];
    *qi = [V::splat(0.0); MAX_SUMS];
}

/// Largest piece of a run reduced in `f32` before its sums go to `f64`
/// (pieces are also at most `INNER_ROWS` vectors per slot). The
/// piece's `f32` sum of squares stays finite on the §3 domain: `|x - K| <=
/// 2e17`, and `8192 * (2e17)² = 3.3e38 < f32::MAX` (16 Ki overflowed).
const RUN_PIECE: usize = 8 * 1024;

/// NCHW with `s >= w`: windows of up to [`GROUP_CHANNELS`] channels, walked
/// batch element by batch element so that reads are in memory order (a
/// window of one batch element is one contiguous stretch), each run of `s`
/// elements reduced by [`run_sums`] around its channel's shift.
fn runs<V: Lane>(x: &[f32], n: usize, c: usize, s: usize, emit: &mut impl FnMut(usize, Acc)) {
    let mut g = Group::new();
    let mut w = Weights::default();
    // At most INNER_ROWS terms per lane in one f32 sum.
    let cap = (INNER_ROWS * RUN_SLOTS * V::WIDTH).min(RUN_PIECE);
    let mut c0 = 0;
    while c0 < c {
        let cw = (c - c0).min(GROUP_CHANNELS);
        for i in 0..n {
            for ch in 0..cw {
                let start = (i * c + c0 + ch) * s;
                let mut run = &x[start..start + s];
                while !run.is_empty() {
                    let (seen, open) = (g.acc[ch].n as usize, g.n[ch] as usize);
                    if seen == 0 && open == 0 {
                        let len = run.len().min(cap);
                        let (piece, rest) = run.split_at(len);
                        let (k, sums) = first_block::<V>(piece);
                        g.shift[ch] = k;
                        g.add_sums(ch, sums, len);
                        g.end_channel(ch, &mut w);
                        run = rest;
                        continue;
                    }
                    let target = (3 * seen).clamp(WARM_UP, RUN_PIECE);
                    let len = (target - open).min(run.len()).min(cap);
                    let (piece, rest) = run.split_at(len);
                    g.add_sums(ch, run_sums::<V>(piece, g.shift[ch]), len);
                    if g.n[ch] as usize >= target {
                        g.end_channel(ch, &mut w);
                    }
                    run = rest;
                }
            }
        }
        g.end_block(cw, &mut w);
        for ch in 0..cw {
            emit(c0 + ch, g.acc[ch]);
        }
        g.clear(cw);
        c0 += cw;
    }
}

/// A channel's first block, one piece: its shift and shifted sums.
///
/// The shift is the first element, which keeps a constant channel exact
/// (every `x - k` is 0). When that element is more than about 1.7
/// standard deviations from the piece's mean (`Σ(x - k)² > 4 m2`; always
/// for an outlier in a piece of more than four elements), the sums would
/// carry more than four times the rounding of sums around the mean (and an
/// outlier's, far more), so the piece, still in L1, is summed again around
/// its mean. Later blocks are shifted by the running mean, which for data
/// that does not drift is far under one standard deviation from theirs.
fn first_block<V: Lane>(piece: &[f32]) -> (f32, (f64, f64)) {
    let k = piece[0];
    let sums = run_sums::<V>(piece, k);
    let n = piece.len() as f64;
    // `Σ(x - k)² > 4 m2` with `m2 = Σ(x - k)² - (Σ(x - k))² / n`, multiplied
    // out so that no division sits on the path to the branch (NCHW C = 16
    // at 256 KiB: 5% faster). Written so that an overflowing `f32` sum
    // (values far beyond the §3 domain) also takes the redo; NaN or
    // infinite data makes the mean non-finite below, and a poisoned channel
    // stays as it is.
    if 4.0 * sums.0 * sums.0 > 3.0 * n * sums.1 || !sums.1.is_finite() {
        let mean = (k as f64 + sums.0 / n) as f32;
        if mean.is_finite() {
            return (mean, run_sums::<V>(piece, mean));
        }
    }
    (k, sums)
}

/// Independent accumulator pairs of [`run_sums`]: four chains cover the
/// add latency at the rate a run streams from L2 or beyond, and each run
/// ends by adding its slots together, which more slots lengthen (NCHW runs
/// of 1024 elements with AVX-512, C = 3 to 1000: 4 slots 2 to 10% faster
/// than 8 at 256 KiB and 8 MiB).
const RUN_SLOTS: usize = 4;

/// `(Σ(x - k), Σ(x - k)²)` of a contiguous run: [`RUN_SLOTS`] independent
/// vector accumulators, then the tail through half-width lanes down to one.
#[inline(always)]
fn run_sums<V: Lane>(run: &[f32], k: f32) -> (f64, f64) {
    let w = V::WIDTH;
    if w > 1 && run.len() < w {
        return run_sums::<V::Half>(run, k);
    }
    let kv = V::splat(k);
    let mut s = [V::splat(0.0); RUN_SLOTS];
    let mut q = [V::splat(0.0); RUN_SLOTS];
    // `add_row`'s update for one vector, written out: called with
    // `&mut s[i..]` for a run-time `i` (the remainder loop) it kept the
    // accumulators in memory and halved the speed of short runs.
    let mut add = |i: usize, x: V| {
        let d = x.sub(kv);
        s[i] = s[i].add(d);
        q[i] = d.mul_add(d, q[i]);
    };
    let step = RUN_SLOTS * w;
    let mut chunks = run.chunks_exact(step);
    for chunk in &mut chunks {
        for i in 0..RUN_SLOTS {
            add(i, V::load(&chunk[i * w..]));
        }
    }
    let mut vectors = chunks.remainder().chunks_exact(w);
    for (i, v) in (&mut vectors).enumerate() {
        add(i, V::load(v));
    }
    for i in 1..RUN_SLOTS {
        s[0] = s[0].add(s[i]);
        q[0] = q[0].add(q[i]);
    }
    // Each lane holds at most INNER_ROWS terms (the caller's pieces); a
    // pairwise f32 reduction of the lanes adds log2(w) roundings.
    let mut sums = (s[0].reduce_add() as f64, q[0].reduce_add() as f64);
    let tail = vectors.remainder();
    if w > 1 && !tail.is_empty() {
        let t = run_sums::<V::Half>(tail, k);
        sums.0 += t.0;
        sums.1 += t.1;
    }
    sums
}
