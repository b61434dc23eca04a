"""The budget sweep across the cluster: `ray_solve` answers a grid of budget points as Ray tasks (the problem
goes to the object store once; the grid is cut into a few chunks per CPU so the per-task overhead stays small),
for `solver.sweep.sweep_budgets(..., solve=ray_solve)`; `ray_draw_answers` re-solves the grid for draws of the
traces (`solver.confidence`), the draws cut the same way. `sweep_configs` is the sweep stage's table: the
uniform configs and each distinct ILP answer with its confidence."""
from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import ray

from hawq_ray.contract.bits import budget_cell, parse_bits
from hawq_ray.contract.table import BIT_WIDTHS, COL, lat_col

from solver.confidence import draw_answers
from solver.sweep import solve_points


def _solve_chunk(inputs, grid: list) -> tuple:
    return os.getpid(), solve_points(inputs, grid)


def ray_solve(inputs, grid: list, workers: set | None = None) -> list:
    """`solver.sweep.solve_points(inputs, grid)` as Ray tasks on the cluster this process has joined; the
    process ids of the workers that answered are added to `workers` when given."""
    chunks = cpu_chunks(len(grid))
    ref = ray.put(inputs)
    task = ray.remote(num_cpus=1)(_solve_chunk)
    answers = ray.get([task.remote(ref, [grid[i] for i in c]) for c in chunks])
    if workers is not None:
        workers.update(pid for pid, _ in answers)
    return [r for _, part in answers for r in part]


def cpu_chunks(n: int) -> list:
    """Index chunks of range(n), a few per CPU of the cluster, so that the per-task overhead stays small."""
    cpus = int(ray.cluster_resources().get("CPU", 1)) or 1
    return [c for c in np.array_split(np.arange(n), min(n, 2 * cpus)) if len(c)]


def _draw_chunk(table, grid: list, draws: range, seed: int) -> tuple:
    return os.getpid(), draw_answers(table, grid, draws, seed)


def ray_draw_answers(table, grid: list, draws: int, seed: int = 0, workers: set | None = None) -> list:
    """`solver.confidence.draw_answers(table, grid, range(draws), seed)` as Ray tasks."""
    ref = ray.put(table)
    task = ray.remote(num_cpus=1)(_draw_chunk)
    answers = ray.get([task.remote(ref, grid, range(int(c[0]), int(c[-1]) + 1), seed) for c in cpu_chunks(draws)])
    if workers is not None:
        workers.update(pid for pid, _ in answers)
    return [draw for _, part in answers for draw in part]


def budget_points(table: pd.DataFrame, budgets: dict) -> list:
    """One budget point per value of run.yaml's budgets; latency ones only where every layer has its latency."""
    grid = [{resource: float(r)} for resource, values in budgets.items() for r in values]
    if not table[[lat_col(b) for b in BIT_WIDTHS]].notna().all().all():
        grid = [g for g in grid if "latency" not in g]
    return grid


def sweep_configs(table: pd.DataFrame, budgets: dict, uniform: list, draws: int, seed: int) -> pd.DataFrame:
    """The uniform configs and each distinct ILP answer, with its confidence: the lowest, over the budget points
    that chose it, of the fraction of trace draws that choose it again, and for each layer whose bits flip in
    some draw the highest such fraction (`flips`, JSON); NaN and {} for a uniform config no budget chose."""
    from solver.sweep import sweep_budgets
    grid = budget_points(table, budgets)
    rows = {u: {"config": u, "budget": [], "latency_limit_ms": np.nan, "bits": parse_bits(u, table).as_dict(),
                "confidence": np.nan, "flips": {}} for u in uniform}
    if grid:
        sweep = sweep_budgets(table, grid, solve=ray_solve)
        support = _support(table, grid, sweep, draws, seed)
        for r in sweep.configs.itertuples():
            same = [u for u in rows.values() if u["bits"] == r.bits]
            if not same:
                rows[f"ilp{int(r.config)}"] = {"config": f"ilp{int(r.config)}", "budget": [], "latency_limit_ms":
                                               np.nan, "bits": r.bits, "confidence": np.nan, "flips": {}}
            row = same[0] if same else rows[f"ilp{int(r.config)}"]   # an ILP answer that is a uniform config:
            row["budget"] += list(r.budgets)                              # one trial, both labels
            row["latency_limit_ms"] = np.fmin(row["latency_limit_ms"], r.latency_limit_ms)
            for k in np.flatnonzero(sweep.points["config"].fillna(-1).to_numpy() == r.config):
                row["confidence"] = np.fmin(row["confidence"], support[k]["confidence"])
                for layer, f in support[k]["flips"].items():
                    row["flips"][layer] = max(row["flips"].get(layer, 0.0), f)
    for row in rows.values():
        row["budget"] = budget_cell(row["budget"])
        row["flips"] = json.dumps(row["flips"])
    return pd.DataFrame(list(rows.values()), columns=["config", "budget", "latency_limit_ms", "bits", "confidence",
                                                      "flips"])


def _support(table: pd.DataFrame, grid: list, sweep, draws: int, seed: int) -> list:
    """`solver.confidence.confidence` of each grid point's answer over `draws` trace draws (Ray tasks)."""
    from solver.confidence import confidence
    by_id = dict(zip(sweep.configs["config"], sweep.configs["bits"]))
    chosen = [None if pd.isna(c) else tuple(by_id[int(c)].values()) for c in sweep.points["config"]]
    answers = ray_draw_answers(table, grid, draws, seed) if COL.trace_stderr in table else []
    return confidence(list(table[COL.layer]), chosen, answers)
