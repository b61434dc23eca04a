"""`hawq-ray run` (the main job) and `hawq-ray report RUN`."""
from __future__ import annotations

from pathlib import Path

from hawq_ray.service.cli.common import print_json
from hawq_ray.service.settings import ACCURACY_DROP
from solver.target import MINIMIZE


def register(sub) -> None:
    p = sub.add_parser("run", help="the whole job: traces -> latency -> sweep -> fine-tune -> TVM -> report")
    p.add_argument("--config", default=None, help="run.yaml (model, weights, data, budgets, actors, tune, ...)")
    p.add_argument("--model", default=None,
                   help="the model, over run.yaml's (a pytorchcv name, torchvision:NAME, or package.module:callable: "
                        "user code, which a run.yaml may not name since it may come from someone else)")
    p.add_argument("--max-drop", default=None, metavar="POINTS", type=ACCURACY_DROP,
                   help="accuracy target, over run.yaml's targets.max_drop: the cheapest config whose fine-tuned "
                        "integer top-1 is within POINTS of fp32")
    p.add_argument("--minimize", default=None, choices=MINIMIZE,
                   help="the resource the accuracy target minimizes (default size)")
    p.add_argument("--address", default=None, help="Ray address to join (default: start a local Ray)")
    p.add_argument("--out", default="runs/default", help="run folder (default runs/default); rerun to resume")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    p.set_defaults(func=run_main)

    p = sub.add_parser("report", help="write report.md and plots of a run folder")
    p.add_argument("run_dir", metavar="RUN")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run_report)


def run_main(args) -> int:
    from hawq_ray.service.cli.common import fmt_table
    from hawq_ray.service.pipeline import load_config, run
    from hawq_ray.service.report import results_table
    overrides = {"model": args.model} if args.model else {}
    targets = {k: v for k, v in (("max_drop", args.max_drop), ("minimize", args.minimize)) if v is not None}
    if targets:
        overrides["targets"] = targets
    tables = run(load_config(args.config, overrides), args.out, address=args.address)
    results = results_table(Path(args.out))
    print(fmt_table(results))
    print(f"report: {args.out}/report.md")
    if args.json:
        print_json({"out": args.out, "report": f"{args.out}/report.md",
                    "results": results.to_dict(orient="records"), "stages": list(tables)})
    return 0


def run_report(args) -> int:
    from hawq_ray.service.report import write_report
    from hawq_ray.service.stages import report_sections
    path = write_report(args.run_dir, report_sections())
    print(f"report: {path}")
    if args.json:
        print_json({"report": str(path)})
    return 0
