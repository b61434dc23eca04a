"""QuantModel: quantization-aware training modules that simulate the integer program exactly.

The model is traced into a graph (`quant.graph`); `run` interprets it node by node, each node by its kind's
step in the op registry (`hawq_ray.ops`). Every value is a `V` (`quant.values`): the exact integers, their
real scale and a float surrogate carrying the straight-through gradient, so training sees exactly the numbers
the deployed integers produce. Integer values come from exact computations (float convolutions only where a
bound proves them exact) and requantization is `program.dyadic.requantize` on int64.

The same interpreter lowers the model: `to_integer()` runs it once with an emitter that records every
integer op with the very constants the simulation used, so QAT simulation and IntegerProgram cannot drift.

Modes: "qat" (integer-exact values, STE gradients), "fake" (Appendix C/F: float accumulation, float
requantization at the activation points), "fp32" (BN-folded float model, no quantization).
"""
from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import torch
from torch import nn

from hawq_ray.contract import HawqError
from hawq_ray.ops import GRAPH_NODES
from hawq_ray.program.dyadic import dyadic, requantize
from hawq_ray.program.program import IntegerProgram, Op
from hawq_ray.quant.graph import Graph, trace_graph
from hawq_ray.quant.quantizers import activation_scale, ema_update, signed_range, unsigned_range
from hawq_ray.quant.values import WIDE_BITS, V, absmax, channel_view, dyadic_consts, np_scale, ste

MODES = ("qat", "fake", "fp32")


class QuantModel(nn.Module):
    def __init__(self, model: nn.Module, bits: dict[str, int], input_shape, graph: Graph | None = None):
        super().__init__()
        self.model = model
        self.graph = graph or trace_graph(model, input_shape)
        self.bits = dict(bits)
        self.input_shape = tuple(input_shape)
        self.mode = "qat"
        self.calibrating = False
        self.input_name = self.graph.input_name
        for n in self.graph.layer_nodes():
            if n.layer not in self.bits:
                raise HawqError(f"no bits given for layer {n.layer!r}")
            if n.inputs[0] == self.input_name and self.bits[n.layer] != 8:
                raise HawqError(f"layer {n.layer!r} reads the 8-bit input image; it must be 8-bit, "
                                f"not {self.bits[n.layer]}")
        keys = ["input"] + [k for n in self.graph.nodes if n.kind in GRAPH_NODES
                            for k in GRAPH_NODES[n.kind].observers(n, self.input_name)]
        self._points: dict[str, str] = {}
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
            if node.kind == "input":
                vals[node.name] = v = self._quantize_input(x)
            else:
                vals[node.name] = v = GRAPH_NODES[node.kind].step(self, node, [vals[i] for i in node.inputs])
            if record and node.layer is not None:
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
            if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
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

    # ---------------------------------------------------------------- what op steps use
    @property
    def observing(self) -> bool:
        """Activation ranges are tracked while training and calibrating."""
        return self.training or self.calibrating

    def observe(self, key: str, current: torch.Tensor | None) -> float:
        """The activation range `key` (updated by `current` while observing); an error if never observed."""
        buf = getattr(self, self._points[key])
        if current is not None and self.observing:
            buf.copy_(ema_update(buf, current.detach().to(buf.dtype), bool(buf >= 0)))
        if buf < 0:
            raise HawqError(f"activation range {key!r} was never observed: calibrate the model "
                            "(QuantModel.calibrate) or train it before quantized inference")
        return float(buf)

    def emit(self, op: str, inputs, output: str, **kw) -> str:
        """Record an integer op of the program while lowering; returns the value's name."""
        if self._emit is not None:
            self._emit(Op(op=op, inputs=list(inputs), output=output, **kw))
        return output

    def dyadic(self, multiplier: torch.Tensor, ndim: int):
        """The dyadic (b, c) of a real multiplier tensor, shaped to broadcast against an ndim value."""
        try:
            b, c = dyadic(multiplier.detach().cpu().numpy())
        except ValueError as e:      # a zero or NaN scale: weights or ranges that training blew up, or a dead value
            raise HawqError(f"{e}: a scale of the quantized model is zero, not finite or out of range (if this "
                            f"happens while fine-tuning, training diverged: lower the learning rate)") from None
        dev = multiplier.device
        return (channel_view(torch.from_numpy(b).to(dev), ndim), channel_view(torch.from_numpy(c).to(dev), ndim))

    def nonneg(self, name: str) -> bool:
        return self._nonneg_values[name]

    def exact_real(self, surrogate, value_fn):
        """r for a value: while training, the surrogate itself (the fake-quantization float value, whose
        forward value only feeds range tracking and the loss; the integers travel in q); otherwise the
        surrogate carrying the exact value q * s."""
        if self.training and torch.is_grad_enabled():
            return surrogate
        return ste(surrogate, value_fn())

    def needs_real(self) -> bool:
        """Float surrogates are needed for gradients and for observing activation ranges only."""
        return torch.is_grad_enabled() or self.training or self.calibrating

    def lazy(self, v: V, fn):
        """fn(v.r) when real values are needed or already there; None (materialize later) otherwise."""
        return fn(v.r) if (v._r is not None or self.needs_real()) else None

    def real(self, surrogate, q, s):
        """The exact real value of integers q at scale s on a surrogate (None when none was needed)."""
        if surrogate is None:
            return None
        return self.exact_real(surrogate, lambda: q.to(torch.float64) * channel_view(s, q.dim()))

    def wide_output(self, node, real, device) -> torch.Tensor:
        """The static scale of `node`'s output at 16-bit resolution (a residual sum, a LayerNorm, an affine:
        ranges an 8-bit grid would crush), observed on its float output `real` while calibrating; float64."""
        current = absmax(real) if self.observing else None
        scale = activation_scale(self.observe(f"out:{node.name}", current), WIDE_BITS, signed=True)
        return torch.tensor(scale, dtype=torch.float64, device=device)

    @staticmethod
    def fake_output(real, s: torch.Tensor, name: str, clamp: bool = True) -> V:
        """Fake mode's output on a static scale s: `real` rounded half up to the grid (clamped to 16 bits),
        the gradient straight through."""
        q = torch.floor(real.detach().to(torch.float64) / s + 0.5)
        if not clamp:
            return V(None, s, ste(real, q * s), name)
        lo, hi = signed_range(WIDE_BITS)
        return V(None, s, ste(real, q.clamp_(lo, hi) * s), name, lo, hi)

    def act_point(self, v: V, key: str, bits: int, signed: bool, name: str) -> V:
        """The activation quantizer in front of a layer: static EMA range, `bits` wide (eq. 12)."""
        if self.mode == "fp32":
            return v
        cur = (absmax(v.r) if signed else v.r.detach().max().clamp_min(0)) if self.observing else None
        scale = activation_scale(self.observe(key, cur), bits, signed)
        lo, hi = signed_range(bits) if signed else unsigned_range(bits)
        s = torch.tensor(scale, dtype=torch.float64, device=v.device)
        if self.mode == "fake":  # eq. 15: float division by S_a
            q = torch.floor(v.r.detach().to(torch.float64) / scale + 0.5).clamp_(lo, hi)
            return V(None, s, ste(v.r.clamp(lo * scale, hi * scale), q * scale), name, lo, hi)
        b, c = self.dyadic(v.s / scale, v.q.dim())
        q = requantize(v.q, b, c, lo, hi)
        self.emit("requantize", [v.name], name, consts=dyadic_consts(b, c), scale=np_scale(s), lo=lo, hi=hi)
        r = self.lazy(v, lambda t: self.exact_real(t.clamp(lo * scale, hi * scale), lambda: q * scale))
        return V(q, s, r, name, lo, hi)

    # ---------------------------------------------------------------- the image and the ranges
    def _check_calibrated(self):
        missing = [k for k, b in self._points.items() if getattr(self, b) < 0]
        if missing:
            raise HawqError(f"activation ranges {missing[:3]} were never observed: calibrate first")

    def _input_scale(self) -> float:
        return activation_scale(float(getattr(self, self._points["input"])), 8, signed=True)

    def _quantize_input(self, x: torch.Tensor) -> V:
        if self.mode == "fp32":
            return V(None, None, x, "input")
        self.observe("input", x.detach().abs().max())
        scale = self._input_scale()
        lo, hi = signed_range(8)
        q = torch.floor(x.detach().to(torch.float64) / scale + 0.5).clamp_(lo, hi)
        s = torch.tensor(scale, dtype=torch.float64, device=x.device)
        r = ste(x.clamp(lo * scale, hi * scale), q * scale)
        return V(q.to(torch.int64) if self.mode == "qat" else None, s, r, "input", lo, hi)


def prepare(model: nn.Module, bits="uniform8", input_shape=None, table: pd.DataFrame | None = None) -> QuantModel:
    """Convert a torch.fx-traceable CNN into a QuantModel (a deep copy; the original is untouched).

    bits: "uniform4", "uniform8", a {layer: bits} mapping or a JSON / bit_config.py path (`contract.bits`);
    the first conv and last linear layer stay at 8 bits. input_shape: (C, H, W); defaults to the model's
    known input size. table: the model's layer table, when the caller has it (it is built otherwise)."""
    from hawq_ray.quant.layers import layer_table
    from hawq_ray.contract.bits import parse_bits
    if input_shape is None:
        from hawq_ray.inputs.models import input_shape as model_input_shape
        input_shape = model_input_shape(model)
    model = copy.deepcopy(model).eval()
    graph = trace_graph(model, input_shape)
    table = layer_table(model, input_shape, graph) if table is None else table
    qm = QuantModel(model, dict(parse_bits(bits, table)), input_shape, graph=graph).eval()
    check_function(qm)
    return qm


TOLERANCE = 1e-3    # of the largest output: BN folding moves float32 results by ~1e-6 of it, a wrong op by ~1


def check_function(qm: QuantModel) -> None:
    """Raise unless the converted graph computes the model: its float interpreter (mode "fp32": BN folded,
    nothing quantized) against the model itself on two random images. A converter that reads a call as a
    different function (a subclass's own forward, a dropped argument) is stopped here, before any calibration,
    training or deployment, instead of showing as lost accuracy."""
    device = next((p.device for p in qm.model.parameters()), torch.device("cpu"))
    x = torch.randn((2, *qm.input_shape), generator=torch.Generator().manual_seed(0)).to(device)
    mode = qm.mode
    try:
        with torch.no_grad():
            ref = qm.model.eval()(x)
            got = qm.set_mode("fp32").run(x)[0].r
    finally:
        qm.set_mode(mode)
    if not isinstance(ref, torch.Tensor) or not torch.isfinite(ref).all():
        return                          # nothing to compare against: a float overflow of random weights
    if ref.shape != got.shape:
        raise HawqError(f"model {type(qm.model).__name__}: the converted graph gives outputs of shape "
                        f"{tuple(got.shape)}, the model {tuple(ref.shape)}; please report it with "
                        "`hawq-ray layers --model ...`")
    worst, top = float((got - ref).abs().max()), float(ref.abs().max())
    if worst > TOLERANCE * top + 1e-6:
        raise HawqError(f"model {type(qm.model).__name__}: the converted graph does not compute the model "
                        f"(max |difference| {worst:.3g} on outputs up to {top:.3g} in float, before any "
                        "quantization): a call is converted as a different function; please report it with "
                        "`hawq-ray layers --model ...`")
