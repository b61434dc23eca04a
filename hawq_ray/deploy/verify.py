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
