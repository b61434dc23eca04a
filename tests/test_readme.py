"""The README's Python API is true: its snippets run as written, and what each one promises holds, checked against
numbers computed here by hand (numpy, torch's own FLOP counter, brute force), not by the stage that made them;
its defaults block is the code's defaults; every dotted name it cites resolves to a module or an attribute."""
import ast
import importlib
import itertools
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def _block(marker: str) -> str:
    found = [b for b in _python_blocks() if marker in b]
    assert len(found) == 1, f"README: {len(found)} python blocks with {marker!r}"
    return found[0]


def _run_block(marker: str, ns: dict) -> dict:
    exec(compile(_block(marker), "README.md", "exec"), ns)
    return ns


# ------------------------------------------------------------------------------------------------ hand counts
def execution_order(model: nn.Module, shape) -> list:
    """Names of the Conv2d / Linear modules in the order one forward pass calls them."""
    order = []
    handles = [m.register_forward_hook(lambda *_, n=n: order.append(n)) for n, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *shape))
    finally:
        for h in handles:
            h.remove()
    return order


def hand_counts(model: nn.Module, shape) -> tuple:
    """(execution order, {layer: weight elements}, {layer: MACs per sample}); MACs are half of the FLOPs torch's
    FlopCounterMode counts for the module's aten.convolution / addmm."""
    order = execution_order(model, shape)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    flops = counter.get_flop_counts()
    prefix = type(model).__name__
    modules = dict(model.named_modules())
    params = {n: modules[n].weight.numel() for n in order}
    macs = {n: sum(flops[f"{prefix}.{n}"].values()) // 2 for n in order}
    return order, params, macs


def hand_bits(order, searchable_bits: int) -> dict:
    """The README's rule: the first conv (it reads the image) and the last linear layer stay at 8 bits."""
    return {n: 8 if n in (order[0], order[-1]) else searchable_bits for n in order}


def hand_size_mib(params, bits) -> float:
    return sum(params[n] * bits[n] for n in params) / 8 / 2 ** 20


def hand_gbops(macs, bits) -> float:
    return sum(macs[n] * bits[n] * bits[n] for n in macs) / 1e9


# ------------------------------------------------------------------------------------------------ the stage snippet
@pytest.fixture(scope="module")
def stage():
    """The stage-by-stage snippet run as written (its own assert: QAT simulation == integer executor, bit for bit);
    its untrained default model is initialized from a fixed seed (DigitsResNet(seed=0)), the same in every run."""
    return _run_block("run_program", {})


def test_stage_snippet_runs_and_keeps_its_comments(stage):
    model, shape, data, program = stage["model"], stage["shape"], stage["data"], stage["program"]
    assert shape == (1, 16, 16)
    assert round(sum(p.numel() for p in model.parameters()) / 1000) == 14          # "a 14k-parameter CNN"
    x, y = stage["x"], stage["y"]                                                     # the first test batch
    assert torch.equal(x, torch.stack([data.test[i][0] for i in range(64)]))
    assert y.tolist() == [int(data.test[i][1]) for i in range(64)]
    order = execution_order(model, shape)
    assert program.layers() == order
    assert program.bits == hand_bits(order, 4)                     # "first/last layer stay 8-bit"
    for op in program.ops:                                         # "integer ops and constants only"
        for name, c in op.consts.items():
            assert np.issubdtype(np.asarray(c).dtype, np.integer), (op.output, name)
    logits = stage["logits_int"]
    assert not logits.is_floating_point() and logits.shape == (64, 10)


def test_stage_snippet_program_is_the_readme_quantization_by_hand(stage):
    """Every layer's integer weights and biases recomputed in numpy from the float model: BN folded (eq. 16),
    per-output-channel symmetric S = max|W_c| / (2^(b-1) - 1), INT32 bias at S_in * S_W (eq. 17); the input
    scale is the EMA (momentum 0.99, first batch initializes) of max|x| over the calibration batches / 127."""
    model, program, data = stage["model"], stage["program"], stage["data"]
    from hawq_ray.inputs.data import batches
    ema = None
    for xb, _ in batches(data.train, 64, limit=4):
        m = float(xb.abs().max())
        ema = m if ema is None else 0.99 * ema + 0.01 * m
    assert program.input_scale == pytest.approx(ema / 127, rel=1e-6)
    modules = dict(model.named_modules())
    producer = {op.output: op for op in program.ops}
    for op in (o for o in program.ops if o.op in ("conv2d", "dense")):
        mod = modules[op.layer]
        w = mod.weight.detach().double().numpy()
        b = np.zeros(len(w)) if mod.bias is None else mod.bias.detach().double().numpy()
        parent, _, leaf = op.layer.rpartition(".")
        bn = modules.get(f"{parent}.{leaf.replace('conv', 'bn')}" if parent else "")
        if isinstance(bn, nn.BatchNorm2d):
            f = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().double().numpy()
            w = w * f[:, None, None, None]
            b = bn.bias.detach().double().numpy() + (b - bn.running_mean.double().numpy()) * f
        levels = 2 ** (program.bits[op.layer] - 1) - 1
        s_w = np.abs(w).reshape(len(w), -1).max(1) / levels
        codes = np.rint(w / s_w.reshape(-1, *[1] * (w.ndim - 1)))
        np.testing.assert_array_equal(op.consts["weight"], codes, err_msg=op.layer)
        assert np.abs(op.consts["weight"]).reshape(len(w), -1).max(1).tolist() == [levels] * len(w)
        s_in = producer[op.inputs[0]].scale if op.inputs[0] in producer else program.input_scale
        np.testing.assert_array_equal(op.consts["bias"], np.rint(b / (np.asarray(s_in, float).ravel() * s_w)),
                                      err_msg=op.layer)


def test_stage_snippet_integers_approximate_the_float_model(stage):
    """The program computes the model: its dequantized logits are close to the fp32 model's (uniform4 of a random
    model) and pick the same class, so bit-exactness is not that of a broken simulation with its own copy."""
    model, program, x = stage["model"], stage["program"], stage["x"]
    with torch.no_grad():
        fp32 = model.eval()(x).double().numpy()
    ints = stage["logits_int"].numpy().astype(np.float64) * np.asarray(program.output_scale)
    assert np.corrcoef(fp32.ravel(), ints.ravel())[0, 1] > 0.99
    assert np.abs(ints - fp32).max() < 0.15 * np.abs(fp32).max()
    assert np.mean(fp32.argmax(1) == ints.argmax(1)) >= 0.9


def test_layer_table_and_costs_are_hand_counts(stage):
    """layer_table of the default model against its modules and torch's FLOP counter; config_costs of the
    snippet's config against size = sum(params * bits) / 8 / 2^20 MiB and BOPS = sum(MACs * b * b) / 1e9."""
    from hawq_ray.quant.layers import layer_table
    from hawq_ray.contract.cost import config_costs
    model, shape, program = stage["model"], stage["shape"], stage["program"]
    order, params, macs = hand_counts(model, shape)
    table = layer_table(model, shape)
    assert list(table["layer"]) == order
    modules = dict(model.named_modules())
    assert list(table["kind"]) == ["linear" if isinstance(modules[n], nn.Linear) else "conv" for n in order]
    assert list(table["params"]) == [params[n] for n in order]
    assert list(table["macs"]) == [macs[n] for n in order]
    assert table["macs"].iloc[0] == 8 * 16 * 16 * 1 * 3 * 3          # stem: 8 channels of 16x16, 3x3 over 1
    # a downsample conv shares its bits with the conv beside it (the block's first conv)
    groups = {}
    for n in order:
        if n.endswith(".downsample.conv"):
            block = n[: -len(".downsample.conv")]
            groups[n] = groups[f"{block}.conv1"] = f"{block}.conv1"
    assert len(groups) == 4 and list(table["group"]) == [groups.get(n, "") for n in order]
    fixed = {n: 8 for n in (order[0], order[-1])}
    assert [None if pd.isna(v) else int(v) for v in table["fixed_bits"]] == [fixed.get(n) for n in order]
    for bits in (program.bits, hand_bits(order, 8), {n: 32 for n in order}):
        costs = config_costs(table, bits)
        assert costs["size_mib"] == pytest.approx(hand_size_mib(params, bits), rel=1e-12)
        assert costs["gbops"] == pytest.approx(hand_gbops(macs, bits), rel=1e-12)


def test_readme_resnet18_costs_are_the_formula():
    """"pytorchcv resnet18 is 44.6 MiB / 1858 GBOPS in fp32, 11.1 MiB / 116 GBOPS at uniform8 and 5.8 MiB /
    34.7 GBOPS at uniform4 (first and last layer 8-bit)": each number against the hand count of the model."""
    from hawq_ray.inputs.models import get_model, input_shape
    sentence = re.search(r"resnet18 is ([\d.]+) MiB / ([\d.]+) GBOPS in fp32, ([\d.]+) MiB / ([\d.]+) GBOPS at "
                         r"uniform8 and ([\d.]+) MiB / ([\d.]+) GBOPS at uniform4", README.replace("\n", " "))
    assert sentence, "README: the resnet18 size / BOPS sentence moved"
    stated = [float(v) for v in sentence.groups()]
    model = get_model("resnet18")
    shape = input_shape(model)
    assert shape == (3, 224, 224)
    order, params, macs = hand_counts(model, shape)
    counted = []
    for bits in ({n: 32 for n in order}, hand_bits(order, 8), hand_bits(order, 4)):
        counted += [hand_size_mib(params, bits), hand_gbops(macs, bits)]
    for got, text in zip(counted, sentence.groups()):
        digits = len(text.partition(".")[2])
        assert round(got, digits) == float(text), (got, text)
    assert stated == [44.6, 1858, 11.1, 116, 5.8, 34.7]


def test_solve_bits_meets_its_budget_and_is_optimal_by_brute_force(stage):
    """solve_bits on the default model's table with made-up Omegas: for each fraction r the config it returns
    keeps the searchable layers' size (BOPS) within R4 + r (R8 - R4) computed here, keeps grouped layers together
    and the first/last at 8, and its sum Omega is the least of every config that fits (all 2^units tried)."""
    from hawq_ray.quant.layers import layer_table
    from solver.ilp import solve_bits
    model, shape = stage["model"], stage["shape"]
    order, params, macs = hand_counts(model, shape)
    table = layer_table(model, shape)
    rng = np.random.default_rng(7)
    omega8 = rng.uniform(0.0, 0.1, len(table))
    table["omega8"], table["omega4"] = omega8, omega8 + rng.uniform(0.1, 1.0, len(table))
    omega = {b: dict(zip(order, table[f"omega{b}"])) for b in (4, 8)}
    fixed = {order[0], order[-1]}
    units = []                                       # one per bit choice: a block's conv1 and its downsample
    for n in order:
        block, _, leaf = n.rpartition(".")
        if n in fixed or n.endswith(".downsample.conv"):
            continue
        downsample = f"{block}.downsample.conv"
        units.append([n, downsample] if leaf == "conv1" and downsample in params else [n])
    searchable = [n for u in units for n in u]
    assert len(units) == 6 and sorted(searchable + sorted(fixed)) == sorted(order)

    def resource(key, bits):                         # size in weight bits, BOPS in MACs * b * b
        return sum(params[n] * bits[n] if key == "size" else macs[n] * bits[n] ** 2 for n in searchable)

    configs = []
    for choice in itertools.product((4, 8), repeat=len(units)):
        bits = {n: b for u, b in zip(units, choice) for n in u}
        configs.append((bits, sum(omega[bits[n]][n] for n in searchable)))
    for key in ("size", "bops"):
        r4, r8 = resource(key, dict.fromkeys(searchable, 4)), resource(key, dict.fromkeys(searchable, 8))
        for r in (0.25, 0.5, 0.75):
            limit = r4 + r * (r8 - r4)
            got = solve_bits(table, {key: r}).bits
            assert all(got[n] == 8 for n in fixed)
            assert all(len({got[n] for n in u}) == 1 for u in units)
            assert resource(key, got) <= limit
            best = min(o for bits, o in configs if resource(key, bits) <= limit)
            assert sum(omega[got[n]][n] for n in searchable) == pytest.approx(best, rel=1e-9, abs=0)
            assert any(got[n] == 4 for n in searchable)           # the budget binds: all-8 would not fit


# ------------------------------------------------------------------------------------------------ ONNX snippet
def test_onnx_snippet_equals_the_integer_executor(stage, tmp_path, monkeypatch, capsys):
    """The ONNX snippet, run on the stage snippet's qm and x: the file passes onnx.checker in full, and
    onnxruntime's float logits (run here, as the snippet's last comment shows) are the executor's integers times
    the output scale on every element; the dict check_onnx prints says the same."""
    import onnx
    import onnxruntime
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    ns = _run_block("export_onnx", dict(stage))
    printed = ast.literal_eval(capsys.readouterr().out.strip().splitlines()[-1])
    onnx.checker.check_model(onnx.load("model.onnx"), full_check=True)
    x, program, want = ns["x"], ns["program"], stage["logits_int"].numpy()
    got = onnxruntime.InferenceSession("model.onnx").run(None, {"input": x.numpy()})[0].astype(np.float64)
    scale = np.asarray(program.output_scale, np.float64)
    np.testing.assert_array_equal(np.rint(got / scale), want)
    np.testing.assert_allclose(got, want * scale, rtol=1e-6, atol=0)
    agreement = float(np.mean(got.argmax(1) == (want * scale).argmax(1)))
    assert printed["samples"] == len(x) == 64
    assert printed["top1_agreement"] == agreement == 1.0
    assert printed["max_logit_diff_units"] == printed["mean_logit_diff_units"] == 0.0


# ------------------------------------------------------------------------------------------------ timing snippet
def test_timing_snippet_on_compiled_models(stage, tmp_path, monkeypatch, capsys):
    """The timing snippet on two compiled folders made here (the snippet's program as `ilp0`, the same model at
    uniform8): each loaded module equals the integer executor on random int8 inputs; the timed table has one row
    per config with `rounds` samples and q25 <= median <= q75; against_budget sets the predicted latency and the
    limit beside it and flags over_budget exactly where the lower quartile is above the limit."""
    from hawq_ray.deploy.build import compile_program, export_model, load_model
    from hawq_ray.inputs.data import batches
    from hawq_ray.program.executor import run_program
    from hawq_ray.quant.qat import prepare
    model, shape, data = stage["model"], stage["shape"], stage["data"]
    u8 = prepare(model, "uniform8", shape).calibrate(batches(data.train, 64, limit=4)).to_integer()
    programs = {"uniform8": u8, "ilp0": stage["program"]}
    monkeypatch.chdir(tmp_path)
    for name, program in programs.items():
        export_model(compile_program(program, batch=8), Path("runs/r20/deploy") / name)
    ns = _run_block("time_models", {})
    capsys.readouterr()
    rng = np.random.default_rng(0)
    for name, program in programs.items():
        deployed = load_model(tmp_path / "runs/r20/deploy" / name, program=program)
        q = rng.integers(-128, 128, size=(8, *shape), dtype=np.int8)
        np.testing.assert_array_equal(deployed(q), run_program(program, torch.from_numpy(q)).numpy(), err_msg=name)
    timed, against_budget = ns["timed"], ns["against_budget"]
    assert list(timed["config"]) == ["uniform8", "ilp0"]
    assert (timed["latency_samples"] == 15).all() and (timed["calls"] >= 1).all()
    assert ((0 < timed["latency_q25_ms"]) & (timed["latency_q25_ms"] <= timed["latency_median_ms"])
            & (timed["latency_median_ms"] <= timed["latency_q75_ms"])).all()
    q25 = float(timed.set_index("config").loc["ilp0", "latency_q25_ms"])
    for limit in (1.26, q25 / 2, q25 * 2):
        out = against_budget(timed, predicted={"ilp0": 1.22}, limits={"ilp0": limit}).set_index("config")
        assert np.isnan(out.loc["uniform8", "predicted_ms"]) and out.loc["ilp0", "predicted_ms"] == 1.22
        assert np.isnan(out.loc["uniform8", "latency_limit_ms"]) and out.loc["ilp0", "latency_limit_ms"] == limit
        assert out["over_budget"].tolist() == [False, q25 > limit]
    assert against_budget(timed, limits={"ilp0": q25 / 2})["over_budget"].tolist() == [False, True]


# ------------------------------------------------------------------------------------------------ defaults, names
def test_run_yaml_block_is_the_defaults():
    from hawq_ray.service.pipeline import DEFAULT_CONFIG
    block = re.search(r"```yaml\n(# run\.yaml: every key is optional; these are the defaults\n.*?)```", README,
                      flags=re.S)
    assert block, "README: the run.yaml defaults block moved"
    assert yaml.safe_load(block.group(1)) == DEFAULT_CONFIG


def _resolve(name: str):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


@pytest.mark.parametrize("name", sorted(set(re.findall(r"`((?:hawq_ray|actors|solver)\.[A-Za-z_.]*[A-Za-z_])",
                                                         README))))
def test_cited_names_exist(name):
    assert _resolve(name) is not None
