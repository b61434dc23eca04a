"""The Ray session of a front (pipeline, CLI, Python API): the one place that initializes or joins Ray. Core
stages and actors use the session a front opened; they never start one."""
from __future__ import annotations

import os


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address`, else the one a `ray job submit` driver runs in ($RAY_ADDRESS), else
    start a private local Ray without a dashboard (never some cluster a `ray start` left on the machine);
    nothing when this process has joined one already. `num_cpus` sizes a local Ray."""
    import ray
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
