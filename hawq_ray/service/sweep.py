"""The budget sweep across the cluster: `ray_solve` answers a grid of budget points as Ray tasks (the problem
goes to the object store once; the grid is cut into a few chunks per CPU so the per-task overhead stays small),
for `solver.sweep.sweep_budgets(..., solve=ray_solve)`."""
from __future__ import annotations

import os

import numpy as np
import ray

from solver.sweep import solve_points


def _solve_chunk(inputs, grid: list) -> tuple:
    return os.getpid(), solve_points(inputs, grid)


def ray_solve(inputs, grid: list, workers: set | None = None) -> list:
    """`solver.sweep.solve_points(inputs, grid)` as Ray tasks on the cluster this process has joined; the
    process ids of the workers that answered are added to `workers` when given."""
    cpus = int(ray.cluster_resources().get("CPU", 1)) or 1
    chunks = [c for c in np.array_split(np.arange(len(grid)), min(len(grid), 2 * cpus)) if len(c)]
    ref = ray.put(inputs)
    task = ray.remote(num_cpus=1)(_solve_chunk)
    answers = ray.get([task.remote(ref, [grid[i] for i in c]) for c in chunks])
    if workers is not None:
        workers.update(pid for pid, _ in answers)
    return [r for _, part in answers for r in part]
