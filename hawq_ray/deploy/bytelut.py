"""A 256-entry table of bytes read 16 lanes at a time (AVX512-VBMI `vpermi2b`), as a TensorIR intrinsic.

A lookup-table activation (`hawq_ray.ops.lookup`: SiLU, sigmoid, hardswish...) at a kernel's output tile is a
load at a computed index per lane; LLVM writes such a load as one scalar load per lane (16 extracts, loads and
inserts for a vector). The table's 256 entries are 8-bit codes, so 4 zmm registers hold it: `vpermi2b` picks a
byte from 128 of them by the index's low 7 bits, one call for each half, and the index's top bit selects
between the two results. The intrinsic reads 16 int32 indices in [0, 255] and writes 16 table entries.

TensorIR cannot match a description whose load index is itself a load (`Tab[I[i]]`), so the read is written as
an opaque call, `hawq_byte_table(Tab[0], I[i])`, which names both buffers and which only this intrinsic
implements; the block is told that it reads the whole table.
"""
from __future__ import annotations

import functools

import tvm
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T
from tvm.tirx.function import IndexMap

LANES = 16
ENTRIES = 256
MARKER = "hawq_byte_table"


def table_read(table, index):
    """The expression of `table` (a 256-entry placeholder) at the int32 expression `index`, for a stage that
    `tensorize_table_read` then schedules."""
    return tvm.tirx.call_pure_extern(table.dtype, MARKER, table[0], index)


def tensorize_table_read(sch, block, dtype: str) -> None:
    """Tensorize the innermost loop (16 lanes) of `block`, a stage of `table_read`s."""
    from tvm.s_tir.schedule import _ffi_api
    reads = [r.source.name for r in sch.get(block).reads]
    whole = IndexMap(initial_indices=[v.var for v in sch.get(block).iter_vars],
                     final_indices=[tvm.tirx.const(0, "int32"), tvm.tirx.const(ENTRIES, "int32")],
                     inverse_index_map=None)
    # the table's region as the whole table, not the point Tab[0] that the call's argument reads
    _ffi_api.ScheduleAnnotateBufferAccess(sch, block, reads.index("byte_table"), 0, whole)
    sch.tensorize(sch.get_loops(block)[-1], byte_table_intrinsic(dtype))


def _desc(dtype: str):
    @T.prim_func(s_tir=True)
    def desc(I: T.Buffer((LANES,), "int32", offset_factor=1, scope="local"),
             Tab: T.Buffer((ENTRIES,), dtype, offset_factor=1),
             O: T.Buffer((LANES,), dtype, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(Tab[0:ENTRIES], I[0:LANES])
            T.writes(O[0:LANES])
            for i in T.serial(0, LANES):
                with T.sblock("update"):
                    vi = T.axis.remap("S", [i])
                    T.reads(Tab[0:ENTRIES], I[vi])
                    T.writes(O[vi])
                    O[vi] = T.call_pure_extern(dtype, MARKER, Tab[0], I[vi])
    return desc


def _impl(dtype: str):
    bytes64 = f"{dtype}x64"

    def half(tab, start: int, idx):
        lo = T.reinterpret(tab.vload([start], bytes64), dtype="int8x64")
        hi = T.reinterpret(tab.vload([start + 64], bytes64), dtype="int8x64")
        return T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpermi2var.qi.512"),
                                       lo, idx, hi, dtype="int8x64")

    @T.prim_func(s_tir=True)
    def impl(I: T.Buffer((LANES,), "int32", offset_factor=1, scope="local"),
             Tab: T.Buffer((ENTRIES,), dtype, offset_factor=1),
             O: T.Buffer((LANES,), dtype, offset_factor=1)) -> None:
        with T.sblock("root"):
            T.reads(Tab[0:ENTRIES], I[0:LANES])
            T.writes(O[0:LANES])
            idx16 = T.Cast("int8x16", I.vload([0], "int32x16"))        # indices < 256: the low byte
            idx = T.Shuffle([idx16, idx16, idx16, idx16], [T.int32(i) for i in range(64)])
            picked = T.Select(idx < T.Broadcast(T.int8(0), 64), half(Tab, 128, idx), half(Tab, 0, idx))
            O[T.ramp(0, 1, LANES)] = T.reinterpret(T.Shuffle([picked], [T.int32(i) for i in range(LANES)]),
                                                   dtype=f"{dtype}x{LANES}")
    return impl


@functools.lru_cache(maxsize=None)
def byte_table_intrinsic(dtype: str) -> str:
    """The registered name of the 16-lane lookup into a table of `dtype` (int8 or uint8) entries."""
    name = f"hawq_byte_table_16_{dtype}"
    TensorIntrin.register(name, _desc(dtype), _impl(dtype), override=True)
    return name
