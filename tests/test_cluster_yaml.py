"""cluster.yaml against Ray's own cluster-config schema and validator, and against what the code asks a cluster for.

Nothing here contacts AWS: only Ray's pure config functions run (prepare_config merges the AWS defaults from a
file shipped with Ray; validate_config checks ray-schema.json), and a guard refuses any non-loopback connect.
"""
import copy
import json
import re
import socket
from pathlib import Path

import pytest
import yaml

from ray_cluster import documented_resources, missing_resources, node_type_resources, requested_resources

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "cluster.yaml"
# where the code that asks Ray for resources lives, and where examples of requests are written down
SOURCES = [ROOT / "actors", ROOT / "solver", ROOT / "hawq_ray"]
DOCS = SOURCES + [ROOT / "README.md", ROOT / "docs", ROOT / "tests" / "data"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    real = socket.socket.connect

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else address
        if isinstance(host, str) and host not in ("127.0.0.1", "::1", "localhost") and self.family != socket.AF_UNIX:
            raise AssertionError(f"test tried to reach {address}")
        return real(self, address)
    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture(scope="module")
def config():
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_schema_and_ray_validator(config):
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)             # the file as written
    prepared = prepare_config(copy.deepcopy(config))  # as `ray up` sees it: merged with Ray's AWS defaults
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]
    # our own commands replaced the defaults (the default setup installs a nightly wheel from a URL)
    assert prepared["setup_commands"] == config["setup_commands"]


def test_schema_rejects_a_broken_config(config):
    """The validator is live: a node type without resources, or an unknown key, fails."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(config)
    del bad["available_node_types"]["t4"]["resources"]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = copy.deepcopy(config)
    bad["head_start_commands"] = ["ray start --head"]
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


def test_t4_worker_type(config):
    types = config["available_node_types"]
    t4 = [t for t in types.values() if t["resources"].get("t4")]
    assert t4, "no node type carries the t4 resource"
    for t in t4:
        assert t["node_config"]["InstanceType"].startswith("g4dn.")
        assert t["resources"].get("GPU", 0) >= 1
        assert t["max_workers"] >= t.get("min_workers", 0) >= 0
    head = types[config["head_node_type"]]
    assert not head["resources"].get("GPU") and not head["resources"].get("t4")


def test_every_requested_resource_exists_on_some_node_type(config):
    code = requested_resources(SOURCES, configs=sorted((ROOT / "tests" / "data").glob("*.yaml")))
    docs = documented_resources([p for p in DOCS if p.exists()])
    assert "GPU" in code, "the scan no longer sees the actors' num_gpus: update ray_cluster._requests_in"
    assert "t4" in docs, "the profiler's t4 example is gone: keep the check honest"
    wanted = {**docs, **code}
    missing = missing_resources(wanted, config)
    assert not missing, f"resources asked for but on no node type of cluster.yaml: {missing}"
    declared = {k for r in node_type_resources(config).values() for k in r}
    assert {"CPU", "GPU", "t4"} <= declared


def test_the_scan_reads_requests(tmp_path):
    """The scanner itself, on a hand-written module: each way of asking is found, a run-time name is not."""
    src = tmp_path / "m.py"
    src.write_text(
        "import ray\n"
        "from ray import tune\n"
        "@ray.remote(num_gpus=1, resources={'a100': 1})\n"
        "class A: pass\n"
        "def f(resource='inf2', n=1):\n"
        "    opts = {}\n"
        "    opts['resources'] = {resource: 1e-3}\n"
        "    opts['num_gpus'] = 0\n"
        "    tune.with_resources(f, {'cpu': 1, 'tpu': 1})\n"
        "    g(profile_resource='h100')\n"
        "    A.options(num_gpus=0).remote()\n")
    found = requested_resources([src])
    assert set(found) == {"GPU", "a100", "inf2", "tpu", "h100"}
    assert len(found["GPU"]) == 1   # num_gpus=1 counts; num_gpus=0 does not


def test_safe_defaults(config):
    """Token auth on every node, the dashboard on the head's loopback, no package index named in the file."""
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert re.search(r"RAY_AUTH_MODE=token ray start --head\b", head)
    assert "--dashboard-host=127.0.0.1" in head
    assert re.search(r"RAY_AUTH_MODE=token ray start --address=", worker)
    assert any("export RAY_AUTH_MODE=token" in c for c in config["initialization_commands"])
    assert "/home/ubuntu/.ray/auth_token" in config["file_mounts"]
    commands = [c for k in ("initialization_commands", "setup_commands", "head_setup_commands",
                            "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                for c in config.get(k) or []]
    assert any("pip install" in c and "-e ~/hawq-ray" in c for c in commands)
    for c in commands:
        assert not re.search(r"https?://|--index-url|--extra-index-url|\bpypi\b|pythonhosted", c), c
