#!/usr/bin/env python3
"""Kernel / roofline ratios from criterion's output (crate docs §4).

Reads what `cargo bench` left on disk, measures nothing. For every
benchmark, criterion 0.8 writes `<group>/<function>/<parameter>/new/` with
`benchmark.json` (group_id, function_id, value_str, throughput) and
`estimates.json` (ns per iteration). Directory names are sanitised by
criterion (`moments/Nhwc/C3` becomes `moments_Nhwc_C3`, long names are cut,
clashes get `_2`), so the tree is walked and the ids are taken from
benchmark.json, not from the path. The median's point estimate is used.

One row per (group, size, kernel), the kernel beside the limit measured in
the same group on the same bytes:

    moments                     vs roofline_read (or roofline)     target 0.9
    affine, normalize*, infer   vs roofline_rw                     target 0.9
    train                       vs roofline_read + roofline_rw     target 0.85
    backward*                   vs roofline_read2 + roofline_rw2   target 0.85
                                   (sums over x and dy, then dx from them)
                                   (the three-pass limit: times add up)
    anything else               vs roofline_read (or roofline)     no target

ratio = limit time / kernel time (= kernel GB/s / limit GB/s). GB/s are
1e9 bytes/s of the group's Throughput::Bytes. Rows under their target are
marked `*`.

bound = limit time / structural-bound time, where the group measured one
(benches/common: for moments the slower of `bound_sums` and `bound_ops`,
the kernel's three operations per vector in the roofline's pattern;
`bound_affine` for affine,
normalize and infer; for train the moments bound and `bound_affine` added, a
roofline standing in for a pass without one; `bound_backward` (NHWC wide
rows) or `bound_runs` (NCHW runs) of benches/backward.rs for backward and
backward_relu, and for backward_relu the slower of it and `bound_relu`, the
mask's six operations per vector in each pass): the share of the limit
that the simplest kernel in the same access pattern, doing less than the
crate's, reaches. A ratio near the
bound and a bound under the target means the layout, not the kernel, holds
the row back. The scalar baselines of the moments bench (reference_f64,
naive_welford) are rows only with --all.

Where: the directories given as arguments, else $CARGO_TARGET_DIR/criterion,
else target/criterion at the repository root (beside benches/). With several
directories (copies of the criterion directory after each of several runs),
every number is the median over the runs that have the row, and a `runs`
column says how many did.

    python3 benches/ratios.py [DIR...] [--filter moments/] [--markdown] [--all]

Python 3 standard library only.
"""

import argparse
import json
import os
import re
import signal
import sys
from pathlib import Path
from statistics import median

BASELINES = {"reference_f64", "naive_welford"}
RW_KERNELS = ("affine", "normalize", "infer")
TARGET = 0.9
TRAIN_TARGET = 0.85


def criterion_dir(arg):
    if arg:
        return Path(arg)
    target = os.environ.get("CARGO_TARGET_DIR")
    if target:
        return Path(target) / "criterion"
    return Path(__file__).resolve().parent.parent / "target" / "criterion"


def load(root):
    """{(group, size): {function: (bytes, ns)}} from every `new/` folder."""
    out = {}
    for meta_path in sorted(root.rglob("benchmark.json")):
        new = meta_path.parent
        if new.name != "new":  # base/ and change/ are older runs
            continue
        try:
            meta = json.loads(meta_path.read_text())
            est = json.loads((new / "estimates.json").read_text())
            ns = float(est["median"]["point_estimate"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            print(f"skipping {new}: {e}", file=sys.stderr)
            continue
        group, func = meta.get("group_id"), meta.get("function_id")
        tp = meta.get("throughput") or {}
        nbytes = tp.get("Bytes") or tp.get("BytesDecimal")
        if group is None or func is None or not nbytes or ns <= 0:
            continue
        out.setdefault((group, meta.get("value_str") or ""), {})[func] = (nbytes, ns)
    return out


def limit_for(func, funcs):
    """(label, ns, target) of the limit `func` is measured against, or None."""
    read = funcs.get("roofline_read") or funcs.get("roofline")
    rw = funcs.get("roofline_rw")
    if func == "train" and read and rw:
        return "read+rw", read[1] + rw[1], TRAIN_TARGET
    read2, rw2 = funcs.get("roofline_read2"), funcs.get("roofline_rw2")
    if func.startswith("backward") and read2 and rw2:
        return "read2+rw2", read2[1] + rw2[1], TRAIN_TARGET
    if func.startswith(RW_KERNELS) and rw:
        return "roofline_rw", rw[1], TARGET
    if read:
        name = "roofline_read" if "roofline_read" in funcs else "roofline"
        return name, read[1], TARGET if func == "moments" else None
    return None


def bound_for(func, funcs):
    """ns of the structural bound of `func`, or None."""
    sums, affine = funcs.get("bound_sums"), funcs.get("bound_affine")
    read = funcs.get("roofline_read") or funcs.get("roofline")
    rw = funcs.get("roofline_rw")
    ops = funcs.get("bound_ops")
    if func == "train":
        # The moments pass as for `moments` (below), then the normalization.
        first = max((b[1] for b in (sums, ops) if b), default=None)
        if (first or affine) and read and rw:
            return (first or read[1]) + (affine or rw)[1]
        return None
    # The access pattern's bound: NHWC wide rows, or NCHW runs.
    back = funcs.get("bound_backward") or funcs.get("bound_runs")
    if func == "backward":
        return back[1] if back else None
    if func == "backward_relu":
        # The access pattern and the mask's operations: the slower of the
        # two bounds holds.
        both = (back, funcs.get("bound_relu"))
        return max((b[1] for b in both if b), default=None)
    if func.startswith(RW_KERNELS):
        return affine[1] if affine else None
    if func == "moments":
        # The kernel has both the layout's access pattern and the three
        # operations per vector: the slower of the two bounds holds.
        return max((b[1] for b in (sums, ops) if b), default=None)
    return None


def natural(s):
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def measure(results, args):
    """{(group, size, func): (sort key, limit name, target, limit GB/s,
    kernel GB/s, ratio, bound or None)} for one criterion directory."""
    out = {}
    for (group, size), funcs in results.items():
        nbytes = next(iter(funcs.values()))[0]
        for func, (fbytes, ns) in funcs.items():
            if func.startswith(("roofline", "bound_")) or (func in BASELINES and not args.all):
                continue
            if args.filter and args.filter not in f"{group}/{size}/{func}":
                continue
            lim = limit_for(func, funcs)
            if lim is None:
                continue
            lname, lns, target = lim
            bns = bound_for(func, funcs)
            out[(group, size, func)] = (
                (natural(group), nbytes, natural(func)), lname, target,
                fbytes / lns, fbytes / ns, lns / ns, lns / bns if bns else None,
            )
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("dir", nargs="*",
                    help="criterion directories, one per run; several give per-cell medians "
                         "(default: see above)")
    ap.add_argument("--filter", default="", help="only rows whose group/size/kernel contains this")
    ap.add_argument("--markdown", action="store_true", help="a Markdown table")
    ap.add_argument("--all", action="store_true", help="include the scalar baselines")
    args = ap.parse_args()
    if hasattr(signal, "SIGPIPE"):  # quiet under `| head`
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)

    roots = [criterion_dir(d) for d in args.dir] or [criterion_dir(None)]
    runs = []
    for root in roots:
        if not root.is_dir():
            sys.exit(f"no criterion output at {root}: run `cargo bench` first")
        runs.append(measure(load(root), args))

    rows = []
    for key in set().union(*runs):
        cells = [run[key] for run in runs if key in run]
        sort_key, lname, target = cells[0][:3]
        ratio = median(c[5] for c in cells)
        bounds = [c[6] for c in cells if c[6] is not None]
        flag = " *" if target is not None and ratio < target else ""
        group, size, func = key
        rows.append((
            sort_key,
            [group, size, func, lname, f"{median(c[3] for c in cells):.2f}",
             f"{median(c[4] for c in cells):.2f}", f"{ratio:.2f}{flag}",
             f"{median(bounds):.2f}" if bounds else "", str(len(cells))],
            target is not None,
            bool(flag),
        ))
    if not rows:
        sys.exit(f"no kernel/roofline pairs under {', '.join(map(str, roots))}")
    rows.sort(key=lambda r: r[0])

    header = ["group", "size", "kernel", "limit", "limit GB/s", "kernel GB/s", "ratio",
              "bound", "runs"]
    table = [r[1] for r in rows]
    if len(runs) == 1:
        header, table = header[:-1], [r[:-1] for r in table]
    if args.markdown:
        print("| " + " | ".join(header) + " |")
        print("|" + "|".join("---" if i < 4 else "---:" for i in range(len(header))) + "|")
        for r in table:
            print("| " + " | ".join(r) + " |")
    else:
        widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(header)]

        def line(r):
            return "  ".join(c.ljust(w) if i < 4 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(r, widths)))

        print(line(header))
        print(line(["-" * w for w in widths]))
        for r in table:
            print(line(r))
    below = sum(r[3] for r in rows)
    targeted = sum(r[2] for r in rows)
    what = "medians" if len(runs) == 1 else f"per-cell medians over {len(runs)} runs of medians"
    print(f"\n{below} of {targeted} rows with a target are below it (*: 0.9, train and backward 0.85); "
          f"{what} from {', '.join(map(str, roots))}")


if __name__ == "__main__":
    main()
