"""`hawq-ray solve` and `hawq-ray sweep`: the bit-allocation ILP over a layer table file (CSV or parquet)."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from hawq_ray.contract import HawqError
from hawq_ray.contract.cost import PEAK_RESOURCES
from hawq_ray.contract.table import COL
from hawq_ray.service.settings import FRACTION

# (fraction flag, absolute flag, unit of the absolute flag); flag dests are the solver's budget keys
BUDGET_FLAGS = (("size", "size_mib", "MiB"), ("bops", "gbops", "GBOPS"), ("latency", "latency_ms", "ms"),
                ("activation", "activation_mib", "MiB of the largest activation at batch 1"),
                ("memory", "memory_mib", "MiB of weights plus the largest activation"))


def register(subparsers) -> None:
    solve = subparsers.add_parser("solve", help="per-layer bits minimizing sum Omega under budgets (HAWQ-V3 ILP)",
                                  description=__doc__)
    _common(solve)
    for frac, absolute, unit in BUDGET_FLAGS:
        g = solve.add_mutually_exclusive_group()
        g.add_argument(f"--{frac}", type=FRACTION, metavar="R",
                       help=f"{frac} budget as a fraction r: R4 + r*(R8-R4) "
                            f"{'of the whole model' if absolute in PEAK_RESOURCES else 'over the searchable layers'}")
        g.add_argument(f"--{absolute.replace('_', '-')}", dest=absolute, type=float, metavar="X",
                       help=f"{frac} budget in {unit} for the whole model (fixed layers included)")
    solve.add_argument("--out", help="write the config: {layer: bits} JSON, or HAWQ bit_config.py style if *.py")
    solve.set_defaults(func=run_solve)

    sweep = subparsers.add_parser("sweep", help="solve a grid of budgets (Ray tasks when --ray) and print the "
                                  "Pareto frontier", description=__doc__)
    _common(sweep)
    add_budget_axes(sweep)
    sweep.add_argument("--out", help="write the distinct configs (parquet, or CSV if *.csv); the grid points go "
                       "next to it as <stem>.points<suffix>")
    sweep.add_argument("--ray", action="store_true", help="solve as Ray tasks (joins RAY_ADDRESS or "
                       "starts a local instance)")
    sweep.set_defaults(func=run_sweep)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--table", required=True, help="layer table (.csv or .parquet): layer, params, macs, group, "
                   "fixed_bits, trace, delta4, delta8 [, lat4_ms, lat8_ms]")
    p.add_argument("--bits", default="4,8", help="candidate bit widths (default 4,8)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def read_layer_table(path: str) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise HawqError(f"--table {path}: no such file; give a layer table .csv or .parquet")
    try:
        if p.suffix.lower() == ".parquet":
            return pd.read_parquet(p)
        if p.suffix.lower() == ".csv":
            return pd.read_csv(p, dtype={COL.layer: str, COL.group: str})
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
        raise HawqError(f"--table {path}: cannot read it ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    raise HawqError(f"--table {path}: unknown format; give a .csv or .parquet file")


def _bits(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(b) for b in text.split(","))
    except ValueError:
        raise HawqError(f"--bits {text}: give comma-separated integer bit widths, e.g. 4,8") from None


def _user_error(e: ValueError, args) -> HawqError:
    from solver.ilp import TableError
    return HawqError(f"--table {args.table}: {e}" if isinstance(e, TableError) else str(e))


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def run_solve(args) -> int:
    from hawq_ray.contract.bits import write_bits
    from solver.ilp import solve_bits
    from hawq_ray.service.outputs import writable_file
    table = read_layer_table(args.table)
    if args.out:
        writable_file(args.out)
    budgets = {k: getattr(args, k) for f in BUDGET_FLAGS for k in f[:2] if getattr(args, k) is not None}
    try:
        a = solve_bits(table, budgets, _bits(args.bits))
        if args.out:
            write_bits(a.bits, args.out, name=f"bit_config_{Path(args.table).stem}")
    except ValueError as e:      # TableError, BudgetError, BitConfigError
        raise _user_error(e, args) from None
    fixed = dict(zip(table[COL.layer].astype(str), table.get(COL.fixed_bits, pd.Series([None] * len(table)))))
    width = max(len(n) for n in a.bits)
    print(f"{COL.layer:<{width}}  bits")
    for name, b in a.bits.items():
        v = fixed.get(name)
        mark = "  (fixed)" if v is not None and not (isinstance(v, float) and math.isnan(v)) and str(v).strip() else ""
        print(f"{name:<{width}}  {b}{mark}")
    for key, lim in a.limits.items():
        scope = "model" if lim["resource"] in PEAK_RESOURCES else "searchable"
        print(f"budget {_flag(key)} {lim['given']:g}: {scope} {lim['resource']} <= {lim['bound']:.6g}")
    for scope, label in (("model", "model (fixed layers included)"), ("searchable", "searchable layers only")):
        print(f"totals, {label}: " + ", ".join(f"{k} {v:.6g}" for k, v in a.totals[scope].items()))
    print(f"objective (sum Omega, searchable layers): {a.objective:.6g}; solve time {a.solve_s * 1e3:.1f} ms")
    if args.out:
        print(f"wrote {args.out}")
    if args.json:
        from hawq_ray.service.cli.common import print_json
        print_json({**a.to_dict(), "out": args.out})
    return 0


def add_budget_axes(p: argparse.ArgumentParser) -> None:
    for frac, absolute, unit in BUDGET_FLAGS:
        p.add_argument(f"--{frac}", metavar="AXIS", help="fractions: start:stop:step (stop included), a,b,c or r")
        p.add_argument(f"--{absolute.replace('_', '-')}", dest=absolute, metavar="AXIS",
                       help=f"absolute values in {unit}, same forms")


def budget_axes(args, command: str) -> dict:
    """{budget key: values} of the budget axis flags given; an error naming the flag when one is malformed."""
    from solver.ilp import BudgetError
    from solver.sweep import parse_axis
    axes = {}
    for f in BUDGET_FLAGS:
        for key in f[:2]:
            text = getattr(args, key)
            if text is not None:
                try:
                    axes[key] = parse_axis(text)
                except BudgetError as e:
                    raise HawqError(f"{_flag(key)}: {e}") from None
    if not axes:
        raise HawqError(f"{command}: give at least one budget axis, e.g. --bops 0.1:0.9:0.1")
    return axes


def run_sweep(args) -> int:
    from solver.sweep import budget_grid, sweep_budgets
    axes = budget_axes(args, "sweep")
    table = read_layer_table(args.table)
    if args.out:
        from hawq_ray.service.outputs import writable_file
        out = Path(args.out)
        for path in (out, out.with_name(f"{out.stem}.points{out.suffix}")):
            writable_file(path)
    solve = None
    if args.ray:
        from hawq_ray.service.session import connect
        from hawq_ray.service.sweep import ray_solve
        connect()
        solve = ray_solve
    try:
        s = sweep_budgets(table, budget_grid(axes), _bits(args.bits), solve=solve)
    except ValueError as e:
        raise _user_error(e, args) from None
    n_ok = int(s.points["feasible"].sum())
    if n_ok == 0:
        raise HawqError(f"sweep: no budget point is feasible; first reason: {s.points['reason'].iloc[0]}")
    print(f"{len(s.points)} budget points, {n_ok} feasible, {len(s.configs)} distinct configs, "
          f"{s.points['solve_s'].sum():.2f} s of solving")
    with pd.option_context("display.width", 120, "display.max_rows", 500):
        print("Pareto frontier (objective = sum Omega over searchable layers; values are model totals):")
        print(s.frontier.to_string(index=False))
    if args.out:
        out = Path(args.out)
        points_path = out.with_name(f"{out.stem}.points{out.suffix}")
        from hawq_ray.contract.bits import json_cells
        for frame, path in ((s.configs, out), (s.points, points_path)):
            if out.suffix.lower() == ".csv":
                json_cells(frame).to_csv(path, index=False)
            else:
                frame.to_parquet(path, index=False)
        print(f"wrote {out} and {points_path}")
    if args.json:
        from hawq_ray.service.cli.common import print_json
        print_json({"points": len(s.points), "feasible": n_ok, "configs": len(s.configs),
                    "frontier": json.loads(s.frontier.to_json(orient="records")), "out": args.out})
    return 0
