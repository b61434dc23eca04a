"""Real models lowered by hawq_ray.quant, compiled by TVM, against the PyTorch integer executor: 0 differing
elements. Small models only (the default digits model and resnet20_cifar10); bench/deploy_latency.py --verify
covers resnet18/resnet50 at 224x224."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from hawq_ray.deploy import compile_program
from hawq_ray.analysis.verify import compare_batches
from hawq_ray.quant.layers import layer_table
from hawq_ray.inputs.models import get_model, input_shape
from hawq_ray.program.executor import run_program
from hawq_ray.quant.qat import prepare


def alternating_bits(model, shape) -> dict:
    """4 and 8 bits in turn over the searchable layers (groups share their first member's bits)."""
    bits, by_group = {}, {}
    for i, r in enumerate(layer_table(model, shape).itertuples()):
        if not pd.isna(r.fixed_bits):
            bits[r.layer] = int(r.fixed_bits)
            continue
        b = (4, 8)[i % 2]
        if isinstance(r.group, str) and r.group:
            b = by_group.setdefault(r.group, b)
        bits[r.layer] = b
    return bits


@pytest.mark.parametrize("name", [None, "resnet20_cifar10"], ids=["default", "resnet20_cifar10"])
@pytest.mark.parametrize("config", ["uniform8", "uniform4", "mixed"])
def test_model_matches_integer_executor(name, config):
    torch.manual_seed(0)
    model = get_model(name)
    shape = tuple(input_shape(model))
    bits = alternating_bits(model, shape) if config == "mixed" else config
    qm = prepare(model, bits, shape).calibrate([torch.randn(4, *shape) for _ in range(2)])
    prog = qm.to_integer()
    deployed = compile_program(prog, batch=4)
    xs = [prog.quantize_input(torch.randn(4, *shape) * s).numpy() for s in (0.5, 2.0)]
    ref = lambda x: run_program(prog, torch.from_numpy(x)).numpy()
    result = compare_batches(deployed, ref, xs)
    assert result.differing == 0
    assert np.abs(ref(xs[0])).max() > 0


class StemNet(torch.nn.Module):
    """ResNet's stem and first block at 32x32: 7x7/2 conv, BN, ReLU, 3x3/2 max pool, whose output two
    requantizes read (the block's first conv and its identity branch): the fused conv + max pool kernel with
    a fan-out, in a real lowered program."""

    def __init__(self):
        super().__init__()
        c = 16
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, c, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(c),
                                        torch.nn.ReLU(), torch.nn.MaxPool2d(3, 2, 1))
        self.body = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, 1, 1, bias=False), torch.nn.BatchNorm2d(c),
                                        torch.nn.ReLU(), torch.nn.Conv2d(c, c, 3, 1, 1, bias=False),
                                        torch.nn.BatchNorm2d(c))
        self.relu = torch.nn.ReLU()
        self.pool = torch.nn.AdaptiveAvgPool2d(1)
        self.fc = torch.nn.Linear(c, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.relu(self.body(x) + x)
        return self.fc(torch.flatten(self.pool(x), 1))


@pytest.mark.parametrize("config", ["uniform8", "uniform4"])
def test_stem_conv_max_pool_fusion_matches_integer_executor(config):
    torch.manual_seed(0)
    model = StemNet().eval()
    for m in model.modules():     # non-trivial folded BN
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    shape = (3, 32, 32)
    prog = prepare(model, config, shape).calibrate([torch.randn(4, *shape) for _ in range(2)]).to_integer()
    deployed = compile_program(prog, batch=4)
    fused = [k for k in deployed.manifest["kernels"] if k["path"].endswith("+max_pool")]
    assert len(fused) == 1 and not any(k["name"].startswith("max_pool2d") for k in deployed.manifest["kernels"])
    xs = [prog.quantize_input(torch.randn(4, *shape) * s).numpy() for s in (0.5, 2.0)]
    ref = lambda x: run_program(prog, torch.from_numpy(x)).numpy()
    assert compare_batches(deployed, ref, xs).differing == 0
    assert np.abs(ref(xs[0])).max() > 0
