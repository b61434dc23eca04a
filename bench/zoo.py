"""Zoo models end to end at full size: QAT simulation vs the integer executor, and optionally the compiled TVM
module vs the integer executor, per model and bit config, on random weights (BN statistics from random
images) and random inputs. Prints one row per (model, config); --json prints one JSON object last.

    python bench/zoo.py [--models torchvision:mobilenet_v2,...|probe] [--configs uniform8,uniform4,mixed]
                        [--size 224|0] [--inputs 8] [--tvm] [--target llvm] [--json]

`--models probe` is the 30 pytorchcv ImageNet classifiers of issue 44's probe (no other issue names them);
`--size 0` runs each model at its own input shape (`inputs.models.input_shape`). Each row says how the model
was captured (torch.fx or torch.export) or, for a model that does not convert, the one-line error.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import pandas as pd
import torch
from torch import nn

from hawq_ray.quant.layers import layer_table
from hawq_ray.analysis.verify import check_compiled, check_simulation
from hawq_ray.contract import HawqError
from hawq_ray.contract.table import COL
from hawq_ray.inputs.models import get_model, input_shape
from hawq_ray.quant.graph import trace_graph
from hawq_ray.quant.qat import prepare

MODELS = ("torchvision:mobilenet_v2,torchvision:mobilenet_v3_small,torchvision:efficientnet_b0,"
          "torchvision:mnasnet0_5,torchvision:regnet_x_400mf,torchvision:densenet121,torchvision:googlenet,"
          "torchvision:resnext50_32x4d,mobilenetv2_w1,mobilenetv3_small_w7d20,efficientnet_b0")
# issue 44's probe: pytorchcv classifiers of many families, random weights, each at its own input size
PROBE = ("dla34,sparsenet121,hardnet39ds,peleenet,selecsls42b,vovnet27s,ghostnet,darknet53,xception,menet108_8x1_g3,"
         "drnc26,diracnet18v2,fishnet99,scnet50,airnet50_1x64d_r2,dpn68,nasnet_4a1056,pyramidnet101_a360,"
         "cbam_resnet50,resnesta18,sknet50,resattnet56,espnetv2_w1,bam_resnet50,channelnet,condensenet74_c4_g4,"
         "octresnet10_ad2,dicenet_w1,mixnet_s,isqrtcovresnet50")


def live_model(name: str, shape) -> nn.Module:
    """The model with BN statistics of random images (random-init signals can vanish otherwise)."""
    model = get_model(name)
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.randn(4, *shape))
    return model.eval()


def bits_of(config: str, table: pd.DataFrame, seed: int = 0):
    if config != "mixed":
        return config
    rng = np.random.default_rng(seed)
    return {layer: int(f) if not pd.isna(f) else int(rng.choice([4, 8]))
            for layer, f in zip(table[COL.layer], table[COL.fixed_bits])}


def run_one(name: str, config: str, shape, inputs: int, tvm: bool, target) -> dict:
    t0 = time.perf_counter()
    model = live_model(name, shape)
    graph = trace_graph(model, shape)
    table = layer_table(model, shape, graph)
    torch.manual_seed(0)
    qm = prepare(model, bits_of(config, table), shape, table=table)
    qm.calibrate([torch.randn(4, *shape) for _ in range(2)])
    x = torch.randn(inputs, *shape)
    sim, _ = check_simulation(qm, x)
    row = {"model": name, "config": config, "capture": graph.capture.split(" ")[0], "layers": len(table),
           "sim_differing": sim["differing"], "elements": sim["elements"]}
    if tvm:
        program = qm.to_integer()
        t1 = time.perf_counter()
        out, _ = check_compiled(program, program.quantize_input(x), target)
        row |= {"tvm_differing": out["tvm_differing"], "tvm_values": out["tvm_values"],
                "first_divergence": out["tvm_first_divergence"], "compile_check_s": round(time.perf_counter() - t1, 1)}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=MODELS)
    ap.add_argument("--configs", default="uniform8,uniform4,mixed")
    ap.add_argument("--size", type=int, default=224, help="image size; 0: each model's own input shape")
    ap.add_argument("--inputs", type=int, default=8)
    ap.add_argument("--tvm", action="store_true", help="also compile and compare the TVM module")
    ap.add_argument("--target", default="llvm")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    models = PROBE if args.models == "probe" else args.models
    rows = []
    for name in models.split(","):
        for config in args.configs.split(","):
            try:
                shape = input_shape(name) if args.size == 0 else (3, args.size, args.size)
                row = run_one(name, config, shape, args.inputs, args.tvm, args.target)
            except HawqError as e:
                row = {"model": name, "config": config, "error": str(e)}
            except Exception as e:  # noqa: BLE001 -- a crash is a row of the probe too, not its end
                row = {"model": name, "config": config, "error": f"CRASH {type(e).__name__}: {e}".splitlines()[0]}
            rows.append(row)
            print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    frame = pd.DataFrame(rows)
    print(frame.to_string(index=False))
    if args.json:
        print(json.dumps(rows, default=str))


if __name__ == "__main__":
    main()
