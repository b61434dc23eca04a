"""A lookup-table activation read 16 lanes at a time from a table of bytes in registers (`deploy/bytelut.py`,
AVX512-VBMI), with the per-tensor steps after it folded into the table; against numpy.

The kernels here are a conv (1x1 and depthwise 3x3) followed by the steps EfficientNet's SiLU lowers to: a
requantize to the table's 8-bit input, the table, a per-tensor requantize to the next layer's input scale and
its clamp. The reference computes each step from its stated semantics in numpy.
"""
from __future__ import annotations

import numpy as np
import pytest

from hawq_ray.deploy.layer import build_layer_kernel, run_kernel
from hawq_ray.deploy.target import capabilities, parse_target
from hawq_ray.program.program import Op
from numpy_reference import ref_requantize

HOST_VBMI = "avx512vbmi" in open("/proc/cpuinfo").read().split()
GENERIC = {"kind": "llvm", "mcpu": "skylake"}          # no VBMI: the lane-by-lane table read
TARGETS = [pytest.param("llvm", id="host"), pytest.param(GENERIC, id="generic")]


def silu_table(signed_out: bool) -> np.ndarray:
    codes = np.arange(-128, 128) * 0.05
    f = codes / (1 + np.exp(-codes))
    lo, hi = (-128, 127) if signed_out else (0, 255)
    return np.clip(np.floor(f / (np.abs(f).max() / hi) + 0.5), lo, hi).astype(np.int32)


def dyadic(m: np.ndarray) -> tuple:
    """b / 2^c = m with b in [2^30, 2^31)."""
    c = 30 - np.floor(np.log2(m)).astype(np.int64)
    return np.round(m * np.exp2(c)).astype(np.int32), c.astype(np.int32)


def steps_after_conv(z: np.ndarray, per_channel_tail: bool = False, signed_out: bool = True):
    """requantize (per channel, max |z| of a channel to code 160: some saturate) -> lookup -> requantize (per
    tensor, or per channel) -> output codes."""
    channels = z.shape[1]
    table = silu_table(signed_out)
    b, c = dyadic(160.0 / np.abs(z).max(axis=(0, 2, 3)).reshape(channels, 1, 1))
    tb, tc = dyadic(np.linspace(0.6, 0.9, channels).reshape(channels, 1, 1) if per_channel_tail else
                    np.array(0.79))
    lo, hi = (-128, 127) if signed_out else (0, 255)
    return [
        Op("requantize", ["z"], "a", attrs={"lo": -128, "hi": 127}, lo=-128, hi=127,
           consts={"multiplier": b, "shift": c}),
        Op("lookup", ["a"], "s", attrs={"offset": -128}, consts={"table": table},
           lo=int(table.min()), hi=int(table.max())),
        Op("requantize", ["s"], "q", attrs={"lo": lo, "hi": hi}, lo=lo, hi=hi,
           consts={"multiplier": tb, "shift": tc}),
    ]


def reference(z: np.ndarray, steps: list) -> np.ndarray:
    rq, lut, tail = steps
    a = ref_requantize(z, rq.consts["multiplier"], rq.consts["shift"], rq.attrs["lo"], rq.attrs["hi"])
    s = lut.consts["table"][a - lut.attrs["offset"]]
    return ref_requantize(s, tail.consts["multiplier"], tail.consts["shift"], tail.attrs["lo"], tail.attrs["hi"])


def conv_case(rng, depthwise: bool, channels=32, size=14):
    if depthwise:
        w = rng.integers(-127, 128, (channels, 1, 3, 3)).astype(np.int8)
        op = Op("conv2d", ["x"], "z", attrs={"stride": (1, 1), "padding": (1, 1), "groups": channels},
                consts={"weight": w, "bias": rng.integers(-3000, 3000, channels).astype(np.int32)})
    else:
        w = rng.integers(-127, 128, (channels, 24, 1, 1)).astype(np.int8)
        op = Op("conv2d", ["x"], "z", attrs={"stride": (1, 1), "padding": (0, 0)},
                consts={"weight": w, "bias": rng.integers(-3000, 3000, channels).astype(np.int32)})
    x = rng.integers(0, 256, (2, w.shape[1] * (channels if depthwise else 1), size, size)).astype(np.uint8)
    return op, x


def conv_reference(op, x: np.ndarray) -> np.ndarray:
    w = op.consts["weight"].astype(np.int64)
    groups = op.attrs.get("groups", 1)
    p = op.attrs["padding"][0]
    xp = np.pad(x.astype(np.int64), ((0, 0), (0, 0), (p, p), (p, p)))
    kh, kw = w.shape[2:]
    h, wd = x.shape[2], x.shape[3]
    out = np.zeros((x.shape[0], w.shape[0], h, wd), np.int64)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i:i + h, j:j + wd]
            if groups == 1:
                out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
            else:
                out += patch * w[None, :, 0, i, j, None, None]
    return out + op.consts["bias"].astype(np.int64)[None, :, None, None]


def reads_byte_table(kernel) -> bool:
    return any(p.name == "byte_table" for p in kernel.func.params)


def test_the_host_flag_decides_the_path():
    assert capabilities(parse_target("llvm")).vbmi == HOST_VBMI
    assert not capabilities(parse_target(GENERIC)).vbmi


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("depthwise", [False, True], ids=["1x1", "depthwise"])
@pytest.mark.parametrize("signed_out", [True, False], ids=["int8", "uint8"])
def test_lookup_with_folded_tail_matches_numpy(target, depthwise, signed_out):
    rng = np.random.default_rng(int(depthwise) * 2 + int(signed_out))
    op, x = conv_case(rng, depthwise)
    z = conv_reference(op, x)
    steps = steps_after_conv(z, signed_out=signed_out)
    kernel = build_layer_kernel(op, x.shape, target, steps=steps, input_dtype="uint8")
    assert reads_byte_table(kernel) == (target == "llvm" and HOST_VBMI)
    want = reference(z, steps)
    got = run_kernel(kernel, [x], target)
    assert np.array_equal(got, want), int((got != want).sum())
    assert len(np.unique(want)) > 50           # the table's codes, not a few saturated ones


@pytest.mark.parametrize("target", TARGETS)
def test_lookup_on_a_one_pixel_map_matches_numpy(target):
    """A squeeze-excite's expand conv: a 1x1 map, so the output's loops hold one vector each and the first
    requantize's 16-lane stage (`lanerequant`) sits beside the table's index stage, not inside its loop."""
    rng = np.random.default_rng(11)
    op, x = conv_case(rng, depthwise=False, channels=48, size=1)
    z = conv_reference(op, x)
    steps = steps_after_conv(z, signed_out=False)
    kernel = build_layer_kernel(op, x.shape, target, steps=steps, input_dtype="uint8")
    got = run_kernel(kernel, [x], target)
    assert np.array_equal(got, reference(z, steps))


def test_a_per_channel_step_after_the_lookup_is_not_folded():
    rng = np.random.default_rng(7)
    op, x = conv_case(rng, depthwise=False)
    z = conv_reference(op, x)
    steps = steps_after_conv(z, per_channel_tail=True)
    kernel = build_layer_kernel(op, x.shape, "llvm", steps=steps, input_dtype="uint8")
    assert not reads_byte_table(kernel)
    got = run_kernel(kernel, [x], "llvm")
    assert np.array_equal(got, reference(z, steps))


def test_a_per_tensor_step_stored_as_1x1x1_folds_into_the_table():
    """A per-tensor constant may be stored as (1, 1, 1): it broadcasts the table to 3-D, and the folded table
    is still the 256 codes, each the tail's value at that code (numpy)."""
    from hawq_ray.deploy.folds import table_of_tail
    table = silu_table(signed_out=True)
    lut = Op("lookup", ["a"], "s", attrs={"offset": -128}, consts={"table": table}, lo=-128, hi=127)
    tail = Op("requantize", ["s"], "q", attrs={"lo": -100, "hi": 100}, lo=-100, hi=100,
              consts={"multiplier": np.full((1, 1, 1), 1_500_000_000, np.int32),
                      "shift": np.full((1, 1, 1), 31, np.int32)})
    codes, k = table_of_tail([lut, tail], "int8")
    assert k == 0 and codes.shape == (256,)
    assert np.array_equal(codes, ref_requantize(table, 1_500_000_000, 31, -100, 100))
