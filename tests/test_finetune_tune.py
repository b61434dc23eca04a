"""hawq-ray finetune on Ray Tune: the result table against hand recomputation from the checkpoints, ASHA with
sampled learning rates, the CLI, and an interrupted run that resumes from its checkpoints."""
from hawq_ray.service.session import start_local
import argparse
import glob
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch

from hawq_ray.service.cli import finetune as finetune_cli
from child_processes import as_from_a_terminal
from hawq_ray.inputs.data import load_data
from hawq_ray.contract import HawqError
from hawq_ray.quant.finetune import fp32_weights, load_checkpoint
from hawq_ray.quant.finetune import Recipe
from hawq_ray.service.trial_record import CHECKPOINT_FILE
from hawq_ray.service.tune import COLUMNS, TuneSettings, finetune_run
from hawq_ray.quant.layers import layer_table
from hawq_ray.inputs.models import get_model, input_shape
from hawq_ray.program.executor import run_program
from hawq_ray.quant.qat import prepare

SHAPE = input_shape()
LIMIT = 256      # training samples per epoch in these tests


@pytest.fixture(scope="module", autouse=True)
def ray_instance():
    start_local(num_cpus=2)   # a fresh local Ray, started again if the raylet misses its 30 s
    yield
    ray.shutdown()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def data():
    return load_data("digits", input_shape=SHAPE)


@pytest.fixture(scope="module")
def weights(tmp_path_factory, data):
    """fp32 weights of the default model, trained briefly (accuracy is not what these tests check)."""
    _, path, _ = fp32_weights(tmp_path_factory.mktemp("fp32"), data, epochs=3)
    return path


@pytest.fixture(scope="module")
def mixed_json(tmp_path_factory, weights):
    table = layer_table(get_model(weights=weights), SHAPE)
    searchable = table[table["fixed_bits"].isna()]
    bits = {layer: 8 if g or i == 0 else 4 for i, (layer, g) in enumerate(zip(searchable["layer"], searchable["group"]))}
    path = tmp_path_factory.mktemp("cfg") / "mixed.json"
    path.write_text(json.dumps(bits))
    return path


def cli(argv):
    parser = argparse.ArgumentParser()
    finetune_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["finetune", *argv])
    return args.func(args)


def held_out(data):
    x = torch.stack([data.test[i][0] for i in range(len(data.test))])
    y = np.array([int(data.test[i][1]) for i in range(len(data.test))])
    return x, y


def integer_top1_from_checkpoint(path, bits, weights, data):
    """Independent of the trial: rebuild the QuantModel, load the saved state, run the integer executor."""
    qm = prepare(get_model(weights=weights), bits, SHAPE)
    qm.load_state_dict(load_checkpoint(Path(path) / CHECKPOINT_FILE)["model"])
    program = qm.to_integer()
    x, y = held_out(data)
    q = run_program(program, program.quantize_input(x)).numpy().astype(np.float64)
    return float(np.mean(np.argmax(q * np.asarray(program.output_scale), 1) == y))


def test_cli_tune_table_matches_checkpoints(tmp_path, weights, mixed_json, data, capsys):
    out = tmp_path / "run"
    rc = cli(["--weights", str(weights), "--configs", "uniform4", str(mixed_json), "--epochs", "2",
              "--samples", "2", "--asha", "--lr-range", "1e-4,1e-2", "--train-limit", str(LIMIT),
              "--out", str(out), "--json"])
    assert rc == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    table = pd.read_parquet(out / "finetune.parquet")
    assert list(table.columns) == COLUMNS and len(printed["trials"]) == len(table) == 4  # 2 configs x 2 samples
    assert (table["error"] == "").all()
    assert (table["device"] == ("cuda" if torch.cuda.is_available() else "cpu")).all()   # trials take a GPU where Ray has one
    for config, rows in table.groupby("config"):
        assert rows["lr"].nunique() == 2 and rows["lr"].between(1e-4, 1e-2).all()
    assert set(table["config"]) == {"uniform4", "mixed"}
    assert table["epochs"].between(1, 2).all() and (table["epochs"] == 2).any()   # ASHA may stop a trial at 1
    for _, r in table.iterrows():
        bits = r["bits"]
        assert not Path(r["checkpoint"]).is_absolute()                  # relative to the run folder
        assert Path(r["checkpoint"]).name == f"epoch_{r['epochs']:04d}"
        assert load_checkpoint(out / r["checkpoint"] / CHECKPOINT_FILE)["epoch"] == r["epochs"] - 1
        assert r["top1"] == integer_top1_from_checkpoint(out / r["checkpoint"], bits, weights, data)
        assert r["top1_best"] == integer_top1_from_checkpoint(out / r["best_checkpoint"], bits, weights, data)
        assert r["top1_best"] >= r["top1"] and r["int_matches_qat"] == 1.0
        params = {n: m.weight.numel() for n, m in get_model().named_modules()
                  if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}
        assert r["size_mib"] == pytest.approx(sum(p * bits[n] / 8 for n, p in params.items()) / 2**20)
    # PTQ top-1 is the same for both samples of a config (calibration does not depend on the learning rate)
    assert (table.groupby("config")["top1_ptq"].nunique() == 1).all()

    # the same inputs again: the finished experiment is read back, nothing is trained again
    before = {p: Path(p).stat().st_mtime_ns for p in glob.glob(str(out / "tune" / "*" / "*" / "epoch_*" / "*"))}
    again = finetune_run(["uniform4", str(mixed_json)], out=out, weights=weights, recipe=Recipe(epochs=2),
                         settings=TuneSettings(samples=2, asha=True, lr_range=(1e-4, 1e-2), train_limit=LIMIT))
    assert len(before) >= 4
    assert {p: Path(p).stat().st_mtime_ns for p in glob.glob(str(out / "tune" / "*" / "*" / "epoch_*" / "*"))} == before
    pd.testing.assert_frame_equal(again, table)


EPOCHS = 24     # long enough that Ctrl+C lands before the end, even on an idle machine
DRIVER = """
import faulthandler, os, signal, ray
faulthandler.register(signal.SIGUSR2, all_threads=True)   # the test asks for every thread's stack if it hangs
ray.init(address={address!r}, log_to_driver=False)
from hawq_ray.quant.finetune import Recipe
from hawq_ray.service.tune import TuneSettings, finetune_run
finetune_run(["uniform4", {mixed!r}], out={out!r}, weights={weights!r}, recipe=Recipe(epochs={epochs}, lr=1e-3),
             settings=TuneSettings(train_limit={limit}))
"""


def progress_of(out) -> dict:
    """{trial: its committed epochs' metrics} (service.trial_record's progress.json, read independently)."""
    return {Path(p).parent.name: json.loads(Path(p).read_text())
            for p in glob.glob(str(out / "tune" / "finetune-*" / "*" / "progress.json"))}


def finished_or_stacks(proc, timeout: float) -> str:
    """The process's output once it exits; if it has not within `timeout`, a failure that shows where each of its
    threads was (faulthandler on SIGUSR2)."""
    try:
        return proc.communicate(timeout=timeout)[0]
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGUSR2)
        time.sleep(5)
        proc.kill()
        pytest.fail(f"no exit {timeout:.0f} s after Ctrl-C; its threads:\n{proc.communicate()[0][-12000:]}")


def test_interrupted_run_resumes_from_checkpoints(tmp_path, weights, mixed_json):
    out = tmp_path / "run"
    code = DRIVER.format(address=ray.get_runtime_context().gcs_address, mixed=str(mixed_json), out=str(out),
                         weights=str(weights), limit=LIMIT, epochs=EPOCHS)
    driver = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, preexec_fn=as_from_a_terminal)
    # interrupt (Ctrl+C) as soon as both trials have committed an epoch (the event, not a timer, triggers it)
    while len([t for t in progress_of(out).values() if t]) < 2:
        assert driver.poll() is None, driver.communicate()[0][-2000:]
        time.sleep(0.05)
    driver.send_signal(signal.SIGINT)
    log = finished_or_stacks(driver, 120)
    assert driver.returncode != 0 and "KeyboardInterrupt" in log, log[-2000:]   # stopped, not "finished"
    assert not (out / "finetune.parquet").exists()

    done_before = {t: rows[-1]["epoch"] for t, rows in progress_of(out).items() if rows}
    assert len(done_before) == 2 and max(done_before.values()) < EPOCHS, done_before

    table = finetune_run(["uniform4", str(mixed_json)], out=out, weights=weights, recipe=Recipe(epochs=EPOCHS, lr=1e-3),
                         settings=TuneSettings(train_limit=LIMIT))
    assert (table["error"] == "").all() and (table["epochs"] == EPOCHS).all()
    after = progress_of(out)
    assert set(after) == set(table["trial"]) == set(done_before)          # same trials, none recreated
    for trial, rows in after.items():
        k = done_before[trial]                                            # epochs committed before the interrupt
        assert [r["epoch"] for r in rows] == list(range(1, EPOCHS + 1)), (trial, rows)
        assert [r["start_epoch"] for r in rows] == [0] * k + [k] * (EPOCHS - k), (trial, rows)
    # every trial continued from its last committed epoch, none started over
    assert dict(zip(table["trial"], table["start_epoch"])) == done_before


def test_cli_bad_input_is_one_line_error(tmp_path, weights, mixed_json):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**json.loads(mixed_json.read_text()), "block7.conv2": 4}))
    cases = [["--configs", str(bad)],
             ["--configs", "uniform4", "--distill", "resnet_no_such_teacher"],
             ["--configs", "uniform4", "--distill", f"digits_resnet={tmp_path / 'missing.pt'}"]]
    for argv in cases:
        with pytest.raises(HawqError) as e:
            cli(["--weights", str(weights), "--out", str(tmp_path / "o"), *argv])
        assert str(e.value) and "\n" not in str(e.value), argv
    from hawq_ray.service.cli import main
    assert main(["finetune", "--configs", "uniform4", "--train-limit", "0", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o" / "tune").exists()       # rejected before any trial started
