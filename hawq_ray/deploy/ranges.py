"""Sound integer ranges of every value of a program (interval arithmetic), to store values narrower than the
ranges the program declares: a residual branch requantized without a clamp is declared INT32 but holds a few
hundred, so it can travel as int16.

`narrow_ranges(program, ops)` returns the ops with `lo`/`hi` tightened to the intersection of the declared and
the derived range. A requantize without explicit clamp attributes gets its declared range as attributes first,
so its arithmetic (the clamp) is unchanged; only storage gets narrower.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from hawq_ray.quant.program import IntegerProgram, Op


def _requantize(z: int, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    b, c = b.astype(object), c.astype(object)          # exact big-integer arithmetic
    return (z * b + (1 << (c - 1))) >> c


def _linear_range(w: np.ndarray, bias, lo: int, hi: int, padded: bool):
    """Range of bias + sum(w * x) over x in [lo, hi] (and 0 where padding), per output, then over outputs."""
    if padded:
        lo, hi = min(lo, 0), max(hi, 0)
    w = w.reshape(w.shape[0], -1).astype(np.int64)
    pos, neg = np.where(w > 0, w, 0).sum(axis=1), np.where(w < 0, w, 0).sum(axis=1)
    b = np.zeros(w.shape[0], np.int64) if bias is None else np.asarray(bias, np.int64).reshape(-1)
    top = b + pos.astype(object) * hi + neg.astype(object) * lo
    bottom = b + pos.astype(object) * lo + neg.astype(object) * hi
    return int(min(bottom)), int(max(top))


def derived_range(op: Op, ins: list) -> tuple:
    a, c = op.attrs, op.consts
    if op.op == "conv2d":
        pad = any(a.get("padding", (0, 0)))
        return _linear_range(np.asarray(c["weight"]), c.get("bias"), *ins[0], pad)
    if op.op == "dense":
        return _linear_range(np.asarray(c["weight"]), c.get("bias"), *ins[0], False)
    if op.op == "requantize":
        b, s = np.asarray(c["multiplier"]).reshape(-1), np.asarray(c["shift"]).reshape(-1)
        lo, hi = int(min(_requantize(ins[0][0], b, s))), int(max(_requantize(ins[0][1], b, s)))
        clamp_lo, clamp_hi = a.get("lo", op.lo), a.get("hi", op.hi)
        return min(max(lo, clamp_lo), clamp_hi), max(min(hi, clamp_hi), clamp_lo)
    if op.op == "relu":
        return max(ins[0][0], 0), max(ins[0][1], 0)
    if op.op == "add":
        return ins[0][0] + ins[1][0], ins[0][1] + ins[1][1]
    if op.op == "concat":
        return min(r[0] for r in ins), max(r[1] for r in ins)
    if op.op == "sum_pool2d":
        k = int(np.prod(a["kernel"]))
        return k * min(ins[0][0], 0), k * max(ins[0][1], 0)
    return ins[0]          # max_pool2d, flatten


def narrow_ranges(program: IntegerProgram, ops: list | None = None) -> list:
    ops = program.ops if ops is None else ops
    ranges = {program.input_name: (-128, 127)}
    out = []
    for op in ops:
        lo, hi = derived_range(op, [ranges[n] for n in op.inputs])
        lo, hi = max(lo, op.lo), min(hi, op.hi)
        if lo > hi:          # the declared range excludes every derivable value: keep the declaration
            lo, hi = op.lo, op.hi
        ranges[op.output] = (lo, hi)
        attrs = op.attrs
        if op.op == "requantize" and ("lo" not in attrs or "hi" not in attrs):
            attrs = {**attrs, "lo": attrs.get("lo", op.lo), "hi": attrs.get("hi", op.hi)}
        out.append(replace(op, attrs=attrs, lo=lo, hi=hi))
    return out
