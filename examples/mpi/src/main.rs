//! Synchronized batch normalization over MPI (PyTorch's `SyncBatchNorm`,
//! TensorFlow's `SyncBatchNormalization`) with `batchnorm`'s mergeable
//! `Moments` records, and its own check against one process.
//!
//! Each rank holds a shard of the global batch (a different number of batch
//! elements per rank, so the counts matter), and for each training step:
//!
//! 1. computes its shard's per-channel records with `accumulate`;
//! 2. sends them as bytes (`Moments::to_le_bytes`: 24 bytes per channel,
//!    `count: u64`, `mean: f64`, `m2: f64`, little-endian) through one
//!    all-gather;
//! 3. merges the gathered records in rank order, starting from the empty
//!    record (`Moments::merge_slice`), so every rank holds the same bits;
//! 4. normalizes its shard with the global mean and population variance;
//! 5. updates its moving statistics with the global statistics and the
//!    global count (the sample variance's Bessel factor uses it).
//!
//! Then every rank checks, and prints, that
//! * every rank merged the same global records (a second all-gather of
//!   the merged bytes), and they equal, bit for bit, a single process
//!   computing every shard's records and merging them in the same order;
//! * its output equals a single-process `BatchNorm::train` on the
//!   concatenated batch within the crate docs' §3 bounds: both batch statistics
//!   within the moments bounds of the `f64` reference, each output within
//!   the normalize bound of its statistics, and the two outputs apart by
//!   no more than those bounds and the statistics' difference carry;
//! * its moving statistics equal the single process's update within `f32`
//!   rounding of the `f64` reference update.
//!
//! Run: `mpirun --allow-run-as-root --oversubscribe -np 2 target/release/batchnorm-mpi-example`
//! (the exit status is non-zero when a check fails on any rank).
//!
//! The protocol is written up in `docs/sync-batchnorm.md`.

use batchnorm::reference::{self, check_moments, check_normalize, normalize_bound};
use batchnorm::{
    accumulate, normalize, update_moving, Batch, BatchNorm, Config, Error, Layout, Moments,
    MovingStats, Params, ScaleOffset, Shape, Variance,
};
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;

/// Channels of the layer.
const C: usize = 24;
/// Batch elements of rank `r`: `BASE + r` (shards of different sizes).
const BASE: usize = 3;
/// Spatial positions per batch element (a 32 x 32 image).
const S: usize = 1024;
/// Training steps (the moving statistics carry over).
const STEPS: usize = 2;

/// Element `i` of the global batch of step `step`: deterministic, so that
/// every rank can rebuild the whole batch for the single-process check.
/// Channel `c` is `N(mu_c, sd_c)`-like, one of them ill-conditioned
/// (`1e4 + noise`), where a clamped `E[x²] - E[x]²` in `f32` fails.
fn value(layout: Layout, step: usize, i: usize) -> f32 {
    let c = match layout {
        Layout::Nhwc => i % C,
        Layout::Nchw => i / S % C,
    };
    let mut z = (i as u64 ^ (step as u64) << 40).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let u = (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5; // uniform in [-0.5, 0.5)
    let (mu, sd) = [(0.0, 1.0), (1e4, 1.0), (-3.0, 0.01), (250.0, 40.0)][c % 4];
    mu + sd * 3.4641 * u // unit-variance uniform scaled by sd
}

/// Batch elements before rank `r`'s shard.
fn first(r: usize) -> usize {
    (0..r).map(|q| BASE + q).sum()
}

fn shape(layout: Layout, batch: usize) -> Shape {
    match layout {
        Layout::Nhwc => Shape::nhwc(batch, S, C),
        Layout::Nchw => Shape::nchw(batch, C, S),
    }
}

/// The records as they travel: 24 little-endian bytes per channel.
fn to_wire(records: &[Moments]) -> Vec<u8> {
    records.iter().flat_map(|m| m.to_le_bytes()).collect()
}

fn from_wire(bytes: &[u8]) -> Vec<Moments> {
    bytes
        .chunks_exact(Moments::BYTES)
        .map(|b| Moments::from_le_bytes(b.try_into().expect("24 bytes")))
        .collect()
}

/// Gathered records of all ranks (rank order) merged from the empty record.
fn merge_in_rank_order(gathered: &[u8]) -> Result<Vec<Moments>, Error> {
    let mut global = vec![Moments::EMPTY; C];
    for rank in gathered.chunks_exact(C * Moments::BYTES) {
        Moments::merge_slice(&mut global, &from_wire(rank))?;
    }
    Ok(global)
}

/// The global batch statistics a worker normalizes with: mean and
/// population variance of the merged records, rounded to `f32`.
fn stats(global: &[Moments]) -> Result<(Vec<f32>, Vec<f32>), Error> {
    let mut mean = Vec::with_capacity(C);
    let mut var = Vec::with_capacity(C);
    for m in global {
        mean.push(m.mean()? as f32);
        var.push(m.variance(Variance::Population)? as f32);
    }
    Ok((mean, var))
}

/// The layer's parameters (an optimizer would change them between steps).
fn params() -> (Vec<f32>, Vec<f32>) {
    let scale = (0..C).map(|c| 0.5 + c as f32 / 8.0).collect();
    let offset = (0..C).map(|c| c as f32 / 4.0 - 1.0).collect();
    (scale, offset)
}

struct Worker {
    moving_mean: Vec<f32>,
    moving_var: Vec<f32>,
    batches: u64,
}

/// What one rank reports for one step.
struct Report {
    failures: Vec<String>,
    lines: Vec<String>,
}

impl Report {
    fn check(&mut self, ok: bool, what: impl FnOnce() -> String) {
        if !ok {
            self.failures.push(what());
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn step(
    world: &SimpleCommunicator,
    layout: Layout,
    step_no: usize,
    config: &Config,
    me: &mut Worker,
    single: &mut Worker,
    report: &mut Report,
) -> Result<(), Error> {
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let total = first(size);
    let full_shape = shape(layout, total);
    let full: Vec<f32> = (0..full_shape.len()?)
        .map(|i| value(layout, step_no, i))
        .collect();
    let per = |b: usize| b * C * S;
    let shard_shape = shape(layout, BASE + rank);
    let shard = &full[per(first(rank))..per(first(rank + 1))];
    let (scale, offset) = params();

    // 1-2. This shard's records, as bytes, through one all-gather.
    let mut local = vec![Moments::EMPTY; C];
    accumulate(shard, shard_shape, &mut local)?;
    let send = to_wire(&local);
    let mut gathered = vec![0u8; size * send.len()];
    world.all_gather_into(&send[..], &mut gathered[..]);

    // 3. Merged in rank order: the same bits on every rank.
    let global = merge_in_rank_order(&gathered)?;
    let count = global[0].count;

    // 4. The shard normalized with the global statistics.
    let (mean, var) = stats(&global)?;
    let p = Params {
        mean: &mean,
        variance: &var,
        scale: Some(&scale),
        offset: Some(&offset),
        epsilon: config.epsilon,
        activation: config.activation,
    };
    let mut y = vec![0.0f32; shard.len()];
    normalize(shard, &mut y, shard_shape, &p)?;

    // 5. The moving statistics with the global statistics and count.
    let moving0 = (me.moving_mean.clone(), me.moving_var.clone());
    let mut moving = MovingStats {
        mean: &mut me.moving_mean,
        variance: &mut me.moving_var,
        batches: me.batches,
    };
    update_moving(&mean, &var, count, config, &mut moving)?;
    me.batches = moving.batches;

    // --- checks -------------------------------------------------------
    let tag = format!("{layout:?} step {step_no}");
    // Every rank merged the same records: gather the merged bytes.
    let mine = to_wire(&global);
    let mut everyone = vec![0u8; size * mine.len()];
    world.all_gather_into(&mine[..], &mut everyone[..]);
    let same = everyone.chunks_exact(mine.len()).all(|r| r == mine);
    report.check(same, || format!("{tag}: ranks merged different records"));
    // A single process merging every shard's records in rank order.
    let mut one = Vec::with_capacity(gathered.len());
    for r in 0..size {
        let mut rec = vec![Moments::EMPTY; C];
        accumulate(
            &full[per(first(r))..per(first(r + 1))],
            shape(layout, BASE + r),
            &mut rec,
        )?;
        one.extend(to_wire(&rec));
    }
    let one_global = merge_in_rank_order(&one)?;
    report.check(to_wire(&one_global) == mine, || {
        format!("{tag}: global records differ from one process merging the same records")
    });
    report.check(count == (total * S) as u64, || {
        format!("{tag}: global count {count}")
    });

    // A single-process training step on the concatenated batch.
    let (mut bm, mut bv) = (vec![0.0f32; C], vec![0.0f32; C]);
    let mut y_full = vec![0.0f32; full.len()];
    let single0 = (single.moving_mean.clone(), single.moving_var.clone());
    {
        let moving = MovingStats {
            mean: &mut single.moving_mean,
            variance: &mut single.moving_var,
            batches: single.batches,
        };
        let mut bn = BatchNorm::new(*config, moving)?;
        let mut batch = Batch {
            mean: &mut bm,
            variance: &mut bv,
        };
        let so = ScaleOffset::new(&scale, &offset);
        bn.train(&full, &mut y_full, full_shape, so, &mut batch)?;
        single.batches = bn.moving().batches;
    }
    // Both batch statistics within the §3 moments bounds of the reference.
    let ours = check_moments(&full, full_shape, &mean, &var);
    report.check(ours.is_ok(), || {
        format!("{tag}: global statistics {ours:?}")
    });
    let theirs = check_moments(&full, full_shape, &bm, &bv);
    report.check(theirs.is_ok(), || {
        format!("{tag}: single-process {theirs:?}")
    });
    // Our output within the §3 normalize bound of our statistics.
    let norm = check_normalize(shard, shard_shape, &p, &y);
    report.check(norm.is_ok(), || format!("{tag}: output {norm:?}"));
    // And against the single process's output for the same elements.
    let y_one = &y_full[per(first(rank))..per(first(rank + 1))];
    let (mut worst, mut same_bits) = (0.0f64, 0usize);
    for (i, ((&x, &got), &want)) in shard.iter().zip(&y).zip(y_one).enumerate() {
        let c = match layout {
            Layout::Nhwc => i % C,
            Layout::Nchw => i / S % C,
        };
        let (ar, _) = reference::fold(mean[c], var[c], scale[c], offset[c], config.epsilon);
        let (a1, _) = reference::fold(bm[c], bv[c], scale[c], offset[c], config.epsilon);
        let carry = (x as f64 - mean[c] as f64).abs() * (ar - a1).abs()
            + a1.abs() * (mean[c] as f64 - bm[c] as f64).abs();
        let bound = normalize_bound(x, mean[c], ar, offset[c])
            + normalize_bound(x, bm[c], a1, offset[c])
            + carry;
        let diff = (got as f64 - want as f64).abs();
        report.check(diff <= bound, || {
            format!("{tag}: y[{i}] = {got} vs one process {want} (bound {bound:e})")
        });
        worst = worst.max(diff / bound.max(f64::MIN_POSITIVE));
        same_bits += usize::from(got.to_bits() == want.to_bits());
    }
    // Moving statistics: both within f32 rounding of the f64 update.
    let mut moving_diff = 0.0f32;
    for c in 0..C {
        let (rm, rv) = reference::update_moving(
            (moving0.0[c], moving0.1[c]),
            (mean[c], var[c]),
            count,
            me.batches,
            config,
        );
        let tol = |r: f64, m0: f32| 4.0 * f32::EPSILON as f64 * (r.abs() + m0.abs() as f64);
        let ok = (me.moving_mean[c] as f64 - rm).abs() <= tol(rm, moving0.0[c])
            && (me.moving_var[c] as f64 - rv).abs() <= tol(rv, moving0.1[c]);
        report.check(ok, || format!("{tag}: moving statistics of channel {c}"));
        let (sm, sv) = reference::update_moving(
            (single0.0[c], single0.1[c]),
            (bm[c], bv[c]),
            count,
            single.batches,
            config,
        );
        let ok = (single.moving_mean[c] as f64 - sm).abs() <= tol(sm, single0.0[c])
            && (single.moving_var[c] as f64 - sv).abs() <= tol(sv, single0.1[c]);
        report.check(ok, || format!("{tag}: single-process moving channel {c}"));
        moving_diff = moving_diff
            .max((me.moving_mean[c] - single.moving_mean[c]).abs())
            .max((me.moving_var[c] - single.moving_var[c]).abs());
    }
    let stat_ulps = mean
        .iter()
        .zip(&bm)
        .chain(var.iter().zip(&bv))
        .map(|(a, b)| (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs())
        .max()
        .unwrap_or(0);
    report.lines.push(format!(
        "rank {rank}/{size} {tag}: shard {}, sent {} B, global count {count} | \
         records == one-process merge: {} | stats vs one-process train: <= {stat_ulps} ulp | \
         y: {:.1}% same bits, max diff/bound {worst:.3} | moving max diff {moving_diff:.1e}",
        match layout {
            Layout::Nchw => format!("{}x{C}x{S}", shard_shape.batch),
            Layout::Nhwc => format!("{}x{S}x{C}", shard_shape.batch),
        },
        send.len(),
        if to_wire(&one_global) == mine {
            "bit for bit"
        } else {
            "NO"
        },
        100.0 * same_bits as f64 / y.len() as f64,
    ));
    if rank == 0 {
        let g = &global[1];
        report.lines.push(format!(
            "  rank 0 {tag}, global channel 1 (1e4 + noise): count {} mean {:.6} variance {:.6}, \
             f64 reference: mean {:.6} variance {:.6}",
            g.count,
            g.mean,
            g.variance(Variance::Population)?,
            reference::channel_moments(&full, full_shape, 1).0,
            reference::channel_moments(&full, full_shape, 1).1,
        ));
    }
    Ok(())
}

fn main() {
    let universe = mpi::initialize().expect("MPI initialized once");
    let world = universe.world();
    let config = Config::pytorch();
    let mut report = Report {
        failures: Vec::new(),
        lines: Vec::new(),
    };
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let fresh = || Worker {
            moving_mean: vec![0.0; C],
            moving_var: vec![1.0; C],
            batches: 0,
        };
        let (mut me, mut single) = (fresh(), fresh());
        for s in 0..STEPS {
            if let Err(e) = step(
                &world,
                layout,
                s,
                &config,
                &mut me,
                &mut single,
                &mut report,
            ) {
                // Every rank validates the same shapes, so an error is the
                // same on every rank and no collective is left waiting.
                report.failures.push(format!("{layout:?} step {s}: {e}"));
            }
        }
    }
    // Print rank by rank, in order.
    for r in 0..world.size() {
        world.barrier();
        if r == world.rank() {
            // One write per rank, so ranks do not interleave mid-line.
            let mut out = report.lines.join("\n");
            for f in &report.failures {
                out += &format!("\nrank {r} FAILED: {f}");
            }
            println!("{out}");
        }
    }
    world.barrier();
    let failed = !report.failures.is_empty();
    if world.rank() == 0 && !failed {
        println!("synchronized batch norm over MPI: all checks passed on rank 0");
    }
    drop(universe);
    std::process::exit(i32::from(failed));
}
