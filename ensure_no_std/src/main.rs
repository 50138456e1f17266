//! Links `batchnorm` into a `#![no_std]`, `#![no_main]` binary for a
//! bare-metal target with no allocator: if the crate or any dependency used
//! `std` or `alloc`, this would not link.
#![no_std]
#![no_main]

use batchnorm::{
    accumulate, moments, normalize, Activation, BatchNormArray, Config, Moments, Params, Shape,
};

/// Two rows of an NHWC tensor with three channels.
static X: [f32; 6] = [1.0, 10.0, 100.0, 3.0, 30.0, 300.0];

/// A layer built at compile time, as firmware keeps it in a `static`.
static LAYER: BatchNormArray<3> = BatchNormArray::new(Config::keras());

fn run() -> Result<f32, batchnorm::Error> {
    let shape = Shape::nhwc(2, 1, 3);
    let (mut mean, mut var) = ([0.0f32; 3], [0.0f32; 3]);
    moments(&X, shape, &mut mean, &mut var)?;
    let mut records = [Moments::EMPTY; 3];
    let (a, b) = X.split_at(3);
    accumulate(a, Shape::rows(1, 3), &mut records)?;
    accumulate(b, Shape::rows(1, 3), &mut records)?;
    let mut y = [0.0f32; 6];
    let p = Params {
        mean: &mean,
        variance: &var,
        scale: None,
        offset: None,
        epsilon: 1e-3,
        activation: Activation::Relu6,
    };
    normalize(&X, &mut y, shape, &p)?;
    LAYER.infer(&X, &mut y, shape)?;
    let mut layer = LAYER.clone();
    layer.train(&X, &mut y, shape)?;
    let merged = records[0].merge(records[1])?;
    Ok(y.iter().sum::<f32>() + merged.m2 as f32 + layer.moving_mean[0])
}

/// The reset handler a board's startup code would jump to.
#[no_mangle]
pub extern "C" fn _start() -> ! {
    let r = run();
    core::hint::black_box(&r);
    loop {}
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
