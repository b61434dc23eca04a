"""Synthetic IntegerPrograms with the exact layer structure of pytorchcv's resnet18/resnet50 (random integer
weights, plausible dyadic multipliers), for timing the TVM back end before/without a trained lowering."""
from __future__ import annotations

import numpy as np

from hawq_ray.quant.program import IntegerProgram, Op


class _Emit:
    def __init__(self, rng, bits_of):
        self.ops, self.rng, self.bits_of, self.n = [], rng, bits_of, 0

    def name(self, kind):
        self.n += 1
        return f"{kind}{self.n}"

    def conv(self, x, cin, cout, k, stride, pad, layer, signed=False):
        b = self.bits_of(layer)
        lim = (1 << (b - 1)) - 1
        w = self.rng.integers(-lim, lim + 1, (cout, cin, k, k)).astype(np.int8)
        out = self.name("conv")
        self.ops.append(Op("conv2d", [x], out, dict(stride=(stride, stride), padding=(pad, pad), dilation=(1, 1),
                                                     groups=1, w_bits=b, x_bits=8, x_signed=signed),
                           dict(weight=w, bias=self.rng.integers(-1000, 1000, cout).astype(np.int32)), layer=layer))
        return out

    def rq(self, z, channels, lo, hi, per_channel=True):
        shape = (channels, 1, 1) if per_channel else ()
        m = self.rng.integers(1 << 30, (1 << 31) - 1, shape).astype(np.int32)
        s = np.full(shape, 44, np.int32)
        out = self.name("rq")
        self.ops.append(Op("requantize", [z], out, dict(lo=lo, hi=hi), dict(multiplier=m, shift=s), lo=lo, hi=hi))
        return out

    def op(self, kind, ins, lo=-(1 << 31), hi=(1 << 31) - 1, **attrs):
        out = self.name(kind)
        self.ops.append(Op(kind, list(ins), out, attrs, lo=lo, hi=hi))
        return out


def resnet_program(depth: int = 18, bits="uniform8", size: int = 224, classes: int = 1000,
                   seed: int = 0) -> IntegerProgram:
    """bits: 'uniform8', 'uniform4', 'mixed' (4 bits for the 3x3 convs of the last two stages), or a dict."""
    rng = np.random.default_rng(seed)

    def bits_of(layer):
        if isinstance(bits, dict):
            return bits.get(layer, 8)
        if layer in ("features.init_block.conv", "output"):
            return 8
        if bits == "uniform4":
            return 4
        if bits == "mixed":
            return 4 if (layer.startswith("features.stage3") or layer.startswith("features.stage4")) \
                and "identity" not in layer else 8
        return 8
    E = _Emit(rng, bits_of)
    act_hi = 15 if bits == "uniform4" else 255
    h = E.rq(E.conv("x", 3, 64, 7, 2, 3, "features.init_block.conv", signed=True), 64, 0, act_hi)
    h = E.op("max_pool2d", [h], 0, act_hi, kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1),
             ceil_mode=False)
    cin, hw = 64, size // 4
    blocks = {18: [2, 2, 2, 2], 50: [3, 4, 6, 3]}[depth]
    for s, nblocks in enumerate(blocks):
        width = 64 * 2 ** s
        cout = width * (4 if depth == 50 else 1)
        for b in range(nblocks):
            stride = 2 if (b == 0 and s > 0) else 1
            pre = f"features.stage{s + 1}.unit{b + 1}"
            if depth == 18:
                y = E.rq(E.conv(h, cin, width, 3, stride, 1, pre + ".body.conv1.conv"), width, 0, act_hi)
                y = E.conv(y, width, cout, 3, 1, 1, pre + ".body.conv2.conv")
            else:
                y = E.rq(E.conv(h, cin, width, 1, 1, 0, pre + ".body.conv1.conv"), width, 0, act_hi)
                y = E.rq(E.conv(y, width, width, 3, stride, 1, pre + ".body.conv2.conv"), width, 0, act_hi)
                y = E.conv(y, width, cout, 1, 1, 0, pre + ".body.conv3.conv")
            y = E.rq(y, cout, -128, 127)
            if b == 0 and (stride != 1 or cin != cout):
                r = E.rq(E.conv(h, cin, cout, 1, stride, 0, pre + ".identity_conv.conv"), cout, -128, 127)
            else:
                r = E.rq(h, cout, 0, 255, per_channel=False)
            a = E.op("relu", [E.op("add", [y, r], -128, 382)], 0, 382)
            h = E.rq(a, cout, 0, act_hi, per_channel=False)
            cin = cout
        hw = hw // (2 if s < 3 else 1) if s < 3 else hw
    final = size // 32
    p = E.op("sum_pool2d", [h], kernel=(final, final), stride=(1, 1), padding=(0, 0), ceil_mode=False)
    p = E.rq(p, cin, 0, 255, per_channel=False)
    f = E.op("flatten", [p], 0, 255)
    w = rng.integers(-127, 128, (classes, cin)).astype(np.int8)
    E.ops.append(Op("dense", [f], "logits", dict(w_bits=8, x_bits=8, x_signed=False),
                    dict(weight=w, bias=rng.integers(-1000, 1000, classes).astype(np.int32)), layer="output"))
    layers = {op.layer: op.attrs["w_bits"] for op in E.ops if op.op in ("conv2d", "dense")}
    return IntegerProgram("x", (3, size, size), 0.02, E.ops, "logits", np.full(classes, 1e-3), layers)
