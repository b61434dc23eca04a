"""Data layouts of the deployed model, and the numpy packing of constants into them (compile time only).

Activations of rank 4 live as NCHW[b]c: (N, ceil(C/b), H, W, b), b = 16 (the VNNI output width) except a
model input with at most 4 channels (b = 4). Padded channels hold values nobody reads: the weights that
would read them are zero, and concat/flatten index true channels only. Rank-2 values (N, C) are stored as is.

Conv weights: (O/16, I/b, kh, kw, b/4, 16, 4) int8, O padded to 16 and I to b with zeros. A 4-bit weight
tensor is packed two per byte over the innermost 64 values of each (16, 4) tile: byte j holds value j in its
low nibble and value j + 32 in its high nibble, so unpacking is two vector ops per 32 bytes.
"""
from __future__ import annotations

import numpy as np

OC_BLOCK = 16   # output channels per VNNI instruction
K_LANES = 4     # input channels reduced per VNNI lane


def ceil_to(x: int, m: int) -> int:
    return -(-x // m) * m


def channel_block(channels: int) -> int:
    return 4 if channels <= 4 else 16


def blocked_shape(shape, block: int) -> tuple:
    n, c, h, w = shape
    return (n, ceil_to(c, block) // block, h, w, block)


def to_blocked(x: np.ndarray, block: int) -> np.ndarray:
    """(N, C, H, W) -> (N, C/b, H, W, b), zero-padding channels."""
    n, c, h, w = x.shape
    cp = ceil_to(c, block)
    xp = np.zeros((n, cp, h, w), x.dtype)
    xp[:, :c] = x
    return np.ascontiguousarray(xp.reshape(n, cp // block, block, h, w).transpose(0, 1, 3, 4, 2))


def from_blocked(x: np.ndarray, channels: int) -> np.ndarray:
    n, cb, h, w, b = x.shape
    return np.ascontiguousarray(x.transpose(0, 1, 4, 2, 3).reshape(n, cb * b, h, w)[:, :channels])


def pack_conv_weight(w: np.ndarray, in_block: int) -> np.ndarray:
    """(O, I, kh, kw) int8 -> (O/16, I/b, kh, kw, b/4, 16, 4) int8."""
    o, i, kh, kw = w.shape
    op, ip = ceil_to(o, OC_BLOCK), ceil_to(i, in_block)
    wp = np.zeros((op, ip, kh, kw), np.int8)
    wp[:o, :i] = w
    wp = wp.reshape(op // OC_BLOCK, OC_BLOCK, ip // in_block, in_block // K_LANES, K_LANES, kh, kw)
    return np.ascontiguousarray(wp.transpose(0, 2, 5, 6, 3, 1, 4))


def pack_int4(w: np.ndarray) -> np.ndarray:
    """(..., 16, 4) int8 in [-8, 7] -> (..., 32) uint8: byte j = low nibble w[j] | high nibble w[j + 32]."""
    if w.min(initial=0) < -8 or w.max(initial=0) > 7:
        raise ValueError("pack_int4: values outside the 4-bit range [-8, 7]")
    flat = w.reshape(*w.shape[:-2], 64).astype(np.int16) & 0xF
    return (flat[..., :32] | (flat[..., 32:] << 4)).astype(np.uint8)


def unpack_int4(p: np.ndarray) -> np.ndarray:
    """Inverse of pack_int4 (for tests and debugging)."""
    lo = ((p.astype(np.int16) & 0xF) ^ 8) - 8
    hi = ((p.astype(np.int16) >> 4) ^ 8) - 8
    return np.concatenate([lo, hi], axis=-1).astype(np.int8).reshape(*p.shape[:-1], 16, 4)


def pack_channel_vector(v: np.ndarray, channels: int, fill: int = 0) -> np.ndarray:
    """(C,) -> (C/16, 16) int32, padded with `fill`."""
    cp = ceil_to(channels, OC_BLOCK)
    out = np.full(cp, fill, np.int64)
    out[:channels] = v
    return out.reshape(cp // OC_BLOCK, OC_BLOCK).astype(np.int32)


def pack_broadcast_const(arr: np.ndarray, rank: int, channels: int, fill: int = 1) -> np.ndarray:
    """A requantize constant -> int32 array indexable in the value's layout.

    rank 4: (Cb|1, H|1, W|1, 16|1); rank 2: (C|1,).
    """
    a = np.asarray(arr).astype(np.int64)
    if rank == 2:
        a = a.reshape(-1) if a.size > 1 else a.reshape(1)
        if a.size not in (1, channels):
            raise ValueError(f"constant of shape {np.shape(arr)} does not match {channels} channels")
        return a.astype(np.int32)
    if a.ndim > 3:
        raise ValueError(f"constant of shape {a.shape} does not broadcast against NCHW")
    a = a.reshape((1,) * (3 - a.ndim) + a.shape)
    c, h, w = a.shape
    if c == 1:
        return a.reshape(1, h, w, 1).astype(np.int32)
    if c != channels:
        raise ValueError(f"constant of shape {np.shape(arr)} does not match {channels} channels")
    cp = ceil_to(c, OC_BLOCK)
    out = np.full((cp, h, w), fill, np.int64)
    out[:c] = a
    return np.ascontiguousarray(out.reshape(cp // OC_BLOCK, OC_BLOCK, h, w).transpose(0, 2, 3, 1)).astype(np.int32)
