"""Trace a CNN with torch.fx into the small graph that quantization works on.

Supported: Conv2d (+ a BatchNorm2d right after it, folded), Linear, ReLU, add, cat (channels), avg/max
pooling, global average pooling, flatten/view(N, -1), dropout/identity. Anything else is an error that names
the module and its type.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from hawq_ray.errors import HawqError

SUPPORTED = ("Conv2d (+BatchNorm2d), Linear, ReLU, add, cat, AvgPool2d, MaxPool2d, AdaptiveAvgPool2d(1), "
             "flatten/view, Dropout, Identity")


@dataclass
class GNode:
    name: str
    kind: str                      # input conv linear relu add cat avgpool maxpool flatten output
    inputs: list[str]
    layer: str | None = None       # qualified module name (conv/linear)
    module: nn.Module | None = None
    bn: nn.BatchNorm2d | None = None
    bn_name: str | None = None
    attrs: dict = field(default_factory=dict)
    nonneg: bool = False           # output is >= 0 by construction (post-ReLU)


@dataclass
class Graph:
    nodes: list[GNode]
    output: str

    def by_name(self) -> dict[str, GNode]:
        return {n.name: n for n in self.nodes}

    def layer_nodes(self) -> list[GNode]:
        return [n for n in self.nodes if n.kind in ("conv", "linear")]

    def users(self) -> dict[str, list[GNode]]:
        out: dict[str, list[GNode]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n)
        return out


def _pair(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v)


def _pool_attrs(kind, kernel, stride, padding, ceil_mode, dilation=1, count_include_pad=True):
    stride = kernel if stride is None or stride == [] else stride
    return {"kernel": _pair(kernel), "stride": _pair(stride), "padding": _pair(padding),
            "dilation": _pair(dilation), "ceil_mode": bool(ceil_mode),
            "count_include_pad": bool(count_include_pad)}


def trace_graph(model: nn.Module) -> Graph:
    try:
        gm = fx.symbolic_trace(model)
    except Exception as e:  # fx raises many types
        raise HawqError(f"model {type(model).__name__} is not torch.fx-traceable: "
                        f"{str(e).splitlines()[0]}") from None
    modules = dict(gm.named_modules())
    nodes: list[GNode] = []
    alias: dict[str, str] = {}        # fx node name -> graph node name
    by_name: dict[str, GNode] = {}
    fx_users = {n.name: list(n.users) for n in gm.graph.nodes}
    output = None

    def src(a) -> str:
        if not isinstance(a, fx.Node):
            raise HawqError(f"unsupported non-tensor argument {a!r} in the model graph")
        if a.name not in alias:
            raise HawqError(f"value {a.name!r} is used as a tensor but is not one the quantizer supports")
        return alias[a.name]

    def add(node: GNode):
        nodes.append(node)
        by_name[node.name] = node
        alias[node.name] = node.name

    def unsupported(what: str, typ: str):
        raise HawqError(f"cannot quantize {what} of type {typ}; supported: {SUPPORTED}")

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if any(x.kind == "input" for x in nodes):
                raise HawqError("model takes more than one input; hawq-ray quantizes single-input CNNs")
            add(GNode(n.name, "input", []))
        elif n.op == "get_attr":
            unsupported(f"attribute {n.target!r}", "get_attr (a tensor constant in forward)")
        elif n.op == "call_module":
            m = modules[n.target]
            if isinstance(m, nn.Conv2d):
                if m.padding_mode != "zeros" or isinstance(m.padding, str):
                    unsupported(f"module {n.target!r} (padding {m.padding!r}, mode {m.padding_mode})",
                                type(m).__name__)
                add(GNode(n.name, "conv", [src(n.args[0])], layer=n.target, module=m,
                          attrs={"stride": _pair(m.stride), "padding": _pair(m.padding),
                                 "dilation": _pair(m.dilation), "groups": m.groups}))
            elif isinstance(m, nn.Linear):
                add(GNode(n.name, "linear", [src(n.args[0])], layer=n.target, module=m))
            elif isinstance(m, nn.BatchNorm2d):
                prev = by_name.get(alias.get(n.args[0].name, ""))
                if prev is None or prev.kind != "conv" or prev.bn is not None \
                        or len(fx_users[n.args[0].name]) != 1:
                    unsupported(f"module {n.target!r} (a BatchNorm2d not directly after a conv)",
                                type(m).__name__)
                prev.bn, prev.bn_name = m, n.target
                alias[n.name] = prev.name
            elif isinstance(m, nn.ReLU):
                add(GNode(n.name, "relu", [src(n.args[0])]))
            elif isinstance(m, (nn.Dropout, nn.Identity)):
                alias[n.name] = src(n.args[0])
            elif isinstance(m, nn.MaxPool2d):
                add(GNode(n.name, "maxpool", [src(n.args[0])],
                          attrs=_pool_attrs("max", m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                            m.dilation)))
            elif isinstance(m, nn.AvgPool2d):
                if m.divisor_override is not None:
                    unsupported(f"module {n.target!r} (divisor_override)", type(m).__name__)
                add(GNode(n.name, "avgpool", [src(n.args[0])],
                          attrs=_pool_attrs("avg", m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                            1, m.count_include_pad)))
            elif isinstance(m, nn.AdaptiveAvgPool2d) and _pair(m.output_size) == (1, 1):
                add(GNode(n.name, "avgpool", [src(n.args[0])], attrs={"global": True}))
            elif isinstance(m, nn.Flatten) and m.start_dim == 1 and m.end_dim == -1:
                add(GNode(n.name, "flatten", [src(n.args[0])]))
            else:
                unsupported(f"module {n.target!r}", type(m).__name__)
        elif n.op == "call_function":
            f = n.target
            if f in (operator.add, torch.add, operator.iadd) and len(n.args) == 2 and not n.kwargs:
                add(GNode(n.name, "add", [src(n.args[0]), src(n.args[1])]))
            elif f is torch.cat:
                tensors = n.args[0]
                dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
                if dim != 1:
                    unsupported(f"torch.cat at {n.name!r} along dim {dim}", "cat (only dim=1)")
                add(GNode(n.name, "cat", [src(t) for t in tensors]))
            elif f in (torch.relu, F.relu):
                add(GNode(n.name, "relu", [src(n.args[0])]))
            elif f is torch.flatten and (n.args[1:] or (n.kwargs.get("start_dim", 0),)) in ((1,), (1, -1)):
                add(GNode(n.name, "flatten", [src(n.args[0])]))
            elif f is F.adaptive_avg_pool2d and _pair(n.args[1] if len(n.args) > 1
                                                      else n.kwargs["output_size"]) == (1, 1):
                add(GNode(n.name, "avgpool", [src(n.args[0])], attrs={"global": True}))
            elif f is getattr and n.args[1] == "shape":
                continue
            elif f is operator.getitem and isinstance(n.args[0], fx.Node) and n.args[0].name not in alias:
                continue  # x.shape[0] used as a view argument
            else:
                unsupported(f"function {getattr(f, '__name__', f)!r} at {n.name!r}", "call_function")
        elif n.op == "call_method":
            if n.target == "size":
                continue
            if n.target in ("view", "reshape") and len(n.args) == 3 and n.args[2] == -1:
                add(GNode(n.name, "flatten", [src(n.args[0])]))
            elif n.target == "flatten" and tuple(n.args[1:]) in ((1,), (1, -1)):
                add(GNode(n.name, "flatten", [src(n.args[0])]))
            elif n.target == "relu":
                add(GNode(n.name, "relu", [src(n.args[0])]))
            elif n.target == "add" and len(n.args) == 2:
                add(GNode(n.name, "add", [src(n.args[0]), src(n.args[1])]))
            else:
                unsupported(f"method .{n.target}() at {n.name!r}", "call_method")
        elif n.op == "output":
            out = n.args[0]
            if not isinstance(out, fx.Node):
                raise HawqError("model returns more than one tensor; hawq-ray quantizes single-output CNNs")
            output = src(out)
    _mark_nonneg(nodes)
    graph = Graph(nodes=nodes, output=output)
    if not graph.layer_nodes():
        raise HawqError(f"model {type(model).__name__} has no quantizable layer (Conv2d or Linear)")
    return graph


def _mark_nonneg(nodes: list[GNode]) -> None:
    known = {}
    for n in nodes:
        if n.kind == "relu":
            n.nonneg = True
        elif n.kind in ("avgpool", "maxpool", "flatten", "add", "cat"):
            n.nonneg = all(known[i] for i in n.inputs)
        else:
            n.nonneg = False
        known[n.name] = n.nonneg
