"""The confidence of a chosen config: draws of the traces from their estimate, re-solved. Checked on hand-built
tables whose answer is certain, or hangs on two layers of equal sensitivity, against the draws' own statistics,
and on Ray against the same draws in-process."""
from __future__ import annotations

from hawq_ray.service.session import start_local
import os

import numpy as np
import pandas as pd
import pytest

from solver.confidence import confidence, draw_answers, drawn_table
from solver.ilp import solve_bits


def four_layers(stderr: float) -> pd.DataFrame:
    """Four equal-size layers: size 0.25 has room for one at 8 bits, size 0.5 for two. a and b gain far more from
    8 bits than c and d, and alike: with noisy traces of a and b, which one gets the only place is a coin toss."""
    return pd.DataFrame({"layer": list("abcd"), "params": [1000] * 4, "macs": [1] * 4, "group": [""] * 4,
                         "fixed_bits": [""] * 4, "trace": [1000.0, 1000.0, 10.0, 1.0],
                         "trace_stderr": [stderr, stderr, 0.0, 0.0], "delta4": [1.0] * 4, "delta8": [0.0] * 4})


def test_certain_traces_choose_the_estimate_every_time():
    t = four_layers(0.0)
    grid = [{"size": 0.5}]
    chosen = [tuple(solve_bits(t, grid[0]).bits.values())]
    assert chosen == [(8, 8, 4, 4)]
    (got,) = confidence(list(t["layer"]), chosen, draw_answers(t, grid, range(20)))
    assert got == {"confidence": 1.0, "flips": {}}


def test_a_tie_between_two_layers_flips_them_and_only_them():
    t = four_layers(100.0)
    grid = [{"size": 0.25}, {"size": 0.5}]
    chosen = [tuple(solve_bits(t, g).bits.values()) for g in grid]
    answers = draw_answers(t, grid, range(200), seed=3)
    tight, roomy = confidence(list(t["layer"]), chosen, answers)
    # room for one: a or b, as their drawn traces fall; the draws that pick the other flip both a and b
    wins_a = np.mean([d[0] == (8, 4, 4, 4) for d in answers])
    assert 0.3 < wins_a < 0.7
    assert tight["confidence"] == pytest.approx(wins_a if chosen[0][0] == 8 else 1 - wins_a)
    assert set(tight["flips"]) == {"a", "b"} and tight["flips"]["a"] == pytest.approx(1 - tight["confidence"])
    # room for two: a and b always
    assert roomy == {"confidence": 1.0, "flips": {}}


def test_draws_follow_the_estimate_and_do_not_depend_on_how_they_are_split():
    t = four_layers(100.0)
    traces = np.array([drawn_table(t, np.random.default_rng([0, d]))["trace"] for d in range(4000)])
    assert abs(traces[:, 0].mean() - 1000) < 4 * 100 / np.sqrt(4000)
    assert traces[:, 0].std() == pytest.approx(100, rel=0.05) and (traces[:, 2] == 10).all()
    noisy = np.array([drawn_table(t.assign(trace_stderr=100.0), np.random.default_rng([1, d]))["trace"][3]
                      for d in range(200)])
    assert noisy.min() == 0 and (noisy >= 0).all()             # a negative draw counts as zero sensitivity
    assert "omega4" not in drawn_table(t.assign(omega4=1.0, omega8=0.0), np.random.default_rng(0))
    grid = [{"size": 0.25}]
    assert draw_answers(t, grid, range(10), 5) == draw_answers(t, grid, range(4), 5) + draw_answers(t, grid, range(4, 10), 5)


def test_confidence_hand_worked():
    answers = [[(8, 4)], [(8, 4)], [(4, 8)], [None]]
    (got,) = confidence(["x", "y"], [(8, 4)], answers)
    assert got["confidence"] == 0.5 and got["flips"] == {"x": 0.5, "y": 0.5}
    assert np.isnan(confidence(["x", "y"], [None], answers)[0]["confidence"])


def test_draws_run_as_ray_tasks():
    import ray
    from hawq_ray.service.sweep import ray_draw_answers
    start_local(num_cpus=2)   # a fresh local Ray, started again if the raylet misses its 30 s
    try:
        t, grid, workers = four_layers(100.0), [{"size": 0.25}, {"size": 0.5}], set()
        assert ray_draw_answers(t, grid, 30, seed=2, workers=workers) == draw_answers(t, grid, range(30), 2)
        assert workers and os.getpid() not in workers
    finally:
        ray.shutdown()
