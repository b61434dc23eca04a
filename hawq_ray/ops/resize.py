"""Resampling of a map (graph node and program op `resize`): `nn.Upsample` / `F.interpolate` in modes nearest and
bilinear, the feature pyramids of multi-resolution networks.

Both are separable: along H each output row i reads input rows idx_h[i, t] with weights w_h[i, t] (t < T taps: 1
for nearest, 2 for bilinear), likewise along W, so

    out[n, c, i, j] = (sum_{a, b} w_h[i, a] w_w[j, b] x[n, c, idx_h[i, a], idx_w[j, b]] + 2^(s-1)) >> s

with integer weights and s = 2 WEIGHT_BITS (0 for nearest, whose weights are 1). The taps are torch's own: read at
trace time from F.interpolate of index-coded and one-hot inputs (so the index rounding of every size, scale factor
and `align_corners` is torch's, not a re-derivation), each bilinear weight rounded to WEIGHT_BITS bits with the row's
weights summing to 2^WEIGHT_BITS exactly (the rounding's remainder on the largest weight). A weight of torch that is
a multiple of 2^-WEIGHT_BITS (scale factor 2 without align_corners: 1/4, 3/4) is exact, so the op is torch's
bilinear of the codes rounded half up; other weights are off by at most 2^-(WEIGHT_BITS+1) each.

The output keeps the input's scale (a per-channel one too: resampling never mixes channels) and its range: the
weights are non-negative and sum to 2^s over the taps (checked), so the output is a rounded convex combination of
inputs. The sums are int64: a resize may read a conv's INT32 accumulator (up to 2^31 times 2^14); a back end may
sum in int32 where the input is 16 bits or narrower (sum w_h w_w = 2^14: every partial sum below 2^29).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hawq_ray.contract import HawqError
from hawq_ray.ops.registry import AtenCall, GraphNode, ProgramOp, register_ops
from hawq_ray.program.program import Op
from hawq_ray.quant.values import V, np_scale

WEIGHT_BITS = 7
MODES = ("nearest", "bilinear")

SEMANTICS = f"""inputs [x] (N, C, H, W); consts idx_h (Ho, T), w_h (Ho, T), idx_w (Wo, T), w_w (Wo, T) (int32:
input rows and columns and their non-negative weights, each row of weights summing to 2^(shift / 2)); attrs shift
(0 or {2 * WEIGHT_BITS}); out[n, c, i, j] = (sum_(a, b < T) w_h[i, a] w_w[j, b] x[n, c, idx_h[i, a], idx_w[j, b]]
+ (2^(shift-1) if shift else 0)) >> shift, in int64 (>> floors)."""


def axis_taps(size: int, out: int, mode: str, align_corners, scale) -> tuple:
    """(idx, w) of one axis, (out, T) int32 each: torch's interpolation of `size` points to `out`, read back from
    F.interpolate itself (nearest: the source index of an index-coded input; bilinear: the weights of one-hot
    inputs, rounded to WEIGHT_BITS bits, the remainder on each row's largest weight)."""
    kw = {"mode": "nearest"} if mode == "nearest" else {"mode": "linear", "align_corners": bool(align_corners)}
    given = {"scale_factor": scale} if scale is not None else {"size": out}
    if mode == "nearest":
        src = F.interpolate(torch.arange(size, dtype=torch.float64).view(1, 1, size), **given, **kw)
        return src.view(out, 1).round().to(torch.int32).numpy(), np.ones((out, 1), np.int32)
    basis = F.interpolate(torch.eye(size, dtype=torch.float64).view(size, 1, size), **given, **kw)
    weights = basis.view(size, out).T.numpy()                       # (out, size): row i's weight of input k
    taps = max(int((weights > 0).sum(1).max()), 1)
    idx = np.argsort(-weights, axis=1, kind="stable")[:, :taps]
    w = np.take_along_axis(weights, idx, 1)
    q = np.rint(w * (1 << WEIGHT_BITS)).astype(np.int64)
    q[np.arange(out), 0] += (1 << WEIGHT_BITS) - q.sum(1)           # each row sums to 2^WEIGHT_BITS
    return np.sort(idx, 1).astype(np.int32), np.take_along_axis(q, np.argsort(idx, 1), 1).astype(np.int32)


def resize_consts(shape: tuple, size: tuple, mode: str, align_corners, scale) -> tuple:
    scales = scale if isinstance(scale, (tuple, list)) else (scale, scale)
    (ih, wh), (iw, ww) = (axis_taps(shape[k], size[k], mode, align_corners, scales[k]) for k in range(2))
    return {"idx_h": ih, "w_h": wh, "idx_w": iw, "w_w": ww}, {"shift": 0 if mode == "nearest" else 2 * WEIGHT_BITS}


def execute_resize(op, ins):
    x, c = ins[0].to(torch.int64), op.consts
    ih, wh, iw, ww = (torch.as_tensor(np.asarray(c[k]), dtype=torch.int64) for k in ("idx_h", "w_h", "idx_w", "w_w"))
    h, w = x.shape[2:]
    shift = int(op.attrs["shift"])
    if ih.min() < 0 or ih.max() >= h or iw.min() < 0 or iw.max() >= w or wh.min() < 0 or ww.min() < 0 or \
            shift % 2 or not (wh.sum(1) == 1 << shift // 2).all() or not (ww.sum(1) == 1 << shift // 2).all():
        raise HawqError(f"{op.output}: resize taps outside the {h}x{w} input, negative weights or rows not summing "
                        f"to 2^(shift / 2); valid: the taps of `resize_consts`")
    rows = (x[:, :, ih, :] * wh.view(1, 1, *wh.shape, 1)).sum(3)                 # (N, C, Ho, W)
    out = (rows[:, :, :, iw] * ww.view(1, 1, 1, *ww.shape)).sum(4)               # (N, C, Ho, Wo)
    return (out + (1 << (shift - 1))) >> shift if shift else out


def resize_range(op, ins):
    return ins[0]


def _convert_resize(tracer, n, m):
    if m is not None:
        size, scale, mode, corners, recompute = m.size, m.scale_factor, m.mode, m.align_corners, \
            m.recompute_scale_factor
    else:
        a = dict(zip(("input", "size", "scale_factor", "mode", "align_corners", "recompute_scale_factor"), n.args)) \
            | dict(n.kwargs)
        size, scale, mode, corners, recompute = a.get("size"), a.get("scale_factor"), a.get("mode", "nearest"), \
            a.get("align_corners"), a.get("recompute_scale_factor")
        if a.get("antialias"):
            return None
    src = n.args[0] if n.args else n.kwargs.get("input")
    shape, out = tracer.shape(src), tracer.shape(n)
    if mode not in MODES or shape is None or len(shape) != 4:
        tracer.unsupported(f"{'module ' + repr(n.target) if m is not None else 'interpolate at ' + repr(n.name)} "
                           f"(mode {mode!r} of a rank-{len(shape or ())} value)",
                           f"{type(m).__name__ if m is not None else 'interpolate'} (nearest or bilinear, 2-D)")
    scale = None if size is not None or recompute else scale     # recomputed: torch resamples to the size
    return tracer.node(n, "resize", [src], attrs={"mode": mode, "align_corners": corners, "scale": scale,
                                                  "size": tuple(int(v) for v in out[2:])})


def resize_step(qm, node, ins):
    v, at = ins[0], node.attrs
    kw = {"mode": at["mode"]} | ({"align_corners": at["align_corners"]} if at["mode"] == "bilinear" else {})
    given = {"scale_factor": at["scale"]} if at["scale"] is not None else {"size": at["size"]}

    def resample(t):
        return F.interpolate(t, **given, **kw)
    if qm.mode != "qat":
        return V(None, v.s, resample(v.r), node.name, v.lo, v.hi)
    consts, attrs = resize_consts(tuple(v.q.shape[2:]), at["size"], at["mode"], at["align_corners"], at["scale"])
    name = qm.emit("resize", [v.name], node.name, consts=consts, attrs=attrs, scale=np_scale(v.s), lo=v.lo, hi=v.hi)
    q = execute_resize(Op("resize", [v.name], name, attrs=attrs, consts=consts), [v.q])
    return V(q, v.s, qm.real(qm.lazy(v, resample), q, v.s), name, v.lo, v.hi)


def _scale_factors(scales):
    """ATen's per-axis scale factors as interpolate's: one number where the axes agree (None when absent)."""
    return None if scales is None else scales[0] if len(set(scales)) == 1 else tuple(scales)


def _nearest_args(args, kwargs):
    """aten.upsample_nearest2d.vec(x, output_size, scale_factors) as F.interpolate's arguments."""
    x, size, scales = args
    return (x,), {"size": size, "scale_factor": _scale_factors(scales), "mode": "nearest"}


def _bilinear_args(args, kwargs):
    """aten.upsample_bilinear2d.vec(x, output_size, align_corners, scale_factors) as F.interpolate's arguments."""
    x, size, corners, scales = args
    return (x,), {"size": size, "scale_factor": _scale_factors(scales), "mode": "bilinear", "align_corners": corners}


register_ops(
    GraphNode("resize", resize_step, modules=(nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
              functions=(F.interpolate,), convert=_convert_resize, nonneg=all,
              supported="Upsample / interpolate (nearest, bilinear)",
              aten={torch.ops.aten.upsample_nearest2d.vec: AtenCall(F.interpolate, _nearest_args),
                    torch.ops.aten.upsample_bilinear2d.vec: AtenCall(F.interpolate, _bilinear_args)}),
    ProgramOp("resize", SEMANTICS, execute_resize, resize_range),
)
