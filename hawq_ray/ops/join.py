"""Residual add and channel concatenation (graph nodes `add`, `cat`; program ops `add`, `concat`).

Each branch is requantized to the output's scale on its own before the add (Appendix F) or the concat
(Appendix E, eq. 18): integer-only hardware cannot add first and requantize once. The output's scale has
16-bit resolution (HAWQ's quant_act_int32), and each branch's requantize clamps to the signed 16-bit range,
so a branch that is stored between kernels (a residual read by the next block's conv) is an INT16 tensor,
not an INT32 one; the sum of two branches is an INT32 value, requantized where it is consumed.
"""
from __future__ import annotations

import operator

import torch

from hawq_ray.ops.registry import GraphNode, ProgramOp, register_ops
from hawq_ray.program.dyadic import requantize
from hawq_ray.quant.quantizers import activation_scale, signed_range
from hawq_ray.quant.values import WIDE_BITS, V, absmax, dyadic_consts, np_scale, ste

ADD = "inputs [a, b]; out = a + b (each branch was requantized to the output scale before it, Appendix F)."
CONCAT = "inputs [...]; attrs axis (1: channels); out = the inputs concatenated along axis (each branch was " \
         "requantized to the output scale before it, eq. 18)."


def _convert_add(tracer, n, m):
    if len(n.args) != 2 or n.kwargs:
        return None
    return tracer.node(n, "add", list(n.args))


def _convert_cat(tracer, n, m):
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    if dim != 1:
        tracer.unsupported(f"torch.cat at {n.name!r} along dim {dim}", "cat (only dim=1)")
    return tracer.node(n, "cat", list(n.args[0]))


def join_step(qm, node, ins):
    add = node.kind == "add"
    need = qm.mode != "qat" or qm.needs_real() or any(v._r is not None for v in ins)
    real = (ins[0].r + ins[1].r if add else torch.cat([v.r for v in ins], 1)) if need else None
    if qm.mode == "fp32":
        return V(None, None, real, node.name)
    scale = activation_scale(qm.observe(f"out:{node.name}", absmax(real) if qm.observing else None),
                             WIDE_BITS, signed=True)
    s = torch.tensor(scale, dtype=torch.float64, device=ins[0].device)
    if qm.mode == "fake":  # eq. 20/21: accumulate in float, then requantize once
        q = torch.floor(real.detach().to(torch.float64) / scale + 0.5)
        return V(None, s, ste(real, q * scale), node.name)
    parts, names = [], []
    lo, hi = signed_range(WIDE_BITS)
    for i, v in enumerate(ins):
        b, c = qm.dyadic(v.s / scale, v.r.dim())
        parts.append(requantize(v.q, b, c, lo, hi))
        names.append(qm.emit("requantize", [v.name], f"{node.name}.b{i}", consts=dyadic_consts(b, c),
                             attrs={"lo": lo, "hi": hi}, scale=np_scale(s)))
    q = parts[0] + parts[1] if add else torch.cat(parts, 1)
    qm.emit("add" if add else "concat", names, node.name, scale=np_scale(s), attrs={} if add else {"axis": 1})
    return V(q, s, None if real is None else qm.exact_real(real, lambda: q * scale), node.name)


def _out_key(node, input_name):
    return [f"out:{node.name}"]


register_ops(
    GraphNode("add", join_step, functions=(operator.add, torch.add, operator.iadd), methods=("add",),
              convert=_convert_add, nonneg=all, observers=_out_key, supported="add"),
    GraphNode("cat", join_step, functions=(torch.cat,), convert=_convert_cat, nonneg=all, observers=_out_key,
              supported="cat (channels)"),
    ProgramOp("add", ADD, lambda op, ins: ins[0].to(torch.int64) + ins[1].to(torch.int64),
              lambda op, r: (r[0][0] + r[1][0], r[0][1] + r[1][1]), elementwise=True, binary=True),
    ProgramOp("concat", CONCAT, lambda op, ins: torch.cat([t.to(torch.int64) for t in ins], op.attrs.get("axis", 1)),
              lambda op, r: (min(x[0] for x in r), max(x[1] for x in r))),
)
