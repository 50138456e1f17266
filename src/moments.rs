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
//! Runs use one window of channel slots: for at most [`GROUP_CHANNELS`] =
//! 128 channels, an `f64` record (24 bytes), a shift (4) and the block's
//! `f64` sums and count (24), 56 bytes with padding, 7 KiB in all. A panel walk uses one [`Window`]: per position,
//! `f32` block sums and a shift (12 bytes) and an `f64` mean and `m2` (16
//! bytes), for 160 positions (4.4 KiB) when `lcm(P, lanes) <= 128` (C = 1,
//! 2, 3, 4, 7, 8, 16, 32, 64 and 128 on every width, for example), else for
//! 1056 positions (29 KiB). Only one of them is live at a time. A panel
//! kernel holds at most `2 * 16` sum vectors (2 KiB with AVX-512 lanes),
//! in registers but for the few the compiler spills. Nothing depends on the
//! tensor's size. No heap.
//!
//! Those are the x86-64 and aarch64 sizes. On every other target
//! (microcontrollers, 32-bit targets) a group is 32 channels (1.7 KiB) and
//! a window 64 positions plus 16 of slack (2.2 KiB) for every super-row
//! length, and a [compact](crate#compact-builds) build's one-lane kernel
//! keeps its register sums in 128 bytes: on a Cortex-M4, `moments`,
//! `accumulate` and a training step use at most 3.4 KiB of stack, whatever
//! the shape (`.ci/firmware` paints it under `qemu-system-arm`).
//!
//! # Domain
//!
//! For finite inputs with `|x| <= 1e17` every intermediate is finite and the
//! crate docs §3 bounds hold. A NaN or infinity in a channel makes that channel's
//! variance NaN and its mean NaN or infinite; no other channel is affected.

use crate::error::Error;
use crate::lanes::{enabled, with_lane, Lane, Simd, SMALL_STACK};
use crate::shape::{Layout, Shape};
use crate::Variance;

/// Rows per block once warmed up: `f32` block sums of this many rows keep a
/// relative rounding error near `sqrt(BLOCK_ROWS) * f32::EPSILON`, and the
/// per-block `f64` merge costs under 2% of the block's vector work.
pub(crate) const BLOCK_ROWS: usize = 2048;

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
/// element (their records and block sums are on the stack, 52 bytes per
/// channel): 128 on x86-64 and aarch64, 32 on every other target
/// (microcontrollers and 32-bit targets).
pub(crate) const GROUP_CHANNELS: usize = if SMALL_STACK { 32 } else { 128 };

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
/// crate docs §3 bounds once `|mean|` is far beyond `1e4 σ`. A record built by
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

    /// The record as 24 little-endian bytes: `count`, `mean`, `m2` (the
    /// same on every target, to send between workers).
    ///
    /// ```
    /// use batchnorm::Moments;
    /// let r = Moments { count: 3, mean: 2.0, m2: 8.0 };
    /// let bytes = r.to_le_bytes();
    /// assert_eq!(bytes[..8], 3u64.to_le_bytes());
    /// assert_eq!(Moments::from_le_bytes(bytes), r);
    /// ```
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
///
/// ```
/// use batchnorm::{accumulate, Moments, Shape, Variance};
///
/// // One channel streamed in two chunks: {1, 2, 3} then {4, 5}.
/// let mut rec = [Moments::EMPTY];
/// accumulate(&[1.0, 2.0, 3.0], Shape::rows(3, 1), &mut rec)?;
/// accumulate(&[4.0, 5.0], Shape::rows(2, 1), &mut rec)?;
/// assert_eq!(rec[0].count, 5);
/// assert_eq!(rec[0].mean()?, 3.0);
/// assert_eq!(rec[0].variance(Variance::Population)?, 2.0);
/// # Ok::<(), batchnorm::Error>(())
/// ```
pub fn accumulate(x: &[f32], shape: Shape, into: &mut [Moments]) -> Result<(), Error> {
    Simd::detect().accumulate(x, shape, into)
}

impl Simd {
    /// [`moments`] with this lane width (every width works on every
    /// machine: a width the build does not compile runs
    /// [`Simd::effective`]).
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
            // `c < channels == into.len()`: `get_mut` keeps the panic path out.
            if let Some(r) = into.get_mut(c) {
                *r = Moments::from(Acc::from(*r).merge(acc));
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
        // `c < channels`, the slices' length: `get_mut` keeps the panic
        // path out.
        if let (Some(m), Some(v)) = (mean.get_mut(c), variance.get_mut(c)) {
            *m = acc.mean as f32;
            *v = (acc.m2 * inv) as f32;
        }
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
        Layout::Nchw => runs::<V>(x, c, s, emit),
    }
}

/// One channel of a window of NCHW runs (channels `c0 .. c0 +
/// GROUP_CHANNELS`, walked with iterators, no index): its record, shift and
/// the `f64` sums and count of the current block.
#[derive(Clone, Copy, Default)]
struct Slot {
    acc: Acc,
    shift: f32,
    s1: f64,
    s2: f64,
    n: u64,
}

impl Slot {
    /// A channel with nothing seen.
    const EMPTY: Slot = Slot {
        acc: Acc {
            n: 0,
            mean: 0.0,
            m2: 0.0,
        },
        shift: 0.0,
        s1: 0.0,
        s2: 0.0,
        n: 0,
    };

    /// Adds one run's shifted sums of `len` elements to the block.
    #[inline(always)]
    fn add_sums(&mut self, (s1, s2): (f64, f64), len: usize) {
        self.s1 += s1;
        self.s2 += s2;
        self.n += len as u64;
    }

    /// Turns the block sums into a block record and merges it; the new mean
    /// becomes the shift.
    fn end_block(&mut self, w: &mut Weights) {
        let n = self.n;
        if n == 0 {
            return;
        }
        let block = Acc::from_shifted(n, w.recip(n), self.shift, self.s1, self.s2);
        let a = self.acc;
        self.acc = if a.n == 0 {
            block
        } else {
            a.merge_weighted(block, w.weight(a.n, n))
        };
        self.shift = self.acc.mean as f32;
        self.s1 = 0.0;
        self.s2 = 0.0;
        self.n = 0;
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

/// `NV` vectors from the start of `s` (zeros past its end, which no caller
/// reaches). A plain loop rather than `core::array::from_fn`, which the
/// compiler left as a call for sixteen vectors, forcing the row's sums into
/// memory.
#[inline(always)]
fn load_n<V: Lane, const NV: usize>(s: &[f32]) -> [V; NV] {
    let mut row = [V::splat(0.0); NV];
    for (r, v) in row.iter_mut().zip(s.chunks_exact(V::WIDTH)) {
        *r = V::load(v);
    }
    row
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// `lcm(period, w)` for `w >= 1`, or `None` when it does not fit in `usize`
/// (on a 32-bit target an odd period of more than `2^32 / w` elements
/// passes validation; its lcm is longer than any window, so `None` takes
/// the same path as a long row).
pub(crate) fn lcm(period: usize, w: usize) -> Option<usize> {
    (period / gcd(period, w).max(1)).checked_mul(w)
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
    let l = lcm(period, V::WIDTH);
    if SMALL_STACK && period < V::WIDTH && l.is_none_or(|l| l > WINDOW) {
        // A super-row longer than the window but a row shorter than a
        // vector (e.g. 5 or 15 positions with sixteen lanes): a window of
        // whole channels would be narrower than one vector, so the row is
        // walked with half-width lanes, whose super-row is at most half as
        // long (four lanes: at most 12 positions). With the x86-64 and
        // aarch64 window every such super-row fits (at most 240
        // positions), and this branch is compiled out.
        return periodic::<V::Half>(x, period, div, rows, emit);
    }
    match l {
        Some(l) if l <= SMALL_WINDOW => {
            panels::<V, { SMALL_WINDOW + WINDOW_SLACK }>(x, period, div, rows, Some(l), emit)
        }
        l => panels::<V, { WINDOW + WINDOW_SLACK }>(x, period, div, rows, l, emit),
    }
}

/// Row positions one panel walk keeps block sums and records for. A longer
/// row is walked in windows of whole channels, one pass over the rows each.
/// 1024 on x86-64 and aarch64; 64 (2.2 KiB of window) on every other target.
const WINDOW: usize = if SMALL_STACK { 64 } else { 1024 };

/// The window of super-rows up to this length (every channel count up to
/// 128 with a power-of-two width, e.g. 3, 16 and 64): 4.4 KiB of stack. On
/// small-stack targets, [`WINDOW`]: one window size.
const SMALL_WINDOW: usize = if SMALL_STACK { WINDOW } else { 128 };

/// Room for a window that ends on a channel boundary past [`WINDOW`]: a
/// window holds whole channels of `div < lanes` positions each (NCHW with
/// runs shorter than a vector), so up to `WINDOW + 15` positions.
const WINDOW_SLACK: usize = if SMALL_STACK { 16 } else { 32 };

/// Widest lane type.
const MAX_WIDTH: usize = 16;

// A window of whole channels has more than `WINDOW / 2 - div` positions
// (`div < MAX_WIDTH`), which must be at least one vector; and up to
// `WINDOW + div` of them, which must fit the window's arrays.
const _: () = assert!(WINDOW / 2 >= 2 * MAX_WIDTH - 1 && WINDOW_SLACK >= MAX_WIDTH - 1);
// A row shorter than a vector has a super-row of at most `(w - 1) w`
// positions: within the big window, and with four lanes within the small
// one ([`periodic`] halves the lanes until it is).
const _: () = assert!(SMALL_STACK || (MAX_WIDTH - 1) * MAX_WIDTH <= WINDOW);
const _: () = assert!(3 * 4 <= SMALL_WINDOW);
const _: () = assert!(SMALL_WINDOW <= WINDOW);

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
///
/// Never inlined: its window and the run group of [`runs`] would otherwise
/// share one frame (measured on a Cortex-M4: 5.1 KB instead of 3.3 KB).
#[inline(never)]
fn panels<V: Lane, const N: usize>(
    x: &[f32],
    period: usize,
    div: usize,
    rows: usize,
    lcm: Option<usize>,
    emit: &mut impl FnMut(usize, Acc),
) {
    enabled!(V => {
        // Validated input has `period = channels * div >= div >= 1`; the
        // checks keep the divisions below free of a panic path.
        if div == 0 || period == 0 {
            return;
        }
        let mut st = Window::<N> {
            s: [0.0; N],
            q: [0.0; N],
            k: [0.0; N],
            mean: [0.0; N],
            m2: [0.0; N],
            n: 0,
        };
        let channels = period / div;
        if let Some(lcm) = lcm.filter(|&l| l <= N - WINDOW_SLACK) {
            // Super-rows of `lcm` elements (position `p` is channel
            // `(p mod period) / div`), then the rows left over: the elements
            // after the last whole super-row, `(rows - supers * per) * period`
            // of them.
            let per = (lcm / period).max(1);
            let supers = rows / per;
            let span = Span {
                start: 0,
                stride: lcm,
                len: lcm,
                rows: supers,
            };
            walk::<V, N>(x, span, &mut st);
            let tail = x.get(supers * lcm..).unwrap_or_default();
            if per == 1 && div == 1 && tail.is_empty() {
                // One position per channel (NHWC with a multiple of the lane
                // count): the records are the channels'. The general loop
                // below cost about a third of NHWC C = 1000 at 256 KiB.
                st.emit_each(0, channels, emit);
                return;
            }
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
        // least WINDOW / 2 - div >= one vector: the first `channels % windows`
        // windows take one channel more than the others. (Formed by adding
        // window sizes: `i * channels / windows` overflowed a 32-bit `usize`
        // from 2^21 NHWC channels on.)
        let windows = period.div_ceil(WINDOW).max(1);
        let (size, longer) = (channels / windows, channels % windows);
        let mut c0 = 0;
        for i in 0..windows {
            let c1 = c0 + size + usize::from(i < longer);
            let span = Span {
                start: c0 * div,
                stride: period,
                len: (c1 - c0) * div,
                rows,
            };
            walk::<V, N>(x, span, &mut st);
            if div == 1 {
                st.emit_each(c0, c1 - c0, emit);
                c0 = c1;
                continue;
            }
            for c in 0..c1 - c0 {
                let mut acc = Acc::default();
                for t in 0..div {
                    acc = acc.merge(st.acc(c * div + t));
                }
                emit(c0 + c, acc);
            }
            c0 = c1;
        }
    })
}

/// The record of the elements `offset .. offset + width` of every row of
/// `rows` (rows of `period` elements): plain two-pass `f64`, for the few
/// elements a super-row walk leaves over.
fn exact(rows: &[f32], period: usize, offset: usize, width: usize) -> Acc {
    // Most walks leave no rows: return before the division below, which
    // ran once per channel (most of the per-channel loop of NHWC C = 1000
    // at 256 KiB).
    if rows.is_empty() || period == 0 {
        return Acc::default();
    }
    // `offset + width <= period` on every caller's input: `get` keeps the
    // panic path out.
    let items = || {
        rows.chunks_exact(period)
            .flat_map(move |row| row.get(offset..offset + width).unwrap_or_default())
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
    /// Position `p`'s record (`p < N` on every call; an empty record
    /// otherwise, which merges as nothing).
    fn acc(&self, p: usize) -> Acc {
        match (self.mean.get(p), self.m2.get(p)) {
            (Some(&mean), Some(&m2)) => Acc {
                n: self.n,
                mean,
                m2,
            },
            _ => Acc::default(),
        }
    }

    /// Hands the records of positions `0..len` to `emit` as channels `c0
    /// ..`: one position per channel.
    fn emit_each(&self, c0: usize, len: usize, emit: &mut impl FnMut(usize, Acc)) {
        let n = self.n;
        let records = self.mean.iter().zip(&self.m2).take(len);
        for (c, (&mean, &m2)) in (c0..).zip(records) {
            // No rows walked leaves the arrays as they were: an empty record.
            let acc = if n == 0 {
                Acc::default()
            } else {
                Acc { n, mean, m2 }
            };
            emit(c, acc);
        }
    }

    /// Turns the block sums of positions `0..len` (`n` elements each) into
    /// block records, merges them into the (non-empty) records, makes the
    /// new means the shifts and clears the sums. Straight loops over the
    /// arrays, which the compiler vectorizes: small tensors have few rows to
    /// spread a block end over.
    fn end_block(&mut self, len: usize, n: u64) {
        // `len <= N` on every call: the clamp lets the compiler drop the
        // panic paths of the slicing.
        let len = len.min(N);
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
    enabled!(V => {
        let w = V::WIDTH;
        st.n = 0;
        if span.rows == 0 {
            return;
        }
        // The first row is the first block, whose sums around the shift (the
        // row itself) are zero, or NaN for a NaN or infinite value, as the sums
        // would be.
        // A span lies inside `x` and has at most `N` positions on every call:
        // the `get`s keep the panic paths out.
        let Some(row) = x.get(span.start..).and_then(|r| r.get(..span.len)) else {
            return;
        };
        if span.len > N {
            return;
        }
        let first = row.iter().zip(&mut st.k).zip(&mut st.mean).zip(&mut st.m2);
        for (((&v, k), mean), m2) in first {
            let z = if v.is_finite() { 0.0 } else { f64::NAN };
            *k = v;
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
        // Back-to-back rows only: a window of whole channels (rows `stride`
        // apart) that fits one group goes through the panel kernel's strided
        // loop, which does not flush every INNER_ROWS rows. Only small windows
        // make such a window (on x86-64 and aarch64 a window of whole channels
        // has more than 2 * SLOTS vectors), hence the const test first.
        let back_to_back = !SMALL_STACK || span.stride == span.len;
        let panel = if groups == 1 && rem == 0 && back_to_back {
            // Read in order anyway: as long as the block, the kernel moving its
            // register sums out every INNER_ROWS rows per lane by itself.
            BLOCK_ROWS
        } else {
            PANEL_ROWS
        };
        let mut done = 1;
        while done < span.rows {
            // Threefold growth, except that a last block of up to half as
            // much again takes the rows that would be left: a block end costs
            // a pass over the window's records, which a tail of a few rows
            // (65 rows of 1000 channels ended 1, 3, 12, 48 and 1 rows) pays
            // for almost nothing.
            let rest = span.rows - done;
            let grown = done.saturating_mul(3).min(BLOCK_ROWS);
            let block = if rest <= grown.saturating_add(grown / 2) {
                rest.min(BLOCK_ROWS)
            } else {
                grown
            };
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
                    v0 += nv;
                    let (Some(s), Some(q), Some(k)) =
                        (st.s.get_mut(o..e), st.q.get_mut(o..e), st.k.get(o..e))
                    else {
                        continue;
                    };
                    panel_nv::<V>(nv, x, tile(o), Sums { s, q, k });
                }
                if rem != 0 {
                    // One vector ending at the row's end; its first `w - rem`
                    // lanes are counted by the vector before. (`span.len >= w`
                    // whenever `rem != 0`.)
                    let (o, e) = (span.len.saturating_sub(w), span.len);
                    let (mut s, mut q) = ([0.0f32; 16], [0.0f32; 16]);
                    if let (Some(k), Some(ds), Some(dq)) = (
                        st.k.get(o..e),
                        st.s.get_mut(e - rem..e),
                        st.q.get_mut(e - rem..e),
                    ) {
                        let sums = Sums {
                            s: &mut s[..w],
                            q: &mut q[..w],
                            k,
                        };
                        panel_nv::<V>(1, x, tile(o), sums);
                        let new = s[..w].iter().zip(&q[..w]).skip(w - rem);
                        for ((ds, dq), (s, q)) in ds.iter_mut().zip(dq.iter_mut()).zip(new) {
                            *ds += s;
                            *dq += q;
                        }
                    }
                }
                r += pr;
            }
            st.end_block(span.len, block as u64);
            done += block;
        }
    })
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
        // The tile lies inside `x` on every call.
        let Some(all) = x.get(base..).and_then(|r| r.get(..rows * stride)) else {
            return;
        };
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
        // Every row of the tile lies inside `x`: a row that did not would
        // be skipped (`get`), never a panic.
        let row_at = |pos: usize| x.get(pos..).and_then(|r| r.get(..NV * w));
        let mut pos = base;
        for _ in 0..rows / unroll {
            for u in 0..unroll {
                if let Some(seg) = row_at(pos + u * stride) {
                    add_row(&mut si[u * NV..], &mut qi[u * NV..], load_n(seg), &kv);
                }
            }
            pos += unroll * stride;
        }
        for u in 0..unroll {
            if u < rows % unroll {
                if let Some(seg) = row_at(pos) {
                    add_row(&mut si[u * NV..], &mut qi[u * NV..], load_n(seg), &kv);
                }
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
    let block = s.chunks_exact_mut(w).zip(q.chunks_exact_mut(w));
    for ((s, q), (sv, qv)) in block.zip(si.iter().zip(qi.iter())).take(NV) {
        V::load(s).add(*sv).store(s);
        V::load(q).add(*qv).store(q);
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
/// elements reduced by [`run_sums`] around its channel's shift. Never
/// inlined, for the reason given at [`panels`].
#[inline(never)]
fn runs<V: Lane>(x: &[f32], c: usize, s: usize, emit: &mut impl FnMut(usize, Acc)) {
    enabled!(V => {
        // `s >= V::WIDTH >= 1` and `c * s <= x.len()` on validated input; the
        // checks let the compiler drop the panic paths of `chunks_exact`.
        let Some(item) = c.checked_mul(s).filter(|&e| e > 0) else {
            return;
        };
        // Said again: inside the closure of `enabled!` the compiler no longer
        // sees that `s >= 1` (from `item > 0`, or from every caller).
        let Some(s) = core::num::NonZeroUsize::new(s) else {
            return;
        };
        let s = s.get();
        // A plain local array: wrapped in a struct, it was built and then
        // copied (two 1.8 KB arrays in the frame on a Cortex-M4).
        let mut slots = [Slot::EMPTY; GROUP_CHANNELS];
        let mut w = Weights::default();
        // At most INNER_ROWS terms per lane in one f32 sum.
        let cap = (INNER_ROWS * RUN_SLOTS * V::WIDTH).min(RUN_PIECE);
        let mut c0 = 0;
        while c0 < c {
            let cw = (c - c0).min(GROUP_CHANNELS);
            // Batch element by batch element, the window's runs in memory order.
            for element in x.chunks_exact(item) {
                let Some(window) = element.get(c0 * s..(c0 + cw) * s) else {
                    break;
                };
                for (mut run, slot) in window.chunks_exact(s).zip(slots.iter_mut()) {
                    while !run.is_empty() {
                        let (seen, open) = (slot.acc.n as usize, slot.n as usize);
                        if seen == 0 && open == 0 {
                            let (piece, rest) = run.split_at_checked(cap).unwrap_or((run, &[]));
                            let (k, sums) = first_block::<V>(piece);
                            slot.shift = k;
                            slot.add_sums(sums, piece.len());
                            slot.end_block(&mut w);
                            run = rest;
                            continue;
                        }
                        let target = seen.saturating_mul(3).clamp(WARM_UP, RUN_PIECE);
                        let len = target.saturating_sub(open).min(cap);
                        let (piece, rest) = run.split_at_checked(len).unwrap_or((run, &[]));
                        slot.add_sums(run_sums::<V>(piece, slot.shift), piece.len());
                        if slot.n as usize >= target {
                            slot.end_block(&mut w);
                        }
                        run = rest;
                    }
                }
            }
            for (ch, slot) in slots.iter_mut().take(cw).enumerate() {
                slot.end_block(&mut w);
                emit(c0 + ch, slot.acc);
                *slot = Slot::EMPTY;
            }
            c0 += cw;
        }
    })
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
///
/// Inlined into [`runs`], its one caller, whose body already runs with the
/// lane type's instructions: out of line, behind a trampoline of its own,
/// it cost a call per channel, and NCHW runs of 65 elements (C = 1000 at
/// 256 KiB, one run per channel) were 15-20% slower.
#[inline(always)]
fn first_block<V: Lane>(piece: &[f32]) -> (f32, (f64, f64)) {
    let Some(&k) = piece.first() else {
        return (0.0, (0.0, 0.0));
    };
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
    // Two rounds of the slots per iteration, unrolled here rather than
    // left to LLVM: it unrolled this loop under `-C target-cpu=native`
    // but not in a default build's run-time-selected AVX-512 copy, whose
    // NCHW runs of 1024 ran at 0.87-0.89 of native's speed. Slot
    // `i % RUN_SLOTS` still sees the vectors in order, so the sums are the
    // same bits as one round per iteration. Behind a length check: entered
    // unconditionally, it cost runs of 65 (C = 1000) 4-5%. Not on a scalar
    // build (a microcontroller's): there it only added flash.
    let mut rest = run;
    if w > 1 && run.len() >= 2 * step {
        let mut pairs = run.chunks_exact(2 * step);
        for chunk in &mut pairs {
            for i in 0..2 * RUN_SLOTS {
                add(i % RUN_SLOTS, V::load(&chunk[i * w..]));
            }
        }
        rest = pairs.remainder();
    }
    let mut chunks = rest.chunks_exact(step);
    for chunk in &mut chunks {
        for i in 0..RUN_SLOTS {
            add(i, V::load(&chunk[i * w..]));
        }
    }
    // Fewer than RUN_SLOTS vectors left: one per slot, each slot index a
    // constant (no bounds check, and the accumulators stay in registers).
    let rest = chunks.remainder();
    for i in 0..RUN_SLOTS - 1 {
        if let Some(v) = rest.get(i * w..(i + 1) * w) {
            add(i, V::load(v));
        }
    }
    for i in 1..RUN_SLOTS {
        s[0] = s[0].add(s[i]);
        q[0] = q[0].add(q[i]);
    }
    // Each lane holds at most INNER_ROWS terms (the caller's pieces); a
    // pairwise f32 reduction of the lanes adds log2(w) roundings.
    let mut sums = (s[0].reduce_add() as f64, q[0].reduce_add() as f64);
    let tail = rest.get(rest.len() / w * w..).unwrap_or_default();
    if w > 1 && !tail.is_empty() {
        let t = run_sums::<V::Half>(tail, k);
        sums.0 += t.0;
        sums.1 += t.1;
    }
    sums
}

#[cfg(test)]
mod tests {
    use super::lcm;

    /// `lcm` of a period that validation accepts but whose product with
    /// the width does not fit in `usize` (an odd period of more than
    /// `usize::MAX / 16` elements; on 32-bit targets from 2^28 on) is
    /// `None`, the long-row path, not a wrapped small number.
    #[test]
    fn lcm_overflow_is_none() {
        assert_eq!(lcm(3, 16), Some(48));
        assert_eq!(lcm(24, 16), Some(48));
        assert_eq!(lcm(1, 1), Some(1));
        assert_eq!(lcm((usize::MAX / 8) | 1, 16), None);
        assert_eq!(lcm(usize::MAX / 16 + 2, 16), None);
        assert_eq!(
            lcm((usize::MAX / 16) | 1, 16),
            Some(((usize::MAX / 16) | 1) * 16)
        );
        for w in [2, 4, 8, 16] {
            assert_eq!(lcm(usize::MAX, w), None, "w = {w}");
        }
        // Even periods whose lcm still fits.
        assert_eq!(lcm(usize::MAX - 15, 16), Some(usize::MAX - 15));
        assert_eq!(lcm(usize::MAX / 2 + 1, 16), Some(usize::MAX / 2 + 1));
    }
}
