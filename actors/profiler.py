"""Kernel latencies measured by `ProfilerActor`s on the nodes of one kind (`analysis.latency` has the what and
why of the numbers, `service.profile` the stage; this module is where they are measured, on the Ray session
the front opened).

1. The nodes of the kind (`kind_nodes`): those holding the custom resource `resource` (e.g. "t4"), or every
   node when it is None. A resource no node has raises HawqError at once (checked against
   `ray.cluster_resources()`), never a pending actor. A zero-CPU task pinned to each of those nodes reports its
   target (TVM detects the CPU there, or checks for CUDA) and CPU count (`probe_kind`); nodes of one kind must
   agree (else tag them apart).
2. `measure` spreads the items round-robin over `actors` ProfilerActors (placed SPREAD over the kind's nodes,
   each reserving a fraction of a CPU so that plain tasks never starve); each actor gets the driver's planned
   kernel calls, so nothing is planned twice. Phase "build": all actors compile their items at once. Phase
   "time": on each node one actor at a time times its compiled items (nodes in parallel), with
   TVM_NUM_THREADS (and torch threads) = the node's CPUs, what the deployed model uses; so no compile or other
   profiler actor shares the node's cores while a kernel is timed.
3. An actor that dies loses only what it had not yet timed: it is replaced and the new actor builds and
   times those items in the next round; every answer is keyed by signature, so nothing is lost or counted
   twice.
"""
from __future__ import annotations

import json
import os
import statistics
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import ray

from hawq_ray.analysis import latency as P
from hawq_ray.contract import HawqError

PROBE_TIMEOUT_S = 180.0


def node_target(spec: str) -> dict:
    """The target `spec` resolves to on this machine (checked runnable here), as a plain dict."""
    from hawq_ray.deploy.target import parse_target, target_dict
    return target_dict(parse_target(spec))


@ray.remote(num_cpus=0)
def _probe(spec: str) -> dict:
    try:
        return {"target": node_target(spec), "error": None}
    except HawqError as e:
        return {"target": None, "error": str(e)}


@ray.remote
class ProfilerActor:
    """Builds and times items (`analysis.latency.Item`) for its node's target, keeping what it compiled."""

    def __init__(self, programs: dict, calls: dict, layers: dict, batch: int, spec: str, expected: dict,
                 threads: int):
        import torch
        os.environ["TVM_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)
        self.node = ray.get_runtime_context().get_node_id()
        here = node_target(spec)
        if here != expected:
            raise HawqError(f"node {self.node[:8]}: target {here} differs from the kind's {expected}")
        from hawq_ray.deploy.target import parse_target
        self.target = parse_target(expected)
        self.programs, self.calls, self.layers, self.batch, self.threads = programs, calls, layers, batch, threads
        self.timers, self.numbers = {}, {}

    def info(self) -> dict:
        import tvm_ffi
        return {"node": self.node, "threads": self.threads, "pid": os.getpid(),
                "tvm_threads": int(tvm_ffi.get_global_func("runtime.NumThreads")())}

    def _timer(self, item: P.Item):
        if item.kind == "torch":
            module, shape = self.layers[item.config]
            return P.torch_timer(module, shape, self.batch, "cuda" if self.target.kind.name == "cuda" else "cpu")
        if item.kind == "model":
            return P.model_timer(self.programs[item.config], self.calls[item.config], self.batch, self.target)
        return P.kernel_timer(self.calls[item.config][item.index].kernel, self.target)

    def build(self, items: list) -> list:
        for item in items:
            if item.sig not in self.timers:
                self.timers[item.sig] = self._timer(item)
        return [item.sig for item in items]

    def time(self, items: list, min_ms: float) -> dict:
        """One measurement of each item (the mean of n runs; n fixed at the item's first measurement, after
        its warm-up)."""
        self.build(items)
        out = {}
        for item in items:
            run = self.timers[item.sig]
            if item.sig not in self.numbers:
                self.numbers[item.sig] = P.warm_number(run, min_ms)
            out[item.sig] = float(run(self.numbers[item.sig]))
        return {"node": self.node, "ms": out, "number": {it.sig: self.numbers[it.sig] for it in items}}


# ---------------------------------------------------------------------------------------------- the kind

def kind_nodes(resource: str | None, gpu: bool) -> list:
    """Alive nodes of the kind; HawqError at once when the cluster has no such resource."""
    have = ray.cluster_resources()
    if resource is not None and have.get(resource, 0) <= 0:
        shown = sorted(k for k in have if not k.startswith("node:") and k not in ("memory", "object_store_memory"))
        raise HawqError(f"no node of the Ray cluster has resource {resource!r} (cluster resources: "
                        f"{', '.join(shown)}); start nodes with --resources='{{\"{resource}\": 1}}' or ask for "
                        "one of those")
    if gpu and have.get("GPU", 0) <= 0:
        raise HawqError("target cuda: no node of the Ray cluster has a GPU (use --target llvm)")
    nodes = [n for n in ray.nodes() if n.get("Alive")
             and (resource is None or n["Resources"].get(resource, 0) > 0)
             and (not gpu or n["Resources"].get("GPU", 0) > 0)]
    if not nodes:
        raise HawqError(f"no alive node has resource {resource!r}" + (" and a GPU" if gpu else ""))
    return nodes


def probe_kind(nodes: list, spec: str) -> tuple[dict, int]:
    """(target, threads) the kind's nodes agree on; HawqError when they differ or one cannot run `spec`."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
    refs = {n["NodeID"]: _probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
            .remote(spec) for n in nodes}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=PROBE_TIMEOUT_S)
    if len(ready) < len(refs):
        raise HawqError(f"{len(refs) - len(ready)} node(s) did not answer within {PROBE_TIMEOUT_S:.0f} s")
    kinds = {}
    for n in nodes:
        ans = ray.get(refs[n["NodeID"]])
        if ans["error"]:
            raise HawqError(f"node {n['NodeID'][:8]}: {ans['error']}")
        cpus = max(1, int(n["Resources"].get("CPU", 1)))
        kinds.setdefault(json.dumps([ans["target"], cpus], sort_keys=True), []).append(n["NodeID"][:8])
    if len(kinds) > 1:
        shown = "; ".join(f"{k} on {', '.join(v)}" for k, v in kinds.items())
        raise HawqError(f"the nodes to profile differ ({shown}): give each kind its own resource tag and "
                        "profile one tag at a time")
    target, threads = json.loads(next(iter(kinds)))
    return target, threads


def host_fingerprint() -> str:
    """This machine's CPU (model, flags, usable cores) and TVM version, read without importing TVM."""
    import platform
    from importlib.metadata import PackageNotFoundError, version
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    first = {}
    for line in lines:
        key, _, value = line.partition(":")
        first.setdefault(key.strip(), value.strip())
    try:
        tvm_version = version("apache-tvm")
    except PackageNotFoundError:
        tvm_version = "?"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return P.digest(platform.machine(), first.get("model name"), first.get("flags"), cores, tvm_version)


def local_kind(spec: str, cache_dir=None) -> tuple[dict, int]:
    """(target, threads) of this machine, as a local `ray.init(num_cpus=threads)` would make it. TVM's
    detection is remembered under the host's fingerprint, so a warm run need not import TVM."""
    key = P.digest(P.FORMAT, "target", spec, host_fingerprint())
    got = P.read_cached(cache_dir, key, "targets")
    if got is not None:
        return got["target"], got["threads"]
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    target = node_target(spec)
    P.write_cached(cache_dir, key, {"target": target, "threads": threads}, "targets")
    return target, threads


# ---------------------------------------------------------------------------------------------- measuring

@dataclass(frozen=True)
class Kind:
    """The nodes one measurement runs on, as `kind_nodes` and `probe_kind` found them."""
    spec: str                # the target as given ("llvm", "cuda", a JSON dict)
    target: dict             # what it resolves to on those nodes
    threads: int             # their CPUs: TVM_NUM_THREADS while timing
    resource: str | None     # the custom resource that tags them (None: every node)
    gpu: bool
    cpus: float              # CPUs of all those nodes together


@dataclass(frozen=True)
class Measure:
    """How items are measured: actors, interleaved rounds (the median is the latency), the length of one
    measurement, items per build call, and how often dead actors are replaced."""
    actors: int = 2
    rounds: int = 7
    min_ms: float = 30.0
    chunk: int = 3
    max_restarts: int = 3


def measure(items: list, *, programs: dict, calls: dict, layers: dict, batch: int, kind: Kind, how: Measure,
            progress: Callable | None = None) -> tuple[dict, dict]:
    """Build and time `items` on `how.actors` ProfilerActors; returns ({sig: result}, stats). `programs` and
    `calls` ({config: program / planned calls}) and `layers` ({layer: (module, input shape)}) are what the
    items refer to."""
    threads, rounds, min_ms, chunk, max_restarts = kind.threads, how.rounds, how.min_ms, how.chunk, how.max_restarts
    n = max(1, min(how.actors, len(items)))
    options = {"num_cpus": round(min(1.0, kind.cpus / 2 / n), 4), "scheduling_strategy": "SPREAD",
               "max_restarts": 0, "max_concurrency": 1,
               "runtime_env": {"env_vars": {"TVM_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}}}
    if kind.resource is not None:
        options["resources"] = {kind.resource: 1e-3}
    if kind.gpu:
        options["num_gpus"] = 1
    prog_ref, calls_ref, layer_ref = ray.put(programs), ray.put(calls), ray.put(layers)
    run = uuid.uuid4().hex[:8]
    stats = {"restarts": 0, "nodes": set(), "actors": n, "threads": set(), "seconds": {}}
    clock = time.perf_counter()

    def lap(stage: str):
        nonlocal clock
        now = time.perf_counter()
        stats["seconds"][stage] = round(stats["seconds"].get(stage, 0.0) + now - clock, 3)
        clock = now
    assigned = {s: items[s::n] for s in range(n)}
    done: dict = {}
    count = {"done": 0, "total": (1 + rounds) * len(items)}
    numbers: dict = {}
    time_chunk = max(chunk, 8)

    def tick(k: int, stage: str):
        count["done"] += k
        if progress is not None:
            progress(count["done"], count["total"], stage)

    def start(slot: int):
        name = f"profiler-{run}-{slot}-{stats['restarts']}"
        return ProfilerActor.options(name=name, **options).remote(prog_ref, calls_ref, layer_ref, batch, kind.spec,
                                                                  kind.target, threads)

    handles = {s: start(s) for s in range(n)}

    def lost(err) -> bool:
        """True for an actor that died (redo its items); a HawqError raised in an actor is raised here."""
        if isinstance(err, ray.exceptions.RayTaskError) and isinstance(err.cause, HawqError):
            raise err.cause from None
        text = str(err)
        if "HawqError: " in text:   # raised while the actor was being created: it died, but not by accident
            raise HawqError(text.split("HawqError: ", 1)[1].splitlines()[0]) from None
        return isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError))

    try:
        while True:
            todo = {s: [it for it in assigned[s] if it.sig not in done] for s in assigned}
            todo = {s: v for s, v in todo.items() if v}
            if not todo:
                break
            dead, node_of = set(), {}
            info = {handles[s].info.remote(): s for s in todo}
            ready, pending = ray.wait(list(info), num_returns=len(info), timeout=PROBE_TIMEOUT_S)
            if pending:
                raise HawqError(f"{len(pending)} profiler actor(s) could not be placed within "
                                f"{PROBE_TIMEOUT_S:.0f} s (resources asked: {options})")
            for ref in ready:
                try:
                    got = ray.get(ref)
                except Exception as err:  # noqa: BLE001  (an actor that died while starting)
                    if not lost(err):
                        raise
                    dead.add(info[ref])
                    continue
                node_of[info[ref]] = got["node"]
                stats["threads"].add(got["tvm_threads"])
            lap("start")
            # phase 1: every actor compiles its items, in chunks (progress, and a death loses one chunk)
            calls = {}
            for s, its in todo.items():
                if s in dead:
                    continue
                for k in range(0, len(its), chunk):
                    calls[handles[s].build.remote(its[k:k + chunk])] = (s, len(its[k:k + chunk]))
            while calls:
                [ref], _ = ray.wait(list(calls), num_returns=1)
                s, k = calls.pop(ref)
                try:
                    ray.get(ref)
                    tick(k, "build")
                except Exception as err:  # noqa: BLE001
                    if not lost(err):
                        raise
                    dead.add(s)
            lap("build")
            # phase 2: `rounds` rounds over every item; in each, per node one actor at a time measures a chunk
            # (nodes in parallel). The median over rounds is the latency: a load spike hits every item alike.
            samples: dict = {}
            for _ in range(rounds):
                queues: dict = {}
                for torch_items in (False, True):   # per node: every TVM item, then the torch ones
                    for s, its in todo.items():
                        its = [it for it in its if (it.kind == "torch") == torch_items]
                        if s not in dead:
                            queues.setdefault(node_of[s], []).extend(
                                (s, its[k:k + time_chunk]) for k in range(0, len(its), time_chunk))
                running = {}

                def submit(node):
                    while queues.get(node):
                        s, its = queues[node].pop(0)
                        if s not in dead:
                            running[handles[s].time.remote(its, min_ms)] = (node, s, its)
                            return

                for node in list(queues):
                    submit(node)
                while running:
                    [ref], _ = ray.wait(list(running), num_returns=1)
                    node, s, its = running.pop(ref)
                    try:
                        got = ray.get(ref)
                        for sig, ms in got["ms"].items():
                            samples.setdefault(sig, []).append(ms)
                        tick(len(its), "time")
                        node_of[s] = got["node"]
                        numbers.update(got["number"])
                    except Exception as err:  # noqa: BLE001
                        if not lost(err):
                            raise
                        dead.add(s)
                    submit(node)
            lap("time")
            for s, its in todo.items():
                if s in dead:
                    continue
                stats["nodes"].add(node_of[s])
                for it in its:
                    done[it.sig] = {"ms": statistics.median(samples[it.sig]), "samples": samples[it.sig],
                                    "number": numbers[it.sig], "node": node_of[s]}
            for s in dead:
                if stats["restarts"] >= max_restarts * n:
                    raise HawqError(f"profiler actors died {stats['restarts'] + 1} times; giving up")
                stats["restarts"] += 1
                ray.kill(handles[s])
                handles[s] = start(s)
                count["total"] += (1 + rounds) * sum(it.sig not in done for it in assigned[s])   # done again
    finally:
        for h in handles.values():
            ray.kill(h)
    return done, stats
