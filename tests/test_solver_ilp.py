"""solve_bits against exhaustive search and hand-worked numbers; bad input gives one-line errors."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from solver.ilp import BudgetError, TableError, solve_bits
from solver_tables import definition_limits, random_table


def brute_force(t: pd.DataFrame, budgets: dict, bits=(4, 8)):
    """Best objective over all bit assignments by enumeration (None if none meets the budgets), written from the
    definitions (Omega from omega{b}; the budgets of `definition_limits`)."""
    searchable, units, limits = definition_limits(t, budgets, bits)
    # every assignment at once: choice[c, u] = bit width of unit u in configuration c
    choice = np.array(list(itertools.product(bits, repeat=len(units))), dtype=int).reshape(-1, len(units))
    layer_bits = {i: choice[:, k] for k, u in enumerate(units) for i in u}
    ok = np.ones(len(choice), bool)
    for f, limit, slack in limits.values():
        used = sum(np.select([layer_bits[i] == b for b in bits], [f(i, b) for b in bits]) for i in searchable)
        ok &= np.asarray(used) <= limit + slack
    if not ok.any():
        return None
    obj = sum(np.select([layer_bits[i] == b for b in bits], [t[f"omega{b}"][i] for b in bits]) for i in searchable)
    return float(np.min(np.asarray(obj, float)[ok]))


def random_budgets(rng: np.random.Generator, t: pd.DataFrame, bits=(4, 8)):
    out = {}
    keys = rng.choice(["size", "bops", "latency", "size_mib", "gbops", "latency_ms"], size=rng.integers(1, 4),
                      replace=False)
    for key in keys:
        if key in ("size", "bops", "latency"):
            out[key] = float(rng.choice([0.0, 1.0, rng.uniform(-0.05, 1.05)], p=[0.1, 0.1, 0.8]))
        else:
            col = {"size_mib": t.params * max(bits) / 8 / 2 ** 20, "gbops": t.macs * max(bits) ** 2 / 1e9,
                   "latency_ms": t[f"lat{max(bits)}_ms"]}[key]
            out[key] = float(rng.uniform(0.3, 1.05) * col.sum())
    return out


@pytest.mark.parametrize("seed", range(40))
def test_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 17)) if seed % 4 else 16
    t = random_table(rng, n, ties=seed % 3 == 0, fixed=seed % 5 != 0, groups=seed % 2 == 0)
    for _ in range(3):
        budgets = random_budgets(rng, t)
        best = brute_force(t, budgets)
        if best is None:
            with pytest.raises(BudgetError, match="smallest achievable"):
                solve_bits(t, budgets)
            continue
        a = solve_bits(t, budgets)
        assert a.objective == pytest.approx(best, rel=1e-9, abs=1e-12), budgets
        # the answer itself respects the rules: groups share bits, fixed layers keep theirs, budgets hold
        for g, rows in t[t.group != ""].groupby("group"):
            assert len({a.bits[n] for n in rows.layer}) == 1
        for name, f in zip(t.layer, t.fixed_bits):
            if str(f).strip():
                assert a.bits[name] == int(f)
        searchable, _, limits = definition_limits(t, budgets)
        for key, (cost, limit, slack) in limits.items():        # recomputed from the table, not the solver's totals
            assert sum(cost(i, a.bits[t.layer[i]]) for i in searchable) <= limit + slack, (key, budgets)


@pytest.mark.parametrize("seed", range(6))
def test_three_bit_widths_match_brute_force(seed):
    rng = np.random.default_rng(100 + seed)
    bits = (2, 4, 8)
    t = random_table(rng, int(rng.integers(3, 9)), bits=bits, ties=seed % 2 == 0)
    budgets = random_budgets(rng, t, bits)
    best = brute_force(t, budgets, bits)
    if best is None:
        with pytest.raises(BudgetError):
            solve_bits(t, budgets, bits)
    else:
        assert solve_bits(t, budgets, bits).objective == pytest.approx(best, rel=1e-9, abs=1e-12)


def hand_table():
    # Omega_i(b) = trace/params * delta_b: a -> 4 bit 2.0, 8 bit 0.1; b -> 4 bit 3.0, 8 bit 0.2; c fixed at 8.
    return pd.DataFrame({
        "layer": ["a", "b", "c"], "params": [1000, 3000, 2 ** 20], "macs": [10 ** 6, 2 * 10 ** 6, 10 ** 9],
        "group": ["", "", ""], "fixed_bits": ["", "", "8"],
        "trace": [1000 * 2.0, 3000 * 1.0, 1.0], "delta4": [1.0, 3.0, 1.0], "delta8": [0.05, 0.2, 0.0],
        "lat4_ms": [1.0, 2.0, 5.0], "lat8_ms": [1.5, 4.0, 6.0]})


def test_hand_worked_example():
    t = hand_table()
    # bops 0.5: searchable GBOPS at 4 bit 0.048, at 8 bit 0.192, limit 0.12. Both at 8: 0.192 > 0.12.
    # a at 8 (0.064 + 0.032 = 0.096 <= 0.12): Omega 0.1 + 3.0 = 3.1; b at 8 (0.016 + 0.128 = 0.144): too much.
    a = solve_bits(t, {"bops": 0.5})
    assert a.bits == {"a": 8, "b": 4, "c": 8}
    assert a.objective == pytest.approx(3.1)
    assert a.objective_model == pytest.approx(3.1 + 0.0)
    assert a.limits["bops"]["bound"] == pytest.approx(0.12)
    assert a.totals["searchable"]["gbops"] == pytest.approx(0.096)
    assert a.totals["model"]["gbops"] == pytest.approx(0.096 + 64.0)
    assert a.totals["searchable"]["size_mib"] == pytest.approx((1000 + 1500) / 2 ** 20)
    assert a.totals["model"]["size_mib"] == pytest.approx((1000 + 1500) / 2 ** 20 + 1.0)
    assert a.totals["model"]["latency_ms"] == pytest.approx(1.5 + 2.0 + 6.0)
    # latency 9.0 ms absolute, whole model: 6 ms fixed leaves 3.0 ms; a8+b4 = 3.5 too slow, a4+b4 = 3.0 fits.
    assert solve_bits(t, {"latency_ms": 9.0}).bits == {"a": 4, "b": 4, "c": 8}
    assert solve_bits(t, {"latency_ms": 9.5}).bits == {"a": 8, "b": 4, "c": 8}
    # grouping a and b forces one choice for both: at bops 0.5 only 4/4 fits
    assert solve_bits(t.assign(group=["g", "g", ""]), {"bops": 0.5}).bits == {"a": 4, "b": 4, "c": 8}
    assert solve_bits(t, {}).bits == {"a": 8, "b": 8, "c": 8}


def test_infeasible_budget_names_the_smallest_achievable():
    t = hand_table()
    with pytest.raises(BudgetError) as e:
        solve_bits(t, {"size_mib": 0.5, "bops": 0.5})
    msg = str(e.value)
    smallest_mib = (1000 + 3000) * 4 / 8 / 2 ** 20 + 1.0            # a, b at 4 bit + c fixed at 8 bit
    assert "\n" not in msg and "size_mib=0.5" in msg and f"size_mib={smallest_mib:.6g}" in msg and "bops=0" in msg
    with pytest.raises(BudgetError, match=r"bops=-0.1 .*smallest achievable is bops=0"):
        solve_bits(t, {"bops": -0.1})
    # each alone is feasible, together not: a latency budget that needs 8 bit where 4 bit is slower
    t2 = t.assign(lat4_ms=[2.0, 2.0, 5.0], lat8_ms=[1.0, 1.0, 6.0])
    with pytest.raises(BudgetError, match="cannot be met together"):
        solve_bits(t2, {"latency_ms": 8.5, "bops": 0.0})


@pytest.mark.parametrize("change,match", [
    (lambda t: t.drop(columns="delta8"), r"missing column 'delta8'"),
    (lambda t: t.rename(columns={"delta4": "detla4"}), r"missing column 'delta4' \(found 'detla4': misspelt"),
    (lambda t: t.rename(columns={"params": "param"}), r"'params' \(found 'param'"),
    (lambda t: t.assign(trace=[1.0, -2.0, 1.0]), r"column 'trace' of layer 'b' is -2.0"),
    (lambda t: t.assign(macs=[1.0, np.nan, 1.0]), r"column 'macs' of layer 'b' is nan"),
    (lambda t: t.assign(params=[0, 1, 1]), r"column 'params' of layer 'a' is 0; it must be a finite number > 0"),
    (lambda t: t.assign(group=["g", "", "g"]), r"group 'g' disagrees on fixed_bits \(a=empty, c=8\)"),
    (lambda t: t.assign(fixed_bits=["", "6", "8"]), r"fixed_bits of layer 'b' is '6'; it must be empty or one of"),
    (lambda t: t.assign(layer=["a", "a", "c"]), r"layer 'a' appears twice"),
    (lambda t: t.drop(columns="lat8_ms"), r"latency columns \['lat4_ms'\] found but not \['lat8_ms'\]"),
])
def test_bad_tables_give_one_line_naming_the_input(change, match):
    with pytest.raises(TableError, match=match) as e:
        solve_bits(change(hand_table()), {"bops": 0.5})
    assert "\n" not in str(e.value)


def test_bad_budgets():
    t = hand_table().drop(columns=["lat4_ms", "lat8_ms"])
    with pytest.raises(BudgetError, match=r"budget latency=0.5: the layer table has no latency columns"):
        solve_bits(t, {"latency": 0.5})
    with pytest.raises(BudgetError, match=r"budget 'bopz': unknown"):
        solve_bits(t, {"bopz": 0.5})
    with pytest.raises(BudgetError, match=r"budget size=nan: give a finite number"):
        solve_bits(t, {"size": float("nan")})
    with pytest.raises(BudgetError, match=r"bits="):
        solve_bits(t, {"size": 0.5}, bits=(4, 4))


def test_fixed_layer_sensitivity_may_be_missing():
    t = hand_table().assign(trace=[2000.0, 3000.0, np.nan])
    a = solve_bits(t, {"bops": 0.5})
    assert a.objective == pytest.approx(3.1) and np.isnan(a.objective_model)


def test_layer_table_dtypes_as_hawq_ray_layers_writes_them():
    """fixed_bits as nullable Int64 with <NA>, group as strings: the layer table stage's own dtypes."""
    t = hand_table().assign(fixed_bits=pd.array([pd.NA, pd.NA, 8], dtype="Int64"),
                            group=pd.array(["", "", pd.NA], dtype="string"))
    assert solve_bits(t, {"bops": 0.5}).bits == {"a": 8, "b": 4, "c": 8}
    t = hand_table().assign(fixed_bits=[np.nan, np.nan, 8.0])
    assert solve_bits(t, {"bops": 0.5}).bits == {"a": 8, "b": 4, "c": 8}
