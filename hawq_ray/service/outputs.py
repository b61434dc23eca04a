"""Where results go, checked before any work: an output file or folder that can be written, a run folder held by
one run at a time, and written without following links.

A run folder may have been prepared by someone else. A link in it would turn a write of the run into a write
elsewhere (the link's target), so a run refuses a folder that holds one (`refuse_links`), writes its own files by
write-and-rename (`write_atomic`: a new file made with O_EXCL, renamed over the old name, which replaces a link
rather than following it) and opens its lock with O_NOFOLLOW; a path it reads from a table of the folder is
resolved inside the folder (`inside`), never against the working directory."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import tempfile
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
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise HawqError(f"{flag} {path}: cannot be written ({e.strerror or e})") from None
    return out


@contextlib.contextmanager
def run_folder_lock(run_dir: Path, log=print):
    """Hold `run_dir` for this run: a second run on it fails at once with a one-line error naming the holder
    (pid, host, start). The lock is an flock on `run_dir/.lock`, which the kernel releases when its holder
    dies, so a lock left by a killed run is taken over (with a notice)."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as e:
        if path.is_symlink():
            raise HawqError(f"run folder {run_dir}: {LOCK_FILE} is a symbolic link; a run writes no file through "
                            f"a link (remove it, or give another --out)") from None
        raise HawqError(f"run folder {run_dir}: cannot open {LOCK_FILE} ({e.strerror or e})") from None
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


def refuse_links(run_dir: Path) -> None:
    """A one-line error when anything inside `run_dir` is a symbolic link (the folder itself may be one: the user
    named it)."""
    for folder, dirs, files in os.walk(run_dir, followlinks=False):
        for name in sorted(dirs + files):
            path = Path(folder) / name
            if path.is_symlink():
                raise HawqError(f"run folder {run_dir}: {path.relative_to(run_dir)} is a symbolic link; a run folder "
                                f"holds no links, since writing through one changes a file outside it (remove it)")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()     # read once, at import: os.umask can only be read by setting it


def write_atomic(path: Path, data) -> Path:
    """Write `data` (str or bytes) to `path` by write-and-rename: a new file is made beside it (O_EXCL, so never
    through a link) and renamed over `path`, which replaces a link there instead of writing through it. A reader
    sees the old file or the new one, never half of it."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)     # as open() would make it (mkstemp's files are 600)
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def inside(run_dir: Path, relative) -> Path:
    """`run_dir / relative` for a path read from a table or record of the run folder: relative, each part a plain
    name (no '..', no absolute path), and no part of it a link, else a one-line error naming it."""
    parts = str(relative).split("/")
    if not relative or any(p in ("", ".", "..") or "\\" in p or "\x00" in p for p in parts):
        raise HawqError(f"run folder {run_dir}: the path {str(relative)[:120]!r} it records is not a path inside "
                        f"the folder (valid: names joined by '/', no '..')")
    path = Path(run_dir)
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise HawqError(f"run folder {run_dir}: {'/'.join(parts)} passes through a symbolic link; a run reads "
                            f"only its own files")
    return path
