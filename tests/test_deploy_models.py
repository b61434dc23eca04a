"""Real models lowered by hawq_ray.quant, compiled by TVM, against the PyTorch integer executor: 0 differing
elements. Small models only (the default digits model and resnet20_cifar10); bench/deploy_latency.py --verify
covers resnet18/resnet50 at 224x224."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from hawq_ray.deploy import compile_program
from hawq_ray.deploy.verify import verify_model
from hawq_ray.layers import layer_table
from hawq_ray.models import get_model, input_shape
from hawq_ray.quant.executor import run_program
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
    result = verify_model(deployed, ref, xs)
    assert result.differing == 0
    assert np.abs(ref(xs[0])).max() > 0
