"""ONNX QDQ export (`hawq_ray.onnx`, `hawq-ray export`): onnx.checker in full, onnxruntime against the
integer executor (top-1 on the default model's held-out split, every value's codes on models holding every
op), the graph's constants against the program's, INT4 storage, the CLI and its bad input."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pandas as pd
import pytest
import torch
from onnx import numpy_helper
from torch import nn
import torch.nn.functional as F

from hawq_ray.quant.layers import layer_table
from hawq_ray.inputs.data import load_data
from hawq_ray.inputs.models import input_shape
from hawq_ray.onnx.export import check_onnx, check_values, export_onnx, onnx_session
from hawq_ray.program.executor import run_program
from hawq_ray.quant.finetune import fp32_weights
from hawq_ray.quant.qat import prepare
from small_models import SqueezeExcite

SHAPE = input_shape()
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return load_data("digits", input_shape=SHAPE)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    model, _, _ = fp32_weights(tmp_path_factory.mktemp("fp32"), data)      # as `hawq-ray run` trains it
    return model.eval()


def held_out(data, n=None):
    x = torch.stack([data.test[i][0] for i in range(len(data.test) if n is None else n)])
    return [x[i:i + 64] for i in range(0, len(x), 64)]


def mixed_bits(model, shape):
    """4 bits for every other searchable group, 8 for the rest."""
    table = layer_table(model, shape)
    out, seen = {}, {}
    for layer, group, fixed in zip(table["layer"], table["group"], table["fixed_bits"]):
        if not pd.isna(fixed):
            continue
        key = layer if pd.isna(group) or not group else group
        out[layer] = seen.setdefault(key, 4 if len(seen) % 2 == 0 else 8)
    return out


def calibrated(model, bits, shape, batches):
    return prepare(model, bits, shape).calibrate(batches).to_integer()


@pytest.mark.parametrize("form", ["exact", "fused"])
@pytest.mark.parametrize("bits", ["uniform8", "uniform4", "mixed"])
def test_default_model_agrees_with_the_integer_executor_on_held_out_data(trained, data, bits, form, tmp_path):
    """The exact form: every logit equal to the integer executor's on the held-out split. The fused form
    rounds in float and puts residual branches on 8 bits, for speed in onnxruntime: >= 90% top-1 here (the
    README gives the measured figures)."""
    cfg = mixed_bits(trained, SHAPE) if bits == "mixed" else bits
    calib = [torch.stack([data.train[i][0] for i in range(k, k + 64)]) for k in (0, 64)]
    program = calibrated(trained, cfg, SHAPE, calib)
    path = tmp_path / "m.onnx"
    export_onnx(program, path, {"scales": "test calibration"}, form=form)
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    meta = json.loads({p.key: p.value for p in model.metadata_props}["hawq_ray"])
    assert meta["bits"] == program.bits and meta["form"] == form and meta["scales"] == "test calibration"
    check = check_onnx(path, program, held_out(data))
    assert check["samples"] == len(data.test)
    if form == "exact":
        assert check["top1_agreement"] == 1.0 and check["max_logit_diff_units"] == 0, check
    else:
        assert check["top1_agreement"] >= 0.9, check
    # an independent top-1: onnxruntime's argmax against the executor's dequantized logits, counted here
    x = torch.cat(held_out(data))
    got = onnx_session(path).run(None, {"input": x.numpy()})[0].argmax(1)
    want = program.dequantize_output(run_program(program, program.quantize_input(x))).numpy().argmax(1)
    assert np.mean(got == want) == check["top1_agreement"]


def optimized_kinds(path, optimized) -> list:
    """The op types of the ONNX model at `path` after onnxruntime's graph optimizations (written to
    `optimized`): what its CPU kernels run."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.optimized_model_filepath = str(optimized)
    opts.log_severity_level = 3
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(optimized)).graph.node]


@pytest.mark.parametrize("name,form,float_convs", [("digits_resnet", "exact", True), ("digits_resnet", "fused", False),
                                                   ("torchvision:resnet18", "fused", False)])
def test_the_fused_form_lets_onnxruntime_run_every_conv_on_integers(trained, name, form, float_convs, tmp_path):
    """The structure behind the speed (no timing here): after onnxruntime's graph optimizations, every conv
    of the fused form is an integer QLinearConv (resnet18's stem too, whose max pool feeds a branch) and the
    residual adds are QLinearAdds; the exact form's convs run in float."""
    from hawq_ray.inputs.models import get_model
    model, shape = (trained, SHAPE) if name == "digits_resnet" else (get_model(name).eval(), (3, 64, 64))
    program = calibrated(model, "uniform8", shape, [torch.randn(8, *shape)])
    export_onnx(program, tmp_path / "m.onnx", form=form)
    kinds = optimized_kinds(tmp_path / "m.onnx", tmp_path / "opt.onnx")
    convs = sum(op.op == "conv2d" for op in program.ops)
    assert kinds.count("QLinearConv") + kinds.count("Conv") + kinds.count("FusedConv") == convs
    assert (kinds.count("QLinearConv") < convs) == float_convs, kinds
    if not float_convs:
        assert kinds.count("QLinearAdd") >= sum(op.op == "add" for op in program.ops) - 1


def test_the_fused_mobilenet_v2_runs_its_convs_on_integers(tmp_path):
    """Issue 43: MobileNet V2's fused form on onnxruntime's integer kernels (no timing here). After its graph
    optimizations every conv is a QLinearConv but the last, whose ReLU6 the program sums at 32 bits (no 8-bit
    point there), and every residual add a QLinearAdd: no ReLU6 Max / Min is left between a conv and its
    QuantizeLinear (its requantize's saturation is the clamp), and int8 activations are stored as uint8 at
    zero point 128, one type into and out of every conv. The clamps left to their readers stay the program's
    values in the `every_value` taps."""
    from hawq_ray.inputs.models import get_model
    shape = (3, 64, 64)
    torch.manual_seed(0)
    program = calibrated(get_model("torchvision:mobilenet_v2").eval(), "uniform8", shape, [torch.randn(4, *shape)])
    model = export_onnx(program, tmp_path / "m.onnx", form="fused")
    inits = {t.name: t for t in model.graph.initializer}
    activation_zps = {inits[n.input[2]].data_type for n in model.graph.node if n.op_type == "QuantizeLinear"}
    assert activation_zps == {onnx.TensorProto.UINT8}
    kinds = optimized_kinds(tmp_path / "m.onnx", tmp_path / "opt.onnx")
    convs = sum(op.op == "conv2d" for op in program.ops)
    assert kinds.count("QLinearConv") == convs - 1, kinds
    assert kinds.count("QLinearAdd") == sum(op.op == "add" for op in program.ops)
    assert kinds.count("Max") == kinds.count("Min") == 1          # the last conv's ReLU6, before its pool
    x = torch.randn(2, *shape)
    export_onnx(program, tmp_path / "values.onnx", form="fused", every_value=True)
    rows = {r["value"]: r for r in check_values(tmp_path / "values.onnx", program, x)}
    for op in program.ops:
        if op.op == "clamp":    # equal to the executor's where its conv's accumulator is
            assert rows[op.output]["max_diff"] <= rows[op.inputs[0]]["max_diff"], (op.output, rows[op.output])
    check = check_onnx(tmp_path / "m.onnx", program, [x])
    assert check["top1_agreement"] == 1.0


def test_the_graphs_constants_are_the_programs(trained, tmp_path):
    """Weight codes, INT32 biases and scales in the ONNX file, read back with onnx's numpy_helper."""
    program = calibrated(trained, mixed_bits(trained, SHAPE), SHAPE, [torch.randn(16, *SHAPE)])
    path = tmp_path / "m.onnx"
    export_onnx(program, path, form="fused")     # every layer through DequantizeLinear (the exact form's last
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}   # is float64)
    docs = {t.name: t.doc_string for t in onnx.load(str(path)).graph.initializer}
    layers = [op for op in program.ops if op.op in ("conv2d", "dense")]
    assert any(op.attrs["w_bits"] == 4 for op in layers)
    for op in layers:
        w = inits[f"{op.output}.weight"]
        assert w.dtype == np.int8 and np.array_equal(w, op.consts["weight"])
        bound = 2 ** (op.attrs["w_bits"] - 1) - 1
        assert np.abs(w).max() <= bound and f"in [{-bound}, {bound}]" in docs[f"{op.output}.weight"]
        assert np.array_equal(inits[f"{op.output}.bias"], op.consts["bias"].astype(np.int32))
        s_w, s_b = inits[f"{op.output}.weight.scale"], inits[f"{op.output}.bias.scale"]
        np.testing.assert_allclose(s_b.astype(np.float64), np.asarray(op.scale).reshape(-1), rtol=1e-6)
        np.testing.assert_allclose(s_b / s_w, s_b[0] / s_w[0], rtol=1e-6)      # S_b = S_x S_w, one S_x
    assert inits["input.scale"] == np.float32(program.input_scale)


def test_int4_weights_are_onnx_int4_and_compute_the_same(trained, tmp_path):
    program = calibrated(trained, "uniform4", SHAPE, [torch.randn(16, *SHAPE)])
    export_onnx(program, tmp_path / "i8.onnx")
    export_onnx(program, tmp_path / "i4.onnx", int4_weights=True)
    m4 = onnx.load(str(tmp_path / "i4.onnx"))
    assert m4.opset_import[0].version == 21
    types = {t.name: t.data_type for t in m4.graph.initializer}
    four = [op for op in program.ops if op.op in ("conv2d", "dense") and op.attrs["w_bits"] == 4]
    assert four and all(types[f"{op.output}.weight"] == onnx.TensorProto.INT4 for op in four)
    for op in four:
        w = numpy_helper.to_array(next(t for t in m4.graph.initializer if t.name == f"{op.output}.weight"))
        assert np.array_equal(w.astype(np.int8), op.consts["weight"])
    x = torch.randn(8, *SHAPE).numpy()
    a = onnx_session(tmp_path / "i8.onnx").run(None, {"input": x})[0]
    b = onnx_session(tmp_path / "i4.onnx").run(None, {"input": x})[0]
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max())


class EveryOp(SqueezeExcite):
    """The ops the default model lacks: the zoo tests' squeeze-excite block (ReLU6, hardswish, SiLU, sigmoid
    / hardsigmoid gates and their product, a pre-activation BN on a concat, depthwise / grouped convs) with a
    ceil-mode max pool, channel shuffle and split, a residual add, adaptive pooling to unequal windows and
    flatten."""

    def __init__(self):
        super().__init__()
        self.side, self.fc = nn.Conv2d(12, 12, 3, 1, 1), nn.Linear(24 * 4 + 24, 10)

    def forward(self, x):
        y = F.hardswish(self.bn(self.stem(x)))
        y = F.max_pool2d(y, 3, 2, 1, ceil_mode=True)
        d = F.silu(self.dw(y))
        gate = torch.sigmoid(self.f2(F.relu6(self.f1(F.adaptive_avg_pool2d(d, 1)))))
        g = F.hardsigmoid(self.group(y)) * (gate * d)
        z = F.relu(self.proj(F.relu(self.pre(torch.cat([d, g], 1)))))
        n, c, h, w = z.shape
        z = z.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        a, b = z.chunk(2, dim=1)
        z = torch.cat([a, F.relu(self.side(b)) + b], 1)
        pooled = F.adaptive_avg_pool2d(z, 2).flatten(1)
        return self.fc(torch.cat([pooled, z.clamp(0, 4).mean((2, 3))], 1))


@pytest.mark.parametrize("bits", ["uniform8", "mixed"])
def test_every_op_is_exact_value_by_value(bits, tmp_path):
    """The exact form: every value's codes in onnxruntime equal the integer executor's."""
    torch.manual_seed(0)
    shape = (3, 19, 19)                    # odd sizes: ceil-mode and unequal adaptive windows
    model = EveryOp().eval()
    cfg = mixed_bits(model, shape) if bits == "mixed" else bits
    program = calibrated(model, cfg, shape, [torch.randn(8, *shape) for _ in range(2)])
    kinds = {op.op for op in program.ops}
    assert {"conv2d", "dense", "requantize", "relu", "clamp", "lookup", "mul", "affine", "add", "concat",
            "sum_pool2d", "max_pool2d", "channel_shuffle", "slice", "flatten"} <= kinds
    path = tmp_path / "every.onnx"
    export_onnx(program, path, form="exact", every_value=True)
    rows = check_values(path, program, torch.randn(8, *shape))
    # a max pool's requantizes moved before it (exact), so the pooled values are the requantizes' names
    assert {r["op"] for r in rows} == kinds - {"max_pool2d"}
    assert len(rows) == len({op.output for op in program.ops}) - 1
    assert "MaxPool" in {n.op_type for n in onnx.load(str(path)).graph.node}
    assert [r for r in rows if r["differing"]] == []


@pytest.mark.parametrize("name,shape,bits", [("resnet20_cifar10", (3, 32, 32), "mixed"),
                                             ("torchvision:mobilenet_v3_small", (3, 48, 48), "uniform8"),
                                             ("torchvision:shufflenet_v2_x0_5", (3, 48, 48), "mixed")])
def test_zoo_models_export_exactly(name, shape, bits, tmp_path):
    """Residual adds, squeeze-excite, hardswish, channel shuffle at 4 and 8 bits on random inputs: every value
    of the exact form equal to the executor's, and the fused form's top-1 counted."""
    from hawq_ray.inputs.models import get_model
    torch.manual_seed(0)
    model = get_model(name).eval()
    cfg = mixed_bits(model, shape) if bits == "mixed" else bits
    program = calibrated(model, cfg, shape, [torch.randn(8, *shape) for _ in range(2)])
    export_onnx(program, tmp_path / "exact.onnx", every_value=True)
    rows = check_values(tmp_path / "exact.onnx", program, torch.randn(8, *shape))
    assert len(rows) > 20 and [r for r in rows if r["differing"]] == []
    export_onnx(program, tmp_path / "fused.onnx", form="fused")
    check = check_onnx(tmp_path / "fused.onnx", program, [torch.randn(8, *shape)])
    assert check["samples"] == 8 and 0 <= check["top1_agreement"] <= 1


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "hawq_ray.service.cli", "export", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=600)


def test_cli_exports_and_checks(tmp_path):
    out = tmp_path / "sub" / "d.onnx"
    r = _cli("--bits", "uniform8", "--out", str(out), "--check-batches", "2", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    obj = json.loads(r.stdout.strip().splitlines()[-1])
    assert obj["out"] == str(out) and obj["samples"] == 128 and 0 <= obj["top1_agreement"] <= 1
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    meta = json.loads({p.key: p.value for p in onnx.load(str(out)).metadata_props}["hawq_ray"])
    assert meta["model"] == "digits_resnet" and "calibrated" in meta["scales"]


@pytest.mark.parametrize("args,words", [
    (["--bits", "uniform8", "--out", "{tmp}"], "is a folder"),
    (["--bits", "uniform8", "--out", "{tmp}/m.onnx", "--checkpoint", "{tmp}/none.pt"], "no such file"),
    (["--bits", "{tmp}/other.json", "--out", "{tmp}/m.onnx"], "unknown layers"),
    (["--bits", "uniform8", "--out", "/proc/none/m.onnx"], "cannot be written"),
    (["--bits", "uniform8", "--out", "{tmp}/m.onnx", "--format", "tflite"], "invalid choice"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, words):
    (tmp_path / "other.json").write_text(json.dumps({"features.stage1.unit1.body.conv1.conv": 4}))
    r = _cli(*[a.replace("{tmp}", str(tmp_path)) for a in args], cwd=tmp_path)
    assert r.returncode == 2 and words in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "m.onnx").exists()
