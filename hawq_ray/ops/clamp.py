"""Clamps (graph node `clamp`, program op `clamp`): ReLU6, Hardtanh and torch.clamp as integer clamps.

A real clamp to [a, b] of a value with integers q at scale s is the integer clamp of q to
[ceil(a / s), floor(b / s)] (per channel where s is): the real bounds on the integer grid, with no float at
inference. ReLU6 on a conv's INT32 accumulator becomes clamp(z, 0, floor(6 / S_acc_c)).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hawq_ray.ops.registry import GraphNode, ProgramOp, register_ops

aten = torch.ops.aten
from hawq_ray.program.program import INT32_MAX, INT32_MIN
from hawq_ray.quant.values import V, channel_view, np_scale

SEMANTICS = """inputs [x]; consts lo, hi (int32, of one shape that broadcasts against the output: () per tensor,
(C, 1, 1) per channel, (C,) per feature); out = min(max(x, lo), hi)."""


def _bounds(n, m):
    """The real bounds (a, b) of a clamp call; None where the call has none."""
    if m is not None:
        return (0.0, 6.0) if isinstance(m, nn.ReLU6) else (float(m.min_val), float(m.max_val))
    if n.target is F.relu6:
        return 0.0, 6.0
    names = ("min_val", "max_val") if n.target is F.hardtanh else ("min", "max")
    defaults = (-1.0, 1.0) if n.target is F.hardtanh else (None, None)
    args = list(n.args[1:3]) + [None] * (2 - len(n.args[1:3]))
    return tuple(n.kwargs.get(k, a if a is not None else d) for k, a, d in zip(names, args, defaults))


def _convert_clamp(tracer, n, m):
    a, b = _bounds(n, m)
    if any(v is not None and not isinstance(v, (int, float)) for v in (a, b)):
        return None                   # tensor bounds: not a clamp to constants
    return tracer.node(n, "clamp", [n.args[0]], attrs={"lo": a, "hi": b}, nonneg=a is not None and a >= 0)


def clamp_step(qm, node, ins):
    v = ins[0]
    a, b = node.attrs["lo"], node.attrs["hi"]
    real = qm.lazy(v, lambda t: torch.clamp(t, a, b)) if qm.mode == "qat" else torch.clamp(v.r, a, b)
    if qm.mode != "qat":
        return V(None, v.s, real, node.name)
    s = v.s.to(torch.float64)
    lo = torch.full_like(s, INT32_MIN) if a is None else torch.ceil(a / s).clamp(INT32_MIN, INT32_MAX)
    hi = torch.full_like(s, INT32_MAX) if b is None else torch.floor(b / s).clamp(INT32_MIN, INT32_MAX)
    lo, hi = channel_view(lo.to(torch.int64), v.q.dim()), channel_view(hi.to(torch.int64), v.q.dim())
    q = torch.minimum(torch.maximum(v.q, lo), hi)
    out_lo, out_hi = clamp_value_range_of(lo.cpu().numpy(), hi.cpu().numpy(), (v.lo, v.hi))
    name = qm.emit("clamp", [v.name], node.name, scale=np_scale(v.s), lo=out_lo, hi=out_hi,
                   consts={"lo": lo.cpu().numpy().astype(np.int32), "hi": hi.cpu().numpy().astype(np.int32)})
    return V(q, v.s, qm.real(real, q, v.s), name, out_lo, out_hi)


def clamp_value_range_of(lo: np.ndarray, hi: np.ndarray, r: tuple) -> tuple:
    """The exact range of min(max(x, lo_c), hi_c) over every channel c, for x in [r0, r1]."""
    lo, hi = np.asarray(lo, np.int64), np.asarray(hi, np.int64)
    return (int(np.minimum(np.maximum(r[0], lo), hi).min()), int(np.minimum(np.maximum(r[1], lo), hi).max()))


def execute_clamp(op, ins):
    lo = torch.as_tensor(op.consts["lo"], dtype=torch.int64)
    hi = torch.as_tensor(op.consts["hi"], dtype=torch.int64)
    return torch.minimum(torch.maximum(ins[0].to(torch.int64), lo), hi)


def clamp_channelwise(op) -> bool:
    return all(np.size(c) == 1 or (np.ndim(c) >= 3 and np.shape(c)[-2:] == (1, 1)) for c in op.consts.values())


register_ops(
    GraphNode("clamp", clamp_step, modules=(nn.ReLU6, nn.Hardtanh), functions=(F.relu6, F.hardtanh, torch.clamp,
              torch.clip), methods=("clamp", "clip"), convert=_convert_clamp,
              nonneg=all, supported="ReLU6, Hardtanh, clamp",
              aten={aten.relu6.default: F.relu6, aten.hardtanh.default: F.hardtanh, aten.hardtanh_.default: F.hardtanh,
                    aten.clamp.default: torch.clamp, aten.clip.default: torch.clip}),
    ProgramOp("clamp", SEMANTICS, execute_clamp,
              lambda op, r: clamp_value_range_of(op.consts["lo"], op.consts["hi"], r[0]),
              elementwise=True, channelwise=clamp_channelwise),
)
