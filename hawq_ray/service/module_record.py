"""What a run folder keeps of a deployed config, beside its compiled module: `deploy.json`, the record of what the
module was built from and how its check went, signed with this user's key.

    deploy/<config>/model.so, params.npz, manifest.json    the module (`deploy.build.export_model`)
    deploy/<config>/deploy.json                            {config, program_sha256, target, batch, inputs,
                                                            tvm_differing, tvm_elements, compile_s, signature}

A resumed run reuses a module only when the record is signed by this user's key over the record and the
manifest (which holds the SHA-256 of the library and the params), was built from the same integer program
(`IntegerProgram.fingerprint`), target, batch and inputs, and the library and params still have the bytes the
check ran. Otherwise it says why and compiles the config again. The record names no path: the module's folder is
where the run put it, so a record cannot point a run at another library.
"""
from __future__ import annotations

import json
from pathlib import Path

from hawq_ray.contract import HawqError
from hawq_ray.contract.integrity import file_sha256, sign, signed
from hawq_ray.deploy.build import MANIFEST, read_manifest
from hawq_ray.service.outputs import write_atomic

RECORD_FILE = "deploy.json"


def write_record(folder: Path, record: dict) -> None:
    """Sign `record` (what the module in `folder` was built from, and its check) with its manifest and save it."""
    write_atomic(Path(folder) / RECORD_FILE, json.dumps({**record, "signature": sign(_signed_part(folder, record))}))


def reusable_record(folder: Path, built_from: dict) -> tuple[dict | None, str]:
    """(the record of the module in `folder`, '') when it may be reused for `built_from` (see the module's
    docstring), else (None, why not; '' when there is no module)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None, ""
    try:
        saved = json.loads((folder / RECORD_FILE).read_text())
        record = {k: v for k, v in saved.items() if k != "signature"}
        ok = signed(_signed_part(folder, record), saved.get("signature"))
    except (OSError, ValueError, AttributeError, TypeError):
        return None, "the saved module has no readable deploy record"
    if not ok:
        return None, "the saved module is not signed with this user's key (changed, or written elsewhere)"
    if any(record.get(k) != v for k, v in built_from.items()):
        return None, "the saved module was built from another program, target or batch"
    try:
        manifest = read_manifest(folder)
        changed = [k for k in ("library", "params") if file_sha256(folder / manifest[k]) != manifest[f"{k}_sha256"]]
    except (HawqError, OSError):
        return None, "the saved module's manifest cannot be read"
    if changed:
        return None, f"the saved module's {' and '.join(changed)} changed since it was checked"
    if manifest["program_sha256"] != built_from.get("program_sha256"):
        return None, "the saved module's manifest names another program"
    return record, ""


def _signed_part(folder: Path, record: dict) -> bytes:
    return json.dumps(record, sort_keys=True).encode() + b"\0" + (Path(folder) / MANIFEST).read_bytes()
