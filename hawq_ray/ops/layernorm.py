"""Integer-only LayerNorm (graph node and program op `layer_norm`): a vision transformer's LayerNorm over the
features of its tokens (N, T, C) (the last axis, as `nn.LayerNorm(C)` normalizes; also a channels-last map), and
ConvNeXt's LayerNorm2d on an (N, C, H, W) value, normalized over C at each (n, h, w) (axis 1).

The same op without centering (attr `center` false: S taken as 0 below) is RMSNorm (`nn.RMSNorm`: x over the
root mean square, V = C sum x^2 + eps) and, with gamma = C^-1/2 and no eps, `F.normalize(x, dim)`: x over its L2
norm (Swin V2's cosine attention). Every bound below holds with max - min read as 2 max |x| and sqrt(C - 1) as
sqrt(C) (|C x_c| <= sqrt(C) sqrt(C sum x^2)); where some d != 0, V >= C >= 1 and r >= 8, so
|n| <= 2^F sqrt(C) (r + 1) / r + 1 <= 2^F 2^8 9/8 + 1 < 2^25 (NORM_MAX) in both forms.

QAT: the input is requantized to 16 bits on a static scale (the op reads int16), the output written at a static
16-bit scale (like a residual sum), so the Linear after it requantizes it to its own bits; the forward values are
the integers', the gradient (to the input, gamma and beta) float LayerNorm's.

The integers (all int64; `>>` is the arithmetic shift, i.e. floor(. / 2^k)), at each position with the C
values x_c of the input:

    S = sum_c x_c                               the sum: C times the mean, never divided
    V = C sum_c x_c^2 - S^2 + eps               = C^2 var + eps (var: the biased variance, as LayerNorm's)
    r = max(isqrt(V << 2P), 1), P = 3           isqrt(v) = floor(sqrt(v)), bit by bit (`isqrt`): r ~ 2^P C std
    R = 2^K // r, K = 56                        the one integer division: positive by positive (floor = trunc)
    d_c = C x_c - S                             = C (x_c - mean)
    n_c = (d_c R + 2^(K-P-F-1)) >> (K-P-F)      F = 16: n_c ~ 2^F (x_c - mean) / sqrt(var + eps / C^2)
    out_c = clamp((n_c m_c + b_c + 2^(s_c-1)) >> s_c, lo, hi)

Derivation. C sum x^2 - S^2 = C sum (x - mean)^2 = C^2 var; so with d = C (x - mean),
d / sqrt(V) = (x - mean) / sqrt(var + eps / C^2) = x_hat, the normalized value (eps / C^2 in codes^2: an integer
eps = C^2 eps_real / S_in^2, `layer_norm_constants`). r = floor(2^P sqrt(V)), R = floor(2^K / r), so
d R / 2^(K-P) ~ d / sqrt(V) = x_hat, and n = x_hat 2^F rounded half up. The per-channel affine gamma x_hat + beta
on the output scale S_out is the dyadic m_c / 2^s_c ~ gamma_c / (S_out 2^F) (signed) and the bias
b_c ~ beta_c 2^s_c / S_out; the last shift rounds half up and the clamp is the output's range.

Ranges (why int64 never overflows). Required: |x| <= 2^15 (an int16 input), 1 <= C <= 2^16 and, at every
position, C (max_c x - min_c x) <= 2^28 (so a 16-bit input allows C <= 4096; an 8-bit one C <= 2^16);
0 <= eps <= 2^54; 1 <= s_c <= 62; |m_c| < 2^31; |b_c| < 2^60. Then |S| <= 2^31, C sum x^2 <= 2^62 and
S^2 <= 2^62 (both >= 0, so their difference cannot overflow); V - eps = C^2 var <= (C spread / 2)^2 <= 2^54, so
(V << 6) < 2^62 and isqrt(V << 6) < 2^31: the bit loop over bits 30..0 tries c <= 2^31 - 1, c^2 < 2^62.
|d| <= C spread <= 2^28. Since max_c |x_c - mean| <= sqrt(C - 1) std, |d| <= sqrt(C - 1) sqrt(V - eps)
< sqrt(C - 1) (r + 1) / 2^P, and for r >= 1 (r = 0 only if V = 0, then every d = 0)
|d R| < sqrt(C - 1) (r + 1) 2^(K-P) / r <= 2 sqrt(C - 1) 2^53 <= 2^62; so |n| <= 2^25, |n m| < 2^56 and
|n m + b + 2^(s-1)| < 2^56 + 2^60 + 2^61 < 2^63.

isqrt, exact by construction: r starts at 0; for bit b = 30 down to 0, r becomes r + 2^b where
(r + 2^b)^2 <= v. Invariant after bit b: r^2 <= v and (r + 2^b)^2 > v (the bits above b are those of
floor(sqrt(v)): a binary search of the monotone predicate t^2 <= v over [0, 2^31)); after bit 0,
r^2 <= v < (r + 1)^2, i.e. r = floor(sqrt(v)), for every v < 2^62.

Error against float LayerNorm of the dequantized input x S_in (same eps, gamma, beta), per element:
2^P sqrt(V) - 1 < r <= 2^P sqrt(V) and 2^K / r - 1 < R <= 2^K / r give d R / 2^(K-P) = x_hat (1 + delta)
with -2^-(K-P-31) <= delta < 1 / (2^P sqrt(V) - 1) (r < 2^31); the shift adds at most 1/2 to n. So
|n / 2^F - x_hat| <= |x_hat| (1 / (8 sqrt(V) - 1) + 2^-22) + 2^-(F+1), and the output in reals is off by at most
|gamma_c| (that + |x_hat| 2^-29) (the dyadic multiplier's 2^-30 relative error and F-scaled bias rounding) plus
S_out / 2 (the last rounding) + S_out 2^-(s_c+1) (the bias's rounding), where nothing clamps. With V = C^2 var in
codes^2 the relative term 1 / (8 C std) is an eighth of 1/C of a code's share of the std: below the input's own
quantization error (1/2 code) for C >= 1. `tests/test_layernorm.py` holds the output to torch's layer_norm
within this bound.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from torch.nn import functional
from torch import nn

from hawq_ray.contract import HawqError
from hawq_ray.ops.registry import GraphNode, ProgramOp, register_ops
from hawq_ray.program.dyadic import dyadic
from hawq_ray.program.program import Op
from hawq_ray.quant.quantizers import signed_range
from hawq_ray.quant.values import WIDE_BITS, V, np_scale

RMS_NORM = (nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()
P, K, F = 3, 56, 16            # isqrt's pre-shift 2P, the reciprocal's 2^K, the normalized value's fraction bits
NORM_SHIFT = K - P - F         # 37: n = (d R + 2^(NORM_SHIFT-1)) >> NORM_SHIFT
ROOT_BITS = 31                 # isqrt(v) < 2^31 for v < 2^62
MAX_CHANNELS = 1 << 16
MAX_SPREAD = 1 << 28           # C (max_c x - min_c x) at a position
INPUT_LO, INPUT_HI = -(1 << 15), (1 << 15) - 1
MAX_EPS = 1 << 54
MAX_BIAS = 1 << 60
NORM_MAX = 1 << 25             # |n| <= 2 sqrt(C - 1) 2^F + 1 <= 2^25 for C <= 2^16

SEMANTICS = f"""inputs [x], normalized over its axis `axis` (attr, default 1: C of (N, C, H, W) or (N, C); the last
of tokens (N, T, C) or of a channels-last map) at each position; consts multiplier
(int32, signed), shift (int32, 1..62), bias (int64, |bias| < 2^60), each of shape () or (C,); attrs eps (int,
0..2^54), axis, center (default true), lo, hi (the clamp); requires x in int16, 1 <= C <= 2^16 and
C * spread <= 2^28 at each position (spread: max_c x - min_c x, or 2 max_c |x| where center is false). In int64
per position: S = sum_c x (0 where center is false); V = C * sum_c x^2 - S^2 + eps; r = max(isqrt(V << {2 * P}), 1)
(isqrt = floor(sqrt), bit by bit); R = 2^{K} // r (integer division of positives: floor); d = C * x - S;
n = (d * R + 2^{NORM_SHIFT - 1}) >> {NORM_SHIFT}; out = clamp((n * multiplier + bias + 2^(shift-1)) >> shift, lo, hi)
(>> arithmetic: floor)."""


def layer_norm_channels(x_shape, where: str, axis: int = 1) -> int:
    if len(x_shape) < 2 or not 1 <= axis < len(x_shape):
        raise HawqError(f"{where}: layer_norm over axis {axis} of a rank-{len(x_shape)} value; valid: an axis "
                        "after the batch axis")
    c = int(x_shape[axis])
    if not 1 <= c <= MAX_CHANNELS:
        raise HawqError(f"{where}: layer_norm over {c} channels; valid: 1 to {MAX_CHANNELS}")
    return c


def check_constants(op, channels: int) -> dict:
    """The op's constants as int64 arrays of shape (C,), checked against the bounds of the semantics."""
    out = {}
    for name in ("multiplier", "shift", "bias"):
        a = np.asarray(op.consts[name]).astype(np.int64)
        if a.ndim > 1 or a.size not in (1, channels):
            raise HawqError(f"{op.output}: layer_norm constant {name} of shape {a.shape}; valid: () or ({channels},)")
        out[name] = np.broadcast_to(a.reshape(-1), (channels,)).copy()
    m, s, b = out["multiplier"], out["shift"], out["bias"]
    eps = int(op.attrs.get("eps", 0))
    if np.any(np.abs(m) >= 1 << 31) or np.any(s < 1) or np.any(s > 62) or np.any(np.abs(b) >= MAX_BIAS) \
            or not 0 <= eps <= MAX_EPS:
        raise HawqError(f"{op.output}: layer_norm needs |multiplier| < 2^31, 1 <= shift <= 62, |bias| < 2^60 "
                        f"and 0 <= eps <= 2^54")
    return out


def isqrt(v: torch.Tensor) -> torch.Tensor:
    """floor(sqrt(v)) of an int64 tensor 0 <= v < 2^62, bit by bit (proof: the module docstring)."""
    r = torch.zeros_like(v)
    for b in range(ROOT_BITS - 1, -1, -1):
        c = r + (1 << b)
        r = torch.where(c * c <= v, c, r)
    return r


def execute_layer_norm(op, ins):
    x = ins[0].to(torch.int64)
    axis = int(op.attrs.get("axis", 1))
    c = layer_norm_channels(x.shape, op.output, axis)
    k = check_constants(op, c)
    center = bool(op.attrs.get("center", True))
    if x.numel():
        spread = int((x.amax(axis) - x.amin(axis)).max()) if center else 2 * int(x.abs().max())
        if int(x.min()) < INPUT_LO or int(x.max()) > INPUT_HI or c * spread > MAX_SPREAD:
            raise HawqError(f"{op.output}: layer_norm input outside its bounds (int16 values, C * spread <= 2^28)")
    view = tuple(c if i == axis else 1 for i in range(x.dim()))
    m, s, b = (torch.from_numpy(k[n]).reshape(view) for n in ("multiplier", "shift", "bias"))
    total = x.sum(axis, keepdim=True) if center else torch.zeros_like(x.select(axis, 0).unsqueeze(axis))
    v = c * (x * x).sum(axis, keepdim=True) - total * total + int(op.attrs.get("eps", 0))
    r = isqrt(v << (2 * P)).clamp_(min=1)
    recip = torch.div(torch.full_like(r, 1 << K), r, rounding_mode="floor")
    n = ((c * x - total) * recip + (1 << (NORM_SHIFT - 1))) >> NORM_SHIFT
    y = (n * m + b + (torch.ones_like(s) << (s - 1))) >> s
    return y.clamp_(int(op.attrs["lo"]), int(op.attrs["hi"]))


def layer_norm_value_range(op, ins):
    """|n| <= 2^25 whatever the input; the affine's extremes over it, within the clamp."""
    lo_in, hi_in = ins[0]
    if lo_in < INPUT_LO or hi_in > INPUT_HI:
        raise HawqError(f"{op.output}: layer_norm input range [{lo_in}, {hi_in}] exceeds int16; requantize it first")
    m, s, b = (np.asarray(op.consts[n]).astype(np.int64).reshape(-1).tolist() for n in ("multiplier", "shift", "bias"))
    width = max(len(m), len(s), len(b))
    m, s, b = (v * width if len(v) == 1 else v for v in (m, s, b))
    ends = [(t * mm + bb + (1 << (ss - 1))) >> ss for mm, ss, bb in zip(m, s, b) for t in (-NORM_MAX, NORM_MAX)]
    lo, hi = int(op.attrs["lo"]), int(op.attrs["hi"])
    return min(max(min(ends), lo), hi), max(min(max(ends), hi), lo)


def layer_norm_constants(gamma, beta, eps: float, s_in: float, s_out: float, channels: int) -> tuple:
    """(consts, attrs eps) of a LayerNorm with float gamma, beta (C,) and eps, reading codes at scale s_in and
    writing codes at s_out (compile time: floats allowed). m / 2^s ~ gamma / (s_out 2^F), shifts capped at 44
    so that the bias fits."""
    gamma = np.broadcast_to(np.asarray(gamma, np.float64), (channels,))
    beta = np.broadcast_to(np.asarray(beta, np.float64), (channels,))
    ratio = np.abs(gamma) / (s_out * 2.0 ** F)
    m, s = dyadic(np.where(ratio > 0, ratio, 1.0))
    cut = np.maximum(s - 44, 0)
    m, s = m >> cut, s - cut
    m = np.where(ratio > 0, np.sign(gamma).astype(np.int64) * m, 0)
    bias = np.rint(beta / s_out * np.exp2(s)).astype(np.int64)
    eps_int = int(round(channels ** 2 * eps / s_in ** 2))
    consts = {"multiplier": m.astype(np.int32), "shift": s.astype(np.int32), "bias": bias}
    return consts, {"eps": min(eps_int, MAX_EPS)}


def _channels_first(m: nn.Module) -> bool:
    """torchvision's and timm's LayerNorm2d normalize an (N, C, H, W) map over C; nn.LayerNorm the last axis."""
    return type(m).__name__ == "LayerNorm2d"


def _convert_layer_norm(tracer, n, m):
    if len(m.normalized_shape) != 1:
        tracer.unsupported(f"module {n.target!r} (normalized over {tuple(m.normalized_shape)})",
                           f"{type(m).__name__} (only over one axis)")
    rank = len(tracer.shape(n.args[0]))
    return tracer.node(n, "layer_norm", [n.args[0]], module=m,
                       attrs={"axis": 1 if _channels_first(m) else rank - 1, "center": not isinstance(m, RMS_NORM)})


def _convert_normalize(tracer, n, m):
    """`F.normalize(x, p=2, dim)`: layer_norm without centering, gamma C^-1/2 (the module docstring)."""
    a = dict(zip(("input", "p", "dim", "eps"), n.args)) | dict(n.kwargs)
    if not tracer.is_tensor(a["input"]) or float(a.get("p", 2.0)) != 2.0:
        return None
    rank = len(tracer.shape(a["input"]))
    return tracer.node(n, "normalize", [a["input"]], attrs={"axis": int(a.get("dim", 1)) % rank, "center": False})


def norm_parameters(node, channels: int) -> tuple:
    """(gamma, beta, eps) of a layer_norm or normalize node, as float arrays (C,) and a float."""
    m = node.module
    if m is None:                           # F.normalize: x / ||x||, eps 1e-12 below any code's resolution
        return np.full(channels, channels ** -0.5), np.zeros(channels), 0.0
    gamma = m.weight.detach().cpu().numpy() if m.weight is not None else np.ones(channels)
    beta = m.bias.detach().cpu().numpy() if getattr(m, "bias", None) is not None else np.zeros(channels)
    eps = m.eps if m.eps is not None else float(torch.finfo(torch.float32).eps)    # RMSNorm's default
    return gamma, beta, eps


def _float_norm(node, t):
    m, axis = node.module, node.attrs["axis"]
    if m is None:
        return functional.normalize(t, dim=axis)
    if isinstance(m, RMS_NORM):
        out = functional.rms_norm(t.movedim(axis, -1), m.normalized_shape, m.weight, m.eps)
    else:
        out = functional.layer_norm(t.movedim(axis, -1), m.normalized_shape, m.weight, m.bias, m.eps)
    return out.movedim(-1, axis)


def layer_norm_step(qm, node, ins):
    if qm.mode == "fp32":
        return V(None, None, _float_norm(node, ins[0].r), node.name)
    x = qm.act_point(ins[0], f"in:{node.name}", WIDE_BITS, signed=True, name=f"{node.name}.in")
    real = _float_norm(node, x.r) if (qm.mode != "qat" or qm.needs_real()) else None
    s = qm.wide_output(node, real, x.device)
    if qm.mode == "fake":
        return qm.fake_output(real, s, node.name)
    scale, (lo, hi) = float(s), signed_range(WIDE_BITS)
    axis = node.attrs["axis"]
    c = x.q.shape[axis]
    consts, attrs = layer_norm_constants(*norm_parameters(node, c), float(x.s), scale, c)
    attrs = attrs | {"axis": axis, "center": bool(node.attrs.get("center", True)), "lo": lo, "hi": hi}
    op = qm.emit("layer_norm", [x.name], node.name, consts=consts, attrs=attrs, scale=np_scale(s), lo=lo, hi=hi)
    q = execute_layer_norm(Op("layer_norm", [x.name], op, attrs=attrs, consts=consts), [x.q])
    return V(q, s, qm.real(real, q, s), node.name, lo, hi)


def _convert_instance_norm(tracer, n, m):
    """InstanceNorm2d on its per-image statistics (IBN-Net's; one with running statistics is a BN-like affine,
    refused) of an (N, C, H, W) map."""
    shape = tracer.shape(n.args[0])
    if m.track_running_stats or shape is None or len(shape) != 4 or shape[2] * shape[3] > INSTANCE_MAX:
        tracer.unsupported(f"module {n.target!r} (valid: per-image statistics of a map of at most {INSTANCE_MAX} "
                           f"positions; got {'running statistics' if m.track_running_stats else shape})",
                           type(m).__name__)
    return tracer.node(n, "instance_norm", [n.args[0]], module=m)


INSTANCE_MAX = MAX_SPREAD >> 8          # H W positions: an 8-bit input's spread times them within 2^28


def instance_norm_step(qm, node, ins):
    """InstanceNorm2d as existing ops: the map's (N, C, H W) view, the integer layer_norm over its last axis with
    gamma 1 and beta 0 onto the fixed scale sqrt(H W) / 32767 (|x_hat| <= sqrt(H W - 1): no observer), viewed back,
    and the per-channel affine gamma_c x_hat + beta_c of a standalone BN onto a static 16-bit scale. The input is
    requantized to 16 bits where H W <= 4096, else to 8 (the op's bound H W spread <= 2^28)."""
    from hawq_ray.ops.batchnorm import channel_affine       # here: batchnorm registers first (`ops/__init__`)
    m = node.module

    def float_fn(t):
        return functional.instance_norm(t, None, None, m.weight, m.bias, True, 0.0, m.eps)
    if qm.mode == "fp32":
        return V(None, None, float_fn(ins[0].r), node.name)
    n, c, h, w = (ins[0].q if ins[0].q is not None else ins[0].r).shape
    bits = WIDE_BITS if h * w * (1 << WIDE_BITS) <= MAX_SPREAD else 8
    x = qm.act_point(ins[0], f"in:{node.name}", bits, signed=True, name=f"{node.name}.in")
    real = float_fn(x.r) if (qm.mode != "qat" or qm.needs_real()) else None
    s = qm.wide_output(node, real, x.device)
    if qm.mode == "fake":
        return qm.fake_output(real, s, node.name)
    lo, hi = signed_range(WIDE_BITS)
    s_norm = torch.tensor(math.sqrt(h * w) / hi, dtype=torch.float64, device=x.device)
    consts, attrs = layer_norm_constants(np.ones(h * w), np.zeros(h * w), m.eps, float(x.s), float(s_norm), h * w)
    attrs = attrs | {"axis": 2, "center": True, "lo": lo, "hi": hi}
    rows = qm.emit("reshape", [x.name], f"{node.name}.rows", attrs={"shape": (-1, c, h * w)}, scale=np_scale(x.s),
                   lo=x.lo, hi=x.hi)
    normed = qm.emit("layer_norm", [rows], f"{node.name}.norm", consts=consts, attrs=attrs, scale=np_scale(s_norm),
                     lo=lo, hi=hi)
    q = execute_layer_norm(Op("layer_norm", [rows], normed, attrs=attrs, consts=consts), [x.q.reshape(n, c, h * w)])
    back = qm.emit("reshape", [normed], f"{node.name}.map", attrs={"shape": (-1, c, h, w)}, scale=np_scale(s_norm),
                   lo=lo, hi=hi)
    ones = torch.ones(c, dtype=torch.float64, device=x.device)
    g = m.weight.detach().to(torch.float64) if m.weight is not None else ones
    beta = m.bias.detach().to(torch.float64) if m.bias is not None else 0 * ones
    return channel_affine(qm, node, V(q.reshape(n, c, h, w), s_norm, None, back, lo, hi), s, real, g, beta)


def _layer_norm_observers(node, input_name):
    return [f"in:{node.name}", f"out:{node.name}"]


register_ops(
    GraphNode("layer_norm", layer_norm_step, modules=(nn.LayerNorm, *RMS_NORM), convert=_convert_layer_norm,
              observers=_layer_norm_observers, supported="LayerNorm / RMSNorm (one axis), LayerNorm2d"),
    GraphNode("normalize", layer_norm_step, functions=(functional.normalize,), convert=_convert_normalize,
              observers=_layer_norm_observers, supported="F.normalize (p=2)"),
    GraphNode("instance_norm", instance_norm_step, modules=(nn.InstanceNorm2d,), convert=_convert_instance_norm,
              observers=_layer_norm_observers, supported="InstanceNorm2d (a layer_norm over H W and an affine)"),
    ProgramOp("layer_norm", SEMANTICS, execute_layer_norm, layer_norm_value_range),
)
