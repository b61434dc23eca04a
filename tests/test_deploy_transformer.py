"""The TVM back end on a vision transformer's integer program: digits_vit under uniform 8-bit, uniform 4-bit and a
mixed 4/8-bit config, compiled and held to the integer executor on every value it stores; and each transformer
op alone (softmax, matmul, layer_norm over the last axis and uncentered, permute moving the batch axis, take,
constant, pad and crop of plain values and of blocked maps, the layout changes between blocked maps and plain
values) on inputs at the edges of its range, on the host target (AVX512-VNNI where the CPU has it) and on the
generic AVX2 schedule.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from hawq_ray.analysis.verify import compare_values, executor_of, first_divergence
from hawq_ray.deploy import compile_program
from hawq_ray.inputs.vit import DigitsViT
from hawq_ray.ops.layernorm import layer_norm_constants
from hawq_ray.ops.softmax import exponent_constants
from hawq_ray.program.program import IntegerProgram, Op
from hawq_ray.quant.qat import prepare

GENERIC = {"kind": "llvm", "mcpu": "skylake"}      # AVX2: no VNNI, the generic schedules
FLAGS = set(open("/proc/cpuinfo").read().split())
VNNI = "avx512_vnni" in FLAGS
SHAPE = (1, 16, 16)
I16 = (-(1 << 15), (1 << 15) - 1)


def _check(program: IntegerProgram, inputs: list, target="llvm") -> dict:
    """Compile `program` at the inputs' batch with every stored value returned; assert that the output and every
    value equal the integer executor's on each input batch. Returns the model's manifest."""
    model = compile_program(program, batch=inputs[0].shape[0], target=target, every_value=True)
    reference = executor_of(program)
    for x in inputs:
        rows = compare_values(program, model, x)
        assert rows and first_divergence(rows) is None, first_divergence(rows)
        out, want = model(x), reference(x)
        assert out.shape == want.shape and np.array_equal(out, want)
    return model.manifest


def _program(input_shape, ops, output=None) -> IntegerProgram:
    return IntegerProgram(input_name="x", input_shape=tuple(input_shape), input_scale=1.0, ops=ops,
                          output=output or ops[-1].output, output_scale=np.asarray(1.0))


def _edges(rng, shape, lo, hi, p_edge=0.5) -> np.ndarray:
    """Random integers in [lo, hi], about half of them lo or hi."""
    x = rng.integers(lo, hi + 1, shape)
    return np.where(rng.random(shape) < p_edge, rng.choice([lo, hi], shape), x)


def _table(rng, lo, hi) -> np.ndarray:
    """A lookup of the int8 input: 256 codes to values in [lo, hi], half of them lo or hi (reaches any range)."""
    return _edges(rng, 256, lo, hi).astype(np.int32)


def _lookup(x, out, table) -> Op:
    return Op("lookup", [x], out, attrs={"offset": -128}, consts={"table": table})


def _paths(manifest) -> set:
    return {k["path"] for k in manifest["kernels"]}


def _conv(x, out, weight, pad) -> Op:
    return Op("conv2d", [x], out, attrs={"stride": (1, 1), "padding": (pad, pad), "dilation": (1, 1), "groups": 1,
                                         "w_bits": 8, "x_bits": 8, "x_signed": True},
              consts={"weight": weight, "bias": np.zeros(len(weight), np.int32)}, layer=out)


def _narrow(x, out, lo, hi, shift=38) -> Op:
    return Op("requantize", [x], out, consts={"multiplier": np.asarray(1 << 30, np.int32),
                                              "shift": np.asarray(shift, np.int32)},
              attrs={"lo": lo, "hi": hi}, lo=lo, hi=hi)


def _affine(x, out, rng, channels=None) -> Op:
    """An int16 affine whose bias makes code 0 nonzero (a tail that leaves a pad's zeros zero would hide a tail
    skipped there); per tensor, or per channel of an (N, C, H, W) map."""
    shape = (channels, 1, 1) if channels else ()
    consts = {"multiplier": rng.integers(1, 1 << 12, shape).astype(np.int32) * rng.choice([-1, 1], shape),
              "shift": np.full(shape, 10, np.int32), "bias": rng.integers(1 << 10, 1 << 14, shape).astype(np.int32)}
    return Op("affine", [x], out, attrs={"lo": I16[0], "hi": I16[1]}, consts=consts, lo=I16[0], hi=I16[1])


# ---------------------------------------------------------------------------------------------- digits_vit

def _vit_bits(kind: str):
    if kind != "mixed":
        return kind
    rng = np.random.default_rng(7)
    names = [n for n, m in DigitsViT().named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    return {n: 8 if n in ("patch_embed", "head") else int(rng.choice([4, 8])) for n in names}


@pytest.mark.parametrize("bits", ["uniform8", "uniform4", "mixed"])
def test_digits_vit_compiles_and_matches_the_executor_on_every_value(bits):
    torch.manual_seed(0)
    qm = prepare(DigitsViT(), _vit_bits(bits), SHAPE)
    qm.calibrate([torch.randn(8, *SHAPE) for _ in range(2)])
    program = qm.to_integer()
    ops = {op.op for op in program.ops}
    assert {"matmul", "softmax", "layer_norm", "permute", "take", "reshape", "constant"} <= ops
    rng = np.random.default_rng(1)
    inputs = [rng.integers(-128, 128, (8, *SHAPE)).astype(np.int8) for _ in range(2)]
    inputs.append(program.quantize_input(torch.randn(8, *SHAPE)).numpy())      # what calibration saw
    manifest = _check(program, inputs)
    paths = _paths(manifest)
    assert {"softmax", "layer_norm", "permute", "take", "reshape", "constant"} <= paths
    assert {"vnni", "matmul_vnni"} <= paths if VNNI else "matmul" in paths and paths & {"generic", "avx2", "avx512bw"}
    if bits == "mixed":
        assert {k.get("w_bits") for k in manifest["kernels"] if k.get("layer")} == {4, 8}


# ---------------------------------------------------------------------------------------------- softmax

@pytest.mark.parametrize("tokens", [1, 17, 197])
def test_softmax_of_int16_extremes_matches_the_executor(tokens):
    """Rows of int16 codes at input scales from tiny to large (and the multiplier and shift at their extremes):
    each scale's codes spread over the 40 units below the top where e^x matters, with one in five at -32768
    or 32767 (differences up to 2^16 - 1: the shift by the integer part clamps at 31); a row's maximum planted
    at its first, last and middle position; rows of one code."""
    rng = np.random.default_rng(tokens)
    hi, lo = (1 << 15) - 1, -(1 << 15)
    ops, outs = [], []
    scales = [(s_in, *(int(v) for v in exponent_constants(s_in).values())) for s_in in (1e-4, 0.003, 0.02, 1.0)]
    scales += [(1e-9, (1 << 31) - 1, 62), (2.0, 1, 1), (1e9, (1 << 31) - 1, 1)]
    for k, (s_in, m, s) in enumerate(scales):
        top = int(rng.integers(lo, hi + 1))
        table = np.clip(top - rng.integers(0, int(min(40 / s_in, 1 << 16)) + 1, 256), lo, hi)
        table = np.where(rng.random(256) < 0.2, rng.choice([lo, hi], 256), table)
        table[255] = min(top + 1, hi)          # code 127: a row's maximum where it is planted (below)
        table = table.astype(np.int32)
        ops += [_lookup("x", f"logits{k}", table),
                Op("softmax", [f"logits{k}"], f"p{k}", consts={"multiplier": np.asarray(m, np.int32),
                                                               "shift": np.asarray(s, np.int32)}, lo=0, hi=255)]
        outs.append(f"p{k}")
    ops.append(Op("concat", outs, "all", attrs={"axis": 1}))
    program = _program((3, tokens), ops)
    x = rng.integers(-128, 127, (4, 3, tokens)).astype(np.int8)
    x[0, 1, -1] = x[1, 0, -1] = x[2, 2, 0] = x[3, 1, tokens // 2] = 127   # the maximum last, first, between
    x[3, 0] = -128                            # a row of one code
    manifest = _check(program, [x])
    assert "softmax" in _paths(manifest)
    if tokens > 1:          # probabilities of many sizes, not rows of 0 and 255
        assert len(np.unique(executor_of(program)(x))) > 20


# ---------------------------------------------------------------------------------------------- matmul

@pytest.mark.parametrize("k", [16, 17, 768])
@pytest.mark.parametrize("target", ["llvm", "generic"])
def test_matmul_of_8_bit_extremes_matches_the_executor(k, target):
    """q @ k^T (signed x signed) and p @ v (unsigned x signed) on operands that are mostly -128 / 127 (and 0 /
    255), over K up to 768, with M and N not multiples of the tile; and u8 x u8 (no VNNI form)."""
    rng = np.random.default_rng(k)
    ops = [Op("permute", ["x"], "xt", attrs={"dims": (0, 2, 1)}),                          # (N, K, M)
           Op("matmul", ["x", "xt"], "ss", attrs={"a_signed": True, "b_signed": True, "k": k}),
           _lookup("x", "u", _table(rng, 0, 255)),
           Op("permute", ["u"], "ut", attrs={"dims": (0, 2, 1)}),
           Op("matmul", ["u", "xt"], "us", attrs={"a_signed": False, "b_signed": True, "k": k}),
           Op("matmul", ["u", "ut"], "uu", attrs={"a_signed": False, "b_signed": False, "k": k}),
           Op("concat", ["ss", "us", "uu"], "all", attrs={"axis": 1})]
    program = _program((5, k), ops)
    x = [_edges(rng, (3, 5, k), -128, 127, 0.8).astype(np.int8) for _ in range(2)]
    manifest = _check(program, x, GENERIC if target == "generic" else "llvm")
    assert ("matmul_vnni" if VNNI and target == "llvm" else "matmul") in _paths(manifest)


def test_matmul_over_heads_with_a_requantize_tail_matches_the_executor():
    """Four leading axes flattened into matrices (N, H, T, D) @ (N, H, D, T), the requantize after the product
    fused at its output."""
    rng = np.random.default_rng(3)
    ops = [Op("reshape", ["x"], "heads", attrs={"shape": (-1, 4, 6, 12)}),
           Op("permute", ["heads"], "keys", attrs={"dims": (0, 1, 3, 2)}),
           Op("matmul", ["heads", "keys"], "logits", attrs={"a_signed": True, "b_signed": True, "k": 12}),
           Op("requantize", ["logits"], "q", consts={"multiplier": np.asarray(1 << 30, np.int32),
                                                     "shift": np.asarray(40, np.int32)},
              attrs={"lo": -128, "hi": 127}, lo=-128, hi=127)]
    program = _program((24, 12), ops)
    _check(program, [_edges(rng, (2, 24, 12), -128, 127).astype(np.int8)])


# ---------------------------------------------------------------------------------------------- layer_norm

@pytest.mark.parametrize("shape,axis", [((17, 64), 2), ((5, 768), 2), ((17, 6), 1)])
def test_layer_norm_over_tokens_matches_the_executor(shape, axis):
    """LayerNorm over the last axis of tokens (N, T, C) (and over the token axis 1) on int16 values at their
    extremes, per-channel gamma and beta of both signs, an int16 output and an 8-bit one."""
    rng = np.random.default_rng(shape[1])
    c = shape[axis - 1]
    ops = [_lookup("x", "wide", _table(rng, -(1 << 15), (1 << 15) - 1))]
    for k, (lo, hi, eps) in enumerate([(-(1 << 15), (1 << 15) - 1, 1e-5), (-128, 127, 1.0)]):
        consts, attrs = layer_norm_constants(rng.uniform(-2, 2, c), rng.uniform(-1, 1, c), eps, 1.0, 5 / hi, c)
        ops.append(Op("layer_norm", ["wide"], f"ln{k}", consts=consts,
                      attrs={**attrs, "axis": axis, "lo": lo, "hi": hi}, lo=lo, hi=hi))
    ops.append(Op("add", ["ln0", "ln1"], "sum"))
    program = _program(shape, ops)
    x = rng.integers(-128, 128, (3, *shape)).astype(np.int8)
    manifest = _check(program, [x])
    assert "layer_norm" in _paths(manifest)


# ---------------------------------------------------------------------------------------------- layout ops

def test_permute_moving_the_batch_axis_take_and_constant_match_the_executor():
    """A qkv split as a ViT writes it: tokens reshaped to (N, T, 3, H, D), permuted to (3, N, H, T, D) (the batch
    axis moves), each of q, k, v taken along axis 0; a take with a negative index, a take along the batch axis,
    a constant repeated to a value whose axis 0 is not the batch, and a requantize per feature (1, 1, C) of
    tokens."""
    rng = np.random.default_rng(5)
    feature = {"multiplier": rng.integers(1 << 29, 1 << 30, (1, 1, 24)).astype(np.int32),
               "shift": rng.integers(30, 34, (1, 1, 24)).astype(np.int32)}
    ops = [Op("requantize", ["x"], "tokens", consts=feature, attrs={"lo": -128, "hi": 127}, lo=-128, hi=127),
           Op("reshape", ["tokens"], "split", attrs={"shape": (-1, 5, 3, 2, 4)}),
           Op("permute", ["split"], "heads", attrs={"dims": (2, 0, 3, 1, 4)}),
           Op("take", ["heads"], "q", attrs={"axis": 0, "index": 0}),
           Op("take", ["heads"], "v", attrs={"axis": 0, "index": -1}),
           Op("take", ["q"], "first", attrs={"axis": 0, "index": 1}),           # along q's batch axis
           Op("constant", ["heads"], "bias", consts={"value": rng.integers(-300, 300, (1, 2, 2, 5, 4))
                                                     .astype(np.int32)}),
           Op("add", ["heads", "bias"], "biased"),
           Op("take", ["biased"], "k", attrs={"axis": 0, "index": 1}),
           Op("add", ["q", "k"], "qk"),
           Op("add", ["qk", "v"], "qkv"),
           Op("permute", ["qkv"], "merged", attrs={"dims": (0, 2, 1, 3)}),
           Op("reshape", ["merged"], "out", attrs={"shape": (-1, 5, 8)}),
           Op("constant", ["out"], "pos", consts={"value": rng.integers(-50, 50, (1, 1, 8)).astype(np.int32)}),
           Op("concat", ["pos", "out"], "cat", attrs={"axis": 1}),
           Op("take", ["cat"], "cls", attrs={"axis": 1, "index": 0}),                # (N, 8)
           Op("requantize", ["cat"], "final", consts={"multiplier": np.asarray(1 << 30, np.int32),
                                                      "shift": np.asarray(31, np.int32)})]
    program = _program((5, 24), ops)
    x = [_edges(rng, (2, 5, 24), -128, 127).astype(np.int8) for _ in range(2)]
    manifest = _check(program, x)
    assert {"permute", "take", "reshape", "constant"} <= _paths(manifest)
    _check(program, x[:1], GENERIC)


def test_layout_changes_between_blocked_maps_and_plain_values():
    """A conv's blocked (N, C, H, W) map read by a reshape (the patch embedding's flatten(2)), by a softmax and
    a matmul (blocked -> plain), and a plain rank-4 value fed to a conv, a max pool and a concat with a blocked
    map (plain -> blocked); a permute of the image itself that moves the batch axis before a conv."""
    rng = np.random.default_rng(9)
    w = rng.integers(-128, 128, (20, 3, 3, 3)).astype(np.int8)
    w2 = rng.integers(-8, 8, (16, 20, 1, 1)).astype(np.int8)
    conv, narrow = _conv, _narrow
    ops = [conv("x", "c1", w, 1), narrow("c1", "a1", -128, 127),                        # (N, 20, 6, 6) blocked
           Op("reshape", ["a1"], "tokens", attrs={"shape": (-1, 20, 36)}),
           Op("softmax", ["a1"], "p", consts={k: np.asarray(v) for k, v in exponent_constants(0.05).items()},
              lo=0, hi=255),
           Op("matmul", ["p", "a1"], "pv", attrs={"a_signed": False, "b_signed": True, "k": 6}),
           narrow("pv", "pv8", -128, 127),
           Op("permute", ["pv8"], "t", attrs={"dims": (0, 1, 3, 2)}),                  # plain rank 4
           conv("t", "c2", w2, 0), narrow("c2", "a2", 0, 255),
           Op("max_pool2d", ["t"], "mp", attrs={"kernel": (2, 2), "stride": (2, 2), "padding": (0, 0),
                                                "dilation": (1, 1), "ceil_mode": False}),
           Op("concat", ["a1", "t"], "cat", attrs={"axis": 1}),
           Op("permute", ["x"], "xb", attrs={"dims": (1, 0, 2, 3)}),                   # (3, N, 6, 6)
           Op("flatten", ["tokens"], "flat"), Op("flatten", ["mp"], "flat2"), Op("flatten", ["cat"], "flat3"),
           Op("reshape", ["a2"], "flat4", attrs={"shape": (-1, 576)}),
           Op("concat", ["flat", "flat2", "flat3", "flat4"], "all", attrs={"axis": 1})]
    w3 = rng.integers(-128, 128, (4, 2, 3, 3)).astype(np.int8)
    ops += [conv("xb", "c3", w3, 1), Op("flatten", ["c3"], "flat5")]
    program = _program((3, 6, 6), ops, output="all")
    x = rng.integers(-128, 128, (2, 3, 6, 6)).astype(np.int8)
    manifest = _check(program, [x])
    program = _program((3, 6, 6), ops, output="flat5")
    _check(program, [x])
    assert "layout" in _paths(manifest)


def _source(dtype: str, rng) -> list:
    """The op making value "src" from the int8 input: a lookup to int8 or int16 codes, half of them at the ends
    of the range, code 0 to 0 (a row of the input's zeros stays zeros)."""
    table = _table(rng, *((-128, 127) if dtype == "int8" else I16))
    table[128] = 0
    return [_lookup("x", "src", table)]


@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("view", ["reshape", "permute"])
def test_roll_through_a_view_matches_the_executor_at_every_batch(view, batch):
    """Swin's unshift: windows merged back by a reshape (or a permute) that nobody stores, then rolled. At batch 1
    TVM once simplified the roll's floormod index wrongly and rolled only one axis."""
    rng = np.random.default_rng(9)
    first = Op("reshape", ["x"], "map", attrs={"shape": (-1, 4, 4, 4)}) if view == "reshape" else \
        Op("permute", ["x"], "map", attrs={"dims": (0, 2, 1, 3)})
    ops = [first, Op("roll", ["map"], "unshift", attrs={"shifts": (1, 2), "dims": (1, 2)}),
           Op("requantize", ["unshift"], "out", consts={"multiplier": np.asarray(1 << 30, np.int32),
                                                        "shift": np.asarray(31, np.int32)})]
    program = _program((16, 4) if view == "reshape" else (4, 4, 4), ops)
    _check(program, [rng.integers(-128, 128, (batch, *program.input_shape)).astype(np.int8)])


@pytest.mark.parametrize("dtype", ["int8", "int16"])
def test_pad_and_crop_of_plain_values_match_the_executor(dtype):
    """Swin's pad of a channels-last (N, H, W, C) map to whole windows, a roll, and the crop back (the roll a view
    the crop reads through); a pad read only by a reshape and a crop read only by a permute (views: their maps
    composed into the reader's, the pad's zeros included); an affine tail fused after a pad (on its zeros too:
    its bias makes code 0 nonzero) and after a crop. On the host and generic targets."""
    rng = np.random.default_rng(12)
    lo, hi = (-128, 127) if dtype == "int8" else I16
    ops = _source(dtype, rng) + [
        Op("pad", ["src"], "win", attrs={"pads": ((0, 0), (0, 3), (0, 1), (0, 0))}, lo=lo, hi=hi),    # 5x7 -> 8x8
        _affine("win", "win_a", rng),
        Op("roll", ["win_a"], "shifted", attrs={"shifts": (-2, -3), "dims": (1, 2)}, lo=I16[0], hi=I16[1]),
        Op("crop", ["shifted"], "back", attrs={"axes": (1, 2), "starts": (0, 0), "stops": (5, 7)},
           lo=I16[0], hi=I16[1]),
        Op("pad", ["src"], "around", attrs={"pads": ((0, 0), (1, 1), (0, 0), (2, 1))}, lo=lo, hi=hi),
        Op("reshape", ["around"], "tokens", attrs={"shape": (-1, 49, 7)}, lo=lo, hi=hi),
        Op("crop", ["src"], "part", attrs={"axes": (3, 2), "starts": (1, 2), "stops": (3, 6)}, lo=lo, hi=hi),
        Op("permute", ["part"], "moved", attrs={"dims": (0, 3, 1, 2)}, lo=lo, hi=hi),
        Op("crop", ["src"], "tail", attrs={"axes": (1,), "starts": (4,), "stops": (5,)}, lo=lo, hi=hi),
        _affine("tail", "tail_a", rng)]
    program = _program((5, 7, 4), ops)
    x = [rng.integers(-128, 128, (2, 5, 7, 4)).astype(np.int8)]
    manifest = _check(program, x)
    assert {"pad", "crop", "reshape", "permute"} <= _paths(manifest)
    assert not {"shifted", "around", "part"} & {v["name"] for v in manifest["values"]}       # views
    _check(program, x, GENERIC)


def test_pad_and_crop_of_blocked_maps_match_the_executor():
    """A conv's NCHW[16]c map (int8, and int16 after a wide requantize) padded and cropped on H, W and the
    channels (20 channels to 23, 16 and 4: channels move across blocks), each with a per-channel affine tail
    (nonzero at code 0) or a lookup tail (nonzero at code 0); the results stay blocked, so the conv after an
    8-bit one reads it without a layout change; a pad read by a reshape (a view over a blocked map)."""
    rng = np.random.default_rng(13)
    w = rng.integers(-128, 128, (20, 3, 3, 3)).astype(np.int8)
    w2 = rng.integers(-128, 128, (8, 23, 3, 3)).astype(np.int8)
    table = _table(rng, -128, 127)
    table[128] = 99                          # code 0 (offset -128): a tail skipped on the zeros shows
    ops = [_conv("x", "c1", w, 1), _narrow("c1", "a8", -128, 127), _narrow("c1", "a16", *I16, shift=30),
           Op("pad", ["a8"], "p8", attrs={"pads": ((0, 0), (1, 2), (2, 0), (0, 1))}, lo=-128, hi=127),
           _lookup("p8", "p8t", table),
           _conv("p8t", "c2", w2, 0),
           Op("crop", ["a8"], "k8", attrs={"axes": (1, 3), "starts": (3, 1), "stops": (19, 5)}, lo=-128, hi=127),
           _lookup("k8", "k8t", table),
           Op("pad", ["a16"], "p16", attrs={"pads": ((0, 0), (0, 3), (1, 1), (1, 0))}, lo=I16[0], hi=I16[1]),
           _affine("p16", "p16a", rng, channels=23),
           Op("crop", ["a16"], "k16", attrs={"axes": (2, 1), "starts": (1, 16), "stops": (6, 20)}, lo=I16[0],
              hi=I16[1]),
           _affine("k16", "k16a", rng, channels=4),
           Op("pad", ["a16"], "p16v", attrs={"pads": ((0, 0), (0, 0), (2, 2), (0, 0))}, lo=I16[0], hi=I16[1]),
           Op("reshape", ["p16v"], "flat16", attrs={"shape": (-1, 20 * 10 * 6)}, lo=I16[0], hi=I16[1])]
    program = _program((3, 6, 6), ops)
    x = [rng.integers(-128, 128, (2, 3, 6, 6)).astype(np.int8)]
    manifest = _check(program, x)
    blocks = {v["name"]: v["block"] for v in manifest["values"]}
    assert all(blocks[v] == 16 for v in ("p8t", "k8t", "p16a", "k16a")) and "p16v" not in blocks
    assert [k["name"] for k in manifest["kernels"] if k["path"] == "layout"] == ["input_to_blocked"]
    assert {"pad", "crop", "reshape"} <= _paths(manifest)


@pytest.mark.parametrize("dtype,layout", [("int16", "tokens"), ("int8", "tokens"), ("int16", "blocked")])
def test_uncentered_layer_norm_matches_the_executor(dtype, layout):
    """layer_norm with `center` false (RMSNorm, F.normalize: no sum taken) over the last axis of tokens of int16
    codes at their extremes and of int8 codes (a position of zeros among them: V = eps, or 0 with r clamped to
    1), and over the channels of a blocked map; an 8-bit and a 16-bit output, added (the add the tail of the
    second); on the host and generic targets."""
    rng = np.random.default_rng(len(dtype + layout))
    if layout == "blocked":
        w = rng.integers(-128, 128, (24, 3, 3, 3)).astype(np.int8)
        ops, shape, axis, c = [_conv("x", "c1", w, 1), _narrow("c1", "src", *I16, shift=30)], (3, 5, 6), 1, 24
    else:
        ops, shape, axis, c = _source(dtype, rng), (9, 40), 2, 40
    for k, (lo, hi, eps) in enumerate([(*I16, 1e-5), (-128, 127, 0.0)]):
        consts, attrs = layer_norm_constants(rng.uniform(-2, 2, c), rng.uniform(-1, 1, c), eps, 1.0, 5 / hi, c)
        ops.append(Op("layer_norm", ["src"], f"ln{k}", consts=consts,
                      attrs={**attrs, "axis": axis, "center": False, "lo": lo, "hi": hi}, lo=lo, hi=hi))
    ops.append(Op("add", ["ln0", "ln1"], "sum"))
    program = _program(shape, ops)
    x = [rng.integers(-128, 128, (2, *shape)).astype(np.int8)]
    if layout == "tokens":
        x[0][0, 0] = 0                       # token 0 of sample 0: all zeros (`_source` keeps code 0 at 0)
    assert "layer_norm" in _paths(_check(program, x))
    _check(program, x, GENERIC)


def test_dense_over_tokens_with_per_feature_requantize_and_a_table_matches_the_executor():
    """Linear over tokens (N, T, I) (17 rows: the register tile's last rows past the end) and over a rank-5
    value, int8 and packed int4 weights, a requantize with (1, 1, C) constants, a GELU-like table (read 16 lanes
    at a time with AVX512-VBMI) and a residual add on plain tokens, on the host and generic targets."""
    rng = np.random.default_rng(11)
    ops = []
    for k, (i, o, bits) in enumerate([(24, 48, 8), (48, 24, 4)]):
        x = "x" if k == 0 else "act"
        lim = 1 << (bits - 1)
        ops.append(Op("dense", [x], f"fc{k}", consts={"weight": rng.integers(-lim, lim, (o, i)).astype(np.int8),
                                                      "bias": rng.integers(-5000, 5000, o).astype(np.int32)},
                      attrs={"w_bits": bits, "x_bits": 8, "x_signed": True}, layer=f"fc{k}"))
        ops.append(Op("requantize", [f"fc{k}"], f"q{k}",
                      consts={"multiplier": rng.integers(1 << 29, 1 << 30, (1, 1, o)).astype(np.int32),
                              "shift": rng.integers(38, 41, (1, 1, o)).astype(np.int32)},
                      attrs={"lo": -128, "hi": 127}, lo=-128, hi=127))
        if k == 0:
            ops.append(_lookup("q0", "act", _table(rng, -128, 127)))
    ops += [Op("add", ["x", "q1"], "res"),
            Op("requantize", ["res"], "res8", consts={"multiplier": np.asarray(1 << 30, np.int32),
                                                      "shift": np.asarray(31, np.int32)},
               attrs={"lo": -128, "hi": 127}, lo=-128, hi=127),
            Op("reshape", ["res8"], "five", attrs={"shape": (-1, 17, 2, 2, 6)}),
            Op("dense", ["five"], "fc5", consts={"weight": rng.integers(-128, 128, (3, 6)).astype(np.int8),
                                                 "bias": np.zeros(3, np.int32)},
               attrs={"w_bits": 8, "x_bits": 8, "x_signed": True}, layer="fc5")]
    program = _program((17, 24), ops)
    x = [_edges(rng, (3, 17, 24), -128, 127).astype(np.int8)]
    manifest = _check(program, x)
    assert {k["w_bits"] for k in manifest["kernels"] if k.get("layer")} == {4, 8}
    _check(program, x, GENERIC)
