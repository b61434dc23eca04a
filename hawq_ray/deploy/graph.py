"""IntegerProgram -> one Relax module that calls one kernel per layer.

Step 0: exact rewrites (`program.rewrites`) -- equal requantizes of one value merged, a max pool moved after
its requantizes so it runs on narrow values (unless it joins a conv's kernel, below) -- and value ranges
derived by interval arithmetic so values are stored as narrow as they are (`program.ranges`).
Step 1 (`plan_groups`): cut the op list into kernels. A kernel starts at an anchor op (conv2d, dense, pooling,
concat, flatten, or an elementwise op nobody absorbed) and absorbs the elementwise ops that follow while the
value between them has a single consumer. A kernel is emitted where its last op stood, so the other operand
of a fused residual `add` (after a conv or a dense layer) is already computed. When every reader of a conv or
dense chain's end is a requantize (a residual block's output feeding the next conv and the next identity
branch; a transformer block's sum feeding the next LayerNorm and the next residual branch), those requantizes
become extra outputs of the kernel and the INT32 value is never stored (not for grouped convs: their kernel
writes one output). A layout op (reshape, permute, roll, take, pad, crop) that only layout ops read is a view:
never stored, its readers compose its index map (a pad's zeros included). A constant reads nothing (its input
only gives the batch). A max pool (stride >= 2) that alone reads a conv chain's end joins the conv's kernel
(`conv_pool.py`), with the elementwise ops or requantize fan-out after it: the stem's 112x112 map is pooled in
cache and never stored.
Step 2 (`plan_kernels`): build each group's kernel in emission order -- its anchor op's entry in
`lowering.KERNELS` (`kernels.py`, `conv_pool.py`, `glue.py`), or a standalone elementwise chain -- tracking
the storage of every value. The image enters as NCHW int8 and is blocked once; rank-4
outputs are unblocked once.
Step 3 (`build_relax`): a BlockBuilder emits `call_tir` for each kernel; constants become parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tvm import relax

from hawq_ray.contract import HawqError
from hawq_ray.deploy import glue, layout
from hawq_ray.deploy.conv_pool import fusable_max_pool
from hawq_ray.deploy.epilogue import Value, storage_dtype
from hawq_ray.deploy.kernels import Kernel, kernel_name
from hawq_ray.deploy.lowering import KERNELS, READS_BLOCKED, READS_PLAIN
from hawq_ray.ops import PROGRAM_OPS, check_ops, elementwise
from hawq_ray.program.program import IntegerProgram, Op
from hawq_ray.program.ranges import narrow_ranges
from hawq_ray.program.rewrites import channelwise, merge_equal_requantizes, readers_of, requantize_before_max_pool


@dataclass
class Group:
    anchor: Op
    steps: list          # elementwise ops absorbed after the anchor, in order
    args: list           # names of the values the kernel reads: anchor inputs, then other operands of adds
    outputs: list        # names of the values the kernel writes
    last: int            # index of the group's last op in the program
    fanout: list = field(default_factory=list)   # requantize ops that each read the chain's end (one output each)
    pool: Op | None = None   # a max_pool2d fused after a conv's steps (`conv_pool.py`)
    post: list = field(default_factory=list)     # elementwise ops absorbed after that pool
    batch: int | None = None     # a constant's repeat count, its input's axis 0 (`plan_kernels` sets it)
    views: list = field(default_factory=list)   # layout ops between args[0] and a layout anchor, never stored


@dataclass
class Call:
    kernel: Kernel
    args: list           # value names
    outputs: list        # value names, one per kernel output


def _fuses_after_conv(ops: list, pool: Op, readers: dict) -> bool:
    """Whether `pool` alone reads the end of a conv's chain of channelwise relu/requantize ops (each value
    read once), so that `plan_groups` fuses it into the conv's kernel and `requantize_before_max_pool`
    leaves it in place (then the INT32 map is never stored, narrow or not)."""
    if not fusable_max_pool(pool):
        return False
    producer = {op.output: op for op in ops}
    name = pool.inputs[0]
    while len(readers.get(name, [])) == 1 and name in producer:
        op = producer[name]
        if op.op == "conv2d":
            return op.attrs.get("groups", 1) == 1
        if not channelwise(op):
            return False
        name = op.inputs[0]
    return False


def conv_pools(ops: list):
    """The test of a max pool of `ops` joining the kernel of the conv before it (`plan_groups`): the pools
    `requantize_before_max_pool` must leave where they are."""
    readers = readers_of(ops)
    return lambda pool: _fuses_after_conv(ops, pool, readers)


def planned_ops(program: IntegerProgram) -> list:
    """The op list the kernels are planned from: equal requantizes merged, max pools moved after their
    requantizes where that pays, ranges narrowed. `plan_groups(program, planned_ops(program))` gives the groups
    `plan_kernels` builds."""
    check_ops(program.ops)
    ops = merge_equal_requantizes(program.ops, program.output)
    narrow = {op.output for op in narrow_ranges(program, ops) if storage_dtype(op.lo, op.hi) != "int32"}
    return narrow_ranges(program, requantize_before_max_pool(ops, program.output, narrow, conv_pools(ops)))


def plan_groups(program: IntegerProgram, ops: list | None = None) -> list[Group]:
    ops = program.ops if ops is None else ops
    # a constant reads its input for the batch size only: it is no reader of the value (which may then stay
    # inside the kernel that computes it) and its kernel reads nothing
    readers = {name: [i for i in idx if ops[i].op != "constant"] for name, idx in readers_of(ops).items()}
    readers = {name: idx for name, idx in readers.items() if idx}
    uses = {name: len(r) for name, r in readers.items()}
    uses[program.output] = uses.get(program.output, 0) + 1     # the caller reads it too
    # a layout op that only layout ops read is a view: never stored, each reader composes its index map (a
    # ViT's qkv split: reshape -> permute -> take -> permute is one kernel per q, k^T, v)
    views = {op.output: op for i, op in enumerate(ops) if op.op in LAYOUT_OPS and op.output != program.output
             and readers.get(op.output) and all(ops[j].op in LAYOUT_OPS for j in readers[op.output])}
    absorbed, groups = set(), []
    for i, op in enumerate(ops):
        if i in absorbed or op.output in views:
            continue
        args = list(op.inputs) if op.op != "constant" else []
        through = []
        while op.op in LAYOUT_OPS and args[0] in views:       # read through the views: from what is stored
            through.insert(0, views[args[0]])
            args[0] = views[args[0]].inputs[0]
        steps = [op] if elementwise(op.op) else []
        if elementwise(op.op):   # a standalone chain reads its first operand, then binary steps' second ones
            args = [op.inputs[0]]
            if PROGRAM_OPS[op.op].binary:
                args.append(op.inputs[1])
        cur, last = op.output, i

        def absorb(chain: list, allow_add: bool):
            nonlocal cur, last
            while uses.get(cur) == 1 and cur in readers and readers[cur][0] > last:
                j = readers[cur][0]
                nxt = ops[j]
                entry = PROGRAM_OPS.get(nxt.op)
                binary = elementwise(nxt.op) and entry.binary
                if not elementwise(nxt.op) or j in absorbed or (binary and not allow_add and not entry.broadcast):
                    break    # a residual add rides with a conv (the big kernel), not with a pool or a requantize
                if binary and entry.broadcast and nxt.inputs[0] != cur:
                    break    # the chain computes the small operand: the product has the other one's shape
                if binary:
                    a, b = nxt.inputs
                    args.append(b if a == cur else a)
                chain.append(nxt)
                absorbed.add(j)
                cur, last = nxt.output, j
        absorb(steps, op.op in LAYERS)
        pool, post = None, []
        j = readers.get(cur, [None])[0]
        if op.op == "conv2d" and j is not None and j > last and ops[j].op == "max_pool2d" \
                and cur != program.output and _fuses_after_conv(ops, ops[j], readers):
            pool = ops[j]      # conv -> steps -> max pool in one kernel: the conv's map is never stored
            absorbed.add(j)
            cur, last = pool.output, j
            absorb(post, False)
        anchor_steps = steps[1:] if elementwise(op.op) else steps
        fan = readers.get(cur, [])
        if op.op in LAYERS and op.attrs.get("groups", 1) == 1 and cur != program.output and len(fan) > 1 and \
                all(ops[j].op == "requantize" and j not in absorbed and ops[j].inputs == [cur]
                    for j in fan):
            absorbed.update(fan)     # the chain's end is never stored: each reader is an output of the kernel
            groups.append(Group(op, anchor_steps, args, [ops[j].output for j in fan], last,
                                [ops[j] for j in fan], pool, post))
            continue
        groups.append(Group(op, anchor_steps, args, [cur], last, [], pool, post, views=through))
    return sorted(groups, key=lambda g: g.last)


def group_kernel(group: Group, values: dict, target) -> Kernel:
    """The kernel of a group: its anchor op's entry in `lowering.KERNELS`, or a standalone elementwise chain."""
    op = group.anchor
    ins = [values[a] for a in group.args]
    name = kernel_name(op)
    if elementwise(op.op):
        return glue.elementwise_kernel([op, *group.steps], ins, target, name)
    if op.op not in KERNELS:
        raise HawqError(f"{op.output}: op {op.op!r} has no TVM kernel")
    return KERNELS[op.op](group, ins, target, name)


def plan_kernels(program: IntegerProgram, batch: int, target) -> list[Call]:
    """Every kernel call of the model in execution order (the input layout change first)."""
    raw = Value((batch, *program.input_shape), "int8", None)
    calls = []
    values = {}
    if len(raw.shape) == 4:
        edge = glue.input_kernel(raw, layout.channel_block(raw.shape[1]), target)
        calls.append(Call(edge, [program.input_name], [program.input_name + "@blocked"]))
        values[program.input_name] = edge.output
    else:
        values[program.input_name] = raw
    rename = {program.input_name: calls[0].outputs[0] if calls else program.input_name}
    converted = {}
    ops = planned_ops(program)
    producers = {op.output: op for op in ops}
    for group in plan_groups(program, ops):
        missing = [a for a in group.args if a not in values]
        if missing:
            raise HawqError(f"{group.anchor.output}: input {missing[0]!r} is not computed before it")
        if group.anchor.op == "constant":
            group.batch = leading_size(group.anchor.inputs[0], producers, values, program.input_name, batch)
        group.args = [_stored_as(group.anchor, k, a, values, converted, calls, rename, target)
                      for k, a in enumerate(group.args)]
        kernel = group_kernel(group, values, target)
        values.update(zip(group.outputs, kernel.outputs))
        calls.append(Call(kernel, [rename.get(a, a) for a in group.args], list(group.outputs)))
    if program.output not in values:
        raise HawqError(f"program output {program.output!r} is never computed")
    out = values[program.output]
    if out.block:
        edge = glue.output_kernel(out, target)
        calls.append(Call(edge, [program.output], [program.output + "@nchw"]))
    return calls


LAYOUT_OPS = ("reshape", "permute", "roll", "take", "pad", "crop")     # `transformer.layout_kernel`'s
LAYERS = ("conv2d", "dense")    # anchors a residual add rides with, and whose chain's end may fan out


def leading_size(name: str, producers: dict, values: dict, input_name: str, batch: int) -> int:
    """The size of axis 0 of value `name` (what a constant reading it repeats its value to): the batch, unless a
    reshape, permute or take moved another axis first (a roll, a pad or a crop keeps the axes). Their inputs are
    stored, or views of stored values, so their output shape follows; every other op keeps its first input's axis
    0 (the leading axes of a dense or a matmul, the axis a concat, a layer norm or a softmax leaves alone)."""
    from hawq_ray.deploy.transformer import composed_map
    while name != input_name:
        op = producers.get(name)
        if op is None or not op.inputs:
            return batch
        if op.op in LAYOUT_OPS:
            chain = [op]
            while chain[0].inputs[0] not in values:     # a view: its input's shape from what is stored
                chain.insert(0, producers[chain[0].inputs[0]])
            return int(composed_map(chain, values[chain[0].inputs[0]])[0][0])
        name = op.inputs[0]
    return batch


def _stored_as(anchor: Op, k: int, name: str, values: dict, converted: dict, calls: list, rename: dict,
               target) -> str:
    """The name of arg `k` of the anchor's kernel in the storage that kernel reads: a plain rank-4 value for a
    kernel of blocks (`lowering.READS_BLOCKED`) or a blocked one for a kernel of plain values (`READS_PLAIN`)
    goes through a layout change first (one per value and direction, shared by its readers)."""
    from hawq_ray.deploy.transformer import to_blocked_kernel, to_plain_kernel
    v = values[name]
    if elementwise(anchor.op) or k >= len(anchor.inputs):
        return name          # elementwise steps and second operands read either storage
    if anchor.op in READS_BLOCKED and len(v.shape) == 4 and not v.block:
        make, suffix = to_blocked_kernel, "@blocked"
    elif anchor.op in READS_PLAIN and v.block:
        make, suffix = to_plain_kernel, "@plain"
    else:
        return name
    key = name + suffix
    if key not in converted:
        kernel = make(v, target, "layout_" + "".join(ch if ch.isalnum() else "_" for ch in key))
        calls.append(Call(kernel, [rename.get(name, name)], [key]))
        values[key] = kernel.output
        converted[key] = key
    return key


def final_output(program: IntegerProgram, calls: list[Call]) -> tuple:
    """(value name, Value) of the model's output as the graph returns it."""
    for c in reversed(calls):
        for name, v in zip(c.outputs, c.kernel.outputs):
            if name in (program.output, program.output + "@nchw"):
                return name, v
    raise HawqError(f"program output {program.output!r} is never computed")


def stored_values(calls: list[Call]) -> list:
    """(value name, Value, Call) of every value a kernel of the program stores, in execution order (the
    layout changes at the model's edges aside: they copy the image and the output)."""
    return [(name, v, c) for c in calls if c.kernel.notes.get("path") != "layout"
            for name, v in zip(c.outputs, c.kernel.outputs)]


def build_relax(program: IntegerProgram, calls: list[Call], batch: int, every_value: bool = False):
    """Relax IRModule `main(x, *params)` and the list of (param name, numpy array). `main` returns the model's
    output; with `every_value`, the tuple (output, *every stored value) in `stored_values` order, so a
    fault can be located at the first kernel whose output differs."""
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
                types = [relax.TensorType(o.storage_shape, o.dtype) for o in c.kernel.outputs]
                res = bb.emit(relax.call_tir(gv, [env[a] for a in c.args] + consts,
                                             types[0] if len(types) == 1 else types))
                if len(types) == 1:
                    env[c.outputs[0]] = res
                else:
                    for k, name in enumerate(c.outputs):
                        env[name] = bb.emit(relax.TupleGetItem(res, k))
            result = env[final_output(program, calls)[0]]
            if every_value:
                result = relax.Tuple([result, *(env[name] for name, _, _ in stored_values(calls))])
            result = bb.emit_output(result)
        bb.emit_func_output(result)
    return bb.get(), params
