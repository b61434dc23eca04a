"""Sound integer ranges of every value of a program (interval arithmetic, each op's rule its registry
entry's `value_range`), to store values narrower than the ranges the program declares: a residual branch
requantized without a clamp is declared INT32 but holds a few hundred, so it can travel as int16.

`narrow_ranges(program, ops)` returns the ops with `lo`/`hi` tightened to the intersection of the declared and
the derived range. A requantize without explicit clamp attributes gets its declared range as attributes first,
so its arithmetic (the clamp) is unchanged; only storage gets narrower.
"""
from __future__ import annotations

from dataclasses import replace

from hawq_ray.ops import program_op
from hawq_ray.program.program import IntegerProgram, Op


def derived_range(op: Op, ins: list) -> tuple:
    """A sound (lo, hi) of `op`'s output given its inputs' ranges."""
    return program_op(op.op).value_range(op, ins)


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
