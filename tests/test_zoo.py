"""The mobile and dense CNNs of torchvision and pytorchcv (depthwise and grouped convs, ReLU6, hardswish,
hardsigmoid, SiLU, sigmoid, squeeze-excite, pre-activation BN, channel shuffle and split, adaptive pooling,
`.mean()`, `.flatten()`): QAT simulation =
integer executor on 8 random inputs under uniform4, uniform8 and a random mixed config, and the compiled TVM
module = the integer executor on the models that hold every new op.

Random weights at 32x32 keep the suite short; the 224x224 runs are `bench/zoo.py`'s.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawq_ray.quant.layers import layer_table
from hawq_ray.analysis.verify import check_compiled
from hawq_ray.contract import HawqError
from hawq_ray.inputs.models import get_model
from hawq_ray.program.executor import run_program
from hawq_ray.quant.qat import prepare
from small_models import SHAPE, SqueezeExcite

TORCHVISION = ["mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "mnasnet0_5", "regnet_x_400mf",
               "densenet121", "googlenet", "resnext50_32x4d", "shufflenet_v2_x0_5", "vgg11_bn", "alexnet"]
PYTORCHCV = ["mobilenetv2_w1", "mobilenetv3_small_w7d20", "efficientnet_b0", "shufflenetv2_wd2"]


def mixed(table: pd.DataFrame, seed: int = 0) -> dict:
    """4 or 8 bits at random per searchable layer, the fixed ones at theirs."""
    rng = np.random.default_rng(seed)
    return {layer: int(fixed) if not pd.isna(fixed) else int(rng.choice([4, 8]))
            for layer, fixed in zip(table["layer"], table["fixed_bits"])}


def quantized(model, bits, shape=SHAPE, seed=0):
    torch.manual_seed(seed)
    table = layer_table(model, shape)
    qm = prepare(model, mixed(table, seed) if bits == "mixed" else bits, shape, table=table)
    return qm.calibrate([torch.randn(4, *shape) for _ in range(2)])


def assert_simulation_is_the_executor(qm, shape=SHAPE):
    program = qm.to_integer()
    x = torch.randn(8, *shape)
    with torch.no_grad():
        sim = qm.set_mode("qat").run(x)[0].q
    want = run_program(program, program.quantize_input(x))
    assert torch.equal(sim, want), f"{int((sim != want).sum())} of {want.numel()} output elements differ"
    assert len(torch.unique(want)) > 10          # not a constant output
    return program, x


def _model(zoo, name, shape=SHAPE):
    """The model with BN statistics of random images: at random initialization some zoo models' signal
    vanishes (torchvision's efficientnet_b0 outputs ~1e-14), which would make every output code 0."""
    model = get_model(f"torchvision:{name}" if zoo == "torchvision" else name)
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None                  # a cumulative average over the batches below
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, *shape))
    return model.eval()


def _shape(zoo, name):
    if zoo == "pytorchcv":
        return (3, 224, 224)                     # pytorchcv's final pools are fixed 7x7
    return (3, 64, 64) if name == "alexnet" else SHAPE   # alexnet's stem needs more than 32x32


HEAVY = {"vgg11_bn"}     # 133M weights, 25 s a config: its ops are alexnet's, so it runs the mixed config only


@pytest.mark.parametrize("zoo,name,bits", [(zoo, n, bits) for zoo, names in (("torchvision", TORCHVISION),
                                                                            ("pytorchcv", PYTORCHCV))
                                           for n in names for bits in ("uniform8", "uniform4", "mixed")
                                           if bits == "mixed" or n not in HEAVY])
def test_simulation_equals_integer_executor(zoo, name, bits):
    shape = _shape(zoo, name)
    assert_simulation_is_the_executor(quantized(_model(zoo, name, shape), bits, shape), shape)


@pytest.mark.parametrize("target", ["llvm", "avx2"], ids=["host", "avx2"])
@pytest.mark.parametrize("bits", ["uniform8", "uniform4", "mixed"])
def test_every_new_op_compiles_bit_exact(bits, target):
    program, x = assert_simulation_is_the_executor(quantized(SqueezeExcite().eval(), bits))
    kinds = {op.op for op in program.ops}
    assert {"clamp", "lookup", "mul", "affine", "conv2d"} <= kinds
    assert any(op.op == "conv2d" and op.attrs["groups"] == 16 for op in program.ops)
    summary, rows = check_compiled(program, program.quantize_input(x), target)
    assert summary["tvm_differing"] == 0 and summary["tvm_first_divergence"] is None
    assert summary["tvm_values"] > 5


def test_mobilenet_v3_small_compiles_bit_exact():
    program, x = assert_simulation_is_the_executor(quantized(_model("torchvision", "mobilenet_v3_small"), "mixed"))
    summary, _ = check_compiled(program, program.quantize_input(x), "llvm")
    assert summary["tvm_differing"] == 0, summary["tvm_first_divergence"]


def test_the_lookup_table_is_the_function_on_the_codes():
    """Hand-checked: the table of a hardswish is round(hardswish(k S_in) / S_out) for every input code k."""
    qm = quantized(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Hardswish(), nn.Conv2d(8, 4, 1)).eval(), "uniform8",
                   (3, 8, 8))
    program = qm.to_integer()
    lut = next(op for op in program.ops if op.op == "lookup")
    s_in = float(next(op for op in program.ops if op.output == lut.inputs[0]).scale)
    codes = np.arange(-128, 128)
    f = codes * s_in * np.clip(codes * s_in + 3, 0, 6) / 6                        # hardswish, numpy
    s_out = np.abs(f).max() / 127
    assert np.isclose(float(lut.scale), s_out)
    assert lut.attrs["offset"] == -128
    assert np.array_equal(lut.consts["table"], np.clip(np.floor(f / s_out + 0.5), -128, 127))


class PositionalParameters(nn.Module):
    """Activation parameters passed by position: F.elu(x, 2.0), F.softplus(x, 2.0, 10.0), F.leaky_relu(x, 0.2)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 1),
                                          nn.Conv2d(8, 4, 1))

    def forward(self, x):
        return self.d(F.leaky_relu(self.c(F.softplus(self.b(F.elu(self.a(x), 2.0)), 2.0, 10.0)), 0.2))


@pytest.mark.parametrize("fn,f", [("elu", lambda x: np.where(x > 0, x, 2.0 * np.expm1(np.minimum(x, 0)))),
                                  ("softplus", lambda x: np.where(2 * x > 10, x, np.log1p(np.exp(2 * x)) / 2)),
                                  ("leaky_relu", lambda x: np.where(x > 0, x, 0.2 * x))])
def test_activation_parameters_given_by_position_are_the_functions(fn, f):
    """Each table is round(f(k S_in) / S_out) of the function with the parameters given (numpy), not of its
    defaults (alpha 1, beta 1, slope 0.01)."""
    program = quantized(PositionalParameters().eval(), "uniform8", (3, 8, 8)).to_integer()
    lut = [op for op in program.ops if op.op == "lookup"][("elu", "softplus", "leaky_relu").index(fn)]   # in order
    s_in = float(next(op for op in program.ops if op.output == lut.inputs[0]).scale)
    table = np.asarray(lut.consts["table"])
    want = f((lut.attrs["offset"] + np.arange(len(table))) * s_in) / float(lut.scale)
    assert np.array_equal(table, np.clip(np.floor(want + 0.5), table.min(), table.max()))
    assert len(np.unique(table)) > 50


def test_relu6_is_an_integer_clamp_at_six():
    qm = quantized(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU6(), nn.Conv2d(8, 4, 1)).eval(), "uniform8", (3, 8, 8))
    program = qm.to_integer()
    clamp = next(op for op in program.ops if op.op == "clamp")
    conv = next(op for op in program.ops if op.output == clamp.inputs[0])
    s = np.asarray(conv.scale).reshape(-1, 1, 1)                              # the accumulator's per-channel scale
    assert np.array_equal(clamp.consts["lo"], np.zeros_like(clamp.consts["lo"]))
    assert np.array_equal(clamp.consts["hi"], np.floor(6.0 / s).astype(np.int32))


class NegativeClamps(nn.Module):
    """Clamps whose lower bound is below zero, on conv accumulators: Hardtanh(-1, 1) and clamp(-0.3, 0.7)."""

    def __init__(self):
        super().__init__()
        self.c1, self.act, self.c2 = nn.Conv2d(3, 8, 3), nn.Hardtanh(-1.0, 1.0), nn.Conv2d(8, 6, 1)
        self.fc = nn.Linear(6 * 6 * 6, 4)

    def forward(self, x):
        return self.fc(self.c2(self.act(self.c1(x))).clamp(-0.3, 0.7).flatten(1))


def test_a_clamp_below_zero_is_ceil_of_its_lower_bound():
    """A real clamp to [a, b] of values q s (per channel s) keeps q in [ceil(a / s), floor(b / s)]: the smallest and
    largest codes whose values lie in [a, b]. Hardtanh(-1, 1) and clamp(-0.3, 0.7) after a conv: the bounds
    recomputed in numpy from the float bounds and the accumulator's scale, and the executor's clamp outputs
    against numpy's clip of its inputs, with every clamped value inside [a, b] and one code further outside.
    ReLU6 and clamp(0, 4) cannot tell ceil from floor at a lower bound of 0; this guards the lower bound."""
    torch.manual_seed(0)
    qm = quantized(NegativeClamps().eval(), "uniform8", (3, 8, 8))
    program, x = assert_simulation_is_the_executor(qm, (3, 8, 8))
    _, values = run_program(program, program.quantize_input(x), record=True)
    clamps = [op for op in program.ops if op.op == "clamp"]
    assert len(clamps) == 2
    for op, (a, b) in zip(clamps, [(-1.0, 1.0), (-0.3, 0.7)]):
        producer = next(p for p in program.ops if p.output == op.inputs[0])
        assert producer.op == "conv2d"
        s = np.asarray(producer.scale, np.float64).reshape(-1, 1, 1)    # the accumulator's per-channel scale
        lo, hi = np.ceil(a / s), np.floor(b / s)
        assert np.all(lo * s >= a) and np.all((lo - 1) * s < a) and np.all(hi * s <= b) and np.all((hi + 1) * s > b)
        got_lo, got_hi = (np.asarray(op.consts[k], np.int64).reshape(lo.shape) for k in ("lo", "hi"))
        assert np.array_equal(got_lo, lo), (op.output, "lo", (got_lo - lo).ravel().tolist())
        assert np.array_equal(got_hi, hi), (op.output, "hi", (got_hi - hi).ravel().tolist())
        z = values[op.inputs[0]].numpy().astype(np.int64)
        got = values[op.output].numpy()
        assert np.array_equal(got, np.clip(z, lo, hi))
        assert (z < lo).sum() > 10 and (z > hi).sum() > 10          # both bounds are reached
        assert np.all(got * s >= a) and np.all(got * s <= b)


def test_a_module_with_no_integer_form_is_refused_naming_it_and_its_type():
    """GroupNorm (PoolFormer's token mixer norm) has no integer form: one line naming the module and its type."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    with pytest.raises(HawqError) as err:
        prepare(model, "uniform8", (3, 8, 8))
    msg = str(err.value)
    assert "\n" not in msg and "module '1' of type GroupNorm" in msg


@pytest.mark.parametrize("size,out", [((10, 10), (3, 3)), ((7, 5), (4, 6)), ((2, 2), (7, 7))])
def test_adaptive_pooling_is_the_average_over_torchs_windows(size, out):
    """The integer adaptive pool against torch's float adaptive_avg_pool2d of the same integers: within half a
    step plus the dyadic 1/count's rounding (the requantize rounds half up)."""
    model = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(out), nn.Flatten(),
                          nn.Linear(8 * out[0] * out[1], 4)).eval()
    qm = quantized(model, "uniform8", (3, *size))
    program = qm.to_integer()
    x = program.quantize_input(torch.randn(4, 3, *size))
    _, values = run_program(program, x, record=True)
    pool = next(op for op in program.ops if op.op == "sum_pool2d")
    assert pool.attrs.get("adaptive") == out or size[0] % out[0] == 0
    before = values[pool.inputs[0]].to(torch.float64)
    after = values[next(op.output for op in program.ops if op.inputs == [pool.output])].to(torch.float64)
    want = F.adaptive_avg_pool2d(before, out)
    assert after.shape == want.shape and float((after - want).abs().max()) <= 0.5 + 1e-6
