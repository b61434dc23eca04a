"""QAT training step vs fp32 training step, same model, batch and optimizer, in one process.

The issue's bar: a QAT step costs at most 2x the fp32 step. Prints median ms per step and the ratio.
Usage: python bench/bench_qat_step.py [--threads 2] [--repeats 10] [--json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from hawq_ray.inputs.models import get_model, input_shape
from hawq_ray.quant.qat import prepare

CASES = [("digits_resnet", 128, "uniform4"), ("digits_resnet", 128, "uniform8"),
         ("resnet20_cifar10", 64, "uniform4"), ("resnet20_cifar10", 64, "uniform8"),
         ("resnet18", 8, "uniform4"), ("resnet18", 8, "uniform8")]


def step_time(model, x, y, repeats: int) -> float:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=1e-4)
    times = []
    for i in range(repeats + 2):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, batch, bits in CASES:
        shape = input_shape(name)
        model = get_model(name)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((batch, *shape), generator=gen)
        y = torch.randint(0, 10, (batch,), generator=gen)
        fp32 = model.train()
        for m in fp32.modules():          # same frozen-BN regime as QAT (BN folded and frozen)
            if isinstance(m, torch.nn.BatchNorm2d):
                m.eval()
        t_fp32 = step_time(fp32, x, y, args.repeats)
        qm = prepare(model, bits, shape)
        qm.calibrate([x[:8]])
        qm.train()
        t_qat = step_time(qm, x, y, args.repeats)
        rows.append({"model": name, "batch": batch, "bits": bits, "fp32_ms": round(t_fp32, 2),
                     "qat_ms": round(t_qat, 2), "qat_over_fp32": round(t_qat / t_fp32, 2)})
        print(f"{name:18s} batch {batch:4d} {bits:9s} fp32 {t_fp32:9.2f} ms   QAT {t_qat:9.2f} ms   "
              f"ratio {t_qat / t_fp32:5.2f}  (bar: <= 2.00)", flush=True)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
