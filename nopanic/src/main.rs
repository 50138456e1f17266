//! The link test: every public function and method of `batchnorm`, called
//! with arguments the optimizer cannot see through (`black_box` on every
//! slice, shape, width and config), in a binary whose panic handler calls a
//! function that does not exist. If any panic path (a bounds check, an
//! overflow check, an `unwrap`, a division by a value that might be zero)
//! survives optimization, the handler stays reachable and the link fails
//! with `undefined symbol: batchnorm_panic_path_survived`.
//!
//! With the `explain` feature the handler is a plain loop instead, so the
//! binary links and `.ci/nopanic --explain` can list the surviving panic
//! call sites with their inlined source lines.
//!
//! The `reference` module is a test oracle that documents its panics
//! (mismatched slices are a bug in the test calling it) and is not called.
#![no_std]
#![no_main]

use batchnorm::{
    accumulate, affine, affine_in_place, backward, backward_in_place, fold, fold_into_weights,
    moments, normalize, normalize_in_place, update_moving, Activation, Batch, BatchNorm,
    BatchNormArray, Config, Error, Gradients, Layout, Mode, Moments, Momentum, MovingStats, Params,
    ScaleOffset, Shape, Simd, Variance, WeightLayout,
};
use core::hint::black_box;

/// Opaque: the optimizer knows nothing about the value.
#[inline(always)]
fn o<T>(t: T) -> T {
    black_box(t)
}

/// Keeps a result alive, so that no call is dropped as dead code.
#[inline(always)]
fn keep<T>(t: T) {
    black_box(t);
}

const N: usize = 96;

fn shape() -> Shape {
    let layout = if o(true) { Layout::Nhwc } else { Layout::Nchw };
    Shape {
        layout,
        batch: o(2),
        spatial: o(3),
        channels: o(4),
    }
}

fn activation() -> Activation {
    match o(3u8) {
        0 => Activation::None,
        1 => Activation::Relu,
        2 => Activation::Relu6,
        _ => Activation::Clamp {
            min: o(-1.0),
            max: o(1.0),
        },
    }
}

fn config() -> Config {
    let c = match o(5u8) {
        0 => Config::keras(),
        1 => Config::tf_fused(o(0.01)),
        2 => Config::tf_layers(o(false)),
        3 => Config::pytorch(),
        4 => Config::pytorch_momentum(o(None)),
        _ => Config::onnx(),
    };
    let c = o(c.with_activation(activation()).with_epsilon(o(1e-3)));
    keep(c.validate());
    c
}

#[inline(never)]
fn shapes() {
    let s = shape();
    keep(s.count());
    keep(s.len());
    keep(s.is_empty());
    keep(Shape::nhwc(o(1), o(2), o(3)));
    keep(Shape::nchw(o(1), o(2), o(3)));
    keep(Shape::rows(o(1), o(2)));
}

#[inline(never)]
fn statistics(x: &[f32], mean: &mut [f32], var: &mut [f32], rec: &mut [Moments]) {
    keep(moments(o(x), shape(), o(&mut *mean), o(&mut *var)));
    keep(accumulate(o(x), shape(), o(&mut *rec)));
    let simd = o(Simd::default());
    keep(simd.moments(o(x), shape(), o(&mut *mean), o(&mut *var)));
    keep(simd.accumulate(o(x), shape(), o(&mut *rec)));
    keep(Simd::detect().lanes());
    keep(o(Simd::ALL[o(0) % 4]).lanes());
    let a = o(rec.first().copied().unwrap_or(Moments::EMPTY));
    let b = o(Moments::EMPTY);
    keep(a.merge(b));
    keep(Moments::from_le_bytes(o(a.to_le_bytes())));
    let (left, right) = rec.split_at_mut(o(2).min(rec.len()));
    keep(Moments::merge_slice(o(left), o(&*right)));
    keep(a.mean());
    let kind = if o(true) {
        Variance::Population
    } else {
        Variance::Sample
    };
    keep(a.variance(kind));
}

#[inline(never)]
fn normalization(x: &mut [f32], y: &mut [f32], c: &mut [[f32; 4]; 6]) {
    let [m, v, s, b, fa, fb] = c;
    let scale = if o(true) { Some(&s[..]) } else { None };
    let offset = if o(true) { Some(&b[..]) } else { None };
    keep(fold(
        o(&m[..]),
        o(&v[..]),
        o(scale),
        o(offset),
        o(1e-3),
        o(&mut fa[..]),
        o(&mut fb[..]),
    ));
    keep(affine(
        o(x),
        o(&mut *y),
        shape(),
        o(&fa[..]),
        o(&fb[..]),
        activation(),
    ));
    keep(affine_in_place(
        o(&mut *y),
        shape(),
        o(&fa[..]),
        o(&fb[..]),
        activation(),
    ));
    let params = o(Params {
        mean: o(&m[..]),
        variance: o(&v[..]),
        scale: o(scale),
        offset: o(offset),
        epsilon: o(1e-5),
        activation: activation(),
    });
    keep(params.activation.validate());
    keep(params.activation.apply(o(0.5)));
    keep(normalize(o(x), o(&mut *y), shape(), &params));
    keep(normalize_in_place(o(&mut *y), shape(), &params));
    let simd = o(Simd::default());
    keep(simd.affine(
        o(x),
        o(&mut *y),
        shape(),
        o(&fa[..]),
        o(&fb[..]),
        activation(),
    ));
    keep(simd.affine_in_place(o(&mut *y), shape(), o(&fa[..]), o(&fb[..]), activation()));
    keep(simd.normalize(o(x), o(&mut *y), shape(), &params));
    keep(simd.normalize_in_place(o(&mut *x), shape(), &params));
}

#[inline(never)]
fn moving(c: &mut [[f32; 4]; 6]) {
    let [mm, mv, bm, bv, _, _] = c;
    let cfg = config();
    let mut state = MovingStats {
        mean: o(&mut mm[..]),
        variance: o(&mut mv[..]),
        batches: o(3),
    };
    keep(update_moving(
        o(&bm[..]),
        o(&bv[..]),
        o(7),
        &cfg,
        &mut state,
    ));
    let momentum = if o(true) {
        Momentum::Decay(o(0.9))
    } else {
        Momentum::Cumulative
    };
    keep(momentum.validate());
    keep(momentum.decay(o(u64::MAX)));
    keep(momentum.weight(o(u64::MAX)));
}

fn mode() -> Mode {
    if o(true) {
        Mode::Training
    } else {
        Mode::Inference
    }
}

#[inline(never)]
fn gradients(x: &mut [f32], y: &mut [f32], c: &mut [[f32; 4]; 6]) {
    let [m, v, s, b, ds, db] = c;
    let params = o(Params {
        mean: o(&m[..]),
        variance: o(&v[..]),
        scale: o(Some(&s[..])),
        offset: o(Some(&b[..])),
        epsilon: o(1e-5),
        activation: activation(),
    });
    let grads = Gradients {
        dx: o(&mut *y),
        dscale: o(&mut ds[..]),
        doffset: o(&mut db[..]),
    };
    keep(backward(o(&*x), o(&*x), shape(), &params, mode(), grads));
    keep(backward_in_place(
        o(&*x),
        o(&mut *y),
        shape(),
        &params,
        mode(),
        o(&mut ds[..]),
        o(&mut db[..]),
    ));
    let simd = o(Simd::default());
    let grads = Gradients {
        dx: o(&mut *y),
        dscale: o(&mut ds[..]),
        doffset: o(&mut db[..]),
    };
    keep(simd.backward(o(&*x), o(&*x), shape(), &params, mode(), grads));
    keep(simd.backward_in_place(
        o(&*x),
        o(&mut *y),
        shape(),
        &params,
        mode(),
        o(&mut ds[..]),
        o(&mut db[..]),
    ));
    let layout = match o(3u8) {
        0 => WeightLayout::OutFirst,
        1 => WeightLayout::OutSecond {
            groups: o(2),
            kernel: o(3),
        },
        2 => WeightLayout::OutLast,
        _ => WeightLayout::Hwim { multiplier: o(2) },
    };
    let bias = if o(true) { Some(&b[..]) } else { None };
    let params = Params {
        scale: o(None),
        offset: o(None),
        ..params
    };
    keep(fold_into_weights(
        o(&mut *x),
        o(bias),
        layout,
        &params,
        o(&mut ds[..]),
    ));
}

#[inline(never)]
fn layer(x: &mut [f32], y: &mut [f32], c: &mut [[f32; 4]; 6]) -> Result<(), Error> {
    let [mm, mv, bm, bv, s, b] = c;
    let state = MovingStats {
        mean: o(&mut mm[..]),
        variance: o(&mut mv[..]),
        batches: o(0),
    };
    let mut bn = BatchNorm::new(config(), state)?.with_simd(o(Simd::X8));
    let so = o(ScaleOffset::new(o(&s[..]), o(&b[..])));
    let mut batch = Batch {
        mean: o(&mut bm[..]),
        variance: o(&mut bv[..]),
    };
    keep(bn.channels());
    keep(bn.config());
    keep(bn.moving().batches);
    keep(bn.train(o(x), o(&mut *y), shape(), so, &mut batch));
    keep(bn.train_in_place(o(&mut *y), shape(), so, &mut batch));
    keep(bn.infer(o(x), o(&mut *y), shape(), so));
    keep(bn.infer_in_place(o(&mut *y), shape(), so));
    let (mut ds, mut db) = ([0.0f32; 4], [0.0f32; 4]);
    let grads = Gradients {
        dx: o(&mut *y),
        dscale: o(&mut ds[..]),
        doffset: o(&mut db[..]),
    };
    keep(bn.backward(o(x), o(x), shape(), so, &batch, grads));
    let grads = Gradients {
        dx: o(&mut *y),
        dscale: o(&mut ds[..]),
        doffset: o(&mut db[..]),
    };
    keep(bn.backward_infer(o(x), o(x), shape(), o(ScaleOffset::NONE), grads));
    keep(bn.into_moving().batches);
    Ok(())
}

#[inline(never)]
fn layer_array(x: &mut [f32], y: &mut [f32]) {
    let l = BatchNormArray::<4>::from_state(config(), o([0.5; 4]), o([2.0; 4]), o(9));
    let mut l = o(l.with_params(o([1.0; 4]), o([0.0; 4])));
    keep(l.train(o(x), o(&mut *y), shape()));
    keep(l.train_in_place(o(&mut *y), shape()));
    keep(l.infer(o(x), o(&mut *y), shape()));
    keep(l.infer_in_place(o(&mut *y), shape()));
    let (mut ds, mut db) = ([0.0f32; 4], [0.0f32; 4]);
    let grads = Gradients {
        dx: o(&mut *y),
        dscale: o(&mut ds[..]),
        doffset: o(&mut db[..]),
    };
    keep(l.backward(o(x), o(x), shape(), grads));
    keep(&l);
}

#[cfg(feature = "fmt")]
#[inline(never)]
fn display() {
    use core::fmt::Write;
    struct Sink(usize);
    impl Write for Sink {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            self.0 = self.0.wrapping_add(s.len());
            Ok(())
        }
    }
    let e = o(Error::Epsilon(o(-1.0)));
    let mut sink = Sink(0);
    keep(write!(sink, "{e} {e:?}"));
    keep(sink.0);
}

fn run() -> Option<()> {
    // Every slice's length is opaque too (`get_mut` with an opaque bound:
    // the test's own code has no panic path either).
    let mut x = o([1.5f32; N]);
    let mut y = o([0.0f32; N]);
    let (mut mean, mut var) = ([0.0f32; 8], [0.0f32; 8]);
    let mut rec = [Moments::EMPTY; 8];
    let mut c = o([[1.0f32; 4]; 6]);
    let (n, cs) = (o(N), o(4));
    let (x, y) = (x.get_mut(..n)?, y.get_mut(..n)?);
    shapes();
    statistics(
        x,
        mean.get_mut(..cs)?,
        var.get_mut(..cs)?,
        rec.get_mut(..cs)?,
    );
    normalization(x, y, &mut c);
    moving(&mut c);
    gradients(x, y, &mut c);
    keep(layer(x, y, &mut c));
    layer_array(x, y);
    #[cfg(feature = "fmt")]
    display();
    Some(())
}

/// The reset handler (thumbv7em) or process entry (x86-64).
#[no_mangle]
pub extern "C" fn _start() -> ! {
    keep(run());
    #[allow(clippy::empty_loop)]
    loop {}
}

#[cfg(not(feature = "explain"))]
extern "C" {
    /// Defined nowhere: referencing it fails the link.
    fn batchnorm_panic_path_survived() -> !;
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    #[cfg(not(feature = "explain"))]
    // SAFETY: never called in a binary that links; a binary where it could
    // be called does not link.
    unsafe {
        batchnorm_panic_path_survived()
    }
    #[cfg(feature = "explain")]
    #[allow(clippy::empty_loop)]
    loop {}
}
