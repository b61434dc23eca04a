"""Depthwise conv2d (one input channel per output channel: MobileNet's and EfficientNet's 3x3 and 5x5 layers)
as a vectorized multiply-add kernel, with the elementwise steps after it computed on the same vector.

VNNI's `vpdpbusd` reduces four input channels into one output lane; a depthwise output reads one channel, so
its reduction (the kh x kw window) would have to be transposed into the lanes first. Here each of the 16 lanes
of a channel block is one channel: an output vector is the window's sum of input x weight, widened to INT32,
written out tap by tap (no reduction loop, so TensorIR vectorizes it), then the epilogue. Each parallel task
computes one band of output rows of one channel block and pads the input rows that band reads into a buffer of
its own (the whole padded map is never stored); the band's rows and columns are unrolled in tiles. 4-bit
weights are kept one per byte: a depthwise layer holds kh x kw bytes per channel, too few for packing to pay for
its unpacking.

Narrow weights make the window cheaper: `x86dot.int16_terms` derives from the input's and the weights' ranges how
many products can be summed in int16 whatever their values (16 for u8 inputs and 4-bit weights, 31 for int8
inputs), so the taps are summed in chunks of that many in int16 (16 lanes a 256-bit vector: `vpmullw`,
`vpaddw`) and each chunk is widened once. 8-bit weights allow one product, so their window is summed in int32.
For haswell, MobileNet V2's eight depthwise shapes at batch 8 took 8.9 ms with 8-bit weights and 5.7 ms with
4-bit ones.
"""
from __future__ import annotations

import functools
import operator

import numpy as np
import tvm
from tvm import s_tir, te

from hawq_ray.deploy import layout
from hawq_ray.deploy.epilogue import Value, epilogue, schedule_output
from hawq_ray.deploy.x86dot import int16_terms, weight_range

LANES = layout.OC_BLOCK     # channels per vector: the activations' block
MAX_UNROLL = 24             # output vectors per unrolled tile
MAX_TILE_W = 8


def applies(op, x: Value) -> bool:
    """A depthwise conv (groups = input channels = output channels) on 16-channel blocks."""
    w = np.shape(op.consts["weight"])
    return op.attrs.get("groups", 1) == x.shape[1] == w[0] and w[1] == 1 and x.block == LANES


def _band_tile(height: int, width: int) -> tuple:
    """(rows, columns) of a tile: the largest divisors of the output's width (up to MAX_TILE_W) and height (up
    to MAX_UNROLL vectors in all), so tiles cover the map with no tail."""
    tw = max(t for t in range(1, MAX_TILE_W + 1) if width % t == 0)
    th = max(t for t in range(1, max(1, MAX_UNROLL // tw) + 1) if height % t == 0)
    return th, tw


def pack_weight(w: np.ndarray) -> np.ndarray:
    """(C, 1, kh, kw) -> (C/16, kh, kw, 16) int8, channels padded with zeros."""
    c, _, kh, kw = w.shape
    cp = layout.ceil_to(c, LANES)
    out = np.zeros((cp, kh, kw), np.int8)
    out[:c] = w[:, 0]
    return np.ascontiguousarray(out.reshape(cp // LANES, LANES, kh, kw).transpose(0, 2, 3, 1))


def depthwise_kernel(op, x: Value, steps: list, extras: list, out_value: Value, bias: np.ndarray,
                     byte_table: bool = False, lanes: bool = False):
    """(scheduled func, its constants) of the depthwise conv `op` on `x` followed by `steps`; `bias` is the
    INT32 bias per channel; `byte_table`: the target reads a lookup's table with `bytelut`; `lanes`: a first
    requantize 16 lanes at a time (`lanerequant`)."""
    w = np.asarray(op.consts["weight"])
    C, _, KH, KW = w.shape
    sh, sw = op.attrs.get("stride", (1, 1))
    ph, pw = op.attrs.get("padding", (0, 0))
    dh, dw = op.attrs.get("dilation", (1, 1))
    N, _, H, W = x.shape
    _, _, OH, OW = out_value.shape
    th, tw = _band_tile(OH, OW)
    Cb = x.storage_shape[1]
    w_arr, b_arr = pack_weight(w), layout.pack_channel_vector(bias, C)
    data = te.placeholder(x.storage_shape, x.dtype, name="data")
    w_ph = te.placeholder(w_arr.shape, "int8", name="weight")
    b_ph = te.placeholder(b_arr.shape, "int32", name="bias")

    def padded(n, c, h, ww, i):
        inside = te.all(h >= ph, h < H + ph, ww >= pw, ww < W + pw)
        return te.if_then_else(inside, data[n, c, h - ph, ww - pw, i], tvm.tirx.const(0, x.dtype))
    pad = te.compute((N, Cb, (OH - 1) * sh + dh * (KH - 1) + 1, (OW - 1) * sw + dw * (KW - 1) + 1, LANES),
                     padded, name="pad")
    taps = [(kh, kw) for kh in range(KH) for kw in range(KW)]

    info = np.iinfo(x.dtype)
    per_int16 = int16_terms(int(info.min), int(info.max), *weight_range(int(op.attrs.get("w_bits", 8))))
    chunks = [taps[k:k + per_int16] for k in range(0, len(taps), per_int16)] if per_int16 >= 2 else None

    def product(n, c, h, ww, i, kh, kw, dtype):
        return pad[n, c, h * sh + kh * dh, ww * sw + kw * dw, i].astype(dtype) * w_ph[c, kh, kw, i].astype(dtype)

    def window(n, c, h, ww, i):   # the sum written out over the window: a spatial block, vectorized over i
        if chunks:   # narrow weights: each chunk of taps summed in int16 (16 lanes a vector), then widened
            return sum((functools.reduce(operator.add, (product(n, c, h, ww, i, kh, kw, "int16") for kh, kw in chunk))
                        .astype("int32") for chunk in chunks), b_ph[c, i])
        return sum((product(n, c, h, ww, i, kh, kw, "int32") for kh, kw in taps), b_ph[c, i])
    # its own stage: read by the epilogue's int64 requantize, it stays an int32 (one vpmuldq per 8 lanes)
    # instead of a sum of int64 terms
    acc = te.compute(out_value.storage_shape, window, name="acc")
    epi = epilogue(steps, out_value, extras, byte_table=byte_table, lanes=lanes)
    stages = epi.output_stages(out_value.storage_shape, lambda n, c, h, ww, i: acc[n, c, h, ww, i])
    func = te.create_prim_func([data, *epi.extra_tensors, w_ph, b_ph, *epi.const_tensors, stages[-1]])
    table_dtype = str(epi.byte_table.dtype) if epi.byte_table is not None else None
    return _schedule_depthwise(func, th, tw, epi.block_names, table_dtype), [w_arr, b_arr, *epi.const_arrays]


TILE_SCOPE = "global"


def _schedule_depthwise(func, th: int, tw: int, out_names: list, table_dtype: str | None = None):
    """Parallel over (image, channel block, band of th rows); per band the padded rows into a local buffer,
    then tiles of th rows x tw columns, unrolled, 16 lanes at a time, and the epilogue after each tile."""
    sch = s_tir.Schedule(func)
    acc, pad = sch.get_sblock("acc"), sch.get_sblock("pad")
    tail = [sch.get_sblock(nm) for nm in out_names]
    n, c, h, w, i = sch.get_loops(acc)
    ho, hi = sch.split(h, [None, th])
    wo, wi = sch.split(w, [None, tw])
    sch.reorder(n, c, ho, wo, hi, wi, i)
    # a "local" buffer is allocated per parallel task through TVMBackendAllocWorkspace, a "global" one of
    # under 1 KB on the stack (the tile's 16-lane sums are not tensorized, so they need no scope of their own):
    # 0.6-0.8x the time of a 7x7 to 56x56 depthwise kernel at batch 8
    sch.set_scope(acc, 0, TILE_SCOPE)
    for block in tail:
        sch.reverse_compute_at(block, wo)
    band = sch.fuse(n, c, ho)
    sch.parallel(band)
    sch.compute_at(pad, band)
    sch.vectorize(sch.get_loops(pad)[-1])
    sch.vectorize(i)
    sch.unroll(hi)
    sch.unroll(wi)
    schedule_output(sch, tail, table_dtype, TILE_SCOPE)
    return sch.mod["main"]
