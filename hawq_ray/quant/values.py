"""The values the QAT interpreter passes between nodes, and the exact-integer helpers its op steps share.

Every value in the network is carried as V(q, s, r):
  q  the exact integer tensor (int64) of the integer-only pipeline,
  s  its real scale (float64; a scalar, or one per channel for a conv's INT32 accumulator),
  r  a float tensor whose value is q * s and whose gradient is the fake-quantization (straight-through)
     gradient, so training sees exactly the numbers the deployed integers produce.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hawq_ray.program.program import INT32_MAX, INT32_MIN

FP32_EXACT = 2 ** 24  # integers below this are exact in float32
WIDE_BITS = 16       # residual / concat branches: 16-bit scale and clamp (HAWQ's quant_act_int32)


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

    @property
    def device(self):
        return self.q.device if self.q is not None else self.r.device


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
    """Scale (C,) -> broadcastable against an (N, C, H, W) or (N, C) tensor (channels on axis 1); scalars and
    scales already shaped for broadcasting stay (a Linear's over tokens, (1, ..., 1, C): features on the last
    axis)."""
    if s.dim() != 1:
        return s
    return s.reshape((-1,) + (1,) * (ndim - 2))


def absmax(t: torch.Tensor) -> torch.Tensor:
    lo, hi = torch.aminmax(t.detach())
    return torch.maximum(-lo, hi)


def exact_conv2d(q: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups) -> torch.Tensor:
    """conv(q, w) for integer tensors, exactly, on float32 convolution kernels (returns int64): directly when
    every partial sum stays below 2^24, else on base-16 digits of q, else in float64 (exact below 2^53)."""
    wsum = float(w.abs().reshape(w.shape[0], -1).sum(1).max()) if w.numel() else 0.0
    xmax = float(q.abs().max()) if q.numel() else 0.0
    wf = w.to(torch.float32)

    def conv(x):
        return F.conv2d(x.to(torch.float32), wf, None, stride, padding, dilation, groups)

    if xmax * wsum < FP32_EXACT:
        return torch.round(conv(q)).to(torch.int64)
    hi, lo = q >> 4, q & 15      # q = 16 * hi + lo, lo in [0, 15]: each digit 4 bits narrower
    if max(float(hi.abs().max()), 15.0) * wsum < FP32_EXACT:
        both = torch.round(conv(torch.cat([hi, lo]))).to(torch.int64)
        return both[: q.shape[0]] * 16 + both[q.shape[0]:]
    out = F.conv2d(q.to(torch.float64), w.to(torch.float64), None, stride, padding, dilation, groups)
    return torch.round(out).to(torch.int64)


def np_scale(s):
    """A scale as the program's metadata stores it (float64 numpy), None stays None."""
    return None if s is None else s.detach().cpu().numpy().astype("float64")


def dyadic_consts(b: torch.Tensor, c: torch.Tensor) -> dict:
    """A requantize's constants as the program stores them."""
    return {"multiplier": b.cpu().numpy().astype("int32"), "shift": c.cpu().numpy().astype("int32")}
