"""Trace a CNN with torch.fx into the small graph that quantization works on.

Each fx call becomes a node of a kind from the op registry (`hawq_ray.ops`: the module types, functions and
tensor methods each kind converts); a BatchNorm2d right after a conv, and a BatchNorm1d right after a Linear
of (N, C) features, is folded into it (any other is a node of its own), Dropout, Identity and stochastic depth vanish, and shape queries and arithmetic on shapes
(`x.size(1) // groups`) are skipped; parameters read in forward (a class token) are `constant` nodes. Anything
unknown is an error that names the module and its type. `folded_weights` reads each layer's BN-folded weight
off the trace (the sensitivity stage's delta_b).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from hawq_ray.contract import HawqError
from hawq_ray.inputs.attention import explicit_attention
from hawq_ray.ops import GRAPH_NODES, HANDLED
from hawq_ray.ops.layout import ConstantSlot, constant_tensor
from hawq_ray.quant.capture import exported_module, fx_args, quiet_torch
from hawq_ray.quant.fold import fold_bn

FX, EXPORT = "torch.fx", "torch.export"
CAPTURES = ("auto", "fx", "export")


@dataclass
class GNode:
    name: str
    kind: str                      # "input", or a kind of the op registry
    inputs: list[str]
    layer: str | None = None       # qualified module name (conv/linear)
    module: nn.Module | None = None
    bn: nn.BatchNorm2d | nn.BatchNorm1d | None = None
    bn_name: str | None = None
    attrs: dict = field(default_factory=dict)
    nonneg: bool = False           # output is >= 0 by construction (post-ReLU)


@dataclass
class Graph:
    nodes: list[GNode]
    output: str
    capture: str = FX          # how the model was captured: FX, or through torch.export and why (`quant.capture`)

    def by_name(self) -> dict[str, GNode]:
        return {n.name: n for n in self.nodes}

    def layer_nodes(self) -> list[GNode]:
        return [n for n in self.nodes if n.kind in GRAPH_NODES and GRAPH_NODES[n.kind].layer]

    def users(self) -> dict[str, list[GNode]]:
        out: dict[str, list[GNode]] = {n.name: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n)
        return out

    @property
    def input_name(self) -> str:
        return next(n.name for n in self.nodes if n.kind == "input")


def supported() -> str:
    return ", ".join([e.supported for e in GRAPH_NODES.values() if e.supported] + ["Dropout", "Identity"])


class _Tracer:
    """What a converter sees: `node(...)` makes a graph node of fx node `n` (its tensor arguments mapped to
    graph nodes), `unsupported(...)` raises the error that names the module and its type."""

    def __init__(self, gm: fx.GraphModule | None = None, input_shape=None, how: str = FX):
        self.nodes: list[GNode] = []
        self.alias: dict[str, str] = {}        # fx node name -> graph node name
        self.by_name: dict[str, GNode] = {}
        self.pending: dict[str, tuple] = {}     # fx node name -> a value in the making (a 5-D view, a tuple of parts)
        self._gm, self._input_shape, self._shapes, self._how = gm, input_shape, {}, how

    def shape(self, n: fx.Node, batch: int = 2):
        """The concrete shape of fx node `n`'s value (a tuple, or a tuple of them for a tuple) at `batch`: from
        one forward pass of a zero image, run the first time a converter asks (a second batch size tells which
        axis grows with the batch)."""
        if batch not in self._shapes:
            shape = self._input_shape() if callable(self._input_shape) else self._input_shape
            self._shapes[batch] = _propagate_shapes(self._gm, shape, batch, self._how)
        return self._shapes[batch].get(n.name)

    def src(self, a) -> str:
        if not isinstance(a, fx.Node):
            raise HawqError(f"unsupported non-tensor argument {a!r} in the model graph")
        if a.name not in self.alias:
            raise HawqError(f"value {a.name!r} is used as a tensor but is not one the quantizer supports")
        return self.alias[a.name]

    def is_tensor(self, a) -> bool:
        """Whether an fx argument is a tensor value of the graph (not a constant or a shape)."""
        return isinstance(a, fx.Node) and a.name in self.alias

    def node(self, n: fx.Node, kind: str, args: list, **kw) -> GNode:
        return GNode(n.name, kind, [self.src(a) for a in args], **kw)

    def tensor(self, a) -> torch.Tensor:
        """The value of a constant (a parameter or buffer read in forward, seen through its views, or computed
        from others), now."""
        return self._value(self.by_name[self.src(a)])

    def _value(self, node: GNode) -> torch.Tensor:
        return constant_tensor(node, self._gm, [self._value(self.by_name[i]) for i in node.inputs])

    def module_of(self, a) -> nn.Module:
        """The module owning the parameter an fx get_attr argument reads (a Linear passed as its weight)."""
        return self._gm.get_submodule(a.target.rpartition(".")[0])

    def module_name(self, module: nn.Module) -> str:
        return next(name for name, m in self._gm.named_modules() if m is module)

    def make(self, name: str, kind: str, inputs: list, **kw) -> GNode:
        """A node of the graph that no fx call is (one step of a call a converter expands into several), reading
        graph values by name; added at once."""
        node = GNode(name, kind, list(inputs), **kw)
        self.add(node)
        return node

    def add(self, node: GNode) -> None:
        self.nodes.append(node)
        self.by_name[node.name] = node
        self.alias[node.name] = node.name

    @staticmethod
    def inside(n: fx.Node) -> str:
        """' in module NAME of type TYPE' for the module whose forward made call `n` ('' at the top)."""
        return _inside(n)

    @staticmethod
    def unsupported(what: str, typ: str | None):
        raise HawqError(f"cannot quantize {what}{f' of type {typ}' if typ else ''}; supported: {supported()}")


def _entries_for(n: fx.Node, module) -> list:
    """The registry entries that claim an fx call, in registration order (the first whose converter accepts
    the call makes its node)."""
    return [e for e in GRAPH_NODES.values()
            if (module is not None and isinstance(module, e.modules)) or
            (n.op == "call_function" and n.target in e.functions) or
            (n.op == "call_method" and n.target in e.methods)]


def _propagate_shapes(gm: fx.GraphModule, input_shape, batch: int, how: str = FX) -> dict:
    import torch
    from torch.fx.passes.shape_prop import ShapeProp
    was = {m: m.training for m in gm.modules()}
    gm.eval()                               # no BN statistics change
    try:
        with torch.no_grad(), quiet_torch():        # ShapeProp prints the traceback of a failure
            ShapeProp(gm).propagate(torch.zeros(batch, *input_shape))
    except Exception as e:  # noqa: BLE001 -- the traced graph fails on an image, whatever the type
        cause = e.__cause__ or e
        named = re.search(r"node=%(\S+)", str(e))
        at = next((f" at {n.name!r}{_inside(n)}" for n in gm.graph.nodes if named and n.name == named[1]), "")
        raise FxGraphFails(f"the graph {how.split(' ')[0]} captured fails on a {tuple(input_shape)} image{at}: "
                           f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}") from None
    finally:
        for m, flag in was.items():
            m.training = flag

    def shape(meta):
        if meta is None:
            return None
        return tuple(meta.shape) if hasattr(meta, "shape") else tuple(shape(x) for x in meta)
    return {n.name: shape(n.meta.get("tensor_meta")) for n in gm.graph.nodes}


class _LeafTracer(fx.Tracer):
    """torch.fx's tracer, with every module type an op converts kept whole (a zoo's own activation modules
    are converted as what they compute, not traced into their arithmetic)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return converted_as_is(m) or super().is_leaf_module(m, qualname)


def converted_as_is(m: nn.Module) -> bool:
    """Whether fx keeps a module whole, to be converted as the registered type it is an instance of. A BN
    subclass with a forward of its own (timm's BatchNormAct2d: BN, then an activation) is traced into instead:
    converted as a BN it would be a silently different function; its F.batch_norm is the module's BN (folded
    as one) and the rest converts op by op. Other subclasses convert as their type (LayerNorm2d by its
    converter); `qat.check_function` stops one that computes something else."""
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and type(m).forward is not nn.modules.batchnorm._BatchNorm.forward:
        return False
    return isinstance(m, tuple(t for e in GRAPH_NODES.values() for t in e.modules) + _drop_path())


def trace_graph(model: nn.Module, input_shape=None, capture: str = "auto") -> Graph:
    """The graph of `model`; `input_shape` (C, H, W) is used where a converter needs concrete shapes (channel
    shuffles, splits) and to capture through torch.export, the model's own size when not given. `capture`:
    "auto" (torch.fx's symbolic tracing, torch.export where that raises), "fx" or "export" alone."""
    explicit_attention(model)     # nn.MultiheadAttention op by op, in place (same parameters and function)
    if input_shape is None:
        from hawq_ray.inputs.models import input_shape as model_input_shape
        input_shape = (lambda: model_input_shape(model))       # asked for only if a converter needs shapes
    gm, how = _capture(model, input_shape, capture)
    try:
        return _graph(model, gm, how, input_shape)
    except FxGraphFails as e:
        if capture != "auto" or how != FX:
            raise HawqError(str(e)) from None
        # symbolic tracing took a branch the model does not (`if lx is not None` on a proxy: OctResNet)
        shape = input_shape() if callable(input_shape) else input_shape
        gm = exported_module(model, shape, _LeafTracer().is_leaf_module, str(e))
        try:
            return _graph(model, gm, f"{EXPORT} ({e})", input_shape)
        except FxGraphFails as again:
            raise HawqError(f"model {type(model).__name__}: {e}; and {again}") from None


class FxGraphFails(HawqError):
    """The captured graph does not run on an image (its shape propagation raised)."""


def _graph(model: nn.Module, gm: fx.GraphModule, how: str, input_shape) -> Graph:
    """The graph of the captured `gm` (`how`: the capture)."""
    # the model's own modules where fx kept a bare copy of one it traced into (for the attributes it read)
    modules = dict(gm.named_modules()) | dict(model.named_modules())
    fx_users = {n.name: list(n.users) for n in gm.graph.nodes}
    t = _Tracer(gm, input_shape, how)
    output = None
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            if n.args and any(x.kind == "input" for x in t.nodes):
                continue                # an optional argument fixed at its default (`_optional_inputs`); the
                #                         guards fx adds for it are calls on no tensor, skipped below
            if any(x.kind == "input" for x in t.nodes):
                raise HawqError("model takes more than one input; hawq-ray quantizes single-input CNNs")
            t.add(GNode(n.name, "input", []))
        elif n.op == "get_attr":
            t.add(_constant(model, n))
        elif n.op == "output":
            if not isinstance(n.args[0], fx.Node):
                raise HawqError("model returns more than one tensor; hawq-ray quantizes single-output CNNs")
            output = t.src(n.args[0])
        elif _structural(t, n, modules, fx_users):
            continue
        elif _of_constants(t, n):
            t.add(_computed_constant(t, n))
        else:
            m = modules[n.target] if n.op == "call_module" else None
            node = _convert(t, n, m)
            if node is None and _materialize_views(t, n):
                node = _convert(t, n, m)
            if node is HANDLED:             # the converter recorded a value in the making, or an alias
                continue
            if node is None:
                what = {"call_module": f"module {n.target!r}",
                        "call_method": f"method .{n.target}() at {n.name!r}{_inside(n)}",
                        "call_function": f"function {getattr(n.target, '__name__', n.target)!r} at {n.name!r}"
                                         f"{_inside(n)}"}
                t.unsupported(what[n.op], type(m).__name__ if m is not None else None)
            t.add(node)
    for node in t.nodes:    # nonneg: by construction (ReLU, a converter's say), or inherited through shape-keeping ops
        entry = GRAPH_NODES.get(node.kind)
        node.nonneg = node.nonneg or (entry is not None and bool(entry.nonneg([t.by_name[i].nonneg for i in node.inputs])))
    _check_constant_readers(t.nodes)
    read = {i for node in t.nodes for i in node.inputs}
    graph = Graph(nodes=[x for x in t.nodes if x.kind != "constant" or x.name in read], output=output, capture=how)
    if not graph.layer_nodes():
        raise HawqError(f"model {type(model).__name__} has no quantizable layer (Conv2d or Linear)")
    return graph


def _capture(model: nn.Module, input_shape, capture: str) -> tuple[fx.GraphModule, str]:
    """(the torch-level fx graph of `model`, how it was captured). torch.fx first: it needs no input and gives
    what every earlier release gave; torch.export only where symbolic tracing raises (or when asked)."""
    if capture not in CAPTURES:
        raise HawqError(f"unknown capture {capture!r}; valid: {', '.join(CAPTURES)}")
    reason = None
    if capture != "export":
        try:
            tracer = _LeafTracer()
            graph = tracer.trace(model, concrete_args=_optional_inputs(model))
            return fx.GraphModule(tracer.root, graph), FX
        except Exception as e:  # fx raises many types
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            if capture == "fx":
                raise HawqError(f"model {type(model).__name__} is not torch.fx-traceable: {reason}") from None
    shape = input_shape() if callable(input_shape) else input_shape
    gm = exported_module(model, shape, _LeafTracer().is_leaf_module, reason)
    return gm, EXPORT + (f" (symbolic tracing failed: {reason})" if reason else "")


def _convert(t, n: fx.Node, m):
    return next((r for r in (e.convert(t, n, m) for e in _entries_for(n, m)) if r is not None), None)


def _materialize_views(t, n: fx.Node) -> bool:
    """Make the 5-D views that `n` reads and that a channel shuffle kept in the making (`ops.channels`) real
    reshapes, when no converter takes `n` on them (split attention's (N, radix, C, H, W) view, summed over the
    radix); whether any was."""
    views = [a for a in fx_args(n) if t.pending.get(a.name, ("",))[0] == "split"]
    for a in views:
        del t.pending[a.name]
        node = GRAPH_NODES["reshape"].convert(t, a, None)
        if node is None or node is HANDLED:
            return False
        t.add(node)
    return bool(views)


def _inside(n: fx.Node) -> str:
    """' in module NAME of type TYPE': the innermost module whose forward made a call (fx records the stack)."""
    stack = n.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    name, typ = list(stack.values())[-1]
    return f" in module {name!r} of type {getattr(typ, '__name__', typ)}"


def _optional_inputs(model: nn.Module) -> dict:
    """forward's arguments after the image that have defaults (timm's `attn_mask=None`), fixed at them."""
    import inspect
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}


def _constant(model: nn.Module, n: fx.Node) -> GNode:
    """A parameter or buffer read in forward (a class token, a position embedding): a `constant` node."""
    names = dict(model.named_parameters())
    if n.target in names or n.target in dict(model.named_buffers()):
        return GNode(n.name, "constant", [], attrs={"target": n.target, "parameter": n.target in names})
    value = getattr(model, n.target, None)      # a tensor fx made a constant while tracing (`_tensor_constant0`)
    if not isinstance(value, torch.Tensor):
        raise HawqError(f"cannot quantize attribute {n.target!r} read in forward: it is not a parameter, buffer "
                        "or tensor")
    return GNode(n.name, "constant", [], attrs={"value": value.detach().clone()})


def _of_constants(t: _Tracer, n: fx.Node) -> bool:
    """A function, method or module call on constants only (every argument node a constant): a reshape, a gather
    by a fixed index, an einsum or a cat of parameters, an MLP on a table (Swin V2's position bias: its Linears
    are part of a constant, not layers). A call that also reads a shape (`expand(N, -1)`) is not."""
    nodes = fx_args(n)
    return n.op in ("call_function", "call_method", "call_module") and bool(nodes) and \
        all(t.is_tensor(a) and t.by_name[t.src(a)].kind == "constant" for a in nodes)


def _computed_constant(t: _Tracer, n: fx.Node) -> GNode:
    """A constant computed in forward from other constants (Swin's and MaxViT's relative position bias, gathered
    from a table by an index): the call is kept and run on the constants' current values at every step, so QAT
    trains the parameters through it."""
    slots = {a.name: i for i, a in enumerate(fx_args(n))}
    args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: ConstantSlot(slots[a.name]))
    return GNode(n.name, "constant", [t.src(a) for a in fx_args(n)], attrs={"call": (n.op, n.target, args, kwargs)})


CONSTANT_READERS = ("add", "cat", "mul", "constant", "linear")       # linear: a bias built in forward


def _check_constant_readers(nodes: list) -> None:
    kinds = {n.name: n.kind for n in nodes}
    for node in nodes:
        for i in node.inputs:
            if kinds[i] == "constant" and node.kind not in CONSTANT_READERS:
                raise HawqError(f"cannot quantize {node.kind} {node.name!r} of a tensor constant read in forward "
                                f"({i!r}); constants may only be added, concatenated (a class token, a "
                                "position embedding) or multiplied (a layer scale)")


def _stochastic_depth() -> tuple:
    """torchvision's stochastic depth (function, module): residual-branch dropout, identity at inference."""
    try:
        from torchvision.ops import StochasticDepth, stochastic_depth
    except ImportError:
        return ()
    return stochastic_depth, StochasticDepth


def _drop_path() -> tuple:
    """timm's stochastic depth module (traced whole: its forward branches on `self.training`)."""
    try:
        from timm.layers import DropPath
    except ImportError:
        return ()
    return (DropPath,)


def identity_modules() -> tuple:
    """Module types that are the identity at inference: dropout, Identity, stochastic depth."""
    return (nn.Dropout, nn.Identity, *_stochastic_depth()[1:], *_drop_path())


def _fold_bn(t: _Tracer, n: fx.Node, m: nn.Module, name: str, fx_users: dict) -> bool:
    """Fold BN module `m` (called by `n` on its first argument) into the conv (BatchNorm2d) or Linear
    (BatchNorm1d of (N, C)) whose value it alone reads; False when there is none."""
    prev = t.by_name.get(t.alias.get(n.args[0].name, ""))
    into = "conv" if isinstance(m, nn.BatchNorm2d) else "linear"     # BatchNorm1d: a Linear's (N, C)
    readers = [u for u in fx_users[n.args[0].name] if not _shape_query(u)]     # timm asserts x.ndim == 4
    if prev is None or prev.kind != into or prev.bn is not None or len(readers) != 1 or \
            (into == "linear" and (len(prev.inputs) > 1 or len(t.shape(n.args[0])) != 2)):
        return False
    prev.bn, prev.bn_name = m, name
    t.alias[n.name] = prev.name
    return True


def _batch_norm_of(n: fx.Node, modules: dict) -> str | None:
    """The BN module whose call `F.batch_norm(x, mean, var, weight, bias, ...)` at `n` is: its statistics,
    weight, bias and eps all that module's own (the training flag aside: QAT folds with running statistics
    either way); None otherwise."""
    if n.op != "call_function" or n.target is not F.batch_norm:
        return None
    args = dict(zip(("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                    n.args)) | dict(n.kwargs)
    reads = [args.get(k) for k in ("running_mean", "running_var", "weight", "bias")]
    if not all(isinstance(a, fx.Node) and a.op == "get_attr" for a in reads[:2]):
        return None
    owner = reads[0].target.rpartition(".")[0]
    m = modules.get(owner)
    own = [None if a is None else f"{owner}.{k}" for a, k in zip(reads, ("running_mean", "running_var", "weight",
                                                                         "bias"))]
    if not isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)) or \
            [getattr(a, "target", None) for a in reads] != own or args.get("eps", 1e-5) != m.eps:
        return None
    return owner


def _structural(t: _Tracer, n: fx.Node, modules: dict, fx_users: dict) -> bool:
    """Calls that make no node of their own: BN folded into the conv (or Linear) before it, Dropout / Identity, shape
    queries. True when `n` was one of them (and handled)."""
    bn_name = _batch_norm_of(n, modules)
    if bn_name is not None:         # F.batch_norm of a BN module's own statistics (timm's BatchNormAct2d)
        m = modules[bn_name]
        if not _fold_bn(t, n, m, bn_name, fx_users):
            t.add(GNode(n.name, "batchnorm", [t.src(n.args[0])], module=m, bn=m, bn_name=bn_name))
        return True
    if n.op == "call_module":
        m = modules[n.target]
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            return _fold_bn(t, n, m, n.target, fx_users)   # else a node of its own (ops/batchnorm.py)
        if isinstance(m, identity_modules()):
            t.alias[n.name] = t.src(n.args[0])
            return True
        return False
    if n.op == "call_function" and n.target in _stochastic_depth()[:1]:
        t.alias[n.name] = t.src(n.args[0])      # identity at inference; QAT trains without dropping blocks
        return True
    if _shape_query(n):
        return True
    if n.op == "call_method" and n.target == "contiguous" and t.is_tensor(n.args[0]):
        t.alias[n.name] = t.alias[n.args[0].name]
        return True
    if any(a.name in t.pending for a in fx_args(n)):
        return False                        # a converter finishes a value in the making
    if n.op in ("call_function", "call_method") and not any(t.is_tensor(a) for a in fx_args(n)) and \
            any(isinstance(a, fx.Node) for a in fx_args(n)):
        return True                         # arithmetic on shapes (x.size(1) // groups): no value of the graph
    return False


def _shape_query(n: fx.Node) -> bool:
    """x.shape, x.ndim, x.size(), x.dim(): a question about a value, not a value of the graph."""
    return (n.op == "call_function" and n.target is getattr and n.args[1] in ("shape", "ndim")) or \
        (n.op == "call_method" and n.target in ("size", "dim"))


def folded_weights(model: nn.Module, input_shape=None) -> dict[str, torch.Tensor]:
    """BN-folded weight of every quantizable layer of `model`, keyed by layer name (detached); `input_shape`:
    as `trace_graph`'s (a model that only torch.export captures is captured at it)."""
    graph = trace_graph(model, input_shape)
    out = {}
    for node in graph.layer_nodes():
        w, _ = fold_bn(node.module.weight, getattr(node.module, "bias", None), node.bn)
        out[node.layer] = w.detach().clone()
    return out
