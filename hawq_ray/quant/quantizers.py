"""Quantizers of HAWQ-V3 (Appendix B, H): symmetric per-channel weights, static activation ranges.

Float -> integer rounding is `floor(x + 1/2)` everywhere (round half up), the same rule the dyadic
requantization uses, so that every back end agrees bit for bit.
"""
from __future__ import annotations

import torch

ACT_MOMENTUM = 0.99  # EMA momentum of activation ranges (Appendix H)


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half up in the forward pass, identity gradient (straight-through estimator)."""
    return x + (round_half_up(x) - x).detach()


def signed_range(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def unsigned_range(bits: int) -> tuple[int, int]:
    return 0, (1 << bits) - 1


def weight_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Per output channel S_c = max|W_c| / (2^(b-1) - 1) (symmetric, eq. 12); shape (O,)."""
    qmax = (1 << (bits - 1)) - 1
    absmax = w.detach().reshape(w.shape[0], -1).abs().amax(dim=1)
    return absmax.clamp_min(1e-12) / qmax


def quantize_weight(w: torch.Tensor, bits: int, scale: torch.Tensor | None = None):
    """Integer weights (as a float tensor of integer values, straight-through gradient) and scales (O,).

    q = clamp(round(W / S), -2^(b-1), 2^(b-1) - 1).
    """
    if bits not in (4, 8):
        raise ValueError(f"weight bits must be 4 or 8, got {bits}")
    s = weight_scale(w, bits) if scale is None else scale
    lo, hi = signed_range(bits)
    shape = (-1,) + (1,) * (w.dim() - 1)
    q = round_ste(w / s.reshape(shape)).clamp(lo, hi)
    return q, s


def weight_perturbation(w: torch.Tensor, bits: int) -> float:
    """||Q_b(W) - W||^2 with the deployed weight quantizer (the delta of HAWQ-V3 eq. 8)."""
    with torch.no_grad():
        q, s = quantize_weight(w.float(), bits)
        w_hat = q * s.reshape((-1,) + (1,) * (w.dim() - 1))
        return float(((w_hat - w) ** 2).sum())


def activation_scale(act_range: float, bits: int, signed: bool) -> float:
    """Static activation scale: range / (2^b - 1) unsigned (zero point 0), range / (2^(b-1) - 1) signed."""
    levels = (1 << (bits - 1)) - 1 if signed else (1 << bits) - 1
    return max(float(act_range), 1e-8) / levels


def ema_update(old: torch.Tensor, current: torch.Tensor, initialized: bool) -> torch.Tensor:
    """range <- momentum * range + (1 - momentum) * current; the first observation initializes it."""
    if not initialized:
        return current
    return ACT_MOMENTUM * old + (1 - ACT_MOMENTUM) * current
