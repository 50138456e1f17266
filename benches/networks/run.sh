#!/usr/bin/env bash
# The crate's batch norm on the batch-norm layers of ResNet-50 and
# MobileNetV2 beside ONNX Runtime, PyTorch and TensorFlow, single-threaded:
#
#     bash benches/networks/run.sh          # from the repository root
#
# Writes benches/networks/results.md (the table) and results.json (the
# timings); the raw JSON lines, with the sampled outputs, stay in
# target/networks/raw. Steps:
#   1. a venv in target/networks-venv with pinned numpy, onnx, onnxruntime,
#      torch and tensorflow-cpu from PyPI (PyPI's torch is the CUDA build, it
#      runs on the CPU; the +cpu wheels live only on the PyTorch index);
#   2. the `networks` binary twice: default (no RUSTFLAGS) and native
#      (`-C target-cpu=native`, target/native);
#   3. the crate (both builds) and each peer in its own process, taking
#      turns on chunks of 8 (C, H*W) pairs (BN_NET_CHUNK);
#   4. report.py: the table and the check of every cell against PyTorch.
# BN_NET_BATCHES (default "1 32"), BN_NET_REPEATS (default 3) and BN_NET_CELLS
# (e.g. "64x196 2048x49": only those (C, H*W)) select the grid;
# BN_NET_ROUNDS (default 1) runs it that many times, and the report keeps
# each implementation's fastest round per cell. One round of the whole grid
# takes about 16 minutes on two cores.
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$PWD
here=benches/networks
venv=${BN_NET_VENV:-target/networks-venv}
raw=$root/target/networks/raw
mkdir -p "$raw"
rm -f "$raw"/*.jsonl
start=$(date +%s)

load() { cut -d' ' -f1-3 /proc/loadavg; }
meta() { # step, then key=value pairs
    local step=$1
    shift
    python3 - "$step" "$@" >>"$raw/meta.jsonl" <<'EOF'
import json, sys
rec = {"step": sys.argv[1]}
for kv in sys.argv[2:]:
    k, v = kv.split("=", 1)
    rec[k] = v
print(json.dumps(rec))
EOF
}

# 1. Peers' environment.
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q --disable-pip-version-check \
    numpy==2.4.6 onnx==1.23.2 onnxruntime==1.32.0 torch==2.15.0 tensorflow-cpu==2.21.0
py=$root/$venv/bin/python

# 2. The crate, twice.
env -u RUSTFLAGS cargo build -q --release -p batchnorm-benches --bin networks
RUSTFLAGS="-C target-cpu=native" cargo build -q --release -p batchnorm-benches \
    --bin networks --target-dir target/native
target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')

cells=$root/target/networks/cells.txt
batches=${BN_NET_BATCHES:-1 32}
user_cells=${BN_NET_CELLS:-}
# Every (C, H*W) as "CxHW", largest first (BN_NET_CELLS, if set, selects).
mapfile -t all < <(python3 $here/networks.py --cells | tr ' ' x)
chunk=${BN_NET_CHUNK:-8}

meta machine "cpu=$(lscpu | sed -n 's/^Model name: *//p')" "cores=$(nproc)" \
    "rustc=$(rustc --version)" "commit=$(git rev-parse --short HEAD)" \
    "date=$(date -u +%Y-%m-%dT%H:%MZ)" \
    "batches=$batches" "repeats=${BN_NET_REPEATS:-3}" "rounds=${BN_NET_ROUNDS:-1}" "cells=${#all[@]}" "chunk=$chunk"

step() { # name, command...
    local name=$1 t0 l0
    shift
    t0=$(date +%s)
    l0=$(load)
    echo "== $name batch $BN_NET_BATCHES, ${BN_NET_CELLS%% *}... (load $l0)" >&2
    "$@" >>"$raw/$name.jsonl" 2>>"$raw/$name.log" || echo "!! $name exited $?" >&2
    meta "$name" "batch=$BN_NET_BATCHES" "cells=$BN_NET_CELLS" "seconds=$(($(date +%s) - t0))" \
        "load_before=$l0" "load_after=$(load)" \
        "version=$(grep -ho '"version": "[^"]*"' "$raw/$name.log" | head -1 | cut -d'"' -f4)"
}
run() { # one implementation on the current chunk
    case $1 in
    crate-default) step crate-default "$target_dir/release/networks" crate-default "$cells" ;;
    crate-native) step crate-native target/native/release/networks crate-native "$cells" ;;
    *) (cd $here && step "$1" "$py" peers.py "$1") ;;
    esac
}

# 3. The timings: the machine is shared, so the five implementations take
# turns on chunks of `chunk` cells (the order rotating from chunk to chunk)
# rather than each running the whole grid at a different time.
impls=(crate-default crate-native torch ort tf)
turn=0
for ((round = 1; round <= ${BN_NET_ROUNDS:-1}; round++)); do
    for b in $batches; do
        for ((i = 0; i < ${#all[@]}; i += chunk)); do
            export BN_NET_BATCHES=$b BN_NET_CELLS="${all[*]:i:chunk}"
            python3 $here/networks.py --cells >"$cells"
            for ((k = 0; k < ${#impls[@]}; k++)); do
                run "${impls[(k + turn) % ${#impls[@]}]}"
            done
            turn=$((turn + 1))
        done
    done
done
unset BN_NET_BATCHES
if [ -n "$user_cells" ]; then export BN_NET_CELLS=$user_cells; else unset BN_NET_CELLS; fi

# 4. The table.
meta total "seconds=$(($(date +%s) - start))"
(cd $here && "$py" report.py "$raw" results.md results.json)
echo "wrote $here/results.md ($(($(date +%s) - start)) s)" >&2
