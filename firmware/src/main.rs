//! The Cortex-M4F test image: every public kernel on fixed inputs (both
//! layouts, channel counts 1 to 1000, shapes that need the largest
//! windows), each result checked on the device against the `f64`
//! reference (`batchnorm::reference`, crate docs §3 bounds), the stack painted
//! around every call. Prints `PASS`/`FAIL` per kernel and a stack table
//! through semihosting, then exits with the status (SYS_EXIT).
#![no_std]
#![no_main]

use batchnorm::reference::{self, Mismatch};
use batchnorm::{
    accumulate, affine, affine_in_place, fold, moments, normalize, normalize_in_place,
    update_moving, Activation, Batch, BatchNorm, Config, Gradients, Mode, Moments, MovingStats,
    Params, ScaleOffset, Shape, Simd, Variance,
};
use batchnorm_firmware::{exit, stack_use};
use cortex_m_rt::entry;
use cortex_m_semihosting::hprintln;

/// Largest tensor and channel count among the shapes below.
const MAX_LEN: usize = 12288;
const MAX_C: usize = 1024;

/// The shapes every kernel runs on: both layouts, channel counts 1, 3, 16,
/// 64, 300 and 1000, lcm(C, lanes) above 128 (C = 129, 127 with four
/// lanes), NCHW with many channels and runs shorter than a vector (the
/// periodic walk's widest windows) and with long runs (the run groups).
const SHAPES: [Shape; 20] = [
    Shape::nhwc(8, 4, 1),
    Shape::nhwc(5, 3, 3),
    Shape::nhwc(700, 1, 3),
    Shape::nhwc(4, 5, 16),
    Shape::nhwc(3, 2, 64),
    Shape::nhwc(4, 1, 127),
    Shape::nhwc(4, 1, 129),
    Shape::nhwc(2, 3, 300),
    Shape::nhwc(5, 1, 1000),
    Shape::nhwc(1, 1, 1000),
    Shape::nchw(4, 1, 37),
    Shape::nchw(3, 3, 50),
    Shape::nchw(2, 16, 9),
    Shape::nchw(2, 64, 5),
    Shape::nchw(2, 300, 4),
    Shape::nchw(2, 300, 17),
    Shape::nchw(3, 200, 3),
    Shape::nchw(2, 1000, 2),
    Shape::nchw(2, 1000, 1),
    Shape::nchw(1, 3, 1200),
];

const ACTIVATIONS: [Activation; 4] = [
    Activation::None,
    Activation::Relu,
    Activation::Relu6,
    Activation::Clamp {
        min: -1.5,
        max: 2.0,
    },
];

/// Number of kernels in the report.
const KINDS: usize = 15;

/// The kernels, in the order of the report.
#[derive(Clone, Copy)]
#[repr(usize)]
enum K {
    Moments,
    Accumulate,
    Merge,
    Fold,
    Affine,
    AffineInPlace,
    Normalize,
    NormalizeInPlace,
    UpdateMoving,
    Train,
    TrainInPlace,
    Infer,
    InferInPlace,
    Backward,
    BackwardInfer,
}

const NAMES: [&str; KINDS] = [
    "moments",
    "accumulate",
    "Moments::merge",
    "fold",
    "affine",
    "affine_in_place",
    "normalize",
    "normalize_in_place",
    "update_moving",
    "BatchNorm::train",
    "BatchNorm::train_in_place",
    "BatchNorm::infer",
    "BatchNorm::infer_in_place",
    "BatchNorm::backward",
    "BatchNorm::backward_infer",
];

/// Per kernel: calls, failures, worst stack (`usize::MAX`: beyond the
/// painted region) and the shape it was measured on.
struct Report {
    calls: [u32; KINDS],
    fails: [u32; KINDS],
    stack: [usize; KINDS],
    worst: [Option<Shape>; KINDS],
}

impl Report {
    fn stack(&mut self, k: K, shape: Shape, f: &mut dyn FnMut()) {
        let used = stack_use(f).unwrap_or(usize::MAX);
        let i = k as usize;
        self.calls[i] += 1;
        if used > self.stack[i] || self.worst[i].is_none() {
            self.stack[i] = self.stack[i].max(used);
            self.worst[i] = Some(shape);
        }
    }

    fn check(&mut self, k: K, shape: Shape, r: Result<(), Mismatch>) {
        if let Err(m) = r {
            self.fails[k as usize] += 1;
            hprintln!("FAIL {} on {:?}: {}", NAMES[k as usize], shape, m);
        }
    }

    fn error(&mut self, k: K, shape: Shape, e: batchnorm::Error) {
        self.fails[k as usize] += 1;
        hprintln!("FAIL {} on {:?}: error {:?}", NAMES[k as usize], shape, e);
    }
}

/// SplitMix64, as the host tests use.
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Roughly normal: the sum of four uniforms, centred and scaled.
    fn noise(&mut self) -> f64 {
        let mut s = 0.0;
        for _ in 0..4 {
            s += (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        }
        (s - 2.0) * 1.7
    }
}

/// Channel `c` drawn around `mean(c)` with spread `sd(c)`: small, large and
/// ill-conditioned (mean 1e3 sigma: within the range where a chain of
/// merged `f32` records keeps the bounds) channels side by side.
fn fill(rng: &mut Rng, x: &mut [f32], shape: Shape) {
    for n in 0..shape.batch {
        for s in 0..shape.spatial {
            for c in 0..shape.channels {
                let (m, sd) = match c % 5 {
                    0 => (0.0, 1.0),
                    1 => (-3.0, 0.5),
                    2 => (1.0e3, 1.0),
                    3 => (250.0, 40.0),
                    _ => (0.1, 1.0e-3),
                };
                x[reference::index(shape, n, s, c)] = (m + sd * rng.noise()) as f32;
            }
        }
    }
}

struct Buffers {
    x: [f32; MAX_LEN],
    y: [f32; MAX_LEN],
    z: [f32; MAX_LEN],
    c: [[f32; MAX_C]; 8],
    rec: [[Moments; MAX_C]; 3],
}

static mut BUF: Buffers = Buffers {
    x: [0.0; MAX_LEN],
    y: [0.0; MAX_LEN],
    z: [0.0; MAX_LEN],
    c: [[0.0; MAX_C]; 8],
    rec: [[Moments::EMPTY; MAX_C]; 3],
};

#[entry]
fn main() -> ! {
    // SAFETY: the only reference to the buffers, taken once.
    let buf = unsafe { &mut *core::ptr::addr_of_mut!(BUF) };
    let mut r = Report {
        calls: [0; KINDS],
        fails: [0; KINDS],
        stack: [0; KINDS],
        worst: [None; KINDS],
    };
    hprintln!(
        "batchnorm firmware test: Simd::detect() = {:?}",
        Simd::detect()
    );
    let mut rng = Rng(12);
    for (i, &shape) in SHAPES.iter().enumerate() {
        let act = ACTIVATIONS[i % ACTIVATIONS.len()];
        run_shape(&mut r, &mut rng, buf, shape, act);
    }
    hprintln!();
    hprintln!(
        "{:<28} {:>6} {:>9}  first shape at the max",
        "kernel",
        "calls",
        "stack B"
    );
    let mut ok = true;
    for (i, name) in NAMES.iter().enumerate() {
        let verdict = if r.fails[i] == 0 && r.calls[i] > 0 {
            "PASS"
        } else {
            ok = false;
            "FAIL"
        };
        let stack = r.stack[i];
        match r.worst[i] {
            Some(s) if stack != usize::MAX => hprintln!(
                "{} {:<28} {:>6} {:>9}  {:?} {}x{}x{}",
                verdict,
                name,
                r.calls[i],
                stack,
                s.layout,
                s.batch,
                s.spatial,
                s.channels
            ),
            _ => hprintln!(
                "{} {:<28} {:>6} {:>9}  (over the painted {} B)",
                verdict,
                name,
                r.calls[i],
                ">",
                batchnorm_firmware::PAINTED
            ),
        }
    }
    let worst = r.stack.iter().copied().max().unwrap_or(0);
    hprintln!("STACK-MAX {}", worst);
    hprintln!("{}", if ok { "ALL PASS" } else { "SOME FAILED" });
    exit(ok)
}

fn run_shape(r: &mut Report, rng: &mut Rng, buf: &mut Buffers, shape: Shape, act: Activation) {
    let len = shape.batch * shape.spatial * shape.channels;
    let ch = shape.channels;
    let count = (shape.batch * shape.spatial) as u64;
    let Buffers { x, y, z, c, rec } = buf;
    let x = &mut x[..len];
    let y = &mut y[..len];
    let z = &mut z[..len];
    fill(rng, x, shape);
    let [mean, var, scale, offset, a, b, mm, mv] = c;
    let (mean, var, a, b) = (&mut mean[..ch], &mut var[..ch], &mut a[..ch], &mut b[..ch]);
    let (scale, offset, mm, mv) = (
        &mut scale[..ch],
        &mut offset[..ch],
        &mut mm[..ch],
        &mut mv[..ch],
    );
    for i in 0..ch {
        scale[i] = 0.5 + (i % 4) as f32 * 0.25;
        offset[i] = (i % 3) as f32 - 1.0;
    }

    // moments, with the default width and with every width.
    let mut res = Ok(());
    r.stack(K::Moments, shape, &mut || {
        res = moments(x, shape, mean, var)
    });
    match res {
        Ok(()) => r.check(
            K::Moments,
            shape,
            reference::check_moments(x, shape, mean, var),
        ),
        Err(e) => r.error(K::Moments, shape, e),
    }
    for simd in Simd::ALL {
        let mut res = Ok(());
        r.stack(K::Moments, shape, &mut || {
            res = simd.moments(x, shape, mean, var)
        });
        match res {
            Ok(()) => r.check(
                K::Moments,
                shape,
                reference::check_moments(x, shape, mean, var),
            ),
            Err(e) => r.error(K::Moments, shape, e),
        }
    }

    // accumulate: the first batch elements and the rest into two records,
    // the whole into a third; the merge must give the moments of the whole.
    let [left, right, whole] = rec;
    let (left, right, whole) = (&mut left[..ch], &mut right[..ch], &mut whole[..ch]);
    for m in left
        .iter_mut()
        .chain(right.iter_mut())
        .chain(whole.iter_mut())
    {
        *m = Moments::EMPTY;
    }
    let head = shape.batch / 2;
    let per = len / shape.batch;
    let (xa, xb) = x.split_at(head * per);
    let (sa, sb) = (
        Shape {
            batch: head,
            ..shape
        },
        Shape {
            batch: shape.batch - head,
            ..shape
        },
    );
    let mut res = Ok(());
    r.stack(K::Accumulate, shape, &mut || {
        res = accumulate(xa, sa, left).and_then(|()| accumulate(xb, sb, right));
    });
    let res = res.and_then(|()| accumulate(x, shape, whole));
    match res {
        Ok(()) => {
            for i in 0..ch {
                mean[i] = whole[i].mean as f32;
                let v = whole[i].variance(Variance::Population);
                var[i] = v.map_or(f32::NAN, |v| v as f32);
            }
            r.check(
                K::Accumulate,
                shape,
                reference::check_moments(x, shape, mean, var),
            );
        }
        Err(e) => r.error(K::Accumulate, shape, e),
    }
    let mut merged = Moments::EMPTY;
    let mut bad = false;
    for i in 0..ch {
        r.stack(K::Merge, shape, &mut || {
            merged = left[i].merge(right[i]).unwrap_or(Moments::EMPTY)
        });
        bad |= merged.count != count;
        mean[i] = merged.mean as f32;
        let v = merged.variance(Variance::Population);
        var[i] = v.map_or(f32::NAN, |v| v as f32);
    }
    let check = reference::check_moments(x, shape, mean, var);
    r.check(K::Merge, shape, check);
    if bad {
        r.check(
            K::Merge,
            shape,
            Err(Mismatch {
                what: "count",
                index: 0,
                got: merged.count as f64,
                want: count as f64,
                bound: 0.0,
            }),
        );
    }

    // The batch statistics for the normalization kernels.
    if let Err(e) = moments(x, shape, mean, var) {
        r.error(K::Moments, shape, e);
        return;
    }
    let params = Params {
        mean,
        variance: var,
        scale: Some(scale),
        offset: Some(offset),
        epsilon: 1e-3,
        activation: act,
    };

    // fold
    let mut res = Ok(());
    r.stack(K::Fold, shape, &mut || {
        res = fold(
            params.mean,
            params.variance,
            params.scale,
            params.offset,
            1e-3,
            a,
            b,
        );
    });
    match res {
        Ok(()) => r.check(K::Fold, shape, reference::check_fold(&params, a, b)),
        Err(e) => r.error(K::Fold, shape, e),
    }

    // affine with the folded coefficients: the normalization's reference.
    let mut res = Ok(());
    r.stack(K::Affine, shape, &mut || {
        res = affine(x, y, shape, a, b, act)
    });
    match res {
        Ok(()) => r.check(
            K::Affine,
            shape,
            reference::check_normalize(x, shape, &params, y),
        ),
        Err(e) => r.error(K::Affine, shape, e),
    }
    z.copy_from_slice(x);
    let mut res = Ok(());
    r.stack(K::AffineInPlace, shape, &mut || {
        res = affine_in_place(z, shape, a, b, act);
    });
    match res {
        Ok(()) => r.check(K::AffineInPlace, shape, same(y, z)),
        Err(e) => r.error(K::AffineInPlace, shape, e),
    }

    // normalize
    let mut res = Ok(());
    r.stack(K::Normalize, shape, &mut || {
        res = normalize(x, y, shape, &params)
    });
    match res {
        Ok(()) => r.check(
            K::Normalize,
            shape,
            reference::check_normalize(x, shape, &params, y),
        ),
        Err(e) => r.error(K::Normalize, shape, e),
    }
    for simd in Simd::ALL {
        let mut res = Ok(());
        r.stack(K::Normalize, shape, &mut || {
            res = simd.normalize(x, y, shape, &params)
        });
        match res {
            Ok(()) => r.check(
                K::Normalize,
                shape,
                reference::check_normalize(x, shape, &params, y),
            ),
            Err(e) => r.error(K::Normalize, shape, e),
        }
    }
    z.copy_from_slice(x);
    let mut res = Ok(());
    r.stack(K::NormalizeInPlace, shape, &mut || {
        res = normalize_in_place(z, shape, &params);
    });
    match res {
        Ok(()) => r.check(K::NormalizeInPlace, shape, same(y, z)),
        Err(e) => r.error(K::NormalizeInPlace, shape, e),
    }

    // update_moving, from moving statistics (0.5, 2) per channel.
    let config = Config::pytorch().with_activation(act);
    mm.fill(0.5);
    mv.fill(2.0);
    let mut res = Ok(());
    r.stack(K::UpdateMoving, shape, &mut || {
        let mut moving = MovingStats {
            mean: mm,
            variance: mv,
            batches: 0,
        };
        res = update_moving(params.mean, params.variance, count, &config, &mut moving);
    });
    match res {
        Ok(()) => r.check(
            K::UpdateMoving,
            shape,
            check_moving(
                mm,
                mv,
                (0.5, 2.0),
                params.mean,
                params.variance,
                count,
                1,
                &config,
            ),
        ),
        Err(e) => r.error(K::UpdateMoving, shape, e),
    }

    // The layer: a training step, then inference with its moving statistics.
    layer(r, x, y, z, shape, scale, offset, config);
}

/// `BatchNorm::train`, `train_in_place`, `infer`, `infer_in_place`.
#[allow(clippy::too_many_arguments)]
fn layer(
    r: &mut Report,
    x: &[f32],
    y: &mut [f32],
    z: &mut [f32],
    shape: Shape,
    scale: &[f32],
    offset: &[f32],
    config: Config,
) {
    let ch = shape.channels;
    let count = (shape.batch * shape.spatial) as u64;
    let (mut mm, mut mv) = ([0.25f32; MAX_C], [1.5f32; MAX_C]);
    let (mut bm, mut bv) = ([0.0f32; MAX_C], [0.0f32; MAX_C]);
    let (mm, mv) = (&mut mm[..ch], &mut mv[..ch]);
    let (bm, bv) = (&mut bm[..ch], &mut bv[..ch]);
    let moving = MovingStats {
        mean: mm,
        variance: mv,
        batches: 0,
    };
    let mut bn = match BatchNorm::new(config, moving) {
        Ok(l) => l,
        Err(e) => return r.error(K::Train, shape, e),
    };
    let so = ScaleOffset::new(scale, offset);
    let mut batch = Batch {
        mean: bm,
        variance: bv,
    };
    let mut res = Ok(());
    r.stack(K::Train, shape, &mut || {
        res = bn.train(x, y, shape, so, &mut batch)
    });
    if let Err(e) = res {
        return r.error(K::Train, shape, e);
    }
    fn params<'a>(
        m: &'a [f32],
        v: &'a [f32],
        s: &'a [f32],
        o: &'a [f32],
        c: &Config,
    ) -> Params<'a> {
        Params {
            mean: m,
            variance: v,
            scale: Some(s),
            offset: Some(o),
            epsilon: c.epsilon,
            activation: c.activation,
        }
    }
    let check = reference::check_moments(x, shape, batch.mean, batch.variance)
        .and_then(|()| {
            reference::check_normalize(
                x,
                shape,
                &params(batch.mean, batch.variance, scale, offset, &config),
                y,
            )
        })
        .and_then(|()| {
            let (m, v) = (&*batch.mean, &*batch.variance);
            let (mm, mv) = (&*bn.moving().mean, &*bn.moving().variance);
            check_moving(mm, mv, (0.25, 1.5), m, v, count, 1, &config)
        });
    r.check(K::Train, shape, check);

    z.copy_from_slice(x);
    let mut res = Ok(());
    r.stack(K::TrainInPlace, shape, &mut || {
        res = bn.train_in_place(z, shape, so, &mut batch)
    });
    match res {
        Ok(()) => r.check(
            K::TrainInPlace,
            shape,
            reference::check_normalize(
                x,
                shape,
                &params(batch.mean, batch.variance, scale, offset, &config),
                z,
            ),
        ),
        Err(e) => r.error(K::TrainInPlace, shape, e),
    }

    let mut res = Ok(());
    r.stack(K::Infer, shape, &mut || res = bn.infer(x, y, shape, so));
    match res {
        Ok(()) => r.check(
            K::Infer,
            shape,
            reference::check_normalize(
                x,
                shape,
                &params(
                    bn.moving().mean,
                    bn.moving().variance,
                    scale,
                    offset,
                    &config,
                ),
                y,
            ),
        ),
        Err(e) => r.error(K::Infer, shape, e),
    }
    z.copy_from_slice(x);
    let mut res = Ok(());
    r.stack(K::InferInPlace, shape, &mut || {
        res = bn.infer_in_place(z, shape, so)
    });
    match res {
        Ok(()) => r.check(K::InferInPlace, shape, same(y, z)),
        Err(e) => r.error(K::InferInPlace, shape, e),
    }

    // The backward passes, with the inference output as the incoming
    // gradient (any values do) and `z` as `dx`.
    let (mut ds, mut dof) = ([0.0f32; MAX_C], [0.0f32; MAX_C]);
    let (ds, dof) = (&mut ds[..ch], &mut dof[..ch]);
    let dy: &[f32] = y;
    for (k, mode) in [
        (K::Backward, Mode::Training),
        (K::BackwardInfer, Mode::Inference),
    ] {
        let mut res = Ok(());
        r.stack(k, shape, &mut || {
            let grads = Gradients {
                dx: &mut *z,
                dscale: &mut *ds,
                doffset: &mut *dof,
            };
            res = match mode {
                Mode::Training => bn.backward(x, dy, shape, so, &batch, grads),
                Mode::Inference => bn.backward_infer(x, dy, shape, so, grads),
            };
        });
        let (m, v) = match mode {
            Mode::Training => (&*batch.mean, &*batch.variance),
            Mode::Inference => (&*bn.moving().mean, &*bn.moving().variance),
        };
        match res {
            Ok(()) => r.check(
                k,
                shape,
                reference::check_backward(
                    x,
                    dy,
                    shape,
                    &params(m, v, scale, offset, &config),
                    mode,
                    z,
                    ds,
                    dof,
                ),
            ),
            Err(e) => r.error(k, shape, e),
        }
    }
}

/// An in-place kernel must give its out-of-place twin's output, bit for bit.
fn same(want: &[f32], got: &[f32]) -> Result<(), Mismatch> {
    for (i, (&w, &g)) in want.iter().zip(got).enumerate() {
        if w.to_bits() != g.to_bits() && !(w.is_nan() && g.is_nan()) {
            return Err(Mismatch {
                what: "in place",
                index: i,
                got: g as f64,
                want: w as f64,
                bound: 0.0,
            });
        }
    }
    Ok(())
}

/// The moving statistics against `reference::update_moving`, within
/// `4 ε (|ref| + |previous|)` as tests/layer.rs holds them.
#[allow(clippy::too_many_arguments)]
fn check_moving(
    mm: &[f32],
    mv: &[f32],
    prev: (f32, f32),
    bm: &[f32],
    bv: &[f32],
    count: u64,
    batches: u64,
    config: &Config,
) -> Result<(), Mismatch> {
    let eps = 4.0 * f32::EPSILON as f64;
    for c in 0..mm.len() {
        let (rm, rv) = reference::update_moving(prev, (bm[c], bv[c]), count, batches, config);
        let bm_ = eps * (rm.abs() + prev.0.abs() as f64);
        let bv_ = eps * (rv.abs() + prev.1.abs() as f64);
        reference::compare("moving mean", c, mm[c] as f64, rm, bm_)?;
        reference::compare("moving variance", c, mv[c] as f64, rv, bv_)?;
    }
    Ok(())
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    hprintln!("FAIL panic: {}", info);
    exit(false)
}
