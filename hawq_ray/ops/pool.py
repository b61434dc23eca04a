"""Pooling (graph nodes `avgpool`, `maxpool`; program ops `sum_pool2d`, `max_pool2d`).

Average pooling runs on the INT32 values (Appendix E: pooling 4-bit data loses information): a window sum,
then a dyadic requantize by 1/count (per output position where the counts differ). Max pooling takes the
max of the integers, which keep their scale.
"""
from __future__ import annotations

import math
import operator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hawq_ray.ops.registry import HANDLED, AtenCall, GraphNode, ProgramOp, as_pair, register_ops
from hawq_ray.program.dyadic import dyadic, requantize
from hawq_ray.program.integer import pool_pad, windows
from hawq_ray.quant.values import V, dyadic_consts, np_scale

SUM_POOL = """inputs [x]; attrs kernel, stride, padding, ceil_mode; out = the sum of each window, zero padding
(INT32; the division by the window's count is the requantize that follows, Appendix E). With attrs adaptive
(oh, ow) and kernel (the largest window): torch's adaptive windows, rows [floor(i H / oh), ceil((i + 1) H / oh))."""
MAX_POOL = """inputs [x]; attrs kernel, stride, padding, dilation, ceil_mode; out = the max of each window;
padding never wins."""


def _attrs(kernel, stride, padding, ceil_mode, dilation=1, count_include_pad=True):
    stride = kernel if stride is None or stride == [] else stride
    return {"kernel": as_pair(kernel), "stride": as_pair(stride), "padding": as_pair(padding),
            "dilation": as_pair(dilation), "ceil_mode": bool(ceil_mode), "count_include_pad": bool(count_include_pad)}


# ---------------------------------------------------------------------------------------------- tracing

_AVG_ARGS = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _convert_avg(tracer, n, m):
    if isinstance(m, nn.AvgPool2d) or n.target is F.avg_pool2d:
        if m is None:               # F.avg_pool2d(x, kernel_size, stride=None, padding=0, ...)
            given = dict(zip(_AVG_ARGS, n.args[1:])) | dict(n.kwargs)
            m = nn.AvgPool2d(**{k: v for k, v in given.items() if k in _AVG_ARGS})
        if m.divisor_override is not None:
            tracer.unsupported(f"{n.target!r} (divisor_override)", "AvgPool2d")
        return tracer.node(n, "avgpool", [n.args[0]], attrs=_attrs(m.kernel_size, m.stride, m.padding,
                                                                   m.ceil_mode, 1, m.count_include_pad))
    if n.op == "call_method" or n.target in (torch.mean, torch.sum):      # x.mean((2, 3)[, keepdim]), x.sum(1)
        return _convert_mean(tracer, n)
    size = m.output_size if m is not None else (n.args[1] if len(n.args) > 1 else n.kwargs["output_size"])
    if as_pair(size) == (1, 1):
        return tracer.node(n, "avgpool", [n.args[0]], attrs={"global": True})
    return tracer.node(n, "avgpool", [n.args[0]], attrs={"adaptive": as_pair(size)})


def adaptive_windows(size: int, out: int) -> list:
    """torch's adaptive pooling windows along one axis: [floor(i size / out), ceil((i + 1) size / out))."""
    return [((i * size) // out, -(-((i + 1) * size) // out)) for i in range(out)]


def adaptive_sums(x: torch.Tensor, out: tuple) -> torch.Tensor:
    """The window sums of adaptive pooling to `out` (exact on integer tensors: int64 sums)."""
    rows, cols = adaptive_windows(x.shape[2], out[0]), adaptive_windows(x.shape[3], out[1])
    return torch.stack([torch.stack([x[:, :, a:b, c:d].sum(dim=(2, 3)) for c, d in cols], -1)
                        for a, b in rows], -2)


def _convert_mean(tracer, n):
    """A mean over axes after the batch's is a global average pool (`_reduce`); a sum (split attention's sum over
    its radix) is the same pool without the division."""
    pooled = {"global": True} | ({"sum": True} if n.target in (torch.sum, "sum") else {})
    return _reduce(tracer, n, n.name, "avgpool", lambda window: pooled)


def _reduce(tracer, n, name: str, kind: str, attrs_of):
    """`n`, a reduction over axes after the batch's (`x.mean(dims[, keepdim])`), as a global pool of `kind`
    whose output is graph value `name` (added; HANDLED): over H and W of a map directly (then a flatten unless
    keepdim); over others (tokens: ViT's average pooling; CBAM's channels; a channels-last map's H and W) after a
    permute that puts the kept axes first and a reshape to (N, kept, reduced, 1), the pool's output reshaped
    back. `attrs_of(window)`: the pool's attrs for the (rows, columns) it reduces. None where `n` is not such a
    reduction."""
    src = n.args[0]
    if not tracer.is_tensor(src):
        return None
    shape = tracer.shape(src)
    rank = len(shape)
    dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
    keep = n.args[2] if len(n.args) > 2 else n.kwargs.get("keepdim", False)
    if dims is None or n.kwargs.get("dtype") is not None:
        return None
    axes = sorted({d % rank for d in (dims if isinstance(dims, (list, tuple)) else [dims])})
    if not axes or axes[0] == 0:
        return None
    kept = [a for a in range(1, rank) if a not in axes]
    order = [0, *kept, *axes]
    from hawq_ray.ops.layout import per_channel_source   # here: layout registers last (`ops/__init__`)
    x = tracer.src(src)
    wide = per_channel_source(tracer, src)              # a layer's per-channel scales: one scale first
    if order != list(range(rank)):
        x = tracer.make(f"{name}.order", "permute", [x], attrs={"dims": tuple(order), "wide": wide}).name
        wide = False
    kept_sizes = [int(shape[a]) for a in kept]
    window = tuple(int(shape[a]) for a in axes)
    if rank != 4 or len(axes) != 2:
        window = (math.prod(window), 1)
        x = tracer.make(f"{name}.rows", "reshape", [x], attrs={
            "shape": (-1, math.prod(kept_sizes), *window), "wide": wide}).name
    pooled = attrs_of(window)
    if keep and order == list(range(rank)) and rank == 4:
        tracer.make(name, kind, [x], attrs=pooled)
        return HANDLED
    pool = tracer.make(f"{name}.pool", kind, [x], attrs=pooled)
    out = [1 if a in axes else int(shape[a]) for a in range(1, rank)] if keep else kept_sizes
    if len(out) == 1:
        tracer.make(name, "flatten", [pool.name])
    else:
        tracer.make(name, "reshape", [pool.name], attrs={"shape": (-1, *out), "wide": False})
    return HANDLED


def _convert_reduce_max(tracer, n):
    """A max over axes after the batch's (CBAM's spatial gate: `x.max(dim=1)[0]`, `x.amax(1, keepdim=True)`) is a
    max pool whose window is the reduced axes (`_reduce`): integers keep their scale. `x.max(dim)` and
    `torch.max(x, dim)` return (values, indices): the values wait for the `[0]` / `.values` that reads them;
    the indices are refused."""
    if len(n.args) > 1 and tracer.is_tensor(n.args[1]):
        return None                                 # torch.max(a, b): the element-wise max of two tensors
    pooled = lambda window: _attrs(window, window, 0, False, 1)     # noqa: E731
    if n.target in (torch.amax, "amax"):
        return _reduce(tracer, n, n.name, "maxpool", pooled)
    if _reduce(tracer, n, f"{n.name}.values", "maxpool", pooled) is None:
        return None
    tracer.pending[n.name] = ("values", f"{n.name}.values")
    return HANDLED


def _convert_values(tracer, n):
    """`[0]` / `.values` of a max over axes (`_convert_reduce_max`): the max pool's output."""
    state = tracer.pending.get(getattr(n.args[0], "name", None))
    if state is None or state[0] != "values" or n.args[1] not in (0, "values"):
        return None
    tracer.alias[n.name] = state[1]
    return HANDLED


_MAX_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")


def _convert_max(tracer, n, m):
    if n.target in (operator.getitem, getattr):
        return _convert_values(tracer, n)
    if n.target in (torch.max, torch.amax, "max", "amax"):
        return _convert_reduce_max(tracer, n)
    if isinstance(m, nn.AdaptiveMaxPool2d) or n.target is F.adaptive_max_pool2d:
        return _convert_global_max(tracer, n, m)
    if m is None:                   # F.max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode)
        given = dict(zip(_MAX_ARGS, n.args[1:])) | dict(n.kwargs)
        if given.get("return_indices"):
            return None
        m = nn.MaxPool2d(**{k: v for k, v in given.items() if k in _MAX_ARGS})
    return tracer.node(n, "maxpool", [n.args[0]], attrs=_attrs(m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                                               m.dilation))


def _convert_global_max(tracer, n, m):
    """Adaptive max pooling to 1x1 (CBAM's and DPN's channel descriptors): a max pool whose window is the map.
    With return_indices (the form torch.export records, `aten.adaptive_max_pool2d` returning (values, indices))
    the values wait for their `[0]`, as a max over axes (`_convert_values`)."""
    size = m.output_size if m is not None else (n.args[1] if len(n.args) > 1 else n.kwargs["output_size"])
    indices = m.return_indices if m is not None else bool(n.kwargs.get("return_indices", False))
    shape = tracer.shape(n.args[0])
    if as_pair(size) != (1, 1) or shape is None or len(shape) != 4 or (indices and m is not None):
        return None
    window = tuple(int(v) for v in shape[2:])
    if not indices:
        return tracer.node(n, "maxpool", [n.args[0]], attrs=_attrs(window, window, 0, False, 1))
    tracer.make(f"{n.name}.values", "maxpool", [tracer.src(n.args[0])], attrs=_attrs(window, window, 0, False, 1))
    tracer.pending[n.name] = ("values", f"{n.name}.values")
    return HANDLED


# ---------------------------------------------------------------------------------------------- QAT steps

def avgpool_step(qm, node, ins):
    """A window sum on INT32, then a dyadic 1/count requantization (Appendix E)."""
    v = ins[0]
    at = node.attrs
    shape = (v.q if v.q is not None else v.r).shape
    if at.get("adaptive"):
        out = tuple(o if o is not None else s for o, s in zip(at["adaptive"], shape[2:]))
        if shape[2] % out[0] or shape[3] % out[1]:
            return _adaptive_step(qm, node, v, out)
        k = st = (shape[2] // out[0], shape[3] // out[1])         # equal windows: a plain pool
        pad, ceil, incl = (0, 0), False, True
    elif at.get("global"):
        k, st, pad, ceil, incl = tuple(shape[2:]), tuple(shape[2:]), (0, 0), False, True
    else:
        k, st, pad, ceil, incl = at["kernel"], at["stride"], at["padding"], at["ceil_mode"], at["count_include_pad"]
    if at.get("sum"):
        return _sum_step(qm, node, v)
    if qm.mode != "qat":
        return V(None, v.s, F.avg_pool2d(v.r, k, st, pad, ceil, incl), node.name)
    real = qm.lazy(v, lambda t: F.avg_pool2d(t, k, st, pad, ceil, incl))
    size = tuple(v.q.shape[2:])
    out = tuple(F.avg_pool2d(torch.zeros((1, 1, *size)), k, st, pad, ceil).shape[2:])
    # ceil_mode's last windows reach past the padding: zeros added at the end make them floor-mode windows
    extra = [max(0, (out[i] - 1) * st[i] + k[i] - (size[i] + 2 * pad[i])) for i in range(2)]
    src = v.name
    if ceil and any(extra):
        pads = ((0, 0), (0, 0), (pad[0], pad[0] + extra[0]), (pad[1], pad[1] + extra[1]))
        src = qm.emit("pad", [v.name], f"{node.name}.pad", attrs={"pads": pads}, scale=np_scale(v.s), lo=v.lo,
                      hi=v.hi)
    padded = F.pad(v.q.to(torch.float64), (pad[1], pad[1] + extra[1], pad[0], pad[0] + extra[0]))
    total = torch.round(F.avg_pool2d(padded, k, st, 0, False, True, divisor_override=1))
    inv = 1.0 / np.outer(*(window_counts(size[i], k[i], st[i], pad[i], out[i], incl) for i in range(2)))[None]
    if np.all(inv == inv.flat[0]):
        inv = np.asarray(inv.flat[0])
    b, c = dyadic(inv)
    b, c = torch.from_numpy(b).to(v.q.device), torch.from_numpy(c).to(v.q.device)
    q = requantize(total.to(torch.int64), b, c)
    sum_name = qm.emit("sum_pool2d", [src], f"{node.name}.sum", attrs={
        "kernel": tuple(k), "stride": tuple(st), "padding": (0, 0) if src != v.name else tuple(pad),
        "ceil_mode": False})
    qm.emit("requantize", [sum_name], node.name, consts=dyadic_consts(b, c), scale=np_scale(v.s), lo=v.lo, hi=v.hi)
    return V(q, v.s, qm.real(real, q, v.s), node.name, v.lo, v.hi)


def window_counts(size: int, k: int, s: int, p: int, out: int, include_pad: bool) -> np.ndarray:
    """torch's divisor of average pooling along one axis, per output position: the window [o s - p, o s - p + k)
    cut at size + p (ceil_mode's last windows), and at [0, size) unless the padding counts."""
    start = np.arange(out) * s - p
    end = np.minimum(start + k, size + p)
    return (end - start if include_pad else np.minimum(end, size) - np.maximum(start, 0)).astype(np.float64)


def _sum_step(qm, node, v):
    """The INT32 sum over H and W at the input's scale (`sum_pool2d` over the whole map); its reader
    requantizes it, as a conv's accumulator."""
    real = qm.lazy(v, lambda t: t.sum((2, 3), keepdim=True)) if qm.mode == "qat" else v.r.sum((2, 3), keepdim=True)
    if qm.mode != "qat":
        return V(None, v.s, real, node.name)
    count = v.q.shape[2] * v.q.shape[3]
    q = v.q.to(torch.int64).sum((2, 3), keepdim=True)
    lo, hi = min(v.lo, 0) * count, max(v.hi, 0) * count         # `sum_range`
    qm.emit("sum_pool2d", [v.name], node.name, scale=np_scale(v.s), lo=lo, hi=hi,
            attrs={"kernel": tuple(v.q.shape[2:]), "stride": tuple(v.q.shape[2:]), "padding": (0, 0),
                   "ceil_mode": False})
    return V(q, v.s, qm.real(real, q, v.s), node.name, lo, hi)


def _adaptive_step(qm, node, v, out):
    """Adaptive pooling with windows of unequal size: their INT32 sums, then a dyadic 1/count per position."""
    if qm.mode != "qat":
        return V(None, v.s, F.adaptive_avg_pool2d(v.r, out), node.name)
    rows, cols = adaptive_windows(v.q.shape[2], out[0]), adaptive_windows(v.q.shape[3], out[1])
    counts = np.array([[(b - a) * (d - c) for c, d in cols] for a, b in rows], np.float64)[None]
    mult, shift = dyadic(1.0 / counts)
    b, c = torch.from_numpy(mult).to(v.q.device), torch.from_numpy(shift).to(v.q.device)
    q = requantize(adaptive_sums(v.q.to(torch.int64), out), b, c)
    kernel = (max(e - s for s, e in rows), max(e - s for s, e in cols))
    sum_name = qm.emit("sum_pool2d", [v.name], f"{node.name}.sum", attrs={"adaptive": tuple(out), "kernel": kernel})
    qm.emit("requantize", [sum_name], node.name, consts=dyadic_consts(b, c), scale=np_scale(v.s), lo=v.lo, hi=v.hi)
    real = qm.lazy(v, lambda t: F.adaptive_avg_pool2d(t, out))
    return V(q, v.s, qm.real(real, q, v.s), node.name, v.lo, v.hi)


def maxpool_step(qm, node, ins):
    v = ins[0]
    at = node.attrs
    args = (at["kernel"], at["stride"], at["padding"], at["dilation"], at["ceil_mode"])
    if qm.mode != "qat":
        return V(None, v.s, F.max_pool2d(v.r, *args), node.name)
    if qm.training and torch.is_grad_enabled():   # the integers at the surrogate's argmax
        real, idx = F.max_pool2d(v.r, *args, return_indices=True)
        q = v.q.flatten(2).gather(2, idx.flatten(2)).view_as(idx)
    else:
        real = qm.lazy(v, lambda t: F.max_pool2d(t, *args))
        q = torch.round(F.max_pool2d(v.q.to(torch.float64), *args)).to(torch.int64)
    qm.emit("max_pool2d", [v.name], node.name, scale=np_scale(v.s), lo=v.lo, hi=v.hi,
            attrs={"kernel": args[0], "stride": args[1], "padding": args[2], "dilation": args[3],
                   "ceil_mode": args[4]})
    return V(q, v.s, qm.real(real, q, v.s), node.name, v.lo, v.hi)


# ---------------------------------------------------------------------------------------------- executor

def execute_sum(op, ins):
    a = op.attrs
    if a.get("adaptive"):
        return adaptive_sums(ins[0].to(torch.int64), tuple(a["adaptive"]))
    x = pool_pad(ins[0].to(torch.int64), a["kernel"], a["stride"], a["padding"], a["ceil_mode"], 0)
    return windows(x, a["kernel"], a["stride"], (1, 1)).sum(dim=(-1, -2))


def execute_max(op, ins):
    a = op.attrs
    x = pool_pad(ins[0].to(torch.int64), a["kernel"], a["stride"], a["padding"], a["ceil_mode"],
                 torch.iinfo(torch.int64).min, a["dilation"])
    return windows(x, a["kernel"], a["stride"], a["dilation"]).amax(dim=(-1, -2))


def sum_range(op, ins):
    k = int(np.prod(op.attrs["kernel"]))
    return k * min(ins[0][0], 0), k * max(ins[0][1], 0)


aten = torch.ops.aten


def _pool_args(args, kwargs):
    """aten's pooling (x, kernel, stride, ...) with the empty stride that means "the kernel" made None, as
    F.avg_pool2d / F.max_pool2d take it."""
    args = list(args)
    if len(args) > 2 and not args[2]:
        args[2] = None
    return tuple(args), kwargs


def _with_indices(args, kwargs):
    """aten.adaptive_max_pool2d returns (values, indices), which the export graph reads with getitem."""
    return args, dict(kwargs) | {"return_indices": True}


register_ops(
    GraphNode("avgpool", avgpool_step, modules=(nn.AvgPool2d, nn.AdaptiveAvgPool2d),
              functions=(F.adaptive_avg_pool2d, F.avg_pool2d, torch.mean, torch.sum), methods=("mean", "sum"),
              convert=_convert_avg,
              nonneg=all, supported="AvgPool2d, AdaptiveAvgPool2d, mean / sum over axes after the batch's",
              aten={aten.adaptive_avg_pool2d.default: F.adaptive_avg_pool2d,
                    aten.avg_pool2d.default: AtenCall(F.avg_pool2d, _pool_args), aten.mean.dim: torch.mean,
                    aten.mean.default: torch.mean, aten.sum.dim_IntList: torch.sum}),
    GraphNode("maxpool", maxpool_step, modules=(nn.MaxPool2d, nn.AdaptiveMaxPool2d),
              functions=(F.max_pool2d, F.adaptive_max_pool2d, torch.max, torch.amax, operator.getitem, getattr),
              methods=("max", "amax"), convert=_convert_max, nonneg=all,
              supported="MaxPool2d, AdaptiveMaxPool2d to 1x1, max / amax over axes after the batch's",
              aten={aten.max_pool2d.default: AtenCall(F.max_pool2d, _pool_args), aten.max.dim: torch.max,
                    aten.amax.default: torch.amax,
                    aten.adaptive_max_pool2d.default: AtenCall(F.adaptive_max_pool2d, _with_indices)}),
    ProgramOp("sum_pool2d", SUM_POOL, execute_sum, sum_range),
    ProgramOp("max_pool2d", MAX_POOL, execute_max, lambda op, r: r[0]),
)
