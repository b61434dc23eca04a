"""The requantize at a kernel's output tile, 16 int32 lanes at a time (AVX2 or AVX-512), as a TensorIR intrinsic.

The program's requantize is t = (z * b + 2^(c-1)) >> c in int64 (`hawq_ray.program.dyadic`). Written lane by
lane, LLVM widens the 16 int32 lanes of z into two vectors of 8 int64, multiplies, adds, shifts each and narrows
both back (11 instructions a vector). With every shift c >= 31 and every multiplier b < 2^31 the result of an
int32 z lies in int32, and the same integers come from 7: read the 16 lanes as 8 int64 words, so the even lanes
are the low halves (which `vpmuldq` sign-extends and multiplies as they are) and the odd lanes the high halves
(one shift by 32); add the rounding constant to each product P; the result is the high half of P + 2^(c-1)
(shifted left once first where c = 31) shifted right by c - 32, since floor(floor(x / 2^32) / 2^(c-32)) =
floor(x / 2^c) and |P + 2^(c-1)| < 2^62 leaves room for the left shift. One permute puts the high halves of
both products back in lane order (`vpermt2d`), one 16-lane shift finishes (`vpsravd`). On AVX2, which has
no 64-bit arithmetic shift, the same expression lowers to `vpmuldq` on ymm halves and a blend; lane by lane
LLVM emulates that shift for every int64 product (MobileNet V2's 1x1 conv from 16 to 96 channels at 112x112,
batch 8, for haswell: 4.6 ms lane by lane, 3.7 ms with this stage, 2.7 ms with no epilogue at all).

The constants are per channel, 16 lanes of a channel block: the multipliers, the multiplier of each odd lane
moved to the even lane before it (so the odd product reads it as a low half), the two rounding constants and the
two left shifts as int64 words, and the right shift. The stage is an opaque call that only the intrinsic
implements (`hawq_lane_requantize(z, consts...)`); the requantize's clamp follows it lane by lane.
"""
from __future__ import annotations

import functools

import numpy as np
import tvm
from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

LANES = 16
MARKER = "hawq_lane_requantize"

STAGE = "lane_requantize"    # the block of the tensorized stage
CONSTS = ("mult", "mult_odd", "round_even", "round_odd", "up_even", "up_odd", "down")


def lane_constants(b, c, channels: int) -> dict | None:
    """The intrinsic's int32 constants (`CONSTS`), one per lane of the channel blocks (`channels` rounded up to
    16: the two halves of an int64 word sit in two lanes, so a padding lane holds half of a real channel's
    word), for multipliers `b` and shifts `c` that do not vary over H and W; None where the fast form does
    not apply (a shift below 31, a multiplier of 2^31 or more, a constant per position)."""
    b, c = np.asarray(b, np.int64), np.asarray(c, np.int64)
    if not (_per_channel(b, channels) and _per_channel(c, channels)):
        return None
    padded = -(-channels // LANES) * LANES
    b, c = (np.pad(np.broadcast_to(v.reshape(-1), (channels,)), (0, padded - channels), mode="edge") for v in (b, c))
    if np.any(c < 31) or np.any(c > 62) or np.any(b <= 0) or np.any(b >= 1 << 31):
        return None
    lane = np.arange(padded)
    even, odd = lane & ~1, lane | 1          # the int64 word (of the even or the odd lane) a lane holds half of
    rnd, up = np.int64(1) << (c - 1), np.maximum(32 - c, 0)

    def halves(v, of):          # the low half of v[of] in even lanes, the high half in odd lanes, as int32 bits
        return np.where(lane % 2 == 0, v[of] & 0xFFFFFFFF, v[of] >> 32).astype(np.uint32).view(np.int32)
    return {"mult": b, "mult_odd": b[odd], "round_even": halves(rnd, even), "round_odd": halves(rnd, odd),
            "up_even": halves(up, even), "up_odd": halves(up, odd), "down": np.maximum(c - 32, 0)}


def _per_channel(a: np.ndarray, channels: int) -> bool:
    """One value, or one per channel of an (N, C, H, W) value: shape (C,) or (C, 1, 1)."""
    return a.size == 1 or (a.shape[0] == channels and a.size == channels and a.ndim in (1, 3))


def lane_requantize(z, consts: list):
    """The stage's expression: z (int32) and the constants of `CONSTS` at the same lane."""
    return tvm.tirx.call_pure_extern("int32", MARKER, z, *consts)


def tensorize_lane_requantize(sch, block, up: bool, scope: str) -> None:
    """Tensorize the innermost loop (16 lanes) of `block`, a stage of `lane_requantize`s in `scope` that reads
    a buffer of that scope; `up`: some shift is 31 (the products are shifted left where it is)."""
    sch.tensorize(sch.get_loops(block)[-1], lane_requantize_intrinsic(up, scope))


def _words(buf):
    return T.reinterpret(buf.vload([0], "int32x16"), dtype="int64x8")


def _low(v):      # the low half sign-extended: the operand vpmuldq reads
    return (v << T.Broadcast(T.int64(32), 8)) >> T.Broadcast(T.int64(32), 8)


def _high_halves(up: bool, z, M, MO, RE, RO, UE, UO):
    """16 lanes: the high half of each lane's rounded product (shifted left by `UE` / `UO` with `up`)."""
    def product(z, mult, rnd, shift_up):
        p = z * _low(_words(mult)) + _words(rnd)
        return p << _words(shift_up) if up else p
    even = product(_low(z), M, RE, UE)
    odd = product(z >> T.Broadcast(T.int64(32), 8), MO, RO, UO)
    return T.reinterpret((odd & T.Broadcast(T.int64(-4294967296), 8)) |
                         ((even >> T.Broadcast(T.int64(32), 8)) & T.Broadcast(T.int64(4294967295), 8)),
                         dtype="int32x16")


def _intrinsic_func(scope: str, up: bool | None):
    """The description (`up` None: the opaque call lane by lane) or the implementation, written as one
    expression (a named intermediate of TVMScript becomes a buffer, allocated per call)."""
    describe = up is None

    @T.prim_func(s_tir=True)
    def func(Z: T.Buffer((LANES,), "int32", offset_factor=1, scope=scope),
             M: T.Buffer((LANES,), "int32", offset_factor=1), MO: T.Buffer((LANES,), "int32", offset_factor=1),
             RE: T.Buffer((LANES,), "int32", offset_factor=1), RO: T.Buffer((LANES,), "int32", offset_factor=1),
             UE: T.Buffer((LANES,), "int32", offset_factor=1), UO: T.Buffer((LANES,), "int32", offset_factor=1),
             D: T.Buffer((LANES,), "int32", offset_factor=1),
             O: T.Buffer((LANES,), "int32", offset_factor=1, scope=scope)) -> None:
        with T.sblock("root"):
            T.reads(Z[0:LANES], M[0:LANES], MO[0:LANES], RE[0:LANES], RO[0:LANES], UE[0:LANES], UO[0:LANES],
                    D[0:LANES])
            T.writes(O[0:LANES])
            if describe:
                for i in T.serial(0, LANES):
                    with T.sblock("update"):
                        vi = T.axis.remap("S", [i])
                        O[vi] = T.call_pure_extern("int32", MARKER, Z[vi], M[vi], MO[vi], RE[vi], RO[vi], UE[vi],
                                                   UO[vi], D[vi])
            else:
                O[T.ramp(0, 1, LANES)] = _high_halves(up, _words(Z), M, MO, RE, RO, UE, UO) >> \
                    D.vload([0], "int32x16")
    return func


@functools.lru_cache(maxsize=None)
def lane_requantize_intrinsic(up: bool, scope: str) -> str:
    name = f"hawq_lane_requantize_16_{scope}{'_up' if up else ''}"
    TensorIntrin.register(name, _intrinsic_func(scope, None), _intrinsic_func(scope, up), override=True)
    return name
