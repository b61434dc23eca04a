"""The elementwise ops of the program as steps fused at a kernel's output tile: `TILES`, keyed by op name.

Each entry is `(TileContext, Op, k) -> fn(z, idx) -> expr`: given the int32 value z of the chain so far at
the output's storage index idx, the op's value as a TE expression, computed exactly as the op's registry
entry states it (`hawq_ray.ops`). `k` numbers the step in its kernel (it names the step's constants).
`epilogue.py` strings the steps of a kernel's tail; every op the registry marks elementwise has an entry here
(`tests/test_op_registry.py` holds the table to the registry).
"""
from __future__ import annotations

import numpy as np
import tvm

from hawq_ray.contract import HawqError
from hawq_ray.ops.requantize import clamp_of


def requantize_tile(ctx, op, k):
    """The requantize at a kernel's output tile: int64 product of two sign-extended int32s (one vpmuldq on
    x86), rounding shift, clamp; int32 out."""
    b, c = np.asarray(op.consts["multiplier"]), np.asarray(op.consts["shift"])
    if np.any(b <= 0) or np.any(c < 1) or np.any(c > 62):
        raise HawqError(f"{op.output}: requantize needs multiplier > 0 and 1 <= shift <= 62")
    tb, tc = ctx.const(b, f"mult{k}", op.output), ctx.const(c, f"shift{k}", op.output)
    lo, hi = clamp_of(op)

    # with every shift >= 31 the rounded product of an int32 z and b < 2^31 lies in int32: the clamp runs on
    # int32 lanes (16 a vector, not 8)
    narrow = bool(np.all(c >= 31) and np.all(b < (1 << 31)))

    def fn(z, idx):
        bb, cc = ctx.at(tb, idx).astype("int64"), ctx.at(tc, idx).astype("int64")
        t = (z.astype("int64") * bb + (tvm.tirx.const(1, "int64") << (cc - 1))) >> cc
        if narrow:
            t, dtype, top, bottom = t.astype("int32"), "int32", min(hi, (1 << 31) - 1), max(lo, -(1 << 31))
        else:
            dtype, top, bottom = "int64", hi, lo
        return tvm.te.max(tvm.te.min(t, tvm.tirx.const(top, dtype)), tvm.tirx.const(bottom, dtype)).astype("int32")
    return fn


def relu_tile(ctx, op, k):
    return lambda z, idx: tvm.te.max(z, tvm.tirx.const(0, "int32"))


def clamp_tile(ctx, op, k):
    tlo = ctx.const(np.asarray(op.consts["lo"]), f"lo{k}", op.output, fill=0)
    thi = ctx.const(np.asarray(op.consts["hi"]), f"hi{k}", op.output, fill=0)
    return lambda z, idx: tvm.te.min(tvm.te.max(z, ctx.at(tlo, idx)), ctx.at(thi, idx))


def affine_tile(ctx, op, k):
    """((z + bias) * m + 2^(shift-1)) >> shift in int64, clamped, m the multiplier, or the negative-side one where
    z + bias < 0 (a standalone BN, a layer scale, PReLU: `ops.batchnorm`)."""
    tb, tm, tc = (ctx.const(np.asarray(op.consts[n]), f"{n}{k}", op.output, fill=f)
                  for n, f in (("bias", 0), ("multiplier", 1), ("shift", 1)))
    tn = ctx.const(np.asarray(op.consts["negative"]), f"negative{k}", op.output, fill=1) \
        if "negative" in op.consts else None
    lo, hi = int(op.attrs["lo"]), int(op.attrs["hi"])
    one = tvm.tirx.const(1, "int64")

    def fn(z, idx):
        c = ctx.at(tc, idx).astype("int64")
        t = z.astype("int64") + ctx.at(tb, idx).astype("int64")
        m = ctx.at(tm, idx).astype("int64")
        if tn is not None:
            m = tvm.tirx.Select(t < tvm.tirx.const(0, "int64"), ctx.at(tn, idx).astype("int64"), m)
        t = (t * m + (one << (c - 1))) >> c
        return tvm.te.max(tvm.te.min(t, tvm.tirx.const(hi, "int64")), tvm.tirx.const(lo, "int64")).astype("int32")
    return fn


def add_tile(ctx, op, k):
    other = ctx.operand(op)
    return lambda z, idx: z + other(idx).astype("int32")


def mul_tile(ctx, op, k):
    other = ctx.operand(op, broadcast=True)
    return lambda z, idx: z * other(idx).astype("int32")


def lookup_tile(ctx, op, k):
    t = ctx.table(op.consts["table"], f"table{k}")
    off = int(op.attrs["offset"])
    return lambda z, idx: t[z - off]


TILES = {"requantize": requantize_tile, "relu": relu_tile, "clamp": clamp_tile, "affine": affine_tile,
         "add": add_tile, "mul": mul_tile, "lookup": lookup_tile}
