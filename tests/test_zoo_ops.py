"""The ops pytorchcv's zoo needs beyond the common CNN ones (issue 44), each in small hand-written modules:
PReLU (espnetv2), BatchNorm1d after a Linear (bam), torch.stack (sknet), expand / expand_as of a gate (cbam,
bam), softmax over an axis other than the last (resnesta), a max over the channels and a one-channel gate times
a map (cbam's spatial gate), features picked by a fixed index (condensenet's classifier); and the capture's
fallbacks: a graph torch.fx traced that does not run (octresnet) goes through torch.export, and a model whose
first conv reads more channels than the image has (irevnet) is given the image's.

For each: the QAT simulation, the integer executor, the compiled TVM module and the exact ONNX export agree on
every element, and the op's integers are held to an independent float computation of what the module computes
(numpy / torch on the op's own input codes and scales), within the quantization step.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawq_ray.contract import HawqError
from hawq_ray.deploy import compile_program
from hawq_ray.onnx.export import check_values, export_onnx
from hawq_ray.program.executor import run_program
from hawq_ray.quant.qat import prepare


@pytest.fixture(autouse=True)
def seeded():
    """Each test's modules start from the same weights, whatever ran before."""
    torch.manual_seed(0)


def through_every_back_end(model: nn.Module, shape: tuple, bits: str, tmp_path, batch: int = 4):
    """Calibrate, lower, and run QAT, the executor, TVM and ONNX on one random batch; assert they agree on the
    output (TVM) and on every value (ONNX). Returns (program, executor values by name, input codes)."""
    gen = torch.Generator().manual_seed(0)
    qm = prepare(model.eval(), bits, shape).calibrate([torch.randn((8, *shape), generator=gen)])
    prog = qm.to_integer()
    x = torch.randn((batch, *shape), generator=gen)
    q = prog.quantize_input(x)
    with torch.no_grad():
        sim = qm.run(x)[0].q
    out, values = run_program(prog, q, record=True)
    assert torch.equal(sim, out), "QAT simulation differs from the integer executor"
    assert len(torch.unique(out)) > 3
    compiled = compile_program(prog, batch=batch)
    assert np.array_equal(compiled(q.numpy()), out.numpy()), "TVM differs from the integer executor"
    export_onnx(prog, tmp_path / "m.onnx", every_value=True)
    rows = check_values(tmp_path / "m.onnx", prog, x)
    assert rows and not [r for r in rows if r["differing"]], "ONNX differs from the integer executor"
    return prog, values, q


def scale_of(prog, name) -> np.ndarray:
    return np.asarray(next(op.scale for op in prog.ops if op.output == name), np.float64)


# ---------------------------------------------------------------------------------------------- PReLU

class PReLUNet(nn.Module):
    """PReLU per channel on a conv + BN's accumulator (slopes of both signs and above 1), one slope on a residual
    sum, per feature on a Linear's (N, C) output."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1, self.p1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.PReLU(8)
        self.c2, self.p2 = nn.Conv2d(8, 8, 3, padding=1), nn.PReLU()
        self.fc, self.p3, self.head = nn.Linear(8, 6), nn.PReLU(6), nn.Linear(6, 3)
        with torch.no_grad():
            self.p1.weight.copy_(torch.tensor([-0.5, 0.0, 0.01, 0.25, 0.7, 1.0, 1.5, 3.0]))
            self.p3.weight.uniform_(-1, 1, generator=torch.Generator().manual_seed(3))

    def forward(self, x):
        x = self.p1(self.b1(self.c1(x)))
        x = self.p2(self.c2(x) + x)
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.head(self.p3(self.fc(x)))


@pytest.mark.parametrize("bits", ["uniform8", "uniform4"])
def test_prelu_is_an_affine_with_a_negative_side_and_equals_torch_within_half_a_step(bits, tmp_path):
    model = PReLUNet()
    prog, values, _ = through_every_back_end(model, (3, 10, 10), bits, tmp_path)
    affines = [op for op in prog.ops if op.op == "affine"]
    assert len(affines) == 3 and all("negative" in op.consts for op in affines)
    slopes = [model.p1.weight, model.p2.weight, model.p3.weight]
    for op, slope in zip(affines, slopes):
        x = values[op.inputs[0]].numpy().astype(np.float64) * _channel(scale_of(prog, op.inputs[0]), op, values)
        a = slope.detach().double().numpy()
        a = a.reshape((-1,) + (1,) * (x.ndim - 2)) if a.size > 1 else a
        want = np.clip(np.where(x >= 0, x, a * x) / scale_of(prog, op.output), op.lo, op.hi)
        got = values[op.output].numpy()
        # half a step, plus the dyadic multipliers' error: 2^-30 relative to the larger of the two sides
        bound = 0.5 + np.abs(x) * np.maximum(1, np.abs(a)) / scale_of(prog, op.output) * 2.0 ** -29 + 1e-9
        assert np.all(np.abs(got - want) <= bound), (op.output, np.abs(got - want).max())
        assert (got > 0).any() and ((got < 0).any() or x.ndim == 2)     # both sides taken on the maps


def _channel(s, op, values):
    """A scale (C,) or () shaped to broadcast against the op's input (channels on axis 1)."""
    nd = values[op.inputs[0]].dim()
    return s.reshape((-1,) + (1,) * (nd - 2)) if s.ndim == 1 else s


class FunctionalPReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.slope = nn.Conv2d(3, 4, 3), nn.Parameter(torch.full((4,), 0.1))

    def forward(self, x):
        return F.prelu(self.conv(x), self.slope).mean((2, 3))


def test_what_stays_unsupported_is_one_line_naming_module_and_type():
    with pytest.raises(HawqError, match=r"function 'prelu' at .* in module '0' of type FunctionalPReLU; "
                                        r"supported: .*PReLU") as e:
        prepare(nn.Sequential(FunctionalPReLU()).eval(), "uniform8", (3, 8, 8))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- BatchNorm1d

class BN1dNet(nn.Module):
    """BAM's channel gate (pool, flatten, Linear, BatchNorm1d, ReLU, Linear: the BN folded into the Linear), a
    BatchNorm1d on flattened features no Linear precedes, and one on an (N, C, L) view of a map (both the
    per-channel affine)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 6), nn.BatchNorm1d(6)
        self.bn_flat, self.bn_seq, self.head = nn.BatchNorm1d(8), nn.BatchNorm1d(8), nn.Linear(6 + 8 + 8, 3)
        gen = torch.Generator().manual_seed(4)
        with torch.no_grad():          # statistics away from the identity: neither the fold nor the affine trivial
            for bn in (self.bn, self.bn_flat, self.bn_seq):
                c = bn.num_features
                bn.running_mean.normal_(0, 0.5, generator=gen), bn.running_var.uniform_(0.2, 3, generator=gen)
                bn.weight.uniform_(-1.5, 1.5, generator=gen), bn.bias.normal_(0, 0.5, generator=gen)
                assert bn.weight.shape == (c,)

    def forward(self, x):
        m = torch.relu(self.conv(x))
        pooled = F.adaptive_avg_pool2d(m, 1).view(m.size(0), -1)
        gate = torch.relu(self.bn(self.fc(pooled)))
        flat = self.bn_flat(pooled)
        seq = self.bn_seq(m.flatten(2)).mean(2)
        return self.head(torch.cat([gate, flat, seq], 1))


@pytest.mark.parametrize("bits", ["uniform8", "uniform4"])
def test_batchnorm1d_folds_into_its_linear_or_is_the_per_channel_affine(bits, tmp_path):
    model = BN1dNet().eval()
    prog, values, _ = through_every_back_end(model, (3, 6, 6), bits, tmp_path)
    fc = next(op for op in prog.ops if op.layer == "fc")
    affines = [op for op in prog.ops if op.op == "affine"]
    assert len(affines) == 2 and fc.op == "dense"           # the folded BN left no op of its own
    for op, bn in zip(affines, (model.bn_flat, model.bn_seq)):
        x = torch.from_numpy(values[op.inputs[0]].numpy().astype(np.float64) *
                             _channel(scale_of(prog, op.inputs[0]), op, values))
        want = F.batch_norm(x, bn.running_mean.double(), bn.running_var.double(), bn.weight.double(),
                            bn.bias.double(), False, 0.0, bn.eps).detach().numpy() / scale_of(prog, op.output)
        got = values[op.output].numpy()
        # half a step, the bias rounded to the input's grid (half an input step times |g|), the dyadic's 2^-30
        g = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).double().detach().numpy()
        g = g.reshape((-1,) + (1,) * (x.dim() - 2))
        bound = 0.5 + np.abs(g) * _channel(scale_of(prog, op.inputs[0]), op, values) / scale_of(prog, op.output) \
            * 0.5 + np.abs(want) * 2.0 ** -29 + 1e-6
        assert np.all(np.abs(got - np.clip(want, op.lo, op.hi)) <= bound), op.output


def test_a_folded_batchnorm1d_gives_the_linear_the_folded_weight():
    """The fp32 interpreter (BN folded into fc) computes the model; fc's weight is W gamma / sigma."""
    from hawq_ray.quant.graph import folded_weights
    model = BN1dNet().eval()
    model.in_size = (6, 6)
    x = torch.randn(4, 3, 6, 6)
    qm = prepare(model, "uniform8", (3, 6, 6)).set_mode("fp32")
    with torch.no_grad():
        assert torch.allclose(qm(x), model(x), atol=1e-5)
    bn = model.bn
    want = model.fc.weight * (bn.weight / torch.sqrt(bn.running_var + bn.eps)).reshape(-1, 1)
    assert torch.allclose(folded_weights(model)["fc"], want, atol=1e-6)


# ---------------------------------------------------------------------------------------------- softmax, stack

class RadixSoftmax(nn.Module):
    """resnesta's rSoftMax (a softmax over the radix axis 1 of (N, radix, card, C / card), from a conv's output
    viewed), and a softmax over the channels of a conv's map (axis 1 of (N, C, H, W): the per-channel accumulator
    requantized to one scale before it moves)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 12, 1)
        self.head = nn.Linear(12 + 8, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        w = self.fc(F.adaptive_avg_pool2d(y, 1))
        radix = F.softmax(w.view(w.size(0), 3, 2, -1).transpose(1, 2), dim=1).reshape(w.size(0), -1)
        channels = torch.softmax(self.conv(x), dim=1).mean((2, 3))
        return self.head(torch.cat([radix, channels], 1))


def check_softmaxes(prog, values, count: int):
    """Each softmax over an inner axis is the op between a permute to the last axis and one back: torch's
    softmax of its int16 logits over the original axis, within half a code and the polynomial's 1.8e-4."""
    made = {op.output: op for op in prog.ops}
    softmaxes = [op for op in prog.ops if op.op == "softmax"]
    assert len(softmaxes) == count
    for op in softmaxes:
        back = made[op.output.replace(".softmax", "")]
        assert back.op == "permute" and made[made[op.inputs[0]].inputs[0]].op == "permute"
        logits = torch.from_numpy(values[op.inputs[0]].numpy() * scale_of(prog, op.inputs[0]))
        want = torch.softmax(logits, -1).permute(back.attrs["dims"]).numpy() * 256
        assert np.all(np.abs(values[back.output].numpy() - want) <= 0.5 + 256 * 2e-4), back.output


@pytest.mark.parametrize("bits", ["uniform8", "uniform4"])
def test_a_softmax_over_an_inner_axis_is_the_op_between_two_permutes(bits, tmp_path):
    prog, values, _ = through_every_back_end(RadixSoftmax(), (3, 6, 6), bits, tmp_path)
    check_softmaxes(prog, values, 2)
    moved = [op for op in prog.ops if op.op == "permute" and op.output.endswith(".last")]
    assert sorted(op.attrs["dims"] for op in moved) == [(0, 2, 3, 1), (0, 2, 3, 1)]


class SelectiveKernel(nn.Module):
    """sknet's SKConvBlock: two branches stacked (N, 2, C, H, W), summed, pooled, a gate per branch and channel
    from a softmax over the branches (axis 1 of (N, 2, C)), the branches weighted by it and summed; and a stack
    along axis 2 of (N, C) features (a cat, a reshape and a permute)."""

    def __init__(self, c=8):
        super().__init__()
        self.c = c
        self.b1, self.b2 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(3, c, 3, padding=2, dilation=2)
        self.fc1, self.fc2 = nn.Conv2d(c, 4, 1), nn.Conv2d(4, 2 * c, 1)
        self.head = nn.Linear(c + 2 * c, 5)

    def forward(self, x):
        y = torch.stack([torch.relu(self.b1(x)), torch.relu(self.b2(x))], dim=1)
        s = F.adaptive_avg_pool2d(y.sum(dim=1), 1)
        w = self.fc2(torch.relu(self.fc1(s)))
        w = torch.softmax(w.view(w.size(0), 2, self.c), dim=1).unsqueeze(-1).unsqueeze(-1)
        out = (y * w).sum(dim=1).mean((2, 3))
        across = torch.stack([y[:, 0].mean((2, 3)), y[:, 1].sum((2, 3))], dim=2).flatten(1)      # (N, C, 2)
        return self.head(torch.cat([out, across], 1))


@pytest.mark.parametrize("bits", ["uniform8", "uniform4"])
def test_stack_is_a_cat_and_a_reshape_and_equals_torch(bits, tmp_path):
    prog, values, _ = through_every_back_end(SelectiveKernel(), (3, 8, 8), bits, tmp_path)
    made = {op.output: op for op in prog.ops}
    stacks = [name for name in made if name.startswith("stack") and "." not in name]
    assert len(stacks) == 2 and {"permute", "reshape"} == {made[s].op for s in stacks}
    for name in stacks:        # the stack's codes are the stacked branches' real values on the cat's grid
        cat = next(op for op in prog.ops if op.output == f"{name}.cat")
        parts = [made[i] for i in cat.inputs]                # each branch's requantize to the cat's scale
        real = [values[p.inputs[0]].numpy() * _channel(scale_of(prog, p.inputs[0]), p, values) for p in parts]
        dim = 1 if made[name].op == "reshape" else 2
        clamp = parts[0].attrs["lo"], parts[0].attrs["hi"]            # a branch's 16-bit clamp
        want = np.clip(np.stack(real, axis=dim) / scale_of(prog, name), *clamp)
        diff = np.abs(values[name].numpy() - want)
        assert np.all(diff <= 0.5 + np.abs(want) * 2.0 ** -29), (name, diff.max())
    check_softmaxes(prog, values, 1)


def test_a_stack_along_the_batch_axis_and_a_softmax_over_it_stay_refused():
    class Batch(nn.Module):
        def __init__(self, stack):
            super().__init__()
            self.conv, self.stack = nn.Conv2d(3, 4, 3), stack

        def forward(self, x):
            y = self.conv(x)
            return torch.stack([y, y], 0).mean((0, 3, 4)) if self.stack else torch.softmax(y, 0).mean((2, 3))

    for stack, what in ((True, r"torch.stack at 'stack' in module '0' of type Batch along dim 0 .* of type stack"),
                        (False, r"softmax at 'softmax' in module '0' of type Batch over dim 0 of type softmax")):
        with pytest.raises(HawqError, match=what) as e:
            prepare(nn.Sequential(Batch(stack)).eval(), "uniform8", (3, 6, 6))
        assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- expand

class Gates(nn.Module):
    """CBAM's channel gate (`x * att.unsqueeze(2).unsqueeze(3).expand_as(x)`: a view, the product broadcasts), BAM's
    product of a channel gate and a spatial one each expanded to the map (the (N, 1, H, W) one copied over the
    channels), and an expanded gate that an add reads (copied over H and W)."""

    def __init__(self, c=8):
        super().__init__()
        self.conv, self.fc, self.spatial = nn.Conv2d(3, c, 3, padding=1), nn.Linear(c, c), nn.Conv2d(c, 1, 3, padding=1)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        att = torch.sigmoid(self.fc(x.mean((2, 3))))
        x = x * att.unsqueeze(2).unsqueeze(3).expand_as(x)
        channel = att.unsqueeze(2).unsqueeze(3).expand_as(x)
        both = torch.sigmoid(channel * self.spatial(x).expand_as(x))
        x = x * both + att.reshape(att.size(0), -1, 1, 1).expand(-1, -1, x.size(2), x.size(3))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("bits", ["uniform8", "uniform4"])
def test_expand_of_a_gate_is_a_view_for_a_product_and_a_copy_otherwise(bits, tmp_path):
    prog, values, _ = through_every_back_end(Gates(), (3, 6, 6), bits, tmp_path)
    made = {op.output: op for op in prog.ops}
    gathers = [op for op in prog.ops if op.op == "channel_gather"]
    resizes = [op for op in prog.ops if op.op == "resize"]
    assert len(gathers) == 1 and len(resizes) == 1
    assert tuple(gathers[0].consts["index"]) == (0,) * 8
    for op in gathers + resizes:            # torch's expand of the same codes
        src = torch.from_numpy(values[op.inputs[0]].numpy())
        assert torch.equal(src.expand(values[op.output].shape), torch.from_numpy(values[op.output].numpy()))
        assert np.all(scale_of(prog, op.output) == scale_of(prog, op.inputs[0]))   # the one channel's, repeated
    gates = [op for op in prog.ops if op.op == "mul" and values[op.inputs[1]].shape[2:] == (1, 1)]
    assert len(gates) == 2                 # CBAM's gate and BAM's channel gate, broadcast by the product
    assert all(made[op.inputs[0]].op == "requantize" for op in gates)


class BroadcastAdd(nn.Module):
    """FishNet's pattern: an (N, C, 1, 1) branch added to an (N, C, H, W) map, the small operand first and
    second; and a one-channel map added to a wide one."""

    def __init__(self, c=8):
        super().__init__()
        self.conv, self.fc, self.fc2 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(c, c, 1), nn.Conv2d(c, c, 1)
        self.one = nn.Conv2d(c, 1, 3, padding=1)
        self.head = nn.Linear(c, 4)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        a = x + self.fc(F.adaptive_avg_pool2d(x, 1))
        b = self.fc2(F.adaptive_avg_pool2d(a, 1)) + a
        return self.head((self.one(b) + b).mean((2, 3)))


@pytest.mark.parametrize("bits", ["uniform8", "uniform4"])
def test_an_add_of_a_smaller_map_spreads_it_to_the_sums_shape_and_equals_a_broadcast_add(bits, tmp_path):
    prog, values, _ = through_every_back_end(BroadcastAdd(), (3, 6, 6), bits, tmp_path)
    adds = [op for op in prog.ops if op.op == "add"]
    assert len(adds) == 3
    for op in adds:                  # both branches at the sum's shape, the sum numpy's add of them
        a, b = (values[i].numpy().astype(np.int64) for i in op.inputs)
        assert a.shape == b.shape == values[op.output].shape
        assert np.array_equal(a + b, values[op.output].numpy())
    spreads = [op for op in prog.ops if op.op in ("resize", "channel_gather") and ".spread" in op.output]
    assert len(spreads) == 3          # two 1 x 1 maps resized, one channel gathered
    for op in spreads:               # a copy: numpy's broadcast of the small map's codes
        src, out = values[op.inputs[0]].numpy(), values[op.output].numpy()
        assert np.array_equal(np.broadcast_to(src, out.shape), out)


def test_an_expand_of_anything_else_is_refused_with_its_module():
    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            y = self.conv(x).flatten(2)                     # (N, 4, 16)
            return y[:, :1].expand_as(y).mean(2)

    with pytest.raises(HawqError, match=r"method .expand_as\(\) at .* in module '0' of type Tokens") as e:
        prepare(nn.Sequential(Tokens()).eval(), "uniform8", (3, 6, 6))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- a number added

class Offsets(nn.Module):
    """BAM's `x * (1 + sigmoid(att))`, a number subtracted from a conv's accumulator, and one minus a value."""

    def __init__(self):
        super().__init__()
        self.conv, self.att, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 1), nn.Linear(16, 4)

    def forward(self, x):
        y = self.conv(x) - 0.25
        y = torch.relu(y) * (1 + torch.sigmoid(self.att(torch.relu(y))))
        z = 0.5 - y.mean((2, 3))
        return self.head(torch.cat([y.mean((2, 3)), z], 1))


@pytest.mark.parametrize("bits", ["uniform8", "uniform4"])
def test_a_number_added_or_subtracted_is_the_affine_with_an_offset(bits, tmp_path):
    prog, values, _ = through_every_back_end(Offsets(), (3, 6, 6), bits, tmp_path)
    affines = [op for op in prog.ops if op.op == "affine"]
    assert len(affines) == 3 and not any("negative" in op.consts for op in affines)
    for op, (gain, offset) in zip(affines, ((1, -0.25), (1, 1.0), (-1, 0.5))):
        s_in = _channel(scale_of(prog, op.inputs[0]), op, values)
        x = values[op.inputs[0]].numpy() * s_in
        want = np.clip((gain * x + offset) / scale_of(prog, op.output), op.attrs["lo"], op.attrs["hi"])
        # half a step, the offset rounded to the input's grid (half an input step), the dyadic's 2^-30
        bound = 0.5 + 0.5 * s_in / scale_of(prog, op.output) + np.abs(want) * 2.0 ** -29 + 1e-6
        assert np.all(np.abs(values[op.output].numpy() - want) <= bound), op.output


# ---------------------------------------------------------------------------------------------- CBAM's spatial gate

class SpatialGate(nn.Module):
    """CBAM's spatial gate on a ReLU'd conv (per-channel scales): the max over the channels (`x.max(dim=1)[0]`, and
    `amax(1, keepdim=True)` in a second gate) beside the mean over them, a 7x7 conv to one channel, and the map
    times the (N, 1, H, W) sigmoid."""

    def __init__(self, c=12):
        super().__init__()
        self.conv, self.gate, self.gate2 = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(2, 1, 7, padding=3), \
            nn.Conv2d(2, 1, 3, padding=1)
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        att = torch.cat((x.max(dim=1)[0].unsqueeze(1), x.mean(dim=1).unsqueeze(1)), dim=1)
        x = x * torch.sigmoid(self.gate(att))
        att = torch.cat((torch.amax(x, 1, keepdim=True), x.mean(1, keepdim=True)), dim=1)
        x = torch.sigmoid(self.gate2(att)) * x
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def mixed_bits(model, shape) -> dict:
    """Layers alternately at 4 and 8 bits (the first and last stay at 8)."""
    from hawq_ray.contract.table import COL
    from hawq_ray.quant.layers import layer_table
    layers = list(layer_table(model, shape)[COL.layer])
    return {name: 8 if k in (0, len(layers) - 1) else (4, 8)[k % 2] for k, name in enumerate(layers)}


def _bits(name, model, shape):
    return mixed_bits(model, shape) if name == "mixed" else name


@pytest.mark.parametrize("bits", ["uniform8", "uniform4", "mixed"])
def test_a_max_over_channels_is_a_max_pool_and_a_one_channel_gate_is_spread(bits, tmp_path):
    model = SpatialGate()
    prog, values, _ = through_every_back_end(model, (3, 9, 9), _bits(bits, model, (3, 9, 9)), tmp_path)
    made = {op.output: op for op in prog.ops}
    maxes = [op for op in prog.ops if op.op == "max_pool2d"]
    assert len(maxes) == 2
    for op in maxes:                            # numpy's max over the channels of the map the permute reads
        permute = made[made[op.inputs[0]].inputs[0]]
        assert permute.op == "permute"
        src = values[permute.inputs[0]].numpy()
        got = values[op.output].numpy().reshape(src.shape[0], -1)
        assert np.array_equal(got, src.max(axis=1).reshape(src.shape[0], -1))
        assert np.all(scale_of(prog, op.output) == scale_of(prog, permute.inputs[0]))
        real = torch.from_numpy(src * scale_of(prog, permute.inputs[0]))     # torch's max of the values
        assert torch.allclose(torch.from_numpy(got * scale_of(prog, op.output)), real.amax(1).flatten(1))
    spreads = [op for op in prog.ops if op.op == "channel_gather"]
    assert len(spreads) == 2 and all(tuple(op.consts["index"]) == (0,) * 12 for op in spreads)
    for op in spreads:                          # the product reads the one channel C times, as torch broadcasts it
        mul = next(m for m in prog.ops if m.op == "mul" and op.output in m.inputs)
        a, b = (values[i].numpy().astype(np.int64) for i in mul.inputs)
        gate = values[op.inputs[0]].numpy().astype(np.int64)
        assert gate.shape[1] == 1 and np.array_equal(b, np.broadcast_to(gate, b.shape))
        assert np.array_equal(values[mul.output].numpy(), a * gate)


def test_the_indices_of_a_max_and_a_max_of_two_tensors_stay_refused():
    class Indices(nn.Module):
        def __init__(self, which):
            super().__init__()
            self.conv, self.which = nn.Conv2d(3, 4, 3), which

        def forward(self, x):
            y = self.conv(x)
            if self.which == "indices":
                return y.max(dim=1)[1].float().mean((1, 2))
            return torch.max(y, torch.relu(y)).mean((2, 3))

    for which, what in (("indices", r"at 'getitem' in module '0' of type Indices"),
                        ("pair", r"function 'max' at 'max_1' in module '0' of type Indices")):
        with pytest.raises(HawqError, match=what) as e:
            prepare(nn.Sequential(Indices(which)).eval(), "uniform8", (3, 6, 6))
        assert "\n" not in str(e.value)


class ExportedMaxPools(nn.Module):
    """A shape branch (torch.fx cannot trace it: captured by torch.export), then DPN's and CBAM's functional
    adaptive max pooling to 1x1 (`aten.adaptive_max_pool2d`, which returns (values, indices)) and a channel max."""

    def __init__(self):
        super().__init__()
        self.conv, self.gate, self.head = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(1, 8, 1), nn.Linear(8, 4)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if y.shape[-1] > 4:
            y = F.max_pool2d(y, 2)
        y = y * torch.sigmoid(self.gate(torch.amax(y, dim=1, keepdim=True)))
        return self.head(torch.flatten(F.adaptive_max_pool2d(y, 1), 1))


def test_export_captures_adaptive_max_pooling_and_a_channel_max(tmp_path):
    from hawq_ray.quant.graph import trace_graph
    model = ExportedMaxPools()
    assert trace_graph(model, (3, 8, 8)).capture.startswith("torch.export")
    prog, values, _ = through_every_back_end(model, (3, 8, 8), "uniform4", tmp_path)
    pools = [op for op in prog.ops if op.op == "max_pool2d"]
    assert [tuple(op.attrs["kernel"]) for op in pools] == [(2, 2), (8, 1), (4, 4)]
    last = values[pools[-1].inputs[0]].numpy()
    assert np.array_equal(values[pools[-1].output].numpy(), last.max(axis=(2, 3), keepdims=True))   # numpy's max


# ---------------------------------------------------------------------------------------------- features by index

class PickedFeatures(nn.Module):
    """CondenseNet's classifier: pooled features (N, C) picked by a fixed index buffer (`index_select`, dim 1),
    once after a pool (one scale) and once straight from a Linear (one scale per feature), each read by a Linear."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.head = nn.Conv2d(3, 10, 3), nn.Linear(6, 7), nn.Linear(5, 4)
        self.register_buffer("index", torch.tensor([9, 0, 3, 3, 7, 1]))
        self.register_buffer("index2", torch.tensor([6, 2, 0, 5, 1]))

    def forward(self, x):
        x = torch.relu(self.conv(x)).mean((2, 3))
        x = self.fc(torch.index_select(x, dim=1, index=self.index))
        return self.head(torch.index_select(x, 1, self.index2))


@pytest.mark.parametrize("bits", ["uniform4"])
def test_features_picked_by_a_fixed_index_are_a_gather_between_reshapes(bits, tmp_path):
    model = PickedFeatures()
    prog, values, _ = through_every_back_end(model, (3, 7, 7), _bits(bits, model, (3, 7, 7)), tmp_path)
    made = {op.output: op for op in prog.ops}
    gathers = [op for op in prog.ops if op.op == "channel_gather"]
    assert [tuple(op.consts["index"]) for op in gathers] == [tuple(model.index.tolist()),
                                                             tuple(model.index2.tolist())]
    for op, index in zip(gathers, (model.index, model.index2)):
        shaped = made[op.inputs[0]]
        assert shaped.op == "reshape"
        src = values[shaped.inputs[0]].numpy()
        while src.ndim > 2:                     # the Linear's accumulator requantized to one scale first
            src = src.reshape(src.shape[0], -1)
        picked = values[next(o.output for o in prog.ops if o.op == "reshape" and o.inputs == [op.output])].numpy()
        assert picked.shape == (4, len(index)) and np.array_equal(picked, src[:, index.numpy()])   # numpy's take


# ---------------------------------------------------------------------------------------------- split along the width

def downscale(x, scale=2):
    """i-RevNet's space-to-depth (pytorchcv's IRevDownscale.forward): the width split into columns of `scale`,
    each viewed as (N, H / scale, C scale^2), stacked and permuted back to a map."""
    batch, channels, height, _ = x.size()
    y = x.permute(0, 2, 3, 1)
    parts = [t.contiguous().view(batch, height // scale, channels * scale * scale) for t in y.split(scale, dim=2)]
    return torch.stack(parts, dim=1).permute(0, 3, 2, 1).contiguous()


class SpaceToDepthNet(nn.Module):
    """A conv, i-RevNet's downscale (iterating over the split's parts: torch.fx cannot trace it, torch.export
    does), a conv on the 4x channels."""

    def __init__(self):
        super().__init__()
        self.conv, self.conv2, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(16, 8, 1), nn.Linear(8, 3)

    def forward(self, x):
        y = downscale(torch.relu(self.conv(x)))
        return self.head(self.conv2(y).mean((2, 3)))


def test_a_split_along_the_width_is_crops_and_equals_the_models_own_rearrangement(tmp_path):
    prog, values, _ = through_every_back_end(SpaceToDepthNet(), (3, 6, 6), "uniform4", tmp_path)
    crops = [op for op in prog.ops if op.op == "crop"]
    assert [(op.attrs["axes"], op.attrs["starts"], op.attrs["stops"]) for op in crops] == \
        [((2,), (k,), (k + 2,)) for k in (0, 2, 4)]
    for k, op in zip((0, 2, 4), crops):          # numpy's slice of the permuted (N, H, W, C) codes
        src = values[op.inputs[0]].numpy()
        assert src.shape[1:] == (6, 6, 4) and np.array_equal(values[op.output].numpy(), src[:, :, k:k + 2])
        assert np.all(scale_of(prog, op.output) == scale_of(prog, op.inputs[0]))


# ---------------------------------------------------------------------------------------------- InstanceNorm2d

class IBNBlock(nn.Module):
    """IBN-Net's IBN block: a conv's channels split in two, InstanceNorm2d (affine) on the first half, BatchNorm2d
    on the second, concatenated and ReLU'd."""

    def __init__(self):
        super().__init__()
        self.conv, self.inst, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.InstanceNorm2d(4, affine=True), \
            nn.BatchNorm2d(4)
        self.conv2, self.head = nn.Conv2d(8, 8, 3), nn.Linear(8, 5)
        with torch.no_grad():
            self.inst.weight.uniform_(-2, 2, generator=torch.Generator().manual_seed(1))
            self.inst.bias.uniform_(-1, 1, generator=torch.Generator().manual_seed(2))

    def forward(self, x):
        a, b = torch.split(self.conv(x), 4, 1)
        x = torch.relu(torch.cat((self.inst(a.contiguous()), self.bn(b.contiguous())), 1))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(self.conv2(x), 1), 1))


@pytest.mark.parametrize("bits,size", [("uniform8", 9), ("mixed", 9), ("uniform8", 66)])
def test_instance_norm_is_a_layer_norm_over_the_positions_and_an_affine_and_equals_torch(bits, size, tmp_path):
    model = IBNBlock()
    shape = (3, size, size)
    prog, values, _ = through_every_back_end(model, shape, _bits(bits, model, shape), tmp_path)
    norm = next(op for op in prog.ops if op.op == "layer_norm")
    made = {op.output: op for op in prog.ops}
    rows = made[norm.inputs[0]]
    affine = next(op for op in prog.ops if op.op == "affine" and made[op.inputs[0]].inputs == [norm.output])
    codes = values[rows.inputs[0]].numpy().astype(np.float64)
    assert codes.max() - codes.min() > (2 ** 12 if size * size <= 4096 else 100)   # 16-bit in, else 8-bit
    assert (codes.min() >= -128 and codes.max() <= 127) == (size * size > 4096)
    x = torch.from_numpy(codes * scale_of(prog, rows.inputs[0]))
    m = model.inst
    want = F.instance_norm(x, weight=m.weight.detach().double(), bias=m.bias.detach().double(), eps=m.eps).numpy()
    x_hat = F.instance_norm(x, eps=m.eps).numpy()
    got = values[affine.output].numpy() * scale_of(prog, affine.output)
    g = np.abs(m.weight.detach().double().numpy()).reshape(1, -1, 1, 1)
    # the output's half step; the normalized value's grid sqrt(H W) / 32767 (its rounding and the affine's
    # offset rounded to it: a step in all) and the layer_norm's relative error (module docstring of ops.layernorm)
    bound = 0.5 * scale_of(prog, affine.output) + g * (scale_of(prog, norm.output) + np.abs(x_hat) * 1e-3) + 1e-9
    assert np.all(np.abs(got - want) <= bound), np.abs(got - want).max()


def test_an_instance_norm_with_running_statistics_is_refused_with_its_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.InstanceNorm2d(4, track_running_stats=True), nn.Flatten(),
                          nn.Linear(64, 2))
    with pytest.raises(HawqError, match=r"module '1' \(valid: per-image statistics of a map .*; got running "
                                        r"statistics\) of type InstanceNorm2d") as e:
        prepare(model.eval(), "uniform8", (3, 6, 6))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------- capture fallbacks

class OctConv(nn.Conv2d):
    """OctResNet's octave conv at its last stage: a Conv2d (a module fx keeps whole) that returns (high, None)."""

    def forward(self, x):
        return super().forward(x), None


class Octave(nn.Module):
    """OctResNet's unit: it adds the low path `if lx is not None`; fx traces the add (the proxy of the conv's
    second output is never None), a graph that fails on an image."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = OctConv(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        h, lx = self.conv(x)
        h = torch.relu(h)
        if lx is not None:
            h = h + lx
        return self.head(h.mean((2, 3)))


def test_a_graph_fx_traces_that_does_not_run_is_one_line_naming_the_call_then_export_is_tried():
    from hawq_ray.quant.graph import trace_graph
    model = Octave().eval()
    with pytest.raises(HawqError, match=r"^the graph torch.fx captured fails on a \(3, 6, 6\) image at 'add': "
                                        r"TypeError: unsupported operand") as e:
        trace_graph(model, (3, 6, 6), capture="fx")
    assert "\n" not in str(e.value)
    # torch.export takes the branch the model takes; the conv's call, kept whole, still returns a pair
    with pytest.raises(HawqError, match=r"^model Octave: the graph torch.fx captured fails .* and the graph "
                                        r"torch.export captured fails .* at 'relu'") as e:
        trace_graph(model, (3, 6, 6))
    assert "\n" not in str(e.value)


class SpaceToDepth(nn.Module):
    """i-RevNet's stem: the image's 2x2 blocks moved to the channels before the first conv (which reads 12), with
    `in_size` and no `in_channels` attribute, as pytorchcv's i-RevNet."""

    def __init__(self, in_channels: int = 3, in_size=(8, 8)):
        super().__init__()
        self.in_size, self.conv = in_size, nn.Conv2d(4 * in_channels, 5, 3)

    def forward(self, x):
        return self.conv(F.pixel_unshuffle(x, 2))


def test_the_input_channels_of_a_model_whose_first_conv_reads_more_are_the_constructors():
    from hawq_ray.inputs.models import input_shape
    assert input_shape(SpaceToDepth()) == (3, 8, 8)
    model = nn.Sequential(nn.Conv2d(12, 4, 3))
    model.in_size = (6, 6)
    assert input_shape(model) == (12, 6, 6)                         # the first conv where nothing else says
