"""Latencies of several compiled models that can be compared with each other: every model is timed in the same
interleaved rounds with a rotating order, so the machine's drift and load spikes land on all of them alike, and
each is reported as the median over rounds with its interquartile range.

A single model timed once, then the next, measures the machine's phase as much as the model (this machine's
speed swings 2-3x between phases); within one round the models see the same machine.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Mapping

import numpy as np
import pandas as pd

from hawq_ray.analysis.latency import warm_number

SPREAD_COLUMNS = ["latency_median_ms", "latency_q25_ms", "latency_q75_ms", "latency_samples", "calls"]


def interleaved_samples(timers: Mapping[str, Callable[[], float]], rounds: int,
                        pause: float = 0.05) -> dict[str, list[float]]:
    """{name: one sample per round}. In round r the timers run in their given order rotated by r, each after a
    `pause` (seconds) that lets the previous runtime's spinning worker threads go idle; a timer returns ms."""
    names = list(timers)
    samples = {k: [] for k in names}
    for r in range(rounds):
        shift = r % len(names) if names else 0
        for k in names[shift:] + names[:shift]:
            time.sleep(pause)
            samples[k].append(float(timers[k]()))
    return samples


def spread(samples) -> dict:
    """The median and the interquartile range (numpy's linear percentiles) of one timer's samples, in ms."""
    a = np.asarray(samples, float)
    q25, q50, q75 = np.percentile(a, [25, 50, 75])
    return {"latency_median_ms": float(q50), "latency_q25_ms": float(q25), "latency_q75_ms": float(q75),
            "latency_samples": int(a.size)}


def time_models(models: Mapping[str, object], rounds: int = 15, min_ms: float = 30.0,
                pause: float = 0.05) -> pd.DataFrame:
    """One row per compiled model ({name: DeployedModel}, e.g. deploy.build.load_model of each folder): its
    latency per call at its compiled batch, `model(x)` as a user calls it (DeployedModel.call_ms), as the median
    and interquartile range of `rounds` samples, each the mean of `calls` back-to-back calls (chosen per model so
    a sample lasts about `min_ms`)."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds}: give at least 1")
    calls, timers = {}, {}
    for name, model in models.items():
        calls[name] = warm_number(model.call_ms, min_ms=min_ms)
        timers[name] = lambda run_ms=model.call_ms, n=calls[name]: run_ms(n)
    samples = interleaved_samples(timers, rounds, pause)
    return pd.DataFrame([{"config": k, **spread(v), "calls": calls[k]} for k, v in samples.items()],
                        columns=["config", *SPREAD_COLUMNS])


def against_budget(measured: pd.DataFrame, predicted: Mapping[str, float] | None = None,
                   limits: Mapping[str, float] | None = None) -> pd.DataFrame:
    """`measured` (time_models) with the latency the ILP predicted from the per-layer table (`predicted_ms`) and
    the latency budget that chose each config (`latency_limit_ms`, whole model) beside it; `over_budget` is True
    where the config breaks its budget by more than its interval: even the lower quartile is above the limit."""
    out = measured.copy()
    out["predicted_ms"] = [float((predicted or {}).get(c, math.nan)) for c in out["config"]]
    out["latency_limit_ms"] = [float((limits or {}).get(c, math.nan)) for c in out["config"]]
    out["over_budget"] = out["latency_q25_ms"] > out["latency_limit_ms"]     # False where there is no limit
    return out
