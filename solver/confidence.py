"""How firmly the estimated traces support each chosen config: the ILP re-solved with traces drawn from their
estimate, each layer's trace from a normal distribution with the estimate's mean and standard error
(`trace`, `trace_stderr`; Hutchinson's estimate is a mean of independent samples, so its error is about
normal), every budget point solved again per draw.

A point's confidence is the fraction of draws whose answer is the config chosen from the estimate; a layer
"flips" in a draw when its bits differ from the chosen config's.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from hawq_ray.contract.table import BIT_WIDTHS, COL, omega_col
from solver.ilp import ilp_inputs
from solver.sweep import solve_points


def drawn_table(table: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """The table with each trace drawn from N(trace, trace_stderr^2), a negative draw as 0 (a negative trace
    counts as zero sensitivity, `contract.cost.omega`); Omega is recomputed from the drawn traces."""
    t = table.drop(columns=[omega_col(b) for b in BIT_WIDTHS if omega_col(b) in table])
    stderr = np.nan_to_num(t[COL.trace_stderr].to_numpy(float))
    t[COL.trace] = np.maximum(rng.normal(t[COL.trace].to_numpy(float), stderr), 0.0)   # Eq. 8: below 0 counts as 0
    return t


def draw_answers(table: pd.DataFrame, grid: Sequence[dict], draws: range, seed: int = 0) -> list:
    """For each draw index in `draws`: the bits tuple each budget point of `grid` gets (None if infeasible). A
    draw depends only on (seed, index), so the draws may be split among workers in any way."""
    return [[r["bits"] for r in solve_points(ilp_inputs(drawn_table(table, np.random.default_rng([seed, d]))),
                                             list(grid))] for d in draws]


def confidence(layers: Sequence[str], chosen: Sequence, answers: list) -> list:
    """Per budget point: {"confidence": fraction of draws answering `chosen[k]`, "flips": {layer: fraction of
    draws in which its bits differ}} (NaN and {} for a point without a chosen config)."""
    out = []
    for k, want in enumerate(chosen):
        if want is None or not answers:
            out.append({"confidence": np.nan, "flips": {}})
            continue
        got = [draw[k] for draw in answers]
        same = np.mean([g == tuple(want) for g in got])
        differ = np.array([[g is None or g[i] != want[i] for i in range(len(want))] for g in got]).mean(0)
        out.append({"confidence": float(same),
                    "flips": {layers[i]: float(differ[i]) for i in np.argsort(-differ, kind="stable") if differ[i]}})
    return out
