"""Integer arithmetic the ops share: sliding windows and pooling pads, exact matrix products, and the sound
integer ranges of linear maps and requantizations (interval arithmetic)."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

FLOAT32_EXACT = 1 << 24   # every integer of magnitude up to 2^24 is a float32
FLOAT64_EXACT = 1 << 53


def windows(x: torch.Tensor, kernel, stride, dilation) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, Ho, Wo, kh, kw) views of the (already padded) input."""
    (kh, kw), (sh, sw), (dh, dw) = kernel, stride, dilation
    win = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)
    return win[..., ::dh, ::dw]


def pool_pad(x, kernel, stride, padding, ceil_mode, fill, dilation=(1, 1)):
    """Pad for pooling; ceil_mode adds the extra right/bottom padding torch would use (for the window's
    dilated extent; the last window must start inside the input or its left padding)."""
    h, w = x.shape[2:]
    extra = []
    for size, k, s, p in ((h, (kernel[0] - 1) * dilation[0] + 1, stride[0], padding[0]),
                          (w, (kernel[1] - 1) * dilation[1] + 1, stride[1], padding[1])):
        out = (size + 2 * p - k + ((s - 1) if ceil_mode else 0)) // s + 1
        if ceil_mode and (out - 1) * s >= size + p:
            out -= 1
        extra.append(max(0, (out - 1) * s + k - size - 2 * p))
    return F.pad(x, (padding[1], padding[1] + extra[1], padding[0], padding[0] + extra[0]), value=fill)


def exact_dtype(x_absmax: int, w: torch.Tensor) -> torch.dtype:
    """The cheapest dtype in which x @ w.T (w: (O, K) integers, |x| <= x_absmax) is computed exactly.

    With B = x_absmax * max_o sum_k |w[o, k]|, every product and every partial sum, in any order, is an
    integer of magnitude at most B; float32 holds all integers up to 2^24 and float64 up to 2^53 exactly, so
    a float GEMM below those bounds is exact; int64 otherwise. (An int8 x int8 -> int32 GEMM is exact too,
    but on a CPU without VNNI an order of magnitude slower than float32.)"""
    bound = x_absmax * (int(w.to(torch.int64).abs().sum(1).max()) if w.numel() else 0)
    return torch.float32 if bound < FLOAT32_EXACT else torch.float64 if bound < FLOAT64_EXACT else torch.int64


def int_matmul(cols: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """cols (M, K) @ w (O, K).T exactly, as int64 (in the dtype `exact_dtype` picks)."""
    dtype = exact_dtype(int(cols.abs().max()) if cols.numel() else 0, w)
    return (cols.to(dtype) @ w.to(dtype).T).to(torch.int64)


def linear_range(w: np.ndarray, bias, lo: int, hi: int, padded: bool) -> tuple:
    """Range of bias + sum(w * x) over x in [lo, hi] (and 0 where padding), per output, then over outputs."""
    if padded:
        lo, hi = min(lo, 0), max(hi, 0)
    w = w.reshape(w.shape[0], -1).astype(np.int64)
    pos, neg = np.where(w > 0, w, 0).sum(axis=1), np.where(w < 0, w, 0).sum(axis=1)
    b = np.zeros(w.shape[0], np.int64) if bias is None else np.asarray(bias, np.int64).reshape(-1)
    top = b + pos.astype(object) * hi + neg.astype(object) * lo
    bottom = b + pos.astype(object) * lo + neg.astype(object) * hi
    return int(min(bottom)), int(max(top))


def requantize_range(r: tuple, multiplier: np.ndarray, shift: np.ndarray) -> tuple:
    """Range of (z * b + 2^(c-1)) >> c over z in [lo, hi] and every (b, c) pair (exact big integers)."""
    b, c = multiplier.reshape(-1).astype(object), shift.reshape(-1).astype(object)

    def at(z):
        return (z * b + (1 << (c - 1))) >> c
    return int(min(at(r[0]))), int(max(at(r[1])))
