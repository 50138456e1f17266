//! `backward` (training and inference mode, with and without a fused ReLU)
//! beside its limit: one pass reading `x` and `dy` (the sums) plus one pass
//! reading `x`, `dy` and writing `dx`, both measured in this run as plain
//! SIMD rooflines over the same bytes (`roofline_read2`: four-accumulator
//! sums of both inputs; `roofline_rw2`: `dx = x * a + dy * b`). `ratios.py`
//! adds the two rooflines' times into the limit. Both layouts, C in {3, 16,
//! 64, 256, 1000}, 256 KiB / 8 MiB / 64 MiB of `x` (see `common::sizes`),
//! and groups `backward/Nchw/runs49` and `runs196`: one image of 1326
//! channels of 7 x 7 and 332 of 14 x 14 (about 256 KiB each).
//!
//! NHWC rows wider than one column group of `common::GROUP` vectors (C = 64
//! and up with 16 vector registers, 256 and up with 32) also time
//! `bound_backward`, the structural bound (`common`'s module docs) of
//! training mode: the simplest two passes in the access pattern such rows
//! force (their two sums per vector do not fit the registers), doing
//! strictly less than the crate (no shift, no blocks, no `f64`, no mask,
//! three coefficients instead of four). NCHW cells time `bound_runs`
//! instead, the same two passes run by run (a reduction and a tail per
//! run). `ratios.py` reports limit / bound beside the `backward` and
//! `backward_relu` rows.
//!
//! `cargo bench -p batchnorm-benches --bench backward`; ratios: `python3 benches/ratios.py`.
mod common;

use batchnorm::{Activation, Gradients, Layout, Mode, Params, Shape};
use common::*;
use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, Throughput,
};
use std::hint::black_box;

/// Read roofline over two inputs: four independent accumulators per input.
#[inline(never)]
fn roofline_read2(x: &[f32], dy: &[f32]) -> f32 {
    let mut acc = [Native::splat(0.0); 4];
    let mut bcc = [Native::splat(0.0); 4];
    let xs = x.chunks_exact(4 * LANES);
    let ds = dy.chunks_exact(4 * LANES);
    for (xc, dc) in xs.zip(ds) {
        for k in 0..4 {
            acc[k] += load(&xc[k * LANES..]);
            bcc[k] += load(&dc[k * LANES..]);
        }
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3]) + (bcc[0] + bcc[1]) + (bcc[2] + bcc[3])).reduce_add()
}

/// Read+write roofline over two inputs: `dx = x * a + dy * b`.
#[inline(never)]
fn roofline_rw2(x: &[f32], dy: &[f32], dx: &mut [f32]) {
    let (a, b) = (Native::splat(1.5), Native::splat(-0.25));
    let ins = x.chunks_exact(LANES).zip(dy.chunks_exact(LANES));
    for ((xc, dc), oc) in ins.zip(dx.chunks_exact_mut(LANES)) {
        let v = load(xc).mul_add(a, load(dc) * b);
        oc.copy_from_slice(&v.to_array());
    }
}

/// The structural bound of training-mode backward for NHWC rows wider than
/// one column group of [`GROUP`] vectors. Pass 1: per-channel `f32` sums of
/// `dy` and `dy * x` into `s` and `t` ([`panel_sums`], which also sums one
/// input for `bound_sums`). Pass 2: `dx = dy * p[c] + (x * q[c] + r[c])`,
/// the three coefficients loaded beside every vector (as `bound_affine`);
/// columns after the last whole vector one at a time.
#[inline(never)]
fn bound_backward(
    (x, dy, dx): (&[f32], &[f32], &mut [f32]),
    (s, t): (&mut [f32], &mut [f32]),
    (p, q, r): (&[f32], &[f32], &[f32]),
) {
    let c = p.len();
    let nv = c / LANES;
    panel_sums(dy, x, c, s, t);
    let rows = x.chunks_exact(c).zip(dy.chunks_exact(c));
    for ((xr, dr), or) in rows.zip(dx.chunks_exact_mut(c)) {
        for v in 0..nv {
            let o = v * LANES;
            let k = load(&xr[o..]).mul_add(load(&q[o..]), load(&r[o..]));
            store(load(&dr[o..]).mul_add(load(&p[o..]), k), &mut or[o..]);
        }
        for j in nv * LANES..c {
            or[j] = dr[j] * p[j] + (xr[j] * q[j] + r[j]);
        }
    }
}

/// The structural bound of training mode on NCHW runs of `s >= LANES`
/// elements: the simplest two passes that go run by run, as the crate's
/// do. Pass 1, per run: `dy` and `dy * x` in four accumulator pairs over
/// groups of four vectors, the whole vectors after the last group into the
/// first pair, one reduction of each sum per run, the elements after the
/// last whole vector one at a time, the two sums added to the run's
/// channel in `f32`. Pass 2, per run:
/// `dx = dy * p + (x * q + r)` with the channel's three coefficients
/// splatted, then the elements after the last whole vector one at a time.
/// Strictly less than the crate (no shift, no mask, no `f64`, no blocks,
/// no coefficients computed between the passes, no aligned stores): what
/// is left between this and the limit is what runs of `s` cost a kernel
/// that goes run by run (a reduction, a tail and a loop's start and end
/// per run).
#[inline(never)]
fn bound_runs(
    (x, dy, dx): (&[f32], &[f32], &mut [f32]),
    s: usize,
    (sg, sgd): (&mut [f32], &mut [f32]),
    (p, q, r): (&[f32], &[f32], &[f32]),
) {
    let c = p.len();
    let zero = Native::splat(0.0);
    // Channels by a counter that wraps, not `j % c`: a division per run.
    let runs = x.chunks_exact(s).zip(dy.chunks_exact(s));
    for ((xr, dr), ch) in runs.zip((0..c).cycle()) {
        let (mut a, mut b) = ([zero; 4], [zero; 4]);
        let (xs, ds) = (xr.chunks_exact(4 * LANES), dr.chunks_exact(4 * LANES));
        let (xl, dl) = (xs.remainder(), ds.remainder());
        for (xc, dc) in xs.zip(ds) {
            for k in 0..4 {
                let (xv, dv) = (load(&xc[k * LANES..]), load(&dc[k * LANES..]));
                a[k] += dv;
                b[k] = dv.mul_add(xv, b[k]);
            }
        }
        let (xs, ds) = (xl.chunks_exact(LANES), dl.chunks_exact(LANES));
        let (xt, dt) = (xs.remainder(), ds.remainder());
        for (xc, dc) in xs.zip(ds) {
            let (xv, dv) = (load(xc), load(dc));
            a[0] += dv;
            b[0] = dv.mul_add(xv, b[0]);
        }
        let mut g = ((a[0] + a[1]) + (a[2] + a[3])).reduce_add();
        let mut gd = ((b[0] + b[1]) + (b[2] + b[3])).reduce_add();
        for (&xe, &de) in xt.iter().zip(dt) {
            g += de;
            gd += de * xe;
        }
        sg[ch] += g;
        sgd[ch] += gd;
    }
    let runs = x.chunks_exact(s).zip(dy.chunks_exact(s));
    for (((xr, dr), or), ch) in runs.zip(dx.chunks_exact_mut(s)).zip((0..c).cycle()) {
        let (ps, qs, rs) = (p[ch], q[ch], r[ch]);
        let (pv, qv, rv) = (Native::splat(ps), Native::splat(qs), Native::splat(rs));
        let ins = xr.chunks_exact(LANES).zip(dr.chunks_exact(LANES));
        for ((xc, dc), oc) in ins.zip(or.chunks_exact_mut(LANES)) {
            store(load(dc).mul_add(pv, load(xc).mul_add(qv, rv)), oc);
        }
        for t in s / LANES * LANES..s {
            or[t] = dr[t] * ps + (xr[t] * qs + rs);
        }
    }
}

/// The vector operations of backward with ReLU in the limit's access
/// pattern: the two passes over the flat input with one set of coefficients
/// (no channels, blocks or `f64`). Each vector of pass 1 recomputes the
/// forward's `y = x * a + b`, compares it, keeps `dy` where it passed
/// (`g`), and adds `g` and `g * (x - m)` (four accumulator pairs); each of
/// pass 2 does the same mask and `dx = g * p + ((x - m) * q + r)`. Six
/// vector operations per vector in each pass, against the rooflines' one
/// and two (five on the FP ports where the compiler folds keeping `dy` into
/// a masked load, as with AVX-512: 2.5 cycles per vector of `x` and `dy` on
/// a core with two 512-bit FP ports), so this says how much of the limit
/// the operation count alone leaves to the fused ReLU.
#[inline(never)]
fn bound_relu(x: &[f32], dy: &[f32], dx: &mut [f32]) -> f32 {
    let zero = Native::splat(0.0);
    let (a, b, m) = (Native::splat(1.25), Native::splat(0.5), Native::splat(0.1));
    let (p, q, r) = (
        Native::splat(0.75),
        Native::splat(-0.5),
        Native::splat(0.25),
    );
    let keep = |xv: Native, dv: Native| xv.mul_add(a, b).simd_gt(zero) & dv;
    let (mut s, mut t) = ([zero; 4], [zero; 4]);
    let xs = x.chunks_exact(4 * LANES);
    let ds = dy.chunks_exact(4 * LANES);
    for (xc, dc) in xs.zip(ds) {
        for k in 0..4 {
            let (xv, dv) = (load(&xc[k * LANES..]), load(&dc[k * LANES..]));
            let g = keep(xv, dv);
            s[k] += g;
            t[k] = g.mul_add(xv - m, t[k]);
        }
    }
    let ins = x.chunks_exact(LANES).zip(dy.chunks_exact(LANES));
    for ((xc, dc), oc) in ins.zip(dx.chunks_exact_mut(LANES)) {
        let (xv, dv) = (load(xc), load(dc));
        store(keep(xv, dv).mul_add(p, (xv - m).mul_add(q, r)), oc);
    }
    ((s[0] + s[1]) + (s[2] + s[3]) + (t[0] + t[1]) + (t[2] + t[3])).reduce_add()
}

/// NCHW shapes of one image whose runs are those of real networks' late
/// layers (7 x 7 and 14 x 14 images), each about 256 KiB of `x`: the
/// per-run costs (a reduction, a tail, the coefficients) that the
/// C = 1000 rows spread over runs of 65 weigh most here.
const RUNS: [(usize, usize); 2] = [(1326, 49), (332, 196)];

fn bench(cr: &mut Criterion) {
    for layout in [Layout::Nhwc, Layout::Nchw] {
        for &c in &CHANNELS {
            let mut group = cr.benchmark_group(format!("backward/{layout:?}/C{c}"));
            for bytes in sizes() {
                configure(&mut group, bytes);
                cell(&mut group, shape(layout, c, bytes), &label(bytes));
            }
            group.finish();
        }
    }
    for (c, hw) in RUNS {
        let mut group = cr.benchmark_group(format!("backward/Nchw/runs{hw}"));
        configure(&mut group, c * hw * 4);
        cell(&mut group, Shape::nchw(1, c, hw), &format!("C{c}"));
        group.finish();
    }
}

/// Every function of one cell: the two rooflines, the bounds that apply,
/// and `backward` in its three modes, on `x` of `shape`, misaligned.
fn cell(group: &mut BenchmarkGroup<'_, WallTime>, shape: Shape, id: &str) {
    let simd = simd();
    let (layout, c) = (shape.layout, shape.channels);
    let len = shape.len().unwrap();
    let xb = input(len);
    let x = &xb[1..];
    let dyv: Vec<f32> = input(len + 3)[3..].iter().map(|v| v - 9.0).collect();
    let dyb = placed(&dyv, dy_at());
    let dy = &dyb[1..len + 1];
    let mut out = output(len);
    let mut mean = vec![0.0f32; c];
    let mut var = vec![0.0f32; c];
    batchnorm::moments(x, shape, &mut mean, &mut var).unwrap();
    let scale = vec![1.25f32; c];
    let offset = vec![0.5f32; c];
    let (mut ds, mut dof) = (vec![0.0f32; c], vec![0.0f32; c]);
    let p = Params {
        mean: &mean,
        variance: &var,
        scale: Some(&scale),
        offset: Some(&offset),
        epsilon: 1e-3,
        activation: Activation::None,
    };
    // x and dy are read: two streams of `bytes`.
    group.throughput(Throughput::Bytes(2 * (len * 4) as u64));
    group.bench_function(BenchmarkId::new("roofline_read2", id), |b| {
        b.iter(|| black_box(roofline_read2(black_box(x), black_box(dy))))
    });
    group.bench_function(BenchmarkId::new("roofline_rw2", id), |b| {
        b.iter(|| roofline_rw2(black_box(x), black_box(dy), &mut out[1..]))
    });
    group.bench_function(BenchmarkId::new("bound_relu", id), |b| {
        b.iter(|| black_box(bound_relu(black_box(x), black_box(dy), &mut out[1..])))
    });
    let (mut s, mut t) = (vec![0.0f32; c], vec![0.0f32; c]);
    let (bp, bq, br) = (vec![0.75f32; c], vec![-0.5f32; c], vec![0.25f32; c]);
    if layout == Layout::Nchw && shape.spatial >= LANES {
        group.bench_function(BenchmarkId::new("bound_runs", id), |b| {
            b.iter(|| {
                bound_runs(
                    (black_box(x), black_box(dy), &mut out[1..]),
                    shape.spatial,
                    (&mut s, &mut t),
                    (&bp, &bq, &br),
                );
                black_box((&s, &t));
            })
        });
    }
    if layout == Layout::Nhwc && c > GROUP * LANES {
        group.bench_function(BenchmarkId::new("bound_backward", id), |b| {
            b.iter(|| {
                bound_backward(
                    (black_box(x), black_box(dy), &mut out[1..]),
                    (&mut s, &mut t),
                    (&bp, &bq, &br),
                );
                black_box((&s, &t));
            })
        });
    }
    for (name, mode, act) in [
        ("backward", Mode::Training, Activation::None),
        ("backward_relu", Mode::Training, Activation::Relu),
        ("backward_infer", Mode::Inference, Activation::None),
    ] {
        let p = Params {
            activation: act,
            ..p
        };
        group.bench_function(BenchmarkId::new(name, id), |b| {
            b.iter(|| {
                let g = Gradients {
                    dx: &mut out[1..],
                    dscale: &mut ds,
                    doffset: &mut dof,
                };
                simd.backward(black_box(x), black_box(dy), shape, &p, mode, g)
                    .unwrap()
            })
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
