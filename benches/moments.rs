//! `moments` beside the read roofline (crate docs §4: `moments >= 0.9 *
//! roofline` on a `-C target-cpu=native` build), both layouts,
//! C in {3, 16, 64, 256, 1000}, L2- to DRAM-sized inputs.
//!
//! `cargo bench -p batchnorm-benches --bench moments`; ratios: `python3 benches/ratios.py`
//! (add `--filter moments/`). One group per layout and channel count,
//! `moments/<Layout>/C<c>`, with the tensor size as the parameter; filter
//! as usual, e.g. `cargo bench -p batchnorm-benches --bench moments -- 'moments/Nchw/C64/.*/8MiB'`.
//!
//! # Sizes
//!
//! 256 KiB (L2-resident), 8 MiB (L3), 64 MiB (DRAM) by default, which keeps
//! the whole run to about three minutes on two cores; `BN_BENCH_SIZES=all`
//! adds 4 KiB, 64 KiB, 1 MiB and 16 MiB (see `common::sizes`).
//!
//! # Shapes (`common::shape`), for `E = bytes / 4` elements
//!
//! * NHWC: a `[rows, C]` matrix, `spatial = 1`, `batch = E / C` (for C = 3 and
//!   C = 1000 the tensor is a little under the nominal size; throughput
//!   counts the actual bytes).
//! * NCHW: 32 x 32 images, `spatial = 1024`, `batch = E / (C * 1024)`; where
//!   not even one image per channel fits, `batch = 1` and `spatial = E / C`
//!   (at 256 KiB: C = 256 is `1 x 256 x 256`, C = 1000 is `1 x 1000 x 65`;
//!   at 4 KiB, C = 1000 has `spatial = 1`).
//!
//! # Functions, side by side on the same bytes
//!
//! * `roofline_read`: a plain 4-accumulator SIMD sum with the widest `wide`
//!   type the build runs natively (`f32x16` with `avx512f`, `f32x8` with
//!   `avx`, else `f32x4`): the machine's read limit, measured in this run.
//! * `moments`: the kernel (`Simd::detect()` lanes, or `BN_BENCH_SIMD`'s).
//! * `bound_sums`, for NCHW and for NHWC with C >= 256: the structural bound
//!   of `common` (per-channel `f32` sums of `x` and `x²` in the same access
//!   pattern, with none of the kernel's numerics): how much of the roofline
//!   the layout leaves to any per-channel kernel.
//! * `bound_ops`, every cell: the kernel's three vector operations per
//!   input vector (shift, sum, square) over the flat input with
//!   four accumulator pairs, in the roofline's access pattern: how much of
//!   the roofline the operation count leaves (`common::bound_ops`).
//! * sizes <= 1 MiB only: `reference_f64`, the crate's scalar `f64`
//!   two-pass oracle, and `naive_welford`, a per-element Welford update in
//!   `f32` per channel (one division and a dependent update per element),
//!   written here: what crate docs §4 says cannot reach the roofline.
//!
//! Throughput is `Throughput::Bytes` of the input. Every input starts at
//! `&buf[1..]`, one `f32` into its allocation, so no load is aligned (as in
//! simdutf8's benches). Before timing, the kernel's output on those very
//! bytes is checked against the `f64` oracle (sizes <= 1 MiB).
mod common;

use batchnorm::{reference, Layout, Shape};
use common::*;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use std::hint::black_box;

/// Largest input that also runs the scalar baselines.
const BASELINE_MAX: usize = 1024 * 1024;

/// Per-channel state of the naive Welford baseline.
struct Welford {
    count: Vec<f32>,
    mean: Vec<f32>,
    m2: Vec<f32>,
}

impl Welford {
    fn new(channels: usize) -> Welford {
        Welford {
            count: vec![0.0; channels],
            mean: vec![0.0; channels],
            m2: vec![0.0; channels],
        }
    }

    #[inline(always)]
    fn push(&mut self, c: usize, v: f32) {
        self.count[c] += 1.0;
        let d = v - self.mean[c];
        self.mean[c] += d / self.count[c];
        self.m2[c] += d * (v - self.mean[c]);
    }
}

/// The textbook per-element Welford update in `f32`, per channel, in memory
/// order: one division and a dependent mean update per element.
#[inline(never)]
fn naive_welford(x: &[f32], shape: Shape, st: &mut Welford, mean: &mut [f32], var: &mut [f32]) {
    let (s, c) = (shape.spatial, shape.channels);
    st.count.fill(0.0);
    st.mean.fill(0.0);
    st.m2.fill(0.0);
    match shape.layout {
        Layout::Nhwc => {
            for row in x.chunks_exact(c) {
                for (ch, &v) in row.iter().enumerate() {
                    st.push(ch, v);
                }
            }
        }
        Layout::Nchw => {
            for (i, run) in x.chunks_exact(s).enumerate() {
                let ch = i % c;
                for &v in run {
                    st.push(ch, v);
                }
            }
        }
    }
    for ch in 0..c {
        mean[ch] = st.mean[ch];
        var[ch] = st.m2[ch] / st.count[ch];
    }
}

fn bench(cr: &mut Criterion) {
    let simd = simd();
    for layout in [Layout::Nhwc, Layout::Nchw] {
        for &c in &CHANNELS {
            let mut group = cr.benchmark_group(format!("moments/{layout:?}/C{c}"));
            for bytes in sizes() {
                let shape = shape(layout, c, bytes);
                let len = shape.len().unwrap();
                let buf = input(len);
                let x = &buf[1..];
                let (mut mean, mut var) = (vec![0.0f32; c], vec![0.0f32; c]);
                let id = label(bytes);

                simd.moments(x, shape, &mut mean, &mut var).unwrap();
                if bytes <= BASELINE_MAX {
                    if let Err(m) = reference::check_moments(x, shape, &mean, &var) {
                        panic!("moments/{layout:?}/C{c}/{id} {shape:?}: {m}");
                    }
                }

                group.throughput(Throughput::Bytes((len * 4) as u64));
                configure(&mut group, bytes);
                group.bench_function(BenchmarkId::new("roofline_read", &id), |b| {
                    b.iter(|| black_box(roofline_read(black_box(x))))
                });
                group.bench_function(BenchmarkId::new("moments", &id), |b| {
                    b.iter(|| {
                        simd.moments(black_box(x), shape, &mut mean, &mut var)
                            .unwrap();
                        black_box((&mean, &var));
                    })
                });
                bench_bound_sums(&mut group, &id, x, shape);
                group.bench_function(BenchmarkId::new("bound_ops", &id), |b| {
                    b.iter(|| black_box(bound_ops(black_box(x))))
                });
                if bytes <= BASELINE_MAX {
                    let (mut rmean, mut rvar) = (vec![0.0f64; c], vec![0.0f64; c]);
                    group.bench_function(BenchmarkId::new("reference_f64", &id), |b| {
                        b.iter(|| {
                            reference::moments(black_box(x), shape, &mut rmean, &mut rvar);
                            black_box((&rmean, &rvar));
                        })
                    });
                    let mut st = Welford::new(c);
                    group.bench_function(BenchmarkId::new("naive_welford", &id), |b| {
                        b.iter(|| {
                            naive_welford(black_box(x), shape, &mut st, &mut mean, &mut var);
                            black_box((&mean, &var));
                        })
                    });
                }
            }
            group.finish();
        }
    }
}

criterion_group! {
    name = benches;
    // 20 000 bootstrap resamples instead of 100 000: without rayon the
    // analysis otherwise costs about as much as the measurement.
    config = Criterion::default().nresamples(20_000);
    targets = bench
}
criterion_main!(benches);
