"""An independent numpy int64 reference for IntegerProgram ops (`apply_op`, `run_reference`), and a builder of
small test programs calibrated on that reference (`make_program`). No tests here: the checks of the reference
itself are tests/test_deploy_reference.py's.
"""
from __future__ import annotations

import math

import numpy as np

from hawq_ray.program.dyadic import dyadic
from hawq_ray.program.program import IntegerProgram, Op


# ------------------------------------------------------------------------------------ numpy reference

def ref_conv2d(x, w, b, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    x, w = x.astype(np.int64), w.astype(np.int64)
    N, C, H, W = x.shape
    O, Ig, KH, KW = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    OH = (H + 2 * ph - dh * (KH - 1) - 1) // sh + 1
    OW = (W + 2 * pw - dw * (KW - 1) - 1) // sw + 1
    out = np.zeros((N, O, OH, OW), np.int64)
    og = O // groups
    for g in range(groups):
        for i in range(KH):
            for j in range(KW):
                patch = xp[:, g * Ig:(g + 1) * Ig, i * dh:i * dh + sh * (OH - 1) + 1:sh,
                           j * dw:j * dw + sw * (OW - 1) + 1:sw]
                out[:, g * og:(g + 1) * og] += np.einsum("nchw,oc->nohw", patch, w[g * og:(g + 1) * og, :, i, j])
    return out + np.asarray(b, np.int64)[None, :, None, None]


def ref_requantize(z, m, s, lo, hi):
    m, s = np.asarray(m, np.int64), np.asarray(s, np.int64)
    return np.clip((z.astype(np.int64) * m + (np.int64(1) << (s - 1))) >> s, lo, hi)


def _pool_size(size, k, s, p, d, ceil_mode):
    span = size + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def ref_pool(x, kind, kernel, stride, padding, dilation=(1, 1), ceil_mode=False):
    N, C, H, W = x.shape
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    OH, OW = _pool_size(H, kh, sh, ph, dh, ceil_mode), _pool_size(W, kw, sw, pw, dw, ceil_mode)
    x = x.astype(np.int64)
    out = np.full((N, C, OH, OW), np.iinfo(np.int64).min if kind == "max" else 0, np.int64)
    for oh in range(OH):
        for ow in range(OW):
            for i in range(kh):
                for j in range(kw):
                    ih, iw = oh * sh - ph + i * dh, ow * sw - pw + j * dw
                    if 0 <= ih < H and 0 <= iw < W:
                        v = x[:, :, ih, iw]
                        out[:, :, oh, ow] = np.maximum(out[:, :, oh, ow], v) if kind == "max" else out[:, :, oh, ow] + v
    return out


def apply_op(op: Op, ins: list) -> np.ndarray:
    """One op of the program's docstring, in int64."""
    a, c = op.attrs, op.consts
    if op.op == "conv2d":
        return ref_conv2d(ins[0], c["weight"], c.get("bias", np.zeros(len(c["weight"]))), a.get("stride", (1, 1)),
                          a.get("padding", (0, 0)), a.get("dilation", (1, 1)), a.get("groups", 1))
    if op.op == "dense":
        return ins[0] @ c["weight"].astype(np.int64).T + c["bias"].astype(np.int64)
    if op.op == "requantize":
        return ref_requantize(ins[0], c["multiplier"], c["shift"], a.get("lo", op.lo), a.get("hi", op.hi))
    if op.op == "relu":
        return np.maximum(ins[0], 0)
    if op.op == "add":
        return ins[0] + ins[1]
    if op.op == "concat":
        return np.concatenate(ins, axis=a.get("axis", 1))
    if op.op == "sum_pool2d" and a.get("adaptive"):     # torch's windows: [floor(i H / o), ceil((i + 1) H / o))
        (oh, ow), (_, _, h, w) = a["adaptive"], ins[0].shape
        out = np.zeros(ins[0].shape[:2] + (oh, ow), np.int64)
        for i in range(oh):
            for j in range(ow):
                r0, r1 = math.floor(i * h / oh), math.ceil((i + 1) * h / oh)
                c0, c1 = math.floor(j * w / ow), math.ceil((j + 1) * w / ow)
                out[:, :, i, j] = ins[0][:, :, r0:r1, c0:c1].sum(axis=(2, 3))
        return out
    if op.op in ("sum_pool2d", "max_pool2d"):
        return ref_pool(ins[0], op.op[:3], a["kernel"], a.get("stride") or a["kernel"], a.get("padding", (0, 0)),
                        a.get("dilation", (1, 1)), a.get("ceil_mode", False))
    if op.op == "flatten":
        return ins[0].reshape(ins[0].shape[0], -1)
    if op.op == "clamp":
        return np.minimum(np.maximum(ins[0], c["lo"].astype(np.int64)), c["hi"].astype(np.int64))
    if op.op == "lookup":                     # table[x - offset], element by element
        table, off = c["table"].astype(np.int64), int(a["offset"])
        return np.vectorize(lambda v: table[v - off], otypes=[np.int64])(ins[0])
    if op.op == "mul":
        return ins[0] * ins[1]                # numpy broadcasting: a gate (N, C, 1, 1) over (N, C, H, W)
    if op.op == "channel_shuffle":           # out channel j g + i <- input channel i C/g + j
        n, ch, h, w = ins[0].shape
        g = op.attrs["groups"]
        out = np.empty_like(ins[0])
        for i in range(g):
            for j in range(ch // g):
                out[:, j * g + i] = ins[0][:, i * (ch // g) + j]
        return out
    if op.op == "slice":
        return ins[0][:, op.attrs["start"]:op.attrs["stop"]]
    if op.op == "channel_gather":
        return ins[0][:, np.asarray(c["index"], np.int64)]
    if op.op == "resize":                    # the docstring's sum over taps, one output position at a time
        x, shift = ins[0].astype(np.int64), int(a["shift"])
        ih, wh, iw, ww = (np.asarray(c[k], np.int64) for k in ("idx_h", "w_h", "idx_w", "w_w"))
        out = np.zeros(x.shape[:2] + (len(ih), len(iw)), np.int64)
        for i in range(len(ih)):
            for j in range(len(iw)):
                for ta in range(ih.shape[1]):
                    for tb in range(iw.shape[1]):
                        out[:, :, i, j] += wh[i, ta] * ww[j, tb] * x[:, :, ih[i, ta], iw[j, tb]]
        return (out + (1 << (shift - 1))) >> shift if shift else out
    if op.op == "affine":                     # the negative side's multiplier where x + bias < 0 (PReLU)
        t = ins[0] + c["bias"].astype(np.int64)
        m = c["multiplier"].astype(np.int64)
        z = t * (np.where(t < 0, c["negative"].astype(np.int64), m) if "negative" in c else m)
        shift = c["shift"].astype(np.int64)
        return np.clip((z + (np.int64(1) << (shift - 1))) >> shift, a["lo"], a["hi"])
    if op.op == "layer_norm":
        return ref_layer_norm(ins[0], c["multiplier"], c["shift"], c["bias"], a.get("eps", 0), a["lo"], a["hi"],
                              a.get("axis", 1), a.get("center", True))
    if op.op == "reshape":
        return ins[0].reshape(a["shape"])
    if op.op == "permute":
        return np.transpose(ins[0], a["dims"])
    if op.op == "take":
        return np.take(ins[0], a["index"], axis=a["axis"])
    if op.op == "roll":
        return np.roll(ins[0], tuple(a["shifts"]), tuple(a["dims"]))
    if op.op == "pad":
        return np.pad(ins[0], [tuple(p) for p in a["pads"]])
    if op.op == "crop":
        index = [slice(None)] * ins[0].ndim
        for axis, start, stop in zip(a["axes"], a["starts"], a["stops"]):
            index[axis] = slice(start, stop)
        return ins[0][tuple(index)]
    if op.op == "constant":
        return np.repeat(np.asarray(c["value"], np.int64), ins[0].shape[0], axis=0)
    if op.op == "matmul":
        return np.matmul(ins[0].astype(np.int64), ins[1].astype(np.int64))
    if op.op == "softmax":
        rows = ins[0].reshape(-1, ins[0].shape[-1])
        m, s = int(c["multiplier"]), int(c["shift"])
        return np.array([ref_softmax_row([int(v) for v in r], m, s) for r in rows], np.int64).reshape(ins[0].shape)
    raise ValueError(op.op)


def ref_softmax_row(x: list, m: int, s: int) -> list:
    """softmax's docstring formula on one row, in Python integers (>> floors)."""
    c1, c2, c3 = -742613259, 248458840, -42811508
    e = []
    for v in x:
        u = ((max(x) - v) * m + (1 << (s - 1))) >> s
        f = u & 0xFFFF
        p = c2 + ((c3 * f) >> 16)
        p = c1 + ((p * f) >> 16)
        p = (1 << 30) + ((p * f) >> 16)
        e.append(p >> min(u >> 16, 31))
    r = (1 << 62) // sum(e)
    return [min((t * r + (1 << 53)) >> 54, 255) for t in e]


def ref_layer_norm(x, multiplier, shift, bias, eps, lo, hi, axis=1, center=True):
    """layer_norm's docstring formula over `axis`, one position at a time in Python integers (math.isqrt, //);
    without centering the sum is 0."""
    x = np.moveaxis(np.asarray(x, np.int64), axis, 1)
    c = x.shape[1]
    per = lambda a: [int(v) for v in np.broadcast_to(np.asarray(a, np.int64).reshape(-1), (c,))]   # noqa: E731
    m, s, b = per(multiplier), per(shift), per(bias)
    moved = np.moveaxis(x, 1, -1)
    out = np.empty(moved.shape, np.int64)
    for pos in np.ndindex(*moved.shape[:-1]):
        xs = [int(v) for v in moved[pos]]
        total = sum(xs) if center else 0
        v = c * sum(t * t for t in xs) - total * total + int(eps)
        r = max(math.isqrt(v * 64), 1)
        recip = 2 ** 56 // r
        for k, t in enumerate(xs):
            n = ((c * t - total) * recip + 2 ** 36) // 2 ** 37
            out[pos + (k,)] = min(max((n * m[k] + b[k] + 2 ** (s[k] - 1)) // 2 ** s[k], lo), hi)
    return np.moveaxis(np.moveaxis(out, -1, 1), 1, axis)


def run_reference(program: IntegerProgram, x: np.ndarray) -> dict:
    """Every value of the program on int8 input x, as int64 arrays."""
    env = {program.input_name: x.astype(np.int64)}
    for op in program.ops:
        env[op.output] = apply_op(op, [env[n] for n in op.inputs])
    return env


# ------------------------------------------------------------------------------------ test programs

class _Builder:
    """Emits ops while running the reference, so requantize constants can be calibrated on real ranges."""

    def __init__(self, x, rng):
        self.ops, self.env, self.rng = [], {"x": x.astype(np.int64)}, rng

    def emit(self, op):
        self.ops.append(op)
        self.env[op.output] = apply_op(op, [self.env[n] for n in op.inputs])
        return op.output

    def conv(self, x, cout, k=3, stride=1, pad=1, w_bits=8, signed=False, groups=1, name=None):
        cin = self.env[x].shape[1]
        lim = (1 << (w_bits - 1)) - 1
        w = self.rng.integers(-lim - 1, lim + 1, (cout, cin // groups, k, k)).astype(np.int8)
        b = self.rng.integers(-3000, 3000, cout).astype(np.int32)
        return self.emit(Op("conv2d", [x], name or f"conv{len(self.ops)}",
                            attrs=dict(stride=(stride, stride), padding=(pad, pad), dilation=(1, 1), groups=groups,
                                       w_bits=w_bits, x_bits=8, x_signed=signed), consts=dict(weight=w, bias=b),
                            layer=name or f"layer{len(self.ops)}"))

    def dense(self, x, cout, w_bits=8):
        cin = self.env[x].shape[1]
        lim = (1 << (w_bits - 1)) - 1
        w = self.rng.integers(-lim - 1, lim + 1, (cout, cin)).astype(np.int8)
        b = self.rng.integers(-3000, 3000, cout).astype(np.int32)
        return self.emit(Op("dense", [x], f"fc{len(self.ops)}", attrs=dict(w_bits=w_bits, x_bits=8, x_signed=False),
                            consts=dict(weight=w, bias=b), layer=f"fc{len(self.ops)}"))

    def requantize(self, z, lo=0, hi=255, per="channel"):
        v = self.env[z]
        if per == "channel" and v.ndim == 4:
            amax = np.abs(v).max(axis=(0, 2, 3)).reshape(-1, 1, 1)
        elif per == "channel":
            amax = np.abs(v).max(axis=0)
        elif per == "position":
            amax = np.abs(v).max(axis=(0, 1))[None]
        else:
            amax = np.abs(v).max()
        m, s = dyadic((hi - lo + 1) / (1.3 * np.maximum(amax, 1)))
        return self.emit(Op("requantize", [z], f"rq{len(self.ops)}", attrs=dict(lo=lo, hi=hi),
                            consts=dict(multiplier=m.astype(np.int32), shift=s.astype(np.int32)), lo=lo, hi=hi))

    def op(self, kind, inputs, lo=-(1 << 31), hi=(1 << 31) - 1, **attrs):
        return self.emit(Op(kind, list(inputs), f"{kind}{len(self.ops)}", attrs=attrs, lo=lo, hi=hi))



def make_program(w_bits=8, act_hi=255, batch=2, size=12, seed=0, channels=(3, 16, 24)) -> tuple:
    """A small residual CNN as an IntegerProgram: signed int8 image -> conv -> relu -> INT32 max_pool ->
    requantize -> residual block (two convs, a 1x1 downsample branch, each requantized, add, relu) -> two
    requantizes of the block output: a 1x1 conv branch and an identity branch, concatenated (40 channels, not
    a multiple of 16) -> sum_pool with a per-position requantize -> flatten -> dense.
    Returns (program, calibration input)."""
    rng = np.random.default_rng(seed)
    cin, c1, c2 = channels
    x = rng.integers(-128, 128, (batch, cin, size, size)).astype(np.int8)
    B = _Builder(x, rng)
    h = B.op("relu", [B.conv("x", c1, signed=True, name="stem")], lo=0)     # first layer: 8-bit
    h = B.op("max_pool2d", [h], lo=0, kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1),
             ceil_mode=False)                                                # INT32 max pool ...
    h = B.requantize(h, 0, 255)                                              # ... then requantize
    a = B.requantize(B.conv(h, c2, w_bits=w_bits, name="block.conv1"), 0, act_hi)
    a = B.requantize(B.conv(a, c2, w_bits=w_bits, name="block.conv2"), -128, 127)   # branch: signed
    d = B.requantize(B.conv(h, c2, k=1, pad=0, w_bits=w_bits, name="block.down"), -128, 127, per="tensor")
    s = B.op("relu", [B.op("add", [a, d], lo=-256, hi=254)], lo=0, hi=254)
    s1 = B.requantize(s, 0, act_hi, per="tensor")          # two requantizes read the block output
    br1 = B.requantize(B.conv(s1, 16, k=1, pad=0, w_bits=w_bits, name="branch.conv"), 0, act_hi)
    br2 = B.requantize(s, 0, act_hi, per="channel")
    cat = B.op("concat", [br1, br2], lo=0, hi=act_hi, axis=1)
    p = B.op("sum_pool2d", [cat], kernel=(3, 3), stride=(2, 2), padding=(1, 1), ceil_mode=False)
    p = B.requantize(p, 0, 255, per="position")
    f = B.op("flatten", [p], lo=0, hi=255)
    out = B.dense(f, 10, w_bits=8)
    bits = {op.layer: op.attrs["w_bits"] for op in B.ops if op.op in ("conv2d", "dense")}
    prog = IntegerProgram("x", tuple(x.shape[1:]), 0.02, B.ops, out, np.full(10, 1e-3), bits)
    return prog, x
