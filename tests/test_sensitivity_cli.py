"""`hawq-ray sensitivity`: table written, cache hit on a second identical call, one-line errors."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

import hawq_ray.service.cli as cli

FAST = ["--batches", "1", "--batch-size", "8", "--max-iter", "4", "--min-iter", "4"]


@pytest.fixture(autouse=True)
def with_sensitivity_command(monkeypatch):
    if "sensitivity" not in cli.COMMAND_MODULES:
        monkeypatch.setattr(cli, "COMMAND_MODULES", (*cli.COMMAND_MODULES, "sensitivity"))


def run(argv, capsys):
    code = cli.main(["sensitivity", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_writes_table_then_second_identical_call_is_cached(tmp_path, capsys):
    out = tmp_path / "sens.parquet"
    code, stdout, err = run([*FAST, "--out", str(out), "--json"], capsys)
    assert code == 0, err
    first = json.loads(stdout.strip().splitlines()[-1])
    assert first["cached"] is False and first["data"] == "digits" and first["iterations"] == 4
    table = pd.read_parquet(out)
    expected = ["layer", "kind", "params", "macs", "product_macs", "narrow_product_macs", "act_elements", "group", "fixed_bits", "trace",
                "trace_stderr", "trace_samples", "trace_converged", "delta4", "delta8", "omega4", "omega8"]
    assert list(table.columns) == expected and len(table) == first["layers"] > 0
    assert "hessian traces" in err  # the progress bar goes to stderr

    out.unlink()
    code, stdout, err = run([*FAST, "--out", str(out), "--json"], capsys)
    second = json.loads(stdout.strip().splitlines()[-1])
    assert code == 0 and second["cached"] is True
    assert "hessian traces" not in err                  # no trace was computed (its progress bar never started)
    pd.testing.assert_frame_equal(pd.read_parquet(out), table)

    code, stdout, _ = run([*FAST, "--seed", "1", "--out", str(out), "--json"], capsys)
    assert json.loads(stdout.strip().splitlines()[-1])["cached"] is False


def test_bad_input_exits_2_with_one_line(tmp_path, capsys):
    from hawq_ray.inputs.models import get_model

    wrong = tmp_path / "wrong.pt"
    torch.save({"conv.weight": torch.zeros(3, 3)}, wrong)
    state = get_model().state_dict()
    nan = tmp_path / "nan.pt"
    torch.save({k: (torch.full_like(v, float("nan")) if v.is_floating_point() else v) for k, v in state.items()}, nan)
    empty = tmp_path / "empty"
    for split in ("train", "val"):
        (empty / split / "a").mkdir(parents=True)
    cases = [(["--weights", str(wrong)], "does not match"), (["--weights", str(nan)], "loss is nan"),
             (["--data", str(empty)], "empty"), (["--batches", "0"], "--batches"),
             (["--tol", "-1"], "tol"), (["--seed", "-2"], "seed")]
    for extra, match in cases:
        code, _, err = run([*FAST, *extra, "--out", str(tmp_path / "s.parquet")], capsys)
        lines = [l for l in err.splitlines() if l.startswith("hawq-ray sensitivity: error:")]
        assert code == 2 and len(lines) == 1 and match in lines[0].lower(), (extra, err)
