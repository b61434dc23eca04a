"""One entry per op: a toy op added here, in this file alone, runs through every stage.

The toy is `torch.abs` of a quantized value (integer |q|, same scale): a graph node kind (how fx calls
become it, its QAT step), a program op (executor semantics, range rule, elementwise), and one entry in each
back end's table: its TVM step fused at a kernel's output tile (`deploy.tiles.TILES`) and its ONNX node
(`onnx.converters.CONVERTERS`). Registered, a model using it traces, simulates, lowers, runs in the integer
executor, compiles and exports, bit-exact; nothing outside this file changes. The registry's entries are also
checked to document themselves, to cover the op kinds the random programs build, and to have an entry in
every back end's table (and the tables none for an op the registry does not know); a program naming an
unknown op is refused by whatever consumes it.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hawq_ray.deploy import compile_program
from hawq_ray.deploy.lowering import KERNELS
from hawq_ray.deploy.tiles import TILES
from hawq_ray.onnx.converters import CONVERTERS
from hawq_ray.onnx.export import check_values, export_onnx
from hawq_ray.ops import GRAPH_NODES, PROGRAM_OPS, GraphNode, ProgramOp, register_ops, unregister_ops
from hawq_ray.program.executor import run_program
from hawq_ray.program.program import IntegerProgram, Op
from hawq_ray.program.random import OPS as RANDOM_OPS
from hawq_ray.quant.qat import prepare
from hawq_ray.quant.values import V, np_scale


def _abs_step(qm, node, ins):
    v = ins[0]
    q = v.q.abs() if v.q is not None else None
    name = qm.emit("abs", [v.name], node.name, scale=np_scale(v.s), lo=0, hi=max(abs(v.lo), abs(v.hi)))
    r = v.r.abs() if q is None else qm.lazy(v, torch.abs)
    return V(q, v.s, r, name, 0, max(abs(v.lo), abs(v.hi)))


def _abs_tile(ctx, op, k):
    import tvm
    return lambda z, idx: tvm.te.abs(z)


def _abs_onnx(g, op):
    x = g.value(op.inputs[0])
    g.bind(op, g.node("Abs", [x.name], op.output), x.scale)


TOY = (GraphNode("abs", _abs_step, functions=(torch.abs,), methods=("abs",),
                 convert=lambda tracer, n, m: tracer.node(n, "abs", [n.args[0]]), nonneg=lambda ins: True,
                 supported="abs"),
       ProgramOp("abs", "inputs [x]; out = |x|.", lambda op, ins: ins[0].abs(),
                 lambda op, r: (0 if r[0][0] <= 0 <= r[0][1] else min(abs(r[0][0]), abs(r[0][1])),
                                max(abs(r[0][0]), abs(r[0][1]))), elementwise=True,
                 channelwise=lambda op: False))


@pytest.fixture
def toy_op():
    register_ops(*TOY)
    TILES["abs"], CONVERTERS["abs"] = _abs_tile, _abs_onnx      # its entry in each back end's table
    yield
    unregister_ops("abs")
    del TILES["abs"], CONVERTERS["abs"]


class AbsNet(nn.Module):
    """conv -> |.| -> conv -> |.| (the residual sum of the two) -> pool -> fc: the toy after a conv (fused in
    its tile) and on an add's output."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        a = torch.abs(self.c1(x))
        b = (self.c2(a) + a).abs()
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(b, 1), 1))


@pytest.mark.parametrize("bits", ["uniform8", "uniform4"])
def test_a_registered_toy_op_runs_through_every_stage(toy_op, bits, tmp_path):
    torch.manual_seed(0)
    shape = (3, 10, 10)
    qm = prepare(AbsNet().eval(), bits, shape).calibrate([torch.randn(4, *shape)])
    prog = qm.to_integer()
    assert [op.op for op in prog.ops].count("abs") == 2
    x = torch.randn(4, *shape)
    q = prog.quantize_input(x)
    with torch.no_grad():
        sim = qm.run(x)[0].q
    out = run_program(prog, q)
    assert torch.equal(sim, out) and int(out.abs().max()) > 0
    model = compile_program(prog, batch=4)
    assert not any(k["name"].startswith("abs_") for k in model.manifest["kernels"])   # fused at conv tiles
    assert np.array_equal(model(q.numpy()), out.numpy())
    export_onnx(prog, tmp_path / "abs.onnx", every_value=True)
    rows = check_values(tmp_path / "abs.onnx", prog, x)
    assert {r["op"] for r in rows} >= {"abs"} and not any(r["differing"] for r in rows)


def test_an_unregistered_op_is_refused_with_the_supported_list():
    from hawq_ray.contract import HawqError
    with pytest.raises(HawqError, match=r"function 'abs'.*supported: .*ReLU"):
        prepare(AbsNet().eval(), "uniform8", (3, 10, 10))


def test_every_entry_states_its_semantics_and_the_random_programs_build_every_program_op():
    assert set(RANDOM_OPS) == set(PROGRAM_OPS)
    for name, op in PROGRAM_OPS.items():
        assert op.semantics.startswith("inputs ["), name
    for kind, node in GRAPH_NODES.items():
        assert node.supported and node.convert is not None and (node.modules or node.functions or node.methods)


def back_end_gaps(ops: dict, kernels: dict, tiles: dict, converters: dict) -> list:
    """What the back ends' tables lack or have too many: each registered op needs a TVM kernel (an anchor) or,
    if elementwise, a TVM tile step, and an ONNX converter; no table names an op the registry does not know."""
    gaps = [f"{name}: no TVM {'tile' if op.elementwise else 'kernel'}" for name, op in ops.items()
            if name not in (tiles if op.elementwise else kernels)]
    gaps += [f"{name}: no ONNX converter" for name in ops if name not in converters]
    gaps += [f"{name}: elementwise, yet a TVM kernel" for name in kernels if name in ops and ops[name].elementwise]
    gaps += [f"{name}: an anchor, yet a TVM tile" for name in tiles if name in ops and not ops[name].elementwise]
    gaps += [f"{table} names {name!r}, which is not registered" for table, names in
             (("KERNELS", kernels), ("TILES", tiles), ("CONVERTERS", converters)) for name in names if name not in ops]
    return gaps


def test_every_program_op_has_an_entry_in_every_back_end():
    assert back_end_gaps(PROGRAM_OPS, KERNELS, TILES, CONVERTERS) == []


def test_the_completeness_check_reports_a_missing_and_a_stray_entry():
    """A registered op without its entries, and a table naming an op nobody registered, are each reported."""
    ops = PROGRAM_OPS | {"abs": TOY[1]}
    gaps = back_end_gaps(ops, KERNELS | {"bogus": None}, {k: v for k, v in TILES.items() if k != "relu"},
                         CONVERTERS)
    assert set(gaps) == {"abs: no TVM tile", "abs: no ONNX converter", "relu: no TVM tile",
                         "KERNELS names 'bogus', which is not registered"}, gaps


def test_a_program_naming_an_unknown_op_is_refused_where_it_is_run_lowered_or_loaded(tmp_path):
    """The program layer cannot know the registry: the executor, the TVM back end and the ONNX export each
    refuse the unknown op before anything runs, on a built program and on one saved and loaded."""
    w = np.ones((2, 3, 1, 1), np.int8)
    ops = [Op("conv2d", ["x"], "c", dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, w_bits=8,
                                          x_bits=8, x_signed=True), dict(weight=w, bias=np.zeros(2, np.int32))),
           Op("bogus", ["c"], "out")]
    built = IntegerProgram("x", (3, 4, 4), 0.1, ops, "out", np.ones(2))
    built.save(tmp_path / "p")
    for program in (built, IntegerProgram.load(tmp_path / "p")):
        for consume in (lambda: run_program(program, torch.zeros(1, 3, 4, 4, dtype=torch.int8)),
                        lambda: compile_program(program, batch=1),
                        lambda: export_onnx(program, tmp_path / "m.onnx")):
            with pytest.raises(ValueError, match="unknown integer op 'bogus'"):
                consume()
