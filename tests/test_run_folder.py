"""A run folder is held by one run, bad settings stop a run before any work, Ctrl-C is one line and exit 130,
and output paths that cannot be written are one-line errors."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hawq_ray.contract import HawqError
from hawq_ray.onnx.qdq import FORMS
from hawq_ray.service.outputs import run_folder_lock, writable_file, writable_folder
from hawq_ray.service.pipeline import RUN_SCHEMA, load_config
from hawq_ray.service.settings import fits_in_memory
from child_processes import as_from_a_terminal

TINY = Path(__file__).parent / "data" / "tiny_run.yaml"


def hawq(*args):
    return subprocess.Popen([sys.executable, "-m", "hawq_ray.service.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=as_from_a_terminal)


BAD_SETTINGS = [
    ('tune: {epochs: "four"}', "tune.epochs: 'four'"), ("tune: {epochs: 1e9}", "tune.epochs: '1e9'"),
    ('budgets: {bops: "x"}', "budgets.bops: 'x'"), ("seed: 1.5", "seed: 1.5"), ("fp32_epochs: -3", "fp32_epochs: -3"),
    ("tune: {epochs: -1}", "tune.epochs: -1"), ("profile: {batch: 100000}", "profile.batch: 100000"),
    ("sensitivity: {actors: 1000}", "sensitivity.actors: 1000"), ("deploy: {rounds: 0}", "deploy.rounds: 0"),
    ("sensitivity: {tol: -0.1}", "sensitivity.tol: -0.1"), ("tune: {lr: 0}", "tune.lr: 0"),
    ("tune: {asha: yes please}", "tune.asha: 'yes please'"), ("budgets: {size: [1.5]}", "budgets.size: [1.5]"),
    ("uniform: uniform4", "uniform: 'uniform4'"), ("profile: {target: 3}", "profile.target: 3"),
]


@pytest.mark.parametrize("text,named", BAD_SETTINGS, ids=[b[1] for b in BAD_SETTINGS])
def test_bad_setting_is_one_line_before_any_work(tmp_path, text, named):
    config = tmp_path / "run.yaml"
    config.write_text(text + "\n")
    with pytest.raises(HawqError) as e:
        load_config(config)
    assert str(e.value).startswith(named) and "valid:" in str(e.value) and "\n" not in str(e.value)


def test_bad_setting_from_the_cli_exits_2_at_once(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text('tune: {epochs: "four"}\n')
    proc = subprocess.run([sys.executable, "-m", "hawq_ray.service.cli", "run", "--config", str(config), "--out",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "tune.epochs" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()               # nothing was started
    for argv, flag in ((["profile", "--batch", "100000", "--out", str(tmp_path / "l.parquet")], "--batch"),
                       (["sensitivity", "--actors", "1000", "--out", str(tmp_path / "s.parquet")], "--actors"),
                       (["compile", "--bits", "uniform8", "--batch", "0", "--out", str(tmp_path / "c")], "--batch")):
        proc = subprocess.run([sys.executable, "-m", "hawq_ray.service.cli", *argv], capture_output=True, text=True,
                              timeout=120)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and f"argument {flag}" in lines[0], proc.stderr


def test_export_forms_of_the_schema_are_the_exporters():
    assert RUN_SCHEMA["export"]["form"].values == FORMS


def test_batch_that_cannot_fit_in_memory_is_refused():
    # 1000 elements a sample, 12 bytes each when taking Hessian-vector products: 64 samples need 768000 bytes
    fits_in_memory({"sensitivity.batch_size": (64, "sensitivity")}, 1000, "m", available=768000)
    with pytest.raises(HawqError, match=r"sensitivity.batch_size: 65 needs .* valid: at most 64"):
        fits_in_memory({"sensitivity.batch_size": (65, "sensitivity")}, 1000, "m", available=768000)
    with pytest.raises(HawqError, match=r"profile.batch: 193 .* valid: at most 192"):
        fits_in_memory({"profile.batch": (193, "profile")}, 1000, "m", available=768000)


def test_resnet50_batch_1024_is_refused_before_work(tmp_path):
    from hawq_ray.service.pipeline import run
    with pytest.raises(HawqError, match="sensitivity.batch_size: 1024 needs about .* GiB of activations"):
        run({"model": "torchvision:resnet50", "sensitivity": {"batch_size": 1024}}, out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_unwritable_outputs_are_one_line_errors(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(HawqError, match="is a folder"):
        writable_file(tmp_path)
    with pytest.raises(HawqError, match="is a file"):
        writable_folder(a_file)
    with pytest.raises(HawqError, match="cannot be written"):
        writable_file(a_file / "below" / "out.json")          # a missing parent that can't be made
    assert writable_file(tmp_path / "new" / "out.json").parent.is_dir()
    for argv in (["solve", "--out", str(tmp_path)], ["sweep", "--bops", "0.5", "--out", str(tmp_path)],
                 ["run", "--out", str(a_file)]):
        table = tmp_path / "table.csv"
        table.write_text("layer,kind,params,macs,group,fixed_bits,omega4,omega8\nl,conv,9,9,,,1.0,0.5\n")
        proc = subprocess.run([sys.executable, "-m", "hawq_ray.service.cli", argv[0], *(["--table", str(table)]
                               if argv[0] != "run" else []), *argv[1:]], capture_output=True, text=True, timeout=120)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and "--out" in lines[0], proc.stderr


def test_lock_names_its_holder_and_a_stale_one_is_taken_over(tmp_path):
    notices = []
    with run_folder_lock(tmp_path, notices.append):
        holder = json.loads((tmp_path / ".lock").read_text())
        assert holder["pid"] == os.getpid()
        child = subprocess.run([sys.executable, "-c", "import sys; from hawq_ray.service.outputs import "
                                "run_folder_lock as L\nwith L(sys.argv[1]): pass", str(tmp_path)],
                               capture_output=True, text=True, timeout=60)
        assert child.returncode != 0 and f"is in use by pid {os.getpid()}" in child.stderr
    assert notices == []
    # a holder killed without releasing: its record stays, the kernel dropped its flock
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from hawq_ray.service.outputs import "
                               "run_folder_lock as L\nwith L(sys.argv[1]):\n print('held', flush=True); time.sleep(600)",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(HawqError, match=f"in use by pid {holder.pid}"):
        with run_folder_lock(tmp_path, notices.append):
            pass
    holder.kill()
    holder.wait()
    with run_folder_lock(tmp_path, notices.append):
        pass
    assert len(notices) == 1 and f"taking over the lock of pid {holder.pid}" in notices[0]


def test_second_run_on_a_folder_fails_at_once_and_ctrl_c_is_130(tmp_path):
    """Two runs on one folder: the second fails at once, naming the first; Ctrl-C (SIGINT to the process
    group, as a terminal sends it) once the first is in its sensitivity stage: one line, exit 130, the finished
    stages' tables kept."""
    out = tmp_path / "run"
    first = hawq("run", "--config", str(TINY), "--out", str(out))
    for line in first.stderr:
        if "[sensitivity] running" in line:
            break
    second = hawq("run", "--config", str(TINY), "--out", str(out))
    _, err = second.communicate(timeout=120)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert second.returncode == 2 and len(lines) == 1 and f"in use by pid {first.pid}" in lines[0], err
    os.killpg(first.pid, signal.SIGINT)
    _, err = first.communicate(timeout=120)
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    assert first.returncode == 130, err[-2000:]
    assert lines[-1] == "hawq-ray run: interrupted; rerun the same command to resume" and "Traceback" not in err
    assert json.loads((out / "stages.json").read_text())["layers"]["rows"] > 0


@pytest.mark.parametrize("name", [".lock", "run.json", "report.md", "stages.json", "deploy"])
def test_a_link_in_the_run_folder_is_refused_and_its_target_untouched(tmp_path, name):
    """A run folder whose lock, record, report or module folder is a symbolic link to a file elsewhere: the run
    stops with one line naming the link, exit 2, before any work, and no byte outside the folder changes."""
    out, target = tmp_path / "run", tmp_path / "elsewhere"
    out.mkdir()
    target.write_text("the user's own file\n")
    (out / name).symlink_to(target)
    proc = subprocess.run([sys.executable, "-m", "hawq_ray.service.cli", "run", "--config", str(TINY), "--out",
                           str(out)], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and f"{name} is a symbolic link" in lines[0], proc.stderr
    assert target.read_text() == "the user's own file\n"
    assert sorted(p.name for p in out.iterdir()) == sorted({name, ".lock"})


def test_run_folder_writes_replace_a_link_and_paths_stay_inside(tmp_path):
    from hawq_ray.service.outputs import inside, refuse_links, write_atomic
    target = tmp_path / "elsewhere"
    target.write_text("kept")
    (tmp_path / "run").mkdir()
    link = tmp_path / "run" / "report.md"
    link.symlink_to(target)
    write_atomic(link, "new")                             # the link itself is replaced, its target kept
    assert not link.is_symlink() and link.read_text() == "new" and target.read_text() == "kept"
    mask = os.umask(0o022)
    os.umask(mask)
    assert link.stat().st_mode & 0o777 == 0o666 & ~mask   # the mode open() gives, not mkstemp's 600
    refuse_links(tmp_path / "run")
    (tmp_path / "run" / "sub").mkdir()
    (tmp_path / "run" / "sub" / "x").symlink_to(target)
    with pytest.raises(HawqError, match=r"sub/x is a symbolic link"):
        refuse_links(tmp_path / "run")
    run = tmp_path / "run"
    assert inside(run, "tune/a/epoch_0001") == run / "tune" / "a" / "epoch_0001"
    for bad in ("../elsewhere", "/etc/passwd", "a/../../b", "", "sub/x/y", "a//b"):
        with pytest.raises(HawqError) as e:
            inside(run, bad)
        assert "\n" not in str(e.value)
