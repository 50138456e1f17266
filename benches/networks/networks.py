"""The batch-norm layers of ResNet-50 and MobileNetV2 (224 x 224 input), the
test data every implementation times, and the timing protocol.

Shared by `peers.py`, `report.py` and (through `--cells`) the Rust binary
`networks` (`benches/networks/main.rs`), which computes the same data.

    python3 networks.py --cells     # one line per distinct (C, H*W): "C HW"
    python3 networks.py             # the layers behind each pair

`BN_NET_CELLS="64x196 2048x49"` keeps only those (C, H*W) pairs.
"""

import os
import statistics
import sys
import time


def resnet50():
    """(name, C, side) of every BatchNorm2d of torchvision's ResNet-50 (v1.5:
    the stride is on the 3x3 conv, so a stage's first 1x1 conv runs at the
    previous resolution)."""
    layers = [("bn1", 64, 112)]
    side = 56  # after the max pool
    cin = 64
    for stage, (width, blocks, stride) in enumerate(
        [(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], start=1
    ):
        for b in range(blocks):
            s = stride if b == 0 else 1
            out_side = side // s
            p = f"layer{stage}.{b}"
            layers.append((f"{p}.bn1", width, side))
            layers.append((f"{p}.bn2", width, out_side))
            layers.append((f"{p}.bn3", width * 4, out_side))
            if b == 0:
                layers.append((f"{p}.downsample.1", width * 4, out_side))
            side = out_side
            cin = width * 4
    assert cin == 2048 and side == 7
    return layers


def mobilenet_v2():
    """(name, C, side) of every BatchNorm2d of torchvision's MobileNetV2
    (width 1.0): the stem, then per inverted residual block the expansion
    (t = 6 blocks only; the first block has t = 1), depthwise and projection
    batch norms, then the final 1x1 conv to 1280."""
    layers = [("features.0.bn", 32, 112)]
    settings = [  # t, c, n, s
        (1, 16, 1, 1),
        (6, 24, 2, 2),
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    ]
    cin, side, idx = 32, 112, 1
    for t, c, n, s in settings:
        for b in range(n):
            stride = s if b == 0 else 1
            hidden = cin * t
            out_side = side // stride
            p = f"features.{idx}"
            if t != 1:
                layers.append((f"{p}.expand", hidden, side))
            layers.append((f"{p}.depthwise", hidden, out_side))
            layers.append((f"{p}.project", c, out_side))
            cin, side, idx = c, out_side, idx + 1
    layers.append((f"features.{idx}.bn", 1280, side))
    assert side == 7
    return layers


def cells():
    """Distinct (C, H*W) pairs, largest tensors first, each with the layers
    it stands for: {(C, HW): [(net, layer name), ...]}."""
    out = {}
    for net, layers in (("resnet50", resnet50()), ("mobilenet_v2", mobilenet_v2())):
        for name, c, side in layers:
            out.setdefault((c, side * side), []).append((net, name))
    only = os.environ.get("BN_NET_CELLS")
    if only:
        keep = {tuple(int(v) for v in cell.split("x")) for cell in only.split()}
        out = {k: v for k, v in out.items() if k in keep}
    return dict(sorted(out.items(), key=lambda kv: (-kv[0][1], kv[0][0])))


def describe(sources):
    """'resnet50 layer1.0.bn1 (+2), mobilenet_v2 ...' for the table."""
    by_net = {}
    for net, name in sources:
        by_net.setdefault(net, []).append(name)
    short = {"resnet50": "R50", "mobilenet_v2": "MNv2"}
    parts = []
    for net, names in by_net.items():
        more = f" +{len(names) - 1}" if len(names) > 1 else ""
        parts.append(f"{short[net]} {names[0]}{more}")
    return "; ".join(parts)


# ---- data: identical bits in numpy and in `main.rs` -------------------------

SAMPLES = 1024


def input_nchw(n, c, hw):
    """x[l] for the logical NCHW index l: a hash of l scaled to [-2, 2), plus
    0.25 * (channel % 8). All f32 operations, exact or identically rounded."""
    import numpy as np

    l = np.arange(n * c * hw, dtype=np.uint32)
    u = l * np.uint32(2654435761)
    u ^= u >> np.uint32(15)
    u *= np.uint32(2246822519)
    v = (u >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)
    ch = ((l // np.uint32(hw)) % np.uint32(c)) % np.uint32(8)
    x = v * np.float32(4.0) - np.float32(2.0) + ch.astype(np.float32) * np.float32(0.25)
    return x.reshape(n, c, hw)


def params(c):
    """(scale, offset, moving mean, moving variance) as float32 arrays."""
    import numpy as np

    i = np.arange(c)
    scale = (1.0 + 0.125 * (i % 8)).astype(np.float32)
    offset = (0.25 * (i % 4) - 0.5).astype(np.float32)
    mean = (0.25 * (i % 8)).astype(np.float32)
    var = (1.0 + 0.5 * (i % 3)).astype(np.float32)
    return scale, offset, mean, var


def sample_indices(length):
    """The logical NCHW indices whose outputs are compared."""
    k = min(SAMPLES, length)
    if k == 1:
        return [0]
    return [j * (length - 1) // (k - 1) for j in range(k)]


EPS = 1e-5
MOMENTUM = 0.1  # PyTorch's momentum; decay 0.9; TF exponential_avg_factor 0.1

# ---- timing: the same protocol as `main.rs` ---------------------------------

WARMUP_S = 0.1
BATCH_S = 0.2
REPEATS = 3


def time_call(f, repeats=REPEATS):
    """Warm up (>= 3 calls and >= 0.1 s), then `repeats` batches of calls,
    each repeated until >= 0.2 s has passed; the median per-call seconds."""
    t0 = time.perf_counter()
    calls = 0
    while calls < 3 or time.perf_counter() - t0 < WARMUP_S:
        f()
        calls += 1
    per_call = []
    for _ in range(repeats):
        calls = 0
        t0 = time.perf_counter()
        while True:
            f()
            calls += 1
            dt = time.perf_counter() - t0
            if dt >= BATCH_S:
                break
        per_call.append(dt / calls)
    return statistics.median(per_call)


if __name__ == "__main__":
    if "--cells" in sys.argv:
        for c, hw in cells():
            print(c, hw)
    else:
        for (c, hw), src in cells().items():
            print(f"C={c:5} HW={hw:6}  {describe(src)}   ({len(src)} layers)")
