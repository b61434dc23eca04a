"""Exact rewrites of a kernel's chain of elementwise steps, made when the kernel is built (the program keeps
its ops): a ReLU or clamp folded into the requantize after it, and a lookup table with the per-tensor unary
steps after it composed into one table."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from hawq_ray.ops import PROGRAM_OPS
from hawq_ray.ops.requantize import clamp_of
from hawq_ray.program.dyadic import requantize


def _step_bounds(op):
    """(lo, hi) of a relu or clamp step as int64 arrays (hi None: none), or None for another op."""
    if op.op == "relu":
        return np.int64(0), None
    if op.op == "clamp":
        return np.asarray(op.consts["lo"], np.int64), np.asarray(op.consts["hi"], np.int64)
    return None


def _clamp_into_requantize(clamp, rq):
    """The requantize `rq` of the clamp's (or relu's) output as one requantize of its input, or None.

    R = the requantize before its own clamp [lo, hi] is non-decreasing (multiplier > 0), so
    R(clamp(z, a, b)) = clamp(R(z), R(a), R(b)), and then the two clamps are one,
    [max(lo, R(a)), min(hi, R(b))], where those bounds overlap and are the same for every channel."""
    bounds = _step_bounds(clamp)
    if bounds is None or rq.op != "requantize" or rq.inputs != [clamp.output]:
        return None
    b, c = (torch.as_tensor(np.asarray(rq.consts[k]), dtype=torch.int64) for k in ("multiplier", "shift"))
    if bool((b <= 0).any()):
        return None           # not non-decreasing (the tile refuses such a requantize anyway)
    lo, hi = clamp_of(rq)

    def at(v):      # R at per-channel (or per-tensor) bounds, broadcast against the requantize's constants
        v = np.broadcast_to(np.asarray(v, np.int64), np.broadcast_shapes(np.shape(v), tuple(b.shape)))
        return requantize(torch.from_numpy(v.copy()), b, c).numpy()
    try:
        at_lo = at(bounds[0])
    except ValueError:          # constants that do not broadcast together: left to the tile to refuse
        return None
    new_lo = np.maximum(lo, at_lo)
    new_hi = np.full_like(new_lo, hi) if bounds[1] is None else np.minimum(hi, at(bounds[1]))
    if np.ptp(new_lo) or np.ptp(new_hi) or new_lo.flat[0] > new_hi.flat[0]:
        return None
    return replace(rq, inputs=list(clamp.inputs),
                   attrs={**rq.attrs, "lo": int(new_lo.flat[0]), "hi": int(new_hi.flat[0])})


def fold_clamps(steps: list) -> list:
    """`steps` with each relu or clamp that a requantize follows folded into that requantize's clamp where
    `_clamp_into_requantize` can (ReLU6 before the requantize to the next layer's input: one clamp)."""
    out = []
    for op in steps:
        folded = _clamp_into_requantize(out[-1], op) if out else None
        if folded is not None:
            out[-1] = folded
        else:
            out.append(op)
    return out


FOLDABLE = ("requantize", "clamp", "relu")    # unary steps that, with per-tensor constants, fold into a table


def _foldable(op) -> bool:
    return op.op in FOLDABLE and len(op.inputs) == 1 and all(np.size(c) == 1 for c in op.consts.values())


def table_of_tail(steps: list, dtype: str):
    """(codes, k) where step k is a lookup and each step after it is unary with per-tensor
    constants: the codes that the steps from k on give for each of the table's input codes (each later step
    applied to the table by its own executor, so the table is exactly their composition). None where there is
    no such lookup or the codes do not fit `dtype`."""
    k = next((i for i in range(len(steps) - 1, -1, -1) if steps[i].op == "lookup"), None)
    if k is None or not all(_foldable(op) for op in steps[k + 1:]):
        return None
    codes = torch.as_tensor(np.asarray(steps[k].consts["table"]), dtype=torch.int64)
    for op in steps[k + 1:]:
        codes = PROGRAM_OPS[op.op].execute(op, [codes])
    codes = codes.reshape(-1)        # a per-tensor constant stored as (1, 1, 1) broadcasts the table to 3-D
    info = np.iinfo(dtype)
    if int(codes.min()) < info.min or int(codes.max()) > info.max:
        return None
    return codes.numpy(), k
