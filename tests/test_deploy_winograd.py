"""Exact Winograd F(2x2, 3x3) convs on the int16 `vpmaddwd` path (AVX2 and AVX-512BW, 8-bit weights): compiled
kernels against numpy's int64 conv, at the int32 bound the kernel admits and one channel block past it."""
from __future__ import annotations

import numpy as np
import pytest

from hawq_ray.deploy import layout, winograd, x86dot
from hawq_ray.deploy.epilogue import Value
from hawq_ray.deploy.kernels import conv2d_kernel
from hawq_ray.deploy.layer import run_kernel
from hawq_ray.deploy.target import capabilities, parse_target
from hawq_ray.program.dyadic import dyadic
from hawq_ray.program.program import Op
from numpy_reference import apply_op, ref_requantize

AVX2 = parse_target("avx2")
AVX512 = parse_target("avx512")
TARGETS = [pytest.param(AVX2, "avx2", id="avx2"), pytest.param(AVX512, "avx512bw", id="avx512")]


def _conv(w: np.ndarray, pad: int, bias=None) -> Op:
    b = np.zeros(w.shape[0], np.int32) if bias is None else bias
    return Op("conv2d", ["x"], "z", dict(stride=(1, 1), padding=(pad, pad), groups=1, w_bits=8, x_bits=8),
              dict(weight=w.astype(np.int8), bias=b), layer="conv")


def _kernel(op: Op, x: np.ndarray, target, steps=(), extras=()):
    cin = x.shape[1]
    return conv2d_kernel(op, Value(x.shape, "int8" if x.min() < 0 else "uint8", layout.channel_block(cin)),
                         list(steps), list(extras), target)


CASES = [  # cin, cout, size, pad, signed
    (32, 48, 12, 1, True),      # signed input, three output blocks, whole tiles
    (3, 20, 13, 1, False),      # 3 channels (one 4-channel block), odd map: tiles past the map's end
    (16, 16, 7, 0, False),      # no padding: a 5x5 output
    (64, 32, 6, 2, True),       # padding 2
]


@pytest.mark.parametrize("target,label", TARGETS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c[0]}-{c[1]}_s{c[2]}_p{c[3]}")
def test_winograd_conv_requantize_residual_bit_exact(target, label, case):
    """conv -> requantize -> residual add -> ReLU in one Winograd kernel, against numpy."""
    cin, cout, size, pad, signed = case
    rng = np.random.default_rng(cin + cout + size)
    op = _conv(rng.integers(-128, 128, (cout, cin, 3, 3)), pad, rng.integers(-20000, 20000, cout).astype(np.int32))
    x = rng.integers(-128, 128, (2, cin, size, size)) if signed else rng.integers(0, 256, (2, cin, size, size))
    z = apply_op(op, [x])
    m, s = dyadic(rng.uniform(0.5, 2.0, (cout, 1, 1)) * 100 / np.abs(z).max())
    rq = Op("requantize", ["z"], "q", dict(lo=-128, hi=127), dict(multiplier=m.astype(np.int32),
                                                                 shift=s.astype(np.int32)), lo=-128, hi=127)
    other = rng.integers(-128, 128, z.shape)
    steps = [rq, Op("add", ["q", "other"], "s", lo=-256, hi=254), Op("relu", ["s"], "r", lo=0, hi=254)]
    kern = _kernel(op, x, target, steps, [Value(other.shape, "int8", 16)])
    assert kern.notes["path"] == label + "+winograd"
    want = np.maximum(ref_requantize(z, m, s, -128, 127) + other, 0)
    assert np.array_equal(run_kernel(kern, [x, other], target), want)
    assert 0 < (want == 0).mean() < 0.9


def _largest_admitted_channels() -> int:
    """The most input channels (whole 16-channel blocks) `winograd.winograd_applies` takes for u8 inputs, found by
    asking it: checked against the bound's arithmetic below."""
    dot = x86dot.choose_dot(capabilities(AVX2), "uint8", 8, 4)
    c = 16
    while winograd.winograd_applies(dot, "uint8", c + 16, (3, 3), (1, 1), (1, 1), 1, (4, 4)):
        c += 16
    return c


def test_the_admitted_channels_keep_every_sum_in_int32():
    """|V| <= 4 * 255 and |U| <= 9 * 128, so |M| <= C * 1020 * 1152; |4 y| <= 4 * C * 9 * 255 * 128, the same
    product: both in int32 at the largest admitted C, and out of it one block later."""
    c = _largest_admitted_channels()
    assert c * 1020 * 1152 < 2 ** 31 <= (c + 16) * 1020 * 1152
    g = np.full((3, 3), -128)
    assert np.abs(winograd.G2 @ g @ winograd.G2.T).max() == 9 * 128
    d = np.full((4, 4), 255)
    assert np.abs(np.array(winograd.BT) @ d @ np.array(winograd.BT).T).max() == 4 * 255


@pytest.mark.parametrize("fill", [-128, 127])
def test_winograd_at_the_int32_bound(fill):
    """Every input 255 and every weight -128 (or 127) at the largest admitted channel count: the transformed
    sums come within 0.3% of int32's end and the kernel still equals the exact conv; one channel block more
    and the conv takes the direct kernel, still exact."""
    c = _largest_admitted_channels()
    for cin, path in [(c, "avx2+winograd"), (c + 16, "avx2")]:
        op = _conv(np.full((16, cin, 3, 3), fill), 1)
        x = np.full((1, cin, 4, 4), 255)
        kern = _kernel(op, x, AVX2)
        assert kern.notes["path"] == path
        want = apply_op(op, [x])
        assert 4 * np.abs(want).max() > 0.98 * 2 ** 31      # 4 y, the output transform's result
        assert np.array_equal(run_kernel(kern, [x], AVX2), want)


def test_one_block_past_the_bound_breaks_exactness(monkeypatch):
    """The bound is real: forced past it (one channel block more), the same extreme conv comes out wrong."""
    c = _largest_admitted_channels() + 16
    monkeypatch.setattr(winograd, "INT32_LIMIT", 1 << 40)
    op = _conv(np.full((16, c, 3, 3), -128), 1)
    x = np.full((1, c, 4, 4), 255)
    kern = _kernel(op, x, AVX2)
    assert kern.notes["path"] == "avx2+winograd"
    assert not np.array_equal(run_kernel(kern, [x], AVX2), apply_op(op, [x]))


@pytest.mark.parametrize("target,x_dtype,w_bits,kernel,stride,expected", [
    (AVX2, "uint8", 8, (3, 3), (1, 1), True),
    (AVX512, "int8", 8, (3, 3), (1, 1), True),
    (AVX2, "uint8", 4, (3, 3), (1, 1), False),       # vpmaddubsw path: 4-bit weights are faster direct
    (AVX2, "uint8", 8, (3, 3), (2, 2), False),
    (AVX2, "uint8", 8, (1, 1), (1, 1), False),
    (parse_target("avx512-vnni"), "uint8", 8, (3, 3), (1, 1), False),   # vpdpbusd: 8-bit operands
], ids=["avx2", "avx512-signed", "avx2-w4", "stride2", "1x1", "vnni"])
def test_winograd_applies_to_3x3_stride1_convs_on_the_int16_path(target, x_dtype, w_bits, kernel, stride, expected):
    dot = x86dot.choose_dot(capabilities(target), x_dtype, w_bits, 4)
    assert winograd.winograd_applies(dot, x_dtype, 64, kernel, stride, (1, 1), 1, (14, 14)) == expected
