"""Activation-memory budgets: the largest activation a layer reads (at its bits) and weights plus that, against
exhaustive search written from the definitions, a hand-worked table, and the activation sizes of real models
against forward hooks."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from solver.alternatives import random_allocations, reversed_allocation
from solver.ilp import BudgetError, ilp_inputs, solve_bits
from solver.sweep import sweep_budgets
from solver_tables import TOL, random_table

MIB = 2 ** 20


def with_activations(t: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    return t.assign(act_elements=rng.choice([1_000, 50_000, 200_000, 800_000], len(t)))


def enumerate_configs(t: pd.DataFrame, bits=(4, 8)):
    """Every assignment of widths that keeps groups together and fixed layers at their bits, as {layer index:
    bits}, with its objective and whole-model size, largest activation and memory, from the definitions."""
    fixed = [int(v) if str(v).strip() else 0 for v in t.fixed_bits]
    units = {}
    for i in range(len(t)):
        if not fixed[i]:
            units.setdefault(t.group[i] or f"#{i}", []).append(i)
    units = list(units.values())
    for combo in itertools.product(bits, repeat=len(units)):
        b = {i: fixed[i] for i in range(len(t)) if fixed[i]}
        b.update({i: w for u, w in zip(units, combo) for i in u})
        size = sum(t.params[i] * b[i] / 8 / MIB for i in range(len(t)))
        act = max(t.act_elements[i] * b[i] / 8 / MIB for i in range(len(t)))
        objective = sum(t[f"omega{b[i]}"][i] for i in range(len(t)) if not fixed[i])
        yield b, objective, {"activation_mib": act, "memory_mib": size + act}


def brute_force(t: pd.DataFrame, budgets: dict, bits=(4, 8)):
    """The least objective meeting every budget, None if none does. A fraction r is R4 + r * (R8 - R4) of the
    whole model's value, R4 / R8 with every searchable layer at the lowest / highest width."""
    configs = list(enumerate_configs(t, bits))
    fixed = [bool(str(v).strip()) for v in t.fixed_bits]

    def at(width):   # whole-model values with every searchable layer at `width`
        b = [int(v) if f else width for v, f in zip(t.fixed_bits, fixed)]
        size = sum(t.params[i] * b[i] / 8 / MIB for i in range(len(t)))
        act = max(t.act_elements[i] * b[i] / 8 / MIB for i in range(len(t)))
        return {"activation_mib": act, "memory_mib": size + act}
    ok = [True] * len(configs)
    for key, v in budgets.items():
        res = key if key.endswith("_mib") else f"{key}_mib"
        low, high = at(bits[0])[res], at(bits[-1])[res]
        least = min(c[2][res] for c in configs)
        limit = low + v * (high - low) if key == res.split("_")[0] else v
        slack = TOL * max(abs(high - least), abs(high))
        ok = [o and c[2][res] <= limit + slack for o, c in zip(ok, configs)]
    feasible = [c[1] for o, c in zip(ok, configs) if o]
    return min(feasible) if feasible else None


@pytest.mark.parametrize("seed", range(24))
def test_activation_and_memory_budgets_match_brute_force(seed):
    rng = np.random.default_rng(700 + seed)
    t = with_activations(random_table(rng, int(rng.integers(2, 11)), ties=seed % 3 == 0, fixed=seed % 4 != 0,
                                      groups=seed % 2 == 0), rng)
    everything = list(enumerate_configs(t))
    for _ in range(4):
        key = rng.choice(["activation", "activation_mib", "memory", "memory_mib"])
        if key.endswith("_mib"):
            values = sorted({c[2][key] for c in everything})
            value = float(rng.choice(values)) * float(rng.choice([1.0, 1.0, 0.999, 1.001]))   # at and beside a kink
        else:
            value = float(rng.choice([0.0, 1.0, rng.uniform(0, 1)]))
        budgets = {key: value}
        if rng.random() < 0.3:
            budgets["size"] = float(rng.uniform(0, 1))
        best = brute_force(t, {k: v for k, v in budgets.items() if k != "size"}) if "size" not in budgets else None
        try:
            a = solve_bits(t, budgets)
        except BudgetError as e:
            assert "size" in budgets or best is None, (budgets, str(e))
            assert "\n" not in str(e)
            continue
        if "size" not in budgets:
            assert best is not None and a.objective == pytest.approx(best, rel=1e-9, abs=1e-12), budgets
        # the answer's totals, recomputed from the definitions, meet the budget and match the reported ones
        b = {i: a.bits[name] for i, name in enumerate(t.layer)}
        act = max(t.act_elements[i] * b[i] / 8 / MIB for i in b)
        size = sum(t.params[i] * b[i] / 8 / MIB for i in b)
        assert a.totals["model"]["activation_mib"] == pytest.approx(act, rel=1e-12)
        assert a.totals["model"]["memory_mib"] == pytest.approx(size + act, rel=1e-12)
        lim = a.limits[key]
        assert {"activation": act, "memory": size + act}[key.split("_")[0]] <= lim["model_limit"] * (1 + 1e-9)


def hand_table():
    # a: 1000 params, reads 400k elements; b: 3000 params, reads 100k; c fixed at 8 bits, reads 50k.
    # Omega: a 4 bit 2.0, 8 bit 0.1; b 4 bit 3.0, 8 bit 0.2.
    return pd.DataFrame({
        "layer": ["a", "b", "c"], "params": [1000, 3000, 2 ** 20], "macs": [10 ** 6, 2 * 10 ** 6, 10 ** 9],
        "act_elements": [400_000, 100_000, 50_000], "group": ["", "", ""], "fixed_bits": ["", "", "8"],
        "omega4": [2.0, 3.0, 0.0], "omega8": [0.1, 0.2, 0.0]})


def test_hand_worked_activation_budgets():
    t = hand_table()
    kib = 1024 / MIB
    # largest activation: a reads 400k elements, 200000 B at 4 bits, 400000 B at 8; b 50000 / 100000 B; c 50000 B.
    # 300000 B: a must take 4 bits, b may take 8.
    a = solve_bits(t, {"activation_mib": 300_000 / MIB})
    assert a.bits == {"a": 4, "b": 8, "c": 8}
    assert a.totals["model"]["activation_mib"] == pytest.approx(200_000 / MIB)
    # 90 KiB (92160 B): a at 4 bits (200000 B) already exceeds it: the least achievable is 200000 B
    with pytest.raises(BudgetError, match=f"smallest achievable is activation_mib={200_000 / MIB:.6g}"):
        solve_bits(t, {"activation_mib": 90 * kib})
    # fraction: R4 = 200000 B, R8 = 400000 B, r = 0.5 -> 300000 B, the same answer
    assert solve_bits(t, {"activation": 0.5}).bits == {"a": 4, "b": 8, "c": 8}
    assert solve_bits(t, {"activation": 1.0}).bits == {"a": 8, "b": 8, "c": 8}
    # memory = weights + largest activation. Weights: c 1 MiB fixed, a 500 / 1000 B, b 1500 / 3000 B.
    # a4 b8: 1 MiB + 500 + 3000 + 200000 B; a8 b4: 1 MiB + 1000 + 1500 + 400000 B (a's activation at 8 bits).
    m = 2 ** 20 + 500 + 3000 + 200_000
    assert solve_bits(t, {"memory_mib": m / MIB}).bits == {"a": 4, "b": 8, "c": 8}
    assert solve_bits(t, {"memory_mib": (m - 1) / MIB}).bits == {"a": 4, "b": 4, "c": 8}
    with pytest.raises(BudgetError, match="smallest achievable is memory_mib"):
        solve_bits(t, {"memory_mib": (2 ** 20 + 2000 + 200_000 - 1) / MIB})
    # the memory budget is one constraint with the size budget: both hold together
    both = solve_bits(t, {"memory_mib": 2.0, "size_mib": (2 ** 20 + 500 + 1500) / MIB})
    assert both.bits == {"a": 4, "b": 4, "c": 8}


def test_table_without_activations_names_the_column():
    t = hand_table().drop(columns="act_elements")
    with pytest.raises(BudgetError, match="no 'act_elements' column; rebuild it with `hawq-ray layers`"):
        solve_bits(t, {"activation": 0.5})
    assert "activation_mib" not in solve_bits(t, {"size": 0.5}).totals["model"]


def test_fills_respect_activation_budgets():
    rng = np.random.default_rng(3)
    t = with_activations(random_table(rng, 9), rng)
    inputs = ilp_inputs(t)
    for budgets in ({"activation": 0.5}, {"memory": 0.4}, {"memory": 0.7, "bops": 0.6}):
        best = solve_bits(t, budgets)
        for a in [reversed_allocation(inputs, budgets), *random_allocations(inputs, budgets, 5, seed=1)]:
            for key, lim in a.limits.items():
                res = lim["resource"]
                scope = "model" if res in ("activation_mib", "memory_mib") else "searchable"
                assert a.totals[scope][res] <= lim["bound"] + 1e-9 * max(1.0, abs(lim["bound"]))
            assert a.objective >= best.objective - 1e-12


def test_sweep_over_activation_budgets():
    rng = np.random.default_rng(5)
    t = with_activations(random_table(rng, 8), rng)
    s = sweep_budgets(t, [{"activation": r} for r in (0.0, 0.5, 1.0)])
    assert s.points["feasible"].all()
    assert (s.configs["memory_mib"] > s.configs["size_mib"]).all()


class Net(nn.Module):
    """A strided stem, a depthwise and a pointwise conv, and a Linear after global pooling."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.pw = nn.Conv2d(8, 16, 1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.pw(torch.relu(self.dw(torch.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


@pytest.mark.parametrize("make,shape", [(Net, (3, 20, 20)),
                                        (lambda: __import__("torchvision").models.mobilenet_v2(), (3, 64, 64)),
                                        (lambda: __import__("torchvision").models.resnet18(), (3, 64, 64))])
def test_act_elements_are_what_each_layer_reads(make, shape):
    from hawq_ray.quant.layers import layer_table
    model = make().eval()
    seen = {}
    handles = [m.register_forward_pre_hook(lambda mod, inp, name=name: seen.__setitem__(name, inp[0].numel()))
               for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.randn(1, *shape))
    for h in handles:
        h.remove()
    table = layer_table(model, shape)
    assert dict(zip(table["layer"], table["act_elements"])) == seen
    if make is Net:
        assert seen == {"stem": 3 * 20 * 20, "dw": 8 * 10 * 10, "pw": 8 * 10 * 10, "fc": 16}
