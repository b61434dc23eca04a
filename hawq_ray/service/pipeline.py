"""The main job: stages from tables to tables in one run folder (docs/design.md, "Data flow").

layer table -> Hessian traces (HessianActors) -> kernel latencies (ProfilerActors) -> budget sweep (Ray tasks)
-> QAT fine-tuning of the chosen configs (Ray Tune) -> TVM compile + bit-exact check of each -> report.

Every stage writes its table (parquet) into the run folder and records a fingerprint of its inputs in
`stages.json`; a stage whose table exists with the same fingerprint is skipped, so a stopped run resumes
where it stopped and loses nothing (Tune trials resume from their last epoch checkpoint, compiled configs
are kept one by one).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from hawq_ray.analysis.sensitivity import DEFAULT_RANK
from hawq_ray.contract import HawqError
from hawq_ray.contract.bits import budget_cell, parse_bits
from hawq_ray.contract.integrity import file_sha256
from hawq_ray.service.settings import (ACTORS, BATCH, COUNT, EPOCHS, ITERATIONS, LEARNING_RATE, RANK,
                                       SEED, TOLERANCE, Bool, Choice, TargetSpec, Text, check_mapping, fits_in_memory)

DEFAULT_CONFIG = {
    "model": None,            # None: the embedded digits_resnet
    "weights": None,          # a state-dict file; the default model is trained on digits when None
    "pretrained": False,
    "data": None,             # digits for the default model, synthetic for others
    "seed": 0,
    "input_size": None,       # H (or [H, W]) of the images; None: the model's own (224 for ImageNet models)
    "budgets": {"size": [0.25, 0.5, 0.75], "bops": [0.25, 0.5, 0.75], "latency": [0.25, 0.5, 0.75]},
    "uniform": ["uniform4", "uniform8"],
    "sweep": {"draws": 200},  # trace draws re-solved per budget: how firmly the traces support each choice
    "fp32_epochs": 8,
    "sensitivity": {"actors": 2, "batches": 4, "batch_size": 64, "tol": 0.05, "max_iter": 64, "rank": DEFAULT_RANK},
    "profile": {"batch": 8, "target": "llvm", "resource": None, "actors": 1, "rounds": 5},
    "tune": {"epochs": 4, "samples": 1, "lr": 0.01, "distill": False, "teacher": None, "asha": False},
    "deploy": {"target": "llvm", "batch": 8, "inputs": 4, "rounds": 15},   # rounds: of interleaved timing
    "export": {"onnx": False, "form": "exact", "batches": 4},   # ONNX QDQ of each config, checked in onnxruntime
    "evidence": {"enabled": True, "randoms": 20},   # the ILP's configs against random and reversed ones (PTQ)
}
RUN_SCHEMA = {   # the type and range of every setting above except budgets, input_size and uniform
    "model": Text(), "weights": Text(), "pretrained": Bool(), "data": Text(), "seed": SEED, "fp32_epochs": EPOCHS,
    "sweep": {"draws": COUNT},
    "sensitivity": {"actors": ACTORS, "batches": COUNT, "batch_size": BATCH, "tol": TOLERANCE,
                    "max_iter": ITERATIONS, "rank": RANK},
    "profile": {"batch": BATCH, "target": TargetSpec(), "resource": Text(), "actors": ACTORS, "rounds": COUNT},
    "tune": {"epochs": EPOCHS, "samples": COUNT, "lr": LEARNING_RATE, "distill": Bool(), "teacher": Text(),
             "asha": Bool()},
    "deploy": {"target": TargetSpec(), "batch": BATCH, "inputs": COUNT, "rounds": COUNT},
    "export": {"onnx": Bool(), "form": Choice(("exact", "fused")), "batches": COUNT},   # deploy.qdq.FORMS
    "evidence": {"enabled": Bool(), "randoms": COUNT},
}
TABLES_FORMAT = 5     # bump when what a stage's table holds changes: older run folders recompute, never misread
STAGES = ("fp32", "layers", "sensitivity", "latency", "sweep", "evidence", "finetune", "deploy", "export",
          "fake_vs_int", "report")


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
                            f" which a run.yaml may not, since it may come from someone else; valid: a pytorchcv "
                            f"name or torchvision:NAME here, or the code on the command line (hawq-ray run --model "
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
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


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
    run_dir = writable_folder(out)
    with run_folder_lock(run_dir, log):
        refuse_links(run_dir)
        return _run_stages(cfg, name, shape, run_dir, address, log)


def _check_memory(cfg: dict, shape: tuple) -> None:
    """The batch sizes against this machine's free memory, before any work (the architecture alone, no
    weights loaded)."""
    from hawq_ray.analysis.layers import activation_elements
    from hawq_ray.inputs.models import get_model
    elements = activation_elements(get_model(cfg["model"]), shape)
    what = f"{cfg['model'] or 'the default model'} at {shape[1]}x{shape[2]}"
    fits_in_memory({"sensitivity.batch_size": (cfg["sensitivity"]["batch_size"], "sensitivity"),
                    "profile.batch": (cfg["profile"]["batch"], "profile"),
                    "deploy.batch": (cfg["deploy"]["batch"], "deploy")}, elements, what)


def _run_stages(cfg: dict, name: str, shape: tuple, run_dir: Path, address, log) -> dict:
    from hawq_ray.analysis.layers import layer_table
    from hawq_ray.inputs import data as data_mod
    from hawq_ray.inputs import models
    from hawq_ray.quant.finetune import fp32_weights, state_sha1
    from hawq_ray.service.outputs import write_atomic
    from hawq_ray.service.session import connect

    write_atomic(run_dir / "run.json", json.dumps(cfg, indent=1, default=str))
    connect(address)
    spec = cfg["data"] or ("digits" if name == models.DEFAULT_MODEL else "synthetic")
    data = data_mod.load_data(spec, input_shape=shape, seed=cfg["seed"])
    if data.synthetic:
        log("[data] SYNTHETIC random images: accuracies in this run mean nothing about the model")

    # fp32 weights: given, pretrained from the local cache, or (default model) trained once on digits
    if cfg["weights"] or cfg["pretrained"] or name != models.DEFAULT_MODEL:
        model = models.get_model(cfg["model"], pretrained=cfg["pretrained"], weights=cfg["weights"]).eval()
    else:
        model, path, trained = fp32_weights(run_dir, data, model_name=name, epochs=cfg["fp32_epochs"],
                                            seed=cfg["seed"])
        log(f"[fp32] {'trained' if trained else 'reused'} {path.name}")
    weights_key = state_sha1(model.state_dict())
    base = fingerprint(TABLES_FORMAT, name, weights_key, spec, cfg["seed"], shape)
    tables = {}

    tables["layers"] = cached_stage(run_dir, "layers", base, lambda: layer_table(model, shape), log)

    s = cfg["sensitivity"]
    key = fingerprint(base, s)
    tables["sensitivity"] = cached_stage(
        run_dir, "sensitivity", key, lambda: _sensitivity(model, data, tables["layers"], s, cfg["seed"], log), log)

    p = cfg["profile"]
    key = fingerprint(base, p)
    tables["latency"] = cached_stage(
        run_dir, "latency", key, lambda: _latency(model, shape, tables["layers"], p, run_dir, log), log)

    table = tables["sensitivity"].merge(
        tables["latency"][["layer", "lat4_ms", "lat8_ms", "lat32_ms"]], on="layer", how="left")
    write_atomic(run_dir / "table.parquet", table.to_parquet(index=False))
    table_key = fingerprint(table.to_json())
    key = fingerprint(table_key, cfg["budgets"], cfg["uniform"], cfg["sweep"], cfg["seed"])
    tables["sweep"] = cached_stage(run_dir, "sweep", key,
                                   lambda: _sweep(table, cfg["budgets"], cfg["uniform"], cfg["sweep"]["draws"],
                                                  cfg["seed"]), log)

    v = cfg["evidence"]
    if v["enabled"]:
        vkey = fingerprint(table_key, weights_key, spec, cfg["budgets"], v, cfg["seed"])
        tables["evidence"] = cached_stage(run_dir, "evidence", vkey,
                                          lambda: _evidence(model, shape, data, table, cfg, log), log)

    t = cfg["tune"]
    key = fingerprint(fingerprint(tables["sweep"].to_json()), weights_key, t, spec)
    tables["finetune"] = cached_stage(
        run_dir, "finetune", key, lambda: _finetune(model, shape, data, spec, cfg, tables["sweep"], table, run_dir), log,
        unfinished=_failed_trials)
    finished = tables["finetune"][tables["finetune"]["error"] == ""]     # a failed trial has nothing to deploy
    trained = fingerprint(finished[["config", "checkpoint"]].to_json())

    d = cfg["deploy"]
    key = fingerprint(trained, d)
    if len(finished):
        tables["deploy"] = cached_stage(
            run_dir, "deploy", key, lambda: _deploy(model, shape, tables["layers"], finished, d, run_dir, log,
                                                    _latency_budgets(finished, tables["sweep"], cfg)), log)

    e = cfg["export"]
    if e["onnx"] and len(finished):
        ekey = fingerprint(trained, e)
        tables["export"] = cached_stage(
            run_dir, "export", ekey, lambda: _export(model, shape, tables["layers"], finished, data, e,
                                                     run_dir, log), log)

    key = fingerprint(key, "fake_vs_int")
    if len(finished):
        tables["fake_vs_int"] = cached_stage(
            run_dir, "fake_vs_int", key, lambda: _fake_vs_int(model, shape, tables["layers"], data, finished, run_dir),
            log)

    from hawq_ray.service.report import write_report
    report = write_report(run_dir)
    log(f"[report] {report}")
    failed = _failed_trials(tables["finetune"])
    if failed:
        first = tables["finetune"][tables["finetune"]["error"] != ""].iloc[0]
        raise HawqError(f"{failed} (first: {first['trial']}: {first['error'][:200]}); every other stage finished and "
                        f"{report.name} lists them; run the same command again to retry them")
    return tables


def _failed_trials(finetuned: pd.DataFrame) -> str:
    """'N of M fine-tuning trials failed', or '' when none did."""
    n = int((finetuned["error"] != "").sum())
    return f"{n} of {len(finetuned)} fine-tuning trials failed" if n else ""


# ------------------------------------------------------------------------------------------------ stage bodies
def _sensitivity(model, data, layers: pd.DataFrame, s: dict, seed: int, log) -> pd.DataFrame:
    from actors.hessian import actor_layer_traces
    from hawq_ray.inputs.data import batches
    from hawq_ray.analysis.sensitivity import sensitivity_columns, weight_deltas
    from tqdm import tqdm
    shards = batches(data.train, s["batch_size"], s["batches"])
    bar = tqdm(total=s["max_iter"], desc="hessian traces", unit="it", file=sys.stderr, leave=False)

    def progress(iterations, worst):
        bar.n = iterations
        bar.set_postfix(worst_rel_stderr=f"{worst:.3f}")
        bar.refresh()

    try:
        traces = actor_layer_traces(model, shards, actors=s["actors"], layers=list(layers["layer"]),
                                    tol=s["tol"], max_iter=s["max_iter"], rank=s["rank"], seed=seed,
                                    progress=progress)
    finally:
        bar.close()
    out = sensitivity_columns(layers, traces, weight_deltas(model, list(layers["layer"])))
    bad = traces.attrs.get("not_converged", [])
    if bad:
        log(f"[sensitivity] {len(bad)} layer(s) did not reach tol {s['tol']}: {', '.join(bad[:5])}")
    return out


def _latency(model, shape, layers: pd.DataFrame, p: dict, run_dir: Path, log) -> pd.DataFrame:
    from actors.profiler import Measure
    from hawq_ray.service.profile import profile_layers
    from tqdm import tqdm
    bar = tqdm(desc="kernel latency", unit="kernel", file=sys.stderr, leave=False)

    def progress(done, total, *rest):
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        lat = profile_layers(model, shape, batch=p["batch"], target=p["target"], resource=p["resource"],
                             how=Measure(actors=p["actors"], rounds=p["rounds"]), cache_dir=run_dir / "latency_cache",
                             table=layers, progress=progress)
    finally:
        bar.close()
    for row in lat.attrs.get("end_to_end", []):
        log(f"[latency] {row['config']}: sum of layers {row['sum_ms']:.3f} ms, end to end {row['e2e_ms']:.3f} ms, "
            f"ratio {row['ratio']:.3f}")
    return lat


def _budget_grid(table: pd.DataFrame, budgets: dict) -> list:
    """One budget point per value of run.yaml's budgets; latency ones only where every layer has its latency."""
    grid = [{resource: float(r)} for resource, values in budgets.items() for r in values]
    if not table[["lat4_ms", "lat8_ms"]].notna().all().all():
        grid = [g for g in grid if "latency" not in g]
    return grid


def _sweep(table: pd.DataFrame, budgets: dict, uniform: list, draws: int, seed: int) -> pd.DataFrame:
    """The uniform configs and each distinct ILP answer, with its confidence: the lowest, over the budget points
    that chose it, of the fraction of trace draws that choose it again, and for each layer whose bits flip in
    some draw the highest such fraction (`flips`, JSON); NaN and {} for a uniform config no budget chose."""
    from hawq_ray.service.sweep import ray_solve
    from solver.sweep import sweep_budgets
    grid = _budget_grid(table, budgets)
    rows = {u: {"config": u, "budget": [], "latency_limit_ms": np.nan, "bits": parse_bits(u, table).as_dict(),
                "confidence": np.nan, "flips": {}} for u in uniform}
    if grid:
        sweep = sweep_budgets(table, grid, solve=ray_solve)
        support = _support(table, grid, sweep, draws, seed)
        for r in sweep.configs.itertuples():
            same = [u for u in rows.values() if u["bits"] == r.bits]
            if not same:
                rows[f"ilp{int(r.config)}"] = {"config": f"ilp{int(r.config)}", "budget": [], "latency_limit_ms":
                                               np.nan, "bits": r.bits, "confidence": np.nan, "flips": {}}
            row = same[0] if same else rows[f"ilp{int(r.config)}"]   # an ILP answer that is a uniform config:
            row["budget"] += list(r.budgets)                              # one trial, both labels
            row["latency_limit_ms"] = np.fmin(row["latency_limit_ms"], r.latency_limit_ms)
            for k in np.flatnonzero(sweep.points["config"].fillna(-1).to_numpy() == r.config):
                row["confidence"] = np.fmin(row["confidence"], support[k]["confidence"])
                for layer, f in support[k]["flips"].items():
                    row["flips"][layer] = max(row["flips"].get(layer, 0.0), f)
    for row in rows.values():
        row["budget"] = budget_cell(row["budget"])
        row["flips"] = json.dumps(row["flips"])
    return pd.DataFrame(list(rows.values()), columns=["config", "budget", "latency_limit_ms", "bits", "confidence",
                                                      "flips"])


def _support(table: pd.DataFrame, grid: list, sweep, draws: int, seed: int) -> list:
    """`solver.confidence.confidence` of each grid point's answer over `draws` trace draws (Ray tasks)."""
    from hawq_ray.service.sweep import ray_draw_answers
    from solver.confidence import confidence
    by_id = dict(zip(sweep.configs["config"], sweep.configs["bits"]))
    chosen = [None if pd.isna(c) else tuple(by_id[int(c)].values()) for c in sweep.points["config"]]
    answers = ray_draw_answers(table, grid, draws, seed) if "trace_stderr" in table else []
    return confidence(list(table["layer"]), chosen, answers)


def _evidence(model, shape, data, table: pd.DataFrame, cfg: dict, log) -> pd.DataFrame:
    from hawq_ray.analysis.evidence import omega_kl_correlation, standing
    from hawq_ray.service.evidence import evidence_table
    from tqdm import tqdm
    bar = tqdm(desc="evidence", unit="config", file=sys.stderr, leave=False)

    def progress(done, total):
        bar.total, bar.n = total, done
        bar.refresh()

    try:
        rows = evidence_table(model, shape, data, table, _budget_grid(table, cfg["budgets"]),
                              randoms=cfg["evidence"]["randoms"], seed=cfg["seed"], progress=progress)
    finally:
        bar.close()
    rho, n = omega_kl_correlation(rows)
    s = standing(rows)
    said = [f"Spearman(predicted Omega, measured KL) {rho:.2f} over {n} configs" if n >= 3 else
            f"{n} distinct config(s), too few for a correlation"]
    if s["randoms"].sum():
        said.append(f"the ILP's config has a lower KL than {s['beats_random_fraction'].mean():.0%} of the random "
                    "ones on average")
    rev = s["beats_reversed"].dropna()
    if len(rev):
        said.append(f"and than the reversed one at {int(rev.sum())} of {len(rev)} budgets")
    log("[evidence] " + "; ".join(said))
    return rows


def _finetune(model, shape, data, spec, cfg, configs: pd.DataFrame, table: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    from hawq_ray.inputs.models import DEFAULT_MODEL
    from hawq_ray.quant.finetune import Recipe
    from hawq_ray.service.tune import DataSource, Student, TuneSettings, tune_finetune
    t = cfg["tune"]
    recipe = Recipe(epochs=t["epochs"], lr=t["lr"], distill=t["distill"])
    student = Student(cfg["model"] or DEFAULT_MODEL, dict(model.state_dict()), tuple(shape), table)
    return tune_finetune(configs, student, data, DataSource(spec, cfg["seed"]), out=run_dir, recipe=recipe,
                         settings=TuneSettings(samples=t["samples"], asha=t["asha"]), teacher_spec=t["teacher"])


def _restore(model, shape, table, row, run_dir: Path) -> "torch.nn.Module":
    """The fine-tuned QAT model of a finetune row, its checkpoint read inside `run_dir`."""
    from hawq_ray.quant.finetune import load_checkpoint
    from hawq_ray.quant.qat import prepare
    from hawq_ray.service.outputs import inside
    from hawq_ray.service.trial_record import CHECKPOINT_FILE
    qm = prepare(model, row["bits"], shape, table)
    state = load_checkpoint(inside(run_dir, _checkpoint_of(row)) / CHECKPOINT_FILE)
    qm.load_state_dict(state["model"])
    return qm.eval()


def _checkpoint_of(row) -> str:
    """The checkpoint folder a finetune row deploys (relative to the run folder): its best epoch's, where kept."""
    return row.get("best_checkpoint") or row["checkpoint"]


def _latency_budgets(finetuned: pd.DataFrame, sweep: pd.DataFrame, cfg: dict) -> tuple[dict, dict]:
    """({config: latency the ILP predicted}, {config: its latency budget}), whole model in ms; empty when the
    profiled kernels are not the deployed ones (another batch or target), whose latencies they do not predict."""
    p, d = cfg["profile"], cfg["deploy"]
    if (p["batch"], p["target"]) != (d["batch"], d["target"]) or "latency_ms" not in finetuned:
        return {}, {}
    limits = dict(zip(sweep["config"], sweep["latency_limit_ms"])) if "latency_limit_ms" in sweep else {}
    return dict(zip(finetuned["config"], finetuned["latency_ms"])), limits


def _deploy(model, shape, table, finetuned: pd.DataFrame, d: dict, run_dir: Path, log,
            budgets: tuple[dict, dict]) -> pd.DataFrame:
    """Compile and check each config (kept one by one, so a stopped run resumes), then time the saved modules
    together in interleaved rounds (analysis.timing) and set each beside its predicted latency and budget."""
    from hawq_ray.analysis.timing import against_budget, time_models
    from hawq_ray.deploy.build import load_model
    rows = [_compile_config(model, shape, table, row, d, run_dir, log) for _, row in finetuned.iterrows()]
    log(f"[deploy] timing {len(rows)} module(s) together: {d['rounds']} interleaved rounds")
    modules = {r["config"]: load_model(_module_folder(run_dir, r["config"])) for r in rows}
    timed = against_budget(time_models(modules, rounds=d["rounds"]), *budgets)
    for r in timed.itertuples():
        log(f"[deploy] {r.config}: median {r.latency_median_ms:.3f} ms at batch {d['batch']} (interquartile "
            f"{r.latency_q25_ms:.3f}-{r.latency_q75_ms:.3f}, {r.latency_samples} rounds), predicted "
            f"{r.predicted_ms:.3f} ms" + (f", OVER its budget of {r.latency_limit_ms:.3f} ms" if r.over_budget else ""))
    return pd.DataFrame(rows).merge(timed, on="config")


DEPLOY_COLUMNS = ("config", "tvm_differing", "tvm_elements", "compile_s", "module")


def _module_folder(run_dir: Path, config) -> Path:
    """Where a config's module lives: `deploy/<config>` inside the run folder, whatever a record says."""
    from hawq_ray.service.outputs import inside
    return inside(run_dir, f"deploy/{_plain_name(config)}")


def _plain_name(config) -> str:
    name = str(config)
    if not name or name in (".", "..") or any(not (c.isalnum() or c in "_.-") for c in name):
        raise HawqError(f"config {name[:80]!r}: not a plain name; valid: letters, digits, '_', '.', '-'")
    return name


def _compile_config(model, shape, table, row, d: dict, run_dir: Path, log) -> dict:
    """The deploy row of one config: its module compiled from this row's fine-tuned program and checked against
    the integer executor, or the one an earlier run compiled and checked from the same program, target and
    batch (`service.module_record`)."""
    from hawq_ray.analysis.verify import compare_batches, executor_of, random_inputs
    from hawq_ray.deploy.build import compile_program, export_model, load_model
    from hawq_ray.service.module_record import reusable_record, write_record
    config = str(row["config"])
    out_dir = _module_folder(run_dir, config)
    program = _restore(model, shape, table, row, run_dir).to_integer()
    built_from = {"config": config, "program_sha256": program.fingerprint(), "target": d["target"],
                  "batch": d["batch"], "inputs": d["inputs"]}
    saved, why = reusable_record(out_dir, built_from)
    if saved is not None:                   # compiled and checked in an earlier (stopped) run
        return {**{k: saved[k] for k in DEPLOY_COLUMNS[:-1]}, "module": f"deploy/{config}"}
    if why:
        log(f"[deploy] {config}: {why}: compiling it again")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    t0 = time.time()
    deployed = compile_program(program, batch=d["batch"], target=d["target"])
    compile_s = time.time() - t0
    export_model(deployed, out_dir)
    # the saved files are what is checked (and loading them is quicker than the in-memory executable's JIT)
    check = compare_batches(load_model(out_dir, program=program), executor_of(program),
                            random_inputs((d["batch"], *shape), batches=d["inputs"], seed=0))
    log(f"[deploy] {config}: {check.differing}/{check.elements} differing elements vs the integer "
        f"executor, compiled in {compile_s:.1f} s")
    record = {**built_from, "tvm_differing": check.differing, "tvm_elements": check.elements,
              "compile_s": round(compile_s, 2)}
    write_record(out_dir, record)
    return {**{k: record[k] for k in DEPLOY_COLUMNS[:-1]}, "module": f"deploy/{config}"}


def _export(model, shape, table, finetuned: pd.DataFrame, data, e: dict, run_dir: Path, log) -> pd.DataFrame:
    """Each fine-tuned config as an ONNX QDQ model, run in onnxruntime against the integer executor on the
    held-out split."""
    from hawq_ray.deploy.qdq import check_onnx, export_onnx
    from hawq_ray.inputs.data import batches
    held_out = [b[0] for b in batches(data.test, 64, e["batches"])]
    rows = []
    for _, row in finetuned.iterrows():
        (run_dir / "export").mkdir(exist_ok=True)
        path = run_dir / "export" / f"{_plain_name(row['config'])}.onnx"
        program = _restore(model, shape, table, row, run_dir).to_integer()
        export_onnx(program, path, {"config": str(row["config"]),
                                    "scales": f"fine-tuned QAT checkpoint {_checkpoint_of(row)}"}, form=e["form"])
        check = check_onnx(path, program, held_out)
        log(f"[export] {row['config']}: {path}, top-1 agreement with the integer executor "
            f"{check['top1_agreement']:.4f} on {check['samples']} held-out images, largest logit difference "
            f"{check['max_logit_diff_units']:g} output-scale units")
        rows.append({"config": row["config"], "onnx": f"export/{path.name}", **check})
    return pd.DataFrame(rows)


def _fake_vs_int(model, shape, table, data, finetuned: pd.DataFrame, run_dir: Path) -> pd.DataFrame:
    from hawq_ray.inputs.data import batches
    from hawq_ray.analysis.verify import check_simulation
    x = torch.cat([b[0] for b in batches(data.test, 64, 2)])
    frames = []
    for _, row in finetuned.iterrows():
        summary, layers = check_simulation(_restore(model, shape, table, row, run_dir), x)
        layers.insert(0, "config", row["config"])
        layers["qat_vs_int_output_diff"] = summary["differing"]
        frames.append(layers)
    return pd.concat(frames, ignore_index=True)
