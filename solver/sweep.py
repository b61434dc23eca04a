"""Budget sweeps: solve the bit-allocation ILP for every point of a budget grid, merge identical answers.

Points are solved one after another by `solve_points`, or by whatever `solve` the caller passes (the front's
`service.sweep.ray_solve` runs chunks of the grid as Ray tasks); either way the answers are merged in grid
order, so the tables do not depend on how they were computed.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
import time
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from hawq_ray.contract.table import BIT_WIDTHS
from solver.frontier import pareto_frontiers
from solver.ilp import RESOURCES, BudgetError, IlpInputs, budget_limits, ilp_inputs, solve_inputs


def parse_axis(text: str) -> list[float]:
    """Budget values of one axis: 'start:stop:step' (stop included when the steps land on it), 'a,b,c', or 'a'."""
    s = str(text).strip()
    try:
        if ":" in s:
            start, stop, step = (float(p) for p in s.split(":"))
            if not (step > 0 and stop >= start and all(map(math.isfinite, (start, stop, step)))):
                raise ValueError
            n = math.floor((stop - start) / step + 1e-9)
            if n > 100_000:
                raise ValueError
            return [round(start + i * step, 12) for i in range(n + 1)]
        values = [float(p) for p in s.split(",") if p.strip()]
        if not values or not all(map(math.isfinite, values)):
            raise ValueError
        return values
    except ValueError:
        raise BudgetError(f"budget axis {text!r}: give start:stop:step with step > 0 and stop >= start "
                          f"(e.g. 0.1:0.9:0.1), a comma list (0.25,0.5,0.75) or one number") from None


def budget_grid(axes: Mapping[str, Sequence[float]]) -> list[dict[str, float]]:
    """The cross product of the axes, e.g. {'bops': [0.25, 0.5], 'size': [0.5]} -> two budget dicts."""
    keys = list(axes)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(list(axes[k]) for k in keys))]


@dataclasses.dataclass(frozen=True)
class Sweep:
    """`points`: one row per budget point (its budget values, feasible, config id, objective, solve_s, reason).
    `configs`: one row per distinct bit configuration (config id, objective, model totals `size_mib`, `gbops`,
    `latency_ms`, the `searchable_*` totals, `latency_limit_ms` (the tightest whole-model latency any of its
    points allowed, NaN when none had a latency budget: what its measured latency is checked against), how many
    points chose it and which (`budgets`: a list of budget dicts), `bits`: {layer: bits}).
    `frontier`: Pareto frontier of objective against each resource (see solver.frontier.pareto_frontiers)."""
    points: pd.DataFrame
    configs: pd.DataFrame
    frontier: pd.DataFrame


def sweep_budgets(table: pd.DataFrame, grid: Sequence[Mapping[str, float]], bits: Sequence[int] = BIT_WIDTHS,
                  solve: Callable | None = None) -> Sweep:
    """Solve every budget point of `grid` (a list of budget dicts as solver.ilp.solve_bits takes them).
    `solve(inputs, grid)` answers the points as `solve_points` does (default: `solve_points` itself)."""
    inputs = ilp_inputs(table, bits)
    grid = [dict(b) for b in grid]
    if not grid:
        raise BudgetError("budget grid is empty: give at least one budget value")
    for b in grid:
        budget_limits(inputs, b)          # malformed budgets fail here, before any work is sent out
    results = (solve or solve_points)(inputs, grid)
    return _merge_answers(inputs, grid, results)


def solve_points(inputs: IlpInputs, grid: list[dict]) -> list[dict]:
    """Solve each budget point; an infeasible point gives a record with bits None and the reason."""
    out = []
    for budgets in grid:
        start = time.perf_counter()
        try:
            a = solve_inputs(inputs, budgets, start=start)
        except BudgetError as e:
            out.append({"bits": None, "reason": str(e), "solve_s": time.perf_counter() - start})
            continue
        out.append({"bits": tuple(a.bits.values()), "objective": a.objective, "objective_model": a.objective_model,
                    "totals": a.totals, "limits": a.limits, "solve_s": a.solve_s, "reason": ""})
    return out


def _latency_limit(limits: dict) -> float:
    """The tightest latency a point's budgets allow the whole model (sum of layers, ms); NaN without one."""
    return min((v["model_limit"] for v in limits.values() if v["resource"] == "latency_ms"), default=np.nan)


def _merge_answers(inputs: IlpInputs, grid: list[dict], results: list[dict]) -> Sweep:
    config_of: dict[tuple, int] = {}
    configs, points = [], []
    for budgets, r in zip(grid, results):
        cid = None
        if r["bits"] is not None:
            cid = config_of.get(r["bits"])
            if cid is None:
                cid = config_of[r["bits"]] = len(configs)
                row = {"config": cid, "objective": r["objective"], "objective_model": r["objective_model"]}
                row.update({k: r["totals"]["model"].get(k, np.nan) for k in RESOURCES})
                row.update({f"searchable_{k}": r["totals"]["searchable"].get(k, np.nan) for k in RESOURCES})
                row.update({"latency_limit_ms": np.nan, "points": 0, "budgets": [],
                            "bits": dict(zip(inputs.layers, r["bits"]))})
                configs.append(row)
            configs[cid]["points"] += 1
            configs[cid]["budgets"].append(budgets)
            configs[cid]["latency_limit_ms"] = np.fmin(configs[cid]["latency_limit_ms"], _latency_limit(r["limits"]))
        points.append({**budgets, "feasible": cid is not None, "config": cid,
                       "objective": r.get("objective", np.nan), "solve_s": r["solve_s"], "reason": r["reason"]})
    cols = ["config", "objective", "objective_model", *RESOURCES, *(f"searchable_{k}" for k in RESOURCES),
            "latency_limit_ms", "points", "budgets", "bits"]
    config_table = pd.DataFrame(configs, columns=cols)
    point_table = pd.DataFrame(points)
    point_table["config"] = point_table["config"].astype("Int64")
    return Sweep(point_table, config_table, pareto_frontiers(config_table))
