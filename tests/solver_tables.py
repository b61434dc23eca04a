"""Random layer tables for the bit solver (`random_table`) and the budgets' limits as the solver's docs define
them (`definition_limits`), for the solver's tests and the evidence tests. No tests here.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

TOL = 1e-9   # the solver's documented slack on a budget, relative to the resource's range


def random_table(rng: np.random.Generator, n: int, bits=(4, 8), ties=False, fixed=True, groups=True):
    t = pd.DataFrame({"layer": [f"l{i}" for i in range(n)],
                      "params": rng.integers(100, 10_000, n), "macs": rng.integers(1_000, 1_000_000, n)})
    if ties:   # few distinct values: many configurations share an objective or a resource total
        t["params"] = rng.choice([1000, 2000, 3000], n)
        t["macs"] = rng.choice([10_000, 20_000], n)
        om = {b: rng.choice([0.0, 1.0, 2.0], n) * (max(bits) / b) ** 2 for b in bits}
    else:
        base = rng.lognormal(0, 1, n)
        om = {b: base * rng.uniform(0.5, 1.5, n) * (max(bits) / b) ** 2 for b in bits}
    for b in bits:
        t[f"omega{b}"] = om[b]
    lat_low = rng.uniform(0.1, 1.0, n)
    for k, b in enumerate(bits):   # latency mostly rises with bits, but not always (as measured kernels can)
        t[f"lat{b}_ms"] = lat_low * (1 + k * rng.uniform(-0.2, 1.0, n))
    t["group"] = ""
    t["fixed_bits"] = ""
    if groups and n >= 4:
        for g, members in enumerate(rng.choice(n, size=(2, 2), replace=False)):
            t.loc[members, "group"] = f"g{g}"
    if fixed and n >= 3:
        free = [i for i in range(n) if not t.loc[i, "group"]]
        for i in rng.choice(free, size=min(2, len(free)), replace=False):
            t.loc[i, "fixed_bits"] = str(rng.choice(bits))
    return t


def definition_limits(t: pd.DataFrame, budgets: dict, bits=(4, 8)):
    """(searchable layer indices, units of layers sharing bits, {budget key: (cost(i, b), limit on the searchable
    layers, slack)}), from the definitions: size = params*b/8 MiB; GBOPS = macs*b*b/1e9; latency = lat{b}_ms sums;
    fraction r -> R4 + r*(R8 - R4) over non-fixed layers; absolute -> whole model."""
    n = len(t)
    fixed = [int(v) if str(v).strip() else 0 for v in t.fixed_bits]
    searchable = [i for i in range(n) if not fixed[i]]
    units = {}
    for i in searchable:
        units.setdefault(t.group[i] or f"#{i}", []).append(i)
    units = list(units.values())
    res = {"size_mib": lambda i, b: t.params[i] * b / 8 / 2 ** 20, "gbops": lambda i, b: t.macs[i] * b * b / 1e9,
           "latency_ms": lambda i, b: t[f"lat{b}_ms"][i]}
    key_res = {"size": "size_mib", "size_mib": "size_mib", "bops": "gbops", "gbops": "gbops",
               "latency": "latency_ms", "latency_ms": "latency_ms"}
    limits = {}
    for key, v in budgets.items():
        f = res[key_res[key]]
        low = sum(f(i, bits[0]) for i in searchable)
        high = sum(f(i, bits[-1]) for i in searchable)
        fixed_sum = sum(f(i, fixed[i]) for i in range(n) if fixed[i])
        limit = low + v * (high - low) if key in ("size", "bops", "latency") else v - fixed_sum
        least = sum(min(sum(f(i, b) for i in u) for b in bits) for u in units)
        limits[key] = (f, limit, TOL * max(abs(high - least), abs(high)))
    return searchable, units, limits
