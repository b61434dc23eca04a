"""Random IntegerPrograms, for checking a back end against the integer executor on the pattern space.

Whole-model checks only see the patterns their models happen to contain: a conv reading a concatenation
through a fused requantize (SqueezeNet's fire modules) passed through every one of them. `random_program(seed)`
builds a small random program around one producer -> consumer pair of op kinds (`PAIRS`: every program op
of the registry as the producer and as the consumer of every other kind where the ranks allow; a lookup, a
product or a layer reads a producer too wide for it through a requantize, as in every lowered model), with random
context before and after it, fan-out, mixed 4/8-bit weights, grouped and depthwise convs, maps resized (nearest
or bilinear, up or down, with torch's taps) and their channels gathered by random indices, and requantize
constants calibrated on the values the program computes (so values are neither all clamped nor all zero).
The transformer's ops take values of every rank: a reshape to a random factorization of a sample's size, a
permute that may move the batch axis, a cyclic shift (roll), a pad with zeros and a crop along axes after the
first, a take along any axis, a constant of a value's shape (or its own), a product of two 8-bit values over
their last two axes (x @ y^T, or x @ a value of fitting shape; s8 and u8 operands), a softmax over the last axis
of int16 codes, a LayerNorm (centered or not: RMSNorm) over any axis after the first (tokens: the last). Every
value's integer range is derived soundly (`ranges.derived_range`) while building, so each program obeys the
IntegerProgram's INT32 contract: no accumulator, sum or product leaves int32 (a resize's sums of taps aside: int64
in its semantics, and a model resizes a conv's INT32 accumulator, as tests/test_resize.py's `Pyramid` does).

`analysis.verify.check_random_program(seed, target)` compiles one with every stored value returned and
compares each value with the integer executor on two int8 batches; `tests/test_random_programs.py` runs a
fixed-seed set in the suite and `bench/random_programs.py` a larger sweep.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from hawq_ray.program.dyadic import dyadic
from hawq_ray.program.executor import run_op
from hawq_ray.program.program import INT32_MAX, INT32_MIN, IntegerProgram, Op
from hawq_ray.program.ranges import derived_range

# the program ops this generator builds (a test holds it to the registry: a new op needs a builder here)
OPS = ("conv2d", "dense", "requantize", "relu", "add", "concat", "sum_pool2d", "max_pool2d", "flatten", "clamp",
       "lookup", "mul", "affine", "channel_shuffle", "slice", "layer_norm", "reshape", "permute", "take",
       "constant", "matmul", "softmax", "roll", "pad", "crop", "resize", "channel_gather")

NEEDS_RANK4 = ("conv2d", "sum_pool2d", "max_pool2d", "channel_shuffle", "slice", "resize",   # consumers of
               "channel_gather")                                                            # (N, C, H, W)
NEEDS_RANK2 = ("dense",)                               # consumers of a (N, F) value
MAKES_RANK4 = ("conv2d", "sum_pool2d", "max_pool2d", "channel_shuffle", "slice", "resize",   # producers of
               "channel_gather")                                                            # rank 4 only
MAKES_RANK2 = ("dense", "flatten")                     # producers of rank 2 only
NARROWED = ("lookup", "mul", "conv2d", "dense",   # consumers that read a wide producer through a requantize
            "layer_norm", "matmul", "softmax")    # (as every layer and table of a lowered model does)
NEEDS_AXES = ("take", "permute", "matmul", "concat", "layer_norm", "roll", "pad", "crop")   # of rank >= 2 values
ANY_RANK = ("reshape", "permute", "take", "constant", "matmul")   # builders given the output rank wanted
PAIRS = [(p, c) for p in OPS for c in OPS
         if not (p in MAKES_RANK2 and c in NEEDS_RANK4) and not (p in MAKES_RANK4 and c in NEEDS_RANK2)]
SAFE = (1 << 30)        # bound on |value| of every op (int32 with a margin for the back end's bias folding)
CLAMPS = ((0, 255), (-128, 127), (0, 15), (-8, 7), None)   # None: a wide (16-bit scale) requantize, no clamp


@dataclass
class RandomProgram:
    program: IntegerProgram
    inputs: list                 # int8 batches (N, C, H, W) to run it on
    pair: tuple                  # the (producer, consumer) op kinds it was built around
    notes: dict = field(default_factory=dict)


class _Builder:
    """Emits ops while running them (the executor's semantics) on a sample batch, tracking each value's sound
    integer range, so constants can be chosen from real magnitudes and INT32 is never left."""

    def __init__(self, rng: np.random.Generator, x: np.ndarray, wide: bool):
        self.rng, self.wide = rng, wide
        self.ops: list[Op] = []
        self.env = {"input": torch.from_numpy(x.astype(np.int64))}
        self.range = {"input": (-128, 127)}
        self.declared = {"input": (-128, 127)}
        self.readers = {"input": 0}

    # ------------------------------------------------------------------ bookkeeping
    def shape(self, name):
        return tuple(self.env[name].shape)

    def values(self, rank=None, exclude_input=True):
        return [n for n in self.env if (rank is None or len(self.shape(n)) == rank)
                and not (exclude_input and n == "input")]

    def emit(self, kind, inputs, attrs=None, consts=None, lo=INT32_MIN, hi=INT32_MAX, layer=None) -> str | None:
        name = f"v{len(self.ops)}_{kind}"
        op = Op(kind, list(inputs), name, attrs=attrs or {}, consts=consts or {}, layer=layer, lo=lo, hi=hi)
        rlo, rhi = derived_range(op, [self.range[i] for i in inputs])
        rlo, rhi = max(rlo, lo), min(rhi, hi)
        if max(abs(rlo), abs(rhi)) >= SAFE:
            return None
        out = run_op(op, [self.env[i] for i in inputs])
        if out.numel() == 0:
            return None
        self.ops.append(op)
        self.env[name], self.range[name], self.declared[name] = out, (rlo, rhi), (lo, hi)
        self.readers[name] = 0
        for i in inputs:
            self.readers[i] += 1
        return name

    def pick(self, rank=None, prefer_unread=True):
        names = self.values(rank)
        if not names:
            return None
        unread = [n for n in names if self.readers[n] == 0]
        pool = unread if prefer_unread and unread and self.rng.random() < 0.7 else names
        return pool[int(self.rng.integers(len(pool)))]

    def partner(self, name, same: str):
        """Another value to add to (`same`='shape') or concatenate with (`same`='spatial') `name`; or itself."""
        key = (lambda s: s) if same == "shape" else (lambda s: (s[0], *s[2:]))
        want = key(self.shape(name))
        cands = [n for n in self.values(len(self.shape(name))) if n != name and key(self.shape(n)) == want]
        if cands and self.rng.random() < 0.8:
            return cands[int(self.rng.integers(len(cands)))]
        if self.rng.random() < 0.5:     # a sibling of the same shape: a requantize of the value
            sib = self.requantize(name)
            if sib is not None:
                return sib
        return name

    # ------------------------------------------------------------------ ops
    def _weights(self, shape, w_bits):
        lim = 1 << (w_bits - 1)
        return self.rng.integers(-lim, lim, shape).astype(np.int8)

    def _linear(self, kind, x, shape, attrs, w_bits):
        """conv2d / dense with random weights, halved until the output's range fits (then a requantize
        narrows the input instead)."""
        w = self._weights(shape, w_bits)
        lo, hi = self.range[x]
        span = max(abs(lo), abs(hi), 1)
        bias = self.rng.integers(-1, 2, shape[0]) * self.rng.integers(0, 1 + min(span * 64, 1 << 24), shape[0])
        attrs = {**attrs, "w_bits": w_bits, "x_bits": 8, "x_signed": bool(lo < 0)}
        consts = {"weight": w, "bias": bias.astype(np.int32)}
        for _ in range(12):
            out = self.emit(kind, [x], attrs, consts, layer=f"layer{len(self.ops)}")
            if out is not None:
                return out
            consts = {"weight": (consts["weight"] // 2).astype(np.int8), "bias": consts["bias"] // 2}
        narrow = self.requantize(x, clamp=(0, 255))
        return None if narrow is None else self._linear(kind, narrow, shape, attrs, w_bits)

    def conv2d(self, x):
        n, c, h, w = self.shape(x)
        rng = self.rng
        if self.wide and c >= 128 and rng.random() < 0.5:   # the shape AMX tiles take (3x3, stride 1, even blocks)
            attrs = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
            return self._linear("conv2d", x, (int(rng.choice([64, 96, 128])), c, 3, 3), attrs, 8)
        k = [(1, 1), (2, 2), (3, 3), (3, 3), (5, 5), (7, 7), (1, 3), (3, 1)][int(rng.integers(8))]
        stride = [(1, 1), (1, 1), (2, 2), (2, 1)][int(rng.integers(4))]
        dilation = (2, 2) if rng.random() < 0.15 else (1, 1)
        span = [dilation[i] * (k[i] - 1) + 1 for i in range(2)]
        if span[0] > h + 2 * (span[0] // 2) or span[1] > w + 2 * (span[1] // 2):
            k, span, dilation = (1, 1), [1, 1], (1, 1)
        pad = tuple(int(rng.integers(0, span[i] // 2 + 1)) for i in range(2))
        if any((h, w)[i] + 2 * pad[i] < span[i] for i in range(2)):
            pad = tuple(span[i] // 2 for i in range(2))
        groups, out = 1, self._channels()
        r = rng.random()
        if r < 0.15:
            groups, out = c, c * int(rng.integers(1, 3))            # depthwise (multiplier 1 or 2)
        elif r < 0.25:
            g = [d for d in (2, 3, 4, 8) if c % d == 0]
            if g:
                groups = g[int(rng.integers(len(g)))]
                out = groups * max(1, out // groups)
        w_bits = 8 if x == "input" else int(rng.choice([4, 8]))
        attrs = {"stride": stride, "padding": pad, "dilation": dilation, "groups": groups}
        return self._linear("conv2d", x, (out, c // groups, *k), attrs, w_bits)

    def dense(self, x):
        return self._linear("dense", x, (self._channels(), self.shape(x)[1]), {}, int(self.rng.choice([4, 8])))

    def _channels(self):
        if self.wide:      # 64..96 (a concat of two is AMX-sized), or 128 (AMX-sized on its own)
            return int(self.rng.integers(64, 97)) if self.rng.random() < 0.75 else 128
        return int(self.rng.choice([1, 3, 8, 12, 16, 20, 24, 32, 40]))

    def requantize(self, x, clamp="random"):
        v = self.env[x].to(torch.float64).abs()
        shape = self.shape(x)
        per = self.rng.choice(["tensor", "channel", "position"] if len(shape) == 4 else
                              ["tensor", "channel", "feature"] if len(shape) >= 3 else
                              ["tensor", "channel"] if len(shape) == 2 else ["tensor"])
        if per == "channel" and len(shape) == 4:
            amax = v.amax(dim=(0, 2, 3)).reshape(-1, 1, 1)
        elif per == "feature":          # one per feature of tokens: (1, ..., 1, C), as after a Linear over tokens
            amax = v.amax(dim=tuple(range(len(shape) - 1))).reshape((1,) * (len(shape) - 1) + (-1,))
        elif per == "channel":
            amax = v.amax(dim=0)
        elif per == "position":
            amax = v.amax(dim=(0, 1)).reshape(1, *shape[2:])
        else:
            amax = v.max()
        if clamp == "random":
            clamp = CLAMPS[int(self.rng.integers(len(CLAMPS)))]
        top = (1 << 15) if clamp is None else max(abs(clamp[0]), clamp[1])
        spread = self.rng.uniform(0.6, 1.6, tuple(amax.shape))     # some values saturate, most do not
        mult, shift = dyadic(top / (np.maximum(amax.numpy(), 1.0) * spread))
        consts = {"multiplier": mult.astype(np.int32), "shift": shift.astype(np.int32)}
        lo, hi = clamp if clamp is not None else (INT32_MIN, INT32_MAX)
        return self.emit("requantize", [x], consts=consts, lo=lo, hi=hi)

    def relu(self, x):
        lo, hi = self.declared[x]
        return self.emit("relu", [x], lo=max(lo, 0), hi=hi)

    def add(self, x):
        return self.emit("add", [x, self.partner(x, "shape")])

    def concat(self, x):
        if len(self.shape(x)) < 2:
            return None
        parts = [x, self.partner(x, "spatial")]
        if self.rng.random() < 0.3:
            parts.append(self.partner(x, "spatial"))
        order = self.rng.permutation(len(parts))
        return self.emit("concat", [parts[i] for i in order], attrs={"axis": 1})

    def _window(self, x, dilated: bool):
        _, _, h, w = self.shape(x)
        k = int(self.rng.integers(2, 4))
        d = 2 if dilated and self.rng.random() < 0.25 else 1
        if d * (k - 1) + 1 > min(h, w):
            k, d = min(2, h, w), 1
        s = int(self.rng.integers(1, 4))
        p = int(self.rng.integers(0, k // 2 + 1))
        return (k, k), (s, s), (p, p), (d, d), bool(self.rng.random() < 0.4)

    def sum_pool2d(self, x):
        _, _, h, w = self.shape(x)
        if self.rng.random() < 0.2:       # adaptive: unequal, overlapping or repeated windows
            out = (int(self.rng.integers(1, h + 3)), int(self.rng.integers(1, w + 3)))
            kernel = tuple(max(-(-((i + 1) * n) // o) - (i * n) // o for i in range(o)) for n, o in zip((h, w), out))
            return self.emit("sum_pool2d", [x], {"adaptive": out, "kernel": kernel})
        if self.rng.random() < 0.3:       # global: the whole map
            k, s, p, ceil = (h, w), (h, w), (0, 0), False
        else:
            k, s, p, _, ceil = self._window(x, dilated=False)
        return self.emit("sum_pool2d", [x], {"kernel": k, "stride": s, "padding": p, "ceil_mode": ceil})

    def max_pool2d(self, x):
        k, s, p, d, ceil = self._window(x, dilated=True)
        lo, hi = self.declared[x]
        return self.emit("max_pool2d", [x], {"kernel": k, "stride": s, "padding": p, "dilation": d,
                                             "ceil_mode": ceil}, lo=lo, hi=hi)

    def flatten(self, x):
        lo, hi = self.declared[x]
        return self.emit("flatten", [x], lo=lo, hi=hi)

    def _per_channel(self, x, draw):
        """A constant per tensor or per channel of x (shaped to broadcast against it), values from `draw`."""
        shape = self.shape(x)
        if self.rng.random() < 0.5 or len(shape) < 2:
            return np.asarray(draw(()), np.int64)
        if len(shape) == 3 and self.rng.random() < 0.5:      # per feature of tokens (N, T, C)
            return np.asarray(draw((shape[2],)), np.int64).reshape(1, 1, -1)
        return np.asarray(draw((shape[1],)), np.int64).reshape((-1,) + (1,) * (len(shape) - 2))

    def clamp(self, x):
        lo, hi = self.range[x]
        span = max(hi - lo, 1)
        a = self._per_channel(x, lambda n: lo + self.rng.integers(0, span // 2 + 1, n))
        b = a + self._per_channel(x, lambda n: self.rng.integers(0, span + 1, n))
        return self.emit("clamp", [x], consts={"lo": a.astype(np.int32), "hi": b.astype(np.int32)})

    def lookup(self, x):
        """A table over 8-bit codes: the input requantized to them first unless it already is."""
        lo, hi = self.range[x]
        if not (-128 <= lo and hi <= 255 and hi - lo < 256):
            x = self.requantize(x, clamp=[(0, 255), (-128, 127)][int(self.rng.integers(2))])
            if x is None:
                return None
        off = self.range[x][0]          # the codes x can take start here (a sound range)
        top = [127, 255, 1 << 15][int(self.rng.integers(3))]
        table = self.rng.integers(-top if self.rng.random() < 0.5 else 0, top + 1, 256)
        return self.emit("lookup", [x], attrs={"offset": int(off)}, consts={"table": table.astype(np.int32)})

    def _narrow(self, x):
        lo, hi = self.range[x]
        return x if max(abs(lo), abs(hi)) < (1 << 14) else self.requantize(x, clamp=CLAMPS[int(self.rng.integers(4))])

    def mul(self, x):
        """x times a partner of its shape, or a rank-4 x times a gate (N, C, 1, 1) pooled from a value."""
        if len(self.shape(x)) == 4 and self.rng.random() < 0.5:
            gate = self.sum_pool2d_global(self.pick(4) if self.rng.random() < 0.3 else x)
            other = None if gate is None or self.shape(gate)[1] != self.shape(x)[1] else gate
        else:
            other = self.partner(x, "shape")
        if other is None:
            other = x
        a, b = self._narrow(x), self._narrow(other)
        return None if a is None or b is None else self.emit("mul", [a, b])

    def sum_pool2d_global(self, x):
        _, _, h, w = self.shape(x)
        total = self.emit("sum_pool2d", [x], {"kernel": (h, w), "stride": (h, w), "padding": (0, 0), "ceil_mode": False})
        return None if total is None else self.requantize(total, clamp=[(0, 255), (-128, 127)][int(self.rng.integers(2))])

    def affine(self, x):
        """A per-channel (or per-tensor) affine; two in five with a negative side's multiplier (PReLU's: of
        either sign, 0 included, on the same shift)."""
        mult = self._per_channel(x, lambda n: self.rng.integers(1, 1 << 12, n) * self.rng.choice([-1, 1], n))
        lo, hi = self.range[x]
        bias = self._per_channel(x, lambda n: self.rng.integers(-max(abs(lo), abs(hi), 1), max(abs(lo), abs(hi), 1) + 1, n))
        shift = self._per_channel(x, lambda n: self.rng.integers(8, 17, n))
        wide = (-(1 << 15), (1 << 15) - 1)
        consts = {"bias": bias.astype(np.int32), "multiplier": mult.astype(np.int32), "shift": shift.astype(np.int32)}
        if self.rng.random() < 0.4:
            if self.rng.random() < 0.5:
                consts["bias"] = np.zeros_like(consts["bias"])
            negative = self._per_channel(x, lambda n: self.rng.integers(-(1 << 12), 1 << 12, n))
            consts["negative"] = negative.astype(np.int32)
        return self.emit("affine", [x], attrs={"lo": wide[0], "hi": wide[1]}, lo=wide[0], hi=wide[1], consts=consts)

    def channel_shuffle(self, x):
        c = self.shape(x)[1]
        groups = [g for g in (2, 3, 4, 8) if c % g == 0 and g < c] or [c]     # g = C: the identity order
        lo, hi = self.declared[x]
        return self.emit("channel_shuffle", [x], {"groups": groups[int(self.rng.integers(len(groups)))]}, lo=lo, hi=hi)

    def slice(self, x):
        c = self.shape(x)[1]
        start = int(self.rng.integers(0, c))
        stop = int(self.rng.integers(start + 1, c + 1))
        lo, hi = self.declared[x]
        return self.emit("slice", [x], {"start": start, "stop": stop}, lo=lo, hi=hi)

    def channel_gather(self, x):
        """Channels picked by a random index: 1 to 2 C of them, repeated and in any order."""
        c = self.shape(x)[1]
        index = self.rng.integers(0, c, int(self.rng.integers(1, 2 * c + 1))).astype(np.int32)
        lo, hi = self.declared[x]
        return self.emit("channel_gather", [x], consts={"index": index}, lo=lo, hi=hi)

    def resize(self, x):
        """Nearest or bilinear (align_corners either way) by a scale factor (up, down, one per axis) or to a size
        (1 to 2 H + 1 rows), the taps torch's own (`ops.resize.resize_consts`)."""
        from hawq_ray.ops.resize import resize_consts
        h, w = self.shape(x)[2:]
        mode = ("nearest", "bilinear")[int(self.rng.integers(2))]
        corners = bool(self.rng.random() < 0.5) if mode == "bilinear" else None
        scale = [2, 3, 0.5, 1.5, (2, 1), (0.5, 3)][int(self.rng.integers(6))] if self.rng.random() < 0.5 else None
        pair = scale if isinstance(scale, tuple) else (scale, scale)
        size = (int(h * pair[0]), int(w * pair[1])) if scale else (0, 0)      # torch's floor of size x factor
        if min(size) < 1:
            scale, size = None, (int(self.rng.integers(1, 2 * h + 2)), int(self.rng.integers(1, 2 * w + 2)))
        consts, attrs = resize_consts((h, w), size, mode, corners, scale)
        lo, hi = self.declared[x]
        return self.emit("resize", [x], attrs, consts, lo=lo, hi=hi)

    def layer_norm(self, x):
        """LayerNorm over the channels (axis 1) or, for tokens, the last axis (or any after the first), one in
        three uncentered (RMSNorm): the input requantized to int16 (8 bits past 4096 channels) first unless it
        fits (`ops.layernorm`'s bounds, which allow the same C for both: C * 65535 and C * 2 * 32768 are at most
        2^28 for C <= 4096 alike), random gamma / beta / eps, an 8- or 16-bit output."""
        from hawq_ray.ops.layernorm import MAX_CHANNELS, MAX_SPREAD, layer_norm_constants
        rank = len(self.shape(x))
        if rank < 2:
            return None
        axis = rank - 1 if rank == 3 and self.rng.random() < 0.7 else int(self.rng.integers(1, rank))
        c = self.shape(x)[axis]
        if c > MAX_CHANNELS:
            return None
        lo, hi = self.range[x]
        span = 255 if (0 <= lo and hi <= 255) or (-128 <= lo and hi <= 127) else (1 << 16) - 1
        if not (-(1 << 15) <= lo and hi < (1 << 15)) or c * span > MAX_SPREAD:
            x = self.requantize(x, clamp=(-(1 << 15), (1 << 15) - 1) if c <= 4096 else (-128, 127))
            if x is None:
                return None
        gamma = self.rng.uniform(-2, 2, c if self.rng.random() < 0.7 else 1)
        beta = self.rng.uniform(-1, 1, c if self.rng.random() < 0.7 else 1)
        out_lo, out_hi = [(-128, 127), (0, 255), (-(1 << 15), (1 << 15) - 1)][int(self.rng.integers(3))]
        s_out = (3 * np.abs(gamma).max() + np.abs(beta).max()) / max(-out_lo, out_hi)
        consts, attrs = layer_norm_constants(gamma, beta, float(self.rng.choice([0.0, 1e-5, 1.0])), 1.0, s_out, c)
        center = bool(self.rng.random() < 0.67)
        return self.emit("layer_norm", [x], attrs={**attrs, "axis": axis, "center": center, "lo": out_lo,
                                                   "hi": out_hi}, consts=consts, lo=out_lo, hi=out_hi)

    # ------------------------------------------------------------------ a transformer's ops
    def _factors(self, size: int, parts: int) -> list:
        """`size` as a product of `parts` random factors (1s allowed)."""
        out = []
        for _ in range(parts - 1):
            divisors = [d for d in range(1, size + 1) if size % d == 0]
            d = divisors[int(self.rng.integers(len(divisors)))]
            out.append(d)
            size //= d
        out.append(size)
        return [int(v) for v in self.rng.permutation(out)]

    def _of_rank(self, rank: int):
        """A value of `rank`: an existing one, or one reshaped to it."""
        x = self.pick(rank)
        if x is None:
            x = self.reshape(self.pick(), rank)
        return x

    def reshape(self, x, rank=None):
        """To a random factorization of a sample's size (rank 2 to 5, or `rank`), the batch axis kept first."""
        if x is None:
            return None
        shape = self.shape(x)
        rank = rank or int(self.rng.integers(2, 6))
        size = int(np.prod(shape[1:]))
        dims = self._factors(size, rank - 1) if rank > 1 else []
        if rank == 1 and size != 1:
            return None
        lo, hi = self.declared[x]
        return self.emit("reshape", [x], {"shape": (-1, *dims)}, lo=lo, hi=hi)

    def permute(self, x, rank=None):
        """A random order of the axes (not the identity); one time in three the batch axis moves."""
        x = x if rank is None or len(self.shape(x)) == rank else self._of_rank(rank)
        if x is None or len(self.shape(x)) < 2:
            return None
        r = len(self.shape(x))
        keep = r >= 3 and self.rng.random() > 0.33          # the batch axis stays first
        while True:
            dims = [0, *(int(d) + 1 for d in self.rng.permutation(r - 1))] if keep else \
                [int(d) for d in self.rng.permutation(r)]
            if dims != list(range(r)):
                break
        lo, hi = self.declared[x]
        return self.emit("permute", [x], {"dims": tuple(dims)}, lo=lo, hi=hi)

    def roll(self, x):
        """A cyclic shift along one or two axes after the first (shifts of either sign, past the size too)."""
        shape = self.shape(x)
        if len(shape) < 2:
            return None
        dims = self._axes(x)
        shifts = [int(self.rng.integers(-2 * shape[d], 2 * shape[d] + 1)) for d in dims]
        lo, hi = self.declared[x]
        return self.emit("roll", [x], {"shifts": tuple(shifts), "dims": tuple(dims)}, lo=lo, hi=hi)

    def _axes(self, x) -> list:
        """One or two distinct axes of x after the first."""
        rank = len(self.shape(x))
        count = min(rank - 1, int(self.rng.integers(1, 3)))
        return [int(d) for d in self.rng.choice(np.arange(1, rank), count, replace=False)]

    def pad(self, x):
        """Zeros before and after one or two axes after the first (0 to 3 each, not all 0)."""
        if len(self.shape(x)) < 2:
            return None
        pads = [(0, 0)] * len(self.shape(x))
        dims = self._axes(x)
        for d in dims:
            pads[d] = (int(self.rng.integers(0, 4)), int(self.rng.integers(0, 4)))
        if all(pads[d] == (0, 0) for d in dims):
            pads[dims[0]] = (0, 1)
        lo, hi = self.declared[x]
        return self.emit("pad", [x], {"pads": tuple(pads)}, lo=min(lo, 0), hi=max(hi, 0))

    def crop(self, x):
        """x[..., start:stop, ...] along one or two axes after the first (the whole axis sometimes)."""
        shape = self.shape(x)
        if len(shape) < 2:
            return None
        dims = self._axes(x)
        starts = [int(self.rng.integers(0, shape[d])) for d in dims]
        stops = [int(self.rng.integers(b + 1, shape[d] + 1)) for b, d in zip(starts, dims)]
        lo, hi = self.declared[x]
        return self.emit("crop", [x], {"axes": tuple(dims), "starts": tuple(starts), "stops": tuple(stops)},
                         lo=lo, hi=hi)

    def take(self, x, rank=None):
        """One position of one axis (rarely the batch axis), the axis dropped."""
        if rank is not None and len(self.shape(x)) != rank + 1:
            x = self._of_rank(rank + 1)
        if x is None or len(self.shape(x)) < 2:
            return None
        shape = self.shape(x)
        axis = 0 if self.rng.random() < 0.1 else int(self.rng.integers(1, len(shape)))
        index = int(self.rng.integers(-shape[axis], shape[axis]))
        lo, hi = self.declared[x]
        return self.emit("take", [x], {"axis": axis, "index": index}, lo=lo, hi=hi)

    def constant(self, x, rank=None):
        """A value (1, ...) repeated to x's batch: of x's shape (to be added to it), or of `rank` axes."""
        x = x if rank is None or len(self.shape(x)) == rank else (self.pick(rank) or x)
        shape = self.shape(x)
        if rank is None or len(shape) == rank:
            per_sample = shape[1:]
        else:
            per_sample = tuple(int(self.rng.integers(1, 6)) for _ in range(rank - 1))
        top = [127, 255, 1 << 15][int(self.rng.integers(3))]
        value = self.rng.integers(-top, top + 1, (1, *per_sample)).astype(np.int32)
        return self.emit("constant", [x], consts={"value": value}, lo=int(value.min()), hi=int(value.max()))

    def _codes(self, x, signed=None):
        """x as 8-bit codes (a requantize unless they are already), signed or not (random where None)."""
        lo, hi = self.range[x]
        if signed is None:
            signed = bool(self.rng.random() < 0.7)
        if (signed and -128 <= lo and hi <= 127) or (not signed and 0 <= lo and hi <= 255):
            return x
        return self.requantize(x, clamp=(-128, 127) if signed else (0, 255))

    def matmul(self, x, rank=None):
        """x @ y over the last two axes: y a value of fitting shape, or another value of x's shape transposed
        (x @ x^T when there is none); both 8-bit (a signed or unsigned, b mostly signed)."""
        if rank is not None and len(self.shape(x)) != rank:
            x = self._of_rank(rank)
        if x is None or len(self.shape(x)) < 2:
            return None
        shape = self.shape(x)
        k = shape[-1]
        fits = [n for n in self.values(len(shape)) if self.shape(n)[:-2] == shape[:-2] and self.shape(n)[-2] == k]
        if fits and self.rng.random() < 0.5:
            b = fits[int(self.rng.integers(len(fits)))]
        else:
            other = self.partner(x, "shape")
            dims = tuple(range(len(shape) - 2)) + (len(shape) - 1, len(shape) - 2)
            lo, hi = self.declared[other]
            b = self.emit("permute", [other], {"dims": dims}, lo=lo, hi=hi)
        a = self._codes(x)
        b = None if b is None else self._codes(b, signed=bool(self.rng.random() < 0.85))
        if a is None or b is None:
            return None
        (alo, _), (blo, _) = self.range[a], self.range[b]
        return self.emit("matmul", [a, b], {"a_bits": 8, "b_bits": 8, "a_signed": alo < 0, "b_signed": blo < 0,
                                            "k": k})

    def softmax(self, x):
        """Over the last axis of int16 codes (a requantize to 16 bits first unless they fit), at a random input
        scale: rows spanning from about 1 to 40 in reals."""
        from hawq_ray.ops.softmax import INPUT_HI, INPUT_LO, exponent_constants
        lo, hi = self.range[x]
        if lo < INPUT_LO or hi > INPUT_HI:
            x = self.requantize(x, clamp=(INPUT_LO, INPUT_HI))
            if x is None:
                return None
            lo, hi = self.range[x]
        span = max(hi - lo, 1)
        consts = exponent_constants(float(self.rng.uniform(1.0, 40.0)) / span)
        return self.emit("softmax", [x], consts=consts, lo=0, hi=255)

    # ------------------------------------------------------------------ one op of a kind on a fitting input
    def op(self, kind, x=None, rank=None) -> str | None:
        """An op of `kind` on `x`, or on a value that fits it (of `rank` for the kinds of any rank)."""
        rank = 4 if kind in NEEDS_RANK4 else 2 if kind in NEEDS_RANK2 else rank
        if kind in ANY_RANK:        # the builder finds or makes an input that gives `rank` axes out
            x = x if x is not None else self.pick(rank) or self.pick()
            if x is None:
                return None
            out = getattr(self, kind)(x, rank)
            return out if out is None or rank is None or len(self.shape(out)) == rank else None
        if x is None:
            x = self.pick(rank)
            if x is None and rank == 2:
                x = self.flatten(self.pick(4))
        if x is None or (rank is not None and len(self.shape(x)) != rank):
            return None
        out = getattr(self, kind)(x)
        if out is None:        # the result would leave the INT32 contract: narrow the input first
            narrow = self.requantize(x, clamp=CLAMPS[int(self.rng.integers(4))])
            out = None if narrow is None else getattr(self, kind)(narrow)
        return out


def random_program(seed: int, batch: int = 2) -> RandomProgram:
    """A random program built around `PAIRS[seed % len(PAIRS)]`; `seed // len(PAIRS)` varies the rest."""
    rng = np.random.default_rng([seed, 20261201])
    producer, consumer = PAIRS[seed % len(PAIRS)]
    wide = rng.random() < 0.15                   # >= 64-channel values: AMX-sized convs where a concat feeds one
    c_in = int(rng.choice([1, 3, 4, 8, 16]))
    h = int(rng.integers(3, 12)) if not wide else int(rng.choice([14, 16]))
    w = h if rng.random() < 0.7 else int(rng.integers(3, 14))
    x = rng.integers(-128, 128, (batch, c_in, h, w)).astype(np.int8)
    b = _Builder(rng, x, wide)
    first = b.conv2d("input")                      # the image enters a conv, as in every lowered model
    if rng.random() < 0.2:
        b.conv2d("input")                          # ... or two (the image read twice)
    if rng.random() < 0.7:
        b.op(str(rng.choice(["relu", "requantize"])), first)
    for _ in range(int(rng.integers(0, 3))):
        b.op(str(rng.choice(OPS)))
    rank = 4 if consumer in NEEDS_RANK4 else 2 if consumer in NEEDS_RANK2 else None
    made = None
    for _ in range(20):                            # the pair itself: the consumer reads the producer's output
        made = b.op(producer, rank=rank)
        if made is not None and rank in (None, len(b.shape(made))) and \
                (consumer not in NEEDS_AXES or len(b.shape(made)) >= 2):
            break
        made = None
    if made is None or b.op(consumer, made) is None:
        raise RuntimeError(f"random_program({seed}): could not build the pair {producer} -> {consumer}")
    for _ in range(int(rng.integers(0, 3))):      # more readers of the pair's producer: fan-out
        if rng.random() < 0.4:
            b.op(str(rng.choice(["requantize", "requantize", "relu", "max_pool2d", "add", "concat"])), made)
    for _ in range(int(rng.integers(0, 3))):
        b.op(str(rng.choice(OPS)))
    prog = IntegerProgram(input_name="input", input_shape=tuple(x.shape[1:]), input_scale=1.0, ops=b.ops,
                          output=b.ops[-1].output, output_scale=np.asarray(1.0),
                          bits={op.layer: op.attrs["w_bits"] for op in b.ops if op.layer})
    fresh = np.random.default_rng([seed, 1]).integers(-128, 128, x.shape).astype(np.int8)
    return RandomProgram(prog, [x, fresh], (producer, consumer), {"wide": wide})


def op_pairs(program: IntegerProgram, through: str | None = None) -> set:
    """The (producer kind, consumer kind) pairs a program contains; with `through` (an op kind), the pairs
    that an op of that kind sits between (a conv reading an add through the requantize in front of it)."""
    made = {op.output: op for op in program.ops}
    direct = {(made[i].op, op.op) for op in program.ops for i in op.inputs if i in made}
    if through is None:
        return direct
    return {(made[m.inputs[0]].op, op.op) for op in program.ops for i in op.inputs
            if i in made and (m := made[i]).op == through and m.inputs and m.inputs[0] in made}
