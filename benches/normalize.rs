//! `affine` and `normalize` beside the read+write roofline (a SIMD
//! `x * a + b` over the same bytes), both layouts, C in {3, 16, 64, 256,
//! 1000}, L2- to DRAM-sized inputs (see `common::sizes`). For NHWC with
//! C >= 256 also `bound_affine`, the structural bound of `common`: `x * a[c]
//! + b[c]` with both coefficients loaded for every vector.
//!
//! `cargo bench -p batchnorm-benches --bench normalize`; ratios: `python3 benches/ratios.py`.
mod common;

use batchnorm::{Activation, Layout, Params};
use common::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

fn bench(cr: &mut Criterion) {
    let simd = simd();
    for layout in [Layout::Nhwc, Layout::Nchw] {
        for &c in &CHANNELS {
            let mut group = cr.benchmark_group(format!("normalize/{layout:?}/C{c}"));
            for bytes in sizes() {
                let shape = shape(layout, c, bytes);
                let len = shape.len().unwrap();
                let buf = input(len);
                let x = &buf[1..];
                let mut out = output(len);
                let mean: Vec<f32> = (0..c).map(|i| i as f32 * 0.1).collect();
                let var: Vec<f32> = (0..c).map(|i| 1.0 + i as f32 * 0.01).collect();
                let scale = vec![1.25f32; c];
                let offset = vec![0.5f32; c];
                let (mut a, mut b) = (vec![0.0; c], vec![0.0; c]);
                batchnorm::fold(
                    &mean,
                    &var,
                    Some(&scale),
                    Some(&offset),
                    1e-3,
                    &mut a,
                    &mut b,
                )
                .unwrap();
                let p = Params {
                    mean: &mean,
                    variance: &var,
                    scale: Some(&scale),
                    offset: Some(&offset),
                    epsilon: 1e-3,
                    activation: Activation::None,
                };
                // Read x and write y: two streams of `bytes`.
                group.throughput(Throughput::Bytes(2 * (len * 4) as u64));
                configure(&mut group, bytes);
                let id = label(bytes);
                group.bench_function(BenchmarkId::new("roofline_rw", &id), |bn| {
                    bn.iter(|| roofline_rw(black_box(x), black_box(&mut out[1..])))
                });
                bench_bound_affine(&mut group, &id, x, &mut out[1..], shape, (&a, &b));
                group.bench_function(BenchmarkId::new("affine", &id), |bn| {
                    bn.iter(|| {
                        simd.affine(black_box(x), &mut out[1..], shape, &a, &b, Activation::None)
                            .unwrap()
                    })
                });
                group.bench_function(BenchmarkId::new("normalize", &id), |bn| {
                    bn.iter(|| {
                        simd.normalize(black_box(x), &mut out[1..], shape, &p)
                            .unwrap()
                    })
                });
                group.bench_function(BenchmarkId::new("normalize_relu", &id), |bn| {
                    let p = Params {
                        activation: Activation::Relu,
                        ..p
                    };
                    bn.iter(|| {
                        simd.normalize(black_box(x), &mut out[1..], shape, &p)
                            .unwrap()
                    })
                });
            }
            group.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
