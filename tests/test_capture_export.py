"""The second way in (`hawq_ray.quant.capture`): a model torch.fx cannot trace symbolically is captured by
torch.export and converted through the same op registry. QAT simulation == integer executor == TVM module on
a model whose forward branches on a shape; a model both can capture gives the same layer table and the same
integer program either way; control flow on values is one line naming the model's line; `hawq-ray layers`
says which capture it took.
"""
from __future__ import annotations

import copy
import inspect
import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hawq_ray.analysis.verify import check_compiled
from hawq_ray.contract import HawqError
from hawq_ray.contract.bits import parse_bits
from hawq_ray.program.executor import run_program
from hawq_ray.quant.graph import trace_graph
from hawq_ray.quant.layers import layer_table
from hawq_ray.quant.qat import QuantModel
from hawq_ray.service.cli import main

SHAPE = (3, 16, 16)


class Residual(nn.Module):
    """conv-BN-ReLU, a pooled residual block with a hardswish, a channel shuffle, a channel concat, a nearest upsampling and a
    view to a Linear: what a CNN is made of. `branch`: whether forward decides by a shape (fx cannot trace it)."""

    def __init__(self, branch: bool = True):
        super().__init__()
        self.branch, self.input_shape = branch, SHAPE
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.Hardswish(),
                                  nn.Conv2d(8, 8, 1))
        self.side = nn.Conv2d(8, 4, 1)
        self.head, self.fc = nn.Conv2d(12, 16, 3, stride=2, padding=1), nn.Linear(16, 10)
        with torch.no_grad():          # BN statistics away from the identity, so the fold is not trivial
            for bn in (self.bn, self.body[1]):
                bn.running_mean.normal_(0, 0.5)
                bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        y = F.relu(self.bn(self.stem(x)))
        if not self.branch or y.shape[-1] > 8:          # a shape decides: symbolic tracing raises here
            y = F.max_pool2d(y, 2)
        y += self.body(y)               # in place, as torchvision's residuals add
        n, c, h, w = y.size()           # a channel shuffle: view, transpose, a copy, view
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        side = F.interpolate(F.avg_pool2d(self.side(y), 2), scale_factor=2, mode="nearest")
        y = torch.relu(self.head(torch.cat([y, side], 1)))
        y = y.mean((2, 3))
        return self.fc(y.view(y.size(0), -1))


class TwiceCalled(nn.Module):
    """One activation module called twice in a row: two nodes, not one call of the module."""

    def __init__(self):
        super().__init__()
        self.conv, self.act, self.fc = nn.Conv2d(3, 4, 3), nn.Hardswish(), nn.Linear(4, 2)

    def forward(self, x):
        y = self.act(self.act(self.conv(x)))
        if y.shape[1] == 4:
            y = y.mean((2, 3))
        return self.fc(y)


class ValueBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            y = y * 2
        return y


def quant_model(model, bits, capture="auto", seed=0):
    """`model` quantized at `bits` through the given capture and calibrated on two seeded batches."""
    model = copy.deepcopy(model).eval()
    graph = trace_graph(model, SHAPE, capture=capture)
    table = layer_table(model, SHAPE, graph)
    if bits == "mixed":
        bits = {layer: int(fixed) if not pd.isna(fixed) else 4 if i % 2 else 8     # the first and last layer
                for i, (layer, fixed) in enumerate(zip(table["layer"], table["fixed_bits"]))}   # stay at 8
    qm = QuantModel(model, dict(parse_bits(bits, table)), SHAPE, graph=graph).eval()
    torch.manual_seed(seed)
    return qm.calibrate([torch.randn(4, *SHAPE) for _ in range(2)]), graph, table


def test_a_shape_branch_is_captured_through_export_and_names_layers_by_module_path():
    graph = trace_graph(Residual(), SHAPE)
    assert graph.capture.startswith("torch.export (symbolic tracing failed: symbolically traced variables")
    assert [n.layer for n in graph.layer_nodes()] == ["stem", "body.0", "body.3", "side", "head", "fc"]
    assert {n.layer: n.bn_name for n in graph.layer_nodes() if n.bn is not None} == {"stem": "bn", "body.0": "body.1"}
    assert trace_graph(Residual(branch=False), SHAPE).capture == "torch.fx"


def test_a_module_called_twice_is_two_calls():
    graph = trace_graph(TwiceCalled(), (3, 8, 8))
    assert graph.capture.startswith("torch.export")
    assert [(n.kind, n.attrs.get("fn")) for n in graph.nodes if n.kind == "activation"] == [("activation", "hardswish")] * 2


@pytest.mark.parametrize("bits", ["uniform4", "uniform8", "mixed"])
def test_exported_model_simulation_equals_executor_equals_tvm(bits):
    qm, graph, _ = quant_model(Residual(), bits)
    assert graph.capture.startswith("torch.export")
    program = qm.to_integer()
    x = torch.randn(8, *SHAPE)
    with torch.no_grad():
        sim = qm.set_mode("qat").run(x)[0].q
    q_x = program.quantize_input(x)
    want = run_program(program, q_x)
    assert torch.equal(sim, want), f"{int((sim != want).sum())} of {want.numel()} output elements differ"
    assert len(torch.unique(want)) > 10          # not a constant output
    assert {"conv2d", "dense", "max_pool2d", "lookup", "add", "channel_shuffle", "resize"} <= {op.op for op in program.ops}
    summary, _ = check_compiled(program, q_x, "llvm")
    assert summary["tvm_differing"] == 0, summary["tvm_first_divergence"]
    assert summary["tvm_values"] > 5


def test_both_captures_give_the_same_table_and_integer_program():
    model = Residual(branch=False)
    by_fx, fx_graph, fx_table = quant_model(model, "mixed", capture="fx")
    by_export, export_graph, export_table = quant_model(model, "mixed", capture="export")
    assert (fx_graph.capture, export_graph.capture) == ("torch.fx", "torch.export")
    pd.testing.assert_frame_equal(fx_table, export_table)
    assert [(n.name, n.kind, n.inputs) for n in fx_graph.nodes] == [(n.name, n.kind, n.inputs) for n in export_graph.nodes]
    assert by_fx.to_integer().fingerprint() == by_export.to_integer().fingerprint()


def test_the_sensitivity_stage_folds_an_export_captured_model_at_the_runs_shape():
    """A model only torch.export captures, with no `in_size` to tell its input shape (a user's model): the
    weight perturbations of eq. 8 fold its BNs from the graph captured at the shape the run gives (before, the
    sensitivity stage of `hawq-ray run` stopped there), and equal those of the same weights traced by torch.fx."""
    from hawq_ray.analysis.sensitivity import weight_deltas
    exported, traced = Residual(branch=True), Residual(branch=False)
    traced.load_state_dict(exported.state_dict())
    with pytest.raises(HawqError, match="cannot tell the input shape"):
        weight_deltas(exported)
    got = weight_deltas(exported, input_shape=SHAPE)
    assert list(got["layer"]) == ["stem", "body.0", "body.3", "side", "head", "fc"]
    assert (got[["delta4", "delta8"]].to_numpy() > 0).all()
    pd.testing.assert_frame_equal(got, weight_deltas(traced, input_shape=SHAPE))


def test_control_flow_on_values_is_one_line_naming_the_model_line():
    line = next(i for i, text in enumerate(inspect.getsource(ValueBranch).splitlines())
                if "if y.sum() > 0" in text) + inspect.getsourcelines(ValueBranch)[1]
    with pytest.raises(HawqError) as e:
        trace_graph(ValueBranch(), (3, 8, 8))
    message = str(e.value)
    assert "\n" not in message
    assert "control flow on tensor values" in message and "ValueBranch" in message
    assert f"test_capture_export.py:{line} in forward: if y.sum() > 0:" in message


class Chatty(TwiceCalled):
    """A forward that prints: what a model prints while it is exported reaches the user."""

    def forward(self, x):
        print("chatty forward", x.shape[1])
        return super().forward(x)


def test_what_a_model_prints_during_a_successful_export_is_kept(capsys):
    graph = trace_graph(Chatty(), (3, 8, 8), capture="export")
    assert [n.layer for n in graph.layer_nodes()] == ["conv", "fc"]
    assert "chatty forward 3" in capsys.readouterr().out


def test_layers_command_names_the_capture(capsys):
    assert main(["layers", "--model", "test_capture_export:Residual"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("capture: torch.export (symbolic tracing failed: ")
    assert main(["layers", "--model", "test_capture_export:Residual", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert obj["capture"].startswith("torch.export") and obj["layers"][0]["layer"] == "stem"
