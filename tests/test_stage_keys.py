"""A cached stage is recomputed when one of its inputs changes, and only then: the run's stage fingerprints
(`stages.json`) hold each stage's inputs. Here the budgets, which only the sweep (and the evidence stage, off
here) reads: a run, then the same run with one budget changed, then once more unchanged.

Each run is stopped right after its sweep stage (from the `log` callback, on the sweep's last line), since the
stages after it (fine-tuning, TVM builds) read the sweep's table and are keyed by it; the tiny settings below
keep the three runs to about half a minute on two cores, most of it starting Ray and profiling the kernels once.
"""
from __future__ import annotations

import json

import pandas as pd
import pytest
import ray

from hawq_ray.service.pipeline import run

TINY = {"budgets": {"bops": [0.5]}, "uniform": ["uniform4"], "fp32_epochs": 1, "sweep": {"draws": 2},
        "sensitivity": {"actors": 1, "batches": 1, "batch_size": 16, "max_iter": 2, "rank": 0},
        "profile": {"batch": 1, "rounds": 1}, "evidence": {"enabled": False}}
BEFORE_SWEEP = ("layers", "sensitivity", "latency", "table")


class SweepFinished(Exception):
    """Raised from the log callback once the sweep's table is recorded: the end of what these tests run."""


def run_to_the_sweep(out, **settings) -> list[str]:
    """run() on the tiny settings (updated by `settings`) until the sweep stage is done; its log lines."""
    lines = []

    def log(msg):
        lines.append(str(msg))
        if str(msg).startswith(("[sweep] done", "[sweep] up to date")):
            raise SweepFinished

    with pytest.raises(SweepFinished):
        run({**TINY, **settings}, out=out, log=log)
    return lines


def stage_states(lines) -> dict:
    """{stage: 'running' | 'up to date'} from the '[stage] ...' log lines."""
    states = {}
    for line in lines:
        for stage in (*BEFORE_SWEEP, "sweep"):
            for state in ("running", "up to date"):
                if line.startswith(f"[{stage}] {state}"):
                    states[stage] = state
    return states


@pytest.fixture(scope="module")
def three_runs(tmp_path_factory):
    """The tiny run; again with bops budget 0.5 -> 0.25; again with 0.25. Each run's log lines, stages.json and
    sweep table."""
    started_here = not ray.is_initialized()
    out = tmp_path_factory.mktemp("run")
    results = []
    try:
        for budgets in ({"bops": [0.5]}, {"bops": [0.25]}, {"bops": [0.25]}):
            lines = run_to_the_sweep(out, budgets=budgets)
            results.append((lines, json.loads((out / "stages.json").read_text()),
                            pd.read_parquet(out / "sweep.parquet")))
    finally:
        if started_here:
            ray.shutdown()
    return results


def test_the_first_run_computes_every_stage_up_to_the_sweep(three_runs):
    lines, stages, sweep = three_runs[0]
    assert stage_states(lines) == {s: "running" for s in (*BEFORE_SWEEP, "sweep")}, lines
    assert any('"bops": 0.5' in b for b in sweep["budget"]), sweep["budget"].tolist()


def test_a_changed_budget_recomputes_the_sweep_and_only_the_sweep(three_runs):
    """The budgets are an input of the sweep (its fingerprint must hold them): with bops 0.5 -> 0.25 the sweep
    runs again and its table answers the new budget, while the layer table, traces and latencies, which do
    not read the budgets, are reused with their records unchanged."""
    (_, stages1, _), (lines, stages2, sweep) = three_runs[0], three_runs[1]
    states = stage_states(lines)
    assert states == {**{s: "up to date" for s in BEFORE_SWEEP}, "sweep": "running"}, lines
    assert stages2["sweep"]["key"] != stages1["sweep"]["key"]
    assert all(stages2[s] == stages1[s] for s in BEFORE_SWEEP)
    assert any('"bops": 0.25' in b for b in sweep["budget"]), sweep["budget"].tolist()
    assert not any('"bops": 0.5' in b for b in sweep["budget"])


def test_an_unchanged_rerun_reuses_the_sweep(three_runs):
    (_, stages2, sweep2), (lines, stages3, sweep3) = three_runs[1], three_runs[2]
    assert stage_states(lines) == {s: "up to date" for s in (*BEFORE_SWEEP, "sweep")}, lines
    assert stages3 == stages2
    pd.testing.assert_frame_equal(sweep3, sweep2)
