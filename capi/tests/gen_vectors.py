#!/usr/bin/env python3
"""Turns the golden vectors into a C header for capi/tests/test.c.

    python3 capi/tests/gen_vectors.py tests/data OUT.h

Reads normalize.json, keras_train.json and pytorch_train.json and writes
every float32 tensor as exact hexadecimal float literals, with one struct
per case. Values are checked to be float32 (as tests/golden.rs does): the
JSON holds the repr of each float32 widened to double, which Python parses
correctly rounded, and packing to float32 must give it back exactly.
Only the standard library is used.
"""
import json
import math
import struct
import sys


def f32(v):
    """The float32 a JSON number (or "nan"/"inf"/"-inf") encodes."""
    if isinstance(v, str):
        return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}[v]
    d = float(v)
    f = struct.unpack("<f", struct.pack("<f", d))[0]
    if f != d:
        raise SystemExit(f"{d!r} is not a float32")
    return f


def f32_from_f64(d):
    """A double rounded to float32 (as a tensor product in f32 would)."""
    return struct.unpack("<f", struct.pack("<f", d))[0]


def lit(f, suffix="f"):
    if math.isnan(f):
        return "NAN"
    if math.isinf(f):
        return "INFINITY" if f > 0 else "-INFINITY"
    return f.hex() + suffix


class Out:
    def __init__(self):
        self.lines = []
        self.n = 0

    def array(self, values, ctype="float", suffix="f"):
        """Emits a static array, returns its name."""
        self.n += 1
        name = f"v{self.n}"
        body = ", ".join(lit(v, suffix) for v in values)
        self.lines.append(f"static const {ctype} {name}[{len(values)}] = {{{body}}};")
        return name

    def ptr_array(self, names):
        self.n += 1
        name = f"p{self.n}"
        self.lines.append(
            f"static const float *const {name}[{len(names)}] = {{{', '.join(names)}}};"
        )
        return name

    def u64_array(self, values):
        self.n += 1
        name = f"u{self.n}"
        body = ", ".join(f"{v}u" for v in values)
        self.lines.append(f"static const uint64_t {name}[{len(values)}] = {{{body}}};")
        return name


def shape(case):
    d = case["shape"]
    if case["layout"] == "NHWC":
        return "BN_LAYOUT_NHWC", d[0], math.prod(d[1:-1]), d[-1]
    assert case["layout"] == "NCHW"
    return "BN_LAYOUT_NCHW", d[0], math.prod(d[2:]), d[1]


def tensor(case, key):
    for part in ("inputs", "outputs"):
        v = case.get(part, {}).get(key)
        if v is not None:
            vals = [f32(x) for x in v]
            dims = case.get("tensor_shapes", {}).get(key)
            if dims is not None and math.prod(dims) != len(vals):
                raise SystemExit(f"{case['name']}: {key} length")
            return vals
    return None


def main(data, out_path):
    out = Out()
    norm, layers = [], []

    for case in json.load(open(f"{data}/normalize.json"))["cases"]:
        layout, n, s, c = shape(case)
        x, y = tensor(case, "x"), tensor(case, "y")
        assert len(x) == len(y) == n * s * c
        scale, offset = tensor(case, "scale"), tensor(case, "offset")
        eps = f32_from_f64(float(case["params"]["variance_epsilon"]))
        norm.append(
            "{"
            + ", ".join(
                [
                    json.dumps(case["name"]),
                    f"{{{layout}, {n}, {s}, {c}}}",
                    lit(eps),
                    out.array(x),
                    out.array(tensor(case, "mean")),
                    out.array(tensor(case, "variance")),
                    out.array(scale) if scale else "NULL",
                    out.array(offset) if offset else "NULL",
                    out.array(y),
                ]
            )
            + "}"
        )

    # keras_train.json: Keras computes `moving * momentum + batch * (1 -
    # momentum)` with a Python float momentum, so its decay and weight are
    # the float32 roundings of m and of 1 - m taken in double.
    for case in json.load(open(f"{data}/keras_train.json"))["cases"]:
        layout, n, s, c = shape(case)
        p = case["params"]
        m = float(p["momentum"])
        steps = range(1, 4)
        d_fw, w_fw = f32_from_f64(m), f32_from_f64(1.0 - m)
        layers.append(
            dict(
                name=case["name"],
                shape=(layout, n, s, c),
                framework="BN_FW_KERAS",
                epsilon=f32_from_f64(float(p["epsilon"])),
                momentum=m,
                default=not p["constructor_kwargs"],
                scale=tensor(case, "gamma"),
                offset=tensor(case, "beta"),
                mm0=tensor(case, "moving_mean_init"),
                mv0=tensor(case, "moving_variance_init"),
                xs=[tensor(case, f"x_step{k}") for k in steps],
                ys=[tensor(case, f"y_step{k}") for k in steps],
                mms=[tensor(case, f"moving_mean_step{k}") for k in steps],
                mvs=[tensor(case, f"moving_variance_step{k}") for k in steps],
                tracked=None,
                fw=[(d_fw, w_fw) for _ in steps],
                x_infer=tensor(case, "x_infer"),
                y_infer=tensor(case, "y_infer"),
            )
        )

    # pytorch_train.json: PyTorch updates in double with momentum m (or
    # 1 / num_batches_tracked for momentum=None) and rounds once. Running
    # statistics start at 0 and 1.
    for case in json.load(open(f"{data}/pytorch_train.json"))["cases"]:
        layout, n, s, c = shape(case)
        p = case["params"]
        m = p["momentum"]
        ins, outs = case["inputs"], case["outputs"]
        xs = [[f32(v) for v in x] for x in ins["x_steps"]]
        st = outs["steps"]
        assert len(xs) == len(st)
        fw = []
        for b in range(1, len(st) + 1):
            fw.append((1.0 - m, m) if m is not None else (1.0 - 1.0 / b, 1.0 / b))
        layers.append(
            dict(
                name=case["name"],
                shape=(layout, n, s, c),
                framework="BN_FW_PYTORCH" if m is not None else "BN_FW_PYTORCH_CUMULATIVE",
                epsilon=f32_from_f64(float(p["epsilon"])),
                momentum=m if m is not None else 0.0,
                default=m == 0.1,
                scale=[f32(v) for v in ins["scale"]],
                offset=[f32(v) for v in ins["offset"]],
                mm0=[0.0] * c,
                mv0=[1.0] * c,
                xs=xs,
                ys=[[f32(v) for v in o["y"]] for o in st],
                mms=[[f32(v) for v in o["running_mean"]] for o in st],
                mvs=[[f32(v) for v in o["running_var"]] for o in st],
                tracked=[o["num_batches_tracked"] for o in st],
                fw=fw,
                x_infer=[f32(v) for v in ins["x_eval"]],
                y_infer=[f32(v) for v in outs["y_eval"]],
            )
        )

    layer_lits = []
    for L in layers:
        layout, n, s, c = L["shape"]
        k = len(L["xs"])
        for t in L["xs"] + L["ys"] + [L["x_infer"], L["y_infer"]]:
            assert len(t) == n * s * c, L["name"]
        fields = [
            json.dumps(L["name"]),
            L["framework"],
            f"{{{layout}, {n}, {s}, {c}}}",
            lit(L["epsilon"]),
            lit(float(L["momentum"]), ""),
            "1" if L["default"] else "0",
            out.array(L["scale"]),
            out.array(L["offset"]),
            out.array(L["mm0"]),
            out.array(L["mv0"]),
            str(k),
            out.ptr_array([out.array(x) for x in L["xs"]]),
            out.ptr_array([out.array(y) for y in L["ys"]]),
            out.ptr_array([out.array(v) for v in L["mms"]]),
            out.ptr_array([out.array(v) for v in L["mvs"]]),
            out.u64_array(L["tracked"]) if L["tracked"] else "NULL",
            out.array([d for d, _ in L["fw"]], "double", ""),
            out.array([w for _, w in L["fw"]], "double", ""),
            out.array(L["x_infer"]),
            out.array(L["y_infer"]),
        ]
        layer_lits.append("{" + ", ".join(fields) + "}")

    with open(out_path, "w") as f:
        f.write("/* Generated by capi/tests/gen_vectors.py from tests/data (do not edit). */\n")
        f.write("\n".join(out.lines) + "\n")
        f.write(f"static const struct norm_case NORM_CASES[{len(norm)}] = {{\n  ")
        f.write(",\n  ".join(norm) + "\n};\n")
        f.write(f"static const struct layer_case LAYER_CASES[{len(layer_lits)}] = {{\n  ")
        f.write(",\n  ".join(layer_lits) + "\n};\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
