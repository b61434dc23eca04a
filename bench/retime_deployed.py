"""Re-time the compiled modules of a run folder (RUN/deploy/*) in one process, independently of the deploy stage,
and set the result beside the latencies the run's report holds.

It loads each module again in a new process and times `model(x)` (its own random int8 input, the output copied
back to numpy) with its own timer loop, in its own interleaved rounds with a rotating order.
A run's latencies are trustworthy when each re-timed median falls inside the run's interquartile range, or
the two ranges overlap; the order of two configs means something only where their ranges do not overlap.

    python bench/retime_deployed.py RUN [--rounds 15] [--calls 0] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from hawq_ray.analysis.latency import warm_number  # noqa: E402
from hawq_ray.analysis.timing import interleaved_samples, spread  # noqa: E402
from hawq_ray.deploy.build import load_model  # noqa: E402
from hawq_ray.service.outputs import inside  # noqa: E402


def call_timer(model, calls: int, min_ms: float = 30.0):
    """mean ms of `calls` calls (0: as many as last about min_ms, counted after a warm-up of at least 50 ms, as the
    deploy stage counts them: the first calls after loading can take many times a steady call)."""
    shape = model.manifest["input_shape"]
    x = np.random.default_rng(1).integers(-128, 128, size=shape, dtype=np.int8)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            model(x)
        return (time.perf_counter() - t0) / n * 1e3
    calls = calls or warm_number(run, min_ms)
    return lambda: run(calls)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a run folder with deploy.parquet")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=0,
                    help="back-to-back calls per sample (mean); 0: enough to last about 30 ms")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    deploy = pd.read_parquet(args.run / "deploy.parquet")
    # the table records each module's folder relative to the run folder
    timers = {r.config: call_timer(load_model(inside(args.run, r.module)), args.calls) for r in deploy.itertuples()}
    again = {k: spread(v) for k, v in interleaved_samples(timers, args.rounds).items()}
    rows = []
    for r in deploy.itertuples():
        a = again[r.config]
        within = r.latency_q25_ms <= a["latency_median_ms"] <= r.latency_q75_ms
        overlap = a["latency_q25_ms"] <= r.latency_q75_ms and r.latency_q25_ms <= a["latency_q75_ms"]
        rows.append({"config": r.config, "run_median_ms": r.latency_median_ms, "run_q25_ms": r.latency_q25_ms,
                     "run_q75_ms": r.latency_q75_ms, "predicted_ms": r.predicted_ms,
                     "retimed_median_ms": a["latency_median_ms"], "retimed_q25_ms": a["latency_q25_ms"],
                     "retimed_q75_ms": a["latency_q75_ms"], "median_inside_run_iqr": bool(within),
                     "iqrs_overlap": bool(overlap)})
    print(f"{args.run}: {len(rows)} modules, re-timed in {args.rounds} interleaved rounds x "
          f"{args.calls or 'about 30 ms of'} calls, "
          f"{os.cpu_count()} threads", file=sys.stderr)
    print(f"{'config':12s} {'run median (IQR) ms':>26s} {'re-timed median (IQR) ms':>28s} {'predicted':>9s} "
          f"{'inside':>6s} {'overlap':>7s}")
    for r in rows:
        print(f"{r['config']:12s} {r['run_median_ms']:9.3f} ({r['run_q25_ms']:.3f}-{r['run_q75_ms']:.3f}) "
              f"{r['retimed_median_ms']:11.3f} ({r['retimed_q25_ms']:.3f}-{r['retimed_q75_ms']:.3f}) "
              f"{r['predicted_ms']:9.3f} {str(r['median_inside_run_iqr']):>6s} {str(r['iqrs_overlap']):>7s}")
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
