"""Each op of the program as nodes of an ONNX QDQ graph: `CONVERTERS`, keyed by op name.

Each entry is `(QdqGraph, Op) -> None`: it reads its inputs' tensors (`g.value`), writes nodes, and binds the
op's output to a float tensor equal to its integer codes times its scale (`g.bind`; `qdq.py` holds the
graph and the forms). Every op of the registry has an entry here (`tests/test_op_registry.py`).
"""
from __future__ import annotations

import numpy as np

from hawq_ray.contract import HawqError
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
    """Gemm of the dequantized input and weight (over tokens (N, ..., I): MatMul by the weight stored (I, O),
    dequantized on axis 1, then Add of the bias); in the exact form a float64 Gemm / MatMul of the integer
    codes (exact below 2^53: a float32 sum of the logits' large terms cancels to errors of many output units),
    whose accumulator is the output's codes (`Tensor.codes`)."""
    x = g.value(op.inputs[0])
    tokens = len(g.shape(op.inputs[0])) > 2
    if g.form != "exact":
        w, b, s_acc = g.weight(op, x, transpose=tokens)
        if tokens:
            y = g.node("Add", [g.node("MatMul", [x.name, w], f"{op.output}.matmul"), b], op.output)
        else:
            y = g.node("Gemm", [x.name, w, b], op.output, transB=1)
        g.bind(op, y, s_acc)
        return
    s_acc = g.layer_scales(op, x)[1].astype(np.float64)
    codes = g.codes(x, op.output, to=11)                                       # 11: DOUBLE
    weight, bias = np.asarray(op.consts["weight"]), op.consts["bias"]
    b64 = g.const(bias, f"{op.output}.b64", "DOUBLE")
    if tokens:
        acc = g.node("MatMul", [codes, g.const(weight.T, f"{op.output}.w64", "DOUBLE")], f"{op.output}.matmul")
        acc = g.node("Add", [acc, b64], f"{op.output}.acc")
    else:
        acc = g.node("Gemm", [codes, g.const(weight, f"{op.output}.w64", "DOUBLE"), b64], f"{op.output}.acc",
                     transB=1)
    y = g.node("Cast", [acc], f"{op.output}.float", to=1)
    g.bind(op, g.node("Mul", [y, g.const(s_acc, f"{op.output}.s_acc")], op.output), s_acc, acc)


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
    """The integer affine itself where the export computes exactly (`integer_requantize` with the bias, and the
    negative side's ratio where it has one: PReLU); else x A + B on real values, A = S_out m / (2^c S_in) and
    B = S_out bias m / 2^c per channel (A and B of the negative side where x / S_in + bias < 0), then the Q/DQ
    pair of the output."""
    x = g.value(op.inputs[0])
    shift = np.exp2(np.asarray(op.consts["shift"], np.float64))
    ratio = np.asarray(op.consts["multiplier"], np.float64) / shift
    negative = np.asarray(op.consts["negative"], np.float64) / shift if "negative" in op.consts else None
    bias = np.asarray(op.consts["bias"], np.float64)
    lo, hi = int(op.attrs["lo"]), int(op.attrs["hi"])
    if g.rounds_in_float(op, lo, hi):
        g.integer_requantize(op, x, ratio, lo, hi, bias=bias, negative=negative)
        return
    s_out = g.out_scale(op)
    if negative is None:
        y = g.node("Mul", [x.name, g.const(s_out * ratio / x.scale, f"{op.output}.a")], f"{op.output}.mul")
        y = g.node("Add", [y, g.const(s_out * ratio * bias, f"{op.output}.b")], f"{op.output}.add")
    else:
        t = g.node("Add", [g.node("Mul", [x.name, g.const(1.0 / np.asarray(x.scale, np.float64), f"{op.output}.inv")],
                                  f"{op.output}.codes"), g.const(bias, f"{op.output}.b")], f"{op.output}.t")
        below = g.node("Less", [t, g.const(0.0, f"{op.output}.zero")], f"{op.output}.below")
        a = g.node("Where", [below, g.const(s_out * negative, f"{op.output}.an"), g.const(s_out * ratio,
                                                                                     f"{op.output}.ap")],
                   f"{op.output}.a")
        y = g.node("Mul", [t, a], f"{op.output}.mul")
    g.quantize(op, y, lo, hi)


def relu_onnx(g, op):
    x = g.value(op.inputs[0])
    g.bind(op, g.node("Relu", [x.name], op.output), x.scale)


def clamp_onnx(g, op):
    """Max / Min at the clamp's bounds times the input's scale. The fused form writes nothing where the
    readers' own saturation is the clamp (`_saturated_by_readers`: a ReLU6 ahead of the calibrated range of
    its requantize): a Max / Min between a conv and its QuantizeLinear keeps onnxruntime from fusing them
    into an integer conv. The value's tensor is then its input's; the clamped one is written only for the
    export's `every_value` taps (`QdqGraph.unclamped`)."""
    x = g.value(op.inputs[0])

    def clamped(name=op.output):
        lo = g.const(np.asarray(op.consts["lo"], np.float64) * x.scale, f"{op.output}.lo")
        hi = g.const(np.asarray(op.consts["hi"], np.float64) * x.scale, f"{op.output}.hi")
        return g.node("Min", [g.node("Max", [x.name, lo], f"{op.output}.max"), hi], name)
    if g.form == "fused" and _saturated_by_readers(g, op):
        g.unclamped[op.output] = lambda: clamped(f"{op.output}.clamped")
        g.bind(op, x.name, x.scale)
        return
    g.bind(op, clamped(), x.scale)


def _saturated_by_readers(g, op) -> bool:
    """Whether every reader of clamp op is a requantize to an 8-bit Q/DQ pair (`QdqGraph.quantize`) whose
    output range the clamp leaves as it is: a requantize is monotone, so requantize(clamp(z, lo, hi)) =
    clamp(requantize(z), requantize(lo), requantize(hi)), and where requantize(lo) <= its lower bound and
    requantize(hi) >= its upper one, its own clamp (the QuantizeLinear's saturation) is the whole of it. The
    bounds are checked at a fifth of a code from the rounding boundaries (the fused form's QuantizeLinear
    rounds half to even, after a nudge of a quarter code at most: `requantize_onnx`)."""
    readers = g.readers.get(op.output, [])
    if not readers or op.output == g.program.output:
        return False
    lo = np.asarray(op.consts["lo"], np.float64).reshape(-1)
    hi = np.asarray(op.consts["hi"], np.float64).reshape(-1)
    for r in readers:
        if r.op != "requantize":
            return False
        r_lo, r_hi = clamp_of(r)
        if g.rounds_in_float(r, r_lo, r_hi) or g.narrowest(r_lo, r_hi) == "INT32":
            return False
        ratio = (np.asarray(r.consts["multiplier"], np.float64)
                 / np.exp2(np.asarray(r.consts["shift"], np.float64))).reshape(-1)
        try:                                # per channel, or one for all
            low, high = lo * ratio, hi * ratio
        except ValueError:
            return False
        if np.max(low) > r_lo + 0.2 or np.min(high) < r_hi - 0.2:
            return False
    return True


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


def gather_onnx(g, op):
    """x[:, index]: a Gather on axis 1 of the float tensor and of its codes tensor where it has one; a per-channel
    scale is gathered with its channels."""
    x = g.value(op.inputs[0])
    index = np.asarray(op.consts["index"], np.int64).reshape(-1)
    at = g.const(index, f"{op.output}.index", "INT64")
    codes = None if x.codes is None else g.node("Gather", [x.codes, at], f"{op.output}.codes", axis=1)
    scale = np.asarray(x.scale)
    g.bind(op, g.node("Gather", [x.name, at], op.output, axis=1), scale[index] if scale.ndim and len(scale) > 1
           else scale, codes, x.zero_point)


def resize_onnx(g, op):
    """resize by its taps (`ops.resize`, `_resampled`), not ONNX Resize: the taps are torch's own, read at trace
    time for the size, scale factor and align_corners the op no longer carries. The exact form: on the input's
    int64 codes, the rounding shift as floor division (`QdqGraph.floor_div`), the result the output's codes (an
    8-bit output's through a DequantizeLinear); the fused form: on the dequantized input with the weights scaled
    by 2^-(shift / 2) per axis, then a Q/DQ pair where the output is 8-bit. The scale is the input's."""
    x, h, shift = g.value(op.inputs[0]), op.output, int(op.attrs["shift"])
    lo, hi = g.ranges.get(h, (op.lo, op.hi))
    qtype = g.narrowest(lo, hi)
    if g.form != "exact":
        y = _resampled(g, x.name, op, None, 2.0 ** -(shift / 2))
        if qtype == "INT32":
            g.bind(op, y, x.scale)
        else:
            g.quantize(op, y, lo, hi)
        return
    q = _resampled(g, g.codes(x, f"{h}.in"), op, "INT64", 1)
    if shift:
        q = g.floor_div(g.node("Add", [q, _i64(g, h)(1 << (shift - 1), "half")], f"{h}.half"), 1 << shift,
                        f"{h}.shift")
    if qtype == "INT32":        # the int64 codes travel with the value (a requantize after it reads them)
        y = g.node("Mul", [g.node("Cast", [q], f"{h}.float", to=1), g.const(x.scale, f"{h}.scale")], h)
        g.bind(op, y, x.scale, q)
        return
    codes = g.node("Cast", [q], f"{h}.codes", to={"UINT8": 2, "INT8": 3}[qtype])
    g.bind(op, g.dequantize(codes, x.scale, h, qtype), x.scale, codes)


def _resampled(g, t: str, op, dtype: str | None, unit: float) -> str:
    """Tensor t (N, C, H, W) resampled by op's taps, rows then columns: a Gather of the rows each output row's taps
    read ((N, C, Ho, T, W)), a Mul by their weights times `unit`, a ReduceSum over the taps; likewise along W. In
    `dtype` (INT64, or None: float32)."""
    h = op.output
    for axis, (idx, w) in ((2, ("idx_h", "w_h")), (3, ("idx_w", "w_w"))):
        index, weight = np.asarray(op.consts[idx], np.int64), np.asarray(op.consts[w]) * unit
        t = g.node("Gather", [t, g.const(index, f"{h}.{idx}", "INT64")], f"{h}.{idx}.taps", axis=axis)
        weight = weight.reshape(weight.shape + ((1,) if axis == 2 else ()))       # broadcast over W (rows' taps)
        t = g.node("Mul", [t, g.const(weight, f"{h}.{w}", dtype)], f"{h}.{w}.weighted")
        t = g.node("ReduceSum", [t, _i64(g, h)([axis + 1], f"{w}.axes")], f"{h}.{w}.sum", keepdims=0)
    return t


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


def _i64(g, hint: str):
    return lambda v, n: g.const(np.asarray(v, np.int64), f"{hint}.{n}", "INT64")


def layer_norm_onnx(g, op):
    """The exact form: the integer semantics of `ops.layernorm` in int64 ONNX ops over the op's axis: the input's
    codes, ReduceSum (none without centering: S = 0), isqrt bit by bit (Where of c * c <= v), the reciprocal by
    Div of positives (truncation = floor), each arithmetic shift right as floor division (`QdqGraph.floor_div`),
    the clamp by Max / Min; then the codes' DequantizeLinear at the output scale. The fused form: float
    normalization with gamma, beta and eps read back from the constants (`_layer_norm_in_float`)."""
    from hawq_ray.ops.layernorm import K, NORM_SHIFT, P, ROOT_BITS, layer_norm_channels, check_constants
    x, h = g.value(op.inputs[0]), op.output
    shape = g.shape(op.inputs[0])
    axis = int(op.attrs.get("axis", 1))
    c = layer_norm_channels(shape, h, axis)
    k = check_constants(op, c)
    lo, hi = int(op.attrs["lo"]), int(op.attrs["hi"])
    if g.form != "exact":
        _layer_norm_in_float(g, op, x, shape, axis, c, k, lo, hi)
        return
    view = tuple(c if i == axis else 1 for i in range(len(shape)))
    i64 = _i64(g, h)
    q = g.codes(x, f"{h}.in")
    axes = i64([axis], "axes")
    center = bool(op.attrs.get("center", True))
    total = g.node("ReduceSum", [q, axes], f"{h}.sum", keepdims=1) if center else None
    squares = g.node("ReduceSum", [g.node("Mul", [q, q], f"{h}.sq"), axes], f"{h}.squares", keepdims=1)
    v = g.node("Mul", [squares, i64(c, "c")], f"{h}.csq")
    if center:
        v = g.node("Sub", [v, g.node("Mul", [total, total], f"{h}.ss")], f"{h}.var")
    v = g.node("Mul", [g.node("Add", [v, i64(int(op.attrs.get("eps", 0)), "eps")], f"{h}.veps"),
                       i64(1 << (2 * P), "pre")], f"{h}.v")
    r = g.node("Mul", [v, i64(0, "zero")], f"{h}.root")
    for b in range(ROOT_BITS - 1, -1, -1):
        t = g.node("Add", [r, i64(1 << b, f"bit{b}")], f"{h}.try{b}")
        ok = g.node("LessOrEqual", [g.node("Mul", [t, t], f"{h}.sq{b}"), v], f"{h}.ok{b}")
        r = g.node("Where", [ok, t, r], f"{h}.root{b}")
    recip = g.node("Div", [i64(1 << K, "two_k"), g.node("Max", [r, i64(1, "one")], f"{h}.r")], f"{h}.recip")
    d = g.node("Mul", [q, i64(c, "c2")], f"{h}.cx")
    if center:
        d = g.node("Sub", [d, total], f"{h}.d")
    n = g.node("Add", [g.node("Mul", [d, recip], f"{h}.dr"), i64(1 << (NORM_SHIFT - 1), "half")], f"{h}.dr_half")
    n = g.floor_div(n, np.int64(1) << NORM_SHIFT, f"{h}.norm")
    shift = k["shift"]
    y = g.node("Mul", [n, i64(k["multiplier"].reshape(view), "mult")], f"{h}.nm")
    y = g.node("Add", [y, i64((k["bias"] + (np.int64(1) << (shift - 1))).reshape(view), "bias")], f"{h}.biased")
    y = g.floor_div(y, (np.int64(1) << shift).reshape(view), f"{h}.out")
    y = g.node("Min", [g.node("Max", [y, i64(lo, "lo")], f"{h}.max"), i64(hi, "hi")], f"{h}.clamp")
    qtype = g.narrowest(lo, hi)
    if qtype == "INT32":     # 16-bit: codes times the scale in float32 (exact), as a wide requantize writes it; a
        # DequantizeLinear of INT32 before a Transpose makes onnxruntime's transpose optimizer write an INT32
        # QuantizeLinear, which it then rejects
        y = g.node("Mul", [g.node("Cast", [y], f"{h}.float", to=1), g.const(g.out_scale(op), f"{h}.scale")], h)
        g.bind(op, y, g.out_scale(op))
        return
    codes = g.node("Cast", [y], f"{h}.codes", to={"UINT8": 2, "INT8": 3}[qtype])
    g.bind(op, g.dequantize(codes, op.scale, h, qtype), g.out_scale(op), codes)


def _layer_norm_in_float(g, op, x, shape, axis, c, k, lo, hi):
    """The fused form: the normalization in float with gamma, beta and eps read back from the constants
    (m 2^-s S_out 2^F, b 2^-s S_out, eps S_in^2 / C^2), then the output's Q/DQ pair where it is 8-bit, a Clip to
    its range at its scale where it is 16-bit."""
    from hawq_ray.ops.layernorm import F
    h, s_out, s_in = op.output, float(np.asarray(g.out_scale(op))), g.per_tensor(op, x)
    ratio = np.exp2(-k["shift"].astype(np.float64))
    gamma, beta = k["multiplier"] * ratio * s_out * 2.0 ** F, k["bias"] * ratio * s_out
    eps = float(int(op.attrs.get("eps", 0)) * s_in ** 2 / c ** 2)
    if op.attrs.get("center", True):
        y = _float_layer_norm(g, h, x.name, len(shape), axis, gamma, beta, eps)
    else:                   # the integer r >= 1 holds sqrt(mean(x^2) + eps) at S_in / (8 C) or more
        y = _float_rms_norm(g, h, x.name, len(shape), axis, gamma, beta, eps, (s_in / (8 * c)) ** 2)
    if g.narrowest(lo, hi) != "INT32":
        g.quantize(op, y, lo, hi)
        return
    y = g.node("Clip", [y, g.const(lo * s_out, f"{h}.lo"), g.const(hi * s_out, f"{h}.hi")], h)
    g.bind(op, y, s_out)


def _float_layer_norm(g, h: str, x: str, rank: int, axis: int, gamma, beta, eps: float) -> str:
    """LayerNormalization over the last axis: the op's axis moved there and back."""
    last = rank - 1
    perm = list(range(rank))
    perm[axis], perm[last] = last, axis
    y = x if axis == last else g.node("Transpose", [x], f"{h}.to_last", perm=perm)
    y = g.node("LayerNormalization", [y, g.const(gamma, f"{h}.gamma"), g.const(beta, f"{h}.beta")], f"{h}.float",
               axis=-1, epsilon=eps)
    return y if axis == last else g.node("Transpose", [y], f"{h}.back", perm=perm)


def _float_rms_norm(g, h: str, x: str, rank: int, axis: int, gamma, beta, eps: float, floor: float) -> str:
    """x / sqrt(max(mean(x^2) + eps, floor)) gamma + beta over `axis` in float ops (LayerNormalization always
    centers; RMSNormalization is opset 23)."""
    view = tuple(len(gamma) if i == axis else 1 for i in range(rank))
    mean = g.node("ReduceMean", [g.node("Mul", [x, x], f"{h}.sq"), g.const(np.asarray([axis]), f"{h}.axes", "INT64")],
                  f"{h}.mean_sq", keepdims=1)
    mean = g.node("Max", [g.node("Add", [mean, g.const(eps, f"{h}.eps")], f"{h}.meps"), g.const(floor, f"{h}.floor")],
                  f"{h}.ms")
    y = g.node("Div", [x, g.node("Sqrt", [mean], f"{h}.rms")], f"{h}.unit")
    y = g.node("Mul", [y, g.const(np.reshape(gamma, view), f"{h}.gamma")], f"{h}.scaled")
    return g.node("Add", [y, g.const(np.reshape(beta, view), f"{h}.beta")], f"{h}.float")


# ---------------------------------------------------------------------------------------------- transformer ops

def _layout_onnx(g, op, onnx_op: str, extra: list | None = None, codes_extra: list | None = None, **attrs):
    """A layout op: the same ONNX op on the float tensor and on its codes tensor where it has one (with
    `codes_extra` for the codes' inputs where they differ); a per-tensor scale moves with its integers (the
    program requantizes a per-feature value to one scale first), and the codes' zero point with them."""
    x = g.value(op.inputs[0])
    if np.size(x.scale) != 1:
        raise HawqError(f"ONNX export: {op.op} {op.output!r} moves a value with one scale per channel; the "
                        "program requantizes such a value to one scale first")
    extra = extra or []
    y = g.node(onnx_op, [x.name, *extra], op.output, **attrs)
    codes = None if x.codes is None else g.node(onnx_op, [x.codes, *(extra if codes_extra is None else codes_extra)],
                                                f"{op.output}.codes", **attrs)
    g.bind(op, y, x.scale, codes, x.zero_point)


def reshape_onnx(g, op):
    """Reshape to the per-sample shape (its -1 the axis that grows with the batch: ONNX infers it)."""
    shape = g.const(np.asarray(op.attrs["shape"], np.int64), f"{op.output}.shape", "INT64")
    _layout_onnx(g, op, "Reshape", [shape])


def permute_onnx(g, op):
    _layout_onnx(g, op, "Transpose", perm=[int(d) for d in op.attrs["dims"]])


def roll_onnx(g, op):
    """torch.roll along axes that are not the batch's (static sizes): per axis, the last `shift mod size` entries
    Sliced off and Concatenated before the rest; on the float tensor and its codes tensor alike."""
    x, h = g.value(op.inputs[0]), op.output
    if np.size(x.scale) != 1:
        raise HawqError(f"ONNX export: roll {h!r} moves a value with one scale per channel")
    shape = g.shape(op.inputs[0])
    steps = [(int(d) % len(shape), int(s) % shape[int(d) % len(shape)]) for s, d in zip(op.attrs["shifts"],
                                                                                      op.attrs["dims"])]

    def rolled(name: str, hint: str) -> str:
        for i, (d, s) in enumerate(steps):
            if s == 0:
                continue
            n = shape[d]
            i64 = lambda v, t: g.const(np.asarray([v], np.int64), f"{hint}.{t}{i}", "INT64")   # noqa: E731
            tail = g.node("Slice", [name, i64(n - s, "cut"), i64(n, "end"), i64(d, "axis")], f"{hint}.tail{i}")
            head = g.node("Slice", [name, i64(0, "start"), i64(n - s, "stop"), i64(d, "axes")], f"{hint}.head{i}")
            name = g.node("Concat", [tail, head], f"{hint}.roll{i}", axis=d)
        return g.node("Identity", [name], hint)
    codes = None if x.codes is None else rolled(x.codes, f"{h}.codes")
    g.bind(op, rolled(x.name, h), x.scale, codes, x.zero_point)


def pad_onnx(g, op):
    """Pad with zeros (its default constant): code 0 on the codes tensor (its zero point where it stores int8
    codes as uint8), 0.0 on the float one."""
    pads = [int(pair[0]) for pair in op.attrs["pads"]] + [int(pair[1]) for pair in op.attrs["pads"]]
    pads = g.const(np.asarray(pads, np.int64), f"{op.output}.pads", "INT64")
    x = g.value(op.inputs[0])
    zero = [pads, g.const(np.asarray(x.zero_point), f"{op.output}.zp", "UINT8")] if x.codes and x.zero_point \
        else None
    _layout_onnx(g, op, "Pad", [pads], codes_extra=zero)


def crop_onnx(g, op):
    """x[..., start:stop, ...] along each axis: Slice."""
    i64 = _i64(g, op.output)
    _layout_onnx(g, op, "Slice", [i64(op.attrs[k], k) for k in ("starts", "stops", "axes")])


def take_onnx(g, op):
    """x.select(axis, index): a Gather of a scalar index (the axis dropped)."""
    index = g.const(np.asarray(int(op.attrs["index"]), np.int64), f"{op.output}.index", "INT64")
    _layout_onnx(g, op, "Gather", [index], axis=int(op.attrs["axis"]))


def constant_onnx(g, op):
    """The constant's codes times its scale (a float32 initializer of shape (1, ...)), Expanded to the batch of
    the value it reads (Shape of its axis 0)."""
    x, h = g.value(op.inputs[0]), op.output
    value = np.asarray(op.consts["value"], np.int64)
    scale = g.out_scale(op)
    real = g.const(value.astype(np.float32) * np.asarray(scale, np.float32), f"{h}.value")
    shape = g.node("Shape", [x.name], f"{h}.batch", start=0, end=1)
    if value.ndim > 1:
        shape = g.node("Concat", [shape, g.const(np.ones(value.ndim - 1, np.int64), f"{h}.ones", "INT64")],
                       f"{h}.shape", axis=0)
    g.bind(op, g.node("Expand", [real, shape], h), scale)


def matmul_onnx(g, op):
    """The exact form: a float64 MatMul of the operands' codes (exact: |a b| K <= 2^31, far below 2^53), its
    accumulator the output's codes. (MatMulInteger would be the integer op, but onnxruntime's u8s8 kernels on
    AVX2 without VNNI may saturate pairs of products to int16.) The fused form: MatMul of the dequantized
    operands, which runtimes fuse with the Q/DQ pairs around it (QLinearMatMul)."""
    a, b, h = g.value(op.inputs[0]), g.value(op.inputs[1]), op.output
    scale = g.out_scale(op)
    if g.form != "exact":
        g.bind(op, g.node("MatMul", [a.name, b.name], h), scale)
        return
    acc = g.node("MatMul", [g.codes(a, f"{h}.a", to=11), g.codes(b, f"{h}.b", to=11)], f"{h}.acc")
    y = g.node("Cast", [acc], f"{h}.float", to=1)
    g.bind(op, g.node("Mul", [y, g.const(scale, f"{h}.scale")], h), scale, acc)


def softmax_onnx(g, op):
    """The exact form: the integer softmax of `ops.softmax` in int64 over the last axis. Nonnegative quantities
    (-d m + 2^(s-1), u, the exponent's shift of p > 0, e R) shift right by Div, whose truncation is their floor;
    the Horner steps, whose products are negative, by `QdqGraph.floor_div`; p >> min(u >> F, 31) divides by a
    Gather of 2^0 .. 2^31; R = 2^62 // E is a Div of positives. Then the uint8 codes' DequantizeLinear at 2^-8.
    The fused form: float Softmax, then a QuantizeLinear at 2^-8 (round half to even, saturating at 255)."""
    from hawq_ray.ops.softmax import FRACTION, ONE, OUT_HI, OUT_SHIFT, POLY, RECIP_BITS
    x, h = g.value(op.inputs[0]), op.output
    if g.form != "exact":
        g.quantize(op, g.node("Softmax", [x.name], f"{h}.float", axis=-1), 0, OUT_HI)
        return
    i64 = _i64(g, h)
    m, s = int(np.asarray(op.consts["multiplier"])), int(np.asarray(op.consts["shift"]))
    if m <= 0 or not 1 <= s <= 62:
        raise HawqError(f"ONNX export: softmax {h!r} with multiplier {m}, shift {s}; valid: m > 0, 1 <= s <= 62")
    q = g.codes(x, f"{h}.in")
    axes = i64([-1], "axes")
    neg = g.node("Sub", [g.node("ReduceMax", [q, axes], f"{h}.max", keepdims=1), q], f"{h}.neg")    # -d >= 0
    u = g.node("Add", [g.node("Mul", [neg, i64(m, "m")], f"{h}.dm"), i64(1 << (s - 1), "half")], f"{h}.dm_half")
    u = g.node("Div", [u, i64(1 << s, "pow_s")], f"{h}.u")
    one_f = i64(1 << FRACTION, "pow_f")
    whole = g.node("Div", [u, one_f], f"{h}.whole")                                              # u >> F
    f = g.node("Sub", [u, g.node("Mul", [whole, one_f], f"{h}.whole_f")], f"{h}.f")           # u & (2^F - 1)
    c1, c2, c3 = POLY
    p = i64(c3, "c3")
    for i, coef in enumerate((c2, c1, ONE)):
        t = g.floor_div(g.node("Mul", [p, f], f"{h}.pf{i}"), one_f, f"{h}.horner{i}")
        p = g.node("Add", [i64(coef, f"c{i}"), t], f"{h}.p{i}")
    k = g.node("Min", [whole, i64(31, "k_max")], f"{h}.k")
    pow_k = g.node("Gather", [i64(np.int64(1) << np.arange(32, dtype=np.int64), "pow_table"), k], f"{h}.pow_k",
                   axis=0)
    e = g.node("Div", [p, pow_k], f"{h}.e")                           # p in [2^28.99, 2^30]: positive
    total = g.node("ReduceSum", [e, axes], f"{h}.sum", keepdims=1)    # >= 2^30: the maximum's e
    recip = g.node("Div", [i64(1 << RECIP_BITS, "two_r"), total], f"{h}.recip")
    y = g.node("Add", [g.node("Mul", [e, recip], f"{h}.er"), i64(1 << (OUT_SHIFT - 1), "out_half")], f"{h}.er_half")
    y = g.node("Min", [g.node("Div", [y, i64(1 << OUT_SHIFT, "out_pow")], f"{h}.out"), i64(OUT_HI, "hi")],
               f"{h}.clamp")
    codes = g.node("Cast", [y], f"{h}.codes", to=2)                                           # 2: UINT8
    g.bind(op, g.dequantize(codes, op.scale, h, "UINT8"), g.out_scale(op), codes)


CONVERTERS = {"conv2d": conv2d_onnx, "dense": dense_onnx, "requantize": requantize_onnx, "affine": affine_onnx,
              "relu": relu_onnx, "clamp": clamp_onnx, "lookup": lookup_onnx, "mul": mul_onnx, "add": add_onnx,
              "concat": concat_onnx, "channel_shuffle": shuffle_onnx, "slice": slice_onnx,
              "channel_gather": gather_onnx, "resize": resize_onnx,
              "flatten": flatten_onnx, "sum_pool2d": sum_pool_onnx, "max_pool2d": max_pool_onnx,
              "layer_norm": layer_norm_onnx, "reshape": reshape_onnx, "permute": permute_onnx, "roll": roll_onnx,
              "pad": pad_onnx, "crop": crop_onnx, "take": take_onnx, "constant": constant_onnx, "matmul": matmul_onnx,
              "softmax": softmax_onnx}
