"""Values between kernels, and the elementwise tail of a kernel as a TE expression.

The tail's steps are elementwise ops of the program, each computed at the output tile by its registry
entry's `tile` (`hawq_ray.ops`) in int32 (a requantize's product in int64) exactly as the program states it,
and stored in the narrowest dtype that holds the last op's guaranteed range.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import te

from hawq_ray.contract import HawqError
from hawq_ray.deploy import layout
from hawq_ray.deploy.folds import fold_clamps, table_of_tail
from hawq_ray.ops import PROGRAM_OPS

LUT_INDEX = "lut_index"     # the stage of a byte table's index, before the output stage that reads the table


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


class TileContext:
    """What an elementwise op's `tile` builds on: the output value, its constants (packed into the value's
    layout, `const`, read at a storage index with `at`) and, for a binary op, its second operand (`operand`,
    stored in the output's layout)."""

    def __init__(self, out: Value, extras: list):
        self.out = out
        self.rank = len(out.shape)
        self.extras = list(extras)
        self.extra_tensors = [te.placeholder(v.storage_shape, v.dtype, name=f"other{i}") for i, v in enumerate(extras)]
        self.const_tensors, self.const_arrays = [], []
        self._operands = 0

    def const(self, arr, name: str, where: str, fill: int = 1) -> te.Tensor:
        """A per-tensor / per-channel / per-position constant of the op `where`, as an int32 placeholder."""
        _check_broadcast(np.asarray(arr), self.out, where)
        packed = layout.pack_broadcast_const(arr, self.rank, self.out.shape[1], fill=fill)
        t = te.placeholder(packed.shape, "int32", name=name)
        self.const_arrays.append(packed)
        self.const_tensors.append(t)
        return t

    def at(self, t: te.Tensor, idx: tuple):
        """Constant `t` at the storage index `idx` of the output (broadcast dimensions read 0)."""
        if self.rank == 2:
            return t[idx[1] if t.shape[0] > 1 else 0]
        n, co, h, w, ci = idx
        pick = lambda i, v: v if int(t.shape[i]) > 1 else 0    # noqa: E731
        return t[pick(0, co), pick(1, h), pick(2, w), pick(3, ci)]

    def table(self, arr, name: str) -> te.Tensor:
        """A lookup table (1-D int32), read at a computed index."""
        arr = np.ascontiguousarray(np.asarray(arr, np.int32).reshape(-1))
        t = te.placeholder(arr.shape, "int32", name=name)
        self.const_arrays.append(arr)
        self.const_tensors.append(t)
        return t

    def operand(self, op, broadcast: bool = False):
        """The next second operand of a binary step (in the order the steps read them), as a function of
        the output's storage index. Stored in the output's layout; with `broadcast`, its size-1 dimensions
        (a squeeze-excite gate's H and W) are read at 0."""
        k = self._operands
        self._operands += 1
        t, shape, want = self.extra_tensors[k], self.extras[k].storage_shape, self.out.storage_shape
        fits = shape == want or (broadcast and len(shape) == len(want) and
                                 all(a in (1, b) for a, b in zip(shape, want)))
        if not fits:
            raise HawqError(f"{op.output}: {op.op} of tensors stored as {shape} and {want}")
        return lambda idx: t[tuple(i if int(d) > 1 else 0 for i, d in zip(idx, shape))]


def _check_broadcast(a: np.ndarray, value: Value, what: str):
    if len(value.shape) == 4:
        _, c, h, w = value.shape
        shp = (1,) * (3 - a.ndim) + a.shape if a.ndim <= 3 else None
        if shp is None or shp[0] not in (1, c) or shp[1] not in (1, h) or shp[2] not in (1, w):
            raise HawqError(f"{what}: constant of shape {a.shape} does not broadcast against {value.shape}")


@dataclass
class Epilogue:
    extra_tensors: list     # placeholders of the second operands of binary steps
    const_tensors: list     # placeholders of the steps' constants
    const_arrays: list      # their packed values
    chain: callable         # (int32 expr, storage index) -> int32 expr: the steps
    finish: callable        # (k, int32 chain value, storage index) -> expr of output k in its dtype
    n_outputs: int

    byte_table: te.Tensor | None = None   # 256 bytes: a lookup and the steps after it (`folds.table_of_tail`)
    index: callable | None = None         # (int32 expr, storage index) -> the table's index: the steps before it

    def apply(self, z, idx):
        """The steps and the cast of the single output."""
        return self.finish(0, self.chain(z, idx), idx)

    def output_stages(self, shape: tuple, value: callable, name: str = "out") -> list:
        """The stages computing the single output over `shape` from the int32 `value(*index)`: [out], or with
        a byte table, [table index (int32, `LUT_INDEX`), out = the table at it]."""
        if self.byte_table is None:
            return [te.compute(shape, lambda *i: self.apply(value(*i), i), name=name)]
        from hawq_ray.deploy.bytelut import table_read
        index = te.compute(shape, lambda *i: self.index(value(*i), i), name=LUT_INDEX)
        return [index, te.compute(shape, lambda *i: table_read(self.byte_table, index[i]), name=name)]


def output_block_names(byte_table: bool, name: str = "out") -> list:
    """The names of `output_stages`' blocks, in order."""
    return [LUT_INDEX, name] if byte_table else [name]


def schedule_output(sch, blocks: list, table_dtype: str | None = None) -> None:
    """Vectorize the innermost loop of each of `blocks` (an output stage last, the stages it reads before
    it). With `table_dtype` the output reads a byte table of that dtype at `LUT_INDEX` (kept in registers):
    it is tensorized 16 lanes at a time (`bytelut`)."""
    from hawq_ray.deploy.bytelut import tensorize_table_read
    for block in blocks:
        loop = sch.get_loops(block)[-1]
        if table_dtype and block == blocks[-1]:
            tensorize_table_read(sch, block, table_dtype)
            continue
        if sch.get(block).name_hint == LUT_INDEX:
            sch.set_scope(block, 0, "local")
        sch.vectorize(loop)


def _step(ctx: TileContext, op, k: int):
    entry = PROGRAM_OPS.get(op.op)
    if entry is None or entry.tile is None:
        raise HawqError(f"{op.output}: {op.op} cannot be fused as an elementwise step")
    return entry.tile(ctx, op, k)


def _byte_table(ctx: TileContext, steps: list, out: Value):
    """(placeholder, k): `folds.table_of_tail`'s codes as bytes of out's 8-bit dtype, a constant of the tile."""
    from hawq_ray.deploy.bytelut import ENTRIES
    folded = table_of_tail(steps, out.dtype) if out.dtype in ("int8", "uint8") else None
    if folded is None or len(folded[0]) != ENTRIES:
        return None
    codes, k = folded
    arr = codes.astype(out.dtype)
    t = te.placeholder(arr.shape, out.dtype, name="byte_table")
    ctx.const_arrays.append(arr)
    ctx.const_tensors.append(t)
    return t, k


def epilogue(steps: list, out: Value, extras: list, fanout: list = (), byte_table: bool = False) -> Epilogue:
    """Build the tail of `steps` (program Ops, each consuming the previous result) for output `out`.

    `extras` holds the Value of the second operand of each binary step, in order; they share out's storage
    layout. With `fanout` (requantize ops that all read the end of the chain), `apply` returns one expression
    per fanout op, each in its own output dtype, and the chain's end itself is not stored. With `byte_table`
    (the target has AVX512-VBMI) and a lookup of 256 8-bit codes that only per-tensor unary steps follow,
    `output_stages` computes the steps before it, then reads the table of the rest (`folds.table_of_tail`)
    with `bytelut`'s intrinsic; `chain` is then the steps before the lookup. Clamps before a requantize
    fold into it first (`folds.fold_clamps`).
    """
    steps = fold_clamps(steps)
    ctx = TileContext(out, extras)
    folded = _byte_table(ctx, steps, out) if byte_table and not fanout else None
    table, lookup_at = folded or (None, len(steps))
    plan = [_step(ctx, op, k) for k, op in enumerate(steps[:lookup_at])]     # with a table: the steps before it
    fan_plans = [_step(ctx, op, len(steps) + k) for k, op in enumerate(fanout)]
    fan_dtypes = [storage_dtype(op.lo, op.hi) for op in fanout]

    def chain(z, idx):
        # values between steps stay int32: every op's range lies in int32
        z = z.astype("int32")
        for fn in plan:
            z = fn(z, idx)
        return z

    def finish(k, v, idx):
        if not fanout:
            return v.astype(out.dtype)
        return fan_plans[k](v, idx).astype(fan_dtypes[k])

    def index(z, idx):
        return chain(z, idx) - int(steps[lookup_at].attrs["offset"])

    return Epilogue(ctx.extra_tensors, ctx.const_tensors, ctx.const_arrays, chain, finish, max(1, len(fanout)),
                    table, index if table is not None else None)
