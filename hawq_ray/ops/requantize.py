"""Dyadic requantization (program op `requantize`, HAWQ-V3 Section 3.1): what every activation point, every
residual / concat branch (Appendix E-F) and every average pool's 1/count lowers to. It has no graph node:
the QAT steps of the other ops emit it."""
from __future__ import annotations

import numpy as np
import torch

from hawq_ray.ops.registry import ProgramOp, register_ops
from hawq_ray.program.dyadic import requantize
from hawq_ray.program.integer import requantize_range

SEMANTICS = """inputs [z]; consts multiplier (int32, > 0) and shift (int32, >= 1) of one shape that broadcasts
against the output by numpy rules: () per tensor, (C, 1, 1) per channel of a 4-D value, (C,) per feature of a
2-D value, (1, H, W) per position; attrs lo, hi (the clamp; the op's declared range when absent);
out = clamp((z * multiplier + 2^(shift-1)) >> shift, lo, hi), computed in int64 (round half up)."""


def clamp_of(op) -> tuple:
    return int(op.attrs.get("lo", op.lo)), int(op.attrs.get("hi", op.hi))


def execute_requantize(op, ins):
    c = op.consts
    lo, hi = clamp_of(op)
    return requantize(ins[0], torch.as_tensor(c["multiplier"], dtype=torch.int64),
                      torch.as_tensor(c["shift"], dtype=torch.int64), lo, hi)


def requantize_value_range(op, ins):
    lo, hi = requantize_range(ins[0], np.asarray(op.consts["multiplier"]), np.asarray(op.consts["shift"]))
    clamp_lo, clamp_hi = clamp_of(op)
    return min(max(lo, clamp_lo), clamp_hi), max(min(hi, clamp_hi), clamp_lo)


def requantize_channelwise(op) -> bool:
    """Constants that do not vary over H and W: the requantize commutes with max pooling (it is monotone)."""
    return all(np.size(c) == 1 or (np.ndim(c) >= 3 and np.shape(c)[-2:] == (1, 1)) for c in op.consts.values())


register_ops(ProgramOp("requantize", SEMANTICS, execute_requantize, requantize_value_range, elementwise=True,
                       channelwise=requantize_channelwise))
