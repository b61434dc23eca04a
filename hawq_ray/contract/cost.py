"""The cost of a bit configuration, as HAWQ-V3 counts it, and the sensitivity it minimizes. Each formula is
written once here; the solver evaluates them per layer and bit width, the stages sum them per config.

    Omega_i(b)   = Tr(H_i) / n_i * ||Q_b(W_i) - W_i||^2         HAWQ-V3 Eq. 8 (n_i = params of layer i;
                                                                  a negative trace estimate counts as 0)
    size_i(b)    = n_i * b / 8 bytes, in MiB (2^20 bytes)        the model-size sum of Eq. 9
    bops_i(b)    = (MACs_i + P_i) * b * b + R_i * 8 * b,          the BOPS sum of Eq. 9, in GBOPS (1e9):
                                                                  activations at the layer's weight bits; P_i,
                                                                  R_i: the MACs of the products of two
                                                                  activations whose operands take layer i's
                                                                  bits, both (q k^T) or one beside 8-bit codes
                                                                  (softmax's probabilities times v)
    latency_i(b) = the measured lat{b}_ms of the layer            the latency sum of Eq. 9
    act_i(b)     = A_i * b / 8 bytes, in MiB                     A_i: elements of one sample's activation that
                                                                  layer i reads, held at its bits (act_elements)
A config's size, BOPS and latency are the sums over its layers. Its activation memory is the largest act_i
(the biggest tensor a device must hold at once, batch 1) and its memory is size + activation memory: a
maximum, not a sum, so the ILP bounds them with one constraint per layer (solver.ilp).
"""
from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import pandas as pd

from hawq_ray.contract.table import COL, lat_col

MIB = 2 ** 20          # bytes in a MiB
GIGA = 1e9             # BOPS in a GBOPS
RESOURCES = ("size_mib", "gbops", "latency_ms", "activation_mib", "memory_mib")
PEAK_RESOURCES = ("activation_mib", "memory_mib")   # a maximum over layers (memory: size + that maximum)


def omega(trace, params, delta):
    """Omega_i = Tr(H_i) / n_i * ||Q(W_i) - W_i||^2 (Eq. 8); numpy-broadcasting. A negative trace estimate
    (noise around a flat direction) counts as zero sensitivity."""
    return np.maximum(np.asarray(trace, float), 0.0) / np.asarray(params, float) * np.asarray(delta, float)


def _weight_bits(params, bits):
    """n_i * b: the layer's weight storage in bits, an exact integer (so a config's sum is order-free)."""
    return np.asarray(params, np.int64) * np.asarray(bits, np.int64)


PROBABILITY_BITS = 8       # softmax's codes, the fixed operand of a product (`ops.matmul`)


def _bops(macs, bits, product_macs=0, narrow_product_macs=0):
    """(MACs_i + P_i) * b * b + R_i * 8 * b, an exact integer."""
    b = np.asarray(bits, np.int64)
    return ((np.asarray(macs, np.int64) + np.asarray(product_macs, np.int64)) * b * b
            + np.asarray(narrow_product_macs, np.int64) * PROBABILITY_BITS * b)


def layer_size_mib(params, bits):
    """Weight storage of a layer at `bits`, in MiB; numpy-broadcasting."""
    return _weight_bits(params, bits) / 8 / MIB


def layer_activation_mib(act_elements, bits):
    """The activation a layer reads, held at its `bits`, in MiB; numpy-broadcasting."""
    return np.asarray(act_elements, np.int64) * np.asarray(bits, np.int64) / 8 / MIB


def layer_gbops(macs, bits, product_macs=0, narrow_product_macs=0):
    """Bit operations of a layer at `bits` (weights and activations, and the activation products whose operands
    take its bits), in GBOPS; numpy-broadcasting."""
    return _bops(macs, bits, product_macs, narrow_product_macs) / GIGA


def config_costs(table: pd.DataFrame, bits: Mapping[str, int]) -> dict:
    """size_mib, gbops, latency_ms, activation_mib and memory_mib of a config over the table's layers; latency
    is NaN unless the table has a measured latency for every layer at its bits, activation and memory unless it
    has act_elements."""
    b = np.array([bits[layer] for layer in table[COL.layer]])
    latency = math.nan
    if all(lat_col(int(x)) in table for x in set(b.tolist())):
        per_layer = np.array([table[lat_col(int(x))].iloc[i] for i, x in enumerate(b)], float)
        if not np.isnan(per_layer).any():
            latency = float(per_layer.sum())
    size = float(_weight_bits(table[COL.params], b).sum() / 8 / MIB)
    activation = (float(layer_activation_mib(table[COL.act_elements], b).max()) if COL.act_elements in table
                  else math.nan)
    return {"size_mib": size, "gbops": float(_bops(table[COL.macs], b, *product_columns(table)).sum() / GIGA),
            "latency_ms": latency, "activation_mib": activation, "memory_mib": size + activation}


def product_columns(table: pd.DataFrame) -> tuple:
    """P_i and R_i of bops_i as arrays, 0 where the table lacks them (written before they existed)."""
    return tuple(table[c].to_numpy(np.int64) if c in table else 0
                 for c in (COL.product_macs, COL.narrow_product_macs))
