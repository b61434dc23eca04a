"""Every constant of an IntegerProgram, recomputed here in numpy from the float model and the calibrated
activation ranges by the paper's rules, and compared exactly: the BN fold (eq. 16), per-channel weight integers
(eq. 12), INT32 biases at S_b = S_h S_W (eq. 17), the dyadic multiplier and shift of every requantize
(Section 3.1: b in [2^30, 2^31), c = 31 - exponent), the 1/count of an average pool (Appendix E), the branch
multipliers of each residual add and concat, each branch to the join's 16-bit output scale (Appendix F,
eq. 18), a clamp's bounds on the integer grid, a lookup table's codes, and a standalone BN's integer affine.
The float model is read through torch.fx here (which BN follows which conv, what each node computes, the
shapes), not through the project's tracer.
The simulation and the executor share these constants, so only an independent recomputation can catch a wrong
one. Then the integer program's dequantized output against fp32 on trained weights and held-out digits."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from hawq_ray.inputs.data import load_data
from hawq_ray.inputs.models import input_shape
from hawq_ray.program.executor import run_program
from hawq_ray.quant.finetune import Recipe, calibrated, fp32_weights
from hawq_ray.quant.qat import prepare

INT32_MIN, INT32_MAX = -2 ** 31, 2 ** 31 - 1
WIDE = 2 ** 15 - 1                                              # a join's or a standalone BN's 16-bit levels
LUT_BITS = 8

NUMPY_FUNCTIONS = {                                             # the element-wise functions, in numpy
    "hardswish": lambda x: x * np.clip(x + 3, 0, 6) / 6,
    "hardsigmoid": lambda x: np.clip(x + 3, 0, 6) / 6,
    "silu": lambda x: x / (1 + np.exp(-x)),
    "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "tanh": np.tanh,
}
NONNEG_FUNCTIONS = {"hardsigmoid", "sigmoid"}


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


def fx_nodes(model, shape) -> dict:
    """torch.fx's nodes of the float model by name, each with its output shape (ShapeProp)."""
    gm = torch.fx.symbolic_trace(model)
    ShapeProp(gm).propagate(torch.zeros(1, *shape))
    return {n.name: n for n in gm.graph.nodes}


def bn_statistics(bn, dtype=np.float32):
    """(gamma, beta, mean, sigma) of a frozen BN, sigma = sqrt(var + eps) (numpy's sqrt: correctly rounded)."""
    sigma = np.sqrt(bn.running_var.numpy().astype(dtype) + dtype(bn.eps))
    gamma = bn.weight.detach().numpy().astype(dtype) if bn.weight is not None else np.ones_like(sigma)
    beta = bn.bias.detach().numpy().astype(dtype) if bn.bias is not None else np.zeros_like(sigma)
    return gamma, beta, bn.running_mean.numpy().astype(dtype), sigma


def folded(model, nodes, op):
    """(W_bar, b_bar) of eq. 16 in float32 numpy: W gamma / sigma, (b - mu) gamma / sigma + beta, where the
    conv's only user is a BatchNorm2d; the layer's own weight and bias otherwise."""
    mod = model.get_submodule(op.layer)
    w = mod.weight.detach().numpy().astype(np.float32)
    b = mod.bias.detach().numpy().astype(np.float32) if mod.bias is not None else np.zeros(w.shape[0], np.float32)
    users = list(nodes[op.output].users)
    bn = model.get_submodule(users[0].target) if len(users) == 1 and users[0].op == "call_module" else None
    if not isinstance(bn, nn.BatchNorm2d):
        return w, b
    gamma, beta, mean, sigma = bn_statistics(bn)
    gain = gamma / sigma
    return w * gain.reshape(-1, *[1] * (w.ndim - 1)), (b - mean) * gain + beta


def called(node, model) -> str:
    """What an fx node computes, by name: 'relu6', 'hardswish', 'clamp', 'batchnorm2d', ..."""
    if node.op == "call_module":
        return type(model.get_submodule(node.target)).__name__.lower()
    return node.target if isinstance(node.target, str) else node.target.__name__


def clamp_bounds(node, model) -> tuple:
    """The real bounds (a, b) of a ReLU6 / Hardtanh / clamp node (None: unbounded on that side)."""
    name = called(node, model)
    if name == "relu6":
        return 0.0, 6.0
    if name == "hardtanh":
        m = model.get_submodule(node.target) if node.op == "call_module" else None
        return (m.min_val, m.max_val) if m else (node.kwargs.get("min_val", -1.0), node.kwargs.get("max_val", 1.0))
    args = list(node.args[1:3]) + [None] * (2 - len(node.args[1:3]))
    return node.kwargs.get("min", args[0]), node.kwargs.get("max", args[1])


def pool_count(node, model) -> int:
    """The window count of an average pool: its kernel, or the input's H W for a global pool / mean."""
    if node.op == "call_module" and isinstance(model.get_submodule(node.target), nn.AvgPool2d):
        m = model.get_submodule(node.target)
        assert m.padding in (0, (0, 0)), "the recomputation covers unpadded average pools"
        k = m.kernel_size
        return k * k if isinstance(k, int) else k[0] * k[1]
    h, w = node.args[0].meta["tensor_meta"].shape[2:]
    return h * w


def lookup_table(fn: str, s_in: float, signed_in: bool):
    """(table, offset, S_out) of fn on the 8-bit input codes: T[k] = clamp(round(f(k S_in) / S_out))."""
    lo_in, hi_in = (-2 ** (LUT_BITS - 1), 2 ** (LUT_BITS - 1) - 1) if signed_in else (0, 2 ** LUT_BITS - 1)
    f = NUMPY_FUNCTIONS[fn](np.arange(lo_in, hi_in + 1, dtype=np.float64) * s_in)
    lo, hi = (-128, 127) if (f < 0).any() else (0, 255)
    s_out = max(float(np.abs(f).max()), 1e-12) / hi
    return np.clip(np.floor(f / s_out + 0.5), lo, hi), lo_in, s_out


def shuffled(s, groups: int):
    """Per-channel scales after a channel shuffle: out channel k is input channel (k % g) C/g + k // g."""
    c = len(s)
    return np.array([s[(k % groups) * (c // groups) + k // groups] for k in range(c)])


def point_target(op, user, producer, ranges, nonneg, nodes, model):
    """The scale a requantize maps to (None for an average pool's 1/count, which keeps its input's)."""
    signed = not nonneg[op.inputs[0]]
    if user.op in ("add", "concat"):                           # a branch to the join's 16-bit output scale
        return ranges[f"out:{user.output}"] / WIDE
    if producer.op == "sum_pool2d":                            # the mean: 1/count, scale kept
        return None
    if user.op in ("conv2d", "dense") and op.output == f"{user.output}.in":
        bits, key = user.attrs["x_bits"], f"in:{user.layer}"
    elif user.op == "lookup" and op.output == f"{user.output}.in":
        bits, key = LUT_BITS, f"in:{user.output}"
    elif user.op == "mul":                                     # operand i of the product: 8 bits, its own range
        bits, key = 8, f"in:{user.output}.{op.output.removeprefix(user.output + '.in')}"
    else:
        raise AssertionError(f"no rule here for a requantize {op.output!r} read by a {user.op}")
    return ranges[key] / (2 ** (bits - 1) - 1 if signed else 2 ** bits - 1)


def expected_program(model, qm, program, shape=None) -> tuple[dict, object]:
    """{op output: {const name: expected array}} and the program output's scale, walking the program's
    structure and recomputing every number from the float model and the calibrated ranges."""
    nodes = fx_nodes(model, shape or input_shape())
    ranges = {key: float(getattr(qm, buf)) for key, buf in qm._points.items()}
    consumers, producer = {}, {op.output: op for op in program.ops}
    for op in program.ops:
        for name in op.inputs:
            consumers.setdefault(name, []).append(op)
    scale = {"input": ranges["input"] / 127}                     # the image: signed 8-bit, symmetric
    nonneg = {"input": False}
    want = {}
    for op in program.ops:
        s_in = scale.get(op.inputs[0]) if op.inputs else None
        node = nodes.get(op.output)
        out_nonneg = all(nonneg[i] for i in op.inputs)         # what passes values (pools, joins, channel moves)
        if op.op in ("conv2d", "dense"):
            bits = op.attrs["w_bits"]
            w_bar, b_bar = folded(model, nodes, op)
            s_w = np.abs(w_bar.reshape(len(w_bar), -1)).max(1) / np.float32(2 ** (bits - 1) - 1)
            s_w = np.maximum(s_w, np.abs(b_bar) / np.float32(float(s_in) * 2.0 ** 30))   # INT32 bias headroom
            q_w = np.clip(np.floor(w_bar / s_w.reshape(-1, *[1] * (w_bar.ndim - 1)) + np.float32(0.5)),
                          -2 ** (bits - 1), 2 ** (bits - 1) - 1)
            s_acc = float(s_in) * s_w.astype(np.float64)
            want[op.output] = {"weight": q_w, "bias": np.floor(b_bar.astype(np.float64) / s_acc + 0.5)}
            scale[op.output], out_nonneg = s_acc, False
        elif op.op == "requantize":
            (user,) = consumers[op.output]
            pool = producer.get(op.inputs[0])
            target = point_target(op, user, pool, ranges, nonneg, nodes, model)
            if target is None:
                m = np.asarray(1.0 / pool_count(nodes[op.output.removesuffix(".pool")], model))
            else:
                m = np.asarray(s_in, np.float64) / target
            b, c = dyadic_array(m.reshape(-1, 1, 1) if m.ndim else m)
            want[op.output] = {"multiplier": b, "shift": c}
            scale[op.output] = s_in if target is None else target
        elif op.op in ("add", "concat"):
            scale[op.output] = ranges[f"out:{op.output}"] / WIDE
        elif op.op == "clamp":                                 # the real bounds on the input's integer grid
            a, b = clamp_bounds(node, model)
            s = np.asarray(s_in, np.float64)
            lo = np.full(s.shape, INT32_MIN) if a is None else np.clip(np.ceil(a / s), INT32_MIN, INT32_MAX)
            hi = np.full(s.shape, INT32_MAX) if b is None else np.clip(np.floor(b / s), INT32_MIN, INT32_MAX)
            want[op.output] = {"lo": lo, "hi": hi}
            scale[op.output], out_nonneg = s_in, a is not None and a >= 0
        elif op.op == "lookup":
            fn = called(node, model)
            table, offset, s_out = lookup_table(fn, float(s_in), not nonneg[op.inputs[0]])
            assert op.attrs["offset"] == offset
            want[op.output] = {"table": table}
            scale[op.output], out_nonneg = s_out, fn in NONNEG_FUNCTIONS
        elif op.op == "affine":                                # a BN no conv precedes: Appendix D's g, h
            gamma, beta, mean, sigma = bn_statistics(model.get_submodule(node.target), np.float64)
            g = gamma / sigma
            s = np.asarray(s_in, np.float64) * np.ones_like(g)
            target = ranges[f"out:{op.output}"] / WIDE
            b, c = dyadic_array(np.abs(g) * s / target)
            want[op.output] = {"bias": np.clip(np.floor((beta - mean * g) / (g * s) + 0.5), INT32_MIN // 2,
                                               INT32_MAX // 2), "multiplier": b * np.sign(g), "shift": c}
            scale[op.output], out_nonneg = target, False
        elif op.op == "mul":
            scale[op.output] = scale[op.inputs[0]] * scale[op.inputs[1]]
        elif op.op == "channel_shuffle":
            s = np.asarray(s_in)
            scale[op.output] = shuffled(s, op.attrs["groups"]) if s.ndim else s_in
        elif op.op == "slice":
            s = np.asarray(s_in)
            scale[op.output] = s[op.attrs["start"]:op.attrs["stop"]] if s.ndim else s_in
        elif op.op == "relu":
            scale[op.output], out_nonneg = s_in, True
        else:
            assert op.op in ("sum_pool2d", "max_pool2d", "flatten"), f"no rule here for {op.op}"
            scale[op.output] = s_in
        nonneg[op.output] = out_nonneg
    return want, scale[program.output]


def assert_constants_match(model, qm, shape=None) -> tuple:
    """Every constant of the program equals the recomputed one; returns (program, constants checked, kinds)."""
    program = qm.to_integer()
    want, out_scale = expected_program(model, qm, program, shape)
    assert set(want) == {op.output for op in program.ops if op.consts}
    checked = 0
    for op in program.ops:
        for name, value in op.consts.items():
            expected = np.asarray(want[op.output][name]).astype(np.int64).reshape(np.shape(value))
            got = np.asarray(value, np.int64)
            assert np.array_equal(got, expected), (op.output, name, int((got != expected).sum()), np.size(got))
            checked += np.size(value)
    np.testing.assert_array_equal(np.asarray(program.output_scale, np.float64), out_scale)
    return program, checked, {op.op for op in program.ops}


@pytest.mark.parametrize("config", ["uniform8", "mixed"])
def test_every_constant_is_the_papers(trained, config):
    model, data = trained
    bits = "uniform8" if config == "uniform8" else mixed_bits(model)
    qm = calibrated(model, bits, data.train, Recipe(), input_shape())
    program, checked, kinds = assert_constants_match(model, qm)
    weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    assert checked > weights                                    # every weight of the model, and the rest
    assert {"conv2d", "dense", "requantize", "add"} <= kinds and sum(op.op == "add" for op in program.ops) == 3


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


class ShuffleUnit(nn.Module):
    """ShuffleNet's ops: a max pool, a channel split of per-channel accumulator scales, a concat, and channel
    shuffles of a concat's (one) scale and of a grouped conv's per-channel scales."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16)
        self.branch, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)
        self.group, self.head, self.fc = nn.Conv2d(16, 16, 3, 1, 1, groups=4), nn.Conv2d(16, 8, 1), nn.Linear(8, 10)
        with torch.no_grad():
            for bn in (self.bn, self.bn2):
                bn.running_mean.normal_(0, 0.5)
                bn.running_var.uniform_(0.5, 2)

    @staticmethod
    def shuffle(x, groups):
        n, c, h, w = x.size()
        return x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous().view(n, c, h, w)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.bn(self.stem(x))), 3, 2, 1)
        a, b = y.chunk(2, dim=1)
        y = self.shuffle(torch.cat([a, F.relu(self.bn2(self.branch(b)))], 1), 2)
        y = self.shuffle(F.relu(self.group(y)), 4)
        return self.fc(F.relu(self.head(y)).mean((2, 3)))


def calibrated_random(model, bits, shape):
    torch.manual_seed(0)
    qm = prepare(model, bits, shape)
    return qm.calibrate([torch.randn(4, *shape) for _ in range(2)])


@pytest.mark.parametrize("bits", ["uniform8", "uniform4"])
def test_every_constant_of_the_mobile_ops_is_the_papers(bits):
    """Depthwise and grouped convs, ReLU6 and clamp bounds, hardswish / SiLU / sigmoid / hardsigmoid tables,
    squeeze-excite's products, a pre-activation BN's affine, a concat, `.mean()`."""
    from small_models import SHAPE, SqueezeExcite
    torch.manual_seed(0)
    model = SqueezeExcite().eval()
    _, checked, kinds = assert_constants_match(model, calibrated_random(model, bits, SHAPE), SHAPE)
    assert {"clamp", "lookup", "mul", "affine", "concat", "sum_pool2d"} <= kinds and checked > 3000


@pytest.mark.parametrize("bits", ["uniform8", "uniform4"])
def test_every_constant_of_the_shuffle_ops_is_the_papers(bits):
    torch.manual_seed(0)
    model, shape = ShuffleUnit().eval(), (3, 16, 16)
    program, _, kinds = assert_constants_match(model, calibrated_random(model, bits, shape), shape)
    assert {"max_pool2d", "slice", "channel_shuffle", "concat"} <= kinds
    per_channel = [op for op in program.ops if op.op == "channel_shuffle" and np.ndim(op.scale) == 1]
    assert per_channel and len(np.unique(per_channel[0].scale)) > 1   # the permutation of scales is tested


def test_every_constant_of_a_concat_model_is_the_papers():
    """A conv reading a concatenation (SqueezeNet's fire module): each concat branch requantized to the concat's
    scale (eq. 18), plus the plain convs with biases and no BN."""
    from small_models import ConcatThenConv
    torch.manual_seed(0)
    model = ConcatThenConv(width=16, k=3).eval()
    qm = prepare(model, "uniform8", (3, 16, 16))
    qm.calibrate([torch.rand(8, 3, 16, 16) * 2 - 1 for _ in range(2)])
    _, _, kinds = assert_constants_match(model, qm, (3, 16, 16))
    assert "concat" in kinds


def _erf(x):
    return np.vectorize(math.erf)(x)


# every function the lookup op covers, in numpy from its definition (torch's defaults or the module's settings)
LOOKUP_FUNCTIONS = {
    "hardswish": (nn.Hardswish(), NUMPY_FUNCTIONS["hardswish"]),
    "hardsigmoid": (nn.Hardsigmoid(), NUMPY_FUNCTIONS["hardsigmoid"]),
    "silu": (nn.SiLU(), NUMPY_FUNCTIONS["silu"]),
    "sigmoid": (nn.Sigmoid(), NUMPY_FUNCTIONS["sigmoid"]),
    "tanh": (nn.Tanh(), np.tanh),
    "gelu": (nn.GELU(), lambda x: 0.5 * x * (1 + _erf(x / math.sqrt(2)))),
    "gelu_tanh": (nn.GELU(approximate="tanh"),
                  lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))),
    "mish": (nn.Mish(), lambda x: x * np.tanh(np.log1p(np.exp(x)))),
    "elu_0.5": (nn.ELU(alpha=0.5), lambda x: np.where(x > 0, x, 0.5 * np.expm1(x))),
    "leaky_relu_0.2": (nn.LeakyReLU(0.2), lambda x: np.where(x > 0, x, 0.2 * x)),
    "softplus_2_1": (nn.Softplus(beta=2.0, threshold=1.0),
                     lambda x: np.where(2 * x > 1.0, x, np.log1p(np.exp(2 * x)) / 2)),
}


@pytest.mark.parametrize("after_relu", [False, True], ids=["signed_in", "unsigned_in"])
@pytest.mark.parametrize("fn", list(LOOKUP_FUNCTIONS))
def test_every_lookup_table_is_its_function_on_the_codes(fn, after_relu):
    """The lookup table of each supported nonlinearity, recomputed in numpy from the float function (with the
    module's own alpha / slope / beta / threshold / approximation), the input scale S_in and the output scale:
    T[k - offset] = clamp(round(f(k S_in) / S_out)), k over the 8-bit input codes (signed after a conv, unsigned
    after a ReLU: offset -128 or 0), S_out = max |f| / 127 (255 where f >= 0 on the codes). The simulation and
    the executor read the same table, so only this recomputation catches a wrong entry. Where numpy's f and
    torch's differ in the last bits, a code exactly at a rounding tie may go either way (none is expected)."""
    module, f_numpy = LOOKUP_FUNCTIONS[fn]
    torch.manual_seed(0)
    layers = [nn.Conv2d(3, 8, 3, padding=1)] + [nn.ReLU()] * after_relu + [module, nn.Conv2d(8, 4, 1),
                                                                            nn.Flatten(), nn.Linear(4 * 8 * 8, 3)]
    qm = calibrated_random(nn.Sequential(*layers).eval(), "uniform8", (3, 8, 8))
    program = qm.to_integer()
    (lut,) = [op for op in program.ops if op.op == "lookup"]
    s_in = float(np.asarray(next(op for op in program.ops if op.output == lut.inputs[0]).scale))
    codes = np.arange(0, 256) if after_relu else np.arange(-128, 128)
    f = f_numpy(codes * s_in)
    lo, hi = (-128, 127) if (f < 0).any() else (0, 255)
    s_out = np.abs(f).max() / hi
    assert lut.attrs["offset"] == codes[0]
    assert float(np.asarray(lut.scale)) == pytest.approx(s_out, rel=1e-12)
    want = np.clip(np.floor(f / s_out + 0.5), lo, hi)
    got = np.asarray(lut.consts["table"], np.int64)
    tie = np.abs(f / s_out - np.floor(f / s_out) - 0.5) < 1e-9
    assert got.shape == want.shape and np.all((got == want) | (tie & (np.abs(got - want) <= 1))), \
        (fn, np.flatnonzero(got != want)[:5].tolist())
    assert len(np.unique(got)) > 20                     # the table spans many codes: the scales are exercised
