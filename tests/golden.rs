//! Compatibility with real framework runs: the golden vectors in
//! `tests/data/` (TensorFlow 2.21 `tf.nn.moments` and
//! `tf.nn.batch_normalization`, Keras 3.15 `BatchNormalization`, ONNX Runtime
//! 1.32 `BatchNormalization`; see the header of each file for versions and
//! conventions).
//!
//! Every case runs with every [`Simd`] width. Every tolerance is derived from
//! crate docs §3 (the bounds `reference::{mean_bound, variance_rel_bound,
//! normalize_bound}` implement), never fitted to the data; each derivation
//! sits next to its check. `cargo test --test golden -- --nocapture` prints
//! the largest error/bound ratio of every comparison and the ill-conditioned
//! moments next to TensorFlow's.

use batchnorm::{
    reference, Activation, Batch, BatchNorm, BatchNormArray, Config, Layout, Moments, Momentum,
    MovingStats, Params, ScaleOffset, Shape, Simd, Variance,
};
use serde_json::Value;

/// `f32::EPSILON`, the `ε` of crate docs §3.
const EPS: f64 = f32::EPSILON as f64;
/// Unit roundoff of `f32` (half an ulp at 1, relative).
const U: f64 = EPS / 2.0;

// ---------------------------------------------------------------------------
// Loading

/// The `cases` of one golden file.
fn load(file: &str) -> Vec<Value> {
    let path = format!("{}/tests/data/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut doc: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    match doc["cases"].take() {
        Value::Array(cases) if !cases.is_empty() => cases,
        _ => panic!("{path}: no cases"),
    }
}

/// A number, or one of the strings the files use for special values.
fn number(v: &Value) -> f64 {
    match v {
        Value::Number(n) => n.as_f64().expect("finite number"),
        Value::String(s) => match s.as_str() {
            "nan" => f64::NAN,
            "inf" => f64::INFINITY,
            "-inf" => f64::NEG_INFINITY,
            _ => panic!("not a number: {s:?}"),
        },
        _ => panic!("not a number: {v}"),
    }
}

/// One golden case.
struct Case<'a>(&'a Value);

impl Case<'_> {
    fn name(&self) -> &str {
        self.0["name"].as_str().expect("name")
    }

    fn dims(&self) -> Vec<usize> {
        let dims = self.0["shape"].as_array().expect("shape");
        dims.iter()
            .map(|d| d.as_u64().expect("dim") as usize)
            .collect()
    }

    /// `NHWC [N, H, W, C]` is `Shape::nhwc(N, H * W, C)`, `NCHW [N, C, H, W]`
    /// is `Shape::nchw(N, C, H * W)` (any number of spatial dimensions).
    fn shape(&self) -> Shape {
        let d = self.dims();
        assert!(d.len() >= 2, "{}: shape {d:?}", self.name());
        match self.0["layout"].as_str().expect("layout") {
            "NHWC" => Shape::nhwc(d[0], d[1..d.len() - 1].iter().product(), d[d.len() - 1]),
            "NCHW" => Shape::nchw(d[0], d[1], d[2..].iter().product()),
            l => panic!("{}: layout {l}", self.name()),
        }
    }

    fn len(&self) -> usize {
        self.dims().iter().product()
    }

    fn param(&self, key: &str) -> &Value {
        &self.0["params"][key]
    }

    /// A tensor from `inputs` or `outputs`, `None` when absent or null.
    fn get(&self, key: &str) -> Option<&Value> {
        [&self.0["inputs"][key], &self.0["outputs"][key]]
            .into_iter()
            .find(|v| !v.is_null())
    }

    fn dtype(&self, key: &str) -> &str {
        self.0["tensor_dtypes"][key].as_str().expect("dtype")
    }

    fn f64s(&self, key: &str) -> Vec<f64> {
        let name = self.name();
        let v = self.get(key).unwrap_or_else(|| panic!("{name}: no {key}"));
        let v: Vec<f64> = v.as_array().expect("array").iter().map(number).collect();
        let dims = self.0["tensor_shapes"][key]
            .as_array()
            .expect("tensor_shape");
        let len: u64 = dims.iter().map(|d| d.as_u64().unwrap()).product();
        assert_eq!(v.len() as u64, len, "{name}: {key} length");
        v
    }

    /// A float32 tensor. The files hold `repr` of each float32 widened to
    /// f64. serde_json's default float parser (without its `float_roundtrip`
    /// feature) may land one f64 ulp off that value, but rounding to f32
    /// recovers the float32 exactly: one f64 ulp is 2^-29 of an f32 ulp, far
    /// from a rounding midpoint (checked). The same parser error on the f64
    /// truths (1e-16 relative) is negligible against every bound here.
    fn f32s(&self, key: &str) -> Vec<f32> {
        assert_eq!(self.dtype(key), "float32", "{}: {key}", self.name());
        self.f64s(key)
            .into_iter()
            .map(|d| {
                let f = d as f32;
                assert!(
                    (f as f64 - d).abs() <= d.abs() * f64::EPSILON || d.is_nan(),
                    "{}: {key} holds {d:e}, not a float32",
                    self.name()
                );
                f
            })
            .collect()
    }

    fn opt_f32s(&self, key: &str) -> Option<Vec<f32>> {
        self.get(key).map(|_| self.f32s(key))
    }
}

// ---------------------------------------------------------------------------
// Bookkeeping

/// The largest error/bound ratio seen by one comparison, and where.
struct Worst {
    what: &'static str,
    ratio: f64,
    at: String,
}

impl Worst {
    fn new(what: &'static str) -> Worst {
        Worst {
            what,
            ratio: 0.0,
            at: String::new(),
        }
    }

    /// Records `|got - want|` against `bound` and fails beyond it.
    fn check(&mut self, got: f64, want: f64, bound: f64, at: impl Fn() -> String) {
        let err = (got - want).abs();
        assert!(
            err <= bound,
            "{}: {}: got {got:e}, want {want:e}, |error| {err:e} > bound {bound:e} (ratio {:.3})",
            self.what,
            at(),
            err / bound
        );
        let ratio = if err == 0.0 { 0.0 } else { err / bound };
        if ratio > self.ratio {
            self.ratio = ratio;
            self.at = at();
        }
    }

    /// Records a ratio without asserting (diagnostics beyond a contract).
    fn observe(&mut self, ratio: f64, at: impl Fn() -> String) {
        if ratio > self.ratio {
            self.ratio = ratio;
            self.at = at();
        }
    }

    fn report(&self) {
        eprintln!(
            "  {:<58} max error/bound {:.3}  ({})",
            self.what, self.ratio, self.at
        );
    }
}

/// What rounding `r` to `f32` costs: the best any `f32` result can do.
fn half_ulp(r: f64) -> f64 {
    (r as f32 as f64 - r).abs()
}

/// Largest `|x - y|` over two slices.
fn max_abs_diff(x: impl IntoIterator<Item = f64>, y: impl IntoIterator<Item = f64>) -> f64 {
    x.into_iter()
        .zip(y)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max)
}

/// Calls `f(i, c)` for every element `i` of `shape` and its channel `c`.
fn each_element(shape: Shape, mut f: impl FnMut(usize, usize)) {
    for n in 0..shape.batch {
        for s in 0..shape.spatial {
            for c in 0..shape.channels {
                f(reference::index(shape, n, s, c), c);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Bounds shared by the framework comparisons

/// crate docs §3 mean bound on a batch mean, plus the rounding of the exact mean
/// to `f32` (what `reference::check_moments` allows).
fn mean_tol(m: f64, v: f64) -> f64 {
    reference::mean_bound(m, v) + half_ulp(m)
}

/// crate docs §3 variance bound on a batch variance, plus the final rounding.
fn var_tol(m: f64, v: f64) -> f64 {
    reference::variance_rel_bound(m, v) * v + half_ulp(v)
}

/// How far exact normalization moves when the statistics move.
///
/// `y(m, v) = (x - m) * g / sqrt(v + e) + offset`, with `a = g / sqrt(v + e)`:
/// `∂y/∂m = -a` and `∂y/∂v = -(x - m) * a / (2 (v + e))`. Split
/// `y(m', v') - y(m, v) = [y(m', v') - y(m, v')] + [y(m, v') - y(m, v)]` with
/// `|m' - m| <= dm`, `|v' - v| <= dv`; by the mean value theorem the first
/// term is at most `|a(v')| dm` and the second `|x - m| |a(v'')| dv / (2 (v''
/// + e))` for some `v''` between `v` and `v'`. Over that interval `|a|` grows
/// by at most `k^(1/3)` and `|a| / (v + e)` by at most
/// `k = ((v + e) / (v + e - dv))^(3/2)`, so
///
/// `|Δy| <= k (|a| dm + |x - m| |a| dv / (2 (v + e)))`.
fn stats_sensitivity(x: f64, m: f64, v: f64, g: f64, e: f64, dm: f64, dv: f64) -> f64 {
    assert!(v + e - dv > 0.0, "variance bound {dv:e} swallows v + e");
    let k = ((v + e) / (v + e - dv)).powf(1.5);
    let a = (g / (v + e).sqrt()).abs();
    k * (a * dm + (x - m).abs() * a * dv / (2.0 * (v + e)))
}

/// The tolerance between our `y` and a framework's when the two normalize
/// with statistics that may differ: within `dm`, `dv` of `(m, v)` on each of
/// `sides` sides (2 when each side is independently within `dm`, `dv` of the
/// exact statistics; 1 when `(m, v)` are the framework's own and `dm`, `dv`
/// the whole difference).
///
/// Each side is off the exact value with its own statistics by at most
/// `4 ε (|x a| + |m a| + |offset|)` (see [`framework_tolerance`], with
/// `a_ulps` more ulps of `a` on the framework's side), where over the
/// perturbation `|a| <= k |a(v)|` and the mean is at most `|m| + dm`; the statistics
/// themselves move the exact value by [`stats_sensitivity`].
fn perturbed_tolerance(
    x: f64,
    (m, v, dm, dv, sides): (f64, f64, f64, f64, f64),
    g: f64,
    offset: f64,
    e: f64,
    a_ulps: f64,
) -> f64 {
    let k = ((v + e) / (v + e - dv)).powf(1.5);
    let a = k * (g / (v + e).sqrt()).abs();
    let xa_ma = (x.abs() + m.abs() + dm) * a;
    sides * stats_sensitivity(x, m, v, g, e, dm, dv)
        + 2.0 * 4.0 * EPS * (xa_ma + offset.abs())
        + a_ulps * EPS * xa_ma
}

/// The tolerance between our normalized `y` and a framework's, both computed
/// from the same `x`, statistics and parameters, in the folded form
/// `y = x * a + (offset - mean * a)` (TensorFlow's `tf.nn.batch_normalization`
/// and ONNX Runtime's CPU kernel both fold, see their sources).
///
/// Ours is within crate docs §3's `4 ε (|x a| + |mean a| + |offset|)` of the
/// exact value (checked separately against the reference). The framework
/// computes `a` in `f32` (`var + eps`, a square root, an inverse, a product
/// with `scale`), then `mean * a`, `offset - mean * a`, `x * a` and the sum,
/// each rounded once. With `u = ε/2` and a relative error `δa` on `a`, its
/// error is at most `|x a| (δa + 2u) + |mean a| (δa + 3u) + 2u |offset|`.
/// With correctly rounded operations `δa <= u/2 + u + u + u = 3.5u`, which
/// gives `2.75 ε |x a| + 3.25 ε |mean a| + ε |offset|`: inside the same
/// `4 ε (...)`. Hence `|ours - framework| <= 2 * normalize_bound`.
///
/// `a_ulps` adds `a_ulps` ulps of `a` on the framework's side (each ulp is
/// at most `ε` relative, so it costs `ε (|x a| + |mean a|)`): TensorFlow's
/// `tf.math.rsqrt` is Eigen's vectorised rsqrt, a hardware estimate refined
/// by one Newton step that is not correctly rounded (up to about two ulps
/// instead of the half ulp assumed above), so `δa` may exceed `3.5u` by one
/// ulp and push TF's `|mean a|` coefficient to `4.25 ε`.
fn framework_tolerance(x: f32, mean: f32, a: f64, offset: f32, a_ulps: f64) -> f64 {
    2.0 * reference::normalize_bound(x, mean, a, offset)
        + a_ulps * EPS * ((x as f64 * a).abs() + (mean as f64 * a).abs())
}

/// Ulps of TensorFlow's `a` beyond correct rounding (see
/// [`framework_tolerance`]).
const TF_RSQRT_ULPS: f64 = 1.0;

// ---------------------------------------------------------------------------
// moments.json

/// Chunks of `x` along the batch dimension (uneven: about a quarter, then up
/// to two thirds, then the rest; two chunks for a batch of two). A batch of
/// one NHWC image is cut along its spatial positions instead, which are just
/// as contiguous.
fn chunks(shape: Shape) -> Vec<(std::ops::Range<usize>, Shape)> {
    let (n, s, c) = (shape.batch, shape.spatial, shape.channels);
    type Make = fn(usize, usize, usize) -> Shape;
    let (outer, inner, make): (usize, usize, Make) = match shape.layout {
        Layout::Nhwc if n == 1 => (s, c, |k, _, c| Shape::nhwc(1, k, c)),
        Layout::Nhwc => (n, s * c, |k, s, c| Shape::nhwc(k, s, c)),
        Layout::Nchw => (n, s * c, |k, s, c| Shape::nchw(k, c, s)),
    };
    let b1 = (outer / 4).max(1);
    let b2 = (outer * 2 / 3).max(b1 + 1).min(outer);
    let mut cuts = vec![0, b1, b2, outer];
    cuts.dedup();
    cuts.windows(2)
        .map(|w| (w[0] * inner..w[1] * inner, make(w[1] - w[0], s, c)))
        .collect()
}

/// One row of the ill-conditioned comparison.
struct IllRow {
    case: String,
    ours_mean: f64,
    tf_mean: f64,
    ours_var: f64,
    tf_var: f64,
    ours_var_rel: f64,
    tf_var_rel: f64,
    acc_var_rel: f64,
    tf_is_f64: bool,
}

#[test]
fn moments_match_tensorflow_and_f64_truth() {
    let mut w_mean = Worst::new("moments: mean vs f64 truth (§3 bound)");
    let mut w_var = Worst::new("moments: variance vs f64 truth (§3 bound)");
    let mut w_acc_mean = Worst::new("accumulate (2-3 chunks): mean vs f64 truth");
    let mut w_acc_var = Worst::new("accumulate (2-3 chunks): variance vs f64 truth");
    let mut w_tf_mean = Worst::new("TensorFlow's own mean vs f64 truth (§3 domain)");
    let mut w_tf_var = Worst::new("TensorFlow's own variance vs f64 truth (§3 domain)");
    let mut ill = Vec::new();

    for case in load("moments.json") {
        let case = Case(&case);
        let name = case.name().to_string();
        let shape = case.shape();
        let ch = shape.channels;
        let count = shape.batch * shape.spatial;
        let tf_is_f64 = case.dtype("x") == "float64";
        let (x, truth_mean, truth_var) = if tf_is_f64 {
            // A float64 input has no f32 kernel to compare with: TensorFlow
            // ran in float64. Round the input to f32 and hold our kernels to
            // the two-pass f64 reference of that rounded input (what
            // `reference::check_moments` does) instead of the file's truth.
            // Here 1e6 + 0.01 N(0, 1) rounds to a nearly constant f32 tensor
            // (f32 spacing at 1e6 is 0.0625), so the table row compares two
            // different problems and is printed, not asserted.
            let x: Vec<f32> = case.f64s("x").iter().map(|&v| v as f32).collect();
            let (mut m, mut v) = (vec![0.0; ch], vec![0.0; ch]);
            reference::moments(&x, shape, &mut m, &mut v);
            (x, m, v)
        } else {
            let x = case.f32s("x");
            let m = case.f64s("mean_numpy_f64_truth");
            let v = case.f64s("variance_numpy_f64_truth");
            // The crate's reference agrees with numpy's truth: checks the
            // loader and the layout mapping.
            for c in 0..ch {
                let (rm, rv) = reference::channel_moments(&x, shape, c);
                assert!(
                    (rm - m[c]).abs() <= 1e-12 * (m[c].abs() + v[c].sqrt())
                        && (rv - v[c]).abs() <= 1e-12 * v[c],
                    "{name}: reference ({rm}, {rv}) vs numpy ({}, {})",
                    m[c],
                    v[c]
                );
            }
            (x, m, v)
        };
        let tf_mean = case.f64s("mean");
        let tf_var = case.f64s("variance");
        if !tf_is_f64 {
            // TensorFlow's float32 moments against the same bounds, inside
            // the domain crate docs §3 promises (|mean| <= 1e4 σ): the premise of
            // the Keras tolerance below (Keras 3 takes its batch statistics
            // from tf.nn.moments).
            for c in 0..ch {
                let (m, v) = (truth_mean[c], truth_var[c]);
                if m.abs() <= 1e4 * v.sqrt() {
                    w_tf_mean.check(tf_mean[c], m, mean_tol(m, v), || format!("{name}[{c}]"));
                    w_tf_var.check(tf_var[c], v, var_tol(m, v), || format!("{name}[{c}]"));
                }
            }
        }

        let mut row = IllRow {
            case: name.clone(),
            ours_mean: 0.0,
            tf_mean: max_abs_diff(tf_mean.iter().copied(), case.f64s("mean_numpy_f64_truth")),
            ours_var: 0.0,
            tf_var: max_abs_diff(
                tf_var.iter().copied(),
                case.f64s("variance_numpy_f64_truth"),
            ),
            ours_var_rel: 0.0,
            tf_var_rel: 0.0,
            acc_var_rel: 0.0,
            tf_is_f64,
        };
        let truth_v = case.f64s("variance_numpy_f64_truth");
        row.tf_var_rel = tf_var
            .iter()
            .zip(&truth_v)
            .map(|(&g, &v)| rel(g, v))
            .fold(0.0, f64::max);

        for simd in Simd::ALL {
            let at = |c: usize| {
                let name = &name;
                move || format!("{name}[{c}] {simd:?}")
            };
            let (mut mean, mut var) = (vec![f32::NAN; ch], vec![f32::NAN; ch]);
            simd.moments(&x, shape, &mut mean, &mut var).unwrap();
            if let Err(e) = reference::check_moments(&x, shape, &mean, &var) {
                panic!("{name} {simd:?}: {e}");
            }
            for c in 0..ch {
                let (m, v) = (truth_mean[c], truth_var[c]);
                w_mean.check(mean[c] as f64, m, mean_tol(m, v), at(c));
                w_var.check(var[c] as f64, v, var_tol(m, v), at(c));
            }
            row.ours_mean = row.ours_mean.max(max_abs_diff(
                mean.iter().map(|&v| v as f64),
                truth_mean.clone(),
            ));
            row.ours_var = row.ours_var.max(max_abs_diff(
                var.iter().map(|&v| v as f64),
                truth_var.clone(),
            ));
            for c in 0..ch {
                row.ours_var_rel = row.ours_var_rel.max(rel(var[c] as f64, truth_var[c]));
            }

            // The same batch streamed through `accumulate` in chunks along
            // the batch dimension: the merged records give the moments of
            // the whole batch within the same bounds, on every case (the
            // records are f64, as the kernel's own state; with f32 records
            // the 1e6 + N(0, 1) case was 7.8x over the variance bound).
            let mut rec = vec![Moments::EMPTY; ch];
            for (range, sub) in chunks(shape) {
                simd.accumulate(&x[range], sub, &mut rec).unwrap();
            }
            for c in 0..ch {
                let (m, v) = (truth_mean[c], truth_var[c]);
                assert_eq!(rec[c].count, count as u64, "{name} {simd:?}");
                let am = rec[c].mean().unwrap() as f64;
                let av = rec[c].variance(Variance::Population).unwrap() as f64;
                w_acc_mean.check(am, m, mean_tol(m, v), at(c));
                w_acc_var.check(av, v, var_tol(m, v), at(c));
                row.acc_var_rel = row.acc_var_rel.max(rel(av, v));
            }
        }
        if name.starts_with("ill_conditioned") {
            ill.push(row);
        }
    }

    eprintln!("\nmoments.json (12 cases x {} widths)", Simd::ALL.len());
    for w in [
        &w_mean,
        &w_var,
        &w_acc_mean,
        &w_acc_var,
        &w_tf_mean,
        &w_tf_var,
    ] {
        w.report();
    }
    eprintln!(
        "\nill-conditioned moments: max over channels (and our widths) of the error vs the f64 truth"
    );
    eprintln!(
        "  {:<46} {:>10} {:>10} {:>10} {:>10} {:>9} {:>9} {:>9}",
        "case", "mean ours", "mean TF", "var ours", "var TF", "rel ours", "rel TF", "rel acc"
    );
    for r in &ill {
        eprintln!(
            "  {:<46} {:>10.3e} {:>10.3e} {:>10.3e} {:>10.3e} {:>9.2e} {:>9.2e} {:>9.2e}{}",
            r.case,
            r.ours_mean,
            r.tf_mean,
            r.ours_var,
            r.tf_var,
            r.ours_var_rel,
            r.tf_var_rel,
            r.acc_var_rel,
            if r.tf_is_f64 {
                "  (TF in float64; ours: the input rounded to f32, vs its own f64 reference)"
            } else {
                ""
            }
        );
        if !r.tf_is_f64 {
            assert!(
                r.ours_mean <= r.tf_mean && r.ours_var <= r.tf_var,
                "{}: ours is worse than TensorFlow's float32 moments",
                r.case
            );
        }
    }
}

/// Relative error of `got` against `want` (0 for an exact 0).
fn rel(got: f64, want: f64) -> f64 {
    if got == want {
        0.0
    } else {
        (got - want).abs() / want.abs()
    }
}

// ---------------------------------------------------------------------------
// normalize.json

#[test]
fn normalize_matches_tensorflow() {
    let mut w_ref = Worst::new("normalize (all 4 paths) vs f64 reference (§3 bound)");
    let mut w_tf = Worst::new("normalize (all 4 paths) vs TF y (2x§3 + 1 ulp of TF's a)");
    let mut tf_own = 0.0f64;
    for case in load("normalize.json") {
        let case = Case(&case);
        let name = case.name().to_string();
        let shape = case.shape();
        let x = case.f32s("x");
        let (mean, variance) = (case.f32s("mean"), case.f32s("variance"));
        let scale = case.opt_f32s("scale");
        let offset = case.opt_f32s("offset");
        let eps = number(case.param("variance_epsilon")) as f32;
        let tf_y = case.f32s("y");
        let p = Params {
            mean: &mean,
            variance: &variance,
            scale: scale.as_deref(),
            offset: offset.as_deref(),
            epsilon: eps,
            activation: Activation::None,
        };
        let mut want = vec![0.0; x.len()];
        reference::normalize(&x, shape, &p, &mut want);
        let (mut ref_bound, mut tf_bound) = (vec![0.0; x.len()], vec![0.0; x.len()]);
        each_element(shape, |i, c| {
            let sc = scale.as_ref().map_or(1.0, |s| s[c]);
            let of = offset.as_ref().map_or(0.0, |o| o[c]);
            let (a, _) = reference::fold(mean[c], variance[c], sc, of, eps);
            ref_bound[i] = reference::normalize_bound(x[i], mean[c], a, of) + half_ulp(want[i]);
            tf_bound[i] = framework_tolerance(x[i], mean[c], a, of, TF_RSQRT_ULPS);
            let own = reference::normalize_bound(x[i], mean[c], a, of);
            tf_own = tf_own.max((want[i] - tf_y[i] as f64).abs() / own);
        });
        let c = shape.channels;
        let (mut a, mut b) = (vec![0.0; c], vec![0.0; c]);
        batchnorm::fold(
            &mean,
            &variance,
            scale.as_deref(),
            offset.as_deref(),
            eps,
            &mut a,
            &mut b,
        )
        .unwrap();
        for simd in Simd::ALL {
            let mut outputs = Vec::new();
            let mut y = vec![f32::NAN; x.len()];
            simd.normalize(&x, &mut y, shape, &p).unwrap();
            outputs.push(("normalize", y));
            let mut y = x.clone();
            simd.normalize_in_place(&mut y, shape, &p).unwrap();
            outputs.push(("normalize_in_place", y));
            let mut y = vec![f32::NAN; x.len()];
            simd.affine(&x, &mut y, shape, &a, &b, Activation::None)
                .unwrap();
            outputs.push(("fold+affine", y));
            let mut y = x.clone();
            simd.affine_in_place(&mut y, shape, &a, &b, Activation::None)
                .unwrap();
            outputs.push(("fold+affine_in_place", y));
            for (path, y) in &outputs {
                if let Err(e) = reference::check_normalize(&x, shape, &p, y) {
                    panic!("{name} {simd:?} {path}: {e}");
                }
                for i in 0..x.len() {
                    let at = || format!("{name}[{i}] {simd:?} {path}");
                    w_ref.check(y[i] as f64, want[i], ref_bound[i], at);
                    w_tf.check(y[i] as f64, tf_y[i] as f64, tf_bound[i], at);
                }
            }
        }
    }
    eprintln!("\nnormalize.json (10 cases x {} widths)", Simd::ALL.len());
    w_ref.report();
    w_tf.report();
    eprintln!(
        "  {:<58} max error/bound {tf_own:.3}",
        "TF's own y vs f64 reference (1x§3: the premise)"
    );
}

// ---------------------------------------------------------------------------
// Layers: keras_train.json and ort.json (training mode)

/// The layer under test, so that the same checks run through
/// `BatchNorm::train`, `BatchNorm::train_in_place` and `BatchNormArray`.
trait Layer {
    fn train(&mut self, x: &[f32], y: &mut [f32], shape: Shape);
    fn infer(&mut self, x: &[f32], y: &mut [f32], shape: Shape);
    fn batch(&self) -> (&[f32], &[f32]);
    fn moving(&self) -> (&[f32], &[f32]);
}

struct Borrowed<'a> {
    bn: BatchNorm<'a>,
    so: ScaleOffset<'a>,
    batch_mean: Vec<f32>,
    batch_variance: Vec<f32>,
    in_place: bool,
}

impl<'a> Borrowed<'a> {
    fn new(bn: BatchNorm<'a>, so: ScaleOffset<'a>, in_place: bool) -> Self {
        let c = bn.channels();
        Borrowed {
            bn,
            so,
            batch_mean: vec![0.0; c],
            batch_variance: vec![0.0; c],
            in_place,
        }
    }
}

impl Layer for Borrowed<'_> {
    fn train(&mut self, x: &[f32], y: &mut [f32], shape: Shape) {
        let mut batch = Batch {
            mean: &mut self.batch_mean,
            variance: &mut self.batch_variance,
        };
        if self.in_place {
            y.copy_from_slice(x);
            self.bn
                .train_in_place(y, shape, self.so, &mut batch)
                .unwrap();
        } else {
            self.bn.train(x, y, shape, self.so, &mut batch).unwrap();
        }
    }
    fn infer(&mut self, x: &[f32], y: &mut [f32], shape: Shape) {
        if self.in_place {
            y.copy_from_slice(x);
            self.bn.infer_in_place(y, shape, self.so).unwrap();
        } else {
            self.bn.infer(x, y, shape, self.so).unwrap();
        }
    }
    fn batch(&self) -> (&[f32], &[f32]) {
        (&self.batch_mean, &self.batch_variance)
    }
    fn moving(&self) -> (&[f32], &[f32]) {
        (self.bn.moving().mean, self.bn.moving().variance)
    }
}

impl<const C: usize> Layer for BatchNormArray<C> {
    fn train(&mut self, x: &[f32], y: &mut [f32], shape: Shape) {
        BatchNormArray::train(self, x, y, shape).unwrap();
    }
    fn infer(&mut self, x: &[f32], y: &mut [f32], shape: Shape) {
        BatchNormArray::infer(self, x, y, shape).unwrap();
    }
    fn batch(&self) -> (&[f32], &[f32]) {
        (&self.batch_mean, &self.batch_variance)
    }
    fn moving(&self) -> (&[f32], &[f32]) {
        (&self.moving_mean, &self.moving_variance)
    }
}

/// Error/bound ratios of the layer comparisons.
struct LayerWorst {
    y_ref: Worst,
    y_fw: Worst,
    moving_ref: Worst,
    moving: Worst,
    /// The moving-statistics ratio without the batch-weight term (diagnostic).
    moving_no_dw: Worst,
    /// `|ours - framework|` in units of `ε |framework|` (diagnostic).
    moving_ulps: Worst,
    infer: Worst,
}

impl LayerWorst {
    fn new(fw: &'static [&'static str; 5]) -> LayerWorst {
        LayerWorst {
            y_ref: Worst::new(fw[0]),
            y_fw: Worst::new(fw[1]),
            moving_ref: Worst::new(fw[2]),
            moving: Worst::new(fw[3]),
            moving_no_dw: Worst::new("  same without the |b| |w - w_fw| term (NOT asserted)"),
            moving_ulps: Worst::new("  |ours - fw| / (ε |fw|), in ulps-ish (NOT asserted)"),
            infer: Worst::new(fw[4]),
        }
    }

    fn report(&self, infer: bool) {
        for x in [
            &self.y_ref,
            &self.y_fw,
            &self.moving_ref,
            &self.moving,
            &self.moving_no_dw,
            &self.moving_ulps,
        ] {
            x.report();
        }
        if infer {
            self.infer.report();
        }
    }
}

/// One training step's framework outputs.
struct Step<'a> {
    x: &'a [f32],
    y: &'a [f32],
    moving_mean: &'a [f32],
    moving_variance: &'a [f32],
}

/// The fixed parts of a layer case.
struct LayerCase<'a> {
    name: &'a str,
    shape: Shape,
    config: Config,
    scale: &'a [f32],
    offset: &'a [f32],
    /// Ulps of the framework's `a` beyond correct rounding.
    a_ulps: f64,
    /// The decay and the weight the framework gives the moving and the
    /// batch statistic at a given batch number, as the framework rounds
    /// them.
    framework: &'a dyn Fn(u64) -> (f64, f64),
}

/// Training step number `batches` through `layer`, checked against the f64
/// reference and the framework's outputs. `prev` holds the moving statistics
/// both started the step from: ours, then the framework's.
fn train_step(
    k: &LayerCase<'_>,
    layer: &mut dyn Layer,
    step: &Step<'_>,
    prev: [(&[f32], &[f32]); 2],
    batches: u64,
    label: &str,
    w: &mut LayerWorst,
) {
    let shape = k.shape;
    let e = k.config.epsilon as f64;
    let mut y = vec![f32::NAN; step.x.len()];
    layer.train(step.x, &mut y, shape);
    let (bm, bv) = layer.batch();

    // Ours against the reference: batch statistics within the §3 moments
    // bounds, output within the §3 normalize bound for those statistics
    // (the moving statistics against `reference::update_moving` below).
    if let Err(err) = reference::check_moments(step.x, shape, bm, bv) {
        panic!("{label}: batch statistics: {err}");
    }
    let p = Params {
        mean: bm,
        variance: bv,
        scale: Some(k.scale),
        offset: Some(k.offset),
        epsilon: k.config.epsilon,
        activation: Activation::None,
    };
    if let Err(err) = reference::check_normalize(step.x, shape, &p, &y) {
        panic!("{label}: y: {err}");
    }
    let mut want = vec![0.0; y.len()];
    reference::normalize(step.x, shape, &p, &mut want);

    // Ours against the framework's y. Both normalize the same x with their
    // own batch statistics, each within δm = mean_tol, δv = var_tol of the
    // exact (m*, v*) (ours checked just above; Keras 3 takes its batch
    // statistics from tf.nn.moments, two-pass in f32, and ONNX Runtime
    // computes a two-pass sum in f32: both in the §3 class, and the
    // moments test checks TensorFlow's against the same bounds). Per side:
    // |y - y*| <= stats_sensitivity(δm, δv) + that side's normalize error,
    // where the latter is 4 ε (|x a| + |m a| + |offset|) (+ a_ulps ulps of a
    // for the framework, see `framework_tolerance`) with |a| <= k |a*| and
    // |m| <= |m*| + δm. The total is the sum of both sides.
    let ch = shape.channels;
    let exact: Vec<(f64, f64)> = (0..ch)
        .map(|c| reference::channel_moments(step.x, shape, c))
        .collect();
    each_element(shape, |i, c| {
        let (m, v) = exact[c];
        let tol = perturbed_tolerance(
            step.x[i] as f64,
            (m, v, mean_tol(m, v), var_tol(m, v), 2.0),
            k.scale[c] as f64,
            k.offset[c] as f64,
            e,
            k.a_ulps,
        );
        let at = || format!("{label} y[{i}]");
        w.y_ref.check(
            y[i] as f64,
            want[i],
            {
                let ab = reference::fold(bm[c], bv[c], k.scale[c], k.offset[c], k.config.epsilon).0;
                reference::normalize_bound(step.x[i], bm[c], ab, k.offset[c]) + half_ulp(want[i])
            },
            at,
        );
        w.y_fw.check(y[i] as f64, step.y[i] as f64, tol, at);
    });

    // Moving statistics. Each side computes
    // `fl(fl(M d) + fl(b w))` from its previous moving value M and its batch
    // statistic b: three roundings, at most (2u + u²)(|M d| + |b w|) from
    // the exact multiply-add of its own inputs. The inputs differ by the
    // previous step's difference |M_ours - M_fw| (known exactly: both files
    // give it; 0 at step 1, where both start from the same values, so the
    // errors compound through it over the steps) and by |b_ours - b_fw| <=
    // 2 δ (both within the §3 bound δ of the exact batch statistic), and the
    // framework's batch weight w_fw (its own rounding of 1 - momentum) may
    // differ from ours, w = 1 - d in f32:
    // |ours - fw| <= d |ΔM| + w 2δ + |b| |w - w_fw|
    //                + (2u + u²)(|M_ours d| + |b w| + |M_fw d| + |b w_fw|).
    let (mm, mv) = layer.moving();
    let d = k.config.momentum.decay(batches) as f64;
    let w_ours = k.config.momentum.weight(batches) as f64;
    let (d_fw, w_fw) = (k.framework)(batches);
    let count = (shape.batch * shape.spatial) as u64;
    // What the batch variance is scaled by before it joins the average.
    let bessel = match k.config.moving_variance {
        Variance::Sample if count > 1 => count as f64 / (count - 1) as f64,
        _ => 1.0,
    };
    // The exact factors the reference uses (`1 - d` for a decay, `1 / b` for
    // the cumulative average); ours are each rounded once to f32.
    let (d_ref, w_ref) = match k.config.momentum {
        Momentum::Decay(dd) => (dd as f64, 1.0 - dd as f64),
        Momentum::Cumulative => (1.0 - 1.0 / batches as f64, 1.0 / batches as f64),
    };
    // `fl(fl(M d) + fl(b w))`: two roundings on each term; the sample
    // variance's Bessel product is one more on `b`.
    let rounds = if bessel == 1.0 { 2.0 } else { 3.0 };
    for c in 0..ch {
        // Ours against the f64 update of our own inputs: those roundings,
        // plus the roundings of our d and w.
        let prev_ours = (prev[0].0[c], prev[0].1[c]);
        let (rm, rv) =
            reference::update_moving(prev_ours, (bm[c], bv[c]), count, batches, &k.config);
        let (d_err, w_err) = ((d - d_ref).abs(), (w_ours - w_ref).abs());
        for (what, got, want, mo, b) in [
            ("moving_mean", mm[c], rm, prev_ours.0, bm[c] as f64),
            (
                "moving_variance",
                mv[c],
                rv,
                prev_ours.1,
                bv[c] as f64 * bessel,
            ),
        ] {
            let (mo, b) = ((mo as f64).abs(), b.abs());
            let bound = (rounds * U + U * U) * (mo * d + b * w_ours) + mo * d_err + b * w_err;
            w.moving_ref
                .check(got as f64, want, bound, || format!("{label} {what}[{c}]"));
        }
        let (m, v) = exact[c];
        let pairs = [
            (
                "moving_mean",
                mm[c],
                step.moving_mean[c],
                prev[0].0[c],
                prev[1].0[c],
                m,
                mean_tol(m, v),
            ),
            (
                "moving_variance",
                mv[c],
                step.moving_variance[c],
                prev[0].1[c],
                prev[1].1[c],
                v * bessel,
                var_tol(m, v) * bessel,
            ),
        ];
        for (what, ours, fw, m_ours, m_fw, b, db) in pairs {
            let (m_ours, m_fw) = (m_ours as f64, m_fw as f64);
            let b_abs = b.abs() + db;
            let round = (rounds * U + U * U)
                * (m_ours.abs() * d + b_abs * w_ours + m_fw.abs() * d_fw + b_abs * w_fw);
            let dw = b_abs * (w_ours - w_fw).abs() + m_fw.abs() * (d - d_fw).abs();
            let tol = d * (m_ours - m_fw).abs() + w_ours * 2.0 * db + dw + round;
            let at = || format!("{label} {what}[{c}]");
            w.moving.check(ours as f64, fw as f64, tol, at);
            let err = (ours as f64 - fw as f64).abs();
            w.moving_no_dw.observe(err / (tol - dw), at);
            let ulp = (fw.abs() as f64) * EPS;
            w.moving_ulps.observe(err / ulp.max(f64::MIN_POSITIVE), at);
        }
    }
}

/// Inference with the moving statistics both sides ended with: they differ
/// by exactly known `Δm`, `Δv`, so `|ours - fw| <= stats_sensitivity(Δm,
/// Δv)` around the framework's statistics plus both normalize errors.
fn infer_step(
    k: &LayerCase<'_>,
    layer: &mut dyn Layer,
    x: &[f32],
    fw_y: &[f32],
    fw_moving: (&[f32], &[f32]),
    label: &str,
    w: &mut LayerWorst,
) {
    let shape = k.shape;
    let e = k.config.epsilon as f64;
    let mut y = vec![f32::NAN; x.len()];
    layer.infer(x, &mut y, shape);
    let (mm, mv) = layer.moving();
    let p = Params {
        mean: mm,
        variance: mv,
        scale: Some(k.scale),
        offset: Some(k.offset),
        epsilon: k.config.epsilon,
        activation: Activation::None,
    };
    if let Err(err) = reference::check_normalize(x, shape, &p, &y) {
        panic!("{label}: infer: {err}");
    }
    each_element(shape, |i, c| {
        let (m, v) = (fw_moving.0[c] as f64, fw_moving.1[c] as f64);
        let dm = (mm[c] as f64 - m).abs();
        let dv = (mv[c] as f64 - v).abs();
        let tol = perturbed_tolerance(
            x[i] as f64,
            (m, v, dm, dv, 1.0),
            k.scale[c] as f64,
            k.offset[c] as f64,
            e,
            k.a_ulps,
        );
        w.infer.check(y[i] as f64, fw_y[i] as f64, tol, || {
            format!("{label} y_infer[{i}]")
        });
    });
}

#[test]
fn keras_training_and_inference() {
    let mut w = LayerWorst::new(&[
        "keras: y_train vs f64 reference (§3, our batch stats)",
        "keras: y_train vs Keras (propagated §3 bounds)",
        "keras: moving stats vs f64 update of our inputs",
        "keras: moving mean/variance vs Keras",
        "keras: y_infer vs Keras",
    ]);
    let mut array_cases = 0;
    for case in load("keras_train.json") {
        let case = Case(&case);
        let name = case.name().to_string();
        let shape = case.shape();
        let momentum = number(case.param("momentum"));
        let eps = number(case.param("epsilon"));
        let config = Config {
            momentum: Momentum::Decay(momentum as f32),
            ..Config::keras().with_epsilon(eps as f32)
        };
        if case.0["params"]["constructor_kwargs"]
            .as_object()
            .is_some_and(|o| o.is_empty())
        {
            assert_eq!(config, Config::keras(), "{name}: Keras defaults");
        }
        let (gamma, beta) = (case.f32s("gamma"), case.f32s("beta"));
        let (init_m, init_v) = (
            case.f32s("moving_mean_init"),
            case.f32s("moving_variance_init"),
        );
        let steps: Vec<[Vec<f32>; 4]> = (1..=3)
            .map(|s| {
                [
                    case.f32s(&format!("x_step{s}")),
                    case.f32s(&format!("y_step{s}")),
                    case.f32s(&format!("moving_mean_step{s}")),
                    case.f32s(&format!("moving_variance_step{s}")),
                ]
            })
            .collect();
        let (x_infer, y_infer) = (case.f32s("x_infer"), case.f32s("y_infer"));
        let k = LayerCase {
            name: &name,
            shape,
            config,
            scale: &gamma,
            offset: &beta,
            a_ulps: TF_RSQRT_ULPS,
            // Keras: `moving * momentum + batch * (1.0 - momentum)` with a
            // Python float momentum: 1 - momentum is taken in f64, then
            // rounded to f32 by the tensor product.
            framework: &|_| (momentum as f32 as f64, (1.0 - momentum) as f32 as f64),
        };

        let run = |layer: &mut dyn Layer, label: &str, w: &mut LayerWorst| {
            let mut prev_ours = (init_m.clone(), init_v.clone());
            let mut prev_fw = (init_m.clone(), init_v.clone());
            for (s, [x, y, mm, mv]) in steps.iter().enumerate() {
                let step = Step {
                    x,
                    y,
                    moving_mean: mm,
                    moving_variance: mv,
                };
                train_step(
                    &k,
                    layer,
                    &step,
                    [(&prev_ours.0, &prev_ours.1), (&prev_fw.0, &prev_fw.1)],
                    s as u64 + 1,
                    &format!("{label} step {}", s + 1),
                    w,
                );
                prev_ours = (layer.moving().0.to_vec(), layer.moving().1.to_vec());
                prev_fw = (mm.clone(), mv.clone());
            }
            let last = &steps[2];
            infer_step(
                &k,
                layer,
                &x_infer,
                &y_infer,
                (&last[2], &last[3]),
                label,
                w,
            );
        };

        for simd in Simd::ALL {
            for in_place in [false, true] {
                let (mut mm, mut mv) = (init_m.clone(), init_v.clone());
                let moving = MovingStats {
                    mean: &mut mm,
                    variance: &mut mv,
                    batches: 0,
                };
                let bn = BatchNorm::new(config, moving).unwrap().with_simd(simd);
                let mut layer = Borrowed::new(bn, ScaleOffset::new(&gamma, &beta), in_place);
                let how = if in_place { "train_in_place" } else { "train" };
                run(&mut layer, &format!("{name} {simd:?} {how}"), &mut w);
            }
        }
        if shape.channels == 4 {
            // The owned twin, with C fixed at compile time.
            let mut arr = BatchNormArray::<4>::new(config);
            arr.scale.copy_from_slice(&gamma);
            arr.offset.copy_from_slice(&beta);
            arr.moving_mean.copy_from_slice(&init_m);
            arr.moving_variance.copy_from_slice(&init_v);
            run(&mut arr, &format!("{name} BatchNormArray<4>"), &mut w);
            assert_eq!(arr.batches, 3);
            array_cases += 1;
        }
    }
    assert_eq!(array_cases, 1, "one case goes through BatchNormArray");
    eprintln!(
        "\nkeras_train.json (3 cases x {} widths x train/train_in_place, + BatchNormArray<4>)",
        Simd::ALL.len()
    );
    w.report(true);
}

// ---------------------------------------------------------------------------
// ort.json

#[test]
fn onnx_runtime_inference_and_training() {
    let mut w_ref = Worst::new("ort inference: Y vs f64 reference (§3)");
    let mut w_inf = Worst::new("ort inference: Y vs ORT (2x§3)");
    let mut ort_own = Worst::new("ORT's own Y vs f64 reference (1x§3: the premise)");
    let mut w = LayerWorst::new(&[
        "ort training: Y vs f64 reference (§3, our batch stats)",
        "ort training: Y vs ORT (propagated §3 bounds)",
        "ort training: running stats vs f64 update of our inputs",
        "ort training: running mean/var vs ORT",
        "",
    ]);
    let (mut n_inf, mut n_train) = (0, 0);
    for case in load("ort.json") {
        let case = Case(&case);
        let name = case.name().to_string();
        let shape = case.shape();
        assert_eq!(shape.layout, Layout::Nchw, "{name}");
        let attrs = &case.0["params"]["attributes"];
        let eps = number(case.param("epsilon_effective_float32")) as f32;
        if attrs.get("epsilon").is_none() {
            assert_eq!(eps, Config::onnx().epsilon, "{name}: ONNX default epsilon");
        }
        let x = case.f32s("X");
        let (scale, bias) = (case.f32s("scale"), case.f32s("B"));
        let (in_mean, in_var) = (case.f32s("input_mean"), case.f32s("input_var"));
        let ort_y = case.f32s("Y");
        assert_eq!(x.len(), case.len());
        // ONNX Runtime folds with correctly rounded f32 operations
        // (`inv_std = (var + eps).sqrt().inverse()`, `new_scale = inv_std *
        // scale`, `new_bias = B - mean * new_scale`, `Y = X * new_scale +
        // new_bias`), so no extra ulps of a (see `framework_tolerance`).
        let a_ulps = 0.0;

        if case.param("training_mode").as_i64() == Some(0) {
            n_inf += 1;
            let p = Params {
                mean: &in_mean,
                variance: &in_var,
                scale: Some(&scale),
                offset: Some(&bias),
                epsilon: eps,
                activation: Activation::None,
            };
            let mut want = vec![0.0; x.len()];
            reference::normalize(&x, shape, &p, &mut want);
            each_element(shape, |i, c| {
                let (a, _) = reference::fold(in_mean[c], in_var[c], scale[c], bias[c], eps);
                let own = reference::normalize_bound(x[i], in_mean[c], a, bias[c]);
                ort_own.observe((ort_y[i] as f64 - want[i]).abs() / own, || {
                    format!("{name}[{i}]")
                });
            });
            for simd in Simd::ALL {
                let mut y = vec![f32::NAN; x.len()];
                simd.normalize(&x, &mut y, shape, &p).unwrap();
                if let Err(e) = reference::check_normalize(&x, shape, &p, &y) {
                    panic!("{name} {simd:?}: {e}");
                }
                each_element(shape, |i, c| {
                    let (a, _) = reference::fold(in_mean[c], in_var[c], scale[c], bias[c], eps);
                    let at = || format!("{name}[{i}] {simd:?}");
                    w_ref.check(
                        y[i] as f64,
                        want[i],
                        reference::normalize_bound(x[i], in_mean[c], a, bias[c])
                            + half_ulp(want[i]),
                        at,
                    );
                    w_inf.check(
                        y[i] as f64,
                        ort_y[i] as f64,
                        framework_tolerance(x[i], in_mean[c], a, bias[c], a_ulps),
                        at,
                    );
                });
            }
        } else {
            n_train += 1;
            let momentum = number(case.param("momentum_effective_float32")) as f32;
            let mut config = Config::onnx().with_epsilon(eps);
            if attrs.get("momentum").is_none() {
                assert_eq!(
                    Momentum::Decay(momentum),
                    config.momentum,
                    "{name}: ONNX default momentum"
                );
            }
            config.momentum = Momentum::Decay(momentum);
            let k = LayerCase {
                name: &name,
                shape,
                config,
                scale: &scale,
                offset: &bias,
                a_ulps,
                // ONNX Runtime: `momentum` is a float attribute and
                // `1 - momentum` is computed in f32, like ours.
                framework: &|_| (momentum as f64, (1.0 - momentum) as f64),
            };
            let (rm, rv) = (case.f32s("running_mean"), case.f32s("running_var"));
            for simd in Simd::ALL {
                let (mut mm, mut mv) = (in_mean.clone(), in_var.clone());
                let moving = MovingStats {
                    mean: &mut mm,
                    variance: &mut mv,
                    batches: 0,
                };
                let bn = BatchNorm::new(config, moving).unwrap().with_simd(simd);
                let mut layer = Borrowed::new(bn, ScaleOffset::new(&scale, &bias), false);
                let step = Step {
                    x: &x,
                    y: &ort_y,
                    moving_mean: &rm,
                    moving_variance: &rv,
                };
                train_step(
                    &k,
                    &mut layer,
                    &step,
                    [(&in_mean, &in_var), (&in_mean, &in_var)],
                    1,
                    &format!("{} {simd:?}", k.name),
                    &mut w,
                );
            }
        }
    }
    assert_eq!((n_inf, n_train), (3, 2));
    eprintln!(
        "\nort.json (3 inference + 2 training cases x {} widths)",
        Simd::ALL.len()
    );
    w_ref.report();
    w_inf.report();
    ort_own.report();
    w.report(false);
}

// ---------------------------------------------------------------------------
// PyTorch: pytorch_train.json, through one long-lived layer

/// `torch.nn.BatchNorm2d` in training mode for several steps (momentum 0.1,
/// and `momentum=None`, the cumulative average), then eval: one
/// [`BatchNorm`] per width lives across all steps, so its count of batches
/// seen drives the cumulative factor as PyTorch's `num_batches_tracked`
/// does. PyTorch updates the running statistics in double with a double
/// momentum (`1 / num_batches_tracked` for `None`) and rounds once.
#[test]
fn pytorch_training_through_one_layer() {
    let mut w = LayerWorst::new(&[
        "PyTorch: y vs f64 reference (§3 for our stats)",
        "PyTorch: y vs framework",
        "PyTorch: moving stats vs f64 update",
        "PyTorch: moving stats vs framework",
        "PyTorch: infer vs framework",
    ]);
    let mut cases = 0;
    for case in load("pytorch_train.json") {
        let case = Case(&case);
        let name = case.name().to_string();
        let shape = case.shape();
        let eps = number(case.param("epsilon")) as f32;
        let momentum = case.param("momentum").as_f64();
        let config = Config::pytorch_momentum(momentum.map(|m| m as f32)).with_epsilon(eps);
        if momentum == Some(0.1) {
            assert_eq!(config, Config::pytorch(), "{name}: PyTorch defaults");
        }
        // This file lists plain float32 values (no dtype table).
        let f32s = |v: &Value| -> Vec<f32> {
            let v = v.as_array().expect("list");
            v.iter().map(|n| number(n) as f32).collect()
        };
        let (scale, offset) = (
            f32s(&case.0["inputs"]["scale"]),
            f32s(&case.0["inputs"]["offset"]),
        );
        let xs: Vec<Vec<f32>> = case.0["inputs"]["x_steps"]
            .as_array()
            .expect("x_steps")
            .iter()
            .map(f32s)
            .collect();
        let outs = case.0["outputs"]["steps"].as_array().expect("steps");
        assert_eq!(xs.len(), outs.len());
        let steps: Vec<[Vec<f32>; 3]> = outs
            .iter()
            .map(|o| {
                [
                    f32s(&o["y"]),
                    f32s(&o["running_mean"]),
                    f32s(&o["running_var"]),
                ]
            })
            .collect();
        let x_eval = f32s(&case.0["inputs"]["x_eval"]);
        let y_eval = f32s(&case.0["outputs"]["y_eval"]);
        let framework = |b: u64| match momentum {
            Some(m) => (1.0 - m, m),
            None => (1.0 - 1.0 / b as f64, 1.0 / b as f64),
        };
        let k = LayerCase {
            name: &name,
            shape,
            config,
            scale: &scale,
            offset: &offset,
            a_ulps: TF_RSQRT_ULPS,
            framework: &framework,
        };
        let c = shape.channels;
        for simd in Simd::ALL {
            let (mut mm, mut mv) = (vec![0.0f32; c], vec![1.0f32; c]);
            let moving = MovingStats {
                mean: &mut mm,
                variance: &mut mv,
                batches: 0,
            };
            let bn = BatchNorm::new(config, moving).unwrap().with_simd(simd);
            let mut layer = Borrowed::new(bn, ScaleOffset::new(&scale, &offset), false);
            let mut prev_ours = (vec![0.0f32; c], vec![1.0f32; c]);
            let mut prev_fw = prev_ours.clone();
            for (s, (x, [y, rm, rv])) in xs.iter().zip(&steps).enumerate() {
                let step = Step {
                    x,
                    y,
                    moving_mean: rm,
                    moving_variance: rv,
                };
                train_step(
                    &k,
                    &mut layer,
                    &step,
                    [(&prev_ours.0, &prev_ours.1), (&prev_fw.0, &prev_fw.1)],
                    s as u64 + 1,
                    &format!("{name} {simd:?} step {}", s + 1),
                    &mut w,
                );
                let tracked = outs[s]["num_batches_tracked"].as_u64().expect("count");
                assert_eq!(layer.bn.moving().batches, tracked, "{name}");
                prev_ours = (layer.moving().0.to_vec(), layer.moving().1.to_vec());
                prev_fw = (rm.clone(), rv.clone());
            }
            infer_step(
                &k,
                &mut layer,
                &x_eval,
                &y_eval,
                (&prev_fw.0, &prev_fw.1),
                &format!("{name} {simd:?}"),
                &mut w,
            );
        }
        cases += 1;
    }
    assert_eq!(cases, 2);
    eprintln!(
        "\npytorch_train.json (2 cases x {} widths)",
        Simd::ALL.len()
    );
    w.report(true);
}
