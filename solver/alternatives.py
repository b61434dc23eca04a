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

from solver.ilp import (ACTIVATION, FEASIBILITY_TOL, MEMORY, BitAllocation, BudgetError, IlpInputs, allocation,
                        budget_limits, unit_value)


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
    cost = {k: unit_cost(inputs, lim["resource"]) for k, lim in limits.items()}
    room = {k: lim["bound"] + FEASIBILITY_TOL * lim["scale"] for k, lim in limits.items()}
    choice = np.argmin(sum(cost[k] / limits[k]["scale"] for k in limits), axis=1) if limits else \
        np.zeros(n_units, int)

    def fits(trial):
        return all(unit_value(inputs, lim["resource"], trial) <= room[k] for k, lim in limits.items())
    if not fits(choice):
        raise BudgetError(f"budgets {dict(budgets)} cannot be filled from the cheapest width of every unit")
    moved = True
    while moved:
        moved = False
        for u in order:
            for col in range(len(inputs.bits) - 1, choice[u], -1):
                trial = choice.copy()
                trial[u] = col
                if fits(trial):
                    choice, moved = trial, True
                    break
    return allocation(inputs, choice, limits, 0.0)


def unit_cost(inputs: IlpInputs, resource: str) -> np.ndarray:
    """(units, bits): what each unit's width costs of `resource`; memory counts a unit's size and its activation."""
    if resource == MEMORY:
        return inputs.unit_resources["size_mib"] + inputs.unit_resources[ACTIVATION]
    return inputs.unit_resources[resource]


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
