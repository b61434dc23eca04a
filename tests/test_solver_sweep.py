"""Budget sweeps: grids, merging, the Pareto frontier, and the same answers in Ray tasks as in-process."""
from __future__ import annotations

from hawq_ray.service.session import start_local
import itertools

import numpy as np
import pandas as pd
import pytest

from solver.frontier import pareto_frontier
from solver.ilp import BudgetError
from solver.sweep import budget_grid, parse_axis, sweep_budgets


def table(n=10, seed=0):
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "layer": [f"l{i}" for i in range(n)], "params": rng.integers(1000, 100_000, n),
        "macs": rng.integers(10 ** 5, 10 ** 8, n), "omega4": rng.lognormal(0, 1, n), "omega8": rng.lognormal(-4, 1, n),
        "lat4_ms": rng.uniform(0.1, 1, n), "lat8_ms": rng.uniform(1, 2, n)})


def exhaustive(t: pd.DataFrame) -> pd.DataFrame:
    """Every configuration of a small table with its objective and GBOPS, straight from the definitions."""
    rows = []
    for choice in itertools.product((4, 8), repeat=len(t)):
        b = np.array(choice)
        rows.append({"bits": tuple(choice), "objective": np.where(b == 8, t.omega8, t.omega4).sum(),
                     "gbops": (t.macs * b * b).sum() / 1e9})
    return pd.DataFrame(rows)


def test_parse_axis_and_grid():
    assert parse_axis("0.1:0.9:0.1") == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    assert parse_axis("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert parse_axis("0.25, 0.5") == [0.25, 0.5] and parse_axis("3") == [3.0]
    for bad in ("0.9:0.1:0.1", "0:1:0", "a,b", "", "0:1", "nan"):
        with pytest.raises(BudgetError, match="budget axis"):
            parse_axis(bad)
    grid = budget_grid({"bops": [0.25, 0.5], "size": [0.5, 1.0, 2.0]})
    assert len(grid) == 6 and {"bops": 0.5, "size": 2.0} in grid


def test_sweep_in_process_against_exhaustive_search():
    t = table()
    every = exhaustive(t)
    low, high = (t.macs * 16).sum() / 1e9, (t.macs * 64).sum() / 1e9
    grid = budget_grid({"bops": parse_axis("0:1:0.05")})
    s = sweep_budgets(t, grid)
    assert len(s.points) == 21 and s.points.feasible.all()
    for _, p in s.points.iterrows():
        fits = every[every.gbops <= low + p.bops * (high - low) + 1e-9]
        assert p.objective == pytest.approx(fits.objective.min(), rel=1e-9)
    # identical configurations are merged: ids are unique per bit pattern, point counts add up
    assert len({tuple(b.items()) for b in s.configs.bits}) == len(s.configs) and s.configs.points.sum() == 21
    assert len(s.configs) == s.points.config.nunique()
    for _, c in s.configs.iterrows():
        assert len(c.budgets) == c.points
    # frontier against GBOPS equals the Pareto set of the distinct configs, computed by brute force
    pts = s.configs[["gbops", "objective"]].to_numpy()
    dominated = [any((q <= p).all() and (q < p).any() for q in pts) for p in pts]
    want = set(s.configs.config[~np.array(dominated)])
    got = s.frontier[s.frontier.resource == "gbops"]
    assert set(got.config) == want
    assert set(s.frontier.resource) == {"size_mib", "gbops", "latency_ms"}


def test_cross_product_and_infeasible_points():
    t = table()
    s = sweep_budgets(t, budget_grid({"bops": [-0.5, 0.5], "latency": [0.3, 1.0]}))
    assert len(s.points) == 4
    bad = s.points[~s.points.feasible]
    assert set(bad.bops) == {-0.5} and bad.config.isna().all()
    assert bad.reason.str.contains("smallest achievable").all()


def test_pareto_frontier_keeps_ties_and_drops_dominated():
    c = pd.DataFrame({"config": [0, 1, 2, 3, 4], "gbops": [1.0, 2.0, 2.0, 3.0, 1.0],
                      "objective": [5.0, 3.0, 3.0, 4.0, 6.0]})
    assert list(pareto_frontier(c, "gbops").config) == [0, 1, 2]


def test_bad_grid():
    with pytest.raises(BudgetError, match="unknown"):
        sweep_budgets(table(), [{"flops": 0.5}])
    with pytest.raises(BudgetError, match="empty"):
        sweep_budgets(table(), [])


@pytest.fixture(scope="module")
def ray_two_cpus():
    ray = pytest.importorskip("ray")
    start_local(num_cpus=2)   # a fresh local Ray, started again if the raylet misses its 30 s
    yield ray
    ray.shutdown()


def test_ray_tasks_give_the_in_process_answers(ray_two_cpus):
    """The sweep as Ray tasks (answered by worker processes, not this one) equals the in-process sweep."""
    import os

    from hawq_ray.service.sweep import ray_solve
    t = table(14, seed=3)
    grid = budget_grid({"bops": parse_axis("0.1:0.9:0.2"), "size": [0.3, 0.7]})
    workers = set()
    with_ray = sweep_budgets(t, grid, solve=lambda inputs, g: ray_solve(inputs, g, workers))
    local = sweep_budgets(t, grid)
    assert workers and os.getpid() not in workers
    bits = lambda s: [s.configs.bits[c] if pd.notna(c) else None for c in s.points.config]  # noqa
    assert bits(with_ray) == bits(local)
    pd.testing.assert_frame_equal(with_ray.points.drop(columns="solve_s"), local.points.drop(columns="solve_s"))
