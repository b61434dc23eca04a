"""The layer table of a model: its first columns (layer, kind, params, macs, product_macs, narrow_product_macs,
act_elements, group, fixed_bits; the schema is `contract.table`), from the traced graph and one forward pass."""
from __future__ import annotations


import pandas as pd
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from hawq_ray.contract import HawqError
from hawq_ray.contract.table import COL, COLUMNS, FIXED_BITS
from hawq_ray.quant.graph import Graph, trace_graph


def probe_forward(model: nn.Module, input_shape, hooks: dict) -> None:
    """One eval-mode, no-grad forward pass at batch 1 with forward hooks {module name: hook(mod, inp, out)}
    attached; hooks are removed and the model's train/eval mode restored afterwards. A model that does not run
    at `input_shape` (a pool of a fixed window after too small an image) is a one-line HawqError: this is the
    first forward pass a run makes."""
    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(fn) for name, fn in hooks.items()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros((1, *input_shape)))
    except Exception as e:  # noqa: BLE001 -- whatever the model raises, it does not run at this size
        line = (str(e).splitlines() or [""])[0]
        reason = line if len(line) <= 160 else line[:157] + "..."
        raise HawqError(f"{type(model).__name__} does not run on an input of shape {tuple(input_shape)} "
                        f"({type(e).__name__}: {reason}); valid: an input size its layers accept, such as the "
                        f"model's own (input_size: null)") from e
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def layer_calls(model: nn.Module, input_shape) -> dict[str, dict]:
    """{layer: {"input_shape": of one sample, "multiply_adds": per sample, "input_elements": per sample}} of every
    Conv2d / Linear, seen where its weight is read: the module's call, or a functional call given the weight
    (torchvision Swin's window attention and BEiT pass a Linear's weight to F.linear), from one forward pass at
    batch 1. A module read twice adds its MACs and keeps its largest input. (`input_shape` drops the first axis,
which is the batch for most layers but windows x batch where attention folds windows into it.)"""
    layers = {id(m.weight): name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    calls: dict[str, dict] = {}

    class Reads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if getattr(func, "__name__", "") in ("linear", "conv2d"):
                x = args[0] if args else kwargs["input"]
                w = args[1] if len(args) > 1 else kwargs.get("weight")
                name = layers.get(id(w))
                if name is not None:         # out elements times the reduction length of each: in / groups x k x k
                    call = calls.setdefault(name, {"input_shape": tuple(x.shape[1:]), "multiply_adds": 0,
                                                   "input_elements": 0})
                    call["multiply_adds"] += int(out.numel()) * int(w[0].numel())
                    call["input_elements"] = max(call["input_elements"], int(x.numel()))   # batch 1: per sample
            return out
    with Reads():
        probe_forward(model, input_shape, {})
    return calls


def layer_macs(model: nn.Module, input_shape) -> dict[str, int]:
    """Multiply-accumulates per sample of every Conv2d / Linear (`layer_calls`)."""
    return {name: call["multiply_adds"] for name, call in layer_calls(model, input_shape).items()}


def activation_elements(model: nn.Module, input_shape) -> int:
    """Elements of every module output of one sample (the input included): what a forward pass at batch B
    holds, times B, when nothing is freed early (an upper bound for inference, the saved tensors of training)."""
    total = [int(torch.Size(input_shape).numel())]

    def hook(mod, inp, out):
        total[0] += sum(t.numel() for t in (out if isinstance(out, (tuple, list)) else [out])
                        if isinstance(t, torch.Tensor))
    leaves = {name: hook for name, m in model.named_modules() if not any(True for _ in m.children())}
    probe_forward(model, input_shape, leaves)
    return total[0]


def layer_groups(graph: Graph) -> dict[str, str]:
    """A shortcut (downsample) conv shares bits with the conv that reads the same input beside it."""
    users = graph.users()
    groups = {}
    for node in graph.layer_nodes():
        if node.kind != "conv" or not any(u.kind == "add" for u in users[node.name]):
            continue
        siblings = [u for u in users[node.inputs[0]] if u.kind == "conv" and u is not node]
        if siblings:
            groups[node.layer] = groups[siblings[0].layer] = siblings[0].layer
    return groups


def fixed_layers(graph: Graph) -> dict[str, int]:
    """Layers that read the model input or produce its output keep 8 bits."""
    out = {}
    for node in graph.layer_nodes():
        if graph.input_name in node.inputs or node.name == graph.output:
            out[node.layer] = FIXED_BITS
    return out


def product_macs(graph: Graph) -> tuple[dict[str, int], dict[str, int]]:
    """MACs per sample of the products of two activations, charged to the layer whose bits their operands take
    (`ops.matmul.operand_layer`: attention's q k^T and p v both go to the qkv Linear): ({layer: MACs of products
    whose operands both take its bits}, {layer: MACs of products whose other operand is 8-bit codes, softmax's
    probabilities}). A product no layer precedes is charged to none."""
    both, one = {}, {}
    for node in graph.nodes:
        layer = node.attrs.get("operand_layer") if node.kind == "matmul" else None
        if layer is not None:
            out = one if any(node.attrs["narrow"]) else both
            out[layer] = out.get(layer, 0) + int(node.attrs["multiply_adds"])
    return both, one


def layer_table(model: nn.Module, input_shape, graph: Graph | None = None) -> pd.DataFrame:
    """One row per conv / linear layer of `model` in execution order (`graph`: its trace, if at hand)."""
    graph = trace_graph(model, input_shape) if graph is None else graph
    calls = layer_calls(model, input_shape)
    groups, fixed, (products, narrow_products) = layer_groups(graph), fixed_layers(graph), product_macs(graph)
    rows = []
    for node in graph.layer_nodes():
        rows.append({
            COL.layer: node.layer,
            COL.kind: node.kind,
            COL.params: int(node.module.weight.numel()),
            COL.macs: int(calls.get(node.layer, {}).get("multiply_adds", 0)),
            COL.product_macs: products.get(node.layer, 0),
            COL.narrow_product_macs: narrow_products.get(node.layer, 0),
            COL.act_elements: int(calls.get(node.layer, {}).get("input_elements", 0)),
            COL.group: groups.get(node.layer, ""),
            COL.fixed_bits: fixed.get(node.layer, pd.NA),
        })
    table = pd.DataFrame(rows)
    table[COL.fixed_bits] = table[COL.fixed_bits].astype(COLUMNS[COL.fixed_bits].dtype)
    return table
