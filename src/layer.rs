//! The batch-normalization layer: a training step is the moments pass, the
//! normalization and the moving-average update in one call, so the moving
//! statistics cannot be left behind (TensorFlow 1.x's `UPDATE_OPS` trap).
//!
//! What a layer holds and what it borrows per call follows who changes what
//! in a training loop:
//! - the [`Config`] and the moving statistics ([`MovingStats`]: moving mean,
//!   moving variance and the number of batches seen) are the layer's state,
//!   updated only by its training step and saved with the model;
//! - `scale` and `offset` ([`ScaleOffset`]) belong to the optimizer, which
//!   changes them between steps, so every call borrows them afresh;
//! - a training step writes the batch statistics into a caller's [`Batch`],
//!   which is what the backward pass reads.

use crate::backward::{Gradients, Mode};
use crate::ema::{self, Config, MovingStats};
use crate::error::{check_len, Error, LAYER_CHANNELS};
use crate::lanes::Simd;
use crate::moments;
use crate::normalize::{self, InPlace, Params, Split};
use crate::shape::Shape;

/// The learned per-channel parameters, `scale` (gamma, 1 when absent) and
/// `offset` (beta, 0 when absent), borrowed for one call.
///
/// ```
/// use batchnorm::ScaleOffset;
/// let (gamma, beta) = ([1.5f32, 0.5], [0.0f32, 1.0]);
/// let both = ScaleOffset::new(&gamma, &beta);
/// let none = ScaleOffset::NONE; // scale 1, offset 0
/// assert!(both.scale.is_some() && none.offset.is_none());
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ScaleOffset<'a> {
    /// Per-channel scale (gamma); `None` means 1.
    pub scale: Option<&'a [f32]>,
    /// Per-channel offset (beta); `None` means 0.
    pub offset: Option<&'a [f32]>,
}

impl<'a> ScaleOffset<'a> {
    /// No scale and no offset (Keras' `scale=False, center=False`).
    pub const NONE: ScaleOffset<'static> = ScaleOffset {
        scale: None,
        offset: None,
    };

    /// Both parameters.
    pub const fn new(scale: &'a [f32], offset: &'a [f32]) -> Self {
        ScaleOffset {
            scale: Some(scale),
            offset: Some(offset),
        }
    }

    /// The normalization parameters with these and the given statistics.
    fn params(self, mean: &'a [f32], variance: &'a [f32], config: &Config) -> Params<'a> {
        Params {
            mean,
            variance,
            scale: self.scale,
            offset: self.offset,
            epsilon: config.epsilon,
            activation: config.activation,
        }
    }
}

/// Where a training step leaves the batch's per-channel mean and population
/// variance (what its output was normalized with, and what the backward
/// pass needs).
#[derive(Debug, PartialEq)]
pub struct Batch<'a> {
    /// Batch mean, one per channel.
    pub mean: &'a mut [f32],
    /// Batch population variance, one per channel.
    pub variance: &'a mut [f32],
}

/// A batch-normalization layer over borrowed moving statistics.
///
/// Nothing is allocated and stack use does not grow with the channel count.
/// The layer lives as long as its moving statistics; `scale` and `offset`
/// are borrowed per call, so an optimizer may update them between steps.
/// Inference takes `&self`.
///
/// ```
/// use batchnorm::{Batch, BatchNorm, Config, MovingStats, ScaleOffset, Shape};
/// let (mut mm, mut mv) = ([0.0f32; 2], [1.0f32; 2]);
/// let moving = MovingStats { mean: &mut mm, variance: &mut mv, batches: 0 };
/// let mut bn = BatchNorm::new(Config::keras(), moving)?;
/// let (mut gamma, beta) = ([1.0f32; 2], [0.0f32; 2]);
/// let (mut bm, mut bv) = ([0.0f32; 2], [0.0f32; 2]);
/// let x = [1.0, 10.0, 3.0, 30.0];
/// let mut y = [0.0; 4];
/// for _ in 0..3 {
///     let mut batch = Batch { mean: &mut bm, variance: &mut bv };
///     bn.train(&x, &mut y, Shape::rows(2, 2), ScaleOffset::new(&gamma, &beta), &mut batch)?;
///     gamma[0] += 0.1; // an optimizer step between training steps
/// }
/// assert_eq!(bm, [2.0, 20.0]);
/// assert_eq!(bn.moving().batches, 3);
/// bn.infer(&x, &mut y, Shape::rows(2, 2), ScaleOffset::new(&gamma, &beta))?;
/// # Ok::<(), batchnorm::Error>(())
/// ```
#[derive(Debug)]
pub struct BatchNorm<'a> {
    config: Config,
    moving: MovingStats<'a>,
    simd: Simd,
}

impl<'a> BatchNorm<'a> {
    /// A layer over `moving` (restored from a checkpoint, or fresh: the
    /// frameworks start at mean 0, variance 1, no batches).
    ///
    /// Errors: zero channels, moving mean and variance of different
    /// lengths, or an invalid config.
    pub fn new(config: Config, moving: MovingStats<'a>) -> Result<BatchNorm<'a>, Error> {
        moving.channels()?;
        config.validate()?;
        Ok(BatchNorm {
            config,
            moving,
            simd: Simd::detect(),
        })
    }

    /// Runs the kernels with lane width `simd` instead of [`Simd::detect`].
    pub fn with_simd(mut self, simd: Simd) -> Self {
        self.simd = simd;
        self
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.moving.mean.len()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The moving statistics (to save them).
    pub fn moving(&self) -> &MovingStats<'a> {
        &self.moving
    }

    /// The moving statistics back, ending the layer.
    pub fn into_moving(self) -> MovingStats<'a> {
        self.moving
    }

    /// The lane width, the configuration and the moving statistics, for a
    /// training step run elsewhere in the crate (`parallel`).
    #[cfg(feature = "rayon")]
    pub(crate) fn parts(&mut self) -> (Simd, &Config, &mut MovingStats<'a>) {
        (self.simd, &self.config, &mut self.moving)
    }

    /// The lane width the layer runs.
    #[cfg(feature = "rayon")]
    pub(crate) fn simd(&self) -> Simd {
        self.simd
    }

    /// A training step: batch moments into `batch`, `y` normalized with them
    /// (population variance), then the moving statistics updated and the
    /// batch counted, all in one call.
    ///
    /// Errors (nothing written, state unchanged): lengths that do not match
    /// `shape` or the layer's channels, or an empty batch.
    pub fn train(
        &mut self,
        x: &[f32],
        y: &mut [f32],
        shape: Shape,
        params: ScaleOffset<'_>,
        batch: &mut Batch<'_>,
    ) -> Result<(), Error> {
        shape.check("y", y.len())?;
        self.statistics(x, shape, params, batch)?;
        let p = params.params(batch.mean, batch.variance, &self.config);
        normalize::run_folded(self.simd, &mut Split::new(x, y), shape, &p);
        Ok(())
    }

    /// [`train`](BatchNorm::train) overwriting `x` with the output.
    pub fn train_in_place(
        &mut self,
        x: &mut [f32],
        shape: Shape,
        params: ScaleOffset<'_>,
        batch: &mut Batch<'_>,
    ) -> Result<(), Error> {
        self.statistics(x, shape, params, batch)?;
        let p = params.params(batch.mean, batch.variance, &self.config);
        normalize::run_folded(self.simd, &mut InPlace::new(x), shape, &p);
        Ok(())
    }

    /// Inference: `y` normalized with the moving statistics. An empty batch
    /// writes nothing and returns `Ok`.
    ///
    /// Errors (nothing written): lengths that do not match `shape` or the
    /// layer's channels.
    pub fn infer(
        &self,
        x: &[f32],
        y: &mut [f32],
        shape: Shape,
        params: ScaleOffset<'_>,
    ) -> Result<(), Error> {
        shape.check("y", y.len())?;
        self.check(x.len(), shape, params)?;
        let p = params.params(self.moving.mean, self.moving.variance, &self.config);
        normalize::run_folded(self.simd, &mut Split::new(x, y), shape, &p);
        Ok(())
    }

    /// [`infer`](BatchNorm::infer) overwriting `x`.
    pub fn infer_in_place(
        &self,
        x: &mut [f32],
        shape: Shape,
        params: ScaleOffset<'_>,
    ) -> Result<(), Error> {
        self.check(x.len(), shape, params)?;
        let p = params.params(self.moving.mean, self.moving.variance, &self.config);
        normalize::run_folded(self.simd, &mut InPlace::new(x), shape, &p);
        Ok(())
    }

    /// The backward pass of a training step: `dx`, `dscale`, `doffset` from
    /// the step's input `x`, the loss's gradient `dy` with respect to its
    /// output, the same `params`, and the `batch` statistics the step left
    /// (through the fused activation's mask and the batch statistics; see
    /// [`backward`](crate::backward) for the formulas and the error bound).
    ///
    /// Errors (nothing written): lengths that do not match `shape` or the
    /// layer's channels, or an empty batch.
    ///
    /// ```
    /// use batchnorm::{Batch, BatchNorm, Config, Gradients, MovingStats, ScaleOffset, Shape};
    ///
    /// let shape = Shape::rows(4, 1);
    /// let (mut mm, mut mv) = ([0.0f32], [1.0f32]);
    /// let moving = MovingStats { mean: &mut mm, variance: &mut mv, batches: 0 };
    /// let mut bn = BatchNorm::new(Config::pytorch(), moving)?;
    /// let (gamma, beta) = ([1.0f32], [0.0f32]);
    /// let so = ScaleOffset::new(&gamma, &beta);
    /// let (mut bm, mut bv) = ([0.0f32], [0.0f32]);
    /// let mut batch = Batch { mean: &mut bm, variance: &mut bv };
    /// let x = [1.0f32, 2.0, 3.0, 4.0];
    /// let mut y = [0.0f32; 4];
    /// bn.train(&x, &mut y, shape, so, &mut batch)?;
    ///
    /// // The loss is sum(y): dy = 1 everywhere.
    /// let dy = [1.0f32; 4];
    /// let (mut dx, mut dgamma, mut dbeta) = ([0.0f32; 4], [0.0f32], [0.0f32]);
    /// let grads = Gradients { dx: &mut dx, dscale: &mut dgamma, doffset: &mut dbeta };
    /// bn.backward(&x, &dy, shape, so, &batch, grads)?;
    /// assert_eq!(dbeta, [4.0]); // sum of dy
    /// assert!(dgamma[0].abs() < 1e-5); // sum of dy * x̂, and x̂ sums to 0
    /// assert!(dx.iter().all(|d| d.abs() < 1e-5)); // sum(y) does not depend on x
    /// # Ok::<(), batchnorm::Error>(())
    /// ```
    pub fn backward(
        &self,
        x: &[f32],
        dy: &[f32],
        shape: Shape,
        params: ScaleOffset<'_>,
        batch: &Batch<'_>,
        grads: Gradients<'_>,
    ) -> Result<(), Error> {
        self.check(x.len(), shape, params)?;
        let p = params.params(batch.mean, batch.variance, &self.config);
        self.simd.backward(x, dy, shape, &p, Mode::Training, grads)
    }

    /// The backward pass of [`infer`](BatchNorm::infer): the moving
    /// statistics are constants, so `dx = dy * scale / sqrt(var + eps)`
    /// (masked by the activation); for fine-tuning around a frozen layer.
    /// An empty batch sets `dscale` and `doffset` to 0.
    ///
    /// Errors (nothing written): lengths that do not match `shape` or the
    /// layer's channels.
    pub fn backward_infer(
        &self,
        x: &[f32],
        dy: &[f32],
        shape: Shape,
        params: ScaleOffset<'_>,
        grads: Gradients<'_>,
    ) -> Result<(), Error> {
        self.check(x.len(), shape, params)?;
        let p = params.params(self.moving.mean, self.moving.variance, &self.config);
        self.simd.backward(x, dy, shape, &p, Mode::Inference, grads)
    }

    /// Validates `x` and the parameters against `shape` and the layer.
    fn check(&self, x: usize, shape: Shape, params: ScaleOffset<'_>) -> Result<(), Error> {
        shape.check("x", x)?;
        check_len(LAYER_CHANNELS, shape.channels, self.channels())?;
        if let Some(s) = params.scale {
            check_len("scale", s.len(), self.channels())?;
        }
        if let Some(o) = params.offset {
            check_len("offset", o.len(), self.channels())?;
        }
        Ok(())
    }

    /// The part of a training step before normalization: validates
    /// everything, then batch moments into `batch` and the moving update.
    fn statistics(
        &mut self,
        x: &[f32],
        shape: Shape,
        params: ScaleOffset<'_>,
        batch: &mut Batch<'_>,
    ) -> Result<(), Error> {
        self.check(x.len(), shape, params)?;
        check_len("batch.mean", batch.mean.len(), self.channels())?;
        check_len("batch.variance", batch.variance.len(), self.channels())?;
        let count = match shape.count()? {
            0 => return Err(Error::EmptyBatch),
            n => n as u64,
        };
        moments::mean_variance(self.simd, x, shape, batch.mean, batch.variance);
        ema::apply(
            &mut self.moving,
            batch.mean,
            batch.variance,
            count,
            &self.config,
        );
        Ok(())
    }
}

/// A layer that owns its parameters and state in `[f32; C]` arrays, for
/// firmware that keeps everything in a `static` (inference takes `&self`, so
/// a frozen layer needs no `static mut`). It runs the same code as
/// [`BatchNorm`]; its fields are plain data, saved and restored as they are.
///
/// ```
/// use batchnorm::{BatchNormArray, Config, Shape};
/// // a trained layer, restored at compile time
/// static LAYER: BatchNormArray<3> =
///     BatchNormArray::from_state(Config::pytorch(), [0.5, 1.0, 2.0], [1.0, 4.0, 0.25], 100)
///         .with_params([1.0, 2.0, 1.0], [0.0, 0.0, -1.0]);
/// let x = [0.5, 1.0, 2.0, 1.5, 3.0, 2.5];
/// let mut y = [0.0; 6];
/// LAYER.infer(&x, &mut y, Shape::rows(2, 3))?;
/// assert!(y[0].abs() < 1e-6 && (y[2] + 1.0).abs() < 1e-6);
///
/// let mut bn = BatchNormArray::<3>::new(Config::onnx());
/// bn.train(&x, &mut y, Shape::rows(2, 3))?;
/// assert_eq!(bn.batches, 1);
/// # Ok::<(), batchnorm::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormArray<const C: usize> {
    /// The configuration.
    pub config: Config,
    /// Gamma (starts at 1).
    pub scale: [f32; C],
    /// Beta (starts at 0).
    pub offset: [f32; C],
    /// Moving mean (starts at 0).
    pub moving_mean: [f32; C],
    /// Moving variance (starts at 1).
    pub moving_variance: [f32; C],
    /// Training batches seen (saturates at `u64::MAX`).
    pub batches: u64,
    /// Batch mean of the last training step (what the backward pass reads).
    pub batch_mean: [f32; C],
    /// Batch population variance of the last training step.
    pub batch_variance: [f32; C],
}

impl<const C: usize> BatchNormArray<C> {
    /// Scale 1, offset 0, moving mean 0, moving variance 1, no batches.
    pub const fn new(config: Config) -> Self {
        Self::from_state(config, [0.0; C], [1.0; C], 0)
    }

    /// A layer with saved moving statistics, scale 1 and offset 0.
    pub const fn from_state(
        config: Config,
        moving_mean: [f32; C],
        moving_variance: [f32; C],
        batches: u64,
    ) -> Self {
        BatchNormArray {
            config,
            scale: [1.0; C],
            offset: [0.0; C],
            moving_mean,
            moving_variance,
            batches,
            batch_mean: [0.0; C],
            batch_variance: [0.0; C],
        }
    }

    /// The same layer with these scale and offset.
    pub const fn with_params(mut self, scale: [f32; C], offset: [f32; C]) -> Self {
        self.scale = scale;
        self.offset = offset;
        self
    }

    /// [`BatchNorm::train`] with the layer's own parameters, the batch
    /// statistics kept in `batch_mean` and `batch_variance`.
    pub fn train(&mut self, x: &[f32], y: &mut [f32], shape: Shape) -> Result<(), Error> {
        self.step(|bn, so, batch| bn.train(x, y, shape, so, batch))
    }

    /// [`BatchNorm::train_in_place`] with the layer's own parameters.
    pub fn train_in_place(&mut self, x: &mut [f32], shape: Shape) -> Result<(), Error> {
        self.step(|bn, so, batch| bn.train_in_place(x, shape, so, batch))
    }

    /// Runs `f` on a [`BatchNorm`] over the arrays and keeps its batch count.
    fn step(
        &mut self,
        f: impl FnOnce(&mut BatchNorm<'_>, ScaleOffset<'_>, &mut Batch<'_>) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let moving = MovingStats {
            mean: &mut self.moving_mean,
            variance: &mut self.moving_variance,
            batches: self.batches,
        };
        let mut bn = BatchNorm::new(self.config, moving)?;
        let mut batch = Batch {
            mean: &mut self.batch_mean,
            variance: &mut self.batch_variance,
        };
        f(
            &mut bn,
            ScaleOffset::new(&self.scale, &self.offset),
            &mut batch,
        )?;
        self.batches = bn.moving.batches;
        Ok(())
    }

    /// [`BatchNorm::infer`] with the layer's own parameters.
    pub fn infer(&self, x: &[f32], y: &mut [f32], shape: Shape) -> Result<(), Error> {
        shape.check("y", y.len())?;
        let p = self.check(x.len(), shape)?;
        normalize::run_folded(Simd::detect(), &mut Split::new(x, y), shape, &p);
        Ok(())
    }

    /// [`BatchNorm::infer_in_place`] with the layer's own parameters.
    pub fn infer_in_place(&self, x: &mut [f32], shape: Shape) -> Result<(), Error> {
        let p = self.check(x.len(), shape)?;
        normalize::run_folded(Simd::detect(), &mut InPlace::new(x), shape, &p);
        Ok(())
    }

    /// [`BatchNorm::backward`] of the last training step, with the layer's
    /// own parameters and kept batch statistics.
    pub fn backward(
        &self,
        x: &[f32],
        dy: &[f32],
        shape: Shape,
        grads: Gradients<'_>,
    ) -> Result<(), Error> {
        self.check(x.len(), shape)?;
        let so = ScaleOffset::new(&self.scale, &self.offset);
        let p = so.params(&self.batch_mean, &self.batch_variance, &self.config);
        Simd::detect().backward(x, dy, shape, &p, Mode::Training, grads)
    }

    /// Validates an inference call; its parameters.
    fn check(&self, x: usize, shape: Shape) -> Result<Params<'_>, Error> {
        if C == 0 {
            return Err(Error::ZeroChannels);
        }
        self.config.validate()?;
        shape.check("x", x)?;
        check_len(LAYER_CHANNELS, shape.channels, C)?;
        let so = ScaleOffset::new(&self.scale, &self.offset);
        Ok(so.params(&self.moving_mean, &self.moving_variance, &self.config))
    }
}
