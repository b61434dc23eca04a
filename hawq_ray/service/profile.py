"""The latency stage: per-layer kernel latencies of the uniform4 and uniform8 programs on the nodes of one kind.

    table = profile_layers(model, batch=8, resource="t4", how=Measure(actors=2), cache_dir="~/.cache/hawq-ray")

1. The kind: with a Ray session open (or $RAY_ADDRESS, or a `resource` asked), the nodes holding `resource`
   (every node when None), probed for their target and CPUs (`actors.profiler`); otherwise this machine, read
   without Ray (`actors.profiler.local_kind`).
2. The driver plans the kernels of each program once for that target (`analysis.latency.plan_program`, the
   calls the whole-model build makes), dedupes them by signature and looks each up in the disk cache (key:
   target, threads, batch, signature, timing). A run with every item cached starts no actor, and a local run
   with every item cached does not even start Ray.
3. The rest is measured by profiler actors (`actors.profiler.measure`) on the Ray session this front opens
   (`service.session.connect`: a private local Ray sized to this machine's CPUs when nothing else is given).
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable

import pandas as pd

from actors.profiler import Kind, Measure, kind_nodes, local_kind, measure, probe_kind
from hawq_ray.analysis import latency as P
from hawq_ray.contract import HawqError
from hawq_ray.contract.bits import parse_bits
from hawq_ray.contract.table import COL


def _target_spec(target) -> str:
    """The kind of target ("llvm" or "cuda") and attributes given, as a string parse_target reads."""
    return json.dumps(target) if isinstance(target, dict) else str(target)


def _cluster_kind(spec: str, resource: str | None, gpu: bool) -> Kind:
    nodes = kind_nodes(resource, gpu)
    target, threads = probe_kind(nodes, spec)
    return Kind(spec, target, threads, resource, gpu, sum(float(n["Resources"].get("CPU", 0)) for n in nodes))


def profile_layers(model, input_shape=None, *, batch: int = 8, target="llvm", resource: str | None = None,
                   how: Measure = Measure(), cache_dir=None, checks: dict | None = None, fp32: bool = True,
                   table: pd.DataFrame | None = None, progress: Callable | None = None,
                   address: str | None = None) -> pd.DataFrame:
    """The layer table of `model` with lat4_ms, lat8_ms (glue4_ms, glue8_ms) and lat32_ms measured on the nodes
    holding `resource` (any node when None) for their `target` ("llvm" or "cuda"), at `batch`.

    `checks` ({name: bits config}) adds configs whose compiled model is timed end to end beside uniform4 and
    uniform8. attrs: "end_to_end" ([{config, sum_ms, e2e_ms, ratio, rest_ms}]), "breakdown" ({config: [{kernel,
    layer, glue, ms}]}, every kernel call of uniform4/uniform8 and the layer it is charged to), "target",
    "threads", "batch", "resource", "items" (unique kernels, models and fp32 layers), "cache_hits", "measured",
    "nodes", "restarts", "actors", "stage_seconds", "seconds". Joins Ray at `address` (see
    `service.session.connect`) when something must be measured.
    """
    import ray

    from hawq_ray.quant.layers import layer_table
    from hawq_ray.deploy.target import is_gpu, parse_target
    from hawq_ray.inputs.models import input_shape as model_input_shape
    from hawq_ray.service.session import connect
    t0 = time.perf_counter()
    if batch < 1 or how.actors < 1 or how.rounds < 1:
        raise HawqError(f"batch={batch} actors={how.actors} rounds={how.rounds}: each must be a positive integer")
    spec = _target_spec(target)
    gpu = is_gpu(target)
    shape = tuple(input_shape or model_input_shape(model))
    table = layer_table(model, shape) if table is None else table
    if table.empty:
        raise HawqError("the model has no quantizable layer (Conv2d or Linear) to profile")
    configs = {cfg: cfg for cfg in P.CONFIGS} | dict(checks or {})
    bits = {name: parse_bits(cfg, table) for name, cfg in configs.items()}
    programs, seconds = {}, {}

    def program(cfg):   # built (or read from the cache) only when a plan or an actor needs it
        if cfg not in programs:
            programs[cfg] = P.latency_program(model, shape, bits[cfg], cache_dir, table)
        return programs[cfg]
    layers = P.layer_inputs(model, shape, list(table[COL.layer])) if fp32 else {}
    t1 = time.perf_counter()
    clustered = ray.is_initialized() or resource is not None or address or os.environ.get("RAY_ADDRESS")
    if clustered:
        connect(address)
        kind = _cluster_kind(spec, resource, gpu)
    else:
        tgt, threads = local_kind(spec, cache_dir)
        kind = Kind(spec, tgt, threads, None, gpu, float(threads))
    seconds["probe"] = round(time.perf_counter() - t1, 3)

    t1 = time.perf_counter()
    plans, keys = {}, {}
    for cfg in configs:
        keys[cfg] = P.plan_key(P.program_key(model, shape, bits[cfg]), batch, kind.target)
        plans[cfg] = P.load_plan(cache_dir, keys[cfg])
        if plans[cfg] is None:
            plans[cfg] = P.plan_program(program(cfg), batch, parse_target(kind.target, check=False), cfg)
            P.save_plan(cache_dir, keys[cfg], plans[cfg])
    extra = [cfg for cfg in configs if cfg not in P.CONFIGS]
    items = P.plan_items({cfg: plans[cfg] for cfg in P.CONFIGS})
    items += [P.Item(plans[cfg].model_sig, "model", cfg, -1, f"model {cfg}") for cfg in extra
              if plans[cfg].model_sig not in {it.sig for it in items}]
    t_items, torch_sig = P.torch_items(layers, batch, "cuda" if gpu else "cpu")
    items += t_items

    timing = (how.rounds, how.min_ms)
    results, missing = {}, []
    for it in items:
        hit = P.read_cached(cache_dir, P.cache_key(kind.target, kind.threads, batch, it.sig, timing))
        if hit is not None:
            results[it.sig] = hit
        else:
            missing.append(it)
    seconds["plan"] = round(time.perf_counter() - t1, 3)
    stats = {"restarts": 0, "nodes": set(), "actors": 0, "threads": set(), "seconds": {}}
    if missing:
        if not clustered:
            connect(num_cpus=kind.threads)
            here = _cluster_kind(spec, None, gpu)
            if (here.target, here.threads) != (kind.target, kind.threads):
                raise HawqError(f"the local Ray node reports {here.target} with {here.threads} CPUs, not "
                                f"{kind.target} with {kind.threads}")
            kind = here
        t1 = time.perf_counter()
        needed = {it.config for it in missing if it.kind != "torch"}
        calls = {cfg: _calls(plans[cfg], program(cfg), batch, kind, cfg) for cfg in needed}
        seconds["programs"] = round(time.perf_counter() - t1, 3)
        measured, stats = measure(missing, programs={cfg: program(cfg) for cfg in needed}, calls=calls,
                                  layers=layers, batch=batch, kind=kind, how=how, progress=progress)
        for it in missing:
            res = measured[it.sig] | {"name": it.name, "kind": it.kind}
            P.write_cached(cache_dir, P.cache_key(kind.target, kind.threads, batch, it.sig, timing), res)
            results[it.sig] = res
    ms = {sig: float(r["ms"]) for sig, r in results.items()}
    lat32 = {layer: ms[sig] for layer, sig in torch_sig.items()} if fp32 else None
    out = P.latency_table(table, {cfg: plans[cfg] for cfg in P.CONFIGS}, ms, lat32)
    e2e = {name: ms[plans[name].model_sig] for name in configs}
    out.attrs.update(
        end_to_end=P.summary_rows(out, bits, e2e), breakdown={cfg: P.breakdown(plans[cfg], ms) for cfg in P.CONFIGS},
        target=kind.target, threads=kind.threads, batch=batch, resource=resource,
        items=len(items), kernels=sum(it.kind == "kernel" for it in items), cache_hits=len(items) - len(missing),
        measured=len(missing), nodes=sorted(stats["nodes"]), restarts=stats["restarts"],
        actors=stats["actors"], tvm_threads=sorted(stats["threads"]), stage_seconds=seconds | stats["seconds"],
        seconds=round(time.perf_counter() - t0, 3))
    return out


def _calls(plan, program, batch: int, kind: Kind, cfg: str) -> list:
    """The plan's kernel calls: planned now when the plan was read from disk (the same kernels: the plan's key
    holds the deploy package's source)."""
    if plan.calls is not None:
        return plan.calls
    from hawq_ray.deploy.target import parse_target
    fresh = P.plan_program(program, batch, parse_target(kind.target, check=False), cfg)
    if fresh.sigs != plan.sigs:
        raise HawqError(f"the saved kernel plan of {cfg} no longer matches its program: delete the cache folder")
    plan.calls = fresh.calls
    return plan.calls
