"""The stages of `hawq-ray run`, declared: each is a name (its table, `<name>.parquet` in the run folder), the
inputs its table depends on, the function that computes it, when it runs, and its section of the report.

    layers -> sensitivity, latency -> table -> sweep -> evidence
                                            -> finetune -> programs -> deploy, export, fake_vs_int

`pipeline.run` walks `STAGES` in order: a stage whose inputs have the fingerprint recorded with its table is
read back, any other is computed (`pipeline.cached_stage`). A stage function takes the `Run` (the model, the
data, the settings, the tables so far) and returns its table. Adding a stage is one `Stage(...)` in `STAGES`
and its function; docs/design.md ("Adding a stage") walks through it.
"""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from hawq_ray.contract import HawqError
from hawq_ray.contract.integrity import digest
from hawq_ray.contract.table import COL, LATENCY_COLUMNS
from hawq_ray.service import report


@dataclass
class Run:
    """What every stage of one run reads: the settings, the fp32 model and its data, and the tables so far."""
    cfg: dict
    model_name: str
    shape: tuple                 # (C, H, W) of one sample
    run_dir: Path
    model: torch.nn.Module       # fp32, eval mode
    data: object                 # inputs.data.DataSplits
    data_spec: str
    weights_key: str             # digest of the fp32 weights
    log: Callable
    tables: dict = field(default_factory=dict)

    def digest_of(self, *names) -> str:
        """The digest of tables computed so far (what a later stage's fingerprint holds of them)."""
        return digest(*[self.tables[n].to_json() for n in names])

    @property
    def finished(self) -> pd.DataFrame:
        """The fine-tuning trials that finished (a failed trial has nothing to deploy)."""
        ft = self.tables["finetune"]
        return ft[ft["error"] == ""]


@dataclass(frozen=True)
class Stage:
    name: str                                        # its table: <name>.parquet
    inputs: Callable[[Run], tuple]                   # what its table depends on (fingerprinted)
    compute: Callable[[Run], pd.DataFrame]
    runs: Callable[[Run], bool] = lambda run: True   # whether this run has the stage
    unfinished: Callable | None = None               # (table) -> why it is not final (recomputed next run), or ''
    report: Callable | None = None                   # (run_dir, table, plots) -> markdown lines of its section


# ------------------------------------------------------------------------------------------------ stage functions
def layers(run: Run) -> pd.DataFrame:
    from hawq_ray.quant.layers import layer_table
    return layer_table(run.model, run.shape)


def sensitivity(run: Run) -> pd.DataFrame:
    from actors.hessian import actor_layer_traces
    from hawq_ray.analysis.sensitivity import sensitivity_columns, weight_deltas
    from hawq_ray.inputs.data import batches
    settings, names = run.cfg["sensitivity"], list(run.tables["layers"][COL.layer])
    shards = batches(run.data.train, settings["batch_size"], settings["batches"])
    with _bar("hessian traces", "it", total=settings["max_iter"]) as bar:
        def progress(iterations, worst):
            bar.n = iterations
            bar.set_postfix(worst_rel_stderr=f"{worst:.3f}")
            bar.refresh()

        traces = actor_layer_traces(run.model, shards, actors=settings["actors"], layers=names, tol=settings["tol"],
                                    max_iter=settings["max_iter"], rank=settings["rank"], seed=run.cfg["seed"],
                                    progress=progress)
    out = sensitivity_columns(run.tables["layers"], traces, weight_deltas(run.model, names, input_shape=run.shape))
    bad = traces.attrs.get("not_converged", [])
    if bad:
        run.log(f"[sensitivity] {len(bad)} layer(s) did not reach tol {settings['tol']}: {', '.join(bad[:5])}")
    return out


def latency(run: Run) -> pd.DataFrame:
    from actors.profiler import Measure
    from hawq_ray.service.profile import profile_layers
    profile = run.cfg["profile"]
    with _bar("kernel latency", "kernel") as bar:
        def progress(done, total, *rest):
            bar.total, bar.n = total, done
            bar.refresh()

        lat = profile_layers(run.model, run.shape, batch=profile["batch"], target=profile["target"],
                             resource=profile["resource"], how=Measure(actors=profile["actors"], rounds=profile["rounds"]),
                             cache_dir=run.run_dir / "latency_cache", table=run.tables["layers"], progress=progress)
    for row in lat.attrs.get("end_to_end", []):
        run.log(f"[latency] {row['config']}: sum of layers {row['sum_ms']:.3f} ms, end to end {row['e2e_ms']:.3f} ms, "
                f"ratio {row['ratio']:.3f}")
    return lat


def merged_table(run: Run) -> pd.DataFrame:
    """The layer table the ILP reads: sensitivity columns and measured latencies."""
    lat = run.tables["latency"]
    return run.tables["sensitivity"].merge(lat[[COL.layer, *LATENCY_COLUMNS]], on=COL.layer, how="left")


def sweep(run: Run) -> pd.DataFrame:
    from hawq_ray.service.sweep import sweep_configs
    return sweep_configs(run.tables["table"], budgets_of(run.cfg), run.cfg["uniform"], run.cfg["sweep"]["draws"],
                         run.cfg["seed"])


def budgets_of(cfg: dict) -> dict:
    """run.yaml's budgets; with an accuracy target, the fractions 0, resolution, ..., 1 of the resource it
    minimizes instead (the chain `solver.target` searches)."""
    target = cfg["targets"]
    if target["max_drop"] is None:
        return cfg["budgets"]
    steps = round(1 / target["resolution"])
    return {target["minimize"]: sorted({min(1.0, round(k * target["resolution"], 12)) for k in range(steps + 1)}
                                       | {1.0})}


def evidence(run: Run) -> pd.DataFrame:
    from hawq_ray.analysis.evidence import omega_kl_correlation, standing
    from hawq_ray.service.evidence import evidence_table
    from hawq_ray.service.sweep import budget_points
    table = run.tables["table"]
    with _bar("evidence", "config") as bar:
        def progress(done, total):
            bar.total, bar.n = total, done
            bar.refresh()

        rows = evidence_table(run.model, run.shape, run.data, table, budget_points(table, run.cfg["budgets"]),
                              randoms=run.cfg["evidence"]["randoms"], seed=run.cfg["seed"], progress=progress)
    rho, n = omega_kl_correlation(rows)
    s = standing(rows)
    said = [f"Spearman(predicted Omega, measured KL) {rho:.2f} over {n} configs" if n >= 3 else
            f"{n} distinct config(s), too few for a correlation"]
    if s["randoms"].sum():
        said.append(f"the ILP's config has a lower KL than {s['beats_random_fraction'].mean():.0%} of the random "
                    "ones on average")
    reversed_ = s["beats_reversed"].dropna()
    if len(reversed_):
        said.append(f"and than the reversed one at {int(reversed_.sum())} of {len(reversed_)} budgets")
    run.log("[evidence] " + "; ".join(said))
    return rows


def fine_tune(run: Run) -> pd.DataFrame:
    """Every config of the sweep fine-tuned; with an accuracy target, only the ones its search visits."""
    if run.cfg["targets"]["max_drop"] is not None:
        return target_search(run)
    return _tune(run, run.tables["sweep"])


def _tune(run: Run, configs: pd.DataFrame) -> pd.DataFrame:
    from hawq_ray.quant.finetune import Recipe
    from hawq_ray.service.tune import DataSource, Student, TuneSettings, tune_finetune
    tune = run.cfg["tune"]
    recipe = Recipe(epochs=tune["epochs"], lr=tune["lr"], distill=tune["distill"], batch_size=tune["batch_size"])
    student = Student(run.model_name, dict(run.model.state_dict()), tuple(run.shape),
                      run.tables["table"])
    return tune_finetune(configs, student, run.data, DataSource(run.data_spec, run.cfg["seed"]),
                         out=run.run_dir, recipe=recipe, settings=TuneSettings(samples=tune["samples"], asha=tune["asha"]),
                         teacher_spec=tune["teacher"])


def target_search(run: Run) -> pd.DataFrame:
    """The cheapest config within `max_drop` points of fp32 (`solver.target`): the sweep's configs ordered by
    the minimized resource, fine-tuned in rounds of `width` Tune trials that bisect the chain. The rows of every
    round, with `target` = answer / below (the failing config just cheaper) / passed / failed."""
    from hawq_ray.contract.cost import config_costs
    from solver.ilp import BUDGET_KEYS
    from solver.target import answer, next_round, passes
    target, sweep_ = run.cfg["targets"], run.tables["sweep"]
    resource = BUDGET_KEYS[target["minimize"]][0]
    cost = [config_costs(run.tables["table"], bits)[resource] for bits in sweep_["bits"]]
    if any(c != c for c in cost):
        raise HawqError(f"targets.minimize {target['minimize']}: the layer table has no {resource} for every "
                        "layer (latency needs the profile stage's measurements)")
    chain = [sweep_["config"].iloc[i] for i in sorted(range(len(cost)), key=lambda i: cost[i])]
    rows, results, floor = [], {}, float("nan")
    while batch := next_round(chain, results, floor, target["width"]):
        run.log(f"[target] round {len(rows) + 1}: fine-tuning {', '.join(map(str, batch))} "
                f"({len(results) + len(batch)} of {len(chain)} configs in the chain)")
        done = _tune(run, sweep_[sweep_["config"].isin(batch)])
        rows.append(done)
        floor = float(done["top1_fp32"].iloc[0]) - target["max_drop"] / 100     # top-1 is a fraction, the drop points
        for config, part in done.groupby("config"):
            results[config] = float(part[["top1_best", "top1"]].max(axis=1).max())
    found = answer(chain, results, floor)
    result = pd.concat(rows, ignore_index=True)
    result["target"] = [("answer" if c == found.answer else "below" if c == found.below else
                         "passed" if passes(results[c], floor) else "failed") for c in result["config"]]
    run.log(_target_line(found, results, floor, target, len(chain)))
    return result


def _target_line(found, results: dict, floor: float, target: dict, chain: int) -> str:
    head = (f"[target] max_drop {target['max_drop']:g} points (top-1 >= {100 * floor:.2f}%), minimize "
            f"{target['minimize']}: {found.tested} of {chain} configs fine-tuned")
    if found.answer is None:
        return (f"{head}; no config meets the target, not even the richest; the closest is {found.closest} "
                f"(top-1 {100 * results.get(found.closest, float('nan')):.2f}%)")
    below = (f", the next cheaper tested {found.below} ({100 * results[found.below]:.2f}%) misses it"
             if found.below is not None else "")
    return f"{head}; the answer is {found.answer} (top-1 {100 * results[found.answer]:.2f}%){below}"


def failed_trials(finetuned: pd.DataFrame) -> str:
    """'N of M fine-tuning trials failed', or '' when none did."""
    n = int((finetuned["error"] != "").sum())
    return f"{n} of {len(finetuned)} fine-tuning trials failed" if n else ""


def restore_qat(run: Run, row) -> torch.nn.Module:
    """The fine-tuned QAT model of a finetune row, its checkpoint read inside the run folder."""
    from hawq_ray.quant.finetune import load_checkpoint
    from hawq_ray.quant.qat import prepare
    from hawq_ray.service.outputs import inside
    from hawq_ray.service.trial_record import CHECKPOINT_FILE
    qm = prepare(run.model, row["bits"], run.shape, run.tables["layers"])
    qm.load_state_dict(load_checkpoint(inside(run.run_dir, checkpoint_of(row)) / CHECKPOINT_FILE)["model"])
    return qm.eval()


def checkpoint_of(row) -> str:
    """The checkpoint folder a finetune row deploys (relative to the run folder): its best epoch's, where kept."""
    return row.get("best_checkpoint") or row["checkpoint"]


def programs(run: Run) -> pd.DataFrame:
    """Each finished config's IntegerProgram, lowered once from its checkpoint and saved (JSON + npz, no pickle)
    in `programs/<config>/`: what deploy, export and fake_vs_int read."""
    rows = []
    for _, row in run.finished.iterrows():
        program = restore_qat(run, row).to_integer()
        folder = run_folder(run, "programs", row["config"])
        if folder.exists():
            shutil.rmtree(folder)
        program.save(folder)
        rows.append({"config": row["config"], "program": folder.relative_to(run.run_dir).as_posix(),
                     "program_sha256": program.fingerprint(), "checkpoint": checkpoint_of(row)})
    return pd.DataFrame(rows, columns=["config", "program", "program_sha256", "checkpoint"])


def program_of(run: Run, row):
    """The saved program of a `programs` row, refused when it is not the one that stage recorded."""
    from hawq_ray.program.program import IntegerProgram
    from hawq_ray.service.outputs import inside
    path = inside(run.run_dir, row["program"])
    try:
        program = IntegerProgram.load(path)
    except ValueError as e:
        raise HawqError(f"{path}: {str(e)[:200]}; delete programs.parquet to lower it again") from None
    if program.fingerprint() != row["program_sha256"]:
        raise HawqError(f"{path}: not the program the programs stage saved (its SHA-256 differs); delete "
                        f"programs.parquet to lower it again")
    return program


def run_folder(run: Run, kind: str, config) -> Path:
    """`<kind>/<config>` inside the run folder, for a config name that is a plain name."""
    from hawq_ray.service.outputs import inside
    name = str(config)
    if not name or name in (".", "..") or any(not (c.isalnum() or c in "_.-") for c in name):
        raise HawqError(f"config {name[:80]!r}: not a plain name; valid: letters, digits, '_', '.', '-'")
    return inside(run.run_dir, f"{kind}/{name}")


def deploy(run: Run) -> pd.DataFrame:
    """Compile and check each config (kept one by one, so a stopped run resumes), then time the saved modules
    together in interleaved rounds (analysis.timing) and set each beside its predicted latency and budget."""
    from hawq_ray.analysis.timing import against_budget, time_models
    from hawq_ray.deploy.build import load_model
    settings = run.cfg["deploy"]
    rows = [compile_config(run, row, settings) for _, row in run.tables["programs"].iterrows()]
    run.log(f"[deploy] timing {len(rows)} module(s) together: {settings['rounds']} interleaved rounds")
    modules = {r["config"]: load_model(run_folder(run, "deploy", r["config"])) for r in rows}
    timed = against_budget(time_models(modules, rounds=settings["rounds"]), *_latency_budgets(run))
    for r in timed.itertuples():
        run.log(f"[deploy] {r.config}: median {r.latency_median_ms:.3f} ms at batch {settings['batch']} (interquartile "
                f"{r.latency_q25_ms:.3f}-{r.latency_q75_ms:.3f}, {r.latency_samples} rounds), predicted "
                f"{r.predicted_ms:.3f} ms" + (f", OVER its budget of {r.latency_limit_ms:.3f} ms" if r.over_budget
                                               else ""))
    return pd.DataFrame(rows).merge(timed, on="config")


RECORD_COLUMNS = ("config", "tvm_differing", "tvm_elements", "compile_s")   # of a module record, in the table


def compile_config(run: Run, row, settings: dict) -> dict:
    """The deploy row of one config: its module compiled from the config's saved program and checked against the
    integer executor, or the one an earlier run compiled and checked from the same program, target and batch
    (`service.module_record`)."""
    from hawq_ray.analysis.verify import compare_batches, executor_of, random_inputs
    from hawq_ray.deploy.build import compile_program, export_model, load_model
    from hawq_ray.service.module_record import reusable_record, write_record
    config = str(row["config"])
    folder = run_folder(run, "deploy", config)
    program = program_of(run, row)
    built_from = {"config": config, "program_sha256": program.fingerprint(), "target": settings["target"],
                  "batch": settings["batch"], "inputs": settings["inputs"]}
    saved, why = reusable_record(folder, built_from)
    if saved is None:
        if why:
            run.log(f"[deploy] {config}: {why}: compiling it again")
        if folder.exists():
            shutil.rmtree(folder)
        t0 = time.time()
        deployed = compile_program(program, batch=settings["batch"], target=settings["target"])
        compile_s = time.time() - t0
        export_model(deployed, folder)
        # the saved files are what is checked (and loading them is quicker than the in-memory executable's JIT)
        check = compare_batches(load_model(folder, program=program), executor_of(program),
                                random_inputs((settings["batch"], *run.shape), batches=settings["inputs"], seed=0))
        run.log(f"[deploy] {config}: {check.differing}/{check.elements} differing elements vs the integer "
                f"executor, compiled in {compile_s:.1f} s")
        saved = {**built_from, "tvm_differing": check.differing, "tvm_elements": check.elements,
                 "compile_s": round(compile_s, 2)}
        write_record(folder, saved)
    return {**{k: saved[k] for k in RECORD_COLUMNS}, "module": folder.relative_to(run.run_dir).as_posix()}


def _latency_budgets(run: Run) -> tuple[dict, dict]:
    """({config: latency the ILP predicted}, {config: its latency budget}), whole model in ms; empty when the
    profiled kernels are not the deployed ones (another batch or target), whose latencies they do not predict."""
    profile, settings, finished, swept = run.cfg["profile"], run.cfg["deploy"], run.finished, run.tables["sweep"]
    if (profile["batch"], profile["target"]) != (settings["batch"], settings["target"]) or "latency_ms" not in finished:
        return {}, {}
    limits = dict(zip(swept["config"], swept["latency_limit_ms"])) if "latency_limit_ms" in swept else {}
    return dict(zip(finished["config"], finished["latency_ms"])), limits


def export(run: Run) -> pd.DataFrame:
    """Each config's program as an ONNX QDQ model, run in onnxruntime against the integer executor on the
    held-out split."""
    from hawq_ray.onnx.export import check_onnx, export_onnx
    from hawq_ray.inputs.data import batches
    settings = run.cfg["export"]
    held_out = [b[0] for b in batches(run.data.test, 64, settings["batches"])]
    (run.run_dir / "export").mkdir(exist_ok=True)
    rows = []
    for _, row in run.tables["programs"].iterrows():
        path = run_folder(run, "export", f"{row['config']}.onnx")
        program = program_of(run, row)
        export_onnx(program, path, {"config": str(row["config"]),
                                    "scales": f"fine-tuned QAT checkpoint {row['checkpoint']}"}, form=settings["form"])
        check = check_onnx(path, program, held_out)
        run.log(f"[export] {row['config']}: {path}, top-1 agreement with the integer executor "
                f"{check['top1_agreement']:.4f} on {check['samples']} held-out images, largest logit difference "
                f"{check['max_logit_diff_units']:g} output-scale units")
        rows.append({"config": row["config"], "onnx": path.relative_to(run.run_dir).as_posix(), **check})
    return pd.DataFrame(rows)


def fake_vs_int(run: Run) -> pd.DataFrame:
    """Figure G.1 of each config, and its saved program against the QAT simulation, element by element."""
    from hawq_ray.analysis.verify import check_simulation
    from hawq_ray.inputs.data import batches
    size = min(64, run.cfg["tune"]["batch_size"])      # QAT's memory: tune.batch_size bounds it (a 224x224 ViT)
    x = torch.cat([b[0] for b in batches(run.data.test, size, 2)])
    finished = run.finished.set_index("config")
    frames = []
    for _, row in run.tables["programs"].iterrows():
        summary, per_layer = check_simulation(restore_qat(run, finished.loc[row["config"]]), x, program_of(run, row))
        per_layer.insert(0, "config", row["config"])
        per_layer["qat_vs_int_output_diff"] = summary["differing"]
        frames.append(per_layer)
    return pd.concat(frames, ignore_index=True)


def _bar(desc: str, unit: str, total=None):
    from tqdm import tqdm
    return tqdm(desc=desc, unit=unit, total=total, file=sys.stderr, leave=False)


# ------------------------------------------------------------------------------------------------ the declarations
def _has_trained(run: Run) -> bool:
    return len(run.finished) > 0


def _target_of(run: Run) -> tuple:
    """The accuracy target, where one is set (a run without one keeps the fingerprint it always had)."""
    return () if run.cfg["targets"]["max_drop"] is None else (run.cfg["targets"],)


STAGES = (
    Stage("layers", lambda run: (), layers),
    Stage("sensitivity", lambda run: (run.cfg["sensitivity"],), sensitivity),
    Stage("latency", lambda run: (run.cfg["profile"],), latency),
    Stage("table", lambda run: (run.digest_of("sensitivity", "latency"),), merged_table, report=report.layer_section),
    Stage("sweep", lambda run: (run.digest_of("table"), budgets_of(run.cfg), run.cfg["uniform"], run.cfg["sweep"]),
          sweep, report=report.confidence_section),
    Stage("evidence", lambda run: (run.digest_of("table"), run.cfg["budgets"], run.cfg["evidence"]), evidence,
          runs=lambda run: run.cfg["evidence"]["enabled"], report=report.evidence_section),
    Stage("finetune", lambda run: (run.digest_of("sweep", "table"), run.cfg["tune"], *_target_of(run)), fine_tune,
          unfinished=failed_trials, report=report.finetune_section),
    Stage("programs", lambda run: (digest(run.finished.to_json()),), programs, runs=_has_trained),
    Stage("deploy", lambda run: (run.digest_of("programs"), run.cfg["deploy"], run.cfg["profile"]), deploy,
          runs=_has_trained),
    Stage("export", lambda run: (run.digest_of("programs"), run.cfg["export"]), export,
          runs=lambda run: run.cfg["export"]["onnx"] and _has_trained(run), report=report.export_section),
    Stage("fake_vs_int", lambda run: (run.digest_of("programs"),), fake_vs_int, runs=_has_trained,
          report=report.fake_vs_int_section),
)


def report_sections() -> list:
    """[(table name, section writer)] of the stages that have a report section, in stage order."""
    return [(s.name, s.report) for s in STAGES if s.report]
