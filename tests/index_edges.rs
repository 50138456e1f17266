//! Index arithmetic at the edges (crate docs §2: every shape that passes
//! validation works on every target, 32-bit `usize` included): 2^21 NHWC
//! channels, window splits around the window length, and super-rows whose
//! `lcm(period, lanes)` is large. Run on x86-64 and on i686 (CI).
mod common;

use batchnorm::{
    reference, Batch, BatchNorm, Config, Moments, MovingStats, Params, ScaleOffset, Shape, Simd,
    Variance,
};
use common::*;

/// 2^21 channels: on a 32-bit target `(i + 1) * channels` overflowed for
/// the 2048th of 2048 windows (issue 12), `moments`, `accumulate` and a
/// training step panicked after writing part of `mean`.
const WIDE: usize = 1 << 21;

/// Two rows of `c` channels, channel `ch` holding `ch % 7 + {0, 1} * (1 +
/// ch % 3)`: mean and variance differ from channel to channel, so a
/// channel read from the wrong place shows.
fn two_rows(c: usize) -> Vec<f32> {
    (0..2 * c)
        .map(|i| {
            let (r, ch) = (i / c, i % c);
            (ch % 7) as f32 + (r * (1 + ch % 3)) as f32
        })
        .collect()
}

fn check_moments(simd: Simd, x: &[f32], shape: Shape) {
    let c = shape.channels;
    let (mut mean, mut var) = (vec![f32::NAN; c], vec![f32::NAN; c]);
    simd.moments(x, shape, &mut mean, &mut var).unwrap();
    if let Err(e) = reference::check_moments(x, shape, &mean, &var) {
        panic!("moments {simd:?} {shape:?}: {e}");
    }
    let mut rec = vec![Moments::EMPTY; c];
    simd.accumulate(x, shape, &mut rec).unwrap();
    let (am, av): (Vec<f32>, Vec<f32>) = rec
        .iter()
        .map(|r| {
            assert_eq!(r.count as usize, shape.batch * shape.spatial);
            let v = r.variance(Variance::Population).unwrap();
            (r.mean().unwrap() as f32, v as f32)
        })
        .unzip();
    if let Err(e) = reference::check_moments(x, shape, &am, &av) {
        panic!("accumulate {simd:?} {shape:?}: {e}");
    }
}

#[test]
fn nhwc_two_pow_21_channels_moments_and_accumulate() {
    let x = two_rows(WIDE);
    for simd in Simd::ALL {
        check_moments(simd, &x, Shape::rows(2, WIDE));
    }
}

#[test]
fn nhwc_two_pow_21_channels_normalize_and_train() {
    let c = WIDE;
    let shape = Shape::rows(2, c);
    let x = two_rows(c);
    let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
    Simd::X4.moments(&x, shape, &mut mean, &mut var).unwrap();
    let params = Params {
        mean: &mean,
        variance: &var,
        scale: None,
        offset: None,
        epsilon: 1e-3,
        activation: batchnorm::Activation::None,
    };
    for simd in Simd::ALL {
        let mut y = vec![f32::NAN; 2 * c];
        simd.normalize(&x, &mut y, shape, &params).unwrap();
        if let Err(e) = reference::check_normalize(&x, shape, &params, &y) {
            panic!("normalize {simd:?}: {e}");
        }
        let (mut mm, mut mv) = (vec![0.0; c], vec![1.0; c]);
        let (mut bm, mut bv) = (vec![f32::NAN; c], vec![f32::NAN; c]);
        let moving = MovingStats {
            mean: &mut mm,
            variance: &mut mv,
            batches: 0,
        };
        let mut bn = BatchNorm::new(Config::keras(), moving)
            .unwrap()
            .with_simd(simd);
        let mut y = vec![f32::NAN; 2 * c];
        let mut batch = Batch {
            mean: &mut bm,
            variance: &mut bv,
        };
        bn.train(&x, &mut y, shape, ScaleOffset::NONE, &mut batch)
            .unwrap();
        if let Err(e) = reference::check_moments(&x, shape, batch.mean, batch.variance) {
            panic!("train statistics {simd:?}: {e}");
        }
        let p = Params {
            mean: batch.mean,
            variance: batch.variance,
            ..params
        };
        if let Err(e) = reference::check_normalize(&x, shape, &p, &y) {
            panic!("train output {simd:?}: {e}");
        }
    }
}

/// Channel counts around the moments window (1024 positions) and its
/// multiples, NHWC and NCHW with fewer spatial positions than lanes (a
/// period of `C * S`), on every width: windows are formed by adding window
/// sizes, the first `channels % windows` one channel longer.
#[test]
fn window_splits_around_the_window_length() {
    let mut rng = Rng::new(21);
    for simd in Simd::ALL {
        for c in [1023, 1024, 1025, 2047, 2049, 3 * 1024 + 7, 4097] {
            for shape in [Shape::nhwc(3, 2, c), Shape::nchw(3, c, 3)] {
                if matches!(shape.layout, batchnorm::Layout::Nchw) && shape.spatial >= simd.lanes()
                {
                    continue;
                }
                let x = channel_data(&mut rng, shape, &[1.0, -50.0, 1e3], &[0.5, 2.0, 1.0]);
                check_moments(simd, &x, shape);
            }
        }
        // NCHW with S = 3 (< every width but 1): periods of 3 * C cross the
        // window length at C = 342 and 683.
        for c in [341, 342, 343, 682, 683, 684] {
            let shape = Shape::nchw(4, c, 3);
            let x = channel_data(&mut rng, shape, &[3.0, 1e4], &[1.0, 1.0]);
            check_moments(simd, &x, shape);
        }
    }
}

/// Super-rows: odd channel counts whose `lcm(C, lanes)` is `16 C` (the
/// longest), just under and over the 1024-element pattern of `normalize`
/// and the windows of `moments`; rows just under and over `normalize`'s
/// 2048-position segment.
#[test]
fn lcm_edges() {
    let mut rng = Rng::new(16);
    for simd in Simd::ALL {
        for c in [63, 64, 65, 127, 129, 1023, 1025, 2047, 2048, 2049] {
            let shape = Shape::nhwc(17, 1, c);
            let x = channel_data(&mut rng, shape, &[0.0, 7.0], &[1.0, 0.1]);
            check_moments(simd, &x, shape);
            let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
            simd.moments(&x, shape, &mut mean, &mut var).unwrap();
            let params = Params {
                mean: &mean,
                variance: &var,
                scale: None,
                offset: None,
                epsilon: 1e-5,
                activation: batchnorm::Activation::Relu,
            };
            let mut y = vec![f32::NAN; x.len()];
            simd.normalize(&x, &mut y, shape, &params).unwrap();
            if let Err(e) = reference::check_normalize(&x, shape, &params, &y) {
                panic!("normalize {simd:?} {shape:?}: {e}");
            }
        }
    }
}
