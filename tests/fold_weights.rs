#![allow(clippy::type_complexity, clippy::needless_range_loop)]
//! `fold_into_weights` against `tests/data/fold.json` (PyTorch 2.15's own
//! `fuse_conv_bn_weights` / `fuse_linear_bn_weights`; a Keras 3 `Conv2D`
//! (`HWIO`) + `BatchNormalization` whose eval-mode output the folded layer
//! must reproduce), every layout against a plain definition, and bad input.
//!
//! # Tolerances
//!
//! Ours (`fold_into_weights` docs): `|w' - w a| <= u |w a|`, `|b' - exact| <= u
//! |exact| + 2^-50 (|(b - m) a| + |offset|)`, `u = ε / 2`. PyTorch's fuse
//! computes in `f32`: `rsqrt(var + eps)` (a sum, a square root and a
//! reciprocal, or one rsqrt: at most `3u` beyond the first, taken as `4u`),
//! `* scale` and `* w` (`u` each): `|w'_torch - w a| <= 6u |w a|` (first
//! order), and the bias `(b - m) * rsqrt * scale + offset` at most `7u |(b -
//! m) a| + u |b'|`. So `|ours - torch| <= 7u |w a| = 3.5 ε |w a|` and
//! `8u |(b - m) a| + 2u |b'|` for the bias.
//!
//! The layer output: `y = Σ w' x + b'` evaluated in `f64` from our folded
//! `f32` weights is within `u Σ|w a x| + u |b'| + 2^-50 (..)` of the exact
//! `bn(conv(x))`. The framework's `y` is an `f32` convolution of `K` terms
//! (any order: `γ_K (Σ|w x| + |b|)`, `γ_K <= 1.01 K u`), then its batch
//! norm in the folded form (crate docs §3's `4 ε (|z a| + |m a| + |offset|)`
//! for `z = conv(x)`). Tolerance: the sum of the two.

use batchnorm::{fold_into_weights, Activation, Error, Params, WeightLayout};
use serde_json::Value;

const EPS: f64 = f32::EPSILON as f64;
const U: f64 = EPS / 2.0;

fn load() -> Vec<Value> {
    let path = format!("{}/tests/data/fold.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let mut doc: Value = serde_json::from_str(&text).unwrap();
    match doc["cases"].take() {
        Value::Array(c) => c,
        _ => panic!("no cases"),
    }
}

fn f32s(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect()
}

fn dims(v: &Value) -> Vec<usize> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect()
}

struct Bn {
    mean: Vec<f32>,
    var: Vec<f32>,
    scale: Vec<f32>,
    offset: Vec<f32>,
    eps: f32,
}

impl Bn {
    fn params(&self) -> Params<'_> {
        Params {
            mean: &self.mean,
            variance: &self.var,
            scale: Some(&self.scale),
            offset: Some(&self.offset),
            epsilon: self.eps,
            activation: Activation::None,
        }
    }
    fn a(&self, o: usize) -> f64 {
        self.scale[o] as f64 / (self.var[o] as f64 + self.eps as f64).sqrt()
    }
}

/// The output of a stride-1, unpadded convolution (or a dense layer: 1x1
/// spatial) with weights indexed by `w(o, i, ky, kx)`, in `f64`, plus the
/// sum of `|w x|` per output (for the tolerances). `x` is `[N, C, H, W]`
/// (`nchw`) or `[N, H, W, C]`; the output in the same layout.
#[allow(clippy::too_many_arguments)]
fn conv(
    x: &[f32],
    nchw: bool,
    (n, ci, h, w): (usize, usize, usize, usize),
    (co, kh, kw): (usize, usize, usize),
    weight: &dyn Fn(usize, usize, usize, usize) -> f64,
    bias: &dyn Fn(usize) -> f64,
) -> (Vec<f64>, Vec<f64>) {
    let (oh, ow) = (h - kh + 1, w - kw + 1);
    let xi = |b, c, yy, xx| {
        if nchw {
            ((b * ci + c) * h + yy) * w + xx
        } else {
            ((b * h + yy) * w + xx) * ci + c
        }
    };
    let yi = |b, c, yy, xx| {
        if nchw {
            ((b * co + c) * oh + yy) * ow + xx
        } else {
            ((b * oh + yy) * ow + xx) * co + c
        }
    };
    let (mut y, mut mag) = (vec![0.0; n * co * oh * ow], vec![0.0; n * co * oh * ow]);
    for b in 0..n {
        for o in 0..co {
            for yy in 0..oh {
                for xx in 0..ow {
                    let (mut s, mut m) = (bias(o), bias(o).abs());
                    for i in 0..ci {
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let t = weight(o, i, ky, kx) * x[xi(b, i, yy + ky, xx + kx)] as f64;
                                s += t;
                                m += t.abs();
                            }
                        }
                    }
                    y[yi(b, o, yy, xx)] = s;
                    mag[yi(b, o, yy, xx)] = m;
                }
            }
        }
    }
    (y, mag)
}

#[test]
fn golden_fold() {
    let cases = load();
    assert_eq!(cases.len(), 3);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let inp = &case["inputs"];
        let out = &case["outputs"];
        let bn = Bn {
            mean: f32s(&inp["mean"]),
            var: f32s(&inp["variance"]),
            scale: f32s(&inp["scale"]),
            offset: f32s(&inp["offset"]),
            eps: case["params"]["epsilon"].as_f64().unwrap() as f32,
        };
        let o = bn.mean.len();
        let w0 = f32s(&inp["weight"]);
        let bias = f32s(&inp["bias"]);
        let wl = case["weight_layout"].as_str().unwrap();
        let ws = dims(&case["weight_shape"]);
        let layout = match wl {
            "OIHW" | "OI" => WeightLayout::OutFirst,
            "HWIO" | "IO" => WeightLayout::OutLast,
            l => panic!("{l}"),
        };
        let mut w = w0.clone();
        let mut b = vec![0.0f32; o];
        fold_into_weights(&mut w, Some(&bias), layout, &bn.params(), &mut b).unwrap();
        let mut worst = 0.0f64;
        // PyTorch's own folded weights and bias.
        if !out["weight"].is_null() {
            let (tw, tb) = (f32s(&out["weight"]), f32s(&out["bias"]));
            let per = w.len() / o;
            for (i, (&ours, &theirs)) in w.iter().zip(&tw).enumerate() {
                let exact = (w0[i] as f64 * bn.a(i / per)).abs();
                let tol = 3.5 * EPS * exact;
                let e = (ours as f64 - theirs as f64).abs();
                assert!(e <= tol, "{name}: w[{i}] {ours} vs {theirs}");
                worst = worst.max(e / tol.max(f64::MIN_POSITIVE));
            }
            for c in 0..o {
                let ba = ((bias[c] as f64 - bn.mean[c] as f64) * bn.a(c)).abs();
                let tol = 8.0 * U * ba
                    + 2.0 * U * (b[c] as f64).abs()
                    + 1e-15 * (ba + bn.offset[c].abs() as f64);
                let e = (b[c] as f64 - tb[c] as f64).abs();
                assert!(e <= tol, "{name}: b[{c}] {} vs {}", b[c], tb[c]);
                worst = worst.max(e / tol);
            }
        }
        // The folded layer reproduces the framework's bn(layer(x)).
        let x = f32s(&inp["x"]);
        let fy = f32s(&out["y"]);
        let xs = case["params"]["procedure"].as_str().unwrap();
        let (ci, kh, kw, nchw) = match wl {
            "OIHW" => (ws[1], ws[2], ws[3], true),
            "OI" => (ws[1], 1, 1, true),
            "HWIO" => (ws[2], ws[0], ws[1], false),
            l => panic!("{l}"),
        };
        let n = x.len() / ci / if kh == 1 { 1 } else { 25 };
        let hw = if kh == 1 { 1 } else { 5 };
        let widx = |oc: usize, i: usize, ky: usize, kx: usize| match wl {
            "OIHW" => ((oc * ci + i) * kh + ky) * kw + kx,
            "OI" => oc * ci + i,
            _ => ((ky * kw + kx) * ci + i) * o + oc,
        };
        let (y, _) = conv(
            &x,
            nchw,
            (n, ci, hw, hw),
            (o, kh, kw),
            &|oc, i, ky, kx| w[widx(oc, i, ky, kx)] as f64,
            &|oc| b[oc] as f64,
        );
        // Magnitudes of the unfolded layer for the framework's side.
        let (z, zmag) = conv(
            &x,
            nchw,
            (n, ci, hw, hw),
            (o, kh, kw),
            &|oc, i, ky, kx| w0[widx(oc, i, ky, kx)] as f64,
            &|oc| bias[oc] as f64,
        );
        assert_eq!(y.len(), fy.len(), "{name}: {xs}");
        let k = (ci * kh * kw) as f64;
        let per_out = y.len() / n / o;
        for i in 0..y.len() {
            let oc = if nchw { (i / per_out) % o } else { i % o };
            let a = bn.a(oc).abs();
            let ours = U * a * zmag[i]
                + U * y[i].abs()
                + 1e-15 * (a * zmag[i] + bn.offset[oc].abs() as f64);
            let theirs = 1.01 * k * U * a * zmag[i]
                + 4.0
                    * EPS
                    * (a * z[i].abs()
                        + a * (bn.mean[oc] as f64).abs()
                        + (bn.offset[oc] as f64).abs());
            let tol = ours + theirs;
            let e = (y[i] - fy[i] as f64).abs();
            assert!(
                e <= tol,
                "{name}: y[{i}] ours {} vs framework {}, tol {tol:e}",
                y[i],
                fy[i]
            );
            worst = worst.max(e / tol);
        }
        eprintln!("  {name:<36} max error / tolerance {worst:.3}");
    }
}

/// A plain definition of every layout: weight element -> output channel.
fn channel_of(layout: WeightLayout, len: usize, o: usize, i: usize) -> usize {
    match layout {
        WeightLayout::OutFirst => i / (len / o),
        WeightLayout::OutLast | WeightLayout::Hwim { .. } => i % o,
        WeightLayout::OutSecond { groups, kernel } => {
            let per = o / groups;
            let inputs = len / (per * kernel);
            let input = i / (per * kernel);
            let j = (i / kernel) % per;
            input / (inputs / groups) * per + j
        }
    }
}

#[test]
fn every_layout_matches_definition() {
    let o = 6;
    let bn = Bn {
        mean: (0..o).map(|c| c as f32 * 0.3 - 1.0).collect(),
        var: (0..o).map(|c| 0.5 + c as f32).collect(),
        scale: (0..o).map(|c| 1.0 - c as f32 * 0.4).collect(),
        offset: (0..o).map(|c| c as f32 * 0.1).collect(),
        eps: 1e-3,
    };
    let cases = [
        (WeightLayout::OutFirst, 6 * 4 * 9), // OIHW, I = 4
        (WeightLayout::OutFirst, 6 * 2 * 9), // grouped (groups 2: I/g = 2)
        (WeightLayout::OutFirst, 6 * 9),     // depthwise
        (WeightLayout::OutFirst, 6 * 5),     // Linear [6, 5]
        (
            WeightLayout::OutSecond {
                groups: 1,
                kernel: 9,
            },
            4 * 6 * 9,
        ),
        (
            WeightLayout::OutSecond {
                groups: 2,
                kernel: 4,
            },
            4 * 3 * 4,
        ),
        (
            WeightLayout::OutSecond {
                groups: 3,
                kernel: 1,
            },
            6 * 2,
        ),
        (WeightLayout::OutLast, 3 * 3 * 4 * 6), // HWIO
        (WeightLayout::OutLast, 5 * 6),         // Dense [5, 6]
        (WeightLayout::Hwim { multiplier: 2 }, 3 * 3 * 3 * 2),
        (WeightLayout::Hwim { multiplier: 6 }, 2 * 6),
    ];
    for (layout, len) in cases {
        let w0: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut w = w0.clone();
        let mut b = vec![0.0; o];
        fold_into_weights(&mut w, None, layout, &bn.params(), &mut b).unwrap();
        for i in 0..len {
            let c = channel_of(layout, len, o, i);
            let want = (w0[i] as f64 * bn.a(c)) as f32;
            assert_eq!(w[i].to_bits(), want.to_bits(), "{layout:?} w[{i}]");
        }
        for c in 0..o {
            let want = ((0.0 - bn.mean[c] as f64) * bn.a(c) + bn.offset[c] as f64) as f32;
            assert_eq!(b[c], want, "{layout:?} b[{c}]");
        }
    }
    // A depthwise weight [kh, kw, I, M] folds exactly like [.., I * M] last.
    let len = 3 * 3 * 3 * 2;
    let w0: Vec<f32> = (0..len).map(|i| i as f32 - 20.0).collect();
    let (mut a, mut b) = (w0.clone(), w0.clone());
    let mut bias = vec![0.0; o];
    fold_into_weights(
        &mut a,
        None,
        WeightLayout::Hwim { multiplier: 2 },
        &bn.params(),
        &mut bias,
    )
    .unwrap();
    fold_into_weights(&mut b, None, WeightLayout::OutLast, &bn.params(), &mut bias).unwrap();
    assert_eq!(a, b);
}

#[test]
fn bad_input_writes_nothing() {
    let o = 4;
    let (m, v, s, of) = ([0.0f32; 4], [1.0f32; 4], [1.0f32; 4], [0.0f32; 4]);
    let good = Params {
        mean: &m,
        variance: &v,
        scale: Some(&s),
        offset: Some(&of),
        epsilon: 1e-3,
        activation: Activation::None,
    };
    let short = [0.0f32; 3];
    let w_err = |len| Error::Weights { len, channels: o };
    let cases: Vec<(WeightLayout, usize, Params, usize, Option<usize>, Error)> = vec![
        (WeightLayout::OutFirst, 10, good, 4, None, w_err(10)),
        (WeightLayout::OutFirst, 0, good, 4, None, w_err(0)),
        (WeightLayout::OutLast, 6, good, 4, None, w_err(6)),
        (
            WeightLayout::Hwim { multiplier: 3 },
            12,
            good,
            4,
            None,
            w_err(12),
        ),
        (
            WeightLayout::Hwim { multiplier: 0 },
            12,
            good,
            4,
            None,
            w_err(12),
        ),
        (
            WeightLayout::OutSecond {
                groups: 0,
                kernel: 1,
            },
            8,
            good,
            4,
            None,
            w_err(8),
        ),
        (
            WeightLayout::OutSecond {
                groups: 3,
                kernel: 1,
            },
            12,
            good,
            4,
            None,
            w_err(12),
        ),
        (
            WeightLayout::OutSecond {
                groups: 2,
                kernel: 3,
            },
            12,
            good,
            4,
            None,
            w_err(12),
        ), // I = 2, ok? [I, 2, 3]: I = 2
        (
            WeightLayout::OutSecond {
                groups: 1,
                kernel: 0,
            },
            8,
            good,
            4,
            None,
            w_err(8),
        ),
        (
            WeightLayout::OutSecond {
                groups: 2,
                kernel: 2,
            },
            12,
            good,
            4,
            None,
            w_err(12),
        ), // I = 3, not a multiple of 2
        (
            WeightLayout::OutFirst,
            8,
            good,
            3,
            None,
            Error::Length {
                what: "bias_out",
                expected: 4,
                actual: 3,
            },
        ),
        (
            WeightLayout::OutFirst,
            8,
            good,
            4,
            Some(5),
            Error::Length {
                what: "bias",
                expected: 4,
                actual: 5,
            },
        ),
        (
            WeightLayout::OutFirst,
            8,
            Params {
                variance: &short,
                ..good
            },
            4,
            None,
            Error::Length {
                what: "variance",
                expected: 4,
                actual: 3,
            },
        ),
        (
            WeightLayout::OutFirst,
            8,
            Params {
                scale: Some(&short),
                ..good
            },
            4,
            None,
            Error::Length {
                what: "scale",
                expected: 4,
                actual: 3,
            },
        ),
        (
            WeightLayout::OutFirst,
            8,
            Params {
                offset: Some(&short),
                ..good
            },
            4,
            None,
            Error::Length {
                what: "offset",
                expected: 4,
                actual: 3,
            },
        ),
        (
            WeightLayout::OutFirst,
            8,
            Params {
                epsilon: f32::NAN,
                ..good
            },
            4,
            None,
            Error::Epsilon(f32::NAN),
        ),
        (
            WeightLayout::OutFirst,
            0,
            Params {
                mean: &[],
                variance: &[],
                scale: None,
                offset: None,
                ..good
            },
            0,
            None,
            Error::ZeroChannels,
        ),
    ];
    for (i, (layout, len, p, lb, lbias, want)) in cases.into_iter().enumerate() {
        let w0: Vec<f32> = (0..len).map(|i| i as f32).collect();
        let mut w = w0.clone();
        let mut b = vec![f32::NAN; lb];
        let bias = lbias.map(|l| vec![1.0f32; l]);
        let r = fold_into_weights(&mut w, bias.as_deref(), layout, &p, &mut b);
        if i == 7 {
            // [I = 2, O/g = 2, 3]: valid (2 inputs, 2 groups).
            r.unwrap();
            continue;
        }
        let ok = match (&r, &want) {
            (Err(Error::Epsilon(a)), Error::Epsilon(b)) => a.is_nan() && b.is_nan(),
            (r, w) => *r == Err(*w),
        };
        assert!(ok, "case {i}: {r:?}, want {want:?}");
        assert_eq!(w, w0, "case {i}: weight written");
        assert!(b.iter().all(|v| v.is_nan()), "case {i}: bias written");
    }
}
