"""ONNX export of the integer vision transformer's ops (reshape, permute, take, constant, matmul, softmax, layer_norm
over tokens, dense over tokens): the exact form equals the integer executor on every value of DigitsViT programs
(uniform 8, uniform 4, random mixed bits), on softmax at the int16 extremes and on products over K = 768 of signed
x signed and unsigned x signed codes; the fused form runs and mostly agrees on top-1."""
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
