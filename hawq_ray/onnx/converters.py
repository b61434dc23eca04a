"""Each op of the program as nodes of an ONNX QDQ graph: `CONVERTERS`, keyed by op name.

Each entry is `(QdqGraph, Op) -> None`: it reads its inputs' tensors (`g.value`), writes nodes, and binds the
op's output to a float tensor equal to its integer codes times its scale (`g.bind`; `qdq.py` holds the
graph and the forms). Every op of the registry has an entry here (`tests/test_op_registry.py`).
"""
from __future__ import annotations

import numpy as np

from hawq_ray.ops.pool import adaptive_windows
from hawq_ray.ops.requantize import clamp_of


def conv2d_onnx(g, op):
    x = g.value(op.inputs[0])
    w, b, s_acc = g.weight(op, x)
    (ph, pw), a = op.attrs["padding"], op.attrs
    y = g.node("Conv", [x.name, w, b], op.output, strides=list(a["stride"]), pads=[ph, pw, ph, pw],
               dilations=list(a["dilation"]), group=int(a["groups"]))
    g.bind(op, y, s_acc.reshape(-1, 1, 1))


def dense_onnx(g, op):
    """Gemm of the dequantized input and weight; in the exact form a float64 Gemm of the integer codes (exact
    below 2^53: a float32 sum of the logits' large terms cancels to errors of many output units)."""
    x = g.value(op.inputs[0])
    if g.form != "exact":
        w, b, s_acc = g.weight(op, x)
        g.bind(op, g.node("Gemm", [x.name, w, b], op.output, transB=1), s_acc)
        return
    s_acc = g.layer_scales(op, x)[1].astype(np.float64)
    codes = g.node("Cast", [g.codes(x, op.output)], f"{op.output}.double", to=11)      # 11: DOUBLE
    acc = g.node("Gemm", [codes, g.const(op.consts["weight"], f"{op.output}.w64", "DOUBLE"),
                          g.const(op.consts["bias"], f"{op.output}.b64", "DOUBLE")], f"{op.output}.acc", transB=1)
    acc = g.node("Cast", [acc], f"{op.output}.float", to=1)
    g.bind(op, g.node("Mul", [acc, g.const(s_acc, f"{op.output}.s_acc")], op.output), s_acc)


def requantize_onnx(g, op):
    """The exact form (and any output wider than 8 bits): the integer arithmetic itself, in float64, then a
    Q/DQ pair. The int8 form: a Q/DQ pair of the float input at the output's scale, which runtimes fuse into
    the producing conv; the program's multiplier b / 2^c is S_in / S_out times a factor that is 1 for a change
    of scale and 1 / count after a window sum, an explicit Mul."""
    x = g.value(op.inputs[0])
    ratio = np.asarray(op.consts["multiplier"], np.float64) / np.exp2(np.asarray(op.consts["shift"], np.float64))
    if g.rounds_in_float(op, *clamp_of(op)):
        g.integer_requantize(op, x, ratio, *clamp_of(op))
        return
    factor = ratio * g.out_scale(op) / x.scale
    name = x.name
    if not np.allclose(factor, 1.0, rtol=1e-6, atol=0):
        name = g.node("Mul", [x.name, g.const(factor, f"{op.output}.factor")], f"{op.output}.mul")
        if np.all(factor <= 1):
            # sum / count ties exactly (x.5) for whole sums; QuantizeLinear rounds those to even, the program
            # up. A quarter of the finest step 1 / count sends them up and moves no other value.
            nudge = 0.25 * float(np.min(factor)) * g.out_scale(op)
            name = g.node("Add", [name, g.const(nudge, f"{op.output}.nudge")], f"{op.output}.up")
    g.quantize(op, name, *clamp_of(op))


def affine_onnx(g, op):
    """The integer affine itself where the export computes exactly (`integer_requantize` with the bias);
    else x A + B on real values, A = S_out m / (2^c S_in) and B = S_out bias m / 2^c per channel, then the
    Q/DQ pair of the output."""
    x = g.value(op.inputs[0])
    ratio = np.asarray(op.consts["multiplier"], np.float64) / np.exp2(np.asarray(op.consts["shift"], np.float64))
    lo, hi = int(op.attrs["lo"]), int(op.attrs["hi"])
    if g.rounds_in_float(op, lo, hi):
        g.integer_requantize(op, x, ratio, lo, hi, bias=np.asarray(op.consts["bias"], np.float64))
        return
    s_out = g.out_scale(op)
    y = g.node("Mul", [x.name, g.const(s_out * ratio / x.scale, f"{op.output}.a")], f"{op.output}.mul")
    y = g.node("Add", [y, g.const(s_out * ratio * np.asarray(op.consts["bias"], np.float64), f"{op.output}.b")],
               f"{op.output}.add")
    g.quantize(op, y, lo, hi)


def relu_onnx(g, op):
    x = g.value(op.inputs[0])
    g.bind(op, g.node("Relu", [x.name], op.output), x.scale)


def clamp_onnx(g, op):
    x = g.value(op.inputs[0])
    lo = g.const(np.asarray(op.consts["lo"], np.float64) * x.scale, f"{op.output}.lo")
    hi = g.const(np.asarray(op.consts["hi"], np.float64) * x.scale, f"{op.output}.hi")
    g.bind(op, g.node("Min", [g.node("Max", [x.name, lo], f"{op.output}.max"), hi], op.output), x.scale)


def lookup_onnx(g, op):
    """A Gather of the table's codes at the input's codes (exact), then a DequantizeLinear."""
    x = g.value(op.inputs[0])
    offset = g.const(np.asarray(op.attrs["offset"], np.int64), f"{op.output}.offset", "INT64")
    idx = g.node("Sub", [g.codes(x, op.output), offset], f"{op.output}.sub")
    table = np.asarray(op.consts["table"])
    qtype = g.narrowest(int(table.min()), int(table.max()))
    codes = g.node("Gather", [g.const(table, f"{op.output}.table", qtype), idx], f"{op.output}.gather", axis=0)
    g.bind(op, g.dequantize(codes, op.scale, op.output, qtype), g.out_scale(op), codes)


def mul_onnx(g, op):
    a, b = g.value(op.inputs[0]), g.value(op.inputs[1])
    g.bind(op, g.node("Mul", [a.name, b.name], op.output), a.scale * b.scale)


def add_onnx(g, op):
    a, b = g.value(op.inputs[0]), g.value(op.inputs[1])
    g.bind(op, g.node("Add", [a.name, b.name], op.output), g.out_scale(op))


def concat_onnx(g, op):
    ins = [g.value(i) for i in op.inputs]
    y = g.node("Concat", [t.name for t in ins], op.output, axis=int(op.attrs.get("axis", 1)))
    g.bind(op, y, g.out_scale(op))


def shuffle_onnx(g, op):
    x = g.value(op.inputs[0])
    _, c, h, w = g.shape(op.inputs[0])
    k = int(op.attrs["groups"])
    y = g.node("Reshape", [x.name, g.const(np.array([-1, k, c // k, h, w]), f"{op.output}.split", "INT64")],
               f"{op.output}.split")
    y = g.node("Transpose", [y], f"{op.output}.transpose", perm=[0, 2, 1, 3, 4])
    y = g.node("Reshape", [y, g.const(np.array([-1, c, h, w]), f"{op.output}.merge", "INT64")], op.output)
    g.bind(op, y, g.out_scale(op))


def slice_onnx(g, op):
    x, a = g.value(op.inputs[0]), op.attrs
    ends = [g.const(np.array([v]), f"{op.output}.{n}", "INT64") for n, v in (("start", a["start"]),
                                                                             ("stop", a["stop"]), ("axis", 1))]
    g.bind(op, g.node("Slice", [x.name, *ends], op.output), g.out_scale(op))


def flatten_onnx(g, op):
    x = g.value(op.inputs[0])
    g.bind(op, g.node("Flatten", [x.name], op.output, axis=1), g.out_scale(op))


def _window_matrix(size: int, out: int, attrs: dict, axis: int) -> np.ndarray:
    """(out, size) 0/1 matrix: row i marks the input rows of output i's window (padding adds nothing)."""
    if attrs.get("adaptive"):
        spans = adaptive_windows(size, out)
    else:
        k, s, p = attrs["kernel"][axis], attrs["stride"][axis], attrs["padding"][axis]
        spans = [(max(i * s - p, 0), min(i * s - p + k, size)) for i in range(out)]
    m = np.zeros((out, size))
    for i, (a, b) in enumerate(spans):
        m[i, a:b] = 1
    return m


def sum_pool_onnx(g, op):
    """Window sums: ReduceSum for a global pool, else P_h @ x @ P_w^T with 0/1 window matrices (any window
    layout, adaptive included; exact in float for these integer magnitudes)."""
    x = g.value(op.inputs[0])
    (_, _, h, w), (_, _, oh, ow) = g.shape(op.inputs[0]), g.shape(op.output)
    rows, cols = _window_matrix(h, oh, op.attrs, 0), _window_matrix(w, ow, op.attrs, 1)
    if rows.all() and cols.all():
        y = g.node("ReduceSum", [x.name, g.const(np.array([2, 3]), f"{op.output}.axes", "INT64")], op.output,
                   keepdims=1)
    else:
        y = g.node("MatMul", [x.name, g.const(cols.T, f"{op.output}.cols")], f"{op.output}.w")
        y = g.node("MatMul", [g.const(rows, f"{op.output}.rows"), y], op.output)
    g.bind(op, y, x.scale)


def max_pool_onnx(g, op):
    """MaxPool with torch's ceil-mode windows as explicit extra padding (ONNX pads never win a max)."""
    x, a = g.value(op.inputs[0]), op.attrs
    size, out = g.shape(op.inputs[0])[2:], g.shape(op.output)[2:]
    k = [(a["kernel"][i] - 1) * a["dilation"][i] + 1 for i in (0, 1)]
    extra = [max(0, (out[i] - 1) * a["stride"][i] + k[i] - size[i] - 2 * a["padding"][i]) for i in (0, 1)]
    ph, pw = a["padding"]
    y = g.node("MaxPool", [x.name], op.output, kernel_shape=list(a["kernel"]), strides=list(a["stride"]),
               pads=[ph, pw, ph + extra[0], pw + extra[1]], dilations=list(a["dilation"]))
    g.bind(op, y, x.scale)


def layer_norm_onnx(g, op):
    """The integer semantics of `ops.layernorm` in int64 ONNX ops (both forms): the input's codes, ReduceSum over
    the channels, isqrt bit by bit (Where of c * c <= v), the reciprocal by Div of positives (truncation = floor),
    each arithmetic shift right as an exact division (a - Mod(a, 2^k)) / 2^k (Mod of ints takes the divisor's
    sign: floor), the clamp by Max / Min; then the codes' DequantizeLinear at the output scale."""
    from hawq_ray.ops.layernorm import K, NORM_SHIFT, P, ROOT_BITS, layer_norm_channels, check_constants
    x, h = g.value(op.inputs[0]), op.output
    shape = g.shape(op.inputs[0])
    c = layer_norm_channels(shape, h)
    k = check_constants(op, c)
    view = (1, c) + (1,) * (len(shape) - 2)
    i64 = lambda v, n: g.const(np.asarray(v, np.int64), f"{h}.{n}", "INT64")     # noqa: E731

    def floor_shift(a, pow2, n):          # floor(a / pow2) for pow2 = 2^k > 0, exactly
        rest = g.node("Sub", [a, g.node("Mod", [a, pow2], f"{h}.{n}.mod", fmod=0)], f"{h}.{n}.sub")
        return g.node("Div", [rest, pow2], f"{h}.{n}.div")
    q = g.codes(x, f"{h}.in")
    axes = i64([1], "axes")
    total = g.node("ReduceSum", [q, axes], f"{h}.sum", keepdims=1)
    squares = g.node("ReduceSum", [g.node("Mul", [q, q], f"{h}.sq"), axes], f"{h}.squares", keepdims=1)
    v = g.node("Sub", [g.node("Mul", [squares, i64(c, "c")], f"{h}.csq"),
                       g.node("Mul", [total, total], f"{h}.ss")], f"{h}.var")
    v = g.node("Mul", [g.node("Add", [v, i64(int(op.attrs.get("eps", 0)), "eps")], f"{h}.veps"),
                       i64(1 << (2 * P), "pre")], f"{h}.v")
    r = g.node("Mul", [v, i64(0, "zero")], f"{h}.root")
    for b in range(ROOT_BITS - 1, -1, -1):
        t = g.node("Add", [r, i64(1 << b, f"bit{b}")], f"{h}.try{b}")
        ok = g.node("LessOrEqual", [g.node("Mul", [t, t], f"{h}.sq{b}"), v], f"{h}.ok{b}")
        r = g.node("Where", [ok, t, r], f"{h}.root{b}")
    recip = g.node("Div", [i64(1 << K, "two_k"), g.node("Max", [r, i64(1, "one")], f"{h}.r")], f"{h}.recip")
    d = g.node("Sub", [g.node("Mul", [q, i64(c, "c2")], f"{h}.cx"), total], f"{h}.d")
    n = g.node("Add", [g.node("Mul", [d, recip], f"{h}.dr"), i64(1 << (NORM_SHIFT - 1), "half")], f"{h}.dr_half")
    n = floor_shift(n, i64(1 << NORM_SHIFT, "norm_pow"), "norm")
    shift = k["shift"]
    y = g.node("Mul", [n, i64(k["multiplier"].reshape(view), "mult")], f"{h}.nm")
    y = g.node("Add", [y, i64((k["bias"] + (np.int64(1) << (shift - 1))).reshape(view), "bias")], f"{h}.biased")
    y = floor_shift(y, i64((np.int64(1) << shift).reshape(view), "out_pow"), "out")
    lo, hi = int(op.attrs["lo"]), int(op.attrs["hi"])
    y = g.node("Min", [g.node("Max", [y, i64(lo, "lo")], f"{h}.max"), i64(hi, "hi")], f"{h}.clamp")
    qtype = g.narrowest(lo, hi)
    codes = g.node("Cast", [y], f"{h}.codes", to={"UINT8": 2, "INT8": 3, "INT32": 6}[qtype])
    g.bind(op, g.dequantize(codes, op.scale, h, qtype), g.out_scale(op), codes)


CONVERTERS = {"conv2d": conv2d_onnx, "dense": dense_onnx, "requantize": requantize_onnx, "affine": affine_onnx,
              "relu": relu_onnx, "clamp": clamp_onnx, "lookup": lookup_onnx, "mul": mul_onnx, "add": add_onnx,
              "concat": concat_onnx, "channel_shuffle": shuffle_onnx, "slice": slice_onnx,
              "flatten": flatten_onnx, "sum_pool2d": sum_pool_onnx, "max_pool2d": max_pool_onnx,
              "layer_norm": layer_norm_onnx}
