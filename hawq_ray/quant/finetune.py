"""Quantization-aware fine-tuning at a bit config (Appendix H), the fp32 trainer of the default model, and top-1
accuracy measured with the integer executor (the accuracy of the deployed integers, not of a float simulation).

The recipe's defaults are the paper's: SGD (momentum 0.9) with learning rate 1e-4, weight decay 1e-4, batch size
128 (or the train split's size if smaller), activation-range EMA momentum 0.99 (`ACT_MOMENTUM`, fixed in the QAT
modules) and BN folded and frozen (`prepare` folds it; `QuantModel.train()` keeps BN in eval). Distillation is
Hinton's: loss = alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y), with HAWQ's defaults
T = 6, alpha = 0.95 (its quant_train.py).

`finetune_epochs` is a generator: it yields after every epoch so a caller (the Ray Tune driver) can checkpoint,
report and stop; `finetune` runs it to the end and returns one result row.
"""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from hawq_ray.contract import HawqError
from hawq_ray.contract.integrity import arrays_digest
from hawq_ray.contract.bits import parse_bits
from hawq_ray.contract.cost import config_costs
from hawq_ray.program.executor import run_program
from hawq_ray.quant.qat import QuantModel, prepare
from hawq_ray.quant.quantizers import ACT_MOMENTUM

FP32_WEIGHTS_FILE = "weights/{name}_fp32.pt"     # under the run folder


@dataclasses.dataclass(frozen=True)
class Recipe:
    """QAT hyperparameters; the defaults are HAWQ-V3's (Appendix H) except `epochs`."""
    lr: float = 1e-4
    weight_decay: float = 1e-4
    batch_size: int = 128
    momentum: float = 0.9            # SGD momentum (HAWQ's quant_train.py)
    epochs: int = 3
    calib_batches: int = 4           # batches of the train split that set the activation ranges before training
    distill: bool = False
    temperature: float = 6.0
    distill_alpha: float = 0.95
    seed: int = 0
    act_momentum: float = ACT_MOMENTUM  # informative: the QAT modules use this value

    def __post_init__(self):
        for name in ("lr", "temperature"):
            if not getattr(self, name) > 0:
                raise HawqError(f"{name} {getattr(self, name)!r} is not valid; valid: a positive number")
        if self.weight_decay < 0 or not 0 <= self.distill_alpha <= 1:
            raise HawqError("weight decay must be >= 0 and distill alpha in [0, 1]")
        for name in ("batch_size", "calib_batches"):
            if int(getattr(self, name)) < 1:
                raise HawqError(f"{name} {getattr(self, name)!r} is not valid; valid: a positive integer")
        if int(self.epochs) < 0:
            raise HawqError(f"epochs {self.epochs!r} is not valid; valid: 0 or more")


# ---------------------------------------------------------------------------------------------- data helpers
def checked_split(dataset: Dataset, name: str) -> Dataset:
    if dataset is None or len(dataset) == 0:
        raise HawqError(f"the {name} split is empty: give data with at least one {name} sample")
    return dataset


def limited(dataset: Dataset, limit: int | None) -> Dataset:
    """The first `limit` samples (all if None)."""
    return dataset if limit is None or limit >= len(dataset) else Subset(dataset, range(int(limit)))


def loader(dataset: Dataset, batch_size: int, shuffle_seed: int | None = None) -> DataLoader:
    """Batches of `dataset`; shuffled by a generator seeded per epoch, so a resumed run sees the same order."""
    gen = torch.Generator().manual_seed(shuffle_seed) if shuffle_seed is not None else None
    return DataLoader(dataset, batch_size=min(batch_size, len(dataset)), shuffle=gen is not None, generator=gen)


def labels_of(dataset: Dataset) -> torch.Tensor:
    return torch.cat([y for _, y in loader(dataset, 512)]).long()


# ---------------------------------------------------------------------------------------------- evaluation
def top1(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of predictions equal to the labels (0..1)."""
    return float((predictions.cpu() == labels.cpu()).double().mean())


@torch.no_grad()
def float_logits(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> torch.Tensor:
    """A float model's (or a QuantModel's QAT simulation's) logits, in eval mode."""
    was = model.training
    model.eval()
    try:
        return torch.cat([model(x).cpu() for x, _ in loader(dataset, batch_size)])
    finally:
        model.train(was)


def float_predictions(model: nn.Module, dataset: Dataset, batch_size: int = 256) -> torch.Tensor:
    """argmax of `float_logits`."""
    return float_logits(model, dataset, batch_size).argmax(1)


@torch.no_grad()
def integer_logits(qm: QuantModel, dataset: Dataset, batch_size: int = 256) -> torch.Tensor:
    """The deployed integers' logits: the IntegerProgram run by the integer executor, its INT32 output
    dequantized (float64; per-class output scales)."""
    program = qm.to_integer()
    return torch.cat([program.dequantize_output(run_program(program, program.quantize_input(x)))
                      for x, _ in loader(dataset, batch_size)])


def integer_predictions(qm: QuantModel, dataset: Dataset, batch_size: int = 256) -> torch.Tensor:
    """The class the deployed integers predict: the argmax of the dequantized logits (per-class output scales,
    so not the argmax of the raw integers)."""
    return integer_logits(qm, dataset, batch_size).argmax(1)


# ---------------------------------------------------------------------------------------------- fp32 trainer
def train_fp32(model: nn.Module, train: Dataset, *, epochs: int = 8, lr: float = 0.1, batch_size: int = 64,
               weight_decay: float = 5e-4, shift: int = 0, seed: int = 0) -> nn.Module:
    """Train a float model from scratch (SGD, momentum 0.9, one-cycle schedule); returns it in eval mode.
    `shift` > 0 moves each batch by a random whole number of pixels in [-shift, shift] along H and W (cyclically,
    seeded): the augmentation a vision transformer needs on a small dataset."""
    checked_split(train, "train")
    steps = epochs * len(loader(train, batch_size))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    moves = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        for x, y in loader(train, batch_size, shuffle_seed=seed * 1000 + epoch):
            if shift:
                dy, dx = (int(v) for v in torch.randint(-shift, shift + 1, (2,), generator=moves))
                x = torch.roll(x, (dy, dx), (2, 3))
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


def fp32_weights(run_dir, data, *, model_name: str = "digits_resnet", epochs: int | None = None, seed: int = 0):
    """A model's fp32 weights, trained on `data` once (an embedded model by its recipe, `inputs.models.FP32_RECIPES`,
    any other by `train_fp32`'s defaults; `epochs` overrides the epochs) and cached in `run_dir` (a later call loads
    the file). Returns (model in eval mode, weights path, trained_now)."""
    from hawq_ray.inputs.models import FP32_RECIPES, get_model, load_weights
    path = Path(run_dir) / FP32_WEIGHTS_FILE.format(name=model_name)
    model = get_model(model_name)
    if path.is_file():
        return load_weights(model, path).eval(), path, False
    recipe = {**FP32_RECIPES.get(model_name, {}), **({"epochs": epochs} if epochs is not None else {})}
    train_fp32(model, checked_split(data.train, "train"), seed=seed, **recipe)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(model.state_dict(), tmp)
    tmp.replace(path)                                   # a killed run never leaves half a file behind
    return model, path, True


# ---------------------------------------------------------------------------------------------- teacher
def load_teacher(spec, fp32_model: nn.Module, input_shape, num_classes: int, *, cache_dir=None) -> nn.Module:
    """The distillation teacher: the fp32 model itself (spec None or 'fp32'), a pytorchcv model name (weights from
    the local pytorchcv cache, nothing downloaded), or a weights file `NAME=PATH`. Checked by one forward pass."""
    from hawq_ray.inputs.models import get_model
    if spec in (None, "", "fp32"):
        teacher = copy.deepcopy(fp32_model)
    elif isinstance(spec, nn.Module):
        teacher = spec
    else:
        name, _, weights = str(spec).partition("=")
        try:
            teacher = get_model(name, pretrained=not weights, weights=weights or None, cache_dir=cache_dir)
        except HawqError as e:
            raise HawqError(f"teacher {spec!r} cannot be loaded: {e}") from None
    teacher = teacher.eval()
    try:
        with torch.no_grad():
            out = teacher(torch.zeros((2, *input_shape)))
    except Exception as e:  # noqa: BLE001 - wrong input size or channels: a user input error
        raise HawqError(f"teacher {spec!r} cannot run on inputs {tuple(input_shape)}: "
                        f"{(str(e).splitlines() or [type(e).__name__])[0]}") from None
    if out.dim() != 2 or out.shape[1] != num_classes:
        raise HawqError(f"teacher {spec!r} gives {tuple(out.shape[1:])} outputs; the student has {num_classes} classes")
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def distillation_loss(student_logits, teacher_logits, labels, temperature: float, alpha: float) -> torch.Tensor:
    """Hinton et al. (2014): alpha * T^2 * KL(p_teacher^T || p_student^T) + (1 - alpha) * CE(student, labels)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, 1), F.softmax(teacher_logits / t, 1), reduction="batchmean")
    return alpha * t * t * kl + (1 - alpha) * F.cross_entropy(student_logits, labels)


# ---------------------------------------------------------------------------------------------- QAT
def calibrated(model: nn.Module, bits, train: Dataset, recipe: Recipe, input_shape,
               table: pd.DataFrame | None = None) -> QuantModel:
    """prepare + calibrate on the first `calib_batches` batches of the train split (no training: PTQ)."""
    qm = prepare(model, bits, input_shape, table)
    batches = [x for i, (x, _) in zip(range(recipe.calib_batches), loader(train, recipe.batch_size))]
    return qm.calibrate(batches)


def finetune_epochs(qm: QuantModel, train: Dataset, recipe: Recipe, *, teacher: nn.Module | None = None,
                    start_epoch: int = 0, optimizer_state: dict | None = None, device=None):
    """Train `qm` in place, one epoch per step of the generator; yields (epoch, mean loss, optimizer) with `qm` in
    eval mode. `start_epoch` and `optimizer_state` continue an interrupted run (the batch order depends only on the
    seed and the epoch). `device`: where the batches go (the caller moves `qm` and the teacher there)."""
    checked_split(train, "train")
    opt = torch.optim.SGD(qm.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    if optimizer_state is not None:
        opt.load_state_dict(optimizer_state)
    if recipe.distill and teacher is None:
        raise HawqError("distillation needs a teacher (see load_teacher)")
    for epoch in range(start_epoch, recipe.epochs):
        qm.train()
        total, count = 0.0, 0
        for x, y in loader(train, recipe.batch_size, shuffle_seed=recipe.seed * 1000 + epoch):
            if device is not None:
                x, y = x.to(device), y.to(device)
            logits = qm(x)
            if recipe.distill:
                with torch.no_grad():
                    t_logits = teacher(x)
                loss = distillation_loss(logits, t_logits, y, recipe.temperature, recipe.distill_alpha)
            else:
                loss = F.cross_entropy(logits, y)
            if not torch.isfinite(loss):
                raise HawqError(f"fine-tuning diverged at epoch {epoch + 1}: the loss is {loss.item()}; lower the "
                                f"learning rate (now {recipe.lr:g})")
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += loss.item() * len(y)
            count += len(y)
        qm.eval()
        yield epoch, total / count, opt


def finetune(model: nn.Module, bits, data, recipe: Recipe = Recipe(), *, input_shape=None, teacher=None,
             train_limit: int | None = None) -> tuple[QuantModel, dict]:
    """QAT of `model` at `bits` on `data` (a DataSplits); returns (trained QuantModel, result row).

    The row: bits, size_mib, gbops, top1_fp32 (float model), top1_ptq (calibrated, no training) and top1 (after
    fine-tuning), both by the integer executor on the held-out split; int_matches_qat (fraction of held-out
    samples where the integer executor's prediction equals the QAT simulation's); loss per epoch."""
    from hawq_ray.inputs.models import input_shape as model_input_shape
    input_shape = tuple(input_shape or model_input_shape(model))
    train = limited(checked_split(data.train, "train"), train_limit)
    test = checked_split(data.test, "test")
    from hawq_ray.quant.layers import layer_table
    table = layer_table(model, input_shape)
    bits = parse_bits(bits, table)
    if recipe.distill:
        teacher = load_teacher(teacher, model, input_shape, data.num_classes)
    labels = labels_of(test)
    qm = calibrated(model, bits, checked_split(train, "train"), recipe, input_shape, table)
    row = {"bits": bits.as_dict(), **config_costs(table, bits),
           "top1_fp32": top1(float_predictions(model, test, recipe.batch_size), labels),
           "top1_ptq": top1(integer_predictions(qm, test, recipe.batch_size), labels), "losses": []}
    for _, loss, _ in finetune_epochs(qm, train, recipe, teacher=teacher):
        row["losses"].append(loss)
    preds = integer_predictions(qm, test, recipe.batch_size)
    row["top1"] = top1(preds, labels)
    row["int_matches_qat"] = top1(preds, float_predictions(qm, test, recipe.batch_size))
    return qm, row


# ---------------------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path, qm: QuantModel, optimizer, epoch: int, extra: dict | None = None) -> Path:
    """torch.save of plain tensors and numbers only, so `load_checkpoint` can read it with weights_only=True."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": qm.state_dict(), "optimizer": optimizer.state_dict(), "epoch": int(epoch),
                "extra": dict(extra or {})}, path)
    return path


def load_checkpoint(path) -> dict:
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise HawqError(f"cannot load checkpoint {path}: {(str(e).splitlines() or [type(e).__name__])[0]}") from None


def weights_digest(state: dict) -> str:
    """What fp32 weights are recognized by in a run's fingerprints (`contract.integrity.arrays_digest`)."""
    return arrays_digest(sorted(state.items()))