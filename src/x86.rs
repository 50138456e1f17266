//! Run-time selected AVX2+FMA and AVX-512 lanes on x86-64: the crate's one
//! module with `unsafe`.
//!
//! A build without `-C target-cpu` or `target-feature` flags is SSE2, and
//! `wide`'s 8- and 16-lane types are then two or four 128-bit registers. This
//! module gives the kernels two more lane types, [`Avx2`] (one `__m256`) and
//! [`Avx512`] (one `__m512`), whose methods are the AVX/FMA and AVX-512F
//! instructions, and runs the kernels instantiated with them inside
//! `#[target_feature]` functions ([`Lane::enabled`]), so that the compiler
//! emits those instructions inline, with FMA and the full register file.
//!
//! The CPU is asked once ([`isa`], with `cpuid` and `xgetbv`, which need no
//! `std`), and the answer is cached. A build whose target features already
//! include AVX-512F (or AVX2 and FMA) skips the question for those.
//!
//! Soundness rests on one invariant: a value of [`Avx2`] or [`Avx512`]
//! exists, and `enabled` of either runs, only in code that
//! [`with_lane!`](crate::lanes::with_lane) reaches after [`isa`] reported
//! the type's features. The types are private to the crate and `with_lane!`
//! is the only place that names them.

#![allow(unsafe_code)]

use core::arch::x86_64::*;
use core::sync::atomic::{AtomicU8, Ordering};

use crate::lanes::Lane;
use wide::f32x4;

/// What the CPU runs beyond x86-64's SSE2, as far as the kernels care.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Isa {
    /// SSE2 only (or an OS that does not save the AVX registers).
    Sse2 = 1,
    /// AVX, AVX2 and FMA, with the OS saving `ymm` registers.
    Avx2 = 2,
    /// AVX-512F on top of [`Isa::Avx2`], with the OS saving `zmm` and mask
    /// registers.
    Avx512 = 3,
}

/// The cached answer of [`probe`]; 0 before the first question. Several
/// threads may probe at once: they store the same value.
static ISA: AtomicU8 = AtomicU8::new(0);

/// What this CPU runs (asked once, then cached).
#[inline]
pub(crate) fn isa() -> Isa {
    if cfg!(all(
        target_feature = "avx512f",
        target_feature = "avx2",
        target_feature = "fma"
    )) {
        return Isa::Avx512;
    }
    match ISA.load(Ordering::Relaxed) {
        1 => Isa::Sse2,
        2 => Isa::Avx2,
        3 => Isa::Avx512,
        _ => {
            let isa = probe();
            ISA.store(isa as u8, Ordering::Relaxed);
            isa
        }
    }
}

/// Asks the CPU (as the Intel and AMD manuals prescribe: a feature is usable
/// when `cpuid` reports it and the OS enabled its register state in `XCR0`).
#[cold]
#[allow(unused_unsafe)] // `__cpuid` is an `unsafe fn` in older toolchains only.
fn probe() -> Isa {
    // Miri runs neither `cpuid` (inline assembly) nor every AVX-512
    // intrinsic: the SSE2 kernels are the ones it checks.
    if cfg!(miri) {
        return Isa::Sse2;
    }
    // SAFETY: `cpuid` exists on every x86-64 CPU; leaves 1 and 7 are read
    // only after leaf 0 says they exist.
    let (max, l1) = unsafe { (__cpuid(0).eax, __cpuid(1)) };
    let has = |reg: u32, bit: u32| reg & (1 << bit) != 0;
    // FMA (ecx 12), OSXSAVE (ecx 27: `xgetbv` is enabled), AVX (ecx 28).
    if max < 7 || !(has(l1.ecx, 12) && has(l1.ecx, 27) && has(l1.ecx, 28)) {
        return Isa::Sse2;
    }
    // SAFETY: OSXSAVE is set, so `xgetbv` is enabled and does not fault.
    let xcr0 = unsafe { xcr0() };
    // SAFETY: leaf 7 exists (`max >= 7`).
    let l7 = unsafe { __cpuid_count(7, 0) };
    // XCR0 bits 1 and 2: SSE and AVX state. AVX2: leaf 7, ebx 5.
    if xcr0 & 0b110 != 0b110 || !has(l7.ebx, 5) {
        return Isa::Sse2;
    }
    // XCR0 bits 5, 6, 7: opmask and both halves of the zmm state.
    // AVX-512F: leaf 7, ebx 16.
    if xcr0 & 0xe0 == 0xe0 && has(l7.ebx, 16) {
        Isa::Avx512
    } else {
        Isa::Avx2
    }
}

/// `XCR0`, the register state the OS saves.
#[target_feature(enable = "xsave")]
#[allow(unused_unsafe)] // `_xgetbv` is an `unsafe fn` in older toolchains only.
fn xcr0() -> u64 {
    // SAFETY: the caller checked OSXSAVE; `xsave` is enabled here.
    unsafe { _xgetbv(0) }
}

/// `sfence`: orders the streaming stores before every later store
/// ([`crate::lanes::store_fence`]).
#[inline(always)]
pub(crate) fn sfence() {
    // SAFETY: `sfence` is SSE, part of every x86-64 CPU.
    #[allow(unused_unsafe)]
    unsafe {
        _mm_sfence()
    }
}

/// Wraps the intrinsics of [`Avx2`] and [`Avx512`]: they are
/// `#[target_feature]` functions, and the lane methods that call them are
/// not (trait methods cannot be).
macro_rules! isa {
    ($e:expr) => {{
        // SAFETY: a lane value of this module exists only after `isa()`
        // reported its features (the module's invariant), so the
        // instruction exists on this CPU.
        #[allow(unused_unsafe)]
        let v = unsafe { $e };
        v
    }};
}

/// Runs `f` with AVX2 and FMA enabled: the kernel code inlined into it is
/// compiled with them.
#[target_feature(enable = "avx2,fma")]
fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Runs `f` with AVX-512F (and AVX2, FMA) enabled.
#[target_feature(enable = "avx512f,avx2,fma")]
fn with_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Eight `f32` lanes in one `ymm` register (AVX, FMA). `S` is the number of
/// accumulators the kernels use: 4 where the type is the widest (16 `ymm`
/// registers), 8 as the tail type of [`Avx512`] (32 registers).
#[derive(Clone, Copy)]
pub(crate) struct Avx2<const S: usize>(__m256);

impl<const S: usize> Lane for Avx2<S> {
    const WIDTH: usize = 8;
    const STREAMS: bool = true;
    type Half = f32x4;
    const SLOTS: usize = S;

    #[inline(always)]
    fn enabled<R>(f: impl FnOnce() -> R) -> R {
        isa!(with_avx2(f))
    }
    /// `vbroadcastss`.
    #[inline(always)]
    fn splat(v: f32) -> Self {
        Avx2(isa!(_mm256_set1_ps(v)))
    }
    /// `vmovups` (unaligned).
    #[inline(always)]
    fn load(s: &[f32]) -> Self {
        match s.first_chunk::<8>() {
            Some(a) => Avx2(isa!(_mm256_loadu_ps(a.as_ptr()))),
            None => Self::splat(0.0),
        }
    }
    #[inline(always)]
    fn store(self, out: &mut [f32]) {
        if let Some(o) = out.first_chunk_mut::<8>() {
            isa!(_mm256_storeu_ps(o.as_mut_ptr(), self.0));
        }
    }
    /// `vmovntps` where `out` starts on 32 bytes, else `vmovups`.
    #[inline(always)]
    fn stream(self, out: &mut [f32]) {
        if let Some(o) = out.first_chunk_mut::<8>() {
            if (o.as_ptr() as usize) & 31 == 0 {
                // SAFETY (beside `isa!`'s): the address is 32-byte aligned, as
                // `vmovntps` requires.
                isa!(_mm256_stream_ps(o.as_mut_ptr(), self.0));
            } else {
                isa!(_mm256_storeu_ps(o.as_mut_ptr(), self.0));
            }
        }
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Avx2(isa!(_mm256_add_ps(self.0, o.0)))
    }
    /// Halves added pairwise down to one lane.
    #[inline(always)]
    fn reduce_add(self) -> f32 {
        let lo = isa!(_mm256_castps256_ps128(self.0));
        let hi = isa!(_mm256_extractf128_ps::<1>(self.0));
        let q = isa!(_mm_add_ps(lo, hi));
        let d = isa!(_mm_add_ps(q, _mm_movehl_ps(q, q)));
        isa!(_mm_cvtss_f32(_mm_add_ss(d, _mm_shuffle_ps::<1>(d, d))))
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        Avx2(isa!(_mm256_sub_ps(self.0, o.0)))
    }
    /// `vfmadd`: one rounding.
    #[inline(always)]
    fn mul_add(self, m: Self, a: Self) -> Self {
        Avx2(isa!(_mm256_fmadd_ps(self.0, m.0, a.0)))
    }
    /// `vmaxps(lo, self)` is `lo > self ? lo : self`: NaN in `self` stays.
    #[inline(always)]
    fn floor_at(self, lo: Self) -> Self {
        Avx2(isa!(_mm256_max_ps(lo.0, self.0)))
    }
    /// `vminps(hi, self)` is `hi < self ? hi : self`: NaN in `self` stays.
    #[inline(always)]
    fn ceil_at(self, hi: Self) -> Self {
        Avx2(isa!(_mm256_min_ps(hi.0, self.0)))
    }
    #[inline(always)]
    fn mul(self, m: Self) -> Self {
        Avx2(isa!(_mm256_mul_ps(self.0, m.0)))
    }
    /// An ordered, quiet `>` (false for NaN) and an `and`.
    #[inline(always)]
    fn keep_above(self, lo: Self, v: Self) -> Self {
        let m = isa!(_mm256_cmp_ps::<_CMP_GT_OQ>(self.0, lo.0));
        Avx2(isa!(_mm256_and_ps(m, v.0)))
    }
    #[inline(always)]
    fn keep_below(self, hi: Self, v: Self) -> Self {
        let m = isa!(_mm256_cmp_ps::<_CMP_LT_OQ>(self.0, hi.0));
        Avx2(isa!(_mm256_and_ps(m, v.0)))
    }
    /// One `vsqrtpd` and one `vdivpd` on a `ymm` register (SSE2 needs two
    /// of each).
    #[inline(always)]
    fn quot_sqrt4(n: [f64; 4], d: [f64; 4]) -> [f64; 4] {
        let root = isa!(_mm256_sqrt_pd(_mm256_loadu_pd(d.as_ptr())));
        let q = isa!(_mm256_div_pd(_mm256_loadu_pd(n.as_ptr()), root));
        let mut out = [0.0; 4];
        isa!(_mm256_storeu_pd(out.as_mut_ptr(), q));
        out
    }
}

/// Sixteen `f32` lanes in one `zmm` register (AVX-512F); tails go through
/// [`Avx2`].
#[derive(Clone, Copy)]
pub(crate) struct Avx512(__m512);

impl Lane for Avx512 {
    const WIDTH: usize = 16;
    const STREAMS: bool = true;
    type Half = Avx2<8>;
    const SLOTS: usize = 8;

    #[inline(always)]
    fn enabled<R>(f: impl FnOnce() -> R) -> R {
        isa!(with_avx512(f))
    }
    #[inline(always)]
    fn splat(v: f32) -> Self {
        Avx512(isa!(_mm512_set1_ps(v)))
    }
    #[inline(always)]
    fn load(s: &[f32]) -> Self {
        match s.first_chunk::<16>() {
            Some(a) => Avx512(isa!(_mm512_loadu_ps(a.as_ptr()))),
            None => Self::splat(0.0),
        }
    }
    #[inline(always)]
    fn store(self, out: &mut [f32]) {
        if let Some(o) = out.first_chunk_mut::<16>() {
            isa!(_mm512_storeu_ps(o.as_mut_ptr(), self.0));
        }
    }
    /// `vmovntps` where `out` starts on 64 bytes, else `vmovups`.
    #[inline(always)]
    fn stream(self, out: &mut [f32]) {
        if let Some(o) = out.first_chunk_mut::<16>() {
            if (o.as_ptr() as usize) & 63 == 0 {
                // SAFETY (beside `isa!`'s): the address is 64-byte aligned, as
                // `vmovntps` requires.
                isa!(_mm512_stream_ps(o.as_mut_ptr(), self.0));
            } else {
                isa!(_mm512_storeu_ps(o.as_mut_ptr(), self.0));
            }
        }
    }
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Avx512(isa!(_mm512_add_ps(self.0, o.0)))
    }
    /// Halves added pairwise down to one lane.
    #[inline(always)]
    fn reduce_add(self) -> f32 {
        let lo = isa!(_mm512_castps512_ps256(self.0));
        let hi = isa!(_mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(
            _mm512_castps_pd(self.0)
        )));
        Avx2::<8>(isa!(_mm256_add_ps(lo, hi))).reduce_add()
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        Avx512(isa!(_mm512_sub_ps(self.0, o.0)))
    }
    /// `vfmadd`: one rounding.
    #[inline(always)]
    fn mul_add(self, m: Self, a: Self) -> Self {
        Avx512(isa!(_mm512_fmadd_ps(self.0, m.0, a.0)))
    }
    /// `vmaxps(lo, self)`, as for [`Avx2`].
    #[inline(always)]
    fn floor_at(self, lo: Self) -> Self {
        Avx512(isa!(_mm512_max_ps(lo.0, self.0)))
    }
    #[inline(always)]
    fn ceil_at(self, hi: Self) -> Self {
        Avx512(isa!(_mm512_min_ps(hi.0, self.0)))
    }
    #[inline(always)]
    fn mul(self, m: Self) -> Self {
        Avx512(isa!(_mm512_mul_ps(self.0, m.0)))
    }
    /// A compare into a mask register and a zero-masked move.
    #[inline(always)]
    fn keep_above(self, lo: Self, v: Self) -> Self {
        let m = isa!(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(self.0, lo.0));
        Avx512(isa!(_mm512_maskz_mov_ps(m, v.0)))
    }
    #[inline(always)]
    fn keep_below(self, hi: Self, v: Self) -> Self {
        let m = isa!(_mm512_cmp_ps_mask::<_CMP_LT_OQ>(self.0, hi.0));
        Avx512(isa!(_mm512_maskz_mov_ps(m, v.0)))
    }
    /// [`Avx2`]'s: four `f64` fill a `ymm` register.
    #[inline(always)]
    fn quot_sqrt4(n: [f64; 4], d: [f64; 4]) -> [f64; 4] {
        Avx2::<8>::quot_sqrt4(n, d)
    }
}
