"""IntegerProgram -> one Relax module that calls one kernel per layer.

Step 1 (`plan_groups`): cut the op list into kernels. A kernel starts at an anchor op (conv2d, dense, pooling,
concat, flatten, or an elementwise op nobody absorbed) and absorbs the elementwise ops that follow while the
value between them has a single consumer. A kernel is emitted where its last op stood, so the other operand
of a fused residual `add` is already computed.
Step 2 (`plan_kernels`): build each group's kernel (`kernels.py`, `glue.py`) in emission order, tracking the
storage of every value. The image enters as NCHW int8 and is blocked once; rank-4 outputs are unblocked once.
Step 3 (`build_relax`): a BlockBuilder emits `call_tir` for each kernel; constants become parameters.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from tvm import relax

from hawq_ray.deploy import glue, layout
from hawq_ray.deploy.epilogue import ELEMENTWISE, Value
from hawq_ray.deploy.kernels import Kernel, conv2d_kernel, dense_kernel
from hawq_ray.errors import HawqError
from hawq_ray.quant.program import IntegerProgram, Op


@dataclass
class Group:
    anchor: Op
    steps: list          # elementwise ops absorbed after the anchor, in order
    args: list           # names of the values the kernel reads: anchor inputs, then other operands of adds
    output: str
    last: int            # index of the group's last op in the program


@dataclass
class Call:
    kernel: Kernel
    args: list           # value names
    output: str


def plan_groups(program: IntegerProgram) -> list[Group]:
    ops = program.ops
    uses: dict[str, int] = {}
    consumer: dict[str, int] = {}
    for i, op in enumerate(ops):
        for name in op.inputs:
            uses[name] = uses.get(name, 0) + 1
            consumer[name] = i
    uses[program.output] = uses.get(program.output, 0) + 1
    absorbed, groups = set(), []
    for i, op in enumerate(ops):
        if i in absorbed:
            continue
        args = list(op.inputs)
        steps = [op] if op.op in ELEMENTWISE else []
        anchor = op
        if op.op in ELEMENTWISE:   # a standalone chain reads its first operand, then the adds' other ones
            args = [op.inputs[0]]
            if op.op == "add":
                args.append(op.inputs[1])
        cur, last = op.output, i
        while uses.get(cur) == 1 and consumer.get(cur, -1) > last:
            j = consumer[cur]
            nxt = ops[j]
            if nxt.op not in ELEMENTWISE or j in absorbed:
                break
            if nxt.op == "add":
                a, b = nxt.inputs
                args.append(b if a == cur else a)
            steps.append(nxt)
            absorbed.add(j)
            cur, last = nxt.output, j
        anchor_steps = steps[1:] if op.op in ELEMENTWISE else steps
        groups.append(Group(anchor, anchor_steps, args, cur, last))
    return sorted(groups, key=lambda g: g.last)


def _kernel_name(op: Op) -> str:
    base = op.layer or op.output
    return f"{op.op}_" + "".join(ch if ch.isalnum() else "_" for ch in str(base))


def group_kernel(group: Group, values: dict, target) -> Kernel:
    op, steps = group.anchor, group.steps
    ins = [values[a] for a in group.args]
    name = _kernel_name(op)
    if op.op == "conv2d":
        return conv2d_kernel(op, ins[0], steps, ins[1:], target, name)
    if op.op == "dense":
        return dense_kernel(op, ins[0], steps, ins[1:], target, name)
    if op.op in ("sum_pool2d", "max_pool2d"):
        return glue.pool_kernel(op, ins[0], steps, ins[1:], target, name)
    if op.op == "concat":
        k = len(op.inputs)
        return glue.concat_kernel(op, ins[:k], steps, ins[k:], target, name)
    if op.op == "flatten":
        return glue.flatten_kernel(op, ins[0], steps, ins[1:], target, name)
    if op.op in ELEMENTWISE:
        return glue.elementwise_kernel([op, *steps], ins, target, name)
    raise HawqError(f"{op.output}: op {op.op!r} has no TVM kernel")


def plan_kernels(program: IntegerProgram, batch: int, target) -> list[Call]:
    """Every kernel call of the model in execution order (the input layout change first)."""
    raw = Value((batch, *program.input_shape), "int8", None)
    calls = []
    values = {}
    if len(raw.shape) == 4:
        edge = glue.input_kernel(raw, layout.channel_block(raw.shape[1]), target)
        calls.append(Call(edge, [program.input_name], program.input_name + "@blocked"))
        values[program.input_name] = edge.output
    else:
        values[program.input_name] = raw
    rename = {program.input_name: calls[0].output if calls else program.input_name}
    for group in plan_groups(program):
        missing = [a for a in group.args if a not in values]
        if missing:
            raise HawqError(f"{group.anchor.output}: input {missing[0]!r} is not computed before it")
        kernel = group_kernel(group, values, target)
        values[group.output] = kernel.output
        calls.append(Call(kernel, [rename.get(a, a) for a in group.args], group.output))
    if program.output not in values:
        raise HawqError(f"program output {program.output!r} is never computed")
    out = values[program.output]
    if out.block:
        edge = glue.output_kernel(out, target)
        calls.append(Call(edge, [program.output], program.output + "@nchw"))
    return calls


def output_value(calls: list[Call]) -> Value:
    return calls[-1].kernel.output


def build_relax(program: IntegerProgram, calls: list[Call], batch: int):
    """Relax IRModule `main(x, *params)` and the list of (param name, numpy array)."""
    bb = relax.BlockBuilder()
    x = relax.Var(program.input_name, relax.TensorType((batch, *program.input_shape), "int8"))
    params, pvars = [], []
    for c in calls:
        for k, arr in enumerate(c.kernel.consts):
            name = f"{c.kernel.name}.{k}"
            params.append((name, np.ascontiguousarray(arr)))
            pvars.append(relax.Var(name, relax.TensorType(arr.shape, str(arr.dtype))))
    with bb.function("main", [x, *pvars]):
        with bb.dataflow():
            env = {program.input_name: x}
            p = 0
            for c in calls:
                gv = bb.add_func(c.kernel.func.without_attr("global_symbol"), c.kernel.name)
                consts = pvars[p:p + len(c.kernel.consts)]
                p += len(c.kernel.consts)
                o = c.kernel.output
                env[c.output] = bb.emit(relax.call_tir(gv, [env[a] for a in c.args] + consts,
                                                       relax.TensorType(o.storage_shape, o.dtype)))
            result = bb.emit_output(env[calls[-1].output])
        bb.emit_func_output(result)
    return bb.get(), params
