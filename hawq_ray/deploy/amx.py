"""Intel AMX (`tdpbusd`, u8 x s8 -> s32 on 16 x 16 tiles) for stride-1 convs on NCHW16c inputs.

The padded input is stored row by row with row stride WS = OWp + KW - 1 (OWp: the output width rounded up to
16), so output position (h, w) reads input position (h + kh) * WS + w + kw: 16 consecutive output columns
are 16 rows 16 bytes apart -- one A tile of K = 16 channels (one channel block), straight from the NCHW16c
layout. B is the packed weight block of one (channel block, kh, kw) tap: 4 rows of 16 output channels x 4
bytes, exactly the VNNI packing. One intrinsic call computes 2 output rows x 16 columns x 32 channels (four C
tiles; two A and two B tiles per tap) over the whole reduction, so the accumulators stay in tile registers;
the epilogue then runs on that block, as on a VNNI register tile.

Linux hands out the tile registers per process on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`):
`enable_amx()` asks once; a process that runs an AMX kernel without it dies of SIGILL, so every runner here
(`DeployedModel`, `compile_kernel`) asks first, and `target.capabilities` says no AMX where it is refused.
"""
from __future__ import annotations

import ctypes
import functools

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

ROWS = 16          # output columns per A tile
PX_TILES = 2       # A tiles (output rows) per intrinsic call
OC_TILES = 2       # B tiles (blocks of 16 output channels) per intrinsic call


@functools.lru_cache(maxsize=1)
def enable_amx() -> bool:
    """Ask Linux for this process's AMX tile data (arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(158, 0x1023, 18) == 0      # SYS_arch_prctl on x86-64
    except (OSError, AttributeError):
        return False


MIN_IN_BLOCKS = 8   # input channel blocks (x 16 channels) below which the VNNI tile is faster


def amx_conv_applies(x_dtype: str, in_blocks: int, block: int, kernel: tuple, stride: tuple, dilation: tuple,
                     groups: int, out_width: int, out_blocks: int) -> bool:
    """Stride-1 convs on uint8 NCHW16c inputs with at least MIN_IN_BLOCKS channel blocks (a call's fixed
    costs -- tile configuration, zeroing, stores, the epilogue -- need a long reduction: on resnet18 the
    64-channel convs ran 10% slower than VNNI, the 128- and 256-channel ones 15-35% faster), an output width
    that wastes at most 15% when rounded up to 16 (56, 28, 14 do; 7 would compute 16 columns for 7), and
    output channel blocks that pair up. Both window sides exceed 1 (TensorIR leaves a unit window loop out of
    the block the intrinsic must match: 1x1, 1x7 and 7x1 convs stay on VNNI)."""
    return x_dtype == "uint8" and block == 16 and in_blocks >= MIN_IN_BLOCKS and min(kernel) > 1 \
        and tuple(stride) == (1, 1) \
        and tuple(dilation) == (1, 1) and groups == 1 and -(-out_width // ROWS) * ROWS <= 1.15 * out_width \
        and out_blocks % OC_TILES == 0


@functools.lru_cache(maxsize=None)
def conv_intrinsic(cb: int, kh: int, kw: int, ws: int) -> str:
    """Register (once per shape) the intrinsic for one (2 rows x 16 columns x 32 channels) block over the whole
    reduction of a conv with `cb` input channel blocks, a kh x kw window and input row stride `ws`."""
    name = f"hawq_amx_conv_c{cb}_k{kh}x{kw}_s{ws}"
    span = (PX_TILES - 1 + kh - 1) * ws + ROWS + kw - 1    # input positions one block reads

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, b: T.handle, c: T.handle) -> None:
        A = T.match_buffer(a, (cb, span, 16), "uint8", offset_factor=1)
        B = T.match_buffer(b, (OC_TILES, cb, kh, kw, 4, 16, 4), "int8", offset_factor=1)
        C = T.match_buffer(c, (OC_TILES, PX_TILES, ROWS, 16), "int32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:OC_TILES, 0:PX_TILES, 0:ROWS, 0:16], A[0:cb, 0:span, 0:16],
                    B[0:OC_TILES, 0:cb, 0:kh, 0:kw, 0:4, 0:16, 0:4])
            T.writes(C[0:OC_TILES, 0:PX_TILES, 0:ROWS, 0:16])
            for ob, t, i, oi, ico, r, s, icm, ici in T.grid(OC_TILES, PX_TILES, ROWS, 16, cb, kh, kw, 4, 4):
                with T.sblock("update"):
                    vob, vt, vi, voi, vico, vr, vs, vicm, vici = T.axis.remap(
                        "SSSSRRRRR", [ob, t, i, oi, ico, r, s, icm, ici])
                    C[vob, vt, vi, voi] = C[vob, vt, vi, voi] + T.Cast(
                        "int32", A[vico, (vt + vr) * ws + vi + vs, vicm * 4 + vici]) \
                        * T.Cast("int32", B[vob, vico, vr, vs, vicm, voi, vici])

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, b: T.handle, c: T.handle) -> None:
        sa0 = T.int32()
        sa1 = T.int32()
        sb0 = T.int32()
        sb1 = T.int32()
        sc0 = T.int32()
        sc1 = T.int32()
        sc2 = T.int32()
        A = T.match_buffer(a, (cb, span, 16), "uint8", strides=[sa0, sa1, 1], offset_factor=1)
        B = T.match_buffer(b, (OC_TILES, cb, kh, kw, 4, 16, 4), "int8",
                           strides=[sb0, sb1, kw * 256, 256, 64, 4, 1], offset_factor=1)
        C = T.match_buffer(c, (OC_TILES, PX_TILES, ROWS, 16), "int32", strides=[sc0, sc1, sc2, 1],
                           offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:OC_TILES, 0:PX_TILES, 0:ROWS, 0:16], A[0:cb, 0:span, 0:16],
                    B[0:OC_TILES, 0:cb, 0:kh, 0:kw, 0:4, 0:16, 0:4])
            T.writes(C[0:OC_TILES, 0:PX_TILES, 0:ROWS, 0:16])
            cfg = T.alloc_buffer((64,), "uint8", scope="local")
            for i in range(64):
                cfg[i] = T.uint8(0)
            cfg[0] = T.uint8(1)                                  # palette 1
            for t in T.unroll(4):                                   # tiles 0-3: C, 16 rows x 64 bytes
                cfg[16 + 2 * t] = T.uint8(64)
                cfg[48 + t] = T.uint8(16)
            for t in T.unroll(4, 6):                                # tiles 4-5: A, 16 rows x 16 bytes
                cfg[16 + 2 * t] = T.uint8(16)
                cfg[48 + t] = T.uint8(16)
            for t in T.unroll(6, 8):                                # tiles 6-7: B, 4 rows x 64 bytes
                cfg[16 + 2 * t] = T.uint8(64)
                cfg[48 + t] = T.uint8(4)
            T.evaluate(T.call_llvm_intrin("void", "llvm.x86.ldtilecfg", cfg.access_ptr("r")))
            for t in T.unroll(4):
                T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilezero", T.uint8(t)))
            for ico, r, s in T.grid(cb, kh, kw):
                for t in T.unroll(PX_TILES):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.uint8(4 + t),
                                                  A.access_ptr("r", offset=ico * sa0 + ((t + r) * ws + s) * sa1),
                                                  T.int64(16)))
                for t in T.unroll(OC_TILES):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tileloadd64", T.uint8(6 + t),
                                                  B.access_ptr("r", offset=t * sb0 + ico * sb1 + (r * kw + s) * 256),
                                                  T.int64(64)))
                for tp in T.unroll(PX_TILES):
                    for to in T.unroll(OC_TILES):
                        T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tdpbusd", T.uint8(tp * OC_TILES + to),
                                                      T.uint8(4 + tp), T.uint8(6 + to)))
            for tp in T.unroll(PX_TILES):
                for to in T.unroll(OC_TILES):
                    T.evaluate(T.call_llvm_intrin("void", "llvm.x86.tilestored64", T.uint8(tp * OC_TILES + to),
                                                  C.access_ptr("w", offset=to * sc0 + tp * sc1),
                                                  T.Cast("int64", sc2 * 4)))

    TensorIntrin.register(name, desc, impl, override=True)
    return name
