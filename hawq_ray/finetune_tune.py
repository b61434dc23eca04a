"""Fine-tuning of chosen bit configs on Ray Tune: one trial per (config x hyperparameter sample).

Each trial (`qat_trial`) calibrates its config (PTQ top-1 by the integer executor), then runs the paper's QAT
recipe one epoch at a time; after every epoch it saves a checkpoint (torch.save of plain tensors, read back with
weights_only=True) and calls `tune.report` with the loss and the integer top-1 on the held-out split. Trials get
`tune.with_resources`: one GPU each where the cluster has GPUs, a fraction of a CPU otherwise (so Ray tasks of
other stages are not starved). ASHA (optional) stops trials by `gain` = top-1 now - PTQ top-1 of the same config,
so configs of different difficulty compete on what fine-tuning adds, not on where they start.

The experiment lives in `<out>/tune/finetune-<fingerprint>`, the fingerprint hashing every input (weights, data,
configs, recipe, samples); calling again with the same inputs restores it with `Tuner.restore`: finished trials are
kept, interrupted ones continue from their last checkpoint (epoch counter and optimizer state included).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
from pathlib import Path

import pandas as pd
import torch

from hawq_ray.errors import HawqError
from hawq_ray.finetune import (Recipe, calibrated, checked_split, config_costs, finetune_epochs, float_predictions,
                               fp32_weights, integer_predictions, labels_of, limited, load_checkpoint, load_teacher,
                               resolve_bits, save_checkpoint, state_sha1, top1)

CHECKPOINT_FILE = "state.pt"
RESULT_FILE = "finetune.parquet"
NAMED = ("uniform4", "uniform8")
COLUMNS = ["config", "budget", "data", "size_mib", "gbops", "latency_ms", "lr", "weight_decay", "epochs", "top1_fp32",
           "top1_ptq", "top1", "loss", "start_epoch", "int_matches_qat", "checkpoint", "top1_best", "best_epoch",
           "best_checkpoint", "trial", "error", "bits"]


# ------------------------------------------------------------------------------------------------ configs
def read_configs(specs, table: pd.DataFrame) -> pd.DataFrame:
    """One row per config: config (id), budget (JSON of the budget points that chose it, or ''), bits (JSON),
    latency_ms (the sweep's, when it had measured latencies; else NaN).

    Each spec: 'uniform4' / 'uniform8'; a sweep table (.parquet or .csv with columns config, bits[, budgets]);
    a JSON file holding {layer: bits} or {name: {layer: bits}}; a HAWQ bit_config.py. Layers with fixed bits may
    be left out (they keep them); a layer the model does not have is an error."""
    from hawq_ray.finetune import resolve_bits_table
    rows = []
    for spec in ([specs] if isinstance(specs, (str, Path)) else list(specs)):
        for cid, budget, bits, latency in _configs_of(spec):
            try:
                resolved = resolve_bits_table(table, bits)
            except HawqError as e:
                raise HawqError(f"config {cid!r} ({spec}): {e}") from None
            rows.append({"config": str(cid), "budget": budget, "bits": json.dumps(resolved), "latency_ms": latency})
    if not rows:
        raise HawqError("no bit configs given: pass uniform4, uniform8, a sweep table or a bit-config file")
    frame = pd.DataFrame(rows)
    dup = frame["config"][frame["config"].duplicated()].tolist()
    if dup:
        raise HawqError(f"config ids {dup[:3]} appear twice; give each config file once (ids come from file stems)")
    return frame


def _configs_of(spec):
    nan = math.nan
    if isinstance(spec, dict):
        return [("config", "", spec, nan)]
    if str(spec) in NAMED:
        return [(str(spec), "", str(spec), nan)]
    path = Path(spec)
    if not path.is_file():
        raise HawqError(f"--configs {spec}: neither {' nor '.join(NAMED)} nor an existing file (a sweep .parquet/"
                        ".csv, a {layer: bits} .json, or a HAWQ bit_config.py)")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".csv"):
        try:
            frame = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
            raise HawqError(f"--configs {spec}: cannot read it ({type(e).__name__})") from None
        if not {"config", "bits"} <= set(frame.columns):
            raise HawqError(f"--configs {spec}: a sweep table needs columns config and bits (hawq-ray sweep --out)")
        return [(f"{path.stem}.{r['config']}", str(r.get("budgets", "") or ""), _json_bits(r["bits"], spec),
                 float(r.get("latency_ms", nan)) if pd.notna(r.get("latency_ms", nan)) else nan)
                for _, r in frame.iterrows()]
    from solver.bitconfig import BitConfigError, read_hawq_bit_config
    try:
        if suffix == ".py":
            return [(name, "", bits, nan) for name, bits in read_hawq_bit_config(path).items()]
        data = json.loads(path.read_text())
    except (BitConfigError, json.JSONDecodeError, OSError) as e:
        raise HawqError(f"--configs {spec}: {str(e).splitlines()[0]}") from None
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        return [(name, "", bits, nan) for name, bits in data.items()]
    if isinstance(data, dict) and data:
        return [(path.stem, "", data, nan)]
    raise HawqError(f"--configs {spec}: expected a JSON object {{layer: bits}} or {{name: {{layer: bits}}}}")


def _json_bits(text, spec):
    try:
        bits = json.loads(text) if isinstance(text, str) else dict(text)
    except (json.JSONDecodeError, TypeError, ValueError):
        raise HawqError(f"--configs {spec}: column bits must hold JSON {{layer: bits}}") from None
    if not isinstance(bits, dict):
        raise HawqError(f"--configs {spec}: column bits must hold JSON {{layer: bits}}")
    return bits


# ------------------------------------------------------------------------------------------------ the trial
def qat_trial(hp: dict, setup: dict) -> None:
    """One Tune trial: QAT of config `hp['config']` with learning rate `hp['lr']`; reports after every epoch."""
    from ray import tune
    from hawq_ray.data import load_data
    from hawq_ray.models import get_model
    from hawq_ray.quant.qat import prepare

    torch.set_num_threads(setup["threads"])
    recipe = dataclasses.replace(Recipe(**setup["recipe"]), lr=float(hp["lr"]),
                                 weight_decay=float(hp.get("weight_decay", setup["recipe"]["weight_decay"])))
    model = get_model(setup["model"])
    model.load_state_dict(setup["fp32_state"])
    model.eval()
    data = load_data(setup["data"], input_shape=setup["input_shape"], seed=setup["data_seed"],
                     num_classes=setup["num_classes"])
    train, test = limited(data.train, setup["train_limit"]), data.test
    labels = labels_of(test)
    bits = json.loads(setup["configs"][hp["config"]])
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:                      # resumed: continue after the last finished epoch
        with checkpoint.as_directory() as d:
            state = load_checkpoint(Path(d) / CHECKPOINT_FILE)
        qm = prepare(model, bits, setup["input_shape"])
        qm.load_state_dict(state["model"])
        start, optimizer_state, extra = state["epoch"] + 1, state["optimizer"], state["extra"]
    else:
        qm = calibrated(model, bits, train, recipe, setup["input_shape"])
        start, optimizer_state = 0, None
        extra = {"top1_ptq": top1(integer_predictions(qm, test), labels)}
    teacher = setup["teacher"].to(device) if recipe.distill else None
    qm.to(device)
    epochs = finetune_epochs(qm, train, recipe, teacher=teacher, start_epoch=start,
                             optimizer_state=optimizer_state, device=device)
    for epoch, loss, opt in epochs:
        qm.cpu()                                    # the integer executor and lowering run on the CPU
        preds = integer_predictions(qm, test)
        acc = top1(preds, labels)
        metrics = {"epoch": epoch + 1, "loss": loss, "top1_int": acc, "top1_ptq": extra["top1_ptq"],
                   "gain": acc - extra["top1_ptq"], "start_epoch": start,
                   "int_matches_qat": top1(preds, float_predictions(qm, test))}
        with tempfile.TemporaryDirectory() as d:
            save_checkpoint(Path(d) / CHECKPOINT_FILE, qm, opt, epoch, extra)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        qm.to(device)


# ------------------------------------------------------------------------------------------------ the driver
def trial_resources(cpus_per_trial: float | None = None, gpus_per_trial: float | None = None) -> dict:
    """A GPU per trial where the cluster has GPUs; otherwise half a CPU (fractional, so other stages' tasks run)."""
    import ray
    has_gpu = ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0
    gpus = gpus_per_trial if gpus_per_trial is not None else (1 if has_gpu else 0)
    cpus = cpus_per_trial if cpus_per_trial is not None else (1 if gpus else 0.5)
    if cpus <= 0 or gpus < 0:
        raise HawqError(f"trial resources cpu={cpus}, gpu={gpus} are not valid; valid: cpu > 0, gpu >= 0")
    return {"cpu": cpus, "gpu": gpus} if gpus else {"cpu": cpus}


def tune_finetune(configs: pd.DataFrame, model, fp32_state: dict, data, *, data_spec="digits", data_seed=0,
                  out, recipe: Recipe = Recipe(), samples: int = 1, lr_range=(1e-4, 1e-2), asha: bool = False,
                  train_limit: int | None = None, teacher=None, teacher_spec=None, layer_table=None,
                  input_shape=None, cpus_per_trial=None, gpus_per_trial=None,
                  keep_checkpoints: int | None = None) -> pd.DataFrame:
    """Run (or resume) the Tune experiment for `configs` (see read_configs); returns the result table, one row
    per trial, and writes it to `<out>/finetune.parquet`. `keep_checkpoints`: how many epoch checkpoints each
    trial keeps (None: all; the newest is always kept)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from hawq_ray.layers import layer_table as make_layer_table
    from hawq_ray.models import input_shape as model_input_shape

    if samples < 1 or recipe.epochs < 1:
        raise HawqError(f"samples {samples} and epochs {recipe.epochs} must both be at least 1")
    if not (0 < lr_range[0] <= lr_range[1]):
        raise HawqError(f"learning-rate range {lr_range} is not valid; valid: 0 < low <= high")
    input_shape = tuple(input_shape or model_input_shape(model))
    test = checked_split(data.test, "test")
    checked_split(limited(checked_split(data.train, "train"), train_limit), "train")
    if not ray.is_initialized():
        ray.init(log_to_driver=False)
    table = layer_table if layer_table is not None else make_layer_table(model, input_shape)
    if recipe.distill and teacher is None:
        teacher = load_teacher(teacher_spec, model, input_shape, data.num_classes)
    setup = {"model": getattr(model, "hawq_name", None) or _model_name(model), "fp32_state": fp32_state,
             "data": data_spec, "data_seed": data_seed, "input_shape": input_shape, "num_classes": data.num_classes,
             "train_limit": train_limit, "configs": dict(zip(configs["config"], configs["bits"])),
             "recipe": dataclasses.asdict(recipe), "teacher": teacher if recipe.distill else None}
    resources = trial_resources(cpus_per_trial, gpus_per_trial)
    setup["threads"] = max(1, int(resources["cpu"]))
    fingerprint = _fingerprint(setup, fp32_state, samples, lr_range, asha, teacher_spec)
    storage, name = (Path(out) / "tune").resolve(), f"finetune-{fingerprint}"
    trainable = tune.with_resources(tune.with_parameters(qat_trial, setup=setup), resources)
    if tune.Tuner.can_restore(str(storage / name)):
        tuner = tune.Tuner.restore(str(storage / name), trainable, resume_unfinished=True, resume_errored=True)
    else:
        lr = recipe.lr if samples == 1 else tune.loguniform(*lr_range)
        scheduler = ASHAScheduler(time_attr="epoch", metric="gain", mode="max", max_t=recipe.epochs,
                                  grace_period=1, reduction_factor=2) if asha else None
        tuner = tune.Tuner(
            trainable, param_space={"config": tune.grid_search(list(configs["config"])), "lr": lr},
            tune_config=tune.TuneConfig(num_samples=samples, scheduler=scheduler),
            run_config=tune.RunConfig(storage_path=str(storage), name=name, verbose=0,
                                      checkpoint_config=tune.CheckpointConfig(num_to_keep=keep_checkpoints)))
    grid = tuner.fit()
    fp32_top1 = top1(float_predictions(model, test), labels_of(test))
    label = f"{data.name} (synthetic)" if data.synthetic else data.name
    result = _result_table(grid, configs, table, recipe, fp32_top1, label)
    result.to_parquet(Path(out) / RESULT_FILE, index=False)
    return result


def _model_name(model) -> str:
    from hawq_ray.models import DEFAULT_MODEL, DigitsResNet
    if isinstance(model, DigitsResNet):
        return DEFAULT_MODEL
    raise HawqError("tune_finetune needs the model's name: set model.hawq_name (a pytorchcv name) or use finetune_run")


def _fingerprint(setup, fp32_state, samples, lr_range, asha, teacher_spec) -> str:
    keyed = {k: v for k, v in setup.items() if k not in ("fp32_state", "teacher", "threads")}
    keyed.update(weights=state_sha1(fp32_state), samples=samples, lr_range=list(lr_range), asha=asha,
                 teacher=str(teacher_spec) if setup["recipe"]["distill"] else None)
    return hashlib.sha1(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _result_table(grid, configs: pd.DataFrame, table: pd.DataFrame, recipe: Recipe, fp32_top1: float, data: str):
    by_id = configs.set_index("config")
    rows = []
    for res in grid:
        cid = res.config["config"]
        bits = json.loads(by_id.loc[cid, "bits"])
        m = res.metrics or {}
        costs = config_costs(table, bits)
        if math.isnan(costs["latency_ms"]) and "latency_ms" in by_id.columns:
            costs["latency_ms"] = float(by_id.loc[cid, "latency_ms"])       # the sweep's measured latency
        rows.append({"config": cid, "budget": by_id.loc[cid, "budget"], "data": data, **costs,
                     "lr": float(res.config["lr"]), "weight_decay": recipe.weight_decay,
                     "epochs": m.get("epoch", 0), "top1_fp32": fp32_top1, "top1_ptq": m.get("top1_ptq", math.nan),
                     "top1": m.get("top1_int", math.nan), "loss": m.get("loss", math.nan),
                     "start_epoch": m.get("start_epoch", 0), "int_matches_qat": m.get("int_matches_qat", math.nan),
                     "checkpoint": res.checkpoint.path if res.checkpoint else "", **_best_epoch(res),
                     "trial": Path(res.path).name if res.path else "",
                     "error": (str(res.error).splitlines() or [""])[0] if res.error else "",
                     "bits": by_id.loc[cid, "bits"]})
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(["config", "lr"], ignore_index=True)


def _best_epoch(res) -> dict:
    """The epoch with the highest integer top-1 (the earliest of ties) and its checkpoint, as HAWQ's training
    script keeps its best checkpoint; '' when that checkpoint was not kept."""
    frame = res.metrics_dataframe
    if frame is None or "top1_int" not in getattr(frame, "columns", []) or frame["top1_int"].isna().all():
        return {"top1_best": math.nan, "best_epoch": 0, "best_checkpoint": ""}
    best = frame.loc[frame["top1_int"].idxmax()]
    paths = [c.path for c, m in (res.best_checkpoints or []) if m.get("epoch") == best["epoch"]]
    return {"top1_best": float(best["top1_int"]), "best_epoch": int(best["epoch"]),
            "best_checkpoint": paths[0] if paths else ""}


def best_per_config(result: pd.DataFrame) -> pd.DataFrame:
    """The trial with the highest fine-tuned top-1 of each config (ties: the lower loss)."""
    ranked = result.sort_values(["config", "top1", "loss"], ascending=[True, False, True])
    return ranked.groupby("config", sort=False).head(1).reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ front door
def finetune_run(configs, *, out, model=None, weights=None, data=None, epochs: int = 3, samples: int = 1,
                 lr: float | None = None, lr_range=(1e-4, 1e-2), weight_decay: float | None = None,
                 batch_size: int | None = None, distill=False, teacher=None, asha: bool = False,
                 train_limit: int | None = None, layer_table=None, fp32_epochs: int = 8, seed: int = 0,
                 cpus_per_trial=None, gpus_per_trial=None, keep_checkpoints: int | None = None) -> pd.DataFrame:
    """The `hawq-ray finetune` stage as a function. `model`: None (the default digits model: without `weights` its
    fp32 weights are trained on digits and cached in `out`) or a pytorchcv name (weights from `weights` or the
    local pytorchcv cache). `data`: 'digits' for the default model, 'synthetic' otherwise, or a folder.
    `distill`: False, True (teacher: the fp32 model) or a teacher spec (pytorchcv name, or NAME=WEIGHTS)."""
    from hawq_ray.data import load_data
    from hawq_ray.layers import layer_table as make_layer_table
    from hawq_ray.models import DEFAULT_MODEL, get_model, input_shape, num_classes, read_state_dict

    name = model or DEFAULT_MODEL
    spec = data or ("digits" if name == DEFAULT_MODEL else "synthetic")
    shape = input_shape(name)
    out = Path(out)
    if name == DEFAULT_MODEL and weights is None:
        splits = load_data(spec, input_shape=shape, seed=seed)
        fp32_model, weights, _ = fp32_weights(out, splits, model_name=name, epochs=fp32_epochs, seed=seed)
    else:
        fp32_model = get_model(name, pretrained=weights is None, weights=weights).eval()
        splits = load_data(spec, input_shape=shape, seed=seed, num_classes=num_classes(fp32_model))
    fp32_model.hawq_name = name
    table = layer_table if layer_table is not None else make_layer_table(fp32_model, shape)
    chosen = read_configs(configs, table)
    if distill is not False and distill is not None and teacher is None:
        teacher = None if distill is True else distill
    defaults = Recipe()
    recipe = Recipe(lr=lr or defaults.lr, weight_decay=defaults.weight_decay if weight_decay is None else weight_decay,
                    batch_size=batch_size or defaults.batch_size, epochs=epochs, seed=seed,
                    distill=distill is not False and distill is not None)
    teacher_model = load_teacher(teacher, fp32_model, shape, splits.num_classes) if recipe.distill else None
    state = {k: v for k, v in fp32_model.state_dict().items()}
    return tune_finetune(chosen, fp32_model, state, splits, data_spec=spec, data_seed=seed, out=out, recipe=recipe,
                         samples=samples, lr_range=lr_range, asha=asha, train_limit=train_limit,
                         teacher=teacher_model, teacher_spec=teacher, layer_table=table, input_shape=shape,
                         cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
                         keep_checkpoints=keep_checkpoints)
