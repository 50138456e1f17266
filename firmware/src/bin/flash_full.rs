//! Flash probe (b): a training step, inference and moments
//! (`BatchNorm::train`, `BatchNorm::infer`, `moments`).
#![no_std]
#![no_main]

use batchnorm::{moments, Batch, BatchNorm, Config, MovingStats, ScaleOffset};
use batchnorm_firmware::{exit, opaque};
use core::hint::black_box;
use cortex_m_rt::entry;

#[entry]
fn main() -> ! {
    let o = opaque();
    let [mm, mv, bm, bv, m, v] = o.c;
    let config = Config::keras().with_activation(o.activation);
    let mut ok = moments(o.x, o.shape, m, v).is_ok();
    let moving = MovingStats {
        mean: mm,
        variance: mv,
        batches: black_box(0),
    };
    let mut batch = Batch {
        mean: bm,
        variance: bv,
    };
    match BatchNorm::new(config, moving) {
        Ok(mut bn) => {
            ok &= bn
                .train(o.x, o.y, o.shape, ScaleOffset::NONE, &mut batch)
                .is_ok();
            black_box(&o.y);
            ok &= bn.infer(o.x, o.y, o.shape, ScaleOffset::NONE).is_ok();
        }
        Err(_) => ok = false,
    }
    black_box((&o.y, &m, &v));
    exit(black_box(ok))
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
