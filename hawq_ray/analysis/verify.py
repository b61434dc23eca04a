"""The three executions of a quantized model held to each other, element by element: the QAT simulation, the
integer executor (the reference) and the compiled TVM module; and fake against true quantization per layer
(HAWQ-V3 Appendix G, Figure G.1).

    summary, table = check_simulation(qmodel, x)           # QAT simulation vs integer executor; fake vs int
    summary, rows = check_compiled(program, x, "llvm")      # TVM vs integer executor, every stored value
    result = check_random_program(seed, "llvm")             # the same for a random program (program.random)
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from hawq_ray.contract import HawqError
from hawq_ray.program.executor import run_program
from hawq_ray.quant.values import channel_view


@dataclass
class Comparison:
    elements: int
    differing: int
    max_abs_diff: int

    @property
    def exact(self) -> bool:
        return self.differing == 0

    def __add__(self, other: "Comparison") -> "Comparison":
        return Comparison(self.elements + other.elements, self.differing + other.differing,
                          max(self.max_abs_diff, other.max_abs_diff))


def compare(got, want) -> Comparison:
    got = np.asarray(got.numpy() if hasattr(got, "numpy") else got)
    want = np.asarray(want.numpy() if hasattr(want, "numpy") else want)
    if got.shape != want.shape:
        raise HawqError(f"compare: output shape {got.shape} differs from the reference's {want.shape}")
    diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
    return Comparison(int(diff.size), int((diff != 0).sum()), int(diff.max(initial=0)))


def compare_batches(model, reference, inputs) -> Comparison:
    """`model` (a DeployedModel) against `reference` (int8 array -> integer output) on each input batch."""
    return sum((compare(model(x), reference(x)) for x in inputs), Comparison(0, 0, 0))


def executor_of(program):
    """The integer executor as a reference for `compare_batches`: int8 numpy batch -> int64 numpy output."""
    return lambda x: run_program(program, torch.from_numpy(np.asarray(x))).numpy()


def random_inputs(shape, batches: int = 2, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    return [rng.integers(-128, 128, shape).astype(np.int8) for _ in range(batches)]


# ---------------------------------------------------------------------------------------------- TVM vs executor

def compare_values(program, model, x) -> list:
    """Every value the kernels of `model` (compiled with `every_value=True`) store, against the integer
    executor on the int8 batch `x`, in execution order: dicts of value, kernel, layer (the conv / dense
    layer the kernel computes, None for the kernels between layers), elements, differing, max_abs_diff.
    Values the back end introduces (a requantize moved before a max pool) have no executor counterpart and
    are left out; the moved op's result keeps its name and is compared."""
    x = np.asarray(x.numpy() if hasattr(x, "numpy") else x)
    _, want = run_program(program, torch.from_numpy(x), record=True)
    got = model.values(x)
    rows = []
    for v in model.manifest["values"]:
        if v["name"] not in want:
            continue
        c = compare(got[v["name"]], want[v["name"]])
        rows.append({"value": v["name"], "kernel": v["kernel"], "layer": v["layer"], "elements": c.elements,
                     "differing": c.differing, "max_abs_diff": c.max_abs_diff})
    return rows


def first_divergence(rows: list) -> dict | None:
    """The first value (in execution order) where the compiled model and the integer executor differ."""
    return next((r for r in rows if r["differing"]), None)


def check_compiled(program, x, target="llvm") -> tuple[dict, list]:
    """Compile `program` for the batch `x` (int8) with every stored value returned; compare the output and
    each value with the integer executor. Returns (summary: tvm_differing, tvm_elements, tvm_values,
    tvm_first_divergence; per-value rows of `compare_values`)."""
    from hawq_ray.deploy.build import compile_program
    x = np.asarray(x.numpy() if hasattr(x, "numpy") else x)
    model = compile_program(program, batch=x.shape[0], target=target, every_value=True)
    out = compare(model(x), executor_of(program)(x))
    rows = compare_values(program, model, x)
    return {"tvm_differing": out.differing, "tvm_elements": out.elements, "tvm_values": len(rows),
            "tvm_first_divergence": first_divergence(rows)}, rows


def check_random_program(seed: int, target="llvm") -> dict:
    """Compile `program.random.random_program(seed)` with every stored value returned and compare each value
    with the integer executor on its inputs. Returns a summary: seed, pair, ops, kernels, the kernel paths
    used, values compared, differing elements, the first value that differs (or None), and the error if the
    back end refused the program."""
    from hawq_ray.deploy.build import compile_program
    from hawq_ray.program.random import op_pairs, random_program
    rp = random_program(seed)
    prog = rp.program
    out = {"seed": seed, "pair": rp.pair, "ops": len(prog.ops), "pairs": sorted(op_pairs(prog)),
           "pairs_via_requantize": sorted(op_pairs(prog, through="requantize")),
           "wide": rp.notes["wide"], "target": str(target), "error": None}
    try:
        model = compile_program(prog, batch=rp.inputs[0].shape[0], target=target, every_value=True)
    except Exception as e:     # reported, and counted as a failure by the callers
        return out | {"error": f"{type(e).__name__}: {e}", "kernels": 0, "paths": [], "values": 0,
                      "differing": 0, "first": None}
    rows = list(itertools.chain.from_iterable(compare_values(prog, model, x) for x in rp.inputs))
    return out | {"kernels": len(model.manifest["kernels"]),
                  "paths": sorted({k.get("path") for k in model.manifest["kernels"]}),
                  "values": len(rows), "elements": sum(r["elements"] for r in rows),
                  "differing": sum(r["differing"] for r in rows), "first": first_divergence(rows)}


# ---------------------------------------------------------------------------------------------- simulation

def normalized_difference(x_fake: torch.Tensor, x_int: torch.Tensor) -> float:
    """||x_fake - x_int|| / ||x_fake|| (eq. 24)."""
    x_fake, x_int = x_fake.to(torch.float64), x_int.to(torch.float64)
    denom = float(torch.linalg.vector_norm(x_fake))
    return float(torch.linalg.vector_norm(x_fake - x_int)) / denom if denom > 0 else 0.0


@torch.no_grad()
def check_simulation(qmodel, x: torch.Tensor, program=None) -> tuple[dict, pd.DataFrame]:
    """Run QAT simulation, the integer executor and fake quantization on `x`; the executor runs `program` (a saved
    one, checked so against the simulation) or, by default, the model's own `to_integer()`.

    Returns a summary (differing output elements QAT vs integer, max |difference|) and a per-layer table:
    layer, bits, differing elements QAT vs integer, normalized difference of fake quantization against
    the integer executor at the layer's output (dequantized INT32 accumulator).
    """
    program = program if program is not None else qmodel.to_integer()
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
        if op.layer is None or op.layer not in program.bits:
            continue
        z = values[op.output]
        real = z.to(torch.float64) * channel_view(torch.as_tensor(op.scale), z.dim())
        rows.append({"layer": op.layer, "bits": program.bits[op.layer],
                     "qat_vs_int_diff": int((qat_layers[op.layer].q != z).sum()),
                     "fake_vs_int_norm_diff": normalized_difference(fake_layers[op.layer].r, real)})
    diff = (qat_out.q != int_out)
    summary = {"elements": int(diff.numel()), "differing": int(diff.sum()),
               "max_abs_diff": int((qat_out.q - int_out).abs().max()),
               "predictions_equal": bool(torch.equal(
                   program.dequantize_output(qat_out.q).argmax(1), program.dequantize_output(int_out).argmax(1)))}
    return summary, pd.DataFrame(rows)


def plot_fake_vs_int(table: pd.DataFrame, path, title: str) -> None:
    """Figure G.1: the normalized difference of fake quantization against the integer executor, by layer;
    one line per `config` when the table has that column (a run's configs), else one."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = list(table.groupby("config", sort=False)) if "config" in table else [(None, table)]
    n = max(len(p) for _, p in parts)
    fig, ax = plt.subplots(figsize=(max(8, 0.25 * n), 3.5))
    for config, part in parts:
        ax.plot(np.arange(1, len(part) + 1), part["fake_vs_int_norm_diff"], marker="o", ms=3,
                label=None if config is None else str(config))
    ax.set_xlabel("layer (execution order)")
    ax.set_ylabel("||x_fake - x_int|| / ||x_fake||")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if parts[0][0] is not None:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
