"""`hawq-ray profile`: per-layer INT4/INT8 kernel latencies (lat4_ms, lat8_ms) and the fp32 reference (lat32_ms),
measured by Ray actors on the nodes of one kind, added to the layer table.

Prints the sum of the per-layer latencies next to the end-to-end latency of the compiled model built from the
same kernels (uniform4, uniform8 and every --check config), with their ratio. Latencies are cached under
`--cache-dir` (default: `.hawq-ray-cache/profile` beside --out) by target, threads, batch size and kernel
signature: a repeated call measures nothing.
"""
from __future__ import annotations

import sys
from pathlib import Path

from hawq_ray.service.cli.common import print_json
from hawq_ray.service.cli.common import add_model_args, fmt_table, resolve
from hawq_ray.contract import HawqError
from hawq_ray.contract.table import BIT_WIDTHS, COL, LATENCY_COLUMNS, glue_col
from hawq_ray.service.settings import ACTORS, BATCH, COUNT, MILLISECONDS

SHOWN = [COL.layer, COL.kind, COL.fixed_bits, *LATENCY_COLUMNS, glue_col(max(BIT_WIDTHS))]


def register(sub) -> None:
    p = sub.add_parser("profile", help="per-layer INT4/INT8 TVM kernel latencies measured on the cluster's nodes")
    add_model_args(p, data=False)
    p.add_argument("--batch", type=BATCH, default=8, help="batch size of the kernels (default 8)")
    p.add_argument("--target", default="llvm",
                   help="llvm | avx2 | avx512 | avx512-vnni | amx | cuda | a TVM target as JSON; detected on each node "
                        "(default llvm)")
    p.add_argument("--resource", default=None,
                   help="profile on the nodes holding this custom Ray resource, e.g. t4 (default: any node)")
    p.add_argument("--actors", type=ACTORS, default=2, help="ProfilerActors to spread the kernels over (default 2)")
    p.add_argument("--rounds", type=COUNT, default=7, help="timed rounds per kernel; the median is kept (default 7)")
    p.add_argument("--min-ms", type=MILLISECONDS, default=30.0,
                   help="each measurement repeats a kernel for about this long (default 30)")
    p.add_argument("--check", action="append", default=[], metavar="CONFIG",
                   help="also time this bit config (JSON file {layer: bits}) end to end (repeatable)")
    p.add_argument("--no-fp32", action="store_true", help="skip the torch fp32 reference column lat32_ms")
    p.add_argument("--address", default=None, help="Ray cluster to connect to (default: $RAY_ADDRESS if set, else a local one started when needed)")
    p.add_argument("--cache-dir", default=None, help="latency cache (default: .hawq-ray-cache/profile beside --out)")
    p.add_argument("--no-cache", action="store_true", help="measure everything again (and cache nothing)")
    p.add_argument("--out", required=True, help="output table, .parquet or .csv (e.g. lat.parquet)")
    p.set_defaults(func=run_profile)


def profile_progress_bar():
    """A tqdm bar on stderr and the callback (done, total, stage) that moves it."""
    from tqdm import tqdm
    state = {}

    class Bar:   # opened at the first step: a run that the cache answers shows none
        @staticmethod
        def close():
            if "bar" in state:
                state["bar"].close()

    def update(done: int, total: int, stage: str) -> None:
        if "bar" not in state:
            state["bar"] = tqdm(total=total, file=sys.stderr, desc="profile", unit="step", leave=False)
        bar = state["bar"]
        bar.total = total
        bar.set_description(f"profile ({stage})")
        bar.update(done - bar.n)

    return Bar, update


def summary_text(rows: list) -> str:
    lines = [f"{'config':<12} {'sum of layers ms':>17} {'end to end ms':>14} {'sum/e2e':>8}"]
    for r in rows:
        lines.append(f"{r['config']:<12} {r['sum_ms']:>17.3f} {r['e2e_ms']:>14.3f} {r['ratio']:>8.3f}")
    return "\n".join(lines)


def run_profile(args) -> int:
    from hawq_ray.service.outputs import writable_file
    if Path(args.out).suffix not in (".parquet", ".csv"):
        raise HawqError(f"--out {args.out}: give a .parquet or .csv file")
    out = writable_file(args.out)
    checks = {}
    for path in args.check:
        if not Path(path).is_file():
            raise HawqError(f"--check {path}: no such bit config file (a JSON {{layer: bits}})")
        checks[Path(path).stem] = path
    cache_dir = None if args.no_cache else Path(args.cache_dir or out.parent / ".hawq-ray-cache" / "profile")
    md = resolve(args, need_data=False)
    from actors.profiler import Measure
    from hawq_ray.service.profile import profile_layers
    bar, update = profile_progress_bar()
    try:
        table = profile_layers(md.model, md.input_shape, batch=args.batch, target=args.target,
                               resource=args.resource, how=Measure(args.actors, args.rounds, args.min_ms),
                               cache_dir=cache_dir, checks=checks, fp32=not args.no_fp32, progress=update,
                               address=args.address)
    finally:
        bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".csv":
        table.to_csv(out, index=False)
    else:
        table.to_parquet(out)
    a = table.attrs
    shown = [c for c in SHOWN if c in table]
    print(fmt_table(table[shown]))
    print(summary_text(a["end_to_end"]))
    where = f"nodes with {args.resource!r}" if args.resource else "any node"
    print(f"{md.name}, batch {args.batch}, {a['target'].get('kind')} {a['target'].get('mcpu', '')} "
          f"x{a['threads']} threads on {where}: {a['items']} unique items ({a['kernels']} kernels), "
          f"{a['cache_hits']} cached, {a['measured']} measured, {a['seconds']:.1f} s -> {out}")
    if args.json:
        print_json({"model": md.name, "batch": args.batch, "out": str(out),
                    **{k: a[k] for k in ("target", "threads", "resource", "items", "kernels", "cache_hits",
                                         "measured", "nodes", "restarts", "actors", "seconds", "end_to_end")},
                    "table": table[shown].astype(object).where(table[shown].notna(), None).to_dict(orient="records")})
    return 0
