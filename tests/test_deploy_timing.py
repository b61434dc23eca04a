"""Latencies of several compiled models timed together: interleaved rounds, the median and interquartile range,
the budget each config was chosen under (whole model, fixed layers included) and the over-budget flag."""
from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from hawq_ray.analysis.timing import against_budget, interleaved_samples, spread, time_models
from hawq_ray.service.cli import main
from solver.sweep import sweep_budgets


def test_rounds_rotate_the_order_and_every_timer_gets_one_sample_per_round():
    order = []
    timers = {k: (lambda k=k: order.append(k) or float(len(order))) for k in "abc"}
    samples = interleaved_samples(timers, rounds=4, pause=0)
    assert order == list("abc" "bca" "cab" "abc")
    assert samples == {"a": [1.0, 6.0, 8.0, 10.0], "b": [2.0, 4.0, 9.0, 11.0], "c": [3.0, 5.0, 7.0, 12.0]}


def test_spread_is_the_median_and_quartiles():
    # linear interpolation between order statistics: position q * (n - 1)
    assert spread([5, 1, 4, 2, 3]) == {"latency_median_ms": 3.0, "latency_q25_ms": 2.0, "latency_q75_ms": 4.0,
                                       "latency_samples": 5}
    s = spread([4.0, 1.0, 3.0, 2.0])                     # positions 0.75, 1.5, 2.25 of 1, 2, 3, 4
    assert (s["latency_q25_ms"], s["latency_median_ms"], s["latency_q75_ms"]) == (1.75, 2.5, 3.25)


class FakeModel:
    """A model whose every call takes `ms`: what the harness must report, whatever `number` it asks for."""
    def __init__(self, ms):
        self.ms, self.numbers = ms, []

    def call_ms(self, number):
        self.numbers.append(number)
        return self.ms


def test_time_models_reports_each_model_by_name_with_calls_filling_a_sample():
    fast, slow = FakeModel(2.0), FakeModel(40.0)
    got = time_models({"fast": fast, "slow": slow}, rounds=5, min_ms=30.0, pause=0).set_index("config")
    assert got.loc["fast", "latency_median_ms"] == 2.0 and got.loc["slow", "latency_median_ms"] == 40.0
    assert got.loc["fast", "calls"] == 15 and got.loc["slow", "calls"] == 1        # ceil(30 / ms), at least 1
    assert set(fast.numbers[:-5]) == {1} and fast.numbers[-5:] == [15] * 5 and (got["latency_samples"] == 5).all()
    with pytest.raises(ValueError, match="rounds"):
        time_models({"fast": fast}, rounds=0)


def test_over_budget_only_when_the_whole_interval_is_above_the_limit():
    measured = pd.DataFrame({"config": ["over", "straddles", "under", "no_budget"],
                             "latency_median_ms": [10.0, 10.0, 10.0, 10.0], "latency_q25_ms": [9.5, 8.9, 9.0, 9.0],
                             "latency_q75_ms": [11.0, 11.0, 11.0, 11.0], "latency_samples": 15})
    got = against_budget(measured, {"over": 8.0, "under": 12.0}, {"over": 9.0, "straddles": 9.0, "under": 12.0})
    assert got["over_budget"].tolist() == [True, False, False, False]
    assert got["predicted_ms"].tolist()[:1] == [8.0] and math.isnan(got["predicted_ms"].iloc[1])
    assert math.isnan(got["latency_limit_ms"].iloc[3])


def test_sweep_records_the_tightest_whole_model_latency_budget():
    t = pd.DataFrame({"layer": ["stem", "a", "b", "c"], "params": [100, 200, 300, 400], "macs": [10, 20, 30, 40],
                      "fixed_bits": pd.array([8, pd.NA, pd.NA, pd.NA], dtype="Int64"),
                      "omega4": [0.0, 3.0, 2.0, 1.0], "omega8": [0.0, 0.0, 0.0, 0.0],
                      "lat4_ms": [0.5, 1.0, 1.0, 1.0], "lat8_ms": [0.7, 2.0, 3.0, 4.0]})
    # searchable R4 = 3, R8 = 9; the stem is fixed at 8 bits (0.7 ms); r = 0.5 -> 3 + 0.5 * 6 + 0.7 = 6.7 ms,
    # r = 0.55 -> 7.0 ms: both choose a at 8 bits and b at 8 (1 + 2 + 3 = 6 <= 6.0, 6.3), one config
    sweep = sweep_budgets(t, [{"latency": 0.55}, {"latency": 0.5}, {"bops": 1.0}])
    cfg = sweep.configs.set_index("config")
    latency_config = int(sweep.points["config"].iloc[0])
    assert int(sweep.points["config"].iloc[1]) == latency_config
    assert cfg.loc[latency_config, "latency_limit_ms"] == pytest.approx(6.7)
    assert cfg.loc[latency_config, "latency_ms"] <= 6.7 + 1e-9
    bops_only = int(sweep.points["config"].iloc[2])
    assert bops_only != latency_config and math.isnan(cfg.loc[bops_only, "latency_limit_ms"])
    assert cfg.loc[int(sweep.points["config"].iloc[0]), "bits"] == {"stem": 8, "a": 8, "b": 8, "c": 4}


def test_a_sweep_table_file_carries_prediction_and_budget_to_compile(tmp_path):
    from hawq_ray.contract.bits import read_configs
    t = pd.DataFrame({"layer": ["a", "b"], "params": [100, 200], "macs": [10, 20], "omega4": [1.0, 2.0],
                      "omega8": [0.0, 0.0], "lat4_ms": [1.0, 1.0], "lat8_ms": [2.0, 3.0]})
    sweep_budgets(t, [{"latency_ms": 4.5}]).configs.to_parquet(tmp_path / "sw.parquet")
    (c,) = read_configs([str(tmp_path / "sw.parquet")], t)        # b at 8 bits: 1 + 3 = 4 ms <= 4.5
    assert dict(c.bits) == {"a": 4, "b": 8} and c.latency_ms == 4.0 and c.latency_limit_ms == 4.5
    assert c.budget == ({"latency_ms": 4.5},)


def test_compile_several_configs_times_them_together(tmp_path, capsys):
    assert main(["compile", "--bits", "uniform4", "uniform8", "--batch", "2", "--rounds", "3",
                 "--out", str(tmp_path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out["out"]) == {"uniform4", "uniform8"} and set(out["input_scale"]) == {"uniform4", "uniform8"}
    for name, folder in out["out"].items():
        assert folder == str(tmp_path / name) and (tmp_path / name / "manifest.json").is_file()
    rows = {r["config"]: r for r in out["latency"]}
    assert set(rows) == {"uniform4", "uniform8"}
    for r in rows.values():
        assert r["latency_samples"] == 3 and r["latency_q25_ms"] <= r["latency_median_ms"] <= r["latency_q75_ms"]
        assert r["over_budget"] is False and r["predicted_ms"] is None       # no sweep table: nothing predicted
    assert main(["compile", "--bits", "uniform4", "uniform8", "--checkpoint", str(tmp_path / "x.pt"),
                 "--out", str(tmp_path / "o")]) == 2
    assert "fits one config" in capsys.readouterr().err
