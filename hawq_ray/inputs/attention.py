"""`nn.MultiheadAttention` written out op by op, so quantization sees its layers (torchvision's ViT).

PyTorch's module calls one fused function with its input projection as a bare parameter (`in_proj_weight`), so
neither a tracer nor a forward hook sees a layer there. `explicit_attention(model)` turns each self-attention
`nn.MultiheadAttention` of a model, in place, into `ExplicitMultiheadAttention`: the same module with the same
parameters and state_dict keys, whose forward is the qkv projection (`in_proj`, a Linear view of
`in_proj_weight` and `in_proj_bias` that owns no parameter), the heads, q k^T / sqrt(d), softmax, p v, the heads
merged and `out_proj`: the same function, each step a node the integer program has. Masks, separate key / value
inputs and bias_k / add_zero_attn are refused by name.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from hawq_ray.contract import HawqError


class ProjectionView(nn.Linear):
    """A Linear whose weight and bias are its owner's `in_proj_weight` / `in_proj_bias` (registered there only,
    so the state_dict and the optimizer see each parameter once)."""

    def __init__(self, owner: nn.MultiheadAttention):
        nn.Module.__init__(self)
        object.__setattr__(self, "_owner", owner)        # not a child: no cycle in the module tree
        self.in_features, self.out_features = owner.embed_dim, 3 * owner.embed_dim

    @property
    def weight(self):
        return self._owner.in_proj_weight

    @property
    def bias(self):
        return self._owner.in_proj_bias

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class ExplicitMultiheadAttention(nn.MultiheadAttention):
    """Self-attention with explicit ops (see the module docstring); made by `explicit_attention`."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise HawqError("MultiheadAttention with a mask has no integer form in hawq-ray; valid: unmasked "
                            "self-attention")
        if not (query is key and key is value):
            raise HawqError("MultiheadAttention with separate key or value inputs has no integer form in "
                            "hawq-ray; valid: self-attention (query, key and value the same tensor)")
        x = query if self.batch_first else query.transpose(0, 1)
        batch, tokens, _ = x.shape
        heads, head_dim = self.num_heads, self.head_dim     # numbers, not traced shapes: the scale is a constant
        qkv = self.in_proj(x).reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q @ k.transpose(-2, -1)) * head_dim ** -0.5).softmax(dim=-1)
        out = self.out_proj((attn @ v).transpose(1, 2).reshape(batch, tokens, self.embed_dim))
        return (out if self.batch_first else out.transpose(0, 1)), None


def explicit_attention(model: nn.Module) -> nn.Module:
    """Every `nn.MultiheadAttention` of `model` as an `ExplicitMultiheadAttention`, in place (idempotent)."""
    for name, m in model.named_modules():
        if type(m) is not nn.MultiheadAttention:
            continue
        if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
            raise HawqError(f"module {name!r} of type MultiheadAttention (separate q/k/v projections, bias_k or "
                            "add_zero_attn) has no integer form in hawq-ray; valid: the plain self-attention "
                            "of torchvision's ViT")
        m.__class__ = ExplicitMultiheadAttention
        m.in_proj = ProjectionView(m)
    return model
