//! `BatchNorm::train` (moments, normalize, moving update in one call) beside
//! the three-pass limit: one read roofline pass (moments) plus one
//! read+write roofline pass (normalize) over the same bytes, both measured
//! in this run. Also `infer`, beside the read+write roofline. Where
//! `common` defines them for the shape, the structural bounds `bound_sums`
//! and `bound_affine` are measured too, and `bound_ops` (the moments pass's
//! three operations per vector) in every cell; `ratios.py` adds them up (the
//! slower of `bound_sums` and `bound_ops` for the moments pass, as for
//! `moments`, and a roofline for a pass that has no bound) into the
//! training step's bound.
//!
//! `cargo bench -p batchnorm-benches --bench train`; ratios: `python3 benches/ratios.py`.
mod common;

use batchnorm::{Batch, BatchNorm, Config, Layout, MovingStats, ScaleOffset};
use common::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

fn bench(cr: &mut Criterion) {
    for layout in [Layout::Nhwc, Layout::Nchw] {
        for &c in &CHANNELS {
            let mut group = cr.benchmark_group(format!("train/{layout:?}/C{c}"));
            for bytes in sizes() {
                let shape = shape(layout, c, bytes);
                let len = shape.len().unwrap();
                let buf = input(len);
                let x = &buf[1..];
                let mut out = output(len);
                let (mut mm, mut mv) = (vec![0.0f32; c], vec![1.0f32; c]);
                let (mut bm, mut bv) = (vec![0.0f32; c], vec![0.0f32; c]);
                let scale = vec![1.25f32; c];
                let offset = vec![0.5f32; c];
                let moving = MovingStats {
                    mean: &mut mm,
                    variance: &mut mv,
                    batches: 0,
                };
                let mut bn = BatchNorm::new(Config::keras(), moving)
                    .unwrap()
                    .with_simd(simd());
                let mut batch = Batch {
                    mean: &mut bm,
                    variance: &mut bv,
                };
                let so = ScaleOffset::new(&scale, &offset);
                // Throughput counts the input bytes once: GB/s of training data.
                group.throughput(Throughput::Bytes((len * 4) as u64));
                configure(&mut group, bytes);
                let id = label(bytes);
                group.bench_function(BenchmarkId::new("roofline_read", &id), |b| {
                    b.iter(|| black_box(roofline_read(black_box(x))))
                });
                group.bench_function(BenchmarkId::new("roofline_rw", &id), |b| {
                    b.iter(|| roofline_rw(black_box(x), black_box(&mut out[1..])))
                });
                bench_bound_sums(&mut group, &id, x, shape);
                group.bench_function(BenchmarkId::new("bound_ops", &id), |b| {
                    b.iter(|| black_box(bound_ops(black_box(x))))
                });
                let coef = (&scale[..], &offset[..]);
                bench_bound_affine(&mut group, &id, x, &mut out[1..], shape, coef);
                group.bench_function(BenchmarkId::new("train", &id), |b| {
                    b.iter(|| {
                        bn.train(black_box(x), &mut out[1..], shape, so, &mut batch)
                            .unwrap()
                    })
                });
                group.bench_function(BenchmarkId::new("infer", &id), |b| {
                    b.iter(|| bn.infer(black_box(x), &mut out[1..], shape, so).unwrap())
                });
            }
            group.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
