//! Helpers shared by the integration tests: a seeded generator (no `rand`
//! dependency, so results do not move with another crate's version),
//! misaligned buffers, and the shapes that cross the aligned kernels'
//! boundaries.
#![allow(dead_code)]

/// SplitMix64: tiny, seedable, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(1e-300);
        let v = self.uniform();
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// `len` values `mean + sd * N(0, 1)` rounded to `f32`.
pub fn gaussian(rng: &mut Rng, len: usize, mean: f64, sd: f64) -> Vec<f32> {
    (0..len)
        .map(|_| (mean + sd * rng.normal()) as f32)
        .collect()
}

/// Per-channel data: channel `c` of `shape` drawn from `N(means[c % k], sds[c % k])`.
pub fn channel_data(
    rng: &mut Rng,
    shape: batchnorm::Shape,
    means: &[f64],
    sds: &[f64],
) -> Vec<f32> {
    let len = shape.batch * shape.spatial * shape.channels;
    let mut x = vec![0.0f32; len];
    for n in 0..shape.batch {
        for s in 0..shape.spatial {
            for c in 0..shape.channels {
                let i = batchnorm::reference::index(shape, n, s, c);
                x[i] = (means[c % means.len()] + sds[c % sds.len()] * rng.normal()) as f32;
            }
        }
    }
    x
}

/// A buffer holding `data` starting `offset` floats into it, so that kernels
/// see every alignment of their input.
pub fn misaligned(data: &[f32], offset: usize) -> Vec<f32> {
    let mut v = vec![f32::NAN; offset];
    v.extend_from_slice(data);
    v
}

/// The channel of element `i` of a tensor of `shape` (NCHW or NHWC).
pub fn channel_of(shape: batchnorm::Shape, i: usize) -> usize {
    match shape.layout {
        batchnorm::Layout::Nchw => i / shape.spatial % shape.channels,
        batchnorm::Layout::Nhwc => i % shape.channels,
    }
}

/// Shapes for the alignment tests with `w` lanes: NCHW runs either side of
/// the four vectors from which eight and sixteen lanes align their stores;
/// periodic tensors, channels last (patterns of one to sixteen vectors, and
/// longer ones) and channels first with runs shorter than a vector, with
/// and without a partial last pattern.
pub fn alignment_shapes(w: usize) -> Vec<batchnorm::Shape> {
    use batchnorm::Shape;
    let mut shapes: Vec<Shape> = [4 * w - 1, 4 * w, 4 * w + 1, 5 * w + 3, 108]
        .iter()
        .map(|&s| Shape::nchw(2, 3, s))
        .collect();
    for c in [3, 16, 24, 64, 100] {
        for rows in [4 * w + 1, 16 * w + 3, 100] {
            shapes.push(Shape::nhwc(rows, 1, c));
        }
    }
    for rows in [2, 7, 33] {
        shapes.push(Shape::nchw(rows, 3, 5));
    }
    // Super-rows longer than normalization's 1024-position pattern, on
    // enough of them to take its long pattern (`long_rows`): two rows of
    // 1000 channels with sixteen lanes, one row of 1040 with every width.
    shapes.push(Shape::nhwc(40, 1, 1000));
    shapes.push(Shape::nhwc(17, 1, 1040));
    shapes
}
