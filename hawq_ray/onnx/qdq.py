"""The ONNX QDQ graph of an IntegerProgram under construction (`QdqGraph`): what the per-op converters
(`converters.CONVERTERS`) read and write. `export.py` drives it and checks the result in onnxruntime.

The exported graph computes in float between QuantizeLinear / DequantizeLinear pairs, the form ONNX Runtime,
TensorRT, OpenVINO and NPU toolchains consume: every program value is a float tensor equal to its integer
codes times its real scale. Weights are per-channel symmetric DequantizeLinear initializers (int8, or int8
storage of 4-bit codes, or ONNX INT4 with `int4_weights`), biases INT32 at S_x S_w, every 8-bit activation
point a Q/DQ pair at its calibrated static scale (a Max/Min where 4-bit), lookup tables a Gather over the
input codes. Two forms (`form`):

- "exact" computes the program's own arithmetic: each requantize (and affine) recovers its input's integer
  codes (round(x / S): a float32 conv of integer-valued operands is within far less than a half of its
  integer accumulator), applies b / 2^c and rounds half up in float64 where that is exact over the input's
  sound range, in int64 where it is not (a product over K = 768), then the Q/DQ pair holds those codes; a
  dense and a matmul are float64 Gemm / MatMul of the codes, whose accumulators travel as the values' codes
  tensors (`Tensor.codes`, moved along by the layout ops); softmax and layer_norm are their int64 integer
  arithmetic. In onnxruntime it agrees with the integer executor on every element on the models measured
  (CNNs and vision transformers); its convs run in float.
- "fused" writes what runtimes fuse into integer kernels: a Q/DQ pair of the float conv output at the
  output scale (QuantizeLinear divides by a float scale and rounds half to even, so a code moves by one near a
  rounding tie), and each residual / concat branch of the program (a 16-bit integer, clamped, in the program) on 8
  bits: a branch from a layer quantized over the sum's 16-bit range, a branch that is a value some layer
  reads at 8 bits that quantization of it, an 8-bit value itself. That is the graph onnxruntime's own
  quantizer writes, and its CPU kernels run every conv with an 8-bit output on integers; it is further
  from the program. As that quantizer's, its activations are all uint8: int8 codes stored at zero point 128
  (the same values), so a conv's input and output have one type, which onnxruntime's fusion requires; and a
  clamp whose readers' QuantizeLinear saturates at or inside its bounds (a ReLU6 ahead of a calibrated
  range) is left to them instead of a Max / Min between the conv and its QuantizeLinear, which onnxruntime
  does not fuse. A transformer's matmuls are MatMuls of dequantized operands (QLinearMatMul once fused); its
  Softmax and LayerNormalization (an uncentered one, RMSNorm: x / rms(x) in float ops) run in float, the
  softmax's uint8 output quantized at 2^-8.

This module imports neither onnx nor torch at the top (onnx inside the graph's methods): the CLI reads
`FORMS` from it at start-up.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hawq_ray.contract import HawqError
from hawq_ray.program.program import INT32_MAX, INT32_MIN

OPSET = 19   # QuantizeLinear / DequantizeLinear with per-axis scales; INT4 weights need 21
INPUT, OUTPUT = "input", "logits"
# the two forms of the graph (module docstring)
FORMS = ("exact", "fused")
WIDE_BITS = 16
# ONNX integer types of activation Q/DQ (8-bit: every runtime has them at opset 19), narrowest first
_QTYPES = (("UINT8", 0, 255), ("INT8", -128, 127))


@dataclass
class Tensor:
    """The ONNX tensor that stands for a program value: float, equal to codes * scale."""
    name: str
    scale: np.ndarray            # float64; () per tensor, (C, 1, 1) or (C,) per channel, (1, 1, C) per feature
    codes: str | None = None     # a tensor of its integer codes, when the graph has one: its QuantizeLinear's
    # output (8-bit), or in the exact form a dense / matmul accumulator computed exactly (float64 holding
    # integers: a float32 tensor of codes times scale holds them to its precision only beyond 2^24), and the
    # layout ops' moves of those
    zero_point: int = 0          # what `codes` holds for code 0: 128 for the fused form's int8 codes stored as
    # uint8 (`QdqGraph.qdq`); `QdqGraph.codes` subtracts it


class QdqGraph:
    """The graph under construction: what the per-op converters read (`value`, `shape`) and write."""

    def __init__(self, program, ops: list, shapes: dict, int4_weights: bool = False, form: str = "exact"):
        from onnx import helper
        if form not in FORMS:
            raise HawqError(f"ONNX export: form {form!r}; valid: {', '.join(FORMS)}")
        self.helper, self.program, self.shapes = helper, program, shapes
        self.int4_weights, self.form = int4_weights, form
        self.nodes, self.initializers, self.values, self._names = [], [], {}, set()
        self._pairs = {}        # (float tensor, scale, type) -> its Q/DQ pair
        self._zero_points = {}  # a QuantizeLinear's output -> its zero point, where not 0
        self.unclamped = {}     # a clamp the fused form leaves to its readers' saturation -> its clamped value,
        # written only on request (`clamped`: the export's `every_value` taps)
        self.eight_bit = {}     # program value -> its 8-bit Q/DQ (a requantize's output) when it has one
        self.branch_values = residual_branches(ops)
        self.readers = {}       # program value -> the ops reading it
        for op in ops:
            for name in op.inputs:
                self.readers.setdefault(name, []).append(op)
        self.ranges = sound_ranges(program, ops)

    # ---- reading
    def value(self, name: str) -> Tensor:
        return self.values[name]

    def shape(self, name: str) -> tuple:
        """The value's shape for a batch of one."""
        return self.shapes[name]

    def per_tensor(self, op, t: Tensor) -> float:
        if np.size(t.scale) != 1:
            raise HawqError(f"ONNX export: {op.op} {op.output!r} reads a per-channel scale; it needs one scale")
        return float(np.asarray(t.scale).reshape(()))

    # ---- writing
    def fresh(self, hint: str) -> str:
        name, i = hint, 1
        while name in self._names:
            name, i = f"{hint}_{i}", i + 1
        self._names.add(name)
        return name

    def const(self, array, hint: str, dtype: str | None = None, doc: str = "") -> str:
        """An initializer: float32 unless an ONNX integer type is named."""
        from onnx import TensorProto
        name = self.fresh(hint)
        a = np.asarray(array)
        if dtype is None:
            a, dtype = a.astype(np.float32), "FLOAT"
        kind = {"FLOAT": np.float32, "DOUBLE": np.float64}.get(dtype, np.int64)
        t = self.helper.make_tensor(name, getattr(TensorProto, dtype), a.shape, a.reshape(-1).astype(kind).tolist())
        if doc:
            t.doc_string = doc
        self.initializers.append(t)
        return name

    def node(self, op_type: str, inputs: list, hint: str, outputs: int = 1, **attrs):
        names = [self.fresh(hint if i == 0 else f"{hint}_{i}") for i in range(outputs)]
        self.nodes.append(self.helper.make_node(op_type, inputs, names, name=names[0], **attrs))
        return names[0] if outputs == 1 else names

    def bind(self, op, name: str, scale, codes: str | None = None, zero_point: int | None = None) -> None:
        """op's output: the float tensor `name` at `scale`, and its integer codes tensor where it has one (whose
        zero point is the QuantizeLinear's that wrote it unless given: a layout op moving codes passes its
        input's)."""
        if zero_point is None:
            zero_point = self._zero_points.get(codes, 0)
        self.values[op.output] = Tensor(name, np.asarray(scale, np.float64), codes, int(zero_point))

    def storage(self, qtype: str) -> tuple:
        """(the ONNX type, the zero point) that codes of `qtype` are stored with: the fused form stores int8
        codes as uint8 at zero point 128 (`qdq`), as onnxruntime's own quantizer stores activations."""
        return ("UINT8", 128) if self.form == "fused" and qtype == "INT8" else (qtype, 0)

    def dequantize(self, codes_name: str, scale, hint: str, qtype: str, axis: int = 1) -> str:
        """DequantizeLinear of integer codes at a per-tensor scale or per-channel scales along `axis`."""
        scale = np.asarray(scale, np.float64)
        per_axis = scale.size > 1
        s = self.const(scale.reshape(-1) if per_axis else scale.reshape(()), f"{hint}.scale")
        z = self.const(np.zeros(scale.size if per_axis else (), np.int64), f"{hint}.zp", qtype)
        return self.node("DequantizeLinear", [codes_name, s, z], f"{hint}.dq", **({"axis": axis} if per_axis else {}))

    def codes(self, t: Tensor, hint: str, to: int = 7) -> str:
        """t's integer codes as an int64 tensor (`to`: another ONNX type, 11 DOUBLE): its codes tensor where it
        has one, else round(t / scale) (exact while |codes| < 2^22: float32's rounding of codes x scale and of
        the division stay far below a half)."""
        if t.codes is None:
            q = self.node("Round", [self.node("Div", [t.name, self.const(t.scale, f"{hint}.scale")], f"{hint}.div")],
                          f"{hint}.round")
        else:
            q = t.codes
        q = self.node("Cast", [q], f"{hint}.codes", to=to)            # 7: TensorProto.INT64
        if t.codes is not None and t.zero_point:      # uint8 storage of int8 codes: code + 128
            dtype = {1: "FLOAT", 7: "INT64", 11: "DOUBLE"}[to]
            q = self.node("Sub", [q, self.const(np.asarray(t.zero_point), f"{hint}.zp", dtype)], f"{hint}.signed")
        return q

    @staticmethod
    def narrowest(lo: int, hi: int) -> str:
        """The narrowest 8-bit ONNX type holding [lo, hi]; INT32 (for DequantizeLinear only) else."""
        return next((n for n, a, b in _QTYPES if a <= lo and hi <= b), "INT32")

    def out_scale(self, op) -> np.ndarray:
        """op's output scale from the program's metadata (per tensor, or one per channel) in the broadcast
        shape of its value: () or (C, 1, 1) or (C,) (one per channel on axis 1), or as the program writes it
        where that is a broadcast shape already ((1, 1, C): one per feature of tokens)."""
        s = np.asarray(op.scale, np.float64)
        if s.size == 1:
            return s.reshape(())
        return s if s.ndim > 1 else s.reshape(-1, *([1] * (len(self.shape(op.output)) - 2)))

    def qdq(self, x: str, scale, qtype: str, hint: str) -> tuple:
        """QuantizeLinear then DequantizeLinear of x at a per-tensor scale or per-channel scales (axis 1):
        (the float name, the codes name). A pair equal to one written before is that one (two layers reading
        a value at the same bits and scale read one quantization of it, which a runtime can then fuse into
        the value's producer).

        The fused form stores int8 codes as uint8 with zero point 128 (the same values: saturate(round(x / S)
        + 128) - 128 = saturate to [-128, 127] of round(x / S)), so that every activation is uint8, as
        onnxruntime's own quantizer writes them: its QDQ fusion takes a conv only where its input and output
        have one type, and its int8 -> uint8 rewrite of a Q/DQ pair only where the Q has one reader, which a
        branch (a residual's) does not."""
        scale = np.asarray(scale, np.float64)
        key = (x, scale.astype(np.float32).tobytes(), qtype)
        if key not in self._pairs:
            per_axis = scale.size > 1
            stored, zero = self.storage(qtype)
            s = self.const(scale.reshape(-1) if per_axis else scale.reshape(()), f"{hint}.scale")
            z = self.const(np.full(scale.size if per_axis else (), zero, np.int64), f"{hint}.zp", stored)
            axis = {"axis": 1} if per_axis else {}
            codes = self.node("QuantizeLinear", [x, s, z], f"{hint}.q", **axis)
            if zero:
                self._zero_points[codes] = zero
            self._pairs[key] = (self.node("DequantizeLinear", [codes, s, z], f"{hint}.dq", **axis), codes)
        return self._pairs[key]

    def rounds_in_float(self, op, lo: int, hi: int) -> bool:
        """Whether op's output (of range [lo, hi]) is computed by `integer_requantize`: always in the exact
        form; in the fused form, where it is wider than 8 bits and not a branch."""
        return self.form == "exact" or (self.narrowest(lo, hi) == "INT32" and op.output not in self.branch_values)

    def integer_requantize(self, op, x: Tensor, ratio: np.ndarray, lo: int, hi: int, bias=None,
                           negative=None) -> None:
        """The program's requantize (or affine, with `bias`, and `negative`: the ratio where the biased codes are
        below 0) itself, for the exact form or a value wider than 8 bits: the input's integer codes (its codes
        tensor where it has one, else round(x / S_x): exact while |codes| < 2^22), plus the bias, times b / 2^c in
        float64, floor(. + 1/2), the clamp, times S_out; in int64 instead where float64 would round
        (`float64_exact`). An 8-bit output then takes a Q/DQ pair at S_out, which holds those codes exactly."""
        hint = op.output
        if not self.float64_exact(op, bias):
            self.int64_requantize(op, x, lo, hi, bias)
            return
        q = self.codes(x, f"{hint}.in", to=11)                             # 11: TensorProto.DOUBLE
        if bias is not None:
            q = self.node("Add", [q, self.const(bias, f"{hint}.bias", "DOUBLE")], f"{hint}.biased")
        r = self.const(ratio, f"{hint}.ratio", "DOUBLE")
        if negative is not None:
            below = self.node("Less", [q, self.const(0.0, f"{hint}.zero", "DOUBLE")], f"{hint}.below")
            r = self.node("Where", [below, self.const(negative, f"{hint}.negative", "DOUBLE"), r], f"{hint}.r")
        y = self.node("Mul", [q, r], f"{hint}.mul")
        y = self.node("Floor", [self.node("Add", [y, self.const(0.5, f"{hint}.half", "DOUBLE")], f"{hint}.add")],
                      f"{hint}.floor")
        if (lo, hi) != (INT32_MIN, INT32_MAX):
            y = self.node("Clip", [y, self.const(float(lo), f"{hint}.lo", "DOUBLE"),
                                   self.const(float(hi), f"{hint}.hi", "DOUBLE")], f"{hint}.clip")
        self._bind_codes(op, y, lo, hi)

    def _bind_codes(self, op, y: str, lo: int, hi: int) -> None:
        """Bind op's output from its integer codes y (a float64 or int64 tensor): times S_out in float32, and
        an 8-bit output through a Q/DQ pair at S_out, which holds those codes exactly."""
        hint = op.output
        scale = self.out_scale(op)
        y = self.node("Cast", [y], f"{hint}.float", to=1)                  # 1: TensorProto.FLOAT
        y = self.node("Mul", [y, self.const(scale, f"{hint}.scale")], f"{hint}.real")
        qtype = self.narrowest(lo, hi)
        if qtype == "INT32":
            self.bind(op, y, scale)
        else:
            name, codes = self.qdq(y, scale, qtype, op.output)
            self.bind(op, name, scale, codes)

    def float64_exact(self, op, bias=None) -> bool:
        """Whether a requantize (affine with `bias`) of op's input is exact in float64: |z + bias| b + 2^(c-1)
        below 2^53 over the input's sound range (`program.ranges`), else `int64_requantize` computes it. A
        matmul over K = 768 of 8-bit codes (|z| up to 2^24.6) times a 31-bit b is not."""
        lo, hi = self.ranges.get(op.inputs[0], (INT32_MIN, INT32_MAX))
        b = np.abs(np.asarray(op.consts["multiplier"], np.int64))
        if "negative" in op.consts:
            b = np.maximum(b, np.abs(np.asarray(op.consts["negative"], np.int64)))
        c = np.asarray(op.consts["shift"], np.int64)
        bound = max(abs(lo), abs(hi)) + (0 if bias is None else int(np.abs(np.asarray(bias)).max()))
        return bound * int(b.max()) + 2 ** (int(c.max()) - 1) < 2 ** 53

    def int64_requantize(self, op, x: Tensor, lo: int, hi: int, bias=None) -> None:
        """The requantize (affine with `bias`) in int64, as the executor computes it: ((z + bias) b + 2^(c-1))
        >> c (b the affine's `negative` multiplier where z + bias < 0), the arithmetic shift as floor(a / 2^c) =
        (a - Mod(a, 2^c)) / 2^c (ONNX BitShift is for unsigned types, and Div of integers truncates toward zero),
        then Max / Min."""
        hint = op.output
        b = np.asarray(op.consts["multiplier"], np.int64)
        c = np.asarray(op.consts["shift"], np.int64)
        z = self.codes(x, f"{hint}.in")
        if bias is not None:
            z = self.node("Add", [z, self.const(np.asarray(bias, np.int64), f"{hint}.bias", "INT64")],
                          f"{hint}.biased")
        m = self.const(b, f"{hint}.mult", "INT64")
        if "negative" in op.consts:
            below = self.node("Less", [z, self.const(np.int64(0), f"{hint}.zero", "INT64")], f"{hint}.below")
            m = self.node("Where", [below, self.const(np.asarray(op.consts["negative"], np.int64),
                                                      f"{hint}.negative", "INT64"), m], f"{hint}.m")
        z = self.node("Mul", [z, m], f"{hint}.mul")
        z = self.node("Add", [z, self.const(np.int64(1) << (c - 1), f"{hint}.half", "INT64")], f"{hint}.add")
        y = self.floor_div(z, np.int64(1) << c, f"{hint}.shift")
        y = self.node("Max", [y, self.const(np.int64(lo), f"{hint}.lo", "INT64")], f"{hint}.max")
        y = self.node("Min", [y, self.const(np.int64(hi), f"{hint}.hi", "INT64")], f"{hint}.min")
        self._bind_codes(op, y, lo, hi)

    def floor_div(self, a: str, divisor, hint: str) -> str:
        """floor(a / d) of an int64 tensor a by a positive int64 d (an array, or the name of an int64 tensor),
        exactly: (a - Mod(a, d)) / d, Mod of integers taking the divisor's sign (fmod=0), so the division is
        exact and its truncation harmless (onnxruntime's Div of int64 truncates toward zero: -7 / 2 = -3)."""
        d = divisor if isinstance(divisor, str) else self.const(np.asarray(divisor, np.int64), f"{hint}.pow", "INT64")
        rest = self.node("Sub", [a, self.node("Mod", [a, d], f"{hint}.mod", fmod=0)], f"{hint}.sub")
        return self.node("Div", [rest, d], f"{hint}.div")

    def quantize(self, op, x: str, lo: int, hi: int) -> None:
        """The fused form: bind op's output (not `rounds_in_float`) as the float tensor x quantized at op's scale
        and clamped to [lo, hi]: a Q/DQ pair in the narrowest 8-bit type of the range, with a Max/Min where the
        range is narrower than the type; or, for a residual / concat branch, on 8 bits."""
        scale = self.out_scale(op)
        qtype = self.narrowest(lo, hi)
        if qtype == "INT32":      # a branch on 8 bits: the float tensor stays the real value, at the nominal scale
            source = self.values[op.inputs[0]]
            if x == source.name and source.codes is not None:       # 8 bits already: the value itself
                name = x
            elif x == source.name and op.inputs[0] in self.eight_bit:  # its 8-bit requantize, read once more
                name = self.eight_bit[op.inputs[0]]
            else:                                     # a layer's output: the sum's 16-bit range on 8 bits
                name, _ = self.qdq(x, scale * (2 ** (WIDE_BITS - 1) - 1) / 127, "INT8", op.output)
            self.bind(op, name, scale)
            return
        full = (lo, hi) == next((a, b) for n, a, b in _QTYPES if n == qtype)
        if not full:
            x = self.node("Max", [x, self.const(lo * scale, f"{op.output}.lo")], f"{op.output}.max")
            x = self.node("Min", [x, self.const(hi * scale, f"{op.output}.hi")], f"{op.output}.min")
        name, codes = self.qdq(x, scale, qtype, op.output)
        if full and x == self.values[op.inputs[0]].name:
            self.eight_bit.setdefault(op.inputs[0], name)
        self.bind(op, name, scale, codes)

    def layer_scales(self, op, x: Tensor) -> tuple:
        """S_w per output channel and S_b = S_x S_w, in float32 as a runtime fusing an integer conv checks it."""
        s_x = np.float32(self.per_tensor(op, x))
        s_w = (np.asarray(op.scale, np.float64).reshape(-1) / float(s_x)).astype(np.float32)
        return s_w, s_x * s_w

    def weight(self, op, x: Tensor, transpose: bool = False) -> tuple:
        """The weight and bias of a conv2d / dense reading x: per-output-channel symmetric weight codes and the
        INT32 bias at S_x S_w (eq. 17), each through a DequantizeLinear on axis 0 (with `transpose`, a dense's
        weight stored (I, O), dequantized on axis 1: a MatMul's right operand). Returns the two float tensor
        names and the accumulator's scale S_x S_w per output channel."""
        s_w, s_b = self.layer_scales(op, x)
        bits = int(op.attrs.get("w_bits", 8))
        qtype = "INT4" if self.int4_weights and bits <= 4 else "INT8"
        doc = f"{bits}-bit weight codes in [{-(2 ** (bits - 1) - 1)}, {2 ** (bits - 1) - 1}]" + \
            ("" if qtype == "INT4" or bits == 8 else ", stored as int8")
        codes = np.asarray(op.consts["weight"])
        w = self.dequantize(self.const(codes.T if transpose else codes, f"{op.output}.weight", qtype, doc), s_w,
                            f"{op.output}.weight", qtype, axis=1 if transpose else 0)
        b = self.dequantize(self.const(op.consts["bias"], f"{op.output}.bias", "INT32"), s_b,
                            f"{op.output}.bias", "INT32", axis=0)
        return w, b, s_b.astype(np.float64)


def sound_ranges(program, ops: list) -> dict:
    """Each value's sound integer range (`program.ranges`: interval arithmetic within the declared ranges);
    empty where the analysis refuses the program (then every requantize takes the int64 path)."""
    from hawq_ray.program.ranges import narrow_ranges
    try:
        out = {op.output: (op.lo, op.hi) for op in narrow_ranges(program, ops)}
    except (HawqError, ValueError, KeyError, TypeError):    # a range rule refusing a value: no bounds (the
        return {}                                          # int64 path then, exact whatever the magnitudes)
    out[program.input_name] = (-128, 127)
    return out


def residual_branches(ops: list) -> set:
    """The values an add or a concat reads, and the values max pooled into them (a requantize moved before a
    max pool keeps reading as a branch)."""
    out = {i for op in ops if op.op in ("add", "concat") for i in op.inputs}
    for op in reversed(ops):
        if op.op == "max_pool2d" and op.output in out:
            out.add(op.inputs[0])
    return out

