"""`hawq-ray export`: a bit config (optionally fine-tuned) -> an ONNX model with QuantizeLinear /
DequantizeLinear pairs, checked in onnxruntime against the integer executor on the held-out split.

Run it in any ONNX runtime:

    import onnxruntime as ort
    sess = ort.InferenceSession("OUT")
    logits = sess.run(None, {"input": x})[0]      # x: (batch, C, H, W) float32 images, as the model was fed
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from hawq_ray.contract import HawqError
from hawq_ray.service.cli.common import print_json
from hawq_ray.service.cli.common import data_note, resolve
from hawq_ray.service.settings import COUNT


def register(sub) -> None:
    from hawq_ray.onnx.qdq import FORMS
    from hawq_ray.service.cli.deploy import add_config_args
    p = sub.add_parser("export", help="export a bit config as an ONNX QDQ model, checked in onnxruntime")
    add_config_args(p)
    p.add_argument("--format", default="onnx", choices=["onnx"], help="onnx (QDQ, opset 19; 21 with --int4-weights)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--form", default="exact", choices=list(FORMS),
                   help="exact: the program's integer arithmetic, equal to the integer executor in onnxruntime "
                        "(default); fused: the graph runtimes fuse into integer kernels (as fast as onnxruntime's "
                        "own int8 quantizer; residual branches on 8 bits, so further from the program)")
    p.add_argument("--int4-weights", action="store_true",
                   help="store 4-bit weights as ONNX INT4 (opset 21) instead of int8 storage of the 4-bit codes")
    p.add_argument("--calibration-batches", type=COUNT, default=2)
    p.add_argument("--check-batches", type=COUNT, default=4, help="held-out batches of 64 for the onnxruntime check")
    p.set_defaults(func=run_export)


def run_export(args) -> int:
    from hawq_ray.onnx.export import check_onnx, export_onnx
    from hawq_ray.inputs.data import batches
    from hawq_ray.service.cli.deploy import quantized_model
    from hawq_ray.service.outputs import writable_file
    out = writable_file(args.out)
    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise HawqError(f"--checkpoint {args.checkpoint}: no such file (a state.pt from hawq-ray finetune)")
    t0 = time.time()
    md = resolve(args)
    program = quantized_model(md, args.bits, args.checkpoint, args.calibration_batches).to_integer()
    origin = (f"fine-tuned QAT checkpoint {args.checkpoint}" if args.checkpoint else
              f"calibrated on {args.calibration_batches} batches of 64 of {md.data.name}")
    export_onnx(program, out, {"model": md.name, "scales": origin}, int4_weights=args.int4_weights,
                form=args.form)
    print(f"wrote {out}; checking it in onnxruntime on {args.check_batches} held-out batches{data_note(md.data)}",
          file=sys.stderr)
    check = check_onnx(out, program, [b[0] for b in batches(md.data.test, 64, args.check_batches)])
    result = {"out": str(out), "model": md.name, "bits": args.bits, "form": args.form,
              "seconds": round(time.time() - t0, 1), **check}
    if args.json:
        print_json(result)
    else:
        print(f"exported {md.name} {args.bits} -> {out} in {result['seconds']} s: top-1 agreement with the integer "
              f"executor {check['top1_agreement']:.4f} on {check['samples']} images, largest logit difference "
              f"{check['max_logit_diff_units']:g} output-scale units ({100 * check['max_logit_diff_rel']:.2g}% of the "
              f"largest logit; mean {check['mean_logit_diff_units']:g} units)")
        print(__doc__.split("runtime:")[1].strip("\n").replace("OUT", str(out)))
    return 0
