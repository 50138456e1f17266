"""Time one peer (PyTorch, ONNX Runtime or TensorFlow) on the batch-norm
layers of `networks.py`, single-threaded, one JSON line per cell on stdout
(the schema of the Rust binary `networks`). Run by `run.sh`, one process per
peer so that no two frameworks share a process:

    python3 peers.py torch|ort|tf

`BN_NET_BATCHES` (default "1 32") and `BN_NET_REPEATS` (default 3) as for
the Rust binary. Every line carries the outputs at the sampled logical NCHW
indices (and the moving statistics after one training step from the
initial state), for `report.py` to compare; PyTorch's lines also carry a
float64 reference (`ref_*`: numpy, two passes) computed from the same input.
"""

import json
import math
import os
import sys

# One thread everywhere, set before any framework is imported.
for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[var] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

import networks as nw  # noqa: E402

REPEATS = int(os.environ.get("BN_NET_REPEATS", "3"))
BATCHES = [int(b) for b in os.environ.get("BN_NET_BATCHES", "1 32").split()]


def floats(a):
    return [None if not math.isfinite(v) else float(v) for v in np.asarray(a, np.float32).ravel()]


def emit(rec):
    print(json.dumps(rec), flush=True)


def reference(x, n, c, hw):
    """The float64 reference, for both modes: {mode: (sampled y, moving or None)}."""
    x64 = x.reshape(n, c, hw).astype(np.float64)
    mu, var = x64.mean(axis=(0, 2)), x64.var(axis=(0, 2))
    scale, offset, mean, mvar = (a.astype(np.float64) for a in nw.params(c))
    idx = np.array(nw.sample_indices(x.size))
    xs, ch = x64.reshape(-1)[idx], (idx // hw) % c
    m = 1.0 - nw.MOMENTUM
    count = n * hw
    out = {}
    for mode, (mu_, var_) in (("infer", (mean, mvar)), ("train", (mu, var))):
        y = (xs - mu_[ch]) / np.sqrt(var_[ch] + nw.EPS) * scale[ch] + offset[ch]
        moving = None
        if mode == "train":
            sample_var = var * count / max(count - 1, 1)
            moving = (m * mean + (1 - m) * mu, m * mvar + (1 - m) * sample_var)
        out[mode] = (y, moving)
    return out


def f64s(a):
    return [float(v) for v in np.asarray(a, np.float64).ravel()]


def record(peer, n, c, hw, layout, mode, secs=None, y=None, moving=None, error=None, ref=None):
    rec = {"impl": peer, "c": c, "hw": hw, "n": n, "layout": layout, "mode": mode}
    if ref is not None:
        rec["ref_y"] = f64s(ref[0])
        if ref[1] is not None:
            rec["ref_moving_mean"], rec["ref_moving_var"] = f64s(ref[1][0]), f64s(ref[1][1])
    if error is not None:
        rec["error"] = error
    else:
        nbytes = n * c * hw * 4
        rec.update(bytes=nbytes, us=round(secs * 1e6, 3), gbps=round(nbytes / secs / 1e9, 3))
        rec["y"] = floats(y)
    if moving is not None:
        rec["moving_mean"], rec["moving_var"] = floats(moving[0]), floats(moving[1])
    emit(rec)


# ---- PyTorch ----------------------------------------------------------------


def run_torch():
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    torch.set_num_interop_threads(1)
    meta = {"peer": "torch", "version": torch.__version__, "threads": torch.get_num_threads()}
    print("#", json.dumps(meta), file=sys.stderr)

    def cell(n, c, hw, x):
        side = math.isqrt(hw)
        x4 = torch.from_numpy(x.reshape(n, c, side, side))
        idx = torch.tensor(nw.sample_indices(x.size))
        ref = reference(x, n, c, hw)
        for layout in ("nchw", "nhwc"):
            xt = x4.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x4
            for mode in ("infer", "train"):
                scale, offset, mean, var = (torch.from_numpy(a.copy()) for a in nw.params(c))
                train = mode == "train"

                def f():
                    return F.batch_norm(
                        xt, mean, var, scale, offset, training=train,
                        momentum=nw.MOMENTUM, eps=nw.EPS,
                    )

                with torch.no_grad():
                    y = f()
                    if layout == "nhwc" and not y.is_contiguous(memory_format=torch.channels_last):
                        print(f"# torch: NHWC output not channels_last at {c}x{hw}", file=sys.stderr)
                    ys = y.reshape(-1)[idx].numpy()
                    moving = (mean.numpy().copy(), var.numpy().copy()) if train else None
                    secs = nw.time_call(f, REPEATS)
                record("torch", n, c, hw, layout, mode, secs, ys, moving, ref=ref[mode])

    return cell


# ---- ONNX Runtime -----------------------------------------------------------


def run_ort():
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    meta = {"peer": "ort", "version": ort.__version__, "onnx": onnx.__version__}
    print("#", json.dumps(meta), file=sys.stderr)

    def session(n, c, side, train):
        scale, offset, mean, var = nw.params(c)
        inits = [
            numpy_helper.from_array(a, name)
            for a, name in ((scale, "scale"), (offset, "B"), (mean, "mean"), (var, "var"))
        ]
        outputs = ["Y", "running_mean", "running_var"] if train else ["Y"]
        node = helper.make_node(
            "BatchNormalization", ["X", "scale", "B", "mean", "var"], outputs,
            epsilon=nw.EPS, momentum=1.0 - nw.MOMENTUM, training_mode=int(train),
        )
        shape = [n, c, side, side]
        graph = helper.make_graph(
            [node], "bn",
            [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("Y", TensorProto.FLOAT, shape)]
            + [helper.make_tensor_value_info(o, TensorProto.FLOAT, [c]) for o in outputs[1:]],
            inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
        model.ir_version = 8
        onnx.checker.check_model(model)
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        return ort.InferenceSession(
            model.SerializeToString(), so, providers=["CPUExecutionProvider"]
        ), outputs

    def cell(n, c, hw, x):
        side = math.isqrt(hw)
        x4 = np.ascontiguousarray(x.reshape(n, c, side, side))
        idx = np.array(nw.sample_indices(x.size))
        for mode in ("infer", "train"):
            train = mode == "train"
            try:
                sess, outputs = session(n, c, side, train)
                y = np.empty_like(x4)
                extra = [np.empty(c, np.float32) for _ in outputs[1:]]
                io = sess.io_binding()
                io.bind_cpu_input("X", x4)
                for name, buf in zip(outputs, [y] + extra):
                    io.bind_output(name, "cpu", 0, np.float32, list(buf.shape), buf.ctypes.data)
                sess.run_with_iobinding(io)
            except Exception as e:  # noqa: BLE001 - the peer's own refusal, reported
                msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                record("ort", n, c, hw, "nchw", mode, error=msg)
                continue
            ys = y.reshape(-1)[idx]
            moving = (extra[0].copy(), extra[1].copy()) if train else None
            secs = nw.time_call(lambda: sess.run_with_iobinding(io), REPEATS)
            record("ort", n, c, hw, "nchw", mode, secs, ys, moving)
        # No native NHWC path for BatchNormalization on the CPU provider.
        for mode in ("infer", "train"):
            record("ort", n, c, hw, "nhwc", mode, error="n/a: no NHWC BatchNormalization on CPU")

    return cell


# ---- TensorFlow -------------------------------------------------------------


def run_tf():
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    meta = {"peer": "tf", "version": tf.__version__}
    print("#", json.dumps(meta), file=sys.stderr)

    def make(train, fmt):
        @tf.function
        def f(x, scale, offset, mean, var):
            return tf.raw_ops.FusedBatchNormV3(
                x=x, scale=scale, offset=offset, mean=mean, variance=var,
                epsilon=nw.EPS, exponential_avg_factor=nw.MOMENTUM if train else 1.0,
                data_format=fmt, is_training=train,
            )

        return f

    fns = {(t, fmt): make(t, fmt) for t in (False, True) for fmt in ("NHWC", "NCHW")}

    def cell(n, c, hw, x):
        side = math.isqrt(hw)
        x4 = x.reshape(n, c, side, side)
        idx = np.array(nw.sample_indices(x.size))
        p = [tf.constant(a) for a in nw.params(c)]
        for layout in ("nchw", "nhwc"):
            arr = x4 if layout == "nchw" else np.ascontiguousarray(x4.transpose(0, 2, 3, 1))
            xt = tf.constant(arr)
            for mode in ("infer", "train"):
                train = mode == "train"
                f = fns[(train, layout.upper())]
                try:
                    out = f(xt, *p)
                    y = out[0].numpy()
                except Exception as e:  # noqa: BLE001 - the peer's own refusal, reported
                    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                    record("tf", n, c, hw, layout, mode, error=msg)
                    continue
                if layout == "nhwc":
                    y = y.transpose(0, 3, 1, 2)
                ys = y.reshape(-1)[idx]
                moving = (out[1].numpy(), out[2].numpy()) if train else None
                secs = nw.time_call(lambda: f(xt, *p), REPEATS)
                record("tf", n, c, hw, layout, mode, secs, ys, moving)

    return cell


def main():
    peer = sys.argv[1]
    cell = {"torch": run_torch, "ort": run_ort, "tf": run_tf}[peer]()
    for n in BATCHES:
        for c, hw in nw.cells():
            x = nw.input_nchw(n, c, hw)
            cell(n, c, hw, x)


if __name__ == "__main__":
    main()
