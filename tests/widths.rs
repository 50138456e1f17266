//! Which lane width runs when one is forced (`Simd::effective`): a width
//! the build does not compile falls back to the widest compiled one below
//! it, and the fallback computes what the reference computes.

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
    // Every width is native with AVX-512, so every width is compiled.
    if cfg!(all(target_arch = "x86_64", target_feature = "avx512f")) {
        for simd in Simd::ALL {
            assert_eq!(simd.effective(), simd);
        }
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
