"""Other allocations of the same budget, to measure the ILP's choice against (the ablation of HAWQ-V2 / V3):
random allocations and the reversed one.

A fill starts every searchable unit at its cheapest width (the least of its budgeted resources, each relative
to its range: the lowest width for size and BOPS; measured latencies need not rise with the width) and visits
the units in a given order, moving each to the highest width every budget still allows; it visits them again
until nothing moves, so that no unit is left at a width below one that would still fit. A random order gives a
random allocation that uses its budget as the ILP's answer does; visiting the units in ascending order of their
sensitivity gain Omega_u(lowest) - Omega_u(highest) gives the reversed allocation: the high widths go where the
sensitivity is lowest.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from solver.ilp import FEASIBILITY_TOL, BitAllocation, BudgetError, IlpInputs, allocation, budget_limits


def filled_allocation(inputs: IlpInputs, budgets: Mapping[str, float], order: Sequence[int]) -> BitAllocation:
    """The fill of `budgets` visiting the units in `order` (every unit once)."""
    limits = budget_limits(inputs, budgets)
    bad = [k for k, lim in limits.items() if not lim["feasible"]]
    if bad:
        raise BudgetError(f"budget {bad[0]}={limits[bad[0]]['given']:g} cannot be met: the smallest achievable "
                          f"is {limits[bad[0]]['smallest']:.6g}")
    n_units = inputs.unit_omega.shape[0]
    if sorted(order) != list(range(n_units)):
        raise ValueError(f"order {list(order)!r} must visit each of the {n_units} units once")
    cost = {k: inputs.unit_resources[lim["resource"]] for k, lim in limits.items()}
    room = {k: lim["searchable_limit"] + FEASIBILITY_TOL * lim["scale"] for k, lim in limits.items()}
    choice = np.argmin(sum(cost[k] / limits[k]["scale"] for k in limits), axis=1) if limits else \
        np.zeros(n_units, int)
    used = {k: cost[k][np.arange(n_units), choice].sum() for k in limits}
    if any(used[k] > room[k] for k in limits):
        raise BudgetError(f"budgets {dict(budgets)} cannot be filled from the cheapest width of every unit")
    moved = True
    while moved:
        moved = False
        for u in order:
            for col in range(len(inputs.bits) - 1, choice[u], -1):
                extra = {k: cost[k][u, col] - cost[k][u, choice[u]] for k in limits}
                if all(used[k] + extra[k] <= room[k] for k in limits):
                    choice[u], moved = col, True
                    for k in limits:
                        used[k] += extra[k]
                    break
    return allocation(inputs, choice, limits, 0.0)


def random_allocations(inputs: IlpInputs, budgets: Mapping[str, float], count: int, seed: int = 0,
                       exclude: Sequence[Mapping[str, int]] = ()) -> list:
    """Up to `count` distinct random fills of `budgets`, none of them one of `exclude` (fewer when the budget
    admits fewer: a tight budget has few fills), in draw order."""
    rng = np.random.default_rng(seed)
    n_units = inputs.unit_omega.shape[0]
    skip = {tuple(dict(b).values()) for b in exclude}
    found: dict[tuple, BitAllocation] = {}
    for _ in range(50 * count):
        if len(found) == count:
            break
        a = filled_allocation(inputs, budgets, rng.permutation(n_units).tolist())
        if tuple(a.bits.values()) not in skip:
            found.setdefault(tuple(a.bits.values()), a)
    return list(found.values())


def reversed_allocation(inputs: IlpInputs, budgets: Mapping[str, float]) -> BitAllocation:
    """The fill that raises the least sensitive units first."""
    gain = inputs.unit_omega[:, 0] - inputs.unit_omega[:, -1]
    return filled_allocation(inputs, budgets, np.argsort(gain, kind="stable").tolist())
