"""Values between kernels, and the elementwise tail of a kernel (requantize, relu, add) as a TE expression.

The tail is computed in int64 exactly as the program states it (`(z * b + 2^(c-1)) >> c`, clamp to [lo, hi];
`max(x, 0)`; `a + b`) and stored in the narrowest dtype that holds the last op's guaranteed range.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te

from hawq_ray.deploy import layout
from hawq_ray.errors import HawqError

ELEMENTWISE = ("requantize", "relu", "add")


def storage_dtype(lo: int, hi: int) -> str:
    if 0 <= lo and hi <= 255:
        return "uint8"
    if -128 <= lo and hi <= 127:
        return "int8"
    if -32768 <= lo and hi <= 32767:
        return "int16"
    return "int32"


def output_dtype(op) -> str:
    return storage_dtype(op.lo, op.hi)


@dataclass(frozen=True)
class Value:
    """A tensor between kernels: logical shape (N, C, H, W) or (N, C), storage dtype, channel block."""
    shape: tuple
    dtype: str
    block: int | None = None     # rank 4: NCHW[block]c; rank 2: None (stored as is)

    @property
    def storage_shape(self) -> tuple:
        return layout.blocked_shape(self.shape, self.block) if self.block else tuple(self.shape)


@dataclass
class Epilogue:
    extra_tensors: list     # placeholders of the other operands of `add` steps
    const_tensors: list     # placeholders of requantize multipliers and shifts
    const_arrays: list      # their packed values
    chain: callable         # (int32 expr, storage index) -> int32 expr: the steps
    finish: callable        # (k, int32 chain value, storage index) -> expr of output k in its dtype
    n_outputs: int

    def apply(self, z, idx):
        """The steps and the cast of the single output."""
        return self.finish(0, self.chain(z, idx), idx)


def _const_index(t: te.Tensor, idx: tuple, rank: int):
    if rank == 2:
        return t[idx[1] if t.shape[0] > 1 else 0]
    n, co, h, w, ci = idx
    pick = lambda i, v: v if int(t.shape[i]) > 1 else 0
    return t[pick(0, co), pick(1, h), pick(2, w), pick(3, ci)]


def _check_broadcast(arr: np.ndarray, value: Value, what: str):
    a = np.asarray(arr)
    if len(value.shape) == 4:
        _, c, h, w = value.shape
        shp = (1,) * (3 - a.ndim) + a.shape if a.ndim <= 3 else None
        if shp is None or shp[0] not in (1, c) or shp[1] not in (1, h) or shp[2] not in (1, w):
            raise HawqError(f"{what}: constant of shape {a.shape} does not broadcast against {value.shape}")


def epilogue(steps: list, out: Value, extras: list, fanout: list = ()) -> Epilogue:
    """Build the tail of `steps` (program Ops, each consuming the previous result) for output `out`.

    `extras` holds the Value of the other operand of each `add`, in order; they share out's storage layout.
    With `fanout` (requantize ops that all read the end of the chain), `apply` returns one expression per
    fanout op, each in its own output dtype, and the chain's end itself is not stored.
    """
    rank = len(out.shape)
    channels = out.shape[1]
    extra_tensors = [te.placeholder(v.storage_shape, v.dtype, name=f"other{i}") for i, v in enumerate(extras)]
    const_tensors, const_arrays = [], []

    def requantize_plan(op, k):
        b, c = np.asarray(op.consts["multiplier"]), np.asarray(op.consts["shift"])
        _check_broadcast(b, out, op.output)
        _check_broadcast(c, out, op.output)
        if np.any(b <= 0) or np.any(c < 1) or np.any(c > 62):
            raise HawqError(f"{op.output}: requantize needs multiplier > 0 and 1 <= shift <= 62")
        arrs = [layout.pack_broadcast_const(b, rank, channels, fill=1),
                layout.pack_broadcast_const(c, rank, channels, fill=1)]
        tens = [te.placeholder(a.shape, "int32", name=f"{nm}{k}") for a, nm in zip(arrs, ("mult", "shift"))]
        const_arrays.extend(arrs)
        const_tensors.extend(tens)
        lo, hi = op.attrs.get("lo", op.lo), op.attrs.get("hi", op.hi)
        return ("requantize", tens, (int(lo), int(hi)))

    plan, n_add = [], 0
    for k, op in enumerate(steps):
        if op.op not in ELEMENTWISE:
            raise HawqError(f"{op.output}: {op.op} cannot be fused as an elementwise step")
        if op.op == "requantize":
            plan.append(requantize_plan(op, k))
        elif op.op == "add":
            if extras[n_add].storage_shape != out.storage_shape:
                raise HawqError(f"{op.output}: add of tensors stored as {extras[n_add].storage_shape} "
                                f"and {out.storage_shape}")
            plan.append(("add", extra_tensors[n_add], None))
            n_add += 1
        else:
            plan.append(("relu", None, None))
    fan_plans = [requantize_plan(op, len(steps) + k) for k, op in enumerate(fanout)]
    fan_dtypes = [storage_dtype(op.lo, op.hi) for op in fanout]

    def run(z, idx, steps_plan):
        # Values between steps stay int32 (every op's range lies in int32); only the product of a requantize
        # is int64, a product of two sign-extended int32s (one vpmuldq on x86).
        for kind, arg, rng in steps_plan:
            if kind == "requantize":
                b = _const_index(arg[0], idx, rank).astype("int64")
                c = _const_index(arg[1], idx, rank).astype("int64")
                t = (z.astype("int64") * b + (tvm.tirx.const(1, "int64") << (c - 1))) >> c
                t = te.max(te.min(t, tvm.tirx.const(rng[1], "int64")), tvm.tirx.const(rng[0], "int64"))
                z = t.astype("int32")
            elif kind == "add":
                z = z + arg[idx].astype("int32")
            else:
                z = te.max(z, tvm.tirx.const(0, "int32"))
        return z

    def chain(z, idx):
        return run(z.astype("int32"), idx, plan)

    def finish(k, v, idx):
        if not fanout:
            return v.astype(out.dtype)
        return run(v, idx, [fan_plans[k]]).astype(fan_dtypes[k])

    return Epilogue(extra_tensors, const_tensors, const_arrays, chain, finish, max(1, len(fanout)))
