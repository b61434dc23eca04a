"""`report.md` of a run folder: result tables and plots (Pareto fronts, the evidence of the search, Figure I.1,
Figure G.1)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from hawq_ray.analysis.verify import plot_fake_vs_int
from hawq_ray.contract import HawqError
from hawq_ray.contract.bits import bits_of_cell
from hawq_ray.contract.table import BIT_WIDTHS, COL, LATENCY_COLUMNS, lat_col, omega_col
from hawq_ray.inputs.data import DISTILLED, DISTILLED_NOTE
from hawq_ray.service.outputs import write_atomic

RESOURCE_LABELS = {"size_mib": "model size (MiB)", "gbops": "GBOPS", "latency_ms": "latency (ms, sum of layers)",
                   "activation_mib": "largest activation (MiB, batch 1)"}
DEPLOY_COLUMNS = ["config", "tvm_differing", "tvm_elements", "predicted_ms", "latency_median_ms", "latency_q25_ms", "latency_q75_ms",
                  "latency_samples", "latency_limit_ms", "over_budget"]


def _read(run_dir: Path, name: str) -> pd.DataFrame | None:
    path = run_dir / f"{name}.parquet"
    if not path.is_file():
        return None
    try:
        return pd.read_parquet(path)
    except Exception as e:  # noqa: BLE001 - any reader failure: name the file
        raise HawqError(f"{path}: cannot read this table ({type(e).__name__}); delete it to recompute") from None


def results_table(run_dir: Path) -> pd.DataFrame:
    """One row per fine-tuned config: costs, accuracies (fp32, PTQ, QAT; integer executor) and deployment."""
    ft = _read(run_dir, "finetune")
    if ft is None:
        raise HawqError(f"{run_dir}: no finetune.parquet; run `hawq-ray run --out {run_dir}` first")
    cols = ["config", "budget", "target", "size_mib", "gbops", "latency_ms", "activation_mib", "top1_fp32", "top1_ptq",
            "top1", "test_loss"]
    out = ft[[c for c in cols if c in ft.columns]].copy()
    sweep = _read(run_dir, "sweep")
    if sweep is not None and "confidence" in sweep:
        out = out.merge(sweep[["config", "confidence"]], on="config", how="left")
    dep = _read(run_dir, "deploy")
    if dep is not None and not dep.empty:
        out = out.merge(dep[[c for c in DEPLOY_COLUMNS if c in dep.columns]], on="config", how="left")
    return out


def confidence_section(run_dir: Path, sweep: pd.DataFrame, plots: Path) -> list:
    """Each ILP config's confidence and the layers whose bits flip under trace draws."""
    if "confidence" not in sweep:
        return []
    chosen = sweep[sweep["confidence"].notna()]
    if chosen.empty:
        return []
    rows = [{"config": r.config, "confidence": r.confidence, "flipping layers (fraction of draws)": ", ".join(
        f"{k} ({v:.2f})" for k, v in json.loads(r.flips).items()) or "none"} for r in chosen.itertuples()]
    return ["## Confidence of each choice", "", "Each budget's ILP re-solved with every layer's trace drawn from "
            "its estimate (normal, the estimate's mean and standard error): `confidence` is the fraction of draws "
            "that choose the same config (the lowest over the budgets that chose it); a layer flips in a draw when "
            "its bits differ.", "", _md(pd.DataFrame(rows)), ""]


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def pareto_mask(cost: np.ndarray, acc: np.ndarray) -> np.ndarray:
    """True where no other point has lower-or-equal cost and higher-or-equal accuracy (one strictly)."""
    keep = np.ones(len(cost), dtype=bool)
    for i in range(len(cost)):
        better = (cost <= cost[i]) & (acc >= acc[i]) & ((cost < cost[i]) | (acc > acc[i]))
        keep[i] = not better.any()
    return keep


def _save(plt, fig, path: Path, rect=None) -> Path:
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_pareto(results: pd.DataFrame, path: Path) -> Path:
    """Top-1 (higher is better) and, where the results have it, the held-out loss (lower is better) of each
    fine-tuned config against each resource, with the Pareto front: the loss shows the trade-off where top-1
    saturates."""
    plt = _plt()
    resources = [r for r in RESOURCE_LABELS if r in results and results[r].notna().any()]
    metrics = [m for m in ("top1", "test_loss") if m in results and results[m].notna().any()]
    fig, axes = plt.subplots(len(metrics), len(resources), figsize=(5 * len(resources), 4 * len(metrics)),
                             squeeze=False)
    for row, metric in zip(axes, metrics):
        for ax, res in zip(row, resources):
            _pareto_panel(ax, results, res, metric)
    return _save(plt, fig, path)


def _pareto_panel(ax, results: pd.DataFrame, res: str, metric: str) -> None:
    cost = results[res].to_numpy(float)
    value = 100 * results[metric].to_numpy(float) if metric == "top1" else results[metric].to_numpy(float)
    label = RESOURCE_LABELS[res]
    if res == "latency_ms" and "latency_median_ms" in results and results["latency_median_ms"].notna().all():
        cost = _measured_beside_predicted(ax, results, value)
        label = "latency (ms): measured median, interquartile bar; predicted: sum of layers"
    mask = pareto_mask(cost, value if metric == "top1" else -value)
    ax.scatter(cost, value, c="tab:gray", label="configs")
    order = np.argsort(cost[mask])
    ax.plot(cost[mask][order], value[mask][order], "o-", c="tab:red", label="Pareto front")
    for c, v, name in zip(cost, value, results["config"]):
        ax.annotate(str(name), (c, v), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if metric == "top1" and "top1_fp32" in results:
        ax.axhline(100 * float(results["top1_fp32"].iloc[0]), ls="--", c="tab:blue", label="fp32")
    ax.set_xlabel(label, fontsize=8 if res == "latency_ms" else None)
    ax.set_ylabel("top-1 (%), integer executor" if metric == "top1" else "held-out loss, integer executor")
    name = "accuracy" if metric == "top1" else "loss"
    ax.set_title(f"Pareto front: {name} vs {RESOURCE_LABELS[res].split(' (')[0]}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def _measured_beside_predicted(ax, results: pd.DataFrame, acc: np.ndarray) -> np.ndarray:
    """The deployed modules' measured latency (median, interquartile bar) joined to the ILP's prediction of each
    config and its budget; returns the measured medians, on which the front is drawn."""
    med = results["latency_median_ms"].to_numpy(float)
    predicted = results["predicted_ms"].to_numpy(float)
    lo, hi = med - results["latency_q25_ms"].to_numpy(float), results["latency_q75_ms"].to_numpy(float) - med
    ax.errorbar(med, acc, xerr=[lo, hi], fmt="none", ecolor="tab:red", capsize=3)
    ax.scatter(predicted, acc, marker="x", c="tab:purple", label="predicted (sum of layers)")
    for p, m, a in zip(predicted, med, acc):
        ax.plot([p, m], [a, a], ":", c="tab:purple", lw=0.8)
    if "latency_limit_ms" in results:
        limit = results["latency_limit_ms"].to_numpy(float)
        ok = np.isfinite(limit)
        ax.scatter(limit[ok], acc[ok], marker="|", s=200, c="k", label="latency budget")
    return med


def plot_evidence(rows: pd.DataFrame, path: Path) -> Path:
    """Measured KL against predicted sum Omega for every config evaluated, by kind, on log axes; then the KL
    against each resource with its Pareto front (post-training quantization, every config of the stage)."""
    plt = _plt()
    distinct = rows.drop_duplicates(["config", "kind"])
    resources = [r for r in RESOURCE_LABELS if r in rows and rows[r].notna().all()]
    fig, axes = plt.subplots(1, 1 + len(resources), figsize=(5.5 * (1 + len(resources)), 4.5), squeeze=False)
    styles = (("random", dict(c="tab:gray", marker="o", s=14)), ("reversed", dict(c="tab:blue", marker="v")),
              ("ilp", dict(c="tab:red", marker="*", s=90)))
    for k, ax in enumerate(axes[0]):
        x_of = (lambda part: part["predicted_omega"].clip(lower=1e-12)) if k == 0 else \
            (lambda part, r=resources[k - 1]: part[r])
        for kind, style in styles:
            part = distinct[distinct["kind"] == kind]
            ax.scatter(x_of(part), part["kl"].clip(lower=1e-12), label=kind, **style)
        ax.set_yscale("log")
        ax.set_ylabel("measured KL(fp32 || integer), held-out")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        if k == 0:
            from matplotlib.ticker import NullFormatter
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("predicted sum of Omega (searchable layers, Eq. 8)")
            ax.set_title("Does the predicted sensitivity order the configs?")
            continue
        one = rows.drop_duplicates("config")
        cost, kl = one[resources[k - 1]].to_numpy(float), one["kl"].to_numpy(float)
        front = pareto_mask(cost, -kl)
        order = np.argsort(cost[front])
        ax.plot(cost[front][order], kl[front][order].clip(1e-12), "-", c="tab:red", lw=1, label="Pareto front")
        ax.set_xlabel(RESOURCE_LABELS[resources[k - 1]])
        ax.set_title(f"KL vs {RESOURCE_LABELS[resources[k - 1]].split(' (')[0]} (no fine-tuning)")
    return _save(plt, fig, path)


def evidence_section(run_dir: Path, rows: pd.DataFrame, plots: Path) -> list:
    from hawq_ray.analysis.evidence import omega_kl_correlation, standing
    rho, n = omega_kl_correlation(rows)
    plot_evidence(rows, plots / "evidence.png")
    return ["## Evidence: the ILP's configs against random and reversed ones", "",
            "Each budget's ILP config, random configs that fill the same budget, and the reversed one (the high "
            "widths where the sensitivity is lowest), each quantized without fine-tuning and run by the integer "
            "executor on the held-out split. KL is the mean KL divergence of the integer model's predictions "
            "from the fp32 model's; `beats_random_fraction` is the share of random configs with a higher KL "
            "(ties count half); `rank` 1 is the lowest KL; `beats_reversed` is empty where the reversed config "
            "is the ILP's own.", "",
            f"Spearman correlation of predicted sum Omega and measured KL: **{rho:.2f}** over {n} distinct "
            "configs.", "", _md(standing(rows)), "", "![evidence](plots/evidence.png)", ""]


def plot_bits_vs_sensitivity(table: pd.DataFrame, configs: pd.DataFrame, path: Path) -> Path:
    """Figure I.1: chosen bits per layer beside sensitivity (Omega4 - Omega8) and the INT4 speed-up."""
    plt = _plt()
    n = len(configs)
    fig, axes = plt.subplots(n, 1, figsize=(max(8, 0.35 * len(table)), 2.6 * n), squeeze=False)
    x = np.arange(1, len(table) + 1)
    low, high = min(BIT_WIDTHS), max(BIT_WIDTHS)
    sens = (table[omega_col(low)] - table[omega_col(high)]).to_numpy(float)
    sens = sens / np.nanmax(np.abs(sens)) if np.nanmax(np.abs(sens)) > 0 else sens
    speed = None
    if {lat_col(low), lat_col(high)} <= set(table.columns) and table[lat_col(high)].notna().all():
        gain = (table[lat_col(high)] - table[lat_col(low)]).to_numpy(float)
        total = gain.sum()
        speed = gain / total if total > 0 else gain
    for ax, (_, row) in zip(axes[:, 0], configs.iterrows()):
        bits = bits_of_cell(row["bits"], "the sweep table")
        b = np.array([bits[layer] for layer in table[COL.layer]])
        ax.bar(x, np.where(b == 8, 1.0, 0.5), color=np.where(b == 8, "tab:blue", "c"), alpha=0.6,
               label="bits (tall: INT8, short: INT4)")
        ax.plot(x, sens, "-o", c="tab:orange", ms=3, label="sensitivity Omega4 - Omega8 (normalized)")
        if speed is not None:
            ax.plot(x, speed, "-s", c="k", ms=3, label="INT4 latency gain / total gain")
        ax.set_title(f"{row['config']} {row.get('budget', '')}", fontsize=8)
        ax.set_ylim(min(-0.1, np.nanmin(sens) - 0.1), 1.1)
        ax.set_xticks(x)
        ax.tick_params(labelsize=6)
    axes[-1, 0].set_xlabel("layer (execution order)")
    axes[0, 0].legend(fontsize=6, loc="upper right")
    fig.suptitle("Bits chosen per layer vs sensitivity and INT4 speed-up (HAWQ-V3 Figure I.1)", fontsize=9)
    return _save(plt, fig, path, rect=(0, 0, 1, 1 - 0.3 / (2.6 * n)))


def _md(df: pd.DataFrame) -> str:
    cols = list(df.columns)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in df.iterrows():
        cells = []
        for c in cols:
            v = r[c]
            if isinstance(v, (float, np.floating)):
                cells.append("" if np.isnan(v) else f"{v:.4g}")
            else:
                cells.append(str(v).replace("|", "\\|").replace("\n", " "))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _shown(results: pd.DataFrame) -> pd.DataFrame:
    """The results as the report prints them: each measured latency as one cell, median (q25-q75), beside the
    latency the ILP predicted for it, and the budget that chose it."""
    out = results.drop(columns=[c for c in DEPLOY_COLUMNS[3:] if c in results.columns])
    if "latency_median_ms" not in results:
        return out
    at = list(out.columns).index("latency_ms") if "latency_ms" in out else len(out.columns)
    out = out.drop(columns=["latency_ms"], errors="ignore")
    cells = {"predicted_ms": results["predicted_ms"],
             "measured_ms (IQR)": [f"{m:.4g} ({a:.4g}-{b:.4g})" for m, a, b in
                                   results[["latency_median_ms", "latency_q25_ms", "latency_q75_ms"]].to_numpy()],
             "budget_ms": results["latency_limit_ms"], "over_budget": results["over_budget"]}
    for k, (name, cell) in enumerate(cells.items()):
        out.insert(at + k, name, cell)
    return out


def target_section(run_dir: Path, finetuned: pd.DataFrame, plots: Path) -> list:
    """The accuracy target's answer and the trials that bracket it (`stages.target_search`)."""
    if "target" not in finetuned or finetuned["target"].isna().all():
        return []
    cols = [c for c in ("config", "target", "size_mib", "gbops", "latency_ms", "activation_mib", "top1_fp32",
                        "top1_best", "top1") if c in finetuned]
    answer = finetuned[finetuned["target"] == "answer"]
    below = (finetuned["target"] == "below").any()
    said = (f"The answer is **{answer['config'].iloc[0]}**, the cheapest tested config within the target; " +
            ("every cheaper tested config missed it." if below else "no config of the chain is cheaper.")
            if len(answer) else
            "**No config meets the target**, not even the richest one; the closest is the one of the highest top-1.")
    return ["## Accuracy target", "", f"{said} {finetuned['config'].nunique()} configs were fine-tuned (the "
            "search bisects the chain of the ILP's answers, cheapest first; `below`: the tested config just "
            "cheaper than the answer).", "", _md(finetuned[cols]), ""]


def finetune_section(run_dir: Path, finetuned: pd.DataFrame, plots: Path) -> list:
    """The accuracy target's answer, where the run had one, and the fine-tuning trials that failed, each with its
    one-line reason: nothing of theirs was deployed, and the next run retries them."""
    return target_section(run_dir, finetuned, plots) + _failed_lines(finetuned)


def _failed_lines(finetuned: pd.DataFrame) -> list:
    failed = finetuned[finetuned["error"] != ""] if "error" in finetuned else finetuned.iloc[:0]
    if failed.empty:
        return []
    return [f"## Failed trials: {len(failed)} of {len(finetuned)}", "", "These trials ended with an error: their "
            "configs were not deployed, and the next run of the same command retries them.", "",
            _md(failed[["trial", "config", "epochs", "error"]]), ""]


def _latency_notes(results: pd.DataFrame) -> list:
    if "latency_median_ms" not in results:
        return []
    n = int(results["latency_samples"].min())
    lines = [f"`measured_ms`: the compiled modules of every config timed together, in {n} interleaved rounds "
             "with a rotating order (each sample the mean of back-to-back calls at the deploy batch): the median "
             "and, in brackets, the interquartile range. Two configs whose ranges overlap are not distinguished "
             "by this machine. `predicted_ms`: the sum of the per-layer kernel latencies the ILP used (empty when "
             "the profiled batch or target is not the deployed one). `budget_ms`: the tightest latency budget "
             "that chose the config, over the whole model.", ""]
    over = results[results["over_budget"].fillna(False).astype(bool)]
    for r in over.itertuples():
        lines += [f"**{r.config} breaks its latency budget**: measured {r.latency_median_ms:.4g} ms "
                  f"(interquartile from {r.latency_q25_ms:.4g}) against a budget of {r.latency_limit_ms:.4g} ms "
                  f"(predicted {r.predicted_ms:.4g} ms).", ""]
    return lines


def layer_section(run_dir: Path, table: pd.DataFrame, plots: Path) -> list:
    """Figure I.1 (bits per layer against sensitivity and INT4 speed-up) and the layer table."""
    sweep = _read(run_dir, "sweep")
    if sweep is None or not {omega_col(b) for b in BIT_WIDTHS} <= set(table.columns):
        return []
    plot_bits_vs_sensitivity(table, sweep, plots / "bits_vs_sensitivity.png")
    show = [c for c in [COL.layer, COL.params, COL.macs, COL.trace, COL.trace_stderr, *map(omega_col, BIT_WIDTHS),
                        *LATENCY_COLUMNS] if c in table.columns]
    return ["## Bits per layer, sensitivity and INT4 speed-up (Figure I.1)", "",
            "![bits](plots/bits_vs_sensitivity.png)", "", "## Layer table", "", _md(table[show]), ""]


def export_section(run_dir: Path, exported: pd.DataFrame, plots: Path) -> list:
    return ["## ONNX export (QDQ)", "", "Each config as an ONNX model with QuantizeLinear / DequantizeLinear "
            "pairs, run in onnxruntime on the held-out split and compared with the integer executor: "
            "top-1 agreement and the logit difference in units of the output scale. ONNX rounds with "
            "float scales where the program uses dyadic integers, so these differ slightly "
            "(docs/design.md, \"ONNX export\").", "", _md(exported), ""]


def fake_vs_int_section(run_dir: Path, fvi: pd.DataFrame, plots: Path) -> list:
    plot_fake_vs_int(fvi, plots / "fake_vs_int.png", "Fake vs integer-only quantization by layer (HAWQ-V3 Figure G.1)")
    return ["## Fake vs integer-only quantization (Figure G.1)", "", "![G.1](plots/fake_vs_int.png)", ""]


def distilled_note(cfg: dict) -> list:
    """What a run on data: distilled saw (`inputs.distill`): no real image at any stage."""
    d = cfg.get("distilled") or {}
    return [f"**{DISTILLED_NOTE[0].upper()}{DISTILLED_NOTE[1:]}.** Every stage ran on images distilled from the fp32 "
            "model's own BatchNorm running statistics (after ZeroQ: Gaussian noise optimized so that each BatchNorm "
            f"layer's batch mean and standard deviation match its running ones): {d.get('train', '?')} images for "
            "the calibration, the Hessian traces and fine-tuning (by distillation from the fp32 model), and "
            f"{d.get('test', '?')} held-out images of another seed. Their labels are the fp32 model's predictions, "
            "so every top-1 in this report is agreement with the fp32 model, not accuracy, and the KL of the "
            "evidence stage is measured on distilled images.", ""]


def write_report(run_dir, sections=()) -> Path:
    """report.md of a run folder: the results and their Pareto fronts, then `sections` [(table name,
    writer(run_dir, table, plots) -> markdown lines)] for each table the folder holds
    (`service.stages.report_sections()` for a `hawq-ray run` folder)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HawqError(f"run folder {run_dir} does not exist")
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    results = results_table(run_dir)
    parts = ["# hawq-ray run report", "", f"Run folder: `{run_dir}`", ""]
    cfg = run_dir / "run.json"
    c = json.loads(cfg.read_text()) if cfg.is_file() else {}
    if c:
        parts += [f"Model: `{c.get('model') or 'digits_resnet'}`, data: `{c.get('data') or 'default'}`, "
                  f"seed {c.get('seed')}.", ""]
    distilled = c.get("data") == DISTILLED
    if distilled:
        parts += distilled_note(c)
    parts += ["## Results", "", "Accuracy is top-1 on the held-out split computed by the integer executor"
              + (" (distilled images: agreement with the fp32 model's predictions)" if distilled else "") + "; "
              "`tvm_differing` counts output elements where the compiled TVM module differs from the integer "
              "executor (must be 0).", "", _md(_shown(results)), ""]
    parts += _latency_notes(results)
    plot_pareto(results, plots / "pareto.png")
    parts += ["## Pareto fronts", "", "![Pareto fronts](plots/pareto.png)", ""]
    for name, section in sections:
        table = _read(run_dir, name)
        if table is not None and not table.empty:
            parts += section(run_dir, table, plots)
    return write_atomic(run_dir / "report.md", "\n".join(parts))
