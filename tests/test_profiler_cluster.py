"""Two-node Ray cluster (ray.cluster_utils.Cluster) with different resource tags: a profile per tag is measured
on that tag's node only, and a tag no node has fails at once."""
from __future__ import annotations

import pytest
import ray
from ray.cluster_utils import Cluster

from actors.profiler import Measure
from hawq_ray.service.profile import profile_layers
from hawq_ray.contract import HawqError
from hawq_ray.inputs.models import get_model, input_shape

FAST = dict(batch=1, how=Measure(actors=1, rounds=2, min_ms=2.0), fp32=False)


@pytest.fixture(scope="module")
def two_kinds():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {"t4": 1},
                                                            "include_dashboard": False})
    cpu_node = cluster.add_node(num_cpus=2, resources={"cpu_kind": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield {"t4": cluster.head_node.node_id, "cpu_kind": cpu_node.node_id}
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def digits():
    model = get_model(None).eval()
    return model, tuple(input_shape(model))


def test_each_tag_gets_its_own_table_measured_on_its_own_node(two_kinds, digits, tmp_path):
    model, shape = digits
    # one cache for both: the programs are shared, the latencies are not (the nodes' CPU counts differ)
    tables = {tag: profile_layers(model, shape, resource=tag, cache_dir=tmp_path, **FAST) for tag in ("t4", "cpu_kind")}
    for tag, table in tables.items():
        threads = {"t4": 1, "cpu_kind": 2}[tag]
        assert table.attrs["nodes"] == [two_kinds[tag]]          # measured there and nowhere else
        assert table.attrs["resource"] == tag and table.attrs["threads"] == threads
        assert table.attrs["measured"] == table.attrs["items"] and table.attrs["tvm_threads"] == [threads]
        assert table["lat4_ms"].notna().all() and table["lat8_ms"].notna().all() and len(table) == 10
        assert "lat32_ms" not in table
    assert tables["t4"].attrs["nodes"] != tables["cpu_kind"].attrs["nodes"]


@pytest.mark.timeout(60)
def test_a_tag_no_node_has_fails_at_once_naming_the_tags_there_are(two_kinds, digits):
    model, shape = digits
    with pytest.raises(HawqError, match=r"resource 'v100'.*cpu_kind.*t4"):
        profile_layers(model, shape, resource="v100", **FAST)
