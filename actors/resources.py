"""Placement of actors on a Ray cluster: what each actor asks for, from the cluster's resources.

Actors ask for a fraction of a CPU so that the actors together leave one whole CPU free (half of a
1-CPU cluster): two live actors
holding `num_cpus=1` each on a 2-CPU node would starve every plain task (measured on Ray 2.60). Where the
cluster has GPUs each actor takes one whole GPU (one actor per device). SPREAD places them over the nodes.
"""
from __future__ import annotations


def actor_options(n_actors: int, resources: dict) -> dict:
    """Ray `.options(...)` for each of `n_actors` device actors, given `resources` = ray.cluster_resources()."""
    cpus = float(resources.get("CPU", 0))
    gpus = int(resources.get("GPU", 0))
    free = 1.0 if cpus >= 2 else cpus / 2
    share = min(1.0, (cpus - free) / n_actors)
    options = {"num_cpus": round(share, 4), "scheduling_strategy": "SPREAD"}
    if gpus >= n_actors:
        options["num_gpus"] = 1
    return options


def actor_device(options: dict) -> str:
    """The torch device an actor placed with `options` computes on."""
    return "cuda" if options.get("num_gpus") else "cpu"
