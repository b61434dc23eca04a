"""Where results go, checked before any work: an output file or folder that can be written, and a run folder
held by one run at a time."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from hawq_ray.contract import HawqError

LOCK_FILE = ".lock"


def writable_file(path, flag: str = "--out") -> Path:
    """`path` as an output file (not a folder) that can be created or overwritten; its folder is made."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise HawqError(f"{flag} {path}: is a folder; give a file name inside it, e.g. {out / 'out.parquet'}")
    existed = out.exists()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(out, "ab"):
            pass
    except OSError as e:
        raise HawqError(f"{flag} {path}: cannot be written ({e.strerror or e})") from None
    if not existed:
        out.unlink()
    return out


def writable_folder(path, flag: str = "--out") -> Path:
    """`path` as an output folder, made if missing, in which files can be created."""
    out = Path(path).expanduser()
    if out.exists() and not out.is_dir():
        raise HawqError(f"{flag} {path}: is a file; give a folder (it is made if missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise HawqError(f"{flag} {path}: cannot be written ({e.strerror or e})") from None
    return out


@contextlib.contextmanager
def run_folder_lock(run_dir: Path, log=print):
    """Hold `run_dir` for this run: a second run on it fails at once with a one-line error naming the holder
    (pid, host, start). The lock is an flock on `run_dir/.lock`, which the kernel releases when its holder
    dies, so a lock left by a killed run is taken over (with a notice)."""
    path = Path(run_dir) / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            raise HawqError(f"run folder {run_dir} is in use by pid {holder.get('pid', '?')} on "
                            f"{holder.get('host', '?')} since {holder.get('started', '?')}: wait for that run "
                            f"to end or stop it, or give another --out") from None
        stale = _holder(path)
        if stale.get("pid"):
            log(f"[lock] taking over the lock of pid {stale['pid']} on {stale.get('host', '?')}, which ended "
                f"without releasing it")
        mine = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, mine, 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)            # released cleanly: the next run takes it without a notice
    finally:
        os.close(fd)


def _holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}
