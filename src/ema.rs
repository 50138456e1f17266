//! Moving statistics: the exponential moving average of batch moments, and
//! the presets that say how each framework feeds it.

use crate::error::{check_epsilon, check_len, Error};
use crate::normalize::Activation;
use crate::Variance;

/// How the moving statistics follow the batch statistics.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Momentum {
    /// `moving = moving * d + batch * (1 - d)` with decay `d` in `[0, 1]`
    /// (Keras' `momentum`; PyTorch's `momentum = m` is `d = 1 - m`;
    /// TensorFlow's `exponential_avg_factor = f` is `d = 1 - f`).
    Decay(f32),
    /// The cumulative average over all batches seen, factor `1 / batches`
    /// (PyTorch's `momentum=None`).
    Cumulative,
}

impl Momentum {
    /// The decay for the `batches`-th batch (counting from 1).
    pub fn decay(&self, batches: u64) -> f32 {
        match *self {
            Momentum::Decay(d) => d,
            Momentum::Cumulative => 1.0 - (1.0 / batches.max(1) as f64) as f32,
        }
    }

    /// `Err(Error::Decay)` for a decay outside `[0, 1]` or NaN.
    pub fn validate(&self) -> Result<(), Error> {
        match *self {
            Momentum::Decay(d) if !(0.0..=1.0).contains(&d) => Err(Error::Decay(d)),
            _ => Ok(()),
        }
    }
}

/// Everything a batch-normalization layer needs besides its tensors.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Config {
    /// Added to the variance under the square root.
    pub epsilon: f32,
    /// How the moving statistics are updated.
    pub momentum: Momentum,
    /// Which variance feeds the moving variance. Normalization in training
    /// always uses the batch's population variance.
    pub moving_variance: Variance,
    /// Fused into the normalization pass.
    pub activation: Activation,
}

impl Config {
    /// Keras 3 / `tf.keras.layers.BatchNormalization`: `epsilon = 1e-3`,
    /// `momentum = 0.99`, moving variance fed with the population variance.
    pub const fn keras() -> Config {
        Config {
            epsilon: 1e-3,
            momentum: Momentum::Decay(0.99),
            moving_variance: Variance::Population,
            activation: Activation::None,
        }
    }

    /// TensorFlow `FusedBatchNormV3` with `exponential_avg_factor = f`:
    /// `epsilon = 1e-3`, decay `1 - f` (`f = 1` overwrites), moving variance
    /// fed with the sample (Bessel) variance. An `f` outside `[0, 1]` makes
    /// an invalid config that every call rejects with [`Error::Decay`].
    pub const fn tf_fused(exponential_avg_factor: f32) -> Config {
        Config {
            epsilon: 1e-3,
            momentum: Momentum::Decay(1.0 - exponential_avg_factor),
            moving_variance: Variance::Sample,
            activation: Activation::None,
        }
    }

    /// TensorFlow 1.x `tf.layers.batch_normalization` (`momentum = 0.99`,
    /// `epsilon = 1e-3`). Its default `fused=True` is [`Config::tf_fused`]`(0.01)`
    /// (sample variance); `fused=False` feeds the population variance.
    pub const fn tf_layers(fused: bool) -> Config {
        let mut c = Config::tf_fused(0.01);
        if !fused {
            c.moving_variance = Variance::Population;
        }
        c
    }

    /// `torch.nn.BatchNorm2d` defaults: `eps = 1e-5`, `momentum = 0.1`
    /// (decay 0.9), moving variance fed with the sample (Bessel) variance.
    pub const fn pytorch() -> Config {
        Config {
            epsilon: 1e-5,
            momentum: Momentum::Decay(0.9),
            moving_variance: Variance::Sample,
            activation: Activation::None,
        }
    }

    /// PyTorch with an explicit `momentum` argument: `Some(m)` is decay
    /// `1 - m`, `None` the cumulative average.
    pub const fn pytorch_momentum(momentum: Option<f32>) -> Config {
        let mut c = Config::pytorch();
        c.momentum = match momentum {
            Some(m) => Momentum::Decay(1.0 - m),
            None => Momentum::Cumulative,
        };
        c
    }

    /// ONNX `BatchNormalization` (opset 15, as ONNX Runtime runs it):
    /// `epsilon = 1e-5`, `momentum = 0.9`, moving variance fed with the
    /// population variance.
    pub const fn onnx() -> Config {
        Config {
            epsilon: 1e-5,
            momentum: Momentum::Decay(0.9),
            moving_variance: Variance::Population,
            activation: Activation::None,
        }
    }

    /// The same config with another activation.
    pub const fn with_activation(mut self, activation: Activation) -> Config {
        self.activation = activation;
        self
    }

    /// The same config with another epsilon.
    pub const fn with_epsilon(mut self, epsilon: f32) -> Config {
        self.epsilon = epsilon;
        self
    }

    /// Checks epsilon, momentum and activation.
    pub fn validate(&self) -> Result<(), Error> {
        check_epsilon(self.epsilon)?;
        self.momentum.validate()?;
        self.activation.validate()
    }
}

/// Updates the moving statistics with one batch's moments:
/// `moving = moving * d + batch * (1 - d)`, where the variance fed in is the
/// batch's population variance or, for [`Variance::Sample`], that times
/// `count / (count - 1)` (factor 1 at `count == 1`). `batches` is the number
/// of batches seen including this one (only [`Momentum::Cumulative`] reads
/// it).
///
/// Errors (nothing written): slices of different lengths, zero channels,
/// `count == 0`, or an invalid config.
pub fn update_moving(
    moving_mean: &mut [f32],
    moving_variance: &mut [f32],
    batch_mean: &[f32],
    batch_variance: &[f32],
    count: u64,
    batches: u64,
    config: &Config,
) -> Result<(), Error> {
    check_buffers(
        moving_mean.len(),
        moving_variance.len(),
        batch_mean.len(),
        batch_variance.len(),
    )?;
    if count == 0 {
        return Err(Error::EmptyBatch);
    }
    config.validate()?;
    apply(
        moving_mean,
        moving_variance,
        batch_mean,
        batch_variance,
        count,
        batches,
        config,
    );
    Ok(())
}

/// The four per-channel buffers of a moving update (moving mean and
/// variance, batch mean and variance) have one non-zero length.
pub(crate) fn check_buffers(
    moving_mean: usize,
    moving_variance: usize,
    batch_mean: usize,
    batch_variance: usize,
) -> Result<(), Error> {
    if moving_mean == 0 {
        return Err(Error::ZeroChannels);
    }
    check_len("moving_variance", moving_variance, moving_mean)?;
    check_len("batch_mean", batch_mean, moving_mean)?;
    check_len("batch_variance", batch_variance, moving_mean)
}

/// The update on validated input.
pub(crate) fn apply(
    moving_mean: &mut [f32],
    moving_variance: &mut [f32],
    batch_mean: &[f32],
    batch_variance: &[f32],
    count: u64,
    batches: u64,
    config: &Config,
) {
    let d = config.momentum.decay(batches);
    // `moving * d + batch * (1 - d)`, Keras' and ONNX's expression. `1 - d`
    // is exact in f32 for d in [0.5, 1] and matches ONNX Runtime (f32
    // momentum) bit for bit; Keras forms `1 - momentum` from the Python
    // double 0.99 before rounding, so its weight differs from ours by 8e-9
    // and its moving mean by a few ulps (tests/golden.rs models this).
    let w = 1.0 - d;
    let bessel = match config.moving_variance {
        Variance::Population => 1.0,
        Variance::Sample if count > 1 => (count as f64 / (count - 1) as f64) as f32,
        Variance::Sample => 1.0,
    };
    let moving = moving_mean.iter_mut().zip(moving_variance.iter_mut());
    for ((mm, mv), (&bm, &bv)) in moving.zip(batch_mean.iter().zip(batch_variance)) {
        *mm = *mm * d + bm * w;
        *mv = *mv * d + bv * bessel * w;
    }
}
