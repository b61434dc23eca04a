"""ONNX export of an IntegerProgram in QDQ form, and its check in onnxruntime.

The exported graph computes in float between QuantizeLinear / DequantizeLinear pairs, the form ONNX Runtime,
TensorRT, OpenVINO and NPU toolchains consume: every program value is a float tensor equal to its integer
codes times its real scale. Weights are per-channel symmetric DequantizeLinear initializers (int8, or int8
storage of 4-bit codes, or ONNX INT4 with `int4_weights`), biases INT32 at S_x S_w, every 8-bit activation
point a Q/DQ pair at its calibrated static scale (a Max/Min where 4-bit), lookup tables a Gather over the
input codes. Two forms (`form`):

- "exact" computes the program's own arithmetic: each requantize (and affine) recovers its input's integer
  codes (round(x / S): a float32 conv of integer-valued operands is within far less than a half of its
  integer accumulator), applies b / 2^c and rounds half up in float64 (exact), then the Q/DQ pair holds
  those codes; the last dense is a float64 Gemm of the codes. In onnxruntime it agrees with the integer
  executor on every element on the models measured; its convs run in float.
- "fused" writes what runtimes fuse into integer kernels: a Q/DQ pair of the float conv output at the
  output scale (QuantizeLinear divides by a float scale and rounds half to even, so a code moves by one near a
  rounding tie), and each residual / concat branch of the program (a 16-bit integer, clamped, in the program) on 8
  bits: a branch from a layer quantized over the sum's 16-bit range, a branch that is a value some layer
  reads at 8 bits that quantization of it, an 8-bit value itself. That is the graph onnxruntime's own
  quantizer writes, and its CPU kernels run every conv on integers; it is further from the program.

Each op's converter is its `ProgramOp.onnx` entry in `hawq_ray.ops` (`(QdqGraph, Op) -> None`).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

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
    scale: np.ndarray            # float64; () per tensor, (C, 1, 1) or (C,) per channel
    codes: str | None = None     # the integer tensor of its QuantizeLinear, when it has one


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
        self.eight_bit = {}     # program value -> its 8-bit Q/DQ (a requantize's output) when it has one
        self.branch_values = residual_branches(ops)

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

    def bind(self, op, name: str, scale, codes: str | None = None) -> None:
        self.values[op.output] = Tensor(name, np.asarray(scale, np.float64), codes)

    def dequantize(self, codes_name: str, scale, hint: str, qtype: str, axis: int = 1) -> str:
        """DequantizeLinear of integer codes at a per-tensor scale or per-channel scales along `axis`."""
        scale = np.asarray(scale, np.float64)
        per_axis = scale.size > 1
        s = self.const(scale.reshape(-1) if per_axis else scale.reshape(()), f"{hint}.scale")
        z = self.const(np.zeros(scale.size if per_axis else (), np.int64), f"{hint}.zp", qtype)
        return self.node("DequantizeLinear", [codes_name, s, z], f"{hint}.dq", **({"axis": axis} if per_axis else {}))

    def codes(self, t: Tensor, hint: str) -> str:
        """t's integer codes as an int64 tensor: its QuantizeLinear's output, else round(t / scale)."""
        if t.codes is None:
            q = self.node("Round", [self.node("Div", [t.name, self.const(t.scale, f"{hint}.scale")], f"{hint}.div")],
                          f"{hint}.round")
        else:
            q = t.codes
        return self.node("Cast", [q], f"{hint}.codes", to=7)          # 7: TensorProto.INT64

    @staticmethod
    def narrowest(lo: int, hi: int) -> str:
        """The narrowest 8-bit ONNX type holding [lo, hi]; INT32 (for DequantizeLinear only) else."""
        return next((n for n, a, b in _QTYPES if a <= lo and hi <= b), "INT32")

    def out_scale(self, op) -> np.ndarray:
        """op's output scale from the program's metadata (per tensor, or one per channel) in the broadcast
        shape of its value: () or (C, 1, 1) or (C,)."""
        s = np.asarray(op.scale, np.float64)
        return s.reshape(()) if s.size == 1 else s.reshape(-1, *([1] * (len(self.shape(op.output)) - 2)))

    def qdq(self, x: str, scale, qtype: str, hint: str) -> tuple:
        """QuantizeLinear then DequantizeLinear of x at a per-tensor scale or per-channel scales (axis 1):
        (the float name, the codes name). A pair equal to one written before is that one (two layers reading
        a value at the same bits and scale read one quantization of it, which a runtime can then fuse into
        the value's producer)."""
        scale = np.asarray(scale, np.float64)
        key = (x, scale.astype(np.float32).tobytes(), qtype)
        if key not in self._pairs:
            per_axis = scale.size > 1
            s = self.const(scale.reshape(-1) if per_axis else scale.reshape(()), f"{hint}.scale")
            z = self.const(np.zeros(scale.size if per_axis else (), np.int64), f"{hint}.zp", qtype)
            axis = {"axis": 1} if per_axis else {}
            codes = self.node("QuantizeLinear", [x, s, z], f"{hint}.q", **axis)
            self._pairs[key] = (self.node("DequantizeLinear", [codes, s, z], f"{hint}.dq", **axis), codes)
        return self._pairs[key]

    def rounds_in_float(self, op, lo: int, hi: int) -> bool:
        """Whether op's output (of range [lo, hi]) is computed by `integer_requantize`: always in the exact
        form; in the fused form, where it is wider than 8 bits and not a branch."""
        return self.form == "exact" or (self.narrowest(lo, hi) == "INT32" and op.output not in self.branch_values)

    def integer_requantize(self, op, x: Tensor, ratio: np.ndarray, lo: int, hi: int, bias=None) -> None:
        """The program's requantize (or affine, with `bias`) itself, for the exact form or a value wider than
        8 bits: the input's integer codes (round(x / S_x): exact while |codes| < 2^22), plus the bias, times
        b / 2^c in float64 (exact: 22 + 31 bits), floor(. + 1/2), the clamp, times S_out. An 8-bit output then
        takes a Q/DQ pair at S_out, which holds those codes exactly."""
        hint = op.output
        q = self.node("Round", [self.node("Div", [x.name, self.const(x.scale, f"{hint}.in_scale")], f"{hint}.div")],
                      f"{hint}.codes")
        q = self.node("Cast", [q], f"{hint}.double", to=11)                # 11: TensorProto.DOUBLE
        if bias is not None:
            q = self.node("Add", [q, self.const(bias, f"{hint}.bias", "DOUBLE")], f"{hint}.biased")
        y = self.node("Mul", [q, self.const(ratio, f"{hint}.ratio", "DOUBLE")], f"{hint}.mul")
        y = self.node("Floor", [self.node("Add", [y, self.const(0.5, f"{hint}.half", "DOUBLE")], f"{hint}.add")],
                      f"{hint}.floor")
        if (lo, hi) != (INT32_MIN, INT32_MAX):
            y = self.node("Clip", [y, self.const(float(lo), f"{hint}.lo", "DOUBLE"),
                                   self.const(float(hi), f"{hint}.hi", "DOUBLE")], f"{hint}.clip")
        scale = self.out_scale(op)
        y = self.node("Cast", [y], f"{hint}.float", to=1)                  # 1: TensorProto.FLOAT
        y = self.node("Mul", [y, self.const(scale, f"{hint}.scale")], f"{hint}.real")
        qtype = self.narrowest(lo, hi)
        if qtype == "INT32":
            self.bind(op, y, scale)
        else:
            name, codes = self.qdq(y, scale, qtype, op.output)
            self.bind(op, name, scale, codes)

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

    def weight(self, op, x: Tensor) -> tuple:
        """The weight and bias of a conv2d / dense reading x: per-output-channel symmetric weight codes and the
        INT32 bias at S_x S_w (eq. 17), each through a DequantizeLinear on axis 0. Returns the two float tensor
        names and the accumulator's scale S_x S_w per output channel."""
        s_w, s_b = self.layer_scales(op, x)
        bits = int(op.attrs.get("w_bits", 8))
        qtype = "INT4" if self.int4_weights and bits <= 4 else "INT8"
        doc = f"{bits}-bit weight codes in [{-(2 ** (bits - 1) - 1)}, {2 ** (bits - 1) - 1}]" + \
            ("" if qtype == "INT4" or bits == 8 else ", stored as int8")
        w = self.dequantize(self.const(op.consts["weight"], f"{op.output}.weight", qtype, doc), s_w,
                            f"{op.output}.weight", qtype, axis=0)
        b = self.dequantize(self.const(op.consts["bias"], f"{op.output}.bias", "INT32"), s_b,
                            f"{op.output}.bias", "INT32", axis=0)
        return w, b, s_b.astype(np.float64)


def residual_branches(ops: list) -> set:
    """The values an add or a concat reads, and the values max pooled into them (a requantize moved before a
    max pool keeps reading as a branch)."""
    out = {i for op in ops if op.op in ("add", "concat") for i in op.inputs}
    for op in reversed(ops):
        if op.op == "max_pool2d" and op.output in out:
            out.add(op.inputs[0])
    return out


def requantizes_first(ops: list) -> list:
    """The ops with each requantize moved up to just after its input's producer (a valid order: it reads
    nothing else), so that a value's 8-bit requantize is written before the branches that reuse it."""
    by_input: dict = {}
    for op in ops:
        if op.op == "requantize":
            by_input.setdefault(op.inputs[0], []).append(op)
    out, placed = [], set()

    def emit(op):
        out.append(op)
        placed.add(id(op))
        for r in by_input.get(op.output, []):
            emit(r)
    produced = {o.output for o in ops}
    for op in ops:
        if op.op == "requantize" and op.inputs[0] not in produced:
            emit(op)           # reads the program input
    for op in ops:
        if id(op) not in placed:
            emit(op)
    return out


def program_shapes(program) -> dict:
    """Every value's shape for a batch of one (the integer executor on a zero input)."""
    import torch
    from hawq_ray.program.executor import run_program
    _, values = run_program(program, torch.zeros(1, *program.input_shape, dtype=torch.int8), record=True)
    return {k: tuple(v.shape) for k, v in values.items()}


def export_onnx(program, path, metadata: dict | None = None, int4_weights: bool = False, form: str = "exact",
                every_value: bool = False):
    """Write `program` as an ONNX QDQ model to `path` (checked by onnx.checker in full); returns the model.

    The graph reads a float image batch `input` (N, C, H, W) and returns the float logits `logits`; the
    model's metadata entry `hawq_ray` holds the bit config, the input scale, the branch form and `metadata`.
    With `every_value`, the graph also returns each program value as its codes (float tensor / scale), named
    `codes:<value>`, for `check_values`."""
    import onnx
    from onnx import TensorProto
    from importlib.metadata import version
    from hawq_ray.ops import program_op
    path = Path(path)
    from hawq_ray.deploy.graph import requantize_before_max_pool
    ops = requantizes_first(requantize_before_max_pool(program.ops, program.output,
                                                       {op.output for op in program.ops}, False))
    g = QdqGraph(program, ops, program_shapes(replace(program, ops=ops)), int4_weights, form)
    g._names.update({INPUT, OUTPUT})
    s_in = np.asarray(program.input_scale, np.float64)
    zp = g.const(np.zeros((), np.int64), "input.zp", "INT8")
    scale_in = g.const(s_in, "input.scale")
    x = INPUT
    if form == "exact":      # the program's quantize_input: floor(x / S + 1/2) in float64, clamped
        q = g.node("Div", [g.node("Cast", [INPUT], "input.double", to=11), g.const(s_in, "input.s64", "DOUBLE")],
                   "input.div")
        q = g.node("Floor", [g.node("Add", [q, g.const(0.5, "input.half", "DOUBLE")], "input.add")], "input.floor")
        q = g.node("Clip", [q, g.const(-128.0, "input.lo", "DOUBLE"), g.const(127.0, "input.hi", "DOUBLE")],
                   "input.clip")
        x = g.node("Mul", [g.node("Cast", [q], "input.float", to=1), scale_in], "input.real")
    codes = g.node("QuantizeLinear", [x, scale_in, zp], "input.q")
    g.values[program.input_name] = Tensor(g.node("DequantizeLinear", [codes, scale_in, zp], "input.dq"), s_in,
                                          codes)
    for op in ops:       # each requantize reading a max pool moved before it (exact): quantized at the layer
        convert = program_op(op.op).onnx
        if convert is None:
            raise HawqError(f"ONNX export: no converter for integer op {op.op!r} ({op.output!r})")
        convert(g, op)
    g.nodes.append(g.helper.make_node("Identity", [g.value(program.output).name], [OUTPUT], name=OUTPUT))
    taps = []
    if every_value:
        for op in ops:
            t = g.values[op.output]
            taps.append((g.node("Div", [t.name, g.const(t.scale, f"codes:{op.output}.scale")], f"codes:{op.output}"),
                         ["N", *g.shape(op.output)[1:]]))
    c, h, w = program.input_shape
    classes = g.shape(program.output)[1]
    graph = g.helper.make_graph(
        g.nodes, "hawq_ray", [g.helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", c, h, w])],
        [g.helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", classes])]
        + [g.helper.make_tensor_value_info(t, TensorProto.FLOAT, dims) for t, dims in taps], g.initializers)
    model = g.helper.make_model(graph, opset_imports=[g.helper.make_opsetid("", 21 if int4_weights else OPSET)],
                                producer_name="hawq-ray", producer_version=version("hawq-ray"))
    model.ir_version = 10
    meta = {"version": version("hawq-ray"), "bits": program.bits, "input_scale": float(program.input_scale),
            "input": "float image batch (N, C, H, W); QuantizeLinear to int8 at input_scale",
            "output": "float logits (N, classes)", "weights_4bit": "INT4" if int4_weights else "int8 storage", "form": form,
            **(metadata or {})}
    onnx.helper.set_model_props(model, {"hawq_ray": json.dumps(meta)})
    onnx.checker.check_model(model, full_check=True)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(model, str(path))
    except OSError as e:
        raise HawqError(f"cannot write the ONNX model to {path}: {e.strerror or e}") from None
    return model


def onnx_session(path, threads: int | None = None):
    import os
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or os.cpu_count() or 1
    opts.log_severity_level = 3          # errors only: the optimizer's notes are not the user's business
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def check_values(path, program, x) -> list:
    """For a model exported with `every_value`: per program value, how many elements of its codes in
    onnxruntime differ from the integer executor's on the float batch x, and by how much at most (codes
    beyond 2^24, such as large logit accumulators, count as equal within float32's precision)."""
    import torch
    from hawq_ray.program.executor import run_program
    sess = onnx_session(path)
    names = [o.name for o in sess.get_outputs() if o.name.startswith("codes:")]
    x = torch.as_tensor(x, dtype=torch.float32)
    got = dict(zip(names, sess.run(names, {INPUT: x.numpy()})))
    _, want = run_program(program, program.quantize_input(x), record=True)
    kinds = {op.output: op.op for op in program.ops}
    rows = []
    for name in names:
        value = name[len("codes:"):]
        if value not in want:        # a value of the export's own (a requantize moved before a max pool)
            continue
        w = want[value].numpy().astype(np.float64)
        d = np.abs(np.rint(got[name].astype(np.float64)) - w)
        d[d <= np.abs(w) * 2.0 ** -21] = 0       # a float32 tensor holds codes beyond 2^24 to its precision only
        rows.append({"value": value, "op": kinds[value], "elements": int(d.size), "differing": int((d > 0).sum()),
                     "max_diff": float(d.max())})
    return rows


def check_onnx(path, program, batches) -> dict:
    """Run the exported model in onnxruntime and the integer executor on the same float batches.

    Returns the top-1 agreement, the largest and mean absolute logit difference in units of the output
    scale (one unit = one step of the program's INT32 logits), and the largest as a fraction of the largest
    logit magnitude."""
    import torch
    from hawq_ray.program.executor import run_program
    sess = onnx_session(path)
    scale = np.asarray(program.output_scale, np.float64)
    agree = total = 0
    worst, diff_sum, elements, peak = 0.0, 0.0, 0, 0.0
    for x in batches:
        x = torch.as_tensor(x, dtype=torch.float32)
        got = sess.run([OUTPUT], {INPUT: x.numpy()})[0].astype(np.float64)
        want = run_program(program, program.quantize_input(x)).numpy().astype(np.float64)
        units = np.abs(np.rint(got / scale) - want)         # the float32 logits hold the codes times the scale
        agree += int((got.argmax(1) == (want * scale).argmax(1)).sum())     # the program's prediction: its
        # dequantized logits (per-class scales), as the pipeline's integer-executor top-1 counts it
        total += len(x)
        worst = max(worst, float(units.max()))
        peak = max(peak, float(np.abs(want).max()))
        diff_sum += float(units.sum())
        elements += units.size
    if not total:
        raise HawqError("check_onnx: no input batches")
    return {"samples": total, "top1_agreement": agree / total, "max_logit_diff_units": round(worst, 3),
            "mean_logit_diff_units": round(diff_sum / elements, 4),
            "max_logit_diff_rel": round(worst / peak, 6) if peak else 0.0}
