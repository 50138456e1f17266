//! The one error type of the crate.

use core::fmt;

/// Why a kernel refused its input. Nothing is written to any output or state
/// when a function returns an error.
///
/// ```
/// use batchnorm::{moments, Error, Shape};
///
/// let x = [1.0f32; 6];
/// let (mut mean, mut var) = ([9.0f32; 3], [9.0f32; 3]);
/// // Two channels asked of a three-channel `mean`:
/// let e = moments(&x, Shape::nhwc(1, 3, 2), &mut mean, &mut var).unwrap_err();
/// assert_eq!(e, Error::Length { what: "mean", expected: 2, actual: 3 });
/// assert_eq!(e.to_string(), "`mean` has length 3, the shape needs 2");
/// assert_eq!(mean, [9.0; 3]); // untouched
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// A shape with zero channels.
    ZeroChannels,
    /// `batch * spatial * channels` does not fit in `usize`.
    ShapeOverflow {
        /// Number of batch elements.
        batch: usize,
        /// Product of the spatial dimensions.
        spatial: usize,
        /// Number of channels.
        channels: usize,
    },
    /// A slice does not have the length the shape asks for, or (`what ==
    /// "shape.channels"`) a layer is given a shape with another number of
    /// channels than it has.
    Length {
        /// Which argument (`"x"`, `"y"`, `"mean"`, ..., `"shape.channels"`).
        what: &'static str,
        /// The length the shape implies.
        expected: usize,
        /// The length given.
        actual: usize,
    },
    /// Statistics were asked of zero elements per channel.
    EmptyBatch,
    /// `epsilon` is zero, negative, NaN or infinite (with `epsilon = 0` a
    /// constant channel would normalize to `0 / 0`).
    Epsilon(f32),
    /// A decay (or momentum) outside `[0, 1]`, or NaN.
    Decay(f32),
    /// Merging statistics would take a count past `u64::MAX`.
    CountOverflow,
    /// A `Clamp` activation whose bounds are NaN or have `min > max`.
    Clamp {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
    /// A weight tensor of `len` elements that its
    /// [`WeightLayout`](crate::WeightLayout) cannot split into `channels`
    /// output channels (a length that does not divide, or zero groups,
    /// kernel size or depth multiplier).
    Weights {
        /// Length of the weight slice.
        len: usize,
        /// Output channels (the length of `mean`).
        channels: usize,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Error::ZeroChannels => f.write_str("shape has zero channels"),
            Error::ShapeOverflow {
                batch,
                spatial,
                channels,
            } => write!(f, "shape {batch} x {spatial} x {channels} overflows usize"),
            Error::Length {
                what,
                expected,
                actual,
            } if what == LAYER_CHANNELS => write!(
                f,
                "`{what}` is {actual}, the layer has {expected} channels"
            ),
            Error::Length {
                what,
                expected,
                actual,
            } => write!(
                f,
                "`{what}` has length {actual}, the shape needs {expected}"
            ),
            Error::EmptyBatch => f.write_str("statistics of an empty batch (count 0)"),
            Error::Epsilon(e) => write!(f, "epsilon {e} is not finite and > 0"),
            Error::CountOverflow => f.write_str("merged element count overflows u64"),
            Error::Decay(d) => write!(f, "decay {d} is not in [0, 1]"),
            Error::Clamp { min, max } => {
                write!(
                    f,
                    "clamp bounds min {min}, max {max}: need min <= max, no NaN"
                )
            }
            Error::Weights { len, channels } => write!(
                f,
                "a weight of {len} elements does not split into {channels} output channels in this layout"
            ),
        }
    }
}

impl core::error::Error for Error {}

/// `Err(Error::Length)` unless `actual == expected`.
/// `what` of an [`Error::Length`] that compares a shape's channel count
/// with a layer's.
pub(crate) const LAYER_CHANNELS: &str = "shape.channels";

pub(crate) fn check_len(what: &'static str, actual: usize, expected: usize) -> Result<(), Error> {
    if actual == expected {
        Ok(())
    } else {
        Err(Error::Length {
            what,
            expected,
            actual,
        })
    }
}

/// `Err(Error::Epsilon)` unless `eps` is finite and positive.
pub(crate) fn check_epsilon(eps: f32) -> Result<(), Error> {
    if eps.is_finite() && eps > 0.0 {
        Ok(())
    } else {
        Err(Error::Epsilon(eps))
    }
}
