//! The batch-normalization layer: a training step is the moments pass, the
//! normalization and the moving-average update in one call, so the moving
//! statistics cannot be left behind (TensorFlow 1.x's `UPDATE_OPS` trap).

use crate::ema::{self, Config};
use crate::error::{check_len, Error};
use crate::lanes::Simd;
use crate::moments;
use crate::normalize::{self, InPlace, Params, Split};
use crate::shape::Shape;

/// A batch-normalization layer over borrowed parameters and state.
///
/// It borrows the optional `scale` (gamma) and `offset` (beta), the moving
/// statistics it updates, and two per-channel buffers where [`train`]
/// leaves the batch mean and population variance (what a backward pass
/// needs), so that nothing is allocated and stack use does not grow with the
/// channel count.
///
/// [`train`]: BatchNorm::train
///
/// ```
/// use batchnorm::{BatchNorm, Config, Shape};
/// let (mut mm, mut mv) = ([0.0f32; 2], [1.0f32; 2]);
/// let (mut bm, mut bv) = ([0.0f32; 2], [0.0f32; 2]);
/// let mut bn = BatchNorm::new(Config::keras(), &mut mm, &mut mv, &mut bm, &mut bv).unwrap();
/// let x = [1.0, 10.0, 3.0, 30.0];
/// let mut y = [0.0; 4];
/// bn.train(&x, &mut y, Shape::rows(2, 2)).unwrap();
/// assert_eq!(bn.batch_mean(), &[2.0, 20.0]);
/// assert!((bn.moving_mean()[1] - 0.2).abs() < 1e-6); // 0 * 0.99 + 20 * 0.01
/// assert!(y[0] < 0.0 && y[2] > 0.0);
/// ```
#[derive(Debug)]
pub struct BatchNorm<'a> {
    config: Config,
    scale: Option<&'a [f32]>,
    offset: Option<&'a [f32]>,
    moving_mean: &'a mut [f32],
    moving_variance: &'a mut [f32],
    batch_mean: &'a mut [f32],
    batch_variance: &'a mut [f32],
    batches: u64,
    simd: Simd,
}

impl<'a> BatchNorm<'a> {
    /// A layer with `moving_mean.len()` channels. Initialise the moving
    /// statistics as the framework you follow does (Keras, PyTorch and ONNX
    /// start at mean 0, variance 1). `batch_mean` and `batch_variance`
    /// receive each training batch's statistics.
    ///
    /// Errors: zero channels, buffers of different lengths, or an invalid
    /// config.
    pub fn new(
        config: Config,
        moving_mean: &'a mut [f32],
        moving_variance: &'a mut [f32],
        batch_mean: &'a mut [f32],
        batch_variance: &'a mut [f32],
    ) -> Result<BatchNorm<'a>, Error> {
        ema::check_buffers(
            moving_mean.len(),
            moving_variance.len(),
            batch_mean.len(),
            batch_variance.len(),
        )?;
        config.validate()?;
        Ok(BatchNorm {
            config,
            scale: None,
            offset: None,
            moving_mean,
            moving_variance,
            batch_mean,
            batch_variance,
            batches: 0,
            simd: Simd::detect(),
        })
    }

    /// Uses `scale` (gamma, one per channel).
    pub fn with_scale(mut self, scale: &'a [f32]) -> Result<Self, Error> {
        check_len("scale", scale.len(), self.channels())?;
        self.scale = Some(scale);
        Ok(self)
    }

    /// Uses `offset` (beta, one per channel).
    pub fn with_offset(mut self, offset: &'a [f32]) -> Result<Self, Error> {
        check_len("offset", offset.len(), self.channels())?;
        self.offset = Some(offset);
        Ok(self)
    }

    /// Runs the kernels with lane width `simd` instead of [`Simd::detect`].
    pub fn with_simd(mut self, simd: Simd) -> Self {
        self.simd = simd;
        self
    }

    /// Number of channels.
    pub fn channels(&self) -> usize {
        self.moving_mean.len()
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Number of training steps taken.
    pub fn batches(&self) -> u64 {
        self.batches
    }

    /// The moving mean.
    pub fn moving_mean(&self) -> &[f32] {
        self.moving_mean
    }

    /// The moving variance.
    pub fn moving_variance(&self) -> &[f32] {
        self.moving_variance
    }

    /// The batch mean of the last [`train`](BatchNorm::train) (unspecified
    /// before the first).
    pub fn batch_mean(&self) -> &[f32] {
        self.batch_mean
    }

    /// The batch population variance of the last
    /// [`train`](BatchNorm::train) (what the output was normalized with).
    pub fn batch_variance(&self) -> &[f32] {
        self.batch_variance
    }

    fn check(&self, shape: Shape) -> Result<usize, Error> {
        shape.len()?;
        check_len("shape.channels", shape.channels, self.channels())?;
        shape.count()
    }

    /// A training step: batch moments, `y` normalized with them (population
    /// variance), then the moving statistics updated, all in one call.
    ///
    /// Errors (nothing written, state unchanged): lengths that do not match
    /// `shape`, a channel count that is not the layer's, or an empty batch.
    pub fn train(&mut self, x: &[f32], y: &mut [f32], shape: Shape) -> Result<(), Error> {
        shape.check("x", x.len())?;
        shape.check("y", y.len())?;
        self.statistics(x, shape)?;
        let p = self.batch_params();
        normalize::run_folded(self.simd, &mut Split { x, y }, shape, &p);
        Ok(())
    }

    /// [`train`](BatchNorm::train) overwriting `x` with the output.
    pub fn train_in_place(&mut self, x: &mut [f32], shape: Shape) -> Result<(), Error> {
        shape.check("x", x.len())?;
        self.statistics(x, shape)?;
        let p = self.batch_params();
        normalize::run_folded(self.simd, &mut InPlace(x), shape, &p);
        Ok(())
    }

    /// Inference: `y` normalized with the moving statistics.
    ///
    /// Errors (nothing written): lengths that do not match `shape`, or a
    /// channel count that is not the layer's.
    pub fn infer(&self, x: &[f32], y: &mut [f32], shape: Shape) -> Result<(), Error> {
        self.check(shape)?;
        shape.check("x", x.len())?;
        shape.check("y", y.len())?;
        let p = self.moving_params();
        normalize::run_folded(self.simd, &mut Split { x, y }, shape, &p);
        Ok(())
    }

    /// [`infer`](BatchNorm::infer) overwriting `x`.
    pub fn infer_in_place(&self, x: &mut [f32], shape: Shape) -> Result<(), Error> {
        self.check(shape)?;
        shape.check("x", x.len())?;
        let p = self.moving_params();
        normalize::run_folded(self.simd, &mut InPlace(x), shape, &p);
        Ok(())
    }

    /// Batch moments into the batch buffers and the moving update: the part
    /// of a training step before normalization. Validates first.
    fn statistics(&mut self, x: &[f32], shape: Shape) -> Result<(), Error> {
        let count = self.check(shape)?;
        if count == 0 {
            return Err(Error::EmptyBatch);
        }
        moments::mean_variance(self.simd, x, shape, self.batch_mean, self.batch_variance);
        self.batches += 1;
        ema::apply(
            self.moving_mean,
            self.moving_variance,
            self.batch_mean,
            self.batch_variance,
            count as u64,
            self.batches,
            &self.config,
        );
        Ok(())
    }

    fn batch_params(&self) -> Params<'_> {
        self.params(self.batch_mean, self.batch_variance)
    }

    fn moving_params(&self) -> Params<'_> {
        self.params(self.moving_mean, self.moving_variance)
    }

    fn params<'s>(&'s self, mean: &'s [f32], variance: &'s [f32]) -> Params<'s> {
        Params {
            mean,
            variance,
            scale: self.scale,
            offset: self.offset,
            epsilon: self.config.epsilon,
            activation: self.config.activation,
        }
    }
}

/// A layer that owns its parameters and state in `[f32; C]` arrays, for
/// firmware that wants everything in a `static`. It runs the same code as
/// [`BatchNorm`].
///
/// ```
/// use batchnorm::{BatchNormArray, Config, Shape};
/// static mut _LAYER: BatchNormArray<16> = BatchNormArray::new(Config::pytorch());
/// let mut bn = BatchNormArray::<3>::new(Config::onnx());
/// let x = [0.0, 1.0, 2.0, 2.0, 3.0, 4.0];
/// let mut y = [0.0; 6];
/// bn.train(&x, &mut y, Shape::rows(2, 3)).unwrap();
/// assert_eq!(bn.batches, 1);
/// bn.infer(&x, &mut y, Shape::rows(2, 3)).unwrap();
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
    /// Batch mean of the last training step.
    pub batch_mean: [f32; C],
    /// Batch population variance of the last training step.
    pub batch_variance: [f32; C],
    /// Training steps taken.
    pub batches: u64,
}

impl<const C: usize> BatchNormArray<C> {
    /// Scale 1, offset 0, moving mean 0, moving variance 1.
    pub const fn new(config: Config) -> Self {
        BatchNormArray {
            config,
            scale: [1.0; C],
            offset: [0.0; C],
            moving_mean: [0.0; C],
            moving_variance: [1.0; C],
            batch_mean: [0.0; C],
            batch_variance: [0.0; C],
            batches: 0,
        }
    }

    fn layer(&mut self) -> Result<BatchNorm<'_>, Error> {
        let mut l = BatchNorm::new(
            self.config,
            &mut self.moving_mean,
            &mut self.moving_variance,
            &mut self.batch_mean,
            &mut self.batch_variance,
        )?
        .with_scale(&self.scale)?
        .with_offset(&self.offset)?;
        l.batches = self.batches;
        Ok(l)
    }

    /// [`BatchNorm::train`].
    pub fn train(&mut self, x: &[f32], y: &mut [f32], shape: Shape) -> Result<(), Error> {
        let mut l = self.layer()?;
        l.train(x, y, shape)?;
        self.batches = l.batches;
        Ok(())
    }

    /// [`BatchNorm::train_in_place`].
    pub fn train_in_place(&mut self, x: &mut [f32], shape: Shape) -> Result<(), Error> {
        let mut l = self.layer()?;
        l.train_in_place(x, shape)?;
        self.batches = l.batches;
        Ok(())
    }

    /// [`BatchNorm::infer`].
    pub fn infer(&mut self, x: &[f32], y: &mut [f32], shape: Shape) -> Result<(), Error> {
        self.layer()?.infer(x, y, shape)
    }

    /// [`BatchNorm::infer_in_place`].
    pub fn infer_in_place(&mut self, x: &mut [f32], shape: Shape) -> Result<(), Error> {
        self.layer()?.infer_in_place(x, shape)
    }
}
