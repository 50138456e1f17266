//! Flash probe (a): inference only, through the layer (`BatchNorm::infer`).
#![no_std]
#![no_main]

use batchnorm::{BatchNorm, Config, MovingStats, ScaleOffset};
use batchnorm_firmware::{exit, opaque};
use core::hint::black_box;
use cortex_m_rt::entry;

#[entry]
fn main() -> ! {
    let o = opaque();
    let [mm, mv, _, _, _, _] = o.c;
    let config = Config::keras().with_activation(o.activation);
    let moving = MovingStats {
        mean: mm,
        variance: mv,
        batches: black_box(0),
    };
    let ok = match BatchNorm::new(config, moving) {
        Ok(bn) => bn.infer(o.x, o.y, o.shape, ScaleOffset::NONE).is_ok(),
        Err(_) => false,
    };
    black_box(&o.y);
    exit(black_box(ok))
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
