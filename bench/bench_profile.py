"""`hawq-ray profile` on resnet18 (batch 8): cold and warm wall time, and whether the per-layer latencies add up
to the end-to-end latency of the compiled model.

    python bench/bench_profile.py [--model resnet18] [--batch 8] [--target avx2] [--actors 2] [--rounds 7] [--min-ms 30]
                                  [--no-independent] [--json]

Runs the CLI twice, each in a fresh process, on a fresh cache: cold (measures everything), then warm (the cache
answers). Both check uniform4, uniform8 and a mixed config (the second half of the network at 4 bits, as
bench/deploy_latency.py builds it). Then, unless --no-independent, this process compiles each config with
`hawq_ray.deploy.compile_program` itself and times it in interleaved rounds (TVM_NUM_THREADS = all cores), a
second end-to-end reference that owes nothing to the profiler. --target profiles and compiles for a named ISA
(avx2, avx512, ...; `deploy.target.parse_target`) that this CPU can run.

The issue's bars: sum of per-layer latencies within 15% of end to end for uniform8, uniform4 and mixed; a cold
profile under 5 minutes on 2 cores, a warm one under 10 seconds. The machine may be shared: the load average
is printed before and after; read the figures with it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", str(os.cpu_count() or 1))

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# `hawq-ray profile ...`, also before the subcommand is registered in hawq_ray.service.cli.COMMAND_MODULES
RUNNER = """
import argparse, sys
from hawq_ray.service.cli import COMMAND_MODULES, main
if "profile" in COMMAND_MODULES:
    sys.exit(main(sys.argv[1:]))
from hawq_ray.service.cli import profile
from hawq_ray.contract import HawqError
parser = argparse.ArgumentParser(prog="hawq-ray")
profile.register(parser.add_subparsers(dest="command", required=True))
args = parser.parse_args(sys.argv[1:])
try:
    sys.exit(args.func(args) or 0)
except HawqError as e:
    print(f"hawq-ray profile: error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def run_cli(argv: list) -> tuple[float, dict]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", RUNNER, *argv], cwd=ROOT, capture_output=True, text=True,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"hawq-ray {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return wall, json.loads(proc.stdout.strip().splitlines()[-1])


def independent_e2e(model_name: str, configs: dict, batch: int, rounds: int, target: str = "llvm") -> dict:
    """Median ms of each config compiled and timed in this process, interleaved rounds."""
    import torch

    from hawq_ray.deploy import compile_program
    from hawq_ray.inputs.models import get_model, input_shape
    from hawq_ray.quant.qat import prepare
    model = get_model(model_name).eval()
    shape = tuple(input_shape(model))
    runners = {}
    for name, bits in configs.items():
        prog = prepare(model, bits, shape).calibrate([torch.rand((1, *shape))]).to_integer()
        deployed = compile_program(prog, batch=batch, target=target)
        deployed.time_ms(number=1, repeat=1)
        runners[name] = deployed
    samples = {name: [] for name in runners}
    for _ in range(rounds):
        for name, deployed in runners.items():
            samples[name].append(deployed.time_ms(number=1, repeat=1)[0])
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--target", default="llvm", help="llvm (this CPU), avx2, avx512, avx512-vnni, amx or TVM JSON")
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--min-ms", type=float, default=30.0, help="length of one kernel measurement (the CLI's)")
    ap.add_argument("--no-independent", action="store_true", help="skip the in-process end-to-end reference")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    sys.path.insert(0, str(HERE))
    from deploy_latency import mixed_bits

    from hawq_ray.quant.layers import layer_table
    from hawq_ray.inputs.models import get_model, input_shape
    model = get_model(args.model)
    mixed = mixed_bits(layer_table(model, tuple(input_shape(model))))
    work = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    (work / "mixed.json").write_text(json.dumps(mixed))
    argv = ["profile", "--model", args.model, "--batch", str(args.batch), "--target", args.target, "--actors", str(args.actors),
            "--rounds", str(args.rounds), "--min-ms", str(args.min_ms), "--check", str(work / "mixed.json"), "--out", str(work / "lat.parquet"),
            "--json"]
    load_before = load()
    cold_s, cold = run_cli(argv)
    warm_s, warm = run_cli(argv)
    independent = {}
    if not args.no_independent:
        independent = independent_e2e(args.model, {"uniform4": "uniform4", "uniform8": "uniform8", "mixed": mixed},
                                      args.batch, args.rounds, args.target)
    load_after = load()

    rows = []
    for r in cold["end_to_end"]:
        ind = independent.get(r["config"])
        rows.append({"config": r["config"], "sum_ms": r["sum_ms"], "e2e_ms": r["e2e_ms"], "ratio": r["ratio"],
                     "e2e_here_ms": ind, "ratio_here": r["sum_ms"] / ind if ind else None,
                     "within_15pct": abs(r["ratio"] - 1) <= 0.15})
    print(f"{args.model} batch {args.batch}, target {args.target}, {cold['threads']} threads, {args.actors} actors, {args.rounds} rounds "
          f"of >= {args.min_ms:g} ms; "
          f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    print(f"{'config':<10} {'sum of layers':>14} {'e2e (actor)':>12} {'ratio':>6} {'e2e (here)':>11} {'ratio':>6}"
          f"  {'|1-ratio| <= 0.15':>17}")
    for r in rows:
        here = f"{r['e2e_here_ms']:>11.2f} {r['ratio_here']:>6.3f}" if r["e2e_here_ms"] else f"{'-':>11} {'-':>6}"
        print(f"{r['config']:<10} {r['sum_ms']:>14.2f} {r['e2e_ms']:>12.2f} {r['ratio']:>6.3f} {here}"
              f"  {'yes' if r['within_15pct'] else 'NO':>17}")
    print(f"{'run':<6} {'seconds':>8} {'bar':>6} {'cached':>7} {'measured':>9}")
    for name, s, res, bar in (("cold", cold_s, cold, 300), ("warm", warm_s, warm, 10)):
        print(f"{name:<6} {s:>8.1f} {'<' + str(bar):>6} {res['cache_hits']:>7} {res['measured']:>9}"
              f"  {'ok' if s < bar else 'OVER'}")
    if args.json:
        print(json.dumps({"model": args.model, "batch": args.batch, "target": args.target, "load_before": load_before,
                          "load_after": load_after, "cold_s": cold_s, "warm_s": warm_s, "rows": rows,
                          "cold": {k: cold[k] for k in ("items", "kernels", "cache_hits", "measured", "seconds")},
                          "warm": {k: warm[k] for k in ("items", "kernels", "cache_hits", "measured", "seconds")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
