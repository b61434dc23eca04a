"""`hawq-ray finetune`: quantization-aware fine-tuning of chosen bit configs on Ray Tune (one trial per config and
hyperparameter sample), with top-1 measured by the integer executor; resumes an interrupted run in the same --out."""
from __future__ import annotations

import os

from hawq_ray.contract import HawqError
from hawq_ray.service.settings import BATCH, COUNT, EPOCHS, LEARNING_RATE, RESOURCES_PER_TRIAL, SAMPLES, WEIGHT_DECAY

SHOWN = ["config", "budget", "size_mib", "gbops", "latency_ms", "lr", "epochs", "top1_fp32", "top1_ptq", "top1",
         "checkpoint"]


def register(subparsers) -> None:
    p = subparsers.add_parser("finetune", help="QAT of bit configs on Ray Tune; integer top-1, checkpoints, resume",
                              description=__doc__)
    p.add_argument("--model", default=None, help="digits_resnet (default), a pytorchcv name, torchvision:NAME or package.module:callable")
    p.add_argument("--weights", help="fp32 state dict (torch.save); default model without it: trained on digits "
                   "and cached in --out; pytorchcv model without it: the local pytorchcv cache")
    p.add_argument("--configs", nargs="+", required=True, metavar="CONFIG",
                   help="uniform4, uniform8, a sweep table (.parquet/.csv from hawq-ray sweep), a {layer: bits} "
                   ".json or a HAWQ bit_config.py; several may be given")
    p.add_argument("--data", help="digits (default model), synthetic (other models), or a data folder")
    p.add_argument("--epochs", type=EPOCHS, default=3, help="QAT epochs per trial (default 3)")
    p.add_argument("--samples", type=COUNT, default=1, help="hyperparameter samples per config (default 1: the "
                   "recipe's lr; more: lr drawn log-uniformly from --lr-range)")
    p.add_argument("--lr", type=LEARNING_RATE, help="learning rate when --samples 1 (default 1e-4, the paper's)")
    p.add_argument("--lr-range", default="1e-4,1e-2", help="LOW,HIGH for sampled learning rates (default 1e-4,1e-2)")
    p.add_argument("--weight-decay", type=WEIGHT_DECAY, help="default 1e-4 (the paper's)")
    p.add_argument("--batch-size", type=BATCH, help="default 128, or the train split's size if smaller")
    p.add_argument("--distill", nargs="?", const=True, default=False, metavar="TEACHER",
                   help="Hinton distillation; TEACHER: fp32 (default: the model's fp32 weights), a pytorchcv name "
                   "(local cache) or NAME=WEIGHTS_PATH")
    p.add_argument("--asha", action="store_true", help="ASHA early stopping on the gain over PTQ top-1")
    p.add_argument("--train-limit", type=SAMPLES, help="use only the first N training samples")
    p.add_argument("--table", help="layer table with lat4_ms/lat8_ms (parquet/csv) to fill the latency column")
    p.add_argument("--cpus-per-trial", type=RESOURCES_PER_TRIAL, help="default 0.5 without GPUs, 1 with")
    p.add_argument("--gpus-per-trial", type=RESOURCES_PER_TRIAL, help="default 1 where the cluster has GPUs, else 0")
    p.add_argument("--address", help="Ray cluster to join (default: RAY_ADDRESS, or a local instance)")
    p.add_argument("--out", required=True, help="run folder: fp32 weights cache, tune/ experiment, finetune.parquet")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=run_finetune)


def _lr_range(text: str):
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise HawqError(f"--lr-range {text}: give LOW,HIGH, e.g. 1e-4,1e-2") from None
    return low, high


def run_finetune(args) -> int:
    import pandas as pd
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")   # keep Tune's console output short (verbose=0 honoured)
    from hawq_ray.quant.finetune import Recipe
    from hawq_ray.service.tune import TuneSettings, finetune_run
    table = None
    if args.table:
        from hawq_ray.service.cli.solve import read_layer_table
        table = read_layer_table(args.table)
    defaults = Recipe()
    recipe = Recipe(lr=args.lr or defaults.lr, epochs=args.epochs, distill=args.distill is not False,
                    weight_decay=defaults.weight_decay if args.weight_decay is None else args.weight_decay,
                    batch_size=args.batch_size or defaults.batch_size)
    settings = TuneSettings(samples=args.samples, lr_range=_lr_range(args.lr_range), asha=args.asha,
                            train_limit=args.train_limit, cpus_per_trial=args.cpus_per_trial,
                            gpus_per_trial=args.gpus_per_trial)
    teacher = None if args.distill in (False, True) else args.distill
    from hawq_ray.service.outputs import writable_folder
    writable_folder(args.out)
    result = finetune_run(args.configs, out=args.out, model=args.model, weights=args.weights, data=args.data,
                          recipe=recipe, settings=settings, teacher=teacher, layer_table=table, address=args.address)
    shown = result[SHOWN].copy()
    for col in ("top1_fp32", "top1_ptq", "top1"):
        shown[col] = (100 * shown[col]).round(2)
    with pd.option_context("display.width", 200, "display.max_colwidth", 60, "display.max_rows", 200):
        print(shown.to_string(index=False))
    if result["data"].str.endswith("(synthetic)").any():
        print("data: synthetic random images (no real data given): the accuracies mean nothing")
    errors = result[result["error"] != ""]
    for _, r in errors.iterrows():
        print(f"trial {r['trial']} (config {r['config']}) failed: {r['error']}")
    print(f"wrote {os.path.join(args.out, 'finetune.parquet')}")
    if args.json:
        from hawq_ray.service.cli.common import print_json
        records = result.drop(columns=["bits"]).astype(object).where(result.drop(columns=["bits"]).notna(), None)
        print_json({"out": args.out, "trials": records.to_dict(orient="records")})   # NaN -> null (valid JSON)
    return 1 if len(errors) else 0
