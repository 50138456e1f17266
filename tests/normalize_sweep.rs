//! Width, layout, length, channel-count, activation and alignment sweeps of
//! the normalization kernels against the `f64` reference.
mod common;

use batchnorm::{reference, Activation, Params, Shape, Simd};
use common::*;

const ACTIVATIONS: [Activation; 4] = [
    Activation::None,
    Activation::Relu,
    Activation::Relu6,
    Activation::Clamp {
        min: -0.5,
        max: 0.25,
    },
];

fn shapes(lanes: usize) -> Vec<Shape> {
    let mut v = Vec::new();
    let counts = [
        1,
        2,
        lanes - 1,
        lanes,
        lanes + 1,
        2 * lanes + 1,
        4 * lanes + 1,
    ];
    for c in [
        1,
        2,
        3,
        5,
        7,
        16,
        17,
        lanes + 1,
        4 * lanes + 1,
        100,
        513,
        1000,
        1040,
    ] {
        for &k in &counts {
            let k = k.max(1);
            v.push(Shape::nhwc(k, 1, c));
            v.push(Shape::nhwc(2, k, c));
            v.push(Shape::nchw(2, c, k));
            v.push(Shape::nchw(k, c, 1));
        }
    }
    v.push(Shape::nchw(3, 200, 3));
    v.push(Shape::nchw(2, 300, 2));
    v
}

struct Case {
    x: Vec<f32>,
    mean: Vec<f32>,
    var: Vec<f32>,
    scale: Vec<f32>,
    offset: Vec<f32>,
}

fn case(rng: &mut Rng, shape: Shape) -> Case {
    let c = shape.channels;
    Case {
        x: channel_data(rng, shape, &[0.5, -3.0, 100.0], &[1.0, 0.5, 3.0]),
        mean: gaussian(rng, c, 0.0, 2.0),
        var: (0..c).map(|_| (rng.uniform() * 4.0) as f32).collect(),
        scale: gaussian(rng, c, 1.0, 0.5),
        offset: gaussian(rng, c, 0.0, 1.0),
    }
}

#[test]
fn normalize_every_width_layout_activation_alignment() {
    let mut rng = Rng::new(10);
    for simd in Simd::ALL {
        for shape in shapes(simd.lanes().max(2)) {
            let k = case(&mut rng, shape);
            for (ai, &activation) in ACTIVATIONS.iter().enumerate() {
                let p = Params {
                    mean: &k.mean,
                    variance: &k.var,
                    scale: (ai % 2 == 0).then_some(&k.scale[..]),
                    offset: (ai < 2).then_some(&k.offset[..]),
                    epsilon: 1e-3,
                    activation,
                };
                split_and_in_place(simd, shape, &k.x, &p, ai % 3);
            }
        }
    }
}

/// `normalize` of `x` read `off` elements into a misaligned copy, written
/// to a buffer misaligned the other way, against the reference; then
/// `normalize_in_place` on the copy, which must give the same bits.
fn split_and_in_place(simd: Simd, shape: Shape, x: &[f32], p: &Params<'_>, off: usize) {
    let xb = misaligned(x, off);
    let mut yb = vec![f32::NAN; x.len() + 2];
    let y = &mut yb[2 - off % 2..][..x.len()];
    simd.normalize(&xb[off..], y, shape, p).unwrap();
    if let Err(e) = reference::check_normalize(x, shape, p, y) {
        panic!("{simd:?} {shape:?} {:?}: {e}", p.activation);
    }
    let mut inplace = xb.clone();
    simd.normalize_in_place(&mut inplace[off..], shape, p)
        .unwrap();
    assert_eq!(
        inplace[off..]
            .iter()
            .map(|v| v.to_bits())
            .collect::<Vec<_>>(),
        y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
        "{simd:?} {shape:?}: in place differs"
    );
}

/// `affine` with `fold`'s coefficients gives what `normalize` gives (whose
/// fold is, on x86-64, the lane type's `f64` square root and division:
/// `ymm` ones on the AVX2 and AVX-512 widths), bit for bit, out of place
/// and in place, on every width and layout.
fn assert_fold_then_affine_is_normalize(simd: Simd, shape: Shape, x: &[f32], p: &Params<'_>) {
    let c = shape.channels;
    let (mut a, mut b) = (vec![0.0; c], vec![0.0; c]);
    batchnorm::fold(
        p.mean, p.variance, p.scale, p.offset, p.epsilon, &mut a, &mut b,
    )
    .unwrap();
    let bits = |y: &[f32]| y.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let (mut y1, mut y2) = (vec![0.0; x.len()], vec![0.0; x.len()]);
    simd.affine(x, &mut y1, shape, &a, &b, p.activation)
        .unwrap();
    simd.normalize(x, &mut y2, shape, p).unwrap();
    assert_eq!(bits(&y1), bits(&y2), "{simd:?} {shape:?}");
    let mut y3 = x.to_vec();
    simd.affine_in_place(&mut y3, shape, &a, &b, p.activation)
        .unwrap();
    assert_eq!(bits(&y1), bits(&y3), "{simd:?} {shape:?} in place");
}

/// Random statistics on the sweep's shapes around every lane width.
#[test]
fn affine_matches_fold_then_normalize() {
    let mut rng = Rng::new(11);
    for simd in Simd::ALL {
        for shape in shapes(simd.lanes().max(2)) {
            let k = case(&mut rng, shape);
            let p = Params {
                mean: &k.mean,
                variance: &k.var,
                scale: Some(&k.scale),
                offset: Some(&k.offset),
                epsilon: 1e-5,
                activation: Activation::Relu6,
            };
            assert_fold_then_affine_is_normalize(simd, shape, &k.x, &p);
        }
    }
}

/// Variances from zero (`eps` alone) and subnormal to `f32::MAX`.
#[test]
fn affine_matches_fold_then_normalize_on_extreme_variances() {
    let mut rng = Rng::new(13);
    let var_of = [
        0.0,
        f32::from_bits(1),
        f32::MIN_POSITIVE,
        1e-30,
        1.0,
        1e30,
        f32::MAX,
    ];
    for c in [1, 3, 4, 5, 13, 64, 1000, 1001] {
        let var: Vec<f32> = (0..c).map(|i| var_of[(i * 5 + c) % var_of.len()]).collect();
        let mean: Vec<f32> = (0..c).map(|_| rng.normal() as f32).collect();
        let scale: Vec<f32> = (0..c).map(|_| rng.normal() as f32 * 4.0).collect();
        let offset: Vec<f32> = (0..c).map(|_| rng.normal() as f32).collect();
        let p = Params {
            mean: &mean,
            variance: &var,
            scale: Some(&scale),
            offset: Some(&offset),
            epsilon: 1e-5,
            activation: Activation::None,
        };
        for shape in [
            Shape::nhwc(2, 3, c),
            Shape::nchw(2, c, 1),
            Shape::nchw(1, c, 37),
        ] {
            let x: Vec<f32> = (0..shape.len().unwrap())
                .map(|_| rng.normal() as f32)
                .collect();
            for simd in Simd::ALL {
                assert_fold_then_affine_is_normalize(simd, shape, &x, &p);
            }
        }
    }
}

/// `fold` (four channels at a time, then one) is the `f64` reference fold
/// rounded once, bit for bit, whatever the channel count and the values:
/// zero and huge variances, `eps = 0` (infinite `a`), NaN and infinite
/// inputs, negative and zero scales.
#[test]
fn fold_is_the_reference_fold_rounded_once() {
    let mut rng = Rng::new(12);
    let special = [
        0.0,
        -0.0,
        1e-30,
        1e30,
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::NAN,
        f32::INFINITY,
        -1.0,
    ];
    let mut pick = |rng: &mut Rng| {
        if rng.below(4) == 0 {
            special[rng.below(special.len())]
        } else {
            (rng.normal() * 10f64.powi(rng.below(7) as i32 - 3)) as f32
        }
    };
    for c in (1..=13).chain([64, 1000, 1001, 1027]) {
        for eps in [f32::from_bits(1), 1e-5, 0.1] {
            let mut v = |f: &mut dyn FnMut(&mut Rng) -> f32| {
                (0..c).map(|_| f(&mut rng)).collect::<Vec<f32>>()
            };
            let mean = v(&mut pick);
            let var = v(&mut |r| pick(r).abs());
            let scale = v(&mut pick);
            let offset = v(&mut pick);
            for (sc, of) in [(Some(&scale[..]), Some(&offset[..])), (None, None)] {
                let (mut a, mut b) = (vec![0.0; c], vec![0.0; c]);
                batchnorm::fold(&mean, &var, sc, of, eps, &mut a, &mut b).unwrap();
                let p = Params {
                    mean: &mean,
                    variance: &var,
                    scale: sc,
                    offset: of,
                    epsilon: eps,
                    activation: Activation::None,
                };
                if let Err(m) = reference::check_fold(&p, &a, &b) {
                    panic!("C={c} eps={eps}: {m}");
                }
            }
        }
    }
}

/// Every width applies each activation exactly as `Activation::apply` does
/// one value at a time, NaN and signed zeros included (x86 builds use
/// `maxps`/`minps` for the clamps, whose operand order decides both).
#[test]
fn activations_match_the_scalar_definition_on_special_values() {
    let special = [
        f32::NAN,
        -f32::NAN,
        -0.0,
        0.0,
        -1.0,
        1.0,
        -0.5,
        0.25,
        6.0,
        7.0,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MIN_POSITIVE,
        -f32::MIN_POSITIVE,
    ];
    let mut acts = ACTIVATIONS.to_vec();
    acts.push(Activation::Clamp {
        min: -0.0,
        max: 0.0,
    });
    for simd in Simd::ALL {
        // Every value in every lane: 3 * 16 + 5 elements cycle through
        // them, with a scalar tail.
        let n = 3 * 16 + 5;
        let x: Vec<f32> = (0..n).map(|i| special[i % special.len()]).collect();
        let shape = Shape::nhwc(n, 1, 1);
        // y = x * 1 + (-0) is x itself, -0.0 included.
        let (a, b) = ([1.0f32], [-0.0f32]);
        for &act in &acts {
            let mut y = vec![0.0f32; n];
            simd.affine(&x, &mut y, shape, &a, &b, act).unwrap();
            for (i, (&xi, &yi)) in x.iter().zip(&y).enumerate() {
                let want = act.apply(xi);
                assert!(
                    want.to_bits() == yi.to_bits() || (want.is_nan() && yi.is_nan()),
                    "{simd:?} {act:?} x[{i}] = {xi:?}: got {yi:?}, want {want:?}"
                );
            }
        }
    }
}

/// The ranges where a compact build's `f32` fold rescales its
/// intermediates (`normalize::fold_f32`): each case is held to
/// `reference::check_fold` (bit for bit on x86 and aarch64, the `f32`
/// fold's proven bounds in a compact build, `--cfg batchnorm_compact`) and
/// the normalization of a few values to crate docs §3.
#[test]
fn fold_extremes_keep_their_bounds() {
    // (mean, variance, scale, offset, epsilon)
    let cases: [(f32, f32, f32, f32, f32); 7] = [
        // `a` underflows to 0 while `mean * A` is 5.4e-18.
        (1e30, -8.696418e-39, -5.376551e-39, 5.109197e-39, 1e18),
        // `a` underflows, infinite mean: `b` is +inf, not NaN.
        (
            f32::NEG_INFINITY,
            1.0134881e-38,
            6.200716e-39,
            -8.631529e-39,
            1e18,
        ),
        // `a` overflows while `mean * A` (1e15) and `b` are representable.
        (1e-30, 0.0, 1e30, 2.0, 1e-30),
        // `a` overflows, `mean * A` too, and `offset` is +inf.
        (
            0.43712685,
            0.17316082,
            f32::MAX,
            f32::INFINITY,
            f32::from_bits(1),
        ),
        // `mean * a` overflows while `offset - mean * a` is representable.
        (3.0e38, 1.0, 1.1, f32::MAX, 1e-3),
        // `var + eps` overflows `f32`.
        (5.0, f32::MAX, 2.0, 1.0, 1e38),
        // An ordinary channel beside them.
        (0.5, 2.0, 1.5, -0.25, 1e-5),
    ];
    for (ci, t) in cases.iter().enumerate() {
        let (mut a, mut b) = ([0.0f32; 1], [0.0f32; 1]);
        let (m, v, s, o) = ([t.0], [t.1], [t.2], [t.3]);
        batchnorm::fold(&m, &v, Some(&s), Some(&o), t.4, &mut a, &mut b).unwrap();
        let p = Params {
            mean: &m,
            variance: &v,
            scale: Some(&s),
            offset: Some(&o),
            epsilon: t.4,
            activation: Activation::None,
        };
        if let Err(e) = reference::check_fold(&p, &a, &b) {
            panic!("case {ci} {t:?}: {e}");
        }
        // Normalizing a few values of that channel: crate docs §3 (not `x =
        // mean` when `a` is subnormal: `x a` then carries `|x| 2^-150` of
        // absolute error with any fold, the fuzz oracle's underflow term).
        let x = [0.0, 1.0, -3.5, 2.0];
        let mut y = [0.0f32; 4];
        batchnorm::normalize(&x, &mut y, Shape::rows(4, 1), &p).unwrap();
        if let Err(e) = reference::check_normalize(&x, Shape::rows(4, 1), &p, &y) {
            panic!("case {ci} {t:?}: {e}");
        }
    }
}

/// Channels-last rows go two at a time on tensors of at most 2^20 elements
/// and one at a time above (always one with sixteen lanes): both sides of
/// the boundary, on every width, split and in place, an odd row count on
/// each, against the reference.
#[test]
fn paired_rows_either_side_of_the_size_limit() {
    let mut rng = Rng::new(11);
    for simd in Simd::ALL {
        for shape in [Shape::nhwc(4095, 1, 256), Shape::nhwc(4097, 1, 256)] {
            let k = case(&mut rng, shape);
            let p = Params {
                mean: &k.mean,
                variance: &k.var,
                scale: Some(&k.scale),
                offset: Some(&k.offset),
                epsilon: 1e-3,
                activation: Activation::Relu,
            };
            split_and_in_place(simd, shape, &k.x, &p, 1);
        }
    }
}

/// Tensors the widest lanes write in aligned vectors, with an overlapping
/// whole vector at each end (NCHW runs of four vectors and more, periodic
/// tensors of at least one pattern), give the same bits wherever the input
/// and output sit (every phase against 64 bytes, independently), out of
/// place and in place. A quarter of the inputs equal their channel's mean,
/// where `x * a + b` with one rounding (a fused multiply-add) and with two
/// (the scalar lane) differ.
#[test]
fn results_do_not_depend_on_alignment() {
    let mut rng = Rng::new(41);
    let bits = |y: &[f32]| y.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    for simd in Simd::ALL {
        let w = simd.lanes().max(1);
        for shape in alignment_shapes(w) {
            let c = shape.channels;
            let mean: Vec<f32> = (0..c).map(|k| 0.1 + 0.37 * k as f32).collect();
            let var: Vec<f32> = (0..c).map(|k| 0.3 + 0.5 * k as f32).collect();
            let scale: Vec<f32> = (0..c).map(|k| 1.7 - 0.2 * k as f32).collect();
            let offset: Vec<f32> = (0..c).map(|k| 0.25 - 0.45 * k as f32).collect();
            let p = Params {
                mean: &mean,
                variance: &var,
                scale: Some(&scale),
                offset: Some(&offset),
                epsilon: 1e-3,
                activation: Activation::None,
            };
            let x: Vec<f32> = (0..shape.len().unwrap())
                .map(|i| {
                    let m = mean[channel_of(shape, i)];
                    if rng.below(4) == 0 {
                        m
                    } else {
                        m + rng.normal() as f32
                    }
                })
                .collect();
            let mut want = vec![0.0; x.len()];
            simd.normalize(&x, &mut want, shape, &p).unwrap();
            if let Err(e) = reference::check_normalize(&x, shape, &p, &want) {
                panic!("{simd:?} {shape:?}: {e}");
            }
            for xo in 0..16 {
                let xb = misaligned(&x, xo);
                for yo in 0..16 {
                    let mut yb = vec![f32::NAN; x.len() + 16];
                    let y = &mut yb[yo..][..x.len()];
                    simd.normalize(&xb[xo..], y, shape, &p).unwrap();
                    assert_eq!(bits(y), bits(&want), "{simd:?} {shape:?} x +{xo} y +{yo}");
                }
                let mut z = xb.clone();
                simd.normalize_in_place(&mut z[xo..], shape, &p).unwrap();
                assert_eq!(
                    bits(&z[xo..]),
                    bits(&want),
                    "{simd:?} {shape:?} in place +{xo}"
                );
            }
        }
    }
}

/// Outputs of 16 MiB and more are written with streaming stores on x86-64
/// by the channels-last loops whose rows are back to back or all start
/// alike against the cache line (`STREAM_MIN_BYTES` and `streams_rows` in
/// src/normalize.rs): a tensor of 35-38 MB gives, bit for bit, what the
/// same kernel gives for each of its batch elements (12-13 MB, written
/// through the caches), for every width. The shapes: a pattern of one
/// vector in registers and one of nine vectors (C = 144), streamed; rows
/// of 1000 and 2048 channels, whose patterns are longer than 1024
/// positions; NCHW runs, not streamed (the decision is the kernel's, this
/// checks it); the output as allocated, on a line and off one, and in
/// place.
/// Only x86-64 streams; elsewhere this is 36 MB of work under an emulator
/// for nothing the other tests do not cover.
#[cfg(target_arch = "x86_64")]
#[test]
fn streamed_outputs_match_cached_ones() {
    let mut rng = Rng::new(43);
    let bits = |y: &[f32]| y.iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    let shapes = [
        Shape::nchw(3, 3, 1_000_003),
        Shape::nhwc(3, 200_003, 16),
        Shape::nhwc(3, 3_001, 1000),
        Shape::nhwc(3, 21_003, 144),
        Shape::nhwc(3, 1_501, 2048),
    ];
    for shape in shapes {
        let c = shape.channels;
        let len = shape.len().unwrap();
        let item = len / shape.batch;
        assert!(
            len * 4 >= 16 << 20 && item * 4 < 16 << 20,
            "{shape:?}: the tensor must stream, its batch elements not"
        );
        let mean: Vec<f32> = (0..c).map(|k| 0.1 + 0.37 * k as f32).collect();
        let var: Vec<f32> = (0..c).map(|k| 0.3 + 0.5 * k as f32).collect();
        let scale: Vec<f32> = (0..c).map(|k| 1.7 - 0.2 * k as f32).collect();
        let p = Params {
            mean: &mean,
            variance: &var,
            scale: Some(&scale),
            offset: None,
            epsilon: 1e-3,
            activation: Activation::Relu,
        };
        let x: Vec<f32> = (0..len)
            .map(|i| mean[channel_of(shape, i)] + rng.normal() as f32)
            .collect();
        let one = Shape { batch: 1, ..shape };
        for simd in Simd::ALL {
            let mut want = vec![0.0; len];
            for (xe, ye) in x.chunks_exact(item).zip(want.chunks_exact_mut(item)) {
                simd.normalize(xe, ye, one, &p).unwrap();
            }
            // As allocated (16 bytes past a 64-byte line for an `mmap`ed
            // block of glibc), 5 elements on, and on a 64-byte line.
            for at in [None, Some(5), Some(0)] {
                let mut yb = vec![f32::NAN; len + 16];
                let yo = at.map_or(0, |k| (k + 16 - (yb.as_ptr() as usize / 4) % 16) % 16);
                let y = &mut yb[yo..][..len];
                simd.normalize(&x, y, shape, &p).unwrap();
                assert!(bits(y) == bits(&want), "{simd:?} {shape:?} y +{yo}");
            }
            let mut z = x.clone();
            simd.normalize_in_place(&mut z, shape, &p).unwrap();
            assert!(bits(&z) == bits(&want), "{simd:?} {shape:?} in place");
        }
    }
}
