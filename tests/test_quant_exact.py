"""QAT simulation and the PyTorch integer executor agree bit for bit on every supported model and
bit configuration (uniform4, uniform8, a random mixed config), on 8 random inputs each."""
import random

import pandas as pd
import pytest
import torch

from hawq_ray.quant.layers import layer_table
from hawq_ray.inputs.models import get_model, input_shape
from hawq_ray.program.executor import FloatTensorError, run_program
from hawq_ray.quant.qat import prepare

MODELS = ["digits_resnet", "resnet20_cifar10", "resnet18", "resnet50", "inceptionv3"]


def mixed_config(table: pd.DataFrame, seed: int) -> dict:
    rng = random.Random(seed)
    by_group: dict = {}
    bits = {}
    for r in table.itertuples():
        if not pd.isna(r.fixed_bits):
            bits[r.layer] = int(r.fixed_bits)
        elif r.group:
            bits[r.layer] = by_group.setdefault(r.group, rng.choice([4, 8]))
        else:
            bits[r.layer] = rng.choice([4, 8])
    return bits


@pytest.fixture(scope="module", params=MODELS)
def model_case(request):
    name = request.param
    model = get_model(name)
    shape = input_shape(name)
    return name, model, shape, layer_table(model, shape)


@pytest.mark.parametrize("config", ["uniform4", "uniform8", "mixed"])
def test_qat_simulation_equals_integer_executor(model_case, config):
    name, model, shape, table = model_case
    bits = mixed_config(table, seed=len(name)) if config == "mixed" else config
    if config == "mixed":
        assert set(bits.values()) == {4, 8}
    gen = torch.Generator().manual_seed(0)
    qm = prepare(model, bits, shape)
    qm.calibrate([torch.randn((4, *shape), generator=gen) * 1.5])
    program = qm.to_integer()
    x = torch.randn((8 if shape[-1] <= 64 else 2, *shape), generator=gen) * 1.5   # 2 ImageNet-sized: the time
    with torch.no_grad():
        out, layers = qm.run(x, record=True)
    q_int, values = run_program(program, program.quantize_input(x), record=True)
    assert q_int.dtype == torch.int64 and out.q.shape == q_int.shape
    assert int((out.q != q_int).sum()) == 0, f"{name} {config}: output differs"
    for op in program.ops:
        if op.layer in layers and op.op in ("conv2d", "dense"):
            assert torch.equal(layers[op.layer].q, values[op.output]), f"{name} {config}: {op.layer}"
    # the integers are not trivially zero: the logits carry information
    assert int(q_int.abs().max()) > 100
    assert len(torch.unique(q_int)) > 8
    # every weight respects its bit width
    for op in program.ops:
        if op.op in ("conv2d", "dense"):
            b = op.attrs["w_bits"]
            assert op.consts["weight"].min() >= -(1 << (b - 1)) and op.consts["weight"].max() < (1 << (b - 1))
            assert b == program.bits[op.layer]
        if op.op == "requantize" and op.hi <= 255:
            assert op.hi in (15, 255, 7, 127)
    if name == "inceptionv3":   # covers concat and both poolings
        ops = {op.op for op in program.ops}
        assert {"concat", "sum_pool2d", "max_pool2d", "requantize", "conv2d", "dense"} <= ops


def test_executor_refuses_float_tensors():
    model = get_model()
    qm = prepare(model, "uniform8", (1, 16, 16))
    qm.calibrate([torch.randn(4, 1, 16, 16)])
    program = qm.to_integer()
    with pytest.raises(FloatTensorError, match="program input"):
        run_program(program, torch.randn(2, 1, 16, 16))
    with pytest.raises(TypeError, match="integer array"):
        type(program.ops[0])(op="conv2d", inputs=["input"], output="y",
                             consts={"weight": program.ops[0].consts["weight"].astype("float32")})


@pytest.mark.parametrize("size,k,stride,pad,ceil", [(16, 3, 2, 1, False), (16, 3, 2, 1, True), (5, 2, 2, 1, True),
                                                     (7, 3, 2, 0, True), (6, 3, 3, 1, True)])
@pytest.mark.parametrize("include_pad", [True, False])
def test_average_pooling_divides_as_torch_does_with_padding(size, k, stride, pad, ceil, include_pad):
    """count_include_pad=True divides every window by its full size (padding included), False by the input
    positions it covers; ceil_mode's last windows are cut at the padding (5, 2, 2, 1: a window starting in the
    padding is dropped): the integer pool's codes are torch's average of the same codes, rounded, and QAT
    simulation equals the executor."""
    import torch.nn.functional as F
    from torch import nn
    torch.manual_seed(0)
    pool = nn.AvgPool2d(k, stride, pad, ceil_mode=ceil, count_include_pad=include_pad)
    out = pool(torch.zeros(1, 3, size, size)).numel()
    model = nn.Sequential(pool, nn.Flatten(), nn.Linear(out, 4)).eval()
    qm = prepare(model, "uniform8", (3, size, size))
    x = torch.randn(4, 3, size, size)
    qm.calibrate([x]).eval()
    with torch.no_grad():
        sim, _ = qm.run(x)
    program = qm.to_integer()
    q = program.quantize_input(x)
    got, values = run_program(program, q, record=True)
    assert torch.equal(got, sim.q)
    floor_out = nn.AvgPool2d(k, stride, pad)(torch.zeros(1, 3, size, size)).numel()
    assert ("pad" in {op.op for op in program.ops}) == (out != floor_out)      # ceil_mode's extra windows
    pooled = values[next(op.output for op in program.ops if op.op == "requantize")]
    want = F.avg_pool2d(q.double(), k, stride, pad, ceil_mode=ceil, count_include_pad=include_pad)
    assert torch.all((pooled.double() - want).abs() <= 0.5 + 1e-9)
