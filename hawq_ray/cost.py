"""Model size and BOPS, counted as HAWQ-V3 counts them (DESIGN.md, "The layer table").

size  = sum over conv/linear layers of params * bits / 8 bytes, in MiB (2^20 bytes);
BOPS  = sum of macs * weight bits * activation bits (one width per layer for both), in GBOPS (1e9).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from hawq_ray.errors import HawqError

VALID_BITS = (4, 8)
NAMED_CONFIGS = ("fp32", "uniform4", "uniform8")


def bits_for(table: pd.DataFrame, config) -> dict[str, int]:
    """Resolve a bit config to {layer: bits}: 'fp32' (32 everywhere), 'uniform4'/'uniform8' (fixed layers
    keep their fixed bits), a dict, or a path to a JSON {layer: bits} file (missing layers: an error)."""
    fixed = {r.layer: int(r.fixed_bits) for r in table.itertuples() if not pd.isna(r.fixed_bits)}
    if isinstance(config, str) and config in NAMED_CONFIGS:
        if config == "fp32":
            return {layer: 32 for layer in table["layer"]}
        b = int(config[len("uniform"):])
        return {layer: fixed.get(layer, b) for layer in table["layer"]}
    if isinstance(config, (str, Path)):
        path = Path(config)
        if not path.is_file():
            raise HawqError(f"bit config {config!r} is neither one of {', '.join(NAMED_CONFIGS)} "
                            "nor an existing JSON file {layer: bits}")
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise HawqError(f"bit config file {path} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise HawqError(f"bit config file {path} must hold a JSON object {{layer: bits}}")
    return check_bits(table, config)


def check_bits(table: pd.DataFrame, config: dict) -> dict[str, int]:
    layers = list(table["layer"])
    unknown = [k for k in config if k not in set(layers)]
    if unknown:
        raise HawqError(f"bit config names unknown layers {unknown[:3]}; the model's layers are "
                        f"{layers[:3]}... ({len(layers)} in all; see `hawq-ray layers`)")
    bad = {k: v for k, v in config.items() if v not in VALID_BITS}
    if bad:
        k, v = next(iter(bad.items()))
        raise HawqError(f"bit config gives layer {k!r} {v!r} bits; valid bits are 4 and 8")
    missing = [layer for layer in layers if layer not in config]
    if missing:
        raise HawqError(f"bit config has no bits for layers {missing[:3]} ({len(missing)} missing)")
    for r in table.itertuples():
        if not pd.isna(r.fixed_bits) and config[r.layer] != int(r.fixed_bits):
            raise HawqError(f"bit config gives layer {r.layer!r} {config[r.layer]} bits but it is fixed "
                            f"at {int(r.fixed_bits)}")
    return {layer: int(config[layer]) for layer in layers}


def size_mib(table: pd.DataFrame, bits: dict[str, int]) -> float:
    return float(sum(p * bits[layer] / 8 for layer, p in zip(table["layer"], table["params"]))) / 2**20


def gbops(table: pd.DataFrame, bits: dict[str, int]) -> float:
    return float(sum(m * bits[layer] * bits[layer] for layer, m in zip(table["layer"], table["macs"]))) / 1e9
