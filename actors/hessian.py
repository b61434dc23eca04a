"""Per-layer Hessian traces on Ray: one `HessianActor` per device, each with a model replica and data shards.

Shard b is batch b of the data; actor a holds the shards b with b % n_actors == a and answers two questions:
H_b X for the rows of the deflation (`hawq_ray.analysis.sensitivity.hessian_products`), and for a block of
iterations the per-layer samples of each of its shards (`hawq_ray.analysis.sensitivity.shard_samples`, the
vectors seeded from (seed, b, t)). The driver keys every answer by (shard, iteration) and merges them with
`hawq_ray.analysis.sensitivity.iterate_traces` in sorted order, never in arrival order: the table is the same bit for
bit whatever the number of actors. An actor that dies is replaced and its whole block asked again; an
actor answers a question all at once, so an answer is either counted once or not at all.
"""
from __future__ import annotations

import copy
import time
import uuid
from typing import Callable, Sequence

import pandas as pd
import ray
import torch
from torch import nn

from actors.resources import actor_device, actor_options
from hawq_ray.analysis import sensitivity as S
from hawq_ray.contract import HawqError


@ray.remote
class HessianActor:
    """A model replica in eval mode and some data shards; keeps each shard's gradient graph between calls."""

    def __init__(self, model: nn.Module, shards: dict, layers: Sequence[str], criterion, threads: int, device: str):
        torch.set_num_threads(threads)
        self.model = model.to(device).eval()
        self.shards, self.criterion = shards, criterion
        self.positions = S.weight_positions(self.model, layers)
        self.graphs = {}

    def graph(self, b: int):
        if b not in self.graphs:
            self.graphs[b] = S.gradient_graph(self.model, self.shards[b], self.criterion)
        return self.graphs[b]

    def products(self, rows) -> dict:
        """{"node", "cpu_s", "answer": {shard: H_b rows}} for the (k, n) rows of the deflation."""
        cpu = time.process_time()
        out = {b: S.hessian_products(*self.graph(b), rows) for b in sorted(self.shards)}
        return {"node": ray.get_runtime_context().get_node_id(), "cpu_s": time.process_time() - cpu, "answer": out}

    def samples(self, seed: int, iterations: range, basis) -> dict:
        """{"node", "cpu_s", "answer": {(shard, t): per-layer sample}} for a block of iterations."""
        cpu, out = time.process_time(), {}
        for b in sorted(self.shards):
            rows = S.shard_samples(*self.graph(b), self.positions, seed, b, iterations, basis)
            out.update({(b, t): row for t, row in zip(iterations, rows)})
        return {"node": ray.get_runtime_context().get_node_id(), "cpu_s": time.process_time() - cpu, "answer": out}


def actor_layer_traces(model: nn.Module, batches, *, actors: int = 2, layers: Sequence[str] | None = None,
                       criterion=None, tol: float = 0.05, max_iter: int = 100, min_iter: int = 8, block: int = 4,
                       seed: int = 0, rank: int = S.DEFAULT_RANK, threads: int = 1, max_restarts: int = 3,
                       progress: Callable[[int, float], None] | None = None) -> pd.DataFrame:
    """`hawq_ray.analysis.sensitivity.layer_traces` computed by `actors` HessianActors (at most one per batch).

    Same columns; attrs also hold "nodes" (node ids of the actors that answered), "restarts" (actors
    replaced after dying) and "actor_cpu_s" (CPU seconds the actors spent on the answers counted).
    Uses the Ray instance already running (or starts a local one).
    """
    layers = list(layers) if layers is not None else S.quantizable_layers(model)
    batches = S.check_batches(batches)
    S.check_settings(tol, min_iter, max_iter, block, seed, rank)
    if actors < 1:
        raise HawqError(f"actors={actors}: valid is a positive number of Hessian actors")
    with S.eval_mode(model):
        positions = S.weight_positions(model, layers)
        S.check_loss(model, batches, criterion)
    n = min(actors, len(batches))
    options = actor_options(n, ray.cluster_resources())
    model_ref = ray.put(copy.deepcopy(model).cpu())
    shard_refs = [ray.put({b: batches[b] for b in range(len(batches)) if b % n == a}) for a in range(n)]
    run = uuid.uuid4().hex[:8]
    state = {"restarts": 0, "nodes": set(), "cpu_s": 0.0}

    def start(a: int):
        name = f"hessian-{run}-{a}-{state['restarts']}"
        return HessianActor.options(name=name, **options).remote(
            model_ref, shard_refs[a], layers, criterion, threads, actor_device(options))

    handles = [start(a) for a in range(n)]

    def ask(question) -> dict:
        """Every actor's answer to `question(handle)`, merged; an actor that died is replaced and asked again."""
        pending = {question(handles[a]): a for a in range(n)}
        got = {}
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            a = pending.pop(ref)
            try:
                answer = ray.get(ref)
            except ray.exceptions.RayActorError:
                if state["restarts"] >= max_restarts * n:
                    raise
                state["restarts"] += 1
                ray.kill(handles[a])
                handles[a] = start(a)
                pending[question(handles[a])] = a
                continue
            except ray.exceptions.RayTaskError as err:
                if isinstance(err.cause, HawqError):
                    raise err.cause from None
                raise
            state["nodes"].add(answer["node"])
            state["cpu_s"] += answer["cpu_s"]
            got.update(answer["answer"])
        return got

    def products(rows):
        ref = ray.put(rows)
        return ask(lambda h: h.products.remote(ref))

    shared = {}   # the basis, put into the object store once rather than with every block

    def sample_block(its: range, basis) -> dict:
        if "ref" not in shared or shared["basis"] is not basis:    # basis None: rank 0, plain Hutchinson
            shared.update(basis=basis, ref=ray.put(basis))
        return ask(lambda h: h.samples.remote(seed, its, shared["ref"]))

    params = [p for p in model.parameters() if p.requires_grad]
    try:
        table = S.iterate_traces(sample_block, products, layers, S.shard_weights(batches),
                                 S.layer_slices(params, positions), sum(p.numel() for p in params), rank=rank,
                                 seed=seed, tol=tol, min_iter=min_iter, max_iter=max_iter, block=block,
                                 progress=progress)
    finally:
        for h in handles:
            ray.kill(h)
    table.attrs.update(nodes=sorted(state["nodes"]), restarts=state["restarts"], actors=n,
                       actor_cpu_s=state["cpu_s"])
    return table
