"""Integer-only softmax over the last axis (graph node and program op `softmax`): attention's probabilities.
A softmax over another axis after the batch (resnesta's and sknet's over the radix or the branches) is the op
between two permutes, the axis moved last and back.

The logits (q k^T, an INT32 product at scale S_q S_k, times the attention scale, plus any bias) are requantized
to 16 bits on a static scale S_in (an activation point): the exponential needs that resolution (8-bit logits
would put every probability below e^-(range / 256) on one code). Then, per row of the last axis, with integers
only (int64; `>>` floors):

    d = x - max(x)                            <= 0, |d| < 2^16
    u = (-d * m + 2^(s-1)) >> s               m / 2^s ~ S_in log2(e) 2^F, F = 16: u ~ -d S_in log2(e) in 2^-F
    e = P(u mod 2^F) >> min(u >> F, 31)       2^(-u / 2^F) 2^30: the integer part a shift, the fraction P
    P(f) = 2^30 + (f (c1 + (f (c2 + (f c3 >> F)) >> F)) >> F)     Horner, c = (-742613259, 248458840, -42811508)
    E = sum e;  R = 2^62 // E                 the one reciprocal per row (E >= 2^30: the maximum has e = 2^30)
    out = min((e R + 2^53) >> 54, 255)        = round(256 e / E): unsigned 8-bit codes at scale 2^-8

P fits 2^-f on [0, 1) in Q30 with a relative error below 1.8e-4 (`tests/test_softmax.py` holds every f to numpy),
exp(z) = 2^(z log2 e) is I-BERT's range reduction by ln 2 with a cubic instead of its quadratic, and the output
error is at most half a code plus that relative error of a probability. Bounds: |d m| < 2^16 2^31; |acc f| < 2^31
2^16 in Horner; E <= T 2^30 < 2^63 for T <= 2^32 keys; e R <= 2^30 2^62 / 2^30. R = 2^62 // E is an integer
division of positives, once per row: on hardware without a divider it is Newton's iteration on E's normalized
mantissa with a final correction (multiplies, shifts and compares), the same integer.

In QAT the forward values are the integers', the gradient is float softmax's (straight-through).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hawq_ray.contract import HawqError
from hawq_ray.ops.registry import HANDLED, GraphNode, ProgramOp, register_ops
from hawq_ray.program.dyadic import dyadic
from hawq_ray.quant.values import WIDE_BITS, V, np_scale, ste

FRACTION = 16                     # F: fraction bits of the exponent in base 2
ONE = 1 << 30                     # P(0): e of the row's maximum
POLY = (-742613259, 248458840, -42811508)    # c1, c2, c3 of P, Q30
RECIP_BITS = 62                   # R = 2^62 // E
OUT_SHIFT = 54                    # out = round(e R / 2^54) = round(256 e / E)
OUT_HI = 255
OUT_SCALE = 2.0 ** -8
INPUT_LO, INPUT_HI = -(1 << 15), (1 << 15) - 1
LOG2E = 1.4426950408889634

SEMANTICS = f"""inputs [x] int16 codes, softmax over the last axis; consts multiplier m (int32 > 0), shift s (int32,
1..62), per tensor; in int64 per row: d = x - max(x); u = (-d * m + 2^(s-1)) >> s; f = u & (2^{FRACTION} - 1);
p = c3; p = c2 + ((p * f) >> {FRACTION}); p = c1 + ((p * f) >> {FRACTION}); p = 2^30 + ((p * f) >> {FRACTION}) with
(c1, c2, c3) = {POLY}; e = p >> min(u >> {FRACTION}, 31); E = sum e; R = 2^{RECIP_BITS} // E;
out = min((e * R + 2^{OUT_SHIFT - 1}) >> {OUT_SHIFT}, {OUT_HI}): unsigned codes at scale 2^-8."""


def _convert_softmax(tracer, n, m):
    if m is not None:
        dim = m.dim
    else:
        dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else None)
    rank = len(tracer.shape(n.args[0]))
    if dim is None or dim % rank == 0:
        tracer.unsupported(f"softmax at {n.name!r}{tracer.inside(n)} over dim {dim}",
                           "softmax (over an axis after the batch)")
    if dim % rank == rank - 1:
        return tracer.node(n, "softmax", [n.args[0]])
    # over another axis (resnesta's radix, sknet's branches): permuted to the last, and back
    from hawq_ray.ops.layout import per_channel_source
    dim %= rank
    there = tuple(d for d in range(rank) if d != dim) + (dim,)
    back = tuple(there.index(d) for d in range(rank))
    moved = tracer.make(f"{n.name}.last", "permute", [tracer.src(n.args[0])],
                        attrs={"dims": there, "wide": per_channel_source(tracer, n.args[0])})
    tracer.make(f"{n.name}.softmax", "softmax", [moved.name])
    tracer.make(n.name, "permute", [f"{n.name}.softmax"], attrs={"dims": back, "wide": False})
    return HANDLED


def exponent_constants(s_in: float) -> dict:
    m, s = dyadic(np.float64(s_in * LOG2E * 2.0 ** FRACTION))
    return {"multiplier": np.asarray(m, np.int32), "shift": np.asarray(s, np.int32)}


def integer_softmax(x: torch.Tensor, m: int, s: int) -> torch.Tensor:
    """The op's integers (module docstring), over the last axis of int16 codes x."""
    x = x.to(torch.int64)
    d = x - x.amax(-1, keepdim=True)
    u = (-d * m + (1 << (s - 1))) >> s
    f = u & ((1 << FRACTION) - 1)
    c1, c2, c3 = POLY
    p = c2 + ((c3 * f) >> FRACTION)
    p = c1 + ((p * f) >> FRACTION)
    p = ONE + ((p * f) >> FRACTION)
    e = p >> torch.clamp(u >> FRACTION, max=31)
    recip = torch.div(torch.full_like(e[..., :1], 1 << RECIP_BITS), e.sum(-1, keepdim=True), rounding_mode="floor")
    return torch.clamp((e * recip + (1 << (OUT_SHIFT - 1))) >> OUT_SHIFT, max=OUT_HI)


def execute_softmax(op, ins):
    x = ins[0]
    if x.numel() and (int(x.min()) < INPUT_LO or int(x.max()) > INPUT_HI):
        raise HawqError(f"{op.output}: softmax input outside int16; requantize the logits to 16 bits first")
    return integer_softmax(x, int(op.consts["multiplier"]), int(op.consts["shift"]))


def softmax_range(op, ins):
    lo, hi = ins[0]
    if lo < INPUT_LO or hi > INPUT_HI:
        raise HawqError(f"{op.output}: softmax input range [{lo}, {hi}] exceeds int16; requantize it first")
    return 0, OUT_HI


def softmax_step(qm, node, ins):
    if qm.mode == "fp32":
        return V(None, None, torch.softmax(ins[0].r, -1), node.name)
    x = qm.act_point(ins[0], f"in:{node.name}", WIDE_BITS, signed=True, name=f"{node.name}.in")
    s = torch.tensor(OUT_SCALE, dtype=torch.float64, device=x.device)
    if qm.mode == "fake":
        p = torch.softmax(x.r, -1)
        q = torch.floor(p.detach().to(torch.float64) / OUT_SCALE + 0.5).clamp_(0, OUT_HI)
        return V(None, s, ste(p, q * OUT_SCALE), node.name, 0, OUT_HI)
    consts = exponent_constants(float(x.s))
    q = integer_softmax(x.q, int(consts["multiplier"]), int(consts["shift"]))
    qm.emit("softmax", [x.name], node.name, consts=consts, scale=np_scale(s), lo=0, hi=OUT_HI)
    real = qm.lazy(x, lambda t: torch.softmax(t, -1))
    return V(q, s, qm.real(real, q, s), node.name, 0, OUT_HI)


register_ops(
    GraphNode("softmax", softmax_step, modules=(nn.Softmax,), functions=(torch.softmax, F.softmax),
              methods=("softmax",), convert=_convert_softmax, nonneg=lambda ins: True,
              observers=lambda node, input_name: [f"in:{node.name}"], supported="softmax (any axis after the batch)",
              aten={torch.ops.aten.softmax.int: torch.softmax}),
    ProgramOp("softmax", SEMANTICS, execute_softmax, softmax_range),
)
