"""Each TVM kernel, alone, against the numpy int64 reference: bit for bit, on the VNNI path and the generic path.

Shapes are tiny; each kernel compiles in well under a second.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from hawq_ray.deploy import layout, winograd
from hawq_ray.deploy.target import parse_target
from hawq_ray.deploy.epilogue import Value
from hawq_ray.deploy.glue import concat_kernel, elementwise_kernel, pool_kernel
from hawq_ray.deploy.conv_pool import band_plan, conv2d_max_pool_kernel
from hawq_ray.deploy.kernels import MAX_ACC, conv2d_kernel, dense_kernel
from hawq_ray.deploy.target import capabilities
from hawq_ray.deploy.layer import build_layer_kernel, run_kernel, time_kernel
from hawq_ray.program.dyadic import dyadic
from hawq_ray.program.program import Op
from numpy_reference import apply_op, ref_requantize

HOST = parse_target("llvm")
GENERIC = parse_target({"kind": "llvm", "mcpu": "x86-64-v2"})   # SSE4.2, no AVX2: the generic schedule
TARGETS = [pytest.param(HOST, id="host"), pytest.param(GENERIC, id="generic")]


def test_targets_pick_their_path():
    assert not capabilities(GENERIC).vnni
    # the host target takes the VNNI path exactly when the CPU reports avx512_vnni (read independently)
    flags = set(open("/proc/cpuinfo").read().split())
    assert capabilities(HOST).vnni == ("avx512_vnni" in flags)


def _conv_op(rng, cin, cout, k, stride, pad, w_bits, signed, groups=1, dilation=1):
    lim = 1 << (w_bits - 1)
    w = rng.integers(-lim, lim, (cout, cin // groups, k, k)).astype(np.int8)
    b = rng.integers(-20000, 20000, cout).astype(np.int32)
    return Op("conv2d", ["x"], "z", dict(stride=(stride, stride), padding=(pad, pad), dilation=(dilation, dilation),
                                         groups=groups, w_bits=w_bits, x_bits=8, x_signed=signed),
              dict(weight=w, bias=b), layer="conv")


def _requant(rng, shape, lo, hi, scale):
    m, s = dyadic(rng.uniform(0.5, 2.0, shape) * scale)
    return Op("requantize", ["z"], "q", dict(lo=lo, hi=hi), dict(multiplier=m.astype(np.int32),
                                                                 shift=s.astype(np.int32)), lo=lo, hi=hi)


def _input(rng, shape, signed):
    return rng.integers(-128, 128, shape) if signed else rng.integers(0, 256, shape)


CONV_CASES = [  # cin, cout, size, k, stride, pad, w_bits, signed, dilation
    (3, 20, 13, 3, 2, 1, 8, True, 1),       # stem-like: signed input, 3 channels, odd size
    (24, 32, 37, 3, 2, 1, 4, False, 1),     # packed int4, output row 19 (tile 10 + masked tail; stride 1: F(4x4))
    (16, 16, 9, 1, 1, 0, 8, False, 1),      # 1x1, no padding
    (32, 48, 10, 3, 1, 2, 4, False, 2),     # dilation
    (16, 8, 23, 5, 2, 2, 8, False, 1),      # output channels below one block, output row 10
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"c{c[0]}-{c[1]}_k{c[3]}s{c[4]}_w{c[6]}")
def test_conv_requantize_relu_bit_exact(target, case):
    cin, cout, size, k, stride, pad, w_bits, signed, dil = case
    rng = np.random.default_rng(cin * 7 + cout)
    op = _conv_op(rng, cin, cout, k, stride, pad, w_bits, signed, dilation=dil)
    x = _input(rng, (2, cin, size, size), signed)
    z = apply_op(op, [x])
    rq = _requant(rng, (cout, 1, 1), 0, 255, 200 / np.abs(z).max())
    relu = Op("relu", ["q"], "r", lo=0, hi=255)
    kern = conv2d_kernel(op, Value(x.shape, "int8" if signed else "uint8", layout.channel_block(cin)),
                         [rq, relu], [], target)
    assert kern.notes["path"] == ("vnni" if capabilities(target).vnni else "generic")
    want = ref_requantize(z, rq.consts["multiplier"], rq.consts["shift"], 0, 255)
    got = run_kernel(kern, [x], target)
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    assert 0 < (want == 0).mean() < 0.9     # the clamp is exercised, and so are positive values


@pytest.mark.parametrize("target", TARGETS)
def test_conv_int32_output_and_signed_requantize(target):
    rng = np.random.default_rng(3)
    op = _conv_op(rng, 16, 16, 3, 1, 1, 8, False)
    x = _input(rng, (1, 16, 8, 8), False)
    xv = Value(x.shape, "uint8", 16)
    got = run_kernel(conv2d_kernel(op, xv, [], [], target), [x], target)
    z = apply_op(op, [x])
    assert got.dtype == np.int32 and np.array_equal(got, z)
    rq = _requant(rng, (), -128, 127, 100 / np.abs(z).max())       # per tensor, signed output
    got = run_kernel(conv2d_kernel(op, xv, [rq], [], target), [x], target)
    want = ref_requantize(z, rq.consts["multiplier"], rq.consts["shift"], -128, 127)
    assert got.dtype == np.int8 and np.array_equal(got, want) and want.min() < 0


@pytest.mark.parametrize("target", TARGETS)
def test_conv_fused_residual_add(target):
    """conv -> requantize (branch) -> add(other requantized branch) -> relu, in one kernel."""
    rng = np.random.default_rng(4)
    op = _conv_op(rng, 16, 32, 3, 1, 1, 8, False)
    x = _input(rng, (2, 16, 7, 7), False)
    other = rng.integers(-128, 128, (2, 32, 7, 7))
    z = apply_op(op, [x])
    rq = _requant(rng, (32, 1, 1), -128, 127, 100 / np.abs(z).max())
    add = Op("add", ["q", "other"], "s", lo=-256, hi=254)
    relu = Op("relu", ["s"], "r", lo=0, hi=254)
    kern = conv2d_kernel(op, Value(x.shape, "uint8", 16), [rq, add, relu], [Value(other.shape, "int8", 16)], target)
    want = np.maximum(ref_requantize(z, rq.consts["multiplier"], rq.consts["shift"], -128, 127) + other, 0)
    got = run_kernel(kern, [x, other], target)
    assert got.dtype == np.uint8 and np.array_equal(got, want)


def test_grouped_conv_generic():
    rng = np.random.default_rng(5)
    op = _conv_op(rng, 32, 32, 3, 2, 1, 8, False, groups=8)
    x = _input(rng, (2, 32, 9, 9), False)
    got = run_kernel(conv2d_kernel(op, Value(x.shape, "uint8", 16), [], [], HOST), [x], HOST)
    assert np.array_equal(got, apply_op(op, [x]))


DEPTHWISE_CASES = [  # channels, size, k, stride, pad, dilation, w_bits, signed
    (32, 12, 3, 1, 1, 1, 8, False),     # MobileNet's 3x3, 12 columns (tiles of 6 x 4 columns)
    (24, 13, 3, 2, 1, 1, 4, True),      # 24 channels (a half-empty block), stride 2 to a prime 7x7, signed
                                        # input, 4-bit weights
    (16, 9, 5, 1, 2, 1, 8, False),      # EfficientNet's 5x5
    (40, 10, 3, 1, 2, 2, 8, True),      # dilation 2
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", DEPTHWISE_CASES, ids=lambda c: f"c{c[0]}_s{c[1]}_k{c[2]}_st{c[3]}_w{c[6]}")
def test_depthwise_conv_bit_exact(case, target):
    """A depthwise conv takes the vectorized depthwise kernel on any CPU and, with a requantize and a
    ReLU6-style clamp fused after it, equals numpy on every element."""
    c, size, k, stride, pad, dil, w_bits, signed = case
    rng = np.random.default_rng(c + size)
    op = _conv_op(rng, c, c, k, stride, pad, w_bits, signed, groups=c, dilation=dil)
    x = _input(rng, (2, c, size, size), signed)
    z = apply_op(op, [x])
    rq = _requant(rng, (c, 1, 1), 0, 255, 200 / np.abs(z).max())
    clamp = Op("clamp", ["q"], "r", consts=dict(lo=np.int32(0), hi=np.int32(97)), lo=0, hi=97)
    kern = conv2d_kernel(op, Value(x.shape, "int8" if signed else "uint8", 16), [rq, clamp], [], target)
    assert kern.notes["path"] == "depthwise"
    want = np.clip(ref_requantize(z, rq.consts["multiplier"], rq.consts["shift"], 0, 255), 0, 97)
    got = run_kernel(kern, [x], target)
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    assert len(np.unique(want)) > 20                       # not a saturated output


DEPTHWISE_INT16_EDGE = [  # k, signed input, every weight, every input: each tap's product at its extreme
    (3, False, -8, 255),     # 9 taps, one chunk: 9 x -2040
    (5, False, -8, 255),     # 25 taps: a chunk of 16 (16 x -2040 = -32640, the int16 bound) and one of 9
    (5, False, 7, 255),      # the positive side: 16 x 1785
    (7, True, -8, -128),     # signed input: 31 taps a chunk (31 x 1024), 49 in all
    (5, True, 7, -128),
]


def _depthwise_at(k: int, signed: bool, w: int, x_value: int, target):
    """A 4-bit depthwise conv with every weight `w` on an input of `x_value` everywhere, no padding (every output
    reads k x k taps), its INT32 sums written out: (kernel output, numpy's int64 sums)."""
    c, size = 24, k + 3
    op = Op("conv2d", ["x"], "z", dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=c, w_bits=4, x_bits=8,
                                       x_signed=signed),
            dict(weight=np.full((c, 1, k, k), w, np.int8), bias=np.zeros(c, np.int32)), layer="dw")
    x = np.full((2, c, size, size), x_value)
    kern = conv2d_kernel(op, Value(x.shape, "int8" if signed else "uint8", 16), [], [], target)
    assert kern.notes["path"] == "depthwise"
    return run_kernel(kern, [x], target), apply_op(op, [x])


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", DEPTHWISE_INT16_EDGE, ids=lambda c: f"k{c[0]}_{'s8' if c[1] else 'u8'}_w{c[2]}")
def test_depthwise_narrow_weights_sum_taps_in_int16_up_to_the_bound(case, target):
    """With 4-bit weights the window is summed in int16, `x86dot.int16_terms` taps at a time, then widened:
    every product at its extreme puts each chunk at the largest sum it can reach, and the result is numpy's."""
    k, signed, w, x_value = case
    got, want = _depthwise_at(k, signed, w, x_value, target)
    assert np.all(want == k * k * w * x_value)
    assert np.array_equal(got, want)


def test_depthwise_one_tap_past_the_int16_bound_breaks_exactness(monkeypatch):
    """The bound is tight: a chunk of 17 taps (one more than `int16_terms` allows for u8 x 4-bit) wraps in int16 on
    the same edge case, so the edge test above can fail."""
    from hawq_ray.deploy import depthwise
    monkeypatch.setattr(depthwise, "int16_terms", lambda *ranges: 17)
    got, want = _depthwise_at(5, False, -8, 255, HOST)
    assert not np.array_equal(got, want)


AMX_CASES = [  # cin, cout, size, k, pad, w_bits, fan-out + residual add
    (128, 64, 14, 3, 1, 8, False),    # 14 columns -> one 16-column tile (2 computed and dropped)
    (160, 32, 9, 3, 0, 4, True),      # packed int4, 7 output columns: F(4x4) without AMX (16 would waste 9)
    (256, 96, 14, 1, 0, 8, True),     # 1x1: stays on VNNI
    (128, 32, 28, 3, 1, 4, True),     # int4, 28 columns: two tiles, the second partial
]


@pytest.mark.parametrize("case", AMX_CASES, ids=lambda c: f"c{c[0]}-{c[1]}_s{c[2]}_k{c[3]}_w{c[5]}")
def test_amx_conv_bit_exact(case):
    """Stride-1 convs with >= 128 input channels take the AMX path where the CPU and the kernel allow it
    (checked independently: /proc/cpuinfo's amx_int8 and the width rule), else VNNI; either way bit-exact
    against numpy, with a residual add and a two-output fan-out."""
    cin, cout, size, k, pad, w_bits, fan = case
    rng = np.random.default_rng(cin + cout + size)
    op = _conv_op(rng, cin, cout, k, 1, pad, w_bits, False)
    x = _input(rng, (2, cin, size, size), False)
    z = apply_op(op, [x])
    rq = _requant(rng, (cout, 1, 1), -128, 127, 100 / np.abs(z).max())
    steps, extras, ins = [rq], [], [x]
    want = ref_requantize(z, rq.consts["multiplier"], rq.consts["shift"], -128, 127)
    if fan:
        other = rng.integers(-128, 128, want.shape)
        steps += [Op("add", ["q", "other"], "s", lo=-256, hi=254), Op("relu", ["s"], "r", lo=0, hi=254)]
        extras, ins = [Value(other.shape, "int8", 16)], [x, other]
        want = np.maximum(want + other, 0)
        fanout = [_requant(rng, (cout, 1, 1), 0, 255, 2.0),
                  _requant(rng, (cout, 1, 1), -(1 << 15), (1 << 15) - 1, 50.0)]
        wants = [ref_requantize(want, f.consts["multiplier"], f.consts["shift"], f.lo, f.hi) for f in fanout]
    else:
        fanout, wants = [], [want]
    kern = conv2d_kernel(op, Value(x.shape, "uint8", 16), steps, extras, HOST, fanout=fanout)
    flags = set(open("/proc/cpuinfo").read().split())
    out_w = size + 2 * pad - k + 1
    amx_expected = {"amx_int8", "amx_tile"} <= flags and -(-out_w // 16) * 16 <= 1.15 * out_w and k > 1
    # without AMX, a 4-bit 3x3 conv takes F(4x4): on at least 8x8 outputs where its weights weigh less than its
    # input, on at least 7x7 where they weigh more and the batch's V (2 images x tiles x 36 positions x channels,
    # int16) fits winograd's budget
    v_once = cout * cin * 9 * w_bits / 8 > cin * size * size and \
        2 * (-(-out_w // 4)) ** 2 * 36 * -(-cin // 16) * 16 * 2 <= winograd.V_BATCH_BYTES
    f4_expected = w_bits <= 6 and k == 3 and (out_w >= 7 if v_once else
                                              out_w >= 8 and cout * cin * 9 * w_bits / 8 <= cin * size * size)
    assert kern.notes["path"] == ("amx" if amx_expected else "generic" if "avx512_vnni" not in flags
                                  else "avx512bw+winograd4" if f4_expected else "vnni")
    got = run_kernel(kern, ins, HOST)
    for g, w in zip(got if fan else [got], wants):
        assert np.array_equal(g, w)
    assert 0 < (wants[0] != 0).mean() < 1

CONV_POOL_CASES = [  # cin, cout, size, conv (k, stride, pad), w_bits, signed, pool (k, stride, pad, dilation, ceil)
    (3, 20, 30, (7, 2, 3), 8, True, (3, 2, 1, 1, False)),    # the ResNet stem: signed image, 3x3/2 pool
    (16, 24, 19, (3, 1, 0), 4, False, (3, 2, 0, 1, True)),   # packed int4, ceil-mode pool (a window runs over)
    (8, 16, 29, (3, 1, 0), 8, False, (3, 2, 0, 1, False)),   # 13 pool rows (prime): one band, the whole map
    (8, 40, 15, (3, 1, 1), 8, False, (2, 2, 0, 1, False)),   # 2x2/2 pool, 40 channels (a partial block)
    (8, 16, 17, (1, 1, 0), 8, False, (3, 3, 1, 1, True)),    # 1x1 conv, 3x3/3 ceil-mode pool
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("case", CONV_POOL_CASES, ids=lambda c: f"c{c[0]}-{c[1]}_s{c[2]}_pool{c[6][0]}s{c[6][1]}")
def test_conv_max_pool_fused_bit_exact(target, case):
    """conv -> relu -> max pool -> (two requantizes as outputs | one requantize) in one kernel, against numpy:
    conv in int64, ReLU, max pool with padding that never wins, then the requantizes."""
    cin, cout, size, (k, stride, pad), w_bits, signed, (pk, ps, pp, pd, ceil) = case
    rng = np.random.default_rng(cin * 3 + cout + size)
    op = _conv_op(rng, cin, cout, k, stride, pad, w_bits, signed)
    x = _input(rng, (2, cin, size, size), signed)
    relu = Op("relu", ["z"], "r", lo=0)
    pool = Op("max_pool2d", ["r"], "p", dict(kernel=(pk, pk), stride=(ps, ps), padding=(pp, pp),
                                             dilation=(pd, pd), ceil_mode=ceil), lo=0)
    pooled = apply_op(pool, [np.maximum(apply_op(op, [x]), 0)])
    xv = Value(x.shape, "int8" if signed else "uint8", layout.channel_block(cin))
    # fan-out: an unsigned 8-bit requantize and a wide signed one (a residual branch), each an output
    fan = [_requant(rng, (cout, 1, 1), 0, 255, 400 / pooled.max()),
           _requant(rng, (cout, 1, 1), -(1 << 31), (1 << 31) - 1, 5000 / pooled.max())]
    kern = conv2d_max_pool_kernel(op, xv, [relu], pool, [], target, "stem", fanout=fan)
    assert kern.notes["path"] == ("vnni" if capabilities(target).vnni else "generic") + "+max_pool"
    got = run_kernel(kern, [x], target)
    for g, rq in zip(got, fan):
        want = ref_requantize(pooled, rq.consts["multiplier"], rq.consts["shift"], rq.lo, rq.hi)
        assert g.dtype == (np.uint8 if rq.hi == 255 else np.int32) and np.array_equal(g, want)
    assert (got[0] == 255).any() and 0 < got[0].mean() < 200 and got[1].max() > 1000   # clamped and not
    # single output: pool -> requantize to 4 bits
    rq = _requant(rng, (cout, 1, 1), 0, 15, 15 / pooled.max())
    got = run_kernel(conv2d_max_pool_kernel(op, xv, [relu], pool, [rq], target, "stem"), [x], target)
    assert np.array_equal(got, ref_requantize(pooled, rq.consts["multiplier"], rq.consts["shift"], 0, 15))


@pytest.mark.parametrize("pool_h,pool_w,k,s", [(56, 56, 3, 2), (73, 73, 3, 2), (13, 9, 2, 2), (3, 3, 3, 3)])
def test_band_plan_covers_the_pool(pool_h, pool_w, k, s):
    """Each band's conv rows are what its pool rows read; tiles divide the band rows and the padded width,
    which covers every pool column; tiles fit the register file."""
    plan = band_plan(pool_h, pool_w, (k, k), (s, s), (1, 1))
    assert pool_h % plan["band"] == 0
    th, tw = plan["tile"]
    assert plan["rows"] == (plan["band"] - 1) * s + k and plan["rows"] % th == 0
    assert plan["pool_w"] >= pool_w and plan["ext_w"] == (plan["pool_w"] - 1) * s + k and plan["ext_w"] % tw == 0
    assert th * tw <= MAX_ACC

def test_unit_window_max_pool_after_a_conv_stays_a_kernel_of_its_own():
    """A 1xK or 1x1 strided max pool (subsampling) is not fused into its conv: the band schedule cannot place a
    unit window. The whole program still compiles and matches numpy."""
    from hawq_ray.deploy import compile_program
    from hawq_ray.deploy.conv_pool import fusable_max_pool
    from hawq_ray.program.program import IntegerProgram
    rng = np.random.default_rng(5)
    op = _conv_op(rng, 8, 16, 3, 1, 1, 8, True)
    for window in ((1, 1), (1, 3), (2, 2)):
        pool = Op("max_pool2d", [op.output], "p", dict(kernel=window, stride=(2, 2), padding=(0, 0),
                                                       dilation=(1, 1), ceil_mode=False))
        assert fusable_max_pool(pool) == (min(window) >= 2)
        prog = IntegerProgram("x", (8, 7, 7), 1.0, [op, pool], "p", np.asarray(1.0),
                              {op.layer: 8})
        x = _input(rng, (2, 8, 7, 7), True)
        model = compile_program(prog, batch=2, target=HOST)
        fused = any(k["path"].endswith("+max_pool") for k in model.manifest["kernels"])
        assert fused == (min(window) >= 2)
        assert np.array_equal(model(x.astype(np.int8)), apply_op(pool, [apply_op(op, [x])]))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("w_bits,signed,cin,cout", [(8, False, 512, 10), (4, True, 30, 33)])
def test_dense_bit_exact(target, w_bits, signed, cin, cout):
    rng = np.random.default_rng(cin + cout)
    lim = 1 << (w_bits - 1)
    op = Op("dense", ["x"], "z", dict(w_bits=w_bits, x_bits=8, x_signed=signed),
            dict(weight=rng.integers(-lim, lim, (cout, cin)).astype(np.int8),
                 bias=rng.integers(-5000, 5000, cout).astype(np.int32)), layer="fc")
    x = _input(rng, (3, cin), signed)
    got = run_kernel(dense_kernel(op, Value(x.shape, "int8" if signed else "uint8"), [], [], target), [x], target)
    assert np.array_equal(got, apply_op(op, [x]))
    z = apply_op(op, [x])
    rq = _requant(rng, (cout,), 0, 15, 15 / np.abs(z).max())       # per-channel requantize to 4 bits
    got = run_kernel(dense_kernel(op, Value(x.shape, "int8" if signed else "uint8"), [rq], [], target), [x], target)
    assert np.array_equal(got, ref_requantize(z, rq.consts["multiplier"], rq.consts["shift"], 0, 15))


@pytest.mark.parametrize("kind,kernel,stride,pad,ceil_mode", [
    ("max_pool2d", 3, 2, 1, False), ("max_pool2d", 3, 2, 0, True),
    ("sum_pool2d", 3, 2, 1, True), ("sum_pool2d", 7, 1, 0, False)])
def test_pools_bit_exact(kind, kernel, stride, pad, ceil_mode):
    rng = np.random.default_rng(6)
    size = 7 if kernel == 7 else 10
    x = rng.integers(0, 256, (2, 20, size, size))
    op = Op(kind, ["x"], "p", dict(kernel=(kernel, kernel), stride=(stride, stride), padding=(pad, pad),
                                   dilation=(1, 1), ceil_mode=ceil_mode))
    want = apply_op(op, [x])
    steps = []
    if kind == "sum_pool2d":    # INT32 sum, then a per-position requantize (the division by the window count)
        steps = [_requant(rng, (1, *want.shape[2:]), 0, 255, 1.0 / kernel ** 2)]
        want = ref_requantize(want, steps[0].consts["multiplier"], steps[0].consts["shift"], 0, 255)
    got = run_kernel(pool_kernel(op, Value(x.shape, "uint8", 16), steps, [], HOST, "pool"), [x], HOST)
    assert np.array_equal(got, want)


def test_concat_and_standalone_requantize():
    rng = np.random.default_rng(7)
    a, b = rng.integers(0, 256, (2, 20, 5, 5)), rng.integers(-128, 128, (2, 12, 5, 5))
    op = Op("concat", ["a", "b"], "c", dict(axis=1), lo=-128, hi=255)
    kern = concat_kernel(op, [Value(a.shape, "uint8", 16), Value(b.shape, "int8", 16)], [], [], HOST, "cat")
    assert np.array_equal(run_kernel(kern, [a, b], HOST), np.concatenate([a, b], axis=1))
    rq = _requant(rng, (20, 1, 1), 0, 15, 15 / 255)
    kern = elementwise_kernel([rq], [Value(a.shape, "uint8", 16)], HOST, "rq")
    assert np.array_equal(run_kernel(kern, [a], HOST),
                          ref_requantize(a, rq.consts["multiplier"], rq.consts["shift"], 0, 15))


def test_int4_packing_roundtrip():
    rng = np.random.default_rng(8)
    w = rng.integers(-8, 8, (3, 2, 16, 4)).astype(np.int8)
    p = layout.pack_int4(w)
    assert p.dtype == np.uint8 and p.shape == (3, 2, 32)
    assert np.array_equal(layout.unpack_int4(p), w)
    with pytest.raises(ValueError):
        layout.pack_int4(np.full((16, 4), 9, np.int8))


def test_layer_kernel_is_timeable():
    rng = np.random.default_rng(9)
    for w_bits in (4, 8):
        op = _conv_op(rng, 16, 16, 3, 1, 1, w_bits, False)
        kern = build_layer_kernel(op, (1, 16, 8, 8), HOST)
        times = time_kernel(kern, HOST, number=2, repeat=2)
        assert len(times) == 2 and all(t > 0 for t in times)


class ClockedModule:
    """A stand-in for a compiled kernel whose evaluator reports known seconds: what time_kernel makes of them."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args):
        self.calls.append("run")

    def time_evaluator(self, name, dev, number, repeat):
        self.calls.append((name, number, repeat))
        return lambda *args: SimpleNamespace(results=[0.0015 * (i + 1) for i in range(repeat)])


def test_kernel_times_are_milliseconds_per_run_after_a_warm_up():
    rng = np.random.default_rng(9)
    kern = build_layer_kernel(_conv_op(rng, 16, 16, 3, 1, 1, 8, False), (1, 16, 8, 8), HOST)
    clock = ClockedModule()
    assert time_kernel(kern, HOST, number=3, repeat=2, compiled=clock) == pytest.approx([1.5, 3.0], rel=1e-12)
    assert clock.calls == ["run", ("main", 3, 2)]
