"""Ray cluster plumbing that no stage needs: a local head node for tests and docs, token authentication, and
the resources that the code asks a cluster for (to check them against `cluster.yaml`).

    head = start_local_head("/tmp/hr-x", num_cpus=2)      # `ray start --head --block`, token auth on
    subprocess.run(["ray", "job", "submit", "--address", head.dashboard_url, ...], env=head.client_env())
    head.stop()                                          # ends the processes this head started, and no others

What Ray 2.60 does, measured on this machine (docs/cluster.md has the commands for users):
- The dashboard (the HTTP server that `ray job submit` talks to, and so the way to run code on the cluster)
  listens on 127.0.0.1 unless `--dashboard-host` says otherwise; we pass `--dashboard-host=127.0.0.1` anyway.
- The gRPC servers (GCS, raylet, workers, agents) listen on all interfaces: `ray start` rewrites
  `--node-ip-address=127.0.0.1` to the machine's address. Token authentication is what guards them.
- Token authentication is on when `RAY_AUTH_MODE=token` is set where the head starts (then `ray start` needs a
  token: `ray get-auth-token --generate`, or RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN), and every client needs
  the same setting and token: `ray job submit` without RAY_AUTH_MODE=token sends no token and gets
  AuthenticationError (HTTP 401). Without RAY_AUTH_MODE, `ray start` turns token auth on by itself only when
  a token file already exists (~/.ray/auth_token, which any `ray.init()` writes), so we never rely on that.
- The job's driver inherits the head's environment (PATH, the venv's python, RAY_AUTH_MODE and the token
  path), and RAY_ADDRESS points it at the cluster: `ray.init()` there connects (and refuses num_cpus=...).
- `ray stop` ends every Ray process of the user on the machine (other clusters too): never call it here.
"""
from __future__ import annotations

import ast
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from hawq_ray.contract import HawqError

LOOPBACK = "127.0.0.1"
# ports `ray start --head` would otherwise take at fixed defaults (6379, 8265, 10001, 52365, ...) or pick itself
_PORT_FLAGS = ("ray-client-server-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
               "metrics-export-port", "runtime-env-agent-port", "node-manager-port", "object-manager-port")
# environment a head or client must not inherit: a token or address meant for another cluster
_FOREIGN_ENV = ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE")


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on now (a later bind can still race; callers retry the start)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def write_token(path) -> Path:
    """A new random token (256 bits, hex, as `ray get-auth-token --generate` makes) in `path`, mode 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return path


def auth_env(token_path) -> dict:
    """Environment variables that turn Ray's token authentication on with the token in `token_path`: the same
    for the head (`ray start`) and for every client (`ray job submit`, `ray job logs`, `ray status`)."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}


def ray_executable() -> str:
    """The `ray` script of this Python (a venv's), so the head and the jobs it runs use this interpreter."""
    here = Path(sys.executable).parent / "ray"
    return str(here) if here.exists() else "ray"


def _descendants(pid: int) -> list:
    import psutil
    try:
        root = psutil.Process(pid)
        return [root] + root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@dataclass
class LocalHead:
    """A head node started by `start_local_head`; `stop()` ends it."""
    process: subprocess.Popen
    root: Path
    temp_dir: Path
    port: int
    dashboard_port: int
    token_path: Path
    log_path: Path

    @property
    def dashboard_url(self) -> str:
        return f"http://{LOOPBACK}:{self.dashboard_port}"

    def client_env(self, base: dict | None = None) -> dict:
        """`base` (default os.environ) with this head's token auth, and no foreign Ray address or token."""
        env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _FOREIGN_ENV}
        env.update(auth_env(self.token_path))
        return env

    def processes(self) -> list:
        """Live processes of this head: the `ray start` process and its descendants (jobs' drivers included),
        and any process whose command line names this head's unique temp folder."""
        import psutil
        procs = {p.pid: p for p in _descendants(self.process.pid)}
        mark = str(self.temp_dir)
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if p.pid not in procs and mark in " ".join(p.info["cmdline"] or []):
                    procs[p.pid] = p
            except psutil.Error:
                continue
        return list(procs.values())

    def listening(self) -> list:
        """[(pid, process name, ip, port)] of the TCP sockets this head's processes listen on."""
        import psutil
        out = []
        for p in self.processes():
            try:
                for c in p.net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        out.append((p.pid, p.name(), c.laddr.ip, c.laddr.port))
            except psutil.Error:
                continue
        return out

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM to `ray start --block` (which ends its processes), then SIGKILL to whatever of this head is
        left, by pid. Only processes of this head are touched; safe to call twice."""
        import psutil
        procs = self.processes()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        procs += [p for p in self.processes() if p.pid not in {q.pid for q in procs}]
        for p in procs:
            try:
                if p.is_running():
                    p.kill()
            except psutil.Error:
                continue
        psutil.wait_procs(procs, timeout=10)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def head_command(*, port: int, dashboard_port: int, temp_dir, num_cpus: int = 2, resources: dict | None = None,
                 ports: dict | None = None) -> list:
    """`ray start --head --block` for one machine: dashboard on loopback, the given ports, no usage stats."""
    import json
    cmd = [ray_executable(), "start", "--head", "--block", f"--port={port}",
           f"--dashboard-host={LOOPBACK}", f"--dashboard-port={dashboard_port}",
           f"--num-cpus={num_cpus}", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    if resources:
        cmd.append(f"--resources={json.dumps(resources)}")
    for flag, value in (ports or {}).items():
        cmd.append(f"--{flag}={value}")
    return cmd


def _dashboard_ready(url: str, token: str) -> int | None:
    """HTTP status of the job API at `url` (with the token), or None when nothing answers yet."""
    req = urllib.request.Request(url + "/api/jobs/", headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def start_local_head(root, *, num_cpus: int = 2, resources: dict | None = None, token_path=None,
                     timeout: float = 180.0, attempts: int = 2) -> LocalHead:
    """Start a head node for this machine under `root` (a short folder: Ray's socket paths live under it) with
    token authentication (a fresh token in `root`/auth_token unless `token_path` is given), the dashboard on
    127.0.0.1 and every port free; returns once the job API answers. HawqError (with the head's log) if not."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    token_path = Path(token_path) if token_path else write_token(root / "auth_token")
    token = token_path.read_text().strip()
    last = ""
    for attempt in range(attempts):
        temp_dir = root / f"ray{attempt}"
        log_path = root / f"head{attempt}.log"
        port, dashboard_port = free_port(), free_port()
        cmd = head_command(port=port, dashboard_port=dashboard_port, temp_dir=temp_dir, num_cpus=num_cpus,
                           resources=resources, ports={f: free_port() for f in _PORT_FLAGS})
        env = {k: v for k, v in os.environ.items() if k not in _FOREIGN_ENV}
        env.update(auth_env(token_path))
        env.update({"RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"})
        # jobs' entrypoints (`python`, `hawq-ray`) resolve on the head's PATH: this interpreter's scripts first,
        # also when the venv is not activated (`.venv/bin/python -m pytest`)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=root, start_new_session=True)
        head = LocalHead(proc, root, temp_dir, port, dashboard_port, token_path, log_path)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            if _dashboard_ready(head.dashboard_url, token) == 200:
                head.processes()
                return head
            time.sleep(1.0)
        last = head.log_tail()
        head.stop()
    raise HawqError(f"the Ray head under {root} did not serve its job API within {timeout:.0f} s "
                    f"({attempts} attempts); its log ends:\n{last}")


# ------------------------------------------------------------------------------ what the code asks for

_STANDARD = {"CPU", "GPU", "memory", "object_store_memory"}


def node_type_resources(config: dict) -> dict:
    """{node type: {resource: amount}} declared in a cluster launcher config."""
    return {name: dict(t.get("resources") or {}) for name, t in (config.get("available_node_types") or {}).items()}


def _const_str(node) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _dict_keys(node) -> list:
    """String keys of a dict literal (keys that are not string constants are left out: decided at run time)."""
    if isinstance(node, ast.Dict):
        return [k for k in (_const_str(key) for key in node.keys if key is not None) if k]
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict":
        return [kw.arg for kw in node.keywords if kw.arg]
    return []


def _tune_name(key: str) -> str:
    """Tune's `with_resources` spells CPU and GPU in lower case."""
    return {"cpu": "CPU", "gpu": "GPU"}.get(key, key)


def _is_nonzero(node) -> bool:
    return not (isinstance(node, ast.Constant) and not node.value)


def _requests_in(tree) -> list:
    """[(resource, line, how)] that one module's source asks Ray for."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict) and {"cpu", "gpu"} <= set(_dict_keys(node)):
            found.append(("GPU", node.lineno, "Tune trial resources {'cpu', 'gpu'}"))
        if isinstance(node, ast.Call):
            fname = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if fname == "with_resources" and len(node.args) >= 2:
                found += [(_tune_name(k), node.lineno, "tune.with_resources") for k in _dict_keys(node.args[1])]
            if fname == "PlacementGroupFactory" and node.args and isinstance(node.args[0], ast.List):
                for b in node.args[0].elts:
                    found += [(_tune_name(k), node.lineno, "PlacementGroupFactory") for k in _dict_keys(b)]
            for kw in node.keywords:
                if kw.arg == "resources":
                    found += [(k, node.lineno, f"{fname}(resources=...)") for k in _dict_keys(kw.value)]
                elif kw.arg == "num_gpus" and _is_nonzero(kw.value):
                    found.append(("GPU", node.lineno, f"{fname}(num_gpus=...)"))
                elif kw.arg and (kw.arg == "resource" or kw.arg.endswith("_resource")) and _const_str(kw.value):
                    found.append((kw.value.value, node.lineno, f"{fname}({kw.arg}=...)"))
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            t = node.targets[0]
            if isinstance(t, ast.Subscript) and _const_str(t.slice) in ("resources", "num_gpus"):
                if _const_str(t.slice) == "num_gpus":
                    if _is_nonzero(node.value):
                        found.append(("GPU", node.lineno, "options['num_gpus']"))
                else:
                    found += [(k, node.lineno, "options['resources']") for k in _dict_keys(node.value)]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + list(node.args.defaults) \
                + list(node.args.kw_defaults)
            for a, d in zip(args, defaults):
                if (a.arg == "resource" or a.arg.endswith("_resource")) and d is not None and _const_str(d):
                    found.append((d.value, node.lineno, f"{node.name}({a.arg}=default)"))
    return found


def _yaml_requests(path: Path) -> list:
    """[(resource, line, how)] from a run config: values of `resource` keys (the profiler's node kind)."""
    import yaml
    out = []

    def walk(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                if isinstance(k, str) and (k == "resource" or k.endswith("_resource")) and isinstance(v, str):
                    out.append((v, 0, f"{k}: in config"))
                walk(v)
        elif isinstance(obj, list):
            for v in obj:
                walk(v)
    try:
        walk(yaml.safe_load(path.read_text()))
    except (yaml.YAMLError, OSError):
        return []
    return out


def requested_resources(paths, *, configs=()) -> dict:
    """{resource: ["file:line how", ...]} that the Python sources under `paths` ask Ray for — actor and task
    options (`resources=`, `num_gpus=`), Tune trial resources (`with_resources`), default node kinds of
    parameters named `resource` — plus `resource:` values in the run configs `configs`. CPU is left out
    (every node has it); names decided only at run time (a variable key) cannot be read and are not listed."""
    out: dict = {}
    files = []
    for p in map(Path, paths):
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p]
    for f in files:
        if f.resolve() == Path(__file__).resolve():
            continue
        try:
            tree = ast.parse(f.read_text(), filename=str(f))
        except (SyntaxError, OSError, UnicodeDecodeError):
            continue
        for name, line, how in _requests_in(tree):
            if name != "CPU":
                out.setdefault(name, []).append(f"{f}:{line} {how}")
    for c in map(Path, configs):
        for name, _, how in _yaml_requests(c):
            out.setdefault(name, []).append(f"{c} {how}")
    return out


_DOC_PATTERNS = (r"""\bresources?\s*=\s*\{?\s*["']([A-Za-z_][\w-]*)["']""",       # resource="t4", resources={"t4": 1}
                 r"""--resources?[= ]+'?\{?\s*"?([A-Za-z_][\w-]*)(?=["'\s:]|$)""")  # --resource t4, --resources='{"t4": 1}'


def documented_resources(paths) -> dict:
    """{resource: ["file:line", ...]} that examples in docstrings, docs and configs under `paths` (.py, .md,
    .yaml) ask for: `resource="t4"`, `resources={"t4": 1}`, `--resource t4`, `--resources='{"t4": 1}'`."""
    import re
    pats = [re.compile(p) for p in _DOC_PATTERNS]
    out: dict = {}
    files = []
    for p in map(Path, paths):
        files += sorted(f for ext in ("py", "md", "yaml", "yml") for f in p.rglob(f"*.{ext}")) if p.is_dir() else [p]
    for f in files:
        if f.resolve() == Path(__file__).resolve():
            continue
        try:
            lines = f.read_text(errors="replace").splitlines()
        except OSError:
            continue
        for i, line in enumerate(lines, 1):
            for pat in pats:
                for name in pat.findall(line):
                    if name not in ("CPU",) and not name.startswith("node:"):
                        out.setdefault(name, []).append(f"{f}:{i}")
    return out


def missing_resources(requested: dict, config: dict) -> dict:
    """The part of `requested` ({resource: where}) that no node type of the cluster config declares."""
    have = set()
    for res in node_type_resources(config).values():
        have |= {k for k, v in res.items() if v}
    return {k: v for k, v in requested.items() if k not in have and k not in (_STANDARD - {"GPU"})}
