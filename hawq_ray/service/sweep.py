"""The budget sweep across the cluster: `ray_solve` answers a grid of budget points as Ray tasks (the problem
goes to the object store once; the grid is cut into a few chunks per CPU so the per-task overhead stays small),
for `solver.sweep.sweep_budgets(..., solve=ray_solve)`; `ray_draw_answers` re-solves the grid for draws of the
traces (`solver.confidence`), the draws cut the same way."""
from __future__ import annotations

import os

import numpy as np
import ray

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
