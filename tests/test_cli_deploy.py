"""`hawq-ray compile` and `hawq-ray verify --tvm`: a loadable, bit-exact library; bad input is one line."""
import json

import numpy as np
import pytest
import torch

from hawq_ray.service.cli import main
from hawq_ray.deploy.build import load_model
from hawq_ray.contract import HawqError
from hawq_ray.program.executor import run_program
from hawq_ray.program.program import IntegerProgram


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled")
    assert main(["compile", "--bits", "uniform4", "--batch", "4", "--out", str(out)]) == 0
    return out


def test_compiled_library_loads_and_matches_the_integer_executor(compiled):
    model = load_model(compiled)
    manifest = json.loads((compiled / "manifest.json").read_text())
    assert manifest["input_shape"] == [4, 1, 16, 16] and manifest["input_dtype"] == "int8"
    assert set(manifest["bits"].values()) == {4, 8}
    program = IntegerProgram.load(compiled / "program")
    x = program.quantize_input(torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(3)))
    got = model(x.numpy())
    want = run_program(program, x).numpy()
    assert got.shape == want.shape and np.array_equal(got.astype(np.int64), want)


def test_corrupt_manifest_is_one_line_error(compiled, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in compiled.iterdir():
        if f.is_file():
            (bad / f.name).write_bytes(f.read_bytes())
    (bad / "manifest.json").write_text("{not json")
    with pytest.raises(HawqError, match="corrupt manifest"):
        load_model(bad)


def test_verify_tvm_reports_zero_differences(capsys):
    assert main(["verify", "--bits", "uniform8", "--inputs", "4", "--tvm", "--json"]) == 0
    obj = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert obj["tvm_differing"] == 0 and obj["tvm_elements"] == 40 and obj["differing"] == 0
    assert obj["tvm_first_divergence"] is None and obj["tvm_values"] >= 10
    per_layer = {r["layer"]: r["tvm_vs_int_diff"] for r in obj["layers"]}
    assert set(per_layer.values()) == {0} and "fc" in per_layer


@pytest.mark.parametrize("argv,needle", [
    (["compile", "--bits", "uniform4", "--target", "cuda", "--out", "/tmp/x"], "cuda"),
    (["compile", "--bits", "uniform4", "--target", "tpu", "--out", "/tmp/x"], "tpu"),
])
def test_compile_bad_target(capsys, argv, needle):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_config_for_another_model_is_refused(capsys, tmp_path):
    cfg = tmp_path / "resnet20.json"
    cfg.write_text(json.dumps({"features.init_block.conv.conv": 8, "output": 8}))
    assert main(["compile", "--bits", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "unknown layers" in capsys.readouterr().err


class _RunsCode:
    """Unpickling this would create a file: the payload a crafted checkpoint carries."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_crafted_checkpoint_is_refused_and_nothing_runs(capsys, tmp_path):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "state.pt"
    torch.save({"model": _RunsCode(str(marker))}, ckpt)
    assert not marker.exists()
    assert main(["compile", "--bits", "uniform4", "--checkpoint", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(ckpt) in err
    assert not marker.exists()
