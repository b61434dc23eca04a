"""The evidence stage: alternative allocations of a budget checked against enumeration from the definitions,
the statistics against numpy / scipy and hand-worked cases, and the Ray stage on the default model (every
distinct config evaluated once, in Ray workers, each row's metrics equal to a direct evaluation)."""
from __future__ import annotations

from hawq_ray.service.session import start_local
import itertools
import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from hawq_ray.analysis.evidence import logit_metrics, omega_kl_correlation, ranks, spearman, standing
from solver.alternatives import filled_allocation, random_allocations, reversed_allocation
from solver.ilp import BudgetError, ilp_inputs
from solver_tables import definition_limits, random_table


def layer_bits(t, units, widths):
    return {t.layer[i]: w for u, w in zip(units, widths) for i in u}


def fills_by_enumeration(t, budgets):
    """Every assignment of 4 / 8 bits to the units that meets the budgets and leaves no unit at 4 bits that
    would still fit at 8 (from the definitions), as {layer: bits} of the searchable layers."""
    searchable, units, limits = definition_limits(t, budgets)

    def fits(widths):
        bits = layer_bits(t, units, widths)
        return all(sum(f(i, bits[t.layer[i]]) for i in searchable) <= limit + slack for f, limit, slack in
                   limits.values())
    out = []
    for widths in itertools.product((4, 8), repeat=len(units)):
        if fits(widths) and not any(w == 4 and fits(widths[:k] + (8,) + widths[k + 1:])
                                    for k, w in enumerate(widths)):
            out.append(layer_bits(t, units, widths))
    return out


def searchable_bits(a, t):
    return {k: v for k, v in a.bits.items() if not str(t.set_index("layer").fixed_bits[k]).strip()}


@pytest.mark.parametrize("kind", ["size", "bops", "latency"])       # latencies that need not rise with bits
@pytest.mark.parametrize("seed", range(8))
def test_random_fills_are_the_enumerated_fills(seed, kind):
    rng = np.random.default_rng(seed)
    t = random_table(rng, 7)
    budgets = {kind: float(rng.uniform(0.1, 0.9))}
    want = fills_by_enumeration(t, budgets)
    got = random_allocations(ilp_inputs(t), budgets, count=len(want) + 5, seed=seed)
    found = [searchable_bits(a, t) for a in got]
    assert len({json.dumps(f, sort_keys=True) for f in found}) == len(found)          # distinct
    def key(b):
        return json.dumps(b, sort_keys=True)
    assert sorted(map(key, found)) == sorted(map(key, want))                          # all of them, nothing else
    few = random_allocations(ilp_inputs(t), budgets, count=1, seed=seed, exclude=[got[0].bits])
    assert all(a.bits != got[0].bits for a in few)


def test_reversed_fill_raises_the_least_sensitive_units_first():
    # Omega gains (4 -> 8 bits): a 1.9, b 0.3, c 5.0, d 0.1; sizes 1000, 1000, 1000, 3000 params.
    t = pd.DataFrame({"layer": list("abcd"), "params": [1000, 1000, 1000, 3000], "macs": [1] * 4,
                      "group": [""] * 4, "fixed_bits": [""] * 4,
                      "omega4": [2.0, 0.4, 5.0, 0.2], "omega8": [0.1, 0.1, 0.0, 0.1]})
    inputs = ilp_inputs(t)
    # size 0.4: 6000 params at 4 bits, and room for 0.4 * 6000 = 2400 params more at 8 bits. Ascending gain
    # visits d (3000: does not fit), b (1000: fits), a (1000: fits, 2000 used), c (1000: 3000 > 2400, no).
    rev = reversed_allocation(inputs, {"size": 0.4})
    assert rev.bits == {"a": 8, "b": 8, "c": 4, "d": 4}
    # the order c, a, b, d: c fits, a fits, b and d do not
    assert filled_allocation(inputs, {"size": 0.4}, [2, 0, 1, 3]).bits == {"a": 8, "b": 4, "c": 8, "d": 4}
    # size 0.5: room for 3000; d comes first and takes all of it
    assert reversed_allocation(inputs, {"size": 0.5}).bits == {"a": 4, "b": 4, "c": 4, "d": 8}
    assert reversed_allocation(inputs, {"size": 1.0}).bits == dict.fromkeys("abcd", 8)
    with pytest.raises(BudgetError, match="cannot be met"):
        reversed_allocation(inputs, {"size": -0.5})
    with pytest.raises(ValueError, match="each of the 4 units once"):
        filled_allocation(inputs, {"size": 0.5}, [0, 0, 1, 2])


def test_logit_metrics_are_numpys():
    rng = np.random.default_rng(0)
    fp32, q = rng.normal(size=(50, 10)) * 3, rng.normal(size=(50, 10)) * 3
    labels = rng.integers(0, 10, 50)

    def log_softmax(z):
        z = z - z.max(1, keepdims=True)
        return z - np.log(np.exp(z).sum(1, keepdims=True))
    p, lq = np.exp(log_softmax(fp32)), log_softmax(q)
    got = logit_metrics(torch.tensor(fp32), torch.tensor(q), torch.tensor(labels))
    assert got["kl"] == pytest.approx(float((p * (np.log(p) - lq)).sum(1).mean()), rel=1e-12)
    assert got["loss"] == pytest.approx(float(-lq[np.arange(50), labels].mean()), rel=1e-12)
    assert got["top1"] == float((q.argmax(1) == labels).mean())
    assert logit_metrics(torch.tensor(fp32), torch.tensor(fp32), torch.tensor(labels))["kl"] == pytest.approx(0, abs=1e-15)


def test_spearman_is_scipys_with_ties():
    rng = np.random.default_rng(1)
    for _ in range(20):
        x, y = rng.integers(0, 6, 30).astype(float), rng.normal(size=30)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, rel=1e-12)
        assert ranks(x).tolist() == stats.rankdata(x).tolist()
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))


def test_standing_hand_worked():
    rows = pd.DataFrame([
        {"budget": "b1", "kind": "ilp", "config": "88", "predicted_omega": 1.0, "kl": 0.2},
        {"budget": "b1", "kind": "reversed", "config": "44", "predicted_omega": 3.0, "kl": 0.5},
        {"budget": "b1", "kind": "random", "config": "48", "predicted_omega": 2.0, "kl": 0.1},
        {"budget": "b1", "kind": "random", "config": "84", "predicted_omega": 2.5, "kl": 0.2},
        {"budget": "b1", "kind": "random", "config": "44", "predicted_omega": 3.0, "kl": 0.5},
        {"budget": "b2", "kind": "ilp", "config": "88", "predicted_omega": 1.0, "kl": 0.2},
        {"budget": "b2", "kind": "reversed", "config": "88", "predicted_omega": 1.0, "kl": 0.2}])
    s = standing(rows).set_index("budget")
    # b1: randoms 0.1, 0.2, 0.5 against 0.2: one higher, one tied (half), one lower -> 1.5 / 3; rank 2.
    assert s.loc["b1", "beats_random_fraction"] == 0.5 and s.loc["b1", "rank"] == 2
    assert s.loc["b1", "beats_reversed"] is True and s.loc["b1", "randoms"] == 3
    assert s.loc["b2", "beats_reversed"] is None and s.loc["b2", "randoms"] == 0
    rho, n = omega_kl_correlation(rows)
    assert n == 4 and rho == pytest.approx(stats.spearmanr([1.0, 3.0, 2.0, 2.5], [0.2, 0.5, 0.1, 0.2]).statistic)


@pytest.fixture(scope="module")
def local_ray():
    import ray
    start_local(num_cpus=2)   # a fresh local Ray, started again if the raylet misses its 30 s
    yield
    ray.shutdown()


def test_every_distinct_config_is_evaluated_once_in_ray_workers(tmp_path, local_ray):
    from hawq_ray.analysis.evidence import evaluate_bits
    from hawq_ray.quant.layers import layer_table
    from hawq_ray.analysis.sensitivity import weight_deltas
    from hawq_ray.inputs.data import load_data
    from hawq_ray.inputs.models import input_shape
    from hawq_ray.quant.finetune import float_logits, fp32_weights
    from hawq_ray.service.evidence import evidence_table
    from solver.ilp import solve_bits
    shape = input_shape()
    data = load_data("digits", input_shape=shape)
    model, _, _ = fp32_weights(tmp_path, data, epochs=2)
    table = layer_table(model, shape).merge(weight_deltas(model), on="layer")
    table["trace"] = table["params"] * np.linspace(2.0, 0.5, len(table))      # Omega_i(b) = that factor * delta_b
    grid, workers, seen = [{"size": 0.5}, {"bops": 0.5}], set(), []
    rows = evidence_table(model, shape, data, table, grid, randoms=3, workers=workers,
                          progress=lambda done, total: seen.append((done, total)))
    assert workers and os.getpid() not in workers                              # evaluated in Ray workers
    assert seen[-1] == (rows["config"].nunique(), rows["config"].nunique())    # each distinct config once
    for budget, group in zip(grid, rows.groupby("budget", sort=False)):
        kinds = group[1]["kind"].value_counts()
        assert kinds["ilp"] == 1 and kinds["reversed"] == 1 and 1 <= kinds.get("random", 0) <= 3
        ilp = group[1][group[1]["kind"] == "ilp"].iloc[0]
        assert json.loads(ilp["bits"]) == solve_bits(table, budget).bits
    searchable = table["fixed_bits"].isna().to_numpy()
    fp32 = float_logits(model, data.test)
    for row in rows.drop_duplicates("config").head(3).itertuples():
        bits = np.array([json.loads(row.bits)[name] for name in table["layer"]])
        omega = table["trace"] / table["params"] * np.where(bits == 4, table["delta4"], table["delta8"])
        assert row.predicted_omega == pytest.approx(float(omega[searchable].sum()), rel=1e-9)
        assert row.size_mib == pytest.approx(float((table["params"] * bits).sum() / 8 / 2 ** 20), rel=1e-12)
        direct = evaluate_bits(model, json.loads(row.bits), data, shape, fp32, table)
        assert (row.top1, row.loss, row.kl) == (direct["top1"], direct["loss"], direct["kl"])


def test_validate_cli_prints_the_standing_and_writes_every_row(tmp_path):
    import subprocess
    import sys
    from hawq_ray.quant.layers import layer_table
    from hawq_ray.analysis.sensitivity import weight_deltas
    from hawq_ray.inputs.data import load_data
    from hawq_ray.inputs.models import input_shape
    from hawq_ray.quant.finetune import fp32_weights
    model, path, _ = fp32_weights(tmp_path, load_data("digits", input_shape=input_shape()), epochs=1)
    table = layer_table(model, input_shape()).merge(weight_deltas(model), on="layer")
    table["trace"] = table["params"] * 1.0
    table.to_parquet(tmp_path / "table.parquet")

    def validate(*args):
        return subprocess.run([sys.executable, "-m", "hawq_ray.service.cli", "validate", "--table",
                               str(tmp_path / "table.parquet"), *args], capture_output=True, text=True, timeout=600)
    proc = validate("--weights", str(path), "--bops", "0.5", "--randoms", "2", "--out", str(tmp_path / "ev.csv"),
                    "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = pd.read_csv(tmp_path / "ev.csv")
    # the last JSON line: Ray may print a notice after it (a worker its memory monitor killed and the task retried)
    obj = json.loads(next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")))
    assert obj["configs"] == rows["config"].nunique() and len(obj["standing"]) == 1
    assert obj["standing"][0]["randoms"] == (rows["kind"] == "random").sum() <= 2
    assert "Spearman(predicted Omega, measured KL)" in proc.stdout
    for args, named in ((["--randoms", "2"], "give at least one budget axis"), (["--bops", "x"], "--bops"),
                        (["--bops", "0.5", "--randoms", "0"], "--randoms")):
        bad = validate(*args)
        lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
        assert bad.returncode == 2 and len(lines) == 1 and named in lines[0], bad.stderr


def test_a_point_whose_fills_cannot_start_keeps_its_ilp_row(monkeypatch):
    import hawq_ray.service.evidence as E
    t = random_table(np.random.default_rng(0), 6)

    def cannot_start(inputs, budgets):
        raise BudgetError("cannot be filled from the cheapest width of every unit")
    monkeypatch.setattr(E, "reversed_allocation", cannot_start)
    rows = E.alternatives(t, [{"size": 0.5}, {"size": -5.0}], randoms=3)     # the second point is infeasible
    assert rows["kind"].tolist() == ["ilp"] and rows["budget"].tolist() == ['[{"size": 0.5}]']
