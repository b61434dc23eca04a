"""Per-layer TVM kernels: conv2d and dense with int8 or packed-int4 weights, INT32 accumulation and bias, and
the elementwise ops that follow them (dyadic requantize, ReLU clamp, residual add) fused at the output tile.

A kernel is one scheduled TIR function: `kernel(inputs..., consts..., out)`. The whole-model build
(`graph.py`) calls these very functions, and a profiler can build and time one alone (`build_layer_kernel`,
`time_kernel`), so per-layer latencies add up to the model's.

Two schedules share one computation: on x86 with AVX512-VNNI the reduction is tensorized with `vpdpbusd`
(u8 x s8 -> s32; a signed int8 input is shifted by +128 and `-128 * sum(W)` folded into the bias, padding with
128 so the shift is exact everywhere), with an (ow x 16 channel) register tile and the epilogue computed at the
tile; anywhere else a generic vectorized schedule (and, for CUDA, a default GPU schedule at build time).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import s_tir, te

from hawq_ray.deploy import layout
from hawq_ray.deploy.epilogue import Value, epilogue, output_dtype
from hawq_ray.errors import HawqError
from hawq_ray.quant.program import Op


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


def target_has_vnni(target) -> bool:
    if target.kind.name != "llvm":
        return False
    from tvm.target.codegen import llvm_cpu_has_features
    return bool(llvm_cpu_has_features("avx512vnni", target))


def is_gpu(target) -> bool:
    return target.kind.name in ("cuda", "rocm", "vulkan", "metal", "opencl")


def conv_out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


MAX_ACC = 28   # int32x16 accumulators of a register tile (of 32 zmm registers)


def _tile(height: int, width: int) -> tuple:
    """Register tile (rows, columns) of the output: 7..14 columns with the fewest wasted, then the widest;
    two rows when that fits MAX_ACC accumulators (weights are loaded once per tile, so taller is cheaper)."""
    tw = width if width <= 14 else min(range(14, 6, -1), key=lambda t: (-(-width // t) * t - width, -t))
    th = 2 if height > 1 and 2 * tw <= MAX_ACC else 1
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


def _weight_tensors(wpk: np.ndarray, w_bits: int):
    """Placeholder(s) for a packed weight tensor; returns (arg tensor, int8 view tensor, const array)."""
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
    N, C, H, W = x.shape
    if C != Ig * groups:
        raise HawqError(f"{op.layer or op.output}: weight expects {Ig * groups} input channels, input has {C}")
    OH, OW = conv_out_size(H, KH, sh, ph, dh), conv_out_size(W, KW, sw, pw, dw)
    out_value = Value((N, O, OH, OW), output_dtype(steps[-1] if steps else op), 16)
    if groups != 1:
        if fanout:
            raise HawqError(f"{op.layer or op.output}: grouped conv kernels write one output")
        return _grouped_conv(op, x, steps, extras, target, name, out_value)
    out_values = [Value(out_value.shape, output_dtype(f), 16) for f in fanout] or [out_value]

    fast = target_has_vnni(target) and x.dtype in ("uint8", "int8")
    shift_input = fast and x.dtype == "int8"
    w_bits = int(op.attrs.get("w_bits", 8))
    ib = x.block
    Cb = x.storage_shape[1]
    bias = _bias(op, O)
    if shift_input:
        bias = bias - 128 * w.astype(np.int64).sum(axis=(1, 2, 3))
    bias_arr = layout.pack_channel_vector(_check_bias(bias, op.layer or op.output), O)

    data = te.placeholder(x.storage_shape, x.dtype, name="data")
    w_ph, w8, w_arr = _weight_tensors(layout.pack_conv_weight(w, ib), w_bits)
    b_ph = te.placeholder(bias_arr.shape, "int32", name="bias")

    tile = _tile(OH, OW) if not is_gpu(target) else (1, 1)
    OHp, OWp = -(-OH // tile[0]) * tile[0], -(-OW // tile[1]) * tile[1]
    HP = (OHp - 1) * sh + dh * (KH - 1) + 1
    WP = (OWp - 1) * sw + dw * (KW - 1) + 1
    in_dtype = "uint8" if shift_input else x.dtype
    needs_pad = shift_input or ph or pw or HP != H or WP != W
    if needs_pad:
        pad_value = tvm.tirx.const(128 if shift_input else 0, in_dtype)

        def padded_value(n, c, h, ww, i):
            v = data[n, c, h - ph, ww - pw, i]
            if shift_input:
                v = (v.astype("int32") + 128).astype("uint8")
            inside = te.all(h >= ph, h < H + ph, ww >= pw, ww < W + pw)
            return te.if_then_else(inside, v, pad_value)
        src = te.compute((N, Cb, HP, WP, ib), padded_value, name="pad")
    else:
        src = data

    ico = te.reduce_axis((0, Cb), "ico")
    kh = te.reduce_axis((0, KH), "kh")
    kw = te.reduce_axis((0, KW), "kw")
    icm = te.reduce_axis((0, ib // 4), "icm")
    ici = te.reduce_axis((0, 4), "ici")
    acc = te.compute(
        (N, O // 16 + (O % 16 > 0), OHp, OWp, 16),
        lambda n, o, h, ww, oi: te.sum(
            src[n, ico, h * sh + kh * dh, ww * sw + kw * dw, icm * 4 + ici].astype("int32")
            * w8[o, ico, kh, kw, icm, oi, ici].astype("int32"),
            axis=[ico, kh, kw, icm, ici]),
        name="acc")
    epi = epilogue(steps, out_value, extras, fanout)
    if fanout:   # the chain once, into a tile-sized local buffer; each output requantizes it
        chain = te.compute(out_value.storage_shape,
                           lambda n, o, h, ww, oi: epi.chain(acc[n, o, h, ww, oi] + b_ph[o, oi], (n, o, h, ww, oi)),
                           name="chain")
        def requantized(k):
            return lambda n, o, h, ww, oi: epi.finish(k, chain[n, o, h, ww, oi], (n, o, h, ww, oi))
        outs = [te.compute(out_value.storage_shape, requantized(k), name=f"out{k}") for k in range(len(fanout))]
    else:
        outs = [te.compute(out_value.storage_shape,
                           lambda n, o, h, ww, oi: epi.apply(acc[n, o, h, ww, oi] + b_ph[o, oi], (n, o, h, ww, oi)),
                           name="out")]
    func = te.create_prim_func([data, *epi.extra_tensors, w_ph, b_ph, *epi.const_tensors, *outs])
    if fast:
        func = _schedule_conv_vnni(func, tile, needs_pad, w_bits <= 4, len(fanout) or 1)
    elif not is_gpu(target):
        func = _schedule_conv_generic(func, tile, needs_pad, w_bits <= 4, len(fanout) or 1)
    return Kernel(name or _name("conv", op), func, [x, *extras], [w_arr, bias_arr, *epi.const_arrays], out_values,
                  {"path": "vnni" if fast else ("gpu" if is_gpu(target) else "generic"), "w_bits": w_bits,
                   "layer": op.layer})


def _out_blocks(n_out: int) -> list:
    """Names of the epilogue blocks in order: "out", or "chain" then "out0", "out1"... for a fan-out."""
    return ["out"] if n_out == 1 else ["chain", *(f"out{k}" for k in range(n_out))]


def _schedule_side_stages(sch, has_pad: bool, int4: bool):
    if has_pad:
        b = sch.get_sblock("pad")
        loops = sch.get_loops(b)
        sch.parallel(sch.fuse(*loops[:3]))
        sch.vectorize(loops[-1])
    if int4:
        b = sch.get_sblock("unpack")
        loops = sch.get_loops(b)
        *lead, oi, ii = loops
        sch.parallel(sch.fuse(*lead[:2]))
        oi_hi, oi_lo = sch.split(oi, [2, 8])
        sch.vectorize(sch.fuse(oi_lo, ii))


def _schedule_conv_vnni(func, tile: tuple, has_pad: bool, int4: bool, n_out: int = 1):
    from hawq_ray.deploy.vnni import VNNI_INTRIN
    sch = s_tir.Schedule(func)
    acc = sch.get_sblock("acc")
    outs = [sch.get_sblock(nm) for nm in _out_blocks(n_out)]
    n, o, h, w, oi, ico, kh, kw, icm, ici = sch.get_loops(acc)
    ho, hi = sch.split(h, [None, tile[0]])
    wo, wi = sch.split(w, [None, tile[1]])
    sch.reorder(n, o, ho, wo, ico, kh, kw, icm, hi, wi, oi, ici)
    sch.set_scope(acc, 0, "local")
    if n_out > 1:
        sch.set_scope(outs[0], 0, "local")
    for out in outs:
        sch.reverse_compute_at(out, wo)
    sch.parallel(sch.fuse(n, o, ho))
    init = sch.decompose_reduction(acc, ico)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.tensorize(oi, VNNI_INTRIN)
    sch.unroll(hi)
    sch.unroll(wi)
    for out in outs:
        sch.vectorize(sch.get_loops(out)[-1])
    _schedule_side_stages(sch, has_pad, int4)
    return sch.mod["main"]


def _schedule_conv_generic(func, tile: tuple, has_pad: bool, int4: bool, n_out: int = 1):
    sch = s_tir.Schedule(func)
    acc = sch.get_sblock("acc")
    outs = [sch.get_sblock(nm) for nm in _out_blocks(n_out)]
    n, o, h, w, oi, ico, kh, kw, icm, ici = sch.get_loops(acc)
    ho, hi = sch.split(h, [None, tile[0]])
    wo, wi = sch.split(w, [None, tile[1]])
    sch.reorder(n, o, ho, wo, ico, kh, kw, icm, ici, hi, wi, oi)
    sch.set_scope(acc, 0, "local")
    if n_out > 1:
        sch.set_scope(outs[0], 0, "local")
    for out in outs:
        sch.reverse_compute_at(out, wo)
    sch.parallel(sch.fuse(n, o, ho))
    sch.unroll(hi)
    init = sch.decompose_reduction(acc, ico)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(oi)   # vectorize refuses a loop under reduction loops; LLVM's SLP pass packs the lanes
    sch.unroll(wi)
    for out in outs:
        sch.vectorize(sch.get_loops(out)[-1])
    _schedule_side_stages(sch, has_pad, int4)
    return sch.mod["main"]


def _grouped_conv(op, x, steps, extras, target, name, out_value):
    """Grouped / depthwise conv: generic computation on logical channel indices (int8 weights)."""
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
    if not is_gpu(target):
        sch = s_tir.Schedule(func)
        for blk in ("acc", "out"):
            loops = sch.get_loops(sch.get_sblock(blk))
            sch.parallel(sch.fuse(*loops[:3]))
        func = sch.mod["main"]
    return Kernel(name or _name("conv", op), func, [x, *extras], [w_arr, bias_arr, *epi.const_arrays], [out_value],
                  {"path": "grouped", "w_bits": 8, "layer": op.layer})


# ---------------------------------------------------------------------------------------------- dense

def dense_kernel(op: Op, x: Value, steps: list, extras: list, target, name: str | None = None) -> Kernel:
    """dense (+ bias) followed by the elementwise `steps`; x is (N, I)."""
    w = np.asarray(op.consts["weight"])
    O, I = w.shape
    N, Ix = x.shape
    if Ix != I:
        raise HawqError(f"{op.layer or op.output}: weight expects {I} inputs, input has {Ix}")
    out_value = Value((N, O), output_dtype(steps[-1] if steps else op), None)
    fast = target_has_vnni(target) and x.dtype in ("uint8", "int8")
    shift_input = fast and x.dtype == "int8"
    w_bits = int(op.attrs.get("w_bits", 8))
    bias = _bias(op, O)
    if shift_input:
        bias = bias - 128 * w.astype(np.int64).sum(axis=1)
    bias_arr = _check_bias(bias, op.layer or op.output)
    Ip = layout.ceil_to(I, 4)
    Ob = layout.ceil_to(O, 16) // 16
    wpk = layout.pack_conv_weight(w[:, :, None, None], 4).reshape(Ob, Ip // 4, 16, 4)

    data = te.placeholder((N, I), x.dtype, name="data")
    w_ph, w8, w_arr = _weight_tensors(wpk, w_bits)
    b_ph = te.placeholder((O,), "int32", name="bias")
    in_dtype = "uint8" if shift_input else x.dtype
    needs_pad = shift_input or Ip != I
    if needs_pad:
        def padded_value(n, k):
            v = data[n, te.min(k, I - 1)]
            if shift_input:
                v = (v.astype("int32") + 128).astype("uint8")
            return te.if_then_else(k < I, v, tvm.tirx.const(0, in_dtype))
        src = te.compute((N, Ip), padded_value, name="pad")
    else:
        src = data
    k = te.reduce_axis((0, Ip // 4), "k")
    ki = te.reduce_axis((0, 4), "ki")
    acc = te.compute((N, Ob, 16), lambda n, o, oi: te.sum(
        src[n, k * 4 + ki].astype("int32") * w8[o, k, oi, ki].astype("int32"), axis=[k, ki]), name="acc")
    epi = epilogue(steps, out_value, extras)
    out = te.compute((N, O), lambda n, o: epi.apply(acc[n, o // 16, o % 16] + b_ph[o], (n, o)), name="out")
    func = te.create_prim_func([data, *epi.extra_tensors, w_ph, b_ph, *epi.const_tensors, out])
    if not is_gpu(target):
        func = _schedule_dense(func, N, O, fast, needs_pad, w_bits <= 4)
    return Kernel(name or _name("dense", op), func, [x, *extras], [w_arr, bias_arr, *epi.const_arrays],
                  [out_value], {"path": "vnni" if fast else ("gpu" if is_gpu(target) else "generic"),
                                "w_bits": w_bits, "layer": op.layer})


def _schedule_dense(func, N: int, O: int, fast: bool, has_pad: bool, int4: bool):
    from hawq_ray.deploy.vnni import VNNI_INTRIN
    sch = s_tir.Schedule(func)
    acc = sch.get_sblock("acc")
    n, o, oi, k, ki = sch.get_loops(acc)
    nt = max(t for t in range(1, min(N, 16) + 1) if N % t == 0)
    no, ni = sch.split(n, [None, nt])
    if fast:
        sch.reorder(o, no, k, ni, oi, ki)
    else:
        sch.reorder(o, no, k, ki, ni, oi)
    cache = sch.cache_write(acc, 0, "local")
    sch.reverse_compute_at(cache, no)
    sch.parallel(sch.fuse(o, no))
    init = sch.decompose_reduction(acc, k)
    sch.vectorize(sch.get_loops(init)[-1])
    if fast:
        sch.tensorize(oi, VNNI_INTRIN)
    else:
        sch.unroll(oi)
    sch.unroll(ni)
    sch.vectorize(sch.get_loops(cache)[-1])
    out = sch.get_sblock("out")
    n2, o2 = sch.get_loops(out)
    lanes = max(t for t in (16, 8, 4, 2, 1) if O % t == 0)
    sch.parallel(n2)
    if lanes > 1:
        sch.vectorize(sch.split(o2, [None, lanes])[1])
    if has_pad:
        sch.parallel(sch.get_loops(sch.get_sblock("pad"))[0])
    if int4:
        loops = sch.get_loops(sch.get_sblock("unpack"))
        sch.parallel(loops[0])
        sch.vectorize(sch.fuse(*sch.split(loops[2], [2, 8])[1:], loops[3]))
    return sch.mod["main"]


def _name(kind: str, op: Op) -> str:
    base = op.layer or op.output
    return f"{kind}_" + "".join(ch if ch.isalnum() else "_" for ch in str(base))
