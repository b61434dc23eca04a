"""Two-node Ray cluster (ray.cluster_utils.Cluster): Hessian actors land on both nodes, the table is right."""
from __future__ import annotations

import numpy as np
import pytest
import ray
import torch
from ray.cluster_utils import Cluster

from actors.hessian import actor_layer_traces
from hawq_ray.analysis.sensitivity import layer_traces
from sensitivity_models import exact_block_traces, tiny_batches, tiny_model


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_actors_on_both_nodes_and_merged_table_correct(two_nodes):
    model, batches = tiny_model(), tiny_batches(sizes=(12, 12, 12, 12))
    settings = dict(tol=0.05, max_iter=200, seed=1)
    table = actor_layer_traces(model, batches, actors=2, **settings)
    alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(alive) == 2 and set(table.attrs["nodes"]) == alive
    exact = exact_block_traces(model, batches, ["0", "2", "6"])
    assert table["trace_converged"].all()
    for row in table.itertuples():
        assert abs(row.trace - exact[row.layer]) <= 3 * row.trace_stderr
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors' setting: the same numbers as one process
    try:
        assert np.array_equal(table.attrs["samples"], layer_traces(model, batches, **settings).attrs["samples"])
    finally:
        torch.set_num_threads(threads)
