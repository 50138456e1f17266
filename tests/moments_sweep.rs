//! Length, channel-count, layout, width and alignment sweeps of the moments
//! kernels against the `f64` reference.
mod common;

use batchnorm::{reference, Shape, Simd};
use common::*;

fn check(simd: Simd, x: &[f32], shape: Shape) {
    let mut mean = vec![f32::NAN; shape.channels];
    let mut var = vec![f32::NAN; shape.channels];
    simd.moments(x, shape, &mut mean, &mut var).unwrap();
    if let Err(e) = reference::check_moments(x, shape, &mean, &var) {
        panic!("{simd:?} {shape:?}: {e}");
    }
}

/// [`check`], then: the variance is NaN for channels 0, 1 and `C - 1` (the
/// ones a test poisoned) and for no other.
fn check_poisoned(simd: Simd, x: &[f32], shape: Shape, ctx: &str) {
    check(simd, x, shape);
    let c = shape.channels;
    let mut mean = vec![0.0; c];
    let mut var = vec![0.0; c];
    simd.moments(x, shape, &mut mean, &mut var).unwrap();
    for (ch, v) in var.iter().enumerate() {
        let bad = ch == 0 || ch == 1 || ch == c - 1;
        assert_eq!(v.is_nan(), bad, "{simd:?} {shape:?} {ctx} ch {ch}");
    }
}

fn shapes(lanes: usize) -> Vec<Shape> {
    let mut v = Vec::new();
    let counts = [
        1,
        2,
        3,
        lanes - 1,
        lanes,
        lanes + 1,
        2 * lanes + 1,
        4 * lanes + 1,
        37,
    ];
    let chans = [
        1,
        2,
        3,
        5,
        7,
        16,
        17,
        lanes + 1,
        4 * lanes + 1,
        64,
        130,
        257,
    ];
    for &c in &chans {
        for &k in &counts {
            let k = k.max(1);
            v.push(Shape::nhwc(k, 1, c));
            v.push(Shape::nhwc(2, k, c));
            v.push(Shape::nchw(2, c, k));
            v.push(Shape::nchw(k, c, 1));
            v.push(Shape::nchw(1, c, k + 3 * lanes));
        }
    }
    v
}

#[test]
fn every_width_layout_and_length() {
    let mut rng = Rng::new(1);
    for simd in Simd::ALL {
        for shape in shapes(simd.lanes().max(2)) {
            let x = channel_data(
                &mut rng,
                shape,
                &[0.5, -3.0, 1e3, 0.0],
                &[1.0, 0.1, 2.0, 1e-3],
            );
            for off in 0..3 {
                let buf = misaligned(&x, off);
                check(simd, &buf[off..], shape);
            }
        }
    }
}

#[test]
fn long_and_ill_conditioned() {
    let mut rng = Rng::new(2);
    for simd in Simd::ALL {
        for shape in [
            Shape::nhwc(3000, 1, 3),
            Shape::nhwc(100, 49, 16),
            Shape::nchw(7, 5, 3001),
            Shape::nhwc(40, 3, 1000),
            Shape::nchw(300, 200, 3),
            Shape::nchw(2, 3, 40_000),
            Shape::nchw(1, 1, 100_003),
            // Panel walks: several blocks of super-rows, one window with an
            // overlapping last vector, two windows, windows of NCHW channels.
            Shape::nhwc(5000, 1, 64),
            Shape::nhwc(2500, 1, 300),
            Shape::nhwc(700, 1, 1500),
            Shape::nchw(500, 700, 3),
        ] {
            let x = channel_data(
                &mut rng,
                shape,
                &[1e4, 1e6, -5.0, 1e3],
                &[1.0, 1.0, 1.0, 1e-2],
            );
            check(simd, &x, shape);
        }
    }
}

/// A super-row of up to `2 * SLOTS` whole vectors is one register group read
/// in memory order (16 vectors with 32 registers, 8 with 16); a longer one
/// is split into column groups. Every super-row of 5 to 17 vectors, so both
/// sides of that boundary on every build and width, with row counts around
/// the 64-rows-per-lane flush and past a block, misaligned, with
/// ill-conditioned channels.
#[test]
fn rows_of_up_to_sixteen_vectors() {
    let mut rng = Rng::new(7);
    for simd in Simd::ALL {
        let w = simd.lanes();
        // `k` vectors per super-row: `C = k * w`, and with more than one
        // lane also `C = k` when `k` and `w` are coprime (`lcm(k, w) = k * w`).
        let chans = (5..=17).flat_map(|k| {
            let coprime = w > 1 && k % 2 == 1;
            [Some(k * w), coprime.then_some(k)].into_iter().flatten()
        });
        for c in chans {
            for rows in [1, 2, 63, 64, 65, 129, 2100] {
                let shape = Shape::nhwc(rows, 1, c);
                let x = channel_data(&mut rng, shape, &[1e4, -2.0, 1e3], &[1.0, 0.5, 1e-2]);
                for off in [0, 1, 3] {
                    let buf = misaligned(&x, off);
                    check(simd, &buf[off..], shape);
                }
            }
        }
    }
}

/// An NCHW run is summed eight vectors at a time, then four, then one
/// vector per slot, then the narrower widths. Every run length from 7 to
/// 17 vectors plus one, so each loop's first and last iteration and every
/// remainder, on every width, misaligned, with an ill-conditioned channel.
#[test]
fn runs_around_the_unrolled_loop() {
    let mut rng = Rng::new(11);
    for simd in Simd::ALL {
        let w = simd.lanes();
        for s in 7 * w..=17 * w + 1 {
            let shape = Shape::nchw(2, 3, s);
            let x = channel_data(&mut rng, shape, &[1e3, -2.0, 0.5], &[1.0, 0.5, 1e-3]);
            for off in [0, 1, 3] {
                let buf = misaligned(&x, off);
                check(simd, &buf[off..], shape);
            }
        }
    }
}

#[test]
fn outlier_first_element() {
    // The first element of every channel is 1e4 σ away from the rest: the
    // channel is still well conditioned (|mean| <= 10 σ of the whole), so the
    // 1e-5 variance bound applies, and the kernel's first shift is poor.
    let mut rng = Rng::new(4);
    for simd in Simd::ALL {
        for shape in [
            Shape::nhwc(5000, 1, 3),
            Shape::nhwc(700, 3, 40),
            Shape::nchw(3, 4, 2000),
            Shape::nchw(900, 3, 2),
            Shape::nhwc(2100, 1, 100),
            Shape::nhwc(700, 3, 300),
            Shape::nhwc(400, 1, 1500),
            Shape::nchw(300, 700, 3),
            // Runs: the first block is the first run, shifted by its own
            // mean; short runs make the next blocks span several of them.
            Shape::nchw(2000, 3, 17),
            Shape::nchw(30, 5, 700),
        ] {
            let mut x = channel_data(&mut rng, shape, &[0.0, 5.0], &[1.0, 0.5]);
            for c in 0..shape.channels {
                x[reference::index(shape, 0, 0, c)] = if c % 2 == 0 { 1e4 } else { -3e4 };
            }
            check(simd, &x, shape);
        }
    }
}

#[test]
fn every_channel_count_the_issue_names() {
    let mut rng = Rng::new(6);
    for simd in Simd::ALL {
        for c in [1, 3, 7, 16, 17, 64, 256, 1000, 4096] {
            for shape in [
                Shape::nhwc(5, 3, c),
                Shape::nchw(3, c, 5),
                Shape::nchw(2, c, 33),
            ] {
                let x = channel_data(&mut rng, shape, &[2.0, -1e3, 1e4], &[1.0, 3.0, 1.0]);
                let buf = misaligned(&x, 1);
                check(simd, &buf[1..], shape);
            }
        }
    }
}

#[test]
fn ten_million_elements_per_channel() {
    // crate docs §3 holds "for count up to 1e7": one well-conditioned and one
    // ill-conditioned (1e4 + N(0, 1)) channel of 1e7 elements, on the
    // build's own width and on the scalar fallback.
    let mut rng = Rng::new(7);
    let shape = Shape::nhwc(10_000_000, 1, 2);
    let x = channel_data(&mut rng, shape, &[0.5, 1e4], &[2.0, 1.0]);
    for simd in [Simd::detect(), Simd::Scalar] {
        check(simd, &x, shape);
    }
    let shape = Shape::nchw(1, 1, 10_000_000);
    let x = gaussian(&mut rng, 10_000_000, 1e4, 1.0);
    for simd in [Simd::detect(), Simd::Scalar] {
        check(simd, &x, shape);
    }
}

#[test]
fn non_finite_values_poison_only_their_channel() {
    // The first row of a panel walk is its first block, set without the
    // kernels: NaN and infinities there must poison their channel exactly as
    // they do in later rows (and in one-row tensors, where nothing follows).
    let mut rng = Rng::new(5);
    for simd in Simd::ALL {
        for rows in [1, 2, 7, 40] {
            for c in [3, 16, 17, 300, 1500] {
                for row in [0, rows - 1] {
                    let shape = Shape::nhwc(rows, 1, c);
                    let mut x = channel_data(&mut rng, shape, &[0.0, 1e3], &[1.0, 2.0]);
                    x[reference::index(shape, row, 0, 0)] = f32::NAN;
                    x[reference::index(shape, row, 0, 1)] = f32::INFINITY;
                    x[reference::index(shape, row, 0, c - 1)] = f32::NEG_INFINITY;
                    check_poisoned(simd, &x, shape, &format!("row {row}"));
                }
            }
        }
    }
}

#[test]
fn non_finite_values_poison_only_their_channel_in_runs() {
    // NCHW runs shift a channel's first block by its first element and
    // decide from the block's sums whether to sum it again around its mean:
    // a NaN or infinity in the first block (first element, end of the first
    // run) or in a later one must still make the channel NaN, and leave its
    // neighbours untouched. 9000 elements are more than one first piece on
    // every width.
    let mut rng = Rng::new(6);
    for simd in Simd::ALL {
        for shape in [
            Shape::nchw(1, 3, 17),
            Shape::nchw(3, 5, 40),
            Shape::nchw(2, 4, 9000),
        ] {
            let (n, c, s) = (shape.batch, shape.channels, shape.spatial);
            let mut x = channel_data(&mut rng, shape, &[0.0, 1e3], &[1.0, 2.0]);
            x[reference::index(shape, 0, 0, 0)] = f32::NAN;
            x[reference::index(shape, 0, s - 1, 1)] = f32::INFINITY;
            x[reference::index(shape, n - 1, s / 2, c - 1)] = f32::NEG_INFINITY;
            check_poisoned(simd, &x, shape, "runs");
        }
    }
}

#[test]
fn constant_channels_are_exact() {
    // A constant channel has variance exactly 0 and its value as mean, on
    // every path: panel walks (narrow rows, windows), NCHW with fewer
    // positions than lanes, and NCHW runs (one run per channel, several,
    // longer than a first piece). The values use their whole mantissa, so
    // any shift other than the value itself leaves rounding behind; the
    // two near f32::MAX overflow any sum of them.
    for simd in Simd::ALL {
        for shape in [
            Shape::nhwc(40, 1, 3),
            Shape::nhwc(3, 1, 1500),
            Shape::nhwc(300, 1, 17),
            Shape::nchw(5, 7, 3),
            Shape::nchw(1, 3, 17),
            Shape::nchw(2, 129, 49),
            Shape::nchw(3, 5, 100),
            Shape::nchw(2, 2, 20000),
        ] {
            let c = shape.channels;
            let values = [0.1, -97.381_23, 1.234_567_9e17, 3e38, -f32::MAX, 7.0e-39];
            let value = |ch: usize| values[ch % values.len()];
            let mut x = vec![0.0; shape.len().unwrap()];
            for i in 0..shape.batch {
                for p in 0..shape.spatial {
                    for ch in 0..c {
                        x[reference::index(shape, i, p, ch)] = value(ch);
                    }
                }
            }
            let mut mean = vec![0.0; c];
            let mut var = vec![f32::NAN; c];
            simd.moments(&x, shape, &mut mean, &mut var).unwrap();
            for ch in 0..c {
                assert_eq!(mean[ch], value(ch), "{simd:?} {shape:?} ch {ch}");
                assert_eq!(var[ch], 0.0, "{simd:?} {shape:?} ch {ch}");
            }
        }
    }
}

#[test]
fn sums_of_squares_stay_finite_at_the_domain_edge() {
    // |x| <= 1e17 is the §3 domain, so |x - K| can reach 2e17 and a sum of
    // squares in f32 overflows after about 8500 such terms. A first block
    // shifted by an outlier at -1e17, and a second block of +1e17 shifted by
    // the first block's mean, both found an infinite variance before the
    // runs' pieces were capped at 8 Ki elements and the first-block redo
    // was made to catch an overflowing sum (found in review).
    let mut rng = Rng::new(7);
    for simd in Simd::ALL {
        for (shape, half) in [
            (Shape::nchw(1, 1, 16384), false),
            (Shape::nchw(1, 1, 20000), false),
            (Shape::nchw(1, 1, 32768), true),
            (Shape::nhwc(4096, 1, 1), true),
            (Shape::nhwc(4096, 1, 20), true),
            (Shape::nhwc(4096, 1, 32), true),
            (Shape::nhwc(4096, 1, 128), true),
            (Shape::nhwc(4096, 1, 256), true),
            (Shape::nhwc(4096, 1, 300), true),
            (Shape::nchw(4096, 3, 2), true),
            (Shape::nhwc(5000, 1, 3), false),
        ] {
            let len = shape.len().unwrap();
            let mut x: Vec<f32> = (0..len).map(|_| 1e17 * rng.uniform() as f32).collect();
            if half {
                for (i, v) in x.iter_mut().enumerate() {
                    *v = if i < len / 2 { -1e17 } else { 1e17 };
                }
            } else {
                for c in 0..shape.channels {
                    x[reference::index(shape, 0, 0, c)] = -1e17;
                }
            }
            check(simd, &x, shape);
        }
    }
}
