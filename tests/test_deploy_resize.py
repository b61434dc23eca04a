"""The TVM back end on the resampling and channel-gather ops (`hawq_ray.ops.resize`, `channel_gather` of
`hawq_ray.ops.channels`): each held to the integer executor on every value it stores. resize nearest and bilinear
(align_corners both ways, up and down) of int8 and int16 maps at their extremes and of a conv's INT32 accumulator
(int64 sums), with a per-channel affine, a lookup or a requantize fused after it, on the host and generic targets;
channel gathers with repeated and reordered channels across channel blocks (C not a multiple of 16), with tails;
and the `Pyramid` and `Gathers` models of tests/test_resize.py from QAT to the compiled module.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hawq_ray.analysis.verify import compare_values, executor_of, first_divergence
from hawq_ray.deploy import compile_program
from hawq_ray.ops.resize import resize_consts
from hawq_ray.program.executor import run_program
from hawq_ray.program.program import IntegerProgram, Op
from hawq_ray.quant.qat import prepare
from test_resize import Gathers, Pyramid

GENERIC = {"kind": "llvm", "mcpu": "skylake"}      # AVX2: no VNNI, the generic schedules
I16 = (-(1 << 15), (1 << 15) - 1)
RANGES = {"int8": (-128, 127), "int16": I16}


def _check(program: IntegerProgram, inputs: list, target="llvm") -> dict:
    """Compile at the inputs' batch with every stored value returned; each value and the output equal the
    integer executor's on every input batch. Returns the manifest."""
    model = compile_program(program, batch=inputs[0].shape[0], target=target, every_value=True)
    reference = executor_of(program)
    for x in inputs:
        rows = compare_values(program, model, x)
        assert rows and first_divergence(rows) is None, first_divergence(rows)
        assert np.array_equal(model(x), reference(x))
    return model.manifest


def _program(input_shape, ops, output=None) -> IntegerProgram:
    return IntegerProgram(input_name="x", input_shape=tuple(input_shape), input_scale=1.0, ops=ops,
                          output=output or ops[-1].output, output_scale=np.asarray(1.0))


def _conv(x, out, rng, channels, c_in=3, bias=5000) -> Op:
    return Op("conv2d", [x], out, attrs={"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1,
                                         "w_bits": 8, "x_bits": 8, "x_signed": True},
              consts={"weight": rng.integers(-128, 128, (channels, c_in, 3, 3)).astype(np.int8),
                      "bias": rng.integers(-bias, bias, channels).astype(np.int32)}, layer=out)


def _narrow(x, out, lo, hi, shift) -> Op:
    return Op("requantize", [x], out, consts={"multiplier": np.asarray(1 << 30, np.int32),
                                              "shift": np.asarray(shift, np.int32)},
              attrs={"lo": lo, "hi": hi}, lo=lo, hi=hi)


def _affine(x, out, rng, channels) -> Op:
    """A per-channel int16 affine whose bias makes code 0 nonzero."""
    shape = (channels, 1, 1)
    consts = {"multiplier": rng.integers(1, 1 << 12, shape).astype(np.int32) * rng.choice([-1, 1], shape),
              "shift": np.full(shape, 10, np.int32), "bias": rng.integers(1 << 10, 1 << 14, shape).astype(np.int32)}
    return Op("affine", [x], out, attrs={"lo": I16[0], "hi": I16[1]}, consts=consts, lo=I16[0], hi=I16[1])


def _lookup(x, out, rng, offset=-128) -> Op:
    return Op("lookup", [x], out, attrs={"offset": offset},
              consts={"table": rng.integers(-128, 128, 256).astype(np.int32)}, lo=-128, hi=127)


def resize_op(x, out, shape, mode, size=None, factor=None, corners=None, **fields) -> Op:
    """A resize of a map of `shape` (N, C, H, W) as `F.interpolate` to `size` or by scale factor `factor` computes
    it (`fields`: the Op's scale, lo, hi)."""
    given = {"size": size} if size else {"scale_factor": factor}
    kw = {"align_corners": corners} if mode == "bilinear" else {}
    out_size = F.interpolate(torch.zeros(1, 1, *shape[2:]), **given, mode=mode, **kw).shape[2:]
    consts, attrs = resize_consts(tuple(shape[2:]), tuple(out_size), mode, corners, factor)
    return Op("resize", [x], out, attrs=attrs, consts=consts, **fields)


def _paths(manifest) -> list:
    return [k["path"] for k in manifest["kernels"]]


@pytest.mark.parametrize("dtype", ["int8", "int16"])
def test_resize_matches_the_executor(dtype):
    """A conv's 20-channel map requantized to int8 / int16 (mostly at the range's ends) resized nearest (x2, and
    to 11 x 5) and bilinear (to 9 x 13 with align_corners, x2 without, x0.5 down), each with a tail: a per-channel
    affine, a lookup (a requantize to 8 bits first where the map is 16-bit), none; the conv's INT32 accumulator
    resized bilinearly (int64 sums) with a requantize; a plain map (the input permuted) and the image itself (in
    blocks of 4 channels) resized. Tails fuse into the resize's kernel; on the host and generic targets."""
    rng = np.random.default_rng(len(dtype))
    lo, hi = RANGES[dtype]
    shape = (2, 20, 5, 7)
    table_in = ([] if dtype == "int8" else [_narrow("up2", "up2_8", -128, 127, 38)])
    ops = [_conv("x", "c1", rng, 20), _narrow("c1", "src", lo, hi, 38 if dtype == "int8" else 30),
           resize_op("src", "near", shape, "nearest", factor=2), _affine("near", "near_a", rng, 20),
           resize_op("src", "near2", shape, "nearest", size=(11, 5)),
           resize_op("src", "up", shape, "bilinear", size=(9, 13), corners=True), _affine("up", "up_a", rng, 20),
           resize_op("src", "up2", shape, "bilinear", factor=2, corners=False), *table_in,
           _lookup(table_in[0].output if table_in else "up2", "up2_t", rng),
           resize_op("src", "down", shape, "bilinear", factor=0.5, corners=False),
           _conv("x", "c2", rng, 20, bias=1 << 22),      # |values| ~ 2^22: their bilinear sums leave int32
           resize_op("c2", "wide", shape, "bilinear", factor=2, corners=False), _narrow("wide", "wide_q", *I16, 38),
           Op("permute", ["x"], "xt", attrs={"dims": (0, 1, 3, 2)}),
           resize_op("xt", "plain", (2, 3, 7, 5), "bilinear", factor=(2, 3), corners=True),
           resize_op("x", "image", (2, 3, 5, 7), "bilinear", factor=2, corners=False)]      # NCHW[4]c
    program = _program((3, 5, 7), ops)
    x = rng.integers(-128, 128, (2, 3, 5, 7)).astype(np.int8)
    _, values = run_program(program, torch.from_numpy(x), record=True)
    assert int(values["src"].min()) == lo and int(values["src"].max()) == hi       # the range's ends reached
    assert int(values["c2"].abs().max()) << 14 >= 1 << 31
    manifest = _check(program, [x])
    assert _paths(manifest).count("resize") == 8
    stored = {v["name"] for v in manifest["values"]}
    assert {"near_a", "near2", "up_a", "up2_t", "down", "wide_q", "plain", "image"} <= stored
    assert not {"near", "up", "up2", "wide"} & stored                      # the tails ran in the resize kernels
    _check(program, [x], GENERIC)


def test_channel_gather_matches_the_executor():
    """A conv's 20-channel map (int8; int16) gathered by indices that repeat and reorder channels across the two
    channel blocks (9 channels; 37, more than C), with a per-channel affine and a lookup tail, one read by a conv;
    a gather of a plain map (the input permuted) and of the image itself (in blocks of 4 channels); on the host and
    generic targets."""
    rng = np.random.default_rng(3)
    pick = np.asarray([19, 0, 3, 3, 17, 16, 16, 5, 19], np.int32)
    many = rng.integers(0, 20, 37).astype(np.int32)
    ops = [_conv("x", "c1", rng, 20), _narrow("c1", "a8", -128, 127, 38), _narrow("c1", "a16", *I16, 30),
           Op("channel_gather", ["a8"], "g8", consts={"index": pick}, lo=-128, hi=127),
           _affine("g8", "g8a", rng, 9),
           Op("channel_gather", ["a16"], "g16", consts={"index": many}, lo=I16[0], hi=I16[1]),
           _narrow("g16", "g16q", -128, 127, 38), _lookup("g16q", "g16t", rng),
           Op("channel_gather", ["a8"], "g8c", consts={"index": many}, lo=-128, hi=127),
           _conv("g8c", "c2", rng, 4, c_in=37),
           Op("permute", ["x"], "xt", attrs={"dims": (0, 1, 3, 2)}),
           Op("channel_gather", ["xt"], "gp", consts={"index": np.asarray([2, 2, 0], np.int32)}),
           Op("channel_gather", ["x"], "gx", consts={"index": np.asarray([1, 2, 0, 1], np.int32)})]
    program = _program((3, 5, 7), ops)
    x = [rng.integers(-128, 128, (2, 3, 5, 7)).astype(np.int8)]
    manifest = _check(program, x)
    assert _paths(manifest).count("channel_gather") == 5
    stored = {v["name"] for v in manifest["values"]}
    assert {"g8a", "g16t", "g8c", "gp", "gx"} <= stored and not {"g8", "g16", "g16q"} & stored
    _check(program, x, GENERIC)


@pytest.mark.parametrize("model,shape", [(Pyramid, (3, 10, 10)), (Gathers, (3, 6, 6))])
def test_resize_and_gather_models_compile_and_match_the_executor(model, shape):
    """The feature pyramid (nearest and bilinear upsampling, the bilinear one of a conv's INT32 accumulator) and
    the channel gathers of tests/test_resize.py, from QAT to the compiled module: every stored value equals the
    integer executor's on random codes and on what calibration saw."""
    torch.manual_seed(0)
    qm = prepare(model().eval(), "uniform8", shape)
    qm.calibrate([torch.randn(8, *shape, generator=torch.Generator().manual_seed(1))]).eval()
    program = qm.to_integer()
    kind = "resize" if model is Pyramid else "channel_gather"
    rng = np.random.default_rng(2)
    inputs = [rng.integers(-128, 128, (4, *shape)).astype(np.int8),
              program.quantize_input(torch.randn(4, *shape, generator=torch.Generator().manual_seed(3))).numpy()]
    manifest = _check(program, inputs)
    assert kind in _paths(manifest)
