"""conv2d -> elementwise steps -> max_pool2d -> elementwise steps (or a fan-out of requantizes), in one kernel.

A network's stem (ResNet: 7x7/2 conv, ReLU, 3x3/2 max pool) writes its widest map: 64 channels at 112x112,
INT32 in the program. As two kernels the conv writes it and the pool reads it back (25.7 MB at batch 8,
more than the caches hold). Fused, each parallel task computes the conv rows of one band of pool rows into
a band buffer that stays in cache, pools them and requantizes; only the pooled, narrow outputs are stored.
Neighbouring bands share one conv row (3x3/2 pool), which is computed twice: on the resnet stem a band is 7
pool rows and 15 conv rows (`band_plan`).

The conv is computed on an "extended" grid: extended row e is conv row e - pool_pad, so every pool window
reads extended rows r * stride + i * dilation with no clipping, and positions outside the conv's output
(the pool's padding, the tail of a ceil-mode window, the columns that round the width up to the register
tile) are set to the INT32 minimum when activated: padding never wins a max.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import s_tir, te

from hawq_ray.deploy import layout
from hawq_ray.deploy.epilogue import Value, epilogue, output_dtype
from hawq_ray.deploy.glue import pool_out_size
from hawq_ray.deploy.kernels import (MAX_ACC, TILE_COST, Kernel, check_channels, conv_dot, conv_operands,
                                     conv_out_size, finish_dot, fold_row_channels, merge_outputs, reduction_order,
                                     schedule_side_stages)
from hawq_ray.deploy.target import capabilities
from hawq_ray.contract import HawqError
from hawq_ray.program.program import Op

MAX_BAND = 16              # pool rows per parallel task, at most (unless the whole map fits BAND_BYTES)
BAND_BYTES = 2 * 1024 ** 2  # a band buffer (INT32 x 16 channels) as large as this stays in a core's L2


def _extent(n: int, k: int, s: int, d: int) -> int:
    """Extended rows (or columns) that n pool outputs of a (k, s, d) window read."""
    return (n - 1) * s + (k - 1) * d + 1


def _widths(pool_w: int, k: int, s: int, d: int, max_tw: int) -> list:
    """Candidate (padded pool width, extended width, tile columns): the extended width may be rounded up (by
    computing a few pool columns more) to one the tile divides, so no column tail is needed."""
    out = []
    for pw in range(pool_w, pool_w + 16):
        ew = _extent(pw, k, s, d)
        out += [(pw, ew, tw) for tw in range(1, min(max_tw, ew) + 1) if ew % tw == 0]
    return out


def fusable_max_pool(pool: Op) -> bool:
    """Whether `conv2d_max_pool_kernel` takes this pool: TensorIR's region analysis places a pool per band
    for strides >= 2, windows of at least 2x2 and no dilation (it fails on stride-1 and dilated windows, and
    on a unit window side, whose loop it drops; those stay separate kernels)."""
    k = tuple(pool.attrs["kernel"])
    stride = tuple(pool.attrs.get("stride", None) or k)
    return min(stride) >= 2 and min(k) >= 2 and tuple(pool.attrs.get("dilation", (1, 1))) == (1, 1)


def band_plan(pool_h: int, pool_w: int, kernel: tuple, stride: tuple, dilation: tuple, max_acc: int = MAX_ACC) -> dict:
    """Pool rows per task (band), the conv rows a band reads, padded widths and the register tile.

    A band of B pool rows reads R = extent(B) conv rows, of which extent(B) - B * stride are shared with the
    next band (computed twice). B divides the pool's height (TensorIR's region analysis needs the outputs'
    rows to split evenly into bands): a divisor up to MAX_BAND, or the whole height while its conv rows fit
    in BAND_BYTES. The tile's rows divide R. The plan minimizes (conv rows computed per pool row) x
    (extended width) x tile cost, with at most `max_acc` accumulators in the tile."""
    best = None
    for band in range(1, pool_h + 1):
        rows = _extent(band, kernel[0], stride[0], dilation[0])
        whole_map_fits = rows * _extent(pool_w, kernel[1], stride[1], dilation[1]) * 64 <= BAND_BYTES
        if pool_h % band or (band > MAX_BAND and not (band == pool_h and whole_map_fits)):
            continue
        for th in range(1, max(1, max_acc // 7) + 1):
            if rows % th:
                continue
            for pw, ew, tw in _widths(pool_w, kernel[1], stride[1], dilation[1], max(1, min(14, max_acc // th))):
                cost = rows / band * ew * (1 + TILE_COST / (th * tw))
                if best is None or cost < best[0]:
                    best = (cost, {"band": band, "rows": rows, "pool_w": pw, "ext_w": ew, "tile": (th, tw)})
    return best[1]


def conv2d_max_pool_kernel(op: Op, x: Value, steps: list, pool: Op, post: list, target, name: str,
                           fanout: list = ()) -> Kernel:
    """conv2d + bias, `steps` (channelwise elementwise ops, no add), max_pool2d `pool`, then `post` steps or
    (with `fanout`) one requantized output per fanout op."""
    N, C, H, W = check_channels(op, x)
    w = np.asarray(op.consts["weight"])
    O, _, KH, KW = w.shape
    cv = fold_row_channels(conv_operands(op, x, conv_dot(op, x, capabilities(target))), x)
    (sh, sw), (ph, pw), (dh, dw) = cv.stride, cv.padding, cv.dilation
    OH, OW = conv_out_size(H, KH, sh, ph, dh), conv_out_size(W, KW, sw, pw, dw)
    qk = tuple(pool.attrs["kernel"])
    qs = tuple(pool.attrs.get("stride", None) or qk)
    qp = tuple(pool.attrs.get("padding", (0, 0)))
    qd = tuple(pool.attrs.get("dilation", (1, 1)))
    if not fusable_max_pool(pool):
        raise HawqError(f"{pool.output}: a max pool fused after a conv needs stride >= 2, a window of at "
                        f"least 2x2 and dilation 1, not stride {qs}, window {qk} and dilation {qd}")
    ceil_mode = bool(pool.attrs.get("ceil_mode", False))
    PH, PW = (pool_out_size(OH, qk[0], qs[0], qp[0], qd[0], ceil_mode),
              pool_out_size(OW, qk[1], qs[1], qp[1], qd[1], ceil_mode))
    plan = band_plan(PH, PW, qk, qs, qd, cv.dot.max_acc if cv.dot else MAX_ACC)
    PWp, EW = plan["pool_w"], plan["ext_w"]
    bands = PH // plan["band"]
    EH = _extent(PH, qk[0], qs[0], qd[0])
    Ob = layout.ceil_to(O, 16) // 16

    conv_value = Value((N, O, OH, OW), "int32", 16)
    out_value = Value((N, O, PH, PW), output_dtype(post[-1] if post else pool), 16)
    out_values = [Value(out_value.shape, output_dtype(f), 16) for f in fanout] or [out_value]
    # extended row e reads input rows (e - qp) * sh - ph + kh * dh: pad the top by qp * sh + ph
    src, needs_pad = cv.source(x, qp[0] * sh + ph, qp[1] * sw + pw,
                               (EH - 1) * sh + (KH - 1) * dh + 1, (EW - 1) * sw + (KW - 1) * dw + 1)
    band, rows = plan["band"], plan["rows"]
    step = band * qs[0]            # extended rows between the first rows of two bands

    # band b, row i of the band: extended row b * step + i (the conv rows a band shares are computed twice)
    def extended(b, i):
        return b * step + i
    acc = cv.accumulate(src, (N, Ob, bands, rows, EW, 16), row=extended)
    pre = epilogue(steps, conv_value, [])
    floor = tvm.tirx.min_value("int32")

    def activated(n, o, b, i, f, oi):   # positions outside the conv's output never win the max
        e = extended(b, i)
        inside = te.all(e >= qp[0], e < OH + qp[0], f >= qp[1], f < OW + qp[1])
        return te.if_then_else(inside, pre.chain(acc[n, o, b, i, f, oi] + cv.bias[o, oi],
                                                 (n, o, e - qp[0], f - qp[1], oi)), floor)
    act = te.compute(acc.shape, activated, name="act")

    def window_max(n, o, b, rb, s, oi):
        taps = [act[n, o, b, rb * qs[0] + i * qd[0], s * qs[1] + j * qd[1], oi]
                for i in range(qk[0]) for j in range(qk[1])]
        best = taps[0]
        for v in taps[1:]:
            best = te.max(best, v)
        return best
    banded = te.compute((N, Ob, bands, band, PWp, 16), window_max, name="pool")

    def pooled(n, o, h, w, oi):
        return banded[n, o, h // band, h % band, w, oi]
    epi = epilogue(post, out_value, [], fanout)
    if fanout:
        def output(k):
            return lambda *i: epi.finish(k, epi.chain(pooled(*i), i), i)
        outs = [te.compute(out_value.storage_shape, output(k), name=f"out{k}") for k in range(len(fanout))]
    else:
        outs = [te.compute(out_value.storage_shape, lambda *i: epi.apply(pooled(*i), i), name="out")]
    func = te.create_prim_func([cv.data, cv.weight, cv.bias, *pre.const_tensors, *epi.const_tensors, *outs])
    caps = capabilities(target)
    if not caps.gpu:
        func = _schedule(func, plan, needs_pad, cv.w_bits <= 4, [o.op.name for o in outs], cv.dot,
                         cv.fold_period())
    return Kernel(name, func, [x], [*cv.consts, *pre.const_arrays, *epi.const_arrays], out_values,
                  {"path": caps.conv_path(False, cv.dot) + "+max_pool",
                   "w_bits": cv.w_bits, "layer": op.layer})


def _schedule(func, plan: dict, has_pad: bool, int4: bool, out_names: list, dot, fold_period: int = 0):
    """Parallel over (image, channel block, band of pool rows); in each task the conv rows of the band are
    accumulated tile by tile (the target's dot or generic, as `kernels.py`), activated into a band buffer, pooled and
    written out."""
    sch = s_tir.Schedule(func)
    acc = sch.get_sblock("acc")
    n, o, b, e, f, oi, ico, kh, kw, icm, ici = sch.get_loops(acc)
    th, tw = plan["tile"]
    eo, ei = sch.split(e, [None, th])
    fo, fi = sch.split(f, [None, tw])
    sch.reorder(n, o, b, eo, fo, ico, kh, kw, *reduction_order(sch, dot, icm, ici, [ei, fi], oi))
    sch.set_scope(acc, 0, "local")
    act = sch.get_sblock("act")
    sch.reverse_compute_at(act, fo)
    sch.vectorize(sch.get_loops(act)[-1])
    task = sch.fuse(n, o, b)
    sch.parallel(task)
    finish_dot(sch, acc, ico, oi, [ei, fi], dot)
    blocks = [sch.get_sblock(name) for name in ("pool", *out_names)]
    for blk in blocks:
        sch.reverse_compute_at(blk, task)
    for blk in [blocks[0], *merge_outputs(sch, blocks[1:])]:
        sch.vectorize(sch.get_loops(blk)[-1])
    schedule_side_stages(sch, has_pad, int4, fold_period)
    return sch.mod["main"]
