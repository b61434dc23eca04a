"""A sweep of random IntegerPrograms through the TVM back end, each compared value by value with the integer
executor (`hawq_ray.program.random`). Seed s builds a program around producer -> consumer pair s mod len(PAIRS);
the suite runs a fixed third of the pairs (`tests/test_random_programs.py`, SEEDS), this runs as many as asked
(the default covers every pair).

    python bench/random_programs.py [--programs 2000] [--start 0] [--workers 2] [--target llvm,avx2,avx512]

Prints progress, every failing seed with the first value that differs (rerun one with
`python -c "from hawq_ray.analysis.verify import check_random_program as c; print(c(SEED))"`), and a
table: programs, values and elements compared, differing, failures, kernels per path, pairs covered.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor

from hawq_ray.analysis.verify import check_random_program
from hawq_ray.program.random import PAIRS

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--programs", type=int, default=2000)
    p.add_argument("--start", type=int, default=0, help="first seed")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--target", default="llvm,llvm,avx2",
                   help="targets taken in turn by seed, comma separated (`deploy.target.parse_target` names: llvm, "
                        "avx2, avx512, avx512-vnni, amx, or a TVM target JSON without commas); default: two in three "
                        "on the host (VNNI / AMX where the CPU has them), one in three on AVX2")
    args = p.parse_args()
    seeds = list(range(args.start, args.start + args.programs))
    targets = args.target.split(",")

    def pick(seed):
        return targets[seed % len(targets)]
    t0, results = time.perf_counter(), []
    with ProcessPoolExecutor(args.workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for r in pool.map(check_random_program, seeds, map(pick, seeds)):
            results.append(r)
            if r["error"] or r["differing"]:
                print(f"seed {r['seed']} {r['pair']} on {r['target']}: {r['error'] or r['first']}", flush=True)
            if len(results) % 100 == 0:
                print(f"{len(results)} / {len(seeds)} programs, {time.perf_counter() - t0:.0f} s", file=sys.stderr,
                      flush=True)
    seconds = time.perf_counter() - t0
    failed = [r for r in results if r["error"]]
    differ = [r for r in results if r["differing"]]
    paths = Counter(p for r in results for p in r["paths"])
    pairs = set().union(*(map(tuple, r["pairs"]) for r in results))
    rows = [("programs", len(results)), ("seeds", f"{seeds[0]}..{seeds[-1]}"),
            ("ops (mean)", f"{sum(r['ops'] for r in results) / len(results):.1f}"),
            ("kernels", sum(r["kernels"] for r in results)),
            ("values compared", sum(r["values"] for r in results)),
            ("elements compared", sum(r.get("elements", 0) for r in results)),
            ("programs with differing elements", len(differ)),
            ("programs the back end refused", len(failed)),
            ("producer -> consumer pairs covered", f"{len(pairs & set(PAIRS))} of {len(PAIRS)}"),
            ("programs with 64..96-channel values", sum(r["wide"] for r in results)),
            *((f"programs using kernel path {k}", v) for k, v in sorted(paths.items())),
            ("wall time", f"{seconds:.0f} s ({seconds / len(results):.2f} s per program, {args.workers} workers)")]
    w = max(len(r[0]) for r in rows)
    print(f"| {'what':<{w}} | value |\n|{'-' * (w + 2)}|-------|")
    for name, value in rows:
        print(f"| {name:<{w}} | {value} |")
    return 1 if failed or differ else 0


if __name__ == "__main__":
    sys.exit(main())
