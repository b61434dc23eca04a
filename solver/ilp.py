"""Bit allocation as an integer linear program (HAWQ-V3, Eq. 8 and Eq. 9), solved with PuLP's bundled CBC.

    minimize    sum_i Omega_i(b_i)                       over the searchable layers
    subject to  sum_i size_i(b_i)    <= size limit        (each budget optional, any combination)
                sum_i bops_i(b_i)    <= BOPS limit
                sum_i latency_i(b_i) <= latency limit
                act_i(b_i)           <= activation limit  for every layer i (the largest activation)
                sum_i size_i(b_i) + A <= memory limit, A >= act_i(b_i) for every layer i (weights + largest
                                                          activation; A continuous: at the optimum the maximum)
                b_i = b_j when layers i and j share a `group`

A budget is either a fraction r (keys `size`, `bops`, `latency`): the limit is R4 + r * (R8 - R4), where R4 and
R8 are the resource of the searchable layers all at the lowest and all at the highest bit width, exactly as the
HAWQ-V3 paper and its ILP notebook (layers with `fixed_bits` are left out of R4, R8 and the constrained sums);
or an absolute value (keys `size_mib`, `gbops`, `latency_ms`) that bounds the whole model, fixed layers included.
The activation and memory budgets (`activation`, `activation_mib`, `memory`, `memory_mib`) bound a maximum over
layers, which does not split into searchable and fixed parts: they always bound the whole model, and their
fraction r means R4 + r * (R8 - R4) with R4 and R8 the whole model's value with every searchable layer at the
lowest and at the highest width.
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
from hawq_ray.contract.cost import (PEAK_RESOURCES, RESOURCES, layer_activation_mib, layer_gbops, layer_size_mib,
                                    omega, product_columns)
from hawq_ray.contract.table import BIT_WIDTHS, COL, check_table, delta_col, lat_col, omega_col

FEASIBILITY_TOL = 1e-9  # slack on every budget, relative to the resource's range over the searchable layers

# budget key -> (resource, is_fraction); resource names are also the keys of the totals
BUDGET_KEYS = {
    "size": ("size_mib", True), "size_mib": ("size_mib", False),
    "bops": ("gbops", True), "gbops": ("gbops", False),
    "latency": ("latency_ms", True), "latency_ms": ("latency_ms", False),
    "activation": ("activation_mib", True), "activation_mib": ("activation_mib", False),
    "memory": ("memory_mib", True), "memory_mib": ("memory_mib", False),
}
ACTIVATION, MEMORY = PEAK_RESOURCES


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
    GBOPS, latency in ms from the measured `lat{b}_ms` columns and the activation read in MiB (if present)."""
    b = np.asarray(bits, float)[None, :]
    out = {"size_mib": layer_size_mib(table[COL.params].to_numpy(np.int64)[:, None], b),
           "gbops": layer_gbops(table[COL.macs].to_numpy(np.int64)[:, None], b,
                                *(np.asarray(p)[..., None] for p in product_columns(table)))}
    if all(lat_col(k) in table for k in bits):
        out["latency_ms"] = np.column_stack([table[lat_col(k)].to_numpy(float) for k in bits])
    if COL.act_elements in table:
        out[ACTIVATION] = layer_activation_mib(table[COL.act_elements].to_numpy(np.int64)[:, None], b)
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
    unit_resources: dict              # resource -> (units, bits): the sum over the unit's layers (activation: max)


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

    def per_unit(a, combine=np.add):
        out = np.zeros((n_units, len(bits)))
        s = unit >= 0
        combine.at(out, unit[s], np.nan_to_num(a[s]))
        return out
    return IlpInputs(tuple(t[COL.layer]), bits, fixed, unit, omega, res, per_unit(omega),
                     {k: per_unit(v, np.maximum if k == ACTIVATION else np.add) for k, v in res.items()})


# ---------------------------------------------------------------- the solve
@dataclasses.dataclass(frozen=True)
class BitAllocation:
    """The solver's answer. `totals["model"]` counts every layer (fixed ones at their fixed bits);
    `totals["searchable"]` only the layers the ILP chose, the sums the fraction budgets constrain.
    `objective` is sum Omega over the searchable layers (what the ILP minimized); `objective_model` adds the
    fixed layers (NaN when their sensitivity is not in the table). `limits` holds each budget as given, its
    `bound` (the limit it put on the searchable layers' sum; for the activation and memory budgets, on the whole
    model's value) and `model_limit`, the same limit on the whole model (fixed layers at their bits added), in
    the resource's unit. `totals` hold activation_mib (the largest activation) and memory_mib (size plus it)
    when the table has act_elements."""
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
    """Each budget as a `bound` on `unit_value` (the searchable layers' sum of its resource; for the activation
    and memory budgets, the whole model's value), plus the smallest achievable value of the budget (in the
    budget's own terms: a fraction, or an absolute over the whole model)."""
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
        needed = ACTIVATION if resource in PEAK_RESOURCES else resource
        if needed not in inputs.unit_resources:
            raise BudgetError(f"budget {key}={given}: the layer table has no " + (
                f"latency columns ({', '.join(f'lat{b}_ms' for b in inputs.bits)}); profile the layers first"
                if needed == "latency_ms" else f"{COL.act_elements!r} column; rebuild it with `hawq-ray layers`"))
        low, high, least = resource_range(inputs, resource)
        fixed_total = fixed_layers_total(inputs, resource)
        if is_fraction:
            limit = low + value * (high - low)                      # R4 + r * (R8 - R4)
            smallest = (least - low) / (high - low) if high > low else 0.0
        else:                                                       # absolute budgets bound the whole model
            limit = value - (0.0 if resource in PEAK_RESOURCES else fixed_total)
            smallest = least + (0.0 if resource in PEAK_RESOURCES else fixed_total)
        scale = max(abs(high - least), abs(high), 1e-300)
        out[key] = {"given": value, "resource": resource, "bound": limit,
                    "model_limit": limit if resource in PEAK_RESOURCES else limit + fixed_total,
                    "smallest": smallest, "feasible": limit - least >= -FEASIBILITY_TOL * scale, "scale": scale}
    return out


def resource_range(inputs: IlpInputs, resource: str) -> tuple[float, float, float]:
    """`unit_value` of `resource` with every unit at the lowest width, at the highest, and the least any choice
    reaches (sums: searchable layers; activation and memory: the whole model)."""
    if resource not in PEAK_RESOURCES:
        u = inputs.unit_resources[resource]
        return u[:, 0].sum(), u[:, -1].sum(), u.min(axis=1).sum()
    n_units, n_bits = inputs.unit_omega.shape
    ends = [unit_value(inputs, resource, np.full(n_units, k, int)) for k in (0, n_bits - 1)]
    act, floor = inputs.unit_resources[ACTIVATION], fixed_activation(inputs)
    if resource == ACTIVATION:
        return (*ends, max(floor, act.min(axis=1).max(initial=0.0)))
    # memory: for every candidate largest activation L, each unit's smallest size among widths whose activation
    # fits under L; the least memory is the best of size(L) + L (exact: the optimum's own maximum is a candidate)
    size, fixed_size = inputs.unit_resources["size_mib"], fixed_layers_total(inputs, "size_mib")
    best = math.inf
    for peak in np.unique(np.append(act, floor)):
        if peak >= floor and (fits := act <= peak).any(axis=1).all():
            best = min(best, np.where(fits, size, np.inf).min(axis=1).sum() + peak + fixed_size)
    return (*ends, best)


def unit_value(inputs: IlpInputs, resource: str, unit_choice: np.ndarray) -> float:
    """What a budget on `resource` bounds, for a width index per unit: the searchable layers' sum, or for the
    activation and memory budgets the whole model's largest activation (plus its size, for memory)."""
    rows = np.arange(len(unit_choice))
    if resource not in PEAK_RESOURCES:
        return float(inputs.unit_resources[resource][rows, unit_choice].sum())
    peak = max(fixed_activation(inputs), inputs.unit_resources[ACTIVATION][rows, unit_choice].max(initial=0.0))
    if resource == ACTIVATION:
        return float(peak)
    return float(peak + fixed_layers_total(inputs, "size_mib") + unit_value(inputs, "size_mib", unit_choice))


def fixed_activation(inputs: IlpInputs) -> float:
    """The largest activation a fixed layer reads, in MiB (0 without fixed layers)."""
    fixed = inputs.fixed_bits > 0
    if not fixed.any():
        return 0.0
    return float(inputs.layer_resources[ACTIVATION][fixed, np.searchsorted(inputs.bits, inputs.fixed_bits[fixed])]
                 .max())


def fixed_layers_total(inputs: IlpInputs, resource: str) -> float:
    fixed = inputs.fixed_bits > 0
    if not fixed.any() or resource in PEAK_RESOURCES:
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
        if lim["resource"] == ACTIVATION:         # act_i(b_i) <= limit for every layer: forbid the widths above it
            act = inputs.unit_resources[ACTIVATION]
            for u, k in zip(*np.nonzero(act - lim["bound"] > FEASIBILITY_TOL * lim["scale"])):
                prob += x[u][k] == 0, f"budget_{key}_{u}_{k}"
            continue
        r = inputs.unit_resources["size_mib" if lim["resource"] == MEMORY else lim["resource"]]
        base = r.min(axis=1)
        rhs = (lim["bound"] - base.sum()) / lim["scale"] + FEASIBILITY_TOL
        coef = (r - base[:, None]) / lim["scale"]
        total = pulp.lpSum(coef[u, k] * x[u][k] for u in range(n_units) for k in range(n_bits) if coef[u, k])
        if lim["resource"] == MEMORY:             # size + A, A >= every layer's activation (fixed ones included)
            total, rhs = total + _peak_variable(prob, inputs, x, lim["scale"]), rhs - \
                fixed_layers_total(inputs, "size_mib") / lim["scale"]
        prob += total <= rhs, f"budget_{key}"
    with warnings.catch_warnings():
        # PuLP 3.3 marks PULP_CBC_CMD deprecated in favour of a separately installed CBC; the bundled one is the
        # only solver that installs from the package registry, so keep using it without the noise.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="pulp")
        # CBC 2.10's preprocessing (cgl) returned a non-optimal answer as optimal on memory budgets (a continuous
        # peak above rows of equal coefficients; tests/test_solver_memory.py seed 23); without it CBC is exact.
        options = ["preprocess off"] if any(lim["resource"] == MEMORY for lim in limits.values()) else []
        status = prob.solve(pulp.PULP_CBC_CMD(msg=False, options=options))
    if pulp.LpStatus[status] == "Infeasible":
        return None
    if pulp.LpStatus[status] != "Optimal":
        raise RuntimeError(f"CBC returned status {pulp.LpStatus[status]!r} for a bit-allocation ILP")
    return np.array([int(np.argmax([v.value() or 0.0 for v in row])) for row in x])


def _peak_variable(prob, inputs: IlpInputs, x, scale: float):
    """A continuous A / scale with A >= the activation of every layer at its chosen width."""
    peak = prob.add_variable(f"peak_{len(prob.variables())}", fixed_activation(inputs) / scale)
    act = inputs.unit_resources[ACTIVATION] / scale
    for u, row in enumerate(x):
        prob += peak >= pulp.lpSum(act[u, k] * v for k, v in enumerate(row) if act[u, k])
    return peak


def allocation(inputs: IlpInputs, unit_choice: np.ndarray, limits: dict, solve_s: float) -> BitAllocation:
    """The BitAllocation of a width index per unit (checked against every limit)."""
    fixed = inputs.fixed_bits > 0
    col = np.where(fixed, np.searchsorted(inputs.bits, np.maximum(inputs.fixed_bits, inputs.bits[0])),
                   unit_choice[np.maximum(inputs.unit_of_layer, 0)] if len(unit_choice) else 0)
    rows = np.arange(len(col))
    bits = {name: int(inputs.bits[c]) for name, c in zip(inputs.layers, col)}
    pick = lambda a: a[rows, col]                                                     # noqa: E731
    totals = {scope: {r: float(pick(a)[keep].sum() if r != ACTIVATION else pick(a)[keep].max(initial=0.0))
                      for r, a in inputs.layer_resources.items()}
              for scope, keep in (("model", rows >= 0), ("searchable", ~fixed))}
    for scope in totals.values():
        if ACTIVATION in scope:
            scope[MEMORY] = scope["size_mib"] + scope[ACTIVATION]
    for key, lim in limits.items():
        used = unit_value(inputs, lim["resource"], unit_choice)
        if used - lim["bound"] > 1e-6 * lim["scale"]:
            raise RuntimeError(f"CBC answer breaks budget {key}: {used} > {lim['bound']}")
    omega = pick(inputs.layer_omega)
    return BitAllocation(
        bits=bits, objective=float(omega[~fixed].sum()), objective_model=float(omega.sum()), totals=totals,
        limits={k: {"given": v["given"], "resource": v["resource"], "bound": v["bound"],
                    "model_limit": v["model_limit"]} for k, v in limits.items()},
        solve_s=solve_s)
