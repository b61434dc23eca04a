"""Fine-tuning of chosen bit configs on Ray Tune: one trial per (config x hyperparameter sample).

Each trial (`qat_trial`) calibrates its config (PTQ top-1 by the integer executor), then runs the paper's QAT
recipe one epoch at a time; after every epoch it commits a checkpoint and its metrics to its own folder
(`service.trial_record`: torch.save of plain tensors read back with weights_only=True, and JSON) and then calls
`tune.report`. Trials get `tune.with_resources`: one GPU each where the cluster has GPUs, a fraction of a CPU
otherwise (so Ray tasks of other stages are not starved). ASHA (optional) stops trials by `gain` = top-1 now -
PTQ top-1 of the same config, so configs of different difficulty compete on what fine-tuning adds, not on where
they start.

The experiment lives in `<out>/tune/finetune-<fingerprint>`, the fingerprint hashing every input (weights, data,
configs, recipe, settings), one folder per trial. Calling again with the same inputs continues it: a finished
experiment's table is read back, and otherwise a new Tune run starts in which each trial continues from its
last committed epoch (epoch counter and optimizer state included) or reports its finished record. Tune's own
state, pickles that would run code when read, is never restored (`Tuner.restore` is not used), so a run folder
written by someone else cannot run code here. Trials run on the Ray session the front opened
(`service.session`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shutil
import signal
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hawq_ray.contract import HawqError
from hawq_ray.contract.bits import budget_cell, read_configs
from hawq_ray.contract.cost import config_costs
from hawq_ray.contract.integrity import arrays_digest, digest
from hawq_ray.service.trial_record import TrialRecord
from hawq_ray.quant.finetune import (Recipe, calibrated, checked_split, finetune_epochs, float_predictions,
                                     fp32_weights, integer_logits, integer_predictions, labels_of, limited,
                                     load_checkpoint, load_teacher, save_checkpoint, weights_digest, top1)

RESULT_FILE = "finetune.parquet"
RECORD_FORMAT = 2     # 2: checkpoint folders relative to the run folder (a finished experiment's table is reused)
COLUMNS = ["config", "budget", "data", "size_mib", "gbops", "latency_ms", "activation_mib", "memory_mib", "lr", "weight_decay", "epochs", "top1_fp32",
           "top1_ptq", "top1", "loss", "test_loss", "start_epoch", "int_matches_qat", "checkpoint", "top1_best",
           "best_epoch", "best_checkpoint", "trial", "device", "error", "bits"]


@dataclasses.dataclass(frozen=True)
class TuneSettings:
    """How the experiment runs (the recipe is `quant.finetune.Recipe`)."""
    samples: int = 1                       # hyperparameter samples per config (lr log-uniform in lr_range)
    lr_range: tuple = (1e-4, 1e-2)
    asha: bool = False                     # stop trials early by their gain over PTQ
    train_limit: int | None = None         # the first N training samples only
    cpus_per_trial: float | None = None    # default: 1 with a GPU, else 0.5
    gpus_per_trial: float | None = None    # default: 1 where the cluster has GPUs
    keep_checkpoints: int | None = None    # epoch checkpoints kept per trial (None: all; the newest always)

    def __post_init__(self):
        if int(self.samples) < 1:
            raise HawqError(f"samples {self.samples} is not valid; valid: at least 1")
        if not (0 < self.lr_range[0] <= self.lr_range[1]):
            raise HawqError(f"learning-rate range {self.lr_range} is not valid; valid: 0 < low <= high")


@dataclasses.dataclass
class Student:
    """The fp32 model the trials fine-tune, as each trial rebuilds it: its registry name, weights, input shape
    and layer table."""
    name: str
    state: dict
    input_shape: tuple
    table: pd.DataFrame


@dataclasses.dataclass(frozen=True)
class DataSource:
    """The data as each trial loads it again (`inputs.data.load_data(spec, seed=...)`), or, for data distilled
    from the model (`splits` given), the very splits the driver holds: the trials read the driver's images (through
    Ray's object store, on every node) instead of distilling them again."""
    spec: str
    seed: int = 0
    splits: object = None        # inputs.data.DataSplits, for data no trial can load by its spec

    def load(self, input_shape, num_classes):
        from hawq_ray.inputs.data import load_data
        if self.splits is not None:
            return self.splits
        return load_data(self.spec, input_shape=input_shape, seed=self.seed, num_classes=num_classes)


def data_source(spec: str, seed: int, data) -> DataSource:
    """How trials get `data` (loaded from `spec` with `seed`): distilled splits travel with the trials."""
    return DataSource(spec, seed, data if getattr(data, "distilled", False) else None)


# ------------------------------------------------------------------------------------------------ configs
def config_frame(specs, table: pd.DataFrame) -> pd.DataFrame:
    """One row per config (`contract.bits.read_configs`): config (id), budget (JSON of the budget points that
    chose it, or ''), bits ({layer: bits}), latency_ms (the sweep's, when it had measured latencies)."""
    rows = [{"config": c.config, "budget": budget_cell(c.budget), "bits": c.bits.as_dict(),
             "latency_ms": c.latency_ms} for c in read_configs(specs, table)]
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------------------ the trial
def qat_trial(hp: dict, setup: dict) -> None:
    """One Tune trial, `hp['trial']` of setup['trials'] (a config and a learning rate): QAT one epoch at a time,
    each committed to the trial's TrialRecord and then reported; a trial with a record continues from it."""
    from ray import tune
    from hawq_ray.inputs.models import get_model
    from hawq_ray.quant.qat import prepare

    torch.set_num_threads(setup["threads"])
    spec = setup["trials"][hp["trial"]]
    recipe = dataclasses.replace(Recipe(**setup["recipe"]), lr=spec["lr"])
    student, source = setup["student"], setup["data"]
    model = get_model(student.name)
    model.load_state_dict(student.state)
    model.eval()
    data = source.load(student.input_shape, setup["num_classes"])
    train, test = limited(data.train, setup["train_limit"]), data.test
    labels = labels_of(test)
    bits = setup["configs"][spec["config"]]
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

    record = TrialRecord(Path(setup["trial_folder"]) / hp["trial"])
    done = record.progress()
    if done and done[-1]["epoch"] >= recipe.epochs:    # finished before the run was stopped: report, train nothing
        tune.report(done[-1])
        return
    if done:                                            # resumed: continue after the last committed epoch
        state = record.load_last(done, load_checkpoint)
        qm = prepare(model, bits, student.input_shape, student.table)
        qm.load_state_dict(state["model"])
        start, optimizer_state, extra = state["epoch"] + 1, state["optimizer"], state["extra"]
    else:
        qm = calibrated(model, bits, train, recipe, student.input_shape, student.table)
        start, optimizer_state = 0, None
        extra = {"top1_ptq": top1(integer_predictions(qm, test, recipe.batch_size), labels)}
    teacher = setup["teacher"].to(device) if recipe.distill else None
    qm.to(device)
    epochs = finetune_epochs(qm, train, recipe, teacher=teacher, start_epoch=start,
                             optimizer_state=optimizer_state, device=device)
    for epoch, loss, opt in epochs:
        qm.cpu()                                    # the integer executor and lowering run on the CPU
        logits = integer_logits(qm, test, recipe.batch_size)
        preds = logits.argmax(1)
        acc = top1(preds, labels)
        metrics = {"epoch": epoch + 1, "loss": loss, "top1_int": acc, "top1_ptq": extra["top1_ptq"],
                   "test_loss": float(torch.nn.functional.cross_entropy(logits, labels.to(logits.device))),
                   "gain": acc - extra["top1_ptq"], "start_epoch": start,
                   "int_matches_qat": top1(preds, float_predictions(qm, test, recipe.batch_size)),
                   "device": device.type}
        record.commit(metrics, lambda path: save_checkpoint(path, qm, opt, epoch, extra))
        record.prune(setup["keep_checkpoints"])
        tune.report(metrics)
        qm.to(device)


# ------------------------------------------------------------------------------------------------ the driver
def trial_resources(settings: TuneSettings) -> dict:
    """A GPU per trial where the cluster has GPUs; otherwise half a CPU (fractional, so other stages' tasks run)."""
    import ray
    has_gpu = ray.cluster_resources().get("GPU", 0) > 0
    gpus = settings.gpus_per_trial if settings.gpus_per_trial is not None else (1 if has_gpu else 0)
    cpus = settings.cpus_per_trial if settings.cpus_per_trial is not None else (1 if gpus else 0.5)
    if cpus <= 0 or gpus < 0:
        raise HawqError(f"trial resources cpu={cpus}, gpu={gpus} are not valid; valid: cpu > 0, gpu >= 0")
    return {"cpu": cpus, "gpu": gpus} if gpus else {"cpu": cpus}


def tune_finetune(configs: pd.DataFrame, student: Student, data, source: DataSource, *, out,
                  recipe: Recipe = Recipe(), settings: TuneSettings = TuneSettings(), teacher=None,
                  teacher_spec=None) -> pd.DataFrame:
    """Run (or resume) the Tune experiment for `configs` (see `config_frame`) on the Ray session this
    process has joined; returns the result table, one row per trial, and writes it to `<out>/finetune.parquet`.
    `data` is the loaded DataSplits (its test split scores the fp32 model), `source` how trials load it."""
    if recipe.epochs < 1:
        raise HawqError(f"epochs {recipe.epochs} is not valid; valid: at least 1")
    if getattr(data, "distilled", False):
        if source.splits is None:           # the trials read the driver's images, never distill them again
            source = dataclasses.replace(source, splits=data)
        if not recipe.distill:              # distilled images have no labels but the fp32 model's predictions
            recipe = dataclasses.replace(recipe, distill=True)
    test = checked_split(data.test, "test")
    checked_split(limited(checked_split(data.train, "train"), settings.train_limit), "train")
    if recipe.distill and teacher is None:
        teacher = load_teacher(teacher_spec, _fp32_model(student), student.input_shape, data.num_classes)
    setup = {"student": student, "data": source, "num_classes": data.num_classes,
             "train_limit": settings.train_limit, "configs": dict(zip(configs["config"], configs["bits"])),
             "recipe": dataclasses.asdict(recipe), "teacher": teacher if recipe.distill else None}
    resources = trial_resources(settings)
    setup["threads"] = max(1, int(resources["cpu"]))
    fingerprint = _fingerprint(setup, settings, teacher_spec)
    experiment = (Path(out) / "tune" / f"finetune-{fingerprint}").resolve()
    finished = experiment / RESULT_FILE
    if finished.is_file():                       # the same inputs finished before: nothing to train
        result = pd.read_parquet(finished)
        result.to_parquet(Path(out) / RESULT_FILE, index=False)
        return result
    trials = _trials(configs, recipe, settings, fingerprint)
    setup.update(trial_folder=str(experiment), trials=trials, keep_checkpoints=settings.keep_checkpoints)
    grid = _fit(trials, setup, resources, settings, recipe, experiment)
    fp32_top1 = top1(float_predictions(_fp32_model(student), test, recipe.batch_size), labels_of(test))
    label = f"{data.name} (synthetic)" if data.synthetic else data.name
    if getattr(data, "distilled", False):
        label = f"{data.name} (from BatchNorm statistics, no real images; top-1 = agreement with fp32)"
    errors = {r.config["trial"]: one_line_error(r.error) for r in grid if r.error}
    errors.update({name: "the trial did not run (the experiment ended before it)"
                   for name in trials if name not in {r.config["trial"] for r in grid}})
    result = _result_table(trials, experiment, errors, configs, student.table, recipe, fp32_top1, label,
                           Path(out).resolve())
    if not errors:
        result.to_parquet(finished, index=False)
    result.to_parquet(Path(out) / RESULT_FILE, index=False)
    return result


def _trials(configs: pd.DataFrame, recipe: Recipe, settings: TuneSettings, fingerprint: str) -> dict:
    """{trial name: {config, lr}}: each config with the same `samples` learning rates (log-uniform in lr_range,
    drawn from the fingerprint, so a resumed run names and configures its trials as the first did)."""
    if settings.samples == 1:
        lrs = [recipe.lr]
    else:
        low, high = np.log(settings.lr_range[0]), np.log(settings.lr_range[1])
        lrs = np.exp(np.random.default_rng(int(fingerprint, 16)).uniform(low, high, settings.samples)).tolist()
    trials = {}
    for config in configs["config"]:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", str(config))
        for k, lr in enumerate(lrs):
            name = f"{safe}-s{k}"
            if name in trials:
                raise HawqError(f"configs {trials[name]['config']!r} and {config!r} name the same trial folder "
                                f"{name}; rename one")
            trials[name] = {"config": config, "lr": float(lr)}
    return trials


def _fit(trials: dict, setup: dict, resources: dict, settings: TuneSettings, recipe: Recipe, experiment: Path):
    """Run every trial on Ray Tune. Tune's own experiment state (pickles) goes to a folder that is cleared first
    and never read back: trials resume from their TrialRecords, not from Tune's state."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    shutil.rmtree(experiment / "ray", ignore_errors=True)
    trainable = tune.with_resources(tune.with_parameters(qat_trial, setup=setup), resources)
    scheduler = ASHAScheduler(time_attr="epoch", metric="gain", mode="max", max_t=recipe.epochs,
                              grace_period=1, reduction_factor=2) if settings.asha else None
    with _ctrl_c_stops_tune() as interrupted:
        tuner = tune.Tuner(
            trainable, param_space={"trial": tune.grid_search(list(trials))},
            # a reused trial process skips Python start-up and the imports: most of a small trial's time
            tune_config=tune.TuneConfig(num_samples=1, scheduler=scheduler, reuse_actors=True),
            run_config=tune.RunConfig(storage_path=str(experiment), name="ray", verbose=0,
                                      stop=_stop_all_when(interrupted)))
        grid = tuner.fit()
    if interrupted.is_set():
        raise KeyboardInterrupt
    return grid


def _stop_all_when(event):
    """A Tune stopper that ends the whole experiment once `event` is set."""
    from ray.tune import Stopper

    class StopAllWhen(Stopper):
        def __call__(self, trial_id, result) -> bool:
            return False

        def stop_all(self) -> bool:
            return event.is_set()

        def __reduce__(self):          # Tune pickles its state; the copy (never read back here) needs no event
            return Stopper, ()
    return StopAllWhen()


@contextlib.contextmanager
def _ctrl_c_stops_tune():
    """Ctrl-C during the run sets the yielded event instead of raising inside Tune's loop (a KeyboardInterrupt
    there can land in Ray's own locks and hang the interpreter's exit); Tune then stops its trials, and `_fit`
    raises KeyboardInterrupt in the caller, so an interrupted run never returns as if it had finished. A second
    Ctrl-C raises at once. Tune's own handler, which ends the run and returns normally, stays off."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():     # only the main thread may take signals
        yield interrupted
        return
    previous = signal.getsignal(signal.SIGINT) or signal.default_int_handler   # None: a handler set outside Python

    def stop(signum, frame):
        interrupted.set()
        signal.signal(signal.SIGINT, previous)

    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    signal.signal(signal.SIGINT, stop)
    try:
        yield interrupted
    finally:
        signal.signal(signal.SIGINT, previous)


def _fp32_model(student: Student):
    from hawq_ray.inputs.models import get_model
    model = get_model(student.name)
    model.load_state_dict(student.state)
    return model.eval()


def _fingerprint(setup, settings: TuneSettings, teacher_spec) -> str:
    student = setup["student"]
    keyed = {k: v for k, v in setup.items() if k not in ("student", "teacher", "threads", "data")}
    keyed.update(format=RECORD_FORMAT, model=student.name, input_shape=list(student.input_shape), weights=weights_digest(student.state),
                 data=_data_key(setup["data"]), samples=settings.samples,
                 lr_range=list(settings.lr_range), asha=settings.asha,
                 teacher=str(teacher_spec) if setup["recipe"]["distill"] else None)
    return digest(keyed)[:10]


def _data_key(source: DataSource) -> list:
    """What the data is recognized by: its spec and seed, and for splits that travel with the trials (distilled) a
    digest of their images and labels."""
    if source.splits is None:
        return [source.spec, source.seed]
    return [source.spec, source.seed, arrays_digest(
        (f"{name}{k}", t) for name in ("train", "test") for k, t in enumerate(getattr(source.splits, name).tensors))]


ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b[@-_]")


def one_line_error(error) -> str:
    """The line of a trial's error that says what went wrong (a traceback's last line, 300 characters at most),
    without terminal codes."""
    lines = [ln.strip() for ln in ANSI_ESCAPE.sub("", str(error)).splitlines() if ln.strip()]
    line = lines[-1] if lines else type(error).__name__
    line = re.sub(r"^(\w+\.)*HawqError: ", "", line)            # the project's own errors speak for themselves
    return "".join(c for c in line if c.isprintable())[:300]


def _result_table(trials: dict, experiment: Path, errors: dict, configs: pd.DataFrame, table: pd.DataFrame,
                  recipe: Recipe, fp32_top1: float, data: str, out: Path) -> pd.DataFrame:
    """One row per trial, read from its TrialRecord (the last committed epoch and the best one); checkpoint
    folders relative to `out`, where the run folder's readers resolve them."""
    by_id = configs.set_index("config")
    rows = []
    for name, spec in trials.items():
        cid = spec["config"]
        bits = by_id.loc[cid, "bits"]
        record = TrialRecord(experiment / name)
        progress = record.progress()
        m = progress[-1] if progress else {}
        costs = config_costs(table, bits)
        if math.isnan(costs["latency_ms"]) and "latency_ms" in by_id.columns:
            costs["latency_ms"] = float(by_id.loc[cid, "latency_ms"])       # the sweep's measured latency
        rows.append({"config": cid, "budget": by_id.loc[cid, "budget"], "data": data, **costs,
                     "lr": spec["lr"], "weight_decay": recipe.weight_decay,
                     "epochs": m.get("epoch", 0), "top1_fp32": fp32_top1, "top1_ptq": m.get("top1_ptq", math.nan),
                     "top1": m.get("top1_int", math.nan), "loss": m.get("loss", math.nan),
                     "test_loss": m.get("test_loss", math.nan),
                     "start_epoch": m.get("start_epoch", 0), "int_matches_qat": m.get("int_matches_qat", math.nan),
                     "checkpoint": _relative(record.checkpoint(m["epoch"]), out) if m else "",
                     **_best_epoch(record, progress, out),
                     "trial": name, "device": m.get("device", ""), "error": errors.get(name, ""),
                     "bits": dict(bits)})
    return pd.DataFrame(rows, columns=COLUMNS).sort_values(["config", "lr"], ignore_index=True)


def _relative(path: Path, out: Path) -> str:
    return path.relative_to(out).as_posix()


def _best_epoch(record: TrialRecord, progress: list, out: Path) -> dict:
    """The epoch with the highest integer top-1 (the earliest of ties) and its checkpoint, as HAWQ's training
    script keeps its best checkpoint; '' when that checkpoint was not kept."""
    scored = [m for m in progress if isinstance(m.get("top1_int"), (int, float))]
    if not scored:
        return {"top1_best": math.nan, "best_epoch": 0, "best_checkpoint": ""}
    best = max(scored, key=lambda m: (m["top1_int"], -m["epoch"]))
    path = record.checkpoint(best["epoch"])
    return {"top1_best": float(best["top1_int"]), "best_epoch": int(best["epoch"]),
            "best_checkpoint": _relative(path, out) if path.is_dir() else ""}


def best_per_config(result: pd.DataFrame) -> pd.DataFrame:
    """The trial with the highest fine-tuned top-1 of each config (ties: the lower loss)."""
    ranked = result.sort_values(["config", "top1", "loss"], ascending=[True, False, True])
    return ranked.groupby("config", sort=False).head(1).reset_index(drop=True)


# ------------------------------------------------------------------------------------------------ front door
def finetune_run(configs, *, out, model=None, weights=None, data=None, recipe: Recipe = Recipe(),
                 settings: TuneSettings = TuneSettings(), teacher=None, layer_table=None, fp32_epochs: int | None = None,
                 seed: int = 0, address: str | None = None) -> pd.DataFrame:
    """The `hawq-ray finetune` stage as a function (joins Ray at `address`, see `service.session.connect`).
    `model`: None (the default digits model: without `weights` its fp32 weights are trained on digits and cached
    in `out`) or a pytorchcv name (weights from `weights` or the local pytorchcv cache). `data`: 'digits' for the
    default model, 'synthetic' otherwise, or a folder. With `recipe.distill`, `teacher` is the teacher spec
    (None: the fp32 model; a pytorchcv name, or NAME=WEIGHTS)."""
    from hawq_ray.quant.layers import layer_table as make_layer_table
    from hawq_ray.inputs.data import DISTILLED, load_data
    from hawq_ray.inputs.models import DEFAULT_MODEL, EMBEDDED_MODELS, get_model, input_shape, num_classes
    from hawq_ray.service.session import connect

    name = model or DEFAULT_MODEL
    spec = data or ("digits" if name in EMBEDDED_MODELS else "synthetic")
    shape = tuple(input_shape(name))
    out = Path(out)
    if spec == DISTILLED and name in EMBEDDED_MODELS and weights is None:
        raise HawqError(f"data distilled needs {name}'s trained weights, and without --weights it would be trained on "
                        f"digits (real data); valid: --weights FILE")
    if name in EMBEDDED_MODELS and weights is None:
        splits = load_data(spec, input_shape=shape, seed=seed)
        fp32_model, weights, _ = fp32_weights(out, splits, model_name=name, epochs=fp32_epochs, seed=seed)
    else:
        fp32_model = get_model(name, pretrained=weights is None, weights=weights).eval()
        splits = load_data(spec, input_shape=shape, seed=seed, num_classes=num_classes(fp32_model), model=fp32_model,
                           cache_dir=out / DISTILLED, log=_echo, model_name=name)
    if splits.distilled and not recipe.distill:
        _echo("[data] distill: on (distilled images have no labels of their own: fine-tuning distills from the "
              "fp32 model)")
        recipe = dataclasses.replace(recipe, distill=True)
    table = layer_table if layer_table is not None else make_layer_table(fp32_model, shape)
    chosen = config_frame(configs, table)
    teacher_model = load_teacher(teacher, fp32_model, shape, splits.num_classes) if recipe.distill else None
    connect(address)
    student = Student(name, dict(fp32_model.state_dict()), shape, table)
    return tune_finetune(chosen, student, splits, data_source(spec, seed, splits), out=out, recipe=recipe,
                         settings=settings, teacher=teacher_model, teacher_spec=teacher)


def _echo(line: str) -> None:
    import sys
    print(line, file=sys.stderr, flush=True)
