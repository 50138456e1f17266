//! Which lane width runs when one is forced (`Simd::effective`): a width
//! the build does not compile, or the CPU does not run, falls back to the
//! widest one below it that runs, and the fallback computes what the
//! reference computes. On x86-64 the run-time detection (`cpuid`, no `std`)
//! agrees with `std`'s.

use batchnorm::{reference, Shape, Simd};

#[test]
fn effective_is_a_compiled_width_no_wider_than_asked() {
    for simd in Simd::ALL {
        let e = simd.effective();
        assert!(e.lanes() <= simd.lanes(), "{simd:?} runs {e:?}");
        // A compiled width runs itself.
        assert_eq!(e.effective(), e, "{simd:?}");
    }
    assert_eq!(Simd::Scalar.effective(), Simd::Scalar);
    // The width the free functions use is always compiled.
    assert_eq!(Simd::detect().effective(), Simd::detect());
    // On x86-64 every width is compiled, and runs when the CPU has it.
    #[cfg(all(target_arch = "x86_64", not(batchnorm_compact)))]
    {
        let avx512 = std::arch::is_x86_feature_detected!("avx512f");
        let avx2 = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma");
        assert_eq!(Simd::X4.effective(), Simd::X4);
        assert_eq!(Simd::X8.effective() == Simd::X8, avx2);
        assert_eq!(Simd::X16.effective() == Simd::X16, avx512 && avx2);
    }
    // Widening never narrows what runs.
    for pair in Simd::ALL.windows(2) {
        assert!(pair[0].effective().lanes() <= pair[1].effective().lanes());
    }
}

#[test]
fn every_forced_width_matches_the_reference() {
    // 37 channels: every width has a remainder, every width's tail runs.
    let shape = Shape::nhwc(3, 5, 37);
    let n = shape.len().unwrap();
    let x: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 113) as f32 * 0.25 - 9.0)
        .collect();
    let (mut m0, mut v0) = (vec![0.0f64; 37], vec![0.0f64; 37]);
    reference::moments(&x, shape, &mut m0, &mut v0);
    for simd in Simd::ALL {
        let (mut m, mut v) = (vec![0.0f32; 37], vec![0.0f32; 37]);
        simd.moments(&x, shape, &mut m, &mut v).unwrap();
        for c in 0..37 {
            assert!(
                (m[c] as f64 - m0[c]).abs() <= 1e-5 * (1.0 + m0[c].abs()),
                "{simd:?} c{c}"
            );
            assert!(
                (v[c] as f64 - v0[c]).abs() <= 1e-5 * (1.0 + v0[c]),
                "{simd:?} c{c}"
            );
        }
    }
}

/// `Simd::detect` on x86-64 is the crate's own `no_std` detector: it must
/// say what `std::arch::is_x86_feature_detected!` says (which also checks
/// that the OS saves the wide registers).
#[cfg(all(target_arch = "x86_64", not(batchnorm_compact)))]
#[test]
fn detect_agrees_with_std() {
    use std::arch::is_x86_feature_detected as has;
    let want = if has!("avx512f") && has!("avx2") && has!("fma") {
        Simd::X16
    } else if has!("avx2") && has!("fma") {
        Simd::X8
    } else {
        Simd::X4
    };
    assert_eq!(Simd::detect(), want);
    // Cached: the same answer every time, from any thread.
    let other = std::thread::spawn(Simd::detect).join().unwrap();
    assert_eq!(other, want);
}
