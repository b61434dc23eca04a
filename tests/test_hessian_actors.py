"""HessianActor traces on a one-node Ray: exact, identical for 1 and 2 actors, and after an actor is killed."""
from __future__ import annotations

from hawq_ray.service.session import start_local
import os

import numpy as np
import pandas as pd
import pytest
import ray
import torch

from actors.hessian import actor_layer_traces
from actors.resources import actor_device, actor_options
from hawq_ray.contract import HawqError
from sensitivity_models import exact_block_traces, tiny_batches, tiny_model

SETTINGS = dict(tol=0.05, max_iter=200, min_iter=8, block=4, seed=3)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    start_local(num_cpus=2)   # a fresh local Ray, started again if the raylet misses its 30 s
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny():
    model, batches = tiny_model(), tiny_batches(sizes=(30, 10, 8))   # unequal: the merge weights them by size
    return model, batches


@pytest.fixture(scope="module")
def one_actor(tiny):
    model, batches = tiny
    return actor_layer_traces(model, batches, actors=1, **SETTINGS)


def assert_identical(a: pd.DataFrame, b: pd.DataFrame):
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert np.array_equal(a.attrs["samples"], b.attrs["samples"])


def test_one_actor_matches_the_exact_hessian(tiny, one_actor):
    model, batches = tiny
    exact = exact_block_traces(model, batches, ["0", "2", "6"])
    assert one_actor.attrs["actors"] == 1 and one_actor["trace_converged"].all()
    for row in one_actor.itertuples():
        assert abs(row.trace - exact[row.layer]) <= 3 * row.trace_stderr


def test_two_actors_give_the_same_table_bit_for_bit(tiny, one_actor):
    model, batches = tiny
    two = actor_layer_traces(model, batches, actors=2, **SETTINGS)
    assert two.attrs["actors"] == 2 and two.attrs["restarts"] == 0
    assert_identical(one_actor, two)
    # and the same as one process with one torch thread (the actors' setting)
    assert_identical(one_actor, in_process_traces(model, batches, SETTINGS))


def test_plain_hutchinson_through_actors_is_the_in_process_estimate(tiny):
    """rank 0 (no deflation basis: run.yaml's `sensitivity.rank: 0`) through an actor: the in-process table bit
    for bit. The actors' sampling once read a basis reference that only a basis ever stored."""
    model, batches = tiny
    plain = {**SETTINGS, "rank": 0, "max_iter": 8}
    got = actor_layer_traces(model, batches, actors=1, **plain)
    assert got.attrs["rank"] == 0
    assert_identical(got, in_process_traces(model, batches, plain))


def in_process_traces(model, batches, settings: dict):
    """`layer_traces` in this process with one torch thread, the actors' setting."""
    from hawq_ray.analysis.sensitivity import layer_traces
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return layer_traces(model, batches, **settings)
    finally:
        torch.set_num_threads(threads)

def test_killed_actor_is_replaced_and_nothing_is_lost_or_counted_twice(tiny, one_actor, tmp_path):
    """The first actor to compute its loss dies inside that work (the loss function takes a one-off token file
    and ends its process); the driver replaces it, asks its block again, and the table equals the undisturbed
    one bit for bit (nothing lost, nothing counted twice)."""
    model, batches = tiny
    token, driver = str(tmp_path / "die-once"), os.getpid()
    open(token, "w").close()

    def loss_that_ends_the_first_actor(out, y):
        if os.getpid() != driver:
            try:
                os.rename(token, token + ".taken")          # atomic: exactly one actor takes the token
            except OSError:
                pass
            else:
                with open(token + ".taken", "w") as f:
                    f.write(str(os.getpid()))
                os._exit(1)
        return torch.nn.functional.cross_entropy(out, y)

    killed = actor_layer_traces(model, batches, actors=2, criterion=loss_that_ends_the_first_actor, **SETTINGS)
    victim = int(open(token + ".taken").read())
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)                                  # the actor's process is gone
    assert killed.attrs["restarts"] == 1
    assert_identical(one_actor, killed)


def test_bad_input_through_actors_is_one_line_hawq_error(tiny):
    model, batches = tiny
    nan = [(torch.full((4, 1, 8, 8), float("nan")), torch.zeros(4).long())]
    for call, match in [(lambda: actor_layer_traces(model, []), "empty"),
                        (lambda: actor_layer_traces(model, nan), "loss is nan"),
                        (lambda: actor_layer_traces(model, batches, actors=0), "actors=0")]:
        with pytest.raises(HawqError, match=match) as info:
            call()
        assert "\n" not in str(info.value)


def test_actor_options_leave_a_cpu_free_and_take_one_gpu_each():
    assert actor_options(2, {"CPU": 2.0}) == {"num_cpus": 0.5, "scheduling_strategy": "SPREAD"}
    assert actor_options(1, {"CPU": 2.0})["num_cpus"] == 1.0
    assert actor_options(4, {"CPU": 16.0})["num_cpus"] == 1.0
    assert actor_options(1, {"CPU": 1.0})["num_cpus"] == 0.5
    gpu = actor_options(2, {"CPU": 8.0, "GPU": 2.0})
    assert gpu["num_gpus"] == 1 and actor_device(gpu) == "cuda"
    assert actor_device(actor_options(3, {"CPU": 8.0, "GPU": 2.0})) == "cpu"
