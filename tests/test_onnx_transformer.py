"""ONNX export of the integer vision transformer's ops (reshape, permute, take, roll, pad, crop, constant, matmul,
softmax, layer_norm over tokens and uncentered, dense over tokens): the exact form equals the integer executor on
every value of DigitsViT programs (uniform 8, uniform 4, random mixed bits), on softmax at the int16 extremes, on
products over K = 768 of signed x signed and unsigned x signed codes, on pads and crops of int8 and int16 maps, on
uncentered layer norms, on resizes (nearest, bilinear) and channel gathers of maps at one scale per channel and on
the models of tests/test_resize.py; the fused form runs and mostly agrees on top-1."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from hawq_ray.inputs.vit import DigitsViT
from hawq_ray.onnx.export import check_onnx, check_values, export_onnx
from hawq_ray.ops.softmax import exponent_constants
from hawq_ray.program.executor import run_program
from hawq_ray.program.program import IntegerProgram, Op
from hawq_ray.quant.qat import prepare

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SHAPE = (1, 16, 16)
I16 = (-(1 << 15), (1 << 15) - 1)
TRANSFORMER_OPS = {"reshape", "permute", "take", "constant", "matmul", "softmax", "layer_norm", "dense", "lookup",
                   "add", "concat", "requantize", "conv2d"}


def vit_bits(config: str):
    if config != "mixed":
        return config
    rng = np.random.default_rng(7)
    layers = [n for n, m in DigitsViT().named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    bits = {n: 8 if n in ("patch_embed", "head") else int(rng.choice([4, 8])) for n in layers}
    assert set(bits.values()) == {4, 8}
    return bits


@pytest.fixture(scope="module")
def vit_programs():
    torch.manual_seed(0)
    x = torch.randn(16, *SHAPE)
    model = DigitsViT().eval()
    return {c: prepare(model, vit_bits(c), SHAPE).calibrate([x[:8], x[8:]]).to_integer()
            for c in ("uniform8", "uniform4", "mixed")}


@pytest.mark.parametrize("config", ["uniform8", "uniform4", "mixed"])
def test_digits_vit_exports_exactly(vit_programs, config, tmp_path):
    """Every value's codes and every logit in onnxruntime equal the integer executor's."""
    program = vit_programs[config]
    assert TRANSFORMER_OPS <= {op.op for op in program.ops}
    if config != "uniform8":
        assert 4 in {op.attrs.get("w_bits") for op in program.ops if op.op == "dense"}
    path = tmp_path / "vit.onnx"
    export_onnx(program, path, every_value=True)
    torch.manual_seed(1)
    x = torch.randn(8, *SHAPE) * 1.5
    rows = check_values(path, program, x)
    assert {r["op"] for r in rows} == {op.op for op in program.ops}
    assert [r for r in rows if r["differing"]] == []
    check = check_onnx(path, program, [x, torch.randn(8, *SHAPE)])
    assert check["samples"] == 16 and check["max_logit_diff_units"] == 0 and check["top1_agreement"] == 1.0


def test_digits_vit_fused_form(vit_programs, tmp_path):
    """The fused form: float Softmax and LayerNormalization, MatMul between Q/DQ pairs, the residual stream (the
    add and concat branches) on 8 bits as for a CNN; it runs and agrees on top-1 for most inputs (0.92 to 0.96 of
    256 for this model; the 8-bit residual stream is most of its distance from the program)."""
    program = vit_programs["uniform8"]
    path = tmp_path / "fused.onnx"
    export_onnx(program, path, form="fused")
    kinds = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Softmax", "LayerNormalization", "MatMul", "QuantizeLinear"} <= kinds
    torch.manual_seed(0)
    check = check_onnx(path, program, [torch.randn(32, *SHAPE) for _ in range(2)])
    assert check["top1_agreement"] >= 0.8 and check["max_logit_diff_rel"] < 1


# ---------------------------------------------------------------------------------------------- per op

def _program(ops, shape, out, out_scale, input_scale=1.0):
    """ops ending in a rank-4 value `out`, flattened to the program's (N, features) output."""
    ops = ops + [Op("flatten", [out], "out", scale=np.asarray(out_scale), lo=ops[-1].lo, hi=ops[-1].hi)]
    return IntegerProgram("x", shape, input_scale, ops, "out", np.asarray(out_scale))


def _requantize(src, name, mult, shift, lo, hi, scale):
    return Op("requantize", [src], name, attrs={"lo": lo, "hi": hi},
              consts={"multiplier": np.asarray(mult, np.int32), "shift": np.asarray(shift, np.int32)},
              scale=np.asarray(scale), lo=lo, hi=hi)


def _exact(program, x, tmp_path):
    path = tmp_path / "op.onnx"
    export_onnx(program, path, every_value=True)
    rows = check_values(path, program, x)
    assert [r for r in rows if r["differing"]] == []
    return rows


@pytest.mark.parametrize("s_in", [1e-6, 2e-4, 0.05, 900.0])
def test_softmax_at_int16_extremes(s_in, tmp_path):
    """int8 codes times 300, clamped to int16: rows at -32768 and 32767 (|d| = 65535: every e but the maximum's
    shifted by the capped 31), constant rows (every e = 2^30), one-hot rows, random rows; softmax constants from
    shifts of 4 (a steep scale) to 34 (a flat one). The fused form's float Softmax within one code of it."""
    consts = exponent_constants(s_in)
    assert 1 <= int(consts["shift"]) <= 62
    ops = [_requantize("x", "wide", 300 << 20, 20, *I16, s_in),
           Op("softmax", ["wide"], "p", consts=consts, scale=np.asarray(2.0 ** -8), lo=0, hi=255)]
    shape = (2, 3, 17)
    program = _program(ops, shape, "p", 2.0 ** -8)
    rng = np.random.default_rng(0)
    x = rng.integers(-128, 128, (6, *shape)).astype(np.float32)
    x[0] = -128                                   # constant rows at the int16 minimum
    x[1] = 127                                    # ... and maximum
    x[2] = -128
    x[2, :, :, 5] = 127                           # one key at 32767, the rest at -32768
    x[3, :, :, ::2] = 127
    x[3, :, :, 1::2] = -128
    x[4] = rng.integers(-2, 3, shape)             # near ties
    q = program.quantize_input(torch.from_numpy(x))
    _, values = run_program(program, q, record=True)
    assert int(values["wide"].min()) == I16[0] and int(values["wide"].max()) == I16[1]
    rows = _exact(program, torch.from_numpy(x), tmp_path)
    assert "softmax" in {r["op"] for r in rows}
    export_onnx(program, tmp_path / "fused.onnx", form="fused", every_value=True)     # float Softmax, then Q/DQ
    rows = check_values(tmp_path / "fused.onnx", program, torch.from_numpy(x))
    assert max(r["max_diff"] for r in rows if r["op"] == "softmax") <= 1


# (a_signed, row 1 of a and of b: 767 equal codes then one, the requantize's multiplier after the product at
# shift 41): z b lands 1 below a rounding boundary (2j + 1) 2^40 with |z b| > 2^53, where float64 rounds it onto
# the boundary and floor(z b / 2^41 + 1/2) is one too high; found by solving z b = 2^40 - 1 (mod 2^41) for b.
TIES = {True: ((-128, -69), (127, -9), 896613403), False: ((255, 2), (127, -76), 2093260841)}


@pytest.mark.parametrize("a_signed", [True, False])
def test_matmul_k768_against_the_executor(a_signed, tmp_path):
    """a (N, M, K) and b^T from the input's two channels (take, a permute), K = 768: signed x signed codes (a the
    int8 input itself; products up to 128 * 128 * 768 ~ 2^23.6) and unsigned x signed (a = x + 128 by a lookup;
    255 * 128 * 768 ~ 2^24.6, beyond float32's integers); the 16-bit requantize after the product exact at a
    tie where float64 is not (`TIES`: the export's int64 path)."""
    m, k = 4, 768
    shape = (2, m, k)
    (a_fill, a_last), (b_fill, b_last), mult = TIES[a_signed]
    s_a = 1.0 if a_signed else 0.01
    ops = [Op("take", ["x"], "xa", attrs={"axis": 1, "index": 0}, scale=np.asarray(1.0), lo=-128, hi=127),
           Op("take", ["x"], "xb", attrs={"axis": 1, "index": 1}, scale=np.asarray(1.0), lo=-128, hi=127)]
    if not a_signed:
        ops.append(Op("lookup", ["xa"], "a", attrs={"offset": -128}, consts={"table": np.arange(256, dtype=np.int32)},
                      scale=np.asarray(s_a), lo=0, hi=255))
    a = "xa" if a_signed else "a"
    s_z = s_a * 2.0 ** 41 / mult
    ops += [Op("permute", ["xb"], "b", attrs={"dims": (0, 2, 1)}, scale=np.asarray(1.0), lo=-128, hi=127),
            Op("matmul", [a, "b"], "ab", attrs={"a_bits": 8, "b_bits": 8, "a_signed": a_signed, "b_signed": True,
                                                "k": k}, scale=np.asarray(s_a)),
            _requantize("ab", "y", mult, 41, *I16, s_z),
            Op("reshape", ["y"], "y4", attrs={"shape": (-1, 1, m, m)}, scale=np.asarray(s_z), lo=I16[0], hi=I16[1])]
    program = _program(ops, shape, "y4", s_z)
    rng = np.random.default_rng(1)
    codes = rng.integers(-128, 128, (4, *shape))         # the operands' codes: a in channel 0, b^T in channel 1
    if not a_signed:
        codes[:, 0] += 128
    codes[0, 0], codes[0, 1] = (-128, -128) if a_signed else (255, -128)      # the extreme products
    codes[1, 0, 1], codes[1, 1, 1] = a_fill, b_fill
    codes[1, 0, 1, -1], codes[1, 1, 1, -1] = a_last, b_last
    z = int(codes[1, 0, 1] @ codes[1, 1, 1])
    assert abs(z) * mult > 2 ** 53 and np.floor(z * (mult / 2.0 ** 41) + 0.5) != (z * mult + 2 ** 40) >> 41
    x = torch.from_numpy((codes - np.asarray([0 if a_signed else 128, 0]).reshape(1, 2, 1, 1)).astype(np.float32))
    _, values = run_program(program, program.quantize_input(x), record=True)
    assert int(values["ab"][1, 1, 1]) == z
    assert int(values["ab"].abs().max()) == (128 * 128 if a_signed else 255 * 128) * k
    rows = _exact(program, x, tmp_path)
    assert {"matmul", "requantize", "take", "permute", "reshape"} <= {r["op"] for r in rows}


def test_roll_moves_codes_and_values(tmp_path):
    """torch.roll (Swin's shifted windows) along H and W, negative shifts and one beyond the size: of the int8
    input (its codes tensor rolled too) and of a 16-bit value."""
    shape = (2, 5, 7)
    ops = [Op("roll", ["x"], "r1", attrs={"shifts": (2, -3), "dims": (2, 3)}, scale=np.asarray(1.0), lo=-128, hi=127),
           _requantize("r1", "wide", 300 << 20, 20, *I16, 1 / 300),
           Op("roll", ["wide"], "r2", attrs={"shifts": (9,), "dims": (-1,)}, scale=np.asarray(1 / 300), lo=I16[0],
              hi=I16[1])]
    program = _program(ops, shape, "r2", 1 / 300)
    x = torch.from_numpy(np.random.default_rng(2).integers(-128, 128, (3, *shape)).astype(np.float32))
    rows = _exact(program, x, tmp_path)
    assert [r["op"] for r in rows].count("roll") == 2


def _affine(src, name, rng, scale, channels=None):
    """An int16 affine whose bias makes code 0 nonzero (a pad's zeros go through it); per tensor or per channel."""
    shape = (channels, 1, 1) if channels else ()
    consts = {"multiplier": rng.integers(1, 1 << 12, shape).astype(np.int32) * rng.choice([-1, 1], shape),
              "shift": np.full(shape, 10, np.int32), "bias": rng.integers(1 << 10, 1 << 14, shape).astype(np.int32)}
    return Op("affine", [src], name, attrs={"lo": I16[0], "hi": I16[1]}, consts=consts, scale=np.asarray(scale),
              lo=I16[0], hi=I16[1])


def _source(dtype: str) -> tuple:
    """(ops, name, scale, range) of the value the layout tests move: the int8 input itself (its codes tensor
    moves too), or int16 codes (x times 300, clamped: the extremes reached)."""
    if dtype == "int8":
        return [], "x", 1.0, (-128, 127)
    return [_requantize("x", "wide", 300 << 20, 20, *I16, 1 / 300)], "wide", 1 / 300, I16


@pytest.mark.parametrize("dtype", ["int8", "int16"])
def test_pad_and_crop_move_codes_and_values(dtype, tmp_path):
    """Swin's pad of a channels-last (N, H, W, C) map to whole windows, an affine tail (nonzero at code 0), a roll
    and the crop back; a crop of the last axis; and a conv's (N, C, H, W) map (requantized to the same bits)
    padded and cropped on H, W and the channels, each with a per-channel affine after it."""
    rng = np.random.default_rng(4)
    ops, src, s, (lo, hi) = _source(dtype)
    w = rng.integers(-128, 128, (6, 5, 3, 3)).astype(np.int8)
    s_map = s / 300
    ops += [Op("pad", [src], "win", attrs={"pads": ((0, 0), (0, 3), (0, 1), (0, 0))}, scale=np.asarray(s), lo=lo,
               hi=hi),                                                                 # (N, 5, 7, 4) -> 8 x 8
            _affine("win", "win_a", rng, s),
            Op("roll", ["win_a"], "shifted", attrs={"shifts": (-2, -3), "dims": (1, 2)}, scale=np.asarray(s),
               lo=I16[0], hi=I16[1]),
            Op("crop", ["shifted"], "back", attrs={"axes": (1, 2), "starts": (0, 0), "stops": (5, 7)},
               scale=np.asarray(s), lo=I16[0], hi=I16[1]),
            Op("crop", [src], "part", attrs={"axes": (3,), "starts": (1,), "stops": (3,)}, scale=np.asarray(s),
               lo=lo, hi=hi),
            Op("conv2d", ["x"], "c1", attrs={"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1,
                                             "w_bits": 8, "x_bits": 8, "x_signed": True},
               consts={"weight": w, "bias": np.zeros(6, np.int32)}, scale=np.full(6, 0.01), layer="c1"),
            _requantize("c1", "map", 1 << 30, 38 if dtype == "int8" else 30, lo, hi, s_map),
            Op("pad", ["map"], "map_p", attrs={"pads": ((0, 0), (2, 1), (1, 0), (0, 2))}, scale=np.asarray(s_map),
               lo=lo, hi=hi),
            _affine("map_p", "map_pa", rng, s_map, channels=9),
            Op("crop", ["map"], "map_c", attrs={"axes": (1, 2), "starts": (1, 2), "stops": (4, 7)},
               scale=np.asarray(s_map), lo=lo, hi=hi),
            _affine("map_c", "map_ca", rng, s_map, channels=3)]
    program = _program(ops, (5, 7, 4), "map_ca", s_map)
    x = torch.from_numpy(rng.integers(-128, 128, (3, 5, 7, 4)).astype(np.float32))
    rows = _exact(program, x, tmp_path)
    kinds = [r["op"] for r in rows]
    assert kinds.count("pad") == 2 and kinds.count("crop") == 3


@pytest.mark.parametrize("dtype", ["int8", "int16"])
def test_resize_and_channel_gather_move_codes_and_values(dtype, tmp_path):
    """A conv's 20-channel map requantized to int8 / int16 at one scale per channel, resized nearest (x2, to 11 x 5)
    and bilinear (to 9 x 13 with align_corners, x2 without, x0.5), and gathered by indices that repeat and reorder
    its channels (9 of them; 37), a per-channel affine or a lookup (after a requantize to 8 bits where the map is
    16-bit) reading each; the conv's INT32 accumulator resized bilinearly, a requantize after it; the int8 input
    itself (its codes tensor) resized and gathered. The exact form equals the executor on every value; the fused
    form (float taps, then the output's Q/DQ pair, which rounds ties to even) is within a code of it (its map
    within a code already: a Q/DQ of the conv's float output), its gather of the input's codes exact."""
    from test_deploy_resize import resize_op
    rng = np.random.default_rng(6)
    lo, hi = (-128, 127) if dtype == "int8" else I16
    s_acc = np.linspace(0.5, 2.0, 20) * 1e-3
    s = s_acc * (2.0 ** 8 if dtype == "int8" else 1.0)          # per channel
    shape, src = (3, 20, 5, 7), dict(scale=s, lo=lo, hi=hi)
    pick, many = np.asarray([19, 0, 3, 3, 17, 16, 16, 5, 19], np.int32), rng.integers(0, 20, 37).astype(np.int32)

    def looked_up(v, scale):       # a lookup of v's codes: of v, or of a requantize of the 16-bit v by 2^-8
        first = [] if dtype == "int8" else [_requantize(v, f"{v}_8", 1 << 30, 38, -128, 127, scale * 256)]
        return first + [Op("lookup", [first[0].output if first else v], f"{v}_t", attrs={"offset": -128},
                           consts={"table": rng.integers(-128, 128, 256).astype(np.int32)}, scale=np.asarray(0.1),
                           lo=-128, hi=127)]
    ops = [Op("conv2d", ["x"], "c1", attrs={"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1,
                                            "w_bits": 8, "x_bits": 8, "x_signed": True},
              consts={"weight": rng.integers(-128, 128, (20, 3, 3, 3)).astype(np.int8),
                      "bias": rng.integers(-5000, 5000, 20).astype(np.int32)}, scale=s_acc, layer="c1"),
           _requantize("c1", "src", 1 << 30, 38 if dtype == "int8" else 30, lo, hi, s),
           resize_op("src", "near", shape, "nearest", factor=2, **src), _affine("near", "near_a", rng, 1.0, 20),
           resize_op("src", "near2", shape, "nearest", size=(11, 5), **src),
           resize_op("src", "up", shape, "bilinear", size=(9, 13), corners=True, **src),
           _affine("up", "up_a", rng, 1.0, 20),
           resize_op("src", "up2", shape, "bilinear", factor=2, corners=False, **src), *looked_up("up2", s),
           resize_op("src", "down", shape, "bilinear", factor=0.5, corners=False, **src),
           resize_op("c1", "wide", shape, "bilinear", factor=2, corners=False, scale=s_acc),
           _requantize("wide", "wide_q", 1 << 30, 38, *I16, s_acc * 256),
           Op("channel_gather", ["src"], "g9", consts={"index": pick}, scale=s[pick], lo=lo, hi=hi),
           _affine("g9", "g9a", rng, 1.0, 9),
           Op("channel_gather", ["src"], "g37", consts={"index": many}, scale=s[many], lo=lo, hi=hi),
           *looked_up("g37", s[many]),
           resize_op("x", "x_up", (3, 3, 5, 7), "bilinear", factor=2, corners=True, scale=np.asarray(1.0), lo=-128,
                     hi=127),
           Op("channel_gather", ["x"], "x_g", consts={"index": np.asarray([2, 2, 0], np.int32)},
              scale=np.asarray(1.0), lo=-128, hi=127)]
    program = _program(ops, (3, 5, 7), "x_g", 1.0)
    x = torch.from_numpy(rng.integers(-128, 128, (3, 3, 5, 7)).astype(np.float32))
    _, values = run_program(program, program.quantize_input(x), record=True)
    assert int(values["src"].min()) == lo and int(values["src"].max()) == hi
    rows = _exact(program, x, tmp_path)
    kinds = [r["op"] for r in rows]
    assert kinds.count("resize") == 7 and kinds.count("channel_gather") == 3
    export_onnx(program, tmp_path / "fused.onnx", form="fused", every_value=True)
    rows = check_values(tmp_path / "fused.onnx", program, x)
    assert max(r["max_diff"] for r in rows if r["op"] in ("resize", "channel_gather")) <= 1
    assert next(r for r in rows if r["value"] == "x_g")["differing"] == 0         # a gather of codes: exact


@pytest.mark.parametrize("model", ["Pyramid", "Gathers"])
def test_resize_and_gather_models_export_exactly(model, tmp_path):
    """tests/test_resize.py's feature pyramid (a bilinear resize of a conv's INT32 accumulator among its resizes) and
    channel gathers, from QAT: the exact form equals the executor on every value."""
    import test_resize
    shape = (3, 10, 10) if model == "Pyramid" else (3, 6, 6)
    torch.manual_seed(0)
    qm = prepare(getattr(test_resize, model)().eval(), "uniform8", shape)
    program = qm.calibrate([torch.randn(8, *shape)]).to_integer()
    rows = _exact(program, torch.randn(4, *shape), tmp_path)
    assert {"resize" if model == "Pyramid" else "channel_gather"} <= {r["op"] for r in rows}


@pytest.mark.parametrize("dtype", ["int8", "int16"])
def test_uncentered_layer_norm(dtype, tmp_path):
    """layer_norm with `center` false (RMSNorm, F.normalize) over the last axis and over axis 1, of int8 codes and
    of int16 codes at their extremes (a position of zeros: V = eps, or 0 with r clamped to 1), an 8-bit and a
    16-bit output: the exact form equals the executor; the fused form's float x / rms(x) within a code of it."""
    from hawq_ray.ops.layernorm import layer_norm_constants
    rng = np.random.default_rng(5)
    ops, src, s, _ = _source(dtype)
    shape = (6, 5, 32)
    for k, (axis, (lo, hi), eps) in enumerate([(3, I16, 1e-5), (1, (-128, 127), 0.0)]):
        c = shape[axis - 1]
        s_out = 5 / hi
        consts, attrs = layer_norm_constants(rng.uniform(-2, 2, c), rng.uniform(-1, 1, c), eps, s, s_out, c)
        ops.append(Op("layer_norm", [src], f"ln{k}", consts=consts, scale=np.asarray(s_out), lo=lo, hi=hi,
                      attrs={**attrs, "axis": axis, "center": False, "lo": lo, "hi": hi}))
    program = _program(ops, shape, "ln1", 5 / 127)
    x = rng.integers(-128, 128, (3, *shape)).astype(np.float32)
    x[0, 0, 0] = 0
    x = torch.from_numpy(x)
    rows = _exact(program, x, tmp_path)
    assert [r["op"] for r in rows].count("layer_norm") == 2
    export_onnx(program, tmp_path / "fused.onnx", form="fused", every_value=True)
    rows = check_values(tmp_path / "fused.onnx", program, x)
    assert max(r["max_diff"] for r in rows if r["op"] == "layer_norm") <= 1
