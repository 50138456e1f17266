//! The C ABI called from Rust through raw pointers, as C calls it: the
//! pointer checks (null, alignment, overlap) and that results equal the
//! safe Rust API's. Small sizes, so that `cargo +nightly miri test -p
//! batchnorm-capi` runs them under Miri (which checks the `unsafe` of
//! `capi/src/raw.rs`: every reference made from a C pointer).

use batchnorm::{Activation, Batch, BatchNorm, Config, MovingStats, Params, ScaleOffset, Shape};
use batchnorm_c::bn_status::*;
use batchnorm_c::*;
use std::ptr;

const NONE: bn_activation = bn_activation {
    kind: BN_ACTIVATION_NONE,
    min: 0.0,
    max: 0.0,
};

fn data(n: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7 + 3) % 11) as f32 * 0.5 - 2.0)
        .collect()
}

#[test]
fn normalize_equals_the_rust_api() {
    let shape = Shape::nchw(2, 3, 5);
    let x = data(30);
    let (mean, var, scale) = ([0.5f32, -1.0, 2.0], [1.0f32, 0.25, 4.0], [1.0f32, 2.0, 0.5]);
    let p = Params {
        mean: &mean,
        variance: &var,
        scale: Some(&scale),
        offset: None,
        epsilon: 1e-3,
        activation: Activation::Relu,
    };
    let mut want = vec![0.0; 30];
    batchnorm::normalize(&x, &mut want, shape, &p).unwrap();

    let cp = bn_params {
        mean: mean.as_ptr(),
        variance: var.as_ptr(),
        scale: scale.as_ptr(),
        offset: ptr::null(),
        channels: 3,
        epsilon: 1e-3,
        activation: bn_activation {
            kind: BN_ACTIVATION_RELU,
            ..NONE
        },
    };
    let sh = bn_shape_nchw(2, 3, 5);
    let mut y = vec![f32::NAN; 30];
    let st = unsafe { bn_normalize(x.as_ptr(), 30, y.as_mut_ptr(), 30, sh, &cp) };
    assert_eq!(st, BN_OK);
    assert_eq!(y, want);
    let mut z = x.clone();
    let st = unsafe { bn_normalize_in_place(z.as_mut_ptr(), 30, sh, &cp) };
    assert_eq!(st, BN_OK);
    assert_eq!(z, want);

    // y over x: refused, nothing written
    let mut buf = x.clone();
    let p = buf.as_mut_ptr();
    let st = unsafe { bn_normalize(p, 30, p, 30, sh, &cp) };
    assert_eq!(st, BN_ERR_OVERLAP);
    assert_eq!(buf, x);
    // y over the mean
    let mut stats = [0.5f32, -1.0, 2.0, 1.0, 0.25, 4.0];
    let cp2 = bn_params {
        mean: stats.as_ptr(),
        variance: stats[3..].as_ptr(),
        ..cp
    };
    let st = unsafe {
        bn_normalize(
            x.as_ptr(),
            3,
            stats.as_mut_ptr().add(2),
            3,
            bn_shape_rows(1, 3),
            &cp2,
        )
    };
    assert_eq!(st, BN_ERR_OVERLAP);
}

#[test]
fn pointer_checks() {
    let x = data(6);
    let mut y = [7.0f32; 8];
    let (a, b) = ([1.0f32; 3], [0.0f32; 3]);
    let sh = bn_shape_rows(2, 3);
    unsafe {
        assert_eq!(
            bn_affine(
                ptr::null(),
                6,
                y.as_mut_ptr(),
                6,
                sh,
                a.as_ptr(),
                b.as_ptr(),
                3,
                NONE
            ),
            BN_ERR_NULL_POINTER
        );
        // null with count 0: an empty tensor
        let empty = bn_shape_rows(0, 3);
        assert_eq!(
            bn_affine(
                ptr::null(),
                0,
                ptr::null_mut(),
                0,
                empty,
                a.as_ptr(),
                b.as_ptr(),
                3,
                NONE
            ),
            BN_OK
        );
        // misaligned output
        let odd = y.as_mut_ptr().cast::<u8>().add(1).cast::<f32>();
        assert_eq!(
            bn_affine(x.as_ptr(), 6, odd, 6, sh, a.as_ptr(), b.as_ptr(), 3, NONE),
            BN_ERR_MISALIGNED
        );
        // a count no allocation can have
        assert_eq!(
            bn_affine(
                x.as_ptr(),
                usize::MAX / 2,
                y.as_mut_ptr(),
                6,
                sh,
                a.as_ptr(),
                b.as_ptr(),
                3,
                NONE
            ),
            BN_ERR_LENGTH
        );
        assert_eq!(y, [7.0; 8]);
        assert_eq!(
            bn_affine(
                x.as_ptr(),
                6,
                y.as_mut_ptr(),
                6,
                sh,
                a.as_ptr(),
                b.as_ptr(),
                3,
                NONE
            ),
            BN_OK
        );
        assert_eq!(&y[..6], &x[..]);
    }
}

#[test]
fn layer_equals_the_rust_layer() {
    let shape = Shape::nhwc(2, 3, 4);
    let (scale, offset) = ([1.0f32, 0.5, 2.0, 1.5], [0.0f32, 1.0, -1.0, 0.5]);
    // Rust
    let (mut mm, mut mv) = ([0.0f32; 4], [1.0f32; 4]);
    let (mut bm, mut bv) = ([0.0f32; 4], [0.0f32; 4]);
    let moving = MovingStats {
        mean: &mut mm,
        variance: &mut mv,
        batches: 0,
    };
    let mut bn = BatchNorm::new(Config::pytorch_momentum(None), moving).unwrap();
    // C
    let (mut cmm, mut cmv) = ([0.0f32; 4], [1.0f32; 4]);
    let (mut cbm, mut cbv) = ([0.0f32; 4], [0.0f32; 4]);
    let mut layer = std::mem::MaybeUninit::<bn_layer>::uninit();
    let st = unsafe {
        bn_layer_init(
            layer.as_mut_ptr(),
            bn_config_pytorch_cumulative(),
            4,
            cmm.as_mut_ptr(),
            cmv.as_mut_ptr(),
            cbm.as_mut_ptr(),
            cbv.as_mut_ptr(),
        )
    };
    assert_eq!(st, BN_OK);
    let mut layer = unsafe { layer.assume_init() };
    let sh = bn_shape_nhwc(2, 3, 4);
    for step in 0..3 {
        let x: Vec<f32> = data(24).iter().map(|v| v + step as f32).collect();
        let (mut y, mut cy) = (vec![0.0; 24], vec![0.0; 24]);
        let mut batch = Batch {
            mean: &mut bm,
            variance: &mut bv,
        };
        bn.train(
            &x,
            &mut y,
            shape,
            ScaleOffset::new(&scale, &offset),
            &mut batch,
        )
        .unwrap();
        let st = unsafe {
            bn_layer_train(
                &mut layer,
                x.as_ptr(),
                24,
                cy.as_mut_ptr(),
                24,
                sh,
                scale.as_ptr(),
                offset.as_ptr(),
            )
        };
        assert_eq!(st, BN_OK);
        assert_eq!(cy, y);
        assert_eq!(layer.batches, step + 1);
    }
    assert_eq!((cbm, cbv), (bm, bv));
    let x = data(24);
    let (mut y, mut cy) = (vec![0.0; 24], vec![0.0; 24]);
    bn.infer(&x, &mut y, shape, ScaleOffset::new(&scale, &offset))
        .unwrap();
    let st = unsafe {
        bn_layer_infer(
            &layer,
            x.as_ptr(),
            24,
            cy.as_mut_ptr(),
            24,
            sh,
            scale.as_ptr(),
            offset.as_ptr(),
        )
    };
    assert_eq!(st, BN_OK);
    assert_eq!(cy, y);
    assert_eq!(bn.into_moving().batches, 3);
    assert_eq!((cmm, cmv), (mm, mv));

    // the layer struct itself as an output buffer: refused
    let lp: *mut bn_layer = &mut layer;
    let st = unsafe {
        bn_layer_train(
            lp,
            x.as_ptr(),
            24,
            lp.cast::<f32>(),
            24,
            sh,
            ptr::null(),
            ptr::null(),
        )
    };
    assert_eq!(st, BN_ERR_OVERLAP);
    assert_eq!(layer.batches, 3);
}

#[test]
fn records_and_update() {
    let x = data(12);
    let mut rec = [bn_moments_record::default(); 3];
    let st = unsafe { bn_accumulate(x.as_ptr(), 12, bn_shape_rows(4, 3), rec.as_mut_ptr(), 3) };
    assert_eq!(st, BN_OK);
    let mut want = [batchnorm::Moments::EMPTY; 3];
    batchnorm::accumulate(&x, Shape::rows(4, 3), &mut want).unwrap();
    for c in 0..3 {
        assert_eq!(
            (rec[c].count, rec[c].mean, rec[c].m2),
            (want[c].count, want[c].mean, want[c].m2)
        );
        let mut wire = [0u8; BN_MOMENTS_BYTES];
        let mut back = bn_moments_record::default();
        unsafe {
            assert_eq!(bn_moments_to_le_bytes(rec[c], wire.as_mut_ptr()), BN_OK);
            assert_eq!(bn_moments_from_le_bytes(wire.as_ptr(), &mut back), BN_OK);
        }
        assert_eq!(back, rec[c]);
        assert_eq!(wire, want[c].to_le_bytes());
    }
    // the moving update through a layer, against the Rust function
    let (mut mm, mut mv) = ([0.0f32; 3], [1.0f32; 3]);
    let mut layer = bn_layer {
        config: bn_config_keras(),
        channels: 3,
        moving_mean: mm.as_mut_ptr(),
        moving_variance: mv.as_mut_ptr(),
        batches: 0,
        batch_mean: ptr::null_mut(),
        batch_variance: ptr::null_mut(),
    };
    let (bm, bv) = ([1.0f32, 2.0, 3.0], [0.5f32, 1.0, 2.0]);
    let st = unsafe { bn_update_moving(&mut layer, bm.as_ptr(), bv.as_ptr(), 8) };
    assert_eq!(st, BN_OK);
    assert_eq!(layer.batches, 1);
    let (mut rm, mut rv) = ([0.0f32; 3], [1.0f32; 3]);
    let mut moving = MovingStats {
        mean: &mut rm,
        variance: &mut rv,
        batches: 0,
    };
    batchnorm::update_moving(&bm, &bv, 8, &Config::keras(), &mut moving).unwrap();
    assert_eq!((mm, mv), (rm, rv));
    // batch statistics over the moving ones: refused
    let st = unsafe { bn_update_moving(&mut layer, mm.as_ptr(), bv.as_ptr(), 8) };
    assert_eq!(st, BN_ERR_OVERLAP);
    assert_eq!(layer.batches, 1);
}

#[test]
fn status_names() {
    for code in 0..=14 {
        let name = unsafe { std::ffi::CStr::from_ptr(bn_status_name(code)) };
        assert!(name.to_str().unwrap().starts_with("BN_"), "{name:?}");
    }
    let other = unsafe { std::ffi::CStr::from_ptr(bn_status_name(99)) };
    assert_eq!(other.to_str().unwrap(), "BN_ERR_(unknown code)");
}

#[test]
// The backward kernels take square roots through libm, whose x86 `sqrt` is
// inline assembly that Miri cannot run.
#[cfg_attr(miri, ignore)]
fn backward_and_fold_equal_the_rust_api() {
    use batchnorm::{Gradients, WeightLayout};
    let shape = Shape::nhwc(2, 3, 4);
    let sh = bn_shape_nhwc(2, 3, 4);
    let (scale, offset) = ([1.0f32, 0.5, 2.0, 1.5], [0.0f32, 1.0, -1.0, 0.5]);
    let x = data(24);
    let dy: Vec<f32> = data(24).iter().map(|v| v * 0.25 - 0.1).collect();
    let config = Config::keras().with_activation(Activation::Relu);
    let mut cfg = bn_config_keras();
    cfg.activation.kind = BN_ACTIVATION_RELU;

    // Rust: a training step, then both backward passes.
    let (mut mm, mut mv) = ([0.0f32; 4], [1.0f32; 4]);
    let (mut bm, mut bv) = ([0.0f32; 4], [0.0f32; 4]);
    let so = ScaleOffset::new(&scale, &offset);
    let mut bn = BatchNorm::new(
        config,
        MovingStats {
            mean: &mut mm,
            variance: &mut mv,
            batches: 0,
        },
    )
    .unwrap();
    let mut y = vec![0.0; 24];
    let mut batch = Batch {
        mean: &mut bm,
        variance: &mut bv,
    };
    bn.train(&x, &mut y, shape, so, &mut batch).unwrap();
    let (mut dx, mut ds, mut dof) = (vec![0.0; 24], [0.0f32; 4], [0.0f32; 4]);
    let grads = Gradients {
        dx: &mut dx,
        dscale: &mut ds,
        doffset: &mut dof,
    };
    bn.backward(&x, &dy, shape, so, &batch, grads).unwrap();
    let (mut dxi, mut dsi, mut dofi) = (vec![0.0; 24], [0.0f32; 4], [0.0f32; 4]);
    let grads = Gradients {
        dx: &mut dxi,
        dscale: &mut dsi,
        doffset: &mut dofi,
    };
    bn.backward_infer(&x, &dy, shape, so, grads).unwrap();
    let mut w: Vec<f32> = data(12);
    let mut wb = [0.0f32; 4];
    let p = Params {
        mean: bn.moving().mean,
        variance: bn.moving().variance,
        scale: Some(&scale),
        offset: Some(&offset),
        epsilon: config.epsilon,
        activation: config.activation,
    };
    batchnorm::fold_into_weights(&mut w, None, WeightLayout::OutLast, &p, &mut wb).unwrap();

    // C: the same through a bn_layer.
    let (mut cmm, mut cmv) = ([0.0f32; 4], [1.0f32; 4]);
    let (mut cbm, mut cbv) = ([0.0f32; 4], [0.0f32; 4]);
    let mut layer = bn_layer {
        config: cfg,
        channels: 4,
        moving_mean: cmm.as_mut_ptr(),
        moving_variance: cmv.as_mut_ptr(),
        batches: 0,
        batch_mean: cbm.as_mut_ptr(),
        batch_variance: cbv.as_mut_ptr(),
    };
    let mut cy = vec![0.0; 24];
    let (mut cdx, mut cds, mut cdof) = (vec![0.0; 24], [0.0f32; 4], [0.0f32; 4]);
    let (sp, op) = (scale.as_ptr(), offset.as_ptr());
    unsafe {
        let st = bn_layer_train(&mut layer, x.as_ptr(), 24, cy.as_mut_ptr(), 24, sh, sp, op);
        assert_eq!(st, BN_OK);
        let st = bn_layer_backward(
            &layer,
            x.as_ptr(),
            24,
            dy.as_ptr(),
            24,
            sh,
            sp,
            op,
            cdx.as_mut_ptr(),
            24,
            cds.as_mut_ptr(),
            cdof.as_mut_ptr(),
        );
        assert_eq!(st, BN_OK);
    }
    assert_eq!((&cdx, cds, cdof), (&dx, ds, dof));
    unsafe {
        let st = bn_layer_backward_infer(
            &layer,
            x.as_ptr(),
            24,
            dy.as_ptr(),
            24,
            sh,
            sp,
            op,
            cdx.as_mut_ptr(),
            24,
            cds.as_mut_ptr(),
            cdof.as_mut_ptr(),
        );
        assert_eq!(st, BN_OK);
    }
    assert_eq!((&cdx, cds, cdof), (&dxi, dsi, dofi));
    // in place: dy becomes dx
    let mut cdy = dy.clone();
    let cp = bn_params {
        mean: cbm.as_ptr(),
        variance: cbv.as_ptr(),
        scale: sp,
        offset: op,
        channels: 4,
        epsilon: cfg.epsilon,
        activation: cfg.activation,
    };
    unsafe {
        let st = bn_backward_in_place(
            x.as_ptr(),
            24,
            cdy.as_mut_ptr(),
            24,
            sh,
            &cp,
            BN_MODE_TRAINING,
            cds.as_mut_ptr(),
            cdof.as_mut_ptr(),
        );
        assert_eq!(st, BN_OK);
    }
    assert_eq!((&cdy, cds, cdof), (&dx, ds, dof));
    // folding the trained layer into an HWIO/Dense weight [3, 4]
    let mut cw: Vec<f32> = data(12);
    let mut cwb = [0.0f32; 4];
    let layout = bn_weight_layout {
        kind: BN_WEIGHTS_OUT_LAST,
        groups: 0,
        kernel: 0,
        multiplier: 0,
    };
    let st = unsafe {
        bn_layer_fold_into_weights(
            &layer,
            cw.as_mut_ptr(),
            12,
            ptr::null(),
            layout,
            sp,
            op,
            cwb.as_mut_ptr(),
        )
    };
    assert_eq!(st, BN_OK);
    assert_eq!((&cw, cwb), (&w, wb));
}
