"""The main job: stages from tables to tables in one run folder (docs/design.md, "Data flow").

layer table -> Hessian traces (HessianActors) -> kernel latencies (ProfilerActors) -> budget sweep (Ray tasks)
-> QAT fine-tuning of the chosen configs (Ray Tune) -> TVM compile + bit-exact check of each -> report.

Every stage writes its table (parquet) into the run folder and records a fingerprint of its inputs in
`stages.json`; a stage whose table exists with the same fingerprint is skipped, so a stopped run resumes
where it stopped and loses nothing (Tune trials resume from their last epoch checkpoint, compiled configs
are kept one by one).
"""
from __future__ import annotations

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
from hawq_ray.service.settings import (ACTORS, BATCH, COUNT, EPOCHS, FRACTION, ITERATIONS, LEARNING_RATE, RANK,
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
TABLES_FORMAT = 4     # bump when what a stage's table holds changes: older run folders recompute, never misread
STAGES = ("fp32", "layers", "sensitivity", "latency", "sweep", "evidence", "finetune", "deploy", "export",
          "fake_vs_int", "report")


# ------------------------------------------------------------------------------------------------ config
def load_config(path=None, overrides: dict | None = None) -> dict:
    """DEFAULT_CONFIG updated by a YAML file and then by `overrides` (nested dicts merge key by key)."""
    cfg = copy.deepcopy(DEFAULT_CONFIG)
    if path is not None:
        import yaml
        p = Path(path)
        if not p.is_file():
            raise HawqError(f"run config {path}: no such file (give a YAML file like the README's run.yaml)")
        try:
            user = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise HawqError(f"run config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(user, dict):
            raise HawqError(f"run config {path}: expected a mapping of settings, got {type(user).__name__}")
        _merge_settings(cfg, user, str(path))
    _merge_settings(cfg, overrides or {}, "overrides")
    check_mapping(cfg, RUN_SCHEMA)
    _check_budgets(cfg["budgets"])
    size = cfg["input_size"]
    pair = size if isinstance(size, (list, tuple)) else [size]
    if size is not None and not (len(pair) in (1, 2) and all(isinstance(v, int) and not isinstance(v, bool)
                                                              and v >= 8 for v in pair)):
        raise HawqError(f"input_size: {size!r} is not valid; give an integer >= 8 (H = W) or [H, W], or null")
    uniform = cfg["uniform"]
    if not isinstance(uniform, list) or not all(u in ("uniform4", "uniform8") for u in uniform):
        raise HawqError(f"uniform: {uniform!r} is not valid; valid: a list of uniform4, uniform8")
    return cfg


def _check_budgets(budgets) -> None:
    if not isinstance(budgets, dict):
        raise HawqError(f"budgets: {budgets!r} is not valid; valid: a mapping such as {{size: [0.25, 0.5]}}")
    for resource, values in budgets.items():
        if resource not in ("size", "bops", "latency"):
            raise HawqError(f"budgets: unknown resource {resource!r}; valid: size, bops, latency (fractions r in "
                            f"[0, 1])")
        if not isinstance(values, list) or not all(FRACTION.ok(v) for v in values):
            raise HawqError(f"budgets.{resource}: {values!r} is not valid; valid: a list of fractions from 0 to 1")


def _input_shape(cfg: dict) -> tuple:
    """(C, H, W): the model's channels, its own size unless `input_size` says otherwise."""
    from hawq_ray.inputs.models import input_shape
    shape = tuple(input_shape(cfg["model"]))
    size = cfg["input_size"]
    if size is None:
        return shape
    h, w = (size, size) if isinstance(size, int) else size
    return (shape[0], h, w)


def _merge_settings(into: dict, new: dict, where: str) -> None:
    for k, v in new.items():
        if k not in into:
            raise HawqError(f"{where}: unknown setting {k!r}; valid: {', '.join(sorted(into))}")
        if isinstance(into[k], dict) and k != "budgets":
            if not isinstance(v, dict):
                raise HawqError(f"{where}: setting {k!r} must be a mapping")
            _merge_settings(into[k], v, f"{where}.{k}")
        else:
            into[k] = v


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


def cached_stage(run_dir: Path, name: str, key: str, compute, log=print) -> pd.DataFrame:
    """Load `<name>.parquet` when its recorded fingerprint equals `key` and the file is the one recorded
    (SHA-256, columns, rows), else compute, write and record it; a damaged table is recomputed with a notice."""
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
    table = compute()
    tmp = path.with_suffix(".tmp")
    table.to_parquet(tmp, index=False)
    tmp.replace(path)
    table = pd.read_parquet(path)      # what a resumed run reads: the same types either way
    done = _done(run_dir)
    done[name] = {"key": key, "seconds": round(time.time() - t0, 2), "rows": len(table),
                  "columns": list(table.columns), "sha256": file_sha256(path)}
    tmp = _stages_file(run_dir).with_suffix(".tmp")
    tmp.write_text(json.dumps(done, indent=1))
    tmp.replace(_stages_file(run_dir))
    log(f"[{name}] done in {time.time() - t0:.1f} s ({len(table)} rows) -> {path.name}")
    return table


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
    from hawq_ray.service.outputs import run_folder_lock, writable_folder

    if isinstance(config, dict):
        cfg = load_config(None, {**config, **settings})
    else:
        cfg = load_config(config, settings)
    name = cfg["model"] or models.DEFAULT_MODEL
    shape = _input_shape(cfg)
    _check_memory(cfg, shape)
    run_dir = writable_folder(out)
    with run_folder_lock(run_dir, log):
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
    from hawq_ray.service.session import connect

    (run_dir / "run.json").write_text(json.dumps(cfg, indent=1, default=str))
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
    table.to_parquet(run_dir / "table.parquet", index=False)
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
        run_dir, "finetune", key, lambda: _finetune(model, shape, data, spec, cfg, tables["sweep"], table, run_dir), log)

    d = cfg["deploy"]
    key = fingerprint(fingerprint(tables["finetune"][["config", "checkpoint"]].to_json()), d)
    tables["deploy"] = cached_stage(
        run_dir, "deploy", key, lambda: _deploy(model, shape, tables["layers"], tables["finetune"], d, run_dir, log,
                                                _latency_budgets(tables["finetune"], tables["sweep"], cfg)), log)

    e = cfg["export"]
    if e["onnx"]:
        ekey = fingerprint(fingerprint(tables["finetune"][["config", "checkpoint"]].to_json()), e)
        tables["export"] = cached_stage(
            run_dir, "export", ekey, lambda: _export(model, shape, tables["layers"], tables["finetune"], data, e,
                                                     run_dir, log), log)

    key = fingerprint(key, "fake_vs_int")
    tables["fake_vs_int"] = cached_stage(
        run_dir, "fake_vs_int", key, lambda: _fake_vs_int(model, shape, tables["layers"], data, tables["finetune"]), log)

    from hawq_ray.service.report import write_report
    report = write_report(run_dir)
    log(f"[report] {report}")
    return tables


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


def _restore(model, shape, table, row) -> "torch.nn.Module":
    from hawq_ray.quant.finetune import load_checkpoint
    from hawq_ray.quant.qat import prepare
    qm = prepare(model, row["bits"], shape, table)
    ckpt = row.get("best_checkpoint") or row["checkpoint"]
    state = load_checkpoint(Path(ckpt) / "state.pt" if Path(ckpt).is_dir() else ckpt)
    qm.load_state_dict(state["model"])
    return qm.eval()


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
    timed = against_budget(time_models({r["config"]: load_model(r["module"]) for r in rows}, rounds=d["rounds"]),
                           *budgets)
    for r in timed.itertuples():
        log(f"[deploy] {r.config}: median {r.latency_median_ms:.3f} ms at batch {d['batch']} (interquartile "
            f"{r.latency_q25_ms:.3f}-{r.latency_q75_ms:.3f}, {r.latency_samples} rounds), predicted "
            f"{r.predicted_ms:.3f} ms" + (f", OVER its budget of {r.latency_limit_ms:.3f} ms" if r.over_budget else ""))
    return pd.DataFrame(rows).merge(timed, on="config")


def _compile_config(model, shape, table, row, d: dict, run_dir: Path, log) -> dict:
    from hawq_ray.analysis.verify import compare_batches, executor_of, random_inputs
    from hawq_ray.contract.integrity import sign
    from hawq_ray.deploy.build import MANIFEST, compile_program, export_model, load_model
    out_dir = run_dir / "deploy" / str(row["config"])
    done = out_dir / "deploy.json"
    keys = ("config", "tvm_differing", "tvm_elements", "compile_s", "module")
    saved = _signed_module(out_dir, done)
    if saved is not None:                   # compiled and checked in an earlier (stopped) run
        return {k: saved[k] for k in keys}
    if done.is_file():
        log(f"[deploy] {row['config']}: the saved module is not signed with this user's key (changed, or "
            f"written elsewhere): compiling it again")
    shutil.rmtree(out_dir, ignore_errors=True)
    t0 = time.time()
    program = _restore(model, shape, table, row).to_integer()
    deployed = compile_program(program, batch=d["batch"], target=d["target"])
    compile_s = time.time() - t0
    export_model(deployed, out_dir)
    # the saved files are what is checked (and loading them is quicker than the in-memory executable's JIT)
    check = compare_batches(load_model(out_dir), executor_of(program),
                            random_inputs((d["batch"], *shape), batches=d["inputs"], seed=0))
    result = {"config": row["config"], "tvm_differing": check.differing, "tvm_elements": check.elements,
              "compile_s": round(compile_s, 2), "module": str(out_dir)}
    log(f"[deploy] {row['config']}: {check.differing}/{check.elements} differing elements vs the integer "
        f"executor, compiled in {compile_s:.1f} s")
    result["signature"] = sign((out_dir / MANIFEST).read_bytes())
    done.write_text(json.dumps(result))
    return {k: result[k] for k in keys}


def _signed_module(out_dir: Path, done: Path) -> dict | None:
    """deploy.json of a module this user's key signed (its manifest, which holds the library's SHA-256), else
    None: a resumed run loads no library it did not build."""
    from hawq_ray.contract.integrity import signed
    from hawq_ray.deploy.build import MANIFEST
    try:
        saved = json.loads(done.read_text())
        return saved if signed((out_dir / MANIFEST).read_bytes(), saved.get("signature")) else None
    except (OSError, ValueError, AttributeError):
        return None


def _export(model, shape, table, finetuned: pd.DataFrame, data, e: dict, run_dir: Path, log) -> pd.DataFrame:
    """Each fine-tuned config as an ONNX QDQ model, run in onnxruntime against the integer executor on the
    held-out split."""
    from hawq_ray.deploy.qdq import check_onnx, export_onnx
    from hawq_ray.inputs.data import batches
    held_out = [b[0] for b in batches(data.test, 64, e["batches"])]
    rows = []
    for _, row in finetuned.iterrows():
        path = run_dir / "export" / f"{row['config']}.onnx"
        program = _restore(model, shape, table, row).to_integer()
        ckpt = row.get("best_checkpoint") or row["checkpoint"]
        export_onnx(program, path, {"config": str(row["config"]), "scales": f"fine-tuned QAT checkpoint {ckpt}"},
                    form=e["form"])
        check = check_onnx(path, program, held_out)
        log(f"[export] {row['config']}: {path}, top-1 agreement with the integer executor "
            f"{check['top1_agreement']:.4f} on {check['samples']} held-out images, largest logit difference "
            f"{check['max_logit_diff_units']:g} output-scale units")
        rows.append({"config": row["config"], "onnx": str(path), **check})
    return pd.DataFrame(rows)


def _fake_vs_int(model, shape, table, data, finetuned: pd.DataFrame) -> pd.DataFrame:
    from hawq_ray.inputs.data import batches
    from hawq_ray.analysis.verify import check_simulation
    x = torch.cat([b[0] for b in batches(data.test, 64, 2)])
    frames = []
    for _, row in finetuned.iterrows():
        summary, layers = check_simulation(_restore(model, shape, table, row), x)
        layers.insert(0, "config", row["config"])
        layers["qat_vs_int_output_diff"] = summary["differing"]
        frames.append(layers)
    return pd.concat(frames, ignore_index=True)
