"""Solver speed against the issue-4 bars: one 52-layer solve (ResNet50, HAWQ-V3's published table) under 100 ms
median including CBC; a 100-budget sweep under 10 s on 2 cores (in-process, and as Ray tasks on a local Ray of 2 CPUs).

    python bench/bench_solver.py [--repeats 30] [--no-ray]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pandas as pd

from hawq_ray.contract.table import COL
from solver.ilp import solve_bits
from solver.sweep import budget_grid, sweep_budgets

TABLE = Path(__file__).resolve().parents[1] / "tests" / "data" / "hawq_v3_resnet50_layers.csv"


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--no-ray", action="store_true")
    args = p.parse_args()
    table = pd.read_csv(TABLE, dtype={COL.group: str})
    rows = []
    for name, budgets in (("bops 0.5", {"bops": 0.5}), ("size 0.25", {"size": 0.25}),
                          ("size+bops+latency 0.5", {"size": 0.5, "bops": 0.5, "latency": 0.5})):
        t = timed(lambda: solve_bits(table, budgets), args.repeats)
        rows.append((f"one solve, {len(table)} layers, {name}", f"median {statistics.median(t) * 1e3:.1f} ms "
                     f"(max {max(t) * 1e3:.1f})", "< 100 ms median"))
    grid = budget_grid({"bops": [round(0.01 * i, 2) for i in range(1, 101)]})
    cross = budget_grid({"bops": [0.1 * i for i in range(1, 11)], "latency": [0.1 * i for i in range(1, 11)]})
    for name, g in (("sweep 100 bops budgets", grid), ("sweep 10x10 bops x latency", cross)):
        start = time.perf_counter()
        s = sweep_budgets(table, g)
        rows.append((f"{name}, in-process", f"{time.perf_counter() - start:.2f} s ({len(s.configs)} configs)",
                     "< 10 s on 2 cores"))
    if not args.no_ray:
        import ray
        from hawq_ray.service.session import connect
        start = time.perf_counter()
        connect(num_cpus=2)
        rows.append(("a local Ray (connect, 2 CPUs)", f"{time.perf_counter() - start:.2f} s", "(not part of the sweep)"))
        for name, g in (("sweep 100 bops budgets", grid), ("sweep 10x10 bops x latency", cross)):
            start = time.perf_counter()
            s = sweep_budgets(table, g)
            rows.append((f"{name}, Ray tasks (2 CPUs)", f"{time.perf_counter() - start:.2f} s "
                         f"({len(s.configs)} configs)", "< 10 s on 2 cores"))
        ray.shutdown()
    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    print(f"{'what':<{w}}  {'measured':<{v}}  bar")
    for r in rows:
        print(f"{r[0]:<{w}}  {r[1]:<{v}}  {r[2]}")


if __name__ == "__main__":
    main()
