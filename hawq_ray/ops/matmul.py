"""The product of two quantized activations (graph node `matmul`, program op `matmul`): attention's q k^T and
its probabilities times v, per head; and a product with a positive number (graph node `scale`, no program op).

Each operand is requantized on its own static per-tensor scale (an activation point, as in front of a layer)
to the bits of the layer it comes from (`operand_layer`: attention's q, k and v take the qkv Linear's bits, as a
layer's input takes the layer's bits in HAWQ-V3; 8 when no layer precedes it), unless it is 8-bit codes already
(softmax's probabilities, unsigned codes at 2^-8: requantizing them would only round them again). So the config
sets the operands' bits and the BOPS budget prices the product at them (`contract.cost`). The codes are multiplied
and summed exactly, INT32 accumulation (|a b| <= 2^14 and K <= 2^16 terms), at scale S_a S_b; whoever reads the
product requantizes it, as after a conv.

`q * head_dim ** -0.5` (or `/ sqrt(d)`) multiplies a value by a positive constant: the integers stay, the scale
is multiplied, and the requantize that reads the value absorbs it. No op is computed.

`F.scaled_dot_product_attention(q, k, v)` (timm's fused `Attention`) is expanded into the nodes it is made of
(k's transpose, q @ k^T, the scale, a float mask read from parameters added as a constant, softmax, p @ v);
boolean or input-dependent masks, causal masking and dropout are refused by name.
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F

from hawq_ray.contract import HawqError
from hawq_ray.ops.registry import HANDLED, GraphNode, ProgramOp, register_ops

aten = torch.ops.aten
from hawq_ray.quant.values import FP32_EXACT, V, np_scale

SEMANTICS = """inputs [a, b] (..., M, K) and (..., K, N), equal leading axes, codes of at most 8 bits; attrs a_bits, b_bits,
a_signed, b_signed, k (= K); out = a @ b over the last two axes, INT32 accumulation (K <= 2^16)."""
OPERAND_BITS = 8       # an operand no layer precedes, and softmax's probabilities
MAX_K = 1 << 16
NARROW_SOURCES = ("softmax",)        # producers of 8-bit codes the product reads as they are
LAYOUT = ("reshape", "permute", "take")


# ---------------------------------------------------------------------------------------------- tracing

def _layout_source(tracer, name: str) -> str:
    """The value a chain of layout ops starts from."""
    node = tracer.by_name[name]
    while node.kind in LAYOUT:
        node = tracer.by_name[node.inputs[0]]
    return node.name


def _source_kind(tracer, arg) -> str:
    return tracer.by_name[_layout_source(tracer, tracer.src(arg))].kind


def operand_layer(by_name, inputs, narrow) -> str | None:
    """The layer whose bits a product's operands take: the nearest layer upstream of its operands that are not
    8-bit codes already, the last operand first, through layout ops, scales, norms and constants' adds
    (attention's q k^T and p v: the qkv Linear); None when no layer precedes them. The product's MACs are
    charged to this layer in the layer table (`quant.layers.product_macs`)."""
    todo, seen = [x for x, fixed in reversed(list(zip(inputs, narrow))) if not fixed], set()
    while todo:
        src = by_name[todo.pop(0)]
        if src.layer is not None:
            return src.layer
        if src.name not in seen:
            seen.add(src.name)
            todo.extend(src.inputs)
    return None


def product_attrs(tracer, inputs, narrow, multiply_adds) -> dict:
    """The attrs of a `matmul` graph node reading `inputs` (names; `narrow`: which are 8-bit codes already)."""
    return {"narrow": narrow, "multiply_adds": multiply_adds,
            "operand_layer": operand_layer(tracer.by_name, inputs, narrow)}


SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale")


def per_sample(tracer, n) -> int:
    """Elements of fx node n's value per sample (the growth from batch 2 to batch 3: windows and heads folded
    into the batch axis count too)."""
    def numel(shape):
        return int(torch.Size(shape).numel())
    return numel(tracer.shape(n, batch=3)) - numel(tracer.shape(n))


def _convert_attention(tracer, n):
    """`F.scaled_dot_product_attention(q, k, v)` (timm's fused Attention) as the nodes it is made of: k's
    transpose, q @ k^T, the attention scale, softmax, p @ v. A mask, causal masking or dropout is refused."""
    given = dict(zip(SDPA_ARGS, n.args)) | dict(n.kwargs)
    mask = given.get("attn_mask")
    additive = mask is not None and tracer.by_name.get(tracer.alias.get(getattr(mask, "name", None), ""))
    if mask is not None and not (additive and additive.kind == "constant" and tracer.tensor(mask).is_floating_point()):
        tracer.unsupported(f"scaled_dot_product_attention at {n.name!r} with a boolean or input-dependent mask",
                           "scaled_dot_product_attention (unmasked, or a float bias read from parameters)")
    if given.get("is_causal") or given.get("dropout_p") or given.get("enable_gqa"):
        tracer.unsupported(f"scaled_dot_product_attention at {n.name!r} with causal masking or dropout",
                           "scaled_dot_product_attention (at inference, not causal)")
    q, k, v = (tracer.src(given[a]) for a in SDPA_ARGS[:3])
    rank = len(tracer.shape(given["key"]))
    scale = given.get("scale") or tracer.shape(given["query"])[-1] ** -0.5
    keys = tracer.shape(given["key"])[-2]
    kt = tracer.make(f"{n.name}.kT", "permute", [k],
                     attrs={"dims": tuple(range(rank - 2)) + (rank - 1, rank - 2), "wide": False})
    logits = tracer.make(f"{n.name}.logits", "matmul", [q, kt.name],
                         attrs=product_attrs(tracer, [q, kt.name], [False, False],
                                              per_sample(tracer, given["query"]) * keys))
    scaled = tracer.make(f"{n.name}.scaled", "scale", [logits.name], attrs={"factor": float(scale)})
    if mask is not None:        # a relative position bias passed as the mask (timm's CoAtNet, MaxViT)
        scaled = tracer.make(f"{n.name}.biased", "add", [scaled.name, additive.name],
                             attrs={"constants": [False, True]})
    probs = tracer.make(f"{n.name}.probs", "softmax", [scaled.name])
    tracer.make(n.name, "matmul", [probs.name, v],
                attrs=product_attrs(tracer, [probs.name, v], [True, False], per_sample(tracer, n) * keys))
    return HANDLED


def _einsum_transposes(equation: str) -> bool | None:
    """For a batched product written with einsum (MaxViT's "BGHID,BGHJD->BGHIJ"): whether b enters transposed
    (its last two letters swapped), or None when the equation is not a product over the last axis of a."""
    terms = equation.replace(" ", "").replace("->", ",").split(",")
    if len(terms) != 3 or len({len(t) for t in terms}) != 1 or len(terms[0]) < 2:
        return None
    a, b, out = terms
    batch, (i, k) = a[:-2], a[-2:]
    if b[:-2] != batch or out != batch + i + (b[-1] if b[-2] == k else b[-2]) or k not in b[-2:] or \
            len(set(a + b)) != len(batch) + 3:
        return None
    return b[-1] == k


def _convert_einsum(tracer, n):
    if len(n.args) != 3 or not all(tracer.is_tensor(a) for a in n.args[1:]):
        return None
    transposed = _einsum_transposes(n.args[0])
    if transposed is None:
        return None
    a, b = (tracer.src(x) for x in n.args[1:])
    if transposed:
        rank = len(tracer.shape(n.args[2]))
        b = tracer.make(f"{n.name}.bT", "permute", [b],
                        attrs={"dims": tuple(range(rank - 2)) + (rank - 1, rank - 2), "wide": False}).name
    narrow = [tracer.by_name[_layout_source(tracer, x)].kind in NARROW_SOURCES for x in (a, b)]
    k = tracer.shape(n.args[1])[-1]
    tracer.make(n.name, "matmul", [a, b], attrs=product_attrs(tracer, [a, b], narrow, per_sample(tracer, n) * k))
    return HANDLED


def _convert_matmul(tracer, n, m):
    if n.target is F.scaled_dot_product_attention:
        return _convert_attention(tracer, n)
    if n.target is torch.einsum:
        return _convert_einsum(tracer, n)
    if len(n.args) != 2 or n.kwargs or not all(tracer.is_tensor(a) for a in n.args):
        return None
    narrow = [_source_kind(tracer, a) in NARROW_SOURCES for a in n.args]
    k = tracer.shape(n.args[0])[-1]
    return tracer.node(n, "matmul", list(n.args),
                       attrs=product_attrs(tracer, [tracer.src(a) for a in n.args], narrow,
                                            per_sample(tracer, n) * k))


def _python_number(a) -> float | None:
    return float(a) if isinstance(a, (int, float)) and not isinstance(a, bool) else None


def _convert_scale(tracer, n, m):
    """x * c, c * x, x / c for a positive number c (a Python constant at trace time)."""
    if len(n.args) != 2 or n.kwargs:
        return None
    x, c = n.args
    if _python_number(x) is not None and n.target in (operator.mul, torch.mul, "mul"):
        x, c = c, x
    c = _python_number(c)
    if c is None or not tracer.is_tensor(x) or c <= 0:
        return None
    if n.target in (operator.truediv, torch.div, "div"):
        c = 1.0 / c
    return tracer.node(n, "scale", [x], attrs={"factor": c})


# ---------------------------------------------------------------------------------------------- QAT steps

def _exact_matmul(a: torch.Tensor, b: torch.Tensor, bound: int) -> torch.Tensor:
    """a @ b of integer tensors, exactly: float32 while every partial sum stays below 2^24, else float64
    (below 2^53: |a b| K <= 2^14 2^16)."""
    dtype = torch.float32 if bound < FP32_EXACT else torch.float64
    return torch.round(a.to(dtype) @ b.to(dtype)).to(torch.int64)


def operand_bits(node, bits) -> list[int]:
    """Each operand's bits under the config `bits` ({layer: bits}): its layer's (`operand_layer`), or 8."""
    layer = node.attrs.get("operand_layer")
    wide = bits[layer] if layer is not None else OPERAND_BITS
    return [OPERAND_BITS if fixed else wide for fixed in node.attrs["narrow"]]


def matmul_step(qm, node, ins):
    if qm.mode == "fp32":
        return V(None, None, ins[0].r @ ins[1].r, node.name)
    ops, bits = [], operand_bits(node, qm.bits)
    for i, v in enumerate(ins):
        if not node.attrs["narrow"][i]:
            v = qm.act_point(v, f"in:{node.name}.{i}", bits[i], signed=not qm.nonneg(node.inputs[i]),
                             name=f"{node.name}.in{i}")
        elif v.s is not None and v.s.dim() > 0:
            raise HawqError(f"{node.name}: operand {i} has one scale per channel; expected 8-bit codes")
        ops.append(v)
    a, b = ops
    s = a.s * b.s
    if qm.mode == "fake":
        return V(None, s, a.r @ b.r, node.name)
    k = a.q.shape[-1]
    if k > MAX_K:
        raise HawqError(f"{node.name}: a product over {k} terms; valid: at most {MAX_K} (INT32 accumulation)")
    amax, bmax = max(abs(a.lo), abs(a.hi)), max(abs(b.lo), abs(b.hi))
    q = _exact_matmul(a.q, b.q, amax * bmax * k)
    qm.emit("matmul", [a.name, b.name], node.name, scale=np_scale(s),
            attrs={"a_bits": bits[0], "b_bits": bits[1], "a_signed": a.lo < 0, "b_signed": b.lo < 0,
                   "k": k})
    real = a.r @ b.r if qm.needs_real() else None
    return V(q, s, qm.real(real, q, s), node.name)


def scale_step(qm, node, ins):
    v, c = ins[0], node.attrs["factor"]
    r = v.r * c if (qm.mode != "qat" or v._r is not None or qm.needs_real()) else None
    if qm.mode == "fp32":
        return V(None, None, r, node.name)
    return V(v.q, v.s * c, r, v.name, v.lo, v.hi)


def _matmul_observers(node, input_name):
    return [f"in:{node.name}.{i}" for i in range(2) if not node.attrs["narrow"][i]]


# ---------------------------------------------------------------------------------------------- executor

def execute_matmul(op, ins):
    a, b = ins
    if a.shape[:-2] != b.shape[:-2] or a.shape[-1] != b.shape[-2]:
        raise HawqError(f"{op.output}: matmul of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    bound = int(a.abs().max()) * int(b.abs().max()) * a.shape[-1] if a.numel() and b.numel() else 0
    return _exact_matmul(a, b, bound)


def matmul_range(op, r):
    """K times the extreme product of two codes (the sign of each term free)."""
    k = int(op.attrs["k"])
    corners = [x * y for x in r[0] for y in r[1]]
    return min(min(corners), 0) * k, max(max(corners), 0) * k


register_ops(
    GraphNode("matmul", matmul_step, functions=(operator.matmul, torch.matmul, torch.bmm, torch.einsum,
                                                F.scaled_dot_product_attention),
              methods=("matmul", "bmm"), convert=_convert_matmul, observers=_matmul_observers,
              supported="matmul of two activations (@, einsum), scaled_dot_product_attention",
              aten={aten.matmul.default: torch.matmul, aten.bmm.default: torch.bmm, aten.einsum.default: torch.einsum,
                    aten.scaled_dot_product_attention.default: F.scaled_dot_product_attention}),
    GraphNode("scale", scale_step, functions=(operator.mul, operator.truediv, torch.mul, torch.div),
              methods=("mul", "div"), convert=_convert_scale, nonneg=all, supported="times a positive number",
              aten={aten.div.Tensor: operator.truediv}),
    ProgramOp("matmul", SEMANTICS, execute_matmul, matmul_range),
)
