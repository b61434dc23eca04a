"""`report.md` of a run folder: result tables and plots (Pareto fronts, Figure I.1, Figure G.1)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from hawq_ray.analysis.verify import plot_fake_vs_int
from hawq_ray.contract import HawqError
from hawq_ray.contract.bits import bits_of_cell

RESOURCE_LABELS = {"size_mib": "model size (MiB)", "gbops": "GBOPS", "latency_ms": "latency (ms, sum of layers)"}


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
    cols = ["config", "budget", "size_mib", "gbops", "latency_ms", "top1_fp32", "top1_ptq", "top1"]
    out = ft[[c for c in cols if c in ft.columns]].copy()
    dep = _read(run_dir, "deploy")
    if dep is not None and not dep.empty:
        out = out.merge(dep[["config", "tvm_differing", "tvm_elements", "tvm_latency_ms"]], on="config", how="left")
    return out


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
    plt = _plt()
    resources = [r for r in RESOURCE_LABELS if r in results and results[r].notna().any()]
    fig, axes = plt.subplots(1, len(resources), figsize=(5 * len(resources), 4), squeeze=False)
    for ax, res in zip(axes[0], resources):
        cost, acc = results[res].to_numpy(float), 100 * results["top1"].to_numpy(float)
        mask = pareto_mask(cost, acc)
        ax.scatter(cost, acc, c="tab:gray", label="configs")
        order = np.argsort(cost[mask])
        ax.plot(cost[mask][order], acc[mask][order], "o-", c="tab:red", label="Pareto front")
        for c, a, name in zip(cost, acc, results["config"]):
            ax.annotate(str(name), (c, a), fontsize=7, xytext=(3, 3), textcoords="offset points")
        if "top1_fp32" in results:
            ax.axhline(100 * float(results["top1_fp32"].iloc[0]), ls="--", c="tab:blue", label="fp32")
        ax.set_xlabel(RESOURCE_LABELS[res])
        ax.set_ylabel("top-1 (%), integer executor")
        ax.set_title(f"Pareto front: accuracy vs {RESOURCE_LABELS[res].split(' (')[0]}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(plt, fig, path)


def plot_bits_vs_sensitivity(table: pd.DataFrame, configs: pd.DataFrame, path: Path) -> Path:
    """Figure I.1: chosen bits per layer beside sensitivity (Omega4 - Omega8) and the INT4 speed-up."""
    plt = _plt()
    n = len(configs)
    fig, axes = plt.subplots(n, 1, figsize=(max(8, 0.35 * len(table)), 2.6 * n), squeeze=False)
    x = np.arange(1, len(table) + 1)
    sens = (table["omega4"] - table["omega8"]).to_numpy(float)
    sens = sens / np.nanmax(np.abs(sens)) if np.nanmax(np.abs(sens)) > 0 else sens
    speed = None
    if {"lat4_ms", "lat8_ms"} <= set(table.columns) and table["lat8_ms"].notna().all():
        gain = (table["lat8_ms"] - table["lat4_ms"]).to_numpy(float)
        total = gain.sum()
        speed = gain / total if total > 0 else gain
    for ax, (_, row) in zip(axes[:, 0], configs.iterrows()):
        bits = bits_of_cell(row["bits"], "the sweep table")
        b = np.array([bits[layer] for layer in table["layer"]])
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
            cells.append(f"{v:.4g}" if isinstance(v, (float, np.floating)) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run_dir) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise HawqError(f"run folder {run_dir} does not exist")
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    results = results_table(run_dir)
    table = _read(run_dir, "table")
    sweep = _read(run_dir, "sweep")
    fvi = _read(run_dir, "fake_vs_int")
    parts = ["# hawq-ray run report", "", f"Run folder: `{run_dir}`", ""]
    cfg = run_dir / "run.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        parts += [f"Model: `{c.get('model') or 'digits_resnet'}`, data: `{c.get('data') or 'default'}`, "
                  f"seed {c.get('seed')}.", ""]
    parts += ["## Results", "", "Accuracy is top-1 on the held-out split computed by the integer executor; "
              "`tvm_differing` counts output elements where the compiled TVM module differs from the integer "
              "executor (must be 0).", "", _md(results), ""]
    plot_pareto(results, plots / "pareto.png")
    parts += ["## Pareto fronts", "", "![Pareto fronts](plots/pareto.png)", ""]
    if table is not None and sweep is not None and {"omega4", "omega8"} <= set(table.columns):
        plot_bits_vs_sensitivity(table, sweep, plots / "bits_vs_sensitivity.png")
        parts += ["## Bits per layer, sensitivity and INT4 speed-up (Figure I.1)", "",
                  "![bits](plots/bits_vs_sensitivity.png)", ""]
        show = [c for c in ["layer", "params", "macs", "trace", "trace_stderr", "omega4", "omega8", "lat4_ms",
                            "lat8_ms", "lat32_ms"] if c in table.columns]
        parts += ["## Layer table", "", _md(table[show]), ""]
    exported = _read(run_dir, "export")
    if exported is not None and not exported.empty:
        parts += ["## ONNX export (QDQ)", "", "Each config as an ONNX model with QuantizeLinear / DequantizeLinear "
                  "pairs, run in onnxruntime on the held-out split and compared with the integer executor: "
                  "top-1 agreement and the logit difference in units of the output scale. ONNX rounds with "
                  "float scales where the program uses dyadic integers, so these differ slightly "
                  "(docs/design.md, \"ONNX export\").", "", _md(exported), ""]
    if fvi is not None and not fvi.empty:
        plot_fake_vs_int(fvi, plots / "fake_vs_int.png", "Fake vs integer-only quantization by layer (HAWQ-V3 Figure G.1)")
        parts += ["## Fake vs integer-only quantization (Figure G.1)", "", "![G.1](plots/fake_vs_int.png)", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(parts))
    return path
