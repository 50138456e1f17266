//! A real training-and-inference round on generated data (the README's main
//! command): `cargo run --release --example quickstart`.
//!
//! 1. Streams NHWC batches from four channels with known statistics through
//!    `BatchNorm::train` with Keras' preset, and shows the moving statistics
//!    converging to the data's true mean and variance.
//! 2. Runs inference on a fresh in-distribution batch and shows that the
//!    train-mode output (batch statistics) and the infer-mode output (moving
//!    statistics) agree.
//! 3. Shows TensorFlow 1.x's classic mistake (moving statistics never
//!    updated because `UPDATE_OPS` was not run) and why `train` cannot make it.

use batchnorm::{Batch, BatchNorm, Config, MovingStats, ScaleOffset, Shape};

/// Channel means and standard deviations of the generated data.
const MEANS: [f32; 4] = [5.0, -2.0, 100.0, 0.5];
const STDS: [f32; 4] = [2.0, 0.5, 10.0, 0.1];
const C: usize = MEANS.len();
/// 32 images of 8 x 8 pixels per batch: 2048 values per channel.
const SHAPE: Shape = Shape::nhwc(32, 8 * 8, C);
const STEPS: usize = 1000;

/// SplitMix64 with a Box-Muller normal: a seeded stream, no dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
    fn normal(&mut self) -> f32 {
        let (u, v) = (self.next().max(1e-300), self.next());
        ((-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()) as f32
    }
    fn batch(&mut self, x: &mut [f32]) {
        for (i, v) in x.iter_mut().enumerate() {
            let c = i % C; // NHWC: the channel is the fastest index
            *v = MEANS[c] + STDS[c] * self.normal();
        }
    }
}

fn main() -> Result<(), batchnorm::Error> {
    let len = SHAPE.len()?;
    let mut rng = Rng(42);
    let mut x = vec![0.0f32; len];
    let mut y = vec![0.0f32; len];

    // Keras initialises the moving statistics to mean 0, variance 1.
    let (mut moving_mean, mut moving_var) = ([0.0f32; C], [1.0f32; C]);
    let moving = MovingStats {
        mean: &mut moving_mean,
        variance: &mut moving_var,
        batches: 0,
    };
    let mut bn = BatchNorm::new(Config::keras(), moving)?;
    // Where each step leaves its batch statistics (a backward pass reads them).
    let (mut batch_mean, mut batch_var) = ([0.0f32; C], [0.0f32; C]);
    let mut batch = Batch {
        mean: &mut batch_mean,
        variance: &mut batch_var,
    };
    // No learned scale or offset here (Keras' `scale=False, center=False`).
    let params = ScaleOffset::NONE;

    println!(
        "batchnorm quickstart: {C} channels, {SHAPE:?}, Keras preset (momentum 0.99, eps 1e-3)"
    );
    println!("true mean     {:>10?}", MEANS);
    println!("true variance {:>10?}", STDS.map(|s| s * s));
    println!("\n1. training: one call per step computes batch moments, normalizes, updates the moving statistics");
    let start = std::time::Instant::now();
    for step in 1..=STEPS {
        rng.batch(&mut x);
        bn.train(&x, &mut y, SHAPE, params, &mut batch)?;
        if [1, 10, 100, 500, STEPS].contains(&step) {
            println!(
                "  step {step:>4}: moving mean {:>8.3?}  moving variance {:>8.3?}",
                bn.moving().mean,
                bn.moving().variance
            );
        }
    }
    let elapsed = start.elapsed();
    let worst = (0..C)
        .map(|c| {
            let dm = (bn.moving().mean[c] - MEANS[c]).abs() / STDS[c];
            let dv = (bn.moving().variance[c] / (STDS[c] * STDS[c]) - 1.0).abs();
            dm.max(dv)
        })
        .fold(0.0f32, f32::max);
    println!(
        "  after {STEPS} steps ({:.0} ms with data generation): worst |moving mean - mean| / std or |moving var / var - 1| = {worst:.4}",
        elapsed.as_secs_f64() * 1e3
    );

    println!("\n2. inference on a fresh in-distribution batch");
    rng.batch(&mut x);
    let mut y_infer = vec![0.0f32; len];
    bn.infer(&x, &mut y_infer, SHAPE, params)?;
    // The train-mode output on the same batch, for comparison (the
    // normalization alone: a training step would also move the statistics).
    batchnorm::moments(&x, SHAPE, batch.mean, batch.variance)?;
    let batch_params = batchnorm::Params {
        mean: batch.mean,
        variance: batch.variance,
        scale: None,
        offset: None,
        epsilon: bn.config().epsilon,
        activation: bn.config().activation,
    };
    batchnorm::normalize(&x, &mut y, SHAPE, &batch_params)?;
    let mad = mean_abs_diff(&y, &y_infer);
    println!(
        "  mean |y_train - y_infer| = {mad:.4} (normalized units; batch vs population statistics)"
    );
    println!(
        "  infer output per channel: mean {:>7.3?}, variance {:>7.3?}",
        stats(&y_infer).0,
        stats(&y_infer).1
    );

    println!("\n3. the classic TensorFlow 1.x mistake: moving statistics never updated");
    // What a graph that trained without running UPDATE_OPS leaves behind:
    // the initial moving mean 0 and moving variance 1.
    let (mut stale_mean, mut stale_var) = ([0.0f32; C], [1.0f32; C]);
    let stale = MovingStats {
        mean: &mut stale_mean,
        variance: &mut stale_var,
        batches: 0,
    };
    let stale = BatchNorm::new(Config::keras(), stale)?;
    let mut y_stale = vec![0.0f32; len];
    stale.infer(&x, &mut y_stale, SHAPE, params)?;
    println!(
        "  stale infer output per channel: mean {:>7.3?}, variance {:>9.3?}",
        stats(&y_stale).0,
        stats(&y_stale).1
    );
    println!(
        "  mean |y_train - y_stale| = {:.3}: garbage",
        mean_abs_diff(&y, &y_stale)
    );
    println!(
        "  here a training step IS the update: {} steps taken, each one moved the moving statistics; there is no separate op to forget.",
        bn.moving().batches
    );

    let ok = worst < 0.05 && mad < 0.1;
    println!(
        "\n{}",
        if ok {
            "OK: trained statistics converged and train/infer agree"
        } else {
            "UNEXPECTED: see numbers above"
        }
    );
    if ok {
        Ok(())
    } else {
        std::process::exit(1)
    }
}

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(p, q)| (p - q).abs() as f64)
        .sum::<f64>()
        / a.len() as f64
}

fn stats(y: &[f32]) -> ([f32; C], [f32; C]) {
    let (mut mean, mut var) = ([0.0; C], [0.0; C]);
    batchnorm::moments(y, SHAPE, &mut mean, &mut var).expect("valid shape");
    (mean, var)
}
