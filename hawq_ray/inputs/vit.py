"""`digits_vit`: an embedded tiny vision transformer for the 1x16x16 digits data, the transformer counterpart of
`digits_resnet`.

A 4x4 patch embedding (a stride-4 conv, so 16 patches on 16x16), a class token and a learned position embedding
(17 tokens of width 64), 4 pre-norm blocks x = x + attn(norm1(x)); x = x + mlp(norm2(x)), a final LayerNorm and a
linear head on the class token. Attention is written out op by op, not with nn.MultiheadAttention, so a later
integer-only conversion sees every step: one qkv Linear, a reshape into 4 heads of 16, q @ k^T * 16^-0.5,
softmax over the keys, @ v, the heads merged back and a proj Linear. The MLP is Linear 64->128, GELU, Linear 128->64.
Plain modules, tensor methods and `@`, so torch.fx traces it. Initialised from `seed` without touching the global
random state, so two builds are identical.
"""

import torch
from torch import nn


class ViTAttention(nn.Module):
    """Multi-head self-attention with explicit ops: qkv Linear, heads, scaled q @ k^T, softmax, @ v, proj."""

    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not a multiple of {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]                       # each (batch, heads, tokens, head_dim)
        attn = (q @ k.transpose(-2, -1)) * self.scale           # (batch, heads, tokens, tokens)
        attn = attn.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out)


class ViTMlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class ViTBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, dim, heads, mlp_ratio):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = ViTAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = ViTMlp(dim, dim * mlp_ratio)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DigitsViT(nn.Module):
    """A tiny ViT for 1x16x16 digits, 10 classes: patch 4, width 64, 4 blocks of 4 heads, MLP ratio 2, a class
    token and a learned position embedding; 136,906 parameters (see the module docstring)."""

    def __init__(self, in_channels=1, in_size=(16, 16), num_classes=10, patch=4, dim=64, depth=4, heads=4,
                 mlp_ratio=2, seed=0):
        super().__init__()
        self.in_channels = in_channels
        self.in_size = tuple(in_size)
        self.num_classes = num_classes
        if self.in_size[0] % patch or self.in_size[1] % patch:
            raise ValueError(f"input size {self.in_size} is not a multiple of the patch size {patch}")
        tokens = (self.in_size[0] // patch) * (self.in_size[1] // patch) + 1
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.patch_embed = nn.Conv2d(in_channels, dim, patch, stride=patch)
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, tokens, dim))
            self.blocks = nn.Sequential(*(ViTBlock(dim, heads, mlp_ratio) for _ in range(depth)))
            self.norm = nn.LayerNorm(dim)
            self.head = nn.Linear(dim, num_classes)
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.trunc_normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)     # (batch, patches, dim)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 0])
