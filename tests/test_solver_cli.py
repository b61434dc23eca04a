"""`hawq-ray solve` / `hawq-ray sweep`: outputs, --json, and one-line errors with exit status 2."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

import hawq_ray.service.cli
from hawq_ray.contract.bits import read_bits

DATA = Path(__file__).parent / "data"


@pytest.fixture
def cli(monkeypatch, capsys):
    monkeypatch.setattr(hawq_ray.service.cli, "COMMAND_MODULES", ("solve",))

    def run(*argv):
        code = hawq_ray.service.cli.main([str(a) for a in argv])
        out, err = capsys.readouterr()
        return code, out, err
    return run


def small_table(tmp_path, **changes) -> Path:
    t = pd.DataFrame({"layer": ["conv1", "a", "b", "fc"], "kind": ["conv", "conv", "conv", "linear"],
                      "params": [1000, 2 ** 20, 2 ** 21, 1000], "macs": [10 ** 6, 10 ** 9, 2 * 10 ** 9, 1000],
                      "group": ["", "", "", ""], "fixed_bits": ["8", "", "", "8"],
                      "trace": [1.0, 2.0 ** 20, 2.0 ** 21, 1.0], "delta4": [1.0, 1.0, 3.0, 1.0],
                      "delta8": [0.1, 0.1, 0.1, 0.1], "lat4_ms": [1.0, 1.0, 1.0, 1.0], "lat8_ms": [1.0, 2.0, 2.0, 1.0]})
    t = t.assign(**changes)
    path = tmp_path / "layers.parquet"
    t.to_parquet(path)
    return path


def test_solve_prints_bits_totals_and_json(cli, tmp_path):
    table = small_table(tmp_path)
    # size 0.5 over a, b: all 4 bit 1.5 MiB, all 8 bit 3 MiB, limit 2.25 MiB. Omega = delta (trace/params = 1):
    # a at 8 -> 2.0 MiB, Omega 0.1 + 3.0 = 3.1; b at 8 -> 2.5 MiB, over the limit; both at 4 -> Omega 4.0.
    code, out, _ = cli("solve", "--table", table, "--size", "0.5", "--out", tmp_path / "c.json", "--json")
    assert code == 0
    assert read_bits(tmp_path / "c.json") == {"conv1": 8, "a": 8, "b": 4, "fc": 8}
    assert "conv1  8  (fixed)" in out and "totals, model (fixed layers included)" in out
    last = json.loads(out.strip().splitlines()[-1])
    assert last["totals"]["searchable"]["size_mib"] == pytest.approx(2.0)
    assert last["totals"]["model"]["size_mib"] == pytest.approx(2.0 + 2000 / 2 ** 20)
    assert last["objective"] == pytest.approx(0.1 + 3.0)
    code, out, _ = cli("solve", "--table", table, "--size-mib", "2.0", "--out", tmp_path / "c.py")
    assert code == 0 and read_bits(tmp_path / "c.py") == {"conv1": 8, "a": 4, "b": 4, "fc": 8}


def test_sweep_writes_configs_and_points(cli, tmp_path):
    table = small_table(tmp_path)
    code, out, _ = cli("sweep", "--table", table, "--size", "0:1:0.25", "--latency", "0.5,1",
                       "--out", tmp_path / "s.csv", "--json")
    assert code == 0 and "Pareto frontier" in out
    points = pd.read_csv(tmp_path / "s.points.csv")
    configs = pd.read_csv(tmp_path / "s.csv")
    assert len(points) == 10 and set(points.columns) >= {"size", "latency", "feasible", "config"}
    assert configs.points.sum() == points.feasible.sum()
    last = json.loads(out.strip().splitlines()[-1])
    assert last["points"] == 10 and last["configs"] == len(configs)


@pytest.mark.parametrize("argv,match", [
    (["solve", "--table", "{t}", "--latency", "0.5"], None),
    (["solve", "--table", "{dir}/nope.csv", "--bops", "0.5"], r"--table .*nope.csv: no such file"),
    (["solve", "--table", "{t}", "--bops", "-1"], r"argument --bops: '-1' is not valid; valid: a number >= 0 and <= 1"),
    (["solve", "--table", "{t}", "--gbops", "0.001"], r"smallest achievable is gbops=48.0641 "),
    (["solve", "--table", "{t}", "--bops", "0.5", "--bits", "4,x"], r"--bits 4,x"),
    (["sweep", "--table", "{t}"], r"give at least one budget axis"),
    (["sweep", "--table", "{t}", "--bops", "1:0:0.1"], r"--bops: budget axis '1:0:0.1'"),
    (["sweep", "--table", "{t}", "--bops=-1,-2"], r"no budget point is feasible"),
])
def test_bad_input_exits_2_with_one_line(cli, tmp_path, argv, match):
    table = small_table(tmp_path).with_suffix(".csv")
    pd.read_parquet(small_table(tmp_path)).drop(columns=["lat4_ms", "lat8_ms"]).to_csv(table, index=False)
    argv = [a.format(t=table, dir=tmp_path) for a in argv]
    code, out, err = cli(*argv)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"hawq-ray {argv[0]}: error: ")
    if match is None:   # latency budget without latency columns
        match = r"budget latency=0.5: the layer table has no latency columns \(lat4_ms, lat8_ms\)"
    import re
    assert re.search(match, err), err


@pytest.mark.parametrize("changes,match", [
    ({"trace": [1.0, float("nan"), 1.0, 1.0]}, r"--table .*: layer table: column 'trace' of layer 'a' is nan"),
    ({"group": ["g", "g", "", ""]}, r"group 'g' disagrees on fixed_bits \(conv1=8, a=empty\)"),
])
def test_bad_tables_exit_2(cli, tmp_path, changes, match):
    code, _, err = cli("solve", "--table", small_table(tmp_path, **changes), "--bops", "0.5")
    import re
    assert code == 2 and re.search(match, err), err


def test_misspelt_column_in_csv(cli, tmp_path):
    t = pd.read_parquet(small_table(tmp_path)).rename(columns={"delta8": "delta_8"})
    t.to_csv(tmp_path / "t.csv", index=False)
    code, _, err = cli("solve", "--table", tmp_path / "t.csv", "--bops", "0.5")
    assert code == 2 and "missing column 'delta8' (found 'delta_8': misspelt?)" in err
