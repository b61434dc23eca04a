"""Does the search choose well? The evidence stage's bars (issue 15), on models trained on the digits data.

For each model: train it on digits (cached), estimate its per-layer Hessian traces (deflated Hutchinson, as the
default run), then for every size and BOPS budget of the default sweep quantize the ILP's config, up to 20 random
fills of the same budget and the reversed fill without fine-tuning, run each with the integer executor on the
held-out digits and measure the KL divergence of its predictions from the fp32 model's (Ray tasks, as
`hawq-ray validate`). Printed beside the bars:

  * Spearman correlation of predicted sum Omega and measured KL over every distinct config:  >= 0.7, >= 30 configs
  * at every budget the ILP config's KL is lower than that of >= 80% of the random fills, and than the reversed one

`--seeds` trains each model once per seed (the seed sets the order of the training data; the initial weights
are the same), because a bar met on one training run can miss on the next: the spread is part of the answer.

    python bench/bench_evidence.py [--models digits_resnet,resnet20_cifar10] [--seeds 0,1,2] [--randoms 20]
                                   [--max-iter 64] [--batches 4]
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hawq_ray.contract.table import COL  # noqa: E402

GRID = [{r: v} for r in ("size", "bops") for v in (0.25, 0.5, 0.75)]


def trained(name: str, seed: int, cache: Path):
    """(model, input shape, digits splits) with the model trained on digits: the default model as the default run
    trains it (8 epochs), any other briefly (2 epochs)."""
    from hawq_ray.inputs.data import load_data
    from hawq_ray.inputs.models import input_shape
    from hawq_ray.quant.finetune import fp32_weights

    shape = input_shape(name)
    data = load_data("digits", input_shape=shape, seed=0)
    model, _, _ = fp32_weights(cache / f"seed{seed}", data, model_name=name,
                               epochs=8 if name == "digits_resnet" else 2, seed=seed)
    return model, shape, data


def sensitivity(model, shape, data, max_iter: int, shards: int):
    from hawq_ray.quant.layers import layer_table
    from hawq_ray.analysis.sensitivity import layer_traces, sensitivity_columns, weight_deltas
    from hawq_ray.inputs.data import batches

    table = layer_table(model, shape)
    traces = layer_traces(model, batches(data.train, 64, shards), tol=0.05, max_iter=max_iter)
    return sensitivity_columns(table, traces, weight_deltas(model, table[COL.layer]))


def one(name: str, seed: int, randoms: int, max_iter: int, shards: int, cache: Path) -> dict:
    from hawq_ray.analysis.evidence import omega_kl_correlation, standing
    from hawq_ray.service.evidence import evidence_table

    t = time.perf_counter()
    model, shape, data = trained(name, seed, cache)
    table = sensitivity(model, shape, data, max_iter, shards)
    rows = evidence_table(model, shape, data, table, GRID, randoms=randoms, seed=seed)
    rho, n = omega_kl_correlation(rows)
    return {"standing": standing(rows), "rows": rows, "rho": rho, "configs": n, "seconds": time.perf_counter() - t,
            "converged": bool(table["trace_converged"].all()),
            "worst_rel_stderr": float((table[COL.trace_stderr] / table[COL.trace].abs()).max())}


def report(name: str, seed: int, r: dict) -> None:
    s = r["standing"]
    print(f"\n{name}, seed {seed}: {r['configs']} distinct configs, traces converged: {r['converged']} "
          f"(worst relative stderr {r['worst_rel_stderr']:.3f}), "
          f"{r['seconds']:.0f} s")
    print(f"{'budget':18s}{'ILP KL':>10s}{'randoms':>9s}{'beaten':>8s}{'bar':>6s}{'reversed KL':>13s}{'bar':>6s}")
    for row in s.itertuples():
        beats = row.beats_random_fraction
        ok_r = "n/a" if row.randoms == 0 else ("PASS" if beats >= 0.8 else "FAIL")
        ok_v = "n/a" if row.beats_reversed is None else ("PASS" if row.beats_reversed else "FAIL")
        print(f"{row.budget:18s}{row.ilp_kl:10.5f}{row.randoms:9d}{beats:8.0%}{ok_r:>6s}{row.reversed_kl:13.5f}"
              f"{ok_v:>6s}")
    for budget, group in r["rows"].groupby("budget", sort=False):
        ilp = group[group["kind"] == "ilp"].iloc[0]
        better = group[(group["kind"] == "random") & (group["kl"] < ilp["kl"])]
        if len(better):
            best = better.loc[better["kl"].idxmin()]
            print(f"  {budget}: the lowest-KL fill {best['config']} (KL {best['kl']:.5f}) has predicted Omega "
                  f"{best['predicted_omega']:.5f}, {best['predicted_omega'] / ilp['predicted_omega'] - 1:+.0%} "
                  f"against the ILP's {ilp['config']} ({ilp['predicted_omega']:.5f})")
    ok = r["rho"] >= 0.7 and r["configs"] >= 30
    print(f"Spearman(Omega, KL) {r['rho']:.3f} over {r['configs']} configs (bar >= 0.7 over >= 30): "
          f"{'PASS' if ok else 'FAIL'}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits_resnet,resnet20_cifar10")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--randoms", type=int, default=20)
    ap.add_argument("--batches", type=int, default=4, help="batches of 64 for the traces (the default run's: 4)")
    ap.add_argument("--max-iter", type=int, default=64, help="most trace iterations (the default run's: 64)")
    ap.add_argument("--cache", type=Path, default=Path("runs/bench-evidence"), help="trained weights cached here")
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    import ray
    from hawq_ray.service.session import connect
    connect(num_cpus=2)
    try:
        for name in args.models.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                report(name, seed, one(name, seed, args.randoms, args.max_iter, args.batches, args.cache))
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
