"""Exact integer dot products for x86 CPUs without AVX512-VNNI, as TensorIR intrinsics, and the choice of one
dot scheme (`DotPath`) per kernel from the target's features and the weights' width.

Two schemes, each for AVX2 (256-bit) and AVX-512BW (512-bit):

- `vpmaddwd` (s16 x s16, pairs summed into s32): exact for any 8-bit operands. The input is widened to int16
  by the kernel's pad stage and the weights are stored as int16 in (..., C/2, 16, 2) order, so one call
  multiplies 2 input channels into 16 output lanes: C[16] s32 += A[2] s16 . B[16, 2] s16.
- `vpmaddubsw` (u8 x s8, pairs summed into a *saturating* s16): exact only while no int16 sum can leave int16.
  With u8 inputs (a signed input shifted by +128, as on the VNNI path) and narrow weights a pair is bounded,
  and `int16_sum_limit` derives from the operand ranges how many pair sums may be added in int16 (vpaddw)
  before they are widened by `vpmaddwd` against ones: 8 for 4-bit weights. One call sums G groups of 4
  input channels: C[16] s32 += sum_g A[g, 4] u8 . B[g, 16, 4] s8, the layout of the VNNI path.

LLVM 22 wants the vector types an intrinsic declares (`llvm_lookup_intrinsic_id` names them); the operands
are reinterpreted to match, as in `vnni.py`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

from hawq_ray.deploy.vnni import VNNI_INTRIN

INT16_MAX = (1 << 15) - 1
U8_MAX = 255


def int16_terms(x_lo: int, x_hi: int, w_lo: int, w_hi: int) -> int:
    """How many products x * w (x in [x_lo, x_hi], w in [w_lo, w_hi]) can be summed in int16 without leaving
    [-32768, 32767], whatever their values: 0 when one product already can."""
    corners = [x * w for x in (x_lo, x_hi) for w in (w_lo, w_hi)]
    most, least = max(max(corners), 0), min(min(corners), 0)
    up = INT16_MAX // most if most else INT16_MAX
    down = (INT16_MAX + 1) // -least if least else INT16_MAX
    return min(up, down)


def int16_sum_limit(x_max: int, w_lo: int, w_hi: int) -> int:
    """How many `vpmaddubsw` results (each a sum of two u8 x s8 products, inputs in [0, x_max], weights in
    [w_lo, w_hi]) can be added in int16 without leaving [-32768, 32767]: 0 when one pair already can."""
    return int16_terms(0, x_max, w_lo, w_hi) // 2


def weight_range(w_bits: int) -> tuple:
    return -(1 << (w_bits - 1)), (1 << (w_bits - 1)) - 1


@dataclass(frozen=True)
class DotPath:
    """How a conv / dense kernel's reduction runs: `k_lanes` input channels per lane per step (4 bytes, or 2
    int16), `group` steps per intrinsic call, the accumulator's input dtype, the weights' dtype and layout, and
    the register tile's budget (int32x16 accumulators, and whether two channel blocks share a broadcast)."""
    label: str          # the kernel's notes["path"] and manifest label
    intrinsic: str
    in_dtype: str       # "uint8" (a signed input shifted by +128) or "int16"
    k_lanes: int = 4
    group: int = 1
    max_acc: int = 28
    pair: bool = True
    bits: int = 512     # register width

    def shifts(self, x_dtype: str) -> bool:
        """A signed int8 input is shifted by +128 into u8 (and -128 * sum(W) folded into the bias)."""
        return self.in_dtype == "uint8" and x_dtype == "int8"


VNNI = DotPath("vnni", VNNI_INTRIN, "uint8")


def choose_dot(caps, x_dtype: str, w_bits: int, k_steps: int | None, int16: bool = False) -> DotPath | None:
    """The dot scheme of a conv / dense kernel on a target with `caps` (None: the generic schedule). `k_steps`:
    the groups of 4 input channels one tap reduces (a `vpmaddubsw` call sums a divisor of them); None where
    the kernel pads its reduction to a whole number of calls (dense). `int16`: `vpmaddwd` whatever the weights'
    width and whether the target has VNNI (a Winograd conv, whose transformed operands are int16)."""
    if caps.gpu or x_dtype not in ("uint8", "int8"):
        return None
    if caps.vnni and not int16:
        return VNNI
    if not (caps.avx512bw or caps.avx2):
        return None
    bits = 512 if caps.avx512bw else 256
    label = "avx512bw" if caps.avx512bw else "avx2"
    limit = 0 if int16 else int16_sum_limit(U8_MAX, *weight_range(w_bits))
    if limit >= 1:
        group = limit if k_steps is None else max(g for g in range(1, min(limit, k_steps) + 1) if k_steps % g == 0)
        # AVX2 holds an int32x16 accumulator in two of its 16 ymm registers, beside an int16 partial sum (two),
        # ones, the broadcast input and a weight vector
        return DotPath(label, pmaddubsw_intrinsic(bits, group), "uint8", 4, group,
                       24 if bits == 512 else 5, bits == 512, bits)
    # AVX2: four int32x16 accumulators (8 ymm). LLVM reassociates each accumulator's adds across the unrolled
    # reduction steps, which takes more registers than the tile's count: resnet18's 3x3 convs for haswell at
    # batch 8, 2 threads, took 1.8-2.4x as long with 5 accumulators (1 x 5) as with 4 (1 x 4 or 1 x 3)
    return DotPath(label, pmaddwd_intrinsic(bits), "int16", 2, 1, 24 if bits == 512 else 4, bits == 512, bits)


def widen_pairs(wpk: np.ndarray) -> np.ndarray:
    """(..., m, 16, 4) int8 -> (..., 2m, 16, 2) int16: the `vpmaddwd` layout, input channel 4i + 2p + j at
    (2i + p, lane, j)."""
    *lead, m, o, k = wpk.shape
    w = wpk.reshape(*lead, m, o, 2, 2).swapaxes(-3, -2)
    return np.ascontiguousarray(w.reshape(*lead, 2 * m, o, 2)).astype(np.int16)


# ----------------------------------------------------------------------------- vpmaddwd: C[16] += A[2] . B[16, 2]

_PMADDWD = {512: "llvm.x86.avx512.pmaddw.d.512", 256: "llvm.x86.avx2.pmadd.wd"}
_PMADDUBSW = {512: "llvm.x86.avx512.pmaddubs.w.512", 256: "llvm.x86.avx2.pmadd.ub.sw"}


@functools.lru_cache(maxsize=None)
def pmaddwd_intrinsic(bits: int, acc: str = "int32") -> str:
    """Register (once) and name the int16 pair dot for `bits`-wide registers, accumulating in `acc`: int32, or
    uint32 for sums that may wrap (exact modulo 2^32: a Winograd conv's transformed sums)."""
    name = f"hawq_pmaddwd_16x2_{bits}" + ("" if acc == "int32" else f"_{acc}")
    parts = 512 // bits            # 16 int32 lanes in one zmm or two ymm
    lanes = 16 // parts            # int32 lanes per register

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((2,), "int16", offset_factor=1), B: T.Buffer((16, 2), "int16", offset_factor=1),
             C: T.Buffer((16,), acc, offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:2], B[0:16, 0:2])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32"), acc)

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((2,), "int16", offset_factor=1), B: T.Buffer((16, 2), "int16", offset_factor=1),
             C: T.Buffer((16,), acc, offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:2], B[0:16, 0:2])
            T.writes(C[0:16])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "int16x2"), dtype="int32"), lanes),
                              dtype=f"int16x{2 * lanes}")
            for p in T.unroll(parts):
                C[T.ramp(p * lanes, 1, lanes)] = C.vload([p * lanes], dtype=f"{acc}x{lanes}") + T.reinterpret(
                    T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(_PMADDWD[bits]), a,
                                            B.vload([p * lanes, 0], dtype=f"int16x{2 * lanes}"),
                                            dtype=f"int32x{lanes}"), dtype=f"{acc}x{lanes}")

    TensorIntrin.register(name, desc, impl, override=True)
    return name


# ------------------------------------------ vpmaddubsw: C[16] += sum_g A[g, 4] . B[g, 16, 4], int16 partial sums

@functools.lru_cache(maxsize=None)
def pmaddubsw_intrinsic(bits: int, group: int) -> str:
    """Register (once) and name the u8 x s8 dot of `group` steps summed in int16, for `bits`-wide registers.
    The caller guarantees `group <= int16_sum_limit(...)` of its operands (`choose_dot`)."""
    name = f"hawq_pmaddubsw_16x4x{group}_{bits}"
    parts = 512 // bits
    lanes = 16 // parts            # int32 output lanes per register
    n8, n16 = 4 * lanes, 2 * lanes  # bytes / int16 per register

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((group * 4,), "uint8", offset_factor=1),
             B: T.Buffer((group, 16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:group * 4], B[0:group, 0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for g in T.serial(0, group):
                    for k in T.serial(0, 4):
                        with T.sblock("update"):
                            vi, vg, vk = T.axis.remap("SRR", [i, g, k])
                            C[vi] = C[vi] + T.cast(A[vg * 4 + vk], "int32") * T.cast(B[vg, vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def desc_single(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((1, 16, 4), "int8", offset_factor=1),
                    C: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        # one step: the loop over steps is gone from the schedule (a split by 1 is simplified away)
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:1, 0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[0, vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def impl(A: T.Buffer((group * 4,), "uint8", offset_factor=1),
             B: T.Buffer((group, 16, 4), "int8", offset_factor=1),
             C: T.Buffer((16,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:group * 4], B[0:group, 0:16, 0:4])
            T.writes(C[0:16])
            part = T.alloc_buffer((n16,), "int16", scope="local")
            for p in T.unroll(parts):
                part[T.ramp(0, 1, n16)] = T.broadcast(T.int16(0), n16)
                for g in T.unroll(group):
                    part[T.ramp(0, 1, n16)] = part.vload([0], dtype=f"int16x{n16}") + T.call_llvm_pure_intrin(
                        T.llvm_lookup_intrinsic_id(_PMADDUBSW[bits]),
                        T.reinterpret(T.broadcast(T.reinterpret(A.vload([g * 4], "uint8x4"), dtype="int32"), lanes),
                                      dtype=f"uint8x{n8}"),
                        B.vload([g, p * lanes, 0], dtype=f"int8x{n8}"), dtype=f"int16x{n16}")
                C[T.ramp(p * lanes, 1, lanes)] = C.vload([p * lanes], dtype=f"int32x{lanes}") + \
                    T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id(_PMADDWD[bits]),
                                            part.vload([0], dtype=f"int16x{n16}"),
                                            T.broadcast(T.int16(1), n16), dtype=f"int32x{lanes}")

    TensorIntrin.register(name, desc if group > 1 else desc_single, impl, override=True)
    return name
