"""`hawq-ray compile`: bit configs (optionally fine-tuned) -> integer-only TVM libraries, one folder each, timed
together in interleaved rounds (median and interquartile range, beside the sweep's predicted latency).

The folder holds model.so, params.npz, manifest.json (input shape, dtype, scales, bits per layer, target)
and program/ (the IntegerProgram it was built from). Load it with three lines:

    from hawq_ray.deploy.build import load_model
    model = load_model("DIR")                     # checks the manifest and the target
    logits_int32 = model(x_int8)                  # x_int8: (batch, C, H, W) int8, quantized with input_scale
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from hawq_ray.service.cli.common import print_json
from hawq_ray.service.cli.common import add_model_args, data_note, fmt_table, resolve
from hawq_ray.service.settings import BATCH, COUNT, Int


def register(sub) -> None:
    p = sub.add_parser("compile", help="compile bit configs to integer-only TVM libraries (+ manifest), timed together")
    add_config_args(p, several=True)
    p.add_argument("--target", default="llvm", help="llvm (this CPU), an ISA to build for (avx2, avx512, avx512-vnni, amx), cuda, or a TVM target as JSON")
    p.add_argument("--batch", type=BATCH, default=8)
    p.add_argument("--calibration-batches", type=COUNT, default=2)
    p.add_argument("--rounds", type=Int(0, COUNT.high), default=15,
                   help="interleaved timing rounds of the compiled modules, all configs together (0: no timing)")
    p.add_argument("--out", required=True, help="output folder (one subfolder per config when several)")
    p.set_defaults(func=run_compile)


def add_config_args(p, several: bool = False) -> None:
    """The model, the bit config (`several`: one or more) and where its scales come from (`compile`, `export`)."""
    add_model_args(p)
    if several:
        p.add_argument("--bits", required=True, nargs="+", metavar="CONFIG",
                       help="uniform4 | uniform8 | a JSON file {layer: bits} or {name: {layer: bits}} | a sweep "
                            "table (.parquet/.csv from hawq-ray sweep: its predicted latencies and budgets are "
                            "shown beside the measured ones)")
    else:
        p.add_argument("--bits", required=True, help="uniform4 | uniform8 | a JSON file {layer: bits}")
    p.add_argument("--checkpoint", default=None,
                   help="a fine-tuned QAT checkpoint (state.pt from hawq-ray finetune); else calibrate on data")


def quantized_model(md, bits, checkpoint=None, calibration_batches: int = 2, batch_size: int = 64):
    """prepare() at `bits`, then either a fine-tuned checkpoint's state or calibration on the data."""
    from hawq_ray.inputs.data import batches
    from hawq_ray.contract import HawqError
    from hawq_ray.quant.qat import prepare
    qm = prepare(md.model, bits, md.input_shape)
    if checkpoint:
        from hawq_ray.quant.finetune import load_checkpoint
        state = load_checkpoint(checkpoint)
        try:
            qm.load_state_dict(state["model"] if "model" in state else state)
        except (RuntimeError, KeyError) as e:
            raise HawqError(f"checkpoint {checkpoint} does not fit {md.name} at these bits: "
                            f"{str(e).splitlines()[0][:160]}") from None
    else:
        print(f"calibrating on {calibration_batches} batches{data_note(md.data)}", file=sys.stderr)
        qm.calibrate(batches(md.data.train, batch_size, calibration_batches))
    return qm.eval()


def run_compile(args) -> int:
    from hawq_ray.quant.layers import layer_table
    from hawq_ray.contract import HawqError
    from hawq_ray.contract.bits import read_configs
    from hawq_ray.deploy.build import compile_program, export_model
    from hawq_ray.deploy.target import parse_target
    from hawq_ray.service.outputs import writable_folder
    writable_folder(args.out)
    parse_target(args.target)                    # a target this machine can't run fails before any work
    t0 = time.time()
    md = resolve(args)
    configs = read_configs(args.bits, layer_table(md.model, md.input_shape))
    if args.checkpoint and len(configs) > 1:
        raise HawqError(f"--checkpoint {args.checkpoint}: fits one config; {len(configs)} were given")
    compiled, outs = {}, {}
    for c in configs:
        program = quantized_model(md, c.bits, args.checkpoint, args.calibration_batches).to_integer()
        compiled[c.config] = compile_program(program, batch=args.batch, target=args.target)
        outs[c.config] = export_model(compiled[c.config], Path(args.out) / c.config if len(configs) > 1 else args.out)
        program.save(outs[c.config] / "program")
        print(f"compiled {md.name} {c.config} for {args.target} (batch {args.batch}) -> {outs[c.config]}",
              file=sys.stderr)
    result = {"out": {k: str(v) for k, v in outs.items()}, "target": args.target, "batch": args.batch,
              "seconds": round(time.time() - t0, 1), "input_shape": next(iter(compiled.values())).manifest["input_shape"],
              "input_scale": {k: m.manifest["input_scale"] for k, m in compiled.items()}}
    timed = _timed(compiled, configs, args.rounds)
    if timed is not None:
        result["latency"] = timed.astype(object).where(timed.notna(), None).to_dict("records")
    if args.json:
        print_json(result)
        return 0
    print(f"compiled {len(configs)} config(s) in {result['seconds']} s")
    if timed is not None:
        print(f"latency per call at batch {args.batch}, all configs timed together in {args.rounds} interleaved "
              "rounds (median and interquartile range; predicted and budget from a sweep table, where given):")
        print(fmt_table(timed.drop(columns=["calls"])))
    print(__doc__.split("three lines:")[1].strip("\n").replace("DIR", str(next(iter(outs.values())))))
    return 0


def _timed(compiled: dict, configs: list, rounds: int):
    from hawq_ray.analysis.timing import against_budget, time_models
    if rounds == 0:
        return None
    return against_budget(time_models(compiled, rounds=rounds), {c.config: c.latency_ms for c in configs},
                          {c.config: c.latency_limit_ms for c in configs})
