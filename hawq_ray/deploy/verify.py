"""Run a compiled model and compare it with a reference output, element by element."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hawq_ray.errors import HawqError


@dataclass
class Comparison:
    elements: int
    differing: int
    max_abs_diff: int

    @property
    def exact(self) -> bool:
        return self.differing == 0


def compare(got, want) -> Comparison:
    got = np.asarray(got.numpy() if hasattr(got, "numpy") else got)
    want = np.asarray(want.numpy() if hasattr(want, "numpy") else want)
    if got.shape != want.shape:
        raise HawqError(f"compare: output shape {got.shape} differs from the reference's {want.shape}")
    diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
    return Comparison(int(diff.size), int((diff != 0).sum()), int(diff.max(initial=0)))


def verify_model(model, reference, inputs) -> Comparison:
    """Run `model` (a DeployedModel) and `reference` (callable: int8 array -> integer output) on each input
    batch and add up the comparison."""
    total = Comparison(0, 0, 0)
    for x in inputs:
        c = compare(model(x), reference(x))
        total = Comparison(total.elements + c.elements, total.differing + c.differing,
                           max(total.max_abs_diff, c.max_abs_diff))
    return total


def random_inputs(shape, batches: int = 2, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [rng.integers(-128, 128, shape).astype(np.int8) for _ in range(batches)]


def compare_values(program, model, x) -> list:
    """Every value the kernels of `model` (compiled with `every_value=True`) store, against the integer
    executor on the int8 batch `x`, in execution order: dicts of value, kernel, layer (the conv / dense
    layer the kernel computes, None for the kernels between layers), elements, differing, max_abs_diff.
    Values the back end introduces (a requantize moved before a max pool) have no executor counterpart and
    are left out; the moved op's result keeps its name and is compared."""
    import torch
    from hawq_ray.quant.executor import run_program
    x = np.asarray(x.numpy() if hasattr(x, "numpy") else x)
    _, want = run_program(program, torch.from_numpy(x), record=True)
    got = model.values(x)
    rows = []
    for v in model.manifest["values"]:
        if v["name"] not in want:
            continue
        c = compare(got[v["name"]], want[v["name"]])
        rows.append({"value": v["name"], "kernel": v["kernel"], "layer": v["layer"], "elements": c.elements,
                     "differing": c.differing, "max_abs_diff": c.max_abs_diff})
    return rows


def first_divergence(rows: list) -> dict | None:
    """The first value (in execution order) where the compiled model and the integer executor differ."""
    return next((r for r in rows if r["differing"]), None)
