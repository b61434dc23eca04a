"""Residual branches clamped to 16 bits (HAWQ's quant_act_int32), so that a branch stored between kernels is
an INT16 tensor.

A residual whose two branches nearly cancel has a sum whose range is a fraction of each branch's, so on the
sum's 16-bit scale the branches saturate. Here the QAT simulation, the PyTorch integer executor, a numpy
recomputation of the program (`numpy_reference.run_reference`) and the TVM module agree on every
element while they do, and the module stores the branch that one conv writes and the next one adds as int16.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hawq_ray.deploy import compile_program
from hawq_ray.deploy.graph import plan_kernels
from hawq_ray.deploy.target import parse_target
from hawq_ray.program.executor import run_program
from hawq_ray.quant.qat import prepare
from numpy_reference import ref_requantize, run_reference

SHAPE = (3, 16, 16)
INT16 = (-(1 << 15), (1 << 15) - 1)


class CancellingResidual(nn.Module):
    """stem -> a = conv(y), b = -0.75 a + a little -> relu(a + b) -> conv -> global pool -> fc."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a, self.b = nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        with torch.no_grad():       # b's 1x1 taps: -0.75 of a's centre taps, so a + b keeps a quarter of a
            self.b.weight.copy_(-0.75 * self.a.weight[:, :, 1:2, 1:2] + 0.01 * torch.randn(16, 16, 1, 1))
        self.head = nn.Conv2d(16, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        y = torch.relu(self.stem(x))
        y = torch.relu(self.a(y) + self.b(y))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(torch.relu(self.head(y)), 1), 1))


@pytest.fixture(scope="module")
def lowered():
    torch.manual_seed(0)
    qm = prepare(CancellingResidual().eval(), "uniform8", SHAPE).calibrate([torch.randn(8, *SHAPE)])
    x = torch.randn(8, *SHAPE, generator=torch.Generator().manual_seed(1)) * 2
    return qm, qm.to_integer(), x


def branch_ops(program):
    adds = {op.output for op in program.ops if op.op == "add"}
    return [op for op in program.ops if op.op == "requantize" and
            any(op.output in o.inputs for o in program.ops if o.output in adds)]


def test_branches_are_clamped_to_16_bits_and_saturate_here(lowered):
    qm, program, x = lowered
    branches = branch_ops(program)
    assert len(branches) == 2
    values = run_reference(program, program.quantize_input(x).numpy())
    saturated = 0
    for op in branches:
        assert (op.attrs["lo"], op.attrs["hi"]) == INT16
        z = values[op.inputs[0]]
        wide = ref_requantize(z, op.consts["multiplier"], op.consts["shift"], -(1 << 62), 1 << 62)
        assert np.array_equal(values[op.output], np.clip(wide, *INT16))
        saturated += int((wide != values[op.output]).sum())
    assert saturated > 100          # the clamp is exercised, not only declared


def test_simulation_executor_and_numpy_agree_when_branches_saturate(lowered):
    qm, program, x = lowered
    xq = program.quantize_input(x)
    with torch.no_grad():
        sim = qm.run(x)[0].q
    q_int = run_program(program, xq)
    ref = run_reference(program, xq.numpy())[program.output]
    assert int((sim != q_int).sum()) == 0
    assert np.array_equal(q_int.numpy(), ref)
    assert len(np.unique(ref)) > 8


@pytest.mark.parametrize("target", ["llvm", {"kind": "llvm", "mcpu": "skylake"}], ids=["host", "generic"])
def test_tvm_stores_the_branch_as_int16_and_matches(lowered, target):
    qm, program, x = lowered
    stored = {c.outputs[k]: v.dtype for c in plan_kernels(program, 8, parse_target(target))
              for k, v in enumerate(c.kernel.outputs)}
    names = {op.output for op in branch_ops(program)}
    assert {stored[n] for n in names if n in stored} == {"int16"}
    model = compile_program(program, batch=8, target=target)
    xq = program.quantize_input(x)
    assert int((model(xq.numpy()) != run_program(program, xq).numpy()).sum()) == 0
