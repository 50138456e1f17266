//! Sharded statistics: one batch split across threads (standing in for the
//! workers of a distributed job), each computing per-channel `Moments`
//! records, sent as bytes and merged, against one pass over the whole batch.
//!
//! `cargo run --release --example sharded`

use batchnorm::{accumulate, moments, Moments, Shape};

const C: usize = 16;
const ROWS: usize = 100_000;
const WORKERS: usize = 4;

fn main() -> Result<(), batchnorm::Error> {
    // An ill-conditioned channel set: offsets up to 1e4 with unit noise.
    let mut state = 7u64;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
    };
    let x: Vec<f32> = (0..ROWS * C)
        .map(|i| (i % C) as f32 * 700.0 + 3.0 * next())
        .collect();

    // Each worker sees a contiguous block of rows and sends its records as bytes.
    let chunk_rows = ROWS.div_ceil(WORKERS);
    let wire: Vec<Vec<u8>> = std::thread::scope(|s| {
        let handles: Vec<_> = x
            .chunks(chunk_rows * C)
            .map(|part| {
                s.spawn(move || -> Result<Vec<u8>, batchnorm::Error> {
                    let mut records = [Moments::EMPTY; C];
                    accumulate(part, Shape::rows(part.len() / C, C), &mut records)?;
                    // 24 little-endian bytes per channel: count, mean, m2.
                    Ok(records.iter().flat_map(Moments::to_le_bytes).collect())
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker panicked"))
            .collect::<Result<_, _>>()
    })?;

    // The all-gather's receiving side: decode and merge with Chan's formula.
    let mut merged = [Moments::EMPTY; C];
    for bytes in &wire {
        let records = bytes.chunks_exact(Moments::BYTES).map(|b| {
            let mut r = [0u8; Moments::BYTES];
            r.copy_from_slice(b);
            Moments::from_le_bytes(r)
        });
        for (m, r) in merged.iter_mut().zip(records) {
            *m = m.merge(r)?;
        }
    }

    let (mut mean, mut var) = ([0.0f32; C], [0.0f32; C]);
    moments(&x, Shape::rows(ROWS, C), &mut mean, &mut var)?;
    let mut worst = 0.0f64;
    println!("channel      one-pass mean   merged mean    one-pass var   merged var");
    for c in 0..C {
        let mm = merged[c].mean()?;
        let mv = merged[c].variance(batchnorm::Variance::Population)?;
        println!(
            "{c:>7} {:>15.4} {:>13.4} {:>15.6} {:>12.6}",
            mean[c], mm, var[c], mv
        );
        let (m1, v1) = (mean[c] as f64, var[c] as f64);
        let rel_var = ((mv - v1) / v1).abs();
        let rel_mean = (mm - m1).abs() / (m1.abs() + v1.sqrt());
        worst = worst.max(rel_var.max(rel_mean * 10.0));
    }
    println!(
        "{WORKERS} workers, {} bytes per worker on the wire",
        wire[0].len()
    );
    if worst < 1e-5 {
        println!("OK: merged statistics match one pass (worst scaled difference {worst:.2e})");
        Ok(())
    } else {
        println!("MISMATCH: worst scaled difference {worst:.2e}");
        std::process::exit(1)
    }
}
