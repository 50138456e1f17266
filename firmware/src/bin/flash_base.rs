//! Flash probe, baseline: the probes' startup, opaque inputs and exit,
//! with no kernel call. `.text` of a probe minus this one is what the
//! crate's code costs.
#![no_std]
#![no_main]

use batchnorm_firmware::{exit, opaque};
use core::hint::black_box;
use cortex_m_rt::entry;

#[entry]
fn main() -> ! {
    let o = opaque();
    black_box((&o.x, &o.y, &o.c, o.shape, o.activation));
    exit(black_box(true))
}

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}
