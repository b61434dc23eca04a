"""Ray job submission for real: a head node started with the `ray` CLI, the job submitted with `ray job submit
--working-dir`, its logs followed with `ray job logs --follow`, its status read with `ray job status`, its
results found in the output folder.

The head runs with token authentication (RAY_AUTH_MODE=token, a fresh token of its own) and its dashboard on
127.0.0.1; every port is free-picked and the temp folder is private, so other Ray instances on the machine are
untouched. The finalizer ends exactly this head's processes (`LocalHead.stop`); it never runs `ray stop`,
which would end every Ray process of the user on the machine.
"""
import json
import shlex
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from ray_cluster import ray_executable, start_local_head

ROOT = Path(__file__).resolve().parents[1]

# ---- the job this test submits ------------------------------------------------------------------------------
# MAIN_JOB = True submits the main job, `hawq-ray run` on tests/data/job_run.yaml (uploaded as the working dir's
# only file), and looks for its report: the real end-to-end check, 3 to 6 minutes on 2 loaded cores.
# MAIN_JOB = False submits `hawq-ray verify` (about 20 s) through the same head, CLI and checks.
# "{out}" is the job's (absolute) output folder, "{config}" the config's name inside the working dir.
MAIN_JOB = True
if MAIN_JOB:
    JOB_COMMAND = ["hawq-ray", "run", "--config", "{config}", "--out", "{out}", "--json"]
    JOB_RESULTS = ["report.md", "stages.json", "sweep.parquet"]   # files the job must leave under {out}
    JOB_TIMEOUT_S = 1500
else:
    JOB_COMMAND = ["hawq-ray", "verify", "--bits", "uniform4", "--json", "--plot", "{out}/verify.png"]
    JOB_RESULTS = ["verify.png"]
    JOB_TIMEOUT_S = 300
JOB_CONFIG = ROOT / "tests" / "data" / ("job_run.yaml" if MAIN_JOB else "tiny_run.yaml")

pytestmark = pytest.mark.timeout(JOB_TIMEOUT_S + 300)


def ray_cli(*args, env, timeout=120, check=True):
    proc = subprocess.run([ray_executable(), *args], env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"ray {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def head():
    root = Path(tempfile.mkdtemp(prefix="hr-", dir="/tmp"))   # short: Ray's socket paths live under it
    h = start_local_head(root, num_cpus=2)
    try:
        yield h
    finally:
        h.stop()
        left = [p.pid for p in h.processes()]
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes of the test's Ray head still alive: {left}"


@pytest.fixture(scope="module")
def workdir(head):
    wd = head.root / "wd"
    wd.mkdir()
    shutil.copy(JOB_CONFIG, wd / "tiny.yaml")
    return wd


def _get(url, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_dashboard_on_loopback_and_token_required(head):
    socks = head.listening()
    dash = [s for s in socks if s[3] == head.dashboard_port]
    assert dash and all(ip == "127.0.0.1" for _, _, ip, _ in dash), dash
    api = head.dashboard_url + "/api/jobs/"
    token = head.token_path.read_text().strip()
    assert _get(api) == 401                    # no token
    assert _get(api, "0" * 64) == 403          # wrong token
    assert _get(api, token) == 200
    # the CLI without RAY_AUTH_MODE=token sends no token (stack facts: AuthenticationError)
    env = {k: v for k, v in head.client_env().items() if not k.startswith("RAY_AUTH")}
    proc = ray_cli("job", "list", "--address", head.dashboard_url, env=env, check=False)
    assert proc.returncode != 0 and "Authentication" in proc.stdout + proc.stderr


def test_driver_runs_in_this_venv_and_joins_the_cluster(head, workdir):
    """The job's driver inherits the head's environment: this interpreter, token auth, RAY_ADDRESS."""
    import sys
    probe = ("import json, os, sys, ray; ray.init(); "
             "print(json.dumps({'python': sys.executable, 'auth': os.environ.get('RAY_AUTH_MODE'), "
             "'cwd_files': sorted(os.listdir('.')), 'cpus': ray.cluster_resources().get('CPU')}))")
    proc = ray_cli("job", "submit", "--address", head.dashboard_url, "--working-dir", str(workdir),
                   "--", "python", "-c", probe, env=head.client_env(), timeout=240)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")][-1]
    seen = json.loads(line)
    assert Path(seen["python"]).parent == Path(sys.executable).parent
    assert seen["auth"] == "token" and seen["cpus"] == 2.0
    assert seen["cwd_files"] == ["tiny.yaml"]
    assert "' succeeded" in proc.stdout


def test_submit_follow_status_results(head, workdir):
    out = head.root / "out"
    out.mkdir()
    sub_id = f"hawq-test-{uuid.uuid4().hex[:8]}"
    entry = [a.format(out=out, config="tiny.yaml") for a in JOB_COMMAND]
    env = head.client_env()
    ray_cli("job", "submit", "--address", head.dashboard_url, "--working-dir", str(workdir),
            "--submission-id", sub_id, "--no-wait", "--", *entry, env=env)
    done = False
    try:
        logs = ray_cli("job", "logs", "--address", head.dashboard_url, "--follow", sub_id, env=env,
                       timeout=JOB_TIMEOUT_S).stdout
        status = ray_cli("job", "status", "--address", head.dashboard_url, sub_id, env=env).stdout
        done = True
    finally:
        if not done:
            ray_cli("job", "stop", "--address", head.dashboard_url, sub_id, env=env, check=False)
    # `ray job status` prints "Job '<id>' succeeded" (or "... failed" and the reason)
    assert f"Job '{sub_id}' succeeded" in status, f"{status}\n{logs[-4000:]}"
    assert shlex.join(entry) in logs or entry[0] in logs
    for name in JOB_RESULTS:
        f = out / name
        assert f.is_file() and f.stat().st_size > 0, f"{f} missing; job log ends:\n{logs[-3000:]}"
    last = [ln for ln in logs.splitlines() if ln.startswith("{")][-1]
    result = json.loads(last)
    if JOB_COMMAND[:2] == ["hawq-ray", "verify"]:
        assert result["differing"] == 0 and result["predictions_equal"]
    else:   # the main job: its report, and every stage done
        assert Path(result["report"]) == out / "report.md"
        stages = json.loads((out / "stages.json").read_text())
        assert {"layers", "sensitivity", "latency", "sweep", "finetune", "deploy"} <= set(stages), stages
