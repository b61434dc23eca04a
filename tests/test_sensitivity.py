"""Per-layer Hutchinson traces (plain and deflated) in one process, checked against the exact Hessian and pyhessian."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from hawq_ray.contract import HawqError
from hawq_ray.contract.cost import omega
from hawq_ray.analysis.sensitivity import (layer_traces, merge_samples, orthonormal_rows, rademacher,
                                           sensitivity_columns, shard_weights, subspace_block_traces, weight_deltas)
from sensitivity_models import exact_block_traces, tiny_batches, tiny_model

LAYERS = ["0", "2", "6"]


@pytest.fixture(scope="module")
def tiny():
    model, batches = tiny_model(), tiny_batches()
    return model, batches, exact_block_traces(model, batches, LAYERS)


@pytest.fixture(scope="module")
def traces(tiny):
    model, batches, _ = tiny
    return layer_traces(model, batches, tol=0.05, max_iter=400, seed=0)


def test_each_layer_within_3_stderr_of_exact_block_trace(tiny, traces):
    _, _, exact = tiny
    assert traces["layer"].tolist() == LAYERS
    assert traces["trace_converged"].all() and traces["trace_samples"].iloc[0] < 400
    for row in traces.itertuples():
        assert row.trace_stderr <= 0.05 * abs(row.trace)
        assert abs(row.trace - exact[row.layer]) <= 3 * row.trace_stderr, (row, exact[row.layer])


def test_shards_are_weighted_by_their_size_not_equally():
    """Batches of 40, 4 and 4 samples: the Hessian of the mean loss weights them 40/48, 4/48, 4/48. Estimated to a
    tight tolerance, each layer's trace lies within 3 stderr of that exact trace, and the layers where weighting
    the three batches equally moves the exact trace by more than 5 stderr sit more than 3 stderr away from the
    equal-weight value (so do the layer sums): an equal weighting of the shards fails this test."""
    model, batches = tiny_model(), tiny_batches(sizes=(40, 4, 4))
    exact = exact_block_traces(model, batches, LAYERS)
    equal = exact_block_traces(model, batches, LAYERS, equal_weights=True)
    table = layer_traces(model, batches, tol=0.015, max_iter=3000, seed=0)
    moved = 0
    for row in table.itertuples():
        assert abs(row.trace - exact[row.layer]) <= 3 * row.trace_stderr, (row, exact[row.layer])
        if abs(exact[row.layer] - equal[row.layer]) > 5 * row.trace_stderr:
            moved += 1
            assert abs(row.trace - equal[row.layer]) > 3 * row.trace_stderr, (row, equal[row.layer])
    assert moved >= 2
    total, total_se = table["trace"].sum(), math.sqrt((table["trace_stderr"] ** 2).sum())
    assert abs(total - sum(exact.values())) <= 3 * total_se
    assert abs(total - sum(equal.values())) > 3 * total_se


def test_shard_weights_are_batch_sizes_over_the_total():
    batches = [(torch.zeros(n, 1), torch.zeros(n)) for n in (40, 4, 4)]
    assert shard_weights(batches) == {0: 40 / 48, 1: 4 / 48, 2: 4 / 48}
    # merged with these weights, per-shard means of per-sample values give the mean over all samples
    values = np.arange(48.0)
    per_shard = {(0, 0): values[:40].mean(), (1, 0): values[40:44].mean(), (2, 0): values[44:].mean()}
    assert merge_samples(per_shard, shard_weights(batches), 1)[0] == pytest.approx(values.mean(), rel=1e-15)


def test_sum_over_layers_agrees_with_pyhessian_whole_model_trace(tiny):
    """Plain Hutchinson (rank 0) is pyhessian's estimator, per layer: the layer sums agree with its trace()."""
    from pyhessian import hessian

    model, batches, exact = tiny
    traces = layer_traces(model, batches, tol=0.05, max_iter=400, seed=0, rank=0)
    samples = traces.attrs["samples"].sum(axis=1)  # per-iteration whole-model v^T H v (all params are weights)
    ours, ours_se = samples.mean(), samples.std(ddof=1) / math.sqrt(len(samples))
    x, y = torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])  # same data, same H
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pyhessian's backward(create_graph=True) warns of a reference cycle
        ph = np.asarray(hessian(model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)
                        .trace(maxIter=200, tol=-1e30))  # a very negative tol forces all iterations
    for p in model.parameters():
        p.grad = None
    ph_mean, ph_se = ph.mean(), ph.std(ddof=1) / math.sqrt(len(ph))
    combined = math.hypot(ours_se, ph_se)
    assert len(ph) == 200
    # the bar: within one combined standard error (deterministic at these seeds; z = 0.13 here)
    assert abs(ours - ph_mean) <= combined, (ours, ph_mean, combined)
    assert abs(ours - sum(exact.values())) <= 3 * ours_se


def test_rademacher_depends_on_seed_shard_and_iteration_only():
    params = [torch.zeros(3, 4), torch.zeros(7)]
    a = rademacher(params, 5, 1, 2)
    assert all(torch.equal(x, y) for x, y in zip(a, rademacher(params, 5, 1, 2)))
    assert all(set(x.unique().tolist()) == {-1.0, 1.0} for x in a)
    for other in [(6, 1, 2), (5, 0, 2), (5, 1, 3)]:
        assert not torch.equal(torch.cat([x.flatten() for x in a]),
                               torch.cat([x.flatten() for x in rademacher(params, *other)]))


def test_merge_weights_shards_by_size_and_ignores_arrival_order():
    rows = {(0, 0): np.array([1.0, 2.0]), (1, 0): np.array([3.0, 5.0])}
    weights = {0: 0.25, 1: 0.75}
    expected = [[0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * 5]]
    assert merge_samples(rows, weights, 1).tolist() == expected
    assert merge_samples(dict(reversed(rows.items())), weights, 1).tolist() == expected


def test_stops_at_max_iter_and_reports_unconverged_layers(tiny):
    model, batches, _ = tiny
    calls = []
    with pytest.warns(UserWarning, match="not converged"):
        table = layer_traces(model, batches, tol=1e-6, max_iter=6, min_iter=2, block=4,
                             progress=lambda t, worst: calls.append((t, worst)))
    assert (table["trace_samples"] == 6).all() and not table["trace_converged"].any()
    assert table.attrs["not_converged"] == LAYERS
    assert [t for t, _ in calls] == [4, 6] and all(w > 1e-6 for _, w in calls)


def test_eval_mode_is_used_and_the_mode_restored():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, bias=False), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(3 * 36, 4))
    model[1].running_mean.fill_(0.3)
    model[1].running_var.fill_(2.0)
    model.train()
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 4, (8,)))]
    table = layer_traces(model, batches, tol=0.0, max_iter=64, min_iter=64, block=64)
    assert model.training and float(model[1].running_mean[0]) == pytest.approx(0.3)
    exact = exact_block_traces(model, batches, ["0", "4"])  # in eval mode: running statistics
    for row in table.itertuples():
        assert abs(row.trace - exact[row.layer]) <= 3 * row.trace_stderr


def test_omega_is_eq8_with_negative_traces_as_zero():
    # Omega = Tr/n * delta: 2/4 * 0.5 = 0.25, and a negative trace gives 0
    assert omega([2.0, -1.0], [4, 2], [0.5, 0.3]).tolist() == [0.25, 0.0]


def test_sensitivity_columns_on_the_layer_table_with_deployed_quantizer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 4))
    model[1].running_var.uniform_(0.5, 2.0)
    model[1].weight.data.uniform_(0.5, 1.5)
    table = pd.DataFrame({"layer": ["0", "4"], "params": [27, 432]})
    traces = pd.DataFrame({"layer": ["4", "0"], "trace": [-0.5, 3.0], "trace_stderr": [0.1, 0.1],
                           "trace_samples": [8, 8], "trace_converged": [False, True]})
    with pytest.warns(UserWarning, match="negative Hessian trace"):
        out = sensitivity_columns(table, traces, weight_deltas(model, ["0", "4"]))
    # independent numpy: fold BN (eq. 16), symmetric per-channel scale, round half up, clamp
    bn = model[1]
    gain = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach().numpy()
    folded = {"0": model[0].weight.detach().numpy() * gain[:, None, None, None],
              "4": model[4].weight.detach().numpy()}
    for bits in (4, 8):
        qmax = 2 ** (bits - 1) - 1
        for layer, w in folded.items():
            w2 = w.reshape(len(w), -1).astype(np.float64)
            s = np.abs(w2).max(axis=1, keepdims=True) / qmax
            q = np.clip(np.floor(w2 / s + 0.5), -qmax - 1, qmax)
            delta = float(((q * s - w2) ** 2).sum())
            row = out.set_index("layer").loc[layer]
            assert row[f"delta{bits}"] == pytest.approx(delta, rel=1e-4)
            assert row[f"omega{bits}"] == pytest.approx(max(row["trace"], 0) / row["params"] * delta, rel=1e-4)
    assert out["layer"].tolist() == ["0", "4"] and out.loc[1, "trace"] == -0.5 and out.loc[1, "omega4"] == 0


def test_bad_input_is_one_line_hawq_error(tiny):
    model, batches, _ = tiny
    cases = [
        (lambda: layer_traces(nn.Sequential(nn.Flatten()), batches), "no quantizable layer"),
        (lambda: layer_traces(model, []), "empty"),
        (lambda: layer_traces(model, [(torch.zeros(0, 1, 8, 8), torch.zeros(0).long())]), "empty"),
        (lambda: layer_traces(model, [(torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4).long())]),
         "loss is nan"),
        (lambda: layer_traces(model, batches, layers=["nope"]), "not a module"),
        (lambda: layer_traces(model, batches, max_iter=0), "valid are"),
        (lambda: layer_traces(model, batches, seed=-1), "seed >= 0"),
        (lambda: layer_traces(model, batches, rank=-1), "rank >= 0"),
    ]
    for call, match in cases:
        with pytest.raises(HawqError, match=match) as info:
            call()
        assert "\n" not in str(info.value)


# ---------------------------------------------------------------- deflation (Hutch++ per block)
def test_subspace_block_traces_follow_the_matrix_identity():
    """Against explicit numpy matrices: each block's trace of H - (I-P) H (I-P), P = q^T q, for a basis that is
    not orthonormal (the identity needs none) and for an orthonormal one."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((12, 12))
    h = a + a.T
    slices = [slice(0, 3), slice(3, 8), slice(8, 12)]
    for q in (rng.standard_normal((4, 12)), orthonormal_rows(rng.standard_normal((4, 12)))):
        p = q.T @ q
        part = h - (np.eye(12) - p) @ h @ (np.eye(12) - p)
        expected = [np.trace(part[s, s]) for s in slices]
        assert np.allclose(subspace_block_traces(q, q @ h, slices), expected, rtol=1e-12, atol=1e-12)


def test_orthonormal_rows_are_orthonormal_and_drop_dependent_rows():
    rng = np.random.default_rng(1)
    y = rng.standard_normal((5, 40))
    q = orthonormal_rows(y)
    assert np.allclose(q @ q.T, np.eye(5), atol=1e-13)
    # the rows span the same space as the input: projecting y onto them changes nothing
    assert np.allclose(q.T @ (q @ y.T), y.T, atol=1e-12)
    dependent = orthonormal_rows(np.stack([y[0], 2 * y[0], y[1]]))
    assert not dependent[1].any() and np.allclose(dependent[[0, 2]] @ dependent[[0, 2]].T, np.eye(2), atol=1e-13)


def test_full_rank_deflation_gives_the_exact_block_traces():
    """With the rank at least the number of weights the basis spans everything: the traces are the exact ones
    (float32 Hv, so to 1e-5) and nothing is left to sample (stderr ~ 0)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.Tanh(), nn.Conv2d(2, 2, 3, bias=False), nn.Tanh(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 5, bias=False))  # 64 weights
    batches = tiny_batches(sizes=(10, 6))
    exact = exact_block_traces(model, batches, ["0", "2", "6"])
    table = layer_traces(model, batches, tol=0.0, max_iter=8, rank=100)
    assert table.attrs["rank"] == 64 and table.attrs["hv_products"] == 2 * (2 * 64 + 8)
    for row in table.itertuples():
        assert row.trace == pytest.approx(exact[row.layer], rel=1e-5, abs=1e-6), (row, exact[row.layer])
        assert row.trace_stderr <= 1e-5 * max(abs(row.trace), 1e-3)


def test_deflated_estimate_is_unbiased_on_a_part_rank_basis(tiny):
    """Rank 16 of 260 weights: most of each trace is the exact part; the rest, sampled, keeps the estimate
    within 3 stderr of the exact trace; the Hv count is the sketch and products plus one per shard and iteration."""
    model, batches, exact = tiny
    table = layer_traces(model, batches, tol=0.0, max_iter=96, min_iter=96, block=32, seed=4, rank=16)
    assert table.attrs["hv_products"] == 3 * (2 * 16 + 96)
    for row in table.itertuples():
        assert abs(row.trace - exact[row.layer]) <= 3 * row.trace_stderr, (row, exact[row.layer])
