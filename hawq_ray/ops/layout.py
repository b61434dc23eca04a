"""Moving integers without computing (graph nodes `reshape`, `permute`, `take`, `roll`, `pad`, `crop`, `constant`;
program ops of the same names): what a vision transformer does between its layers. The patch embedding's
(N, C, h, w) map becomes tokens (N, h w, C) (`flatten(2).transpose(1, 2)`), a qkv Linear's output is split into heads
(`reshape(N, T, 3, H, D).permute(2, 0, 3, 1, 4)`, then `[0]` or `unbind(0)`), keys are transposed, heads merged
back, the class token picked (`x[:, 0]`); Swin's windows are shifted cyclically (`roll`), its map padded with zeros
to a multiple of the window and cropped back (`pad`, `crop`; `ops.channels`' `slice` is the channel slice of a map,
which keeps its per-channel scales); the class token and the position embedding are parameters read in `forward`
(`constant`).

Shapes in the program are per sample: a reshape's target shape holds -1 at the one axis that grows with the batch
(found by tracing at two batch sizes), so one program runs at any batch; a permute's dims and a take's axis are
positions in the full value, the batch axis included.

A per-tensor scale moves with its integers unchanged. A Linear's or a conv's INT32 output has one scale per feature,
which a reshape would scatter over new axes: such a value is requantized first, to a static per-tensor scale at
16-bit resolution (like a residual branch), and the layout op moves the INT16 codes.

A parameter read in `forward` (a class token, a position embedding) is a `constant` value: the op that reads it
(`add`, `cat`: `ops.join`) quantizes it to its own output scale, so it lives on the grid of what it is added to or
concatenated with; QAT trains it through the straight-through estimator.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hawq_ray.contract import HawqError
from hawq_ray.ops.registry import HANDLED, AtenCall, GraphNode, ProgramOp, register_ops, spread_sizes
from hawq_ray.quant.values import WIDE_BITS, V, np_scale

RESHAPE = """inputs [x]; attrs shape (per-sample shape with -1 at the one axis that grows with the batch);
out = x.reshape(shape)."""
PERMUTE = """inputs [x]; attrs dims (a permutation of the axes, the batch axis included); out = x.permute(dims)."""
ROLL = """inputs [x]; attrs shifts, dims (equal lengths, never the batch axis); out = torch.roll(x, shifts, dims):
a cyclic shift, out[..., i, ...] = x[..., (i - shift) mod size, ...] along each axis."""
TAKE = """inputs [x]; attrs axis, index; out = x.select(axis, index) (the axis dropped)."""
PAD = """inputs [x]; attrs pads (one (before, after) pair of non-negative ints per axis, the batch axis (0, 0));
out = x with `before` zeros in front of and `after` zeros behind each axis (code 0 is 0 on every scale: the
quantizers are symmetric)."""
CROP = """inputs [x]; attrs axes, starts, stops (equal lengths, distinct axes, never the batch axis,
0 <= start < stop <= size);
out = x[..., start:stop, ...] along each axis (step 1)."""
CONSTANT = """inputs [x] (read for its batch size only); consts value (1, ...) int32; out = value repeated along
axis 0 to x's batch."""

LAYERS = ("conv", "linear")          # producers whose values carry one scale per channel
KEEP_SCALES = ("relu", "clamp", "maxpool", "avgpool", "flatten")      # pooling keeps each channel's scale


# ---------------------------------------------------------------------------------------------- tracing

def per_channel_source(tracer, arg) -> bool:
    """Whether the value holds a layer's per-channel scales: a conv's or Linear's output, or one seen through ops
    that keep them (ReLU, a clamp, max pooling)."""
    node = tracer.by_name[tracer.src(arg)]
    while node.kind in KEEP_SCALES and node.inputs:
        node = tracer.by_name[node.inputs[0]]
    return node.kind in LAYERS


def _node(tracer, n, kind, attrs):
    src = n.args[0]
    return tracer.node(n, kind, [src], attrs=attrs | {"wide": per_channel_source(tracer, src)})


def _batch_shape(tracer, n) -> tuple | None:
    """n's per-sample shape with -1 at the axis that grows with the batch, or None if there is not exactly one."""
    two, three = tracer.shape(n), tracer.shape(n, batch=3)
    if two is None or three is None or len(two) != len(three):
        return None
    grows = [i for i, (a, b) in enumerate(zip(two, three)) if a != b]
    if len(grows) != 1 or two[grows[0]] * 3 != three[grows[0]] * 2:
        return None
    return tuple(-1 if i == grows[0] else int(d) for i, d in enumerate(two))


def _convert_reshape(tracer, n, m):
    if not tracer.is_tensor(n.args[0]):
        return None
    shape = _batch_shape(tracer, n)
    if shape is None:
        return None
    if tuple(tracer.shape(n)) == tuple(tracer.shape(n.args[0])):
        tracer.alias[n.name] = tracer.src(n.args[0])         # a reshape to the same shape
        return HANDLED
    return _node(tracer, n, "reshape", {"shape": shape})


def _convert_permute(tracer, n, m):
    if not tracer.is_tensor(n.args[0]):
        return None
    rank = len(tracer.shape(n.args[0]))
    if n.target in ("transpose", torch.transpose, "swapaxes", torch.swapaxes):
        a, b = (d % rank for d in n.args[1:3])
        dims = list(range(rank))
        dims[a], dims[b] = dims[b], dims[a]
    else:
        dims = n.args[1] if len(n.args) == 2 and isinstance(n.args[1], (tuple, list)) else n.args[1:]
        dims = [d % rank for d in n.kwargs.get("dims", dims)]
    if sorted(dims) != list(range(rank)):
        return None
    if dims == list(range(rank)):
        tracer.alias[n.name] = tracer.src(n.args[0])
        return HANDLED
    return _node(tracer, n, "permute", {"dims": tuple(dims)})


def _convert_unbind(tracer, n, m):
    dim = n.kwargs.get("dim", n.args[1] if len(n.args) > 1 else 0)
    if not tracer.is_tensor(n.args[0]):
        return None
    tracer.pending[n.name] = ("unbind", tracer.src(n.args[0]), dim % len(tracer.shape(n.args[0])),
                              per_channel_source(tracer, n.args[0]))
    return HANDLED


def _convert_chunk(tracer, n, m):
    """`x.chunk(k, dim)` into equal parts along an axis that is not a map's channels (`ops.channels` takes those):
    a reshape of the axis into (k, size / k) whose parts the getitems take."""
    src = n.args[0]
    if not tracer.is_tensor(src):
        return None
    shape = _batch_shape(tracer, src)
    parts = n.args[1] if len(n.args) > 1 else n.kwargs.get("chunks")
    if shape is None or not isinstance(parts, int):
        return None
    dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0) % len(shape)
    if shape[dim] == -1 or shape[dim] % parts:
        return None
    split = shape[:dim] + (parts, shape[dim] // parts) + shape[dim + 1:]
    node = tracer.make(f"{n.name}.parts", "reshape", [tracer.src(src)],
                       attrs={"shape": split, "wide": per_channel_source(tracer, src)})
    tracer.pending[n.name] = ("unbind", node.name, dim, False)
    return HANDLED


def _index_axis(index, rank: int):
    """(axis, i) of an index that picks one position of one axis (`x[0]`, `x[:, 0]`, `x[..., 0, :]`), else None."""
    if isinstance(index, int):
        return 0, index
    if not isinstance(index, tuple):
        return None
    full = slice(None)
    ints = [k for k, e in enumerate(index) if isinstance(e, int)]
    if len(ints) != 1 or any(e not in (full, Ellipsis) for k, e in enumerate(index) if k != ints[0]):
        return None
    k = ints[0]
    if Ellipsis in index[:k]:
        return (k - len(index)) % rank, index[k]
    return k, index[k]


def _slices(index, shape: tuple) -> dict | None:
    """The `crop` attrs of an index made of slices of step 1 (and one Ellipsis) that leaves the batch axis
    whole (`x[:, :h, :w, :]`), else None."""
    index = index if isinstance(index, tuple) else (index,)
    if not all(isinstance(e, slice) or e is Ellipsis for e in index) or sum(e is Ellipsis for e in index) > 1:
        return None
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (len(shape) - len(index) + 1) + index[k + 1:]
    axes, starts, stops = [], [], []
    for axis, e in enumerate(index):
        if e.step not in (None, 1) or not all(v is None or isinstance(v, int) for v in (e.start, e.stop)):
            return None
        start, stop, _ = e.indices(shape[axis])
        if (start, stop) == (0, shape[axis]):
            continue
        if axis == 0 or start >= stop:
            return None
        axes.append(axis), starts.append(start), stops.append(stop)
    return {"axes": tuple(axes), "starts": tuple(starts), "stops": tuple(stops)} if axes else None


def _convert_split_axis(tracer, n, m):
    """`x.split(size, dim)` / `torch.split` along an axis that is not a map's channels (`ops.channels` takes
    those; i-RevNet's space-to-depth splits along the width): the parts wait for their getitem, each a crop."""
    src = n.args[0]
    if not tracer.is_tensor(src):
        return None
    rank, parts = len(tracer.shape(src)), tracer.shape(n)
    dim = n.kwargs.get("dim", n.args[2] if len(n.args) > 2 else 0) % rank
    if dim == 0 or not parts:
        return None
    bounds, start = [], 0
    for shape in parts:
        bounds.append((start, start + int(shape[dim])))
        start += int(shape[dim])
    tracer.pending[n.name] = ("crops", src, dim, bounds)
    return HANDLED


def _convert_crop(tracer, n, m):
    """`x[:, a:b, c:d]` (slices of step 1 that leave the batch whole): a crop, or an alias where nothing is cut
    (timm Swin's crop by 0); a part of a split along an axis (`_convert_split_axis`)."""
    src, index = n.args[0], n.args[1]
    state = tracer.pending.get(getattr(src, "name", None))
    if state is not None and state[0] == "crops" and isinstance(index, int):
        _, whole, axis, bounds = state
        start, stop = bounds[index]
        tracer.make(n.name, "crop", [tracer.src(whole)], attrs={
            "axes": (axis,), "starts": (start,), "stops": (stop,), "wide": per_channel_source(tracer, whole)})
        return HANDLED
    if not tracer.is_tensor(src):
        return None
    if all(tracer.shape(n, batch=b) == tracer.shape(src, batch=b) for b in (2, 3)) and \
            all(isinstance(e, slice) or e is Ellipsis for e in (index if isinstance(index, tuple) else (index,))):
        tracer.alias[n.name] = tracer.src(src)
        return HANDLED
    crop = _slices(index, tracer.shape(src))
    return None if crop is None else _node(tracer, n, "crop", crop)


def _convert_take(tracer, n, m):
    src, index = n.args[0], n.args[1]
    state = tracer.pending.get(getattr(src, "name", None))
    if state is not None:
        if state[0] != "unbind" or not isinstance(index, int):
            return None
        tracer.make(n.name, "take", [state[1]], attrs={"axis": state[2], "index": index, "wide": state[3]})
        return HANDLED
    if not tracer.is_tensor(src):
        return None
    shape = tracer.shape(src)
    picked = _index_axis(index, len(shape))
    if picked is None:
        return None
    axis, i = picked
    return _node(tracer, n, "take", {"axis": axis, "index": i % shape[axis]})


def _convert_pad_module(tracer, n, m):
    """nn.ZeroPad2d (NASNet's stems): `pad` of H and W by (left, right, top, bottom)."""
    left, right, top, bottom = m.padding
    rank = len(tracer.shape(n.args[0]))
    pads = [(0, 0)] * (rank - 2) + [(top, bottom), (left, right)]
    if min(left, right, top, bottom) < 0:
        return None
    return _node(tracer, n, "pad", {"pads": tuple(pads)})


def _convert_pad(tracer, n, m):
    """`F.pad` with zeros: by nothing (timm's Swin pads its map to a multiple of the window, by amounts computed
    from the shape that are 0 where it is one already) an alias, else a `pad` of axes that are not the batch's."""
    src = n.args[0]
    if not tracer.is_tensor(src):
        return None
    if all(tracer.shape(n, batch=b) == tracer.shape(src, batch=b) for b in (2, 3)):
        tracer.alias[n.name] = tracer.src(src)
        return HANDLED
    amounts = n.kwargs.get("pad", n.args[1] if len(n.args) > 1 else None)
    mode = n.kwargs.get("mode", n.args[2] if len(n.args) > 2 else "constant")
    value = n.kwargs.get("value", n.args[3] if len(n.args) > 3 else None)
    rank = len(tracer.shape(src))
    if mode != "constant" or value not in (None, 0, 0.0) or not isinstance(amounts, (tuple, list)) or \
            len(amounts) % 2 or len(amounts) // 2 >= rank or not all(isinstance(a, int) and a >= 0 for a in amounts):
        return None
    pads = [(0, 0)] * rank
    for k in range(len(amounts) // 2):         # F.pad lists the last axis first
        pads[rank - 1 - k] = (amounts[2 * k], amounts[2 * k + 1])
    return _node(tracer, n, "pad", {"pads": tuple(pads)})


def _convert_expand(tracer, n, m):
    """`cls_token.expand(N, -1, -1)` (N the input's batch): the constant stays (1, ...); the op that reads it
    broadcasts it. A value (`expand` / `expand_as` of a gate: CBAM's, BAM's): `_expand_value`."""
    src = tracer.by_name.get(tracer.alias.get(getattr(n.args[0], "name", None), ""))
    if src is None:
        return None
    if src.kind != "constant":
        return _expand_value(tracer, n)
    tracer.alias[n.name] = src.name
    return HANDLED


MULS = (operator.mul, torch.mul, "mul")


def _expand_value(tracer, n):
    """A map (N, c, h, w) expanded to (N, C, H, W), c and h, w each whole or 1: where every reader is a product
    and the channels stay, a view (the product broadcasts a gate over H and W: `ops.mul`); else the copies made,
    with the existing ops: the one channel gathered C times (`channel_gather`), the 1 x 1 map resized to H x W
    (nearest: every output position reads the one input position). Other expands are refused."""
    shape, out = tracer.shape(n.args[0]), tracer.shape(n)
    if shape is None or out is None or len(shape) != 4 or len(out) != 4 or shape[0] != out[0] or \
            shape[1] not in (1, out[1]) or tuple(shape[2:]) not in ((1, 1), tuple(out[2:])):
        return None
    src = tracer.src(n.args[0])
    if tuple(shape) == tuple(out):
        tracer.alias[n.name] = src
        return HANDLED
    if shape[1] == out[1] and n.users and all(u.target in MULS and len(u.args) == 2 and not u.kwargs and
                                             all(isinstance(a, torch.fx.Node) for a in u.args) for u in n.users):
        tracer.alias[n.name] = src                      # a gate (N, C, 1, 1) that only products read
        return HANDLED
    broadcast_copy(tracer, src, shape, out, n.name)
    return HANDLED


def broadcast_copy(tracer, src: str, shape: tuple, out: tuple, name: str) -> str:
    """The graph value `src` of shape (N, c, h, w) copied to (N, C, H, W), c and h, w each whole or 1, with the
    existing ops: the one channel gathered C times (`channel_gather`), the 1 x 1 map resized to H x W (nearest:
    every output position reads the one input position); the last copy is named `name`."""
    steps = ([("gather", {"index": (0,) * out[1]})] if shape[1] != out[1] else []) + \
        ([("resize", {"mode": "nearest", "align_corners": None, "scale": None, "size": tuple(out[2:])})]
         if tuple(shape[2:]) != tuple(out[2:]) else [])
    for k, (kind, attrs) in enumerate(steps):
        step = name if k == len(steps) - 1 else f"{name}.{kind}"
        tracer.make(step, kind, [src], attrs=attrs)
        src = step
    return src


# ---------------------------------------------------------------------------------------------- QAT steps

def _moved(qm, node, ins, fn, op: str, attrs: dict) -> V:
    v = ins[0]
    if qm.mode != "fp32" and node.attrs.get("wide"):
        v = qm.act_point(v, f"in:{node.name}", WIDE_BITS, signed=True, name=f"{node.name}.in")
    if v.s is not None and v.s.dim() > 0:
        raise HawqError(f"{node.name}: {op} of a value with one scale per channel (from a {v.name!r} that is "
                        "not a conv or Linear output); nothing requantizes it first")
    if qm.mode != "qat":
        return V(None, v.s, fn(v.r), node.name, v.lo, v.hi)
    q = fn(v.q)
    name = qm.emit(op, [v.name], node.name, attrs=attrs, scale=np_scale(v.s), lo=v.lo, hi=v.hi)
    return V(q, v.s, qm.lazy(v, fn), name, v.lo, v.hi)


def reshape_step(qm, node, ins):
    shape = node.attrs["shape"]
    return _moved(qm, node, ins, lambda t: t.reshape(shape), "reshape", {"shape": shape})


def permute_step(qm, node, ins):
    dims = node.attrs["dims"]
    return _moved(qm, node, ins, lambda t: t.permute(dims), "permute", {"dims": dims})


def roll_step(qm, node, ins):
    shifts, dims = node.attrs["shifts"], node.attrs["dims"]
    return _moved(qm, node, ins, lambda t: torch.roll(t, shifts, dims), "roll", {"shifts": shifts, "dims": dims})


def pad_step(qm, node, ins):
    pads = node.attrs["pads"]
    return _moved(qm, node, ins, lambda t: _pad(t, pads), "pad", {"pads": pads})


def crop_step(qm, node, ins):
    at = {k: node.attrs[k] for k in ("axes", "starts", "stops")}
    return _moved(qm, node, ins, lambda t: _slice(t, **at), "crop", at)


def _pad(t: torch.Tensor, pads) -> torch.Tensor:
    flat = [int(a) for pair in reversed(pads) for a in pair]
    return F.pad(t, flat)


def _slice(t: torch.Tensor, axes, starts, stops) -> torch.Tensor:
    for axis, start, stop in zip(axes, starts, stops):
        t = t.narrow(axis, start, stop - start)
    return t


def _convert_roll(tracer, n, m):
    shifts = n.kwargs.get("shifts", n.args[1] if len(n.args) > 1 else None)
    dims = n.kwargs.get("dims", n.args[2] if len(n.args) > 2 else None)
    if not tracer.is_tensor(n.args[0]) or dims is None:
        return None                      # torch.roll without dims flattens: no layout of ours
    shifts, dims = (tuple(v) if isinstance(v, (tuple, list)) else (v,) for v in (shifts, dims))
    rank = len(tracer.shape(n.args[0]))
    return _node(tracer, n, "roll", {"shifts": tuple(int(v) for v in shifts), "dims": tuple(d % rank for d in dims)})


def take_step(qm, node, ins):
    axis, index = node.attrs["axis"], node.attrs["index"]
    return _moved(qm, node, ins, lambda t: t.select(axis, index), "take", {"axis": axis, "index": index})


def call_on(node, values: list, model) -> torch.Tensor:
    """A computed constant's call (`quant.graph`: a call on constants only) run on its inputs' values; a module's
    call (Swin V2's bias MLP on its coordinate table) runs `model`'s module of that name."""
    kind, target, args, kwargs = node.attrs["call"]

    def fill(a):
        if isinstance(a, (tuple, list)):
            return type(a)(fill(x) for x in a)
        if isinstance(a, dict):
            return {k: fill(v) for k, v in a.items()}
        return values[a.index] if isinstance(a, ConstantSlot) else a
    args, kwargs = fill(args), fill(kwargs)
    if kind == "call_module":
        return model.get_submodule(target)(*args, **kwargs)
    return getattr(args[0], target)(*args[1:], **kwargs) if kind == "call_method" else target(*args, **kwargs)


@dataclass(frozen=True)
class ConstantSlot:
    index: int          # where a computed constant's call takes the value of its input `index`


def constant_tensor(node, model, inputs=()) -> torch.Tensor:
    """The value of a constant node: a parameter or buffer of `model`, a fixed tensor (`value`, e.g. Swin's
    shifted-window mask), or a call on other constants (`inputs`: their values; a reshape, a gather, an einsum
    of parameters)."""
    if "call" in node.attrs:
        return call_on(node, list(inputs), model)
    if "value" in node.attrs:
        return node.attrs["value"]
    return model.get_parameter(node.attrs["target"]) if node.attrs["parameter"] \
        else model.get_buffer(node.attrs["target"])


def constant_step(qm, node, ins):
    """A constant as a float value: the add, cat or mul that reads it quantizes it."""
    value = constant_tensor(node, qm.model, [v.r for v in ins])
    return V(None, None, value.to(next(qm.model.parameters()).device), node.name)


def _wide_observer(node, input_name):
    return [f"in:{node.name}"] if node.attrs.get("wide") else []


# ---------------------------------------------------------------------------------------------- executor

def execute_reshape(op, ins):
    return ins[0].reshape(tuple(op.attrs["shape"]))


def execute_pad(op, ins):
    pads = op.attrs["pads"]
    if len(pads) != ins[0].dim() or tuple(pads[0]) != (0, 0) or \
            not all(len(pair) == 2 and all(isinstance(a, (int, np.integer)) and a >= 0 for a in pair) for pair in pads):
        raise HawqError(f"{op.output}: pad {tuple(map(tuple, pads))} of a rank-{ins[0].dim()} value; valid: one "
                        "(before, after) pair of non-negative ints per axis, (0, 0) for the batch")
    return _pad(ins[0], pads)


def execute_crop(op, ins):
    x, at = ins[0], op.attrs
    axes, starts, stops = (tuple(int(v) for v in at[k]) for k in ("axes", "starts", "stops"))
    if not len(axes) == len(starts) == len(stops) or len(set(axes)) != len(axes) or \
            not all(0 < a < x.dim() and 0 <= b < e <= x.shape[a] for a, b, e in zip(axes, starts, stops)):
        raise HawqError(f"{op.output}: crop {axes} from {starts} to {stops} of shape {tuple(x.shape)}; valid: "
                        "distinct axes after the batch, 0 <= start < stop <= size")
    return _slice(x, axes, starts, stops).contiguous()


def _with_zero(op, r):
    return min(r[0][0], 0), max(r[0][1], 0)


def execute_constant(op, ins):
    value = torch.as_tensor(op.consts["value"], dtype=torch.int64)
    return value.expand(ins[0].shape[0], *value.shape[1:]).contiguous()


def constant_range(op, ins):
    value = op.consts["value"]
    return int(value.min()), int(value.max())


def _same(op, r):
    return r[0]


def axis_index(dim: int, index) -> tuple:
    """x[:, ..., index] with `index` at axis `dim` (dim >= 0): the getitem key fx records."""
    return (slice(None),) * dim + (index,)


def slice_args(args, kwargs):
    """aten.slice.Tensor(x, dim, start, end, step) as x[..., start:end:step]: the open ends None, as fx has them."""
    x, dim, start, end, step = (list(args) + [0, None, None, 1][len(args) - 1:])[:5]
    start = None if start == 0 else start
    end = None if end is None or end >= 2 ** 62 else end
    return (x, axis_index(dim, slice(start, end, None if step == 1 else step))), kwargs


def _select_args(args, kwargs):
    """aten.select.int(x, dim, i) as x[..., i]."""
    x, dim, index = args
    return (x, axis_index(dim, index)), kwargs


def _constant_pad_args(args, kwargs):
    """aten.constant_pad_nd(x, pad, value) as F.pad(x, pad, "constant", value)."""
    return (args[0], args[1], "constant", args[2] if len(args) > 2 else 0.0), kwargs


aten = torch.ops.aten
LAYOUT_METHODS = dict(reshape=("view", "reshape", "flatten", "unsqueeze", "squeeze"),
                      permute=("permute", "transpose", "swapaxes"))

register_ops(
    GraphNode("reshape", reshape_step, functions=(torch.reshape, torch.flatten, torch.unsqueeze, torch.squeeze),
              methods=LAYOUT_METHODS["reshape"], convert=_convert_reshape,
              nonneg=all, observers=_wide_observer, supported="reshape / view / flatten",
              aten={aten.view.default: AtenCall("view", spread_sizes), aten.reshape.default: AtenCall("reshape", spread_sizes),
                    aten.unsqueeze.default: "unsqueeze", aten.squeeze.dim: "squeeze", aten.squeeze.default: "squeeze"}),
    GraphNode("permute", permute_step, functions=(torch.permute, torch.transpose, torch.swapaxes),
              methods=LAYOUT_METHODS["permute"],
              convert=_convert_permute, nonneg=all, observers=_wide_observer, supported="permute / transpose",
              aten={aten.permute.default: AtenCall("permute", spread_sizes), aten.transpose.int: "transpose"}),
    GraphNode("take", take_step, functions=(operator.getitem, torch.unbind, torch.chunk), methods=("unbind", "chunk"),
              convert=lambda t, n, m: {operator.getitem: _convert_take, torch.chunk: _convert_chunk,
                                       "chunk": _convert_chunk}.get(n.target, _convert_unbind)(t, n, m),
              nonneg=all, observers=_wide_observer, supported="x[i] / x[:, i] / unbind",
              aten={aten.unbind.int: torch.unbind, aten.chunk.default: torch.chunk,
                    aten.select.int: AtenCall(operator.getitem, _select_args)}),
    GraphNode("pad", pad_step, modules=(torch.nn.ZeroPad2d,), functions=(F.pad,),
              convert=lambda t, n, m: (_convert_pad_module if m is not None else _convert_pad)(t, n, m), nonneg=all,
              observers=_wide_observer, supported="F.pad with zeros, ZeroPad2d",
              aten={aten.pad.default: F.pad, aten.constant_pad_nd.default: AtenCall(F.pad, _constant_pad_args)}),
    GraphNode("crop", crop_step, functions=(operator.getitem, torch.split), methods=("split",),
              convert=lambda t, n, m: (_convert_crop if n.target is operator.getitem else _convert_split_axis)(t, n, m),
              nonneg=all, observers=_wide_observer, supported="x[:, a:b, c:d] (step 1), split along H or W",
              aten={aten.slice.Tensor: AtenCall(operator.getitem, slice_args)}),
    GraphNode("constant", constant_step, methods=("expand", "expand_as"), convert=_convert_expand,
              supported="parameters read in forward (added or concatenated), expand / expand_as of a map",
              aten={aten.expand.default: AtenCall("expand", spread_sizes)}),
    GraphNode("roll", roll_step, functions=(torch.roll,), methods=("roll",), convert=_convert_roll, nonneg=all,
              observers=_wide_observer, supported="roll (Swin's cyclic shift)",
              aten={aten.roll.default: torch.roll}),
    ProgramOp("reshape", RESHAPE, execute_reshape, _same),
    ProgramOp("roll", ROLL, lambda op, ins: torch.roll(ins[0], tuple(op.attrs["shifts"]), tuple(op.attrs["dims"])),
              _same),
    ProgramOp("permute", PERMUTE, lambda op, ins: ins[0].permute(tuple(op.attrs["dims"])).contiguous(), _same),
    ProgramOp("take", TAKE, lambda op, ins: ins[0].select(op.attrs["axis"], op.attrs["index"]).contiguous(), _same),
    ProgramOp("pad", PAD, execute_pad, _with_zero),
    ProgramOp("crop", CROP, execute_crop, _same),
    ProgramOp("constant", CONSTANT, execute_constant, constant_range),
)
