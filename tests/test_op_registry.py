"""One entry per op: a toy op added here, in this file alone, runs through every stage.

The toy is `torch.abs` of a quantized value (integer |q|, same scale): a graph node kind (how fx calls
become it, its QAT step) and a program op (executor semantics, range rule, and its TVM step fused at a
kernel's output tile). Registered, a model using it traces, simulates, lowers, runs in the integer executor
and compiles, bit-exact; nothing outside this file changes. The registry's entries are also checked to
document themselves and to cover the op kinds the random programs build.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from hawq_ray.deploy import compile_program
from hawq_ray.ops import GRAPH_NODES, PROGRAM_OPS, GraphNode, ProgramOp, register_ops, unregister_ops
from hawq_ray.program.executor import run_program
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


TOY = (GraphNode("abs", _abs_step, functions=(torch.abs,), methods=("abs",),
                 convert=lambda tracer, n, m: tracer.node(n, "abs", [n.args[0]]), nonneg=lambda ins: True,
                 supported="abs"),
       ProgramOp("abs", "inputs [x]; out = |x|.", lambda op, ins: ins[0].abs(),
                 lambda op, r: (0 if r[0][0] <= 0 <= r[0][1] else min(abs(r[0][0]), abs(r[0][1])),
                                max(abs(r[0][0]), abs(r[0][1]))), tile=_abs_tile,
                 channelwise=lambda op: False))


@pytest.fixture
def toy_op():
    register_ops(*TOY)
    yield
    unregister_ops("abs")


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
def test_a_registered_toy_op_runs_through_every_stage(toy_op, bits):
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


def test_an_unregistered_op_is_refused_with_the_supported_list():
    from hawq_ray.contract import HawqError
    with pytest.raises(HawqError, match=r"function 'abs'.*supported: .*ReLU"):
        prepare(AbsNet().eval(), "uniform8", (3, 10, 10))


def test_every_entry_states_its_semantics_and_the_random_programs_build_every_program_op():
    assert set(RANDOM_OPS) == set(PROGRAM_OPS)
    for name, op in PROGRAM_OPS.items():
        assert op.semantics.startswith("inputs ["), name
        assert (op.kernel is None) != (op.tile is None), name        # an anchor of a kernel, or a tile step
    for kind, node in GRAPH_NODES.items():
        assert node.supported and node.convert is not None and (node.modules or node.functions or node.methods)
