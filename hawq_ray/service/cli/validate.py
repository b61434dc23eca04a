"""`hawq-ray validate`: the evidence that the ILP chooses well. For each budget point, the ILP's config, random
configs of the same budget and the reversed one are quantized without fine-tuning and evaluated on held-out
data as Ray tasks; prints each budget's standing and the Spearman correlation of predicted Omega and measured KL."""
from __future__ import annotations

from pathlib import Path

from hawq_ray.contract import HawqError
from hawq_ray.service.cli.common import add_model_args, data_note, fmt_table, resolve
from hawq_ray.service.cli.solve import add_budget_axes, budget_axes, read_layer_table
from hawq_ray.service.settings import COUNT, SEED


def register(sub) -> None:
    p = sub.add_parser("validate", help="the ILP's configs against random and reversed ones of the same budgets "
                       "(post-training quantization, integer executor, held-out data)", description=__doc__)
    p.add_argument("--table", required=True, help="layer table with traces (.parquet or .csv), as `hawq-ray "
                   "sensitivity` writes it [, lat4_ms, lat8_ms for latency budgets]")
    add_model_args(p)
    add_budget_axes(p)
    p.add_argument("--randoms", type=COUNT, default=20, help="random configs per budget (default 20)")
    p.add_argument("--seed", type=SEED, default=0, help="seed of the random configs (default 0)")
    p.add_argument("--out", help="write every config's row (parquet, or CSV if *.csv)")
    p.add_argument("--address", default=None, help="Ray cluster to join (default: RAY_ADDRESS, or a local one)")
    p.set_defaults(func=run_validate)


def run_validate(args) -> int:
    from hawq_ray.analysis.evidence import omega_kl_correlation, standing
    from hawq_ray.service.evidence import evidence_table
    from hawq_ray.service.outputs import writable_file
    from hawq_ray.service.session import connect
    from solver.sweep import budget_grid
    grid = budget_grid(budget_axes(args, "validate"))
    table = read_layer_table(args.table)
    if args.out:
        writable_file(args.out)
    md = resolve(args)
    if not (args.weights or args.pretrained):
        print(f"[validate] no --weights or --pretrained: {md.name} is evaluated at its random initialization")
    connect(args.address)
    try:
        rows = evidence_table(md.model.eval(), md.input_shape, md.data, table, grid, randoms=args.randoms,
                              seed=args.seed, progress=lambda done, total: print(
                                  f"[validate] {done}/{total} configs evaluated", flush=True))
    except ValueError as e:       # TableError, BudgetError
        raise HawqError(f"--table {args.table}: {e}") from None
    if rows.empty:
        raise HawqError("validate: no budget point is feasible for this table")
    rho, n = omega_kl_correlation(rows)
    print(f"{n} distinct configs evaluated{data_note(md.data)}")
    print(fmt_table(standing(rows)))
    print(f"Spearman(predicted Omega, measured KL) = {rho:.3f} over {n} configs")
    if args.out:
        if Path(args.out).suffix.lower() == ".csv":
            rows.to_csv(args.out, index=False)
        else:
            rows.to_parquet(args.out, index=False)
        print(f"wrote {args.out}")
    if args.json:
        from hawq_ray.service.cli.common import print_json
        print_json({"configs": n, "spearman": rho, "standing": standing(rows).to_dict(orient="records"),
                    "out": args.out})
    return 0
