"""Tiny models and the exact Hessian that the sensitivity tests compare against (no tests here).

The models are plain nn.Sequential so Ray workers unpickle them without importing this file.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def tiny_model(seed: int = 0, train_steps: int = 60) -> nn.Sequential:
    """260 weights, no bias: conv 1->4, conv 4->4, linear 16->5; trained a little so the traces are positive."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.Tanh(), nn.Conv2d(4, 4, 3, bias=False), nn.Tanh(),
                          nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(16, 5, bias=False))
    x, y = tiny_data(seed)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    for _ in range(train_steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def tiny_data(seed: int = 0, n: int = 48):
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = ((x[:, 0, 2:5, 2:5].mean((1, 2)) * 3).round().clamp(-2, 2) + 2).long()
    return x, y


def tiny_batches(seed: int = 0, sizes=(20, 16, 12)):
    """Uneven batches. Lopsided ones (40, 4, 4) make the size weighting of the shards matter by many standard
    errors: the exact trace of the mean loss over all samples and the plain mean of the batches' traces differ."""
    x, y = tiny_data(seed, sum(sizes))
    out, start = [], 0
    for s in sizes:
        out.append((x[start:start + s], y[start:start + s]))
        start += s
    return out


def exact_block_traces(model: nn.Module, batches, layers, equal_weights: bool = False) -> dict[str, float]:
    """Tr of each layer's weight block of the Hessian of the mean loss over all samples, in eval mode; with
    `equal_weights`, of the plain mean of the batches' mean losses instead (what ignoring batch sizes gives)."""
    model.eval()
    names = [n for n, p in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    flat = torch.cat([p.detach().flatten() for p in model.parameters()]).double()
    buffers = {n: b.double() for n, b in model.named_buffers()}
    total = sum(len(x) for x, _ in batches)

    def loss(f, x, y):
        params, start = {}, 0
        for n, s in zip(names, shapes):
            params[n] = f[start:start + s.numel()].view(s)
            start += s.numel()
        return nn.functional.cross_entropy(functional_call(model, {**params, **buffers}, (x.double(),)), y)

    hess = sum((1 / len(batches) if equal_weights else len(x) / total) * torch.autograd.functional.hessian(lambda f: loss(f, x, y), flat, vectorize=True)
               for x, y in batches)
    out, start = {}, 0
    for n, s in zip(names, shapes):
        layer, _, kind = n.rpartition(".")
        if kind == "weight" and layer in layers:
            out[layer] = float(hess[start:start + s.numel(), start:start + s.numel()].trace())
        start += s.numel()
    return out
