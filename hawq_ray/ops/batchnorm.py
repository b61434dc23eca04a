"""A BatchNorm2d that no conv precedes (graph node `batchnorm`, program op `affine`): DenseNet's pre-activation
BN, a BN on a concatenation or a residual sum; a BatchNorm1d on (N, C) or (N, C, L) values that no Linear of
(N, C) features precedes (one that does is folded into it, `quant.graph`); and PReLU (graph node `prelu`), the
same affine with a second multiplier on the negative side.

The frozen BN is y_c = g_c x + h_c with g_c = gamma_c / sqrt(var_c + eps), h_c = beta_c - mu_c g_c
(Appendix D's terms, without a conv to fold into). On integers q at scale s it is g_c s (q + t_c) with the
shift t_c = round(h_c / (g_c s)) on the input's grid (as a conv's bias lives on its accumulator's, eq. 17),
and the product is requantized dyadically to a static output scale S (INT32 at 16-bit resolution, like a
residual sum): out = ((q + t_c) m_c + 2^(k_c - 1)) >> k_c with m_c / 2^(k_c) = g_c s / S, m_c signed.

PReLU, y_c = x for x >= 0 and a_c x below (one slope a_c per channel, or one for all), is that affine with
t_c = 0 and a second multiplier n_c for the values below 0 (`negative`): with both on one shift k_c, chosen for
the larger of 1 and |a_c| (m_c / 2^(k_c) = s / S, n_c / 2^(k_c) = a_c s / S), out = (q m_c + 2^(k_c - 1)) >> k_c
for q >= 0 and (q n_c + 2^(k_c - 1)) >> k_c below. It reads a conv's INT32 accumulator directly (its per-channel
scale s_c folds into m_c and n_c), as the affine of a BN does.
"""
from __future__ import annotations

import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hawq_ray.contract import HawqError
from hawq_ray.ops.registry import AtenCall, GraphNode, ProgramOp, register_ops
from hawq_ray.program.dyadic import dyadic
from hawq_ray.program.program import INT32_MAX, INT32_MIN
from hawq_ray.quant.fold import bn_sigma
from hawq_ray.quant.quantizers import signed_range
from hawq_ray.quant.values import WIDE_BITS, V, channel_view, np_scale

SEMANTICS = """inputs [x]; consts bias, multiplier (int32, signed, nonzero), shift (int32, >= 1), each (C, 1, 1)
or (C,), and optionally negative (int32, signed, per tensor or channel as they are); attrs lo, hi; with t = x + bias
and m = multiplier, or m = negative where negative is given and t < 0: out = clamp((t * m + 2^(shift-1)) >> shift, lo,
hi), computed in int64 (PReLU: bias 0, negative the slope's multiplier)."""


def _convert_bn(tracer, n, m):
    if not m.track_running_stats or m.running_mean is None:
        tracer.unsupported(f"module {n.target!r} (a {type(m).__name__} without running statistics)", type(m).__name__)
    return tracer.node(n, "batchnorm", [n.args[0]], module=m, bn=m, bn_name=n.target)


def _gain_shift(bn):
    sigma = bn_sigma(bn, torch.float64)
    g = (bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones_like(sigma)) / sigma
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(sigma)
    return g, beta - bn.running_mean.to(torch.float64) * g


def integer_affine(q, bias, mult, shift, lo, hi, negative=None):
    """((q + bias) * m + 2^(shift-1)) >> shift, clamped, in int64, with m = mult, or `negative` (when given)
    where q + bias < 0: the one formula of the op."""
    t = q.to(torch.int64) + bias
    if negative is not None:
        mult = torch.where(t < 0, negative, mult)
    z = t * mult + (torch.ones_like(shift) << (shift - 1))
    return torch.clamp(z >> shift, lo, hi)


def batchnorm_step(qm, node, ins):
    bn = node.bn

    def constants(device):
        g, h = _gain_shift(bn)
        return g.to(device), h.to(device), None
    return _affine_step(qm, node, ins[0], lambda r: F.batch_norm(r, bn.running_mean, bn.running_var, bn.weight,
                                                                 bn.bias, False, 0.0, bn.eps),
                        type(bn).__name__, "a map, or (N, C) / (N, C, L) values", constants)


def _affine_step(qm, node, v: V, float_fn, what: str, valid: str, constants) -> V:
    """What every node lowered to the affine does: its float value (`float_fn` of the input's), the fp32 and fake
    modes, the static 16-bit output scale, and in QAT the per-channel affine with constants(device) ->
    (gain, offset, negative multiplier or None)."""
    real = float_fn(v.r) if (qm.mode != "qat" or qm.needs_real()) else None
    if qm.mode == "fp32":
        return V(None, None, real, node.name)
    s = qm.wide_output(node, real, v.device)
    if qm.mode == "fake":
        return qm.fake_output(real, s, node.name)
    if v.s.dim() > 1:
        raise HawqError(f"{node.name}: {what} of a value with one scale per feature on its last axis (a Linear's "
                        f"output over tokens); valid: {valid}")
    g, h, negative = constants(v.q.device)
    return channel_affine(qm, node, v, s, real, g, h, negative=negative)


def channel_affine(qm, node, v: V, s, real, g, h, negative=None) -> V:
    """The integer affine of v onto the static 16-bit scale s: gain g and offset h per channel (axis 1, shape
    (C,) or one for all), and, given `negative`, the gain below zero instead (PReLU; h must be 0 then)."""
    scale, (lo, hi) = float(s), signed_range(WIDE_BITS)
    g = torch.where(g == 0, torch.full_like(g, 1e-30), g)
    s_in = v.s.to(torch.float64) * torch.ones_like(g)
    if negative is not None:
        g, negative, s_in = torch.broadcast_tensors(g, negative, s_in)
    t = torch.floor(h / (g * s_in) + 0.5).clamp(INT32_MIN // 2, INT32_MAX // 2) * torch.ones_like(s_in)
    if negative is None:
        b, c = dyadic((g.abs() * s_in / scale).cpu().numpy())
        mult = torch.from_numpy(b).to(torch.int64) * torch.sign(g).cpu().to(torch.int64)
        parts = {}
    else:       # both sides on one shift, chosen for the larger multiplier
        pos, neg = ((x * s_in / scale).cpu().numpy() for x in (g, negative))
        _, c = dyadic(np.maximum(np.abs(pos), np.abs(neg)))
        mult, low = (torch.from_numpy(np.asarray(np.rint(np.ldexp(x, c)), np.int64)) for x in (pos, neg))
        parts = {"negative": low}
    ndim = v.q.dim()
    named = {"bias": t, "multiplier": mult, "shift": torch.from_numpy(np.asarray(c))} | parts
    consts = {k: channel_view(x.to(v.q.device).to(torch.int64), ndim) for k, x in named.items()}
    q = integer_affine(v.q, consts["bias"], consts["multiplier"], consts["shift"], lo, hi, consts.get("negative"))
    qm.emit("affine", [v.name], node.name, scale=np_scale(s), lo=lo, hi=hi, attrs={"lo": lo, "hi": hi},
            consts={k: x.cpu().numpy().astype(np.int32) for k, x in consts.items()})
    return V(q, s, None if real is None else qm.exact_real(real, lambda: q * scale), node.name, lo, hi)


def _consts(op):
    out = [torch.as_tensor(op.consts[k], dtype=torch.int64) for k in ("bias", "multiplier", "shift")]
    return out + [torch.as_tensor(op.consts["negative"], dtype=torch.int64) if "negative" in op.consts else None]


def execute_affine(op, ins):
    bias, mult, shift, negative = _consts(op)
    return integer_affine(ins[0], bias, mult, shift, int(op.attrs["lo"]), int(op.attrs["hi"]), negative)


def affine_range(op, r):
    """Per channel the map is monotone on each side of t = 0 (on the whole axis without `negative`): its extremes
    over [lo, hi] are at the ends and, with `negative`, at the last input on either side of the kink."""
    bias, mult, shift, negative = _consts(op)
    lo, hi = r[0]
    points = [torch.tensor(lo), torch.tensor(hi)]
    if negative is not None:
        points += [torch.clamp(-bias, lo, hi), torch.clamp(-bias - 1, lo, hi)]
    ends = [integer_affine(x, bias, mult, shift, int(op.attrs["lo"]), int(op.attrs["hi"]), negative) for x in points]
    return int(min(int(e.min()) for e in ends)), int(max(int(e.max()) for e in ends))


def _bn_observers(node, input_name):
    return [f"out:{node.name}"]


def _convert_prelu(tracer, n, m):
    if m.weight.numel() != 1 and (tracer.shape(n.args[0]) or (0, 0))[1] != m.weight.numel():
        tracer.unsupported(f"module {n.target!r} ({m.weight.numel()} slopes on a value of shape "
                           f"{tracer.shape(n.args[0])})", type(m).__name__)
    return tracer.node(n, "prelu", [n.args[0]], module=m)


def prelu_step(qm, node, ins):
    """x for x >= 0, a_c x below: the affine with a negative-side multiplier (module docstring)."""
    slope = node.module.weight

    def constants(device):
        a = slope.detach().to(torch.float64).to(device).reshape(-1)
        a = a[0] if a.numel() == 1 else a
        return torch.ones_like(a), torch.zeros_like(a), a
    return _affine_step(qm, node, ins[0], lambda r: F.prelu(r, slope), "PReLU", "a map, or (N, C) features",
                        constants)


def _convert_offset(tracer, n, m):
    """`x + c`, `c + x`, `x - c`, `c - x` for a number c (BAM's `1 + sigmoid(...)`): the per-channel affine with
    gain 1 (or -1) and offset c, onto a static 16-bit scale like a standalone BN's."""
    if len(n.args) != 2 or n.kwargs:
        return None
    numbers = [isinstance(a, (int, float)) and not isinstance(a, bool) for a in n.args]
    if numbers.count(True) != 1 or not tracer.is_tensor(n.args[numbers.index(False)]):
        return None
    c, x = float(n.args[numbers.index(True)]), n.args[numbers.index(False)]
    minus = n.target in (operator.sub, torch.sub, "sub")
    gain = -1.0 if minus and numbers[1] is False else 1.0          # c - x
    offset = -c if minus and numbers[1] else c                     # x - c
    return tracer.node(n, "offset", [x], attrs={"gain": gain, "offset": offset})


def offset_step(qm, node, ins):
    g, h = node.attrs["gain"], node.attrs["offset"]

    def constants(device):
        one = torch.tensor(1.0, dtype=torch.float64, device=device)
        return one * g, one * h, None
    return _affine_step(qm, node, ins[0], lambda r: r * g + h, "a number added to", "a value of one scale, a map, "
                        "or (N, C) features", constants)


register_ops(
    GraphNode("offset", offset_step, functions=(operator.add, operator.sub, torch.add, torch.sub),
              methods=("add", "sub"), convert=_convert_offset, observers=_bn_observers,
              supported="a number added or subtracted",
              aten={torch.ops.aten.sub.Tensor: operator.sub,
                    torch.ops.aten.rsub.Scalar: AtenCall(operator.sub, lambda a, k: ((a[1], a[0]), k))}),
    GraphNode("batchnorm", batchnorm_step, modules=(nn.BatchNorm2d, nn.BatchNorm1d), convert=_convert_bn,
              observers=_bn_observers, supported="BatchNorm2d (pre-activation), BatchNorm1d"),
    GraphNode("prelu", prelu_step, modules=(nn.PReLU,), convert=_convert_prelu, observers=_bn_observers,
              supported="PReLU (one slope, or one per channel)"),
    ProgramOp("affine", SEMANTICS, execute_affine, affine_range, elementwise=True),
)
