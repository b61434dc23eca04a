"""Every constant of the default model's IntegerProgram, recomputed here in numpy from the float model and the
calibrated activation ranges by the paper's rules, and compared exactly: the BN fold (eq. 16), per-channel
weight integers (eq. 12), INT32 biases at S_b = S_h S_W (eq. 17), the dyadic multiplier and shift of every
requantize (Section 3.1: b in [2^30, 2^31), c = 31 - exponent), the 1/count of the average pool (Appendix E) and
the branch multipliers of each residual add and concat, each branch to the join's 16-bit output scale
(Appendix F, eq. 18).
The simulation and the executor share these constants, so only an independent recomputation can catch a wrong
one. Then the integer program's dequantized output against fp32 on trained weights and held-out digits."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hawq_ray.inputs.data import load_data
from hawq_ray.inputs.models import input_shape
from hawq_ray.program.executor import run_program
from hawq_ray.quant.finetune import Recipe, calibrated, fp32_weights
from hawq_ray.quant.qat import prepare

BN_OF = {"conv": "bn", "conv1": "bn1", "conv2": "bn2"}   # the BatchNorm after each conv of the default model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    data = load_data("digits", input_shape=input_shape())
    model, _, _ = fp32_weights(tmp_path_factory.mktemp("fp32"), data, epochs=3)
    return model, data


def mixed_bits(model) -> dict:
    layers = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    bits = {name: 8 if k % 2 == 0 else 4 for k, name in enumerate(layers)}
    bits[layers[0]] = bits[layers[-1]] = 8
    bits["block2.downsample.conv"], bits["block3.downsample.conv"] = bits["block2.conv1"], bits["block3.conv1"]
    return bits


def dyadic_reference(m: float) -> tuple[int, int]:
    """The b / 2^c closest to m with b a 31-bit integer in [2^30, 2^31)."""
    f, e = math.frexp(m)                         # m = f 2^e, f in [0.5, 1)
    b, c = round(f * 2 ** 31), 31 - e
    if b == 2 ** 31:
        b, c = b // 2, c - 1
    return b, c


def dyadic_array(m) -> tuple[np.ndarray, np.ndarray]:
    pairs = [dyadic_reference(float(v)) for v in np.ravel(m)]
    return (np.array([p[0] for p in pairs]).reshape(np.shape(m)), np.array([p[1] for p in pairs]).reshape(np.shape(m)))


def folded(model, layer: str):
    """(W_bar, b_bar) of eq. 16 in float32 numpy: W gamma / sigma, (b - mu) gamma / sigma + beta."""
    mod = model.get_submodule(layer)
    w = mod.weight.detach().numpy().astype(np.float32)
    b = mod.bias.detach().numpy().astype(np.float32) if mod.bias is not None else np.zeros(w.shape[0], np.float32)
    parent, _, leaf = layer.rpartition(".")
    if leaf not in BN_OF or not parent:
        return w, b
    bn = model.get_submodule(f"{parent}.{BN_OF[leaf]}")
    sigma = np.sqrt(bn.running_var.numpy() + np.float32(bn.eps))
    gain = bn.weight.detach().numpy() / sigma
    return w * gain.reshape(-1, *[1] * (w.ndim - 1)), (b - bn.running_mean.numpy()) * gain + bn.bias.detach().numpy()


def expected_program(model, qm, program) -> dict:
    """{op output: {const name: expected array}} and the output's scale, walking the program's structure."""
    ranges = {key: float(getattr(qm, buf)) for key, buf in qm._points.items()}
    consumers = {}
    for op in program.ops:
        for name in op.inputs:
            consumers.setdefault(name, []).append(op)
    scale = {"input": ranges["input"] / 127}                     # the image: signed 8-bit, symmetric
    want = {}
    for op in program.ops:
        s_in = scale.get(op.inputs[0]) if op.inputs else None
        if op.op in ("conv2d", "dense"):
            bits = op.attrs["w_bits"]
            w_bar, b_bar = folded(model, op.layer)
            s_w = np.abs(w_bar.reshape(len(w_bar), -1)).max(1) / np.float32(2 ** (bits - 1) - 1)
            s_w = np.maximum(s_w, np.abs(b_bar) / np.float32(float(s_in) * 2.0 ** 30))   # INT32 bias headroom
            q_w = np.clip(np.floor(w_bar / s_w.reshape(-1, *[1] * (w_bar.ndim - 1)) + np.float32(0.5)),
                          -2 ** (bits - 1), 2 ** (bits - 1) - 1)
            s_acc = float(s_in) * s_w.astype(np.float64)
            want[op.output] = {"weight": q_w, "bias": np.floor(b_bar.astype(np.float64) / s_acc + 0.5)}
            scale[op.output] = s_acc
        elif op.op == "requantize":
            (user,) = consumers[op.output]
            if op.output.endswith(".in"):                      # the activation point in front of a layer
                b = user.attrs["x_bits"]
                levels = 2 ** (b - 1) - 1 if user.attrs["x_signed"] else 2 ** b - 1
                target = ranges[f"in:{user.layer}"] / levels
            elif user.op in ("add", "concat"):                 # a branch to the join's 16-bit output scale
                target = ranges[f"out:{user.output}"] / (2 ** 15 - 1)
            else:                                              # the average pool's 1/count: the mean, scale kept
                (pool,) = [p for p in program.ops if p.output == op.inputs[0]]
                target = None
            m = np.asarray(s_in, np.float64) / target if target is not None else \
                np.asarray(1.0 / np.prod(pool.attrs["kernel"]))
            b, c = dyadic_array(m.reshape(-1, 1, 1) if m.ndim else m)
            want[op.output] = {"multiplier": b, "shift": c}
            scale[op.output] = s_in if user.op not in ("conv2d", "dense", "add", "concat") else target
        elif op.op in ("add", "concat"):
            scale[op.output] = ranges[f"out:{op.output}"] / (2 ** 15 - 1)
        else:                                                  # relu, sum_pool2d, flatten: the scale passes
            scale[op.output] = s_in
    return want, scale[program.output]


@pytest.mark.parametrize("config", ["uniform8", "mixed"])
def test_every_constant_is_the_papers(trained, config):
    model, data = trained
    bits = "uniform8" if config == "uniform8" else mixed_bits(model)
    qm = calibrated(model, bits, data.train, Recipe(), input_shape())
    program = qm.to_integer()
    want, out_scale = expected_program(model, qm, program)
    assert set(want) == {op.output for op in program.ops if op.consts}
    checked = 0
    for op in program.ops:
        for name, value in op.consts.items():
            expected = want[op.output][name]
            assert np.array_equal(np.asarray(value, np.int64), np.asarray(expected).astype(np.int64).reshape(
                np.shape(value))), (op.output, name)
            checked += np.size(value)
    assert checked > 50000                                      # every weight of the model, and the rest
    np.testing.assert_array_equal(np.asarray(program.output_scale, np.float64), out_scale)
    kinds = {op.op for op in program.ops if op.consts}
    assert {"conv2d", "dense", "requantize"} <= kinds and sum(op.op == "add" for op in program.ops) == 3


def out_scale_of(model, qm, program):
    return expected_program(model, qm, program)[1]


def test_dequantized_integer_output_is_close_to_fp32(trained):
    """The integer program's logits, dequantized by the output scale recomputed here, against the fp32 model on
    every held-out digit: within 3% (relative norm) and the same top-1 decision on at least 99% of them."""
    model, data = trained
    qm = calibrated(model, "uniform8", data.train, Recipe(), input_shape())
    program = qm.to_integer()
    x = torch.stack([data.test[i][0] for i in range(len(data.test))])
    with torch.no_grad():
        ref = model(x).double()
    q = run_program(program, program.quantize_input(x))
    got = q.to(torch.float64) * torch.as_tensor(np.asarray(out_scale_of(model, qm, program)), dtype=torch.float64)
    assert float((got - ref).norm() / ref.norm()) < 0.03
    assert float((got.argmax(1) == ref.argmax(1)).double().mean()) >= 0.99


def test_every_constant_of_a_concat_model_is_the_papers():
    """A conv reading a concatenation (SqueezeNet's fire module): each concat branch requantized to the concat's
    scale (eq. 18), plus the plain convs with biases and no BN."""
    from test_deploy_concat import ConcatThenConv
    torch.manual_seed(0)
    model = ConcatThenConv(width=16, k=3).eval()
    qm = prepare(model, "uniform8", (3, 16, 16))
    qm.calibrate([torch.rand(8, 3, 16, 16) * 2 - 1 for _ in range(2)])
    program = qm.to_integer()
    want, out_scale = expected_program(model, qm, program)
    assert any(op.op == "concat" for op in program.ops)
    for op in program.ops:
        for name, value in op.consts.items():
            assert np.array_equal(np.asarray(value, np.int64), np.asarray(want[op.output][name]).astype(
                np.int64).reshape(np.shape(value))), (op.output, name)
    np.testing.assert_array_equal(np.asarray(program.output_scale, np.float64), out_scale)
