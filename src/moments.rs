//! Per-channel moments in one pass: shifted block sums in SIMD registers,
//! blocks merged with Chan's formula.
//!
//! # Algorithm
//!
//! Every lane of every accumulator vector is pinned to one channel for the
//! whole pass. Within a *block* of rows a lane accumulates, in `f32`,
//! `s = Σ(x - K)` and `q = Σ(x - K)²` around a per-channel shift `K`: three
//! vector operations per element vector (sub, add, fused multiply-add), no
//! division and no dependency between elements beyond the accumulator. At the
//! end of a block the lanes of a channel are summed in `f64`, turned into the
//! block's `(count, mean, m2)` and merged into the channel's running `f64`
//! record with [`merge`](Acc::merge) (Chan et al., 1979). The shift for the
//! next block is the channel's running mean, so `x - K` stays of the order of
//! the standard deviation and the shifted sums do not cancel, however large
//! the common offset (`1e6 + N(0, 1)` included). Blocks start at one row and
//! grow fourfold up to [`BLOCK_ROWS`], so even an outlier in the first
//! element does not leave a poor shift in place for long.
//!
//! # Layouts
//!
//! * NHWC, and NCHW with fewer spatial positions than lanes, are *periodic*:
//!   position `p` of the flat tensor belongs to channel `(p mod P) / S`
//!   (`P = C`, `S = 1` for NHWC; `P = C * S` for NCHW). When the period is
//!   small, rows are grouped into super-rows of `lcm(P, lanes)` elements so
//!   that every lane stays on one channel and all lanes are used, even for an
//!   RGB input (`C = 3`); a last partial super-row goes through the same
//!   kernel instantiated with one-lane `f32`. When the period is long, each
//!   row is covered by vectors at multiples of the width plus one
//!   overlapping vector ending at the row's end whose duplicated lanes are
//!   ignored.
//! * NCHW with at least one vector of spatial positions is a set of
//!   contiguous runs: windows of up to [`GROUP_CHANNELS`] channels are walked
//!   batch element by batch element (memory order), each run reduced by a
//!   short loop with `SLOTS` accumulators into its channel's block sums.
//!
//! Columns are processed in groups of at most `Lane::SLOTS` vectors so that
//! the accumulators stay in registers; short groups unroll over several rows
//! instead, so a kernel always has `SLOTS` independent dependency chains.
//!
//! # Stack
//!
//! One [`Group`]: for at most [`GROUP_CHANNELS`] = 128 channels, an `f64`
//! record (24 bytes), a shift (4) and the block's `f64` sums and count (24),
//! 6.5 KiB in all; plus two 64-byte spill buffers and the lane map (256
//! bytes). Nothing depends on the tensor's size. No heap.
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

/// Elements of a channel's first block on the contiguous-run (NCHW) path.
/// Blocks then grow fourfold up to [`RUN_PIECE`]: the first block's shift is
/// the first element, which may be an outlier, so it is kept short, and each
/// later shift is the mean of everything before. (Row sweeps start at one
/// row and grow fourfold; tests/moments_sweep.rs `outlier_first_element`
/// pins both.)
const WARM_UP: usize = 16;

/// Rows a lane sums in registers before the sum joins the block's: bounds
/// the `f32` rounding of one sum to about `INNER_ROWS * ε` even when every
/// add rounds the same way.
const INNER_ROWS: usize = 256;

/// Largest number of channels one column group holds records for.
pub const GROUP_CHANNELS: usize = 128;

/// Longest super-row (in elements) the periodic path uses before it switches
/// to row-by-row vectors with an overlapping last vector.
const MAX_SUPER_ROW: usize = 1024;

/// Largest `SLOTS` of any lane type.
const MAX_SLOTS: usize = 8;

/// Lane map entry of a lane whose value is counted by another lane.
const SKIP: u16 = u16::MAX;

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
/// The record stores `f32`s (merges compute in `f64` and round once), so a
/// chain of merges keeps the DESIGN §3 bounds for channels with
/// `|mean| <= 1e4 σ`; far beyond that the rounding of the stored mean,
/// `ulp(mean)`, becomes comparable to `σ` and the merged `m2` degrades. A
/// single [`accumulate`] or [`moments`] call keeps its own `f64` state and is
/// not limited this way.
///
/// `#[repr(C)]` and [`bytemuck::Pod`], 16 bytes with no padding, so records
/// can be sent as bytes between threads, processes or the workers of a
/// distributed job (through its own all-gather) and merged on arrival:
///
/// ```
/// use batchnorm::{accumulate, Moments, Shape};
/// let x: Vec<f32> = (0..600).map(|i| (i % 7) as f32).collect();
/// let shape = Shape::rows(200, 3);
/// let (a, b) = x.split_at(300);
/// let mut left = [Moments::EMPTY; 3];
/// let mut right = [Moments::EMPTY; 3];
/// accumulate(a, Shape::rows(100, 3), &mut left).unwrap();
/// accumulate(b, Shape::rows(100, 3), &mut right).unwrap();
/// let wire: &[u8] = bytemuck::cast_slice(&right);
/// let received: &[Moments] = bytemuck::cast_slice(wire);
/// let mut whole = [Moments::EMPTY; 3];
/// accumulate(&x, shape, &mut whole).unwrap();
/// for c in 0..3 {
///     let merged = left[c].merge(received[c]);
///     assert_eq!(merged.count, whole[c].count);
///     assert!((merged.mean - whole[c].mean).abs() < 1e-6);
/// }
/// ```
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Moments {
    /// Number of elements seen.
    pub count: u64,
    /// Their mean (0 when `count == 0`).
    pub mean: f32,
    /// Sum of squared deviations from the mean.
    pub m2: f32,
}

impl Moments {
    /// The record of no elements.
    pub const EMPTY: Moments = Moments {
        count: 0,
        mean: 0.0,
        m2: 0.0,
    };

    /// Merges two records with Chan's formula (computed in `f64`, rounded
    /// once): the result is the record of both element sets.
    #[must_use]
    pub fn merge(self, other: Moments) -> Moments {
        Moments::from_acc(Acc::from(self).merge(Acc::from(other)))
    }

    /// The mean, or [`Error::EmptyBatch`] for an empty record.
    pub fn mean(&self) -> Result<f32, Error> {
        if self.count == 0 {
            return Err(Error::EmptyBatch);
        }
        Ok(self.mean)
    }

    /// The population variance `m2 / count` or the sample variance
    /// `m2 / (count - 1)` (factor 1 at `count == 1`, as TensorFlow clamps it),
    /// or [`Error::EmptyBatch`] for an empty record.
    pub fn variance(&self, kind: Variance) -> Result<f32, Error> {
        if self.count == 0 {
            return Err(Error::EmptyBatch);
        }
        Ok(Acc::from(*self).variance(kind) as f32)
    }

    pub(crate) fn from_acc(a: Acc) -> Moments {
        Moments {
            count: a.n,
            mean: a.mean as f32,
            m2: a.m2 as f32,
        }
    }
}

impl From<Moments> for Acc {
    fn from(m: Moments) -> Acc {
        Acc {
            n: m.count,
            mean: m.mean as f64,
            m2: m.m2 as f64,
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
/// channels, or an overflowing shape.
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
        run(self, x, shape, &mut |c, acc| {
            mean[c] = acc.mean as f32;
            variance[c] = acc.variance(Variance::Population) as f32;
        });
        Ok(())
    }

    /// [`accumulate`] with this lane width.
    pub fn accumulate(self, x: &[f32], shape: Shape, into: &mut [Moments]) -> Result<(), Error> {
        shape.check("x", x.len())?;
        shape.check_channels("into", into.len())?;
        if shape.count()? == 0 {
            return Ok(());
        }
        run(self, x, shape, &mut |c, acc| {
            into[c] = Moments::from_acc(Acc::from(into[c]).merge(acc));
        });
        Ok(())
    }
}

/// Computes every channel's record and hands it to `emit` exactly once per
/// channel. `shape` is validated, `x.len() == shape.len()`, `count > 0`.
pub(crate) fn run(simd: Simd, x: &[f32], shape: Shape, emit: &mut dyn FnMut(usize, Acc)) {
    with_lane!(simd, V => dispatch::<V>(x, shape, emit))
}

fn dispatch<V: Lane>(x: &[f32], shape: Shape, emit: &mut dyn FnMut(usize, Acc)) {
    let (n, s, c) = (shape.batch, shape.spatial, shape.channels);
    match shape.layout {
        Layout::Nhwc => periodic::<V>(x, c, 1, n * s, emit),
        Layout::Nchw if s < V::WIDTH => periodic::<V>(x, c * s, s, n, emit),
        Layout::Nchw => runs::<V>(x, n, c, s, emit),
    }
}

/// Per-channel state of one column group: records, shifts and the `f64`
/// sums of the current block, for channels `base .. base + GROUP_CHANNELS`.
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

    /// Forgets channels `0..channels` (the only ones a sweep touched).
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

    /// Ends the block of one channel.
    fn end_one(&mut self, c: usize) {
        self.end_channel(c, &mut Weights::default());
    }

    /// Turns the block sums of each touched channel into a block record and
    /// merges it; the channel's new mean becomes its shift.
    fn end_block(&mut self, channels: usize) {
        let mut w = Weights::default();
        for c in 0..channels {
            self.end_channel(c, &mut w);
        }
    }

    fn end_channel(&mut self, c: usize, w: &mut Weights) {
        let n = self.n[c];
        if n == 0 {
            return;
        }
        let (s1, s2) = (self.s1[c], self.s2[c]);
        let d = s1 * w.recip(n);
        let m2 = s2 - s1 * d;
        // Rounding can leave a hair below zero for a constant channel; `<`
        // keeps a NaN.
        let m2 = if m2 < 0.0 { 0.0 } else { m2 };
        let block = Acc {
            n,
            mean: self.shift[c] as f64 + d,
            m2,
        };
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

/// Row starts of a sweep: `outer` runs of `inner` rows; row `(o, i)` starts
/// at `base + o * outer_stride + i * inner_stride`.
#[derive(Clone, Copy)]
struct Rows {
    base: usize,
    outer: usize,
    outer_stride: usize,
    inner: usize,
    inner_stride: usize,
}

impl Rows {
    fn contiguous(base: usize, rows: usize, stride: usize) -> Rows {
        Rows {
            base,
            outer: 1,
            outer_stride: 0,
            inner: rows,
            inner_stride: stride,
        }
    }

    fn total(&self) -> usize {
        self.outer * self.inner
    }

    fn cursor(&self) -> Cursor {
        Cursor {
            rows: *self,
            run_start: self.base,
            pos: self.base,
            i: 0,
        }
    }
}

struct Cursor {
    rows: Rows,
    run_start: usize,
    pos: usize,
    i: usize,
}

impl Cursor {
    #[inline(always)]
    fn next(&mut self) -> usize {
        let r = self.pos;
        self.i += 1;
        if self.i == self.rows.inner {
            self.i = 0;
            self.run_start += self.rows.outer_stride;
            self.pos = self.run_start;
        } else {
            self.pos += self.rows.inner_stride;
        }
        r
    }

    /// Skips `n` rows, all within the current run (`i + n <= inner`).
    #[inline(always)]
    fn advance(&mut self, n: usize) {
        self.i += n;
        if self.i == self.rows.inner {
            self.i = 0;
            self.run_start += self.rows.outer_stride;
            self.pos = self.run_start;
        } else {
            self.pos += n * self.rows.inner_stride;
        }
    }
}

/// One column group: `nv` vectors at `cols` (offsets from a row start), and
/// for each lane the group-relative channel it counts for, or `SKIP`.
struct Columns {
    nv: usize,
    cols: [usize; MAX_SLOTS],
    chan: [u16; MAX_SLOTS * 16],
}

/// Sweeps `rows` over one column group, updating `g`. Dispatches on the
/// number of vectors so that the accumulators are a fixed-size array the
/// compiler keeps in registers.
fn sweep<V: Lane>(x: &[f32], rows: Rows, cols: &Columns, g: &mut Group, channels: usize) {
    let w = V::WIDTH;
    let contiguous = (0..cols.nv).all(|v| cols.cols[v] == cols.cols[0] + v * w);
    macro_rules! by_nv {
        ($contig:literal) => {
            match cols.nv {
                1 => sweep_n::<V, 1, $contig>(x, rows, cols, g, channels),
                2 => sweep_n::<V, 2, $contig>(x, rows, cols, g, channels),
                3 => sweep_n::<V, 3, $contig>(x, rows, cols, g, channels),
                4 => sweep_n::<V, 4, $contig>(x, rows, cols, g, channels),
                5 => sweep_n::<V, 5, $contig>(x, rows, cols, g, channels),
                6 => sweep_n::<V, 6, $contig>(x, rows, cols, g, channels),
                7 => sweep_n::<V, 7, $contig>(x, rows, cols, g, channels),
                _ => sweep_n::<V, 8, $contig>(x, rows, cols, g, channels),
            }
        };
    }
    if contiguous {
        by_nv!(true)
    } else {
        by_nv!(false)
    }
}

/// The shifted sums of one row: `s += x - k`, `q += (x - k)²`, three
/// vector operations per vector of input.
#[inline(always)]
fn add_row<V: Lane, const NV: usize>(s: &mut [V], q: &mut [V], row: [V; NV], k: &[V; NV]) {
    for ((x, kv), (sv, qv)) in row.iter().zip(k).zip(s.iter_mut().zip(q.iter_mut())) {
        let d = x.sub(*kv);
        *sv = sv.add(d);
        *qv = d.mul_add(d, *qv);
    }
}

/// The `NV` vectors of one row. With `CONTIG` (vectors back to back) the row
/// is sliced once to a length known at compile time, so the loads carry no
/// bounds checks; otherwise each load is checked.
#[inline(always)]
fn row_vectors<V: Lane, const NV: usize, const CONTIG: bool>(
    x: &[f32],
    start: usize,
    col: &[usize; NV],
) -> [V; NV] {
    let w = V::WIDTH;
    if CONTIG {
        let seg = &x[start + col[0]..start + col[0] + NV * w];
        core::array::from_fn(|v| V::load(&seg[v * w..]))
    } else {
        core::array::from_fn(|v| V::load(&x[start + col[v]..]))
    }
}

#[inline(always)]
fn sweep_n<V: Lane, const NV: usize, const CONTIG: bool>(
    x: &[f32],
    rows: Rows,
    cols: &Columns,
    g: &mut Group,
    channels: usize,
) {
    let w = V::WIDTH;
    let total = rows.total();
    if total == 0 {
        return;
    }
    // Rows unrolled per step so that `unroll * NV` chains run in parallel.
    let unroll = (V::SLOTS / NV).max(1);
    let col: [usize; NV] = core::array::from_fn(|v| cols.cols[v]);

    // A channel with no data yet takes its first element as its shift. The
    // reverse walk leaves the first lane's value in place.
    let first = rows.base;
    for v in (0..NV).rev() {
        for j in (0..w).rev() {
            let c = cols.chan[v * w + j];
            if c != SKIP && g.acc[c as usize].n == 0 {
                g.shift[c as usize] = x[first + col[v] + j];
            }
        }
    }

    // Every lane of every vector counts for the same channel (NCHW runs).
    let c0 = cols.chan[0];
    let uniform = c0 != SKIP && cols.chan[..NV * w].iter().all(|&c| c == c0);

    let mut cursor = rows.cursor();
    let mut buf = [0.0f32; 16];
    let mut buf2 = [0.0f32; 16];
    let mut done = 0;
    while done < total {
        let block = (3 * done).clamp(1, BLOCK_ROWS).min(total - done);
        let k: [V; NV] = core::array::from_fn(|v| {
            if uniform {
                return V::splat(g.shift[c0 as usize]);
            }
            for (b, &c) in buf.iter_mut().zip(&cols.chan[v * w..(v + 1) * w]) {
                *b = if c == SKIP { 0.0 } else { g.shift[c as usize] };
            }
            V::load(&buf)
        });
        // Registers sum at most INNER_ROWS rows per lane before they are
        // added to the block's f32 sums: structured data (0/1 values, one
        // repeated deviation) rounds the same way at every add, so the error
        // of a long f32 sum grows linearly, not like its square root.
        let mut s = [V::splat(0.0); MAX_SLOTS];
        let mut q = [V::splat(0.0); MAX_SLOTS];
        let mut left = block;
        while left > 0 {
            let sub = left.min(INNER_ROWS);
            let mut si = [V::splat(0.0); MAX_SLOTS];
            let mut qi = [V::splat(0.0); MAX_SLOTS];
            let full = sub / unroll;
            let rest = sub % unroll;
            let step = unroll * NV * w;
            let dense =
                CONTIG && rows.inner_stride == NV * w && cursor.i + full * unroll <= rows.inner;
            if dense {
                // Back-to-back rows inside one run: one slice for the whole
                // block, walked in steps whose length the compiler knows.
                let base = cursor.pos + col[0];
                for chunk in x[base..base + full * step].chunks_exact(step) {
                    for u in 0..unroll {
                        let row = core::array::from_fn(|v| V::load(&chunk[(u * NV + v) * w..]));
                        add_row(&mut si[u * NV..], &mut qi[u * NV..], row, &k);
                    }
                }
                cursor.advance(full * unroll);
            }
            for _ in 0..if dense { 0 } else { full } {
                let mut start = [0usize; MAX_SLOTS];
                for st in start.iter_mut().take(unroll) {
                    *st = cursor.next();
                }
                for (u, &st) in start.iter().enumerate().take(unroll) {
                    let row = row_vectors::<V, NV, CONTIG>(x, st, &col);
                    add_row(&mut si[u * NV..], &mut qi[u * NV..], row, &k);
                }
            }
            for _ in 0..rest {
                let row = row_vectors::<V, NV, CONTIG>(x, cursor.next(), &col);
                add_row(&mut si, &mut qi, row, &k);
            }
            for i in 0..unroll * NV {
                s[i] = s[i].add(si[i]);
                q[i] = q[i].add(qi[i]);
            }
            left -= sub;
        }
        // Fold the unroll copies in f32 (slot `u * NV + v` has vector `v`'s
        // lane map), and with a uniform map every vector into one: lane `j`
        // of `s[v]` then holds `per_lane` elements.
        for u in 1..unroll {
            for v in 0..NV {
                s[v] = s[v].add(s[u * NV + v]);
                q[v] = q[v].add(q[u * NV + v]);
            }
        }
        let (nv, per_lane) = if uniform {
            for v in 1..NV {
                s[0] = s[0].add(s[v]);
                q[0] = q[0].add(q[v]);
            }
            (1, (NV * block) as u64)
        } else {
            (NV, block as u64)
        };
        // Lanes of one channel are summed in registers and flushed when the
        // channel changes, so no lane waits on a store to the same record.
        for v in 0..nv {
            s[v].store(&mut buf);
            q[v].store(&mut buf2);
            let mut cur = SKIP;
            let (mut a1, mut a2, mut cnt) = (0.0f64, 0.0f64, 0u64);
            for j in 0..w {
                let c = cols.chan[v * w + j];
                if c == SKIP {
                    continue;
                }
                if c != cur {
                    if cur != SKIP {
                        let cu = cur as usize;
                        g.s1[cu] += a1;
                        g.s2[cu] += a2;
                        g.n[cu] += cnt;
                    }
                    cur = c;
                    (a1, a2, cnt) = (0.0, 0.0, 0);
                }
                a1 += buf[j] as f64;
                a2 += buf2[j] as f64;
                cnt += per_lane;
            }
            if cur != SKIP {
                let cu = cur as usize;
                g.s1[cu] += a1;
                g.s2[cu] += a2;
                g.n[cu] += cnt;
            }
        }
        g.end_block(channels);
        done += block;
    }
}

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Periodic tensors: flat position `p` belongs to channel `(p mod period) / div`;
/// `rows` rows of `period` elements.
fn periodic<V: Lane>(
    x: &[f32],
    period: usize,
    div: usize,
    rows: usize,
    emit: &mut dyn FnMut(usize, Acc),
) {
    let w = V::WIDTH;
    let channels = period / div;
    let lcm = period / gcd(period, w) * w;
    let mut g = Group::new();
    if channels <= GROUP_CHANNELS && lcm <= MAX_SUPER_ROW {
        // Super-rows of `lcm` elements: lane `j` of vector `v` is always
        // position `(v * w + j) mod period`.
        let per = lcm / period;
        let supers = rows / per;
        let vectors = lcm / w;
        let mut v0 = 0;
        while v0 < vectors {
            let nv = (vectors - v0).min(V::SLOTS);
            let mut cols = Columns {
                nv,
                cols: [0; MAX_SLOTS],
                chan: [SKIP; MAX_SLOTS * 16],
            };
            for v in 0..nv {
                cols.cols[v] = (v0 + v) * w;
                for j in 0..w {
                    cols.chan[v * w + j] = (((v0 + v) * w + j) % period / div) as u16;
                }
            }
            sweep::<V>(x, Rows::contiguous(0, supers, lcm), &cols, &mut g, channels);
            v0 += nv;
        }
        // The last, partial super-row: the same kernel on one lane.
        let left = (rows - supers * per) * period;
        let start = supers * lcm;
        let mut p0 = 0;
        while p0 < left {
            let nv = (left - p0).min(<f32 as Lane>::SLOTS);
            let mut cols = Columns {
                nv,
                cols: [0; MAX_SLOTS],
                chan: [SKIP; MAX_SLOTS * 16],
            };
            for v in 0..nv {
                cols.cols[v] = p0 + v;
                cols.chan[v] = ((p0 + v) % period / div) as u16;
            }
            sweep::<f32>(x, Rows::contiguous(start, 1, 0), &cols, &mut g, channels);
            p0 += nv;
        }
        for (c, acc) in g.acc.iter().enumerate().take(channels) {
            emit(c, *acc);
        }
    } else {
        // Long rows (`period >= w` here): vectors at multiples of `w` and one
        // overlapping vector ending at the row's end.
        let whole = period / w;
        let vectors = whole + usize::from(!period.is_multiple_of(w));
        wide_rows::<V>(
            x,
            Rows::contiguous(0, rows, period),
            0,
            period,
            vectors,
            div,
            &mut g,
            emit,
        );
    }
}

/// Rows of `len >= w` elements at `offset` from each row start, covered by
/// `vectors` vectors (the last one overlapping when `len % w != 0`); element
/// `p` of a row belongs to channel `(offset + p) / div`, and channels come in
/// increasing order. Emits every channel it completes; a channel that
/// continues past `len` is left in `g` for the caller.
#[allow(clippy::too_many_arguments)]
fn wide_rows<V: Lane>(
    x: &[f32],
    rows: Rows,
    offset: usize,
    len: usize,
    vectors: usize,
    div: usize,
    g: &mut Group,
    emit: &mut dyn FnMut(usize, Acc),
) {
    let w = V::WIDTH;
    let whole = len / w;
    // Channel (absolute) of group-relative index 0.
    let mut base = offset / div;
    let mut v0 = 0;
    while v0 < vectors {
        let nv = (vectors - v0).min(V::SLOTS);
        let mut cols = Columns {
            nv,
            cols: [0; MAX_SLOTS],
            chan: [SKIP; MAX_SLOTS * 16],
        };
        let mut last_channel = base;
        for v in 0..nv {
            let vi = v0 + v;
            let start = if vi < whole { vi * w } else { len - w };
            cols.cols[v] = start;
            for j in 0..w {
                let p = start + j;
                // Lanes of the overlapping vector that a whole vector counts.
                if vi >= whole && p < whole * w {
                    continue;
                }
                let c = (offset + p) / div;
                cols.chan[v * w + j] = (c - base) as u16;
                last_channel = last_channel.max(c);
            }
        }
        let channels = last_channel - base + 1;
        sweep::<V>(x, rows, &cols, g, channels);
        v0 += nv;
        // The next group's first channel; the last channel carries over when
        // the next group (or the caller) continues it.
        let next_first = if v0 < vectors {
            (offset + v0 * w) / div
        } else {
            (offset + len) / div
        };
        for c in 0..channels {
            if base + c == next_first {
                continue;
            }
            emit(base + c, g.acc[c]);
        }
        if next_first < base + channels {
            let keep = next_first - base;
            let (acc, shift) = (g.acc[keep], g.shift[keep]);
            g.clear(channels);
            g.acc[0] = acc;
            g.shift[0] = shift;
        } else {
            g.clear(channels);
        }
        base = next_first;
    }
}

/// Largest piece of a run reduced in `f32` before its sums go to `f64`:
/// each lane then sums at most `RUN_PIECE / (SLOTS * lanes)` elements.
const RUN_PIECE: usize = 16 * 1024;

/// NCHW with `s >= w`: windows of up to [`GROUP_CHANNELS`] channels, walked
/// batch element by batch element so that reads are in memory order (a
/// window of one batch element is one contiguous stretch), each run of `s`
/// elements reduced by [`run_sums`] around its channel's shift.
fn runs<V: Lane>(x: &[f32], n: usize, c: usize, s: usize, emit: &mut dyn FnMut(usize, Acc)) {
    let mut g = Group::new();
    let mut c0 = 0;
    while c0 < c {
        let cw = (c - c0).min(GROUP_CHANNELS);
        for i in 0..n {
            for ch in 0..cw {
                let start = (i * c + c0 + ch) * s;
                let mut run = &x[start..start + s];
                while !run.is_empty() {
                    let seen = g.acc[ch].n as usize;
                    if seen == 0 && g.n[ch] == 0 {
                        g.shift[ch] = run[0];
                    }
                    // A channel's first blocks are short because their
                    // shift is still poor: 16 elements, then fourfold.
                    let target = (3 * seen).clamp(WARM_UP, RUN_PIECE);
                    // At most INNER_ROWS terms per lane in one f32 sum.
                    let cap = INNER_ROWS * V::SLOTS * V::WIDTH;
                    let len = (target - g.n[ch] as usize).min(run.len()).min(cap);
                    let (piece, rest) = run.split_at(len);
                    g.add_sums(ch, run_sums::<V>(piece, g.shift[ch]), len);
                    if g.n[ch] as usize >= target {
                        g.end_one(ch);
                    }
                    run = rest;
                }
            }
        }
        g.end_block(cw);
        for ch in 0..cw {
            emit(c0 + ch, g.acc[ch]);
        }
        g.clear(cw);
        c0 += cw;
    }
}

/// `(Σ(x - k), Σ(x - k)²)` of a contiguous run: `SLOTS` independent vector
/// accumulators, then the tail through half-width lanes down to one.
#[inline(always)]
fn run_sums<V: Lane>(run: &[f32], k: f32) -> (f64, f64) {
    let w = V::WIDTH;
    if w > 1 && run.len() < w {
        return run_sums::<V::Half>(run, k);
    }
    let kv = [V::splat(k); MAX_SLOTS];
    let mut s = [V::splat(0.0); MAX_SLOTS];
    let mut q = [V::splat(0.0); MAX_SLOTS];
    let step = V::SLOTS * w;
    let mut chunks = run.chunks_exact(step);
    for chunk in &mut chunks {
        let row: [V; MAX_SLOTS] = core::array::from_fn(|i| {
            if i < V::SLOTS {
                V::load(&chunk[i * w..])
            } else {
                kv[0]
            }
        });
        add_row(&mut s, &mut q, row, &kv);
    }
    let rest = chunks.remainder();
    let mut vectors = rest.chunks_exact(w);
    for (i, v) in (&mut vectors).enumerate() {
        let d = V::load(v).sub(kv[0]);
        s[i] = s[i].add(d);
        q[i] = d.mul_add(d, q[i]);
    }
    for i in 1..V::SLOTS {
        s[0] = s[0].add(s[i]);
        q[0] = q[0].add(q[i]);
    }
    // Each lane holds at most RUN_PIECE / (SLOTS * w) terms; a pairwise
    // f32 reduction of the lanes adds log2(w) roundings.
    let mut sums = (s[0].reduce_add() as f64, q[0].reduce_add() as f64);
    let tail = vectors.remainder();
    if w > 1 && !tail.is_empty() {
        let t = run_sums::<V::Half>(tail, k);
        sums.0 += t.0;
        sums.1 += t.1;
    }
    sums
}
