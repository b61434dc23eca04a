"""ProfilerActor latency tables on a one-node Ray (num_cpus=2): every deployed kernel charged to exactly one
layer, identical kernels measured once, an actor killed mid-run loses nothing, the cache answers a second
run, a resource no node has fails at once, and the CLI. Timings themselves are checked in bench/, not here."""
from __future__ import annotations

from hawq_ray.service.session import start_local
import argparse
import json
from pathlib import Path

import pytest
import ray
import numpy as np
import torch
from torch import nn

from actors.profiler import Measure
from hawq_ray.service.profile import profile_layers
from hawq_ray.analysis import latency as P
from hawq_ray.contract import HawqError
from hawq_ray.inputs.models import get_model, input_shape
from hawq_ray.quant.qat import prepare

BATCH, ROUNDS = 2, 2
FAST = dict(batch=BATCH, how=Measure(actors=2, rounds=ROUNDS, min_ms=2.0))


@pytest.fixture(scope="module", autouse=True)
def ray_two_cpus():
    start_local(num_cpus=2)   # a fresh local Ray, started again if the raylet misses its 30 s
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def digits():
    model = get_model(None).eval()
    return model, tuple(input_shape(model))


@pytest.fixture(scope="module")
def killed_run(digits, tmp_path_factory):
    """A cold profile during which one ProfilerActor is killed as soon as the first build chunk is back."""
    model, shape = digits
    cache = tmp_path_factory.mktemp("profile-cache")
    killed = []

    def kill_one(done, total, stage):
        if not killed:
            names = sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                           if a["name"].startswith("profiler-"))
            killed.append(names[0])
            ray.kill(ray.get_actor(names[0]))

    table = profile_layers(model, shape, cache_dir=cache, progress=kill_one, batch=BATCH,
                           how=Measure(actors=2, rounds=ROUNDS, min_ms=2.0, chunk=1))
    return table, cache, killed


def independent_programs(model, shape):
    progs = {}
    for cfg in ("uniform4", "uniform8"):
        qm = prepare(model, cfg, shape).calibrate([torch.rand((3, *shape))])
        progs[cfg] = qm.to_integer()
    return progs


def test_glue_is_charged_to_its_consumer_or_at_the_output_edge_to_its_producer():
    class C:   # a call: args and outputs
        def __init__(self, args, outputs):
            self.args, self.outputs = args, outputs
    calls = [C(["x"], ["x@b"]),           # 0 input layout   -> consumed by conv a
             C(["x@b"], ["a"]),            # 1 conv a
             C(["a"], ["p"]),              # 2 pool           -> consumed (through 3) by conv b
             C(["p"], ["q"]),              # 3 requantize     -> consumed by conv b
             C(["q", "a"], ["b"]),         # 4 conv b (residual add of a)
             C(["b"], ["f"]),              # 5 flatten        -> consumed by dense c
             C(["f"], ["c"]),              # 6 dense c
             C(["c"], ["c@nchw"])]         # 7 output layout  -> nobody reads it: its producer, c
    layers = [None, "a", None, None, "b", None, "c", None]
    assert P.charge_glue(calls, layers) == ["a", "a", "b", "b", "b", "c", "c", "c"]


def test_every_deployed_kernel_is_charged_once_and_the_layers_add_up(digits, killed_run):
    from hawq_ray.deploy.build import compile_program
    model, shape = digits
    table, cache, _ = killed_run
    progs = independent_programs(model, shape)
    searchable = table["fixed_bits"].isna()
    for cfg, b in (("uniform4", 4), ("uniform8", 8)):
        deployed = [k["name"] for k in compile_program(progs[cfg], batch=BATCH).manifest["kernels"]]
        rows = table.attrs["breakdown"][cfg]
        assert [r["kernel"] for r in rows] == deployed               # every kernel the model calls, once
        assert {r["ms"] for r in rows} <= set(cached_ms(cache))        # each call reads a measurement
        glue = [r for r in rows if r["glue"]]
        assert len(glue) >= 3 and not any(r["kernel"].startswith(("conv2d_", "dense_")) for r in glue)
        per_layer, glue_of = {}, {}
        for r in rows:
            per_layer[r["layer"]] = per_layer.get(r["layer"], 0.0) + r["ms"]
            glue_of[r["layer"]] = glue_of.get(r["layer"], 0.0) + (r["ms"] if r["glue"] else 0.0)
        assert set(per_layer) == set(table["layer"])
        for row in table[searchable].itertuples():
            assert getattr(row, f"lat{b}_ms") == pytest.approx(per_layer[row.layer], rel=1e-12)
            assert getattr(row, f"glue{b}_ms") == pytest.approx(glue_of[row.layer], rel=1e-12)
        if cfg == "uniform8":   # the model's kernels add up to the column, glue included
            assert table["lat8_ms"].sum() == pytest.approx(sum(r["ms"] for r in rows), rel=1e-12)
    fixed = ~searchable
    assert fixed.sum() == 2 and (table.loc[fixed, "lat4_ms"] == table.loc[fixed, "lat8_ms"]).all()
    assert (table[["lat4_ms", "lat8_ms", "lat32_ms"]] > 0).all().all()


def cached_ms(cache) -> list:
    """The latency of every cached item, after checking it is the median of its rounds (numpy's)."""
    out = []
    for path in Path(cache).glob("latency/*/*.json"):
        entry = json.loads(path.read_text())
        assert len(entry["samples"]) == ROUNDS and entry["ms"] == float(np.median(entry["samples"])) > 0
        out.append(entry["ms"])
    return out


def test_each_item_is_measured_and_written_once(digits, killed_run):
    model, shape = digits
    table, cache, _ = killed_run
    convs = {(repr(m), tuple(x.shape)) for m, x in fp32_inputs(model, shape)}
    models = 2                                              # uniform4 and uniform8, end to end
    assert table.attrs["items"] == table.attrs["kernels"] + models + len(convs) == table.attrs["measured"]
    assert len(cached_ms(cache)) == table.attrs["items"]    # each written once


class Repeated(nn.Module):
    """A stem, k identical conv blocks, a pool and a classifier: blocks 1 .. k-2 are the same kernel."""

    def __init__(self, k: int):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.blocks = nn.Sequential(*[nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()) for _ in range(k)])
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


def test_identical_kernels_are_measured_once(tmp_path):
    """Two more identical blocks add four kernel calls and nothing to measure, and every call of the repeated
    blocks reads one and the same measurement."""
    seen = {}
    for k in (3, 5):
        torch.manual_seed(k)
        table = profile_layers(Repeated(k).eval(), (3, 8, 8), cache_dir=tmp_path / f"k{k}", **FAST)
        rows = table.attrs["breakdown"]
        for cfg in rows:
            middle = {r["ms"] for r in rows[cfg] if r["layer"] in {f"blocks.{i}.0" for i in range(1, k - 1)}}
            assert len(middle) == 1, cfg
        calls = sum(len(r) for r in rows.values())
        seen[k] = (calls, table.attrs["items"], table.attrs["kernels"], table.attrs["measured"],
                   len(cached_ms(tmp_path / f"k{k}")))
    assert seen[5][0] == seen[3][0] + 4 and seen[5][1:] == seen[3][1:]
    assert seen[3][2] < seen[3][0]                          # fewer kernels than calls: some were shared


def fp32_inputs(model, shape):
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, i[0])))
             for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        model(torch.zeros((BATCH, *shape)))
    for h in hooks:
        h.remove()
    return seen


def test_a_killed_actor_is_replaced_and_no_row_is_lost(killed_run):
    table, _, killed = killed_run
    assert len(killed) == 1
    assert table.attrs["restarts"] >= 1
    assert table["lat4_ms"].notna().all() and table["lat8_ms"].notna().all() and table["lat32_ms"].notna().all()
    assert len(table) == 10 and table["layer"].is_unique
    assert table.attrs["tvm_threads"] == [2]                   # TVM_NUM_THREADS = the node's CPUs


def test_a_warm_run_is_answered_by_the_cache(digits, killed_run):
    model, shape = digits
    table, cache, _ = killed_run
    again = profile_layers(model, shape, cache_dir=cache, **FAST)
    assert again.attrs["cache_hits"] == again.attrs["items"] == table.attrs["items"]
    assert again.attrs["measured"] == 0 and again.attrs["actors"] == 0
    for col in ("lat4_ms", "lat8_ms", "lat32_ms", "glue4_ms", "glue8_ms"):
        assert again[col].tolist() == table[col].tolist()
    # a different batch size is another key: nothing of it is cached
    other = P.cache_key(table.attrs["target"], table.attrs["threads"], BATCH + 1, "x", (ROUNDS, 2.0))
    assert other != P.cache_key(table.attrs["target"], table.attrs["threads"], BATCH, "x", (ROUNDS, 2.0))


@pytest.mark.timeout(60)
def test_a_resource_no_node_has_fails_at_once(digits):
    model, shape = digits
    seen = []
    with pytest.raises(HawqError, match="no node of the Ray cluster has resource 't4'"):
        profile_layers(model, shape, resource="t4", fp32=False, progress=lambda *a: seen.append(a), **FAST)
    assert not seen                                         # nothing was built or measured before the error
    assert not [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("profiler-")]


def run_cli(argv):
    from hawq_ray.service.cli import profile as cli_profile
    parser = argparse.ArgumentParser(prog="hawq-ray")
    cli_profile.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except HawqError as e:
        return f"error: {e}"


def test_cli_writes_the_table_and_prints_json_last(killed_run, tmp_path, capsys):
    table, cache, _ = killed_run
    out = tmp_path / "lat.parquet"
    rc = run_cli(["profile", "--batch", str(BATCH), "--rounds", str(ROUNDS), "--min-ms", "2", "--cache-dir", str(cache),
                  "--out", str(out), "--json"])
    assert rc == 0
    text = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(text[-1])
    assert summary["cache_hits"] == summary["items"] == table.attrs["items"]
    assert [r["config"] for r in summary["end_to_end"]] == ["uniform4", "uniform8"]
    assert any(line.startswith("uniform8") for line in text)
    import pandas as pd
    saved = pd.read_parquet(out)
    assert {"lat4_ms", "lat8_ms", "lat32_ms"} <= set(saved.columns) and len(saved) == len(table)
    uniform8 = next(r for r in summary["end_to_end"] if r["config"] == "uniform8")
    assert uniform8["sum_ms"] == pytest.approx(saved["lat8_ms"].sum(), rel=1e-9)
    assert run_cli(["profile", "--out", str(tmp_path / "lat.txt")]).startswith("error: --out")
