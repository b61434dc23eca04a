"""ReLU (graph node and program op `relu`): max(x, 0) on the integers, which keep their scale."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hawq_ray.ops.registry import GraphNode, ProgramOp, register_ops
from hawq_ray.quant.values import V, np_scale

SEMANTICS = "inputs [x]; out = max(x, 0)."


def _convert_relu(tracer, n, m):
    return tracer.node(n, "relu", [n.args[0]])


def relu_step(qm, node, ins):
    v = ins[0]
    q = v.q.clamp_min(0) if v.q is not None else None
    name = qm.emit("relu", [v.name], node.name, scale=np_scale(v.s), lo=max(v.lo, 0), hi=v.hi)
    r = F.relu(v.r) if q is None else qm.lazy(v, F.relu)
    return V(q, v.s, r, name, max(v.lo, 0), v.hi)


register_ops(
    GraphNode("relu", relu_step, modules=(nn.ReLU,), functions=(torch.relu, F.relu), methods=("relu",),
              convert=_convert_relu, nonneg=lambda ins: True, supported="ReLU",
              aten={torch.ops.aten.relu.default: torch.relu, torch.ops.aten.relu_.default: torch.relu}),
    ProgramOp("relu", SEMANTICS, lambda op, ins: ins[0].clamp_min(0), lambda op, r: (max(r[0][0], 0), max(r[0][1], 0)),
              elementwise=True, channelwise=lambda op: True),
)
