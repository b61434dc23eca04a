"""A BatchNorm2d that no conv precedes (graph node `batchnorm`, program op `affine`): DenseNet's pre-activation
BN, a BN on a concatenation or a residual sum.

The frozen BN is y_c = g_c x + h_c with g_c = gamma_c / sqrt(var_c + eps), h_c = beta_c - mu_c g_c
(Appendix D's terms, without a conv to fold into). On integers q at scale s it is g_c s (q + t_c) with the
shift t_c = round(h_c / (g_c s)) on the input's grid (as a conv's bias lives on its accumulator's, eq. 17),
and the product is requantized dyadically to a static output scale S (INT32 at 16-bit resolution, like a
residual sum): out = ((q + t_c) m_c + 2^(k_c - 1)) >> k_c with m_c / 2^(k_c) = g_c s / S, m_c signed.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hawq_ray.ops.registry import GraphNode, ProgramOp, register_ops
from hawq_ray.program.dyadic import dyadic
from hawq_ray.program.program import INT32_MAX, INT32_MIN
from hawq_ray.quant.fold import bn_sigma
from hawq_ray.quant.quantizers import signed_range
from hawq_ray.quant.values import WIDE_BITS, V, channel_view, np_scale

SEMANTICS = """inputs [x]; consts bias, multiplier (int32, signed, nonzero), shift (int32, >= 1), each (C, 1, 1) or (C,);
attrs lo, hi; out = clamp(((x + bias) * multiplier + 2^(shift-1)) >> shift, lo, hi), computed in int64."""


def _convert_bn(tracer, n, m):
    if not m.track_running_stats or m.running_mean is None:
        tracer.unsupported(f"module {n.target!r} (a BatchNorm2d without running statistics)", type(m).__name__)
    return tracer.node(n, "batchnorm", [n.args[0]], module=m, bn=m, bn_name=n.target)


def _gain_shift(bn):
    sigma = bn_sigma(bn, torch.float64)
    g = (bn.weight.detach().to(torch.float64) if bn.weight is not None else torch.ones_like(sigma)) / sigma
    beta = bn.bias.detach().to(torch.float64) if bn.bias is not None else torch.zeros_like(sigma)
    return g, beta - bn.running_mean.to(torch.float64) * g


def integer_affine(q, bias, mult, shift, lo, hi):
    """((q + bias) * mult + 2^(shift-1)) >> shift, clamped, in int64: the one formula of the op."""
    z = (q.to(torch.int64) + bias) * mult + (torch.ones_like(shift) << (shift - 1))
    return torch.clamp(z >> shift, lo, hi)


def batchnorm_step(qm, node, ins):
    v, bn = ins[0], node.bn
    real = None
    if qm.mode != "qat" or qm.needs_real():
        real = F.batch_norm(v.r, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    if qm.mode == "fp32":
        return V(None, None, real, node.name)
    s = qm.wide_output(node, real, v.device)
    if qm.mode == "fake":
        return qm.fake_output(real, s, node.name)
    scale, (lo, hi) = float(s), signed_range(WIDE_BITS)
    g, h = _gain_shift(bn)
    g = torch.where(g == 0, torch.full_like(g, 1e-30), g.to(v.q.device))
    s_in = v.s.to(torch.float64) * torch.ones_like(g)
    t = torch.floor(h.to(g.device) / (g * s_in) + 0.5).clamp(INT32_MIN // 2, INT32_MAX // 2)
    b, c = dyadic((g.abs() * s_in / scale).cpu().numpy())
    mult = torch.from_numpy(b).to(torch.int64) * torch.sign(g).cpu().to(torch.int64)
    ndim = v.q.dim()
    consts = [channel_view(x.to(v.q.device).to(torch.int64), ndim) for x in (t, mult, torch.from_numpy(c))]
    q = integer_affine(v.q, *consts, lo, hi)
    qm.emit("affine", [v.name], node.name, scale=np_scale(s), lo=lo, hi=hi, attrs={"lo": lo, "hi": hi},
            consts={k: x.cpu().numpy().astype(np.int32) for k, x in zip(("bias", "multiplier", "shift"), consts)})
    return V(q, s, None if real is None else qm.exact_real(real, lambda: q * scale), node.name, lo, hi)


def _consts(op):
    return [torch.as_tensor(op.consts[k], dtype=torch.int64) for k in ("bias", "multiplier", "shift")]


def execute_affine(op, ins):
    return integer_affine(ins[0], *_consts(op), int(op.attrs["lo"]), int(op.attrs["hi"]))


def affine_range(op, r):
    """Per channel the image of [lo, hi] is an interval (the map is monotone); the union over channels."""
    ends = [integer_affine(torch.tensor(x), *_consts(op), int(op.attrs["lo"]), int(op.attrs["hi"])) for x in r[0]]
    return int(torch.minimum(*ends).min()), int(torch.maximum(*ends).max())


def _bn_observers(node, input_name):
    return [f"out:{node.name}"]


register_ops(
    GraphNode("batchnorm", batchnorm_step, modules=(nn.BatchNorm2d,), convert=_convert_bn, observers=_bn_observers,
              supported="BatchNorm2d (pre-activation)"),
    ProgramOp("affine", SEMANTICS, execute_affine, affine_range, elementwise=True),
)
