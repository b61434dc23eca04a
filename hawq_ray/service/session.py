"""The Ray session of a front (pipeline, CLI, Python API): the one place that initializes or joins Ray. Core
stages and actors use the session a front opened; they never start one.

A local Ray (no address) is private to this machine and to this user: its servers listen on 127.0.0.1 only,
it has no dashboard web UI, its token file is readable by its owner alone, and its processes die with the
driver (`ray_watchdog`). Joining a cluster changes nothing of the cluster's own settings (docs/cluster.md).
"""
from __future__ import annotations

import os
import secrets
from pathlib import Path

LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"   # "0": Ray takes 127.0.0.1 as the node address


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address`, else the one a `ray job submit` driver runs in ($RAY_ADDRESS), else
    start a private local Ray (never some cluster a `ray start` left on the machine); nothing when this
    process has joined one already. `num_cpus` sizes a local Ray."""
    import ray
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
        return
    _private_local_ray()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


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
