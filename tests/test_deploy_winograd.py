"""Exact Winograd convs on the int16 `vpmaddwd` path: F(2x2, 3x3) for 8-bit weights and F(4x4, 3x3) for weights of
at most 6 bits (AVX2, AVX-512BW, and AVX512-VNNI for the latter), compiled kernels against numpy's int64 conv, at
the int32 bound the kernel admits and one channel block past it; the transforms against the direct conv."""
from __future__ import annotations

import dataclasses

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
VNNI = parse_target("avx512-vnni")
TARGETS = [pytest.param(AVX2, "avx2", id="avx2"), pytest.param(AVX512, "avx512bw", id="avx512")]


def _conv(w: np.ndarray, pad: int, bias=None, w_bits: int = 8) -> Op:
    b = np.zeros(w.shape[0], np.int32) if bias is None else bias
    return Op("conv2d", ["x"], "z", dict(stride=(1, 1), padding=(pad, pad), groups=1, w_bits=w_bits, x_bits=8),
              dict(weight=w.astype(np.int8), bias=b), layer="conv")


def _kernel(op: Op, x: np.ndarray, target, steps=(), extras=()):
    cin = x.shape[1]
    return conv2d_kernel(op, Value(x.shape, "int8" if x.min() < 0 else "uint8", layout.channel_block(cin)),
                         list(steps), list(extras), target)


def _direct(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The valid 3x3 correlation of one tile, by loops."""
    m = d.shape[0] - 2
    return np.array([[(d[i:i + 3, j:j + 3] * g).sum() for j in range(m)] for i in range(m)])


@pytest.mark.parametrize("t", [winograd.F2, winograd.F4], ids=["F2", "F4"])
def test_the_integer_transforms_give_scale_times_the_direct_conv(t):
    """scale * Y = AT [(G g G^T) . (BT d BT^T)] AT^T on random tiles, scale = g_scale^2 = 2^shift * odd; the
    bounds v_max and u_max are what the tiles with signs matching the matrices reach (signed int8 inputs, 4-bit
    weights), and u8 inputs stay inside v_max(255)."""
    bt, g, at = (np.array(a) for a in (t.bt, t.g, t.at))
    rng = np.random.default_rng(t.m)
    for _ in range(50):
        d, w = rng.integers(-128, 256, (t.n, t.n)), rng.integers(-32, 32, (3, 3))
        assert np.array_equal(at @ ((g @ w @ g.T) * (bt @ d @ bt.T)) @ at.T, t.g_scale ** 2 * _direct(d, w))
    assert t.g_scale ** 2 == (1 << t.shift) * t.odd and t.odd % 2 == 1
    signs = {(a, b): np.sign(np.outer(bt[a], bt[b])) for a in range(t.n) for b in range(t.n)}
    worst_v = max(abs(int((bt @ (-128 * sg) @ bt.T)[ab])) for ab, sg in signs.items())
    assert worst_v == t.v_max(128) <= x86dot.INT16_MAX
    assert max(int((bt @ (255 * (sg > 0)) @ bt.T)[ab]) for ab, sg in signs.items()) <= t.v_max(255)
    g_signs = {(a, b): np.sign(np.outer(g[a], g[b])) for a in range(t.n) for b in range(t.n)}
    assert max(abs(int((g @ (-8 * sg) @ g.T)[ab])) for ab, sg in g_signs.items()) == t.u_max(8) <= x86dot.INT16_MAX


CASES = [  # cin, cout, size, pad, signed
    (32, 48, 12, 1, True),      # signed input, three output blocks, whole tiles
    (3, 20, 13, 1, False),      # 3 channels (one 4-channel block), odd map: tiles past the map's end
    (16, 16, 10, 0, False),     # no padding: an 8x8 output
    (64, 32, 6, 2, True),       # padding 2
    (16, 32, 30, 1, False),     # F(4x4): 8 tile columns, two blocks of 4 on AVX2
]


@pytest.mark.parametrize("w_bits,tile", [(8, 2), (4, 4), (6, 4)], ids=["w8", "w4", "w6"])
@pytest.mark.parametrize("target,label", TARGETS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"c{c[0]}-{c[1]}_s{c[2]}_p{c[3]}")
def test_winograd_conv_requantize_residual_bit_exact(target, label, case, w_bits, tile):
    """conv -> requantize -> residual add -> ReLU in one Winograd kernel, against numpy."""
    cin, cout, size, pad, signed = case
    rng = np.random.default_rng(cin + cout + size)
    lo, hi = x86dot.weight_range(w_bits)
    op = _conv(rng.integers(lo, hi + 1, (cout, cin, 3, 3)), pad, rng.integers(-20000, 20000, cout).astype(np.int32),
               w_bits)
    x = rng.integers(-128, 128, (2, cin, size, size)) if signed else rng.integers(0, 256, (2, cin, size, size))
    z = apply_op(op, [x])
    m, s = dyadic(rng.uniform(0.5, 2.0, (cout, 1, 1)) * 100 / np.abs(z).max())
    rq = Op("requantize", ["z"], "q", dict(lo=-128, hi=127), dict(multiplier=m.astype(np.int32),
                                                                 shift=s.astype(np.int32)), lo=-128, hi=127)
    other = rng.integers(-128, 128, z.shape)
    steps = [rq, Op("add", ["q", "other"], "s", lo=-256, hi=254), Op("relu", ["s"], "r", lo=0, hi=254)]
    kern = _kernel(op, x, target, steps, [Value(other.shape, "int8", 16)])
    assert kern.notes["path"] == f"{label}+winograd{tile}"
    want = np.maximum(ref_requantize(z, m, s, -128, 127) + other, 0)
    assert np.array_equal(run_kernel(kern, [x, other], target), want)
    assert 0 < (want == 0).mean() < 0.9


@pytest.mark.parametrize("target", [AVX2, AVX512], ids=["avx2", "avx512"])
def test_random_narrow_weight_convs_take_f4_bit_exact(target):
    """Random 3x3 stride-1 convs with 2- to 6-bit weights (shapes, padding, signedness, extreme values mixed in)
    through F(4x4), against numpy."""
    rng = np.random.default_rng(11)
    for _ in range(6):
        w_bits, cin, cout = int(rng.integers(2, 7)), int(rng.integers(1, 40)), int(rng.integers(1, 40))
        size, pad, signed = int(rng.integers(4, 19)), int(rng.integers(0, 3)), bool(rng.integers(2))
        lo, hi = x86dot.weight_range(w_bits)
        w = rng.choice([lo, hi, 0, *rng.integers(lo, hi + 1, 5)], (cout, cin, 3, 3))
        x = rng.choice([-128, 127, 0, *rng.integers(-128, 128, 5)] if signed else [0, 255, *rng.integers(0, 256, 5)],
                       (2, cin, size, size + int(rng.integers(0, 3))))
        op = _conv(w, pad, rng.integers(-9000, 9000, cout).astype(np.int32), w_bits)
        kern = _kernel(op, x, target)
        least = 7 if target is AVX2 else 8      # 2x2 tiles of 4x4 outputs; for haswell a 7x7 map too
        assert kern.notes["path"].endswith("+winograd4") == (size + 2 * pad - 2 >= least)
        assert np.array_equal(run_kernel(kern, [x], target), apply_op(op, [x]))


def _largest_admitted_channels(w_bits: int) -> int:
    """The most input channels (whole 16-channel blocks) `winograd.choose` takes for u8 inputs, found by asking
    it: checked against the bound's arithmetic below."""
    caps = capabilities(AVX2)
    dot = x86dot.choose_dot(caps, "uint8", w_bits, 4)
    c = 16
    while winograd.choose(caps, dot, "uint8", w_bits, c + 16, (3, 3), (1, 1), (1, 1), 1, (8, 8), False, 8):
        c += 16
    return c


@pytest.mark.parametrize("w_bits,shift", [(8, 2), (4, 6)])
def test_the_admitted_channels_keep_2_to_the_shift_times_y_in_int32(w_bits, shift):
    """|y| <= C * 9 * 255 * |w|max, and 2^shift y must stay in int32: at the largest admitted C it does, one
    block later it does not (both transforms: 1824 channels)."""
    c, w_max = _largest_admitted_channels(w_bits), -x86dot.weight_range(w_bits)[0]
    assert (c * 9 * 255 * w_max) << shift < 2 ** 31 <= ((c + 16) * 9 * 255 * w_max) << shift


BOUND_CASES = [pytest.param(w_bits, fill, id=f"w{w_bits}_{fill}") for w_bits in (8, 4)
               for fill in x86dot.weight_range(w_bits)]


@pytest.mark.parametrize("w_bits,fill", BOUND_CASES)
def test_winograd_at_the_int32_bound(w_bits, fill):
    """Every input 255 and every weight at an end of its range at the largest admitted channel count: 2^shift y
    comes within 0.3% of int32's end (the transformed sums M wrap many times over for F(4x4)) and the kernel still
    equals the exact conv; one channel block more and the conv takes the direct kernel, still exact."""
    c = _largest_admitted_channels(w_bits)
    m, shift = (2, 2) if w_bits == 8 else (4, 6)
    for cin, path in [(c, f"avx2+winograd{m}"), (c + 16, "avx2")]:
        op = _conv(np.full((16, cin, 3, 3), fill), 1, w_bits=w_bits)
        x = np.full((1, cin, 8, 8), 255)
        kern = _kernel(op, x, AVX2)
        assert kern.notes["path"] == path
        want = apply_op(op, [x])
        if cin == c:
            assert np.abs(want).max() << shift > 0.997 * 2 ** 31 * abs(fill) / -x86dot.weight_range(w_bits)[0]
        assert np.array_equal(run_kernel(kern, [x], AVX2), want)


@pytest.mark.parametrize("w_bits", [8, 4])
def test_one_block_past_the_bound_breaks_exactness(monkeypatch, w_bits):
    """The bound is real: forced past it (one channel block more), the same extreme conv comes out wrong."""
    c = _largest_admitted_channels(w_bits) + 16
    monkeypatch.setattr(winograd, "INT32_LIMIT", 1 << 40)
    op = _conv(np.full((16, c, 3, 3), x86dot.weight_range(w_bits)[0]), 1, w_bits=w_bits)
    x = np.full((1, c, 8, 8), 255)
    kern = _kernel(op, x, AVX2)
    assert "+winograd" in kern.notes["path"]
    assert not np.array_equal(run_kernel(kern, [x], AVX2), apply_op(op, [x]))


def test_f4_on_a_vnni_target_where_v_is_shared_bit_exact():
    """With VNNI, a 4-bit conv whose input outweighs its weights takes F(4x4) on `vpmaddwd`; 8-bit ones stay on
    VNNI."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 256, (2, 16, 20, 20))
    for w_bits, path in [(4, "avx512bw+winograd4"), (8, "vnni")]:
        lo, hi = x86dot.weight_range(w_bits)
        op = _conv(rng.integers(lo, hi + 1, (32, 16, 3, 3)), 1, rng.integers(-500, 500, 32).astype(np.int32),
                   w_bits)
        kern = _kernel(op, x, VNNI)
        assert kern.notes["path"] == path
        assert np.array_equal(run_kernel(kern, [x], VNNI), apply_op(op, [x]))


def _v_layout(kern) -> tuple:
    """The shape of the kernel's V buffer: position-major (n^2, N, ...) where it is computed once for the batch."""
    line = next(ln for ln in kern.func.script().splitlines() if "wino_v = " in ln and "alloc_buffer" in ln)
    return tuple(int(v) for v in line.split("((")[1].split(")")[0].split(","))


@pytest.mark.parametrize("target,w_bits", [(AVX2, 4), (AVX2, 8), (AVX512, 6), (AVX512, 8), (VNNI, 4)],
                         ids=["avx2-w4", "avx2-w8", "avx512-w6", "avx512-w8", "vnni-w4"])
@pytest.mark.parametrize("images,cin,cout,size", [(1, 40, 24, 7), (3, 16, 48, 9), (2, 64, 48, 14)],
                         ids=["batch1-7x7", "batch3-9x9", "batch2-14x14"])
def test_v_once_for_the_batch_bit_exact(monkeypatch, target, w_bits, images, cin, cout, size):
    """Where the weights outweigh the input and the batch's V fits `V_BATCH_BYTES`, V is computed once for the
    batch (position-major) and each 16 output channels' tiles read it; with the budget at 0 V is recomputed per
    16 output channels. Both against numpy: conv, requantize and ReLU, weights and inputs at their ends mixed in."""
    rng = np.random.default_rng(images * cin + size + w_bits)
    lo, hi = x86dot.weight_range(w_bits)
    op = _conv(rng.choice([lo, hi, *rng.integers(lo, hi + 1, 6)], (cout, cin, 3, 3)), 1,
               rng.integers(-9000, 9000, cout).astype(np.int32), w_bits)
    x = rng.choice([0, 255, *rng.integers(0, 256, 6)], (images, cin, size, size))
    assert op.consts["weight"].size * w_bits // 8 > cin * size * size          # the weights outweigh the input
    z = apply_op(op, [x])
    m, s = dyadic(rng.uniform(0.5, 2.0, (cout, 1, 1)) * 100 / np.abs(z).max())
    rq = Op("requantize", ["z"], "q", dict(lo=0, hi=255), dict(multiplier=m.astype(np.int32),
                                                             shift=s.astype(np.int32)), lo=0, hi=255)
    want = ref_requantize(z, m, s, 0, 255)
    n = 6 if w_bits <= 6 else 4
    kern = _kernel(op, x, target, [rq])
    assert kern.notes["path"].endswith(f"+winograd{n - 2}") and _v_layout(kern)[0] == n * n
    assert np.array_equal(run_kernel(kern, [x], target), want)
    monkeypatch.setattr(winograd, "V_BATCH_BYTES", 0)
    kern = _kernel(op, x, target, [rq])
    # V per 16 output channels: with VNNI the direct conv, for skylake-avx512 on a 7x7 map too (`spans`)
    recomputed = target is not VNNI and not (target is AVX512 and n == 6 and size == 7)
    assert kern.notes["path"].endswith("winograd" + str(n - 2)) == recomputed
    if recomputed:
        assert _v_layout(kern)[0] == images
    assert np.array_equal(run_kernel(kern, [x], target), want)


def test_v_once_up_to_its_budget(monkeypatch):
    """`v_once` admits a batch whose V (images x tiles x n^2 x channels x 2 bytes) is at most `V_BATCH_BYTES`
    and refuses one channel more; never where the input outweighs the weights."""
    per_channel = 4 * 4 * 36 * 2                          # F(4x4) on 14x14: 4 x 4 tiles of 36 positions
    channels = winograd.V_BATCH_BYTES // (8 * per_channel)
    assert winograd.v_once(winograd.F4, True, (14, 14), channels, 8)
    assert not winograd.v_once(winograd.F4, True, (14, 14), channels + 1, 8)
    monkeypatch.setattr(winograd, "V_BATCH_BYTES", 8 * 256 * per_channel)
    assert winograd.v_once(winograd.F4, True, (13, 14), 256, 8)            # 13 rows: still 4 tiles
    assert not winograd.v_once(winograd.F4, True, (14, 14), 257, 8)
    assert not winograd.v_once(winograd.F2, True, (14, 14), 256, 8)       # 7 x 7 tiles of 16 positions
    assert not winograd.v_once(winograd.F4, False, (14, 14), 16, 1)


F = {"F2": winograd.F2, "F4": winograd.F4, None: None}


@pytest.mark.parametrize("target,x_dtype,w_bits,kernel,stride,weights_outer,images,expected", [
    (AVX2, "uint8", 8, (3, 3), (1, 1), False, 8, "F2"),
    (AVX512, "int8", 8, (3, 3), (1, 1), True, 8, "F2"),
    (AVX2, "uint8", 4, (3, 3), (1, 1), True, 8, "F4"),
    (AVX512, "int8", 6, (3, 3), (1, 1), False, 8, "F4"),
    (AVX2, "uint8", 7, (3, 3), (1, 1), False, 8, None),    # |U| too wide for F(4x4); direct on vpmaddubsw
    (AVX2, "uint8", 8, (3, 3), (2, 2), False, 8, None),
    (AVX2, "uint8", 4, (1, 1), (1, 1), False, 8, None),
    (VNNI, "uint8", 8, (3, 3), (1, 1), False, 8, None),    # vpdpbusd: 8-bit operands
    (VNNI, "uint8", 4, (3, 3), (1, 1), False, 8, "F4"),
    (VNNI, "uint8", 4, (3, 3), (1, 1), True, 8, "F4"),     # V once for the batch (0.6 MB)
    (VNNI, "uint8", 4, (3, 3), (1, 1), True, 128, None),   # 9.4 MB: V per 16 output channels, slower than VNNI
    ("amx", "uint8", 4, (3, 3), (1, 1), False, 8, None),
], ids=["avx2", "avx512-signed", "avx2-w4", "avx512-w6", "w7", "stride2", "1x1", "vnni", "vnni-w4",
        "vnni-w4-weights-outer", "vnni-w4-weights-outer-large-batch", "amx"])
def test_which_convs_take_which_transform(target, x_dtype, w_bits, kernel, stride, weights_outer, images, expected):
    caps = dataclasses.replace(capabilities(VNNI), amx=True) if target == "amx" else capabilities(target)
    dot = x86dot.choose_dot(caps, x_dtype, w_bits, 4)
    assert winograd.choose(caps, dot, x_dtype, w_bits, 64, kernel, stride, (1, 1), 1, (14, 14), weights_outer,
                           images) is F[expected]


@pytest.mark.parametrize("target,cases", [
    (AVX2, [(8, 7, "F2"), (4, 7, "F4"), (4, 6, None), (4, 8, "F4"), (8, 3, None)]),
    (AVX512, [(8, 7, "F2"), (4, 7, None), (4, 8, "F4"), (8, 3, None)])], ids=["avx2", "avx512"])
def test_small_maps_take_f2_or_the_direct_kernel(target, cases):
    """Two whole tiles across each way, or for F(4x4) on AVX2 a 7x7 map: a 7x7 output takes F(2x2) for 8-bit
    weights, F(4x4) for 4-bit ones on AVX2 and the direct kernel on AVX-512; 6x6 and 3x3 take neither."""
    caps = capabilities(target)
    for w_bits, size, expected in cases:
        dot = x86dot.choose_dot(caps, "uint8", w_bits, 4)
        got = winograd.choose(caps, dot, "uint8", w_bits, 64, (3, 3), (1, 1), (1, 1), 1, (size, size), False, 8)
        assert got is (getattr(winograd, expected) if expected else None), (w_bits, size)


@pytest.mark.parametrize("target,label", TARGETS)
@pytest.mark.parametrize("w_bits,cin,size,u_in_kernel", [(4, 64, 8, True), (4, 16, 16, False), (6, 32, 7, True),
                                                         (8, 48, 6, True), (8, 16, 12, False)])
def test_transformed_weights_in_the_kernel_or_stored(target, label, w_bits, cin, size, u_in_kernel):
    """Where the weights outweigh the input, the module holds the int8 weights and the kernel computes U (the
    `wino_u` stage); else it holds U itself (int16, n^2 per weight pair). Both against numpy, weights at their
    range's ends mixed in."""
    rng = np.random.default_rng(w_bits * cin + size)
    lo, hi = x86dot.weight_range(w_bits)
    w = rng.choice([lo, hi, *rng.integers(lo, hi + 1, 6)], (cin, cin, 3, 3))
    x = rng.choice([0, 255, *rng.integers(0, 256, 6)], (2, cin, size, size))
    op = _conv(w, 1, rng.integers(-9000, 9000, cin).astype(np.int32), w_bits)
    kern = _kernel(op, x, target)
    n = 6 if w_bits <= 6 else 4                     # a 7x7 map takes F(4x4) where V is computed once
    assert kern.notes["path"] == (f"{label}+winograd{n - 2}" if n else label)
    if n:
        assert ("wino_u" in kern.func.script()) == u_in_kernel
        stored = kern.consts[0]
        assert stored.dtype == (np.int8 if u_in_kernel else np.int16)
        assert stored.size == cin * cin * (9 if u_in_kernel else n * n)
    assert np.array_equal(run_kernel(kern, [x], target), apply_op(op, [x]))
