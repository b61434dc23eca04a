"""Pareto frontier of total sensitivity against a resource, over a table of distinct bit configurations."""
from __future__ import annotations

from typing import Sequence

import pandas as pd


def pareto_frontier(configs: pd.DataFrame, resource: str, objective: str = "objective") -> pd.DataFrame:
    """The rows of `configs` that no other row beats on both `resource` and `objective` (lower is better for
    both; one strictly lower), sorted by `resource`. Rows tied on both are all kept."""
    if resource not in configs or objective not in configs:
        raise ValueError(f"pareto_frontier: configs has no column {resource!r} or {objective!r}")
    rows = configs.dropna(subset=[resource, objective]).sort_values([resource, objective], kind="stable")
    keep, best, best_at = [], float("inf"), None
    for idx, r, o in zip(rows.index, rows[resource], rows[objective]):
        if o < best or (o == best and r == best_at):
            keep.append(idx)
            best, best_at = o, r
    return rows.loc[keep]


def pareto_frontiers(configs: pd.DataFrame, resources: Sequence[str] = ("size_mib", "gbops", "latency_ms"),
                     objective: str = "objective", id_column: str = "config") -> pd.DataFrame:
    """Long table (resource, value, objective, config): the frontier against each resource present in `configs`."""
    parts = []
    for res in resources:
        if res not in configs or configs[res].isna().all():
            continue
        front = pareto_frontier(configs, res, objective)
        parts.append(pd.DataFrame({"resource": res, "value": front[res].to_numpy(),
                                   "objective": front[objective].to_numpy(),
                                   id_column: front[id_column].to_numpy() if id_column in front else front.index}))
    if not parts:
        return pd.DataFrame(columns=["resource", "value", "objective", id_column])
    return pd.concat(parts, ignore_index=True)
