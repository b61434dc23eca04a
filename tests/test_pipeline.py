"""The main job end to end on the default model: stages, tables, resume after a kill, the report."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pandas as pd
import pytest
import yaml

from hawq_ray.contract import HawqError
from hawq_ray.service.pipeline import load_config
from hawq_ray.service.stages import STAGES

TINY = Path(__file__).parent / "data" / "tiny_run.yaml"
TABLES = ("layers", "sensitivity", "latency", "sweep", "evidence", "finetune", "deploy", "export", "fake_vs_int")


def hawq(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "hawq_ray.service.cli", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, start_new_session=True, **kw)


@pytest.fixture(scope="module")
def killed_then_resumed(tmp_path_factory):
    """Run the tiny job, SIGKILL it (and its Ray) right after the sweep stage, then run it again."""
    out = tmp_path_factory.mktemp("run")
    proc = hawq("run", "--config", str(TINY), "--out", str(out))
    seen = []
    deadline = time.time() + 900
    for line in proc.stderr:
        seen.append(line)
        if "[sweep] done" in line or time.time() > deadline:
            break
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any("[sweep] done" in s for s in seen), "".join(seen[-20:])
    before = {n: (out / f"{n}.parquet").stat().st_mtime_ns for n in ("layers", "sensitivity", "latency", "sweep")}
    snapshot = {n: pd.read_parquet(out / f"{n}.parquet") for n in ("layers", "sensitivity", "latency", "sweep")}
    stages_before = json.loads((out / "stages.json").read_text())
    proc = hawq("run", "--config", str(TINY), "--out", str(out), "--json")
    stdout, stderr = proc.communicate(timeout=1200)
    return out, proc.returncode, stdout, stderr, before, snapshot, stages_before


def test_resumed_run_recomputes_nothing_it_had(killed_then_resumed):
    out, rc, stdout, stderr, before, snapshot, stages_before = killed_then_resumed
    assert rc == 0, stderr[-3000:]
    for name in before:
        assert f"[{name}] up to date" in stderr
        assert (out / f"{name}.parquet").stat().st_mtime_ns == before[name]
        pd.testing.assert_frame_equal(pd.read_parquet(out / f"{name}.parquet"), snapshot[name])
    stages = json.loads((out / "stages.json").read_text())
    for name in before:
        assert stages[name] == stages_before[name]
    assert "[fp32] reused" in stderr
    assert set(TABLES) <= set(stages)


def test_tables_of_the_run(killed_then_resumed):
    out, rc, stdout, *_ = killed_then_resumed
    sens = pd.read_parquet(out / "sensitivity.parquet")
    assert {"trace", "trace_stderr", "delta4", "delta8", "omega4", "omega8"} <= set(sens.columns)
    lat = pd.read_parquet(out / "latency.parquet")
    assert (lat["lat4_ms"] > 0).all() and (lat["lat8_ms"] > 0).all()
    sweep = pd.read_parquet(out / "sweep.parquet")
    assert "uniform4" in set(sweep["config"]) and len(sweep) >= 1
    chosen = sweep[sweep["budget"] != ""]                       # configs a budget chose: re-solved for 200 draws
    assert chosen["confidence"].between(0, 1).all() and len(chosen) >= 1
    assert all(set(json.loads(f)) <= set(sens["layer"]) for f in chosen["flips"])
    ft = pd.read_parquet(out / "finetune.parquet")
    assert set(ft["config"]) == set(sweep["config"])
    assert ft["top1_fp32"].min() >= 0.9            # the default model trained on digits
    dep = pd.read_parquet(out / "deploy.parquet")
    assert (dep["tvm_differing"] == 0).all() and (dep["tvm_elements"] > 0).all()
    check_deployed_latencies(dep, lat, sweep, pd.read_parquet(out / "layers.parquet"))
    exported = pd.read_parquet(out / "export.parquet")          # export: {onnx: true} in the tiny run
    assert set(exported["config"]) == set(ft["config"]) and (exported["samples"] == 128).all()
    assert (exported["top1_agreement"] >= 0.95).all()
    for path in exported["onnx"]:
        onnx.checker.check_model(str(out / path), full_check=True)         # paths relative to the run folder
    fvi = pd.read_parquet(out / "fake_vs_int.parquet")
    assert (fvi["qat_vs_int_diff"] == 0).all()
    evidence = pd.read_parquet(out / "evidence.parquet")        # evidence: {randoms: 3} in the tiny run
    assert evidence["kind"].value_counts()[["ilp", "reversed"]].tolist() == [1, 1]
    assert (evidence["kind"] == "random").sum() <= 3 and (evidence["kl"] >= 0).all()
    ilp = evidence[evidence["kind"] == "ilp"].iloc[0]
    chosen = sweep[sweep["budget"].str.contains('"latency": 0.5')].iloc[0]    # the sweep's answer, the same ILP
    assert json.loads(ilp["bits"]) == {k: v for k, v in chosen["bits"].items() if v is not None}
    obj = json.loads(stdout.strip().splitlines()[-1])
    assert obj["report"].endswith("report.md") and len(obj["results"]) == len(ft)


def check_deployed_latencies(dep, lat, sweep, layers):
    """All configs timed together (5 rounds in the tiny run); the predicted latency is the sum of each layer's
    measured kernel latency at its bits, the budget R4 + r (R8 - R4) over the searchable layers (r = 0.5) plus
    the fixed layers at their bits (HAWQ-V3's latency constraint, whole model)."""
    assert (dep["latency_samples"] == 5).all() and (dep["latency_q25_ms"] > 0).all()
    assert ((dep["latency_q25_ms"] <= dep["latency_median_ms"]) & (dep["latency_median_ms"] <= dep["latency_q75_ms"])).all()
    lat = lat.set_index("layer")
    fixed = layers.set_index("layer")["fixed_bits"]
    searchable = fixed.isna()
    low, high = lat.loc[searchable, "lat4_ms"].sum(), lat.loc[searchable, "lat8_ms"].sum()
    fixed_ms = sum(lat.loc[name, f"lat{int(b)}_ms"] for name, b in fixed.dropna().items())
    dep = dep.set_index("config")
    for row in sweep.itertuples():
        bits = {k: v for k, v in row.bits.items() if v is not None}
        assert dep.loc[row.config, "predicted_ms"] == pytest.approx(sum(lat.loc[k, f"lat{b}_ms"] for k, b in bits.items()))
        if '"latency": 0.5' in row.budget:
            assert dep.loc[row.config, "latency_limit_ms"] == pytest.approx(low + 0.5 * (high - low) + fixed_ms)
        else:
            assert np.isnan(dep.loc[row.config, "latency_limit_ms"])
    assert any('"latency": 0.5' in b for b in sweep["budget"])
    assert (dep["over_budget"] == (dep["latency_q25_ms"] > dep["latency_limit_ms"])).all()


def test_report_has_its_plots(killed_then_resumed):
    out = killed_then_resumed[0]
    text = (out / "report.md").read_text()
    assert "## ONNX export (QDQ)" in text
    assert "| predicted_ms | measured_ms (IQR) | budget_ms | over_budget |" in text
    assert "## Evidence: the ILP's configs against random and reversed ones" in text
    for png in ("pareto.png", "evidence.png", "bits_vs_sensitivity.png", "fake_vs_int.png"):
        assert f"plots/{png}" in text
        data = (out / "plots" / png).read_bytes()
        assert data[:4] == b"\x89PNG" and len(data) > 5000


def test_reported_evidence_is_recomputed_from_the_stored_rows(killed_then_resumed):
    """The report's Spearman figure and each budget's rank, recomputed by scipy / numpy from evidence.parquet."""
    import re
    from scipy.stats import spearmanr
    out = killed_then_resumed[0]
    text = (out / "report.md").read_text()
    rows = pd.read_parquet(out / "evidence.parquet")
    distinct = rows.drop_duplicates("config")
    rho, n = re.search(r"measured KL: \*\*(\S+)\*\* over (\d+) distinct configs", text).groups()
    assert int(n) == len(distinct)
    expected = spearmanr(distinct["predicted_omega"], distinct["kl"]).statistic if len(distinct) > 1 else np.nan
    assert (rho == "nan" and np.isnan(expected)) or float(rho) == pytest.approx(expected, abs=0.005)
    table = text[text.index("| budget | ilp_config |"):].split("\n\n")[0].splitlines()[2:]
    assert len(table) == rows["budget"].nunique()
    for line in table:
        budget, config, _, randoms, _, rank = [c.strip() for c in line.strip("|").split("|")][:6]
        group = rows[rows["budget"] == budget]
        ilp_kl = group.loc[group["kind"] == "ilp", "kl"].iloc[0]
        assert group.loc[group["kind"] == "ilp", "config"].iloc[0] == config
        kl = group.loc[group["kind"] == "random", "kl"].to_numpy()
        assert int(randoms) == len(kl) and int(rank) == 1 + int(np.sum(kl < ilp_kl))


def test_bad_run_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("budgets: {flops: [0.5]}\n")
    with pytest.raises(HawqError, match="flops"):
        load_config(bad)
    bad.write_text("tune: {epoch: 3}\n")
    with pytest.raises(HawqError, match="epoch"):
        load_config(bad)
    with pytest.raises(HawqError, match="no such file"):
        load_config(tmp_path / "missing.yaml")
    assert STAGES[0].name == "layers" and load_config(TINY)["tune"]["epochs"] == 1
    for bad_export, key in (("export: {onnx: 1}", "export.onnx"), ("export: {form: int16}", "export.form"),
                            ("export: {batches: 0}", "export.batches")):
        bad.write_text(bad_export + "\n")
        with pytest.raises(HawqError, match=key):
            load_config(bad)


def test_input_size_overrides_the_model_size(tmp_path):
    from hawq_ray.service.pipeline import _input_shape
    cfg = load_config(None, {"model": "torchvision:mobilenet_v2", "input_size": 96})
    assert _input_shape(cfg) == (3, 96, 96)
    assert _input_shape(load_config(None, {"model": "torchvision:mobilenet_v2", "input_size": [64, 80]})) == (3, 64, 80)
    assert _input_shape(load_config(None, {"model": "torchvision:mobilenet_v2"})) == (3, 224, 224)
    for bad in ("big", 4, [32, 32, 3], 1.5, True):
        with pytest.raises(HawqError, match="input_size") as err:
            load_config(None, {"input_size": bad})
        assert "\n" not in str(err.value)


EVIL_C = '__attribute__((constructor)) static void run_on_load(void) { fclose(fopen("%s", "w")); }\n'


class RunsCode:
    """Unpickling this runs a command that creates `marker`."""
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_tampered_run_folder_runs_no_code_and_damage_is_recomputed(killed_then_resumed, tmp_path):
    """The run folder rewritten as an attacker (or a bad disk) would: a truncated stage table, a compiled module
    replaced by a library whose constructor runs (its manifest hash updated to match), Tune's tuner.pkl replaced
    by a pickle that runs a command. A rerun recomputes the damaged table, rebuilds the unsigned module, resumes
    fine-tuning without unpickling anything, and no marker file appears."""
    import pickle
    out = killed_then_resumed[0]
    marker_so, marker_pkl = tmp_path / "so-ran", tmp_path / "pickle-ran"
    kept = {n: pd.read_parquet(out / f"{n}.parquet") for n in ("layers", "latency")}
    with open(out / "sensitivity.parquet", "r+b") as f:
        f.truncate(1000)
    module = sorted((out / "deploy").iterdir())[0]
    (tmp_path / "evil.c").write_text("#include <stdio.h>\n" + EVIL_C % marker_so)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(module / "model.so"), str(tmp_path / "evil.c")], check=True)
    manifest = json.loads((module / "manifest.json").read_text())
    manifest["library_sha256"] = __import__("hashlib").sha256((module / "model.so").read_bytes()).hexdigest()
    (module / "manifest.json").write_text(json.dumps(manifest))
    # another config's signed record pointed at a folder holding that library with a manifest that matches it
    foreign, other = tmp_path / "foreign", sorted((out / "deploy").iterdir())[-1]
    shutil.copytree(module, foreign)
    record = json.loads((other / "deploy.json").read_text())
    (other / "deploy.json").write_text(json.dumps({**record, "module": str(foreign)}))
    pickles = list(out.glob("tune/finetune-*/ray/tuner.pkl"))
    assert pickles
    for p in pickles:
        p.write_bytes(pickle.dumps(RunsCode(marker_pkl)))
    for finished in out.glob("tune/finetune-*/finetune.parquet"):
        finished.unlink()                                   # so fine-tuning runs Tune again over the records
    checkpoints = {p: p.stat().st_mtime_ns for p in out.glob("tune/finetune-*/*/epoch_*/state.pt")}
    assert checkpoints
    stages = json.loads((out / "stages.json").read_text())
    for name in ("finetune", "deploy"):
        del stages[name]
    (out / "stages.json").write_text(json.dumps(stages))

    proc = hawq("run", "--config", str(TINY), "--out", str(out))
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    assert not marker_so.exists() and not marker_pkl.exists()
    assert "[sensitivity] sensitivity.parquet is damaged" in stderr and "recomputing" in stderr
    assert f"[deploy] {module.name}: the saved module is not signed" in stderr
    assert f"[deploy] {other.name}: the saved module is not signed" in stderr
    assert list(pd.read_parquet(out / "deploy.parquet")["module"]) == [f"deploy/{c}" for c in
                                                                      pd.read_parquet(out / "deploy.parquet")["config"]]
    for name, table in kept.items():
        assert f"[{name}] up to date" in stderr
        pd.testing.assert_frame_equal(pd.read_parquet(out / f"{name}.parquet"), table)
    assert (pd.read_parquet(out / "deploy.parquet")["tvm_differing"] == 0).all()
    ft = pd.read_parquet(out / "finetune.parquet")
    assert (ft["error"] == "").all() and (ft["epochs"] == 1).all()      # reported from the records, not retrained
    assert {p: p.stat().st_mtime_ns for p in out.glob("tune/finetune-*/*/epoch_*/state.pt")} == checkpoints


def tiny_retuned(tmp_path) -> Path:
    """The tiny run with fine-tuning changed: 2 epochs at another learning rate, so that every config's
    fine-tuned program changes (with only more epochs, a config whose best epoch is the first keeps its program,
    and its module is rightly reused)."""
    config = tmp_path / "tiny_retuned.yaml"
    config.write_text(TINY.read_text().replace("tune: {epochs: 1}", "tune: {epochs: 2, lr: 0.02}"))
    return config


def deployed_against_its_program(out: Path, row) -> int:
    """Differing output elements between a config's module in the run folder and the integer executor running
    the program restored here, from the fp32 weights and the row's checkpoint, on inputs the run never drew."""
    from hawq_ray.analysis.verify import compare_batches, executor_of, random_inputs
    from hawq_ray.deploy.build import load_model
    from hawq_ray.inputs.models import DEFAULT_MODEL, get_model, input_shape, load_weights
    from hawq_ray.quant.finetune import FP32_WEIGHTS_FILE, load_checkpoint
    from hawq_ray.quant.qat import prepare
    model = load_weights(get_model(DEFAULT_MODEL), out / FP32_WEIGHTS_FILE.format(name=DEFAULT_MODEL)).eval()
    shape = tuple(input_shape(DEFAULT_MODEL))
    qm = prepare(model, row["bits"], shape, pd.read_parquet(out / "layers.parquet"))
    ckpt = row["best_checkpoint"] or row["checkpoint"]
    qm.load_state_dict(load_checkpoint(out / ckpt / "state.pt")["model"])
    program = qm.eval().to_integer()
    module = load_model(out / "deploy" / row["config"], program=program)     # refused if built from another
    return compare_batches(module, executor_of(program), random_inputs((2, *shape), batches=1, seed=7)).differing


def test_changed_fine_tuning_rebuilds_every_module(killed_then_resumed, tmp_path):
    """tune.epochs 1 -> 2 (and another learning rate) on the same folder, resumed from its parent folder with a relative --out: fine-tuning
    runs again, every module built from the old programs is compiled again (not reused because its signature
    holds), and each module matches the program of its new checkpoint."""
    out = killed_then_resumed[0]
    proc = hawq("run", "--config", str(tiny_retuned(tmp_path)), "--out", out.name, cwd=out.parent)
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    ft = pd.read_parquet(out / "finetune.parquet")
    assert "[finetune] running" in stderr and (ft["epochs"] == 2).all() and (ft["error"] == "").all()
    for config in ft["config"]:
        assert f"[deploy] {config}: the saved module was built from another program" in stderr
    assert (pd.read_parquet(out / "deploy.parquet")["tvm_differing"] == 0).all()
    for _, row in ft.iterrows():
        assert deployed_against_its_program(out, row) == 0


def test_a_failed_trial_fails_the_run_and_the_next_run_retries_it(killed_then_resumed, tmp_path):
    """A trial whose last checkpoint cannot be read (it resumes from it): the run finishes the other stages,
    says "1 of N fine-tuning trials failed" in one line and exits 2, the report lists the trial with its reason
    (no terminal codes), and the next run retries it (from the start: the unreadable epoch is set aside)."""
    out = killed_then_resumed[0]
    config = tiny_retuned(tmp_path)
    experiment = max(out.glob("tune/finetune-*"), key=lambda p: p.stat().st_mtime)
    trial = sorted(p for p in experiment.iterdir() if (p / "progress.json").is_file())[0]
    progress = json.loads((trial / "progress.json").read_text())
    (trial / "progress.json").write_text(json.dumps(progress[:1]))       # stopped after its first epoch ...
    shutil.rmtree(trial / "epoch_0002")
    (trial / "epoch_0001" / "state.pt").write_bytes(b"not a checkpoint")  # ... whose checkpoint is damaged
    (experiment / "finetune.parquet").unlink()
    stages = json.loads((out / "stages.json").read_text())
    del stages["finetune"]
    (out / "stages.json").write_text(json.dumps(stages))

    proc = hawq("run", "--config", str(config), "--out", str(out))
    _, stderr = proc.communicate(timeout=900)
    ft = pd.read_parquet(out / "finetune.parquet")
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, stderr[-3000:]
    assert f"1 of {len(ft)} fine-tuning trials failed (first: {trial.name}: " in lines[-1]
    failed = ft[ft["error"] != ""]
    assert list(failed["trial"]) == [trial.name] and "cannot load checkpoint" in failed["error"].iloc[0]
    assert not ft["error"].str.contains("\x1b").any() and not ft["error"].str.contains("\n").any()
    assert f"## Failed trials: 1 of {len(ft)}" in (out / "report.md").read_text()
    assert json.loads((out / "stages.json").read_text())["finetune"]["key"] is None
    assert (trial / ".epoch_0001.unreadable").is_dir()

    proc = hawq("run", "--config", str(config), "--out", str(out))
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    ft = pd.read_parquet(out / "finetune.parquet")
    assert "[finetune] running" in stderr and (ft["error"] == "").all() and (ft["epochs"] == 2).all()
    assert [r["start_epoch"] for r in json.loads((trial / "progress.json").read_text())] == [0, 0]
    assert "Failed trials" not in (out / "report.md").read_text()
    for _, row in ft.iterrows():
        assert deployed_against_its_program(out, row) == 0


def test_accuracy_target_fine_tunes_part_of_the_chain_and_names_the_answer(killed_then_resumed, tmp_path):
    """targets.max_drop on a copy of the tiny run: the sweep becomes the size fractions 0, 0.25, ..., 1, and
    fine-tuning bisects their chain instead of training every config. With a drop of 100 points every config
    passes, so the answer must be the cheapest config of the chain, found without fine-tuning all of them."""
    out = tmp_path / "target_run"
    shutil.copytree(killed_then_resumed[0], out, ignore=shutil.ignore_patterns(".lock"))
    config = tmp_path / "target.yaml"
    settings = yaml.safe_load(TINY.read_text())
    settings.update(targets={"max_drop": 100, "minimize": "size", "resolution": 0.25, "width": 2},
                    export={"onnx": False}, evidence={"enabled": False})      # neither is what this checks
    config.write_text(yaml.safe_dump(settings))
    proc = hawq("run", "--config", str(config), "--out", str(out))
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    sweep = pd.read_parquet(out / "sweep.parquet")
    ft = pd.read_parquet(out / "finetune.parquet")
    from hawq_ray.contract.cost import config_costs
    layers = pd.read_parquet(out / "layers.parquet")
    size = {c: config_costs(layers, bits)["size_mib"] for c, bits in zip(sweep["config"], sweep["bits"])}
    cheapest = min(size.values())
    answer = ft.loc[ft["target"] == "answer", "config"].unique()
    assert len(answer) == 1 and size[answer[0]] == cheapest
    assert ft["config"].nunique() < len(sweep) >= 4, (ft["config"].tolist(), len(sweep))
    assert "[target] max_drop 100 points" in stderr and f"the answer is {answer[0]}" in stderr
    assert "## Accuracy target" in (out / "report.md").read_text()
    # bad targets: one line, exit 2, before any work
    for flags, key in ((["--max-drop", "-1"], "--max-drop"), (["--max-drop", "x"], "--max-drop"),
                       (["--minimize", "speed"], "--minimize")):
        proc = hawq("run", "--out", str(tmp_path / "never"), *flags)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 2 and key in stderr and not (tmp_path / "never").exists(), stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("targets: {max_drop: many}\n")
    with pytest.raises(HawqError, match=r"targets.max_drop: 'many' is not valid; valid: a number >= 0 and <= 100 or null"):
        load_config(bad)
