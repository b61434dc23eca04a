"""`hawq-ray layers`, `hawq-ray cost`, `hawq-ray verify`: the layer table, size/BOPS, bit-exactness."""
from __future__ import annotations

import sys
import time

import torch

from hawq_ray.service.cli.common import print_json
from hawq_ray.service.cli.common import add_model_args, data_note, fmt_table, resolve
from hawq_ray.contract.table import COL
from hawq_ray.service.settings import BATCH, COUNT, SEED


def register(sub) -> None:
    p = sub.add_parser("layers", help="the layer table: one row per quantizable layer")
    add_model_args(p, data=False)
    p.set_defaults(func=run_layers)

    p = sub.add_parser("cost", help="model size (MiB) and GBOPS of a bit config")
    add_model_args(p, data=False)
    p.add_argument("--bits", required=True, help="fp32 | uniform4 | uniform8 | a JSON file {layer: bits}")
    p.set_defaults(func=run_cost)

    p = sub.add_parser("verify", help="QAT simulation vs integer executor (must be 0 differences) and "
                                      "fake vs integer quantization per layer (Figure G.1)")
    add_model_args(p)
    p.add_argument("--bits", default="uniform8", help="uniform4 | uniform8 | a JSON file {layer: bits}")
    p.add_argument("--inputs", type=COUNT, default=8, help="number of random inputs to compare (default 8)")
    p.add_argument("--calibration-batches", type=COUNT, default=2, help="batches of data to calibrate on")
    p.add_argument("--batch-size", type=BATCH, default=8)
    p.add_argument("--plot", default=None, help="write the per-layer normalized difference plot (PNG)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--tvm", action="store_true", help="also compile with TVM and count elements that differ "
                                                       "from the integer executor (must be 0)")
    p.add_argument("--target", default="llvm", help="TVM target for --tvm (llvm, avx2, avx512, avx512-vnni, amx or cuda)")
    p.set_defaults(func=run_verify)


def run_layers(args) -> int:
    from hawq_ray.quant.graph import trace_graph
    from hawq_ray.quant.layers import layer_table
    md = resolve(args, need_data=False)
    graph = trace_graph(md.model, md.input_shape)
    table = layer_table(md.model, md.input_shape, graph)
    if args.json:
        print_json({"model": md.name, "capture": graph.capture,
                    "layers": table.astype(object).where(table.notna(), None).to_dict(orient="records")})
    else:
        print(f"capture: {graph.capture}")
        print(fmt_table(table))
        print(f"{len(table)} layers, {int(table[COL.params].sum())} weights, "
              f"{int(table[COL.macs].sum()) / 1e9:.3f} GMACs per sample, largest activation a layer reads "
              f"{int(table[COL.act_elements].max())} elements")
    return 0


def run_cost(args) -> int:
    from hawq_ray.quant.layers import layer_table
    from hawq_ray.contract.bits import parse_bits
    from hawq_ray.contract.cost import config_costs
    md = resolve(args, need_data=False)
    table = layer_table(md.model, md.input_shape)
    bits = {layer: 32 for layer in table[COL.layer]} if args.bits == "fp32" else parse_bits(args.bits, table)
    costs = config_costs(table, bits)
    result = {k: costs[k] for k in ("size_mib", "gbops", "activation_mib", "memory_mib")}
    if args.json:
        print_json(result)
    else:
        print(f"{md.name} {args.bits}: size {result['size_mib']:.2f} MiB, {result['gbops']:.1f} GBOPS, largest "
              f"activation {result['activation_mib'] * 1024:.1f} KiB (batch 1), memory (weights + largest activation) "
              f"{result['memory_mib']:.2f} MiB")
    return 0


def run_verify(args) -> int:
    from hawq_ray.inputs.data import batches
    from hawq_ray.quant.qat import prepare
    from hawq_ray.analysis.verify import check_compiled, check_simulation, plot_fake_vs_int
    t0 = time.time()
    md = resolve(args)
    qm = prepare(md.model, args.bits, md.input_shape)
    print(f"calibrating on {args.calibration_batches} batches{data_note(md.data)}", file=sys.stderr)
    qm.calibrate(batches(md.data.train, args.batch_size, args.calibration_batches))
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randn((args.inputs, *md.input_shape), generator=gen)
    summary, table = check_simulation(qm, x)
    if args.tvm:
        program = qm.to_integer()
        tvm_summary, rows = check_compiled(program, program.quantize_input(x), args.target)
        summary |= tvm_summary
        per_layer = {}
        for r in rows:
            if r["layer"] is not None:
                per_layer[r["layer"]] = per_layer.get(r["layer"], 0) + r["differing"]
        table["tvm_vs_int_diff"] = [per_layer.get(layer, 0) for layer in table["layer"]]
    summary |= {"model": md.name, "bits": args.bits, "inputs": args.inputs, "seconds": time.time() - t0}
    if args.plot:
        plot_fake_vs_int(table, args.plot, f"{md.name} {args.bits}: fake vs integer-only, per layer")
    if args.json:
        print_json(summary | {"layers": table.to_dict(orient="records")})
    else:
        print(fmt_table(table))
        print(f"QAT simulation vs integer executor: {summary['differing']} of {summary['elements']} output "
              f"elements differ (max |diff| {summary['max_abs_diff']}); predictions equal: "
              f"{summary['predictions_equal']}; {summary['seconds']:.1f} s")
    if args.tvm and not args.json:
        print(f"TVM ({args.target}) vs integer executor: {summary['tvm_differing']} of "
              f"{summary['tvm_elements']} output elements differ")
        first = summary["tvm_first_divergence"]
        if not first:
            print(f"every value the TVM kernels store agrees ({summary['tvm_values']} values compared)")
        else:
            where = f"layer {first['layer']}" if first["layer"] else f"kernel {first['kernel']}"
            print(f"first divergence: value {first['value']!r} of {where} ({first['differing']} of "
                  f"{first['elements']} elements, max |diff| {first['max_abs_diff']})")
    return 0 if summary["differing"] == 0 and summary.get("tvm_differing", 0) == 0 else 1
