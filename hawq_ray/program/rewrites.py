"""Exact rewrites of a program's op list that the back ends share (TVM's planner, the ONNX export): equal
requantizes of one value merged, a max pool moved after the requantizes that read it. Each keeps every value
the program's readers see; they read the ops' flags in the registry (`channelwise`), and no back end's code.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Callable

import numpy as np

from hawq_ray.ops import PROGRAM_OPS
from hawq_ray.program.program import Op


def readers_of(ops: list) -> dict:
    """{value name: indices of the ops that read it, in order}."""
    readers: dict[str, list] = {}
    for i, op in enumerate(ops):
        for name in op.inputs:
            readers.setdefault(name, []).append(i)
    return readers


def channelwise(op: Op) -> bool:
    """An elementwise op that commutes with max pooling (monotone, the same per channel)."""
    return op.op in PROGRAM_OPS and PROGRAM_OPS[op.op].channelwise(op)


def requantize_before_max_pool(ops: list, program_output: str, narrow: set = frozenset(),
                               stays: Callable[[Op], bool] = lambda pool: False) -> list:
    """max_pool2d -> requantize(s)  ==>  requantize -> max_pool2d, once per reader (exact: a per-channel
    requantize is non-decreasing and max pooling takes the max per channel; padding never wins). The pool's
    producer then stores narrow values instead of INT32 and the readers need no requantize pass. Returns a new
    op list; value names are kept. With several readers it pays only when each requantized value is narrow
    (its name in `narrow`); otherwise the pool would run once per reader on wide values. A pool for which
    `stays` holds is left where it is (the TVM back end fuses a pool after a conv's chain into the conv's
    kernel instead)."""
    readers = readers_of(ops)
    moved, out = set(), []
    for i, op in enumerate(ops):
        if i in moved:
            continue
        rs = readers.get(op.output, [])
        if op.op == "max_pool2d" and op.output != program_output and rs and not stays(op) and \
                all(ops[j].op == "requantize" and channelwise(ops[j]) for j in rs) and \
                (len(rs) == 1 or all(ops[j].output in narrow for j in rs)):
            for j in rs:
                rq = ops[j]
                pre = replace(rq, inputs=list(op.inputs), output=rq.output + ".premax")
                out += [pre, replace(op, inputs=[pre.output], output=rq.output, lo=rq.lo, hi=rq.hi)]
                moved.add(j)
            continue
        out.append(op)
    return out


def merge_equal_requantizes(ops: list, program_output: str) -> list:
    """Requantizes of one value with equal constants and clamp compute equal values: the later ones are
    dropped and their readers read the first (a block's output that the next block's first conv and its
    downsample conv both read at one calibrated scale). Returns a new op list."""
    first, rename, out = {}, {}, []
    for op in ops:
        op = replace(op, inputs=[rename.get(a, a) for a in op.inputs]) if any(a in rename for a in op.inputs) else op
        if op.op == "requantize" and op.output != program_output:
            key = (op.inputs[0], op.lo, op.hi, tuple(sorted((k, str(v)) for k, v in op.attrs.items())),
                   *((k, np.shape(v), np.asarray(v).tobytes()) for k, v in sorted(op.consts.items())))
            if key in first:
                rename[op.output] = first[key]
                continue
            first[key] = op.output
        out.append(op)
    return out
