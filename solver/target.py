"""The cheapest config whose accuracy stays within a drop of fp32: a search over the ILP's answers along one
budget axis, fine-tuning as few of them as it can.

The ILP's config at each budget fraction r of the minimized resource (a grid at the run's resolution) gives a
chain of distinct configs, cheapest first. Accuracy after fine-tuning rises along the chain about monotonically,
so the search bisects it: the most expensive config first (if even it misses the target, no config meets it),
then, round after round, `width` untested configs spread over the open bracket between the most expensive
failing config below the cheapest passing one and that passing one. It stops when the bracket holds no untested
config. The answer is the cheapest config that passed among all tested, so no tested config that is cheaper
meets the target, even where accuracy is not monotone. A chain of n configs takes about log2(n) rounds of
`width` trials instead of n.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from hawq_ray.contract.table import BIT_WIDTHS
from solver.ilp import BUDGET_KEYS, BudgetError
from solver.sweep import sweep_budgets

MINIMIZE = ("size", "bops", "latency", "activation", "memory")     # the fraction keys of solver.ilp.BUDGET_KEYS


@dataclasses.dataclass(frozen=True)
class TargetAnswer:
    """`answer`: the cheapest passing config (None if none passed); `below`: the most expensive config cheaper
    than it that was tested and failed (None if none); `closest`: the tested config of the highest accuracy (what
    an unreachable target reports); `tested`: how many configs were fine-tuned."""
    answer: object
    below: object
    closest: object
    tested: int


def budget_chain(table: pd.DataFrame, minimize: str, resolution: float, bits: Sequence[int] = BIT_WIDTHS,
                 solve=None) -> pd.DataFrame:
    """The distinct ILP configs of the budget fractions 0, resolution, ..., 1 of `minimize` (solver.sweep's
    config rows), cheapest first in that resource (ties: lower objective first)."""
    if minimize not in MINIMIZE:
        raise BudgetError(f"minimize {minimize!r}: unknown; valid: {', '.join(MINIMIZE)}")
    if not (isinstance(resolution, (int, float)) and 0 < resolution <= 1):
        raise BudgetError(f"resolution {resolution!r}: give a budget fraction step in (0, 1], e.g. 0.05")
    steps = int(round(1 / resolution))
    grid = [{minimize: float(r)} for r in np.unique(np.append(np.arange(steps + 1) * resolution, 1.0).clip(0, 1))]
    configs = sweep_budgets(table, grid, bits, solve=solve).configs
    return configs.sort_values([BUDGET_KEYS[minimize][0], "objective"], kind="stable").reset_index(drop=True)


def passes(accuracy: float, floor: float) -> bool:
    return math.isfinite(accuracy) and accuracy >= floor


def next_round(chain: Sequence, results: Mapping, floor: float, width: int = 1) -> list:
    """The configs to fine-tune next (cheapest first), [] when the search is done. `chain`: config ids cheapest
    first; `results`: {config: accuracy} of the ones tested so far (NaN: its trial failed, counts as missing)."""
    if not chain:
        return []
    if chain[-1] not in results:
        spread = _spread(range(len(chain) - 1), width - 1)
        return [chain[i] for i in spread] + [chain[-1]]
    lo, hi = _bracket(chain, results, floor)
    if hi is None:
        return []
    return [chain[i] for i in _spread([i for i in range(lo + 1, hi) if chain[i] not in results], width)]


def answer(chain: Sequence, results: Mapping, floor: float) -> TargetAnswer:
    lo, hi = _bracket(chain, results, floor)
    tested = [c for c in chain if c in results]
    finite = [c for c in tested if math.isfinite(results[c])]
    closest = max(finite, key=lambda c: results[c], default=None)
    return TargetAnswer(chain[hi] if hi is not None else None, chain[lo] if lo is not None and lo >= 0 else None,
                        closest, len(tested))


def _bracket(chain: Sequence, results: Mapping, floor: float) -> tuple:
    """(index of the most expensive tested config below `hi` that failed, or -1; index of the cheapest tested
    config that passed, or None)."""
    passing = [i for i, c in enumerate(chain) if c in results and passes(results[c], floor)]
    if not passing:
        return None, None
    hi = passing[0]
    failing = [i for i, c in enumerate(chain[:hi]) if c in results]
    return (failing[-1] if failing else -1), hi


def _spread(indices: Sequence[int], count: int) -> list[int]:
    """`count` of `indices` at even steps (their interior quantiles: a bisection when count is 1)."""
    indices = list(indices)
    if count <= 0 or not indices:
        return []
    if count >= len(indices):
        return indices
    return sorted({indices[(k + 1) * len(indices) // (count + 1)] for k in range(count)})
