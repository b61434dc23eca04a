"""Data-free calibration and sensitivity data, after ZeroQ (Cai et al., CVPR 2020): images distilled from the
model's own BatchNorm statistics.

Each batch starts as Gaussian noise (seeded) and is optimized by Adam so that, at every BatchNorm layer with
running statistics, the batch mean and standard deviation of the layer's input match its running_mean and
sqrt(running_var), and the image itself has the mean 0 / std 1 per channel of normalized data:

    loss = sum_BN ( ||mu_B - running_mean||_2 + ||sigma_B - sqrt(running_var)||_2 ) + ||mu_x||_2 + ||sigma_x - 1||_2

with mu_B, sigma_B per channel over the batch and every position (sigma = sqrt(var + eps), eps the layer's). The
model is in eval mode and its weights are not touched (the gradient is taken with respect to the images only).
Batches are optimized one by one, each from its own seed (seed, split, batch index), so the images of one batch do
not depend on how many are asked for, and on one machine a seed gives the same images bit for bit.

`distilled_images` keeps the result in a folder (a run folder's `distilled/`), keyed by a hash of the model's
weights and every setting: a rerun with the same weights and settings reads the file, a changed model makes new
images. The file holds plain tensors (read with weights_only=True) and their digest; one that does not hold what its
name says is made again, with a notice.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from hawq_ray.contract import HawqError
from hawq_ray.contract.integrity import arrays_digest, digest

ALGORITHM = "zeroq-bn-l2/1"     # changes when what the images are changes: cached images of another version are remade
NO_BATCHNORM = ("model {name} has no BatchNorm layer: data: distilled needs BatchNorm running statistics; give real "
                "data or 'synthetic'")
UNTRAINED = ("model {name}'s BatchNorm layers hold their initial running statistics (mean 0, variance 1): it was never "
             "trained, so there is nothing to distill; data: distilled needs trained weights (weights: FILE or "
             "pretrained: true)")
LOG_EVERY_S = 30.0               # within a long batch, a progress line at most this often


@dataclasses.dataclass(frozen=True)
class DistillSettings:
    """How many images and how they are optimized (run.yaml's `distilled`)."""
    train: int = 256                 # images of the calibration / sensitivity / fine-tuning split
    test: int = 128                  # images of the held-out split (another seed)
    steps: int = 500                 # Adam steps per batch (ZeroQ's 500)
    batch_size: int = 64             # images optimized together: the batch whose statistics match BN's
    lr: float = 0.2                  # Adam's learning rate, decayed to 1% by a cosine over the steps

    def __post_init__(self):
        for name in ("train", "test", "steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HawqError(f"distilled.{name}: {value!r} is not valid; valid: a positive integer")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise HawqError(f"distilled.lr: {self.lr!r} is not valid; valid: a positive number")


# ------------------------------------------------------------------------------------------------ BatchNorm layers
def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, module) of every BatchNorm layer that keeps running statistics, in definition order."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
            and m.running_mean is not None and m.running_var is not None]


def check_distillable(model: nn.Module, name: str | None = None, *, trained: bool = True) -> list:
    """The model's BatchNorm layers; a one-line HawqError when it has none (or, with `trained`, when every one still
    holds its initial statistics: mean 0, variance 1)."""
    label = name or type(model).__name__
    layers = batchnorm_layers(model)
    if not layers:
        raise HawqError(NO_BATCHNORM.format(name=label))
    if trained and all(bool((m.running_mean == 0).all()) and bool((m.running_var == 1).all()) for _, m in layers):
        raise HawqError(UNTRAINED.format(name=label))
    return layers


class _Inputs:
    """Forward pre-hooks that keep each BatchNorm layer's input of the last forward pass."""

    def __init__(self, layers):
        self.layers, self.seen, self.handles = layers, {}, []

    def __enter__(self):
        for name, module in self.layers:
            self.handles.append(module.register_forward_pre_hook(
                lambda mod, args, name=name: self.seen.__setitem__(name, args[0])))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def _channel_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (axis 1) mean and sqrt(var + eps) over the batch and every other axis (var unbiased, as BN's
    running_var is)."""
    flat = x.transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), torch.sqrt(flat.var(1, unbiased=True) + eps)


def bn_loss(model: nn.Module, images: torch.Tensor, layers=None, *, per_layer: bool = False):
    """The distillation loss of `images` (a tensor, graph kept), or with `per_layer` also
    {layer: (||mu - running_mean||_2, ||sigma - sqrt(running_var)||_2)} as floats."""
    layers = layers if layers is not None else check_distillable(model, trained=False)
    with _Inputs(layers) as hooked:
        model(images)
    total = images.new_zeros(())
    parts = {}
    for name, m in layers:
        if name not in hooked.seen:            # a BatchNorm the forward pass does not reach
            continue
        mean, std = _channel_stats(hooked.seen[name].float(), m.eps)
        mean_err = torch.linalg.vector_norm(mean - m.running_mean)
        std_err = torch.linalg.vector_norm(std - torch.sqrt(m.running_var + m.eps))
        total = total + mean_err + std_err
        if per_layer:
            parts[name] = (float(mean_err), float(std_err))
    mean, std = _channel_stats(images, 0.0)
    total = total + torch.linalg.vector_norm(mean) + torch.linalg.vector_norm(std - 1)
    return (total, parts) if per_layer else total


# ------------------------------------------------------------------------------------------------ distillation
def batch_seed(seed: int, split: str, index: int) -> int:
    """The seed of one batch's starting noise: (seed, split, batch index), 63 bits."""
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{split}:{int(index)}".encode()).digest()[:8], "big") >> 1


def distill_images(model: nn.Module, input_shape, count: int, seed: int = 0, *, steps: int = DistillSettings.steps,
                   lr: float = DistillSettings.lr, batch_size: int = DistillSettings.batch_size, split: str = "train",
                   name: str | None = None, log: Callable | None = None) -> torch.Tensor:
    """`count` images of `input_shape` (C, H, W) distilled from `model`'s BatchNorm statistics (see the module's
    docstring); a float32 tensor (count, C, H, W) on the CPU. Deterministic for a seed on the CPU (same machine and
    thread count). `log(line)`: a progress line per batch (and every LOG_EVERY_S seconds within a long one)."""
    settings = DistillSettings(train=count, steps=steps, batch_size=batch_size, lr=lr)   # checks the values
    layers = check_distillable(model, name)
    shape = tuple(input_shape)
    if len(shape) != 3 or not all(isinstance(v, int) and v > 0 for v in shape):
        raise HawqError(f"input shape {input_shape!r} is not valid; valid: (C, H, W), each a positive integer")
    label = name or type(model).__name__
    device = next(iter(model.parameters()), torch.empty(0)).device
    was_training = model.training
    model.eval()
    out, n_batches = [], math.ceil(count / settings.batch_size)
    t0 = time.time()
    try:
        for k in range(n_batches):
            size = min(settings.batch_size, count - k * settings.batch_size)
            if size < 2:        # one image has no variance: take a pair and keep the first
                size = 2
            generator = torch.Generator().manual_seed(batch_seed(seed, split, k))
            x = torch.randn((size, *shape), generator=generator).to(device).requires_grad_(True)
            first, last = _optimize(model, layers, x, settings, log, label, k, n_batches)
            out.append(x.detach().cpu()[:min(size, count - k * settings.batch_size)])
            if log:
                log(f"[distill] {label} {split}: batch {k + 1}/{n_batches} ({len(out[-1])} images, {settings.steps} "
                    f"steps): BatchNorm loss {first:.4g} -> {last:.4g}, {time.time() - t0:.1f} s so far")
    finally:
        model.train(was_training)
    return torch.cat(out).float().contiguous()


def _optimize(model, layers, x, settings: DistillSettings, log, label, k, n_batches) -> tuple[float, float]:
    """Adam on the images `x` in place, lr by a cosine from settings.lr to 1% of it; (first loss, last loss)."""
    optimizer = torch.optim.Adam([x], lr=settings.lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, settings.steps, eta_min=settings.lr / 100)
    first = last = float("nan")
    shown = time.time()
    for step in range(settings.steps):
        loss = bn_loss(model, x, layers)
        if not torch.isfinite(loss):
            raise HawqError(f"distilling images from {label}: the BatchNorm loss is {loss.item()} at step {step + 1}; "
                            f"valid weights have finite BatchNorm statistics (check the weights file for NaN/inf)")
        (grad,) = torch.autograd.grad(loss, [x])      # the images' gradient only: the weights are left alone
        x.grad = grad
        optimizer.step()
        schedule.step()
        last = float(loss.detach())
        if step == 0:
            first = last
        if log and time.time() - shown > LOG_EVERY_S:
            shown = time.time()
            log(f"[distill] {label}: batch {k + 1}/{n_batches}, step {step + 1}/{settings.steps}, BatchNorm loss "
                f"{last:.4g}")
    with torch.no_grad():
        last = float(bn_loss(model, x, layers))
    return first, last


# ------------------------------------------------------------------------------------------------ the cache
def distill_key(model: nn.Module, input_shape, count: int, seed: int, split: str, settings: DistillSettings) -> str:
    """What one split's images are recognized by: the weights (every tensor of the state dict), the input shape,
    the count, seed and split, the optimization settings and the algorithm."""
    weights = arrays_digest(sorted(model.state_dict().items()))
    return digest(ALGORITHM, weights, list(input_shape), int(count), int(seed), split, settings.steps,
                  settings.batch_size, float(settings.lr))[:24]


def distilled_images(model: nn.Module, input_shape, count: int, seed: int, split: str, settings: DistillSettings,
                     *, cache_dir=None, name: str | None = None, log: Callable | None = None) -> tuple[torch.Tensor, str]:
    """(images, key): `distill_images` of one split, read from `cache_dir/<split>-<key>.pt` when that file holds
    them, else made and written there (no cache when `cache_dir` is None)."""
    check_distillable(model, name)
    key = distill_key(model, input_shape, count, seed, split, settings)
    path = Path(cache_dir) / f"{split}-{key}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        images, why = _read_cached(path, key, (count, *input_shape))
        if images is not None:
            if log:
                log(f"[distill] {split}: reused {count} distilled images ({path.name})")
            return images, key
        if log:
            log(f"[distill] {split}: {path.name} is damaged ({why}): distilling again")
    images = distill_images(model, input_shape, count, seed, steps=settings.steps, lr=settings.lr,
                            batch_size=settings.batch_size, split=split, name=name, log=log)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        torch.save({"images": images, "key": key, "digest": arrays_digest([("images", images)])}, tmp)
        tmp.replace(path)                          # a killed run never leaves half a file under the key's name
    return images, key


def _read_cached(path: Path, key: str, shape: tuple) -> tuple[torch.Tensor | None, str]:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever torch raises on a file it cannot read: remake it
        return None, f"unreadable: {(str(e).splitlines() or [type(e).__name__])[0][:100]}"
    if not isinstance(saved, dict) or saved.get("key") != key or not isinstance(saved.get("images"), torch.Tensor):
        return None, "not the images of this key"
    images = saved["images"]
    if tuple(images.shape) != shape or images.dtype != torch.float32 or not bool(torch.isfinite(images).all()):
        return None, "not the shape, type or finite values recorded"
    if saved.get("digest") != arrays_digest([("images", images)]):
        return None, "its digest differs from its images"
    return images.contiguous(), ""
