"""Values between kernels, and the elementwise tail of a kernel as a TE expression.

The tail's steps are elementwise ops of the program, each computed at the output tile by its entry in
`tiles.TILES` in int32 (a requantize's product in int64) exactly as the program states it, and stored in
the narrowest dtype that holds the last op's guaranteed range.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import te

from hawq_ray.contract import HawqError
from hawq_ray.deploy import layout
from hawq_ray.deploy.folds import fold_clamps, table_of_tail
from hawq_ray.deploy.tiles import TILES

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
    """A tensor between kernels: logical shape, storage dtype, channel block. A rank-4 map a conv, a pool or the
    image edge writes is NCHW[block]c; every other value (rank 2, the tokens (N, T, C) of a transformer and its
    rank-4 and rank-5 heads) is stored plain, row-major in its logical shape."""
    shape: tuple
    dtype: str
    block: int | None = None     # rank 4: NCHW[block]c, or None: stored as is

    @property
    def storage_shape(self) -> tuple:
        return layout.blocked_shape(self.shape, self.block) if self.block else tuple(self.shape)


def read_logical(t: te.Tensor, v: Value, idx: tuple):
    """The element at logical index `idx` of value `v` stored in tensor `t` (blocked or plain)."""
    if v.block:
        n, c, h, w = idx
        return t[n, c // v.block, h, w, c % v.block]
    return t[tuple(idx)]


def logical_index(v: Value, sidx: tuple) -> tuple:
    """The logical index of storage index `sidx` of `v`; a padding lane of a channel block reads the last real
    channel (nobody reads a padding lane's value)."""
    if v.block:
        n, co, h, w, ci = sidx
        return n, te.min(co * v.block + ci, v.shape[1] - 1), h, w
    return tuple(sidx)


class TileContext:
    """What an elementwise op's entry in `tiles.TILES` builds on: the output value, its constants (packed into
    the value's layout, `const`, read at a storage index with `at`) and, for a binary op, its second operand
    (`operand`, stored in the output's layout)."""

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
        if self.out.block or self.rank == 2:
            packed = layout.pack_broadcast_const(arr, self.rank, self.out.shape[1], fill=fill)
        else:
            packed = _pack_plain_const(np.asarray(arr), self.out)
        t = te.placeholder(packed.shape, "int32", name=name)
        self.const_arrays.append(packed)
        self.const_tensors.append(t)
        return t

    def at(self, t: te.Tensor, idx: tuple):
        """Constant `t` at the storage index `idx` of the output (broadcast dimensions read 0)."""
        if self.rank == 2:
            return t[idx[1] if t.shape[0] > 1 else 0]
        if self.rank == 1:
            return t[0]
        if not self.out.block:      # plain: the constant's axes are the value's after the batch axis
            return t[tuple(i if int(d) > 1 else 0 for i, d in zip(idx[1:], t.shape))]
        n, co, h, w, ci = idx
        pick = lambda i, v: v if int(t.shape[i]) > 1 else 0    # noqa: E731
        return t[pick(0, co), pick(1, h), pick(2, w), pick(3, ci)]

    def lane_const(self, arr, name: str) -> te.Tensor:
        """A constant given for every lane of the output's channel blocks (padding lanes included)."""
        arr = np.asarray(arr)
        packed = layout.pack_broadcast_const(arr.reshape(-1, 1, 1), self.rank, len(arr))
        t = te.placeholder(packed.shape, "int32", name=name)
        self.const_arrays.append(packed)
        self.const_tensors.append(t)
        return t

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
        v = self.extras[k]
        t, shape, want = self.extra_tensors[k], v.storage_shape, self.out.storage_shape
        if v.block == self.out.block:
            fits = shape == want or (broadcast and len(shape) == len(want) and
                                     all(a in (1, b) for a, b in zip(shape, want)))
            if not fits:
                raise HawqError(f"{op.op} {op.output}: operands stored as {shape} and {want}")
            return lambda idx: t[tuple(i if int(d) > 1 else 0 for i, d in zip(idx, shape))]
        # one blocked, the other plain (a rank-4 map beside a transformer's rank-4 value): read it by logical index
        lshape, lwant = tuple(v.shape), tuple(self.out.shape)
        if len(lshape) != len(lwant) or not all(a == b or (broadcast and a == 1) for a, b in zip(lshape, lwant)):
            raise HawqError(f"{op.op} {op.output}: operands of shapes {lshape} and {lwant}")
        out = self.out
        return lambda idx: read_logical(t, v, tuple(i if int(d) > 1 else 0
                                                    for i, d in zip(logical_index(out, idx), lshape)))


def _pack_plain_const(a: np.ndarray, value: Value) -> np.ndarray:
    """A constant of a plain value of rank r, broadcast by numpy's rules against its shape: int32 of r - 1 axes
    (the value's after the batch axis), each the value's size or 1."""
    rank = len(value.shape)
    a = a.astype(np.int64).reshape((1,) * (rank - a.ndim) + a.shape)
    return np.ascontiguousarray(a.reshape(a.shape[1:]) if rank > 1 else a.reshape(1)).astype(np.int32)


def _check_broadcast(a: np.ndarray, value: Value, what: str):
    if not value.block and len(value.shape) != 2:
        shape = tuple(value.shape)
        if a.ndim > len(shape) or (a.ndim == len(shape) and a.shape[0] != 1) or \
                any(d not in (1, s) for d, s in zip(a.shape[::-1], shape[::-1])):
            raise HawqError(f"{what}: constant of shape {a.shape} does not broadcast against {shape}")
        return
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
    offset: int = 0                       # the lookup's first code: its index is the chain's value minus it
    head: callable | None = None          # (int32 expr, storage index) -> the first requantize (`lanerequant`)
    head_block: str | None = None         # the name of its stage
    rest: callable | None = None          # the steps after the head, clamp first

    def apply(self, z, idx):
        """The steps and the cast of the single output."""
        return self.finish(0, self.chain(z, idx), idx)

    @property
    def block_names(self) -> list:
        """The names of `output_stages`' blocks, in order."""
        return ([self.head_block] if self.head else []) + output_block_names(self.byte_table is not None)

    def output_stages(self, shape: tuple, value: callable, name: str = "out", value_shape: tuple | None = None) -> list:
        """The stages computing the single output over `shape` from the int32 `value(*index)`: [out], or with
        a byte table, [table index (int32, `LUT_INDEX`), out = the table at it]; with a head requantize, its
        16-lane stage first (`lanerequant`), over all of `value_shape` (a register tile's rows and columns past
        the map's end too: a predicated block does not match the intrinsic), and the other stages read it."""
        stages, chain = [], self.chain
        if self.head is not None:
            head = te.compute(value_shape or shape, lambda *i: self.head(value(*i), i), name=self.head_block)
            stages, value, chain = [head], (lambda *i: head[i]), self.rest
        if self.byte_table is None:
            return stages + [te.compute(shape, lambda *i: self.finish(0, chain(value(*i), i), i), name=name)]
        from hawq_ray.deploy.bytelut import table_read
        index = te.compute(shape, lambda *i: chain(value(*i), i) - self.offset, name=LUT_INDEX)
        return stages + [index, te.compute(shape, lambda *i: table_read(self.byte_table, index[i]), name=name)]


def output_block_names(byte_table: bool, name: str = "out") -> list:
    """The names of `output_stages`' blocks after a head requantize, in order."""
    return [LUT_INDEX, name] if byte_table else [name]


def schedule_output(sch, blocks: list, table_dtype: str | None = None, tile_scope: str = "local") -> None:
    """Vectorize the innermost loop of each of `blocks` (an output stage last, the stages it reads before
    it). With `table_dtype` the output reads a byte table of that dtype at `LUT_INDEX` (kept in registers):
    it is tensorized 16 lanes at a time (`bytelut`); a head requantize's stage is tensorized too
    (`lanerequant`), in `tile_scope`, the scope of the tile buffer it reads."""
    from hawq_ray.deploy.bytelut import tensorize_table_read
    from hawq_ray.deploy.lanerequant import STAGE, tensorize_lane_requantize
    for k, block in enumerate(blocks):
        name = sch.get(block).name_hint
        if name.startswith(STAGE):
            # one vector at a time, inside the loop of the stage that reads it: its 16 lanes stay in a register
            sch.set_scope(block, 0, tile_scope)
            outer = sch.get_loops(blocks[k + 1])[:-1]
            if outer and not any(sch.get(outer[-1]).same_as(sch.get(loop)) for loop in sch.get_loops(block)):
                sch.compute_at(block, outer[-1])
            tensorize_lane_requantize(sch, block, name.endswith("_up"), tile_scope)
            continue
        loop = sch.get_loops(block)[-1]
        if table_dtype and block == blocks[-1]:
            tensorize_table_read(sch, block, table_dtype)
            continue
        if name == LUT_INDEX:
            sch.set_scope(block, 0, "local")
        sch.vectorize(loop)


def _step(ctx: TileContext, op, k: int):
    if op.op not in TILES:
        raise HawqError(f"{op.output}: {op.op} cannot be fused as an elementwise step")
    return TILES[op.op](ctx, op, k)


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


def _lane_head(ctx: TileContext, op, out: Value):
    """(head, block name) of a requantize computed 16 lanes at a time (`lanerequant`), or None where its
    constants or the value's layout do not allow it."""
    from hawq_ray.deploy.lanerequant import CONSTS, STAGE, lane_constants, lane_requantize
    if op.op != "requantize" or len(out.shape) != 4 or out.block != 16:
        return None
    consts = lane_constants(op.consts["multiplier"], op.consts["shift"], out.shape[1])
    if consts is None:
        return None
    tensors = [ctx.lane_const(consts[k], f"{k}0") for k in CONSTS]
    up = bool(np.any(consts["up_even"]) or np.any(consts["up_odd"]))
    return (lambda z, idx: lane_requantize(z, [ctx.at(t, idx) for t in tensors])), STAGE + ("_up" if up else "")


def _clamp(op):
    from tvm import tirx
    from hawq_ray.ops.requantize import clamp_of
    lo, hi = clamp_of(op)
    return lambda z, idx: te.max(te.min(z, tirx.const(min(hi, 2**31 - 1), "int32")),
                                 tirx.const(max(lo, -2**31), "int32"))


def epilogue(steps: list, out: Value, extras: list, fanout: list = (), byte_table: bool = False,
             lanes: bool = False) -> Epilogue:
    """Build the tail of `steps` (program Ops, each consuming the previous result) for output `out`.

    `extras` holds the Value of the second operand of each binary step, in order; they share out's storage
    layout. With `fanout` (requantize ops that all read the end of the chain), `apply` returns one expression
    per fanout op, each in its own output dtype, and the chain's end itself is not stored. With `byte_table`
    (the target has AVX512-VBMI) and a lookup of 256 8-bit codes that only per-tensor unary steps follow,
    `output_stages` computes the steps before it, then reads the table of the rest (`folds.table_of_tail`)
    with `bytelut`'s intrinsic; `chain` is then the steps before the lookup. With `lanes` (the target has
    AVX2 or AVX-512) a first requantize that `lanerequant` computes becomes `output_stages`' first stage. Clamps
    before a requantize fold into it first (`folds.fold_clamps`).
    """
    steps = fold_clamps(steps)
    ctx = TileContext(out, extras)
    folded = _byte_table(ctx, steps, out) if byte_table and not fanout else None
    table, lookup_at = folded or (None, len(steps))
    head = _lane_head(ctx, steps[0], out) if lanes and not fanout and lookup_at > 0 else None
    first = 1 if head else 0
    plan = ([_clamp(steps[0])] if head else []) + \
        [_step(ctx, op, k) for k, op in enumerate(steps[:lookup_at]) if k >= first]   # with a table: before it
    fan_plans = [_step(ctx, op, len(steps) + k) for k, op in enumerate(fanout)]
    fan_dtypes = [storage_dtype(op.lo, op.hi) for op in fanout]

    def rest(z, idx):
        # values between steps stay int32: every op's range lies in int32
        z = z.astype("int32")
        for fn in plan:
            z = fn(z, idx)
        return z

    def chain(z, idx):
        return rest(head[0](z.astype("int32"), idx) if head else z, idx)

    def finish(k, v, idx):
        if not fanout:
            return v.astype(out.dtype)
        return fan_plans[k](v, idx).astype(fan_dtypes[k])

    return Epilogue(ctx.extra_tensors, ctx.const_tensors, ctx.const_arrays, chain, finish, max(1, len(fanout)),
                    table, int(steps[lookup_at].attrs["offset"]) if table is not None else 0,
                    head[0] if head else None, head[1] if head else None, rest if head else None)
