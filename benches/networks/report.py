"""Turn the JSON lines of `run.sh` into `results.md` (the table) and
`results.json` (the timings without the sampled outputs), and check every
cell's outputs against PyTorch's.

    python3 report.py RAW_DIR OUT_MD OUT_JSON

RAW_DIR holds `<impl>.jsonl` (crate-default, crate-native, ort, torch, tf)
and `meta.jsonl` (one line per step of `run.sh`: load, times, versions).

Check: for each cell, every sampled output `a` of an implementation against
PyTorch's `b`: |a - b| <= 1e-4 * max(|b|, 1) (relative, absolute below 1),
and for the crate's training step the moving mean and variance after one
step likewise (PyTorch's semantics: momentum 0.1, Bessel-corrected
variance; ONNX feeds the population variance, so its moving variance is
not compared). PyTorch's lines also carry a float64 reference from the same
input; every implementation's error against it is reported beside, to tell
who is off when a check fails.
"""

import json
import math
import os
import sys

import networks as nw

IMPLS = ["crate-default", "crate-native", "ort", "torch", "tf"]
PEERS = ["ort", "torch", "tf"]
NAMES = {"ort": "ORT", "torch": "PyTorch", "tf": "TF"}
TOL = 1e-4


def load(path):
    out = []
    if not os.path.exists(path):
        return out
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(json.loads(line))
    return out


def key(r):
    return (r["n"], r["c"], r["hw"], r["layout"], r["mode"])


def max_err(a, b):
    if a is None or b is None or len(a) != len(b):
        return math.inf
    worst = 0.0
    for x, y in zip(a, b):
        if x is None or y is None:
            return math.inf
        worst = max(worst, abs(x - y) / max(abs(y), 1.0))
    return worst


def fmt(v, digits=2):
    return "n/a" if v is None else f"{v:.{digits}f}"


def main():
    raw, out_md, out_json = sys.argv[1:4]
    recs = {}
    for impl in IMPLS:  # with several rounds, the fastest round of each cell
        recs[impl] = {}
        for r in load(os.path.join(raw, f"{impl}.jsonl")):
            old = recs[impl].get(key(r))
            if old is None or r.get("gbps", -1.0) > old.get("gbps", -1.0):
                recs[impl][key(r)] = r
    meta = load(os.path.join(raw, "meta.jsonl"))
    cells = nw.cells()
    batches = sorted({k[0] for impl in IMPLS for k in recs[impl]})
    keys = [
        (n, c, hw, layout, mode)
        for n in batches
        for (c, hw) in cells
        for layout in ("nchw", "nhwc")
        for mode in ("infer", "train")
    ]
    keys = [k for k in keys if any(k in recs[i] for i in IMPLS)]

    def gbps(impl, k):
        r = recs[impl].get(k)
        return r.get("gbps") if r else None

    def us(impl, k):
        r = recs[impl].get(k)
        return r.get("us") if r else None

    rows, failures, behind, errors, checks, ref64 = [], [], [], {}, {}, {}

    def err64(r, ref):
        """The worst error of `r` against the float64 reference in `ref`."""
        e = max_err(r.get("y"), ref.get("ref_y"))
        if r["impl"] in ("crate-default", "crate-native", "torch") and r["mode"] == "train":
            for field in ("moving_mean", "moving_var"):
                e = max(e, max_err(r.get(field), ref.get("ref_" + field)))
        return e
    for k in keys:
        n, c, hw, layout, mode = k
        side = math.isqrt(hw)
        peer = {p: gbps(p, k) for p in PEERS}
        have = {p: v for p, v in peer.items() if v is not None}
        best = max(have, key=have.get) if have else None
        ratios = {}
        for impl in ("crate-default", "crate-native"):
            v = gbps(impl, k)
            ratios[impl] = v / have[best] if (v is not None and best) else None
            if ratios[impl] is not None and ratios[impl] < 1.0:
                behind.append((impl, k, ratios[impl], NAMES[best]))
        for impl in IMPLS:
            r = recs[impl].get(k)
            if r and "error" in r:
                errors.setdefault((impl, r["error"]), []).append(k)
        ref = recs["torch"].get(k)
        for impl in ("crate-default", "crate-native", "ort", "tf"):
            r = recs[impl].get(k)
            if not r or "error" in r or not ref or "error" in ref:
                continue
            e = max_err(r.get("y"), ref.get("y"))
            what = "y"
            if impl.startswith("crate") and mode == "train":
                for field in ("moving_mean", "moving_var"):
                    ef = max_err(r.get(field), ref.get(field))
                    if ef > e:
                        e, what = ef, field
            checks[(impl, k)] = e
            ref64[(impl, k)] = err64(r, ref)
            if not e <= TOL:
                failures.append((impl, k, what, e))
        if ref and "error" not in ref:
            ref64[("torch", k)] = err64(ref, ref)
        rows.append(
            "| {} | {}×{}×{}² | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
                nw.describe(cells[(c, hw)]), n, c, side, layout.upper(), mode,
                fmt(gbps("crate-default", k)), fmt(gbps("crate-native", k)),
                fmt(peer["ort"]), fmt(peer["torch"]), fmt(peer["tf"]),
                fmt(us("crate-native", k), 1), fmt(us(best, k), 1) if best else "n/a",
                fmt(ratios["crate-default"]), fmt(ratios["crate-native"]),
            )
        )

    md = ["# Batch norm on the layers of ResNet-50 and MobileNetV2", ""]
    md.append("Written by `benches/networks/report.py` from the run of `bash benches/networks/run.sh`.")
    md.append("Single thread everywhere. GB/s of input (bytes of x) per call; µs per call; median of")
    md.append(f"{nw.REPEATS} batches of calls, each ≥ {nw.BATCH_S} s, after a warm-up. Ratios: crate / best peer")
    md.append("(the fastest of ORT, PyTorch, TF in that cell); below 1.00 the crate is behind. The")
    md.append("implementations take turns on chunks of cells; with several rounds, each keeps its")
    md.append("fastest round per cell.")
    md.append("")
    md.append("## Run")
    md.append("")
    steps = {}
    for m in meta:
        if m["step"] in IMPLS:
            steps.setdefault(m["step"], []).append(m)
        else:
            md.append("- " + ", ".join(f"{a}: {b}" for a, b in m.items() if m["step"] == "total" or a != "step"))
    for impl, ms in steps.items():
        loads = [float(m[w].split()[0]) for m in ms for w in ("load_before", "load_after")]
        version = next((m["version"] for m in ms if m.get("version")), "")
        md.append(
            f"- {impl}{' ' + version if version else ''}: {len(ms)} runs, "
            f"{sum(int(m['seconds']) for m in ms)} s, 1-minute load {min(loads):.2f}–{max(loads):.2f}"
        )
    md.append("")
    md.append("## Check against PyTorch")
    md.append("")
    md.append(
        f"Sampled outputs ({nw.SAMPLES} per cell, logical NCHW indices spread over the tensor) and, for the"
    )
    md.append(f"crate's training step, the moving statistics: |a − b| ≤ {TOL:g} · max(|b|, 1).")
    md.append("Beside it, the worst error against the float64 reference (same metric).")
    for impl in ("crate-default", "crate-native", "ort", "tf", "torch"):
        errs = [e for (i, _), e in checks.items() if i == impl]
        bad = [f for f in failures if f[0] == impl]
        e64 = [e for (i, _), e in ref64.items() if i == impl]
        worst64 = f"; against float64 worst {max(e64):.2e}" if e64 else ""
        if errs:
            md.append(
                f"- {impl}: {len(errs)} cells checked against PyTorch, worst {max(errs):.2e}, "
                + (f"**{len(bad)} FAILED**" if bad else "all within")
                + worst64
            )
        else:
            md.append(f"- {impl}: {worst64[2:]}")
    for impl, k, what, e in failures:
        md.append(
            f"  - FAILED {impl} {k}: {what} error {e:.3e} against PyTorch; against float64 "
            f"{impl} {ref64.get((impl, k), math.nan):.2e}, PyTorch {ref64.get(('torch', k), math.nan):.2e}"
        )
    md.append("")
    if errors:
        md.append("## Cells a peer could not run")
        md.append("")
        for (impl, msg), ks in errors.items():
            md.append(f"- {impl}, {len(ks)} cells ({ks[0][3]} {ks[0][4]} …): {msg}")
        md.append("")
    md.append("## Where the crate is behind the best peer")
    md.append("")
    for impl in ("crate-default", "crate-native"):
        b = [x for x in behind if x[0] == impl]
        total = sum(1 for k in keys if gbps(impl, k) is not None)
        md.append(f"- {impl}: {len(b)} of {total} cells")
        for _, k, ratio, who in sorted(b, key=lambda x: x[2]):
            n, c, hw, layout, mode = k
            md.append(
                f"  - {n}×{c}×{math.isqrt(hw)}² {layout.upper()} {mode}: {ratio:.2f}x {who}"
            )
    md.append("")
    md.append("## Table (GB/s)")
    md.append("")
    md.append(
        "| layers | N×C×H² | layout | mode | crate default | crate native | ORT | PyTorch | TF "
        "| crate native µs | best peer µs | default / best | native / best |"
    )
    md.append("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    md.extend(rows)
    md.append("")
    md.append("Layers: R50 = ResNet-50 (torchvision v1.5), MNv2 = MobileNetV2; the first layer")
    md.append("with that (C, H×W), and how many more share it. Every (C, H×W) and its layers:")
    md.append("")
    for (c, hw), src in cells.items():
        md.append(f"- C={c}, {math.isqrt(hw)}²: " + ", ".join(f"{a} {b}" for a, b in src))
    with open(out_md, "w") as f:
        f.write("\n".join(md) + "\n")

    slim = []
    for impl in IMPLS:
        for k, r in recs[impl].items():
            s = {a: b for a, b in r.items() if a not in ("y", "moving_mean", "moving_var")}
            s = {a: b for a, b in s.items() if not a.startswith("ref_")}
            if (impl, k) in checks:
                s["max_err_vs_torch"] = checks[(impl, k)]
            if (impl, k) in ref64:
                s["max_err_vs_f64"] = ref64[(impl, k)]
            s["layers"] = [f"{a} {b}" for a, b in cells.get((r["c"], r["hw"]), [])]
            slim.append(s)
    with open(out_json, "w") as f:
        json.dump({"meta": meta, "cells": slim}, f, indent=0)
        f.write("\n")
    print(f"{len(rows)} rows, {len(failures)} check failures, {len(behind)} cells behind")
    for impl, k, what, e in failures:
        print(f"FAILED {impl} {k}: {what} error {e:.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
