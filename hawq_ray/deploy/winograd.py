"""Exact integer Winograd convs F(m x m, 3 x 3) for 3x3 stride-1 convs on the int16 `vpmaddwd` path (x86 without
VNNI), where every multiply is a `vpmaddwd`: per m x m outputs and input channel pair the direct conv needs 9 m^2
of them, F(2x2, 3x3) 16 and F(4x4, 3x3) 36.

Per (m + 2) x (m + 2) input tile d (rows m t .. m t + m + 1 of the padded input) and 3x3 filter g (Lavin and
Gray, 2015), with G scaled by `g_scale` so that every matrix is an integer one:

    scale * Y = AT [(G g G^T) . (BT d BT^T)] AT^T,    scale = g_scale^2 = 2^shift * odd,

Y the m x m outputs the direct conv sums. Everything is exact in integers:
- the input transform V = BT d BT^T stays in int16 while |V| <= (max row of |BT|)^2 |x|max, which also bounds
  every partial sum of its 2-D or two 1-D passes;
- the weight transform U = G g G^T (offline) in int16 while |U| <= (max row of |G|)^2 |w|max: F(4x4, 3x3)
  needs weights of at most 6 bits (24^2 * 32), F(2x2, 3x3) takes 8-bit ones (2^2 * 128); a `vpmaddwd` pair
  sum of int16 operands that are not -32768 fits int32;
- M = sum over channels of V * U accumulates in uint32 and the output transform adds in uint32: both may wrap,
  and scale * Y comes out exact modulo 2^32. Multiplying by odd's inverse modulo 2^32 leaves 2^shift Y modulo
  2^32, read as int32 it is exact while |2^shift Y| < 2^31, and Y = (2^shift Y) >> shift. `choose` admits a
  conv only while 2^shift * C * 9 |x|max |w|max < 2^31, the bound of |2^shift Y|.

A kernel computes, per task (image, one row of tiles) and per block of `tiles` tiles, the block's V (all input
channels; in cache, where a whole V stage would be (n / m)^2 times the input in memory), then per 16 output
channels and transformed position the `tiles` int32x16 accumulators over the channels, then the outputs with
the conv's epilogue. Where the weights outweigh an image's input, a task is 16 output channels instead: their U,
computed in the kernel from the int8 weights, then every image and block, V recomputed for each task. Stored,
U would take n^2 * 2 bytes per weight pair (o, c) against 9: resnet18 with F(4x4, 3x3) carried 76 MB of
weights so. Smaller weights keep U stored (a module of small maps would pay a stage per call for it).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tvm
from tvm import te

from hawq_ray.deploy.x86dot import INT16_MAX, U8_MAX, pmaddwd_intrinsic, weight_range

INT32_LIMIT = 1 << 31
MIN_TILES = 2       # whole tiles across the output each way (but see `spans`)
V_BATCH_BYTES = 5 << 20


@dataclass(frozen=True)
class Transform:
    """F(m x m, 3 x 3) with integer matrices: BT (n x n, n = m + 2), G (n x 3, scaled by g_scale), AT (m x n)."""
    m: int
    bt: tuple
    g: tuple
    at: tuple
    g_scale: int

    @property
    def n(self) -> int:
        return self.m + 2

    @property
    def shift(self) -> int:        # scale = g_scale^2 = 2^shift * odd
        scale = self.g_scale ** 2
        return (scale & -scale).bit_length() - 1

    @property
    def odd(self) -> int:
        return self.g_scale ** 2 >> self.shift

    def v_max(self, x_max: int) -> int:
        return int(np.abs(np.array(self.bt)).sum(axis=1).max()) ** 2 * x_max

    @property
    def separable_input(self) -> bool:
        """V in two 1-D passes (through a stage of their own) where that takes fewer adds than one 2-D pass:
        F(4x4, 3x3), whose BT rows have 3 or 4 terms; F(2x2, 3x3) with 2 terms was 10% slower so."""
        return max(sum(1 for c in row if c) for row in self.bt) > 2

    def u_max(self, w_max: int) -> int:
        return int(np.abs(np.array(self.g)).sum(axis=1).max()) ** 2 * w_max


F2 = Transform(2, ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)),
               ((2, 0, 0), (1, 1, 1), (1, -1, 1), (0, 0, 2)), ((1, 1, 1, 0), (0, 1, -1, -1)), 2)
F4 = Transform(4, ((4, 0, -5, 0, 1, 0), (0, -4, -4, 1, 1, 0), (0, 4, -4, -1, 1, 0), (0, -2, -1, 2, 1, 0),
                   (0, 2, -1, -2, 1, 0), (0, 4, 0, -5, 0, 1)),
               ((6, 0, 0), (-4, -4, -4), (-4, 4, -4), (1, 2, 4), (1, -2, 4), (0, 0, 24)),
               ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1)), 24)


def fits(t: Transform, x_dtype: str, w_bits: int, channels: int) -> bool:
    """Whether `t` is exact for these operands (the bounds above)."""
    x_max = U8_MAX if x_dtype == "uint8" else 128
    w_max = -weight_range(w_bits)[0]
    return t.v_max(x_max) <= INT16_MAX and t.u_max(w_max) <= INT16_MAX and \
        (channels * 9 * x_max * w_max) << t.shift < INT32_LIMIT


def spans(t: Transform, out_size: tuple, caps, v_once: bool = False) -> bool:
    """Whether the output is at least `MIN_TILES` whole tiles across each way; for F(4x4, 3x3) a 7x7 map will
    do (2x2 tiles, 31% of their outputs past the map's end) on 256-bit registers, or where V is computed once
    for the batch (`v_once`). Measured at batch 8 with 4-bit weights on 512 channels at 7x7 (2026-12-07): 3.59
    against 4.28 ms for the direct conv for haswell, 2.98 against 2.84 for skylake-avx512, whose direct kernel
    holds 24 accumulators; with V once for the batch (2026-12-08) 4.96 against 6.10 ms for skylake-avx512 and
    4.32 against 5.03 with VNNI (a slow phase)."""
    least = MIN_TILES * t.m - (t is F4 and (not caps.avx512bw or v_once))
    return min(out_size) >= least


def v_once(t: Transform, weights_outer: bool, out_size: tuple, channels: int, images: int) -> bool:
    """Whether a conv whose weights outweigh its input computes V once for the whole batch
    (`_schedule_by_position`): while that V takes at most `V_BATCH_BYTES`. Measured for haswell at batch 8
    (2026-12-08, interleaved, against V recomputed per 16 output channels): F(4x4) 0.70-0.86x the time on 256
    channels at 14x14 (V 2.4 MB), 512 at 7x7 (1.2 MB) and 512 at 14x14 (4.7 MB), F(2x2) 0.90-0.95x on 256 at 14x14
    and 512 at 7x7; but 1.2-1.6x on 256 channels at 28x28 (V 7.2 MB for F(4x4), 12.8 MB for F(2x2)), also with
    the batch split into tasks of 1 to 4 images, each recomputing U."""
    rows, cols = (-(-s // t.m) for s in out_size)
    return weights_outer and images * rows * cols * t.n ** 2 * channels * 2 <= V_BATCH_BYTES


def choose(caps, dot, x_dtype: str, w_bits: int, channels: int, kernel: tuple, stride: tuple, dilation: tuple,
           groups: int, out_size: tuple, weights_outer: bool, images: int) -> Transform | None:
    """The transform of a 3x3 stride-1 conv on an x86 target without AMX (None: the direct kernel): F(4x4, 3x3)
    where its bounds hold, else F(2x2, 3x3) where the direct conv is on `vpmaddwd` (`dot`: 8-bit weights without
    VNNI; narrower ones are as fast direct on `vpmaddubsw`). With VNNI, whose direct conv multiplies 4 byte pairs
    per lane, F(4x4, 3x3) only where V is computed once for every channel block: measured at batch 8 with 4-bit
    weights (2026-12-07), resnet18's 64 and 128-channel convs took 0.66x and 0.60x the time of the direct VNNI
    kernel, its 256 and 512-channel ones 1.09x and 2.1x where each 16 output channels recomputed V, 0.86x and
    0.86x with V once for the batch (2026-12-08, `v_once`)."""
    if caps.gpu or caps.amx or not (caps.avx2 or caps.avx512bw) or x_dtype not in ("uint8", "int8"):
        return None
    if groups != 1:
        return None
    if tuple(kernel) != (3, 3) or tuple(stride) != (1, 1) or tuple(dilation) != (1, 1):
        return None
    once = v_once(F4, weights_outer, out_size, channels, images)
    if spans(F4, out_size, caps, once) and fits(F4, x_dtype, w_bits, channels) and \
            not (caps.vnni and weights_outer and not once):
        return F4
    if not caps.vnni and dot is not None and dot.in_dtype == "int16" and spans(F2, out_size, caps) and \
            fits(F2, x_dtype, w_bits, channels):
        return F2
    return None


@dataclass(frozen=True)
class TilePlan:
    """The tiling of one Winograd conv: `tiles` tiles per block, the tile grid and the output it covers."""
    transform: Transform
    tiles: int
    tile_rows: int
    tile_cols: int          # a whole number of blocks
    stack: tuple = ()       # where V is computed once for the batch: (images, rows of tiles) per block

    @property
    def out_size(self) -> tuple:
        return self.transform.m * self.tile_rows, self.transform.m * self.tile_cols

    @property
    def in_size(self) -> tuple:
        return tuple(s + 2 for s in self.out_size)


def plan(t: Transform, out_size: tuple, most_tiles: int, images: int = 0) -> TilePlan:
    """With `images` (the batch, where V is computed once for it: `_schedule_by_position`) a block stacks rows of
    tiles and images (divisors of theirs) while it holds at most `most_tiles` tiles."""
    rows, cols = (-(-s // t.m) for s in out_size)
    tiles = tiles_per_block(cols, most_tiles)
    cols = -(-cols // tiles) * tiles
    if not images:
        return TilePlan(t, tiles, rows, cols)
    stack_rows = max(d for d in range(1, rows + 1) if rows % d == 0 and d * tiles <= most_tiles)
    stack_images = max(d for d in range(1, images + 1) if images % d == 0 and d * stack_rows * tiles <= most_tiles)
    return TilePlan(t, tiles, rows, cols, (stack_images, stack_rows))


def tiles_per_block(tile_columns: int, most: int) -> int:
    """Tiles of one accumulator block: up to `most` (down to half that), the fewest past the row's end, then the
    widest."""
    if tile_columns <= most:
        return tile_columns
    return min(range(most, most // 2, -1), key=lambda t: (-(-tile_columns // t) * t - tile_columns, -t))


def transformed_weights(w: np.ndarray, t: Transform) -> np.ndarray:
    """`weight_transform` at build time, for a module that stores U: (O/16, C/b, 3, 3, b/2, 16, 2) ->
    (O/16, n^2, C/b, b/2, 16, 2) int16."""
    g = np.array(t.g)
    u = np.einsum("ai,bj,ocijmlk->oabcmlk", g, g, w.astype(np.int64))
    o, _, _, c, pairs, lanes, k = u.shape
    return np.ascontiguousarray(u.reshape(o, t.n ** 2, c, pairs, lanes, k)).astype(np.int16)


def weight_transform(w: te.Tensor, t: Transform) -> te.Tensor:
    """U = G g G^T (O/16, n^2, C/b, b/2, 16, 2) int16 from the weights (O/16, C/b, 3, 3, b/2, 16, 2) int8 (the
    `vpmaddwd` pair layout): along the filter's rows, then its columns, every partial sum within u_max. One
    transformed position's weights for all input channels are contiguous, as the accumulators read them: with
    C/b outside n^2 instead, for haswell at batch 8 with 4-bit weights (2026-12-07), F(4x4, 3x3) convs took 1.22x
    the time on 512 channels at 7x7, 1.10x on 256 at 14x14 and 1.12x on 128 at 28x28 (the same on 64 at 56x56)."""
    n = t.n
    o_blocks, cb, _, _, pairs, lanes, k = (int(v) for v in w.shape)
    rows = te.compute((o_blocks, cb, pairs, n, 3, lanes, k), lambda o, c, cm, a, j, oi, ci: _select(a, [
        _linear([(t.g[r][i], w[o, c, i, j, cm, oi, ci].astype("int16")) for i in range(3)], "int16")
        for r in range(n)]), name="wino_uh")
    return te.compute((o_blocks, n * n, cb, pairs, lanes, k), lambda o, e, c, cm, oi, ci: _select(e % n, [
        _linear([(t.g[r][j], rows[o, c, cm, e // n, j, oi, ci]) for j in range(3)], "int16")
        for r in range(n)]), name="wino_u")


def _linear(terms: list, dtype: str):
    """sum of coef * expr over (coef, expr), multiplying only by coefficients other than +-1."""
    total = None
    for coef, expr in terms:
        if coef == 0:
            continue
        mag = expr if abs(coef) == 1 else expr * tvm.tirx.const(abs(coef), dtype)
        if total is None:
            total = mag if coef > 0 else tvm.tirx.const(0, dtype) - mag
        else:
            total = total + mag if coef > 0 else total - mag
    return total


def _select(var, exprs: list):
    out = exprs[-1]
    for k in range(len(exprs) - 2, -1, -1):
        out = tvm.tirx.Select(var == k, exprs[k], out)
    return out


def conv_sum(src: te.Tensor, weight: te.Tensor, out_blocks: int, p: TilePlan, v_outer: bool = False) -> te.Tensor:
    """The conv's INT32 sums (N, O/16, m * tile_rows, m * tile_cols, 16) from the padded int16 input `src`
    (N, C/b, m * tile_rows + 2, m * tile_cols + 2, b) and the transformed weights (`weight_transform`)."""
    t, m, n = p.transform, p.transform.m, p.transform.n
    N, Cb, _, _, ib = (int(v) for v in src.shape)
    rows, cols = p.tile_rows, p.tile_cols
    # V = BT d BT^T
    if not t.separable_input:
        def v_value(b, cb, th, tw, e, c):
            return _select(e, [_linear([(t.bt[a][i] * t.bt[a2][j], src[b, cb, m * th + i, m * tw + j, c])
                                        for i in range(n) for j in range(n)], "int16")
                               for a in range(n) for a2 in range(n)])
    else:       # along the tile's rows, then along its columns
        half = te.compute((N, Cb, rows, cols, n, n, ib), lambda b, cb, th, tw, xi, j, c: _select(xi, [
            _linear([(t.bt[a][i], src[b, cb, m * th + i, m * tw + j, c]) for i in range(n)], "int16")
            for a in range(n)]), name="wino_vh")

        def v_value(b, cb, th, tw, e, c):
            return _select(e % n, [_linear([(t.bt[a][j], half[b, cb, th, tw, e // n, j, c]) for j in range(n)],
                                           "int16") for a in range(n)])
    if v_outer:     # position-major, each position's channels contiguous per tile (`schedule_sum`)
        v = te.compute((n * n, N, rows, cols, Cb, ib), lambda e, b, th, tw, cb, c: v_value(b, cb, th, tw, e, c),
                       name="wino_v")
    else:
        v = te.compute((N, Cb, rows, cols, n * n, ib), v_value, name="wino_v")

    def v_at(b, cb, th, tw, e, c):
        return v[e, b, th, tw, cb, c] if v_outer else v[b, cb, th, tw, e, c]
    cb = te.reduce_axis((0, Cb), "cb")
    cm = te.reduce_axis((0, ib // 2), "cm")
    ci = te.reduce_axis((0, 2), "ci")
    acc = te.compute((N, out_blocks, rows, cols, n * n, 16), lambda b, o, th, tw, e, oi: te.sum(
        (v_at(b, cb, th, tw, e, cm * 2 + ci).astype("int32") * weight[o, e, cb, cm, oi, ci].astype("int32"))
        .astype("uint32"), axis=[cb, cm, ci]), name="wino_m")
    sums = te.compute(acc.shape, lambda *i: acc(*i), name="wino_sums")     # M of one position, then of all
    # scale * Y = AT M AT^T in uint32: first along the transformed rows, then along the columns
    out_half = te.compute((N, out_blocks, rows, cols, m, n, 16), lambda b, o, th, tw, a, nu, oi: _select(a, [
        _linear([(t.at[r][xi], sums[b, o, th, tw, xi * n + nu, oi]) for xi in range(n)], "uint32")
        for r in range(m)]), name="wino_yh")

    def y_value(b, o, h, w, oi):
        scaled = _select(w % m, [_linear([(t.at[r][nu], out_half[b, o, h // m, w // m, h % m, nu, oi])
                                          for nu in range(n)], "uint32") for r in range(m)])
        if t.odd != 1:
            scaled = scaled * tvm.tirx.const(pow(t.odd, -1, 1 << 32), "uint32")
        return scaled.astype("int32") >> t.shift
    return te.compute((N, out_blocks, m * rows, m * cols, 16), y_value, name="acc")


def schedule_sum(sch, acc, p: TilePlan, weights_outer: bool, bits: int) -> tuple:
    """Split the output stage `acc` into (one row of tiles) x (`tiles` tiles) blocks, compute V at each block
    and the accumulators and output transform at each (block, 16 output channels). Returns (outer loops to fuse
    into the parallel task, the loop the epilogue goes under, a finish callback to run once the task loop is
    parallel). Measured for haswell at batch 8 (2026-12-07): V once per block for all channel blocks took
    0.83-0.85x the time of V per channel block on resnet18's 64- and 128-channel convs with 4-bit weights."""
    m, tiles = p.transform.m, p.tiles
    b, o, h, w, oi = sch.get_loops(acc)
    th, hi = sch.split(h, [None, m])
    tb, wi = sch.split(w, [None, m * tiles])
    if p.stack:
        sch.reorder(o, b, th, tb, hi, wi, oi)
        return _schedule_by_position(sch, p, o, tb, hi, wi, oi, bits)
    if weights_outer:       # U of the task's 16 output channels, then every image and block; V per block
        outer, block_loop = [o], tb
        sch.reorder(o, b, th, tb, hi, wi, oi)
    else:                   # V once per block of tiles, then every channel block
        outer, block_loop = [b, th], o
        sch.reorder(*outer, tb, o, hi, wi, oi)
    out_half, sums = sch.get_sblock("wino_yh"), sch.get_sblock("wino_sums")
    mstage, v = sch.get_sblock("wino_m"), sch.get_sblock("wino_v")
    vh = sch.get_sblock("wino_vh") if p.transform.separable_input else None
    channel_blocks = int(sch.get(sch.get_loops(mstage)[-3]).extent)       # before compute_at drops unit loops
    for block in (out_half, sums, mstage):
        sch.set_scope(block, 0, "local")
    sch.compute_at(out_half, block_loop)
    sch.compute_at(sums, block_loop)
    tile_loops = int(tiles > 1)                                      # a loop of extent 1 is not created
    sum_loops = sch.get_loops(sums)[-2 - tile_loops:]
    sch.reorder(sum_loops[-2], *sum_loops[:-2], sum_loops[-1])        # (transformed position, tiles, lanes)
    sch.compute_at(mstage, sum_loops[-2])
    if weights_outer:
        schedule_weights(sch, o)
    sch.compute_at(v, tb)
    if vh is not None:
        sch.compute_at(vh, tb)

    def finish():
        _winograd_finish(sch, mstage, sum_loops[-2], channel_blocks, (v, vh, sums, out_half), (hi, wi, oi),
                         bits)
    return outer, block_loop, finish


def _schedule_by_position(sch, p: TilePlan, task, tb, hi, wi, oi, bits: int) -> tuple:
    """Where the weights outweigh the input: V once for the batch (a parallel stage, position-major), then per
    task (16 output channels) U, then per transformed position the accumulators of every block of tiles
    (`p.stack` images x rows of tiles x `p.tiles` tiles) over the channels into the task's M (the position's U
    stays in L1 while every tile of the task reads it), then per block the output transform and the epilogue.
    Per task, V is read once (where it was recomputed per block with U read from L2 for every block, two tiles
    of a 7x7 map per U load: `v_once`)."""
    out_half, sums = sch.get_sblock("wino_yh"), sch.get_sblock("wino_sums")
    mstage, v = sch.get_sblock("wino_m"), sch.get_sblock("wino_v")
    vh = sch.get_sblock("wino_vh") if p.transform.separable_input else None
    channel_blocks = int(sch.get(sch.get_loops(mstage)[-3]).extent)
    sch.set_scope(out_half, 0, "local")
    sch.set_scope(mstage, 0, "local")
    sch.compute_at(out_half, tb)
    sch.compute_at(sums, task)
    below = loops_below(sch, sums, task)       # (images,) rows and columns of tiles, positions, lanes
    *b, th, tw, e, soi = below
    images, rows = p.stack
    b_o, b_i = sch.split(b[0], [None, images]) if b else (None, None)
    th_o, th_i = sch.split(th, [None, rows])
    tw_o, tw_i = sch.split(tw, [None, p.tiles])
    sch.reorder(e, *(x for x in (b_o, th_o, tw_o, b_i, th_i, tw_i) if x is not None), soi)
    sch.compute_at(mstage, tw_o)
    schedule_weights(sch, task)
    ve, vb, vth, vtw, vcb, vc = sch.get_loops(v)
    sch.reorder(vb, vth, vtw, vcb, ve, vc)
    if vh is not None:
        sch.compute_at(vh, vcb)
    sch.parallel(sch.fuse(vb, vth))

    def finish():
        _winograd_finish(sch, mstage, tw_o, channel_blocks, (v, vh, sums, out_half), (hi, wi, oi), bits)
    return [task], tb, finish


def _winograd_finish(sch, mstage, anchor, channel_blocks: int, stages: tuple, output_loops: tuple,
                     bits: int) -> None:
    """Once the task loop is parallel: the accumulators (`mstage`, computed at `anchor`) tensorized, their tile
    loops unrolled; V's and the output transform's passes unrolled along the positions (where `_select` folds)
    and vectorized along the lanes; the output tile (`output_loops`: rows, columns, lanes) unrolled."""
    v, vh, sums, out_half = stages
    n_reduction = 3 if channel_blocks > 1 else 2    # (input channel blocks,) channel pairs, pair
    *m_tile, m_oi = loops_below(sch, mstage, anchor)[:-n_reduction]
    reduction = sch.get_loops(mstage)[-n_reduction:]
    sch.reorder(*reduction[:-1], *m_tile, m_oi, reduction[-1])
    init = sch.decompose_reduction(mstage, reduction[0])
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(m_oi, pmaddwd_intrinsic(bits, "uint32"))
    for loop in m_tile:
        sch.unroll(loop)
    for block, unrolled in ((v, 1), (vh, 2)):
        if block is None:
            continue
        if unrolled == 2:
            column_major(sch, block)
        loops = sch.get_loops(block)
        for loop in loops[-1 - unrolled:-1]:
            sch.unroll(loop)
        sch.vectorize(loops[-1])
    sch.vectorize(sch.get_loops(sums)[-1])
    column_major(sch, out_half)
    yh_loops = sch.get_loops(out_half)
    sch.unroll(yh_loops[-3])
    sch.unroll(yh_loops[-2])
    sch.vectorize(yh_loops[-1])
    hi, wi, oi = output_loops
    sch.unroll(hi)
    sch.unroll(wi)
    sch.vectorize(oi)


def loops_below(sch, block, loop) -> list:
    """The loops of `block` inside `loop` (compute_at creates none for a unit extent, so count them here; none
    where a stage of one element per iteration lost its unit loops)."""
    loops = sch.get_loops(block)
    at = next((k for k, lp in enumerate(loops) if sch.get(lp).same_as(sch.get(loop))), None)
    return [] if at is None else loops[at + 1:]


def schedule_weights(sch, task) -> None:
    """U (`weight_transform`) under `task` (a loop over 16 output channels), per (input channel block, channel
    pair): the pass along the filter's rows, then U's positions, both unrolled (where `_select` folds), 16 x 2
    lanes a vector."""
    u, rows = sch.get_sblock("wino_u"), sch.get_sblock("wino_uh")
    sch.compute_at(u, task)
    e, *c, cm, oi, ci = loops_below(sch, u, task)   # no input channel block loop where there is one block
    sch.reorder(*c, cm, e)
    sch.unroll(e)
    sch.vectorize(sch.fuse(oi, ci))
    sch.compute_at(rows, cm)
    a, j, oi, ci = sch.get_loops(rows)[-4:]
    sch.unroll(a)
    sch.unroll(j)
    sch.vectorize(sch.fuse(oi, ci))


def column_major(sch, block) -> None:
    """Swap a 1-D transform pass's (output row, column) loops, so that each column's n loads feed that column's
    outputs back to back. Unrolled row by row, LLVM keeps all n^2 loaded vectors live across the rows and
    spills them: for haswell (2026-12-07, batch 8, 4-bit weights) column order took F(4x4, 3x3) convs from 2.22
    to 1.99 ms (64 channels at 56x56), 2.36 to 2.31 (128 at 28x28) and 3.27 to 3.14 (256 at 14x14); F(2x2, 3x3)
    did not change."""
    *_, row, column, _ = sch.get_loops(block)
    sch.reorder(column, row)
