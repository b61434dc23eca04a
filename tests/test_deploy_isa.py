"""Kernels compiled for an older x86 ISA than this CPU's (`--target avx2` / `avx512`, which run here), bit for bit
against numpy's int64 reference and the integer executor: the exact AVX2 / AVX-512BW dot products of
`deploy/x86dot.py` (`vpmaddwd` for 8-bit weights, `vpmaddubsw` with bounded int16 partial sums for narrower
ones), the int16 bound at its edge, and the path each kernel takes (a silent fall back to the generic schedule
fails here). Shapes are tiny; the whole file runs in well under a minute on 2 cores.
"""
from __future__ import annotations

import dataclasses
import functools

import numpy as np
import pytest
import torch

from hawq_ray.analysis.verify import compare_batches, executor_of
from hawq_ray.contract import HawqError
from hawq_ray.deploy import compile_program, kernels, layout, x86dot
from hawq_ray.deploy.conv_pool import conv2d_max_pool_kernel
from hawq_ray.deploy.epilogue import Value
from hawq_ray.deploy.kernels import conv2d_kernel, dense_kernel
from hawq_ray.deploy.layer import run_kernel
from hawq_ray.deploy.target import capabilities, parse_target
from hawq_ray.inputs.models import get_model, input_shape
from hawq_ray.program.dyadic import dyadic
from hawq_ray.program.program import Op
from hawq_ray.quant.qat import prepare
from numpy_reference import apply_op, ref_requantize
from small_models import SHAPE, SqueezeExcite
from test_deploy_models import alternating_bits

FLAGS = set(open("/proc/cpuinfo").read().split())
AVX2 = parse_target("avx2")
AVX512 = parse_target("avx512")
HOST = parse_target("llvm")


def host_label() -> str:
    """The conv path the host target must take, from /proc/cpuinfo's flags (AMX aside: small convs here)."""
    return "vnni" if "avx512_vnni" in FLAGS else "avx512bw" if "avx512bw" in FLAGS else \
        "avx2" if "avx2" in FLAGS else "generic"


ISA_TARGETS = [pytest.param(AVX2, "avx2", id="avx2"), pytest.param(AVX512, "avx512bw", id="avx512"),
               pytest.param(HOST, host_label(), id="host")]


# ------------------------------------------------------------------------------------------- targets by ISA

@pytest.mark.parametrize("name,mcpu,avx512bw,vnni", [("avx2", "haswell", False, False),
                                                     ("AVX512", "skylake-avx512", True, False),
                                                     ("avx512-vnni", "cascadelake", True, True)])
def test_isa_short_names(name, mcpu, avx512bw, vnni):
    target = parse_target(name)
    assert target.attrs["mcpu"] == mcpu
    caps = capabilities(target)
    assert caps.avx2 and caps.avx512bw == avx512bw and caps.vnni == vnni and not caps.amx


def test_isa_this_cpu_cannot_run_is_a_one_line_error():
    if "amx_int8" in FLAGS:             # this CPU runs AMX: the target is checked and accepted
        assert parse_target("amx").attrs["mcpu"] == "sapphirerapids"
    else:
        with pytest.raises(HawqError, match="lacks") as err:
            parse_target("amx")
        assert "\n" not in str(err.value)
    assert parse_target("amx", check=False).attrs["mcpu"] == "sapphirerapids"     # exporting for it works
    with pytest.raises(HawqError, match="unknown mcpu"):
        parse_target({"kind": "llvm", "mcpu": "not-a-cpu"})


# ------------------------------------------------------------------------------------ the int16 bound

def brute_force_limit(x_max: int, w_lo: int, w_hi: int) -> int:
    """The most pair sums whose extreme totals (every product at its extreme, of either sign) stay in int16."""
    n = 0
    while (n + 1) * 2 * x_max * w_hi <= 32767 and (n + 1) * 2 * x_max * w_lo >= -32768 and n < 100:
        n += 1
    return n


@pytest.mark.parametrize("w_bits", [2, 3, 4, 5, 6, 7, 8])
def test_int16_sum_limit_matches_the_operand_ranges(w_bits):
    lo, hi = -(1 << (w_bits - 1)), (1 << (w_bits - 1)) - 1
    assert x86dot.int16_sum_limit(255, lo, hi) == brute_force_limit(255, lo, hi)
    assert x86dot.int16_sum_limit(255, -8, 7) == 8 and x86dot.int16_sum_limit(255, -128, 127) == 0


@pytest.mark.parametrize("x_range", [(0, 255), (-128, 127)], ids=["u8", "s8"])
@pytest.mark.parametrize("w_bits", [2, 3, 4, 6, 8])
def test_int16_terms_counts_the_products_that_fit_int16(x_range, w_bits):
    """Against every product of the two ranges: n terms fit while n times the largest and n times the smallest
    product stay in int16."""
    lo, hi = -(1 << (w_bits - 1)), (1 << (w_bits - 1)) - 1
    products = np.outer(np.arange(x_range[0], x_range[1] + 1), np.arange(lo, hi + 1))
    n = 0
    while (n + 1) * products.max() <= 32767 and (n + 1) * products.min() >= -32768 and n < 1000:
        n += 1
    assert x86dot.int16_terms(*x_range, lo, hi) == n
    assert x86dot.int16_terms(0, 255, -8, 7) == 16 and x86dot.int16_terms(-128, 127, -8, 7) == 31


def _dense_op(w: np.ndarray, w_bits: int, bias=None):
    b = np.zeros(w.shape[0], np.int32) if bias is None else bias
    return Op("dense", ["x"], "z", dict(w_bits=w_bits, x_bits=8), dict(weight=w, bias=b), layer="fc")


@pytest.mark.parametrize("target,label", ISA_TARGETS[:2])
@pytest.mark.parametrize("w", [-8, 7])
@pytest.mark.parametrize("signed", [False, True])
def test_pmaddubsw_at_the_int16_edge(target, label, w, signed):
    """All inputs at their largest (255, or 127 shifted by +128) and every 4-bit weight -8 (or 7): each int16
    partial sum of a call holds int16_sum_limit = 8 pair sums, -32640 (or 28560), one step from saturation;
    the dense kernel (which pads its reduction to whole calls) still equals the exact sum."""
    dot = x86dot.choose_dot(capabilities(target), "uint8", 4, None)
    assert dot.group == x86dot.int16_sum_limit(255, -8, 7) == 8 and dot.in_dtype == "uint8"
    I, O = 8 * 4 * 3, 32                       # three whole calls
    x = np.full((3, I), 127 if signed else 255)
    op = _dense_op(np.full((O, I), w, np.int8), 4)
    kern = dense_kernel(op, Value(x.shape, "int8" if signed else "uint8", None), [], [], target)
    assert kern.notes["path"] == label
    assert np.array_equal(run_kernel(kern, [x], target), apply_op(op, [x]))


@pytest.mark.parametrize("target", [AVX2, AVX512], ids=["avx2", "avx512"])
def test_one_pair_sum_past_the_limit_breaks_exactness(target, monkeypatch):
    """The bound is tight: forcing 9 pair sums per int16 partial sum (one more than int16_sum_limit) makes the
    same edge case wrong, so the edge test above can fail."""
    def nine(*args):
        dot = x86dot.choose_dot(*args)
        bits = 512 if capabilities(target).avx512bw else 256
        return dataclasses.replace(dot, group=9, intrinsic=x86dot.pmaddubsw_intrinsic(bits, 9))
    monkeypatch.setattr(kernels, "choose_dot", nine)
    x = np.full((2, 36), 255)
    op = _dense_op(np.full((16, 36), -8, np.int8), 4)
    got = run_kernel(dense_kernel(op, Value(x.shape, "uint8", None), [], [], target), [x], target)
    assert not np.array_equal(got, apply_op(op, [x]))


# ---------------------------------------------------------------------------------------- kernels

def _conv_op(rng, cin, cout, k, stride, pad, w_bits, dilation=1, fill=None):
    lo, hi = -(1 << (w_bits - 1)), (1 << (w_bits - 1))
    w = np.full((cout, cin, k, k), fill, np.int8) if fill is not None else \
        rng.integers(lo, hi, (cout, cin, k, k)).astype(np.int8)
    b = rng.integers(-20000, 20000, cout).astype(np.int32)
    return Op("conv2d", ["x"], "z", dict(stride=(stride, stride), padding=(pad, pad), dilation=(dilation, dilation),
                                         groups=1, w_bits=w_bits, x_bits=8), dict(weight=w, bias=b), layer="conv")


def _input(rng, shape, signed):
    return rng.integers(-128, 128, shape) if signed else rng.integers(0, 256, shape)


def _requant(rng, shape, lo, hi, scale):
    m, s = dyadic(rng.uniform(0.5, 2.0, shape) * scale)
    return Op("requantize", ["z"], "q", dict(lo=lo, hi=hi), dict(multiplier=m.astype(np.int32),
                                                                 shift=s.astype(np.int32)), lo=lo, hi=hi)


CONV_CASES = [  # cin, cout, size, k, stride, pad, w_bits, signed, dilation
    (3, 20, 13, 3, 2, 1, 8, True, 1),       # stem-like: signed input, 3 channels (a 4-channel block), odd size
    (24, 32, 37, 3, 2, 1, 4, False, 1),     # packed int4 weights, a masked row tail (stride 1 takes F(4x4))
    (32, 48, 10, 3, 1, 2, 4, True, 2),      # int4, signed input (the +128 shift), dilation
    (16, 16, 9, 1, 1, 0, 8, False, 1),      # 1x1, no padding: the int16 widening still happens
    (16, 8, 23, 5, 2, 2, 8, False, 1),      # output channels below one block
    (32, 32, 6, 3, 1, 1, 6, True, 1),       # 6-bit weights: vpmaddubsw with 2 pair sums per int16 partial
                                            # (6x6: too small for F(4x4))
]


@pytest.mark.parametrize("target,label", ISA_TARGETS)
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"c{c[0]}-{c[1]}_k{c[3]}s{c[4]}_w{c[6]}")
def test_conv_requantize_residual_bit_exact(target, label, case):
    """conv -> requantize -> residual add -> ReLU in one kernel on each ISA's path, against numpy."""
    cin, cout, size, k, stride, pad, w_bits, signed, dil = case
    rng = np.random.default_rng(cin * 7 + cout + w_bits)
    op = _conv_op(rng, cin, cout, k, stride, pad, w_bits, dilation=dil)
    x = _input(rng, (2, cin, size, size), signed)
    z = apply_op(op, [x])
    rq = _requant(rng, (cout, 1, 1), -128, 127, 100 / np.abs(z).max())
    other = rng.integers(-128, 128, z.shape)
    steps = [rq, Op("add", ["q", "other"], "s", lo=-256, hi=254), Op("relu", ["s"], "r", lo=0, hi=254)]
    kern = conv2d_kernel(op, Value(x.shape, "int8" if signed else "uint8", layout.channel_block(cin)), steps,
                         [Value(other.shape, "int8", 16)], target)
    assert kern.notes["path"] == label
    want = np.maximum(ref_requantize(z, rq.consts["multiplier"], rq.consts["shift"], -128, 127) + other, 0)
    got = run_kernel(kern, [x, other], target)
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    assert 0 < (want == 0).mean() < 0.9


@pytest.mark.parametrize("target,label", ISA_TARGETS[:2])
@pytest.mark.parametrize("w", [-8, 7])
def test_conv_int4_at_the_int16_edge(target, label, w):
    """A 3x3 conv, 32 input channels of 255 and every weight -8 (or 7): the largest int16 partial sums a conv
    call forms (4 pair sums), int32 output."""
    rng = np.random.default_rng(0)
    op = _conv_op(rng, 32, 16, 3, 1, 1, 4, fill=w)
    x = np.full((1, 32, 6, 6), 255)
    kern = conv2d_kernel(op, Value(x.shape, "uint8", 16), [], [], target)
    assert kern.notes["path"] == label
    assert np.array_equal(run_kernel(kern, [x], target), apply_op(op, [x]))


DENSE_CASES = [  # in, out, rows, w_bits, signed
    (100, 40, 5, 8, True),      # 8-bit: vpmaddwd, inputs padded to a multiple of 4, a partial output block
    (64, 32, 3, 4, False),
    (70, 10, 9, 4, True),       # 4-bit, signed: inputs padded to whole calls of 8 x 4, the +128 shift
]


@pytest.mark.parametrize("target,label", ISA_TARGETS)
@pytest.mark.parametrize("case", DENSE_CASES, ids=lambda c: f"i{c[0]}-o{c[1]}_w{c[3]}")
def test_dense_requantize_bit_exact(target, label, case):
    I, O, T, w_bits, signed = case
    rng = np.random.default_rng(I + O)
    lim = 1 << (w_bits - 1)
    op = _dense_op(rng.integers(-lim, lim, (O, I)).astype(np.int8), w_bits,
                   rng.integers(-20000, 20000, O).astype(np.int32))
    x = _input(rng, (T, I), signed)
    z = apply_op(op, [x])
    rq = _requant(rng, (O,), -128, 127, 100 / np.abs(z).max())
    kern = dense_kernel(op, Value(x.shape, "int8" if signed else "uint8", None), [rq], [], target)
    assert kern.notes["path"] == label
    got = run_kernel(kern, [x], target)
    want = ref_requantize(z, rq.consts["multiplier"], rq.consts["shift"], -128, 127)
    assert np.array_equal(got, want) and len(np.unique(want)) > 20


@pytest.mark.parametrize("target,label", ISA_TARGETS[:2])
@pytest.mark.parametrize("w_bits", [8, 4])
def test_stem_conv_max_pool_bit_exact(target, label, w_bits):
    """ResNet's stem (7x7/2 conv on a signed 3-channel image, ReLU, 3x3/2 max pool) fused in one kernel."""
    rng = np.random.default_rng(w_bits)
    op = _conv_op(rng, 3, 20, 7, 2, 3, w_bits)
    x = _input(rng, (2, 3, 30, 30), True)
    relu = Op("relu", ["z"], "r", lo=0)
    pool = Op("max_pool2d", ["r"], "p", dict(kernel=(3, 3), stride=(2, 2), padding=(1, 1), dilation=(1, 1),
                                             ceil_mode=False), lo=0)
    pooled = apply_op(pool, [np.maximum(apply_op(op, [x]), 0)])
    rq = _requant(rng, (20, 1, 1), 0, 255, 400 / pooled.max())
    kern = conv2d_max_pool_kernel(op, Value(x.shape, "int8", 4), [relu], pool, [rq], target, "stem")
    assert kern.notes["path"] == label + "+max_pool"
    got = run_kernel(kern, [x], target)
    assert np.array_equal(got, ref_requantize(pooled, rq.consts["multiplier"], rq.consts["shift"], 0, 255))


FOLD_CASES = [  # cin, k, stride, pad, size, signed, pairs per kernel row folded (None: not folded)
    (3, 7, 2, 3, 17, True, 12),      # ResNet's stem: 21 row elements in 12 pairs, not 7 x 2
    (3, 5, 2, 2, 12, False, 8),      # 15 elements in 8 pairs, not 10
    (1, 5, 2, 2, 11, True, 4),       # one channel: a position holds two columns
    (2, 3, 2, 0, 9, False, 4),       # two channels: a position is one column
    (3, 3, 2, 1, 12, False, None),   # MobileNet's stem: 9 elements would take 6 pairs, as unfolded
    (3, 3, 1, 1, 7, True, None),     # stride 1 on 3 channels: a position would straddle two outputs' rows
]


@pytest.mark.parametrize("target,label", ISA_TARGETS[:2])
@pytest.mark.parametrize("case", FOLD_CASES, ids=lambda c: f"c{c[0]}_k{c[1]}s{c[2]}")
def test_few_channels_folded_into_rows_bit_exact(target, label, case):
    """A conv on fewer channels than its input's block reads its rows as (column, channel) pairs on the int16
    path where that takes fewer pairs (`kernels.fold_row_channels`), and the output is numpy's, at both ends of
    the weights' range and on random ones."""
    cin, k, stride, pad, size, signed, pairs = case
    rng = np.random.default_rng(cin * 10 + k)
    for fill in (-128, 127, None):
        op = _conv_op(rng, cin, 24, k, stride, pad, 8, fill=fill)
        x = np.full((2, cin, size, size), -128 if signed else 255) if fill is not None else \
            _input(rng, (2, cin, size, size), signed)
        kern = conv2d_kernel(op, Value(x.shape, "int8" if signed else "uint8", layout.channel_block(cin)), [], [],
                             target)
        assert kern.notes["path"].startswith(label)
        assert kern.consts[0].shape[3] * kern.consts[0].shape[4] == (pairs or 2 * k)
        assert np.array_equal(run_kernel(kern, [x], target), apply_op(op, [x]))


# ------------------------------------------------------------------------------------------ models

@functools.lru_cache(maxsize=None)
def _program(name, config):
    """The lowered program of the default model (name None) or SqueezeExcite, and its input shape."""
    torch.manual_seed(0)
    model = get_model(None) if name is None else SqueezeExcite().eval()
    shape = tuple(input_shape(model)) if name is None else SHAPE
    bits = alternating_bits(model, shape) if config == "mixed" else config
    return prepare(model, bits, shape).calibrate([torch.randn(4, *shape) for _ in range(2)]).to_integer(), shape


def _check_model(name, config, target, label):
    """Compiled for `target`: the manifest names its CPU, every dense / non-grouped conv kernel takes `label`'s
    path, and the outputs equal the integer executor's."""
    prog, shape = _program(name, config)
    deployed = compile_program(prog, batch=4, target=target)
    assert deployed.manifest["target"]["mcpu"] == target.attrs["mcpu"]
    convs = [k["path"] for k in deployed.manifest["kernels"]
             if k.get("layer") and k["path"] not in ("depthwise", "grouped")]
    assert convs and all(p.split("+")[0] == label for p in convs), convs
    xs = [prog.quantize_input(torch.randn(4, *shape) * s).numpy() for s in (0.5, 2.0)]
    assert compare_batches(deployed, executor_of(prog), xs).differing == 0


@pytest.mark.parametrize("target,label,config", [(AVX2, "avx2", "uniform8"), (AVX2, "avx2", "uniform4"),
                                                 (AVX2, "avx2", "mixed"), (AVX512, "avx512bw", "mixed")],
                         ids=["avx2-uniform8", "avx2-uniform4", "avx2-mixed", "avx512-mixed"])
def test_default_model_matches_integer_executor(target, label, config):
    _check_model(None, config, target, label)


def test_mobile_ops_mixed_match_integer_executor():
    """Depthwise and grouped convs, gates, a dense head, 4 and 8 bits in turn, on AVX2."""
    _check_model("squeeze_excite", "mixed", AVX2, "avx2")
