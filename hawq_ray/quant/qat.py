"""QuantModel: quantization-aware training modules that simulate the integer program exactly.

Every value in the network is carried as V(q, s, r):
  q  the exact integer tensor (int64) of the integer-only pipeline,
  s  its real scale (float64; a scalar, or one per channel for a conv's INT32 accumulator),
  r  a float tensor whose value is q * s and whose gradient is the fake-quantization (straight-through)
     gradient, so training sees exactly the numbers the deployed integers produce.
Integer values come from exact computations: a conv of integer-valued float tensors is exact when every
partial sum stays below 2^24 (checked per call; otherwise the input is split into base-16 digits), and
requantization is `hawq_ray.quant.dyadic.requantize` on int64.

The same interpreter lowers the model: `to_integer()` runs it once with an emitter that records every
integer op with the very constants the simulation used, so QAT simulation and IntegerProgram cannot drift.

Modes: "qat" (integer-exact values, STE gradients), "fake" (Appendix C/F: float accumulation, float
requantization at the activation points), "fp32" (BN-folded float model, no quantization).
"""
from __future__ import annotations

import copy
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hawq_ray.errors import HawqError
from hawq_ray.quant.dyadic import dyadic, requantize
from hawq_ray.quant.fold import fold_bn
from hawq_ray.quant.graph import Graph, GNode, trace_graph
from hawq_ray.quant.program import INT32_MAX, INT32_MIN, IntegerProgram, Op
from hawq_ray.quant.quantizers import (activation_scale, ema_update, quantize_weight, signed_range,
                                       unsigned_range, weight_scale)

WIDE_BITS = 16       # residual / concat outputs: INT32 tensors at 16-bit resolution (HAWQ's quant_act_int32)
FP32_EXACT = 2 ** 24  # integers below this are exact in float32
MODES = ("qat", "fake", "fp32")


class V:
    """A value: exact integers `q`, real scale `s`, and the real tensor `r` (materialized lazily as q * s
    when nothing needs its gradient, so integer-only inference does not pay for float copies)."""
    __slots__ = ("q", "s", "_r", "name", "lo", "hi")

    def __init__(self, q, s, r=None, name="", lo=INT32_MIN, hi=INT32_MAX):
        self.q, self.s, self._r, self.name, self.lo, self.hi = q, s, r, name, lo, hi

    @property
    def r(self) -> torch.Tensor:
        if self._r is None:
            self._r = (self.q.to(torch.float64) * channel_view(self.s, self.q.dim())).to(torch.float32)
        return self._r


class _StraightThrough(torch.autograd.Function):
    """Forward: `value`; backward: the incoming gradient goes to `surrogate` unchanged."""

    @staticmethod
    def forward(ctx, surrogate, value):
        return value

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def ste(surrogate: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Forward: `value`; backward: the gradient of `surrogate` (straight-through estimator)."""
    value = value.to(surrogate.dtype)
    if not (torch.is_grad_enabled() and surrogate.requires_grad):
        return value
    return _StraightThrough.apply(surrogate, value)


def channel_view(s: torch.Tensor, ndim: int) -> torch.Tensor:
    """Scale (C,) -> broadcastable against an (N, C, H, W) or (N, C) tensor; scalars stay."""
    if s.dim() == 0:
        return s
    return s.reshape((-1,) + (1,) * (ndim - 2))


def _split_digits(q: torch.Tensor):
    """q = 16 * hi + lo with lo in [0, 15]; both digits are at most 2^(bits-4) in magnitude."""
    return q >> 4, q & 15


def exact_conv2d(q: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups) -> torch.Tensor:
    """conv(q, w) for integer tensors, exactly, on float32 convolution kernels (returns int64)."""
    wsum = float(w.abs().reshape(w.shape[0], -1).sum(1).max()) if w.numel() else 0.0
    xmax = float(q.abs().max()) if q.numel() else 0.0
    wf = w.to(torch.float32)

    def conv(x):
        return F.conv2d(x.to(torch.float32), wf, None, stride, padding, dilation, groups)

    if xmax * wsum < FP32_EXACT:
        return torch.round(conv(q)).to(torch.int64)
    hi, lo = _split_digits(q)
    if max(float(hi.abs().max()), 15.0) * wsum < FP32_EXACT:
        both = torch.round(conv(torch.cat([hi, lo]))).to(torch.int64)
        return both[: q.shape[0]] * 16 + both[q.shape[0]:]
    out = F.conv2d(q.to(torch.float64), w.to(torch.float64), None, stride, padding, dilation, groups)
    return torch.round(out).to(torch.int64)  # exact: |partial sums| < 2^53


class QuantModel(nn.Module):
    def __init__(self, model: nn.Module, bits: dict[str, int], input_shape, graph: Graph | None = None):
        super().__init__()
        self.model = model
        self.graph = graph or trace_graph(model)
        self.bits = dict(bits)
        self.input_shape = tuple(input_shape)
        self.mode = "qat"
        self.calibrating = False
        self._points: dict[str, str] = {}
        input_name = next(n.name for n in self.graph.nodes if n.kind == "input")
        self._input_name = input_name
        keys = ["input"]
        for n in self.graph.nodes:
            if n.kind in ("conv", "linear"):
                if n.layer not in self.bits:
                    raise HawqError(f"no bits given for layer {n.layer!r}")
                if n.inputs[0] != input_name:
                    keys.append(f"in:{n.layer}")
                elif self.bits[n.layer] != 8:
                    raise HawqError(f"layer {n.layer!r} reads the 8-bit input image; it must be 8-bit, "
                                    f"not {self.bits[n.layer]}")
            elif n.kind in ("add", "cat"):
                keys.append(f"out:{n.name}")
        for i, key in enumerate(keys):
            self.register_buffer(f"act_range_{i}", torch.tensor(-1.0))  # -1: not observed yet
            self._points[key] = f"act_range_{i}"
        self._nonneg_values = {n.name: n.nonneg for n in self.graph.nodes}
        self._emit = None

    # ---------------------------------------------------------------- public API
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.run(x)[0].r

    def run(self, x: torch.Tensor, record: bool = False):
        """Run the network; returns (output V, {layer: V of its output} if record)."""
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        vals: dict[str, V] = {}
        layers: dict[str, V] = {}
        for node in self.graph.nodes:
            vals[node.name] = v = self._step(node, x, vals)
            if record and node.kind in ("conv", "linear"):
                layers[node.layer] = v
        return vals[self.graph.output], layers

    def set_mode(self, mode: str) -> "QuantModel":
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        return self

    @torch.no_grad()
    def calibrate(self, batches) -> "QuantModel":
        """Track activation ranges (EMA, momentum 0.99) over `batches` of images, in QAT mode."""
        was, mode = self.training, self.mode
        self.eval()
        self.calibrating, self.mode = True, "qat"
        try:
            n = 0
            for x in batches:
                self.run(x[0] if isinstance(x, (tuple, list)) else x)
                n += 1
            if n == 0:
                raise HawqError("calibration data is empty: give at least one batch")
        finally:
            self.calibrating, self.mode = False, mode
            self.train(was)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.model.modules():          # BN is folded and frozen: always running statistics
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self

    @torch.no_grad()
    def to_integer(self) -> IntegerProgram:
        """Lower to the IntegerProgram by running the QAT interpreter once with an op emitter."""
        self._check_calibrated()
        ops: list[Op] = []
        was, mode = self.training, self.mode
        self.eval()
        self.mode, self._emit = "qat", ops.append
        try:
            device = next(self.model.parameters()).device
            out, _ = self.run(torch.zeros((1, *self.input_shape), device=device))
        finally:
            self._emit, self.mode = None, mode
            self.train(was)
        return IntegerProgram(input_name="input", input_shape=self.input_shape,
                              input_scale=self._input_scale(), ops=ops, output=out.name,
                              output_scale=out.s.cpu().numpy().astype(np.float64), bits=dict(self.bits))

    # ---------------------------------------------------------------- helpers
    def _range(self, key: str) -> torch.Tensor:
        return getattr(self, self._points[key])

    def _observe(self, key: str, current: torch.Tensor | None) -> float:
        buf = self._range(key)
        if current is not None and (self.training or self.calibrating):
            buf.copy_(ema_update(buf, current.detach().to(buf.dtype), bool(buf >= 0)))
        if buf < 0:
            raise HawqError(f"activation range {key!r} was never observed: calibrate the model "
                            "(QuantModel.calibrate) or train it before quantized inference")
        return float(buf)

    def _check_calibrated(self):
        missing = [k for k, b in self._points.items() if getattr(self, b) < 0]
        if missing:
            raise HawqError(f"activation ranges {missing[:3]} were never observed: calibrate first")

    def _input_scale(self) -> float:
        return activation_scale(float(self._range("input")), 8, signed=True)

    def _emit_op(self, op: str, inputs, output: str, **kw) -> str:
        if self._emit is not None:
            self._emit(Op(op=op, inputs=list(inputs), output=output, **kw))
        return output

    # ---------------------------------------------------------------- interpreter
    def _step(self, node: GNode, x: torch.Tensor, vals: dict[str, V]) -> V:
        ins = [vals[i] for i in node.inputs]
        kind = node.kind
        if kind == "input":
            return self._quantize_input(x)
        if kind in ("conv", "linear"):
            a = ins[0]
            if node.inputs[0] != self._input_name:
                a = self._act_point(a, f"in:{node.layer}", self.bits[node.layer],
                                    signed=not self._nonneg(node.inputs[0]), name=f"{node.name}.in")
            return self._layer(node, a)
        if kind == "relu":
            v = ins[0]
            q = v.q.clamp_min(0) if v.q is not None else None
            name = self._emit_op("relu", [v.name], node.name, scale=_np(v.s), lo=max(v.lo, 0), hi=v.hi)
            r = F.relu(v.r) if q is None else self._lazy(v, F.relu)
            return V(q, v.s, r, name, max(v.lo, 0), v.hi)
        if kind in ("add", "cat"):
            return self._join(node, ins)
        if kind == "avgpool":
            return self._avgpool(node, ins[0])
        if kind == "maxpool":
            return self._maxpool(node, ins[0])
        if kind == "flatten":
            v = ins[0]
            s = v.s
            if s is not None and s.dim() == 1 and v.r.dim() == 4 and v.r.shape[2] * v.r.shape[3] > 1:
                s = s.repeat_interleave(v.r.shape[2] * v.r.shape[3])
            q = v.q.flatten(1) if v.q is not None else None
            name = self._emit_op("flatten", [v.name], node.name, scale=_np(s), lo=v.lo, hi=v.hi)
            r = v.r.flatten(1) if q is None else self._lazy(v, lambda t: t.flatten(1))
            return V(q, s, r, name, v.lo, v.hi)
        raise HawqError(f"internal: unknown graph node kind {kind!r}")

    def _exact_real(self, surrogate, value_fn):
        """r for a value: while training, the surrogate itself (the fake-quantization float value, whose
        forward value only feeds range tracking and the loss; the integers travel in q); otherwise the
        surrogate carrying the exact value q * s."""
        if self.training and torch.is_grad_enabled():
            return surrogate
        return ste(surrogate, value_fn())

    def _needs_real(self) -> bool:
        """Float surrogates are needed for gradients and for observing activation ranges only."""
        return torch.is_grad_enabled() or self.training or self.calibrating

    def _lazy(self, v: V, fn):
        """fn(v.r) when real values are needed or already there; None (materialize later) otherwise."""
        return fn(v.r) if (v._r is not None or self._needs_real()) else None

    def _nonneg(self, name: str) -> bool:
        return self._nonneg_values[name]

    def _quantize_input(self, x: torch.Tensor) -> V:
        if self.mode == "fp32":
            return V(None, None, x, "input")
        self._observe("input", x.detach().abs().max())
        scale = self._input_scale()
        lo, hi = signed_range(8)
        q = torch.floor(x.detach().to(torch.float64) / scale + 0.5).clamp_(lo, hi)
        s = torch.tensor(scale, dtype=torch.float64, device=x.device)
        r = ste(x.clamp(lo * scale, hi * scale), q * scale)
        return V(q.to(torch.int64) if self.mode == "qat" else None, s, r, "input", lo, hi)

    def _act_point(self, v: V, key: str, bits: int, signed: bool, name: str) -> V:
        """The activation quantizer in front of a layer: static EMA range, `bits` wide (eq. 12)."""
        if self.mode == "fp32":
            return v
        observe = self.training or self.calibrating
        cur = (_absmax(v.r) if signed else v.r.detach().max().clamp_min(0)) if observe else None
        scale = activation_scale(self._observe(key, cur), bits, signed)
        lo, hi = signed_range(bits) if signed else unsigned_range(bits)
        s = torch.tensor(scale, dtype=torch.float64, device=self._device(v))
        if self.mode == "fake":  # eq. 15: float division by S_a
            q = torch.floor(v.r.detach().to(torch.float64) / scale + 0.5).clamp_(lo, hi)
            return V(None, s, ste(v.r.clamp(lo * scale, hi * scale), q * scale), name, lo, hi)
        b, c = self._dyadic(v.s / scale, v.q.dim())
        q = requantize(v.q, b, c, lo, hi)
        self._emit_op("requantize", [v.name], name, consts=_consts(b, c), scale=_np(s), lo=lo, hi=hi)
        r = self._lazy(v, lambda t: self._exact_real(t.clamp(lo * scale, hi * scale), lambda: q * scale))
        return V(q, s, r, name, lo, hi)

    @staticmethod
    def _device(v: V):
        return v.q.device if v.q is not None else v.r.device

    def _dyadic(self, multiplier: torch.Tensor, ndim: int):
        b, c = dyadic(multiplier.detach().cpu().numpy())
        dev = multiplier.device
        b = channel_view(torch.from_numpy(b).to(dev), ndim)
        c = channel_view(torch.from_numpy(c).to(dev), ndim)
        return b, c

    def _layer(self, node: GNode, a: V) -> V:
        mod = node.module
        w_bar, b_bar = fold_bn(mod.weight, mod.bias, node.bn)       # eq. 16
        conv = node.kind == "conv"
        at = node.attrs

        def apply(x, w, bias=None):
            if conv:
                return F.conv2d(x, w, bias, at["stride"], at["padding"], at["dilation"], at["groups"])
            return F.linear(x, w, bias)

        if self.mode == "fp32":
            return V(None, None, apply(a.r, w_bar, b_bar), node.name)
        bits = self.bits[node.layer]
        s_x = a.s
        # Per-channel symmetric weight scale; floored so the INT32 bias (eq. 17) cannot overflow.
        s_w = torch.maximum(weight_scale(w_bar, bits),
                            b_bar.detach().abs() / (float(s_x) * 2.0 ** 30)).detach()
        q_w, _ = quantize_weight(w_bar, bits, s_w)                  # integer values, STE gradient
        wshape = (-1,) + (1,) * (w_bar.dim() - 1)
        if self.mode == "fake":  # eq. 14: float accumulate of dequantized weights and activations
            r = apply(a.r, q_w * s_w.reshape(wshape), b_bar)
            return V(None, None, r, node.name)
        s_acc = s_x * s_w.to(torch.float64)                         # S_b = S_h * S_W (eq. 17)
        q_b = torch.floor(b_bar.detach().to(torch.float64) / s_acc + 0.5).clamp_(INT32_MIN, INT32_MAX)
        q_wi = q_w.detach().to(torch.int64)
        q_b = q_b.to(torch.int64)
        grad = torch.is_grad_enabled() and (a.r.requires_grad or q_w.requires_grad)
        z = c = None
        if grad:   # the conv of integer-valued floats: exact (and reused) when partial sums stay < 2^24
            c = apply(ste(a.r / float(s_x), a.q.to(a.r.dtype)), q_w)
            xmax = max(abs(a.lo), abs(a.hi))                          # the activation's static range
            if self.training or xmax * float(q_wi.abs().reshape(q_wi.shape[0], -1).sum(1).max()) < FP32_EXACT:
                # Training steps accept float32 rounding of accumulators above 2^24 (relative error
                # < 2^-24, far below one quantization step); eval, calibration and lowering are exact.
                z = torch.round(c.detach()).to(torch.int64)
        if z is None and conv:
            z = exact_conv2d(a.q, q_wi, at["stride"], at["padding"], at["dilation"], at["groups"])
        elif z is None:
            z = torch.round(a.q.to(torch.float64) @ q_wi.to(torch.float64).T).to(torch.int64)
        z = z + channel_view(q_b, z.dim())
        r = None
        if grad:
            surrogate = c * channel_view(s_acc.to(a.r.dtype), z.dim()) \
                + channel_view(ste(b_bar, q_b * s_acc), z.dim())
            r = self._exact_real(surrogate, lambda: z.to(torch.float64) * channel_view(s_acc, z.dim()))
        self._emit_op("conv2d" if conv else "dense", [a.name], node.name, layer=node.layer,
                      attrs=({k: at[k] for k in ("stride", "padding", "dilation", "groups")} if conv else {})
                      | {"w_bits": bits, "x_bits": bits if a.name != "input" else 8, "x_signed": a.lo < 0},
                      consts={"weight": q_wi.cpu().numpy().astype(np.int8),
                              "bias": q_b.cpu().numpy().astype(np.int32)},
                      scale=_np(s_acc))
        return V(z, s_acc, r, node.name)

    def _join(self, node: GNode, ins: list[V]) -> V:
        """Residual add (Appendix F) or concat (eq. 18): each branch requantized to the output scale."""
        add = node.kind == "add"
        need = self.mode != "qat" or self._needs_real() or any(v._r is not None for v in ins)
        real = (ins[0].r + ins[1].r if add else torch.cat([v.r for v in ins], 1)) if need else None
        if self.mode == "fp32":
            return V(None, None, real, node.name)
        observe = self.training or self.calibrating
        scale = activation_scale(self._observe(f"out:{node.name}", _absmax(real) if observe else None),
                                 WIDE_BITS, signed=True)
        s = torch.tensor(scale, dtype=torch.float64, device=self._device(ins[0]))
        if self.mode == "fake":  # eq. 20/21: accumulate in float, then requantize once
            q = torch.floor(real.detach().to(torch.float64) / scale + 0.5)
            return V(None, s, ste(real, q * scale), node.name)
        parts, names = [], []
        for i, v in enumerate(ins):
            b, c = self._dyadic(v.s / scale, v.r.dim())
            parts.append(requantize(v.q, b, c))
            names.append(self._emit_op("requantize", [v.name], f"{node.name}.b{i}", consts=_consts(b, c),
                                       scale=_np(s)))
        q = parts[0] + parts[1] if add else torch.cat(parts, 1)
        self._emit_op("add" if add else "concat", names, node.name, scale=_np(s),
                      attrs={} if add else {"axis": 1})
        return V(q, s, None if real is None else self._exact_real(real, lambda: q * scale), node.name)

    def _avgpool(self, node: GNode, v: V) -> V:
        """Average pooling on INT32: window sum, then a dyadic 1/count requantization (Appendix E)."""
        at = node.attrs
        if at.get("global"):
            shape = (v.q if v.q is not None else v.r).shape
            k, st, pad, ceil, incl = tuple(shape[2:]), tuple(shape[2:]), (0, 0), False, True
        else:
            k, st, pad, ceil, incl = at["kernel"], at["stride"], at["padding"], at["ceil_mode"], \
                at["count_include_pad"]
        if self.mode != "qat":
            return V(None, v.s, F.avg_pool2d(v.r, k, st, pad, ceil, incl), node.name)
        real = self._lazy(v, lambda t: F.avg_pool2d(t, k, st, pad, ceil, incl))
        ones = torch.ones((1, 1, *v.q.shape[2:]), dtype=torch.float64, device=v.q.device)
        counts = F.avg_pool2d(ones, k, st, pad, ceil, count_include_pad=True, divisor_override=1) if incl \
            else F.avg_pool2d(ones, k, st, pad, ceil, count_include_pad=False, divisor_override=1)
        if ceil:
            raise HawqError(f"average pooling {node.name!r} with ceil_mode=True is not supported")
        total = F.avg_pool2d(v.q.to(torch.float64), k, st, pad, ceil, True, divisor_override=1)
        total = torch.round(total).to(torch.int64)
        inv = (1.0 / counts[0]).cpu().numpy()                       # (1, Ho, Wo)
        if np.all(inv == inv.flat[0]):
            inv = np.asarray(inv.flat[0])
        b, c = dyadic(inv)
        b, c = torch.from_numpy(b).to(v.q.device), torch.from_numpy(c).to(v.q.device)
        q = requantize(total, b, c)
        sum_name = self._emit_op("sum_pool2d", [v.name], f"{node.name}.sum",
                                 attrs={"kernel": tuple(k), "stride": tuple(st), "padding": tuple(pad),
                                        "ceil_mode": False})
        self._emit_op("requantize", [sum_name], node.name, consts=_consts(b, c), scale=_np(v.s),
                      lo=v.lo, hi=v.hi)
        return V(q, v.s, self._real(real, q, v.s), node.name, v.lo, v.hi)

    def _real(self, surrogate, q, s):
        if surrogate is None:
            return None
        return self._exact_real(surrogate, lambda: q.to(torch.float64) * channel_view(s, q.dim()))

    def _maxpool(self, node: GNode, v: V) -> V:
        at = node.attrs
        args = (at["kernel"], at["stride"], at["padding"], at["dilation"], at["ceil_mode"])
        if self.mode != "qat":
            return V(None, v.s, F.max_pool2d(v.r, *args), node.name)
        if self.training and torch.is_grad_enabled():   # the integers at the surrogate's argmax
            real, idx = F.max_pool2d(v.r, *args, return_indices=True)
            q = v.q.flatten(2).gather(2, idx.flatten(2)).view_as(idx)
        else:
            real = self._lazy(v, lambda t: F.max_pool2d(t, *args))
            q = torch.round(F.max_pool2d(v.q.to(torch.float64), *args)).to(torch.int64)
        self._emit_op("max_pool2d", [v.name], node.name, scale=_np(v.s), lo=v.lo, hi=v.hi,
                      attrs={"kernel": args[0], "stride": args[1], "padding": args[2], "dilation": args[3],
                             "ceil_mode": args[4]})
        return V(q, v.s, self._real(real, q, v.s), node.name, v.lo, v.hi)


def _absmax(t: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.aminmax(t.detach())
    return torch.maximum(-lo, hi)


def _np(s):
    return None if s is None else s.detach().cpu().numpy().astype(np.float64)


def _consts(b: torch.Tensor, c: torch.Tensor) -> dict:
    return {"multiplier": b.cpu().numpy().astype(np.int32), "shift": c.cpu().numpy().astype(np.int32)}


def prepare(model: nn.Module, bits="uniform8", input_shape=None) -> QuantModel:
    """Convert a torch.fx-traceable CNN into a QuantModel (a deep copy; the original is untouched).

    bits: "uniform4", "uniform8", a {layer: bits} dict or a JSON file path; the first conv and last
    linear layer stay at 8 bits. input_shape: (C, H, W); defaults to the model's known input size.
    """
    from hawq_ray.cost import bits_for
    from hawq_ray.layers import layer_table
    if input_shape is None:
        from hawq_ray.models import input_shape as model_input_shape
        input_shape = model_input_shape(model)
    model = copy.deepcopy(model).eval()
    table = layer_table(model, input_shape)
    if isinstance(bits, str) and bits == "fp32":
        raise HawqError("bits 'fp32' means no quantization; give uniform4, uniform8 or a {layer: bits} config")
    resolved = bits_for(table, bits)
    return QuantModel(model, resolved, input_shape, graph=trace_graph(model)).eval()
