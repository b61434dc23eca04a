"""Which files may be trusted: content hashes, and signatures with a key of this user's.

A compiled model is native code, so loading one runs it. Its manifest records the SHA-256 of its library
(checked before loading), and a run folder records, for each module it compiled, an HMAC-SHA256 of that
manifest with a per-user key kept outside every run folder. Whoever can write the run folder but not the key
cannot make a resumed run load a library the run did not build: an unsigned or mismatched module is rebuilt.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from hawq_ray.contract.errors import HawqError

KEY_ENV = "HAWQ_RAY_KEY_FILE"


def digest(*parts) -> str:
    """The SHA-256 of JSON-able parts (settings, tables as JSON, other digests): what a cached result's inputs
    are recognized by. Not a signature (see `sign`)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def arrays_digest(named) -> str:
    """A short SHA-256 of named arrays (a state dict's tensors, data batches), each by its name, dtype, shape and
    bytes: what weights or data are recognized by."""
    import numpy as np
    h = hashlib.sha256()
    for name, a in named:
        a = np.ascontiguousarray(a.detach().cpu().numpy() if hasattr(a, "detach") else np.asarray(a))
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def key_file() -> Path:
    """$HAWQ_RAY_KEY_FILE, else $XDG_CONFIG_HOME/hawq-ray/signing.key (default ~/.config/hawq-ray/signing.key)."""
    if os.environ.get(KEY_ENV):
        return Path(os.environ[KEY_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "hawq-ray" / "signing.key"


def user_key() -> bytes:
    """This user's signing key, created on first use (32 random bytes, mode 600 in a folder of mode 700).
    A key readable or writable by others signs nothing."""
    path = key_file()
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:           # another process created it first: read theirs
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32))
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise HawqError(f"signing key {path}: mode {mode:o} lets other users read or change it; "
                        f"run chmod 600 {path}")
    key = path.read_text().strip()
    if len(key) != 64:
        raise HawqError(f"signing key {path}: not 64 hex digits; delete it and a new key is made")
    return bytes.fromhex(key)


def sign(data: bytes) -> str:
    return hmac.new(user_key(), data, hashlib.sha256).hexdigest()


def signed(data: bytes, signature) -> bool:
    """Whether `signature` is this user's signature of `data` (constant-time comparison)."""
    return isinstance(signature, str) and hmac.compare_digest(sign(data), signature)
