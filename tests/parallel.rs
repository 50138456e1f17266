//! The `parallel` module (feature `rayon`): the same bits on pools of 1, 2,
//! 3 and 8 threads, on shapes that split into several chunks in every way
//! the planner splits (NHWC rows, NCHW batch elements, NCHW channel ranges
//! of single images, NCHW with fewer spatial positions than lanes), and the
//! results within crate docs §3 of the `f64` reference.
#![cfg(feature = "rayon")]

mod common;

use batchnorm::parallel::{self, Chunk, MAX_CHUNKS, MIN_CHUNK, MIN_ROWS};
use batchnorm::{
    accumulate, reference, update_moving, Activation, Batch, BatchNorm, Config, Error, Layout,
    Moments, MovingStats, Params, ScaleOffset, Shape,
};
use common::{channel_data, misaligned, Rng};

const THREADS: [usize; 4] = [1, 2, 3, 8];

fn pool(n: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .unwrap()
}

/// Shapes that split into several chunks, each way the planner splits.
fn shapes() -> Vec<Shape> {
    vec![
        Shape::rows(600_000, 1),    // NHWC, one channel: 4 chunks of rows
        Shape::rows(200_000, 3),    // RGB
        Shape::nhwc(7, 5000, 17),   // odd channel count, rows across images
        Shape::rows(20_000, 64),    // 4 chunks of 5000 rows
        Shape::rows(8_200, 100),    // wide rows: 2 chunks of >= 4096 rows
        Shape::nchw(40, 16, 1024),  // batch >= chunks
        Shape::nchw(2, 7, 40_000),  // batch < chunks: channel ranges
        Shape::nchw(1, 1000, 300),  // one image, split by channels
        Shape::nchw(1, 256, 2048),  // one image, 4 ranges of 64 channels
        Shape::nchw(20_000, 13, 3), // spatial below the lane width
        Shape::nchw(2, 3, 100_000), // three channels, two images
    ]
}

/// Data with a different mean and spread per channel, ill-conditioned ones
/// (`1e4 + N(0, 1)`) included.
fn data(shape: Shape, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    channel_data(
        &mut rng,
        shape,
        &[0.0, 3.0, -20.0, 1e4, 0.5, 250.0, -7.0],
        &[1.0, 0.1, 5.0, 1.0, 2.0, 30.0, 0.01],
    )
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|f| f.to_bits()).collect()
}

fn record_bits(v: &[Moments]) -> Vec<[u8; 24]> {
    v.iter().map(|m| m.to_le_bytes()).collect()
}

#[test]
fn test_shapes_split_into_several_chunks() {
    for shape in shapes() {
        let chunks = parallel::chunks(shape).unwrap();
        assert!(chunks.len() > 1, "{shape:?} is one chunk");
        assert!(chunks.len() <= MAX_CHUNKS, "{shape:?}");
    }
}

#[test]
fn chunks_tile_the_tensor_and_depend_on_the_shape_only() {
    let mut extra = shapes();
    extra.extend([
        Shape::rows(1, 5),
        Shape::rows(MIN_ROWS * 2 - 1, 3),
        Shape::nchw(1, 1, 1),
        Shape::nchw(1, 3, MIN_CHUNK * 40),
        Shape::nchw(MAX_CHUNKS + 1, 2, 4096),
        Shape::nchw(3, 100, 100_000), // 3 images, 10 ranges of channels each
        Shape::nhwc(4096, 16, 3),
    ]);
    for shape in extra {
        let len = shape.len().unwrap();
        let chunks = parallel::chunks(shape).unwrap();
        // Computed on different pools: the same chunks.
        for t in THREADS {
            assert_eq!(pool(t).install(|| parallel::chunks(shape)).unwrap(), chunks);
        }
        let mut at = 0;
        let mut part_channels = vec![0usize; chunks.last().unwrap().part + 1];
        for (i, ch) in chunks.iter().enumerate() {
            let Chunk {
                start,
                shape: s,
                first_channel,
                part,
            } = *ch;
            assert_eq!(
                start, at,
                "{shape:?} chunk {i} does not follow the one before"
            );
            assert_eq!(s.layout, shape.layout);
            assert!(s.len().unwrap() > 0);
            assert_eq!(first_channel, part_channels[part], "{shape:?} chunk {i}");
            part_channels[part] += s.channels;
            at += s.len().unwrap();
            if shape.layout == Layout::Nhwc {
                assert_eq!(s.channels, shape.channels);
            } else {
                assert_eq!(s.spatial, shape.spatial);
            }
        }
        assert_eq!(at, len, "{shape:?}: chunks do not cover the tensor");
        assert!(part_channels.iter().all(|&c| c == shape.channels));
        assert!(chunks.len() <= MAX_CHUNKS, "{shape:?}");
    }
    assert!(parallel::chunks(Shape::rows(0, 3)).unwrap().is_empty());
    assert_eq!(
        parallel::chunks(Shape::rows(3, 0)),
        Err(Error::ZeroChannels)
    );
}

/// Everything one pool computes for one input.
#[derive(Debug, PartialEq)]
struct Outputs {
    mean: Vec<u32>,
    variance: Vec<u32>,
    records: Vec<[u8; 24]>,
    normalized: Vec<u32>,
    trained: Vec<u32>,
    batch: (Vec<u32>, Vec<u32>),
    moving: (Vec<u32>, Vec<u32>, u64),
    inferred: Vec<u32>,
}

fn run_all(x: &[f32], shape: Shape) -> Outputs {
    let c = shape.channels;
    let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
    parallel::moments(x, shape, &mut mean, &mut var).unwrap();
    // Records that already hold something, so the final merge is tested.
    let mut recs = vec![
        Moments {
            count: 5,
            mean: 1.5,
            m2: 2.25
        };
        c
    ];
    parallel::accumulate(x, shape, &mut recs).unwrap();
    let scale: Vec<f32> = (0..c).map(|i| 0.5 + i as f32 * 0.25).collect();
    let offset: Vec<f32> = (0..c).map(|i| i as f32 - 2.0).collect();
    let p = Params {
        mean: &mean,
        variance: &var,
        scale: Some(&scale),
        offset: Some(&offset),
        epsilon: 1e-3,
        activation: Activation::Relu6,
    };
    let mut y = vec![0.0; x.len()];
    parallel::normalize(x, &mut y, shape, &p).unwrap();
    let (mut mm, mut mv) = (vec![0.25; c], vec![2.0; c]);
    let (mut bm, mut bv) = (vec![0.0; c], vec![0.0; c]);
    let mut yt = vec![0.0; x.len()];
    let mut yi = vec![0.0; x.len()];
    let batches;
    {
        let moving = MovingStats {
            mean: &mut mm,
            variance: &mut mv,
            batches: 3,
        };
        let mut bn = BatchNorm::new(Config::pytorch(), moving).unwrap();
        let mut batch = Batch {
            mean: &mut bm,
            variance: &mut bv,
        };
        let so = ScaleOffset::new(&scale, &offset);
        parallel::train(&mut bn, x, &mut yt, shape, so, &mut batch).unwrap();
        parallel::infer(&bn, x, &mut yi, shape, so).unwrap();
        batches = bn.moving().batches;
    }
    Outputs {
        mean: bits(&mean),
        variance: bits(&var),
        records: record_bits(&recs),
        normalized: bits(&y),
        trained: bits(&yt),
        batch: (bits(&bm), bits(&bv)),
        moving: (bits(&mm), bits(&mv), batches),
        inferred: bits(&yi),
    }
}

#[test]
fn thread_count_does_not_change_a_bit() {
    for (i, shape) in shapes().into_iter().enumerate() {
        let x = data(shape, 100 + i as u64);
        let one = pool(1).install(|| run_all(&x, shape));
        for t in THREADS {
            // Several runs per pool: scheduling differs between runs too.
            for _ in 0..2 {
                let other = pool(t).install(|| run_all(&x, shape));
                assert!(other == one, "{shape:?}: {t} threads differ from one");
            }
        }
    }
}

#[test]
fn results_are_within_the_design_bounds() {
    let p4 = pool(4);
    for (i, shape) in shapes().into_iter().enumerate() {
        let c = shape.channels;
        let raw = data(shape, 200 + i as u64);
        // Misaligned input: the chunks start anywhere.
        let buf = misaligned(&raw, 1 + i % 3);
        let x = &buf[1 + i % 3..];
        p4.install(|| {
            let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
            parallel::moments(x, shape, &mut mean, &mut var).unwrap();
            reference::check_moments(x, shape, &mean, &var)
                .unwrap_or_else(|e| panic!("{shape:?}: {e}"));

            // accumulate into empty records: the same statistics.
            let mut recs = vec![Moments::EMPTY; c];
            parallel::accumulate(x, shape, &mut recs).unwrap();
            let count = (shape.batch * shape.spatial) as u64;
            for (ch, r) in recs.iter().enumerate() {
                assert_eq!(r.count, count);
                assert_eq!(r.mean as f32, mean[ch]);
            }

            let scale: Vec<f32> = (0..c).map(|j| 1.0 + (j % 5) as f32 * 0.5).collect();
            let offset: Vec<f32> = (0..c).map(|j| (j % 3) as f32 - 1.0).collect();
            let p = Params {
                mean: &mean,
                variance: &var,
                scale: Some(&scale),
                offset: Some(&offset),
                epsilon: 1e-5,
                activation: Activation::None,
            };
            let mut y = vec![0.0; x.len()];
            parallel::normalize(x, &mut y, shape, &p).unwrap();
            reference::check_normalize(x, shape, &p, &y)
                .unwrap_or_else(|e| panic!("{shape:?}: {e}"));
            // Given the statistics, normalization is elementwise: the
            // single-threaded kernel's bits.
            let mut y1 = vec![0.0; x.len()];
            batchnorm::normalize(x, &mut y1, shape, &p).unwrap();
            assert_eq!(bits(&y), bits(&y1), "{shape:?}");

            // A training step is the three parts, bit for bit, and the
            // moving update is within f32 rounding of the f64 reference.
            let config = Config::pytorch();
            let (mm0, mv0) = (vec![0.5f32; c], vec![1.5f32; c]);
            let (mut mm, mut mv) = (mm0.clone(), mv0.clone());
            let (mut bm, mut bv) = (vec![0.0; c], vec![0.0; c]);
            let mut yt = vec![0.0; x.len()];
            let moving = MovingStats {
                mean: &mut mm,
                variance: &mut mv,
                batches: 0,
            };
            let mut bn = BatchNorm::new(config, moving).unwrap();
            let mut batch = Batch {
                mean: &mut bm,
                variance: &mut bv,
            };
            let so = ScaleOffset::new(&scale, &offset);
            parallel::train(&mut bn, x, &mut yt, shape, so, &mut batch).unwrap();
            let mut yi = vec![0.0; x.len()];
            parallel::infer(&bn, x, &mut yi, shape, so).unwrap();
            let mut yi1 = vec![0.0; x.len()];
            bn.infer(x, &mut yi1, shape, so).unwrap();
            assert_eq!(bits(&yi), bits(&yi1), "{shape:?}: infer");
            assert_eq!((bits(&bm), bits(&bv)), (bits(&mean), bits(&var)));
            let pt = Params {
                epsilon: config.epsilon,
                activation: config.activation,
                ..p
            };
            let mut y2 = vec![0.0; x.len()];
            parallel::normalize(x, &mut y2, shape, &pt).unwrap();
            assert_eq!(bits(&yt), bits(&y2), "{shape:?}: train output");
            let (mut mm2, mut mv2) = (mm0.clone(), mv0.clone());
            let mut moving2 = MovingStats {
                mean: &mut mm2,
                variance: &mut mv2,
                batches: 0,
            };
            update_moving(&mean, &var, count, &config, &mut moving2).unwrap();
            assert_eq!((bits(&mm), bits(&mv)), (bits(&mm2), bits(&mv2)));
            for ch in 0..c {
                let (rm, rv) = reference::update_moving(
                    (mm0[ch], mv0[ch]),
                    (mean[ch], var[ch]),
                    count,
                    1,
                    &config,
                );
                let tol = |r: f64, m0: f32| 4.0 * f32::EPSILON as f64 * (r.abs() + m0.abs() as f64);
                assert!((mm[ch] as f64 - rm).abs() <= tol(rm, mm0[ch]));
                assert!((mv[ch] as f64 - rv).abs() <= tol(rv, mv0[ch]));
            }
        });
    }
}

#[test]
fn merged_records_match_the_serial_merge_of_the_chunks() {
    // The tree is the documented one: leaves are the parts in order,
    // `[0, n)` = `[0, n/2)` merged with `[n/2, n)`, left first.
    fn tree(leaves: &[Vec<Moments>]) -> Vec<Moments> {
        if leaves.len() == 1 {
            return leaves[0].clone();
        }
        let (l, r) = leaves.split_at(leaves.len() / 2);
        let (mut a, b) = (tree(l), tree(r));
        for (x, y) in a.iter_mut().zip(&b) {
            *x = x.merge(*y).unwrap();
        }
        a
    }
    for (i, shape) in shapes().into_iter().enumerate() {
        let x = data(shape, 300 + i as u64);
        let chunks = parallel::chunks(shape).unwrap();
        let parts = chunks.last().unwrap().part + 1;
        let mut leaves = vec![vec![Moments::EMPTY; shape.channels]; parts];
        for ch in &chunks {
            let n = ch.shape.len().unwrap();
            let out = &mut leaves[ch.part][ch.first_channel..][..ch.shape.channels];
            accumulate(&x[ch.start..ch.start + n], ch.shape, out).unwrap();
        }
        let want = tree(&leaves);
        let mut got = vec![Moments::EMPTY; shape.channels];
        pool(3)
            .install(|| parallel::accumulate(&x, shape, &mut got))
            .unwrap();
        assert_eq!(record_bits(&got), record_bits(&want), "{shape:?}");
    }
}

#[test]
fn merge_slice_is_the_elementwise_merge() {
    let mut rng = Rng::new(9);
    let mut a: Vec<Moments> = (0..50)
        .map(|i| Moments {
            count: [0, 1, 7, 7, 1000][i % 5],
            mean: rng.normal() * 10.0,
            m2: rng.uniform() * 5.0,
        })
        .collect();
    let b: Vec<Moments> = (0..50)
        .map(|i| Moments {
            count: [3, 0, 7, 9, 1][i % 5],
            mean: rng.normal() * 1e4,
            m2: rng.uniform(),
        })
        .collect();
    let want: Vec<Moments> = a
        .iter()
        .zip(&b)
        .map(|(x, y)| x.merge(*y).unwrap())
        .collect();
    Moments::merge_slice(&mut a, &b).unwrap();
    assert_eq!(record_bits(&a), record_bits(&want));
    // Errors write nothing.
    let before = a.clone();
    assert!(matches!(
        Moments::merge_slice(&mut a, &b[1..]),
        Err(Error::Length { what: "other", .. })
    ));
    let mut huge = b.clone();
    huge[7].count = u64::MAX;
    assert_eq!(
        Moments::merge_slice(&mut a, &huge),
        Err(Error::CountOverflow)
    );
    assert_eq!(a, before);
}

#[test]
fn bad_input_is_an_error_and_writes_nothing() {
    let shape = Shape::nchw(2, 3, 4096);
    let x = data(shape, 1);
    let (mut m, mut v) = (vec![7.0f32; 3], vec![7.0f32; 3]);
    assert!(parallel::moments(&x[1..], shape, &mut m, &mut v).is_err());
    assert!(parallel::moments(&x, shape, &mut m[..2], &mut v).is_err());
    assert_eq!((m[0], v[0]), (7.0, 7.0));
    let empty = Shape::nchw(0, 3, 4096);
    assert_eq!(
        parallel::moments(&[], empty, &mut m, &mut v),
        Err(Error::EmptyBatch)
    );
    let mut recs = vec![Moments::EMPTY; 3];
    parallel::accumulate(&[], empty, &mut recs).unwrap();
    assert_eq!(recs, vec![Moments::EMPTY; 3]);
    let mut full = vec![
        Moments {
            count: u64::MAX - 1,
            mean: 0.0,
            m2: 0.0
        };
        3
    ];
    assert_eq!(
        parallel::accumulate(&x, shape, &mut full),
        Err(Error::CountOverflow)
    );
    assert_eq!(full[0].count, u64::MAX - 1);

    let mut y = vec![9.0f32; x.len()];
    let p = Params {
        mean: &m,
        variance: &v,
        scale: None,
        offset: None,
        epsilon: 0.0,
        activation: Activation::None,
    };
    assert_eq!(
        parallel::normalize(&x, &mut y, shape, &p),
        Err(Error::Epsilon(0.0))
    );
    let bad = Activation::Clamp { min: 1.0, max: 0.0 };
    assert!(parallel::affine(&x, &mut y, shape, &m, &v, bad).is_err());
    assert!(parallel::affine(&x, &mut y[1..], shape, &m, &v, Activation::None).is_err());
    assert!(y.iter().all(|&f| f == 9.0));
    parallel::affine(&[], &mut [], empty, &m, &v, Activation::None).unwrap();

    let (mut mm, mut mv) = (vec![0.0f32; 3], vec![1.0f32; 3]);
    let moving = MovingStats {
        mean: &mut mm,
        variance: &mut mv,
        batches: 0,
    };
    let mut bn = BatchNorm::new(Config::keras(), moving).unwrap();
    let (mut bm, mut bv) = (vec![5.0f32; 3], vec![5.0f32; 3]);
    let mut batch = Batch {
        mean: &mut bm,
        variance: &mut bv,
    };
    let so = ScaleOffset::NONE;
    assert_eq!(
        parallel::train(&mut bn, &[], &mut [], empty, so, &mut batch),
        Err(Error::EmptyBatch)
    );
    let four = Shape::nchw(2, 4, 4096);
    assert!(parallel::train(&mut bn, &x, &mut y, four, so, &mut batch).is_err());
    let short = ScaleOffset::new(&m[..2], &v);
    assert!(parallel::train(&mut bn, &x, &mut y, shape, short, &mut batch).is_err());
    assert!(parallel::infer(&bn, &x, &mut y, shape, short).is_err());
    assert!(parallel::infer(&bn, &x, &mut y[1..], shape, so).is_err());
    parallel::infer(&bn, &[], &mut [], empty, so).unwrap();
    assert_eq!(bn.moving().batches, 0);
    assert!(y.iter().all(|&f| f == 9.0));
    assert_eq!((bm[0], mm[0], mv[0]), (5.0, 0.0, 1.0));
}
