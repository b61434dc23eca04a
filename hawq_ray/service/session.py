"""The Ray session of a front (pipeline, CLI, Python API): the one place that initializes or joins Ray. Core
stages and actors use the session a front opened; they never start one.

A local Ray (no address) is private to this machine and to this user: its servers listen on 127.0.0.1 only,
it has no dashboard web UI, its token file is readable by its owner alone, and its processes die with the
driver (`ray_watchdog`). Joining a cluster changes nothing of the cluster's own settings (docs/cluster.md).
"""
from __future__ import annotations

import os
import re
import secrets
import socket
import time
import warnings
from pathlib import Path

from hawq_ray.contract import HawqError
from hawq_ray.contract.errors import brief

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"   # "0": Ray takes 127.0.0.1 as the node address
JOIN_TIMEOUT_S = 10.0     # for a cluster's head to accept a connection and answer gRPC, before ray.init
LOCAL_START_TRIES = 3     # starts of a local Ray whose raylet or GCS did not come up in Ray's fixed wait
LOCAL_START_TIMEOUTS = ("timed out during startup",       # the raylet did not register with the GCS in 30 s
                        "Timed out waiting for file")     # the GCS did not write its port file in time
ADDRESS_VALID = ("HOST:PORT of a running Ray head's GCS (e.g. 10.0.0.5:6379), ray://HOST:PORT (Ray Client), "
                 "auto (the cluster `ray start` left on this machine), or none, for a private local Ray")
_HOST = re.compile(r"\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+")


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address`, else the one a `ray job submit` driver runs in ($RAY_ADDRESS), else
    start a private local Ray (never some cluster a `ray start` left on the machine); nothing when this
    process has joined one already. `num_cpus` sizes a local Ray. An address that is malformed, or where
    nothing answers as a Ray head within JOIN_TIMEOUT_S, is a one-line HawqError before Ray is asked (ray.init
    would retry for minutes)."""
    import ray
    if ray.is_initialized():
        return
    given = address
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.strip() != "local":
        source = "" if given else " (from $RAY_ADDRESS)"
        reachable(address, source=source)
        try:
            ray.init(address=address.strip(), log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            reason = brief((str(e).splitlines() or [type(e).__name__])[0], 160).strip("'\"")
            raise HawqError(f"cannot join the Ray cluster at {address}{source}: {reason}; "
                            f"valid: {ADDRESS_VALID}") from None
        return
    _private_local_ray()
    start_local(num_cpus)


def start_local(num_cpus: int | None = None) -> None:
    """ray.init of a fresh local Ray (no dashboard, workers' logs kept in the session folder). On a loaded
    machine the raylet can miss the 30 s that Ray waits, fixed, for it to register with the GCS, or the GCS miss
    the wait for its port file (both seen on 2 cores beside compile jobs); then the processes of that start are
    ended and Ray is started again, up to LOCAL_START_TRIES times, before the error reaches the caller."""
    import psutil
    import ray
    for attempt in range(1, LOCAL_START_TRIES + 1):
        before = {p.pid for p in psutil.Process().children(recursive=True)}
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception as e:           # Ray raises a bare Exception (the raylet) or a RuntimeError (the GCS)
            if not any(m in str(e) for m in LOCAL_START_TIMEOUTS) or attempt == LOCAL_START_TRIES:
                raise
        _end_new_children(before)
        warnings.warn(f"the local Ray did not start in time (try {attempt} of {LOCAL_START_TRIES}); "
                      f"starting it again", RuntimeWarning, stacklevel=2)


def _end_new_children(before: set) -> None:
    """Kill this process's descendants that are not in `before` (a failed start's GCS, raylet and reaper)."""
    import psutil
    new = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    for p in new:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(new, timeout=10)


def reachable(address: str, timeout: float | None = None, source: str = "") -> str:
    """The HOST:PORT that joining `address` connects to, once a TCP connection there succeeds and the server
    answers as a Ray head (its GCS, or a Ray Client server for ray://) within `timeout` (default JOIN_TIMEOUT_S);
    else a one-line HawqError naming the address: malformed, no Ray found (auto), or no Ray head answering."""
    from ray._private import services
    timeout = JOIN_TIMEOUT_S if timeout is None else timeout
    text = address.strip()
    client = text.startswith("ray://")
    if text == "auto":
        target, why = None, "no running Ray found"
        try:
            target = services.canonicalize_bootstrap_address("auto")
        except (ConnectionError, ValueError) as e:
            why = (str(e).splitlines() or [why])[0]
        if not target:
            raise HawqError(f"Ray address auto{source}: {why}; valid: {ADDRESS_VALID}")
        host, port = _host_port(target, address, source)
        source = f"{source} ({target})"
    else:
        host, port = _host_port(text[len("ray://"):] if client else text, address, source)
        if not client:                   # ray.init joins what Ray makes of the host (127.0.0.1: the node's IP)
            try:
                host = services.resolve_ip_for_localhost(host)
            except ValueError:
                pass
    deadline = time.monotonic() + timeout
    prefix = f"cannot reach a Ray cluster at {address}{source} within {timeout:g} s"
    try:
        with socket.create_connection((host.strip("[]"), port), timeout=timeout):
            pass
    except (socket.gaierror, UnicodeError) as e:
        raise HawqError(f"{prefix}: host {host} is not known ({getattr(e, 'strerror', None) or e}); "
                        f"valid: {ADDRESS_VALID}") from None
    except OSError as e:                 # refused, unreachable, timed out
        raise HawqError(f"{prefix}: {e.strerror or str(e) or 'timed out'}; valid: {ADDRESS_VALID}") from None
    if os.environ.get("RAY_USE_TLS", "0").lower() in ("0", "false", ""):   # with TLS: the TCP check alone
        _grpc_answers(f"{host}:{port}", max(0.1, deadline - time.monotonic()), f"{address}{source}", prefix, client)
    return f"{host}:{port}"


def _host_port(text: str, address: str, source: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not _HOST.fullmatch(host) or len(host) > 253 or max(map(len, host.split("."))) > 63 \
            or not port.isdigit() or not 0 < int(port) < 65536:
        hint = (" (that is a URL, such as the dashboard's for `ray job submit`; give the GCS address)"
                if "://" in text else "")
        raise HawqError(f"Ray address {brief(address)}{source} is not valid{hint}; valid: {ADDRESS_VALID}")
    return host, int(port)


def _grpc_answers(target: str, timeout: float, where: str, prefix: str, client: bool) -> None:
    """A port that accepts connections but is no Ray head (ssh, a web server, a proxy) would keep ray.init
    retrying for minutes: a Ray head's GCS answers GetClusterId (or, with token authentication on, refuses it as
    UNAUTHENTICATED; a driver without RAY_AUTH_MODE=token then sends no token, and ray.init fails after 20 s with
    a bare ConnectionError); a Ray Client server (`client`) is a gRPC server: it completes the HTTP/2 handshake."""
    import grpc
    channel = grpc.insecure_channel(target)
    try:
        if client:
            grpc.channel_ready_future(channel).result(timeout=timeout)
            return
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
        gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(gcs_service_pb2.GetClusterIdRequest(),
                                                                          timeout=timeout)
    except grpc.FutureTimeoutError:
        raise HawqError(f"{prefix}: the port accepts connections but does not answer as a Ray Client server "
                        f"(gRPC); valid: {ADDRESS_VALID}") from None
    except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            if os.environ.get("RAY_AUTH_MODE") == "token":
                return                     # this plain call sends no token; ray.init sends this process's
            raise HawqError(f"cannot join the Ray cluster at {where}: it needs token authentication; valid: "
                            f"RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN "
                            f"(docs/cluster.md)") from None
        what = ("does not answer as a Ray head (gRPC)" if code in (grpc.StatusCode.DEADLINE_EXCEEDED,
                                                                  grpc.StatusCode.UNAVAILABLE)
                else f"answers gRPC, but not as a Ray head's GCS ({code.name})")
        raise HawqError(f"{prefix}: the port accepts connections but {what}; valid: {ADDRESS_VALID}") from None
    finally:
        channel.close()


def _private_local_ray() -> None:
    """Loopback addresses, a token file of mode 600, and the watchdog, for the local Ray about to start."""
    from ray._private import ray_constants
    from hawq_ray.service import ray_watchdog
    os.environ[LOOPBACK_ENV] = "0"             # for the processes Ray starts, which read it at import
    ray_constants.ENABLE_RAY_CLUSTER = False   # for this process, which may have imported Ray already
    private_token_file()
    ray_watchdog.start(os.getpid())


def private_token_file() -> Path | None:
    """Ray's token file (~/.ray/auth_token; Ray writes it with the umask's mode, 644 by default) made here with
    mode 600, or narrowed to 600 if this user owns it; None when the environment names the token
    ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH) or turns token authentication off."""
    if os.environ.get("RAY_AUTH_MODE") == "disabled" or os.environ.get("RAY_AUTH_TOKEN") \
            or os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return None
    path = Path.home() / ".ray" / "auth_token"
    path.parent.mkdir(mode=0o700, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        if path.stat().st_uid == os.geteuid() and path.stat().st_mode & 0o077:
            path.chmod(0o600)
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    return path
