"""Dyadic numbers and integer-only requantization (HAWQ-V3 Section 3.1, Appendix C).

A real multiplier M > 0 is replaced by a dyadic number b / 2^c with an integer b of at most 31 bits
(so it fits a signed INT32) and a shift c >= 1. Requantization of an INT32 accumulator z is then

    requantize(z) = (z * b + 2^(c-1)) >> c            (int64, round half up)

which equals floor(z * b / 2^c + 1/2): integer multiply, add and arithmetic shift only, no float and no
division. The same rule is used by QAT simulation, the PyTorch integer executor and the TVM kernels.
"""
from __future__ import annotations

import numpy as np
import torch

MULTIPLIER_BITS = 31  # b < 2^31 fits a signed INT32
MAX_SHIFT = 62        # 2^(c-1) and z*b stay inside int64 for |z| < 2^31


def dyadic(multiplier) -> tuple[np.ndarray, np.ndarray]:
    """Return integer arrays (b, c) with b / 2^c closest to `multiplier` (elementwise, any shape).

    b is in [2^30, 2^31) unless the shift had to be capped, so the relative error is at most 2^-31
    (half a unit in the last place of a 31-bit mantissa). Multipliers must be positive, finite and below
    2^30 - 1/4 (from there on, b / 2^c would need a shift below 1).
    This runs at compile time (floats allowed); inference only ever sees (b, c).
    """
    m = np.asarray(multiplier, dtype=np.float64)
    if not np.all(np.isfinite(m)) or np.any(m <= 0):
        bad = m[~(np.isfinite(m) & (m > 0))].ravel()[:3]
        raise ValueError(f"dyadic multiplier must be positive and finite, got {bad.tolist()}")
    # frexp: m = f * 2^e with f in [0.5, 1); b = round(f * 2^31) in [2^30, 2^31], c = 31 - e
    f, e = np.frexp(m)
    c = MULTIPLIER_BITS - e.astype(np.int64)
    c_capped = np.minimum(c, MAX_SHIFT)
    b = np.rint(np.ldexp(f, MULTIPLIER_BITS - (c - c_capped))).astype(np.int64)
    c = c_capped
    # rounding f * 2^31 up to exactly 2^31 overflows the 31 bits: halve b and the shift
    full = b >= (1 << MULTIPLIER_BITS)
    b = np.where(full, b >> 1, b)
    c = np.where(full, c - 1, c)
    if np.any(c < 1):      # m >= 2^30, or just below it and rounded up to 2^30: no shift >= 1 holds it
        raise ValueError(f"dyadic multiplier too large (max {float(m.max())}; valid: below 2^30 - 1/4)")
    return b.astype(np.int64), c.astype(np.int64)


def requantize(z: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
               lo: int | None = None, hi: int | None = None) -> torch.Tensor:
    """(z * b + 2^(c-1)) >> c in int64, then clamp to [lo, hi]; b and c broadcast against z.

    z, b and c must be integer tensors; the result is int64.
    """
    for name, t in (("z", z), ("b", b), ("c", c)):
        if t.is_floating_point() or t.is_complex():
            raise TypeError(f"requantize: {name} must be an integer tensor, got {t.dtype}")
    b = b.to(torch.int64)
    c = c.to(torch.int64)
    out = z.to(torch.int64) * b
    out += torch.ones_like(c) << (c - 1)
    out >>= c
    if lo is not None or hi is not None:
        out.clamp_(lo, hi)
    return out
