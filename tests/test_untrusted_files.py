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
from test_deploy_reference import make_program

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
