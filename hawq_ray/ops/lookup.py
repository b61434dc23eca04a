"""Element-wise nonlinearities as lookup tables (graph node `activation`, program op `lookup`): hardswish,
hardsigmoid, SiLU, sigmoid, GELU, tanh, Mish, ELU, LeakyReLU, softplus.

Integer-only hardware has no exp or division, but a function of a b-bit input has only 2^b inputs: the input
is requantized to 8 bits on a static scale S_in (an activation point, as in front of a layer), and a table
of 256 integers, built once at lowering from the float function, gives the output codes on their own static
scale: T[k] = clamp(round(f(k S_in) / S_out)), S_out = max_k |f(k S_in)| / (2^7 - 1) (2^8 - 1 when f is
nonnegative on the codes). Inference is one indexed load. In QAT the forward values are the table's, the
gradient is f's (straight-through).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hawq_ray.ops.registry import AtenCall, GraphNode, ProgramOp, register_ops
from hawq_ray.quant.quantizers import signed_range, unsigned_range
from hawq_ray.quant.values import V, np_scale, ste

SEMANTICS = """inputs [x] (codes in [offset, offset + len(table) - 1]); consts table (int32, one entry per input
code); attrs offset; out = table[x - offset]."""

LUT_BITS = 8     # input and output codes of a table



def _pytorchcv(*names) -> tuple:
    """pytorchcv's own activation modules (same functions; traced as leaves, not as their x * ... / 6.0)."""
    try:
        from pytorchcv.models.common import activ
    except ImportError:
        return ()
    return tuple(getattr(activ, n) for n in names if hasattr(activ, n))


# name -> (float function of a tensor and the node's attrs, modules, functions, methods)
FUNCTIONS = {
    "hardswish": (lambda t, a: F.hardswish(t), (nn.Hardswish, *_pytorchcv("HSwish")), (F.hardswish,), ()),
    "hardsigmoid": (lambda t, a: F.hardsigmoid(t), (nn.Hardsigmoid, *_pytorchcv("HSigmoid")), (F.hardsigmoid,), ()),
    "silu": (lambda t, a: F.silu(t), (nn.SiLU, *_pytorchcv("Swish")), (F.silu,), ()),
    "sigmoid": (lambda t, a: torch.sigmoid(t), (nn.Sigmoid,), (torch.sigmoid, F.sigmoid), ("sigmoid",)),
    "gelu": (lambda t, a: F.gelu(t, approximate=a.get("approximate", "none")), (nn.GELU,), (F.gelu,), ()),
    "tanh": (lambda t, a: torch.tanh(t), (nn.Tanh,), (torch.tanh, F.tanh), ("tanh",)),
    "mish": (lambda t, a: F.mish(t), (nn.Mish,), (F.mish,), ()),
    "elu": (lambda t, a: F.elu(t, a.get("alpha", 1.0)), (nn.ELU,), (F.elu,), ()),
    "leaky_relu": (lambda t, a: F.leaky_relu(t, a.get("negative_slope", 0.01)), (nn.LeakyReLU,), (F.leaky_relu,),
                   ()),
    "softplus": (lambda t, a: F.softplus(t, a.get("beta", 1.0), a.get("threshold", 20.0)), (nn.Softplus,),
                 (F.softplus,), ()),
}
_ATTRS = ("approximate", "alpha", "negative_slope", "beta", "threshold")
# the parameters a call may pass by position after the tensor (F.elu(x, 2.0), F.softplus(x, 2.0, 10.0))
_POSITIONAL = {"elu": ("alpha",), "leaky_relu": ("negative_slope",), "softplus": ("beta", "threshold")}


def _function_name(n, m) -> str | None:
    for name, (_, modules, functions, methods) in FUNCTIONS.items():
        if (m is not None and isinstance(m, modules)) or (n.op == "call_function" and n.target in functions) or \
                (n.op == "call_method" and n.target in methods):
            return name
    return None


def _convert_activation(tracer, n, m):
    name = _function_name(n, m)
    attrs = {k: getattr(m, k) for k in _ATTRS if m is not None and hasattr(m, k)}
    attrs |= {k: v for k, v in n.kwargs.items() if k in _ATTRS}
    if m is None:
        attrs |= dict(zip(_POSITIONAL.get(name, ()), n.args[1:]))
    return tracer.node(n, "activation", [n.args[0]], attrs={"fn": name} | attrs,
                       nonneg=name in ("hardsigmoid", "sigmoid", "softplus"))


def _apply(node, t):
    return FUNCTIONS[node.attrs["fn"]][0](t, node.attrs)


def lookup_table(node, s_in: float, signed_in: bool):
    """(table codes (int64, 2^b), offset, S_out, lo, hi) of the node's function at input scale s_in."""
    lo_in, hi_in = signed_range(LUT_BITS) if signed_in else unsigned_range(LUT_BITS)
    codes = torch.arange(lo_in, hi_in + 1, dtype=torch.float64)
    f = _apply(node, codes * s_in)
    signed = bool((f < 0).any())
    lo, hi = signed_range(LUT_BITS) if signed else unsigned_range(LUT_BITS)
    s_out = max(float(f.abs().max()), 1e-12) / hi
    table = torch.floor(f / s_out + 0.5).clamp_(lo, hi).to(torch.int64)
    return table, lo_in, s_out, lo, hi


def activation_step(qm, node, ins):
    v = ins[0]
    if qm.mode == "fp32":
        return V(None, None, _apply(node, v.r), node.name)
    signed_in = not qm.nonneg(node.inputs[0])
    a = qm.act_point(v, f"in:{node.name}", LUT_BITS, signed=signed_in, name=f"{node.name}.in")
    table, offset, s_out, lo, hi = lookup_table(node, float(a.s), signed_in)
    s = torch.tensor(s_out, dtype=torch.float64, device=a.device)
    if qm.mode == "fake":       # the float function of the fake-quantized input, quantized to S_out
        f = _apply(node, a.r)
        q = torch.floor(f.detach().to(torch.float64) / s_out + 0.5).clamp_(lo, hi)
        return V(None, s, ste(f, q * s_out), node.name, lo, hi)
    q = table.to(a.q.device)[a.q - offset]
    qm.emit("lookup", [a.name], node.name, consts={"table": table.numpy().astype(np.int32)},
            attrs={"offset": int(offset)}, scale=np_scale(s), lo=lo, hi=hi)
    real = qm.lazy(a, lambda t: _apply(node, t))
    return V(q, s, qm.real(real, q, s), node.name, lo, hi)


def execute_lookup(op, ins):
    table = torch.as_tensor(op.consts["table"], dtype=torch.int64)
    return table[ins[0].to(torch.int64) - int(op.attrs["offset"])]


def lookup_range(op, ins):
    """The table's extremes over the input codes the input can take."""
    table, off = np.asarray(op.consts["table"], np.int64), int(op.attrs["offset"])
    a, b = max(ins[0][0] - off, 0), min(ins[0][1] - off, len(table) - 1)
    part = table[a:b + 1] if a <= b else table
    return int(part.min()), int(part.max())


def _lut_observers(node, input_name):
    return [f"in:{node.name}"]


def _named(*names):
    """An ATen op's positional arguments after the input as the keywords the converter reads."""
    return lambda args, kwargs: (args[:1], dict(zip(names, args[1:])) | kwargs)


def _lookup_aten_calls() -> dict:
    """Each function's ATen op (and its in-place form where torch has one) -> the torch function."""
    aten = torch.ops.aten
    calls = {aten.elu.default: AtenCall(F.elu, _named("alpha")),
             aten.softplus.default: AtenCall(F.softplus, _named("beta", "threshold")),
             aten.gelu.default: F.gelu, aten.leaky_relu.default: F.leaky_relu, aten.leaky_relu_.default: F.leaky_relu}
    for name, function in (("hardswish", F.hardswish), ("hardsigmoid", F.hardsigmoid), ("silu", F.silu),
                           ("sigmoid", torch.sigmoid), ("tanh", torch.tanh), ("mish", F.mish)):
        calls[getattr(aten, name).default] = function
        if hasattr(aten, name + "_"):
            calls[getattr(aten, name + "_").default] = function
    return calls


register_ops(
    GraphNode("activation", activation_step,
              modules=tuple(m for e in FUNCTIONS.values() for m in e[1]),
              functions=tuple(f for e in FUNCTIONS.values() for f in e[2]),
              methods=tuple(x for e in FUNCTIONS.values() for x in e[3]),
              convert=_convert_activation, observers=_lut_observers,
              supported="hardswish, hardsigmoid, SiLU, sigmoid, GELU, tanh, Mish, ELU, LeakyReLU, softplus",
              aten=_lookup_aten_calls()),
    ProgramOp("lookup", SEMANTICS, execute_lookup, lookup_range, elementwise=True),
)
