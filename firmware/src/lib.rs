//! What the test image and the flash probes share: stack painting, opaque
//! inputs, and the semihosting exit.
#![no_std]

use core::hint::black_box;

/// The word painted below the stack pointer before a kernel call.
pub const PAINT: u32 = 0xdead_c0de;

/// Bytes below the caller's stack pointer that [`stack_use`] paints (and so
/// the most it can measure). The test image's statics sit far below the
/// stack on the 4 MiB RAM of mps2-an386; [`stack_use`] checks it anyway.
pub const PAINTED: usize = 256 * 1024;

extern "C" {
    /// The lowest address the stack may reach (cortex-m-rt's `link.x`).
    static _stack_end: u32;
}

/// Runs `f` and returns how many bytes of stack it used below the stack
/// pointer of this function's frame (the call into `f` included): the
/// region below is painted with [`PAINT`] first, and the deepest word that
/// no longer holds it after the call is the high-water mark. `None` when
/// the whole painted region was overwritten (the use is at least
/// [`PAINTED`] bytes).
#[inline(never)]
pub fn stack_use(f: &mut dyn FnMut()) -> Option<usize> {
    let sp: usize;
    // SAFETY: reads the stack pointer; no memory is touched.
    unsafe { core::arch::asm!("mov {}, sp", out(reg) sp, options(nomem, nostack)) };
    // Only the address of the linker symbol is taken.
    let floor = core::ptr::addr_of!(_stack_end) as usize;
    let lo = (sp - PAINTED) & !3;
    assert!(lo > floor, "the painted region would reach the statics");
    // SAFETY: [lo, sp) is stack memory below the live frames (checked
    // against `_stack_end` above); the loop itself runs in registers, so
    // painting up to the stack pointer clobbers nothing live. The callee
    // then overwrites what it uses.
    unsafe {
        core::arch::asm!(
            "2:",
            "cmp {p}, sp",
            "bhs 3f",
            "str {pat}, [{p}], #4",
            "b 2b",
            "3:",
            p = inout(reg) lo => _,
            pat = in(reg) PAINT,
            options(nostack),
        );
    }
    f();
    let mut p = lo;
    while p < sp {
        // SAFETY: `p` is in the painted region, word aligned.
        let v = unsafe { core::ptr::read_volatile(p as *const u32) };
        if v != PAINT {
            break;
        }
        p += 4;
    }
    if p == lo {
        None
    } else {
        Some(sp - p)
    }
}

/// Ends the program through semihosting (SYS_EXIT): QEMU exits with 0 on
/// success and 1 on failure.
pub fn exit(ok: bool) -> ! {
    use cortex_m_semihosting::debug;
    debug::exit(if ok {
        debug::EXIT_SUCCESS
    } else {
        debug::EXIT_FAILURE
    });
    #[allow(clippy::empty_loop)]
    loop {}
}

/// Inputs the flash probes cannot see through: the optimizer must keep
/// every code path a kernel has for an arbitrary shape and data.
pub struct Opaque {
    /// The tensor.
    pub x: &'static mut [f32],
    /// The output.
    pub y: &'static mut [f32],
    /// Per-channel buffers.
    pub c: [&'static mut [f32]; 6],
    /// A shape read at run time.
    pub shape: batchnorm::Shape,
    /// An activation read at run time.
    pub activation: batchnorm::Activation,
}

static mut X: [f32; 64] = [0.0; 64];
static mut Y: [f32; 64] = [0.0; 64];
static mut C: [[f32; 8]; 6] = [[0.0; 8]; 6];

/// The probes' opaque inputs (called once).
pub fn opaque() -> Opaque {
    // SAFETY: called once, before anything else touches the statics.
    let (x, y, c) = unsafe {
        (
            &mut *core::ptr::addr_of_mut!(X),
            &mut *core::ptr::addr_of_mut!(Y),
            &mut *core::ptr::addr_of_mut!(C),
        )
    };
    let [c0, c1, c2, c3, c4, c5] = c;
    let dims: [usize; 3] = black_box([2, 4, 8]);
    let shape = if black_box(true) {
        batchnorm::Shape::nhwc(dims[0], dims[1], dims[2])
    } else {
        batchnorm::Shape::nchw(dims[0], dims[2], dims[1])
    };
    let activation = match black_box(0u8) {
        0 => batchnorm::Activation::None,
        1 => batchnorm::Activation::Relu,
        2 => batchnorm::Activation::Relu6,
        _ => batchnorm::Activation::Clamp {
            min: black_box(-1.0),
            max: black_box(1.0),
        },
    };
    Opaque {
        x: black_box(x),
        y: black_box(y),
        c: black_box([c0, c1, c2, c3, c4, c5]),
        shape,
        activation,
    }
}
