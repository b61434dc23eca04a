"""Conv2d and Linear layers (graph nodes `conv`, `linear`; program ops `conv2d`, `dense`).

QAT (Appendix B-D): BN folded into the conv (eq. 16); weights symmetric per output channel at the layer's
bits; the input requantized to the layer's bits by its activation point unless it is the 8-bit image; the
INT32 bias at S_b = S_h S_W (eq. 17); the accumulator exact (float convolutions only where a bound proves
them exact).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from hawq_ray.ops.registry import GraphNode, ProgramOp, as_pair, register_ops
from hawq_ray.program.integer import exact_dtype, int_matmul, linear_range, windows
from hawq_ray.program.program import INT32_MAX, INT32_MIN
from hawq_ray.quant.fold import fold_bn
from hawq_ray.quant.quantizers import quantize_weight, weight_scale
from hawq_ray.quant.values import FP32_EXACT, V, channel_view, exact_conv2d, np_scale, ste


# ---------------------------------------------------------------------------------------------- tracing

def _convert_conv(tracer, n, m):
    if m.padding_mode != "zeros" or isinstance(m.padding, str):
        tracer.unsupported(f"module {n.target!r} (padding {m.padding!r}, mode {m.padding_mode})", type(m).__name__)
    return tracer.node(n, "conv", [n.args[0]], layer=n.target, module=m,
                       attrs={"stride": as_pair(m.stride), "padding": as_pair(m.padding),
                              "dilation": as_pair(m.dilation), "groups": m.groups})


def _convert_linear(tracer, n, m):
    if m is None:
        return _convert_functional_linear(tracer, n)
    return tracer.node(n, "linear", [n.args[0]], layer=n.target, module=m)


def _convert_functional_linear(tracer, n):
    """`F.linear(x, module.weight, bias)`: the layer of the module that owns the weight (a Linear, or a module
    holding the weight that BEiT, EVA and Swin V2 pass with a bias they build in forward: q and v biases
    around a fixed zero for k). The bias, a parameter or a constant computed from parameters, is the node's
    second input."""
    a = dict(zip(("input", "weight", "bias"), n.args)) | dict(n.kwargs)
    weight, bias = a.get("weight"), a.get("bias")
    if not tracer.is_tensor(a.get("input")) or not isinstance(weight, fx.Node) or weight.op != "get_attr":
        return None
    if bias is not None and not (tracer.is_tensor(bias) and tracer.by_name[tracer.src(bias)].kind == "constant"):
        return None
    module = tracer.module_of(weight)
    if getattr(module, "weight", None) is None or weight.target.rpartition(".")[2] != "weight" or \
            module.weight.dim() != 2:
        return None
    return tracer.node(n, "linear", [a["input"]] + ([bias] if bias is not None else []),
                       layer=tracer.module_name(module), module=module)


# ---------------------------------------------------------------------------------------------- QAT step

def layer_step(qm, node, ins):
    """The activation point in front of the layer (unless it reads the image), then the layer."""
    a = ins[0]
    if node.inputs[0] != qm.input_name:
        a = qm.act_point(a, f"in:{node.layer}", qm.bits[node.layer], signed=not qm.nonneg(node.inputs[0]),
                         name=f"{node.name}.in")
    return _layer(qm, node, a, ins[1].r if len(ins) > 1 else getattr(node.module, "bias", None))


def _observers(node, input_name):
    return [f"in:{node.layer}"] if node.inputs[0] != input_name else []


def _layer(qm, node, a: V, bias) -> V:
    mod = node.module
    w_bar, b_bar = fold_bn(mod.weight, bias, node.bn)           # eq. 16
    conv = node.kind == "conv"
    at = node.attrs

    def apply(x, w, bias=None):
        if conv:
            return F.conv2d(x, w, bias, at["stride"], at["padding"], at["dilation"], at["groups"])
        return F.linear(x, w, bias)

    if qm.mode == "fp32":
        return V(None, None, apply(a.r, w_bar, b_bar), node.name)
    bits = qm.bits[node.layer]
    s_x = a.s
    # Per-channel symmetric weight scale; floored so the INT32 bias (eq. 17) cannot overflow.
    s_w = torch.maximum(weight_scale(w_bar, bits),
                        b_bar.detach().abs() / (float(s_x) * 2.0 ** 30)).detach()
    q_w, _ = quantize_weight(w_bar, bits, s_w)                  # integer values, STE gradient
    wshape = (-1,) + (1,) * (w_bar.dim() - 1)
    if qm.mode == "fake":  # eq. 14: float accumulate of dequantized weights and activations
        return V(None, None, apply(a.r, q_w * s_w.reshape(wshape), b_bar), node.name)
    s_acc = s_x * s_w.to(torch.float64)                         # S_b = S_h * S_W (eq. 17)
    q_b = torch.floor(b_bar.detach().to(torch.float64) / s_acc + 0.5).clamp_(INT32_MIN, INT32_MAX)
    if not conv and a.r.dim() > 2:      # a Linear over tokens (..., C): its scale lives on the last axis
        s_acc = s_acc.reshape((1,) * (a.r.dim() - 1) + (-1,))
    q_wi = q_w.detach().to(torch.int64)
    q_b = q_b.to(torch.int64)
    grad = torch.is_grad_enabled() and (a.r.requires_grad or q_w.requires_grad)
    z = c = None
    if grad:   # the conv of integer-valued floats: exact (and reused) when partial sums stay < 2^24
        c = apply(ste(a.r / float(s_x), a.q.to(a.r.dtype)), q_w)
        xmax = max(abs(a.lo), abs(a.hi))                          # the activation's static range
        if qm.training or xmax * float(q_wi.abs().reshape(q_wi.shape[0], -1).sum(1).max()) < FP32_EXACT:
            # Training steps accept float32 rounding of accumulators above 2^24 (relative error
            # < 2^-24, far below one quantization step); eval, calibration and lowering are exact.
            z = torch.round(c.detach()).to(torch.int64)
    if z is None and conv:
        z = exact_conv2d(a.q, q_wi, at["stride"], at["padding"], at["dilation"], at["groups"])
    elif z is None:
        z = torch.round(a.q.to(torch.float64) @ q_wi.to(torch.float64).T).to(torch.int64)
    z = z + channel_view(q_b, z.dim()) if conv or z.dim() == 2 else z + q_b
    r = None
    if grad:
        surrogate = c * channel_view(s_acc.to(a.r.dtype), z.dim()) \
            + channel_view(ste(b_bar, q_b * s_acc.reshape(-1)), z.dim() if conv or z.dim() == 2 else 2)
        r = qm.exact_real(surrogate, lambda: z.to(torch.float64) * channel_view(s_acc, z.dim()))
    qm.emit("conv2d" if conv else "dense", [a.name], node.name, layer=node.layer,
            attrs=({k: at[k] for k in ("stride", "padding", "dilation", "groups")} if conv else {})
            | {"w_bits": bits, "x_bits": bits if a.name != "input" else 8, "x_signed": a.lo < 0},
            consts={"weight": q_wi.cpu().numpy().astype(np.int8), "bias": q_b.cpu().numpy().astype(np.int32)},
            scale=np_scale(s_acc))
    return V(z, s_acc, r, node.name)


# ---------------------------------------------------------------------------------------------- executor

def execute_conv2d(op, ins):
    a, c = op.attrs, op.consts
    x = ins[0].to(torch.int64)
    weight = torch.as_tensor(c["weight"], dtype=torch.int64)
    bias = torch.as_tensor(c["bias"], dtype=torch.int64)
    (ph, pw), groups = a["padding"], a["groups"]
    o, ipg, kh, kw = weight.shape
    dtype = exact_dtype(int(x.abs().max()) if x.numel() else 0, weight.reshape(o, -1))
    x = F.pad(x.to(dtype), (pw, pw, ph, ph))                             # zero point 0: pad with 0
    win = windows(x, (kh, kw), a["stride"], a["dilation"])               # N, C, Ho, Wo, kh, kw
    n, _, ho, wo = win.shape[:4]
    # one matrix product per group, batched: (G, N*Ho*Wo, ipg*kh*kw) @ (G, ipg*kh*kw, O/G)
    cols = win.reshape(n, groups, ipg, ho, wo, kh, kw).permute(1, 0, 3, 4, 2, 5, 6).reshape(
        groups, n * ho * wo, ipg * kh * kw)
    out = torch.bmm(cols, weight.to(dtype).reshape(groups, o // groups, -1).transpose(1, 2)).to(torch.int64)
    out = out.permute(1, 0, 2).reshape(n, ho, wo, o).permute(0, 3, 1, 2)
    return out + bias.reshape(1, -1, 1, 1)


def execute_dense(op, ins):
    w = torch.as_tensor(op.consts["weight"], dtype=torch.int64)
    x = ins[0]
    out = int_matmul(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], w.shape[0])
    return out + torch.as_tensor(op.consts["bias"], dtype=torch.int64)


def conv2d_range(op, ins):
    pad = any(op.attrs.get("padding", (0, 0)))
    return linear_range(np.asarray(op.consts["weight"]), op.consts.get("bias"), *ins[0], pad)


def dense_range(op, ins):
    return linear_range(np.asarray(op.consts["weight"]), op.consts.get("bias"), *ins[0], False)


CONV2D = """inputs [x]; consts weight (O, I/groups, kh, kw) int8 holding w_bits-bit values, bias (O,) int32;
attrs stride, padding, dilation (pairs), groups, w_bits, x_bits, x_signed;
out = conv(x, weight) + bias, zero padding, INT32 accumulation."""
DENSE = """inputs [x] (N, I), or tokens (N, ..., I); consts weight (O, I) int8, bias (O,) int32; attrs w_bits,
x_bits, x_signed; out = x @ weight.T + bias over the last axis, INT32 accumulation."""

register_ops(
    GraphNode("conv", layer_step, modules=(nn.Conv2d,), convert=_convert_conv, observers=_observers, layer=True,
              supported="Conv2d (+BatchNorm2d)"),
    GraphNode("linear", layer_step, modules=(nn.Linear,), functions=(F.linear,), convert=_convert_linear,
              observers=_observers, layer=True, supported="Linear, F.linear of a module's weight",
              aten={torch.ops.aten.linear.default: F.linear}),
    ProgramOp("conv2d", CONV2D, execute_conv2d, conv2d_range),
    ProgramOp("dense", DENSE, execute_dense, dense_range),
)
