"""The kernels between the layers: INT32 sum pooling, max pooling, concat, channel gathers (shuffle, slice,
gather by an index), resampling (resize), flatten, standalone elementwise chains, and the two layout changes at
the model's edges (NCHW int8 image -> NCHW[b]c, and back).

Each may carry an elementwise tail (`epilogue.py`): sum_pool2d -> requantize is one kernel.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir, te

from hawq_ray.deploy import layout
from hawq_ray.deploy.epilogue import Value, epilogue, output_dtype
from hawq_ray.deploy.kernels import Kernel
from hawq_ray.deploy.target import capabilities
from hawq_ray.deploy.transformer import vectorize_row
from hawq_ray.contract import HawqError
from hawq_ray.program.program import Op


def _schedule_flat(func):
    """Every block: its outer loops (up to three, never the innermost) fused and parallel."""
    sch = s_tir.Schedule(func)
    for blk in sch.get_child_blocks(sch.get_sblock("root")):
        loops = sch.get_loops(blk)
        if len(loops) >= 2:
            sch.parallel(sch.fuse(*loops[:min(3, len(loops) - 1)]))
    return sch.mod["main"]


def _finish(name, func, inputs, consts, out, target, notes):
    if not capabilities(target).gpu:
        func = _schedule_flat(func)
    return Kernel(name, func, inputs, consts, [out], notes)


def pool_out_size(size, k, s, p, d, ceil_mode):
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:   # the last window must start inside the input or left pad
        out -= 1
    return out


def pool_kernel(op: Op, x: Value, steps: list, extras: list, target, name: str) -> Kernel:
    """sum_pool2d (INT32 window sum, zero padding) or max_pool2d (padding never wins) on NCHW[b]c."""
    if op.attrs.get("adaptive"):
        return _adaptive_sum_kernel(op, x, steps, extras, target, name)
    kh, kw = op.attrs["kernel"]
    sh, sw = op.attrs.get("stride", None) or (kh, kw)
    ph, pw = op.attrs.get("padding", (0, 0))
    dh, dw = op.attrs.get("dilation", (1, 1)) if op.op == "max_pool2d" else (1, 1)
    ceil_mode = bool(op.attrs.get("ceil_mode", False))
    N, C, H, W = x.shape
    OH, OW = pool_out_size(H, kh, sh, ph, dh, ceil_mode), pool_out_size(W, kw, sw, pw, dw, ceil_mode)
    plain = x.dtype if op.op == "max_pool2d" else output_dtype(op)
    out_value = Value((N, C, OH, OW), output_dtype(steps[-1]) if steps else plain, x.block)
    data = te.placeholder(x.storage_shape, x.dtype, name="data")
    rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")
    is_max = op.op == "max_pool2d"
    acc_dtype = x.dtype if is_max else "int32"
    floor = tvm.tirx.min_value(acc_dtype) if is_max else tvm.tirx.const(0, acc_dtype)

    def window(n, c, oh, ow, ci):
        ih, iw = oh * sh - ph + rh * dh, ow * sw - pw + rw * dw
        inside = te.all(ih >= 0, ih < H, iw >= 0, iw < W)
        v = te.if_then_else(inside, data[n, c, te.min(te.max(ih, 0), H - 1), te.min(te.max(iw, 0), W - 1), ci]
                            .astype(acc_dtype), floor)
        return te.max(v, axis=[rh, rw]) if is_max else te.sum(v, axis=[rh, rw])
    acc = te.compute(out_value.storage_shape, window, name="acc")
    epi = epilogue(steps, out_value, extras)
    out = te.compute(out_value.storage_shape, lambda *i: epi.apply(acc[i], i), name="out")
    func = te.create_prim_func([data, *epi.extra_tensors, *epi.const_tensors, out])
    if not capabilities(target).gpu:
        sch = s_tir.Schedule(func)
        acc_b, out_b = sch.get_sblock("acc"), sch.get_sblock("out")
        n, c, oh, ow, ci, rh, rw = sch.get_loops(acc_b)
        sch.reorder(ow, rh, rw, ci)             # the window outside the 16 lanes: one vector per input position
        sch.set_scope(acc_b, 0, "local")
        sch.reverse_compute_at(out_b, ow)
        sch.parallel(sch.fuse(n, c, oh))
        init = sch.decompose_reduction(acc_b, rh)
        sch.vectorize(sch.get_loops(init)[-1])
        sch.unroll(ci)
        sch.vectorize(sch.get_loops(out_b)[-1])
        func = sch.mod["main"]
    return Kernel(name, func, [x, *extras], epi.const_arrays, [out_value], {"path": op.op})


def _adaptive_sum_kernel(op: Op, x: Value, steps: list, extras: list, target, name: str) -> Kernel:
    """Adaptive pooling's INT32 window sums: output row i sums input rows [i H // oh, ceil((i + 1) H / oh)),
    over a reduction as long as the largest window, masked past each window's end."""
    N, C, H, W = x.shape
    oh, ow = op.attrs["adaptive"]
    kh, kw = op.attrs["kernel"]
    out_value = Value((N, C, oh, ow), output_dtype(steps[-1]) if steps else output_dtype(op), x.block)
    data = te.placeholder(x.storage_shape, x.dtype, name="data")
    rh, rw = te.reduce_axis((0, kh), "rh"), te.reduce_axis((0, kw), "rw")

    def window(n, c, i, j, ci):
        h0, h1 = (i * H) // oh, ((i + 1) * H + oh - 1) // oh
        w0, w1 = (j * W) // ow, ((j + 1) * W + ow - 1) // ow
        ih, iw = h0 + rh, w0 + rw
        v = data[n, c, te.min(ih, H - 1), te.min(iw, W - 1), ci].astype("int32")
        return te.sum(te.if_then_else(te.all(ih < h1, iw < w1), v, tvm.tirx.const(0, "int32")), axis=[rh, rw])
    acc = te.compute(out_value.storage_shape, window, name="acc")
    epi = epilogue(steps, out_value, extras)
    out = te.compute(out_value.storage_shape, lambda *i: epi.apply(acc[i], i), name="out")
    func = te.create_prim_func([data, *epi.extra_tensors, *epi.const_tensors, out])
    return _finish(name, func, [x, *extras], epi.const_arrays, out_value, target, {"path": "sum_pool2d"})


def elementwise_kernel(steps: list, inputs: list, target, name: str) -> Kernel:
    """A standalone chain of requantize/relu/add; inputs[0] is the chain's first operand, the rest are the
    other operands of its `add` steps (same storage layout)."""
    x = inputs[0]
    out_value = Value(x.shape, output_dtype(steps[-1]), x.block)
    data = te.placeholder(x.storage_shape, x.dtype, name="data")
    epi = epilogue(steps, out_value, inputs[1:])
    out = te.compute(out_value.storage_shape, lambda *i: epi.apply(data[i], i), name="out")
    func = te.create_prim_func([data, *epi.extra_tensors, *epi.const_tensors, out])
    if not capabilities(target).gpu:
        sch = s_tir.Schedule(func)
        loops = sch.get_loops(sch.get_sblock("out"))
        if len(loops) > 1:
            sch.parallel(sch.fuse(*loops[:-1]))
        lanes = int(out_value.storage_shape[-1])
        if lanes % 16 == 0:
            sch.vectorize(sch.split(loops[-1], [None, 16])[1])
        func = sch.mod["main"]
    return Kernel(name, func, list(inputs), epi.const_arrays, [out_value], {"path": "elementwise"})


def dtype_range(dtype: str) -> tuple:
    """(lo, hi) of the values a storage dtype holds."""
    info = np.iinfo(np.dtype(dtype))
    return int(info.min), int(info.max)


def _read_channel(t: te.Tensor, v: Value, n, c, h, w):
    """Logical element (n, c, h, w) of a blocked value."""
    return t[n, c // v.block, h, w, c % v.block]


def concat_kernel(op: Op, inputs: list, steps: list, extras: list, target, name: str) -> Kernel:
    axis = op.attrs.get("axis", 1)
    rank = len(inputs[0].shape)
    if axis not in (1, 1 - rank):
        raise HawqError(f"{op.output}: concat along axis {axis}; only the channel axis (1) is supported")
    if rank == 4 and not all(v.block for v in inputs) or rank != 4 and any(v.block for v in inputs):
        raise HawqError(f"{op.output}: concat of rank-{rank} values stored {[v.block for v in inputs]}")
    channels = [v.shape[1] for v in inputs]
    if rank < 2 or any(tuple(v.shape[:1]) + tuple(v.shape[2:]) != tuple(inputs[0].shape[:1]) +
                       tuple(inputs[0].shape[2:]) for v in inputs):
        raise HawqError(f"{op.output}: concat along axis 1 of shapes {[tuple(v.shape) for v in inputs]}")
    shape = (inputs[0].shape[0], sum(channels), *inputs[0].shape[2:])
    # The concatenation is held in its own dtype (every branch fits it); only the tail's result takes the
    # output dtype. Casting the branches to a narrow tail dtype first would wrap them before the requantize.
    same = len({v.dtype for v in inputs}) == 1
    dtype = inputs[0].dtype if same else output_dtype(op)
    out_value = Value(shape, output_dtype(steps[-1]) if steps else dtype, 16 if rank == 4 else None)
    tens = [te.placeholder(v.storage_shape, v.dtype, name=f"in{i}") for i, v in enumerate(inputs)]
    offsets = np.cumsum([0] + channels)

    def pick(c, read):   # channel c comes from the branch whose range holds it (pad channels: the last)
        last = len(inputs) - 1
        expr = read(last, te.min(te.max(c - int(offsets[last]), 0), channels[last] - 1)).astype(dtype)
        for i in reversed(range(last)):
            ci = te.min(te.max(c - int(offsets[i]), 0), channels[i] - 1)
            expr = te.if_then_else(c < int(offsets[i + 1]), read(i, ci).astype(dtype), expr)
        return expr
    if rank == 4:
        cat = te.compute(out_value.storage_shape, lambda n, co, h, w, ci: pick(
            co * 16 + ci, lambda i, cc: _read_channel(tens[i], inputs[i], n, cc, h, w)), name="cat")
    else:       # plain values of any rank, along axis 1
        cat = te.compute(out_value.storage_shape,
                         lambda n, c, *rest: pick(c, lambda i, cc: tens[i][(n, cc, *rest)]), name="cat")
    epi = epilogue(steps, out_value, extras)
    out = te.compute(out_value.storage_shape, lambda *i: epi.apply(cat[i], i), name="out")
    func = te.create_prim_func([*tens, *epi.extra_tensors, *epi.const_tensors, out])
    if not capabilities(target).gpu:
        sch = s_tir.Schedule(func)
        sch.compute_inline(sch.get_sblock("cat"))
        func = _schedule_flat(sch.mod["main"])
    return Kernel(name, func, [*inputs, *extras], epi.const_arrays, [out_value], {"path": "concat"})


def channel_gather_kernel(op: Op, x: Value, steps: list, extras: list, target, name: str, channels: int,
                          source) -> Kernel:
    """out[n, c] = x[n, source(c)] on NCHW[16]c, with a tail: `source` a function of the output channel (a
    channel shuffle, a slice of the channels), or the input channel of each output channel, an int array read
    as a table of the kernel (a gather by any index: channels picked, repeated, reordered)."""
    if len(x.shape) != 4:
        raise HawqError(f"{op.output}: {op.op} of a rank-{len(x.shape)} value; only (N, C, H, W) is supported")
    n_, c_, h_, w_ = x.shape
    tables, arrays = [], []
    if not callable(source):
        index = np.ascontiguousarray(np.asarray(source).astype(np.int32))
        if index.shape != (channels,) or index.min() < 0 or index.max() >= c_:
            raise HawqError(f"{op.output}: {op.op} index of shape {index.shape} with values outside 0..{c_ - 1}; "
                            f"valid: {channels} channels of x")
        tables, arrays = [te.placeholder(index.shape, "int32", name="index")], [index]
        source = lambda c: tables[0][c]      # noqa: E731
    out_value = Value((n_, channels, h_, w_), output_dtype(steps[-1]) if steps else x.dtype, 16)
    data = te.placeholder(x.storage_shape, x.dtype, name="data")

    def gather(n, co, h, w, ci):    # padded channels read a real one: nobody reads them
        return _read_channel(data, x, n, source(te.min(co * 16 + ci, channels - 1)), h, w)
    epi = epilogue(steps, out_value, extras)
    out = te.compute(out_value.storage_shape, lambda *i: epi.apply(gather(*i), i), name="out")
    func = te.create_prim_func([data, *epi.extra_tensors, *epi.const_tensors, *tables, out])
    return _finish(name, func, [x, *extras], [*epi.const_arrays, *arrays], out_value, target, {"path": op.op})


RESIZE_TABLES = ("idx_h", "w_h", "idx_w", "w_w")


def resize_kernel(op: Op, x: Value, steps: list, extras: list, target, name: str) -> Kernel:
    """resize (`ops.resize`) of an NCHW[b]c map, written in x's blocks, with the group's tail: output (i, j) is
    the rounded sum over its T x T taps of w_h[i, a] w_w[j, b] x[idx_h[i, a], idx_w[j, b]], T the tables' width
    (known when compiling: the sum is unrolled), the four tables constants of the kernel. Parallel over (n,
    channel block, output row); each tap loads a block's lanes as one vector, at the row and column the tables
    give. Sums are int32 where no partial sum can overflow it (`_resize_acc`), int64 else (a conv's INT32
    accumulator resampled bilinearly)."""
    if len(x.shape) != 4 or not x.block:
        raise HawqError(f"{op.output}: resize of a rank-{len(x.shape)} value stored {x.block}; valid: a blocked "
                        "(N, C, H, W) map")
    arrays = _resize_tables(op, x)
    ih, wh, iw, ww = (te.placeholder(a.shape, "int32", name=k) for k, a in zip(RESIZE_TABLES, arrays))
    (ho, th), (wo, tw) = arrays[0].shape, arrays[2].shape
    shift = int(op.attrs["shift"])
    acc = _resize_acc(x.dtype, arrays, shift)
    out_value = Value((x.shape[0], x.shape[1], ho, wo), output_dtype(steps[-1]) if steps else output_dtype(op),
                      x.block)
    data = te.placeholder(x.storage_shape, x.dtype, name="data")

    def taps(n, co, i, j, ci):
        total = sum(wh[i, a].astype(acc) * ww[j, b].astype(acc) *
                    data[n, co, ih[i, a], iw[j, b], ci].astype(acc) for a in range(th) for b in range(tw))
        if shift:
            total = (total + tvm.tirx.const(1 << (shift - 1), acc)) >> tvm.tirx.const(shift, acc)
        return total.astype("int32")
    epi = epilogue(steps, out_value, extras)
    out = te.compute(out_value.storage_shape, lambda *i: epi.apply(taps(*i), i), name="out")
    func = te.create_prim_func([data, *epi.extra_tensors, *epi.const_tensors, ih, wh, iw, ww, out])
    if not capabilities(target).gpu:
        sch = s_tir.Schedule(func)
        n, co, i, j, ci = sch.get_loops(sch.get_sblock("out"))
        sch.parallel(sch.fuse(n, co, i))
        sch.vectorize(ci)
        func = sch.mod["main"]
    return Kernel(name, func, [x, *extras], [*epi.const_arrays, *arrays], [out_value], {"path": "resize"})


def _resize_tables(op: Op, x: Value) -> list:
    """The resize's tap tables (idx_h, w_h, idx_w, w_w) as int32 arrays, checked: (Ho, T) and (Wo, T) pairs,
    indices inside x, weights non-negative (the kernel reads at the indices unchecked)."""
    arrays = [np.ascontiguousarray(np.asarray(op.consts[k]).astype(np.int32)) for k in RESIZE_TABLES]
    (h, w), ok = x.shape[2:], int(op.attrs["shift"]) >= 0
    for (idx, wt), size in ((arrays[:2], h), (arrays[2:], w)):
        ok = ok and idx.ndim == 2 and idx.shape == wt.shape and idx.size > 0 and 0 <= idx.min() and \
            idx.max() < size and wt.min() >= 0
    if not ok:
        raise HawqError(f"{op.output}: resize tables of shapes {[a.shape for a in arrays]} for a {h}x{w} input; "
                        "valid: (Ho, T) and (Wo, T) pairs, indices inside the input, weights >= 0")
    return arrays


def _resize_acc(dtype: str, arrays: list, shift: int) -> str:
    """int32 where every partial sum of taps fits it for any x of `dtype` (the weights are non-negative: the sums
    lie between min(x) and max(x) times the largest weight total, plus the rounding's half), int64 else."""
    lo, hi = dtype_range(dtype)
    weight = int(arrays[1].astype(np.int64).sum(1).max()) * int(arrays[3].astype(np.int64).sum(1).max())
    half = 1 << (shift - 1) if shift else 0
    return "int32" if lo * weight >= -(1 << 31) and hi * weight + half < (1 << 31) else "int64"


def flatten_kernel(op: Op, x: Value, steps: list, extras: list, target, name: str) -> Kernel:
    """NCHW[b]c -> (N, C*H*W) in NCHW order: the layout change at the model's classifier edge. A plain value
of another rank is `transformer.layout_kernel`'s (a reshape to (N, -1))."""
    if not (len(x.shape) == 2 or (len(x.shape) == 4 and x.block)):
        from hawq_ray.deploy.transformer import layout_kernel
        return layout_kernel(op, x, steps, extras, target, name)
    if len(x.shape) == 2:
        n, f = x.shape
        src = lambda t, i, j: t[i, j]
    else:
        n, c, h, w = x.shape
        f = c * h * w
        src = lambda t, i, j: _read_channel(t, x, i, j // (h * w), j // w % h, j % w)
    out_value = Value((n, f), output_dtype(steps[-1]) if steps else x.dtype, None)
    data = te.placeholder(x.storage_shape, x.dtype, name="data")
    epi = epilogue(steps, out_value, extras)
    out = te.compute((n, f), lambda i, j: epi.apply(src(data, i, j), (i, j)), name="out")
    func = te.create_prim_func([data, *epi.extra_tensors, *epi.const_tensors, out])
    return _finish(name, func, [x, *extras], epi.const_arrays, out_value, target, {"path": "flatten"})


def input_kernel(x: Value, block: int, target, name: str = "input_to_blocked") -> Kernel:
    """(N, C, H, W) -> NCHW[block]c, channels padded with zeros: the layout change at the model's input."""
    data = te.placeholder(x.shape, x.dtype, name="data")
    C = x.shape[1]
    out_value = Value(x.shape, x.dtype, block)
    out = te.compute(out_value.storage_shape, lambda n, co, h, w, ci: te.if_then_else(
        co * block + ci < C, data[n, te.min(co * block + ci, C - 1), h, w], tvm.tirx.const(0, x.dtype)),
        name="out")
    func = te.create_prim_func([data, out])
    return _finish(name, func, [x], [], out_value, target, {"path": "layout"})


def output_kernel(x: Value, target, name: str = "blocked_to_output") -> Kernel:
    """NCHW[b]c -> (N, C, H, W): the layout change at a rank-4 model output."""
    data = te.placeholder(x.storage_shape, x.dtype, name="data")
    out_value = Value(x.shape, x.dtype, None)
    out = te.compute(x.shape, lambda n, c, h, w: _read_channel(data, x, n, c, h, w), name="out")
    func = te.create_prim_func([data, out])
    return _finish(name, func, [x], [], out_value, target, {"path": "layout"})


def layer_norm_kernel(op: Op, x: Value, steps: list, extras: list, target, name: str) -> Kernel:
    """layer_norm (`ops.layernorm`) over axis `axis` (1: the channels of NCHW[16]c or (N, C); the last axis of
    tokens (N, T, C); any axis of a plain value): the per-position sums (int64 reductions over the true
    channels; without centering, attr `center` false, no sum: S = 0), isqrt bit by bit (one small stage per
    bit: a stage reads the previous one, so no expression is duplicated), the reciprocal 2^K // r, then per
    element the normalized value, the per-channel affine and the clamp, with the group's tail. Over the last
    axis of a plain value each position's stages run inside its loop (parallel over positions) and its C
    outputs are one vector loop. The output keeps x's layout."""
    from hawq_ray.ops.layernorm import K, NORM_SHIFT, P, ROOT_BITS, MAX_SPREAD, layer_norm_channels, check_constants
    from hawq_ray.deploy.epilogue import logical_index, read_logical
    rank = len(x.shape)
    axis = int(op.attrs.get("axis", 1))
    center = bool(op.attrs.get("center", True))
    c = layer_norm_channels(x.shape, op.output, axis)
    if x.dtype not in ("int8", "uint8", "int16"):
        raise HawqError(f"{op.output}: layer_norm of a {x.dtype} value; valid: int16 or narrower")
    if c * _largest_spread(x.dtype, center) > MAX_SPREAD:
        raise HawqError(f"{op.output}: layer_norm over {c} channels of {x.dtype}: C * spread may exceed 2^28")
    consts = check_constants(op, c)
    out_value = Value(x.shape, output_dtype(steps[-1]) if steps else output_dtype(op), x.block)
    lanes = layout.ceil_to(c, 16) if x.block and axis == 1 else c
    packed = [np.zeros(lanes, np.int32), np.ones(lanes, np.int32), np.zeros(lanes, np.int64)]
    for arr, key in zip(packed, ("multiplier", "shift", "bias")):
        arr[:c] = consts[key]
    tm, ts, tb = (te.placeholder((lanes,), str(a.dtype), name=n) for a, n in zip(packed, ("mult", "shift", "bias")))
    data = te.placeholder(x.storage_shape, x.dtype, name="data")
    i64 = lambda v: tvm.tirx.const(v, "int64")      # noqa: E731
    pos = tuple(s for k, s in enumerate(x.shape) if k != axis)

    def read(p, ch):       # the input at position p (x's index without the axis), channel ch
        return read_logical(data, x, (*p[:axis - 1 + 1], ch, *p[axis:])).astype("int64")
    stages = []
    if center:
        rc = te.reduce_axis((0, c), "rc")
        sums = te.compute(pos, lambda *p: te.sum(read(p, rc), axis=rc), name="ln_sum")
        stages.append("ln_sum")
    total = (lambda p: sums[p]) if center else (lambda p: i64(0))
    rq = te.reduce_axis((0, c), "rq")
    squares = te.compute(pos, lambda *p: te.sum(read(p, rq) * read(p, rq), axis=rq), name="ln_squares")
    eps = int(op.attrs.get("eps", 0))
    v = te.compute(pos, lambda *p: (i64(c) * squares[p] - total(p) * total(p) + i64(eps)) << i64(2 * P),
                   name="ln_v")
    r = te.compute(pos, lambda *p: i64(0), name="ln_root")

    def bit(prev, b):
        def fn(*p):
            t = prev[p] + i64(1 << b)
            return te.if_then_else(t * t <= v[p], t, prev[p])
        return fn
    stages += ["ln_squares", "ln_v", "ln_root"]
    for b in range(ROOT_BITS - 1, -1, -1):
        r = te.compute(pos, bit(r, b), name=f"ln_root{b}")
        stages.append(f"ln_root{b}")
    recip = te.compute(pos, lambda *p: tvm.tirx.floordiv(i64(1 << K), te.max(r[p], i64(1))), name="ln_recip")
    stages.append("ln_recip")

    def value(*idx):
        if x.block and axis == 1:
            nn, co, hh, ww, ci = idx
            p, ch = (nn, hh, ww), co * 16 + ci
        else:
            logical = logical_index(x, idx)
            p, ch = tuple(logical[:axis]) + tuple(logical[axis + 1:]), logical[axis]
        xv = data[idx].astype("int64")
        norm = ((i64(c) * xv - total(p)) * recip[p] + i64(1 << (NORM_SHIFT - 1))) >> i64(NORM_SHIFT)
        s = ts[ch].astype("int64")
        y = (norm * tm[ch].astype("int64") + tb[ch] + (i64(1) << (s - i64(1)))) >> s
        y = te.max(te.min(y, i64(int(op.attrs["hi"]))), i64(int(op.attrs["lo"])))
        return y.astype("int32")
    epi = epilogue(steps, out_value, extras)
    out = te.compute(out_value.storage_shape, lambda *i: epi.apply(value(*i), i), name="out")
    func = te.create_prim_func([data, *epi.extra_tensors, *epi.const_tensors, tm, ts, tb, out])
    if not capabilities(target).gpu:
        if not x.block and axis == rank - 1:
            func = _schedule_positions(func, rank - 1, stages)
        else:
            func = _schedule_flat(func)
    return Kernel(name, func, [x, *extras], [*epi.const_arrays, *packed], [out_value], {"path": "layer_norm"})


def _largest_spread(dtype: str, center: bool) -> int:
    """The largest spread of values of `dtype` at a position, as `ops.layernorm` bounds C * spread: max - min, or
    without centering 2 max |x|."""
    lo, hi = dtype_range(dtype)
    return hi - lo if center else 2 * max(-lo, hi)


def _schedule_positions(func, n_pos: int, stages: list):
    """Parallel over the positions (the leading axes fused); each position's stages in its loop (its scalars on
    the stack, in registers once LLVM promotes them); the position's outputs one vector loop."""
    sch = s_tir.Schedule(func)
    out = sch.get_sblock("out")
    loops = sch.get_loops(out)
    row = sch.fuse(*loops[:n_pos]) if n_pos > 1 else loops[0]
    sch.parallel(row)
    for name in reversed(stages):    # scope "global": a few bytes per position, on the stack ("local" would be
        sch.compute_at(sch.get_sblock(name), row)    # TVMBackendAllocWorkspace on every iteration)
    inner = sch.get_loops(out)[-1]
    extent = int(sch.get(inner).extent)
    if extent % 16 == 0 and extent > 64:
        sch.vectorize(sch.split(inner, [None, 16])[1])
    elif extent % 8 == 0:
        vectorize_row(sch, inner, 8)
    return sch.mod["main"]
