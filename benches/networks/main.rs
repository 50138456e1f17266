//! The crate's batch norm on the layers of ResNet-50 and MobileNetV2, timed
//! with the protocol of `networks.py` (the peers' side), one JSON line per
//! cell on stdout. Driven by `benches/networks/run.sh`; by hand:
//!
//! ```sh
//! python3 benches/networks/networks.py --cells > /tmp/cells
//! cargo run --release -p batchnorm-benches --bin networks -- crate-default /tmp/cells
//! ```
//!
//! Each line of the cells file is `C HW` (channels, spatial positions).
//! `BN_NET_BATCHES` (default `1 32`) and `BN_NET_REPEATS` (default 3) set the
//! batch sizes and the number of timed batches; `BN_NET_ALIGN=<bytes>` puts
//! the input and output at that offset from 64 bytes (default: wherever the
//! `Vec` starts). Inference is
//! `BatchNorm::infer` (the README's inference path), the training step
//! `BatchNorm::train` (batch moments, normalization, moving update), both
//! with `Config::pytorch()` (eps 1e-5, momentum 0.1). The input is the
//! hash-generated tensor of `networks.py::input_nchw`; each line carries the
//! outputs at `networks.py::sample_indices` (logical NCHW indices) and, for
//! the training step, the moving statistics after one step from the initial
//! state, for `report.py` to compare with PyTorch.

use batchnorm::{Batch, BatchNorm, Config, MovingStats, ScaleOffset, Shape};
use std::fmt::Write as _;
use std::hint::black_box;
use std::time::{Duration, Instant};

const SAMPLES: usize = 1024;
const WARMUP: Duration = Duration::from_millis(100);
const BATCH: Duration = Duration::from_millis(200);

/// Warm up (at least 3 calls and 0.1 s), then `repeats` batches of calls,
/// each repeated until 0.2 s has passed: the median seconds per call.
fn time_call(repeats: usize, mut f: impl FnMut()) -> f64 {
    let t0 = Instant::now();
    let mut calls = 0;
    while calls < 3 || t0.elapsed() < WARMUP {
        f();
        calls += 1;
    }
    let mut per_call: Vec<f64> = (0..repeats)
        .map(|_| {
            let t0 = Instant::now();
            let mut calls = 0u32;
            loop {
                f();
                calls += 1;
                let dt = t0.elapsed();
                if dt >= BATCH {
                    return dt.as_secs_f64() / f64::from(calls);
                }
            }
        })
        .collect();
    per_call.sort_by(f64::total_cmp);
    let m = per_call.len() / 2;
    if per_call.len() % 2 == 1 {
        per_call[m]
    } else {
        (per_call[m - 1] + per_call[m]) / 2.0
    }
}

/// `networks.py::input_nchw` at logical NCHW index `l`.
fn input_at(l: usize, c: usize, hw: usize) -> f32 {
    let mut u = (l as u32).wrapping_mul(2_654_435_761);
    u ^= u >> 15;
    u = u.wrapping_mul(2_246_822_519);
    let v = (u >> 8) as f32 * (1.0 / 16_777_216.0);
    let ch = (l / hw) % c % 8;
    v * 4.0 - 2.0 + ch as f32 * 0.25
}

/// The physical index of logical NCHW index `l` in `shape`'s layout.
fn physical(l: usize, c: usize, hw: usize, nhwc: bool) -> usize {
    if !nhwc {
        return l;
    }
    let (n, rest) = (l / (c * hw), l % (c * hw));
    let (ch, s) = (rest / hw, rest % hw);
    (n * hw + s) * c + ch
}

struct Params {
    scale: Vec<f32>,
    offset: Vec<f32>,
    mean: Vec<f32>,
    var: Vec<f32>,
}

/// `networks.py::params`.
fn params(c: usize) -> Params {
    let f = |g: &dyn Fn(usize) -> f32| (0..c).map(g).collect::<Vec<f32>>();
    Params {
        scale: f(&|i| 1.0 + 0.125 * (i % 8) as f32),
        offset: f(&|i| 0.25 * (i % 4) as f32 - 0.5),
        mean: f(&|i| 0.25 * (i % 8) as f32),
        var: f(&|i| 1.0 + 0.5 * (i % 3) as f32),
    }
}

fn sample_indices(len: usize) -> Vec<usize> {
    let k = SAMPLES.min(len);
    if k == 1 {
        return vec![0];
    }
    (0..k).map(|j| j * (len - 1) / (k - 1)).collect()
}

fn json_floats(v: &[f32]) -> String {
    let mut s = String::from("[");
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        if x.is_finite() {
            write!(s, "{x:e}").unwrap();
        } else {
            s.push_str("null");
        }
    }
    s.push(']');
    s
}

struct Cell<'a> {
    label: &'a str,
    n: usize,
    c: usize,
    hw: usize,
    nhwc: bool,
    repeats: usize,
}

impl Cell<'_> {
    fn run(&self, x: &[f32], y: &mut [f32]) {
        let (n, c, hw) = (self.n, self.c, self.hw);
        let shape = if self.nhwc {
            Shape::nhwc(n, hw, c)
        } else {
            Shape::nchw(n, c, hw)
        };
        let samples = sample_indices(x.len());
        let p = params(c);
        let so = ScaleOffset::new(&p.scale, &p.offset);
        for mode in ["infer", "train"] {
            let (mut mm, mut mv) = (p.mean.clone(), p.var.clone());
            let (mut bm, mut bv) = (vec![0.0f32; c], vec![0.0f32; c]);
            let moving = MovingStats {
                mean: &mut mm,
                variance: &mut mv,
                batches: 0,
            };
            let mut bn = BatchNorm::new(Config::pytorch(), moving).unwrap();
            let mut batch = Batch {
                mean: &mut bm,
                variance: &mut bv,
            };
            // The check first: one call from the initial state.
            let check = if mode == "infer" {
                bn.infer(x, y, shape, so)
            } else {
                bn.train(x, y, shape, so, &mut batch)
            };
            let ok = check.map_err(|e| format!("{e:?}"));
            let ys: Vec<f32> = samples
                .iter()
                .map(|&l| y[physical(l, c, hw, self.nhwc)])
                .collect();
            let (moving_mean, moving_var) = {
                let m = bn.moving();
                (json_floats(m.mean), json_floats(m.variance))
            };
            let secs = if ok.is_ok() {
                if mode == "infer" {
                    time_call(self.repeats, || {
                        bn.infer(black_box(x), y, shape, so).unwrap();
                    })
                } else {
                    time_call(self.repeats, || {
                        bn.train(black_box(x), y, shape, so, &mut batch).unwrap();
                    })
                }
            } else {
                f64::NAN
            };
            let bytes = x.len() * 4;
            let mut line = format!(
                "{{\"impl\":\"{}\",\"c\":{c},\"hw\":{hw},\"n\":{n},\"layout\":\"{}\",\"mode\":\"{mode}\"",
                self.label,
                if self.nhwc { "nhwc" } else { "nchw" },
            );
            match ok {
                Ok(()) => write!(
                    line,
                    ",\"bytes\":{bytes},\"us\":{:.3},\"gbps\":{:.3},\"y\":{}",
                    secs * 1e6,
                    bytes as f64 / secs / 1e9,
                    json_floats(&ys)
                )
                .unwrap(),
                Err(e) => write!(line, ",\"error\":\"{e}\"").unwrap(),
            }
            if mode == "train" {
                write!(
                    line,
                    ",\"moving_mean\":{moving_mean},\"moving_var\":{moving_var}"
                )
                .unwrap();
            }
            line.push('}');
            println!("{line}");
        }
    }
}

/// A zeroed buffer of at least `len` floats and the index where its `len`
/// floats start: 0, or with `BN_NET_ALIGN=<bytes>` (a multiple of 4 below
/// 64) the first index at that byte offset from a 64-byte boundary.
/// TensorFlow and PyTorch write to their own allocators' 64-byte aligned
/// outputs; ONNX Runtime to the numpy buffer `peers.py` binds (16 or 32
/// bytes past 64, as measured); a `Vec` above glibc's mmap threshold
/// starts 16 bytes past a page. On Linux,
/// above 4 MiB, the pages are
/// first marked `MADV_HUGEPAGE`, as numpy does for its arrays (and so for
/// the peers' inputs and outputs): with transparent huge pages in `madvise`
/// mode, the kernels would otherwise stream over 4 KiB pages where the peers
/// get 2 MiB ones. `BN_NET_HUGEPAGES=0` turns this off.
fn buffer(len: usize) -> (Vec<f32>, usize) {
    let align: Option<usize> = std::env::var("BN_NET_ALIGN")
        .ok()
        .map(|s| s.parse().expect("BN_NET_ALIGN: a byte offset"));
    let len = len + if align.is_some() { 16 } else { 0 };
    let mut v: Vec<f32> = Vec::with_capacity(len);
    #[cfg(target_os = "linux")]
    if len * 4 >= 4 << 20 && std::env::var("BN_NET_HUGEPAGES").as_deref() != Ok("0") {
        let page = 4096;
        let start = (v.as_ptr() as usize).div_ceil(page) * page;
        let end = v.as_ptr() as usize + len * 4;
        if end > start {
            // SAFETY: madvise only advises the kernel about pages of this
            // allocation (a whole-page range inside it); no memory is read or
            // written, and the allocation is untouched so far.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    v.resize(len, 0.0);
    let at = align.map_or(0, |b| (b + 64 - v.as_ptr() as usize % 64) % 64 / 4);
    (v, at)
}

fn env_list(name: &str, default: &str) -> Vec<usize> {
    std::env::var(name)
        .unwrap_or_else(|_| default.into())
        .split_whitespace()
        .map(|s| s.parse().expect("a number"))
        .collect()
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: networks LABEL CELLS_FILE   (lines `C HW`)");
        std::process::exit(2);
    }
    let label = &args[1];
    let text = std::fs::read_to_string(&args[2]).expect("the cells file");
    let cells: Vec<(usize, usize)> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Vec<usize> = l.split_whitespace().map(|s| s.parse().unwrap()).collect();
            (v[0], v[1])
        })
        .collect();
    let batches = env_list("BN_NET_BATCHES", "1 32");
    let repeats = env_list("BN_NET_REPEATS", "3")[0];
    for &n in &batches {
        for &(c, hw) in &cells {
            let len = n * c * hw;
            for nhwc in [false, true] {
                let (mut xv, xa) = buffer(len);
                let x = &mut xv[xa..xa + len];
                for l in 0..len {
                    x[physical(l, c, hw, nhwc)] = input_at(l, c, hw);
                }
                let (mut yv, ya) = buffer(len);
                let y = &mut yv[ya..ya + len];
                let cell = Cell {
                    label,
                    n,
                    c,
                    hw,
                    nhwc,
                    repeats,
                };
                cell.run(x, y);
            }
        }
    }
}
