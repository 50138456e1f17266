//! Speed-up of the `parallel` module (feature `rayon`) on the bench shapes
//! of `common` (both layouts, C in {3, 16, 64, 256, 1000}, 256 KiB, 8 MiB and
//! 64 MiB): the single-threaded kernel beside the parallel one on a pool of
//! one and of two threads, and the read and read+write rooflines on one and
//! two threads (each thread summing or mapping half of the bytes), which
//! show what the memory system gives a second core.
//!
//! `cargo bench -p batchnorm-benches --features rayon --bench parallel`; speed-ups:
//! `python3 benches/speedup.py`. One group per layout and channel count,
//! `parallel/<Layout>/C<c>`, functions:
//!
//! * `roofline_read_t1`, `roofline_read_t2`, `roofline_rw_t1`,
//!   `roofline_rw_t2`: the rooflines of `common`, on one thread, or on two
//!   (halves of the tensor through `rayon::join`);
//! * `moments_seq`: `batchnorm::moments`; `moments_t1`, `moments_t2`:
//!   `parallel::moments` on a pool of one and of two threads;
//! * `train_seq`, `train_t2`: `BatchNorm::train`, `parallel::train`;
//! * `infer_seq`, `infer_t2`: `BatchNorm::infer`, `parallel::infer`.
//!
//! Pooled functions are timed inside the pool (`iter_custom` within
//! `ThreadPool::install`), as a runtime that lives on its pool calls them;
//! each timed call includes the fork and join of its chunks.
mod common;

use batchnorm::{moments, parallel, Batch, BatchNorm, Config, Layout, MovingStats, ScaleOffset};
use common::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use rayon::ThreadPool;
use std::hint::black_box;
use std::time::{Duration, Instant};

fn pool(n: usize) -> ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .unwrap()
}

/// `iters` calls of `f` timed on a thread of `pool`.
fn timed(pool: &ThreadPool, iters: u64, mut f: impl FnMut() + Send) -> Duration {
    pool.install(|| {
        let t = Instant::now();
        for _ in 0..iters {
            f();
        }
        t.elapsed()
    })
}

fn bench(cr: &mut Criterion) {
    let (p1, p2) = (pool(1), pool(2));
    for layout in [Layout::Nhwc, Layout::Nchw] {
        for &c in &CHANNELS {
            let mut group = cr.benchmark_group(format!("parallel/{layout:?}/C{c}"));
            for bytes in sizes() {
                let shape = shape(layout, c, bytes);
                let len = shape.len().unwrap();
                let buf = input(len);
                let x = &buf[1..];
                let mut out = output(len);
                let (mut mean, mut var) = (vec![0.0f32; c], vec![0.0f32; c]);
                let (mut mm, mut mv) = (vec![0.0f32; c], vec![1.0f32; c]);
                let (mut bm, mut bv) = (vec![0.0f32; c], vec![0.0f32; c]);
                let scale = vec![1.25f32; c];
                let offset = vec![0.5f32; c];
                let moving = MovingStats {
                    mean: &mut mm,
                    variance: &mut mv,
                    batches: 0,
                };
                let mut bn = BatchNorm::new(Config::keras(), moving).unwrap();
                let so = ScaleOffset::new(&scale, &offset);
                group.throughput(Throughput::Bytes((len * 4) as u64));
                configure(&mut group, bytes);
                let id = label(bytes);
                let half = len / 2;
                group.bench_function(BenchmarkId::new("roofline_read_t1", &id), |b| {
                    b.iter(|| black_box(roofline_read(black_box(x))))
                });
                group.bench_function(BenchmarkId::new("roofline_read_t2", &id), |b| {
                    b.iter_custom(|n| {
                        timed(&p2, n, || {
                            let (l, r) = x.split_at(half);
                            black_box(rayon::join(
                                || roofline_read(black_box(l)),
                                || roofline_read(black_box(r)),
                            ));
                        })
                    })
                });
                group.bench_function(BenchmarkId::new("roofline_rw_t1", &id), |b| {
                    b.iter(|| roofline_rw(black_box(x), black_box(&mut out[1..])))
                });
                group.bench_function(BenchmarkId::new("roofline_rw_t2", &id), |b| {
                    b.iter_custom(|n| {
                        timed(&p2, n, || {
                            let (xl, xr) = x.split_at(half);
                            let (yl, yr) = out[1..].split_at_mut(half);
                            rayon::join(|| roofline_rw(xl, yl), || roofline_rw(xr, yr));
                            black_box(&out);
                        })
                    })
                });
                group.bench_function(BenchmarkId::new("moments_seq", &id), |b| {
                    b.iter(|| moments(black_box(x), shape, &mut mean, &mut var).unwrap())
                });
                for (name, p) in [("moments_t1", &p1), ("moments_t2", &p2)] {
                    group.bench_function(BenchmarkId::new(name, &id), |b| {
                        b.iter_custom(|n| {
                            timed(p, n, || {
                                parallel::moments(black_box(x), shape, &mut mean, &mut var).unwrap()
                            })
                        })
                    });
                }
                {
                    let mut batch = Batch {
                        mean: &mut bm,
                        variance: &mut bv,
                    };
                    group.bench_function(BenchmarkId::new("train_seq", &id), |b| {
                        b.iter(|| {
                            bn.train(black_box(x), &mut out[1..], shape, so, &mut batch)
                                .unwrap()
                        })
                    });
                    group.bench_function(BenchmarkId::new("train_t2", &id), |b| {
                        b.iter_custom(|n| {
                            timed(&p2, n, || {
                                let y = &mut out[1..];
                                parallel::train(&mut bn, black_box(x), y, shape, so, &mut batch)
                                    .unwrap()
                            })
                        })
                    });
                }
                group.bench_function(BenchmarkId::new("infer_seq", &id), |b| {
                    b.iter(|| bn.infer(black_box(x), &mut out[1..], shape, so).unwrap())
                });
                group.bench_function(BenchmarkId::new("infer_t2", &id), |b| {
                    b.iter_custom(|n| {
                        timed(&p2, n, || {
                            parallel::infer(&bn, black_box(x), &mut out[1..], shape, so).unwrap()
                        })
                    })
                });
            }
            group.finish();
        }
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
