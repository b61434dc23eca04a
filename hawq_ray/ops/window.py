"""Swin's shifted-window attention (torchvision's `shifted_window_attention` and `_patch_merging_pad`, which
torch.fx keeps as single calls), expanded into the nodes they are made of. No program op of its own: each step is
a layout op, a Linear, a product, an add of a constant or a softmax. (`_get_relative_position_bias`, also kept
whole, reads parameters only: the tracer makes it a computed constant.)

Per block, on an (N, H, W, C) map with windows of w0 x w1 and a shift (s0, s1):
- `roll` by (-s0, -s1) over H and W, the window partition (reshape to (N, H/w0, w0, W/w1, w1, C), permute,
  reshape to (N nW, w0 w1, C): the batch axis grows to N times the windows);
- the qkv Linear (the block's own `qkv` module), the heads, q k^T times head_dim^-1/2;
- plus the relative position bias: a constant, the bias table gathered by the fixed index (computed from it), added
  at the logits' scale (`ops.join`); plus, when shifted, the mask of -100 between regions that the roll made
  neighbours, a fixed constant (N nW, heads, T, T) viewed as (N, nW, heads, T, T);
- softmax, p v, the heads merged, the `proj` Linear, the windows merged back, `roll` by (s0, s1).
Patch merging is a space-to-depth: reshape (N, H/2, 2, W/2, 2, C), permute, reshape (N, H/2, W/2, 4C), the order
of torchvision's x0..x3.

A map whose sides are not multiples of the window is padded with zeros to whole windows first (`pad`; the
padded tokens take part in the attention unmasked, as in torchvision) and cropped back after (`crop`).

Swin V2's cosine attention (`logit_scale` given): the key's third of the qkv bias is zeroed in forward (the
Linear reads that bias as a computed constant, as BEiT's F.linear does), q and k are scaled to unit length (`normalize`: `ops.layernorm` uncentered), their
product is multiplied per head by exp(min(logit_scale, ln 100)) (a constant computed from the parameter, the
per-channel affine of `ops.mul`), and the bias, 16 sigmoid(cpb_mlp(table)) gathered, is a computed constant.
Patch merging with odd sides (torchvision pads them) is refused by name.
"""
from __future__ import annotations

import math

import torch

from hawq_ray.ops.layout import ConstantSlot
from hawq_ray.ops.matmul import product_attrs
from hawq_ray.ops.registry import HANDLED, GraphNode, register_ops

SWA_ARGS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
            "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale", "training")
MASKED = -100.0          # torchvision's value between regions that are not neighbours in the image


def _torchvision_swin():
    try:
        from torchvision.models import swin_transformer as swin
    except ImportError:
        return None
    return swin


def shift_mask(h: int, w: int, window: tuple, shift: tuple) -> torch.Tensor:
    """torchvision's attention mask of a shifted window partition, (1, nW, 1, T, T): 0 within a region, -100
    across (the same slices, written out once at trace time)."""
    region = torch.zeros(h, w)
    count = 0
    for hs in ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None)):
        for ws in ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None)):
            region[hs[0]:hs[1], ws[0]:ws[1]] = count
            count += 1
    region = region.view(h // window[0], window[0], w // window[1], window[1]).permute(0, 2, 1, 3)
    region = region.reshape(-1, window[0] * window[1])
    diff = region.unsqueeze(1) - region.unsqueeze(2)
    return torch.where(diff != 0, MASKED, 0.0).unsqueeze(1).unsqueeze(0)


class _Chain:
    """Nodes made one after another, each reading the one before (names `<call>.<step>`)."""

    def __init__(self, tracer, call: str, start: str):
        self.tracer, self.call, self.last = tracer, call, start

    def __call__(self, step: str, kind: str, *others, wide=False, name=None, module=None, **attrs) -> str:
        extra = {"wide": wide} if kind in ("reshape", "permute", "take", "roll", "pad", "crop") else {}
        layer = {} if module is None else {"module": module, "layer": self.tracer.module_name(module)}
        node = self.tracer.make(name or f"{self.call}.{step}", kind, [self.last, *others], attrs=attrs | extra,
                                **layer)
        self.last = node.name
        return node.name


def cosine_logit_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """Swin V2's per-head factor of the cosine similarities: exp(logit_scale) capped at 100."""
    return torch.clamp(logit_scale, max=math.log(100.0)).exp()


def key_bias_zeroed(bias: torch.Tensor) -> torch.Tensor:
    """Swin V2's qkv bias as its forward uses it: the key's third zeroed."""
    third = bias.numel() // 3
    return torch.cat([bias[:third], torch.zeros_like(bias[third:2 * third]), bias[2 * third:]])


def _convert_window_attention(tracer, n, m):
    a = dict(zip(SWA_ARGS, n.args)) | dict(n.kwargs)
    _, h, w, c = tracer.shape(a["input"])
    window, heads, shift = tuple(a["window_size"]), int(a["num_heads"]), list(a["shift_size"])
    cosine = a.get("logit_scale") is not None
    pad_h, pad_w = (-h) % window[0], (-w) % window[1]
    h_all, w_all = h + pad_h, w + pad_w
    shift = [0 if window[i] >= (h_all, w_all)[i] else shift[i] for i in range(2)]
    qkv, proj = tracer.module_of(a["qkv_weight"]), tracer.module_of(a["proj_weight"])
    nh, nw, tokens, d = h_all // window[0], w_all // window[1], window[0] * window[1], c // heads
    x = _Chain(tracer, n.name, tracer.src(a["input"]))
    wide = tracer.by_name[x.last].kind in ("conv", "linear")
    if pad_h or pad_w:          # torchvision pads the map with zeros to whole windows (no mask for them)
        x("pad", "pad", wide=wide, pads=((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    if any(shift):
        x("shift", "roll", wide=wide, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x("windows", "reshape", wide=wide, shape=(-1, nh, window[0], nw, window[1], c))
    x("windows_t", "permute", dims=(0, 1, 3, 2, 4, 5))
    x("tokens", "reshape", shape=(-1, tokens, c))
    bias = []
    if cosine and a.get("qkv_bias") is not None:    # Swin V2 zeroes the key's third of the qkv bias in forward
        bias = [tracer.make(f"{n.name}.qkv_bias", "constant", [tracer.src(a["qkv_bias"])],
                            attrs={"call": ("call_function", key_bias_zeroed, (ConstantSlot(0),), {})}).name]
    x("qkv", "linear", *bias, module=qkv)
    x("heads", "reshape", wide=True, shape=(-1, tokens, 3, heads, d))
    heads_all = x("heads_t", "permute", dims=(2, 0, 3, 1, 4))
    q, k, v = (tracer.make(f"{n.name}.{p}", "take", [heads_all], attrs={"axis": 0, "index": i, "wide": False}).name
               for i, p in enumerate("qkv"))
    if cosine:                  # cosine attention: unit q and k (ops.layernorm's uncentered form)
        q, k = (tracer.make(f"{n.name}.{p}_unit", "normalize", [t], attrs={"axis": 3, "center": False}).name
                for p, t in (("q", q), ("k", k)))
    kt = tracer.make(f"{n.name}.kT", "permute", [k], attrs={"dims": (0, 1, 3, 2), "wide": False}).name
    x.last = q
    macs = h_all * w_all * c * tokens        # per sample and product: nW windows x heads x T x T x d
    x("logits", "matmul", kt, **product_attrs(tracer, [q, kt], [False, False], macs))
    if cosine:
        scale = tracer.make(f"{n.name}.logit_scale", "constant", [tracer.src(a["logit_scale"])],
                            attrs={"call": ("call_function", cosine_logit_scale, (ConstantSlot(0),), {})}).name
        x("scaled", "mul", scale, constants=[False, True])
    else:
        x("scaled", "scale", factor=d ** -0.5)
    x("biased", "add", tracer.src(a["relative_position_bias"]), constants=[False, True])
    if any(shift):
        value = shift_mask(h_all, w_all, window, shift).expand(1, nh * nw, heads, tokens, tokens).contiguous()
        mask = tracer.make(f"{n.name}.mask", "constant", [], attrs={"value": value}).name
        x("per_window", "reshape", shape=(-1, nh * nw, heads, tokens, tokens))
        x("masked", "add", mask, constants=[False, True])
        x("per_window_t", "reshape", shape=(-1, heads, tokens, tokens))
    probs = x("probs", "softmax")
    x("mixed", "matmul", v, **product_attrs(tracer, [probs, v], [True, False], macs))
    x("merged_t", "permute", dims=(0, 2, 1, 3))
    x("merged", "reshape", shape=(-1, tokens, c))
    x("proj", "linear", module=proj)
    x("unwindows", "reshape", wide=True, shape=(-1, nh, nw, window[0], window[1], c))
    x("unwindows_t", "permute", dims=(0, 1, 3, 2, 4, 5))
    last = not any(shift) and not (pad_h or pad_w)
    x("map", "reshape", shape=(-1, h_all, w_all, c), name=n.name if last else None)
    if any(shift):
        x("unshift", "roll", shifts=tuple(shift), dims=(1, 2), name=None if pad_h or pad_w else n.name)
    if pad_h or pad_w:
        x("crop", "crop", axes=(1, 2), starts=(0, 0), stops=(h, w), name=n.name)
    return HANDLED


def _convert_patch_merging(tracer, n, m):
    src = n.args[0]
    *_, h, w, c = tracer.shape(src)
    if h % 2 or w % 2:
        tracer.unsupported(f"patch merging at {n.name!r} of a {h}x{w} map (odd sides need zero padding)",
                           "_patch_merging_pad (even sides)")
    x = _Chain(tracer, n.name, tracer.src(src))
    wide = tracer.by_name[x.last].kind in ("conv", "linear")
    x("split", "reshape", wide=wide, shape=(-1, h // 2, 2, w // 2, 2, c))
    x("order", "permute", dims=(0, 1, 3, 4, 2, 5))
    x("merged", "reshape", shape=(-1, h // 2, w // 2, 4 * c), name=n.name)
    return HANDLED


def _converters() -> dict:
    swin = _torchvision_swin()
    if swin is None:
        return {}
    return {swin.shifted_window_attention: _convert_window_attention,
            swin._patch_merging_pad: _convert_patch_merging}


CONVERTERS = _converters()

# the calls expand into nodes of other kinds: no node of this kind exists, so it has no step
register_ops(GraphNode("window_attention", None, functions=tuple(CONVERTERS),
                       convert=lambda tracer, n, m: CONVERTERS[n.target](tracer, n, m),
                       supported="Swin's shifted_window_attention, patch merging"))
