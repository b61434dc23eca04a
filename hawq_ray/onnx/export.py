"""ONNX export of an IntegerProgram (`export_onnx`) and its check in onnxruntime against the integer executor
(`check_onnx`, `check_values`).

The graph is built by `qdq.QdqGraph` (the forms and the tensors: its docstring), one op at a time by the op's
entry in `converters.CONVERTERS`, over the program's ops after the rewrites both forms share: each requantize
reading a max pool moved before it (`program.rewrites`, exact, as in the TVM planner) and every requantize
written right after its producer, so equal Q/DQ pairs are written once. Nothing here imports TVM.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from hawq_ray.contract import HawqError
from hawq_ray.onnx.converters import CONVERTERS
from hawq_ray.onnx.qdq import INPUT, OPSET, OUTPUT, QdqGraph, Tensor
from hawq_ray.ops import check_ops
from hawq_ray.program.executor import run_program
from hawq_ray.program.rewrites import requantize_before_max_pool


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


def program_shapes(program, batch: int = 1) -> dict:
    """Every value's shape for a batch of `batch` (the integer executor on a zero input)."""
    import torch
    _, values = run_program(program, torch.zeros(batch, *program.input_shape, dtype=torch.int8), record=True)
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
    check_ops(program.ops)
    path = Path(path)
    ops = requantizes_first(requantize_before_max_pool(program.ops, program.output,
                                                       {op.output for op in program.ops}))
    g = QdqGraph(program, ops, program_shapes(replace(program, ops=ops)), int4_weights, form)
    g._names.update({INPUT, OUTPUT})
    s_in = np.asarray(program.input_scale, np.float64)
    stored, zero = g.storage("INT8")       # the input's int8 codes, stored as every int8 activation of the form
    zp = g.const(np.asarray(zero, np.int64), "input.zp", stored)
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
                                          codes, zero)
    for op in ops:       # each requantize reading a max pool moved before it (exact): quantized at the layer
        if op.op not in CONVERTERS:
            raise HawqError(f"ONNX export: no converter for integer op {op.op!r} ({op.output!r})")
        CONVERTERS[op.op](g, op)
    g.nodes.append(g.helper.make_node("Identity", [g.value(program.output).name], [OUTPUT], name=OUTPUT))
    taps = []
    if every_value:      # each value's dims, "N" at the axis that grows with the batch (a permute may move it)
        two = program_shapes(replace(program, ops=ops), batch=2)
        for op in ops:
            t = g.values[op.output]
            name = g.unclamped[op.output]() if op.output in g.unclamped else t.name    # a clamp left to its readers
            dims = ["N" if a != b else a for a, b in zip(g.shape(op.output), two[op.output])]
            taps.append((g.node("Div", [name, g.const(t.scale, f"codes:{op.output}.scale")], f"codes:{op.output}"),
                         dims))
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
