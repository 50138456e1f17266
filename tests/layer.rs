//! The layer, the moving-average update and the presets: semantics, edge
//! cases, and "an error writes nothing".
mod common;

use batchnorm::{
    moments, normalize, update_moving, Activation, Batch, BatchNorm, BatchNormArray, Config, Error,
    Momentum, MovingStats, Params, ScaleOffset, Shape, Simd, Variance,
};
use common::*;

#[test]
fn presets_match_the_design_table() {
    let k = Config::keras();
    assert_eq!(
        (k.epsilon, k.momentum, k.moving_variance),
        (1e-3, Momentum::Decay(0.99), Variance::Population)
    );
    let t = Config::tf_fused(0.25);
    assert_eq!(
        (t.epsilon, t.momentum, t.moving_variance),
        (1e-3, Momentum::Decay(0.75), Variance::Sample)
    );
    assert_eq!(Config::tf_fused(1.0).momentum, Momentum::Decay(0.0));
    assert_eq!(Config::tf_layers(true), Config::tf_fused(0.01));
    assert_eq!(
        Config::tf_layers(false).moving_variance,
        Variance::Population
    );
    let p = Config::pytorch();
    assert_eq!(
        (p.epsilon, p.momentum, p.moving_variance),
        (1e-5, Momentum::Decay(0.9), Variance::Sample)
    );
    assert_eq!(
        Config::pytorch_momentum(None).momentum,
        Momentum::Cumulative
    );
    let o = Config::onnx();
    assert_eq!(
        (o.epsilon, o.momentum, o.moving_variance),
        (1e-5, Momentum::Decay(0.9), Variance::Population)
    );
    for c in [k, t, p, o] {
        assert_eq!(c.activation, Activation::None);
        c.validate().unwrap();
    }
}

#[test]
fn train_is_moments_then_normalize_then_update() {
    let mut rng = Rng::new(3);
    for simd in Simd::ALL {
        for shape in [
            Shape::nhwc(4, 9, 3),
            Shape::nchw(3, 5, 17),
            Shape::rows(33, 20),
        ] {
            for config in [
                Config::keras(),
                Config::tf_fused(0.3),
                Config::pytorch(),
                Config::onnx(),
            ] {
                let config = config.with_activation(Activation::Relu);
                let c = shape.channels;
                let x = channel_data(&mut rng, shape, &[2.0, -7.0], &[1.5, 0.2]);
                let scale = gaussian(&mut rng, c, 1.0, 0.3);
                let offset = gaussian(&mut rng, c, 0.0, 0.3);
                let (mut mm, mut mv) = (gaussian(&mut rng, c, 0.0, 1.0), vec![1.5f32; c]);
                let (mm0, mv0) = (mm.clone(), mv.clone());
                let (mut bm, mut bv) = (vec![0.0; c], vec![0.0; c]);
                let mut y = vec![0.0; x.len()];
                {
                    let moving = MovingStats {
                        mean: &mut mm,
                        variance: &mut mv,
                        batches: 0,
                    };
                    let mut bn = BatchNorm::new(config, moving).unwrap().with_simd(simd);
                    let mut batch = Batch {
                        mean: &mut bm,
                        variance: &mut bv,
                    };
                    let so = ScaleOffset::new(&scale, &offset);
                    bn.train(&x, &mut y, shape, so, &mut batch).unwrap();
                    assert_eq!(bn.moving().batches, 1);
                }
                // The same three steps by hand, with the same width.
                let (mut m, mut v) = (vec![0.0; c], vec![0.0; c]);
                simd.moments(&x, shape, &mut m, &mut v).unwrap();
                assert_eq!((&bm, &bv), (&m, &v));
                let p = Params {
                    mean: &m,
                    variance: &v,
                    scale: Some(&scale),
                    offset: Some(&offset),
                    epsilon: config.epsilon,
                    activation: Activation::Relu,
                };
                let mut y2 = vec![0.0; x.len()];
                simd.normalize(&x, &mut y2, shape, &p).unwrap();
                assert_eq!(y, y2);
                let (mut mm2, mut mv2) = (mm0.clone(), mv0.clone());
                let count = (shape.batch * shape.spatial) as u64;
                let mut moving = MovingStats {
                    mean: &mut mm2,
                    variance: &mut mv2,
                    batches: 0,
                };
                update_moving(&m, &v, count, &config, &mut moving).unwrap();
                assert_eq!(moving.batches, 1);
                assert_eq!((&mm, &mv), (&mm2, &mv2));
                // And the update against the f64 reference.
                for ch in 0..c {
                    let (rm, rv) = batchnorm::reference::update_moving(
                        (mm0[ch], mv0[ch]),
                        (m[ch], v[ch]),
                        count,
                        1,
                        &config,
                    );
                    assert!(
                        (mm[ch] as f64 - rm).abs()
                            <= 4.0 * f32::EPSILON as f64 * (rm.abs() + mm0[ch].abs() as f64)
                    );
                    assert!(
                        (mv[ch] as f64 - rv).abs()
                            <= 4.0 * f32::EPSILON as f64 * (rv.abs() + mv0[ch].abs() as f64)
                    );
                }
            }
        }
    }
}

#[test]
fn infer_uses_the_moving_statistics() {
    let shape = Shape::nhwc(2, 3, 4);
    let x: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
    let (mut mm, mut mv) = ([1.0, 2.0, -1.0, 0.0], [4.0, 0.25, 1.0, 9.0]);
    let moving = MovingStats {
        mean: &mut mm,
        variance: &mut mv,
        batches: 7,
    };
    let bn = BatchNorm::new(Config::onnx(), moving).unwrap();
    let mut y = vec![0.0; 24];
    bn.infer(&x, &mut y, shape, ScaleOffset::NONE).unwrap();
    let p = Params {
        mean: &[1.0, 2.0, -1.0, 0.0],
        variance: &[4.0, 0.25, 1.0, 9.0],
        scale: None,
        offset: None,
        epsilon: 1e-5,
        activation: Activation::None,
    };
    let mut y2 = vec![0.0; 24];
    normalize(&x, &mut y2, shape, &p).unwrap();
    assert_eq!(y, y2);
    let mut z = x.clone();
    bn.infer_in_place(&mut z, shape, ScaleOffset::NONE).unwrap();
    assert_eq!(y, z);
    // A frozen owned layer infers through `&self`, and gives the same bits.
    let frozen = BatchNormArray::from_state(
        Config::onnx(),
        [1.0, 2.0, -1.0, 0.0],
        [4.0, 0.25, 1.0, 9.0],
        7,
    );
    let mut w = vec![0.0; 24];
    frozen.infer(&x, &mut w, shape).unwrap();
    assert_eq!(y, w);
    assert_eq!(bn.moving().batches, 7);
}

#[test]
fn bessel_factor_and_its_clamp_at_one_element() {
    let cfg = Config::pytorch_momentum(Some(1.0)); // decay 0: overwrite
    let (mut mm, mut mv) = ([0.0f32], [1.0f32]);
    let mut moving = MovingStats {
        mean: &mut mm,
        variance: &mut mv,
        batches: 0,
    };
    update_moving(&[3.0], &[2.0], 4, &cfg, &mut moving).unwrap();
    assert_eq!((moving.mean[0], moving.variance[0]), (3.0, 2.0 * 4.0 / 3.0));
    update_moving(&[5.0], &[0.0], 1, &cfg, &mut moving).unwrap();
    // factor 1, not a NaN
    assert_eq!((moving.mean[0], moving.variance[0]), (5.0, 0.0));
    // A single-element batch through the layer: variance 0, moving variance finite.
    let mut bn = BatchNormArray::<2>::new(Config::tf_fused(0.5));
    let mut y = [0.0; 2];
    bn.train(&[4.0, -4.0], &mut y, Shape::rows(1, 2)).unwrap();
    assert_eq!(bn.batch_variance, [0.0, 0.0]);
    assert_eq!(y, [0.0, 0.0]); // a zero variance normalizes to the offset
    assert_eq!(bn.moving_variance, [0.5, 0.5]);
}

#[test]
fn cumulative_momentum_is_the_running_average() {
    let mut bn = BatchNormArray::<1>::new(Config::pytorch_momentum(None));
    let mut y = [0.0; 2];
    let batches = [[1.0, 3.0], [5.0, 7.0], [-3.0, 9.0]];
    for b in batches {
        bn.train(&b, &mut y, Shape::rows(2, 1)).unwrap();
    }
    // Means 2, 6, 3: their average.
    assert!((bn.moving_mean[0] - 11.0 / 3.0).abs() < 1e-6);
    // Sample variances 2, 2, 72: their average.
    assert!((bn.moving_variance[0] - 76.0 / 3.0).abs() < 1e-5);
}

#[test]
fn constant_channel_normalizes_to_offset_then_activation() {
    let shape = Shape::nchw(3, 2, 5);
    let mut x = vec![7.25f32; 30];
    for v in x.iter_mut().skip(5).step_by(10).take(3) {
        *v = 1.0;
    }
    let mut bn = BatchNormArray::<2>::new(Config::keras().with_activation(Activation::Relu6));
    bn.offset = [2.5, -1.0];
    let mut y = vec![0.0; 30];
    bn.train(&x, &mut y, shape).unwrap();
    assert_eq!(bn.batch_variance[0], 0.0);
    // `offset` up to the folded form's rounding: a = 1/sqrt(eps) and
    // b = offset - mean * a are each rounded once, so y = x * a + b lands
    // within the crate docs' §3 bound of it (exactly on it without FMA, a few
    // ulps off with FMA).
    let a = 1.0 / (1e-3f64).sqrt();
    let bound = batchnorm::reference::normalize_bound(7.25, 7.25, a, 2.5);
    for n in 0..3 {
        for s in 0..5 {
            let v = y[(n * 2) * 5 + s] as f64;
            assert!((v - 2.5).abs() <= bound, "{v} vs 2.5 within {bound}");
        }
    }
    assert!(y.iter().all(|v| v.is_finite()));
}

#[test]
fn nan_poisons_only_its_channel() {
    for simd in Simd::ALL {
        for shape in [
            Shape::nhwc(9, 7, 5),
            Shape::nchw(3, 5, 21),
            Shape::nchw(40, 5, 1),
        ] {
            let mut rng = Rng::new(9);
            let mut x = channel_data(&mut rng, shape, &[1.0], &[1.0]);
            let bad = 2;
            x[batchnorm::reference::index(shape, 1, 3 % shape.spatial, bad)] = f32::NAN;
            let inf = 4;
            x[batchnorm::reference::index(shape, 2, 0, inf)] = f32::INFINITY;
            let mut bn = BatchNormArray::<5>::new(Config::keras()).clone();
            let mut y = vec![0.0; x.len()];
            let mut layer_y = y.clone();
            {
                let (mut mm, mut mv, mut bm, mut bv) = ([0.0; 5], [1.0; 5], [0.0; 5], [0.0; 5]);
                let moving = MovingStats {
                    mean: &mut mm,
                    variance: &mut mv,
                    batches: 0,
                };
                let mut l = BatchNorm::new(Config::keras(), moving)
                    .unwrap()
                    .with_simd(simd);
                let mut batch = Batch {
                    mean: &mut bm,
                    variance: &mut bv,
                };
                l.train(&x, &mut layer_y, shape, ScaleOffset::NONE, &mut batch)
                    .unwrap();
                for c in 0..5 {
                    let poisoned = c == bad || c == inf;
                    assert_eq!(
                        batch.variance[c].is_nan(),
                        poisoned,
                        "{simd:?} {shape:?} c={c}"
                    );
                    assert_eq!(l.moving().variance[c].is_nan(), poisoned);
                    assert_eq!(batch.mean[c].is_finite(), !poisoned);
                }
            }
            bn.train(&x, &mut y, shape).unwrap();
            for n in 0..shape.batch {
                for s in 0..shape.spatial {
                    for c in 0..5 {
                        let i = batchnorm::reference::index(shape, n, s, c);
                        assert_eq!(
                            layer_y[i].is_nan(),
                            c == bad || c == inf,
                            "{simd:?} {shape:?}"
                        );
                    }
                }
            }
        }
    }
}

/// Every error leaves outputs and state bit-for-bit as they were.
#[test]
fn errors_write_nothing() {
    let shape = Shape::nhwc(2, 2, 3);
    let x = [1.0f32; 12];
    let sentinel = -12345.5f32;
    let mut y = [sentinel; 12];
    let (mut m, mut v) = ([sentinel; 3], [sentinel; 3]);
    let cases: [(Shape, usize, usize, Error); 5] = [
        (
            shape,
            11,
            3,
            Error::Length {
                what: "x",
                expected: 12,
                actual: 11,
            },
        ),
        (
            shape,
            12,
            2,
            Error::Length {
                what: "mean",
                expected: 3,
                actual: 2,
            },
        ),
        (Shape::nhwc(0, 2, 3), 0, 3, Error::EmptyBatch),
        (Shape::nhwc(1, 1, 0), 0, 0, Error::ZeroChannels),
        (
            Shape::nhwc(usize::MAX, 2, 3),
            12,
            3,
            Error::ShapeOverflow {
                batch: usize::MAX,
                spatial: 2,
                channels: 3,
            },
        ),
    ];
    for (s, xl, cl, err) in cases {
        assert_eq!(moments(&x[..xl], s, &mut m[..cl], &mut v[..cl]), Err(err));
        assert_eq!((m, v), ([sentinel; 3], [sentinel; 3]));
    }

    let mk = |eps: f32, act: Activation| Params {
        mean: &[0.0; 3],
        variance: &[1.0; 3],
        scale: None,
        offset: None,
        epsilon: eps,
        activation: act,
    };
    for (p, err) in [
        (mk(-1.0, Activation::None), Error::Epsilon(-1.0)),
        (
            mk(f32::INFINITY, Activation::None),
            Error::Epsilon(f32::INFINITY),
        ),
        (mk(0.0, Activation::None), Error::Epsilon(0.0)),
        (
            mk(1e-3, Activation::Clamp { min: 1.0, max: 0.0 }),
            Error::Clamp { min: 1.0, max: 0.0 },
        ),
    ] {
        assert_eq!(normalize(&x, &mut y, shape, &p), Err(err));
        assert_eq!(y, [sentinel; 12]);
    }
    let p = mk(f32::NAN, Activation::None);
    assert!(matches!(normalize(&x, &mut y, shape, &p), Err(Error::Epsilon(e)) if e.is_nan()));
    let p = Params {
        scale: Some(&[1.0; 2]),
        ..mk(1e-3, Activation::None)
    };
    assert_eq!(
        normalize(&x, &mut y, shape, &p),
        Err(Error::Length {
            what: "scale",
            expected: 3,
            actual: 2
        })
    );
    assert_eq!(y, [sentinel; 12]);

    // The layer: state untouched by a bad call.
    let (mut mm, mut mv, mut bm, mut bv) = ([0.5f32; 3], [2.0f32; 3], [sentinel; 3], [sentinel; 3]);
    let moving = MovingStats {
        mean: &mut mm,
        variance: &mut mv,
        batches: 4,
    };
    let mut bn = BatchNorm::new(Config::keras(), moving).unwrap();
    let (gamma, beta) = ([1.0f32; 3], [0.0f32; 3]);
    let untouched = |bn: &BatchNorm<'_>, batch: &Batch<'_>| {
        assert_eq!(
            (&*bn.moving().mean, &*bn.moving().variance),
            (&[0.5f32; 3][..], &[2.0f32; 3][..])
        );
        assert_eq!(bn.moving().batches, 4);
        assert_eq!(
            (&*batch.mean, &*batch.variance),
            (&[sentinel; 3][..], &[sentinel; 3][..])
        );
    };
    let mut batch = Batch {
        mean: &mut bm,
        variance: &mut bv,
    };
    for (xs, s) in [
        (&x[..12], Shape::nhwc(2, 2, 4)),
        (&x[..11], shape),
        (&x[..0], Shape::nhwc(0, 1, 3)),
    ] {
        assert!(bn
            .train(xs, &mut y, s, ScaleOffset::NONE, &mut batch)
            .is_err());
        assert_eq!(y, [sentinel; 12]);
        untouched(&bn, &batch);
    }
    let so = ScaleOffset::new(&gamma, &beta);
    assert!(bn.train(&x, &mut y[..11], shape, so, &mut batch).is_err());
    let short = ScaleOffset::new(&gamma[..2], &beta);
    assert!(bn.train(&x, &mut y, shape, short, &mut batch).is_err());
    assert!(bn.infer(&x, &mut y, shape, short).is_err());
    let mut z = x;
    assert!(bn.train_in_place(&mut z, shape, short, &mut batch).is_err());
    assert_eq!(z, x);
    assert_eq!(y, [sentinel; 12]);
    untouched(&bn, &batch);
    let (mut bm2, mut bv2) = ([sentinel; 2], [sentinel; 3]);
    let mut short_batch = Batch {
        mean: &mut bm2,
        variance: &mut bv2,
    };
    assert_eq!(
        bn.train(&x, &mut y, shape, so, &mut short_batch),
        Err(Error::Length {
            what: "batch.mean",
            expected: 3,
            actual: 2
        })
    );
    assert_eq!((bm2, bv2), ([sentinel; 2], [sentinel; 3]));
    assert_eq!(y, [sentinel; 12]);
    untouched(&bn, &batch);

    // Bad configs are refused up front.
    let (mut a, mut b) = ([0.0f32; 1], [1.0f32; 1]);
    for cfg in [
        Config::tf_fused(2.0),
        Config::keras().with_epsilon(-1e-3),
        Config::keras().with_epsilon(0.0),
        Config {
            momentum: Momentum::Decay(f32::NAN),
            ..Config::onnx()
        },
        Config::onnx().with_activation(Activation::Clamp {
            min: f32::NAN,
            max: 1.0,
        }),
    ] {
        let moving = MovingStats {
            mean: &mut a,
            variance: &mut b,
            batches: 0,
        };
        assert!(BatchNorm::new(cfg, moving).is_err());
        let mut moving = MovingStats {
            mean: &mut a,
            variance: &mut b,
            batches: 0,
        };
        assert!(update_moving(&[1.0], &[1.0], 2, &cfg, &mut moving).is_err());
        assert_eq!(moving.batches, 0);
        assert_eq!((a, b), ([0.0], [1.0]));
        let frozen = BatchNormArray::<1>::new(cfg);
        let mut out = [sentinel];
        assert!(frozen.infer(&[1.0], &mut out, Shape::rows(1, 1)).is_err());
        assert_eq!(out, [sentinel]);
    }
    let mut moving = MovingStats {
        mean: &mut a,
        variance: &mut b,
        batches: 0,
    };
    assert_eq!(
        update_moving(&[1.0], &[1.0], 0, &Config::keras(), &mut moving),
        Err(Error::EmptyBatch)
    );
    assert_eq!(
        update_moving(&[1.0, 2.0], &[1.0], 3, &Config::keras(), &mut moving),
        Err(Error::Length {
            what: "batch_mean",
            expected: 1,
            actual: 2
        })
    );
    assert_eq!(moving.batches, 0);
    assert_eq!((a, b), ([0.0], [1.0]));
}

#[test]
fn errors_display_expected_and_actual() {
    let e = Error::Length {
        what: "y",
        expected: 12,
        actual: 11,
    };
    assert_eq!(e.to_string(), "`y` has length 11, the shape needs 12");
    let e: &dyn std::error::Error = &Error::EmptyBatch;
    assert!(e.to_string().contains("empty"));
}

/// Issue 16: a shape with another channel count than the layer's read as if
/// the shape needed the layer's count ("has length 2, the shape needs 4").
#[test]
fn wrong_channel_count_names_the_layer() {
    let (mut mean, mut var) = ([0.0f32; 4], [1.0f32; 4]);
    let moving = MovingStats {
        mean: &mut mean,
        variance: &mut var,
        batches: 0,
    };
    let bn = BatchNorm::new(Config::keras(), moving).unwrap();
    let shape = Shape::nhwc(1, 3, 2);
    let x = [0.5f32; 6];
    let mut y = [7.0f32; 6];
    let e = bn.infer(&x, &mut y, shape, ScaleOffset::NONE).unwrap_err();
    assert_eq!(
        e.to_string(),
        "`shape.channels` is 2, the layer has 4 channels"
    );
    assert_eq!(y, [7.0; 6]);
}

/// Issue 12: 40,000 alternating ±1e17 values (inside the §3 domain) made an
/// `f32` record's `m2` infinite while `moments()` gave a variance of 1e34.
#[test]
fn record_of_plus_minus_1e17_stays_finite() {
    let x: Vec<f32> = (0..40_000)
        .map(|i| if i % 2 == 0 { 1e17 } else { -1e17 })
        .collect();
    let shape = Shape::rows(40_000, 1);
    for simd in Simd::ALL {
        let mut rec = [batchnorm::Moments::EMPTY];
        simd.accumulate(&x, shape, &mut rec).unwrap();
        let v = rec[0].variance(Variance::Population).unwrap();
        assert!((v - 1e34).abs() <= 1e-5 * 1e34, "{simd:?}: {v:e}");
        assert!(rec[0].m2.is_finite());
        // Streamed in two halves and merged: the same.
        let (mut a, mut b) = ([batchnorm::Moments::EMPTY], [batchnorm::Moments::EMPTY]);
        let half = Shape::rows(20_000, 1);
        simd.accumulate(&x[..20_000], half, &mut a).unwrap();
        simd.accumulate(&x[20_000..], half, &mut b).unwrap();
        let m = a[0].merge(b[0]).unwrap();
        assert_eq!(m.count, 40_000);
        let v = m.variance(Variance::Population).unwrap();
        assert!((v - 1e34).abs() <= 1e-5 * 1e34, "{simd:?} merged: {v:e}");
    }
}

/// Issue 12: counts never wrap. A merge or an `accumulate` that would pass
/// `u64::MAX` is an error and writes nothing.
#[test]
fn record_counts_never_wrap() {
    use batchnorm::Moments;
    let full = Moments {
        count: u64::MAX,
        mean: 1.0,
        m2: 0.0,
    };
    let one = Moments {
        count: 1,
        mean: 2.0,
        m2: 0.0,
    };
    assert_eq!(full.merge(one), Err(Error::CountOverflow));
    assert_eq!(one.merge(full), Err(Error::CountOverflow));
    assert_eq!(full.merge(Moments::EMPTY), Ok(full));
    let mut recs = [one, full];
    assert_eq!(
        batchnorm::accumulate(&[1.0, 2.0], Shape::rows(1, 2), &mut recs),
        Err(Error::CountOverflow)
    );
    assert_eq!(recs, [one, full]);
    // The wire format round-trips bit for bit.
    let r = Moments {
        count: 0x0102_0304_0506_0708,
        mean: -1.5e300,
        m2: f64::NAN,
    };
    let b = r.to_le_bytes();
    assert_eq!(b[0], 0x08);
    assert_eq!(&b[8..16], &(-1.5e300f64).to_le_bytes());
    let back = Moments::from_le_bytes(b);
    assert_eq!(
        (back.count, back.mean.to_bits(), back.m2.to_bits()),
        (r.count, r.mean.to_bits(), r.m2.to_bits())
    );
    assert_eq!(core::mem::size_of::<Moments>(), 24);
}

/// Issue 12: the cumulative factor `1 / b` was formed as `1 - (1 - 1/b)` in
/// `f32` (1.3% off at a million batches, 0 after 2^25). It is now within
/// `f32` rounding of exact for every count, and the batch counter saturates.
#[test]
fn cumulative_factor_is_exact_for_any_count_and_the_counter_saturates() {
    let m = Momentum::Cumulative;
    for b in [
        1u64,
        2,
        3,
        7,
        1_000_000,
        1 << 25,
        (1 << 25) + 1,
        1 << 40,
        u64::MAX,
    ] {
        let exact = 1.0 / b as f64;
        let w = m.weight(b) as f64;
        assert!(
            (w - exact).abs() <= exact * f32::EPSILON as f64 / 2.0,
            "b = {b}: {w:e}"
        );
        let d = m.decay(b) as f64;
        assert!(
            (d - (1.0 - exact)).abs() <= f32::EPSILON as f64 / 2.0,
            "b = {b}"
        );
    }
    // A moving mean restored after a million batches follows a new batch
    // by exactly 1 / (b + 1).
    let cfg = Config::pytorch_momentum(None);
    let (mut mm, mut mv) = ([0.0f32], [0.0f32]);
    let mut moving = MovingStats {
        mean: &mut mm,
        variance: &mut mv,
        batches: 999_999,
    };
    update_moving(&[1.0], &[0.0], 2, &cfg, &mut moving).unwrap();
    assert_eq!(moving.batches, 1_000_000);
    assert!((moving.mean[0] as f64 - 1e-6).abs() <= 1e-6 * f32::EPSILON as f64);
    // Saturation, not a wrap (nor a debug panic).
    moving.batches = u64::MAX;
    update_moving(&[1.0], &[0.0], 2, &cfg, &mut moving).unwrap();
    assert_eq!(moving.batches, u64::MAX);
    let mut arr = BatchNormArray::<1>::from_state(Config::keras(), [0.0], [1.0], u64::MAX);
    arr.train(&[1.0, 2.0], &mut [0.0; 2], Shape::rows(2, 1))
        .unwrap();
    assert_eq!(arr.batches, u64::MAX);
}

/// Issue 13: one layer lives across optimizer steps on `scale` and
/// `offset` (which it no longer borrows), and its state can be saved and
/// restored mid-training with the same result as an uninterrupted run.
#[test]
fn layer_survives_optimizer_steps_and_a_checkpoint() {
    let shape = Shape::nchw(4, 3, 5);
    let mut rng = Rng::new(17);
    let batches: Vec<Vec<f32>> = (0..6)
        .map(|_| channel_data(&mut rng, shape, &[1.0, -2.0, 0.5], &[1.0, 3.0, 0.1]))
        .collect();
    let cfg = Config::pytorch_momentum(None);
    let run = |checkpoint_at: Option<usize>| {
        let (mut mm, mut mv) = (vec![0.0f32; 3], vec![1.0f32; 3]);
        let (mut gamma, mut beta) = (vec![1.0f32; 3], vec![0.0f32; 3]);
        let (mut bm, mut bv) = (vec![0.0f32; 3], vec![0.0f32; 3]);
        let mut y = vec![0.0f32; shape.batch * shape.spatial * 3];
        let mut saved_batches = 0;
        let mut i = 0;
        while i < batches.len() {
            let moving = MovingStats {
                mean: &mut mm,
                variance: &mut mv,
                batches: saved_batches,
            };
            let mut bn = BatchNorm::new(cfg, moving).unwrap();
            while i < batches.len() {
                let mut batch = Batch {
                    mean: &mut bm,
                    variance: &mut bv,
                };
                let so = ScaleOffset::new(&gamma, &beta);
                bn.train(&batches[i], &mut y, shape, so, &mut batch)
                    .unwrap();
                // A plain SGD step on the parameters the layer just used.
                for c in 0..3 {
                    gamma[c] -= 0.01 * y[c];
                    beta[c] += 0.01;
                }
                i += 1;
                if checkpoint_at == Some(i) {
                    break;
                }
            }
            // What a checkpoint keeps: the moving statistics (in `mm`,
            // `mv` once the layer is gone) and the batch count.
            saved_batches = bn.into_moving().batches;
        }
        (mm, mv, saved_batches, gamma)
    };
    let whole = run(None);
    assert_eq!(whole.2, 6);
    for k in 1..6 {
        assert_eq!(run(Some(k)), whole, "checkpoint after step {k}");
    }
}

/// The layer's backward passes are the free `backward` with the statistics
/// the layer used (the batch's after `train`, the moving ones after
/// `infer`), bit for bit, for every width; bad input writes nothing.
#[test]
fn layer_backward_is_backward_with_the_layers_statistics() {
    use batchnorm::{Gradients, Mode};
    let mut rng = Rng::new(23);
    for simd in Simd::ALL {
        for shape in [Shape::nhwc(3, 5, 7), Shape::nchw(2, 7, 9)] {
            let c = shape.channels;
            let config = Config::pytorch().with_activation(Activation::Relu6);
            let x = channel_data(&mut rng, shape, &[1.0, -3.0], &[2.0, 0.5]);
            let dy = gaussian(&mut rng, x.len(), 0.0, 1.0);
            let gamma = gaussian(&mut rng, c, 1.0, 0.2);
            let beta = gaussian(&mut rng, c, 0.5, 0.2);
            let so = ScaleOffset::new(&gamma, &beta);
            let (mut mm, mut mv) = (vec![0.0f32; c], vec![1.0f32; c]);
            let moving = MovingStats {
                mean: &mut mm,
                variance: &mut mv,
                batches: 0,
            };
            let mut bn = BatchNorm::new(config, moving).unwrap().with_simd(simd);
            let (mut bm, mut bv) = (vec![0.0f32; c], vec![0.0f32; c]);
            let mut batch = Batch {
                mean: &mut bm,
                variance: &mut bv,
            };
            let mut y = vec![0.0f32; x.len()];
            bn.train(&x, &mut y, shape, so, &mut batch).unwrap();
            for (mode, training) in [(Mode::Training, true), (Mode::Inference, false)] {
                let (mut dx, mut ds, mut dof) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
                let g = Gradients {
                    dx: &mut dx,
                    dscale: &mut ds,
                    doffset: &mut dof,
                };
                if training {
                    bn.backward(&x, &dy, shape, so, &batch, g).unwrap();
                } else {
                    bn.backward_infer(&x, &dy, shape, so, g).unwrap();
                }
                let (mean, variance) = if training {
                    (&batch.mean[..], &batch.variance[..])
                } else {
                    (&bn.moving().mean[..], &bn.moving().variance[..])
                };
                let p = Params {
                    mean,
                    variance,
                    scale: Some(&gamma),
                    offset: Some(&beta),
                    epsilon: config.epsilon,
                    activation: config.activation,
                };
                let (mut dx2, mut ds2, mut dof2) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
                let g2 = Gradients {
                    dx: &mut dx2,
                    dscale: &mut ds2,
                    doffset: &mut dof2,
                };
                simd.backward(&x, &dy, shape, &p, mode, g2).unwrap();
                assert_eq!((&dx, &ds, &dof), (&dx2, &ds2, &dof2), "{simd:?} {mode:?}");
            }
            // A channel count that is not the layer's: nothing written.
            let sentinel = -7.5f32;
            let (mut dx, mut ds, mut dof) = (
                vec![sentinel; x.len()],
                vec![sentinel; c],
                vec![sentinel; c],
            );
            let bad = Shape {
                channels: c + 1,
                ..shape
            };
            let g = Gradients {
                dx: &mut dx,
                dscale: &mut ds,
                doffset: &mut dof,
            };
            assert!(bn.backward(&x, &dy, bad, so, &batch, g).is_err());
            assert!(dx.iter().chain(&ds).chain(&dof).all(|&v| v == sentinel));
        }
    }
    // The owned twin keeps its batch statistics for its backward pass.
    let shape = Shape::rows(4, 3);
    let x = [1.0, 2.0, 3.0, 2.0, 4.0, 1.0, 0.0, 1.0, 5.0, 3.0, 3.0, 3.0];
    let dy = [
        0.5, -1.0, 0.25, 1.0, 0.0, -0.5, -0.25, 1.0, 0.75, 0.0, 0.5, 1.0,
    ];
    let mut arr = BatchNormArray::<3>::new(Config::keras());
    arr.train(&x, &mut [0.0; 12], shape).unwrap();
    let (mut dx, mut ds, mut dof) = ([0.0; 12], [0.0; 3], [0.0; 3]);
    let g = Gradients {
        dx: &mut dx,
        dscale: &mut ds,
        doffset: &mut dof,
    };
    arr.backward(&x, &dy, shape, g).unwrap();
    let p = Params {
        mean: &arr.batch_mean,
        variance: &arr.batch_variance,
        scale: Some(&arr.scale),
        offset: Some(&arr.offset),
        epsilon: 1e-3,
        activation: Activation::None,
    };
    let (mut dx2, mut ds2, mut dof2) = ([0.0; 12], [0.0; 3], [0.0; 3]);
    let g2 = Gradients {
        dx: &mut dx2,
        dscale: &mut ds2,
        doffset: &mut dof2,
    };
    batchnorm::backward(&x, &dy, shape, &p, Mode::Training, g2).unwrap();
    assert_eq!((dx, ds, dof), (dx2, ds2, dof2));
}
