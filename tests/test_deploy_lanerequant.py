"""The requantize 16 lanes at a time (`deploy/lanerequant.py`) against Python integers, and in a conv kernel
against the numpy int64 reference, at the edges of its range: z = -2^31 and 2^31 - 1, multipliers up to
2^31 - 1, shifts 31 (the left-shifted form) to 62, channel counts that are not a multiple of 16."""
from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import s_tir, te

from hawq_ray.deploy.epilogue import Value
from hawq_ray.deploy.kernels import conv2d_kernel, lane_requantize_pays
from hawq_ray.deploy.lanerequant import CONSTS, STAGE, lane_constants, lane_requantize, tensorize_lane_requantize
from hawq_ray.deploy.layer import run_kernel
from hawq_ray.deploy.target import capabilities, parse_target
from hawq_ray.deploy import layout
from hawq_ray.deploy.x86dot import choose_dot
from hawq_ray.program.program import Op
from numpy_reference import ref_requantize

# the stage is written once in TIR; LLVM lowers it to different instructions on each ISA (AVX2 has no 64-bit
# arithmetic shift and no vpermt2d), so each is held to the same integers
TARGETS = ["llvm", "avx2", "avx512"]


def exact(z, b, c):
    """(z * b + 2^(c-1)) >> c in Python integers (floor division: an arithmetic shift)."""
    return np.array([[(int(zi) * int(bi) + (1 << (int(ci) - 1))) >> int(ci) for zi, bi, ci in zip(row, b, c)]
                     for row in z], dtype=np.int64)


def edge_values(rng, rows: int) -> np.ndarray:
    z = rng.integers(-2**31, 2**31, (rows, 16), dtype=np.int64)
    z[:4] = np.array([-2**31, 2**31 - 1, 0, -1])[:, None]
    z[4:8] = rng.integers(-3, 4, (4, 16))
    return z.astype(np.int32)


def stage_module(up: bool, rows: int, target):
    """One channel block of `rows` vectors: z (int32) -> the lane stage -> out, compiled for `target`."""
    z = te.placeholder((rows, 16), "int32", name="z")
    consts = [te.placeholder((1, 1, 1, 16), "int32", name=k) for k in CONSTS]
    tile = te.compute((rows, 16), lambda r, i: z[r, i] + 0, name="tile")
    lanes = te.compute((rows, 16), lambda r, i: lane_requantize(tile[r, i], [t[0, 0, 0, i] for t in consts]),
                       name=STAGE)
    out = te.compute((rows, 16), lambda r, i: lanes[r, i] + 0, name="out")
    sch = s_tir.Schedule(te.create_prim_func([z, *consts, out]))
    for name in ("tile", STAGE):
        sch.set_scope(sch.get_sblock(name), 0, "local")
    row = sch.get_loops(sch.get_sblock("out"))[0]
    sch.compute_at(sch.get_sblock(STAGE), row)
    sch.compute_at(sch.get_sblock("tile"), row)
    tensorize_lane_requantize(sch, sch.get_sblock(STAGE), up, "local")
    return tvm.compile(sch.mod, target=target).jit()


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("lowest_shift", [31, 32, 45])
def test_stage_matches_python_integers(lowest_shift, target):
    rng = np.random.default_rng(lowest_shift)
    b = rng.integers(2**30, 2**31, 16)
    b[:2] = [2**31 - 1, 1]
    c = rng.integers(lowest_shift, 63, 16)
    c[:3] = [lowest_shift, 62, lowest_shift]
    consts = lane_constants(b, c, 16)
    up = bool(np.any(consts["up_even"]) or np.any(consts["up_odd"]))
    assert up == (lowest_shift == 31)
    z = edge_values(rng, 64)
    mod = stage_module(up, len(z), parse_target(target))
    dev = tvm.cpu()
    args = [tvm.runtime.tensor(z, dev)]
    args += [tvm.runtime.tensor(consts[k].reshape(1, 1, 1, 16).astype(np.int32), dev) for k in CONSTS]
    args.append(tvm.runtime.empty(z.shape, "int32", dev))
    mod(*args)
    assert np.array_equal(args[-1].numpy(), exact(z, b, c))


def test_constants_only_where_the_result_fits_int32():
    b, c = np.full(8, 2**30), np.full(8, 40)
    assert lane_constants(b, c, 8) is not None
    assert lane_constants(b, np.r_[c[:7], 30], 8) is None             # a shift below 31: int64 lanes
    assert lane_constants(np.r_[b[:7], 2**31], c, 8) is None          # a multiplier past int32
    assert lane_constants(b.reshape(1, 2, 4), c.reshape(1, 2, 4), 8) is None   # a constant per position
    scalar = lane_constants(np.int64(2**30 + 5), np.int64(33), 8)     # per tensor: every lane the same
    assert np.all(scalar["mult"] == 2**30 + 5) and np.all(scalar["down"] == 1)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("cout,per_tensor", [(16, False), (37, False), (37, True), (1, True)])
def test_conv_kernel_with_lane_requantize_bit_exact(cout, per_tensor, target, k):
    """An odd channel count puts the high half of the last channel's rounding constant in a padding lane. The
    stage is where `kernels.lane_requantize_pays` puts it (every target with it in a 1x1 conv and in the 3x3 conv,
    Winograd on AVX2 and AVX-512BW), and the kernel equals numpy either way."""
    rng = np.random.default_rng(cout)
    cin, size = 32, 7
    w = rng.integers(-128, 128, (cout, cin, k, k)).astype(np.int8)
    w[0] = 127                                           # channel 0 reaches the accumulator's largest values
    bias = rng.integers(-2**20, 2**20, cout).astype(np.int32)
    m = rng.integers(2**30, 2**31, cout)
    m[min(1, cout - 1)] = 2**31 - 1
    s = rng.integers(31, 63, cout)
    s[:3] = [31, 31, 62][:cout]
    if per_tensor:
        m, s = m[:1], np.array([42])
    rq = Op("requantize", ["z"], "q", dict(lo=-2**31, hi=2**31 - 1),
            dict(multiplier=(m.reshape(()) if per_tensor else m.reshape(-1, 1, 1)).astype(np.int32),
                 shift=(s.reshape(()) if per_tensor else s.reshape(-1, 1, 1)).astype(np.int32)),
            lo=-2**31, hi=2**31 - 1)
    op = Op("conv2d", ["x"], "z", dict(stride=(1, 1), padding=(k // 2, k // 2), dilation=(1, 1), groups=1, w_bits=8,
                                       x_bits=8, x_signed=False), dict(weight=w, bias=bias), layer="conv")
    x = rng.integers(0, 256, (2, cin, size, size))
    x[0] = 255
    target = parse_target(target)
    kernel = conv2d_kernel(op, Value(x.shape, "uint8", layout.channel_block(cin)), [rq], [], target)
    caps = capabilities(target)
    assert (STAGE in kernel.func.script()) == lane_requantize_pays(caps, choose_dot(caps, "uint8", 8, cin // 4), k * k,
                                                                   "+winograd" in kernel.notes["path"])
    got = run_kernel(kernel, [x], target)
    z = np.einsum("nchwij,ocij->nohw", np.lib.stride_tricks.sliding_window_view(
        np.pad(x, ((0, 0), (0, 0), (k // 2, k // 2), (k // 2, k // 2))), (k, k), axis=(2, 3)), w.astype(np.int64)) \
        + bias[None, :, None, None]
    want = ref_requantize(z, m.reshape(1, -1, 1, 1), s.reshape(1, -1, 1, 1), -2**31, 2**31 - 1)
    assert np.array_equal(got, want)


def test_avx2_keeps_the_stage_out_of_direct_8bit_convs_with_a_window():
    """On AVX2 the stage slowed direct 8-bit 3x3 convs (the int16 `vpmaddwd` path) and sped up 1x1, 4-bit and
    Winograd ones, so a conv takes it by that rule; 512-bit targets take it everywhere."""
    avx2, avx512 = capabilities(parse_target("avx2")), capabilities(parse_target("avx512"))
    wide, narrow = choose_dot(avx2, "uint8", 8, 4), choose_dot(avx2, "uint8", 4, 4)
    assert wide.in_dtype == "int16" and narrow.in_dtype == "uint8"
    assert not lane_requantize_pays(avx2, wide, 9)
    assert lane_requantize_pays(avx2, wide, 1) and lane_requantize_pays(avx2, narrow, 9)
    assert lane_requantize_pays(avx2, wide, 9, winograd=True)
    assert lane_requantize_pays(avx512, choose_dot(avx512, "uint8", 8, 4), 9)
    rng = np.random.default_rng(0)
    for k, stride, stage in ((3, 2, False), (3, 1, True), (1, 1, True)):     # direct, Winograd, 1x1
        op = Op("conv2d", ["x"], "z", dict(stride=(stride, stride), padding=(k // 2, k // 2), dilation=(1, 1),
                                           groups=1, w_bits=8, x_bits=8, x_signed=False),
                dict(weight=rng.integers(-128, 128, (16, 16, k, k)).astype(np.int8), bias=np.zeros(16, np.int32)),
                layer="conv")
        rq = Op("requantize", ["z"], "q", dict(lo=0, hi=255), dict(multiplier=np.int32(2**30), shift=np.int32(40)),
                lo=0, hi=255)
        kernel = conv2d_kernel(op, Value((1, 16, 12, 12), "uint8", 16), [rq], [], parse_target("avx2"))
        assert kernel.notes["path"].endswith("+winograd2") == (k == 3 and stride == 1)
        assert (STAGE in kernel.func.script()) == stage
