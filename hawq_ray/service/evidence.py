"""The evidence stage across the cluster (`analysis.evidence`): for each budget point the ILP's config, random
configs of the same budget and the reversed one (`solver.alternatives`); every distinct config is quantized
and evaluated once, as Ray tasks (the model and the data go to the object store once; the configs are cut into
a few chunks per CPU)."""
from __future__ import annotations

import json
import os
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import ray

from hawq_ray.analysis.evidence import evaluate_bits
from hawq_ray.contract.bits import budget_cell
from hawq_ray.contract.cost import RESOURCES
from hawq_ray.quant.finetune import float_logits
from hawq_ray.service.sweep import cpu_chunks
from solver.alternatives import random_allocations, reversed_allocation
from solver.ilp import BudgetError, ilp_inputs, solve_inputs

COLUMNS = ["budget", "kind", "config", "predicted_omega", *RESOURCES, "top1", "loss", "kl", "bits"]


def alternatives(table: pd.DataFrame, grid: Sequence[dict], randoms: int, seed: int = 0) -> pd.DataFrame:
    """One row per (budget point, config): the ILP's, the reversed and up to `randoms` random allocations, with
    their predicted sum of Omega over the searchable layers and their totals. Infeasible points are left out; a
    point whose fills cannot start (combined budgets the cheapest widths break) keeps its ILP row alone."""
    inputs = ilp_inputs(table)
    rows = []
    for k, budgets in enumerate(grid):
        chosen = []
        try:
            chosen = [("ilp", solve_inputs(inputs, budgets))]
            chosen.append(("reversed", reversed_allocation(inputs, budgets)))
            chosen += [("random", a) for a in random_allocations(inputs, budgets, randoms, seed + k,
                                                                 exclude=[a.bits for _, a in chosen])]
        except BudgetError:       # infeasible; or (budgets combined) no fill can start: the ILP's row stays
            if not chosen:
                continue
        for kind, a in chosen:
            rows.append({"budget": budget_cell([budgets]), "kind": kind, "config": _config_id(a.bits),
                         "predicted_omega": a.objective, **{r: a.totals["model"].get(r, np.nan) for r in RESOURCES},
                         "bits": a.bits})
    return pd.DataFrame(rows, columns=[c for c in COLUMNS if c not in ("top1", "loss", "kl")])


def _config_id(bits: dict) -> str:
    """The config's bits in layer order, one digit per layer where every width has one digit."""
    widths = [str(b) for b in bits.values()]
    return "".join(widths) if all(len(w) == 1 for w in widths) else "-".join(widths)


def _evaluate_chunk(model, shape, data, table, fp32, configs: list) -> tuple:
    return os.getpid(), [evaluate_bits(model, bits, data, shape, fp32, table) for bits in configs]


def evidence_table(model, shape, data, table: pd.DataFrame, grid: Sequence[dict], *, randoms: int = 20,
                   seed: int = 0, progress: Callable | None = None, workers: set | None = None) -> pd.DataFrame:
    """`alternatives` with each config's measured top1, loss and kl (columns COLUMNS); the process ids of the
    Ray workers that evaluated are added to `workers` when given."""
    rows = alternatives(table, grid, randoms, seed)
    distinct = list(dict.fromkeys(rows["config"]))
    bits_of = dict(zip(rows["config"], rows["bits"]))
    fp32 = float_logits(model, data.test)
    chunks = cpu_chunks(len(distinct))
    refs = [ray.put(x) for x in (model, shape, data, table, fp32)]
    task = ray.remote(num_cpus=1)(_evaluate_chunk)
    pending = {task.remote(*refs, [bits_of[distinct[i]] for i in c]): c for c in chunks}
    metrics, done = {}, 0
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        pid, part = ray.get(ready[0])
        for i, m in zip(pending.pop(ready[0]), part):
            metrics[distinct[i]] = m
        done += len(part)
        if workers is not None:
            workers.add(pid)
        if progress:
            progress(done, len(distinct))
    for name in ("top1", "loss", "kl"):
        rows[name] = [metrics[c][name] for c in rows["config"]]
    rows["bits"] = [json.dumps(b) for b in rows["bits"]]
    return rows[COLUMNS]
