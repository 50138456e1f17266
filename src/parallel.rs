//! Multi-threaded kernels over a [rayon] thread pool (feature `rayon`),
//! with results that are **bit-identical for every number of threads**.
//!
//! Every function here runs on the current rayon pool (the global one, or
//! the one a [`rayon::ThreadPool::install`] call runs it in) and returns the
//! same bits whether that pool has 1, 2, 3 or 64 threads, because nothing
//! the arithmetic depends on comes from the pool:
//!
//! 1. **Fixed chunks.** [`chunks`] splits a tensor into at most
//!    [`MAX_CHUNKS`] pieces whose bounds are a function of the [`Shape`]
//!    alone: NHWC by rows (`batch * spatial` rows of `C` elements, at
//!    least [`MIN_ROWS`] rows and about [`MIN_CHUNK`] elements each), NCHW
//!    by batch elements, and when there are fewer batch elements than
//!    chunks (and runs of at least 16 elements), each batch element by
//!    ranges of channels (a range of channels of one NCHW batch element is
//!    contiguous, so it is a tensor of its own). Rows of periodic tensors
//!    are split on whole super-rows of the widest lanes, so that no chunk
//!    but the last has a tail of its own.
//! 2. **The existing kernels per chunk.** Each chunk's per-channel
//!    [`Moments`] records come from [`crate::Simd::accumulate`] on that
//!    chunk alone, so they do not depend on which thread ran it or when.
//! 3. **A fixed merge tree.** The records of the chunks are merged per
//!    channel in a fixed binary tree over the chunk index (`[0, n)` is
//!    `[0, n/2)` merged with `[n/2, n)`, recursively, the left record
//!    first), with [`Moments::merge_slice`] (Chan's formula, `f64`). Work
//!    stealing changes which thread merges a node, never which records it
//!    merges or in what order.
//!
//! Normalization, given the statistics, is elementwise: the coefficients
//! `a = scale / sqrt(var + eps)`, `b = offset - mean * a` are folded once
//! (as [`crate::fold`] does) and each chunk runs [`crate::Simd::affine`] on
//! its own slice of `x` and `y`. Its chunks are split the same way but
//! finer ([`MIN_MAP_CHUNK`] elements, any number of rows), since it has no
//! warm-up per chunk; its output is the single-threaded kernel's, bit for
//! bit.
//!
//! The results are within the crate docs' §3 bounds of the `f64` reference
//! like the single-threaded kernels' (the merge tree is Chan's formula in
//! `f64` over records that are each within the bounds), but they are not
//! bit-identical to the single-threaded [`crate::moments`]: that walks the
//! whole tensor as one chunk.
//!
//! This module uses `std` (threads and a few `Vec`s of `C * chunks`
//! records or coefficients); the rest of the crate stays `no_std` without
//! an allocator, and is what runs inside each chunk.
//!
//! # Synchronizing other per-channel sums
//!
//! Anything per channel that merges associatively can ride the same
//! chunks and tree. The backward pass's `Σ dy` and `Σ dy · x̂` are plain
//! sums: each chunk sums its elements (in `f64`, like the records), and the
//! chunks' sums are added in the same tree order, which again fixes the
//! bits for every thread count. Across processes (synchronized batch norm,
//! see `docs/sync-batchnorm.md`) the same rule holds: each worker sends its
//! per-channel partial sums as little-endian `f64`s through an all-gather,
//! and every worker adds them in rank order.
//!
//! ```
//! use batchnorm::{parallel, Shape};
//! let shape = Shape::nchw(4, 3, 100_000);
//! let x: Vec<f32> = (0..1_200_000).map(|i| (i % 17) as f32).collect();
//! let (mut mean, mut var) = ([0.0f32; 3], [0.0f32; 3]);
//! let pool = |n| rayon::ThreadPoolBuilder::new().num_threads(n).build().unwrap();
//! pool(1).install(|| parallel::moments(&x, shape, &mut mean, &mut var))?;
//! let (mut mean2, mut var2) = ([0.0f32; 3], [0.0f32; 3]);
//! pool(3).install(|| parallel::moments(&x, shape, &mut mean2, &mut var2))?;
//! assert_eq!((mean, var), (mean2, var2)); // the same bits
//! # Ok::<(), batchnorm::Error>(())
//! ```

extern crate std;

use std::vec;
use std::vec::Vec;

use rayon::prelude::*;

use crate::ema;
use crate::error::{check_epsilon, check_len, Error, LAYER_CHANNELS};
use crate::lanes::Simd;
use crate::layer::{Batch, BatchNorm, ScaleOffset};
use crate::moments::Moments;
use crate::normalize::{Activation, Params};
use crate::shape::{Layout, Shape};

/// Most chunks a tensor is split into: enough to keep a few dozen threads
/// busy (work stealing balances uneven chunks), few enough that merging
/// `MAX_CHUNKS * C` records stays far below the cost of reading the tensor.
pub const MAX_CHUNKS: usize = 32;

/// Elements a chunk of the statistics pass has at least (512 KiB of
/// `f32`). Each chunk's records start afresh: its first blocks are short
/// (one row, then threefold, see `moments`) and every block end costs about
/// as much as reading a few dozen rows, so small chunks are slow even on
/// one thread (NHWC C = 256 in 32 chunks of 256 rows took 1.8x the time of
/// one pass on one core; in chunks of 4096 rows, 1.03x).
pub const MIN_CHUNK: usize = 128 * 1024;

/// Rows an NHWC chunk of the statistics pass has at least (see
/// [`MIN_CHUNK`]): two full blocks of the moments kernel (2 x 2048 rows).
pub const MIN_ROWS: usize = 2 * crate::moments::BLOCK_ROWS;

/// Elements a chunk of normalization has at least (64 KiB of `f32`):
/// normalization has no warm-up, so its chunks are only as large as a
/// task's scheduling asks; they may be any number of NHWC rows.
pub const MIN_MAP_CHUNK: usize = 16 * 1024;

/// One piece of a tensor: `shape` elements from `start` of the flat slice,
/// holding channels `first_channel ..` of batch part `part` (the index of
/// the tree leaf its records merge at).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Chunk {
    /// Offset of the chunk's first element in the tensor.
    pub start: usize,
    /// The chunk as a tensor of its own.
    pub shape: Shape,
    /// The tensor's channel that is the chunk's channel 0.
    pub first_channel: usize,
    /// Which leaf of the merge tree the chunk's records belong to (chunks
    /// with the same `part` hold disjoint channels).
    pub part: usize,
}

/// The split of a validated, non-empty tensor.
struct Plan {
    chunks: Vec<Chunk>,
    parts: usize,
}

/// `i / k` of `total`, rounded down, without forming `i * total`.
fn share(total: usize, k: usize, i: usize) -> usize {
    total / k * i + total % k * i / k
}

/// The chunks of a tensor of `shape`, in memory order (they tile it): a
/// function of the shape alone, never of the thread pool. An empty tensor
/// has no chunks.
///
/// Errors: a shape with zero channels or one that overflows `usize`.
///
/// ```
/// use batchnorm::{parallel, Shape};
/// let chunks = parallel::chunks(Shape::nchw(1, 64, 16384))?;
/// assert_eq!(chunks.len(), 8); // one image: split by channels
/// assert!(chunks.iter().all(|c| c.shape.channels == 8 && c.part == 0));
/// # Ok::<(), batchnorm::Error>(())
/// ```
pub fn chunks(shape: Shape) -> Result<Vec<Chunk>, Error> {
    shape.len()?;
    Ok(plan(shape, MIN_CHUNK, MIN_ROWS).chunks)
}

/// Widest lane type of any build (`f32x16`): chunks of rows start on
/// multiples of its super-rows.
const WIDEST: usize = 16;

fn gcd(mut a: usize, mut b: usize) -> usize {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// `k` ranges splitting `0 .. total` evenly, each bound but the last
/// rounded down to a multiple of `align`, empty ranges left out.
fn ranges(total: usize, k: usize, align: usize) -> impl Iterator<Item = (usize, usize)> {
    let bound = move |i: usize| {
        if i == k {
            total
        } else {
            share(total, k, i) / align * align
        }
    };
    (0..k)
        .map(move |i| (bound(i), bound(i + 1)))
        .filter(|(a, b)| a < b)
}

/// The chunks of a tensor of `shape`: about `min_chunk` elements or more
/// each, NHWC chunks at least `min_rows` rows.
///
/// Rows of periodic tensors (NHWC, and NCHW with fewer spatial positions
/// than the widest lanes) are split on multiples of the super-row
/// `lcm(period, 16)` that the kernels walk, so every chunk but the last is
/// whole super-rows and no chunk has a tail of its own: each element then
/// goes through the same lanes as in one pass over the whole tensor, which
/// keeps normalization bit-identical to the single-threaded kernel's also
/// where the vector lanes fuse multiply-add and the one-lane tail does not.
fn plan(shape: Shape, min_chunk: usize, min_rows: usize) -> Plan {
    let (n, s, c) = (shape.batch, shape.spatial, shape.channels);
    let len = n * s * c;
    let mut chunks = Vec::new();
    if len == 0 {
        return Plan { chunks, parts: 0 };
    }
    let want = (len / min_chunk).clamp(1, MAX_CHUNKS);
    match shape.layout {
        Layout::Nhwc => {
            let rows = n * s;
            let k = want.min(rows / min_rows).max(1);
            let per = WIDEST / gcd(c, WIDEST);
            for (part, (r0, r1)) in ranges(rows, k, per).enumerate() {
                chunks.push(Chunk {
                    start: r0 * c,
                    shape: Shape::rows(r1 - r0, c),
                    first_channel: 0,
                    part,
                });
            }
        }
        Layout::Nchw if n >= want || s < WIDEST => {
            let per = if s < WIDEST {
                WIDEST / gcd(c * s, WIDEST)
            } else {
                1
            };
            for (part, (b0, b1)) in ranges(n, want.min(n), per).enumerate() {
                chunks.push(Chunk {
                    start: b0 * c * s,
                    shape: Shape::nchw(b1 - b0, c, s),
                    first_channel: 0,
                    part,
                });
            }
        }
        Layout::Nchw => {
            // Fewer batch elements than chunks, and runs of at least one
            // vector: each batch element is a part, split into ranges of
            // whole channels (each a run-by-run walk, as in one pass).
            let per = (want / n).clamp(1, c);
            for i in 0..n {
                for (c0, c1) in ranges(c, per, 1) {
                    chunks.push(Chunk {
                        start: (i * c + c0) * s,
                        shape: Shape::nchw(1, c1 - c0, s),
                        first_channel: c0,
                        part: i,
                    });
                }
            }
        }
    }
    let parts = chunks.last().map_or(0, |ch| ch.part + 1);
    Plan { chunks, parts }
}

impl Chunk {
    /// Number of elements.
    fn len(&self) -> usize {
        self.shape.batch * self.shape.spatial * self.shape.channels
    }
}

/// The merged per-channel records of a validated, non-empty `x`.
fn records(simd: Simd, x: &[f32], shape: Shape) -> Result<Vec<Moments>, Error> {
    let c = shape.channels;
    let plan = plan(shape, MIN_CHUNK, MIN_ROWS);
    // Leaf `p` of the tree is `parts[p * c .. (p + 1) * c]`; the chunks,
    // in memory order, fill those rows in order.
    let mut parts = vec![Moments::EMPTY; plan.parts * c];
    let mut rest = &mut parts[..];
    let mut jobs = Vec::with_capacity(plan.chunks.len());
    for chunk in &plan.chunks {
        let (out, tail) = core::mem::take(&mut rest).split_at_mut(chunk.shape.channels);
        rest = tail;
        jobs.push((*chunk, out));
    }
    jobs.into_par_iter().try_for_each(|(chunk, out)| {
        let part = x.get(chunk.start..chunk.start + chunk.len()).unwrap_or(&[]);
        simd.accumulate(part, chunk.shape, out)
    })?;
    tree(&mut parts, c)?;
    parts.truncate(c);
    Ok(parts)
}

/// Merges the `parts.len() / c` leaves of `parts` (rows of `c` records)
/// into the first, in the fixed tree of the module docs.
fn tree(parts: &mut [Moments], c: usize) -> Result<(), Error> {
    let leaves = parts.len() / c;
    if leaves <= 1 {
        return Ok(());
    }
    let (left, right) = parts.split_at_mut(leaves / 2 * c);
    let (l, r) = rayon::join(|| tree(left, c), || tree(right, c));
    l?;
    r?;
    Moments::merge_slice(&mut left[..c], &right[..c])
}

/// [`crate::accumulate`] on the current rayon pool: adds the statistics of
/// `x` to the records `into` (each channel's record of `x` is merged into
/// `into[c]` after `x`'s own chunks were merged in the fixed tree).
///
/// An empty tensor leaves the records as they are. Errors (nothing
/// written): a slice length that does not match `shape`, zero channels, an
/// overflowing shape, or [`Error::CountOverflow`].
pub fn accumulate(x: &[f32], shape: Shape, into: &mut [Moments]) -> Result<(), Error> {
    shape.check("x", x.len())?;
    shape.check_channels("into", into.len())?;
    let count = shape.count()? as u64;
    if count == 0 {
        return Ok(());
    }
    if into.iter().any(|m| m.count.checked_add(count).is_none()) {
        return Err(Error::CountOverflow);
    }
    let mine = records(Simd::detect(), x, shape)?;
    Moments::merge_slice(into, &mine)
}

/// [`crate::moments`] on the current rayon pool: per-channel mean and
/// population variance, the same bits for every thread count.
///
/// Errors (nothing written): a slice length that does not match `shape`,
/// zero channels, an overflowing shape, or [`Error::EmptyBatch`].
pub fn moments(
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
    let all = records(Simd::detect(), x, shape)?;
    write_stats(&all, shape, mean, variance);
    Ok(())
}

/// Mean and population variance of the merged records, as the
/// single-threaded kernels write them (`m2` times one reciprocal of the
/// count).
fn write_stats(all: &[Moments], shape: Shape, mean: &mut [f32], variance: &mut [f32]) {
    let inv = 1.0 / (shape.batch * shape.spatial) as f64;
    for ((m, v), r) in mean.iter_mut().zip(variance.iter_mut()).zip(all) {
        *m = r.mean as f32;
        *v = (r.m2 * inv) as f32;
    }
}

/// `(x, y)` chunks: `x` and `y` split into the plan's slices, each with
/// its chunk.
fn map_chunks(
    simd: Simd,
    x: &[f32],
    y: &mut [f32],
    shape: Shape,
    (a, b): (&[f32], &[f32]),
    activation: Activation,
) -> Result<(), Error> {
    let plan = plan(shape, MIN_MAP_CHUNK, 1);
    let mut jobs = Vec::with_capacity(plan.chunks.len());
    let (mut xs, mut ys) = (x, y);
    for chunk in &plan.chunks {
        let n = chunk.len();
        if xs.len() < n || ys.len() < n {
            return Err(Error::Length {
                what: "chunk",
                expected: n,
                actual: xs.len().min(ys.len()),
            });
        }
        let (xc, xt) = xs.split_at(n);
        let (yc, yt) = core::mem::take(&mut ys).split_at_mut(n);
        (xs, ys) = (xt, yt);
        jobs.push((*chunk, xc, yc));
    }
    jobs.into_par_iter().try_for_each(|(chunk, xc, yc)| {
        let cs = chunk.first_channel..chunk.first_channel + chunk.shape.channels;
        let (ac, bc) = (a.get(cs.clone()).unwrap_or(&[]), b.get(cs).unwrap_or(&[]));
        simd.affine(xc, yc, chunk.shape, ac, bc, activation)
    })
}

/// [`crate::affine`] on the current rayon pool.
///
/// Errors (nothing written): `x`, `y`, `a` or `b` lengths that do not
/// match `shape`, a bad shape, or a bad `Clamp`.
pub fn affine(
    x: &[f32],
    y: &mut [f32],
    shape: Shape,
    a: &[f32],
    b: &[f32],
    activation: Activation,
) -> Result<(), Error> {
    shape.check("x", x.len())?;
    shape.check("y", y.len())?;
    shape.check_channels("a", a.len())?;
    shape.check_channels("b", b.len())?;
    activation.validate()?;
    map_chunks(Simd::detect(), x, y, shape, (a, b), activation)
}

/// The folded coefficients of `params` (validated).
fn folded(params: &Params<'_>) -> Result<(Vec<f32>, Vec<f32>), Error> {
    let c = params.mean.len();
    let (mut a, mut b) = (vec![0.0; c], vec![0.0; c]);
    crate::normalize::fold(
        params.mean,
        params.variance,
        params.scale,
        params.offset,
        params.epsilon,
        &mut a,
        &mut b,
    )?;
    Ok((a, b))
}

/// [`crate::normalize`] on the current rayon pool: the coefficients are
/// folded once, then every chunk is normalized with them.
///
/// Errors (nothing written): slice lengths that do not match `shape`, a bad
/// shape, an `epsilon` that is not finite and positive, or a bad `Clamp`.
pub fn normalize(x: &[f32], y: &mut [f32], shape: Shape, params: &Params<'_>) -> Result<(), Error> {
    shape.check("x", x.len())?;
    shape.check("y", y.len())?;
    params.validate(shape)?;
    run_normalize(Simd::detect(), x, y, shape, params)
}

fn run_normalize(
    simd: Simd,
    x: &[f32],
    y: &mut [f32],
    shape: Shape,
    params: &Params<'_>,
) -> Result<(), Error> {
    let (a, b) = folded(params)?;
    map_chunks(simd, x, y, shape, (&a, &b), params.activation)
}

/// Validates a layer call: lengths of `x` (and `y`) against `shape`, the
/// channels against the layer's, `scale` and `offset` lengths.
fn check_layer(
    bn: &BatchNorm<'_>,
    x: usize,
    y: usize,
    shape: Shape,
    so: ScaleOffset<'_>,
) -> Result<(), Error> {
    shape.check("x", x)?;
    shape.check("y", y)?;
    check_len(LAYER_CHANNELS, shape.channels, bn.channels())?;
    if let Some(s) = so.scale {
        check_len("scale", s.len(), bn.channels())?;
    }
    if let Some(o) = so.offset {
        check_len("offset", o.len(), bn.channels())?;
    }
    check_epsilon(bn.config().epsilon)?;
    bn.config().activation.validate()
}

/// [`BatchNorm::train`] on the current rayon pool: batch statistics from
/// the fixed chunks and merge tree into `batch`, the moving statistics
/// updated with them (count `batch * spatial`), and `y` normalized with
/// them, chunk by chunk. The same bits for every thread count.
///
/// Errors (nothing written, state unchanged): lengths that do not match
/// `shape` or the layer's channels, or an empty batch.
pub fn train(
    bn: &mut BatchNorm<'_>,
    x: &[f32],
    y: &mut [f32],
    shape: Shape,
    params: ScaleOffset<'_>,
    batch: &mut Batch<'_>,
) -> Result<(), Error> {
    check_layer(bn, x.len(), y.len(), shape, params)?;
    check_len("batch.mean", batch.mean.len(), bn.channels())?;
    check_len("batch.variance", batch.variance.len(), bn.channels())?;
    let count = match shape.count()? {
        0 => return Err(Error::EmptyBatch),
        n => n as u64,
    };
    let (simd, config, moving) = bn.parts();
    let all = records(simd, x, shape)?;
    write_stats(&all, shape, batch.mean, batch.variance);
    ema::apply(moving, batch.mean, batch.variance, count, config);
    let p = Params {
        mean: batch.mean,
        variance: batch.variance,
        scale: params.scale,
        offset: params.offset,
        epsilon: config.epsilon,
        activation: config.activation,
    };
    run_normalize(simd, x, y, shape, &p)
}

/// [`BatchNorm::infer`] on the current rayon pool: `y` normalized with the
/// moving statistics, chunk by chunk. An empty batch writes nothing.
///
/// Errors (nothing written): lengths that do not match `shape` or the
/// layer's channels.
pub fn infer(
    bn: &BatchNorm<'_>,
    x: &[f32],
    y: &mut [f32],
    shape: Shape,
    params: ScaleOffset<'_>,
) -> Result<(), Error> {
    check_layer(bn, x.len(), y.len(), shape, params)?;
    let moving = bn.moving();
    let p = Params {
        mean: moving.mean,
        variance: moving.variance,
        scale: params.scale,
        offset: params.offset,
        epsilon: bn.config().epsilon,
        activation: bn.config().activation,
    };
    run_normalize(bn.simd(), x, y, shape, &p)
}
