"""A conv that reads a concatenation, compiled by TVM, against the PyTorch integer executor.

The fault this guards against: a concat kernel with a fused requantize (the concat's only reader, as in
SqueezeNet's fire modules, where the next squeeze conv reads the concatenation) cast each branch to the
requantize's narrow output dtype before requantizing, so the INT32 branch values wrapped. InceptionV3 did
not show it: there every concat has several readers, so nothing is fused into it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision

from hawq_ray.deploy import compile_program
from hawq_ray.analysis.verify import compare_values, first_divergence
from hawq_ray.program.executor import run_program
from hawq_ray.quant.qat import prepare
from small_models import ConcatThenConv

HOST = "llvm"
GENERIC = {"kind": "llvm", "mcpu": "x86-64-v2"}    # SSE4.2, no AVX2: the generic schedule on any x86 host
TARGETS = [pytest.param(HOST, id="host"), pytest.param(GENERIC, id="generic")]


def mixed_bits(qm_layers, seed=0):
    rng = np.random.default_rng(seed)
    return {layer: 8 if i == 0 or i == len(qm_layers) - 1 else int(rng.choice([4, 8]))
            for i, layer in enumerate(qm_layers)}


def lowered(model, bits, shape, seed=0):
    torch.manual_seed(seed)
    if bits == "mixed":
        from hawq_ray.quant.layers import layer_table
        bits = mixed_bits(list(layer_table(model, shape)["layer"]), seed)
    qm = prepare(model, bits, shape).calibrate([torch.randn(4, *shape) for _ in range(2)])
    return qm.to_integer()


def expected_conv_path(target, in_channels, k, w_bits, out_channels=24, size=16) -> str:
    """The path the conv reading the concat must take, decided from the CPU flags independently: without AMX a
    4-bit 3x3 conv whose weights weigh less than its input takes Winograd F(4x4) on VNNI hosts."""
    flags = set(open("/proc/cpuinfo").read().split())
    if target == GENERIC or "avx512_vnni" not in flags:
        return "generic"
    if "amx_int8" in flags and in_channels >= 128 and k > 1:
        return "amx"
    f4 = w_bits <= 6 and k == 3 and size >= 8 and out_channels * in_channels * 9 * w_bits / 8 <= in_channels * size ** 2
    return "avx512bw+winograd4" if f4 else "vnni"


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("bits", ["uniform8", "uniform4", "mixed"])
@pytest.mark.parametrize("width,k", [(16, 1), (64, 3)], ids=["vnni-sized", "amx-sized"])
def test_conv_reading_a_concat_matches_integer_executor(target, bits, width, k):
    torch.manual_seed(0)
    model = ConcatThenConv(width, k).eval()
    shape = (3, 33, 33)       # 16x16 maps after the stride-2 stem: the AMX block's width
    prog = lowered(model, bits, shape)
    deployed = compile_program(prog, batch=4, target=target, every_value=True)
    kernels = {k_["layer"]: k_ for k_ in deployed.manifest["kernels"] if k_.get("layer")}
    assert kernels["c2"]["path"] == expected_conv_path(target, 2 * width, k, kernels["c2"]["w_bits"])
    assert any(k_["name"].startswith("concat") for k_ in deployed.manifest["kernels"])
    for scale in (0.5, 2.0):
        x = prog.quantize_input(torch.randn(4, *shape) * scale)
        want = run_program(prog, x).numpy()
        assert np.abs(want).max() > 0
        assert np.array_equal(deployed(x.numpy()), want)
        rows = compare_values(prog, deployed, x)
        assert first_divergence(rows) is None and {r["value"] for r in rows} >= {"c2.in"}


def test_the_concat_requantize_is_fused_and_its_branches_are_wide():
    """The pattern the fault needs, stated on the lowered program: the concat's single reader is the
    requantize in front of c2, and the branches hold values outside that requantize's uint8 range."""
    prog = lowered(ConcatThenConv().eval(), "uniform8", (3, 33, 33))
    readers = [op for op in prog.ops if "cat" in op.inputs]
    assert [op.output for op in readers] == ["c2.in"] and readers[0].op == "requantize"
    x = prog.quantize_input(torch.randn(4, 3, 33, 33))
    _, values = run_program(prog, x, record=True)
    assert int(values["cat"].max()) > 255


@pytest.mark.parametrize("target,bits", [(HOST, "mixed"), (GENERIC, "uniform4")], ids=["host-mixed",
                                                                                       "generic-uniform4"])
def test_squeezenet1_1_matches_integer_executor(target, bits):
    """torchvision's squeezenet1_1 (random weights) at 64x64: every fire module's squeeze conv reads a concat."""
    torch.manual_seed(0)
    model = torchvision.models.squeezenet1_1().eval()
    shape = (3, 64, 64)
    prog = lowered(model, bits, shape)
    deployed = compile_program(prog, batch=2, target=target)
    for scale in (0.5, 2.0):
        x = prog.quantize_input(torch.randn(2, *shape) * scale)
        want = run_program(prog, x).numpy()
        assert np.abs(want).max() > 0
        assert np.array_equal(deployed(x.numpy()), want)

