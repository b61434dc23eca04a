"""Bit-exactness and fake-vs-true quantization on one model (HAWQ-V3 Appendix G, Figure G.1)."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from hawq_ray.quant.executor import run_program


def normalized_difference(x_fake: torch.Tensor, x_int: torch.Tensor) -> float:
    """||x_fake - x_int|| / ||x_fake|| (eq. 24)."""
    x_fake, x_int = x_fake.to(torch.float64), x_int.to(torch.float64)
    denom = float(torch.linalg.vector_norm(x_fake))
    return float(torch.linalg.vector_norm(x_fake - x_int)) / denom if denom > 0 else 0.0


@torch.no_grad()
def verify_model(qmodel, x: torch.Tensor) -> tuple[dict, pd.DataFrame]:
    """Run QAT simulation, the integer executor and fake quantization on `x`.

    Returns a summary (differing output elements QAT vs integer, max |difference|) and a per-layer table:
    layer, bits, differing elements QAT vs integer, normalized difference of fake quantization against
    the integer executor at the layer's output (dequantized INT32 accumulator).
    """
    program = qmodel.to_integer()
    mode = qmodel.mode
    try:
        qmodel.set_mode("qat")
        qat_out, qat_layers = qmodel.run(x, record=True)
        qmodel.set_mode("fake")
        _, fake_layers = qmodel.run(x, record=True)
    finally:
        qmodel.set_mode(mode)
    int_out, values = run_program(program, program.quantize_input(x), record=True)
    rows = []
    for op in program.ops:
        if op.op not in ("conv2d", "dense"):
            continue
        z = values[op.output]
        real = z.to(torch.float64) * _channel(torch.as_tensor(op.scale), z.dim())
        rows.append({"layer": op.layer, "bits": program.bits[op.layer],
                     "qat_vs_int_diff": int((qat_layers[op.layer].q != z).sum()),
                     "fake_vs_int_norm_diff": normalized_difference(fake_layers[op.layer].r, real)})
    diff = (qat_out.q != int_out)
    summary = {"elements": int(diff.numel()), "differing": int(diff.sum()),
               "max_abs_diff": int((qat_out.q - int_out).abs().max()),
               "predictions_equal": bool(torch.equal(
                   program.dequantize_output(qat_out.q).argmax(1), program.dequantize_output(int_out).argmax(1)))}
    return summary, pd.DataFrame(rows)


def _channel(s: torch.Tensor, ndim: int) -> torch.Tensor:
    return s if s.dim() == 0 else s.reshape((-1,) + (1,) * (ndim - 2))


def plot_fake_vs_int(table: pd.DataFrame, path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(table)), 3.5))
    ax.plot(np.arange(1, len(table) + 1), table["fake_vs_int_norm_diff"], marker="o")
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("||x_fake - x_int|| / ||x_fake||")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
