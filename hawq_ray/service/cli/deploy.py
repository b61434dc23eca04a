"""`hawq-ray compile`: a bit config (optionally fine-tuned) -> an integer-only TVM library in a folder.

The folder holds model.so, params.npz, manifest.json (input shape, dtype, scales, bits per layer, target)
and program/ (the IntegerProgram it was built from). Load it with three lines:

    from hawq_ray.deploy.build import load_model
    model = load_model("DIR")                     # checks the manifest and the target
    logits_int32 = model(x_int8)                  # x_int8: (batch, C, H, W) int8, quantized with input_scale
"""
from __future__ import annotations

import sys
import time

from hawq_ray.service.cli import print_json
from hawq_ray.service.cli.common import add_model_args, check_positive, data_note, resolve


def register(sub) -> None:
    p = sub.add_parser("compile", help="compile a bit config to an integer-only TVM library (+ manifest)")
    add_config_args(p)
    p.add_argument("--target", default="llvm", help="llvm (this CPU; VNNI when it has it) or cuda")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--calibration-batches", type=int, default=2)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=run_compile)


def add_config_args(p) -> None:
    """The model, the bit config and where its scales come from (`compile` and `export`)."""
    add_model_args(p)
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
    from hawq_ray.deploy.build import compile_program, export_model
    from hawq_ray.deploy.target import parse_target
    check_positive(args.batch, "--batch")
    parse_target(args.target)                    # a target this machine can't run fails before any work
    t0 = time.time()
    md = resolve(args)
    program = quantized_model(md, args.bits, args.checkpoint, args.calibration_batches).to_integer()
    deployed = compile_program(program, batch=args.batch, target=args.target)
    out = export_model(deployed, args.out)
    program.save(out / "program")
    result = {"out": str(out), "target": args.target, "batch": args.batch, "seconds": round(time.time() - t0, 1),
              "input_shape": deployed.manifest["input_shape"], "input_scale": deployed.manifest["input_scale"]}
    if args.json:
        print_json(result)
    else:
        print(f"compiled {md.name} {args.bits} for {args.target} (batch {args.batch}) in {result['seconds']} s "
              f"-> {out}")
        print(__doc__.split("three lines:")[1].strip("\n").replace("DIR", str(out)))
    return 0
