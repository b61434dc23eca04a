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


def requantize_tile(ctx, op, k):
    """The requantize at a kernel's output tile: int64 product of two sign-extended int32s (one vpmuldq on
    x86), rounding shift, clamp; int32 out."""
    import tvm
    from hawq_ray.contract import HawqError
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


def requantize_onnx(g, op):
    """The exact form (and any output wider than 8 bits): the integer arithmetic itself, in float64, then a
    Q/DQ pair. The int8 form: a Q/DQ pair of the float input at the output's scale, which runtimes fuse into
    the producing conv; the program's multiplier b / 2^c is S_in / S_out times a factor that is 1 for a change
    of scale and 1 / count after a window sum, an explicit Mul."""
    x = g.value(op.inputs[0])
    ratio = np.asarray(op.consts["multiplier"], np.float64) / np.exp2(np.asarray(op.consts["shift"], np.float64))
    if g.rounds_in_float(op, *clamp_of(op)):
        g.integer_requantize(op, x, ratio, *clamp_of(op))
        return
    factor = ratio * g.out_scale(op) / x.scale
    name = x.name
    if not np.allclose(factor, 1.0, rtol=1e-6, atol=0):
        name = g.node("Mul", [x.name, g.const(factor, f"{op.output}.factor")], f"{op.output}.mul")
        if np.all(factor <= 1):
            # sum / count ties exactly (x.5) for whole sums; QuantizeLinear rounds those to even, the program
            # up. A quarter of the finest step 1 / count sends them up and moves no other value.
            nudge = 0.25 * float(np.min(factor)) * g.out_scale(op)
            name = g.node("Add", [name, g.const(nudge, f"{op.output}.nudge")], f"{op.output}.up")
    g.quantize(op, name, *clamp_of(op))


register_ops(ProgramOp("requantize", SEMANTICS, execute_requantize, requantize_value_range, tile=requantize_tile,
                       channelwise=requantize_channelwise, onnx=requantize_onnx))
