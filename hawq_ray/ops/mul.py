"""The element-wise product of two quantized tensors (graph node `mul`, program op `mul`): squeeze-excite's
gate times its input.

Each operand is requantized to 8 bits on its own static scale (an activation point, as in front of a layer),
so the product of the codes is exact in INT32 (|a b| < 2^16) at scale S_a S_b; whoever reads it requantizes
it, as after a conv. The gate (N, C, 1, 1) broadcasts over the input's H and W; the program puts the larger
operand first.
"""
from __future__ import annotations

import operator

import torch

from hawq_ray.ops.registry import GraphNode, ProgramOp, register_ops
from hawq_ray.quant.values import V, np_scale

SEMANTICS = """inputs [a, b] (b's shape broadcasts against a's: equal, or 1 in H and W); out = a * b."""
MUL_BITS = 8


def _convert_mul(tracer, n, m):
    if len(n.args) != 2 or n.kwargs or not all(tracer.is_tensor(a) for a in n.args):
        return None                   # a product with a constant: no integer form here
    return tracer.node(n, "mul", list(n.args))


def _shape(v: V):
    return tuple((v.q if v.q is not None else v.r).shape)


def mul_step(qm, node, ins):
    order = [0, 1] if _shape(ins[0]) == torch.broadcast_shapes(_shape(ins[0]), _shape(ins[1])) else [1, 0]
    if qm.mode == "fp32":
        return V(None, None, ins[0].r * ins[1].r, node.name)
    a, b = (qm.act_point(ins[i], f"in:{node.name}.{i}", MUL_BITS, signed=not qm.nonneg(node.inputs[i]),
                         name=f"{node.name}.in{i}") for i in order)
    s = a.s * b.s
    if qm.mode == "fake":
        return V(None, s, a.r * b.r, node.name)
    q = a.q * b.q
    corners = [x * y for x in (a.lo, a.hi) for y in (b.lo, b.hi)]
    qm.emit("mul", [a.name, b.name], node.name, scale=np_scale(s), lo=min(corners), hi=max(corners))
    real = a.r * b.r if qm.needs_real() else None
    return V(q, s, qm.real(real, q, s), node.name, min(corners), max(corners))


def mul_range(op, r):
    corners = [x * y for x in r[0] for y in r[1]]
    return min(corners), max(corners)


def _mul_observers(node, input_name):
    return [f"in:{node.name}.0", f"in:{node.name}.1"]


register_ops(
    GraphNode("mul", mul_step, functions=(operator.mul, torch.mul), methods=("mul",), convert=_convert_mul,
              nonneg=all, observers=_mul_observers, supported="mul (two tensors)"),
    ProgramOp("mul", SEMANTICS, lambda op, ins: ins[0].to(torch.int64) * ins[1].to(torch.int64), mul_range,
              elementwise=True, binary=True, broadcast=True),
)
