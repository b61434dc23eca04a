"""The op registry: what each kind of graph node and each op of the integer program is, in one entry apiece.

A `GraphNode` is a kind of node of the traced model (`quant.graph.trace_graph`): the torch.fx calls that
become it (`convert`), the ATen ops that are those calls in a model captured by torch.export (`aten`,
`quant.capture`), and its step in the QAT interpreter (`step`: values in, value out, emitting the
program ops it lowers to). A `ProgramOp` is an op of the IntegerProgram and holds its semantics only: its
exact meaning in the integer executor (`execute`, the reference), the sound integer range of its output
(`value_range`, for storage) and the flags a back end plans with (elementwise, binary, broadcast,
channelwise). How a back end computes an op is that back end's own table, keyed by the op's name: the TVM
back end's `deploy.lowering.KERNELS` (the anchor of a kernel) and `deploy.tiles.TILES` (an elementwise step
fused at a kernel's output tile), the ONNX exporter's `onnx.converters.CONVERTERS`.

The modules of `hawq_ray.ops` each define one op family (a node kind and the program ops it lowers to) and
register it on import; `hawq_ray.ops` imports them all. Adding an op means adding such a module (or, in a
test, calling `register_ops`) and one entry in each back end's table, not editing the interpreter, the
executor, the range analysis or a back end's planning.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class GraphNode:
    kind: str
    step: Callable                    # (QuantModel, GNode, [V]) -> V
    modules: tuple = ()               # nn.Module types this kind converts: convert(tracer, fx_node, module)
    functions: tuple = ()             # callables of call_function nodes: convert(tracer, fx_node, None)
    methods: tuple = ()               # tensor method names of call_method nodes: convert(tracer, fx_node, None)
    convert: Callable | None = None   # (tracer, fx node, module or None) -> GNode, or None to decline
    nonneg: Callable = field(default=lambda inputs_nonneg: False)   # is the output >= 0 by construction?
    observers: Callable = field(default=lambda node, input_name: [])   # activation-range keys the step reads
    layer: bool = False               # a quantizable layer (a row of the layer table)
    supported: str = ""               # how the supported-ops list in errors names it
    aten: dict = field(default_factory=dict)   # ATen overload -> the torch-level call it is (an AtenCall, or
    #                                            its target alone): how a torch.export graph reads (quant.capture)


@dataclass(frozen=True)
class AtenCall:
    """The torch-level call an ATen op of a torch.export graph stands for: a function, or a tensor method's name;
    `args` rewrites (args, kwargs) where the two signatures differ (`view(x, [N, -1])` is `x.view(N, -1)`)."""
    target: Callable | str
    args: Callable | None = None      # (args, kwargs) -> (args, kwargs)


@dataclass(frozen=True)
class ProgramOp:
    name: str
    semantics: str                    # exact semantics, as the docs state them
    execute: Callable                 # (Op, [int tensors]) -> int tensor: the integer executor
    value_range: Callable             # (Op, [(lo, hi)]) -> (lo, hi): a sound range of the output
    elementwise: bool = False         # computed value by value: a back end may fuse it after the op before it
    binary: bool = False              # elementwise with a second operand (stored in the output's layout)
    broadcast: bool = False           # binary whose second operand may be smaller (broadcast over H, W): fused
                                      # only into the chain of its first operand
    channelwise: Callable = field(default=lambda op: False)   # commutes with max pooling (per channel, monotone)


HANDLED = object()    # a converter's answer when it made no node: it recorded an alias or a value in the making

GRAPH_NODES: dict[str, GraphNode] = {}
PROGRAM_OPS: dict[str, ProgramOp] = {}


def as_pair(v) -> tuple:
    """An int or a pair as a pair (converters read torch's kernel / stride / padding arguments with it)."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def spread_sizes(args, kwargs):
    """`op(x, [a, b, c])` as `x.op(a, b, c)`: the form fx records for views, permutes and expands."""
    return (args[0], *args[1]), kwargs


def register_ops(*entries) -> None:
    """Add graph-node kinds and program ops; a name given twice is an error (remove it first to replace it)."""
    for e in entries:
        table, key = (GRAPH_NODES, e.kind) if isinstance(e, GraphNode) else (PROGRAM_OPS, e.name)
        if key in table:
            raise ValueError(f"op {key!r} is registered already")
        table[key] = e


def unregister_ops(*names) -> None:
    for name in names:
        GRAPH_NODES.pop(name, None)
        PROGRAM_OPS.pop(name, None)


def program_op(name: str) -> ProgramOp:
    try:
        return PROGRAM_OPS[name]
    except KeyError:
        raise ValueError(f"unknown integer op {name!r}; valid: {', '.join(PROGRAM_OPS)}") from None


def elementwise(name: str) -> bool:
    op = PROGRAM_OPS.get(name)
    return op is not None and op.elementwise


def check_ops(ops: list) -> None:
    """Refuse an op list (a program's `ops`) naming an op the registry does not know, before anything runs it.
    The program layer cannot check names (the registry's ops import it): whoever consumes a program does."""
    for op in ops:
        program_op(op.op)
