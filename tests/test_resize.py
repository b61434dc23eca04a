"""The integer `resize` op (nearest and bilinear upsampling, `hawq_ray.ops.resize`): against torch's float
interpolation of the same codes (equal where the weights are multiples of 2^-7, within the weight rounding's bound
elsewhere), and QAT simulation == integer executor in a small feature-pyramid model."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawq_ray.ops.resize import WEIGHT_BITS, execute_resize, resize_consts
from hawq_ray.program.executor import run_program
from hawq_ray.program.program import Op
from hawq_ray.quant.qat import prepare


def _resize(x, size, scale, mode, corners):
    out = F.interpolate(torch.zeros(1, 1, *x.shape[2:]), **({"size": size} if size else {"scale_factor": scale}),
                        mode=mode, **({"align_corners": corners} if mode == "bilinear" else {})).shape[2:]
    consts, attrs = resize_consts(tuple(x.shape[2:]), tuple(out), mode, corners, scale)
    return execute_resize(Op("resize", ["x"], "y", attrs=attrs, consts=consts), [x])


@pytest.mark.parametrize("size,scale,mode,corners", [
    (None, 2, "nearest", None), ((11, 13), None, "nearest", None), (None, (2, 3), "nearest", None),
    (None, 2, "bilinear", False), ((9, 13), None, "bilinear", True), (None, 0.5, "bilinear", False)])
def test_exact_weights_give_torch_rounded_half_up(size, scale, mode, corners):
    x = torch.randint(-(1 << 15), 1 << 15, (2, 3, 5, 7), generator=torch.Generator().manual_seed(1))
    given = {"size": size} if size else {"scale_factor": scale}
    want = F.interpolate(x.double(), **given, mode=mode, **({"align_corners": corners} if corners is not None else {}))
    assert torch.equal(_resize(x, size, scale, mode, corners).double(), torch.floor(want + 0.5))


def test_inexact_weights_stay_within_their_rounding_bound():
    """6 -> 13 without align_corners: weights k/13, each rounded to 2^-7 (off <= 2^-8; the row's remainder on its
    largest weight, off <= 2 * 2^-8): per output |error| <= max|x| (2 * 3 * 2^-8 + (3 * 2^-8)^2) + 1/2."""
    x = torch.randint(-128, 128, (2, 3, 6, 6), generator=torch.Generator().manual_seed(2))
    want = F.interpolate(x.double(), size=(13, 13), mode="bilinear", align_corners=False)
    err = (_resize(x, (13, 13), None, "bilinear", False).double() - want).abs().max()
    step = 3 * 2.0 ** -(WEIGHT_BITS + 1)
    assert 0 < err <= 128 * (2 * step + step ** 2) + 0.5


class Pyramid(nn.Module):
    """A coarse path upsampled back onto the fine one (nearest and bilinear), as in FPN-style networks."""

    def __init__(self):
        super().__init__()
        self.stem, self.down, self.lat = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, 2, 1), nn.Conv2d(8, 8, 1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        fine = torch.relu(self.stem(x))
        coarse = torch.relu(self.down(fine))
        y = fine + self.up(self.lat(coarse))
        y = y + F.interpolate(coarse, size=y.shape[2:], mode="bilinear", align_corners=False)
        return self.head(y.mean((2, 3)))


def program_and_output(build, bits, shape, seed):
    """(integer program, QAT simulation's output codes, input) of a model calibrated on 8 random inputs; the fp32
    interpreter is checked against the model on the way."""
    torch.manual_seed(0)
    model = build().eval()
    qm = prepare(model, bits, shape)
    x = torch.randn(8, *shape, generator=torch.Generator().manual_seed(seed))
    qm.calibrate([x[:4], x[4:]]).eval()
    with torch.no_grad():
        out, _ = qm.run(x)
        assert torch.allclose(qm.set_mode("fp32")(x), model(x), atol=1e-5)
        qm.set_mode("qat")
    return qm.to_integer(), out.q, x


@pytest.mark.parametrize("bits", ["uniform8", "uniform4"])
def test_qat_simulation_and_executor_agree_on_every_element(bits):
    program, want, x = program_and_output(Pyramid, bits, (3, 10, 10), 3)
    assert sum(op.op == "resize" for op in program.ops) == 2
    assert torch.equal(run_program(program, program.quantize_input(x)), want)


class Gathers(nn.Module):
    """Channels picked by a tensor constant read in forward (`index_select`), by a list, every second one, and a
    contiguous run (a slice, which keeps the per-channel scales of the conv output)."""

    def __init__(self):
        super().__init__()
        self.conv, self.mix, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(14, 6, 1), nn.Linear(6, 3)
        self.register_buffer("order", torch.tensor([7, 0, 3, 3, 5]))

    def forward(self, x):
        y = self.conv(x)
        parts = [torch.index_select(y, 1, self.order), torch.relu(y)[:, [1, 6, 2]], y[:, ::2], y[:, 2:4]]
        return self.head(self.mix(torch.cat(parts, 1)).mean((2, 3)))


@pytest.mark.parametrize("bits", ["uniform8", "uniform4"])
def test_channel_gathers_are_exact(bits):
    program, want, x = program_and_output(Gathers, bits, (3, 6, 6), 5)
    assert [op.op for op in program.ops].count("channel_gather") == 3 and "slice" in {op.op for op in program.ops}
    assert torch.equal(run_program(program, program.quantize_input(x)), want)


class Descriptors(nn.Module):
    """CBAM's channel descriptor (adaptive max pooling to 1x1) and NASNet's stem padding (nn.ZeroPad2d)."""

    def __init__(self):
        super().__init__()
        self.conv, self.pad = nn.Conv2d(3, 8, 3), nn.ZeroPad2d((1, 0, 2, 1))
        self.gmax, self.head = nn.AdaptiveMaxPool2d(1), nn.Linear(16, 3)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        z = nn.functional.max_pool2d(self.pad(y), 2)
        return self.head(torch.cat([self.gmax(y), nn.functional.adaptive_max_pool2d(z, 1)], 1).flatten(1))


@pytest.mark.parametrize("bits", ["uniform8", "uniform4"])
def test_global_max_pooling_and_zero_pad_modules_are_exact(bits):
    program, want, x = program_and_output(Descriptors, bits, (3, 9, 9), 7)
    ops = [op.op for op in program.ops]
    assert ops.count("max_pool2d") == 3 and "pad" in ops
    assert torch.equal(run_program(program, program.quantize_input(x)), want)
