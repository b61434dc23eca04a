"""Data-free mode (`data: distilled`, `inputs.distill`, after ZeroQ): the distilled images' BatchNorm statistics
approach the running ones (measured by torch's own BatchNorm, not by the code under test), a seed gives the same
images, a model without BatchNorm is refused before any work, the run folder's cache is reused and remade when the
weights change, and a tiny `hawq-ray run` on distilled data completes and says it saw no real image."""
from __future__ import annotations

import copy
import json

import pytest
import ray
import torch
from torch import nn

from hawq_ray.contract import HawqError
from hawq_ray.inputs import distill
from hawq_ray.inputs.data import DISTILLED_NOTE, check_source, load_data
from hawq_ray.inputs.distill import DistillSettings, bn_loss, distill_images, distilled_images

SHAPE = (1, 8, 8)
FAST = dict(steps=100, lr=0.2, batch_size=32)


class TinyBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


class NoBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(1, 4, 3), nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def with_statistics(model, shape=SHAPE, seed=1, batches=20):
    """`model` with BatchNorm running statistics of smooth random images, normalized to mean 0 / std 1 as data is
    (train-mode passes, no weight update): far from BN's initial mean 0 / variance 1."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None                  # a cumulative average over the passes
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            x = torch.nn.functional.avg_pool2d(torch.randn((32, *shape), generator=g), 3, 1, 1) + 0.5
            model((x - x.mean()) / x.std())
    return model.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return with_statistics(TinyBN())


def batch_statistics(model, images):
    """{BN name: (batch mean, unbiased batch variance)} by torch's BatchNorm itself: a copy in train mode with
    momentum 1 sets its running statistics to those of the batch."""
    probe = copy.deepcopy(model)
    for m in probe.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum, m.running_mean, m.running_var = 1.0, torch.zeros_like(m.running_mean), torch.ones_like(m.running_var)
    probe.train()
    with torch.no_grad():
        probe(images)
    return {n: (m.running_mean.clone(), m.running_var.clone()) for n, m in probe.named_modules()
            if isinstance(m, nn.BatchNorm2d)}


def mismatch(model, images):
    """{BN name: (mean |mu - running_mean|, mean |sigma - sqrt(running_var)|)} by `batch_statistics`."""
    target = dict(model.named_modules())
    out = {}
    for name, (mean, var) in batch_statistics(model, images).items():
        bn = target[name]
        out[name] = (float((mean - bn.running_mean).abs().mean()),
                     float((var.sqrt() - bn.running_var.sqrt()).abs().mean()))
    return out


def test_distilled_batch_statistics_approach_the_running_ones(model):
    images = distill_images(model, SHAPE, 32, seed=0, **FAST)
    noise = torch.randn((32, *SHAPE), generator=torch.Generator().manual_seed(5))
    before, after = mismatch(model, noise), mismatch(model, images)
    scale = {n: float(m.running_var.sqrt().mean()) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for name, (mean_err, std_err) in after.items():
        assert mean_err < 0.01 * scale[name] and std_err < 0.01 * scale[name], (name, after[name], scale[name])
        assert mean_err + std_err < sum(before[name]) / 20, (name, after[name], before[name])
    with torch.no_grad():       # measured here: 0.64 for the noise, about 0.001 after 100 steps
        assert float(bn_loss(model, images)) < float(bn_loss(model, noise)) / 100
    per_channel = images.transpose(0, 1).reshape(1, -1)        # the input term: mean 0, std 1 of normalized data
    assert abs(float(per_channel.mean())) < 0.05 and abs(float(per_channel.std()) - 1) < 0.05
    assert images.shape == (32, *SHAPE) and images.dtype == torch.float32 and not images.requires_grad
    assert not any(p.grad is not None for p in model.parameters())     # the weights are left alone
    assert not model.training


def test_a_seed_gives_the_same_images_and_another_seed_others(model):
    a = distill_images(model, SHAPE, 10, seed=3, steps=20, batch_size=4)
    b = distill_images(model, SHAPE, 10, seed=3, steps=20, batch_size=4)
    c = distill_images(model, SHAPE, 10, seed=4, steps=20, batch_size=4)
    assert torch.equal(a, b) and not torch.equal(a, c) and a.shape == (10, *SHAPE)
    # each batch from its own seed: the first batches do not depend on the count asked for
    assert torch.equal(distill_images(model, SHAPE, 8, seed=3, steps=20, batch_size=4), a[:8])


def test_a_model_without_batchnorm_is_one_line_before_any_work(monkeypatch):
    def no_work(*args, **kwargs):
        raise AssertionError("no optimization should start")
    monkeypatch.setattr(distill, "_optimize", no_work)
    with pytest.raises(HawqError) as e:
        distill_images(NoBN(), SHAPE, 8, seed=0)
    assert str(e.value) == ("model NoBN has no BatchNorm layer: data: distilled needs BatchNorm running statistics; "
                            "give real data or 'synthetic'")
    with pytest.raises(HawqError, match="model tiny has no BatchNorm layer"):
        load_data("distilled", input_shape=SHAPE, model=NoBN(), model_name="tiny")
    with pytest.raises(HawqError, match="initial running statistics.*never trained"):
        distill_images(TinyBN(), SHAPE, 8, seed=0)
    with pytest.raises(HawqError, match="needs the model"):
        load_data("distilled", input_shape=SHAPE)
    with pytest.raises(HawqError, match="distilled.steps"):
        DistillSettings(steps=0)
    check_source("distilled")                     # run.yaml's data: distilled passes the check before any work


def test_the_cache_is_reused_and_remade_for_other_weights(model, tmp_path, monkeypatch):
    settings = DistillSettings(train=12, test=6, steps=15, batch_size=8)
    lines = []
    first, key = distilled_images(model, SHAPE, 12, 0, "train", settings, cache_dir=tmp_path, log=lines.append)
    assert (tmp_path / f"train-{key}.pt").is_file() and not any("reused" in x for x in lines)

    made = []
    real = distill.distill_images
    monkeypatch.setattr(distill, "distill_images", lambda *a, **k: made.append(1) or real(*a, **k))
    again, key2 = distilled_images(model, SHAPE, 12, 0, "train", settings, cache_dir=tmp_path, log=lines.append)
    assert key2 == key and torch.equal(again, first) and not made and "reused" in lines[-1]

    other = copy.deepcopy(model)                  # changed weights: other images, under another key
    with torch.no_grad():
        other.conv1.weight[0, 0, 0, 0] += 0.5
    changed, key3 = distilled_images(other, SHAPE, 12, 0, "train", settings, cache_dir=tmp_path)
    assert key3 != key and made == [1] and not torch.equal(changed, first)
    _, key4 = distilled_images(model, SHAPE, 12, 0, "train", DistillSettings(train=12, steps=16, batch_size=8),
                               cache_dir=tmp_path)
    assert key4 not in (key, key3) and made == [1, 1]          # other settings: another key too

    saved = torch.load(tmp_path / f"train-{key}.pt", weights_only=True)   # damaged: remade, with a notice
    saved["images"][0, 0, 0, 0] += 1
    torch.save(saved, tmp_path / f"train-{key}.pt")
    remade, _ = distilled_images(model, SHAPE, 12, 0, "train", settings, cache_dir=tmp_path, log=lines.append)
    assert torch.equal(remade, first) and made == [1, 1, 1] and any("damaged (its digest differs" in x for x in lines)


def test_distilled_splits_are_labelled_by_the_model(model, tmp_path):
    splits = load_data("distilled", input_shape=SHAPE, seed=0, model=model, cache_dir=tmp_path,
                       distill={"train": 10, "test": 6, "steps": 10, "batch_size": 8})
    assert splits.distilled and not splits.synthetic and splits.name == "distilled" and splits.num_classes == 10
    (x_train, y_train), (x_test, y_test) = splits.train.tensors, splits.test.tensors
    assert x_train.shape == (10, *SHAPE) and x_test.shape == (6, *SHAPE)
    with torch.no_grad():
        assert torch.equal(y_train, model(x_train).argmax(1)) and torch.equal(y_test, model(x_test).argmax(1))
    assert not torch.equal(x_train[:6], x_test)             # the held-out split: another seed
    assert sorted(p.name.split("-")[0] for p in tmp_path.iterdir()) == ["test", "train"]


# ------------------------------------------------------------------------------------------------ the main job
TINY = {"budgets": {"bops": [0.5]}, "uniform": [], "sweep": {"draws": 2}, "data": "distilled",
        "distilled": {"train": 32, "test": 16, "steps": 30, "batch_size": 16},
        "sensitivity": {"actors": 1, "batches": 1, "batch_size": 16, "max_iter": 2, "rank": 0},
        "profile": {"batch": 1, "rounds": 1}, "evidence": {"randoms": 1},
        "tune": {"epochs": 1, "batch_size": 16}, "deploy": {"batch": 1, "inputs": 1, "rounds": 1}}


def test_run_refuses_distilled_data_it_cannot_make_before_any_work(tmp_path):
    from hawq_ray.service.pipeline import run
    with pytest.raises(HawqError, match="needs digits_resnet's trained weights.*trained on digits"):
        run({"data": "distilled"}, out=tmp_path / "a")
    with pytest.raises(HawqError, match="model digits_vit has no BatchNorm layer"):
        run({"data": "distilled", "model": "digits_vit", "weights": "w.pt"}, out=tmp_path / "b")
    with pytest.raises(HawqError, match="distilled.train: 1 is not valid"):
        run({"data": "distilled", "distilled": {"train": 1}}, out=tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture(scope="module")
def distilled_run(tmp_path_factory):
    """The main job on distilled data: the default model with BatchNorm statistics of random images (no digit)."""
    from hawq_ray.inputs.models import get_model
    from hawq_ray.service.pipeline import run
    folder = tmp_path_factory.mktemp("distilled")
    torch.manual_seed(0)
    weights = folder / "weights.pt"
    torch.save(with_statistics(get_model(), (1, 16, 16), batches=4).state_dict(), weights)
    lines = []
    started_here = not ray.is_initialized()
    try:
        tables = run({**TINY, "weights": str(weights)}, out=folder / "run", log=lines.append)
        again = []
        run({**TINY, "weights": str(weights)}, out=folder / "run", log=again.append)
    finally:
        if started_here:
            ray.shutdown()
    return folder / "run", tables, lines, again


def test_a_run_on_distilled_data_completes_and_says_it_saw_no_real_image(distilled_run):
    out, tables, lines, again = distilled_run
    text = (out / "report.md").read_text()
    assert DISTILLED_NOTE[1:] in text and "agreement with the fp32 model" in text
    assert any(DISTILLED_NOTE in x for x in lines) and any("tune.distill: on" in x for x in lines)
    assert any(x.startswith("[distill]") and "batch 2/2" in x for x in lines)        # progress lines
    assert json.loads((out / "run.json").read_text())["tune"]["distill"] is True      # no labels: distillation
    ft = tables["finetune"]
    assert (ft["error"] == "").all() and ft["data"].str.contains("no real images").all()
    assert (ft["top1_fp32"] == 1.0).all()            # the labels are the fp32 model's own predictions
    assert (tables["deploy"]["tvm_differing"] == 0).all()
    assert len(tables["evidence"]) >= 2 and (tables["evidence"]["kl"] >= 0).all()
    assert tables["sensitivity"]["trace"].notna().all()
    assert sorted(p.name.split("-")[0] for p in (out / "distilled").iterdir()) == ["test", "train"]
    # the rerun reads the same images and every stage back
    assert any("reused 32 distilled images" in x for x in again) and not any("batch 1/2" in x for x in again)
    assert any("[finetune] up to date" in x for x in again)
