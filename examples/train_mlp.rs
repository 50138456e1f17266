//! On-device training of a small model, then deployment with batch norm
//! folded away: `cargo run --release --example train_mlp`.
//!
//! The model is `dense (8 -> 16, no bias) -> batch norm (+ fused ReLU) ->
//! dense (16 -> 1)`, trained with plain SGD on a regression target it
//! generates (`t = sin(x0) + x1 * x2 + 0.5 x3²`, inputs with per-feature
//! offsets and scales so the hidden pre-activations are far from zero mean).
//! Every step: the dense forward, one `BatchNorm::train` (batch moments,
//! normalize, ReLU, moving update), the head, the MSE loss, then the
//! gradients back through the head, `BatchNorm::backward` (through the ReLU
//! mask and the batch statistics) and the first dense layer, and an SGD step
//! on every parameter, the batch norm's `scale` and `offset` included, while
//! the layer lives on.
//!
//! Deployment: the first dense layer with the batch norm folded into its
//! weights and bias (`fold_into_weights`, Keras `Dense` layout `[in, out]`),
//! checked against the unfolded model in inference mode within the bound
//! stated at `fold_bound`.

use batchnorm::{
    fold_into_weights, Activation, Batch, BatchNorm, Config, Gradients, MovingStats, ScaleOffset,
    Shape, WeightLayout,
};

const D: usize = 8;
const H: usize = 16;
const B: usize = 64;
const STEPS: usize = 600;
const LR: f32 = 0.05;

/// SplitMix64 with a Box-Muller normal: a seeded stream, no dependency.
struct Rng(u64);
impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
}

/// A batch of inputs (`[B, D]`, raw features with offsets) and targets.
fn batch(rng: &mut Rng, x: &mut [f32], t: &mut [f32]) {
    for (row, target) in x.chunks_exact_mut(D).zip(t.iter_mut()) {
        let z: [f32; D] = std::array::from_fn(|_| rng.normal());
        // The raw features the model sees: shifted and scaled.
        for (j, v) in row.iter_mut().enumerate() {
            *v = 3.0 + j as f32 + (0.5 + 0.25 * j as f32) * z[j];
        }
        *target = z[0].sin() + z[1] * z[2] + 0.5 * z[3] * z[3];
    }
}

/// `out[r, o] = Σ_i a[r, i] w[i, o]` for row-major `a: [rows, n]`, `w: [n, m]`.
fn matmul(a: &[f32], w: &[f32], n: usize, m: usize, out: &mut [f32]) {
    for (ar, or) in a.chunks_exact(n).zip(out.chunks_exact_mut(m)) {
        or.fill(0.0);
        for (&av, wr) in ar.iter().zip(w.chunks_exact(m)) {
            for (o, &wv) in or.iter_mut().zip(wr) {
                *o += av * wv;
            }
        }
    }
}

fn main() -> Result<(), batchnorm::Error> {
    let mut rng = Rng(7);
    // Parameters: He-style init for the first layer, small head.
    let mut w1: Vec<f32> = (0..D * H).map(|_| rng.normal() * 0.5).collect();
    let mut w2: Vec<f32> = (0..H).map(|_| rng.normal() * 0.25).collect();
    let mut b2 = 0.0f32;
    let (mut gamma, mut beta) = (vec![1.0f32; H], vec![0.0f32; H]);
    // The batch norm's state lives across every step.
    let (mut moving_mean, mut moving_var) = (vec![0.0f32; H], vec![1.0f32; H]);
    let config = Config::pytorch().with_activation(Activation::Relu);
    let moving = MovingStats {
        mean: &mut moving_mean,
        variance: &mut moving_var,
        batches: 0,
    };
    let mut bn = BatchNorm::new(config, moving)?;
    let shape = Shape::rows(B, H);

    let (mut x, mut t) = (vec![0.0f32; B * D], vec![0.0f32; B]);
    let (mut h, mut a) = (vec![0.0f32; B * H], vec![0.0f32; B * H]);
    let (mut bm, mut bv) = (vec![0.0f32; H], vec![0.0f32; H]);
    let (mut dh, mut da) = (vec![0.0f32; B * H], vec![0.0f32; B * H]);
    let (mut dgamma, mut dbeta) = (vec![0.0f32; H], vec![0.0f32; H]);
    let mut out = vec![0.0f32; B];

    println!(
        "training dense({D}->{H}) -> batch norm + ReLU -> dense({H}->1), batch {B}, SGD lr {LR}"
    );
    // Mean training loss of each window of 100 steps.
    let mut windows = Vec::new();
    let mut window = 0.0f64;
    for step in 1..=STEPS {
        batch(&mut rng, &mut x, &mut t);
        matmul(&x, &w1, D, H, &mut h);
        let mut stats = Batch {
            mean: &mut bm,
            variance: &mut bv,
        };
        let so = ScaleOffset::new(&gamma, &beta);
        bn.train(&h, &mut a, shape, so, &mut stats)?;
        matmul(&a, &w2, H, 1, &mut out);
        let mut loss = 0.0f64;
        for (o, &tv) in out.iter_mut().zip(&t) {
            *o += b2;
            let e = *o - tv;
            loss += (e * e) as f64;
            // dL/dout of the mean squared error, in place.
            *o = 2.0 * e / B as f32;
        }
        window += loss / B as f64;
        if step % 100 == 0 {
            println!(
                "  steps {:>3}..{step:>3}: mean loss {:.4}",
                step - 99,
                window / 100.0
            );
            windows.push(window / 100.0);
            window = 0.0;
        }
        // The head: dW2 = aᵀ dout, db2 = Σ dout, da = dout W2ᵀ.
        let dout = &out;
        let mut dw2 = vec![0.0f32; H];
        for (ar, &g) in a.chunks_exact(H).zip(dout) {
            for (d, &av) in dw2.iter_mut().zip(ar) {
                *d += av * g;
            }
        }
        let db2: f32 = dout.iter().sum();
        for (dr, &g) in da.chunks_exact_mut(H).zip(dout) {
            for (d, &wv) in dr.iter_mut().zip(&w2) {
                *d = g * wv;
            }
        }
        // Batch norm, through the ReLU mask and the batch statistics.
        let grads = Gradients {
            dx: &mut dh,
            dscale: &mut dgamma,
            doffset: &mut dbeta,
        };
        bn.backward(&h, &da, shape, so, &stats, grads)?;
        // The first layer: dW1 = xᵀ dh.
        let mut dw1 = vec![0.0f32; D * H];
        for (xr, dr) in x.chunks_exact(D).zip(dh.chunks_exact(H)) {
            for (&xv, wr) in xr.iter().zip(dw1.chunks_exact_mut(H)) {
                for (d, &g) in wr.iter_mut().zip(dr) {
                    *d += xv * g;
                }
            }
        }
        // SGD on everything; the layer keeps its moving statistics.
        for (w, g) in w1.iter_mut().zip(&dw1) {
            *w -= LR * g;
        }
        for (w, g) in w2.iter_mut().zip(&dw2) {
            *w -= LR * g;
        }
        b2 -= LR * db2;
        for (p, g) in gamma.iter_mut().zip(&dgamma) {
            *p -= LR * g;
        }
        for (p, g) in beta.iter_mut().zip(&dbeta) {
            *p -= LR * g;
        }
    }
    let (first, last) = (windows[0], windows[windows.len() - 1]);
    println!(
        "  mean loss {first:.4} -> {last:.4} over {} steps",
        bn.moving().batches
    );

    // Deployment. Inference with the moving statistics, unfolded ...
    batch(&mut rng, &mut x, &mut t);
    matmul(&x, &w1, D, H, &mut h);
    let so = ScaleOffset::new(&gamma, &beta);
    bn.infer(&h, &mut a, shape, so)?;
    // ... and the first layer with batch norm folded into it: W1' and b1'.
    let (mut w1f, mut b1f) = (w1.clone(), vec![0.0f32; H]);
    let m = bn.moving();
    fold_into_weights(
        &mut w1f,
        None,
        WeightLayout::OutLast,
        &batchnorm::Params {
            mean: m.mean,
            variance: m.variance,
            scale: Some(&gamma),
            offset: Some(&beta),
            epsilon: config.epsilon,
            activation: Activation::None,
        },
        &mut b1f,
    )?;
    let mut folded = vec![0.0f32; B * H];
    matmul(&x, &w1f, D, H, &mut folded);
    let mut worst = 0.0f64;
    for (fr, (ar, xr)) in folded
        .chunks_exact_mut(H)
        .zip(a.chunks_exact(H).zip(x.chunks_exact(D)))
    {
        for (o, (fv, &av)) in fr.iter_mut().zip(ar).enumerate() {
            *fv = (*fv + b1f[o]).max(0.0);
            let bound = fold_bound(
                xr,
                &w1,
                o,
                m.mean[o],
                m.variance[o],
                gamma[o],
                beta[o],
                config.epsilon,
            );
            let ratio = (*fv as f64 - av as f64).abs() / bound;
            worst = worst.max(ratio);
        }
    }
    let (mut y_folded, mut y_unfolded) = (vec![0.0f32; B], vec![0.0f32; B]);
    matmul(&folded, &w2, H, 1, &mut y_folded);
    matmul(&a, &w2, H, 1, &mut y_unfolded);
    // The deployed model on held-out data, in inference mode.
    let eval: f64 = y_folded
        .iter()
        .zip(&t)
        .map(|(o, tv)| ((o + b2 - tv) as f64).powi(2))
        .sum::<f64>()
        / B as f64;
    println!("held-out loss of the deployed (folded) model: {eval:.4}");
    let max_out = y_folded
        .iter()
        .zip(&y_unfolded)
        .map(|(p, q)| (p - q).abs())
        .fold(0.0f32, f32::max);
    println!(
        "deployment: batch norm folded into the first dense layer; hidden activations within {worst:.3} of the bound, model outputs differ by at most {max_out:.2e}"
    );
    let ok = last < 0.5 * first && eval < 0.5 * first && worst <= 1.0;
    println!(
        "{}",
        if ok {
            "OK: the loss fell, and the folded model matches the unfolded one"
        } else {
            "UNEXPECTED: see the numbers above"
        }
    );
    if ok {
        Ok(())
    } else {
        std::process::exit(1)
    }
}

/// The bound on `|relu(x·w' + b') - relu(bn(x·w))|` for hidden unit `o`:
/// both sides are a dot product of `D` terms in `f32` (each within
/// `D ε Σ|x_i w_i|` of exact, times `|a|`), the fold rounds `w'_i`, `a` and
/// `b'` once each, the unfolded side rounds `a`, `b` and `x·a + b`; with
/// `a = γ / sqrt(v + eps)`, `S = Σ|x_i w_i| |a|`, the sum is at most
/// `(2D + 6) ε (S + |mean a| + |β|)` (ReLU does not increase a difference).
#[allow(clippy::too_many_arguments)]
fn fold_bound(
    x: &[f32],
    w: &[f32],
    o: usize,
    mean: f32,
    var: f32,
    g: f32,
    b: f32,
    eps: f32,
) -> f64 {
    let a = (g as f64 / (var as f64 + eps as f64).sqrt()).abs();
    let s: f64 = x
        .iter()
        .enumerate()
        .map(|(i, &xv)| (xv as f64 * w[i * H + o] as f64).abs())
        .sum::<f64>()
        * a;
    let e = f32::EPSILON as f64;
    (2 * D + 6) as f64 * e * (s + (mean as f64 * a).abs() + (b as f64).abs())
}
