//! The one narrow lane trait every kernel is written against.
//!
//! Each kernel in this crate is written once, generically over [`Lane`], and
//! instantiated for `f32` (one lane: the scalar tail and the portable
//! fallback) and for `wide`'s `f32x4`, `f32x8` and `f32x16`. The trait holds
//! only what the kernels need, so that a new lane type is a few lines.
//!
//! Platform behaviour is `wide`'s, which is compile-time selected:
//!
//! | type | x86-64 default (SSE2) | `+avx,+fma` | `+avx512f` | aarch64 | elsewhere |
//! |---|---|---|---|---|---|
//! | `f32x4` | one `__m128` | one `__m128` | one `__m128` | one NEON `float32x4_t` | four scalars |
//! | `f32x8` | two `__m128` | one `__m256` | one `__m256` | two NEON registers | eight scalars |
//! | `f32x16` | four `__m128` | two `__m256` | one `__m512` | four NEON registers | sixteen scalars |
//!
//! `mul_add` is a fused multiply-add (one rounding) where the target has FMA
//! (`+fma` on x86, always on aarch64) and a multiply then an add (two
//! roundings) elsewhere; the error bounds in crate docs §3 allow for both.

use wide::{f32x16, f32x4, f32x8, f64x4};

/// A vector of `WIDTH` independent `f32` lanes.
///
/// Loads and stores are unaligned, so kernels accept any `&[f32]`, including
/// sub-slices that start at an odd address.
pub(crate) trait Lane: Copy {
    /// Number of `f32` lanes.
    const WIDTH: usize;
    /// Whether [`stream`](Lane::stream) bypasses the caches (else it is
    /// `store`, and a kernel keeps one copy of its loop, not two).
    const STREAMS: bool = false;
    /// The type with half the lanes (`f32` for `f32` and `f32x4`): tails
    /// shorter than a vector cascade through it instead of dropping straight
    /// to one lane.
    type Half: Lane;
    /// How many vectors of this type a kernel uses as independent
    /// accumulators (bounded by the register file of the targets that run the
    /// type natively: 32 registers for AVX-512 and NEON, 16 for SSE/AVX).
    /// `moments` also sums a whole row of up to `2 * SLOTS` vectors in one
    /// register group, letting the compiler spill the shifts.
    const SLOTS: usize;
    /// Runs `f`, a kernel instantiated with this type, where the type's
    /// instructions are enabled: a plain call for the types `wide` selects
    /// at compile time, a call through a `#[target_feature]` function for the
    /// run-time selected x86-64 types. Every kernel entry and every
    /// never-inlined kernel function runs its body through it, so that no
    /// code of those types is compiled without their instructions.
    #[inline(always)]
    #[cfg_attr(
        not(all(target_arch = "x86_64", not(batchnorm_compact))),
        allow(dead_code)
    )]
    fn enabled<R>(f: impl FnOnce() -> R) -> R {
        f()
    }
    /// Every lane set to `v`.
    fn splat(v: f32) -> Self;
    /// Loads `WIDTH` values from the start of `s` (`s.len() >= WIDTH`; a
    /// shorter slice, which no kernel passes, loads zeros: no panic path).
    fn load(s: &[f32]) -> Self;
    /// Stores the lanes to the start of `out` (`out.len() >= WIDTH`; a
    /// shorter slice, which no kernel passes, is left as it is).
    fn store(self, out: &mut [f32]);
    /// Stores the lanes to the start of `out` as [`store`](Lane::store)
    /// does, past the caches where the type has a streaming store and `out`
    /// starts on a multiple of the vector's size: a store that goes through
    /// the caches first reads the line it writes, a third more memory
    /// traffic for a kernel that reads one tensor and writes another once
    /// neither fits in the last-level cache. Weakly ordered: a kernel that
    /// streams calls [`store_fence`] before it returns. This default is
    /// `store`; the run-time selected x86-64 types override it.
    #[inline(always)]
    fn stream(self, out: &mut [f32]) {
        self.store(out)
    }
    /// Lane-wise `self + o`.
    fn add(self, o: Self) -> Self;
    /// The sum of the lanes (pairwise, in registers).
    fn reduce_add(self) -> f32;
    /// Lane-wise `self - o`.
    fn sub(self, o: Self) -> Self;
    /// Lane-wise `self * m + a`: fused where the target has FMA.
    fn mul_add(self, m: Self, a: Self) -> Self;
    /// Lane-wise `if self < lo { lo } else { self }`: a NaN in `self` stays NaN
    /// (the comparison is false), unlike `max` on x86.
    fn floor_at(self, lo: Self) -> Self;
    /// Lane-wise `if self > hi { hi } else { self }`: NaN stays NaN.
    fn ceil_at(self, hi: Self) -> Self;
    /// Lane-wise `self * m` (one rounding).
    fn mul(self, m: Self) -> Self;
    /// Lane-wise `if self > lo { v } else { 0 }`: the backward pass's
    /// activation mask (a NaN in `self` gives 0, as PyTorch's does).
    fn keep_above(self, lo: Self, v: Self) -> Self;
    /// Lane-wise `if self < hi { v } else { 0 }`.
    fn keep_below(self, hi: Self, v: Self) -> Self;
    /// `n / sqrt(d)` for four `f64`s, the square root and the division each
    /// correctly rounded: the per-channel coefficient of a fold. `wide`'s
    /// `f64x4` here (`sqrtpd` and `divpd` on two halves with SSE2; its
    /// `sqrt` is correctly rounded on every target); the run-time selected
    /// x86-64 types override it with one `vsqrtpd` and one `vdivpd` on a
    /// `ymm` register, the same results.
    #[inline(always)]
    fn quot_sqrt4(n: [f64; 4], d: [f64; 4]) -> [f64; 4] {
        (f64x4::new(n) / f64x4::new(d).sqrt()).to_array()
    }
}

impl Lane for f32 {
    const WIDTH: usize = 1;
    type Half = f32;
    // Four scalar chains hide the add latency on an in-order core without
    // spilling on a 16-register one.
    const SLOTS: usize = 4;
    #[inline(always)]
    fn splat(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn load(s: &[f32]) -> Self {
        match s.first() {
            Some(&v) => v,
            None => 0.0,
        }
    }
    #[inline(always)]
    fn store(self, out: &mut [f32]) {
        if let Some(o) = out.first_mut() {
            *o = self;
        }
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        self + o
    }
    #[inline(always)]
    fn reduce_add(self) -> f32 {
        self
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        self - o
    }
    #[inline(always)]
    fn mul_add(self, m: Self, a: Self) -> Self {
        // `f32::mul_add` needs `std` (or a slow libm call on soft targets);
        // two roundings are within every bound we promise.
        self * m + a
    }
    #[inline(always)]
    fn floor_at(self, lo: Self) -> Self {
        if self < lo {
            lo
        } else {
            self
        }
    }
    #[inline(always)]
    fn ceil_at(self, hi: Self) -> Self {
        if self > hi {
            hi
        } else {
            self
        }
    }
    #[inline(always)]
    fn mul(self, m: Self) -> Self {
        self * m
    }
    #[inline(always)]
    fn keep_above(self, lo: Self, v: Self) -> Self {
        if self > lo {
            v
        } else {
            0.0
        }
    }
    #[inline(always)]
    fn keep_below(self, hi: Self, v: Self) -> Self {
        if self < hi {
            v
        } else {
            0.0
        }
    }
}

/// With SSE, `maxps(lo, y)` is `lo > y ? lo : y` and `minps(hi, y)` is
/// `hi < y ? hi : y`: exactly `floor_at` and `ceil_at`, NaN and signed zeros
/// included, in one instruction each (with AVX-512 the compare-and-select
/// compiled to a compare, a mask inversion and a masked move, and
/// `normalize` with a ReLU lost 5 to 10% at 256 KiB). `wide`'s
/// `fast_max`/`fast_min` are those instructions on x86 only; elsewhere they
/// may drop a NaN or order signed zeros differently.
const X86_MINMAX: bool = cfg!(all(
    any(target_arch = "x86", target_arch = "x86_64"),
    target_feature = "sse"
));

macro_rules! wide_lane {
    ($t:ident, $n:literal, $slots:expr, $half:ty) => {
        impl Lane for $t {
            const WIDTH: usize = $n;
            type Half = $half;
            const SLOTS: usize = $slots;
            #[inline(always)]
            fn splat(v: f32) -> Self {
                $t::splat(v)
            }
            #[inline(always)]
            fn load(s: &[f32]) -> Self {
                match s.first_chunk::<$n>() {
                    Some(a) => $t::new(*a),
                    None => $t::splat(0.0),
                }
            }
            #[inline(always)]
            fn store(self, out: &mut [f32]) {
                if let Some(o) = out.first_chunk_mut::<$n>() {
                    *o = self.to_array();
                }
            }
            #[inline(always)]
            fn add(self, o: Self) -> Self {
                self + o
            }
            #[inline(always)]
            fn reduce_add(self) -> f32 {
                $t::reduce_add(self)
            }
            #[inline(always)]
            fn sub(self, o: Self) -> Self {
                self - o
            }
            #[inline(always)]
            fn mul_add(self, m: Self, a: Self) -> Self {
                $t::mul_add(self, m, a)
            }
            #[inline(always)]
            fn floor_at(self, lo: Self) -> Self {
                if X86_MINMAX {
                    lo.fast_max(self)
                } else {
                    self.simd_lt(lo).select(lo, self)
                }
            }
            #[inline(always)]
            fn ceil_at(self, hi: Self) -> Self {
                if X86_MINMAX {
                    hi.fast_min(self)
                } else {
                    self.simd_gt(hi).select(hi, self)
                }
            }
            #[inline(always)]
            fn mul(self, m: Self) -> Self {
                self * m
            }
            #[inline(always)]
            fn keep_above(self, lo: Self, v: Self) -> Self {
                // The comparison's lanes are all ones or all zeros.
                self.simd_gt(lo) & v
            }
            #[inline(always)]
            fn keep_below(self, hi: Self, v: Self) -> Self {
                self.simd_lt(hi) & v
            }
        }
    };
}

/// Registers available to one kernel: AVX-512 and aarch64 have 32 vector
/// registers, SSE2/AVX2 have 16.
#[cfg(any(target_feature = "avx512f", target_arch = "aarch64"))]
const WIDE_SLOTS: usize = 8;
#[cfg(not(any(target_feature = "avx512f", target_arch = "aarch64")))]
const WIDE_SLOTS: usize = 4;

wide_lane!(f32x4, 4, WIDE_SLOTS, f32);
wide_lane!(f32x8, 8, WIDE_SLOTS, f32x4);
wide_lane!(f32x16, 16, WIDE_SLOTS, f32x8);

/// The lane width a kernel runs with.
///
/// [`Simd::detect`] picks the widest width this CPU runs natively. On
/// x86-64 that is a run-time choice, made once: `X16` (AVX-512F) or `X8`
/// (AVX2 and FMA) when the CPU has them, whatever the build's target
/// features, else `X4` (SSE2); the `X8` and `X16` code is compiled with
/// those instructions enabled and runs only after the CPU reported them,
/// so a plain `cargo build` is as fast as a `-C target-cpu=native` one.
/// Elsewhere it is a compile-time choice (`wide` selects instructions from
/// the target features the crate is compiled with).
///
/// Only widths that can run natively are compiled: every width on x86-64,
/// `Scalar` and `X4` on x86 and aarch64 (plus `X8` with `avx` and `X16`
/// with `avx512f` on x86). A width that is not compiled, or that this CPU
/// cannot run, runs the widest one below it that can ([`Simd::effective`]).
/// The `all-widths` feature compiles every width on every target (two or
/// four 4-lane registers where the target has no wider ones), so that
/// tests, fuzzers and benchmarks can run every code path. A
/// [compact](crate#compact-builds) build compiles one width only, and every
/// `Simd` value runs it.
///
/// ```
/// use batchnorm::Simd;
///
/// // The width the free functions use, and it always runs as itself.
/// let simd = Simd::detect();
/// assert_eq!(simd.effective(), simd);
/// // Forcing a width: `Simd::X16.moments(..)` runs `Simd::X16.effective()`.
/// assert!(Simd::X16.effective().lanes() <= 16);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Simd {
    /// One lane: plain `f32` arithmetic, the portable fallback.
    Scalar,
    /// Four lanes: SSE2, NEON, wasm simd128 (`wide::f32x4`), or four scalars.
    X4,
    /// Eight lanes: AVX2 with FMA on x86-64 (selected at run time), `wide`'s
    /// `f32x8` elsewhere (AVX, or two 4-lane registers).
    X8,
    /// Sixteen lanes: AVX-512F on x86-64 (selected at run time), `wide`'s
    /// `f32x16` elsewhere.
    X16,
}

impl Simd {
    /// Every width, narrowest first.
    pub const ALL: [Simd; 4] = [Simd::Scalar, Simd::X4, Simd::X8, Simd::X16];

    /// The widest width this CPU runs natively. On x86-64: `X16` with
    /// AVX-512F, `X8` with AVX2 and FMA, `X4` otherwise, asked of the CPU the
    /// first time (`cpuid`, no `std` needed) and cached; a build whose
    /// target features include them needs no question. Elsewhere: `X16`
    /// with `avx512f`, `X8` with `avx` (x86), `X4` on x86 and aarch64 (SSE2,
    /// NEON); in a [compact](crate#compact-builds) build (microcontrollers
    /// and every other target without x86 or aarch64 SIMD) the one width
    /// compiled in, `Scalar`.
    pub fn detect() -> Simd {
        Simd::X16.effective()
    }

    /// The width that runs when `self` is asked for: `self` when it is
    /// compiled into this build and this CPU runs it, else the widest such
    /// width below it (`Scalar` for every width in a compact build; `X4`
    /// for `X8` and `X16` on an x86-64 CPU without AVX2 and FMA).
    pub fn effective(self) -> Simd {
        if COMPACT {
            return Simd::Scalar;
        }
        let (x8, x16) = native_wide();
        match self {
            Simd::Scalar => Simd::Scalar,
            Simd::X16 if x16 => Simd::X16,
            Simd::X8 | Simd::X16 if x8 => Simd::X8,
            _ => Simd::X4,
        }
    }

    /// Number of `f32` lanes this width names (see [`Simd::effective`] for
    /// the width that runs).
    pub const fn lanes(self) -> usize {
        match self {
            Simd::Scalar => 1,
            Simd::X4 => 4,
            Simd::X8 => 8,
            Simd::X16 => 16,
        }
    }
}

/// Whether `X8` and `X16` run: on x86-64, what the CPU reports.
#[cfg(all(target_arch = "x86_64", not(batchnorm_compact)))]
#[inline]
fn native_wide() -> (bool, bool) {
    let isa = crate::x86::isa();
    (isa >= crate::x86::Isa::Avx2, isa >= crate::x86::Isa::Avx512)
}

/// Whether `X8` and `X16` run: elsewhere, whether they are compiled
/// (never read in a compact build).
#[cfg(any(not(target_arch = "x86_64"), batchnorm_compact))]
#[inline]
fn native_wide() -> (bool, bool) {
    (HAS_X8, HAS_X16)
}

impl Default for Simd {
    fn default() -> Self {
        Simd::detect()
    }
}

/// Runs a kernel function's body inside [`Lane::enabled`] of `$V`: every
/// generic kernel function the compiler may keep out of line does (on
/// x86-64 it would otherwise be compiled without the instructions of the
/// run-time selected types). Elsewhere it is the body as it is, so that the
/// compiler sees the code it saw before (on a Cortex-M an extra closure
/// changed which iterator constructors were inlined, and a division by a
/// chunk size it could no longer prove non-zero survived).
#[cfg(all(target_arch = "x86_64", not(batchnorm_compact)))]
macro_rules! enabled {
    ($V:ty => $body:block) => {
        <$V as $crate::lanes::Lane>::enabled(
            #[inline(always)]
            move || $body,
        )
    };
}
/// The body as it is (see the x86-64 definition).
#[cfg(not(all(target_arch = "x86_64", not(batchnorm_compact))))]
macro_rules! enabled {
    ($V:ty => $body:block) => {
        $body
    };
}
pub(crate) use enabled;

/// Returns `f`: lets a closure bound with `let` carry `#[inline(always)]`
/// (an attribute on a closure is stable in argument position only). Kernel
/// closures need it on x86-64, where a closure left out of line is compiled
/// without the instructions [`Lane::enabled`] turned on around its caller.
#[inline(always)]
pub(crate) fn inlined<F>(f: F) -> F {
    f
}

/// Whether this build is *compact*: one lane width (`f32`, see
/// [`Simd::detect`]) and one instantiation of each normalization kernel for
/// every activation, so that a microcontroller's flash holds only the code
/// it runs. The default on every target but x86, x86-64 and aarch64 (where
/// `wide`'s wider types are native SIMD, and several widths will be
/// selected at run time); the `all-widths` feature turns it off there, and
/// `--cfg batchnorm_compact` turns it on anywhere (CI tests the compact
/// code on the host with it).
pub(crate) const COMPACT: bool = cfg!(any(
    batchnorm_compact,
    all(
        not(feature = "all-widths"),
        not(any(
            target_arch = "x86",
            target_arch = "x86_64",
            target_arch = "aarch64"
        ))
    )
));

/// Whether `f32x8` kernels are compiled off x86-64 (outside a compact
/// build): where the target runs them in one register (`avx`), or every
/// width is asked for.
#[cfg(any(not(target_arch = "x86_64"), batchnorm_compact))]
const HAS_X8: bool = cfg!(any(feature = "all-widths", target_feature = "avx"));
/// Whether `f32x16` kernels are compiled off x86-64 (outside a compact
/// build).
#[cfg(any(not(target_arch = "x86_64"), batchnorm_compact))]
const HAS_X16: bool = cfg!(any(feature = "all-widths", target_feature = "avx512f"));

/// Whether stack-resident windows are small (moments' panel windows and
/// run groups, normalization's coefficient segments): on every target but
/// x86-64 and aarch64 (microcontrollers and 32-bit targets, whose thread
/// and interrupt stacks are small), and with `--cfg batchnorm_compact`.
/// Results stay within the same bounds; only the number of passes over a
/// wide row changes.
pub(crate) const SMALL_STACK: bool = cfg!(any(
    batchnorm_compact,
    not(any(target_arch = "x86_64", target_arch = "aarch64"))
));

/// `N` values starting on a 64-byte boundary (a cache line, and the widest
/// vector) on x86-64 and aarch64: the coefficient patterns that the
/// channels-last kernels load a vector at a time beside the data. Where the
/// frame put them, a sixteen-lane load could straddle two lines on every
/// vector: batch-32 NHWC inference with C = 512 and 1024 (13 MB) went from
/// 24-29 to 41 GB/s with the patterns on a line, and 1x144x28x28 from 46
/// to 57 (AMD Zen 5, `benches/README.md`). Elsewhere (microcontrollers,
/// 32-bit targets) stacks are small and a default build's lanes at most
/// four wide: no padding there.
#[cfg_attr(
    any(target_arch = "x86_64", target_arch = "aarch64"),
    repr(C, align(64))
)]
pub(crate) struct Line<T, const N: usize>(pub(crate) [T; N]);

impl<T, const N: usize> core::ops::Deref for Line<T, N> {
    type Target = [T; N];
    #[inline(always)]
    fn deref(&self) -> &[T; N] {
        &self.0
    }
}

impl<T, const N: usize> core::ops::DerefMut for Line<T, N> {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut [T; N] {
        &mut self.0
    }
}

/// Whether any lane type of this build streams its stores
/// ([`Lane::stream`]): the run-time selected x86-64 types.
pub(crate) const STREAMS: bool = cfg!(all(target_arch = "x86_64", not(batchnorm_compact)));

/// Orders the streaming stores of [`Lane::stream`] before every later store
/// (`sfence` on x86-64, where they are weakly ordered: without it, a thread
/// that receives the output through a lock or a channel could read stale
/// data); nothing elsewhere.
#[inline(always)]
pub(crate) fn store_fence() {
    #[cfg(all(target_arch = "x86_64", not(batchnorm_compact)))]
    crate::x86::sfence();
}

/// Calls `$body` with the type alias `$V` bound to the lane type of
/// `$simd.effective()`, inside [`Lane::enabled`] of that type. Only the
/// widths `effective` can return get an arm (the same conditions as
/// `native_wide`), so the others are never instantiated. On x86-64, `X8`
/// and `X16` are the run-time selected types of `crate::x86`, and
/// `effective` returns them only after the CPU reported their features:
/// this is the one place that names them (the invariant their `unsafe`
/// rests on).
#[cfg(not(any(
    batchnorm_compact,
    all(
        not(feature = "all-widths"),
        not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64"))
    )
)))]
macro_rules! with_lane {
    ($simd:expr, $V:ident => $body:expr) => {
        match $crate::lanes::Simd::effective($simd) {
            $crate::lanes::Simd::Scalar => {
                type $V = f32;
                $body
            }
            #[cfg(target_arch = "x86_64")]
            $crate::lanes::Simd::X8 => {
                type $V = $crate::x86::Avx2<4>;
                <$V as $crate::lanes::Lane>::enabled(
                    #[inline(always)]
                    || $body,
                )
            }
            #[cfg(target_arch = "x86_64")]
            $crate::lanes::Simd::X16 => {
                type $V = $crate::x86::Avx512;
                <$V as $crate::lanes::Lane>::enabled(
                    #[inline(always)]
                    || $body,
                )
            }
            #[cfg(all(
                not(target_arch = "x86_64"),
                any(feature = "all-widths", target_feature = "avx")
            ))]
            $crate::lanes::Simd::X8 => {
                type $V = wide::f32x8;
                $body
            }
            #[cfg(all(
                not(target_arch = "x86_64"),
                any(feature = "all-widths", target_feature = "avx512f")
            ))]
            $crate::lanes::Simd::X16 => {
                type $V = wide::f32x16;
                $body
            }
            _ => {
                type $V = wide::f32x4;
                $body
            }
        }
    };
}

/// Calls `$body` with the type alias `$V` bound to the one lane type of a
/// compact build (the same condition as [`COMPACT`]), whatever `$simd` is.
#[cfg(any(
    batchnorm_compact,
    all(
        not(feature = "all-widths"),
        not(any(target_arch = "x86", target_arch = "x86_64", target_arch = "aarch64"))
    )
))]
macro_rules! with_lane {
    ($simd:expr, $V:ident => $body:expr) => {{
        let _ = $simd;
        type $V = f32;
        $body
    }};
}
pub(crate) use with_lane;
