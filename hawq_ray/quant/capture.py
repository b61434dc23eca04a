"""The second way in: a model torch.fx cannot trace symbolically (control flow on shapes or values, iteration
over a proxy) is captured by torch.export and rewritten into the torch-level fx graph the converters read.

`torch.export.export(model, (x,), strict=False)` runs forward on the real image shape with a symbolic batch,
so Python control flow on shapes takes its branch and leaves no trace. Its ATen-level graph is rewritten by
one generic pass, nothing per model:

- the ops made inside a call of a module torch.fx keeps whole (`is_leaf`: every module type an op converts,
  torch.nn's own) become one `call_module` of its dotted path, found in the nodes' `nn_module_stack`: layers
  are named by module path, as the fx path names them, and BN, activations and pooling modules convert as
  they do there;
- every other ATen op becomes the torch-level call its op family declares (`GraphNode.aten` in the registry:
  `aten.relu.default` -> `torch.relu`, `aten.view.default(x, [N, -1])` -> `x.view(N, -1)`);
- `sym_size` becomes `x.size(d)` and shape arithmetic stays, both skipped by the tracer as on the fx path;
  `contiguous` and `clone` become `.contiguous()`; dropout and whole-axis slices are the identity; the
  export's own guard and asserts are dropped.

The result's parameters are the model's own (its root is the model), so shape propagation at any batch size
and every converter work on it unchanged.
"""
from __future__ import annotations

import io
import logging
import re
import sys
from contextlib import contextmanager, redirect_stderr, redirect_stdout

import torch
from torch import fx, nn

from hawq_ray.contract import HawqError
from hawq_ray.ops import GRAPH_NODES
from hawq_ray.ops.registry import AtenCall

aten = torch.ops.aten
# ATen ops that are the identity at inference or as values (no copy of a value matters to integers)
IDENTITIES = (aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default, aten.alias.default,
              aten.detach.default, aten.lift_fresh_copy.default)
# copies that a later view needs (a channel shuffle's transpose then view): `.contiguous()`, which the tracer
# skips as on the fx path
COPIES = (aten.contiguous.default, aten.clone.default)


def exported_module(model: nn.Module, input_shape, is_leaf, fx_failure: str | None = None) -> fx.GraphModule:
    """`model` captured by torch.export at (2, *input_shape), batch dynamic, as a torch-level GraphModule
    (`fx_failure`: why symbolic tracing failed, for the error if this fails too)."""
    gm = _Rewrite(model, _export(model, tuple(input_shape), fx_failure).module(), is_leaf).run()
    gm.graph.lint()
    return gm


def _export(model: nn.Module, input_shape, fx_failure):
    was = model.training
    model.eval()            # the inference forms (BN on running statistics, no dropout), no statistics change
    try:
        with quiet_torch():
            return torch.export.export(model, (torch.zeros(2, *input_shape),),
                                       dynamic_shapes=({0: torch.export.Dim("batch")},), strict=False)
    except Exception as e:  # export raises many types
        raise HawqError(_export_failure(model, e, fx_failure)) from None
    finally:
        model.train(was)


@contextmanager
def quiet_torch():
    """torch.export logs, and prints, the graph it had when it failed; the error says what matters in one line.
    What was printed meanwhile (the model's own prints, another thread's) is passed on when the export succeeds."""
    loggers = [logging.getLogger(name) for name in ("torch", "torch._dynamo", "torch.fx.experimental.symbolic_shapes")]
    levels = [log.level for log in loggers]
    for log in loggers:
        log.setLevel(logging.CRITICAL)
    out, err = io.StringIO(), io.StringIO()
    try:
        with redirect_stdout(out), redirect_stderr(err):
            yield
        sys.stdout.write(out.getvalue())
        sys.stderr.write(err.getvalue())
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


USER_FRAME = re.compile(r'raised this error:\s*\n\s*File "([^"]+)", line (\d+), in (\S+)\n\s*(.+)')


def _export_failure(model: nn.Module, e: Exception, fx_failure: str | None) -> str:
    """One line: what torch.export could not capture, and the model's line that did it where torch names it
    (its data-dependent guard errors carry the user frame)."""
    text, name = str(e), type(model).__name__
    frame = USER_FRAME.search(text)
    where = f" at {frame[1]}:{frame[2]} in {frame[3]}: {frame[4].strip()}" if frame else ""
    if "data-dependent" in text or "GuardOnDataDependent" in type(e).__name__:
        return f"model {name} has control flow on tensor values, which neither torch.fx nor torch.export can " \
               f"capture{where}"
    first = next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
    fx_part = f"is not torch.fx-traceable ({fx_failure}) and " if fx_failure else ""
    return f"model {name} {fx_part}torch.export cannot capture it: {first}{where}"


def _aten_calls() -> dict:
    """Every ATen op an op family declares -> the torch-level call it is (AtenCall)."""
    calls = {}
    for entry in GRAPH_NODES.values():
        for op, call in entry.aten.items():
            calls[op] = call if isinstance(call, AtenCall) else AtenCall(call)
    return calls


def _is_tensor(n: fx.Node) -> bool:
    return isinstance(n.meta.get("val"), torch.Tensor)


def _is_shape(n: fx.Node) -> bool:
    """A size or arithmetic on sizes (a symbolic or a plain number), not a tensor value."""
    return isinstance(n.meta.get("val"), (torch.SymInt, torch.SymFloat, torch.SymBool, int, float, bool))


def fx_args(n: fx.Node) -> list:
    """The fx nodes among a call's arguments, nested ones too (`torch.cat([a, b])`)."""
    out = []
    fx.node.map_arg((n.args, n.kwargs), out.append)
    return out


def _leaf_calls(model: nn.Module, src: fx.GraphModule, is_leaf) -> dict:
    """{ATen node: (module path, call number)} for the ops made inside a call of a module kept whole: the outermost
    such module on the node's stack. One call is a run of tensor nodes under the same stack entry ('act', then
    'act@1' for the next call of the same module)."""
    out, previous, calls = {}, None, 0
    for n in src.graph.nodes:
        if n.op != "call_function" or _is_shape(n):
            continue            # shape nodes stay outside: export shares one `sym_size` among many readers
        leaf = _outermost_leaf(model, n, is_leaf)
        if leaf is None:
            previous = None
            continue
        if leaf != previous:
            calls += 1
            previous = leaf
        out[n] = (leaf[1], calls)
    return out


def _outermost_leaf(model: nn.Module, n: fx.Node, is_leaf):
    for key, (path, _) in (n.meta.get("nn_module_stack") or {}).items():
        try:
            module = model.get_submodule(path) if path else None
        except AttributeError:
            continue
        if module is not None and is_leaf(module, path):
            return key, path
    return None


def _module_stack(model: nn.Module, n: fx.Node, leaf: str | None = None) -> dict:
    """The node's enclosing modules as fx records them ({path: (path, type)}), up to the leaf it is a call of."""
    out = {}
    for path, _ in (n.meta.get("nn_module_stack") or {}).values():
        if path == leaf:
            break
        try:
            out[path] = (path, type(model.get_submodule(path)))
        except AttributeError:
            continue
    return out


class _Rewrite:
    """The torch-level graph of an exported module, built node by node (`env`: exported node -> its value)."""

    def __init__(self, model: nn.Module, src: fx.GraphModule, is_leaf):
        self.model, self.src, self.graph, self.env = model, src, fx.Graph(), {}
        self.leaf = _leaf_calls(model, src, is_leaf)
        self.members: dict = {}
        for n, call in self.leaf.items():
            self.members.setdefault(call, []).append(n)
        self.calls = _aten_calls()

    def value(self, a):
        return fx.node.map_arg(a, self._node)

    def _node(self, a: fx.Node) -> fx.Node:
        if a not in self.env and a.op == "get_attr":
            self.env[a] = self.graph.get_attr(self._attribute(a))
        if a not in self.env:
            raise HawqError(f"value {a.name!r} of the exported graph is read outside the module call that makes it")
        return self.env[a]

    def _attribute(self, a: fx.Node) -> str:
        """The model's own parameter or buffer path; a tensor the export lifted is set on the model, as torch.fx
        sets the tensors it meets (`_tensor_constant0`)."""
        try:
            self.model.get_parameter(a.target)
            return a.target
        except AttributeError:
            pass
        try:
            self.model.get_buffer(a.target)
            return a.target
        except AttributeError:
            pass
        name = f"_exported_constant_{a.name}"
        setattr(self.model, name, _attr(self.src, a.target))
        return name

    def run(self) -> fx.GraphModule:
        for n in self.src.graph.nodes:
            if n.op == "placeholder":
                self.env[n] = self.graph.placeholder(n.name)
            elif n.op == "output":
                out = n.args[0]
                out = out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out
                self.graph.output(self.value(out))
            elif n in self.leaf:
                self._leaf_member(n)
            elif n.op == "call_function" and n.users:
                self._call(n)
        return fx.GraphModule(self.model, self.graph)

    def _leaf_member(self, n: fx.Node) -> None:
        """The last op of a leaf module's call makes the call_module node; the others make nothing."""
        path, _ = self.leaf[n]
        members = self.members[self.leaf[n]]
        if n is not members[-1]:
            return
        inside = set(members)
        inputs = list(dict.fromkeys(a for m in members for a in fx_args(m)
                                    if a not in inside and a.op != "get_attr" and _is_tensor(a)))
        outputs = [m for m in members if any(u not in inside for u in m.users)]
        if len(outputs) > 1:
            raise HawqError(f"cannot capture module {path!r} of type {type(self.model.get_submodule(path)).__name__}: "
                            f"{len(outputs)} of its values are read outside it")
        if not outputs:
            return
        node = self.graph.call_module(path, tuple(self.value(a) for a in inputs))
        node.meta["nn_module_stack"] = _module_stack(self.model, n, leaf=path)
        self.env[outputs[0]] = node

    def _call(self, n: fx.Node) -> None:
        if n.target in IDENTITIES or (n.target is aten.slice.Tensor and _whole_axis(n)):
            self.env[n] = self.value(n.args[0])
            return
        if n.target is aten.sym_size.int:
            node = self.graph.call_method("size", self.value(n.args))
        elif n.target in COPIES:
            node = self.graph.call_method("contiguous", (self.value(n.args[0]),))
        elif n.target in self.calls:
            call = self.calls[n.target]
            args, kwargs = (n.args, n.kwargs) if call.args is None else call.args(n.args, n.kwargs)
            op = "call_method" if isinstance(call.target, str) else "call_function"
            node = self.graph.create_node(op, call.target, self.value(tuple(args)), self.value(dict(kwargs)))
        else:       # shape arithmetic, getitem, or an op no family declares (the tracer's error names it)
            node = self.graph.create_node("call_function", n.target, self.value(n.args), self.value(n.kwargs))
        node.meta["nn_module_stack"] = _module_stack(self.model, n)
        self.env[n] = node


def _whole_axis(n: fx.Node) -> bool:
    """aten.slice.Tensor(x, dim, 0, end >= size, 1): every element (x[:] of a symbolic batch)."""
    dim, start, end, step = (list(n.args[1:]) + [0, 0, None, 1][len(n.args) - 1:])[:4]
    size = n.args[0].meta["val"].shape[dim] if _is_tensor(n.args[0]) else None
    return start in (0, None) and step == 1 and (end is None or end >= 2 ** 62 or
                                                  (isinstance(size, int) and end >= size))


def _attr(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module
