"""bench/gpu_check: the GPU check's dry run on the CPU runs every step (TVM modules against the integer
executor, latencies, a Hessian-trace actor, a Tune trial) and its table says what ran where; the shell entry
point refuses a machine without an NVIDIA GPU in one line. The CUDA run itself needs a GPU."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from hawq_ray.inputs.models import get_model

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_on_the_cpu_runs_every_step(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--model", "resnet20_cifar10",
           "--image", "32", "--batch", "2", "--inputs", "3", "--rounds", "2", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path,
                          env={**os.environ, "TVM_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| check | result | figure |"):]
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")[1:] for line in table.splitlines()[2:]}
    for config in ("uniform8", "uniform4", "mixed"):
        result, figure = rows[f"TVM llvm {config}: differing elements vs integer executor"]
        assert result == "ok" and figure.startswith("0 in the outputs of 3 random inputs")
        assert rows[f"latency TVM {config}, batch 2"][0] == "ok"
    assert rows["latency torch fp32, batch 2"][0] == "ok" and "latency torch fp16, batch 2" not in rows
    weighted = sum(isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) for m in get_model("resnet20_cifar10").modules())
    assert rows["Hessian-trace actor"][1].startswith(f"on cpu, {weighted} layers traced")   # one trace a layer
    assert rows["Ray Tune QAT trial (digits, 1 epoch)"][1].startswith("trained on cpu")
    assert rows["whole check"][0].startswith("ok")


def test_shell_entry_point_without_a_gpu_is_one_line(tmp_path):
    bindir = tmp_path / "bin"            # a PATH with bash tools but no nvidia-smi
    bindir.mkdir()
    for tool in ("bash", "dirname", "date", "env"):
        src = subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip()
        (bindir / tool).symlink_to(src)
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                          env={"PATH": str(bindir)}, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "no NVIDIA GPU" in proc.stderr
    assert "python bench/gpu_check.py --device cpu" in proc.stderr


def test_shell_entry_point_runs_the_check_and_reports_an_unusable_gpu(tmp_path):
    """An nvidia-smi that lists a GPU torch cannot use: the installed packages are found (no install), the
    check runs under its time limit and fails at its first row, with the table printed and exit status 1."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\necho 'GPU 0: a GPU this process cannot use'\n")
    fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}", "PYTHON": sys.executable,
           "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "installing" not in proc.stdout
    assert "| environment | FAILED | torch sees no CUDA device |" in proc.stdout
