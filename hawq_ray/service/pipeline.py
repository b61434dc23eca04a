"""The main job: its settings (`DEFAULT_CONFIG`, `RUN_SCHEMA`, `load_config`), and the run of the stages that
`service.stages.STAGES` declares in one run folder (docs/design.md, "Data flow").

Every stage writes its table (parquet) into the run folder and records a fingerprint of its inputs in
`stages.json`; a stage whose table exists with the same fingerprint is skipped, so a stopped run resumes
where it stopped and loses nothing (Tune trials resume from their last epoch checkpoint, compiled configs
are kept one by one).
"""
from __future__ import annotations

import contextlib
import copy
import json
import sys
import time
from pathlib import Path

import pandas as pd

from hawq_ray.analysis.sensitivity import DEFAULT_RANK
from hawq_ray.contract import HawqError
from hawq_ray.contract.integrity import digest, file_sha256
from hawq_ray.service.settings import (ACCURACY_DROP, ACTORS, BATCH, COUNT, EPOCHS, ITERATIONS, LEARNING_RATE,
                                       RANK, SEED, TOLERANCE, Bool, Choice, Float, Int, TargetSpec, Text,
                                       check_mapping, fits_in_memory)
from solver.target import MINIMIZE

DEFAULT_CONFIG = {
    "model": None,            # None: the embedded digits_resnet
    "weights": None,          # a state-dict file; the default model is trained on digits when None
    "pretrained": False,
    "data": None,             # digits for the default model, synthetic for others
    "seed": 0,
    "input_size": None,       # H (or [H, W]) of the images; None: the model's own (224 for ImageNet models)
    "budgets": {"size": [0.25, 0.5, 0.75], "bops": [0.25, 0.5, 0.75], "latency": [0.25, 0.5, 0.75]},
    # the cheapest config whose fine-tuned integer top-1 is within max_drop points of fp32 (solver.target), in
    # place of fine-tuning every budget: the ILP's configs at fractions 0, resolution, ..., 1 of `minimize`,
    # bisected in rounds of `width` Tune trials; max_drop None: no target
    "targets": {"max_drop": None, "minimize": "size", "resolution": 0.05, "width": 2},
    "uniform": ["uniform4", "uniform8"],
    "sweep": {"draws": 200},  # trace draws re-solved per budget: how firmly the traces support each choice
    "fp32_epochs": None,      # an embedded model's fp32 training epochs; None: its own recipe
    "sensitivity": {"actors": 2, "batches": 4, "batch_size": 64, "tol": 0.05, "max_iter": 64, "rank": DEFAULT_RANK},
    "profile": {"batch": 8, "target": "llvm", "resource": None, "actors": 1, "rounds": 5},
    "tune": {"epochs": 4, "samples": 1, "lr": 0.01, "distill": False, "teacher": None, "asha": False,
             "batch_size": 128},
    # target None: the profile's, so the deployed modules are the kernels the latency budgets were priced on
    "deploy": {"target": None, "batch": 8, "inputs": 4, "rounds": 15},   # rounds: of interleaved timing
    "export": {"onnx": False, "form": "exact", "batches": 4},   # ONNX QDQ of each config, checked in onnxruntime
    "evidence": {"enabled": True, "randoms": 20},   # the ILP's configs against random and reversed ones (PTQ)
    # data: distilled: images made from the model's BatchNorm statistics (inputs.distill.DistillSettings)
    "distilled": {"train": 256, "test": 128, "steps": 500, "batch_size": 64},
}
DISTILLED_IMAGES = Int(2, 100000)     # images of a distilled split
RUN_SCHEMA = {   # the type and range of every setting above except budgets, input_size and uniform
    "model": Text(), "weights": Text(), "pretrained": Bool(), "data": Text(), "seed": SEED,
    "fp32_epochs": Int(1, 10000, optional=True),
    "sweep": {"draws": COUNT},
    "targets": {"max_drop": ACCURACY_DROP, "minimize": Choice(MINIMIZE), "resolution": Float(0.0, 0.5, open_low=True),
                "width": Int(1, 64)},
    "sensitivity": {"actors": ACTORS, "batches": COUNT, "batch_size": BATCH, "tol": TOLERANCE,
                    "max_iter": ITERATIONS, "rank": RANK},
    "profile": {"batch": BATCH, "target": TargetSpec(), "resource": Text(), "actors": ACTORS, "rounds": COUNT},
    "tune": {"epochs": EPOCHS, "samples": COUNT, "lr": LEARNING_RATE, "distill": Bool(), "teacher": Text(),
             "asha": Bool(), "batch_size": BATCH},
    "deploy": {"target": TargetSpec(), "batch": BATCH, "inputs": COUNT, "rounds": COUNT},
    "export": {"onnx": Bool(), "form": Choice(("exact", "fused")), "batches": COUNT},   # onnx.qdq.FORMS
    "evidence": {"enabled": Bool(), "randoms": COUNT},
    "distilled": {"train": DISTILLED_IMAGES, "test": DISTILLED_IMAGES, "steps": ITERATIONS, "batch_size": BATCH},
}
DISTILLED = "distilled"     # data: distilled (inputs.data.DISTILLED); its images' folder in the run folder
TABLES_FORMAT = 9     # bump when what a stage's table holds changes: older run folders recompute, never misread


# ------------------------------------------------------------------------------------------------ config
def load_config(path=None, overrides: dict | None = None) -> dict:
    """DEFAULT_CONFIG updated by a YAML file and then by `overrides` (nested dicts merge key by key)."""
    from hawq_ray.contract.errors import brief
    from hawq_ray.inputs.data import check_source
    from hawq_ray.service.settings import check_budgets, merge_settings, read_yaml_mapping
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    if path is not None:     # bounded in size, nesting and alias expansion; every error one line
        user = read_yaml_mapping(path)
        _refuse_user_code(user, path)
        merge_settings(cfg, user, str(path))
    merge_settings(cfg, overrides or {}, "overrides")
    if cfg["deploy"]["target"] is None:
        cfg["deploy"]["target"] = cfg["profile"]["target"]
    check_mapping(cfg, RUN_SCHEMA)
    check_budgets(cfg["budgets"])
    size = cfg["input_size"]
    pair = size if isinstance(size, (list, tuple)) else [size]
    if size is not None and not (len(pair) in (1, 2) and all(isinstance(v, int) and not isinstance(v, bool)
                                                              and 8 <= v <= 16384 for v in pair)):
        raise HawqError(f"input_size: {brief(size)} is not valid; valid: an integer from 8 to 16384 (H = W) or "
                        f"[H, W], or null")
    uniform = cfg["uniform"]
    if not isinstance(uniform, list) or not all(u in ("uniform4", "uniform8") for u in uniform):
        raise HawqError(f"uniform: {brief(uniform)} is not valid; valid: a list of uniform4, uniform8")
    if cfg["data"] is not None:
        check_source(cfg["data"])    # the folder's layout and every image's header, before Ray or a model starts
    return cfg


def _refuse_user_code(user: dict, path) -> None:
    """A run.yaml is data that may come from someone else: it may not name code to import and call
    (`package.module:callable`) as the model or the teacher; the command line and the Python API may."""
    from hawq_ray.inputs.models import is_user_code
    tune = user.get("tune") if isinstance(user.get("tune"), dict) else {}
    for key, spec in (("model", user.get("model")), ("tune.teacher", str(tune.get("teacher") or "").split("=")[0])):
        if is_user_code(spec):
            raise HawqError(f"run config {path}: {key} {spec[:80]!r} names Python code to run (package.module:callable),"
                            f" which a run.yaml may not, since it may come from someone else; valid: digits_resnet, "
                            f"digits_vit, a pytorchcv name, torchvision:NAME or timm:NAME here, or the code on the command line (hawq-ray run --model "
                            f"{spec[:80]}) or in hawq_ray.run(model=...)")


def _input_shape(cfg: dict) -> tuple:
    """(C, H, W): the model's channels, its own size unless `input_size` says otherwise."""
    from hawq_ray.inputs.models import input_shape
    shape = tuple(input_shape(cfg["model"]))
    size = cfg["input_size"]
    if size is None:
        return shape
    h, w = (size, size) if isinstance(size, int) else size
    return (shape[0], h, w)


# ------------------------------------------------------------------------------------------------ stages
def fingerprint(*parts) -> str:
    """What a stage's inputs are recognized by (`contract.integrity.digest`)."""
    return digest(*parts)


def _stages_file(run_dir: Path) -> Path:
    return run_dir / "stages.json"


def _done(run_dir: Path) -> dict:
    f = _stages_file(run_dir)
    if not f.is_file():
        return {}
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError:
        raise HawqError(f"{f}: corrupt stage record; delete it to recompute the run") from None


def cached_stage(run_dir: Path, name: str, key: str, compute, log=print, unfinished=None) -> pd.DataFrame:
    """Load `<name>.parquet` when its recorded fingerprint equals `key` and the file is the one recorded
    (SHA-256, columns, rows), else compute, write and record it; a damaged table is recomputed with a notice.
    `unfinished(table)`: why a computed table is not final (failed trials), or '': an unfinished table is written
    and returned but recorded without its key, so the next run computes it again."""
    from hawq_ray.service.outputs import write_atomic
    path = run_dir / f"{name}.parquet"
    record = _done(run_dir).get(name, {})
    if record.get("key") == key:
        table, damage = _verified(path, record)
        if table is not None:
            log(f"[{name}] up to date ({path.name})")
            return table
        log(f"[{name}] {path.name} is damaged ({damage}): recomputing")
    t0 = time.time()
    log(f"[{name}] running")
    with _named_in_errors(name):
        table = compute()
    with _named_in_errors(name, path):
        write_atomic(path, table.to_parquet(index=False))
    table = pd.read_parquet(path)      # what a resumed run reads: the same types either way
    why = unfinished(table) if unfinished else ""
    done = _done(run_dir)
    done[name] = {"key": None if why else key, "seconds": round(time.time() - t0, 2), "rows": len(table),
                  "columns": list(table.columns), "sha256": file_sha256(path), **({"unfinished": why} if why else {})}
    write_atomic(_stages_file(run_dir), json.dumps(done, indent=1))
    log(f"[{name}] {'UNFINISHED (' + why + '), to be computed again by the next run' if why else 'done'} in "
        f"{time.time() - t0:.1f} s ({len(table)} rows) -> {path.name}")
    return table


@contextlib.contextmanager
def _named_in_errors(stage: str, path: Path | None = None):
    """An error raised inside carries the stage (and the table being written) as `stage` / `stage_path`, for the
    front to name (a full disk: `service.cli.disk_full`)."""
    try:
        yield
    except Exception as e:
        if getattr(e, "stage", None) is None:
            e.stage, e.stage_path = stage, path
        raise


def _verified(path: Path, record: dict) -> tuple[pd.DataFrame | None, str]:
    """(the table, '') when `path` is the table `record` describes, else (None, what is wrong)."""
    if not path.is_file():
        return None, "missing"
    if "sha256" not in record:
        return None, "recorded by an older hawq-ray without its SHA-256"
    if record["sha256"] != file_sha256(path):
        return None, "not the file this stage wrote: its SHA-256 differs"
    try:
        table = pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 (whatever pyarrow raises for a file it cannot read)
        return None, f"unreadable: {(str(e).splitlines() or [type(e).__name__])[0][:120]}"
    if list(table.columns) != record.get("columns") or len(table) != record.get("rows"):
        return None, "not the columns and rows recorded"
    return table, ""


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(config: dict | str | None = None, out="runs/default", *, address: str | None = None, log=_log,
        **settings) -> dict:
    """Run (or resume) the main job; returns {stage: table} and writes everything under `out`.

    `config`: a run.yaml path or a dict of settings (see DEFAULT_CONFIG); keyword `settings` override it,
    e.g. run(out="runs/r20", model="resnet20_cifar10", tune={"epochs": 2}). Joins the Ray cluster at
    `address` (or the one already initialized), else starts a local Ray.
    """
    from hawq_ray.inputs import models
    from hawq_ray.service.outputs import refuse_links, run_folder_lock, writable_folder

    if isinstance(config, dict):
        cfg = load_config(None, {**config, **settings})
    else:
        cfg = load_config(config, settings)
    name = cfg["model"] or models.DEFAULT_MODEL
    shape = _input_shape(cfg)
    _check_memory(cfg, shape)
    if cfg["data"] == DISTILLED:
        _check_distillable(cfg, name)
        if not cfg["tune"]["distill"]:
            log("[data] tune.distill: on (distilled images have no labels of their own: fine-tuning distills from "
                "the fp32 model)")
            cfg["tune"]["distill"] = True
    run_dir = writable_folder(out)
    with run_folder_lock(run_dir, log):
        refuse_links(run_dir)
        return _run_stages(cfg, name, shape, run_dir, address, log)


def _check_memory(cfg: dict, shape: tuple) -> None:
    """The batch sizes against this machine's free memory, before any work (the architecture alone, no
    weights loaded)."""
    from hawq_ray.quant.layers import activation_elements
    from hawq_ray.inputs.models import get_model
    elements = activation_elements(get_model(cfg["model"]), shape)
    what = f"{cfg['model'] or 'the default model'} at {shape[1]}x{shape[2]}"
    batches = {"sensitivity.batch_size": (cfg["sensitivity"]["batch_size"], "sensitivity"),
               "tune.batch_size": (cfg["tune"]["batch_size"], "finetune"),
               "profile.batch": (cfg["profile"]["batch"], "profile"),
               "deploy.batch": (cfg["deploy"]["batch"], "deploy")}
    if cfg["data"] == DISTILLED:     # a forward and backward pass of the images, as a Hessian shard's
        batches["distilled.batch_size"] = (cfg["distilled"]["batch_size"], "sensitivity")
    fits_in_memory(batches, elements, what)


def _check_distillable(cfg: dict, name: str) -> None:
    """data: distilled, before any work: the model has BatchNorm layers and trained weights to distill from (an
    embedded model without `weights` would be trained on digits, real data)."""
    from hawq_ray.inputs import models
    from hawq_ray.inputs.distill import check_distillable
    check_distillable(models.get_model(cfg["model"]), name, trained=False)
    if name in models.EMBEDDED_MODELS and not cfg["weights"]:
        raise HawqError(f"data: distilled needs {name}'s trained weights, and without `weights` it would be trained on "
                        f"digits (real data); valid: weights: FILE (a run with data: digits keeps them in "
                        f"RUN/weights/{name}_fp32.pt)")
    if name not in models.EMBEDDED_MODELS and not (cfg["weights"] or cfg["pretrained"]):
        raise HawqError(f"data: distilled needs {name}'s trained weights (its BatchNorm statistics are what the images "
                        f"are made from); valid: weights: FILE or pretrained: true")


def _distilled_data(cfg: dict, name: str, shape: tuple, model, run_dir: Path, log):
    """data: distilled: the images of the model's BatchNorm statistics (kept in RUN/distilled, keyed by the weights
    and settings), labelled with the fp32 model's predictions."""
    from hawq_ray.inputs import data as data_mod
    data = data_mod.load_data(DISTILLED, input_shape=shape, seed=cfg["seed"], model=model, distill=cfg["distilled"],
                              cache_dir=run_dir / DISTILLED, log=log, model_name=name)
    log(f"[data] {data_mod.DISTILLED_NOTE}: {len(data.train)} images for calibration, traces and fine-tuning, "
        f"{len(data.test)} held out (another seed); {data_mod.DISTILLED_TOP1}")
    return data


def _run_stages(cfg: dict, name: str, shape: tuple, run_dir: Path, address, log) -> dict:
    """Set the run up (the Ray session, the data, the fp32 weights), then walk the declared stages
    (`service.stages.STAGES`), and write the report."""
    from hawq_ray.inputs import data as data_mod
    from hawq_ray.inputs import models
    from hawq_ray.quant.finetune import fp32_weights, weights_digest
    from hawq_ray.service.outputs import write_atomic
    from hawq_ray.service.report import write_report
    from hawq_ray.service.session import connect
    from hawq_ray.service.stages import STAGES, Run, failed_trials, report_sections

    write_atomic(run_dir / "run.json", json.dumps(cfg, indent=1, default=str))
    connect(address)
    spec = cfg["data"] or ("digits" if name in models.EMBEDDED_MODELS else "synthetic")
    data = None if spec == DISTILLED else data_mod.load_data(spec, input_shape=shape, seed=cfg["seed"])
    if data is not None and data.synthetic:
        log("[data] SYNTHETIC random images: accuracies in this run mean nothing about the model")

    # fp32 weights: given, pretrained from the local cache, or (default model) trained once on digits (never with
    # data: distilled, `_check_distillable`)
    if cfg["weights"] or cfg["pretrained"] or name not in models.EMBEDDED_MODELS:
        model = models.get_model(cfg["model"], pretrained=cfg["pretrained"], weights=cfg["weights"]).eval()
    else:
        model, path, trained = fp32_weights(run_dir, data, model_name=name, epochs=cfg["fp32_epochs"],
                                            seed=cfg["seed"])
        log(f"[fp32] {'trained' if trained else 'reused'} {path.name}")
    if spec == DISTILLED:
        data = _distilled_data(cfg, name, shape, model, run_dir, log)
    run = Run(cfg, name, shape, run_dir, model, data, spec, weights_digest(model.state_dict()), log)
    base = (TABLES_FORMAT, name, run.weights_key, spec, cfg["seed"], shape,
            *((cfg["distilled"],) if spec == DISTILLED else ()))     # other runs keep their fingerprints
    for stage in STAGES:
        if stage.runs(run):
            run.tables[stage.name] = cached_stage(run_dir, stage.name, fingerprint(*base, *stage.inputs(run)),
                                                  lambda: stage.compute(run), log, stage.unfinished)

    report = write_report(run_dir, report_sections())
    log(f"[report] {report}")
    failed = failed_trials(run.tables["finetune"])
    if failed:
        first = run.tables["finetune"][run.tables["finetune"]["error"] != ""].iloc[0]
        raise HawqError(f"{failed} (first: {first['trial']}: {first['error'][:200]}); every other stage finished and "
                        f"{report.name} lists them; run the same command again to retry them")
    return run.tables
