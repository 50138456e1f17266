//! Tensor layouts and shapes, and their validation.

use crate::error::Error;

/// Where the channel index sits in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layout {
    /// Channels last (TensorFlow's default, and any `[rows, C]` matrix):
    /// element `(n, s, c)` is at `(n * S + s) * C + c`.
    Nhwc,
    /// Channels first (PyTorch and ONNX): element `(n, c, s)` is at
    /// `(n * C + c) * S + s`.
    Nchw,
}

/// A `batch x spatial x channels` tensor in one [`Layout`].
///
/// `spatial` is the product of all spatial dimensions (1 for a dense layer).
/// Every channel has `count = batch * spatial` elements.
///
/// The constructors take their sizes in memory order, outermost first, as
/// the frameworks write the tensor's dimensions: `nhwc(batch, spatial,
/// channels)` for `[N, H, W, C]`, `nchw(batch, channels, spatial)` for
/// `[N, C, H, W]`.
///
/// ```
/// use batchnorm::{Layout, Shape};
///
/// // A PyTorch `[8, 16, 5, 5]` activation and a Keras `[8, 5, 5, 16]` one.
/// let torch = Shape::nchw(8, 16, 5 * 5);
/// let keras = Shape::nhwc(8, 5 * 5, 16);
/// assert_eq!((torch.channels, keras.channels), (16, 16));
/// assert_eq!(torch.len()?, keras.len()?);
/// assert_eq!(torch.count()?, 200); // elements per channel
/// assert_eq!(Shape::rows(32, 10).layout, Layout::Nhwc); // a dense layer's input
/// # Ok::<(), batchnorm::Error>(())
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    /// Memory layout.
    pub layout: Layout,
    /// Number of batch elements `N`.
    pub batch: usize,
    /// Product of the spatial dimensions `S` (`H * W` for images).
    pub spatial: usize,
    /// Number of channels `C`.
    pub channels: usize,
}

impl Shape {
    /// A channels-last tensor, `[batch, spatial..., channels]`.
    pub const fn nhwc(batch: usize, spatial: usize, channels: usize) -> Shape {
        Shape {
            layout: Layout::Nhwc,
            batch,
            spatial,
            channels,
        }
    }

    /// A channels-first tensor, `[batch, channels, spatial...]`.
    pub const fn nchw(batch: usize, channels: usize, spatial: usize) -> Shape {
        Shape {
            layout: Layout::Nchw,
            batch,
            spatial,
            channels,
        }
    }

    /// A `[rows, channels]` matrix (a dense layer's input): NHWC with one
    /// spatial position.
    pub const fn rows(rows: usize, channels: usize) -> Shape {
        Shape::nhwc(rows, 1, channels)
    }

    /// Elements per channel, `batch * spatial`, or an error on overflow.
    pub fn count(&self) -> Result<usize, Error> {
        self.batch.checked_mul(self.spatial).ok_or(self.overflow())
    }

    /// Total number of elements, or an error on zero channels or overflow.
    pub fn len(&self) -> Result<usize, Error> {
        if self.channels == 0 {
            return Err(Error::ZeroChannels);
        }
        self.count()?
            .checked_mul(self.channels)
            .ok_or(self.overflow())
    }

    /// Whether the tensor has no elements (`Ok(true)` for a zero batch or
    /// spatial size).
    pub fn is_empty(&self) -> Result<bool, Error> {
        Ok(self.len()? == 0)
    }

    fn overflow(&self) -> Error {
        Error::ShapeOverflow {
            batch: self.batch,
            spatial: self.spatial,
            channels: self.channels,
        }
    }

    /// Validates the shape against a tensor slice named `what` and returns its
    /// element count.
    pub(crate) fn check(&self, what: &'static str, len: usize) -> Result<usize, Error> {
        let n = self.len()?;
        crate::error::check_len(what, len, n)?;
        Ok(n)
    }

    /// Validates a per-channel slice named `what`.
    pub(crate) fn check_channels(&self, what: &'static str, len: usize) -> Result<(), Error> {
        crate::error::check_len(what, len, self.channels)
    }
}
