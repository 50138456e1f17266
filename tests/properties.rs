//! quickcheck properties of the moments and normalization kernels, each
//! against the naive `f64` reference or an algebraic identity.
mod common;

use batchnorm::{reference, Activation, Layout, Moments, Params, Shape, Simd, Variance};
use quickcheck::{Arbitrary, Gen, QuickCheck, TestResult};

/// A random tensor: any width, layout and small shape, channels drawn around
/// their own offsets (some large, to exercise cancellation).
#[derive(Clone, Debug)]
struct Case {
    simd: Simd,
    shape: Shape,
    x: Vec<f32>,
}

impl Arbitrary for Case {
    fn arbitrary(g: &mut Gen) -> Case {
        let simd = *g.choose(&Simd::ALL).unwrap();
        let n = 1 + usize::arbitrary(g) % 9;
        let s = 1 + usize::arbitrary(g) % 40;
        let c = 1 + usize::arbitrary(g) % 40;
        let shape = if bool::arbitrary(g) {
            Shape::nhwc(n, s, c)
        } else {
            Shape::nchw(n, c, s)
        };
        let offsets = [0.0, 1.0, -50.0, 1e4, 3e5];
        let mut rng = common::Rng::new(u64::arbitrary(g));
        let means: Vec<f64> = (0..c)
            .map(|_| *g.choose(&offsets).unwrap() * rng.normal())
            .collect();
        let sds: Vec<f64> = (0..c)
            .map(|_| 10f64.powf(rng.uniform() * 4.0 - 2.0))
            .collect();
        let x = common::channel_data(&mut rng, shape, &means, &sds);
        Case { simd, shape, x }
    }
}

fn qc<A: quickcheck::Testable>(prop: A) {
    QuickCheck::new().tests(300).quickcheck(prop);
}

fn run_moments(simd: Simd, x: &[f32], shape: Shape) -> (Vec<f32>, Vec<f32>) {
    let mut m = vec![0.0; shape.channels];
    let mut v = vec![0.0; shape.channels];
    simd.moments(x, shape, &mut m, &mut v).unwrap();
    (m, v)
}

fn records(simd: Simd, x: &[f32], shape: Shape) -> Vec<Moments> {
    let mut r = vec![Moments::EMPTY; shape.channels];
    simd.accumulate(x, shape, &mut r).unwrap();
    r
}

/// The record's mean and variance within the crate docs' §3 bounds of the
/// reference `(mean, var)`, plus half an ulp of each for the `f32` result a
/// caller takes from them. Records keep `f64` state, so merged records are
/// held to the bounds on the whole domain.
fn close(m: &Moments, mean: f64, var: f64) -> bool {
    let got_v = m.variance(Variance::Population).unwrap();
    let half = |r: f64| (r as f32 as f64 - r).abs();
    reference::compare(
        "mean",
        0,
        m.mean,
        mean,
        reference::mean_bound(mean, var) + half(mean),
    )
    .is_ok()
        && reference::compare(
            "var",
            0,
            got_v,
            var,
            reference::variance_rel_bound(mean, var) * var + half(var),
        )
        .is_ok()
}

#[test]
fn qc_moments_matches_naive() {
    fn prop(k: Case) -> bool {
        let (m, v) = run_moments(k.simd, &k.x, k.shape);
        reference::check_moments(&k.x, k.shape, &m, &v).is_ok()
    }
    qc(prop as fn(Case) -> bool);
}

#[test]
fn qc_accumulate_chunked_matches_one_pass() {
    fn prop(k: Case, cuts: Vec<u8>) -> bool {
        // Split along the batch axis (the only axis along which a tensor
        // splits into tensors of the same layout).
        let per = k.shape.len().unwrap() / k.shape.batch;
        let mut bounds: Vec<usize> = cuts
            .iter()
            .map(|&b| b as usize % (k.shape.batch + 1))
            .collect();
        bounds.extend([0, k.shape.batch]);
        bounds.sort_unstable();
        let mut rec = vec![Moments::EMPTY; k.shape.channels];
        for w in bounds.windows(2) {
            let part = Shape {
                batch: w[1] - w[0],
                ..k.shape
            };
            k.simd
                .accumulate(&k.x[w[0] * per..w[1] * per], part, &mut rec)
                .unwrap();
        }
        (0..k.shape.channels).all(|c| {
            let (mean, var) = reference::channel_moments(&k.x, k.shape, c);
            rec[c].count == (k.shape.batch * k.shape.spatial) as u64 && close(&rec[c], mean, var)
        })
    }
    qc(prop as fn(Case, Vec<u8>) -> bool);
}

/// Splits `k` along the batch axis into three records per channel.
fn thirds(k: &Case) -> Option<[Vec<Moments>; 3]> {
    let n = k.shape.batch;
    if n < 3 {
        return None;
    }
    let per = k.shape.len().unwrap() / n;
    let cut = [0, n / 3, 2 * n / 3, n];
    Some(core::array::from_fn(|i| {
        let part = Shape {
            batch: cut[i + 1] - cut[i],
            ..k.shape
        };
        records(k.simd, &k.x[cut[i] * per..cut[i + 1] * per], part)
    }))
}

#[test]
fn qc_merge_commutative_and_associative() {
    fn prop(k: Case) -> TestResult {
        let Some([a, b, c]) = thirds(&k) else {
            return TestResult::discard();
        };
        for ch in 0..k.shape.channels {
            // Commutative and associative within the bounds: every order of
            // merging lands within them of the one-pass reference.
            let ab = a[ch].merge(b[ch]).unwrap();
            let ba = b[ch].merge(a[ch]).unwrap();
            let (mean, var) = reference::channel_moments(&k.x, k.shape, ch);
            let left = ab.merge(c[ch]).unwrap();
            let right = a[ch].merge(b[ch].merge(c[ch]).unwrap()).unwrap();
            let orders = [left, ba.merge(c[ch]).unwrap(), right];
            if !orders.iter().all(|m| close(m, mean, var)) || left.count != right.count {
                return TestResult::failed();
            }
        }
        TestResult::passed()
    }
    qc(prop as fn(Case) -> TestResult);
}

#[test]
fn qc_row_permutation_gives_same_moments() {
    fn prop(k: Case, seed: u64) -> bool {
        // Permute whole (n, s) positions: every channel keeps its multiset.
        let shape = k.shape;
        let count = shape.batch * shape.spatial;
        let mut order: Vec<usize> = (0..count).collect();
        let mut rng = common::Rng::new(seed);
        for i in (1..count).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut y = vec![0.0; k.x.len()];
        for (to, &from) in order.iter().enumerate() {
            for c in 0..shape.channels {
                let (tn, ts) = (to / shape.spatial, to % shape.spatial);
                let (fnn, fs) = (from / shape.spatial, from % shape.spatial);
                y[reference::index(shape, tn, ts, c)] = k.x[reference::index(shape, fnn, fs, c)];
            }
        }
        let (m1, v1) = run_moments(k.simd, &k.x, shape);
        let (m2, v2) = run_moments(k.simd, &y, shape);
        // Both are within the §3 bounds of the same reference, so within
        // twice the bound of each other.
        (0..shape.channels).all(|c| {
            let (mean, var) = reference::channel_moments(&k.x, shape, c);
            let mb = 2.0 * (reference::mean_bound(mean, var) + (mean as f32 as f64 - mean).abs());
            let vb = 2.0
                * (reference::variance_rel_bound(mean, var) * var
                    + (var as f32 as f64 - var).abs());
            ((m1[c] - m2[c]).abs() as f64) <= mb && ((v1[c] - v2[c]).abs() as f64) <= vb
        })
    }
    qc(prop as fn(Case, u64) -> bool);
}

#[test]
fn qc_affine_transform_of_input() {
    fn prop(k: Case, e: i8, t: i16) -> bool {
        // x * s + t with s a power of two: the scaling is exact, so the
        // kernel must return exactly mean * s and var * s² for t = 0 ...
        let s = 2f32.powi((e % 8) as i32);
        let scaled: Vec<f32> = k.x.iter().map(|v| v * s).collect();
        let (m, v) = run_moments(k.simd, &k.x, k.shape);
        let (ms, vs) = run_moments(k.simd, &scaled, k.shape);
        let exact = (0..k.shape.channels).all(|c| ms[c] == m[c] * s && vs[c] == v[c] * s * s);
        // ... and, with a shift, moments within the §3 bounds of the
        // reference moments of the transformed data.
        let t = t as f32;
        let moved: Vec<f32> = k.x.iter().map(|v| v * s + t).collect();
        let (mm, vm) = run_moments(k.simd, &moved, k.shape);
        exact && reference::check_moments(&moved, k.shape, &mm, &vm).is_ok()
    }
    qc(prop as fn(Case, i8, i16) -> bool);
}

#[test]
fn qc_normalize_matches_naive() {
    fn prop(k: Case, act: u8, eps_pick: bool) -> bool {
        let c = k.shape.channels;
        let (m, v) = run_moments(k.simd, &k.x, k.shape);
        let scale: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.25).collect();
        let offset: Vec<f32> = (0..c).map(|i| i as f32 - 3.0).collect();
        let activation = [
            Activation::None,
            Activation::Relu,
            Activation::Relu6,
            Activation::Clamp {
                min: -1.0,
                max: 2.0,
            },
        ][act as usize % 4];
        let p = Params {
            mean: &m,
            variance: &v,
            scale: Some(&scale),
            offset: Some(&offset),
            epsilon: if eps_pick { 1e-3 } else { 1e-5 },
            activation,
        };
        let mut y = vec![0.0; k.x.len()];
        k.simd.normalize(&k.x, &mut y, k.shape, &p).unwrap();
        reference::check_normalize(&k.x, k.shape, &p, &y).is_ok()
    }
    qc(prop as fn(Case, u8, bool) -> bool);
}

#[test]
fn layouts_agree() {
    // The same data in NHWC and NCHW gives the same statistics.
    let mut rng = common::Rng::new(5);
    for simd in Simd::ALL {
        for (n, s, c) in [(3, 5, 7), (2, 17, 3), (4, 1, 33), (1, 64, 16)] {
            let nhwc = Shape::nhwc(n, s, c);
            let nchw = Shape::nchw(n, c, s);
            let x = common::channel_data(&mut rng, nhwc, &[3.0, -1.0], &[1.0, 2.0]);
            let mut t = vec![0.0; x.len()];
            for i in 0..n {
                for j in 0..s {
                    for k in 0..c {
                        t[reference::index(nchw, i, j, k)] = x[reference::index(nhwc, i, j, k)];
                    }
                }
            }
            assert_eq!(nchw.layout, Layout::Nchw);
            let (m1, v1) = run_moments(simd, &x, nhwc);
            let (m2, v2) = run_moments(simd, &t, nchw);
            reference::check_moments(&x, nhwc, &m2, &v2).unwrap();
            reference::check_moments(&t, nchw, &m1, &v1).unwrap();
        }
    }
}
