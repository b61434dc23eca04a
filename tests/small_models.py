"""Small models shared by test files (no tests here): `SqueezeExcite`, every op of the mobile CNNs in a few
layers, run at `SHAPE`; `ConcatThenConv`, a conv reading a concatenation (SqueezeNet's fire module).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHAPE = (3, 32, 32)     # the input of SqueezeExcite and of test_zoo's random-weight zoo models


class SqueezeExcite(nn.Module):
    """Every new op in a few layers: ReLU6, hardswish, SiLU, sigmoid / hardsigmoid gates, the product, a
    pre-activation BN on a concat, `.mean()`; depthwise and grouped convs."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16)
        self.dw, self.group = nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.Conv2d(16, 16, 3, 1, 1, groups=4)
        self.f1, self.f2 = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 16, 1)
        self.pre = nn.BatchNorm2d(32)
        self.proj, self.fc = nn.Conv2d(32, 24, 1), nn.Linear(24, 10)
        with torch.no_grad():          # BN statistics away from the identity, so the affine is not trivial
            for bn in (self.bn, self.pre):
                bn.running_mean.normal_(0, 0.5)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.normal_(0, 1)
                bn.bias.normal_(0, 0.5)

    def forward(self, x):
        y = F.hardswish(self.bn(self.stem(x)))
        d = F.silu(self.dw(y))
        gate = torch.sigmoid(self.f2(F.relu6(self.f1(F.adaptive_avg_pool2d(d, 1)))))
        g = F.hardsigmoid(self.group(y)) * (gate * d)
        z = self.proj(F.relu(self.pre(torch.cat([d, g], 1))))
        return self.fc(z.clamp(0, 4).mean((2, 3)))


class ConcatThenConv(nn.Module):
    """concat -> conv -> relu -> global pool -> fc; `width` channels per branch, `k` the conv's window."""

    def __init__(self, width=16, k=1, out=24):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, 2)
        self.e1, self.e3 = nn.Conv2d(16, width, 1), nn.Conv2d(16, width, 3, padding=1)
        self.c2 = nn.Conv2d(2 * width, out, k, padding=k // 2)
        self.g, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(out, 10)

    def forward(self, x):
        y = torch.relu(self.c1(x))
        y = torch.cat([torch.relu(self.e1(y)), torch.relu(self.e3(y))], 1)
        return self.fc(torch.flatten(self.g(torch.relu(self.c2(y))), 1))
