"""Bit allocation as an integer linear program (HAWQ-V3, Eq. 8 and Eq. 9), solved with PuLP's bundled CBC.

    minimize    sum_i Omega_i(b_i)                       over the searchable layers
    subject to  sum_i size_i(b_i)    <= size limit        (each budget optional, any combination)
                sum_i bops_i(b_i)    <= BOPS limit
                sum_i latency_i(b_i) <= latency limit
                b_i = b_j when layers i and j share a `group`

A budget is either a fraction r (keys `size`, `bops`, `latency`): the limit is R4 + r * (R8 - R4), where R4 and
R8 are the resource of the searchable layers all at the lowest and all at the highest bit width, exactly as the
HAWQ-V3 paper and its ILP notebook (layers with `fixed_bits` are left out of R4, R8 and the constrained sums);
or an absolute value (keys `size_mib`, `gbops`, `latency_ms`) that bounds the whole model, fixed layers included.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import pulp

from hawq_ray.contract import HawqError, TableError  # noqa: F401  (TableError: part of this module's errors)
from hawq_ray.contract.cost import RESOURCES, layer_gbops, layer_size_mib, omega
from hawq_ray.contract.table import BIT_WIDTHS, COL, check_table, delta_col, lat_col, omega_col

FEASIBILITY_TOL = 1e-9  # slack on every budget, relative to the resource's range over the searchable layers

# budget key -> (resource, is_fraction); resource names are also the keys of the totals
BUDGET_KEYS = {
    "size": ("size_mib", True), "size_mib": ("size_mib", False),
    "bops": ("gbops", True), "gbops": ("gbops", False),
    "latency": ("latency_ms", True), "latency_ms": ("latency_ms", False),
}


class BudgetError(HawqError):
    """A budget is malformed, or no bit configuration meets the budgets; the message names the smallest achievable."""


# ---------------------------------------------------------------- the paper's quantities per layer and width
def layer_omega(table: pd.DataFrame, bits: Sequence[int]) -> np.ndarray:
    """Omega_i(b) of every layer at each width (contract.cost.omega, Eq. 8), shape (layers, len(bits)).

    Columns `omega{b}` are used as given when the table has them for every b."""
    if all(omega_col(b) in table for b in bits):
        return np.column_stack([table[omega_col(b)].to_numpy(float) for b in bits])
    return np.column_stack([omega(table[COL.trace], table[COL.params], table[delta_col(b)]) for b in bits])


def layer_resources(table: pd.DataFrame, bits: Sequence[int]) -> dict[str, np.ndarray]:
    """Per-layer resources at each bit width (contract.cost), each of shape (layers, len(bits)): size in MiB,
    GBOPS, and latency in ms from the measured `lat{b}_ms` columns (if present)."""
    b = np.asarray(bits, float)[None, :]
    out = {"size_mib": layer_size_mib(table[COL.params].to_numpy(np.int64)[:, None], b),
           "gbops": layer_gbops(table[COL.macs].to_numpy(np.int64)[:, None], b,
                                table[COL.product_macs].to_numpy(np.int64)[:, None])}
    if all(lat_col(k) in table for k in bits):
        out["latency_ms"] = np.column_stack([table[lat_col(k)].to_numpy(float) for k in bits])
    return out


def check_widths(bits: Sequence[int]) -> tuple[int, ...]:
    """The candidate bit widths, sorted; raises BudgetError unless they are distinct positive integers."""
    try:
        out = tuple(int(b) for b in bits)
        ok = bool(out) and all(b == v for b, v in zip(out, bits)) and len(set(out)) == len(out) and min(out) > 0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise BudgetError(f"bits={bits!r}: give distinct positive integer bit widths, e.g. (4, 8)")
    return tuple(sorted(out))


# ---------------------------------------------------------------- the problem in arrays
@dataclasses.dataclass(frozen=True)
class IlpInputs:
    """A checked table reduced to what the ILP needs: searchable layers merged into units (one per group)."""
    layers: tuple[str, ...]
    bits: tuple[int, ...]
    fixed_bits: np.ndarray            # per layer, 0 = searchable
    unit_of_layer: np.ndarray         # per layer, index of its unit (-1 for fixed layers)
    layer_omega: np.ndarray           # (layers, bits)
    layer_resources: dict             # resource -> (layers, bits)
    unit_omega: np.ndarray            # (units, bits)
    unit_resources: dict              # resource -> (units, bits)


def ilp_inputs(table: pd.DataFrame, bits: Sequence[int] = BIT_WIDTHS) -> IlpInputs:
    bits = check_widths(bits)
    t = check_table(table, bits)
    fixed = t[COL.fixed_bits].fillna(0).to_numpy(int)
    keys = [g if g else f"\0{name}" for g, name in zip(t[COL.group], t[COL.layer])]
    unit_ids: dict[str, int] = {}
    unit = np.full(len(t), -1)
    for i, k in enumerate(keys):
        if fixed[i] == 0:
            unit[i] = unit_ids.setdefault(k, len(unit_ids))
    omega = layer_omega(t, bits)
    res = layer_resources(t, bits)
    n_units = len(unit_ids)

    def per_unit(a):
        out = np.zeros((n_units, len(bits)))
        s = unit >= 0
        np.add.at(out, unit[s], np.nan_to_num(a[s]))
        return out
    return IlpInputs(tuple(t[COL.layer]), bits, fixed, unit, omega, res,
                     per_unit(omega), {k: per_unit(v) for k, v in res.items()})


# ---------------------------------------------------------------- the solve
@dataclasses.dataclass(frozen=True)
class BitAllocation:
    """The solver's answer. `totals["model"]` counts every layer (fixed ones at their fixed bits);
    `totals["searchable"]` only the layers the ILP chose, the sums the fraction budgets constrain.
    `objective` is sum Omega over the searchable layers (what the ILP minimized); `objective_model` adds the
    fixed layers (NaN when their sensitivity is not in the table). `limits` holds each budget as given, the
    limit it put on the searchable layers' sum and the same limit on the whole model (fixed layers at their
    bits added), in the resource's unit."""
    bits: dict
    objective: float
    objective_model: float
    totals: dict
    limits: dict
    solve_s: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def solve_bits(table: pd.DataFrame, budgets: Mapping[str, float], bits: Sequence[int] = BIT_WIDTHS) -> BitAllocation:
    """Per-layer bits minimizing sum Omega under `budgets` ({'size'|'bops'|'latency': fraction r,
    'size_mib'|'gbops'|'latency_ms': absolute}). Raises TableError or BudgetError on bad input."""
    start = time.perf_counter()
    return solve_inputs(ilp_inputs(table, bits), budgets, start=start)


def budget_limits(inputs: IlpInputs, budgets: Mapping[str, float]) -> dict[str, dict]:
    """Each budget as a limit on the searchable layers' sum of its resource, plus the smallest achievable value
    of the budget (in the budget's own terms: a fraction, or an absolute over the whole model)."""
    out = {}
    for key, given in budgets.items():
        if key not in BUDGET_KEYS:
            raise BudgetError(f"budget {key!r}: unknown; valid: {', '.join(BUDGET_KEYS)}")
        resource, is_fraction = BUDGET_KEYS[key]
        try:
            value = float(given)
        except (TypeError, ValueError):
            value = float("nan")
        if not math.isfinite(value):
            raise BudgetError(f"budget {key}={given!r}: give a finite number")
        if resource not in inputs.unit_resources:
            raise BudgetError(f"budget {key}={given}: the layer table has no latency columns "
                              f"({', '.join(f'lat{b}_ms' for b in inputs.bits)}); profile the layers first")
        u = inputs.unit_resources[resource]
        low, high, least = u[:, 0].sum(), u[:, -1].sum(), u.min(axis=1).sum()
        fixed_total = fixed_layers_total(inputs, resource)
        if is_fraction:
            limit = low + value * (high - low)                      # R4 + r * (R8 - R4), searchable layers only
            smallest = (least - low) / (high - low) if high > low else 0.0
        else:
            limit = value - fixed_total                             # absolute budgets bound the whole model
            smallest = least + fixed_total
        scale = max(abs(high - least), abs(high), 1e-300)
        out[key] = {"given": value, "resource": resource, "searchable_limit": limit,
                    "smallest": smallest, "feasible": limit - least >= -FEASIBILITY_TOL * scale, "scale": scale}
    return out


def fixed_layers_total(inputs: IlpInputs, resource: str) -> float:
    fixed = inputs.fixed_bits > 0
    if not fixed.any():
        return 0.0
    cols = np.searchsorted(inputs.bits, inputs.fixed_bits[fixed])
    return float(inputs.layer_resources[resource][fixed, cols].sum())


def _describe(limits: dict) -> str:
    return ", ".join(f"{k}={v['smallest']:.6g}" for k, v in limits.items())


def solve_inputs(inputs: IlpInputs, budgets: Mapping[str, float], start: float | None = None) -> BitAllocation:
    start = time.perf_counter() if start is None else start
    limits = budget_limits(inputs, budgets)
    for key, lim in limits.items():
        if not lim["feasible"]:
            raise BudgetError(f"budget {key}={lim['given']:g} cannot be met: the smallest achievable is "
                              f"{key}={lim['smallest']:.6g} (smallest achievable of each budget given: "
                              f"{_describe(limits)})")
    choice = _solve_units(inputs, limits)
    if choice is None:
        given = ", ".join(f"{k}={v['given']:g}" for k, v in limits.items())
        raise BudgetError(f"budgets {given} cannot be met together; "
                          f"smallest achievable of each alone: {_describe(limits)}")
    return allocation(inputs, choice, limits, time.perf_counter() - start)


def _solve_units(inputs: IlpInputs, limits: dict) -> np.ndarray | None:
    """Index into `bits` per unit, or None if the budgets are jointly infeasible."""
    n_units, n_bits = inputs.unit_omega.shape
    if n_units == 0:
        return np.zeros(0, int)
    if n_bits == 1:
        return np.zeros(n_units, int)
    # Shift each unit's Omega by its minimum and scale to [0, 1]: same argmin, well-conditioned for CBC.
    om = inputs.unit_omega - inputs.unit_omega.min(axis=1, keepdims=True)
    om = om / om.max() if om.max() > 0 else om
    prob = pulp.LpProblem("hawq_bits", pulp.LpMinimize)
    x = [[prob.add_variable(f"x_{u}_{k}", 0, 1, cat=pulp.LpInteger) for k in range(n_bits)] for u in range(n_units)]
    prob += pulp.lpSum(om[u, k] * x[u][k] for u in range(n_units) for k in range(n_bits) if om[u, k])
    for u in range(n_units):
        prob += pulp.lpSum(x[u]) == 1
    for key, lim in limits.items():
        r = inputs.unit_resources[lim["resource"]]
        base = r.min(axis=1)
        rhs = (lim["searchable_limit"] - base.sum()) / lim["scale"] + FEASIBILITY_TOL
        coef = (r - base[:, None]) / lim["scale"]
        prob += pulp.lpSum(coef[u, k] * x[u][k] for u in range(n_units) for k in range(n_bits) if coef[u, k]) \
            <= rhs, f"budget_{key}"
    with warnings.catch_warnings():
        # PuLP 3.3 marks PULP_CBC_CMD deprecated in favour of a separately installed CBC; the bundled one is the
        # only solver that installs from the package registry, so keep using it without the noise.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="pulp")
        status = prob.solve(pulp.PULP_CBC_CMD(msg=False))
    if pulp.LpStatus[status] == "Infeasible":
        return None
    if pulp.LpStatus[status] != "Optimal":
        raise RuntimeError(f"CBC returned status {pulp.LpStatus[status]!r} for a bit-allocation ILP")
    return np.array([int(np.argmax([v.value() or 0.0 for v in row])) for row in x])


def allocation(inputs: IlpInputs, unit_choice: np.ndarray, limits: dict, solve_s: float) -> BitAllocation:
    """The BitAllocation of a width index per unit (checked against every limit)."""
    fixed = inputs.fixed_bits > 0
    col = np.where(fixed, np.searchsorted(inputs.bits, np.maximum(inputs.fixed_bits, inputs.bits[0])),
                   unit_choice[np.maximum(inputs.unit_of_layer, 0)] if len(unit_choice) else 0)
    rows = np.arange(len(col))
    bits = {name: int(inputs.bits[c]) for name, c in zip(inputs.layers, col)}
    pick = lambda a: a[rows, col]                                                     # noqa: E731
    totals = {"model": {r: float(pick(a).sum()) for r, a in inputs.layer_resources.items()},
              "searchable": {r: float(pick(a)[~fixed].sum()) for r, a in inputs.layer_resources.items()}}
    for key, lim in limits.items():
        used = totals["searchable"][lim["resource"]]
        if used - lim["searchable_limit"] > 1e-6 * lim["scale"]:
            raise RuntimeError(f"CBC answer breaks budget {key}: {used} > {lim['searchable_limit']}")
    omega = pick(inputs.layer_omega)
    return BitAllocation(
        bits=bits, objective=float(omega[~fixed].sum()), objective_model=float(omega.sum()), totals=totals,
        limits={k: {"given": v["given"], "resource": v["resource"], "searchable_limit": v["searchable_limit"],
                    "model_limit": v["searchable_limit"] + fixed_layers_total(inputs, v["resource"])}
                for k, v in limits.items()},
        solve_s=solve_s)
