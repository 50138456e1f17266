//! What every benchmark shares: the rooflines, the tensor sizes and shapes,
//! and deliberately misaligned inputs.
//!
//! Rooflines are measured in the same run as the kernels, over the same
//! bytes, so a ratio to them is a statement about this machine at this
//! moment rather than about a number from a datasheet:
//! * read roofline: a plain SIMD sum with four independent accumulators;
//! * read+write roofline: a SIMD `y = x * a + b` with constant `a`, `b`.
//!
//! Where a layout makes the roofline's access pattern unavailable to any
//! per-channel kernel, a *structural bound* is measured too: the simplest
//! kernel that does strictly less than the crate's in the same access
//! pattern (no shift, no blocks, no `f64`, no activation). Its ratio to the
//! roofline says how much of the gap is the layout's and how much the
//! kernel's; it is not a limit any kernel must stay under.
//! * [`bound_sums`] (moments): per-channel `f32` sums of `x` and `x²`, one
//!   horizontal reduction per NCHW run, or NHWC rows of at least
//!   [`WIDE_ROW`] elements summed in panels of 16 rows by groups of eight
//!   vectors (four without AVX-512) held in registers.
//! * [`bound_affine`] (affine, normalize, infer): NHWC `y = x * a[c] + b[c]`
//!   with both coefficients loaded from memory for every vector, as rows
//!   wider than the register file force.
//! * [`bound_ops`] (moments, every cell): the kernel's three vector
//!   operations per input vector in the roofline's access pattern; not an
//!   access-pattern bound but an operation-count one, for cores where
//!   three operations per vector cannot keep up with L2.
//! * `bound_backward` (training-mode backward, in `benches/backward.rs`):
//!   the two passes of the first two bounds over two inputs, for NHWC rows
//!   wider than one column group of [`GROUP`] vectors; `bound_runs`, the
//!   same run by run for NCHW.
//!
//! Both use the widest `wide` type the build runs natively (the same one
//! `Simd::detect()` picks in a native build).
#![allow(dead_code)]

use batchnorm::{Layout, Shape, Simd};
use criterion::{measurement::WallTime, BenchmarkGroup, BenchmarkId};
use std::hint::black_box;
use std::time::Duration;

#[cfg(target_feature = "avx512f")]
pub type Native = wide::f32x16;
#[cfg(all(target_feature = "avx", not(target_feature = "avx512f")))]
pub type Native = wide::f32x8;
#[cfg(not(target_feature = "avx"))]
pub type Native = wide::f32x4;

pub const LANES: usize = core::mem::size_of::<Native>() / 4;
pub const CHANNELS: [usize; 5] = [3, 16, 64, 256, 1000];
const KIB: usize = 1024;

/// Input sizes in bytes: L2-, L3- and DRAM-sized by default;
/// `BN_BENCH_SIZES=all` adds 4 KiB, 64 KiB, 1 MiB and 16 MiB.
pub fn sizes() -> Vec<usize> {
    let mut s = vec![256 * KIB, 8 * KIB * KIB, 64 * KIB * KIB];
    if std::env::var("BN_BENCH_SIZES").as_deref() == Ok("all") {
        s.extend([4 * KIB, 64 * KIB, KIB * KIB, 16 * KIB * KIB]);
        s.sort_unstable();
    }
    s
}

/// The benchmark shape for `bytes` of `f32` with `c` channels: NHWC as a
/// `[rows, C]` matrix; NCHW with 32 x 32 images when one fits, else one
/// image of whatever spatial size fills the bytes.
pub fn shape(layout: Layout, c: usize, bytes: usize) -> Shape {
    let elems = bytes / 4;
    match layout {
        Layout::Nhwc => Shape::nhwc((elems / c).max(1), 1, c),
        Layout::Nchw if elems / c >= 1024 => Shape::nchw(elems / c / 1024, c, 1024),
        Layout::Nchw => Shape::nchw(1, c, (elems / c).max(1)),
    }
}

/// A human label for a size.
pub fn label(bytes: usize) -> String {
    if bytes >= KIB * KIB {
        format!("{}MiB", bytes / KIB / KIB)
    } else {
        format!("{}KiB", bytes / KIB)
    }
}

/// A buffer whose element 1 sits at a fixed byte offset into a 4 KiB page,
/// so that every run of every build (and every A/B) sees the same
/// alignments, whatever the allocator returns.
pub struct Placed {
    v: Vec<f32>,
    start: usize,
    len: usize,
}

impl std::ops::Deref for Placed {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.v[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for Placed {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.v[self.start..self.start + self.len]
    }
}

/// Page offsets (bytes) of element 1 of the inputs, the second input
/// (`dy`) and the outputs: one float past a cache line (every load and
/// store misaligned, as in a tensor sliced at an odd element), and a
/// quarter or half page apart so that no load aliases a store.
/// `BN_BENCH_X_AT`, `BN_BENCH_DY_AT` and `BN_BENCH_OUT_AT` override them
/// (multiples of 64 align the slices to cache lines; an output at 4 sits
/// beside the input).
pub fn x_at() -> usize {
    env_usize("BN_BENCH_X_AT").unwrap_or(4)
}
/// See [`x_at`].
pub fn dy_at() -> usize {
    env_usize("BN_BENCH_DY_AT").unwrap_or(1024 + 4)
}
/// See [`x_at`].
pub fn out_at() -> usize {
    env_usize("BN_BENCH_OUT_AT").unwrap_or(2048 + 4)
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|s| s.parse().ok())
}

/// The lane width the kernels run: [`Simd::detect`], or the one
/// `BN_BENCH_SIMD` names (`scalar`, `x4`, `x8`, `x16`), to compare widths
/// on one machine. The rooflines and bounds keep the build's [`Native`]
/// width.
pub fn simd() -> Simd {
    match std::env::var("BN_BENCH_SIMD").as_deref() {
        Ok("scalar") => Simd::Scalar,
        Ok("x4") => Simd::X4,
        Ok("x8") => Simd::X8,
        Ok("x16") => Simd::X16,
        Ok(other) => panic!("BN_BENCH_SIMD={other}: want scalar, x4, x8 or x16"),
        Err(_) => Simd::detect(),
    }
}

/// `values` copied to a buffer whose element 1 is at byte `at` of a page.
pub fn placed(values: &[f32], at: usize) -> Placed {
    let mut v = vec![0.0f32; values.len() + 2048];
    let base = v.as_ptr() as usize;
    // Element 0 at `at - 4` bytes into a page.
    let want = (at + 4096 - 4) % 4096;
    let start = ((want + 4096 - base % 4096) % 4096) / 4;
    v[start..start + values.len()].copy_from_slice(values);
    Placed {
        v,
        start,
        len: values.len(),
    }
}

/// `len` deterministic pseudo-random values around per-position offsets,
/// after one float (use `&buf[1..]`: every load is misaligned), element 1
/// at [`x_at`].
pub fn input(len: usize) -> Placed {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let v: Vec<f32> = (0..len + 1)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (i % 7) as f32 * 3.0 + (state >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect();
    placed(&v, x_at())
}

/// `len + 1` zeros for an output (use `&mut out[1..]`), element 1 at
/// [`out_at`].
pub fn output(len: usize) -> Placed {
    placed(&vec![0.0f32; len + 1], out_at())
}

/// Timing settings that keep a full default run to a few minutes on two
/// cores while giving stable medians: fewer, longer samples for big inputs.
pub fn configure(group: &mut BenchmarkGroup<'_, WallTime>, bytes: usize) {
    group.warm_up_time(Duration::from_millis(300));
    if bytes >= 8 * KIB * KIB {
        group
            .sample_size(10)
            .measurement_time(Duration::from_secs(2));
    } else {
        group
            .sample_size(20)
            .measurement_time(Duration::from_secs(1));
    }
}

/// Read roofline: four independent SIMD accumulators summing `x`.
#[inline(never)]
pub fn roofline_read(x: &[f32]) -> f32 {
    let mut acc = [Native::splat(0.0); 4];
    let mut chunks = x.chunks_exact(4 * LANES);
    for c in &mut chunks {
        for (k, a) in acc.iter_mut().enumerate() {
            *a += Native::new(c[k * LANES..(k + 1) * LANES].try_into().unwrap());
        }
    }
    let tail: f32 = chunks.remainder().iter().sum();
    ((acc[0] + acc[1]) + (acc[2] + acc[3])).reduce_add() + tail
}

/// Read+write roofline: `y = x * a + b` with constant `a`, `b`.
#[inline(never)]
pub fn roofline_rw(x: &[f32], y: &mut [f32]) {
    let (a, b) = (Native::splat(1.5), Native::splat(-0.25));
    let mut xs = x.chunks_exact(LANES);
    let mut ys = y.chunks_exact_mut(LANES);
    for (xc, yc) in (&mut xs).zip(&mut ys) {
        let v = Native::new(xc.try_into().unwrap()).mul_add(a, b);
        yc.copy_from_slice(&v.to_array());
    }
    for (xv, yv) in xs.remainder().iter().zip(ys.into_remainder()) {
        *yv = xv * 1.5 - 0.25;
    }
}

/// The moments kernel's arithmetic without its access pattern: over the
/// flat input, four accumulator pairs of `d = k - x`, `s -= d`,
/// `q += d * d` (`k` the first element), the three vector operations per
/// input vector every moments path does (the shift that keeps
/// ill-conditioned data accurate, the sum, the square). No channels, blocks
/// or `f64`. Where the read roofline's one operation per vector leaves the
/// core idle while data streams from L2, these three may not: on a core
/// with two 512-bit FP ports they take 1.5 cycles per 64 bytes, so this
/// bound says how much of the roofline the operation count leaves to any
/// shifted single-pass kernel.
#[inline(never)]
pub fn bound_ops(x: &[f32]) -> f32 {
    let k1 = x.first().copied().unwrap_or(0.0);
    let k = Native::splat(k1);
    let (mut s, mut q) = ([Native::splat(0.0); 4], [Native::splat(0.0); 4]);
    let mut chunks = x.chunks_exact(4 * LANES);
    for c in &mut chunks {
        for (j, (sv, qv)) in s.iter_mut().zip(q.iter_mut()).enumerate() {
            let d = k - Native::new(c[j * LANES..(j + 1) * LANES].try_into().unwrap());
            *sv -= d;
            *qv = d.mul_add(d, *qv);
        }
    }
    let (mut st, mut qt) = (0.0f32, 0.0f32);
    for &v in chunks.remainder() {
        let d = k1 - v;
        st -= d;
        qt += d * d;
    }
    let (s, q) = ((s[0] + s[1]) + (s[2] + s[3]), (q[0] + q[1]) + (q[2] + q[3]));
    s.reduce_add() + q.reduce_add() + st + qt
}

/// Narrowest NHWC row (in elements) [`bound_sums`] and [`bound_affine`] are
/// measured for: rows narrower than this have a register-resident pattern,
/// for which the roofline itself is the bound.
pub const WIDE_ROW: usize = 256;

/// Whether [`bound_sums`] is measured for `shape`.
pub fn has_sums_bound(shape: Shape) -> bool {
    match shape.layout {
        Layout::Nchw => shape.spatial >= LANES,
        Layout::Nhwc => shape.channels >= WIDE_ROW,
    }
}

/// Times [`bound_sums`] as `bound_sums/<id>` in `group` when `shape` has
/// one.
pub fn bench_bound_sums(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: &str,
    x: &[f32],
    shape: Shape,
) {
    if has_sums_bound(shape) {
        let (mut s, mut q) = (vec![0.0f32; shape.channels], vec![0.0f32; shape.channels]);
        group.bench_function(BenchmarkId::new("bound_sums", id), |b| {
            b.iter(|| {
                bound_sums(black_box(x), shape, &mut s, &mut q);
                black_box((&s, &q));
            })
        });
    }
}

/// Whether [`bound_affine`] is measured for `shape`.
pub fn has_affine_bound(shape: Shape) -> bool {
    shape.layout == Layout::Nhwc && shape.channels >= WIDE_ROW
}

/// Times [`bound_affine`] as `bound_affine/<id>` in `group` when `shape`
/// has one.
pub fn bench_bound_affine(
    group: &mut BenchmarkGroup<'_, WallTime>,
    id: &str,
    x: &[f32],
    y: &mut [f32],
    shape: Shape,
    (a, b): (&[f32], &[f32]),
) {
    if has_affine_bound(shape) {
        group.bench_function(BenchmarkId::new("bound_affine", id), |bn| {
            bn.iter(|| bound_affine(black_box(x), &mut *y, a, b))
        });
    }
}

/// The structural bound of moments (see the module docs): adds the
/// per-channel sums of `x` and `x²` to `s` and `q`. NCHW with at least one
/// vector of spatial positions, or NHWC with `channels >= WIDE_ROW`.
#[inline(never)]
pub fn bound_sums(x: &[f32], shape: Shape, s: &mut [f32], q: &mut [f32]) {
    let c = shape.channels;
    match shape.layout {
        Layout::Nchw => {
            let mut ch = 0;
            for run in x.chunks_exact(shape.spatial) {
                let (rs, rq) = run_sums(run);
                s[ch] += rs;
                q[ch] += rq;
                ch = if ch + 1 == c { 0 } else { ch + 1 };
            }
        }
        Layout::Nhwc => panel_sums(x, x, c, s, q),
    }
}

/// Adds the per-channel sums of `a` and `a * b` over NHWC rows of `c`
/// elements to `s` and `q`, in panels of 16 rows by column groups of
/// [`GROUP`] vectors held in registers, the columns after the last whole
/// vector one at a time: pass 1 of [`bound_sums`] (`a = b = x`) and of the
/// backward bench's bound (`a = dy`, `b = x`).
pub fn panel_sums(a: &[f32], b: &[f32], c: usize, s: &mut [f32], q: &mut [f32]) {
    let nv = c / LANES;
    for (pa, pb) in a.chunks(16 * c).zip(b.chunks(16 * c)) {
        for v0 in (0..nv).step_by(GROUP) {
            let g = (nv - v0).min(GROUP);
            let mut sa = [Native::splat(0.0); GROUP];
            let mut qa = [Native::splat(0.0); GROUP];
            for (ra, rb) in pa.chunks_exact(c).zip(pb.chunks_exact(c)) {
                for j in 0..g {
                    let o = (v0 + j) * LANES;
                    let v = load(&ra[o..]);
                    sa[j] += v;
                    qa[j] = v.mul_add(load(&rb[o..]), qa[j]);
                }
            }
            for j in 0..g {
                let o = (v0 + j) * LANES;
                store(load(&s[o..]) + sa[j], &mut s[o..]);
                store(load(&q[o..]) + qa[j], &mut q[o..]);
            }
        }
        for (ra, rb) in pa.chunks_exact(c).zip(pb.chunks_exact(c)) {
            for j in nv * LANES..c {
                s[j] += ra[j];
                q[j] += ra[j] * rb[j];
            }
        }
    }
}

/// Vectors per column group of [`bound_sums`]: its sums then take half of
/// the vector registers (32 with AVX-512, 16 otherwise).
pub const GROUP: usize = if cfg!(target_feature = "avx512f") {
    8
} else {
    4
};

/// Four-accumulator sums of `x` and `x²` of one contiguous run.
fn run_sums(run: &[f32]) -> (f32, f32) {
    let mut sa = [Native::splat(0.0); 4];
    let mut qa = [Native::splat(0.0); 4];
    let mut chunks = run.chunks_exact(4 * LANES);
    for c in &mut chunks {
        for k in 0..4 {
            let v = load(&c[k * LANES..]);
            sa[k] += v;
            qa[k] = v.mul_add(v, qa[k]);
        }
    }
    let mut vectors = chunks.remainder().chunks_exact(LANES);
    for (k, c) in (&mut vectors).enumerate() {
        let v = load(c);
        sa[k] += v;
        qa[k] = v.mul_add(v, qa[k]);
    }
    let (mut ts, mut tq) = (0.0, 0.0);
    for &v in vectors.remainder() {
        ts += v;
        tq += v * v;
    }
    (
        ((sa[0] + sa[1]) + (sa[2] + sa[3])).reduce_add() + ts,
        ((qa[0] + qa[1]) + (qa[2] + qa[3])).reduce_add() + tq,
    )
}

/// The structural bound of affine, normalize and infer for NHWC rows of at
/// least [`WIDE_ROW`] elements (see the module docs).
#[inline(never)]
pub fn bound_affine(x: &[f32], y: &mut [f32], a: &[f32], b: &[f32]) {
    let c = a.len();
    let nv = c / LANES;
    for (xr, yr) in x.chunks_exact(c).zip(y.chunks_exact_mut(c)) {
        for v in 0..nv {
            let o = v * LANES;
            store(
                load(&xr[o..]).mul_add(load(&a[o..]), load(&b[o..])),
                &mut yr[o..],
            );
        }
        for j in nv * LANES..c {
            yr[j] = xr[j] * a[j] + b[j];
        }
    }
}

/// The first [`LANES`] values of `s`.
pub fn load(s: &[f32]) -> Native {
    Native::new(s[..LANES].try_into().unwrap())
}

/// Stores `v` to the first [`LANES`] values of `out`.
pub fn store(v: Native, out: &mut [f32]) {
    out[..LANES].copy_from_slice(&v.to_array());
}
