//! Folding inference-mode batch normalization into the weights and bias of
//! the dense or convolution layer before it (crate docs §1, Folding for
//! inference), as PyTorch's `fuse_conv_bn_weights` /
//! `fuse_linear_bn_weights`, the TensorFlow Lite converter and ONNX
//! Runtime's optimizer do: with `a[o] = scale[o] / sqrt(var[o] + eps)`,
//!
//! `w'[o, …] = w[o, …] * a[o]`, `b'[o] = (b[o] - mean[o]) * a[o] + offset[o]`
//!
//! (an absent bias is 0), so that `layer'(x) == batch_norm(layer(x))`.
//!
//! Each result is computed in `f64` from the `f32` inputs and rounded once:
//! `|w' - w a| <= u |w a|` and `|b' - b'_exact| <= u |b'_exact| + 2^-50
//! (|(b - mean) a| + |offset|)` with `u = f32::EPSILON / 2` (the `f64`
//! square root, division, product and sum each add at most `2^-53`
//! relative).

use crate::error::{check_len, Error};
use crate::normalize::Params;
use crate::shape::Shape;

/// Where the output channel sits in a weight tensor, which fixes the
/// channel of every weight element. `O` is the number of output channels
/// (the length of the batch norm's `mean`).
///
/// ```
/// use batchnorm::{fold_into_weights, Activation, Params, WeightLayout};
/// // ConvTranspose2d(in = 2, out = 4, kernel 1x1, groups = 2): [I, O / g, 1, 1].
/// // Input channel 0 feeds outputs 0, 1; input channel 1 feeds outputs 2, 3.
/// let mut w = [1.0f32; 4];
/// let params = Params {
///     mean: &[0.0; 4],
///     variance: &[0.0; 4],
///     scale: Some(&[1.0, 2.0, 3.0, 4.0]),
///     offset: None,
///     epsilon: 1.0,
///     activation: Activation::None,
/// };
/// let mut b = [0.0; 4];
/// let layout = WeightLayout::OutSecond { groups: 2, kernel: 1 };
/// fold_into_weights(&mut w, None, layout, &params, &mut b).unwrap();
/// assert_eq!(w, [1.0, 2.0, 3.0, 4.0]);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WeightLayout {
    /// Output channel first, `[O, …]`: PyTorch `Conv2d` `OIHW` (grouped and
    /// depthwise convolutions included: `[O, I / groups, kh, kw]`), `Conv1d`,
    /// `Conv3d`, and `Linear` `[out, in]`.
    OutFirst,
    /// Output channel second, `[I, O / groups, …]`: PyTorch `ConvTranspose2d`
    /// `IOHW`. `kernel` is the product of the dimensions after the output
    /// channel (`kh * kw`; 1 if none). Input channel `i` belongs to group
    /// `i / (I / groups)`, and element `[i, j, …]` to output channel
    /// `group * (O / groups) + j`.
    OutSecond {
        /// Number of groups (1 for an ordinary transposed convolution).
        groups: usize,
        /// Elements per `(input, output)` channel pair: `kh * kw`.
        kernel: usize,
    },
    /// Output channel last, `[…, O]`: TensorFlow/Keras `Conv2D` `HWIO` and
    /// `Dense` `[in, out]`.
    OutLast,
    /// Keras `DepthwiseConv2D` `[kh, kw, I, M]`: output channel `i * M + m`,
    /// which is where it sits in memory (`O = I * M`, the last two
    /// dimensions together). `multiplier` is `M`.
    Hwim {
        /// The depth multiplier `M`.
        multiplier: usize,
    },
}

/// Folds inference-mode batch normalization (`params`: the moving `mean`
/// and `variance`, `scale`, `offset`, `epsilon`; the activation is not part
/// of the fold and stays after the folded layer) into the preceding layer:
/// scales `weight` in place and writes the folded bias to `bias_out`.
/// `bias` is the layer's own bias (`None`: no bias, i.e. 0).
///
/// Each result is computed in `f64` from the `f32` inputs and rounded once:
/// `|w' - w a| <= u |w a|` and `|b' - b'_exact| <= u |b'_exact| + 2^-50
/// (|(b - mean) a| + |offset|)` with `u = f32::EPSILON / 2`.
///
/// Errors (nothing written): `mean`, `variance`, `scale`, `offset`, `bias` or
/// `bias_out` lengths that differ (zero channels included), a bad `epsilon`,
/// or [`Error::Weights`] when `weight` does not split into `mean.len()`
/// output channels in `layout`.
///
/// ```
/// use batchnorm::{fold_into_weights, Activation, Params, WeightLayout};
/// // A Linear layer [out = 2, in = 3] followed by batch norm.
/// let mut w = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
/// let bias = [0.5, -0.5];
/// let params = Params {
///     mean: &[0.5, 1.5],
///     variance: &[3.0, 0.0],
///     scale: Some(&[2.0, 1.0]),
///     offset: Some(&[0.0, 1.0]),
///     epsilon: 1.0,
///     activation: Activation::None,
/// };
/// let mut b = [0.0; 2];
/// fold_into_weights(&mut w, Some(&bias), WeightLayout::OutFirst, &params, &mut b).unwrap();
/// assert_eq!(w, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]); // a = [1, 1]
/// assert_eq!(b, [0.0, -1.0]);
/// ```
pub fn fold_into_weights(
    weight: &mut [f32],
    bias: Option<&[f32]>,
    layout: WeightLayout,
    params: &Params<'_>,
    bias_out: &mut [f32],
) -> Result<(), Error> {
    let o = params.mean.len();
    let shape = Shape::rows(1, o);
    shape.len()?;
    params.validate(shape)?;
    if let Some(b) = bias {
        check_len("bias", b.len(), o)?;
    }
    check_len("bias_out", bias_out.len(), o)?;
    let len = weight.len();
    let bad = Error::Weights { len, channels: o };
    let divides = |block: usize| block != 0 && len != 0 && len.is_multiple_of(block);
    match layout {
        WeightLayout::OutFirst | WeightLayout::OutLast if !divides(o) => return Err(bad),
        WeightLayout::Hwim { multiplier }
            if multiplier == 0 || !o.is_multiple_of(multiplier) || !divides(o) =>
        {
            return Err(bad)
        }
        WeightLayout::OutSecond { groups, kernel } => {
            // [I, O / g, kernel] with I a multiple of g.
            let per = if groups != 0 && o.is_multiple_of(groups) {
                o / groups
            } else {
                0
            };
            let block = per.checked_mul(kernel).unwrap_or(0);
            if !divides(block) || !len.checked_div(block).unwrap_or(0).is_multiple_of(groups) {
                return Err(bad);
            }
        }
        _ => {}
    }
    // Validated: every channel index below is < o.
    // `get` keeps the panic paths out; every index is in range.
    let at = |s: &[f32], c: usize| s.get(c).copied().unwrap_or(0.0) as f64;
    let a = |c: usize| -> f64 {
        let sc = params.scale.map_or(1.0, |s| at(s, c));
        sc / libm::sqrt(at(params.variance, c) + params.epsilon as f64)
    };
    for (c, out) in bias_out.iter_mut().enumerate() {
        let b = bias.map_or(0.0, |b| at(b, c));
        let offset = params.offset.map_or(0.0, |s| at(s, c));
        *out = ((b - at(params.mean, c)) * a(c) + offset) as f32;
    }
    let scale = |w: &mut f32, a: f64| *w = (*w as f64 * a) as f32;
    match layout {
        WeightLayout::OutFirst => {
            for (c, block) in weight.chunks_exact_mut((len / o).max(1)).enumerate() {
                let ac = a(c);
                block.iter_mut().for_each(|w| scale(w, ac));
            }
        }
        WeightLayout::OutLast | WeightLayout::Hwim { .. } => {
            // Coefficients of a window of channels, then every row's slice.
            const WIN: usize = 64;
            let mut aw = [0.0f64; WIN];
            let mut c0 = 0;
            while c0 < o {
                let cw = (o - c0).min(WIN);
                for (k, v) in aw[..cw].iter_mut().enumerate() {
                    *v = a(c0 + k);
                }
                for row in weight.chunks_exact_mut(o.max(1)) {
                    for (w, &ac) in row[c0..c0 + cw].iter_mut().zip(&aw[..cw]) {
                        scale(w, ac);
                    }
                }
                c0 += cw;
            }
        }
        WeightLayout::OutSecond { groups, kernel } => {
            let per = o.checked_div(groups).unwrap_or(0);
            let inputs = len / (per * kernel).max(1);
            let in_per_group = inputs.checked_div(groups).unwrap_or(0);
            for (i, block) in weight.chunks_exact_mut((per * kernel).max(1)).enumerate() {
                let first = i.checked_div(in_per_group).unwrap_or(0) * per;
                for (j, k) in block.chunks_exact_mut(kernel.max(1)).enumerate() {
                    let ac = a(first + j);
                    k.iter_mut().for_each(|w| scale(w, ac));
                }
            }
        }
    }
    Ok(())
}
