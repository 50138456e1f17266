#!/usr/bin/env python3
"""Speed-ups of the `parallel` bench (benches/parallel.rs) from criterion's
output on disk; measures nothing.

One row per (layout, C, size) of the `parallel/<Layout>/C<c>` groups:

    read x2   roofline_read_t2 over roofline_read_t1 (what a second core
              gets out of the memory system for a plain read)
    rw x2     the same for the read+write roofline
    moments   GB/s of batchnorm::moments (one thread), then the speed-ups of
              parallel::moments on one thread (t1/seq: the cost of the
              chunks and the merge) and on two (t2/seq)
    train     BatchNorm::train GB/s, parallel::train on two threads / it
    infer     BatchNorm::infer GB/s, parallel::infer on two threads / it

A speed-up is time(seq) / time(pooled), from criterion's median
estimates, or with --min from each benchmark's fastest sample (time / iters
of `sample.json`): on a machine shared with other work, a second thread is
often not running at all, and the fastest sample is the one least disturbed.
With several directories (copies of the criterion directory after several
runs) every time is the median over the runs.

    python3 benches/speedup.py [DIR...] [--markdown] [--min]

Directories default to $CARGO_TARGET_DIR/criterion or target/criterion (a
native build's: target/native/criterion).
"""

import argparse
import json
import sys
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ratios import criterion_dir, load, natural  # noqa: E402


def load_min(root):
    """load(), with each time the fastest sample's time per iteration."""
    out = load(root)
    for meta_path in sorted(root.rglob("benchmark.json")):
        new = meta_path.parent
        if new.name != "new":
            continue
        try:
            meta = json.loads(meta_path.read_text())
            sample = json.loads((new / "sample.json").read_text())
            ns = min(t / i for t, i in zip(sample["times"], sample["iters"]) if i > 0)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        key = (meta.get("group_id"), meta.get("value_str") or "")
        func = meta.get("function_id")
        if key in out and func in out[key]:
            out[key][func] = (out[key][func][0], ns)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dirs", nargs="*")
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--min", action="store_true", help="fastest sample, not the median")
    args = ap.parse_args()
    runs = [load_min(criterion_dir(d)) if args.min else load(criterion_dir(d))
            for d in (args.dirs or [None])]
    keys = sorted(
        {k for r in runs for k in r if k[0].startswith("parallel/")},
        key=lambda k: (natural(k[0]), natural(k[1])),
    )
    size_order = {"256KiB": 0, "8MiB": 1, "64MiB": 2}

    def ns(key, func):
        vals = [r[key][func][1] for r in runs if key in r and func in r[key]]
        return median(vals) if vals else None

    def nbytes(key):
        for r in runs:
            if key in r:
                return next(iter(r[key].values()))[0]
        return None

    head = ["group", "size", "read x2", "rw x2", "moments GB/s", "t1/seq", "t2/seq",
            "train GB/s", "t2/seq", "infer GB/s", "t2/seq"]
    rows = []
    keys.sort(key=lambda k: (natural(k[0]), size_order.get(k[1], 9), natural(k[1])))
    for key in keys:
        b = nbytes(key)

        def sp(a, c):
            x, y = ns(key, a), ns(key, c)
            return f"{x / y:.2f}" if x and y else "-"

        def gbs(f):
            t = ns(key, f)
            return f"{b / t:.1f}" if t and b else "-"

        rows.append([
            key[0].removeprefix("parallel/"), key[1],
            sp("roofline_read_t1", "roofline_read_t2"),
            sp("roofline_rw_t1", "roofline_rw_t2"),
            gbs("moments_seq"), sp("moments_seq", "moments_t1"), sp("moments_seq", "moments_t2"),
            gbs("train_seq"), sp("train_seq", "train_t2"),
            gbs("infer_seq"), sp("infer_seq", "infer_t2"),
        ])
    if args.markdown:
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for r in rows:
            print("| " + " | ".join(r) + " |")
    else:
        w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
        for r in [head] + rows:
            print("  ".join(str(x).ljust(n) for x, n in zip(r, w)))


if __name__ == "__main__":
    main()
