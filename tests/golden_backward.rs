//! The backward pass against real frameworks (`tests/data/backward.json`):
//! PyTorch 2.15 autograd over `F.batch_norm` (training, training with a
//! ReLU, inference; NCHW) and a TensorFlow 2.21 `GradientTape` over
//! `tf.nn.moments` + `tf.nn.batch_normalization` (NHWC). Every case runs
//! with every `Simd` width.
//!
//! # Tolerance
//!
//! Let `B` be the bound documented on `batchnorm::backward`
//! (`reference::backward_dx_bound`, `backward_sum_bounds`) evaluated at the
//! exact statistics, and `S(dm, dv)` the most the exact gradient moves when
//! the mean moves by `dm` and the variance by `dv` ([`sensitivity`]).
//!
//! * Ours: in training mode the kernel gets the `f64` batch statistics
//!   rounded to `f32` (half an ulp each), so it is within `B + S(half ulps)`
//!   of the exact gradient; in inference mode the statistics are the case's
//!   inputs (`S = 0`).
//! * The framework's: its gradient is an `f32` evaluation of the same
//!   formula from its own batch statistics, which crate docs §3 bounds
//!   (`|dm| <= 1e-6 (|m| + σ)`, `|dv| <= 1e-5 v`; the frameworks' moments
//!   are held to §3 by `tests/golden.rs`); its sums run over `count <= 64`
//!   terms, fewer roundings than the 70 our bound allows for, and each
//!   element sees at most the roundings `B`'s `4 ε` term covers (PyTorch's
//!   CPU kernel and TF's graph both form `dy * scale * inv`, the two mean
//!   terms and their sum). So it is within `B + S(§3)`.
//!
//! Hence `|ours - framework| <= 2 B + S(half ulps) + S(§3)` plus the final
//! roundings of both sides (half an ulp each, `ε |ref|` together). The
//! ReLU case's mask must be the framework's: the test first asserts that
//! no pre-activation output lies within `1e-4 (|x a| + |b|)` of 0, far
//! beyond any rounding of either side, so the masks cannot differ.

use batchnorm::{reference, Activation, Gradients, Mode, Params, Shape, Simd};
use serde_json::Value;

const EPS: f64 = f32::EPSILON as f64;

fn load() -> Vec<Value> {
    let path = format!("{}/tests/data/backward.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    let mut doc: Value = serde_json::from_str(&text).unwrap();
    match doc["cases"].take() {
        Value::Array(c) => c,
        _ => panic!("no cases"),
    }
}

fn f32s(case: &Value, group: &str, key: &str) -> Vec<f32> {
    case[group][key]
        .as_array()
        .unwrap_or_else(|| panic!("{key}"))
        .iter()
        .map(|v| v.as_f64().expect("number") as f32)
        .collect()
}

fn shape(case: &Value) -> Shape {
    let d: Vec<usize> = case["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    match case["layout"].as_str().unwrap() {
        "NHWC" => Shape::nhwc(d[0], d[1] * d[2], d[3]),
        "NCHW" => Shape::nchw(d[0], d[1], d[2] * d[3]),
        l => panic!("layout {l}"),
    }
}

/// How far the exact gradient of channel `c` moves when its statistics
/// move by at most `dm`, `dv` (see the module docs):
/// `(dx bound per element, dscale bound)`.
#[allow(clippy::too_many_arguments)]
fn sensitivity(
    x: &[f32],
    g: &[f64],
    shape: Shape,
    c: usize,
    (m, v, e, sc): (f64, f64, f64, f64),
    dm: f64,
    dv: f64,
    ds: f64,
    sum_g: f64,
) -> (Vec<f64>, f64) {
    assert!(v + e - dv > 0.0);
    let inv = 1.0 / (v + e).sqrt();
    let rho = ((v + e) / (v + e - dv)).sqrt() - 1.0;
    let count = (shape.batch * shape.spatial) as f64;
    let idx: Vec<usize> = (0..shape.batch)
        .flat_map(|n| (0..shape.spatial).map(move |s| reference::index(shape, n, s, c)))
        .collect();
    let dh = |i: usize| dm * inv * (1.0 + rho) + (x[i] as f64 - m).abs() * inv * rho;
    let dds: f64 = idx.iter().map(|&i| g[i].abs() * dh(i)).sum();
    let mut out = vec![0.0; x.len()];
    for &i in &idx {
        let xh = (x[i] as f64 - m).abs() * inv;
        out[i] = sc.abs() / count
            * (inv * rho * (count * g[i] - sum_g).abs()
                + inv * rho * (xh + dh(i)) * (ds.abs() + dds)
                + inv * dh(i) * (ds.abs() + dds)
                + inv * xh * dds);
    }
    (out, dds)
}

#[test]
fn golden_backward() {
    let cases = load();
    assert_eq!(cases.len(), 4);
    for case in &cases {
        let name = case["name"].as_str().unwrap();
        let shape = shape(case);
        let c = shape.channels;
        let count = (shape.batch * shape.spatial) as f64;
        let training = case["params"]["training"].as_bool().unwrap();
        let mode = if training {
            Mode::Training
        } else {
            Mode::Inference
        };
        let activation = match case["params"]["activation"].as_str().unwrap() {
            "none" => Activation::None,
            "relu" => Activation::Relu,
            a => panic!("{a}"),
        };
        let eps = case["params"]["epsilon"].as_f64().unwrap() as f32;
        let (x, dy) = (f32s(case, "inputs", "x"), f32s(case, "inputs", "dy"));
        let (scale, offset) = (
            f32s(case, "inputs", "scale"),
            f32s(case, "inputs", "offset"),
        );
        let (fdx, fds, fdo) = (
            f32s(case, "outputs", "dx"),
            f32s(case, "outputs", "dscale"),
            f32s(case, "outputs", "doffset"),
        );
        // The statistics: exact ones (training) or the given ones.
        let (mut m64, mut v64) = (vec![0.0f64; c], vec![0.0f64; c]);
        let (mean, var): (Vec<f32>, Vec<f32>) = if training {
            reference::moments(&x, shape, &mut m64, &mut v64);
            (
                m64.iter().map(|&v| v as f32).collect(),
                v64.iter().map(|&v| v as f32).collect(),
            )
        } else {
            let (m, v) = (
                f32s(case, "inputs", "mean"),
                f32s(case, "inputs", "variance"),
            );
            m64 = m.iter().map(|&v| v as f64).collect();
            v64 = v.iter().map(|&v| v as f64).collect();
            (m, v)
        };
        let p = Params {
            mean: &mean,
            variance: &var,
            scale: Some(&scale),
            offset: Some(&offset),
            epsilon: eps,
            activation,
        };
        // The exact gradient's quantities at the f32 statistics.
        let (mut rdx, mut rds, mut rdo) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
        reference::backward(&x, &dy, shape, &p, mode, &mut rdx, &mut rds, &mut rdo);
        let mut worst = 0.0f64;
        for simd in Simd::ALL {
            let (mut dx, mut ds, mut dof) = (vec![0.0; x.len()], vec![0.0; c], vec![0.0; c]);
            let g = Gradients {
                dx: &mut dx,
                dscale: &mut ds,
                doffset: &mut dof,
            };
            simd.backward(&x, &dy, shape, &p, mode, g).unwrap();
            for ch in 0..c {
                let k = reference::backward_channel(&x, &dy, shape, &p, mode, ch);
                let (a, b) = reference::fold(mean[ch], var[ch], scale[ch], offset[ch], eps);
                let (a, b) = (a as f32 as f64, b as f32 as f64);
                let idx: Vec<usize> = (0..shape.batch)
                    .flat_map(|n| {
                        (0..shape.spatial).map(move |s| reference::index(shape, n, s, ch))
                    })
                    .collect();
                let gs: Vec<f64> = (0..x.len())
                    .map(|i| {
                        let y = x[i] as f64 * a + b;
                        if reference::passes(activation, y) {
                            dy[i] as f64
                        } else {
                            0.0
                        }
                    })
                    .collect();
                let abs_g: f64 = idx.iter().map(|&i| gs[i].abs()).sum();
                let abs_gd: f64 = idx
                    .iter()
                    .map(|&i| (gs[i] * (x[i] as f64 - mean[ch] as f64)).abs())
                    .sum();
                let stats = (m64[ch], v64[ch], eps as f64, scale[ch] as f64);
                let half = |r: f64| (r as f32 as f64 - r).abs();
                let (s_ours, s_fw) = if training {
                    let sigma = v64[ch].sqrt();
                    let ours = sensitivity(
                        &x,
                        &gs,
                        shape,
                        ch,
                        stats,
                        half(m64[ch]),
                        half(v64[ch]),
                        k.dscale,
                        k.doffset,
                    );
                    let fw = sensitivity(
                        &x,
                        &gs,
                        shape,
                        ch,
                        stats,
                        1e-6 * (m64[ch].abs() + sigma) + half(m64[ch]),
                        1e-5 * v64[ch] + half(v64[ch]),
                        k.dscale,
                        k.doffset,
                    );
                    (ours, fw)
                } else {
                    ((vec![0.0; x.len()], 0.0), (vec![0.0; x.len()], 0.0))
                };
                let (bo, bs) = reference::backward_sum_bounds(&k, abs_g, abs_gd);
                let tol_o = 2.0 * bo + EPS * k.doffset.abs();
                let tol_s = 2.0 * bs + s_ours.1 + s_fw.1 + EPS * k.dscale.abs();
                let eo = (dof[ch] as f64 - fdo[ch] as f64).abs();
                let es = (ds[ch] as f64 - fds[ch] as f64).abs();
                assert!(
                    eo <= tol_o,
                    "{name} {simd:?} doffset[{ch}]: {} vs {}, tol {tol_o:e}",
                    dof[ch],
                    fdo[ch]
                );
                assert!(
                    es <= tol_s,
                    "{name} {simd:?} dscale[{ch}]: {} vs {}, tol {tol_s:e}",
                    ds[ch],
                    fds[ch]
                );
                worst = worst.max(eo / tol_o).max(es / tol_s);
                for &i in &idx {
                    let d = x[i] as f64 - mean[ch] as f64;
                    let b_el =
                        reference::backward_dx_bound(&k, mode, gs[i], d, count, abs_g, abs_gd);
                    if activation != Activation::None {
                        // The mask is unambiguous: y is far from 0.
                        let y = x[i] as f64 * a + b;
                        let margin = 1e-4 * (y.abs() + (x[i] as f64 * a).abs() + b.abs());
                        assert!(y.abs() > margin, "{name}: y[{i}] = {y:e} too close to 0");
                    }
                    let tol = 2.0 * b_el + s_ours.0[i] + s_fw.0[i] + EPS * rdx[i].abs();
                    let e = (dx[i] as f64 - fdx[i] as f64).abs();
                    assert!(
                        e <= tol,
                        "{name} {simd:?} dx[{i}]: ours {}, framework {}, |diff| {e:e} > {tol:e}",
                        dx[i],
                        fdx[i]
                    );
                    worst = worst.max(e / tol);
                }
            }
        }
        eprintln!("  {name:<36} max |ours - framework| / tolerance {worst:.3}");
    }
}
