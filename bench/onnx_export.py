"""ONNX QDQ export of models x bit configs x branch forms, each run in onnxruntime against the integer
executor: onnx.checker (full), top-1 agreement, the largest logit difference in output-scale units and as a
fraction of the largest logit. The default model is trained on digits (as `hawq-ray run` trains it) and
checked on its held-out split; the others have random weights (BN statistics of random images, so no signal
vanishes) and are checked on random images.

    python bench/onnx_export.py [--models digits_resnet,resnet20_cifar10,resnet18,resnet50,inceptionv3]
                                [--configs uniform8,uniform4,mixed] [--forms exact,fused] [--size N]
                                [--batches 2] [--batch 8] [--json]

The issue's bar: >= 99% top-1 agreement on the default model's held-out split (and on random inputs for the
zoo models).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import torch
from torch import nn

from hawq_ray.contract.table import COL


def model_and_shape(name: str, size: int | None):
    from hawq_ray.inputs.models import DEFAULT_MODEL, get_model, input_shape
    if name == DEFAULT_MODEL:
        from hawq_ray.inputs.data import load_data
        from hawq_ray.quant.finetune import fp32_weights
        shape = tuple(input_shape())
        data = load_data("digits", input_shape=shape)
        model, _, _ = fp32_weights(Path(tempfile.gettempdir()) / "hawq_onnx_bench_fp32", data)
        test = torch.stack([data.test[i][0] for i in range(len(data.test))])
        calib = [torch.stack([data.train[i][0] for i in range(k, k + 64)]) for k in (0, 64)]
        return model.eval(), shape, calib, [test[i:i + 64] for i in range(0, len(test), 64)]
    model = get_model(name)
    shape = tuple(input_shape(name))
    if size:
        shape = (shape[0], size, size)
    torch.manual_seed(1)
    for m in model.modules():           # BN statistics of random images: no vanishing signal at random init
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, *shape))
    return model.eval(), shape, [torch.randn(8, *shape) for _ in range(2)], None


def mixed_bits(model, shape, seed=0):
    from hawq_ray.quant.layers import layer_table
    table = layer_table(model, shape)
    rng = np.random.default_rng(seed)
    by_group, bits = {}, {}
    for layer, group, fixed in zip(table[COL.layer], table[COL.group], table[COL.fixed_bits]):
        if not pd.isna(fixed):
            continue
        key = layer if pd.isna(group) or not group else group
        bits[layer] = by_group.setdefault(key, int(rng.choice([4, 8])))
    return bits


def main(argv=None):
    from hawq_ray.onnx.export import check_onnx, export_onnx
    from hawq_ray.quant.qat import prepare
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="digits_resnet,resnet20_cifar10,resnet18,resnet50,inceptionv3")
    ap.add_argument("--configs", default="uniform8,uniform4,mixed")
    ap.add_argument("--forms", default="exact,fused")
    ap.add_argument("--size", type=int, default=None, help="H = W of the images (default: the model's own)")
    ap.add_argument("--batches", type=int, default=2, help="random batches for the models without data")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        model, shape, calib, held_out = model_and_shape(name, args.size)
        torch.manual_seed(2)
        inputs = held_out or [torch.randn(args.batch, *shape) for _ in range(args.batches)]
        for cfg in args.configs.split(","):
            bits = mixed_bits(model, shape) if cfg == "mixed" else cfg
            program = prepare(model, bits, shape).calibrate(calib).to_integer()
            for form in args.forms.split(","):
                path = Path(tempfile.mkdtemp()) / "m.onnx"
                t0 = time.perf_counter()
                export_onnx(program, path, form=form)
                export_s = time.perf_counter() - t0
                onnx.checker.check_model(str(path), full_check=True)
                check = check_onnx(path, program, inputs)
                rows.append({"model": name, "shape": "x".join(map(str, shape)), "bits": cfg, "form": form,
                             "export_s": round(export_s, 1), "data": "held-out" if held_out else "random",
                             **check})
                print(pd.DataFrame(rows[-1:]).to_string(index=False, header=len(rows) == 1), flush=True)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
