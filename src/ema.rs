//! Moving statistics: the exponential moving average of batch moments, and
//! the presets that say how each framework feeds it.

use crate::error::{check_epsilon, check_len, Error};
use crate::normalize::Activation;
use crate::Variance;

/// How the moving statistics follow the batch statistics.
///
/// ```
/// use batchnorm::Momentum;
///
/// // Keras' momentum 0.99 (PyTorch's momentum 0.1 is `Decay(0.9)`).
/// let keras = Momentum::Decay(0.99);
/// assert_eq!((keras.decay(7), keras.weight(7)), (0.99, 1.0 - 0.99));
/// // PyTorch's `momentum=None`: the 4th batch gets weight 1/4.
/// assert_eq!(Momentum::Cumulative.weight(4), 0.25);
/// assert!(Momentum::Decay(1.5).validate().is_err());
/// ```
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
    /// The decay `d` for the `batches`-th batch (counting from 1; 0 is taken
    /// as 1).
    pub fn decay(&self, batches: u64) -> f32 {
        self.factors(batches).0
    }

    /// The weight `1 - d` of the new batch for the `batches`-th batch.
    /// [`Momentum::Cumulative`] forms `1 / batches` and `1 - 1 / batches`
    /// each in `f64` and rounds once, so both stay within `f32` rounding of
    /// exact for every `u64` count (forming `1 - (1 - 1/b)` in `f32` was 1.3%
    /// off at a million batches and stuck at 0 after 2^25).
    pub fn weight(&self, batches: u64) -> f32 {
        self.factors(batches).1
    }

    /// `(decay, weight)`.
    fn factors(&self, batches: u64) -> (f32, f32) {
        match *self {
            // `1 - d` is exact in f32 for d in [0.5, 1] and matches ONNX
            // Runtime (f32 momentum) bit for bit; Keras forms `1 -
            // momentum` from the Python double 0.99 before rounding, so its
            // weight differs from ours by 8e-9 and its moving mean by a few
            // ulps (tests/golden.rs models this).
            Momentum::Decay(d) => (d, 1.0 - d),
            Momentum::Cumulative => {
                let w = 1.0 / batches.max(1) as f64;
                ((1.0 - w) as f32, w as f32)
            }
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
///
/// Start from the preset of the framework whose numbers you need to match
/// (the crate docs' table lists what each one sets), then change a field:
///
/// ```
/// use batchnorm::{Activation, Config, Momentum, Variance};
///
/// let c = Config::pytorch_momentum(None).with_activation(Activation::Relu);
/// assert_eq!(c.momentum, Momentum::Cumulative);
/// assert_eq!((c.epsilon, c.moving_variance), (1e-5, Variance::Sample));
/// assert!(c.validate().is_ok());
/// // Every call rejects a config like this one with `Error::Epsilon`.
/// assert!(Config::keras().with_epsilon(0.0).validate().is_err());
/// ```
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

/// The moving statistics of a layer: what it learns besides its parameters,
/// saved and restored with the model (all three fields, plain data).
///
/// `batches` is the number of training batches seen; [`Momentum::Cumulative`]
/// (PyTorch's `momentum=None`) weighs the `b`-th batch by `1 / b`, so a
/// checkpoint that dropped it would restart the average. It saturates at
/// `u64::MAX` instead of wrapping.
///
/// ```
/// use batchnorm::{update_moving, Config, MovingStats};
/// let (mut mean, mut variance) = ([0.0f32; 2], [1.0f32; 2]);
/// let mut moving = MovingStats { mean: &mut mean, variance: &mut variance, batches: 0 };
/// update_moving(&[2.0, 4.0], &[1.0, 9.0], 8, &Config::keras(), &mut moving)?;
/// assert_eq!(moving.batches, 1);
/// assert!((moving.mean[1] - 0.04).abs() < 1e-7); // 0 * 0.99 + 4 * 0.01
/// # Ok::<(), batchnorm::Error>(())
/// ```
#[derive(Debug, PartialEq)]
pub struct MovingStats<'a> {
    /// Moving mean, one per channel (Keras, PyTorch and ONNX start at 0).
    pub mean: &'a mut [f32],
    /// Moving variance, one per channel (the frameworks start at 1).
    pub variance: &'a mut [f32],
    /// Training batches seen.
    pub batches: u64,
}

impl MovingStats<'_> {
    /// Number of channels, `Err` for none or for two lengths.
    pub(crate) fn channels(&self) -> Result<usize, Error> {
        if self.mean.is_empty() {
            return Err(Error::ZeroChannels);
        }
        check_len("moving.variance", self.variance.len(), self.mean.len())?;
        Ok(self.mean.len())
    }
}

/// Updates the moving statistics with one batch's moments and counts the
/// batch: `moving = moving * d + batch * (1 - d)`, where the variance fed in
/// is the batch's population variance or, for [`Variance::Sample`], that
/// times `count / (count - 1)` (factor 1 at `count == 1`), and `count` is
/// the number of elements per channel in the batch.
///
/// Errors (nothing written): slices of different lengths, zero channels,
/// `count == 0`, or an invalid config.
///
/// ```
/// use batchnorm::{update_moving, Config, MovingStats};
/// let (mut mean, mut variance) = ([0.0f32], [1.0f32]);
/// let mut moving = MovingStats { mean: &mut mean, variance: &mut variance, batches: 0 };
/// // PyTorch: momentum 0.1, Bessel's correction of a batch of 4
/// update_moving(&[1.0], &[3.0], 4, &Config::pytorch(), &mut moving)?;
/// assert!((moving.variance[0] - (0.9 + 0.1 * 4.0)).abs() < 1e-6);
/// # Ok::<(), batchnorm::Error>(())
/// ```
pub fn update_moving(
    batch_mean: &[f32],
    batch_variance: &[f32],
    count: u64,
    config: &Config,
    moving: &mut MovingStats<'_>,
) -> Result<(), Error> {
    let c = moving.channels()?;
    check_len("batch_mean", batch_mean.len(), c)?;
    check_len("batch_variance", batch_variance.len(), c)?;
    if count == 0 {
        return Err(Error::EmptyBatch);
    }
    config.validate()?;
    apply(moving, batch_mean, batch_variance, count, config);
    Ok(())
}

/// The update on validated input; counts the batch.
pub(crate) fn apply(
    moving: &mut MovingStats<'_>,
    batch_mean: &[f32],
    batch_variance: &[f32],
    count: u64,
    config: &Config,
) {
    moving.batches = moving.batches.saturating_add(1);
    // `moving * d + batch * w`, Keras' and ONNX's expression.
    let (d, w) = config.momentum.factors(moving.batches);
    let bessel = match config.moving_variance {
        Variance::Population => 1.0,
        Variance::Sample if count > 1 => (count as f64 / (count - 1) as f64) as f32,
        Variance::Sample => 1.0,
    };
    let slots = moving.mean.iter_mut().zip(moving.variance.iter_mut());
    for ((mm, mv), (&bm, &bv)) in slots.zip(batch_mean.iter().zip(batch_variance)) {
        *mm = *mm * d + bm * w;
        *mv = *mv * d + bv * bessel * w;
    }
}
