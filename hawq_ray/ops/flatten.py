"""Flatten (graph node and program op `flatten`): (N, C, H, W) -> (N, C*H*W) in NCHW order, the integers and
their scales unchanged (a per-channel scale repeats over the H*W positions of its channel)."""
from __future__ import annotations

import torch
from torch import nn

from hawq_ray.ops.registry import GraphNode, ProgramOp, register_ops
from hawq_ray.quant.values import V, np_scale

SEMANTICS = "inputs [x]; out = x.reshape(N, -1)."


def _convert_flatten(tracer, n, m):
    if m is not None:
        ok = m.start_dim == 1 and m.end_dim == -1
    elif n.op == "call_method" and n.target in ("view", "reshape"):
        ok = len(n.args) == 3 and n.args[2] == -1
    else:                       # torch.flatten(x, 1) / x.flatten(start_dim=1[, end_dim=-1])
        names = ("start_dim", "end_dim")
        dims = [n.kwargs.get(k, a) for k, a in zip(names, list(n.args[1:3]) + [0, -1][len(n.args[1:3]):])]
        ok = tuple(dims) == (1, -1)
    return tracer.node(n, "flatten", [n.args[0]]) if ok else None


def flatten_step(qm, node, ins):
    v = ins[0]
    s = v.s
    if s is not None and s.dim() == 1 and v.r.dim() == 4 and v.r.shape[2] * v.r.shape[3] > 1:
        s = s.repeat_interleave(v.r.shape[2] * v.r.shape[3])
    q = v.q.flatten(1) if v.q is not None else None
    name = qm.emit("flatten", [v.name], node.name, scale=np_scale(s), lo=v.lo, hi=v.hi)
    r = v.r.flatten(1) if q is None else qm.lazy(v, lambda t: t.flatten(1))
    return V(q, s, r, name, v.lo, v.hi)


register_ops(
    GraphNode("flatten", flatten_step, modules=(nn.Flatten,), functions=(torch.flatten,), methods=("flatten", "view", "reshape"),
              convert=_convert_flatten, nonneg=all, supported="flatten/view(N, -1)",
              aten={torch.ops.aten.flatten.using_ints: torch.flatten}),
    ProgramOp("flatten", SEMANTICS, lambda op, ins: ins[0].reshape(ins[0].shape[0], -1), lambda op, r: r[0]),
)
