"""The element-wise product of two quantized tensors (graph node `mul`, program op `mul`): squeeze-excite's
gate times its input.

Each operand is requantized to 8 bits on its own static scale (an activation point, as in front of a layer),
so the product of the codes is exact in INT32 (|a b| < 2^16) at scale S_a S_b; whoever reads it requantizes
it, as after a conv. The gate (N, C, 1, 1) broadcasts over the input's H and W; the program puts the larger
operand first.

A parameter times a value (ConvNeXt's layer scale, `gamma * x`) is a per-channel affine instead: the program op
`affine` of `ops.batchnorm`, with a signed dyadic multiplier per channel onto a static 16-bit output scale; a
layer's INT32 output (one scale per feature) is requantized to 16 bits on one static scale first.
"""
from __future__ import annotations

import operator

import numpy as np
import torch

from hawq_ray.contract import HawqError
from hawq_ray.ops.batchnorm import integer_affine
from hawq_ray.ops.registry import GraphNode, ProgramOp, register_ops
from hawq_ray.program.dyadic import dyadic
from hawq_ray.quant.quantizers import signed_range
from hawq_ray.quant.values import WIDE_BITS, V, np_scale

SEMANTICS = """inputs [a, b] (b's shape broadcasts against a's: equal, or 1 in H and W); out = a * b."""
MUL_BITS = 8


def _convert_mul(tracer, n, m):
    if len(n.args) != 2 or n.kwargs or not all(tracer.is_tensor(a) for a in n.args):
        return None                   # a product with a number: `ops.matmul`'s scale
    constants = [tracer.by_name[tracer.src(a)].kind == "constant" for a in n.args]
    if all(constants):
        return None
    value = tracer.by_name[tracer.src(n.args[constants.index(False)])]
    return tracer.node(n, "mul", list(n.args),
                       attrs={"constants": constants, "wide": any(constants) and value.kind in ("conv", "linear")})


def _times_constant(qm, node, v: V, gamma: torch.Tensor) -> V:
    """x * gamma for a parameter gamma (ConvNeXt's layer scale): a per-channel affine with a signed dyadic
    multiplier onto a static 16-bit output scale, like a BN no conv precedes (`ops.batchnorm`)."""
    if qm.mode != "fp32" and node.attrs.get("wide"):     # a layer's output (BEiT's, CaiT's gamma * attn(x)):
        v = qm.act_point(v, f"in:{node.name}", WIDE_BITS, signed=True, name=f"{node.name}.in")   # one scale first
    real = v.r * gamma if (qm.mode != "qat" or qm.needs_real()) else None
    if qm.mode == "fp32":
        return V(None, None, real, node.name)
    if v.s.dim() > 0:
        raise HawqError(f"{node.name}: a parameter times a value with one scale per channel; valid: a value "
                        "requantized to one scale (after a permute, a LayerNorm, an add)")
    s = qm.wide_output(node, real, v.device)
    if qm.mode == "fake":
        return qm.fake_output(real, s, node.name)
    scale, (lo, hi) = float(s), signed_range(WIDE_BITS)
    g = gamma.detach().to(torch.float64)
    while g.dim() >= v.q.dim():             # (1, C, 1, 1) -> (C, 1, 1): the batch axis is broadcast
        g = g.squeeze(0)
    g = torch.where(g == 0, torch.full_like(g, 1e-30), g)
    b, c = dyadic((g.abs() * v.s / scale).cpu().numpy())
    mult = torch.from_numpy(b) * torch.sign(g).cpu().to(torch.int64)
    consts = [torch.zeros_like(mult), mult, torch.from_numpy(c)]
    q = integer_affine(v.q, *(t.to(v.q.device) for t in consts), lo, hi)
    qm.emit("affine", [v.name], node.name, scale=np_scale(s), lo=lo, hi=hi, attrs={"lo": lo, "hi": hi},
            consts={k: t.numpy().astype(np.int32) for k, t in zip(("bias", "multiplier", "shift"), consts)})
    return V(q, s, None if real is None else qm.exact_real(real, lambda: q * scale), node.name, lo, hi)


def _shape(v: V):
    return tuple((v.q if v.q is not None else v.r).shape)


def mul_step(qm, node, ins):
    constants = node.attrs.get("constants", [False, False])
    if any(constants):
        return _times_constant(qm, node, ins[constants.index(False)], ins[constants.index(True)].r)
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
    qm.emit("mul", [a.name, _spread_channel(qm, node, a, b)], node.name, scale=np_scale(s), lo=min(corners),
            hi=max(corners))
    real = a.r * b.r if qm.needs_real() else None
    return V(q, s, qm.real(real, q, s), node.name, min(corners), max(corners))


def _spread_channel(qm, node, a: V, b: V) -> str:
    """The program value of operand b; a map's one channel (N, 1, H, W) times a map of C channels (CBAM's spatial
    gate) is gathered C times first (`channel_gather`, the copy BAM's `expand_as` makes): the program's product
    broadcasts b over H and W only (the compiled kernel reads b's channels lane by lane)."""
    if a.q.dim() != 4 or b.q.shape[1] != 1 or a.q.shape[1] == 1:
        return b.name
    index = np.zeros(a.q.shape[1], np.int32)
    return qm.emit("channel_gather", [b.name], f"{node.name}.spread", consts={"index": index},
                   scale=np_scale(b.s), lo=b.lo, hi=b.hi)


def mul_range(op, r):
    corners = [x * y for x in r[0] for y in r[1]]
    return min(corners), max(corners)


def _mul_observers(node, input_name):
    if any(node.attrs.get("constants", ())):
        return [f"in:{node.name}"] * bool(node.attrs.get("wide")) + [f"out:{node.name}"]
    return [f"in:{node.name}.0", f"in:{node.name}.1"]


register_ops(
    GraphNode("mul", mul_step, functions=(operator.mul, torch.mul), methods=("mul",), convert=_convert_mul,
              nonneg=all, observers=_mul_observers, supported="mul (two tensors)",
              aten={torch.ops.aten.mul.Tensor: operator.mul, torch.ops.aten.mul_.Tensor: operator.mul}),
    ProgramOp("mul", SEMANTICS, lambda op, ins: ins[0].to(torch.int64) * ins[1].to(torch.int64), mul_range,
              elementwise=True, binary=True, broadcast=True),
)
