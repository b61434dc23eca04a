"""Per-layer TVM kernels: conv2d and dense with int8 or packed-int4 weights, INT32 accumulation and bias, and
the elementwise ops that follow them (dyadic requantize, ReLU clamp, residual add) fused at the output tile.

A kernel is one scheduled TIR function: `kernel(inputs..., consts..., out)`. The whole-model build
(`graph.py`) calls these very functions, and a profiler can build and time one alone (`build_layer_kernel`,
`time_kernel`), so per-layer latencies add up to the model's.

Two schedules share one computation: on x86 the reduction is tensorized with the target's exact dot product
(`x86dot.DotPath`): AVX512-VNNI `vpdpbusd` (u8 x s8 -> s32; a signed int8 input is shifted by +128 and
`-128 * sum(W)` folded into the bias, padding with 128 so the shift is exact everywhere), or without VNNI
`vpmaddubsw` with int16 partial sums (narrow weights, the same shift) or `vpmaddwd` on int16 (8-bit weights),
with a (rows x columns x 2 x 16 channel) register tile sized to the ISA's registers and the epilogue computed at
the tile (a 3x3 stride-1 conv runs as an exact integer Winograd conv, `winograd.py`, on `vpmaddwd`: F(2x2, 3x3)
for 8-bit weights, 16 multiplies per 2x2 outputs where the direct conv needs 36, F(4x4, 3x3) for weights of at
most 6 bits, 36 per 4x4 outputs); anywhere else a generic vectorized schedule
(and, for CUDA, a default GPU schedule at build time).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import s_tir, te

from hawq_ray.contract import HawqError
from hawq_ray.deploy import amx, depthwise, layout, winograd
from hawq_ray.deploy.epilogue import LUT_INDEX, Value, epilogue, output_dtype, schedule_output
from hawq_ray.deploy.target import capabilities
from hawq_ray.deploy.x86dot import VNNI, DotPath, choose_dot, widen_pairs
from hawq_ray.program.program import Op


@dataclass
class Kernel:
    """One compiled-to-be kernel: func(inputs..., consts..., outs...)."""
    name: str
    func: tvm.tirx.PrimFunc
    inputs: list            # Value of each activation input
    consts: list            # packed numpy constants, in argument order after the inputs
    outputs: list           # Value of each output (usually one)
    notes: dict = field(default_factory=dict)   # e.g. {"path": "vnni"}

    @property
    def output(self) -> Value:
        return self.outputs[0]


def kernel_name(op: Op) -> str:
    """`<op>_<layer or value>`, letters and digits only: the kernel's name in the compiled module."""
    base = op.layer or op.output
    return f"{op.op}_" + "".join(ch if ch.isalnum() else "_" for ch in str(base))


def conv_out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


MAX_ACC = 28   # int32x16 accumulators of a register tile (of 32 zmm registers)
TILE_COST = 12.0   # a register tile of A accumulators costs about (1 + TILE_COST / A) per MAC (measured on
                   # the resnet18 stem: 13 accumulators 3.7 ms, 27 accumulators 2.9 ms)


OC_PAIR = 2    # output channel blocks of a VNNI register tile: each broadcast input feeds two weight vectors
               # (resnet18 / resnet50 / mobilenet_v2 at batch 8, A/B in one process: 5% / 6.7% / 5.5% faster
               # than one block of twice the pixels; four blocks, at most 24 accumulators: 2%)


def _tile(height: int, width: int, blocks: int = 1, max_acc: int = MAX_ACC) -> tuple:
    """Register tile (rows, columns) of the output for `blocks` channel blocks: up to 14 columns (fewer where
    `max_acc` accumulators cannot hold 14 per block; down to half that) with the fewest wasted, then the widest;
    then the rows (as many as fit `max_acc` accumulators) that minimize rows computed x tile cost: weights are
    loaded once per tile, so taller is cheaper, but rows past the map's end are computed for nothing."""
    most = max(1, min(14, max_acc // blocks))
    tw = width if width <= most else min(range(most, most // 2, -1), key=lambda t: (-(-width // t) * t - width, -t))
    th = min(range(1, max(1, min(height, max_acc // blocks // tw)) + 1),
             key=lambda t: (-(-height // t) * t * (1 + TILE_COST / (t * tw)), -t))
    return th, tw


def _bias(op: Op, channels: int) -> np.ndarray:
    b = op.consts.get("bias")
    return np.zeros(channels, np.int64) if b is None else np.asarray(b).astype(np.int64).reshape(channels)


def _unpack_int4(packed: te.Tensor, shape: tuple) -> te.Tensor:
    """(..., 32) u8 -> (..., 16, 4) s8; value f = 4*oi + ii is the low nibble of byte f (f < 32) or the
    high nibble of byte f - 32."""
    def nibble(*idx):
        *lead, oi, ii = idx
        byte = packed[(*lead, (oi % 8) * 4 + ii)].astype("int32")
        v = te.if_then_else(oi < 8, byte & 15, byte >> 4)
        return ((v ^ 8) - 8).astype("int8")
    return te.compute(shape, nibble, name="unpack")


def _weight_tensors(wpk: np.ndarray, w_bits: int, dot: DotPath | None = None):
    """Placeholder(s) for a packed weight tensor (..., 16, 4) int8; returns (arg tensor, view tensor, const
    array). The view is int8 in that layout, or int16 in (..., 16, 2) pairs for a `vpmaddwd` dot."""
    if dot is not None and dot.in_dtype == "int16":
        arr = widen_pairs(wpk)
        ph = te.placeholder(arr.shape, "int16", name="weight")
        return ph, ph, arr
    if w_bits <= 4:
        arr = layout.pack_int4(wpk)
        ph = te.placeholder(arr.shape, "uint8", name="weight")
        return ph, _unpack_int4(ph, wpk.shape), arr
    ph = te.placeholder(wpk.shape, "int8", name="weight")
    return ph, ph, wpk


def _check_bias(b: np.ndarray, where: str) -> np.ndarray:
    if b.min(initial=0) < -(1 << 31) or b.max(initial=0) >= (1 << 31):
        raise HawqError(f"{where}: bias (with the input shift folded in) leaves int32")
    return b.astype(np.int32)


# ---------------------------------------------------------------------------------------------- conv2d

@dataclass
class ConvOperands:
    """What every conv2d kernel starts from: attributes, the (shifted, padded) input, weights and bias."""
    op: Op
    stride: tuple
    padding: tuple
    dilation: tuple
    kernel: tuple            # (KH, KW)
    dot: DotPath | None      # the tensorized dot product (None: generic)
    shift_input: bool        # signed int8 input shifted by +128 (folded into the bias)
    w_bits: int
    data: te.Tensor          # the input placeholder, NCHW[b]c
    weight: te.Tensor        # weight placeholder (packed int4 bytes, int8 or int16)
    weight8: te.Tensor       # view of the weights, (O/16, C/b, KH, KW, b/k, 16, k), k = the dot's k_lanes
    bias: te.Tensor
    consts: list             # [packed weights, packed bias]
    fold: int = 0            # > 0: the input's channels (that many) folded into its rows (`fold_row_channels`)

    def source(self, x: Value, top: int, left: int, height: int, width: int):
        """The input as the accumulator reads it: rows/columns shifted by (top, left) padding, `height` x
        `width` in all, padding 128 for a shifted signed input (0 otherwise), widened to int16 for a `vpmaddwd`
        dot. Returns (tensor, padded?)."""
        N, C, H, W = x.shape
        in_dtype = self.dot.in_dtype if self.dot else x.dtype
        if not (in_dtype != x.dtype or top or left or height != H or width != W):
            return self.data, False
        pad_value = tvm.tirx.const(128 if self.shift_input else 0, in_dtype)
        data, shift = self.data, self.shift_input

        def padded_value(n, c, h, ww, i):
            v = data[n, c, h - top, ww - left, i]
            if shift:
                v = (v.astype("int32") + 128).astype("uint8")
            elif in_dtype != x.dtype:
                v = v.astype(in_dtype)
            inside = te.all(h >= top, h < H + top, ww >= left, ww < W + left)
            return te.if_then_else(inside, v, pad_value)
        if self.fold:    # row element e = column * fold + channel, two per position (`fold_row_channels`),
            # as many positions as whole runs of `fold_period` (`schedule_side_stages` unrolls a run)
            (_, kwf), (_, swf), _ = self.folded_taps()
            positions = layout.ceil_to((width - self.kernel[1]) // self.stride[1] * swf + kwf, self.fold_period())
            return te.compute((N, 1, height, positions, 2), lambda n, c, h, q, i: padded_value(
                n, 0, h, (2 * q + i) // self.fold, (2 * q + i) % self.fold), name="pad"), True
        return te.compute((N, x.storage_shape[1], height, width, x.block), padded_value, name="pad"), True

    def source_rows(self, x: Value, top: int, left: int, rows: int, ws: int):
        """The zero-padded input with its rows `ws` apart: (N, C/b, rows * ws, b), position q = row * ws + column,
        zeros outside the map (for an AMX tile's constant row stride). Returns (tensor, True)."""
        N, C, H, W = x.shape
        data = self.data

        def value(n, c, q, i):
            h, ww = q // ws - top, q % ws - left
            inside = te.all(h >= 0, h < H, ww >= 0, ww < W)
            return te.if_then_else(inside, data[n, c, te.max(te.min(h, H - 1), 0), te.max(te.min(ww, W - 1), 0), i],
                                   tvm.tirx.const(0, x.dtype))
        return te.compute((N, x.storage_shape[1], rows * ws, x.block), value, name="pad"), True

    def accumulate(self, src: te.Tensor, shape: tuple, row=None, row_stride: int | None = None) -> te.Tensor:
        """INT32 accumulator over output positions `shape` = (N, O/16, rows, columns, 16); output position
        (h, w) reads source rows h * stride + kh * dilation. With `row`, the shape is (N, O/16, bands, rows,
        columns, 16) and band b's row i is output row row(b, i). With `row_stride` the source is `source_rows`
        (stride 1): output (h, w) reads position (h + kh) * row_stride + w + kw."""
        (sh, sw), (dh, dw), (KH, KW) = self.stride, self.dilation, self.kernel
        steps = 1
        if self.fold:    # a folded row's pair 2 * kw + icm, as an unfolded block's (kw, icm): the loops keep
            (KH, KW), (sh, sw), (dh, dw) = self.folded_taps()      # their shape (a lone 11-pair loop was
            KW, steps = KW // 2, 2                                  # unrolled whole by LLVM, and spilled)
        Cb, ib = int(src.shape[1]), int(src.shape[-1])
        k_lanes = self.dot.k_lanes if self.dot else 4
        ico = te.reduce_axis((0, Cb), "ico")
        kh = te.reduce_axis((0, KH), "kh")
        kw = te.reduce_axis((0, KW), "kw")
        icm = te.reduce_axis((0, ib // k_lanes * steps), "icm")
        ici = te.reduce_axis((0, k_lanes), "ici")
        w8 = self.weight8

        def tap(n, h, ww):
            c = icm * k_lanes + ici
            if self.fold:
                return src[n, ico, h * sh + kh * dh, ww * sw + kw * 2 + icm, ici]
            if row_stride is None:
                return src[n, ico, h * sh + kh * dh, ww * sw + kw * dw, c]
            return src[n, ico, (h + kh) * row_stride + ww + kw, c]

        def dot(n, o, h, ww, oi):
            return te.sum(tap(n, h, ww).astype("int32") * w8[o, ico, kh, kw, icm, oi, ici].astype("int32"),
                          axis=[ico, kh, kw, icm, ici])
        if row is None:
            return te.compute(shape, dot, name="acc")
        return te.compute(shape, lambda n, o, b, i, ww, oi: dot(n, o, row(b, i), ww, oi), name="acc")

    def fold_period(self) -> int:
        """Positions (pairs of row elements) per whole number of columns of a folded row (0: not folded)."""
        return self.fold if self.fold % 2 else self.fold // 2

    def folded_taps(self) -> tuple:
        """(kernel, stride, dilation) over a folded source's positions (pairs of row elements), the kernel's
        row rounded up to an even number of pairs."""
        (KH, KW), (sh, sw), (dh, _) = self.kernel, self.stride, self.dilation
        return (KH, folded_pairs(KW, self.fold)), (sh, sw * self.fold // 2), (dh, 1)


def folded_pairs(kernel_w: int, channels: int) -> int:
    """The pairs a folded kernel row takes: kernel_w * channels row elements, in an even number of pairs."""
    return layout.ceil_to(-(-kernel_w * channels // 2), 2)


def fold_row_channels(cv: ConvOperands, x: Value) -> ConvOperands:
    """`cv` with its input's channels folded into its rows where that shortens an int16 `vpmaddwd` reduction:
    a stem's 3 channels stored in a block of 4 take KW * 2 pairs per kernel row, folded (row element e =
    column * 3 + channel, a pair per position) ceil(3 * KW / 2) rounded up to even (`folded_pairs`): 12 against
    14 for a 7x7 kernel (a 3x3 one gains nothing). A position then steps stride * 3 / 2 pairs, so that must be
    whole. Unchanged elsewhere."""
    C, (KH, KW), sw = x.shape[1], cv.kernel, cv.stride[1]
    if not (cv.dot is not None and cv.dot.k_lanes == 2 and x.storage_shape[1] == 1 and C < x.block
            and cv.dilation[1] == 1 and sw * C % 2 == 0 and folded_pairs(KW, C) < KW * x.block // 2):
        return cv
    w = np.asarray(cv.op.consts["weight"]).astype(np.int16)
    O, Ob, KWf = w.shape[0], layout.ceil_to(w.shape[0], 16) // 16, folded_pairs(KW, C)
    row = np.zeros((Ob * 16, KH, 2 * KWf), np.int16)
    row[:O, :, :KW * C] = w.transpose(0, 2, 3, 1).reshape(O, KH, KW * C)      # element kw * C + c
    # pair j = 2 * kw + icm at [o, 0, kh, kw, icm, oi, ici] (`ConvOperands.accumulate`)
    arr = np.ascontiguousarray(row.reshape(Ob, 16, KH, KWf // 2, 2, 2).transpose(0, 2, 3, 4, 1, 5)[:, None])
    ph = te.placeholder(arr.shape, "int16", name="weight")
    return dataclasses.replace(cv, weight=ph, weight8=ph, consts=[arr, cv.consts[1]], fold=C)


def check_channels(op: Op, x: Value) -> tuple:
    """x's logical shape, once its channels match the weight's."""
    Ig = np.shape(op.consts["weight"])[1]
    groups = op.attrs.get("groups", 1)
    if x.shape[1] != Ig * groups:
        raise HawqError(f"{op.layer or op.output}: weight expects {Ig * groups} input channels, "
                        f"input has {x.shape[1]}")
    return tuple(x.shape)


def conv_dot(op: Op, x: Value, caps, int16: bool = False):
    """The dot scheme of conv `op` on input `x` (`x86dot.choose_dot`)."""
    return choose_dot(caps, x.dtype, int(op.attrs.get("w_bits", 8)), x.block // 4, int16)


def conv_operands(op: Op, x: Value, dot) -> ConvOperands:
    """The conv's placeholders and packed constants for the dot scheme `dot` (`conv_dot`)."""
    w = np.asarray(op.consts["weight"])
    O, Ig, KH, KW = w.shape
    check_channels(op, x)
    w_bits = int(op.attrs.get("w_bits", 8))
    shift_input = dot is not None and dot.shifts(x.dtype)
    bias = _bias(op, O)
    if shift_input:
        bias = bias - 128 * w.astype(np.int64).sum(axis=(1, 2, 3))
    bias_arr = layout.pack_channel_vector(_check_bias(bias, op.layer or op.output), O)
    data = te.placeholder(x.storage_shape, x.dtype, name="data")
    w_ph, w8, w_arr = _weight_tensors(layout.pack_conv_weight(w, x.block), w_bits, dot)
    b_ph = te.placeholder(bias_arr.shape, "int32", name="bias")
    return ConvOperands(op, tuple(op.attrs.get("stride", (1, 1))), tuple(op.attrs.get("padding", (0, 0))),
                        tuple(op.attrs.get("dilation", (1, 1))), (KH, KW), dot, shift_input, w_bits,
                        data, w_ph, w8, b_ph, [w_arr, bias_arr])


def conv2d_kernel(op: Op, x: Value, steps: list, extras: list, target, name: str | None = None,
                  fanout: list = ()) -> Kernel:
    """conv2d (+ bias) followed by the elementwise `steps` (ops of the program) at the output tile; with
    `fanout` (requantize ops reading the end of the chain) the kernel writes one output per fanout op."""
    w = np.asarray(op.consts["weight"])
    O, Ig, KH, KW = w.shape
    sh, sw = op.attrs.get("stride", (1, 1))
    ph, pw = op.attrs.get("padding", (0, 0))
    dh, dw = op.attrs.get("dilation", (1, 1))
    groups = op.attrs.get("groups", 1)
    N, C, H, W = check_channels(op, x)
    OH, OW = conv_out_size(H, KH, sh, ph, dh), conv_out_size(W, KW, sw, pw, dw)
    out_value = Value((N, O, OH, OW), output_dtype(steps[-1] if steps else op), 16)
    if groups != 1:
        if fanout:
            raise HawqError(f"{op.layer or op.output}: grouped conv kernels write one output")
        return _grouped_conv(op, x, steps, extras, target, name, out_value)
    out_values = [Value(out_value.shape, output_dtype(f), 16) for f in fanout] or [out_value]

    caps = capabilities(target)
    C_stored = x.storage_shape[1] * x.block
    w_bits = int(op.attrs.get("w_bits", 8))
    weights_outer = w.size * w_bits // 8 > C_stored * H * W
    dot = conv_dot(op, x, caps)
    transform = winograd.choose(caps, dot, x.dtype, w_bits, C_stored, (KH, KW), (sh, sw), (dh, dw), groups,
                                (OH, OW), weights_outer, N)
    cv = conv_operands(op, x, conv_dot(op, x, caps, int16=True) if transform else dot)
    if transform is None:
        cv = fold_row_channels(cv, x)
    Ob = layout.ceil_to(O, 16) // 16
    use_amx = cv.dot is VNNI and caps.amx and \
        amx.amx_conv_applies(x.dtype, x.storage_shape[1], x.block, cv.kernel, cv.stride, cv.dilation, groups, OW, Ob)
    b_ph = cv.bias
    wino = None
    if use_amx:      # input rows WS apart, output rows and columns rounded up to the AMX block (`amx.py`)
        OHp, OWp = layout.ceil_to(OH, amx.PX_TILES), layout.ceil_to(OW, amx.ROWS)
        WS = OWp + KW - 1
        src, needs_pad = cv.source_rows(x, ph, pw, OHp + KH - 1, WS)
        acc = cv.accumulate(src, (N, Ob, OHp, OWp, 16), row_stride=WS)
    elif transform is not None:
        once = winograd.v_once(transform, weights_outer, (OH, OW), C_stored, N)
        wino = winograd.plan(transform, (OH, OW), min(14, cv.dot.max_acc), N if once else 0)
        (OHp, OWp), in_size = wino.out_size, wino.in_size
        src, needs_pad = cv.source(x, ph, pw, *in_size)
        w8 = cv.consts[0].astype(np.int8)          # the int16 pairs of weights of at most 8 bits
        stored = w8 if weights_outer else winograd.transformed_weights(w8, transform)
        w_ph = te.placeholder(stored.shape, str(stored.dtype), name="weight")
        cv = dataclasses.replace(cv, weight=w_ph, weight8=w_ph, consts=[stored, cv.consts[1]])
        u = winograd.weight_transform(w_ph, transform) if weights_outer else w_ph
        acc = winograd.conv_sum(src, u, Ob, wino, bool(wino.stack))
        tile = None
    else:
        pair = OC_PAIR if cv.dot and cv.dot.pair and Ob % OC_PAIR == 0 else 1
        tile = (*_tile(OH, OW, pair, cv.dot.max_acc if cv.dot else MAX_ACC), pair) if not caps.gpu else (1, 1, 1)
        OHp, OWp = -(-OH // tile[0]) * tile[0], -(-OW // tile[1]) * tile[1]
        src, needs_pad = cv.source(x, ph, pw, (OHp - 1) * sh + dh * (KH - 1) + 1,
                                   (OWp - 1) * sw + dw * (KW - 1) + 1)
        acc = cv.accumulate(src, (N, Ob, OHp, OWp, 16))
    # acc + bias as a stage of its own, in registers: read from a buffer, it stays an int32 in the int64
    # product of a requantize (one vpmuldq per 8 lanes) where an inline sum is widened term by term
    biased = te.compute(acc.shape, lambda n, o, h, ww, oi: acc[n, o, h, ww, oi] + b_ph[o, oi], name="biased")
    # the byte-table read is tensorized where no output row or column of a tile is past the map's end (a
    # predicated block does not match the intrinsic)
    epi = epilogue(steps, out_value, extras, fanout, byte_table=caps.vbmi and (OHp, OWp) == (OH, OW),
                   lanes=lane_requantize_pays(caps, cv.dot, KH * KW, wino is not None))
    if fanout:   # each output requantizes the chain (`merge_outputs` puts them in one loop)
        def requantized(k):
            return lambda n, o, h, ww, oi: epi.finish(k, epi.chain(biased[n, o, h, ww, oi], (n, o, h, ww, oi)),
                                                      (n, o, h, ww, oi))
        outs = [te.compute(out_value.storage_shape, requantized(k), name=f"out{k}") for k in range(len(fanout))]
    else:
        outs = epi.output_stages(out_value.storage_shape, lambda n, o, h, ww, oi: biased[n, o, h, ww, oi],
                                 value_shape=acc.shape)[-1:]
    names = [f"out{k}" for k in range(len(fanout))] if fanout else epi.block_names
    func = te.create_prim_func([cv.data, *epi.extra_tensors, cv.weight, b_ph, *epi.const_tensors, *outs])
    int4 = cv.w_bits <= 4 and not (cv.dot and cv.dot.in_dtype == "int16")     # int16 weights are not packed
    if not caps.gpu:
        func = _schedule_conv(func, None if use_amx else tile, needs_pad, int4, len(fanout) or 1, weights_outer,
                              cv.dot, names, amx.conv_intrinsic(x.storage_shape[1], KH, KW, WS) if use_amx else None,
                              str(epi.byte_table.dtype) if epi.byte_table is not None else None, wino,
                              cv.fold_period())
    path = caps.conv_path(use_amx, cv.dot) + (f"+winograd{wino.transform.m}" if wino else "")
    return Kernel(name or kernel_name(op), func, [x, *extras], [*cv.consts, *epi.const_arrays], out_values,
                  {"path": path, "w_bits": cv.w_bits, "layer": op.layer})


def lane_requantize_pays(caps, dot: DotPath | None, window: int, winograd: bool = False) -> bool:
    """Whether a conv's first requantize is `lanerequant`'s 16-lane stage. Measured for haswell at batch 8,
    interleaved (2026-12-07): a direct 8-bit conv with a spatial window (the int16 `vpmaddwd` path) took 1.03-1.19x
    the time with the stage (resnet18's 3x3 convs, 64 to 512 channels), a 1x1 conv 0.88-0.92x, a 4-bit 3x3 conv
    0.92-1.03x and a Winograd conv 0.93-0.98x (0.35x where its tiles run past the map's end, 256 channels at
    14x14); with 512-bit registers the stage pays everywhere."""
    return caps.lanes and (winograd or caps.avx512bw or caps.vnni or dot is None or dot.in_dtype != "int16"
                           or window == 1)


def merge_outputs(sch, outs: list) -> list:
    """The output blocks of a fan-out (each computes the chain, then its own requantize), already at one loop,
    in one loop nest: the chain is then computed once per vector, in registers (a chain kept in a tile buffer
    and read back by each output was 4% slower on resnet50). Returns the blocks to vectorize (the first)."""
    if len(outs) > 1:
        sch.merge(*(sch.get_loops(b)[-1] for b in outs))
    return outs[:1]


def schedule_side_stages(sch, has_pad: bool, int4: bool, fold_period: int = 0):
    """The input's padding (and widening) stage, parallel over rows; a folded row's (`ConvOperands.source`) in
    unrolled runs of `fold_period` positions, whose columns and channels are then constants (no division per
    element); the int4 weights' unpacking."""
    if has_pad:
        b = sch.get_sblock("pad")
        loops = sch.get_loops(b)
        sch.parallel(sch.fuse(*loops[:3]))
        if fold_period:
            run = sch.split(loops[-2], [None, fold_period])[1]
            sch.unroll(run)
            sch.unroll(loops[-1])
        else:
            sch.vectorize(loops[-1])
    if int4:
        b = sch.get_sblock("unpack")
        loops = sch.get_loops(b)
        *lead, oi, ii = loops
        sch.parallel(sch.fuse(*lead[:2]))
        oi_hi, oi_lo = sch.split(oi, [2, 8])
        sch.vectorize(sch.fuse(oi_lo, ii))


def reduction_order(sch, dot: DotPath | None, icm, ici, tile: list, oi) -> list:
    """The innermost loops of an accumulator, from the channel-group loop `icm` on: a dot wants (icm, tile...,
    oi, ici) with (oi, ici) its 16 x k intrinsic, or, summing `group` steps per call, icm split and (icm_outer,
    tile..., oi, icm_inner, ici); the generic path (icm, ici, tile..., oi) so that LLVM packs the 16 oi lanes."""
    if dot is None:
        return [icm, ici, *tile, oi]
    if dot.group > 1:
        outer, inner = sch.split(icm, [None, dot.group])
        return [outer, *tile, oi, inner, ici]
    return [icm, *tile, oi, ici]


def finish_dot(sch, acc, first_reduction, oi, tile: list, dot: DotPath | bool | None):
    """Split the accumulator's init off at `first_reduction`, then the dot: tensorized with `dot`'s intrinsic
    (True: VNNI), or unrolled (vectorize refuses a loop under reduction loops; LLVM's SLP pass packs the
    lanes); the register tile's loops unrolled."""
    dot = VNNI if dot is True else dot or None
    init = sch.decompose_reduction(acc, first_reduction)
    sch.vectorize(sch.get_loops(init)[-1])
    if dot:
        sch.tensorize(oi, dot.intrinsic)
    else:
        sch.unroll(oi)
    for loop in tile:
        sch.unroll(loop)


def _schedule_conv(func, tile: tuple, has_pad: bool, int4: bool, n_out: int, weights_outer: bool, dot,
                   out_names: list, amx_intrinsic: str | None = None, table_dtype: str | None = None,
                   wino=None, fold_period: int = 0):
    """Parallel over (image, channel block group, row tiles) or, when the weights outweigh an image's input,
    (channel block group, image, row tiles); a (rows x columns x blocks of 16 channels) register tile, the
    blocks innermost (each broadcast input meets every block's weights) -- or, with `amx_intrinsic`, a (2 rows
    x 16 columns x 32 channels) block that one AMX call computes, or, with `wino_tiles`, a block of that many
    Winograd tiles (`winograd.schedule_sum`); the epilogue at the tile."""
    sch = s_tir.Schedule(func)
    acc = sch.get_sblock("acc")
    outs = [sch.get_sblock(nm) for nm in out_names]
    if wino:
        outer, wo, finish = winograd.schedule_sum(sch, acc, wino, weights_outer, dot.bits)
    else:
        outer, wo, finish = _conv_tile(sch, acc, tile, weights_outer, dot, amx_intrinsic)
    sch.set_scope(acc, 0, "local")
    biased = sch.get_sblock("biased")
    sch.set_scope(biased, 0, "local")
    for block in (biased, *outs):
        sch.reverse_compute_at(block, wo)
    if n_out > 1:
        outs = merge_outputs(sch, outs)
    sch.parallel(sch.fuse(*outer))
    finish()
    schedule_output(sch, [biased, *outs], table_dtype)
    schedule_side_stages(sch, has_pad, int4, fold_period)
    return sch.mod["main"]


def _conv_tile(sch, acc, tile: tuple, weights_outer: bool, dot, amx_intrinsic: str | None) -> tuple:
    """The direct conv's register tile (see `_schedule_conv`). Returns (outer loops to fuse into the parallel
    task, the tile loop, a finish callback to run once the task loop is parallel)."""
    n, o, h, w, oi, ico, kh, kw, icm, ici = sch.get_loops(acc)
    if amx_intrinsic:
        o, ob = sch.split(o, [None, amx.OC_TILES])
        tile = (amx.PX_TILES, amx.ROWS, 1)
    blocks = []          # the tile's channel blocks, when it has several
    if tile[2] > 1:
        o, block = sch.split(o, [None, tile[2]])
        blocks = [block]
    ho, hi = sch.split(h, [None, tile[0]])
    wo, wi = sch.split(w, [None, tile[1]])
    outer = [o, n, ho] if weights_outer else [n, o, ho]
    if amx_intrinsic:
        sch.reorder(*outer, wo, ob, hi, wi, oi, ico, kh, kw, icm, ici)
    else:
        sch.reorder(*outer, wo, ico, kh, kw, *reduction_order(sch, dot, icm, ici, [hi, wi, *blocks], oi))

    def finish():
        if amx_intrinsic:
            init = sch.decompose_reduction(acc, ob)
            sch.vectorize(sch.get_loops(init)[-1])
            sch.tensorize(ob, amx_intrinsic)
        else:
            finish_dot(sch, acc, ico, oi, [hi, wi, *blocks], dot)
    return outer, wo, finish


def _grouped_conv(op, x, steps, extras, target, name, out_value):
    """Grouped / depthwise conv: `depthwise.py`'s kernel on a CPU, else a generic computation on logical
    channel indices (int8 weights)."""
    if depthwise.applies(op, x) and not capabilities(target).gpu:
        bias = _check_bias(_bias(op, out_value.shape[1]), op.layer or op.output)
        func, consts = depthwise.depthwise_kernel(op, x, steps, extras, out_value, bias,
                                                  byte_table=capabilities(target).vbmi,
                                                  lanes=capabilities(target).lanes)
        return Kernel(name or kernel_name(op), func, [x, *extras], consts, [out_value],
                      {"path": "depthwise", "w_bits": int(op.attrs.get("w_bits", 8)), "layer": op.layer})
    w = np.asarray(op.consts["weight"])
    O, Ig, KH, KW = w.shape
    sh, sw = op.attrs.get("stride", (1, 1))
    ph, pw = op.attrs.get("padding", (0, 0))
    dh, dw = op.attrs.get("dilation", (1, 1))
    Og = O // op.attrs["groups"]
    N, C, H, W = x.shape
    _, _, OH, OW = out_value.shape
    Op = layout.ceil_to(O, 16)
    w_arr = np.zeros((Op, Ig, KH, KW), np.int8)
    w_arr[:O] = w
    bias_arr = layout.pack_channel_vector(_check_bias(_bias(op, O), op.layer or op.output), O)
    data = te.placeholder(x.storage_shape, x.dtype, name="data")
    w_ph = te.placeholder(w_arr.shape, "int8", name="weight")
    b_ph = te.placeholder(bias_arr.shape, "int32", name="bias")
    r = te.reduce_axis((0, Ig), "r")
    kh = te.reduce_axis((0, KH), "kh")
    kw = te.reduce_axis((0, KW), "kw")
    ib = x.block

    def acc_value(n, co, oh, ow, ci):
        oc = co * 16 + ci
        c = te.min(oc, O - 1) // Og * Ig + r
        ih, iw = oh * sh - ph + kh * dh, ow * sw - pw + kw * dw
        inside = te.all(ih >= 0, ih < H, iw >= 0, iw < W)
        v = te.if_then_else(inside, data[n, c // ib, ih, iw, c % ib].astype("int32"), 0)
        return te.sum(v * w_ph[oc, r, kh, kw].astype("int32"), axis=[r, kh, kw])
    acc = te.compute(out_value.storage_shape, acc_value, name="acc")
    epi = epilogue(steps, out_value, extras)
    out = te.compute(out_value.storage_shape,
                     lambda n, o, h, ww, oi: epi.apply(acc[n, o, h, ww, oi] + b_ph[o, oi], (n, o, h, ww, oi)),
                     name="out")
    func = te.create_prim_func([data, *epi.extra_tensors, w_ph, b_ph, *epi.const_tensors, out])
    if not capabilities(target).gpu:
        sch = s_tir.Schedule(func)
        for blk in ("acc", "out"):
            loops = sch.get_loops(sch.get_sblock(blk))
            sch.parallel(sch.fuse(*loops[:3]))
        func = sch.mod["main"]
    return Kernel(name or kernel_name(op), func, [x, *extras], [w_arr, bias_arr, *epi.const_arrays], [out_value],
                  {"path": "grouped", "w_bits": 8, "layer": op.layer})


# ---------------------------------------------------------------------------------------------- dense

def _dense_tile(rows: int, blocks: int, dot: DotPath) -> tuple:
    """(rows, output blocks) of a dense register tile: 2 blocks of 16 outputs where they pair up (each broadcast
    input feeds both) and the dot allows, then the rows (up to its max_acc accumulators in all) that minimize
    rows computed x tile cost (`_tile`'s measure)."""
    nbt = OC_PAIR if dot.pair and blocks % OC_PAIR == 0 else 1
    top = max(1, min(rows, dot.max_acc // nbt, 16))
    nt = min(range(1, top + 1), key=lambda t: (-(-rows // t) * t * (1 + TILE_COST / (t * nbt)), -t))
    return nt, nbt


def dense_kernel(op: Op, x: Value, steps: list, extras: list, target, name: str | None = None,
                 fanout: list = ()) -> Kernel:
    """dense (+ bias) followed by the elementwise `steps`; x is (N, I) or tokens (N, ..., I), plain. The rows
    are tiled along the last leading axis (padded to the tile), so the epilogue runs at the register tile.
    With `fanout` (requantize ops reading the end of the chain) the kernel writes one output per fanout op."""
    w = np.asarray(op.consts["weight"])
    O, I = w.shape
    if x.block or len(x.shape) < 2:
        raise HawqError(f"{op.layer or op.output}: dense of a {'blocked' if x.block else 'rank-1'} value")
    *lead, Ix = x.shape
    if Ix != I:
        raise HawqError(f"{op.layer or op.output}: weight expects {I} inputs, input has {Ix}")
    *outer, T = (int(d) for d in lead)
    outer = tuple(outer)
    Ob = layout.ceil_to(O, 16) // 16
    caps = capabilities(target)
    w_bits = int(op.attrs.get("w_bits", 8))
    dot = choose_dot(caps, x.dtype, w_bits, None)
    nt, nbt = _dense_tile(T, Ob, dot) if dot else (min(T, 8), 1)
    Tp = -(-T // nt) * nt
    out_value = Value((*lead, O), output_dtype(steps[-1] if steps else op), None)
    shift_input = dot is not None and dot.shifts(x.dtype)
    bias = _bias(op, O)
    if shift_input:
        bias = bias - 128 * w.astype(np.int64).sum(axis=1)
    bias_arr = _check_bias(bias, op.layer or op.output)
    Ip = layout.ceil_to(I, 4 * (dot.group if dot else 1))    # zero inputs up to a whole call of the dot
    wpk = layout.pack_conv_weight(w[:, :, None, None], Ip).reshape(Ob, Ip // 4, 16, 4)

    data = te.placeholder(x.storage_shape, x.dtype, name="data")
    w_ph, w8, w_arr = _weight_tensors(wpk, w_bits, dot)
    b_ph = te.placeholder((O,), "int32", name="bias")
    in_dtype = dot.in_dtype if dot else x.dtype
    k_lanes = dot.k_lanes if dot else 4

    def padded_value(*idx):      # rows past T read the last (their outputs are never written)
        *g, t, k = idx
        v = data[(*g, te.min(t, T - 1), te.min(k, I - 1))]
        if shift_input:
            v = (v.astype("int32") + 128).astype("uint8")
        return te.if_then_else(k < I, v.astype(in_dtype), tvm.tirx.const(0, in_dtype))
    src = te.compute((*outer, Tp, Ip), padded_value, name="pad")
    k = te.reduce_axis((0, Ip // k_lanes), "k")
    ki = te.reduce_axis((0, k_lanes), "ki")
    acc = te.compute((*outer, Tp, Ob, 16), lambda *idx: te.sum(
        src[(*idx[:-2], k * k_lanes + ki)].astype("int32") * w8[idx[-2], k, idx[-1], ki].astype("int32"),
        axis=[k, ki]), name="acc")
    # acc + bias a stage of its own, in registers: read from a buffer, it stays an int32 in the int64 product
    # of a requantize (one vpmuldq per 8 lanes) where an inline sum is widened term by term
    biased = te.compute((*outer, Tp, O), lambda *idx: acc[(*idx[:-1], idx[-1] // 16, idx[-1] % 16)] +
                        b_ph[idx[-1]], name="biased")
    # a table (GELU) at the tail with AVX512-VBMI: read 16 lanes at a time (`bytelut`) over the whole tile (a
    # predicated block does not match the intrinsic), then the rows of the map copied out
    epi = epilogue(steps, out_value, extras, fanout, byte_table=caps.vbmi and O % 16 == 0)
    out_values = [Value(out_value.shape, output_dtype(f), None) for f in fanout] or [out_value]
    if fanout:   # each output requantizes the chain (`merge_outputs` puts them in one loop)
        def requantized(k):
            return lambda *idx: epi.finish(k, epi.chain(biased[idx], tuple(idx)), tuple(idx))
        outs = [te.compute(out_value.storage_shape, requantized(k), name=f"out{k}") for k in range(len(fanout))]
    elif epi.byte_table is not None:
        stages = epi.output_stages((*outer, Tp, O), lambda *idx: biased[idx], name="out_tile")
        outs = [te.compute(out_value.storage_shape, lambda *idx: stages[-1][idx], name="out")]
    else:
        outs = [te.compute(out_value.storage_shape, lambda *idx: epi.apply(biased[idx], tuple(idx)), name="out")]
    func = te.create_prim_func([data, *epi.extra_tensors, w_ph, b_ph, *epi.const_tensors, *outs])
    if not caps.gpu:
        func = _schedule_dense(func, len(outer), nt, nbt, O, dot, w_bits <= 4,
                               str(epi.byte_table.dtype) if epi.byte_table is not None else None,
                               [o.op.name for o in outs])
    return Kernel(name or kernel_name(op), func, [x, *extras], [w_arr, bias_arr, *epi.const_arrays],
                  out_values, {"path": caps.conv_path(False, dot),
                               "w_bits": w_bits, "layer": op.layer})


def _schedule_dense(func, n_outer: int, nt: int, nbt: int, O: int, dot: DotPath | None, int4: bool,
                    table_dtype: str | None = None, out_names: list = ("out",)):
    """Parallel over (outer leading axes, row tiles); per task its padded input rows, then for each group of
    nbt output blocks a register tile of nt rows x nbt x 16 outputs over the whole reduction (VNNI or
    unrolled) and the epilogue at the tile, vectorized over the outputs (with `table_dtype`, the byte table
    read 16 lanes at a time into the tile, then copied out)."""
    sch = s_tir.Schedule(func)
    acc = sch.get_sblock("acc")
    loops = sch.get_loops(acc)
    *outer, t, o, oi, k, ki = loops
    to, ti = sch.split(t, [None, nt])
    oo, ob = sch.split(o, [None, nbt])
    order = reduction_order(sch, dot, k, ki, [ti, ob], oi)
    sch.reorder(*outer, to, oo, *order)
    sch.set_scope(acc, 0, "local")
    task = sch.fuse(*outer, to) if outer else to
    sch.parallel(task)
    sch.compute_at(sch.get_sblock("pad"), task)
    biased = sch.get_sblock("biased")
    outs = [sch.get_sblock(name) for name in out_names]
    table = [sch.get_sblock(LUT_INDEX), sch.get_sblock("out_tile")] if table_dtype else []
    for block in (biased, *table, *outs):
        sch.reverse_compute_at(block, oo)
    sch.set_scope(biased, 0, "local")
    outs = merge_outputs(sch, outs)
    finish_dot(sch, acc, order[0], oi, [ti, ob], dot)
    if table:
        for block in table:
            loop = sch.get_loops(block)[-1]
            if int(sch.get(loop).extent) > 16:
                sch.split(loop, [None, 16])
        schedule_output(sch, table, table_dtype, "global")
    for block in (biased, *outs):
        inner = sch.get_loops(block)[-1]
        extent = int(sch.get(inner).extent)
        lanes = max(t for t in (16, 8, 4, 2, 1) if extent % t == 0)
        if lanes > 1:
            sch.vectorize(sch.split(inner, [None, lanes])[1] if lanes < extent else inner)
    if int4:
        loops = sch.get_loops(sch.get_sblock("unpack"))
        sch.parallel(loops[0])
        sch.vectorize(sch.fuse(*sch.split(loops[2], [2, 8])[1:], loops[3]))
    return sch.mod["main"]
