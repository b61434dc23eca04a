"""Per-layer Hessian traces (Hutchinson with Hutch++-style deflation) and the HAWQ-V3 sensitivity Omega.

One Hessian-vector product per iteration gives the trace of every layer's diagonal block at once:
with a Rademacher vector v over all parameters, E[v_i^T (H v)_i] = Tr(H_ii) for each layer i (the
cross terms H_ij v_j have mean zero). Hv comes from pyhessian's `hessian_vector_product`.

Deflation: the Hessian of a trained CNN has a few large eigenvalues, and they dominate the variance of
every layer's sample (through H_ii and the cross terms alike). With an n x k basis Q of the range of H S
(S: k Rademacher vectors; Q need not even be orthonormal) and P = Q Q^T, the identity
    H = (P H + H P - P H P) + (I - P) H (I - P)
splits each block trace in two: the first part's diagonal follows exactly from M = H Q (k more Hv),
and only the second, small part is estimated by Hutchinson, with v^T_i [(I-P) H (I-P) v]_i. This is
Hutch++ (Meyer et al. 2021) applied block by block; rank 0 is plain Hutchinson.

The data is a list of batches; batch b is "shard" b. Its sample for iteration t is the per-layer
v^T H_b v with v drawn from the seed (seed, b, t), and the iteration's sample of the whole data's
Hessian H = sum_b w_b H_b (w_b = batch size / data size) is x_t = sum_b w_b v_bt^T H_b v_bt, summed in
shard order (plus the exact part). The x_t are independent over t, so mean and standard error are plain
sample statistics. The same functions run inside `actors.hessian` on shards spread over Ray actors;
because the random vectors depend only on (seed, shard, iteration), merging sums in a fixed order and
the basis is built in the driver with single-threaded numpy, the table does not depend on how many
actors computed it.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from hawq_ray.contract import HawqError
from hawq_ray.contract.table import BIT_WIDTHS, COL, delta_col, omega_col
from hawq_ray.contract.cost import omega

TRACE_COLUMNS = [COL.trace, COL.trace_stderr, COL.trace_samples, COL.trace_converged]
QUANTIZABLE = (nn.Conv2d, nn.Linear)
DEFAULT_RANK = 16   # directions of the deflation basis; on the digits model and resnet20 it cuts the Hv
                    # products to 5% relative stderr from thousands to a few hundred (bench/bench_sensitivity.py)
SKETCH_TAG = 0x5CE7C4   # keys the sketch's random vectors apart from the iterations' (seed, shard, t)


# ---------------------------------------------------------------- inputs
def quantizable_layers(model: nn.Module) -> list[str]:
    """Qualified names of the conv and linear layers (the layer table's rows, in definition order)."""
    layers = [n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)]
    if not layers:
        raise HawqError(f"model {type(model).__name__} has no quantizable layer: "
                        f"valid models contain at least one nn.Conv2d or nn.Linear")
    return layers


def check_batches(batches) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches as a list of (inputs, targets); empty data is an error."""
    batches = [(x, y) for x, y in batches]
    if not batches or any(len(x) == 0 for x, _ in batches):
        raise HawqError("data for the Hessian traces is empty: valid data is at least one non-empty "
                        "(inputs, targets) batch")
    return batches


def check_loss(model: nn.Module, batches, criterion=None) -> None:
    """One forward pass per batch (eval mode, no graph): a loss that is not finite is an error."""
    criterion = criterion or nn.CrossEntropyLoss()
    device = next(model.parameters()).device
    with torch.no_grad(), eval_mode(model):
        for b, (x, y) in enumerate(batches):
            loss = criterion(model(x.to(device)), y.to(device))
            if not torch.isfinite(loss):
                raise HawqError(f"loss is {loss.item()} on batch {b}: valid weights and data give a finite "
                                f"loss (check the weights file and the data for NaN/inf)")


class eval_mode:
    """Context: the model in eval mode (BN uses running statistics); its mode is restored after."""

    def __init__(self, model):
        self.model, self.was_training = model, model.training

    def __enter__(self):
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


# ---------------------------------------------------------------- one shard
def second_order_attention():
    """scaled_dot_product_attention on its math kernel: the fused CPU and GPU kernels have no second derivative,
    which Hessian-vector products take (timm's attention calls it)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.MATH])


def gradient_graph(model: nn.Module, batch, criterion=None):
    """(params, grads) with the graph kept (create_graph), for Hessian-vector products on one batch."""
    criterion = criterion or nn.CrossEntropyLoss()
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device
    x, y = batch
    with second_order_attention():
        loss = criterion(model(x.to(device)), y.to(device))
    if not torch.isfinite(loss):
        raise HawqError(f"loss is {loss.item()}: valid weights and data give a finite loss")
    grads = torch.autograd.grad(loss, params, create_graph=True)
    return params, grads


def weight_positions(model: nn.Module, layers: Sequence[str]) -> list[int]:
    """Index of each layer's weight in the list of trainable parameters (the order of v and Hv)."""
    index = {id(p): i for i, p in enumerate(p for p in model.parameters() if p.requires_grad)}
    modules = dict(model.named_modules())
    positions = []
    for name in layers:
        module = modules.get(name)
        if module is None or getattr(module, "weight", None) is None:
            raise HawqError(f"layer {name!r} is not a module with a weight in {type(model).__name__}; "
                            f"valid layers: {', '.join(quantizable_layers(model)[:5])}, ...")
        if id(module.weight) not in index:
            raise HawqError(f"layer {name!r} has a frozen weight (requires_grad=False): its Hessian is undefined")
        positions.append(index[id(module.weight)])
    return positions


def rademacher(params, seed: int, shard: int, iteration: int) -> list[torch.Tensor]:
    """+-1 entries shaped like `params`, drawn on the CPU from (seed, shard, iteration) alone."""
    state = np.random.SeedSequence([seed, shard, iteration]).generate_state(2, dtype=np.uint32)
    gen = torch.Generator().manual_seed(int(state[0]) << 31 ^ int(state[1]))
    return [(torch.randint(0, 2, p.shape, generator=gen, dtype=p.dtype) * 2 - 1).to(p.device) for p in params]


def layer_slices(params, positions) -> list[slice]:
    """Where each layer's weight lies in the flat vector of all trainable parameters (their order)."""
    offsets = np.cumsum([0] + [p.numel() for p in params])
    return [slice(int(offsets[i]), int(offsets[i + 1])) for i in positions]


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def unflat(x: torch.Tensor, params) -> list[torch.Tensor]:
    return [c.view_as(p) for c, p in zip(torch.split(x, [p.numel() for p in params]), params)]


def hessian_products(params, grads, rows: np.ndarray) -> np.ndarray:
    """H_b x for each row x of `rows` (k, n) on one shard: (k, n) float32."""
    from pyhessian.utils import hessian_vector_product

    device = params[0].device
    out = [flat(hessian_vector_product(grads, params, unflat(torch.from_numpy(x.copy()).to(device), params)))
           for x in rows]
    return torch.stack(out).detach().cpu().numpy() if out else np.zeros((0, rows.shape[1]), np.float32)


def shard_samples(params, grads, positions, seed: int, shard: int, iterations: Iterable[int],
                  basis: np.ndarray | None = None) -> np.ndarray:
    """Per-layer v^T H v on one shard, one row per iteration: shape (len(iterations), len(positions)).

    With a deflation `basis` (k, n rows q_j), the sample is v_i^T [(I-P) H (I-P) v]_i with P = sum_j q_j q_j^T.
    """
    from pyhessian.utils import hessian_vector_product

    slices = layer_slices(params, positions)
    q = None if basis is None or len(basis) == 0 else torch.tensor(basis, device=params[0].device)

    def deflated(x):
        return x if q is None else x - q.T @ (q @ x)

    rows = []
    for t in iterations:
        v = flat(rademacher(params, seed, shard, t))
        hv = hessian_vector_product(grads, params, unflat(deflated(v), params))  # ONE Hv for all layers
        z = deflated(flat(hv)) * v
        rows.append([float(z[s].sum()) for s in slices])
    out = np.asarray(rows, dtype=np.float64).reshape(-1, len(positions))
    if not np.all(np.isfinite(out)):
        raise HawqError(f"Hessian-vector product on shard {shard} is not finite: valid weights and data give "
                        f"a finite loss and curvature")
    return out


# ---------------------------------------------------------------- deflation (Hutch++ per block)
def sketch_rows(seed: int, rank: int, n: int) -> np.ndarray:
    """k Rademacher rows of length n, drawn from the seed alone: (rank, n) float32."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, SKETCH_TAG]))
    return (rng.integers(0, 2, (rank, n), dtype=np.int8) * 2 - 1).astype(np.float32)


def orthonormal_rows(rows: np.ndarray) -> np.ndarray:
    """Gram-Schmidt applied twice, in float64 with elementwise numpy only (no threaded BLAS, so the basis is
    the same bit for bit whatever the thread count); a row in the span of the earlier ones becomes zero."""
    basis = []
    for y in rows.astype(np.float64):
        norm0 = np.sqrt((y * y).sum())
        for _ in range(2):
            for q in basis:
                y = y - (q * y).sum() * q
        norm = np.sqrt((y * y).sum())
        basis.append(y / norm if norm > 1e-8 * norm0 and norm > 0 else np.zeros_like(y))
    return np.asarray(basis).reshape(len(rows), -1)


def subspace_block_traces(q: np.ndarray, m: np.ndarray, slices: Sequence[slice]) -> np.ndarray:
    """Tr of each diagonal block of P H + H P - P H P, P = q^T q, from the rows q_j and m_j = H q_j (k, n).

    Its diagonal is 2 sum_j q_jr m_jr - sum_jl q_jr C_jl q_lr with C_jl = q_j . m_l (= q_j^T H q_l).
    """
    q, m = q.astype(np.float64), m.astype(np.float64)
    c = np.array([[(qj * ml).sum() for ml in m] for qj in q]).reshape(len(q), len(m))
    qc = np.zeros_like(q)
    for j in range(len(q)):
        for l in range(len(q)):
            qc[l] = qc[l] + c[j, l] * q[j]          # (C^T q)_l = sum_j C_jl q_j
    diag = (2 * q * m - q * qc).sum(axis=0) if len(q) else np.zeros(q.shape[1])
    return np.array([diag[s].sum() for s in slices])


def combine(per_shard: dict[int, np.ndarray], weights: dict[int, float]) -> np.ndarray:
    """sum_b w_b * value(b), summed in shard order."""
    total = 0.0
    for b in sorted(weights):
        total = total + weights[b] * per_shard[b]
    return np.asarray(total)


def deflation(products: Callable[[np.ndarray], dict], weights: dict[int, float], slices: Sequence[slice],
              n: int, rank: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(basis rows, exact per-layer part): the basis spans H S for k sketch rows, H = sum_b w_b H_b, and the
    exact part is each block's trace of P H + H P - P H P. `products(rows)` returns {shard: H_b rows}."""
    y = combine(products(sketch_rows(seed, rank, n)), weights)
    basis = orthonormal_rows(y).astype(np.float32)   # the rows the residual samples project with
    m = combine(products(basis), weights)
    return basis, subspace_block_traces(basis, m, slices)


# ---------------------------------------------------------------- merging and statistics
def shard_weights(batches) -> dict[int, float]:
    """w_b = size of batch b / size of the data: H = sum_b w_b H_b is the Hessian of the mean loss."""
    sizes = [len(x) for x, _ in batches]
    return {b: n / sum(sizes) for b, n in enumerate(sizes)}


def merge_samples(per_shard: dict[tuple[int, int], np.ndarray], weights: dict[int, float],
                  iterations: int) -> np.ndarray:
    """x_t = sum_b w_b * sample(b, t) for t < iterations, summed in shard order: (iterations, layers)."""
    rows = []
    for t in range(iterations):
        x = 0.0
        for b in sorted(weights):
            x = x + weights[b] * per_shard[(b, t)]
        rows.append(x)
    return np.asarray(rows, dtype=np.float64)


def trace_stats(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard error (sample std / sqrt(n)) per column; stderr is inf with one sample."""
    n = samples.shape[0]
    mean = samples.mean(axis=0)
    if n < 2:
        return mean, np.full_like(mean, np.inf)
    return mean, samples.std(axis=0, ddof=1) / math.sqrt(n)


def relative_stderr(samples: np.ndarray) -> np.ndarray:
    mean, stderr = trace_stats(samples)
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = stderr / np.abs(mean)
    return np.where(np.isnan(rel), np.inf, rel)


def done(samples: np.ndarray, tol: float, min_iter: int, max_iter: int) -> bool:
    """Stop when every layer's relative standard error is at most `tol` (after min_iter), or at max_iter."""
    n = samples.shape[0]
    return n >= max_iter or (n >= min_iter and bool(np.all(relative_stderr(samples) <= tol)))


def trace_table(layers: Sequence[str], samples: np.ndarray, tol: float) -> pd.DataFrame:
    """One row per layer: trace, trace_stderr, trace_samples, trace_converged; warns of the unconverged."""
    mean, stderr = trace_stats(samples)
    converged = relative_stderr(samples) <= tol
    table = pd.DataFrame({COL.layer: list(layers), COL.trace: mean, COL.trace_stderr: stderr,
                          COL.trace_samples: samples.shape[0], COL.trace_converged: converged})
    table.attrs["not_converged"] = [l for l, c in zip(layers, converged) if not c]
    if table.attrs["not_converged"]:
        warnings.warn(f"Hessian trace not converged to relative stderr {tol} after {samples.shape[0]} "
                      f"iterations for {len(table.attrs['not_converged'])} layer(s): "
                      f"{', '.join(table.attrs['not_converged'][:5])}", stacklevel=2)
    return table


def check_settings(tol: float, min_iter: int, max_iter: int, block: int, seed: int, rank: int = 0) -> None:
    if not tol >= 0 or max_iter < 1 or min_iter < 1 or block < 1 or seed < 0 or rank < 0:
        raise HawqError(f"Hutchinson settings tol={tol}, min_iter={min_iter}, max_iter={max_iter}, block={block}, "
                        f"seed={seed}, rank={rank}: valid are tol >= 0, seed >= 0, rank >= 0 and positive integers")


# ---------------------------------------------------------------- the stage
def iterate_traces(sample_block: Callable[[range, np.ndarray | None], dict], products: Callable[[np.ndarray], dict],
                   layers: Sequence[str], weights: dict[int, float], slices: Sequence[slice], n: int, *,
                   rank: int, seed: int, tol: float, min_iter: int, max_iter: int, block: int,
                   progress: Callable[[int, float], None] | None = None) -> pd.DataFrame:
    """Deflate (rank > 0), then run blocks of iterations until `done`.

    `products(rows)` returns {shard: H_b rows}; `sample_block(iterations, basis)` returns {(shard, t): per-layer
    row}. Every (shard, iteration) sample must arrive exactly once; the merge sums them in a fixed order, so
    the result does not depend on who computed them or in which order they arrived. attrs: "samples",
    "rank" (the basis size used, at most n) and "hv_products" (Hessian-vector products spent, all shards).
    """
    rank = min(rank, n)
    basis, exact = deflation(products, weights, slices, n, rank, seed) if rank else (None, 0.0)
    per_shard, t = {}, 0
    while True:
        its = range(t, min(t + block, max_iter))
        got = sample_block(its, basis)
        expected = {(b, k) for b in weights for k in its}
        if set(got) != expected:
            raise RuntimeError(f"iterations {its.start}..{its.stop - 1}: expected samples for {len(expected)} "
                               f"(shard, iteration) pairs, got {len(got)}")
        per_shard.update(got)
        t = its.stop
        samples = merge_samples(per_shard, weights, t) + exact
        if progress is not None:
            progress(t, float(relative_stderr(samples).max()))
        if done(samples, tol, min_iter, max_iter):
            break
    table = trace_table(layers, samples, tol)
    table.attrs.update(samples=samples, rank=rank, hv_products=len(weights) * (2 * rank + t))
    return table


def layer_traces(model: nn.Module, batches, *, layers: Sequence[str] | None = None, criterion=None,
                 tol: float = 0.05, max_iter: int = 100, min_iter: int = 8, block: int = 4, seed: int = 0,
                 rank: int = DEFAULT_RANK, progress: Callable[[int, float], None] | None = None) -> pd.DataFrame:
    """Estimate of Tr(H_i) for every quantizable layer: a rank-`rank` deflation, then one Hv per shard and iteration.

    Iterates in blocks of `block` iterations until every layer's relative standard error is at most `tol`
    (and at least `min_iter` iterations ran) or `max_iter` is reached. Returns columns layer, trace,
    trace_stderr, trace_samples, trace_converged; attrs["samples"] holds the (iterations, layers) samples
    (exact part included), attrs["not_converged"] the layers that missed `tol`, attrs["hv_products"] the
    Hv spent. `progress(iterations, worst_rel_stderr)` is called after each block. The gradient graph of
    every batch is kept for the whole run (memory: one backward graph per batch), and the deflation holds
    2 * rank float32 vectors of the model's size per batch.
    """
    layers = list(layers) if layers is not None else quantizable_layers(model)
    batches = check_batches(batches)
    check_settings(tol, min_iter, max_iter, block, seed, rank)
    with eval_mode(model):
        positions = weight_positions(model, layers)
        check_loss(model, batches, criterion)
        graphs = {b: gradient_graph(model, batch, criterion) for b, batch in enumerate(batches)}
        params = graphs[0][0]

        def sample_block(its, basis):
            return {(b, t): row for b, (p, grads) in graphs.items()
                    for t, row in zip(its, shard_samples(p, grads, positions, seed, b, its, basis))}

        def products(rows):
            return {b: hessian_products(p, grads, rows) for b, (p, grads) in graphs.items()}

        return iterate_traces(sample_block, products, layers, shard_weights(batches), layer_slices(params, positions),
                              sum(p.numel() for p in params), rank=rank, seed=seed, tol=tol, min_iter=min_iter,
                              max_iter=max_iter, block=block, progress=progress)


# ---------------------------------------------------------------- sensitivity (HAWQ-V3 eq. 8)
def weight_deltas(model: nn.Module, layers: Sequence[str] | None = None, bits=BIT_WIDTHS,
                  input_shape=None) -> pd.DataFrame:
    """delta_b = ||Q_b(W) - W||^2 with the deployed quantizer on the BN-folded weights: layer, delta4, delta8.
    `input_shape` (C, H, W): the run's, for a model captured through torch.export (default: the model's own)."""
    from hawq_ray.quant.graph import folded_weights
    from hawq_ray.quant.quantizers import weight_perturbation

    folded = folded_weights(model, input_shape)
    layers = list(layers) if layers is not None else list(folded)
    rows = [{COL.layer: name, **{delta_col(b): weight_perturbation(folded[name], b) for b in bits}}
            for name in layers]
    return pd.DataFrame(rows, columns=[COL.layer, *map(delta_col, bits)])


def sensitivity_columns(table: pd.DataFrame, traces: pd.DataFrame, deltas: pd.DataFrame) -> pd.DataFrame:
    """The layer table plus trace columns, delta4, delta8, omega4, omega8 (rows and their order kept)."""
    missing = sorted(set(table[COL.layer]) - set(traces[COL.layer]))
    if missing:
        raise HawqError(f"no Hessian trace for layer(s) {', '.join(missing[:5])}: traces must cover the layer table")
    out = table.merge(traces[[COL.layer, *TRACE_COLUMNS]], on=COL.layer, how="left", validate="one_to_one")
    out = out.merge(deltas, on=COL.layer, how="left", validate="one_to_one")
    negative = out.loc[out[COL.trace] < 0, COL.layer].tolist()
    if negative:
        warnings.warn(f"negative Hessian trace estimate for {len(negative)} layer(s) ({', '.join(negative[:5])}): "
                      f"reported as is, treated as zero sensitivity", stacklevel=2)
    for b in BIT_WIDTHS:
        out[omega_col(b)] = omega(out[COL.trace], out[COL.params], out[delta_col(b)])
    out.attrs = {k: v for k, v in traces.attrs.items() if k != "samples"}
    return out
