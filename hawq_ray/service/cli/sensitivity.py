"""`hawq-ray sensitivity`: per-layer Hessian traces, delta4/delta8 and Omega (HAWQ-V3 eq. 8) as a parquet table.

Results are cached under the output's folder (`.hawq-ray-cache/`), keyed by the model weights, the data,
the seed and the settings: a second identical call reads the cache and returns at once.
"""
from __future__ import annotations

import shutil
import sys
import time

from hawq_ray.service.cli.common import print_json
from hawq_ray.service.cli.common import add_model_args, data_note, fmt_table, resolve
from hawq_ray.analysis.sensitivity import DEFAULT_RANK
from hawq_ray.contract import HawqError
from hawq_ray.contract.integrity import arrays_digest, digest
from hawq_ray.contract.table import BIT_WIDTHS, COL, delta_col, omega_col
from hawq_ray.service.settings import ACTORS, BATCH, COUNT, ITERATIONS, RANK, SEED, TOLERANCE, Int

SHOWN = [COL.layer, COL.params, COL.trace, COL.trace_stderr, COL.trace_converged, *map(delta_col, BIT_WIDTHS),
         *map(omega_col, BIT_WIDTHS)]


def register(sub) -> None:
    p = sub.add_parser("sensitivity", help="per-layer Hessian traces (Hutchinson) and Omega = Tr/n * delta")
    add_model_args(p)
    p.add_argument("--batches", type=COUNT, default=4, help="number of training batches (shards) to use (default 4)")
    p.add_argument("--batch-size", type=BATCH, default=32, help="images per batch (default 32)")
    p.add_argument("--actors", type=Int(0, ACTORS.high), default=0,
                   help="Ray HessianActors, one per device (default 0: one process, no Ray)")
    p.add_argument("--tol", type=TOLERANCE, default=0.05, help="target relative standard error per layer (default 0.05)")
    p.add_argument("--max-iter", type=ITERATIONS, default=100, help="most Hutchinson iterations (default 100)")
    p.add_argument("--min-iter", type=ITERATIONS, default=8, help="fewest Hutchinson iterations (default 8)")
    p.add_argument("--rank", type=RANK, default=DEFAULT_RANK,
                   help=f"directions whose trace is computed exactly before sampling the rest (Hutch++-style "
                        f"deflation; 0: plain Hutchinson; default {DEFAULT_RANK})")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the random vectors (default 0)")
    p.add_argument("--no-cache", action="store_true", help="recompute even if a cached result exists")
    p.add_argument("--out", required=True, help="output parquet file, e.g. sens.parquet")
    p.set_defaults(func=run_sensitivity)


def traces_cache_key(model, batches, settings: dict) -> str:
    """The digest of the weights, the data tensors and the settings."""
    data = [(f"{k}{part}", t) for k, (x, y) in enumerate(batches) for part, t in (("x", x), ("y", y))]
    return digest(arrays_digest(sorted(model.state_dict().items())), arrays_digest(data), settings)


def trace_progress_bar(total: int):
    """A tqdm bar on stderr (iterations, worst relative stderr) and the callback that moves it."""
    from tqdm import tqdm

    bar = tqdm(total=total, file=sys.stderr, desc="hessian traces", unit="it", leave=False)

    def update(iterations: int, worst: float) -> None:
        bar.update(iterations - bar.n)
        bar.set_postfix(worst_rel_stderr=f"{worst:.3f}")

    return bar, update


def compute(md, data, args, progress):
    """The sensitivity table of the layer table of `md.model` on `data`."""
    from hawq_ray.quant.layers import layer_table
    from hawq_ray.analysis.sensitivity import layer_traces, sensitivity_columns, weight_deltas

    table = layer_table(md.model, md.input_shape)
    if table.empty:
        raise HawqError(f"model {md.name} has no quantizable layer: valid models contain a Conv2d or Linear")
    settings = dict(layers=table[COL.layer].tolist(), tol=args.tol, max_iter=args.max_iter,
                    min_iter=args.min_iter, rank=args.rank, seed=args.seed, progress=progress)
    if args.actors > 0:
        from actors.hessian import actor_layer_traces
        from hawq_ray.service.session import connect
        connect()
        traces = actor_layer_traces(md.model, data, actors=args.actors, **settings)
    else:
        traces = layer_traces(md.model, data, **settings)
    return sensitivity_columns(table, traces, weight_deltas(md.model, table[COL.layer], input_shape=md.input_shape))


def run_sensitivity(args) -> int:
    import pandas as pd

    from hawq_ray.inputs.data import batches
    from hawq_ray.service.outputs import writable_file
    t0 = time.time()
    out = writable_file(args.out)
    md = resolve(args)
    data = batches(md.data.train, args.batch_size, args.batches)
    settings = {"stage": "sensitivity", "batches": args.batches, "batch_size": args.batch_size,
                "tol": args.tol, "max_iter": args.max_iter, "min_iter": args.min_iter, "rank": args.rank,
                "seed": args.seed,
                "actors": args.actors > 0, "data": md.data.name}
    cached = out.parent / ".hawq-ray-cache" / f"sensitivity-{traces_cache_key(md.model, data, settings)[:32]}.parquet"
    hit = cached.is_file() and not args.no_cache
    if hit:
        result = pd.read_parquet(cached)
    else:
        print(f"hessian traces of {md.name} on {len(data)} batches of {args.batch_size}{data_note(md.data)}",
              file=sys.stderr)
        bar, update = trace_progress_bar(args.max_iter)
        try:
            result = compute(md, data, args, update)
        finally:
            bar.close()
        result.attrs.update(model=md.name, data=md.data.name, synthetic=bool(md.data.synthetic))
        cached.parent.mkdir(parents=True, exist_ok=True)
        result.to_parquet(cached)
    out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, out)
    not_converged = result.loc[~result[COL.trace_converged], COL.layer].tolist()
    summary = {"model": md.name, "data": md.data.name, "synthetic": bool(md.data.synthetic), "out": str(out),
               "cached": hit, "layers": len(result), "iterations": int(result[COL.trace_samples].max()),
               "hv_products": result.attrs.get("hv_products"),
               "not_converged": not_converged, "seconds": round(time.time() - t0, 3)}
    print(fmt_table(result[SHOWN]))
    print(f"{summary['layers']} layers, {summary['iterations']} iterations, {len(not_converged)} not converged "
          f"to relative stderr {args.tol}{' (cached)' if hit else ''}{data_note(md.data)} -> {out}")
    if args.json:
        print_json(summary | {"table": result[SHOWN].to_dict(orient="records")})
    return 0
