"""Exact integer Winograd F(2x2, 3x3) for 3x3 stride-1 convs on the int16 `vpmaddwd` path (x86 without VNNI,
8-bit weights), where every multiply is a `vpmaddwd` and the conv needs 36 of them per 2x2 outputs and input
channel pair; the transformed conv needs 16.

Per 4x4 input tile d (rows 2t .. 2t+3 of the padded input) and 3x3 filter g (Lavin and Gray, 2015):

    4 * Y = AT [(G2 g G2^T) . (BT d BT^T)] AT^T,    Y: the 2x2 outputs the direct conv sums

with G2 = 2 G so that every matrix is an integer one. Everything is exact in integers:
- the input transform V = BT d BT^T sums 4 inputs with signs: |V| <= 4 |x|max (1020 for u8), int16;
- the weight transform U = G2 g G2^T (offline) sums at most 9 weights: |U| <= 9 |w|max (1152), int16;
- M = sum over channels of V * U is a `vpmaddwd` accumulation in int32, |M| <= C * 4 |x|max * 9 |w|max;
- the output transform adds 9 of the M with signs in uint32 (wrapping: a partial sum may leave int32), and its
  result 4 Y is exact modulo 2^32; `winograd_applies` admits a conv only while C * 36 |x|max |w|max < 2^31,
  which bounds |M| and |4 Y| inside int32, so 4 Y read as int32 is exact and Y = (4 Y) >> 2.

A kernel computes, per task (image, 16 output channels, one row of tiles) and per block of `tiles` tiles: the
block's V (all input channels; recomputed for every channel block, it stays in cache where a whole V stage
would be 4x the input in memory), then for each of the 16 transformed positions the `tiles` int32x16
accumulators over the channels, then the outputs, at the tile, with the conv's epilogue.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import te

BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
G2 = np.array(((2, 0, 0), (1, 1, 1), (1, -1, 1), (0, 0, 2)))
AT = ((1, 1, 1, 0), (0, 1, -1, -1))
INT32_LIMIT = 1 << 31
MIN_SIZE = 4        # output rows and columns; a smaller map computes mostly padding


def winograd_applies(dot, x_dtype: str, channels: int, kernel: tuple, stride: tuple, dilation: tuple,
                     groups: int, out_size: tuple) -> bool:
    """Whether a conv takes this kernel: a 3x3 stride-1 conv on the int16 dot, with the channel count inside
    the bound above."""
    if dot is None or dot.in_dtype != "int16" or groups != 1 or min(out_size) < MIN_SIZE:
        return False
    if tuple(kernel) != (3, 3) or tuple(stride) != (1, 1) or tuple(dilation) != (1, 1):
        return False
    x_max = 255 if x_dtype == "uint8" else 128
    return channels * 36 * x_max * 128 < INT32_LIMIT


def tiles_per_block(tile_columns: int, most: int) -> int:
    """Tiles of one accumulator block: up to `most` (down to half that), the fewest past the row's end, then the
    widest."""
    if tile_columns <= most:
        return tile_columns
    return min(range(most, most // 2, -1), key=lambda t: (-(-tile_columns // t) * t - tile_columns, -t))


def transformed_weights(w16: np.ndarray) -> np.ndarray:
    """(O/16, C/b, 3, 3, b/2, 16, 2) int16 (the `vpmaddwd` layout) -> (O/16, C/b, 16, b/2, 16, 2) int16:
    U = G2 g G2^T at each of the 16 transformed positions xi * 4 + nu."""
    u = np.einsum("ai,bj,ocijmlk->ocabmlk", G2, G2, w16.astype(np.int64))
    o, c, _, _, m, lanes, k = u.shape
    return np.ascontiguousarray(u.reshape(o, c, 16, m, lanes, k)).astype(np.int16)


def _signed_sum(terms: list):
    total = None
    for coef, t in terms:
        if total is None:
            total = t if coef == 1 else tvm.tirx.const(0, t.dtype) - t
        else:
            total = total + t if coef == 1 else total - t
    return total


def _select(var, exprs: list):
    out = exprs[-1]
    for k in range(len(exprs) - 2, -1, -1):
        out = tvm.tirx.Select(var == k, exprs[k], out)
    return out


def conv_sum(src: te.Tensor, weight: te.Tensor, out_blocks: int, tile_rows: int, tile_cols: int) -> te.Tensor:
    """The conv's INT32 sums (N, O/16, 2 * tile_rows, 2 * tile_cols, 16) from the padded int16 input `src`
    (N, C/b, 2 * tile_rows + 2, 2 * tile_cols + 2, b) and the transformed weights (`transformed_weights`)."""
    N, Cb, _, _, ib = (int(v) for v in src.shape)

    def v_value(n, cb, th, tw, e, c):
        return _select(e, [_signed_sum([(BT[xi][i] * BT[nu][j], src[n, cb, 2 * th + i, 2 * tw + j, c])
                                        for i in range(4) for j in range(4) if BT[xi][i] * BT[nu][j]])
                           for xi in range(4) for nu in range(4)])
    v = te.compute((N, Cb, tile_rows, tile_cols, 16, ib), v_value, name="wino_v")
    cb = te.reduce_axis((0, Cb), "cb")
    cm = te.reduce_axis((0, ib // 2), "cm")
    ci = te.reduce_axis((0, 2), "ci")
    m = te.compute((N, out_blocks, tile_rows, tile_cols, 16, 16), lambda n, o, th, tw, e, oi: te.sum(
        v[n, cb, th, tw, e, cm * 2 + ci].astype("int32") * weight[o, cb, e, cm, oi, ci].astype("int32"),
        axis=[cb, cm, ci]), name="wino_m")
    wrapped = te.compute(m.shape, lambda *i: m(*i).astype("uint32"), name="wino_wrap")

    def y_value(n, o, h, w, oi):
        def position(a, b):
            return _signed_sum([(AT[a][xi] * AT[b][nu], wrapped[n, o, h // 2, w // 2, xi * 4 + nu, oi])
                                for xi in range(4) for nu in range(4) if AT[a][xi] * AT[b][nu]])
        four_y = tvm.tirx.Select(h % 2 == 0, tvm.tirx.Select(w % 2 == 0, position(0, 0), position(0, 1)),
                                 tvm.tirx.Select(w % 2 == 0, position(1, 0), position(1, 1)))
        return four_y.astype("int32") >> 2
    return te.compute((N, out_blocks, 2 * tile_rows, 2 * tile_cols, 16), y_value, name="acc")


def schedule_sum(sch, acc, tiles: int, weights_outer: bool, intrinsic: str) -> tuple:
    """Split the output stage `acc` into (one row of tiles) x (`tiles` tiles) blocks and compute the transforms
    and the accumulators at each block. Returns (outer loops to fuse into the parallel task, the block loop,
    a finish callback to run once the task loop is parallel)."""
    n, o, h, w, oi = sch.get_loops(acc)
    th, hi = sch.split(h, [None, 2])
    tb, wi = sch.split(w, [None, 2 * tiles])
    outer = [o, n, th] if weights_outer else [n, o, th]
    sch.reorder(*outer, tb, hi, wi, oi)
    wrap, m, v = sch.get_sblock("wino_wrap"), sch.get_sblock("wino_m"), sch.get_sblock("wino_v")
    channel_blocks = int(sch.get(sch.get_loops(m)[-3]).extent)       # before compute_at drops unit loops
    sch.set_scope(wrap, 0, "local")
    sch.set_scope(m, 0, "local")
    sch.compute_at(wrap, tb)
    wrap_loops = sch.get_loops(wrap)[-3 if tiles > 1 else -2:]       # a loop of extent 1 is not created
    sch.reorder(wrap_loops[-2], *wrap_loops[:-2], wrap_loops[-1])        # (transformed position, tiles, lanes)
    e_loop = wrap_loops[-2]
    sch.compute_at(m, e_loop)
    sch.compute_at(v, tb)

    def finish():
        # the accumulator's loops: (tiles,) lanes, (input channel blocks,) channel pairs, pair
        n_reduction = 3 if channel_blocks > 1 else 2
        loops = sch.get_loops(m)
        *m_tile, m_oi = loops[-n_reduction - (2 if tiles > 1 else 1):-n_reduction]
        reduction = loops[-n_reduction:]
        sch.reorder(*reduction[:-1], *m_tile, m_oi, reduction[-1])
        init = sch.decompose_reduction(m, reduction[0])
        sch.vectorize(sch.get_loops(init)[-1])
        sch.tensorize(m_oi, intrinsic)
        for loop in m_tile:
            sch.unroll(loop)
        v_loops = sch.get_loops(v)
        sch.unroll(v_loops[-2])
        sch.vectorize(v_loops[-1])
        sch.vectorize(sch.get_loops(wrap)[-1])
        sch.unroll(hi)
        sch.unroll(wi)
        sch.vectorize(oi)
    return outer, tb, finish
