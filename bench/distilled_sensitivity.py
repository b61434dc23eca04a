"""Data-free sensitivity (`data: distilled`, after ZeroQ): do Hessian traces of images distilled from BatchNorm
statistics rank the layers as traces of real data do, and do the ILP's configs they choose quantize as well?

digits_resnet, trained on digits (8 epochs, cached in --cache): per-layer traces (deflated Hutchinson, the run's
defaults: 4 batches of 64, tol 0.05, rank 16) on the real digits train split and on 256 distilled images (labels:
the fp32 model's predictions); Spearman of the two trace vectors (and of the ILP's per-layer gains omega4 - omega8);
the ILP's config at size and BOPS budgets 0.25 / 0.5 / 0.75 from each table, and each config's post-training
top-1 on the REAL held-out digits (integer executor): the real path calibrated on real images, the data-free path
on the distilled ones (and, to separate the two effects, the distilled config calibrated on real images).

resnet20_cifar10 (pytorchcv, random weights, nothing downloaded): its BatchNorm running statistics set by train-mode
passes over smooth random images first, then traces on distilled images against traces on the synthetic random
images the run uses for a model without data; Spearman of the two.

    python bench/distilled_sensitivity.py [--cache /tmp/hawq_distilled] [--steps 500] [--r20-steps 200]
                                          [--r20-images 128] [--max-iter 64]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hawq_ray.contract.table import COL, omega_col  # noqa: E402

BUDGETS = [{r: v} for r in ("size", "bops") for v in (0.25, 0.5, 0.75)]


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def traces(model, shape, shards, max_iter: int, seed: int = 0):
    """The sensitivity table (traces, deltas, omegas) of `shards` [(x, y)], the run's estimator."""
    from hawq_ray.analysis.sensitivity import layer_traces, sensitivity_columns, weight_deltas
    from hawq_ray.quant.layers import layer_table
    table = layer_table(model, shape)
    t = layer_traces(model, shards, tol=0.05, max_iter=max_iter, seed=seed)
    return sensitivity_columns(table, t, weight_deltas(model, table[COL.layer]))


def rank_agreement(a, b) -> dict:
    from hawq_ray.analysis.evidence import spearman
    gain = lambda t: (t[omega_col(4)] - t[omega_col(8)]).to_numpy(float)   # noqa: E731
    return {"trace": spearman(a[COL.trace], b[COL.trace]), "gain": spearman(gain(a), gain(b)),
            "layers": len(a)}


def stderr_note(*tables) -> str:
    """The worst relative standard error of each table's traces."""
    worst = [float((t[COL.trace_stderr] / t[COL.trace].abs()).max()) for t in tables]
    return "worst relative stderr " + " / ".join(f"{w:.2f}" for w in worst)


def ptq_top1(model, shape, bits, calibration, test, table) -> float:
    from hawq_ray.quant.finetune import Recipe, calibrated, integer_predictions, labels_of, top1
    qm = calibrated(model, bits, calibration, Recipe(batch_size=64), shape, table)
    return top1(integer_predictions(qm, test, 256), labels_of(test))


def digits(args) -> None:
    from hawq_ray.inputs.data import batches, load_data
    from hawq_ray.quant.finetune import fp32_weights
    from solver.ilp import solve_bits

    shape = (1, 16, 16)
    real = load_data("digits", input_shape=shape, seed=0)
    model, path, trained = fp32_weights(Path(args.cache) / "digits", real, model_name="digits_resnet", seed=0)
    log(f"digits_resnet fp32 weights {'trained' if trained else 'reused'}: {path}")
    t = time.perf_counter()
    distilled = load_data("distilled", input_shape=shape, seed=0, model=model, cache_dir=Path(args.cache) / "distilled",
                          distill={"steps": args.steps}, log=log, model_name="digits_resnet")
    distill_s = time.perf_counter() - t
    t_real = traces(model, shape, batches(real.train, 64, 4), args.max_iter)
    t_dist = traces(model, shape, batches(distilled.train, 64, 4), args.max_iter)
    agree = rank_agreement(t_real, t_dist)
    floor = rank_agreement(t_real, traces(model, shape, batches(real.train, 64, 4), args.max_iter, seed=1))
    print(f"\n## digits_resnet (trained on digits): traces on real digits vs on {len(distilled.train)} distilled images "
          f"({args.steps} steps, {distill_s:.0f} s to distill or read)\n")
    print(f"Spearman of the {agree['layers']} per-layer traces: {agree['trace']:.3f}; of the ILP's gains "
          f"omega4 - omega8: {agree['gain']:.3f} (the estimator against itself, real data, another seed: "
          f"{floor['trace']:.3f} / {floor['gain']:.3f}; {stderr_note(t_real, t_dist)})\n")
    print("| layer | trace (real) | trace (distilled) | ratio |")
    print("|---|---|---|---|")
    for (_, r), (_, d) in zip(t_real.iterrows(), t_dist.iterrows()):
        print(f"| {r[COL.layer]} | {r[COL.trace]:.4g} | {d[COL.trace]:.4g} | {d[COL.trace] / r[COL.trace]:.3g} |")
    fp32 = ptq_top1_fp32(model, real.test)
    print(f"\nfp32 top-1 on the real held-out digits: {fp32:.4f}; fp32 agreement on the distilled held-out split: 1 by "
          "construction\n")
    print("| budget | ILP config (real traces) | ILP config (distilled traces) | same | PTQ top-1 real "
          "(real calib.) | PTQ top-1 distilled (distilled calib.) | distilled config, real calib. |")
    print("|---|---|---|---|---|---|---|")
    same = 0
    for budget in BUDGETS:
        a, b = solve_bits(t_real, budget).bits, solve_bits(t_dist, budget).bits
        config = lambda bits: "".join(str(v) for v in bits.values())   # noqa: E731
        top_real = ptq_top1(model, shape, a, real.train, real.test, t_real)
        top_dist = ptq_top1(model, shape, b, distilled.train, real.test, t_real)
        top_mixed = ptq_top1(model, shape, b, real.train, real.test, t_real)
        same += a == b
        print(f"| {budget} | {config(a)} | {config(b)} | {'yes' if a == b else 'no'} | {top_real:.4f} | "
              f"{top_dist:.4f} | {top_mixed:.4f} |")
    print(f"\nthe same config at {same} of {len(BUDGETS)} budgets")


def ptq_top1_fp32(model, test) -> float:
    from hawq_ray.quant.finetune import float_predictions, labels_of, top1
    return top1(float_predictions(model, test), labels_of(test))


def with_statistics(model, shape, batches: int = 16, seed: int = 1):
    """Running statistics of smooth random images normalized to mean 0 / std 1 (train-mode passes, cumulative
    averages; no weight changes)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(batches):
            x = torch.nn.functional.avg_pool2d(torch.randn((64, *shape), generator=g), 3, 1, 1)
            model((x - x.mean()) / x.std())
    return model.eval()


def resnet20(args) -> None:
    from hawq_ray.inputs.data import batches, load_data
    from hawq_ray.inputs.models import get_model

    shape = (3, 32, 32)
    torch.manual_seed(0)
    model = with_statistics(get_model("resnet20_cifar10"), shape)
    synthetic = load_data("synthetic", input_shape=shape, seed=0)
    t = time.perf_counter()
    distilled = load_data("distilled", input_shape=shape, seed=0, model=model, log=log, model_name="resnet20_cifar10",
                          cache_dir=Path(args.cache) / "distilled",
                          distill={"train": args.r20_images, "test": 2, "steps": args.r20_steps})
    distill_s = time.perf_counter() - t
    shards = max(1, args.r20_images // 64)
    t_syn = traces(model, shape, batches(synthetic.train, 64, shards), args.max_iter)
    t_dist = traces(model, shape, batches(distilled.train, 64, shards), args.max_iter)
    agree = rank_agreement(t_syn, t_dist)
    floor = rank_agreement(t_syn, traces(model, shape, batches(synthetic.train, 64, shards), args.max_iter, seed=1))
    print(f"\n## resnet20_cifar10 (random weights, BatchNorm statistics of smooth random images): traces on synthetic "
          f"vs distilled images ({len(distilled.train)} images, {args.r20_steps} steps, {distill_s:.0f} s)\n")
    print(f"Spearman of the {agree['layers']} per-layer traces: {agree['trace']:.3f}; of the gains omega4 - omega8: "
          f"{agree['gain']:.3f} (the estimator against itself, synthetic data, another seed: {floor['trace']:.3f} / "
          f"{floor['gain']:.3f}; {stderr_note(t_syn, t_dist)})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", default="/tmp/hawq_distilled", help="fp32 weights and distilled images")
    p.add_argument("--steps", type=int, default=500, help="distillation steps per batch, digits_resnet")
    p.add_argument("--r20-steps", type=int, default=200, help="distillation steps per batch, resnet20")
    p.add_argument("--r20-images", type=int, default=128, help="distilled images for resnet20's traces")
    p.add_argument("--max-iter", type=int, default=64, help="Hutchinson iterations at most")
    p.add_argument("--skip", default="", help="digits or resnet20: leave that part out")
    args = p.parse_args()
    if "digits" not in args.skip:
        digits(args)
    if "resnet20" not in args.skip:
        resnet20(args)


if __name__ == "__main__":
    main()
