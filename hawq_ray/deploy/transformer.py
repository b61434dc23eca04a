"""The kernels of a vision transformer's ops between and inside its layers: the layout ops (reshape, permute,
roll, take, pad, crop, a flatten of a plain value), a constant repeated to the batch, the product of two
activations (matmul), the integer softmax, and the layout changes between a blocked map and a plain value.

Values of rank 4 that a conv, a pool or the image edge writes are NCHW[16]c blocks; everything else (tokens
(N, T, C), heads (N, H, T, D), the (3, N, H, T, D) of a qkv split) is stored plain, row-major. A layout op reads
its input by logical index whatever its storage (the patch embedding's blocked (N, C, h, w) map is read as
(N, C, h w) directly) and writes a plain value, except that ops keeping the axes of a blocked map (a roll, a
pad, a crop: `KEEPS_AXES`) keep its blocks, so the conv after them reads it as it is; a kernel that needs blocks
(conv, pools, channel gathers) gets a plain rank-4 value through `to_blocked_kernel`, one that needs a plain
value through `to_plain_kernel` (`graph.plan_kernels` inserts them).

Integer arithmetic is each op's executor's (`hawq_ray.ops`): the product's INT32 accumulation, softmax's int64
steps with arithmetic shifts (TVM's `>>` on a signed integer is LLVM's ashr: floor) and its one integer division
per row (of positives), the layout ops' copies (a pad's zeros: code 0).
"""
from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import s_tir, te

from hawq_ray.contract import HawqError
from hawq_ray.deploy import layout
from hawq_ray.deploy.epilogue import Value, epilogue, logical_index, output_dtype, read_logical
from hawq_ray.deploy.kernels import TILE_COST, Kernel, finish_dot
from hawq_ray.deploy.target import capabilities
from hawq_ray.deploy.winograd import loops_below
from hawq_ray.program.program import Op

I64 = lambda v: tvm.tirx.const(int(v), "int64")     # noqa: E731
I32 = lambda v: tvm.tirx.const(int(v), "int32")     # noqa: E731


def _prod(shape) -> int:
    return int(math.prod(int(s) for s in shape))


def _strides(shape) -> list:
    out, acc = [], 1
    for s in reversed(shape):
        out.append(acc)
        acc *= int(s)
    return out[::-1]


def _unravel(flat, shape) -> tuple:
    """The row-major index of `flat` in `shape` (TE expressions)."""
    st = _strides(shape)
    return tuple(flat // st[k] if k == 0 else flat % int(s) if st[k] == 1 else flat // st[k] % int(s)
                 for k, s in enumerate(shape))


def _ravel(idx, shape):
    flat = 0
    for i, st in zip(idx, _strides(shape)):
        flat = flat + i * st
    return flat


def _schedule_plain(sch, block, vector: bool = True):
    """A plain stage: its outer loops fused and parallel, the innermost vectorized where it is 8 to 64 long."""
    loops = sch.get_loops(block)
    if len(loops) >= 2:
        sch.parallel(sch.fuse(*loops[:-1]))
    elif loops and int(sch.get(loops[0]).extent) > 64:
        sch.parallel(sch.split(loops[0], [None, 64])[0])
        return
    if vector and loops and 8 <= int(sch.get(loops[-1]).extent) <= 64:
        sch.vectorize(loops[-1])


def _finish_plain(name, func, inputs, consts, out, target, notes, stages=("out",), vector=False):
    if not capabilities(target).gpu:
        sch = s_tir.Schedule(func)
        for stage in stages:
            _schedule_plain(sch, sch.get_sblock(stage), vector=vector)
        func = sch.mod["main"]
    return Kernel(name, func, inputs, consts, [out], notes)


# ---------------------------------------------------------------------------------------------- layout ops

def reshape_shape(op: Op, x: Value) -> tuple:
    """The full output shape of a reshape (its -1 resolved at the compiled batch) or a flatten."""
    if op.op == "flatten":
        return (x.shape[0], _prod(x.shape[1:]))
    shape = [int(s) for s in op.attrs["shape"]]
    known = _prod(s for s in shape if s != -1)
    if shape.count(-1) > 1 or (shape.count(-1) == 0 and known != _prod(x.shape)) or \
            (shape.count(-1) == 1 and (known == 0 or _prod(x.shape) % known)):
        raise HawqError(f"{op.output}: reshape of {tuple(x.shape)} to {tuple(shape)}")
    return tuple(_prod(x.shape) // known if s == -1 else s for s in shape)


KEEPS_AXES = ("roll", "pad", "crop")     # layout ops whose output has their input's axes: a blocked map stays so


def layout_map(op: Op, x: Value):
    """(output shape, fn: output logical index -> input logical index, inside) of a reshape, flatten, permute,
    roll, take, pad or crop. `inside` is None, or for a pad fn: output index -> whether it reads x (else it is
    one of the pad's zeros; fn clamps such an index into x, so the discarded read stays in bounds)."""
    rank = len(x.shape)
    if op.op == "pad":
        return _pad_map(op, x)
    if op.op == "crop":
        return _crop_map(op, x)
    if op.op in ("reshape", "flatten"):
        shape = reshape_shape(op, x)
        if tuple(shape) == tuple(x.shape):
            return shape, lambda idx: tuple(idx), None
        return shape, lambda idx: _unravel(_ravel(idx, shape), x.shape), None
    if op.op == "permute":
        dims = [int(d) % rank for d in op.attrs["dims"]]
        if sorted(dims) != list(range(rank)):
            raise HawqError(f"{op.output}: permute dims {tuple(op.attrs['dims'])} of a rank-{rank} value")
        inverse = [dims.index(j) for j in range(rank)]
        return tuple(x.shape[d] for d in dims), lambda idx: tuple(idx[inverse[j]] for j in range(rank)), None
    if op.op == "roll":             # out[..., i, ...] = x[..., (i - shift) mod size, ...]
        shifts, dims = [int(v) for v in op.attrs["shifts"]], [int(d) % rank for d in op.attrs["dims"]]
        if len(shifts) != len(dims):
            raise HawqError(f"{op.output}: roll with shifts {tuple(shifts)} and dims {tuple(dims)}")
        back = {}
        for sh, d in zip(shifts, dims):       # torch.roll shifts an axis named twice twice
            back[d] = (back.get(d, 0) + sh) % x.shape[d]
        # a select, not floormod(i + size - b, size): TVM 0.27's simplifier drops the floormod of such an index
        # when a reshape or permute view is composed under it at batch 1 (the roll then reads unshifted columns)
        return tuple(x.shape), lambda idx: tuple(
            tvm.tirx.Select(i >= back[k], i - back[k], i + (x.shape[k] - back[k])) if back.get(k) else i
            for k, i in enumerate(idx)), None
    if op.op == "take":
        axis, index = int(op.attrs["axis"]) % rank, int(op.attrs["index"])
        if not -x.shape[axis] <= index < x.shape[axis]:
            raise HawqError(f"{op.output}: take index {index} of an axis of {x.shape[axis]}")
        index %= x.shape[axis]
        shape = tuple(s for k, s in enumerate(x.shape) if k != axis)
        return shape, lambda idx: (*idx[:axis], index, *idx[axis:]), None
    raise HawqError(f"{op.output}: {op.op} is not a layout op")


def _pad_map(op: Op, x: Value):
    """A pad's (shape, fn, inside): output index i reads x at i - before along each axis, where that is in x."""
    pads = [tuple(int(a) for a in pair) for pair in op.attrs["pads"]]
    if len(pads) != len(x.shape) or pads[0] != (0, 0) or any(len(p) != 2 or min(p) < 0 for p in pads):
        raise HawqError(f"{op.output}: pad {tuple(pads)} of a rank-{len(x.shape)} value; valid: one (before, "
                        "after) pair of non-negative ints per axis, (0, 0) for the batch")
    padded = [k for k, p in enumerate(pads) if p != (0, 0)]
    shape = tuple(s + a + b for s, (a, b) in zip(x.shape, pads))

    def source(idx):
        return tuple(te.min(te.max(i - pads[k][0], 0), x.shape[k] - 1) if k in padded else i
                     for k, i in enumerate(idx))

    def inside(idx):
        return te.all(*(c for k in padded for c in (idx[k] >= pads[k][0], idx[k] < pads[k][0] + x.shape[k])))
    return shape, source, inside if padded else None


def _crop_map(op: Op, x: Value):
    """A crop's (shape, fn, None): output index i reads x at i + start along each cropped axis."""
    rank = len(x.shape)
    axes, starts, stops = ([int(v) for v in op.attrs[k]] for k in ("axes", "starts", "stops"))
    if not len(axes) == len(starts) == len(stops) or len(set(axes)) != len(axes) or \
            not all(0 < a < rank and 0 <= b < e <= x.shape[a] for a, b, e in zip(axes, starts, stops)):
        raise HawqError(f"{op.output}: crop {tuple(axes)} from {tuple(starts)} to {tuple(stops)} of shape "
                        f"{tuple(x.shape)}; valid: distinct axes after the batch, 0 <= start < stop <= size")
    shape, begin = list(x.shape), [0] * rank
    for a, b, e in zip(axes, starts, stops):
        shape[a], begin[a] = e - b, b
    return tuple(shape), lambda idx: tuple(i + b if b else i for i, b in zip(idx, begin)), None


def composed_map(ops: list, x: Value):
    """(output shape, fn: output logical index -> (x's logical index, inside)) of the layout ops `ops` applied in
    order to x (a chain of views ending at the op a kernel computes). `inside` is None where every output element
    reads x, else the condition that it does (false for a pad's zeros, at any op of the chain)."""
    maps, shape = [], tuple(x.shape)
    for op in ops:
        shape, fn, inside = layout_map(op, Value(shape, x.dtype))       # a map reads shapes only
        maps.append((fn, inside))

    def source(idx):
        conditions = []
        for fn, inside in reversed(maps):
            if inside is not None:
                conditions.append(inside(idx))
            idx = fn(idx)
        return idx, (te.all(*conditions) if conditions else None)
    return shape, source


def layout_kernel(op: Op, x: Value, steps: list, extras: list, target, name: str, views: list = ()) -> Kernel:
    """reshape / flatten / permute / roll / take / pad / crop: every output element read from the input by logical
    index (blocked or plain; a pad's zeros are code 0), with the group's elementwise tail (applied to the zeros
    too). The output is plain, or blocked as x is where every op keeps the axes (`KEEPS_AXES`). With `views`
    (layout ops between x and op that nobody stores, `graph.plan_groups`), their maps are composed: x is the
    first one's input."""
    chain = [*views, op]
    shape, source = composed_map(chain, x)
    dtype = output_dtype(steps[-1]) if steps else output_dtype(op)
    block = x.block if x.block and all(o.op in KEEPS_AXES for o in chain) else None
    out_value = Value(tuple(shape), dtype, block)
    data = te.placeholder(x.storage_shape, x.dtype, name="data")
    epi = epilogue(steps, out_value, extras)

    def element(*sidx):
        idx, inside = source(logical_index(out_value, sidx))
        v = read_logical(data, x, idx).astype("int32")
        return epi.apply(v if inside is None else te.if_then_else(inside, v, I32(0)), sidx)
    out = te.compute(out_value.storage_shape, element, name="out")
    func = te.create_prim_func([data, *epi.extra_tensors, *epi.const_tensors, out])
    return _finish_plain(name, func, [x, *extras], epi.const_arrays, out_value, target, {"path": op.op},
                         vector=True)


def constant_kernel(op: Op, batch: int, steps: list, extras: list, target, name: str) -> Kernel:
    """`value` (1, ...) repeated to the batch (the input is read for its batch size only: the kernel reads
    nothing), with the group's tail."""
    value = np.asarray(op.consts["value"]).astype(np.int64)
    if value.ndim < 1 or value.shape[0] != 1:
        raise HawqError(f"{op.output}: constant of shape {value.shape}; valid: (1, ...)")
    shape = (batch, *value.shape[1:])
    out_value = Value(shape, output_dtype(steps[-1]) if steps else output_dtype(op), None)
    arr = np.ascontiguousarray(value.reshape(value.shape[1:] or (1,))).astype(np.int32)
    const = te.placeholder(arr.shape, "int32", name="value")
    epi = epilogue(steps, out_value, extras)
    out = te.compute(shape, lambda *i: epi.apply(const[i[1:]] if len(shape) > 1 else const[0], i), name="out")
    func = te.create_prim_func([*epi.extra_tensors, const, *epi.const_tensors, out])
    return _finish_plain(name, func, list(extras), [arr, *epi.const_arrays], out_value, target,
                         {"path": "constant"})


def to_blocked_kernel(x: Value, target, name: str) -> Kernel:
    """A plain (N, C, H, W) value -> NCHW[16]c (padding lanes zero), for a kernel that reads blocks."""
    data = te.placeholder(x.shape, x.dtype, name="data")
    out_value = Value(tuple(x.shape), x.dtype, 16)
    c = x.shape[1]
    out = te.compute(out_value.storage_shape, lambda n, co, h, w, ci: te.if_then_else(
        co * 16 + ci < c, data[n, te.min(co * 16 + ci, c - 1), h, w], tvm.tirx.const(0, x.dtype)), name="out")
    return _finish_plain(name, te.create_prim_func([data, out]), [x], [], out_value, target, {"path": "layout"})


def to_plain_kernel(x: Value, target, name: str) -> Kernel:
    """NCHW[b]c -> a plain (N, C, H, W) value, for a kernel that reads plain values."""
    data = te.placeholder(x.storage_shape, x.dtype, name="data")
    out_value = Value(tuple(x.shape), x.dtype, None)
    out = te.compute(x.shape, lambda *i: read_logical(data, x, i), name="out")
    return _finish_plain(name, te.create_prim_func([data, out]), [x], [], out_value, target, {"path": "layout"})


# ---------------------------------------------------------------------------------------------- matmul

def _matmul_tile(m: int, blocks: int) -> tuple:
    """(rows, column blocks) of a VNNI register tile: 2 blocks of 16 columns where they pair up, then the rows
    (at most 28 accumulators in all) that waste the fewest rows for the tile's cost."""
    nbt = 2 if blocks % 2 == 0 else 1
    top = max(1, min(m, 28 // nbt))
    mt = min(range(1, top + 1), key=lambda t: (-(-m // t) * t * (1 + TILE_COST / (t * nbt)), -t))
    return mt, nbt


def matmul_kernel(op: Op, a: Value, b: Value, steps: list, extras: list, target, name: str) -> Kernel:
    """a (..., M, K) @ b (..., K, N) over equal leading axes, INT32 accumulation, the group's tail at the output.

    With AVX512-VNNI and 8-bit operands (b signed), `vpdpbusd` on a register tile of rows x 16-column blocks:
    a signed a is shifted by +128 and 128 * (the column sums of b) subtracted (exact: sum_k (a + 128) b =
    a @ b + 128 sum_k b); elsewhere an INT32 multiply-add over 16 columns at a time."""
    if a.block or b.block:
        raise HawqError(f"{op.output}: matmul of blocked values (convert them to plain first)")
    *lead, M, K = a.shape
    *lead_b, Kb, N = b.shape
    if tuple(lead) != tuple(lead_b) or K != Kb:
        raise HawqError(f"{op.output}: matmul of shapes {tuple(a.shape)} and {tuple(b.shape)}")
    lead = tuple(lead)
    out_value = Value((*lead, M, N), output_dtype(steps[-1]) if steps else output_dtype(op), None)
    caps = capabilities(target)
    fast = caps.vnni and a.dtype in ("uint8", "int8") and b.dtype == "int8"
    A = te.placeholder(a.storage_shape, a.dtype, name="a")
    B = te.placeholder(b.storage_shape, b.dtype, name="b")
    Nb = layout.ceil_to(N, 16) // 16
    Np = Nb * 16
    L = lead or (1,)                 # the matrices' leading axes (one matrix: one axis of 1)

    def at(t, g, i, j):              # element (i, j) of matrix g (a tuple of leading indices)
        return t[(*g, i, j)] if lead else t[i, j]
    if fast:
        shift = a.dtype == "int8"
        Kp = layout.ceil_to(K, 4)
        mt, nbt = _matmul_tile(M, Nb)
        Mp = layout.ceil_to(M, mt)
        rows = Mp + mt if shift else Mp    # a signed a: one more row tile, its first row ones (b's column sums)

        def apacked(*idx):         # rows past M and columns past K read real ones (b is zero past K; rows
            *g, i, k = idx         # past M are never written out)
            v = at(A, g, te.min(i, M - 1), te.min(k, K - 1))
            if not shift:
                return v.astype("uint8")
            v = (v.astype("int32") + 128).astype("uint8")
            return te.if_then_else(i < Mp, v, (i == Mp).astype("uint8"))
        ap = te.compute((*L, rows, Kp), apacked, name="apack")

        def bpacked(*idx):         # zero past K (so a's columns there add nothing) and past N
            *g, nb, k4, oi, ki = idx
            k, n = k4 * 4 + ki, nb * 16 + oi
            v = at(B, g, te.min(k, K - 1), te.min(n, N - 1))
            return te.if_then_else(te.all(k < K, n < N), v, tvm.tirx.const(0, "int8"))
        bp = te.compute((*L, Nb, Kp // 4, 16, 4), bpacked, name="bpack")
        k4 = te.reduce_axis((0, Kp // 4), "k4")
        ki = te.reduce_axis((0, 4), "ki")
        acc = te.compute((*L, rows, Nb, 16), lambda *idx: te.sum(
            ap[(*idx[:-3], idx[-3], k4 * 4 + ki)].astype("int32") *
            bp[(*idx[:-3], idx[-2], k4, idx[-1], ki)].astype("int32"), axis=[k4, ki]), name="acc")

        if shift:                  # the ones row's accumulators: b's column sums, times 128
            sums = te.compute((*L, Np), lambda *idx: acc[(*idx[:-1], Mp, idx[-1] // 16, idx[-1] % 16)] * 128,
                              name="colsum")

        def product(g, i, n):      # sum_k (a + 128) b - 128 sum_k b = a @ b
            v = acc[(*g, i, n // 16, n % 16)]
            return v - sums[(*g, n)] if shift else v
    else:
        Bp = te.compute((*L, K, Np), lambda *idx: te.if_then_else(
            idx[-1] < N, at(B, idx[:-2], idx[-2], te.min(idx[-1], N - 1)).astype("int32"), I32(0)), name="bpack")
        rk = te.reduce_axis((0, K), "rk")
        acc = te.compute((*L, M, Np), lambda *idx: te.sum(
            at(A, idx[:-2], idx[-2], rk).astype("int32") * Bp[(*idx[:-2], rk, idx[-1])], axis=rk), name="acc")
        product = lambda g, i, n: acc[(*g, i, n)]     # noqa: E731
    epi = epilogue(steps, out_value, extras)

    def output(*idx):
        *g, i, n = idx
        return epi.apply(product(tuple(g) if lead else (0,), i, n), idx)
    out = te.compute(out_value.storage_shape, output, name="out")
    func = te.create_prim_func([A, B, *epi.extra_tensors, *epi.const_tensors, out])
    if not caps.gpu:
        func = _schedule_matmul_vnni(func, len(L), mt, nbt, shift, bool(lead)) if fast else \
            _schedule_matmul(func, len(L), bool(lead))
    return Kernel(name, func, [a, b, *extras], epi.const_arrays, [out_value],
                  {"path": "matmul_vnni" if fast else "matmul"})


def _schedule_matmul_vnni(func, n_lead: int, mt: int, nbt: int, colsum: bool, lead: bool):
    """Parallel over the matrices (with the row tiles where there are few); per matrix its operands packed (a
    as unsigned, b in VNNI's 16 x 4 blocks), then register tiles of mt rows x nbt blocks of 16 columns,
    `vpdpbusd` over K. The epilogue runs at the tile or, with a signed a (b's column sums subtracted: the
    accumulator of the ones row after the matrix), once per matrix after its tiles."""
    sch = s_tir.Schedule(func)
    acc = sch.get_sblock("acc")
    loops = sch.get_loops(acc)
    g = sch.fuse(*loops[:n_lead]) if n_lead > 1 else loops[0]
    i, nb, oi, k4, ki = loops[n_lead:]
    io, ii = sch.split(i, [None, mt])
    nbo, nbi = sch.split(nb, [None, nbt])
    sch.reorder(g, io, nbo, k4, ii, nbi, oi, ki)
    sch.set_scope(acc, 0, "local")
    few = not colsum and int(sch.get(g).extent) < 4
    task = sch.fuse(g, io) if few else g
    sch.parallel(task)
    for name in ("bpack", "apack"):
        sch.compute_at(sch.get_sblock(name), task)
    out = sch.get_sblock("out")
    if colsum:
        sums = sch.get_sblock("colsum")
        sch.reverse_compute_at(sums, task)
        sch.set_scope(sums, 0, "local")
        sch.vectorize(sch.get_loops(sums)[-1])
    sch.reverse_compute_at(out, task if colsum else nbo)
    finish_dot(sch, acc, k4, oi, [ii, nbi], True)
    own = loops_below(sch, out, task)      # the epilogue's own loops (none for a 1 x 1 matrix)
    if colsum and own and int(sch.get(own[-1]).extent) <= 64:
        sch.vectorize(own[-1])    # a matrix's short rows as one vector (LLVM splits it; a row split with a tail
    return sch.mod["main"]        # is predicated, and slower than scalar code)


def _schedule_matmul(func, n_lead: int, lead: bool):
    sch = s_tir.Schedule(func)
    acc = sch.get_sblock("acc")
    loops = sch.get_loops(acc)
    g = sch.fuse(*loops[:n_lead]) if n_lead > 1 else loops[0]
    i, n, k = loops[n_lead:]
    no, ni = sch.split(n, [None, 16])
    sch.reorder(g, i, no, k, ni)
    sch.set_scope(acc, 0, "local")
    out = sch.get_sblock("out")
    sch.reverse_compute_at(out, no)
    few = int(sch.get(g).extent) < 4
    task = sch.fuse(g, i) if few else g
    sch.parallel(task)
    sch.compute_at(sch.get_sblock("bpack"), task)
    init = sch.decompose_reduction(acc, k)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(ni)
    return sch.mod["main"]


# ---------------------------------------------------------------------------------------------- softmax

def softmax_kernel(op: Op, x: Value, steps: list, extras: list, target, name: str) -> Kernel:
    """`ops.softmax` over the last axis of a plain value, row by row in int64: the row's max, e per element
    (16 lanes of a row at a time), the row's sum, one integer division, the output codes; the group's tail."""
    from hawq_ray.ops.softmax import FRACTION, ONE, OUT_HI, OUT_SHIFT, POLY, RECIP_BITS
    if x.block:
        raise HawqError(f"{op.output}: softmax of a blocked value (convert it to plain first)")
    if x.dtype not in ("int8", "uint8", "int16"):
        raise HawqError(f"{op.output}: softmax of a {x.dtype} value; valid: int16 codes")
    m, s = int(np.asarray(op.consts["multiplier"])), int(np.asarray(op.consts["shift"]))
    if m <= 0 or not 1 <= s <= 62 or np.size(op.consts["multiplier"]) != 1:
        raise HawqError(f"{op.output}: softmax needs one multiplier > 0 and 1 <= shift <= 62")
    *lead, T = x.shape
    lead = tuple(lead)
    rows = lead or (1,)             # a rank-1 value is one row

    def read(r, j):
        return data[(*r, j)] if lead else data[j]
    out_value = Value(tuple(x.shape), output_dtype(steps[-1]) if steps else output_dtype(op), None)
    data = te.placeholder(x.storage_shape, x.dtype, name="data")
    rj = te.reduce_axis((0, T), "rj")
    mx = te.compute(rows, lambda *r: te.max(read(r, rj).astype("int32"), axis=rj), name="row_max")
    c1, c2, c3 = POLY
    low = I64((1 << FRACTION) - 1)

    def exponent(*idx):     # over the row's T elements only: a vectorized load past its end would be read
        *r, j = idx
        d = read(r, j).astype("int64") - mx[tuple(r)].astype("int64")
        u = ((I64(0) - d) * I64(m) + I64(1 << (s - 1))) >> I64(s)
        f = u & low
        p = I64(c2) + ((I64(c3) * f) >> I64(FRACTION))
        p = I64(c1) + ((p * f) >> I64(FRACTION))
        p = I64(ONE) + ((p * f) >> I64(FRACTION))
        return p >> te.min(u >> I64(FRACTION), I64(31))
    e = te.compute((*rows, T), exponent, name="row_exp")
    rs = te.reduce_axis((0, T), "rs")
    total = te.compute(rows, lambda *r: te.sum(e[(*r, rs)], axis=rs), name="row_sum")
    recip = te.compute(rows, lambda *r: tvm.tirx.floordiv(I64(1 << RECIP_BITS), total[r]), name="row_recip")
    epi = epilogue(steps, out_value, extras)

    def output(*idx):
        *r, j = idx
        r = tuple(r) if lead else (0,)
        q = te.min((e[(*r, j)] * recip[r] + I64(1 << (OUT_SHIFT - 1))) >> I64(OUT_SHIFT), I64(OUT_HI))
        return epi.apply(q.astype("int32"), idx)
    out = te.compute(out_value.storage_shape, output, name="out")
    func = te.create_prim_func([data, *epi.extra_tensors, *epi.const_tensors, out])
    if not capabilities(target).gpu and lead:
        func = _schedule_rows(func, len(lead), ("row_max", "row_exp", "row_sum", "row_recip"))
    return Kernel(name, func, [x, *extras], epi.const_arrays, [out_value], {"path": "softmax"})


def _schedule_rows(func, n_lead: int, row_stages: tuple, vector_stages: tuple = ("row_exp",)):
    """Parallel over the rows (the leading axes fused); each row's stages computed under its loop, the
    stages over a row's elements vectorized."""
    sch = s_tir.Schedule(func)
    out = sch.get_sblock("out")
    loops = sch.get_loops(out)
    row = sch.fuse(*loops[:n_lead]) if n_lead > 1 else loops[0] if n_lead else None
    if row is None:
        return func
    sch.parallel(row)
    for name in reversed(row_stages):
        sch.compute_at(sch.get_sblock(name), row)
    for name in row_stages:      # scope "global": under 1 KB per row, on the stack (a "local" buffer is
        blk = sch.get_sblock(name)     # allocated through TVMBackendAllocWorkspace on every iteration)
        own = loops_below(sch, blk, row)
        if name in vector_stages and own:
            vectorize_row(sch, own[-1])
    own = loops_below(sch, out, row)
    if own and int(sch.get(own[-1]).extent) <= 64:
        sch.vectorize(own[-1])
    return sch.mod["main"]


MAX_LANES = 4096     # the longest loop vectorized whole: TVM refuses 2^15 lanes and more (LLVM aborts on them)


def vectorize_row(sch, loop, lanes: int = 16) -> None:
    """Vectorize `loop` whole (LLVM splits it into registers), or where it is longer than MAX_LANES (a softmax over
    40572 features), its inner `lanes` iterations (the last vector predicated where they do not divide it)."""
    if int(sch.get(loop).extent) > MAX_LANES:
        loop = sch.split(loop, [None, lanes])[1]
    sch.vectorize(loop)
