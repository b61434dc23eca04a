"""Residual add and channel concatenation (graph nodes `add`, `cat`; program ops `add`, `concat`); torch.stack
is a cat along the channels and a reshape (and a permute where the new axis is not 1).

Each branch is requantized to the output's scale on its own before the add (Appendix F) or the concat
(Appendix E, eq. 18): integer-only hardware cannot add first and requantize once. The output's scale has
16-bit resolution (HAWQ's quant_act_int32), and each branch's requantize clamps to the signed 16-bit range,
so a branch that is stored between kernels (a residual read by the next block's conv) is an INT16 tensor,
not an INT32 one; the sum of two branches is an INT32 value, requantized where it is consumed.

A branch may be a parameter read in forward (a class token, a position embedding: `ops.layout`'s constant):
it is quantized to the output's scale directly and enters the program as a `constant` value.
"""
from __future__ import annotations

import operator

import torch

from hawq_ray.contract import HawqError
from hawq_ray.ops.layout import broadcast_copy
from hawq_ray.ops.registry import HANDLED, GraphNode, ProgramOp, register_ops
from hawq_ray.program.dyadic import requantize
from hawq_ray.quant.quantizers import signed_range
from hawq_ray.quant.values import WIDE_BITS, V, dyadic_consts, np_scale

ADD = "inputs [a, b]; out = a + b (each branch was requantized to the output scale before it, Appendix F)."
CONCAT = "inputs [...]; attrs axis (1: channels); out = the inputs concatenated along axis (each branch was " \
         "requantized to the output scale before it, eq. 18)."


def _constants(tracer, args) -> list:
    """Which operands are parameters read in forward (`ops.layout`'s constant nodes)."""
    return [tracer.by_name[tracer.src(a)].kind == "constant" for a in args]


def _convert_add(tracer, n, m):
    """A residual add; a map operand that broadcasts to the sum's shape (FishNet's (N, C, 1, 1) branch plus an
    (N, C, H, W) map) is copied to that shape first (`layout.broadcast_copy`), so both branches of the add,
    like both operands of every kernel, have one shape. A constant operand broadcasts in `join_step`."""
    if len(n.args) != 2 or n.kwargs or not all(tracer.is_tensor(a) for a in n.args):
        return None
    constants, out = _constants(tracer, n.args), tracer.shape(n)
    args = [tracer.src(a) for a in n.args]
    for i, (a, constant) in enumerate(zip(n.args, constants)):
        shape = tracer.shape(a)
        if not constant and _spreads(shape, out):
            args[i] = broadcast_copy(tracer, args[i], shape, out, f"{n.name}.spread{i}")
    node = tracer.node(n, "add", list(n.args), attrs={"constants": constants})
    node.inputs = args
    return node


def _spreads(shape, out) -> bool:
    """Whether a map of `shape` is a smaller (N, C or 1, 1 or H, 1 or W) one that broadcasts to `out`."""
    return shape is not None and out is not None and len(shape) == len(out) == 4 and tuple(shape) != tuple(out) \
        and shape[0] == out[0] and shape[1] in (1, out[1]) and tuple(shape[2:]) in ((1, 1), tuple(out[2:]))


def _convert_cat(tracer, n, m):
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    if all(_constants(tracer, n.args[0])):
        return None             # constants only: the tracer computes it as a constant of its own
    if dim != 1:
        tracer.unsupported(f"torch.cat at {n.name!r} along dim {dim}", "cat (only dim=1)")
    return tracer.node(n, "cat", list(n.args[0]), attrs={"constants": _constants(tracer, n.args[0])})


def _convert_stack(tracer, n, m):
    """`torch.stack(xs, dim)` (sknet's branches): the cat of xs along axis 1 on one 16-bit scale (each branch
    requantized to it, as any cat's), a reshape splitting axis 1 into (len(xs), C), and a permute moving the new
    axis to `dim` where that is not 1. Along the batch axis it is refused."""
    xs = list(n.args[0]) if n.args else list(n.kwargs["tensors"])
    dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
    shape = tracer.shape(n)
    if all(_constants(tracer, xs)) or shape is None:
        return None
    rank = len(shape)
    dim %= rank
    if dim == 0 or rank < 3:
        tracer.unsupported(f"torch.stack at {n.name!r}{tracer.inside(n)} along dim {dim} of rank-{rank - 1} values",
                           "stack (along an axis after the batch of values with a channel axis)")
    per_sample = (-1, *shape[1:]) if dim == 1 else (-1, shape[dim], *shape[1:dim], *shape[dim + 1:])
    cat = tracer.make(f"{n.name}.cat", "cat", [tracer.src(a) for a in xs], attrs={"constants": _constants(tracer, xs)})
    last = n.name if dim == 1 else f"{n.name}.stacked"
    tracer.make(last, "reshape", [cat.name], attrs={"shape": per_sample, "wide": False})
    if dim != 1:
        dims = (0, *range(2, dim + 1), 1, *range(dim + 1, rank))
        tracer.make(n.name, "permute", [last], attrs={"dims": dims, "wide": False})
    return HANDLED


def join_step(qm, node, ins):
    add = node.kind == "add"
    constant = node.attrs.get("constants") or [False] * len(ins)
    if all(constant):
        raise HawqError(f"{node.name}: {node.kind} of constants only; fold them into one parameter")
    batch = next((v.q if v.q is not None else v.r).shape[0] for v, c in zip(ins, constant) if not c)
    need = qm.mode != "qat" or qm.needs_real() or any(v._r is not None for v in ins)

    def full(v, c):        # a constant repeated to the batch (cat needs equal batch sizes)
        return v.r.expand(batch, *v.r.shape[1:]) if c else v.r
    real = (ins[0].r + ins[1].r if add else torch.cat([full(v, c) for v, c in zip(ins, constant)], 1)) \
        if need else None
    if qm.mode == "fp32":
        return V(None, None, real, node.name)
    s = qm.wide_output(node, real, ins[0].device)
    if qm.mode == "fake":  # eq. 20/21: accumulate in float, then requantize once
        return qm.fake_output(real, s, node.name, clamp=False)
    scale = float(s)
    parts, names = [], []
    lo, hi = signed_range(WIDE_BITS)
    other = next(v.name for v, c in zip(ins, constant) if not c)
    shapes = [tuple(v.q.shape) if v.q is not None else None for v in ins]
    for i, (v, c) in enumerate(zip(ins, constant)):
        if c:     # on the output's grid, as a bias on its accumulator's (eq. 17)
            value = torch.floor(v.r.detach().to(torch.float64) / scale + 0.5).clamp_(lo, hi).to(torch.int64)
            if add:   # stored at the sample's full shape (MaxViT's bias broadcasts over the grid axis too)
                value = value.broadcast_to((1, *shapes[1 - i][1:])).contiguous()
            parts.append(value.expand(batch, *value.shape[1:]))
            names.append(qm.emit("constant", [other], f"{node.name}.b{i}", scale=np_scale(s),
                                 consts={"value": value.cpu().numpy().astype("int32")}))
            continue
        mult, shift = qm.dyadic(v.s / scale, v.q.dim())
        parts.append(requantize(v.q, mult, shift, lo, hi))
        names.append(qm.emit("requantize", [v.name], f"{node.name}.b{i}", consts=dyadic_consts(mult, shift),
                             attrs={"lo": lo, "hi": hi}, scale=np_scale(s)))
    q = parts[0] + parts[1] if add else torch.cat(parts, 1)
    qm.emit("add" if add else "concat", names, node.name, scale=np_scale(s), attrs={} if add else {"axis": 1})
    return V(q, s, None if real is None else qm.exact_real(real, lambda: q * scale), node.name)


def _out_key(node, input_name):
    return [f"out:{node.name}"]


register_ops(
    GraphNode("add", join_step, functions=(operator.add, torch.add, operator.iadd), methods=("add",),
              convert=_convert_add, nonneg=all, observers=_out_key, supported="add",
              # `x += y`: fx records operator.add (its proxies have no in-place add), export aten.add_
              aten={torch.ops.aten.add.Tensor: operator.add, torch.ops.aten.add_.Tensor: operator.add}),
    GraphNode("cat", join_step, functions=(torch.cat, torch.stack),
              convert=lambda t, n, m: (_convert_stack if n.target is torch.stack else _convert_cat)(t, n, m),
              nonneg=all, observers=_out_key, supported="cat (channels), stack (a cat and a reshape)",
              aten={torch.ops.aten.cat.default: torch.cat, torch.ops.aten.stack.default: torch.stack}),
    ProgramOp("add", ADD, lambda op, ins: ins[0].to(torch.int64) + ins[1].to(torch.int64),
              lambda op, r: (r[0][0] + r[1][0], r[0][1] + r[1][1]), elementwise=True, binary=True),
    ProgramOp("concat", CONCAT, lambda op, ins: torch.cat([t.to(torch.int64) for t in ins], op.attrs.get("axis", 1)),
              lambda op, r: (min(x[0] for x in r), max(x[1] for x in r))),
)
