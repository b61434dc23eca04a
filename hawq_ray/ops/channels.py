"""Channel rearrangements of integer tensors (graph nodes `shuffle`, `slice`, `gather`; program ops `channel_shuffle`,
`slice`, `channel_gather`): ShuffleNet's channel shuffle (view as (N, g, C/g, H, W), transpose groups and channels,
view back), its split of the channels in two (`chunk` / `split` along dim 1), and channels picked by a fixed index
(`index_select`, `x[:, index]` with a list or a tensor constant, `x[:, a:b:k]`). The integers and their scales move
with their channels; nothing is computed.

torch.fx sees a shuffle as three calls with shapes computed from `x.size()`; the converters read the concrete shapes
(`tracer.shape`) and record the 5-D view and its transpose as values in the making until the view back to 4-D makes
the node.
"""
from __future__ import annotations

import operator

import numpy as np
import torch

from hawq_ray.contract import HawqError
from hawq_ray.ops.registry import HANDLED, GraphNode, ProgramOp, register_ops
from hawq_ray.quant.values import V, np_scale

SHUFFLE = """inputs [x] (N, C, H, W); attrs groups g (C % g == 0);
out = x.reshape(N, g, C / g, H, W).transpose(1, 2).reshape(N, C, H, W): out channel j g + i is input channel i C/g + j."""
SLICE = """inputs [x] (N, C, H, W); attrs start, stop; out = x[:, start:stop]."""
GATHER = """inputs [x] (N, C, H, W); consts index (C_out,) int32, 0 <= index < C; out = x[:, index] (channels
picked, repeated or reordered)."""


# ---------------------------------------------------------------------------------------------- tracing

def _convert_view(tracer, n, m):
    """view / reshape / transpose / flatten calls of a channel shuffle."""
    src = n.args[0]
    out = tracer.shape(n)
    if src.name in tracer.pending:
        state = tracer.pending[src.name]
        if n.target == "contiguous":
            tracer.pending[n.name] = state
            return HANDLED
        if state[0] == "split" and n.target in ("transpose", torch.transpose) and \
                sorted(a % 5 for a in n.args[1:3]) == [1, 2]:
            tracer.pending[n.name] = ("swapped",) + state[1:]
            return HANDLED
        if state[0] == "swapped" and out is not None and len(out) == 4:
            return tracer.node(n, "shuffle", [state[1]], attrs={"groups": state[2]})
        return None
    if not tracer.is_tensor(src) or n.target not in ("view", "reshape"):
        return None
    before = tracer.shape(src)
    if before is None or len(before) != 4 or out is None:
        return None
    if tuple(out) == tuple(before):
        tracer.alias[n.name] = tracer.alias[src.name]        # a view to the same shape
        return HANDLED
    if len(out) == 5 and out[0] == before[0] and out[1] * out[2] == before[1] and tuple(out[3:]) == before[2:]:
        tracer.pending[n.name] = ("split", src, int(out[1]))
        return HANDLED
    return None


def _convert_split(tracer, n, m):
    """x.chunk(k, dim=1) / torch.split(x, sizes, dim=1): the parts wait for their getitem."""
    dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0)
    parts = tracer.shape(n)
    if not tracer.is_tensor(n.args[0]) or dim % 4 != 1 or not parts:
        return None
    bounds, start = [], 0
    for shape in parts:
        bounds.append((start, start + int(shape[1])))
        start += int(shape[1])
    tracer.pending[n.name] = ("parts", n.args[0], bounds)
    return HANDLED


def _convert_getitem(tracer, n, m):
    state = tracer.pending.get(getattr(n.args[0], "name", None))
    if state is None or state[0] != "parts" or not isinstance(n.args[1], int):
        return None
    start, stop = state[2][n.args[1]]
    return tracer.node(n, "slice", [state[1]], attrs={"start": start, "stop": stop})


def _constant_index(tracer, a, channels: int):
    """The channel indices of a fixed index (a list, a range's slice, a tensor constant read in forward), or None."""
    if isinstance(a, slice):
        return list(range(channels))[a]
    if isinstance(a, (list, tuple)) and all(isinstance(i, int) for i in a):
        return [i % channels for i in a]
    if tracer.is_tensor(a) and tracer.by_name[tracer.src(a)].kind == "constant":
        value = tracer.tensor(a)
        if value.dim() == 1 and not value.is_floating_point() and value.dtype != torch.bool:
            return [int(i) % channels for i in value.tolist()]
    return None


def _convert_gather(tracer, n, m):
    """`torch.index_select(x, 1, index)` and `x[:, index]` of a map by a fixed index; `x[:, a:b:k]`."""
    src = n.args[0]
    if not tracer.is_tensor(src) or tracer.shape(src) is None or len(tracer.shape(src)) not in (2, 4):
        return None
    channels = int(tracer.shape(src)[1])
    if n.target is operator.getitem:
        index = n.args[1]
        if not (isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None)):
            return None
        picked = _constant_index(tracer, index[1], channels)
    else:
        a = dict(zip(("input", "dim", "index"), n.args)) | dict(n.kwargs)
        picked = _constant_index(tracer, a["index"], channels) if a["dim"] % 4 == 1 else None
    if not picked or picked == list(range(channels)):
        return None
    if len(tracer.shape(src)) == 2:
        return _gather_features(tracer, n, picked)
    if picked == list(range(picked[0], picked[-1] + 1)):
        return tracer.node(n, "slice", [src], attrs={"start": picked[0], "stop": picked[-1] + 1})
    return tracer.node(n, "gather", [src], attrs={"index": tuple(picked)})


def _gather_features(tracer, n, picked: list):
    """Features (N, C) picked by a fixed index (CondenseNet's `index_select` in front of its classifier): the gather
    of a (N, C, 1, 1) map between two reshapes; a layer's per-feature scales are requantized to one first."""
    from hawq_ray.ops.layout import per_channel_source      # here: layout registers last (`ops/__init__`)
    src = n.args[0]
    channels = int(tracer.shape(src)[1])
    x = tracer.make(f"{n.name}.map", "reshape", [tracer.src(src)],
                    attrs={"shape": (-1, channels, 1, 1), "wide": per_channel_source(tracer, src)})
    x = tracer.make(f"{n.name}.gather", "gather", [x.name], attrs={"index": tuple(picked)})
    tracer.make(n.name, "reshape", [x.name], attrs={"shape": (-1, len(picked)), "wide": False})
    return HANDLED


# ---------------------------------------------------------------------------------------------- QAT steps

def _permutation(channels: int, groups: int, device) -> torch.Tensor:
    return torch.arange(channels, device=device).view(groups, channels // groups).t().reshape(-1)


def _rearranged(qm, node, v: V, index, op: str, attrs: dict, consts=None) -> V:
    """v with its channels `index` (a slice or a permutation): integers, per-channel scale and float alike."""
    def take(t):
        return t[:, index]
    s = v.s
    if s is not None and s.dim() == 1:
        s = s[index]
    if qm.mode != "qat":
        return V(None, s, take(v.r), node.name)
    q = take(v.q)
    name = qm.emit(op, [v.name], node.name, attrs=attrs, consts=consts or {}, scale=np_scale(s), lo=v.lo, hi=v.hi)
    return V(q, s, qm.lazy(v, take), name, v.lo, v.hi)


def shuffle_step(qm, node, ins):
    v = ins[0]
    c = (v.q if v.q is not None else v.r).shape[1]
    g = node.attrs["groups"]
    return _rearranged(qm, node, v, _permutation(c, g, v.device), "channel_shuffle", {"groups": g})


def slice_step(qm, node, ins):
    a, b = node.attrs["start"], node.attrs["stop"]
    return _rearranged(qm, node, ins[0], slice(a, b), "slice", {"start": a, "stop": b})


def gather_step(qm, node, ins):
    index = torch.tensor(node.attrs["index"], dtype=torch.int64, device=ins[0].device)
    return _rearranged(qm, node, ins[0], index, "channel_gather",
                       {}, consts={"index": np.asarray(node.attrs["index"], np.int32)})


# ---------------------------------------------------------------------------------------------- executor

def execute_shuffle(op, ins):
    x = ins[0]
    n, c, h, w = x.shape
    g = op.attrs["groups"]
    return x.reshape(n, g, c // g, h, w).transpose(1, 2).reshape(n, c, h, w)


def execute_slice(op, ins):
    return ins[0][:, op.attrs["start"]:op.attrs["stop"]]


def execute_gather(op, ins):
    index = torch.as_tensor(np.asarray(op.consts["index"]), dtype=torch.int64)
    c = ins[0].shape[1]
    if index.dim() != 1 or not len(index) or index.min() < 0 or index.max() >= c:
        raise HawqError(f"{op.output}: channel_gather index of shape {tuple(index.shape)} with values outside "
                        f"0..{c - 1}; valid: a 1-D index of channels of x")
    return ins[0].index_select(1, index)


register_ops(
    GraphNode("shuffle", shuffle_step, functions=(torch.transpose, torch.reshape, torch.flatten),
              methods=("view", "reshape", "transpose", "flatten", "contiguous"), convert=_convert_view, nonneg=all,
              supported="channel shuffle (view, transpose, view)"),
    GraphNode("slice", slice_step, functions=(torch.chunk, torch.split, operator.getitem), methods=("chunk", "split"),
              convert=lambda t, n, m: (_convert_getitem if n.target is operator.getitem else _convert_split)(t, n, m),
              nonneg=all, supported="chunk / split of the channels",
              aten={torch.ops.aten.split.Tensor: torch.split, torch.ops.aten.split_with_sizes.default: torch.split}),
    ProgramOp("channel_shuffle", SHUFFLE, execute_shuffle, lambda op, r: r[0],
              channelwise=lambda op: False),
    ProgramOp("slice", SLICE, execute_slice, lambda op, r: r[0]),
    GraphNode("gather", gather_step, functions=(torch.index_select, operator.getitem), methods=("index_select",),
              convert=_convert_gather, nonneg=all, supported="x[:, index] / index_select of channels by a fixed index",
              aten={torch.ops.aten.index_select.default: torch.index_select}),
    ProgramOp("channel_gather", GATHER, execute_gather, lambda op, r: r[0]),
)
