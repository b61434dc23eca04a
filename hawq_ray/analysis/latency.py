"""Per-layer latencies of the deployed kernels (lat4_ms, lat8_ms, lat32_ms): the part that needs no Ray.

What is timed is what is deployed: `deploy.graph.plan_kernels` of the uniform4 and uniform8 IntegerPrograms,
i.e. the very kernel calls `deploy.compile_program` strings together. A layer's kernel includes its fused tail
(requantize, ReLU clamp, residual add). The kernels between layers ("glue": the layout change at the input,
pooling, standalone requantize/add chains, flatten, the layout change at a rank-4 output) are each charged to
the layer that consumes their output (through chains of glue), or, at the model's output edge, to the layer
that produced their input. Every kernel of the compiled model is charged to exactly one layer, so a config's
latency is `sum_L lat{b_L}_ms[L]` (what the solver sums) and that adds up to the compiled model's; the
columns `glue4_ms`/`glue8_ms` say how much of `lat4_ms`/`lat8_ms` is glue. A layer with fixed bits (first,
last) is deployed at those bits in every config, so its lat4_ms is its lat8_ms.
`lat32_ms` is the reference: the layer's torch fp32 module (conv or linear; BN is folded away) alone.

Work is a list of `Item`s keyed by a signature (`deploy.layer.kernel_signature` of a kernel, a digest of
the whole call list for a model, of the torch module and input shape for an fp32 layer): identical kernels are
built and timed once. The kernels are planned once per program (`plan_program`); each call's layer is the one
its kernel records. The disk cache (`cache_key`, `read_cached`, `write_cached`) is keyed by target, threads,
batch size, signature and the timing settings. `service.profile` measures the items on profiler actors
(`actors.profiler`).
Latency does not depend on weight or activation values, only on shapes, bits and dtypes; so the programs are
calibrated on one seeded random image and cached by architecture (class, repr, input shape, bits).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from hawq_ray.contract import HawqError
from hawq_ray.contract.cost import config_costs
from hawq_ray.contract.integrity import digest
from hawq_ray.contract.table import BIT_WIDTHS, COL, glue_col, lat_col

CONFIGS = tuple(f"uniform{b}" for b in BIT_WIDTHS)   # the programs whose kernels give every layer's latency
FORMAT = 2            # bump when what a cached latency means changes


@dataclass(frozen=True)
class Item:
    """One thing to build and time: a layer/glue kernel, a whole model, or a torch fp32 layer."""
    sig: str          # signature (identical work has the same one)
    kind: str         # "kernel" | "model" | "torch"
    config: str       # the program (kernel, model) or the layer (torch)
    index: int = -1   # call index in the plan of `config` (kernel)
    name: str = ""    # readable


# ---------------------------------------------------------------------------------------------- programs

def architecture_key(model, input_shape) -> str:
    cls = type(model)
    return digest(FORMAT, f"{cls.__module__}.{cls.__qualname__}", repr(model), list(input_shape))


def program_key(model, input_shape, bits) -> str:
    return digest(architecture_key(model, input_shape), bits if isinstance(bits, str) else sorted(dict(bits).items()))


def latency_program(model, input_shape, bits, cache_dir=None, table=None):
    """The IntegerProgram of `model` at `bits` ("uniform4", "uniform8" or {layer: bits}), calibrated on one
    seeded random image (latency depends on shapes and bits only); cached under cache_dir/programs/.
    `table`: the model's layer table, when at hand."""
    import torch

    from hawq_ray.program.program import IntegerProgram
    from hawq_ray.quant.qat import prepare
    key = program_key(model, input_shape, bits)
    path = Path(cache_dir) / "programs" / key[:32] if cache_dir else None
    if path is not None and (path / "program.json").is_file():
        try:
            return IntegerProgram.load(path)
        except ValueError:
            pass   # a truncated entry: rebuild it
    gen = torch.Generator().manual_seed(0)
    qm = prepare(model, bits, input_shape, table).calibrate([torch.randn((1, *input_shape), generator=gen)])
    program = qm.to_integer()
    if path is not None:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        program.save(tmp)
        try:
            tmp.rename(path)
        except OSError:   # another process wrote it first
            pass
    return program


# ---------------------------------------------------------------------------------------------- plans

def charge_glue(calls, layers: list) -> list:
    """The layer each call is charged to: its own for a layer kernel; for glue, the layer that (through other
    glue) first consumes its output, else (model output edge) the layer that produced its input."""
    owner = list(layers)
    producer = {o: i for i, c in enumerate(calls) for o in c.outputs}
    readers: dict = {}
    for i, c in enumerate(calls):
        for a in c.args:
            readers.setdefault(a, []).append(i)
    for i in reversed(range(len(calls))):        # readers come later: already resolved
        if owner[i] is None:
            owner[i] = next((owner[j] for o in calls[i].outputs for j in sorted(readers.get(o, []))
                             if owner[j] is not None), None)
    for i in range(len(calls)):                  # what nobody consumes: the producer's layer
        if owner[i] is None:
            owner[i] = next((owner[producer[a]] for a in calls[i].args
                             if a in producer and owner[producer[a]] is not None), None)
    last = next((x for x in reversed(layers) if x is not None), None)
    return [o if o is not None else last for o in owner]


@dataclass
class Plan:
    config: str
    names: list       # kernel name per call
    sigs: list        # kernel signature per call
    layers: list      # layer of each layer kernel, None for glue
    owners: list      # layer each call is charged to
    model_sig: str    # signature of the whole model (all calls and their wiring)
    calls: list | None = field(default=None, compare=False)   # the planned calls (absent when read from disk)


def plan_program(program, batch: int, target, config: str) -> Plan:
    """The program's kernel calls, planned once (`deploy.graph.plan_kernels`), with their signatures and the
    layer each is charged to."""
    from hawq_ray.deploy.graph import plan_kernels
    from hawq_ray.deploy.layer import kernel_signature
    calls = plan_kernels(program, batch, target)
    sigs = [kernel_signature(c.kernel) for c in calls]
    layers = [c.kernel.notes.get("layer") for c in calls]
    wiring = [(s, list(c.args), list(c.outputs)) for s, c in zip(sigs, calls)]
    return Plan(config, [c.kernel.name for c in calls], sigs, layers, charge_glue(calls, layers),
                digest("model", batch, program.input_name, wiring)[:32], calls)


def deploy_fingerprint() -> str:
    """sha256 of the deploy package's source: a saved plan (kernel signatures) is stale once it changes."""
    from importlib.util import find_spec
    folder = Path(list(find_spec("hawq_ray.deploy").submodule_search_locations)[0])   # found, not imported
    h = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def plan_key(program_key: str, batch: int, target: dict) -> str:
    return digest(FORMAT, "plan", program_key, int(batch), target, deploy_fingerprint())


def load_plan(cache_dir, key: str) -> Plan | None:
    """A plan saved by `save_plan` (so a warm run builds no kernel at all), or None."""
    got = read_cached(cache_dir, key, "plans")
    try:
        return Plan(**{k: v for k, v in got.items() if k != "calls"}) if got is not None else None
    except TypeError:
        return None


def save_plan(cache_dir, key: str, plan: Plan) -> None:
    from dataclasses import asdict, replace
    write_cached(cache_dir, key, asdict(replace(plan, calls=None)), "plans")


def plan_items(plans: dict) -> list:
    """Unique kernel items and one model item per plan (first occurrence wins)."""
    items, seen = [], set()
    for cfg, plan in plans.items():
        for i, (sig, name) in enumerate(zip(plan.sigs, plan.names)):
            if sig not in seen:
                seen.add(sig)
                items.append(Item(sig, "kernel", cfg, i, name))
    for cfg, plan in plans.items():
        if plan.model_sig not in seen:
            seen.add(plan.model_sig)
            items.append(Item(plan.model_sig, "model", cfg, -1, f"model {cfg}"))
    return items


# ---------------------------------------------------------------------------------------------- fp32

def layer_inputs(model, input_shape, layers) -> dict:
    """{layer: (module, input shape of one sample)} from a forward pass at batch 1."""
    from hawq_ray.quant.layers import layer_calls
    modules = dict(model.named_modules())
    calls = layer_calls(model, input_shape)
    missing = [name for name in layers if name not in modules or name not in calls]
    if missing:
        raise HawqError(f"layer {missing[0]!r} of the table is not a Conv2d or Linear that the model's forward "
                        "reads")
    return {name: (modules[name], calls[name]["input_shape"]) for name in layers}


def torch_items(inputs: dict, batch: int, device: str) -> tuple[list, dict]:
    """Unique fp32 items and {layer: signature}."""
    import torch
    items, sig_of, seen = [], {}, set()
    for layer, (module, shape) in inputs.items():
        sig = digest("torch-fp32", torch.__version__, device, repr(module), [batch, *shape])[:32]
        sig_of[layer] = sig
        if sig not in seen:
            seen.add(sig)
            items.append(Item(sig, "torch", layer, -1, f"fp32 {layer}"))
    return items, sig_of


# ---------------------------------------------------------------------------------------------- timing

def kernel_timer(kernel, target) -> Callable[[int], float]:
    """Compile one kernel; return f(number) -> mean ms per run over `number` runs."""
    from hawq_ray.deploy.target import device_of
    from hawq_ray.deploy.layer import compile_kernel, kernel_args
    mod = compile_kernel(kernel, target)
    dev = device_of(target)
    args = kernel_args(kernel, dev)
    mod(*args)

    def run(number: int) -> float:
        return mod.time_evaluator("main", dev, number=number, repeat=1)(*args).mean * 1e3
    return run


def model_timer(program, calls, batch: int, target) -> Callable[[int], float]:
    """Compile the whole program from its planned calls (`deploy.build.compile_calls`, what compile_program
    builds); f(number) -> ms per run."""
    from hawq_ray.deploy.build import compile_calls
    deployed = compile_calls(program, calls, batch, target)
    deployed.time_ms(number=1, repeat=1)
    return lambda number: deployed.time_ms(number=number, repeat=1)[0]


def torch_timer(module, shape, batch: int, device: str = "cpu") -> Callable[[int], float]:
    import copy

    import torch
    m = copy.deepcopy(module).eval().to(device)
    x = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0)).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run(number: int) -> float:
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            for _ in range(number):
                m(x)
            sync()
        return (time.perf_counter() - t0) / number * 1e3
    return run


def warm_number(run: Callable[[int], float], min_ms: float = 30.0, max_number: int = 200,
                warmup_ms: float = 50.0) -> int:
    """Warm up a timer (at least 3 runs and warmup_ms, at most 50 runs); the number of runs per measurement
    so that one lasts about min_ms."""
    t0, runs, est = time.perf_counter(), 0, float("inf")
    while runs < 3 or (runs < 50 and (time.perf_counter() - t0) * 1e3 < warmup_ms):
        est = min(est, run(1))
        runs += 1
    return int(min(max_number, max(1, math.ceil(min_ms / max(est, 1e-4)))))


# ---------------------------------------------------------------------------------------------- cache

def cache_key(target: dict, threads: int, batch: int, sig: str, timing=()) -> str:
    """Key of one latency: target, threads, batch size, signature, and the timing settings (rounds, min_ms)."""
    return digest(FORMAT, target, int(threads), int(batch), sig, list(timing))


def read_cached(cache_dir, key: str, folder: str = "latency"):
    if not cache_dir:
        return None
    path = Path(cache_dir) / folder / key[:2] / f"{key}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def write_cached(cache_dir, key: str, value: dict, folder: str = "latency") -> None:
    if not cache_dir:
        return
    path = Path(cache_dir) / folder / key[:2] / f"{key}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)


# ---------------------------------------------------------------------------------------------- table

def latency_table(table: pd.DataFrame, plans: dict, ms: dict, lat32: dict | None = None) -> pd.DataFrame:
    """The layer table plus lat{b}_ms and glue{b}_ms for each width (and lat32_ms when given)."""
    out = table.copy()
    layers = list(out[COL.layer])
    for cfg in CONFIGS:
        plan = plans[cfg]
        total = dict.fromkeys(layers, 0.0)
        glue = dict.fromkeys(layers, 0.0)
        for sig, own, lay in zip(plan.sigs, plan.owners, plan.layers):
            if own not in total:
                raise HawqError(f"kernel charged to {own!r}, which is not a layer of the table")
            total[own] += ms[sig]
            if lay is None:
                glue[own] += ms[sig]
        b = int(cfg[len("uniform"):])
        out[lat_col(b)] = [total[x] for x in layers]
        out[glue_col(b)] = [glue[x] for x in layers]
    for i, f in enumerate(out[COL.fixed_bits] if COL.fixed_bits in out else []):
        if not pd.isna(f):        # a fixed layer is deployed at its fixed bits in every config
            for col in (lat_col, glue_col):
                for b in BIT_WIDTHS:
                    out.loc[out.index[i], col(b)] = out.loc[out.index[i], col(int(f))]
    if lat32 is not None:
        out[lat_col(32)] = [lat32[x] for x in layers]
    return out


def breakdown(plan: Plan, ms: dict) -> list:
    """[{kernel, layer, glue, ms}] for every call of the plan, in execution order: what each layer's latency
    is made of."""
    return [{"kernel": name, "layer": own, "glue": lay is None, "ms": ms[sig]}
            for name, sig, own, lay in zip(plan.names, plan.sigs, plan.owners, plan.layers)]


def summary_rows(table: pd.DataFrame, checks: dict, e2e: dict) -> list:
    """[{config, sum_ms, e2e_ms, ratio, rest_ms}] for each checked config ({name: {layer: bits}}, e2e
    {name: ms}); rest_ms = e2e - sum is what no kernel accounts for (the VM's dispatch between kernels)."""
    rows = []
    for name, bits in checks.items():
        s = config_costs(table, bits)["latency_ms"]
        rows.append({"config": name, "sum_ms": s, "e2e_ms": e2e[name], "ratio": s / e2e[name],
                     "rest_ms": e2e[name] - s})
    return rows
