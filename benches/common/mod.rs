//! What every benchmark shares: the rooflines, the tensor sizes and shapes,
//! and deliberately misaligned inputs.
//!
//! Rooflines are measured in the same run as the kernels, over the same
//! bytes, so a ratio to them is a statement about this machine at this
//! moment rather than about a number from a datasheet:
//! * read roofline: a plain SIMD sum with four independent accumulators;
//! * read+write roofline: a SIMD `y = x * a + b` with constant `a`, `b`.
//!
//! Both use the widest `wide` type the build runs natively (the same one
//! `Simd::detect()` picks).
#![allow(dead_code)]

use batchnorm::{Layout, Shape};
use criterion::{measurement::WallTime, BenchmarkGroup};
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

/// `len` deterministic pseudo-random values around per-position offsets,
/// starting one float into the buffer so every load is misaligned.
pub fn input(len: usize) -> Vec<f32> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    (0..len + 1)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (i % 7) as f32 * 3.0 + (state >> 40) as f32 / (1u64 << 24) as f32
        })
        .collect()
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
