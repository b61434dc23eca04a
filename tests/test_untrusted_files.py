"""Folders written by someone else run none of their code: a compiled model loads only its own library with
the manifest's SHA-256; the signing key; fine-tuning never unpickles Tune's state."""
from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from hawq_ray.contract import HawqError
from hawq_ray.contract.integrity import file_sha256, sign, signed, user_key
from hawq_ray.deploy import compile_program, export_model, load_model
from numpy_reference import make_program

EVIL_C = """
#include <stdio.h>
__attribute__((constructor)) static void run_on_load(void) {
    FILE *f = fopen("%s", "w"); if (f) { fputs("ran", f); fclose(f); }
}
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    prog, x = make_program(8, 255)
    return export_model(compile_program(prog, batch=2), tmp_path_factory.mktemp("model") / "m"), x


@pytest.fixture()
def evil(tmp_path):
    """A shared library whose constructor creates a marker file the moment anything loads it."""
    marker = tmp_path / "marker"
    src = tmp_path / "evil.c"
    src.write_text(EVIL_C % marker)
    lib = tmp_path / "evillib" / "x.so"
    lib.parent.mkdir()
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    return lib, marker


def copy_of(compiled, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(compiled[0], out)
    return out


def rewrite_manifest(out, **changes):
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(changes)
    (out / "manifest.json").write_text(json.dumps(manifest))


def refused(out, match):
    with pytest.raises(HawqError, match=match) as e:
        load_model(out)
    assert "\n" not in str(e.value)


def test_manifest_records_the_files_hashes(compiled):
    out, x = compiled
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["library_sha256"] == file_sha256(out / "model.so")
    assert manifest["params_sha256"] == file_sha256(out / "params.npz")
    assert load_model(out)(x).shape == tuple(manifest["output_shape"])


@pytest.mark.parametrize("where", ["relative", "absolute"])
def test_a_library_outside_the_folder_is_never_loaded(compiled, evil, tmp_path, where):
    lib, marker = evil
    out = copy_of(compiled, tmp_path)
    name = os.path.relpath(lib, out) if where == "relative" else str(lib)
    rewrite_manifest(out, library=name, library_sha256=file_sha256(lib))    # the attacker knows the hash too
    refused(out, "not a file of this folder")
    assert not marker.exists()


def test_a_symlinked_or_replaced_library_is_never_loaded(compiled, evil, tmp_path):
    lib, marker = evil
    out = copy_of(compiled, tmp_path)
    (out / "model.so").unlink()
    (out / "model.so").symlink_to(lib)
    refused(out, "not a file of this folder")
    (out / "model.so").unlink()
    shutil.copyfile(lib, out / "model.so")                                  # same name, other bytes
    refused(out, "SHA-256 is not the manifest's")
    assert not marker.exists()
    shutil.copyfile(compiled[0] / "params.npz", out / "params.npz")
    (out / "params.npz").write_bytes((out / "params.npz").read_bytes()[:-10] + b"0" * 10)
    shutil.copyfile(compiled[0] / "model.so", out / "model.so")
    refused(out, "params.npz: its SHA-256")


def test_an_old_manifest_without_hashes_is_refused(compiled, tmp_path):
    out = copy_of(compiled, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["library_sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    refused(out, "missing library_sha256")


def test_signing_key_is_private_and_signatures_check(tmp_path, monkeypatch):
    key = tmp_path / "cfg" / "signing.key"
    monkeypatch.setenv("HAWQ_RAY_KEY_FILE", str(key))
    first = user_key()
    assert key.stat().st_mode & 0o777 == 0o600 and len(first) == 32 and user_key() == first
    mac = sign(b"manifest")
    assert signed(b"manifest", mac) and not signed(b"manifest!", mac) and not signed(b"manifest", None)
    key.chmod(0o644)
    with pytest.raises(HawqError, match="chmod 600"):
        user_key()
    key.chmod(0o600)
    monkeypatch.setenv("HAWQ_RAY_KEY_FILE", str(tmp_path / "other.key"))
    assert not signed(b"manifest", mac)                      # another user's key: not this user's signature


def test_a_deploy_record_is_reused_only_for_its_program_and_its_bytes(compiled, evil, tmp_path, monkeypatch):
    """A run folder's module (`service.module_record`) is reused only when its signed record says it was built
    from this program, target and batch and its files are the bytes it was checked with; each other case is
    one reason, and never loads anything."""
    from hawq_ray.deploy.build import read_manifest
    from hawq_ray.service.module_record import RECORD_FILE, reusable_record, write_record
    monkeypatch.setenv("HAWQ_RAY_KEY_FILE", str(tmp_path / "key"))
    lib, marker = evil
    program = make_program(8, 255)[0]
    built = {"config": "c", "program_sha256": program.fingerprint(), "target": "llvm", "batch": 2, "inputs": 1}
    assert read_manifest(compiled[0])["program_sha256"] == program.fingerprint()

    def fresh():
        out = copy_of(compiled, tmp_path / f"m{len(list(tmp_path.iterdir()))}")
        write_record(out, {**built, "tvm_differing": 0, "tvm_elements": 10})
        return out

    out = fresh()
    assert reusable_record(out, built)[0]["tvm_differing"] == 0
    assert reusable_record(tmp_path / "none", built) == (None, "")
    other = make_program(4, 255)[0]                                        # fine-tuning changed the program
    assert other.fingerprint() != program.fingerprint()
    assert "another program" in reusable_record(out, {**built, "program_sha256": other.fingerprint()})[1]
    assert "another program" in reusable_record(out, {**built, "batch": 8})[1]
    with open(out / "model.so", "ab") as f:                                 # the library's bytes changed
        f.write(b"\0")
    assert "library changed" in reusable_record(out, built)[1]
    out = fresh()
    record = json.loads((out / RECORD_FILE).read_text())
    for forged in ({"tvm_differing": 0, "module": str(lib.parent)}, {"tvm_differing": 7}):   # fields not signed
        (out / RECORD_FILE).write_text(json.dumps({**record, **forged}))
        assert "not signed" in reusable_record(out, built)[1]
    (out / RECORD_FILE).write_text(json.dumps(record))
    rewrite_manifest(out, library_sha256=file_sha256(lib))                # a manifest made to match another library
    assert "not signed" in reusable_record(out, built)[1]
    good = fresh()
    monkeypatch.setenv("HAWQ_RAY_KEY_FILE", str(tmp_path / "another-users-key"))
    assert "not signed" in reusable_record(good, built)[1]                # signed by another user
    assert not marker.exists()


def test_a_module_of_another_program_is_refused_before_loading(compiled):
    out, _ = compiled
    load_model(out, program=make_program(8, 255)[0])
    with pytest.raises(HawqError, match="another integer program"):
        load_model(out, program=make_program(4, 255)[0])
