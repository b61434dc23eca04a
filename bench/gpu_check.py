"""The GPU check: every GPU path of hawq-ray on one NVIDIA GPU, printed as one table.

1. the CUDA modules of a model (resnet18 by default, random weights, 224x224) under uniform8, uniform4 and a
   mixed config, run on --inputs random images against the integer executor on the CPU (differing elements);
2. their latency beside torch fp32 and torch fp16 on the same GPU (median of --rounds interleaved rounds; the
   TVM call includes the input's copy in and the output's copy out, as a user calls it);
3. a Hessian-trace actor placed on the GPU (`actors.hessian.actor_layer_traces`, a few Hutchinson iterations);
4. one Ray Tune QAT trial on the GPU (`hawq-ray finetune` on the default digits model, one epoch), whose result
   table names the device it trained on.

A step that fails is a row with its one-line error; the others still run. Exit status 0 only when every step
ran, every module had 0 differing elements and the actor and the trial ran on the device asked for.
`bench/gpu_check.sh` installs what this needs and runs it with a time limit.

    python bench/gpu_check.py [--device cuda|cpu] [--model resnet18] [--image 224] [--batch 8] [--inputs 8]
                              [--rounds 5] [--out DIR]

--device cpu runs the same steps with the llvm target and torch on the CPU (no fp16 row): a dry run of the
script itself on a machine without a GPU.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from deploy_latency import mixed_bits  # noqa: E402

CONFIGS = ("uniform8", "uniform4", "mixed")


def torch_timer(model, x, device):
    """ms of one call of `model` on `x`, the device synchronized before the clock stops."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        with torch.inference_mode():
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
        return (time.perf_counter() - t0) * 1e3
    return run


def tvm_modules(model, shape, args, target):
    """{config: (compiled model, seconds to compile, differing elements against the integer executor)}."""
    from hawq_ray.quant.layers import layer_table
    from hawq_ray.deploy import compile_program
    from hawq_ray.program.executor import run_program
    from hawq_ray.quant.qat import prepare

    rng = torch.Generator().manual_seed(0)
    calib = [torch.randn((args.batch, *shape), generator=rng) for _ in range(2)]
    images = torch.randn((args.inputs, *shape), generator=rng)
    table = layer_table(model, shape)
    out = {}
    for config in CONFIGS:
        bits = mixed_bits(table) if config == "mixed" else config
        prog = prepare(model, bits, shape, table).calibrate(calib).to_integer()
        t0 = time.perf_counter()
        deployed = compile_program(prog, batch=args.batch, target=target)
        compile_s = time.perf_counter() - t0
        differing = 0
        for chunk in images.split(args.batch):
            xq = prog.quantize_input(chunk).numpy()
            if len(xq) < args.batch:                  # the module's batch is fixed: pad the last chunk
                xq = np.concatenate([xq, np.zeros((args.batch - len(xq), *xq.shape[1:]), xq.dtype)])
            differing += int((deployed(xq) != run_program(prog, torch.from_numpy(xq)).numpy()).sum())
        out[config] = (deployed, compile_s, differing)
        print(f"  {config}: compiled in {compile_s:.1f} s, {differing} differing elements", flush=True)
    return out


def latency_rows(model, shape, modules, args, device):
    from hawq_ray.analysis.timing import interleaved_samples
    x = torch.randn((args.batch, *shape))          # copies on the device: the CPU model stays for the later steps
    timers = {"torch fp32": torch_timer(copy.deepcopy(model).to(device).eval(), x.to(device), device)}
    if device == "cuda":
        timers["torch fp16"] = torch_timer(copy.deepcopy(model).half().to(device).eval(),
                                           x.half().to(device), device)
    for config, (deployed, _, _) in modules.items():
        timers[f"TVM {config}"] = lambda d=deployed: d.call_ms(1)
    for fn in timers.values():                          # warm-up: cuDNN autotuning, TVM's first launch
        fn()
    samples = interleaved_samples(timers, args.rounds)
    return {name: float(np.median(s)) for name, s in samples.items()}


def hessian_row(model, shape, device):
    """(device the actor computed on, layers traced, seconds) for a few Hutchinson iterations in one actor."""
    import ray
    from actors.hessian import actor_layer_traces
    from actors.resources import actor_device, actor_options
    placed = actor_device(actor_options(1, ray.cluster_resources()))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn((4, *shape), generator=g), torch.randint(0, 10, (4,), generator=g))]
    t0 = time.perf_counter()
    traces = actor_layer_traces(model, batches, actors=1, min_iter=4, max_iter=4, block=4)
    return placed, len(traces), time.perf_counter() - t0


def tune_row(out: Path):
    """(device the trial trained on, its top-1, seconds): one QAT trial of the default model, one epoch."""
    from hawq_ray.quant.finetune import Recipe
    from hawq_ray.service.tune import TuneSettings, finetune_run
    t0 = time.perf_counter()
    table = finetune_run(["uniform8"], out=out, recipe=Recipe(epochs=1), settings=TuneSettings(train_limit=512),
                         fp32_epochs=1)
    row = table.iloc[0]
    if row["error"]:
        raise RuntimeError(row["error"])
    return row["device"], float(row["top1"]), time.perf_counter() - t0


def step(rows: list, name: str, fn):
    """Run one step; a failure becomes a row with its first line, and the check goes on."""
    print(f"{name} ...", flush=True)
    try:
        return fn()
    except Exception as err:                            # noqa: BLE001 - every failure is reported, none hides
        rows.append((name, "FAILED", (str(err).splitlines() or [type(err).__name__])[0][:160]))
        return None


def environment(device: str) -> str:
    import tvm
    if device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        if not tvm.cuda(0).exist:
            raise RuntimeError("TVM sees no CUDA device (is this TVM built with CUDA?)")
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, TVM {tvm.__version__}"
    return f"CPU dry run, torch {torch.__version__}, TVM {tvm.__version__}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--model", default="resnet18")
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--inputs", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=None, help="folder for the Tune trial (default: a temporary folder)")
    args = p.parse_args(argv)

    from hawq_ray.inputs.models import get_model
    from hawq_ray.service.session import connect
    target = "cuda" if args.device == "cuda" else "llvm"
    shape = (3, args.image, args.image)
    rows, ok = [], True
    started = time.perf_counter()

    env = step(rows, "environment", lambda: environment(args.device))
    if env is None:
        print_table(rows, args)
        return 1
    rows.append(("environment", "ok", env))
    torch.manual_seed(0)
    model = get_model(args.model).eval()

    modules = step(rows, "TVM modules", lambda: tvm_modules(model, shape, args, target)) or {}
    for config, (_, compile_s, differing) in modules.items():
        ok &= differing == 0
        rows.append((f"TVM {target} {config}: differing elements vs integer executor",
                     "ok" if differing == 0 else "FAILED", f"{differing} in the outputs of {args.inputs} random "
                     f"inputs; compiled in {compile_s:.1f} s"))
    ms = step(rows, "latency", lambda: latency_rows(model, shape, modules, args, args.device)) or {}
    fp32 = ms.get("torch fp32")
    for name, value in ms.items():
        ratio = f", {value / fp32:.2f}x torch fp32" if fp32 else ""
        rows.append((f"latency {name}, batch {args.batch}", "ok", f"{value:.3f} ms{ratio}"))

    connect(None, num_cpus=os.cpu_count())
    hess = step(rows, "Hessian-trace actor", lambda: hessian_row(model, shape, args.device))
    if hess:
        placed, layers, secs = hess
        ok &= placed == args.device
        rows.append(("Hessian-trace actor", "ok" if placed == args.device else "FAILED",
                     f"on {placed}, {layers} layers traced in {secs:.1f} s"))
    with tempfile.TemporaryDirectory() as tmp:
        trial = step(rows, "Tune trial", lambda: tune_row(Path(args.out or tmp)))
    if trial:
        device, top1, secs = trial
        ok &= device == args.device
        rows.append(("Ray Tune QAT trial (digits, 1 epoch)", "ok" if device == args.device else "FAILED",
                     f"trained on {device}, integer top-1 {top1:.3f}, {secs:.1f} s"))
    ok &= not any(r[1] == "FAILED" for r in rows)
    rows.append(("whole check", "ok" if ok else "FAILED", f"{time.perf_counter() - started:.0f} s"))
    print_table(rows, args)
    return 0 if ok else 1


def print_table(rows, args):
    print(f"\nGPU check: {args.model}, {args.image}x{args.image}, batch {args.batch}, device {args.device}\n")
    print("| check | result | figure |\n|---|---|---|")
    for name, result, figure in rows:
        print(f"| {name} | {result} | {figure} |")


if __name__ == "__main__":
    sys.exit(main())
