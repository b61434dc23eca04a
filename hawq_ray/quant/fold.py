"""Batch-norm folding into the preceding conv (HAWQ-V3 Appendix D, eq. 16).

    CONV_BN(h) = beta * (W h + b - mu) / sigma + gamma  =  (beta W / sigma) h + (beta (b - mu) / sigma + gamma)

with sigma = sqrt(running_var + eps): BN uses its running statistics (inference / frozen BN).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


def bn_sigma(bn: nn.BatchNorm2d, dtype: torch.dtype | None = None) -> torch.Tensor:
    """sigma = sqrt(running_var + eps) in `dtype` (the running variance's by default), correctly rounded:
    numpy's sqrt is, torch's vectorized one is not on every CPU (1 ulp off for about 0.7% of values on an
    AVX-512 machine), which would make a model's integer constants depend on the machine it is lowered on."""
    var = bn.running_var.detach().to(dtype or bn.running_var.dtype).cpu().numpy()
    return torch.from_numpy(np.sqrt(var + var.dtype.type(bn.eps))).to(bn.running_var.device)


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d | None):
    """Return (W_bar, b_bar) of eq. 16; differentiable in the conv and BN affine parameters."""
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    if bn is None:
        return weight, bias
    sigma = bn_sigma(bn)
    gain = (bn.weight if bn.weight is not None else torch.ones_like(sigma)) / sigma
    shift = bn.bias if bn.bias is not None else torch.zeros_like(sigma)
    w_bar = weight * gain.reshape((-1,) + (1,) * (weight.dim() - 1))
    b_bar = (bias - bn.running_mean) * gain + shift
    return w_bar, b_bar
