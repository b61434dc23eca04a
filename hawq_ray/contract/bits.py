"""Bit configurations: parsed once where they enter (a name, a dict, a file, a sweep table), checked against the
model's layer table into a `BitConfig`, and stored as a struct column (a dict per row) in tables.

Sources a user may give:
- "uniform4" / "uniform8": every searchable layer at 4 / 8 bits, fixed layers at their fixed bits;
- a mapping {layer: bits} (fixed layers may be left out: they keep their bits);
- a JSON file holding {layer: bits}; a HAWQ `bit_config.py` (`bit_config_dict = {"name": {layer: bits}}`),
  read by parsing its literal, never by running it;
- for several configs at once (`read_configs`): a sweep table (.parquet / .csv with columns config and bits),
  a JSON file {name: {layer: bits}}, or a bit_config.py with several entries.
"""
from __future__ import annotations

import ast
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import pandas as pd

from hawq_ray.contract.errors import BitConfigError
from hawq_ray.contract.table import BIT_WIDTHS, COL

NAMED = ("uniform4", "uniform8")


class BitConfig(Mapping):
    """{layer: bits} for every layer of one model's table, in table order; each bits in BIT_WIDTHS and fixed
    layers at their fixed bits. Built by `check_bits` / `parse_bits` (or `uniform`); immutable and hashable."""

    __slots__ = ("_bits",)

    def __init__(self, bits: Mapping[str, int]):
        self._bits = {str(k): int(v) for k, v in bits.items()}

    def __getitem__(self, layer: str) -> int:
        return self._bits[layer]

    def __iter__(self) -> Iterator[str]:
        return iter(self._bits)

    def __len__(self) -> int:
        return len(self._bits)

    def __hash__(self) -> int:
        return hash(tuple(self._bits.items()))

    def __eq__(self, other) -> bool:
        return isinstance(other, Mapping) and dict(self._bits) == dict(other.items())

    def __repr__(self) -> str:
        return f"BitConfig({self._bits})"

    def __reduce__(self):
        return BitConfig, (self._bits,)

    def as_dict(self) -> dict[str, int]:
        return dict(self._bits)


def _fixed(table: pd.DataFrame) -> dict[str, int]:
    if COL.fixed_bits not in table:
        return {}
    return {layer: int(f) for layer, f in zip(table[COL.layer], table[COL.fixed_bits]) if not pd.isna(f)}


def uniform(table: pd.DataFrame, b: int) -> BitConfig:
    """Every searchable layer at `b` bits, fixed layers at their fixed bits."""
    fixed = _fixed(table)
    return BitConfig({layer: fixed.get(layer, b) for layer in table[COL.layer]})


def check_bits(table: pd.DataFrame, bits: Mapping, where: str = "bit config") -> BitConfig:
    """`bits` checked against the layer table: known layers only, widths in BIT_WIDTHS, fixed layers at their
    fixed bits (a mapping that leaves one out gives it its fixed bits), every other layer present."""
    layers = list(table[COL.layer])
    known = set(layers)
    unknown = [k for k in bits if k not in known]
    if unknown:
        raise BitConfigError(f"{where} names unknown layers {unknown[:3]}; the model's layers are "
                             f"{layers[:3]}... ({len(layers)} in all; see `hawq-ray layers`)")
    for k, v in bits.items():
        if isinstance(v, bool) or not isinstance(v, int) or v not in BIT_WIDTHS:
            raise BitConfigError(f"{where} gives layer {k!r} {v!r} bits; valid bits are "
                                 f"{' and '.join(map(str, BIT_WIDTHS))}")
    fixed = _fixed(table)
    for layer, f in fixed.items():
        if layer in bits and bits[layer] != f:
            raise BitConfigError(f"{where} gives layer {layer!r} {bits[layer]} bits but it is fixed at {f}")
    missing = [layer for layer in layers if layer not in bits and layer not in fixed]
    if missing:
        raise BitConfigError(f"{where} has no bits for layers {missing[:3]} ({len(missing)} missing)")
    return BitConfig({layer: int(bits.get(layer, fixed.get(layer))) for layer in layers})


def parse_bits(spec, table: pd.DataFrame, name: str | None = None) -> BitConfig:
    """The one entry for a single config: a BitConfig or mapping, "uniform4" / "uniform8", or a path to a JSON
    {layer: bits} or a HAWQ bit_config.py (`name` picks one of several configs in it)."""
    if isinstance(spec, BitConfig) and list(spec) == list(table[COL.layer]):
        return spec
    if isinstance(spec, Mapping):
        return check_bits(table, spec)
    text = str(spec)
    if text in NAMED:
        return uniform(table, int(text[len("uniform"):]))
    if text == "fp32":
        raise BitConfigError("bits 'fp32' means no quantization; give uniform4, uniform8 or a {layer: bits} config")
    if not Path(text).is_file():
        raise BitConfigError(f"bit config {text!r} is neither one of {', '.join(NAMED)} nor an existing file "
                             "(a JSON {layer: bits} or a HAWQ bit_config.py)")
    return check_bits(table, read_bits(text, name), where=f"bit config {text}")


# ---------------------------------------------------------------------------------------------- several configs

@dataclass(frozen=True)
class NamedConfig:
    config: str               # id, unique in a run
    bits: BitConfig
    budget: tuple = ()        # the budget points that chose it (dicts), empty for a given config
    latency_ms: float = math.nan   # the sweep's predicted latency, when it had measured latencies
    latency_limit_ms: float = math.nan   # the tightest latency budget that chose it (whole model, ms)


def read_configs(specs, table: pd.DataFrame) -> list[NamedConfig]:
    """Named, checked configs from each spec: "uniform4" / "uniform8", a mapping, a sweep table (.parquet or
    .csv with columns config and bits[, budgets, latency_ms, latency_limit_ms]; ids `<file stem>.<config>`), a JSON file
    {layer: bits} (id: the file stem) or {name: {layer: bits}}, or a HAWQ bit_config.py."""
    out = []
    for spec in ([specs] if isinstance(specs, (str, Path, Mapping)) else list(specs)):
        for cid, bits, budget, *latency in _configs_of(spec, table):
            out.append(NamedConfig(str(cid), check_bits(table, bits, where=f"config {cid!r} ({spec})"),
                                   budget, *latency))
    if not out:
        raise BitConfigError("no bit configs given: pass uniform4, uniform8, a sweep table or a bit-config file")
    ids = [c.config for c in out]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise BitConfigError(f"config ids {dup[:3]} appear twice; give each config file once (ids come from "
                             "file stems)")
    return out


def _configs_of(spec, table: pd.DataFrame) -> list:
    if isinstance(spec, Mapping):
        return [("config", spec, (), math.nan)]
    if str(spec) in NAMED:
        return [(str(spec), parse_bits(str(spec), table), (), math.nan)]
    path = Path(spec)
    if not path.is_file():
        raise BitConfigError(f"configs {spec}: neither {' nor '.join(NAMED)} nor an existing file (a sweep "
                             ".parquet/.csv, a {layer: bits} .json, or a HAWQ bit_config.py)")
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".csv"):
        try:
            frame = pd.read_parquet(path) if suffix == ".parquet" else pd.read_csv(path)
        except Exception as e:  # noqa: BLE001 - any reader failure is a bad input file
            raise BitConfigError(f"configs {spec}: cannot read it ({type(e).__name__})") from None
        if not {"config", "bits"} <= set(frame.columns):
            raise BitConfigError(f"configs {spec}: a sweep table needs columns config and bits "
                                 "(hawq-ray sweep --out)")
        return [(f"{path.stem}.{r['config']}", bits_of_cell(r["bits"], str(spec)),
                 budgets_of_cell(r.get("budgets", ())), _number(r, "latency_ms"), _number(r, "latency_limit_ms"))
                for _, r in frame.iterrows()]
    if suffix == ".py":
        return [(name, bits, (), math.nan) for name, bits in read_hawq_bit_config(path).items()]
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BitConfigError(f"configs {spec}: {str(e).splitlines()[0]}") from None
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        return [(name, _raw_bits(bits, f"{spec}, config {name!r}"), (), math.nan) for name, bits in data.items()]
    if isinstance(data, dict) and data:
        return [(path.stem, _raw_bits(data, str(spec)), (), math.nan)]
    raise BitConfigError(f"configs {spec}: expected a JSON object {{layer: bits}} or {{name: {{layer: bits}}}}")


def _number(row, column: str) -> float:
    value = row.get(column, math.nan)
    return float(value) if pd.notna(value) else math.nan


def bits_of_cell(cell, where: str) -> dict:
    """A table cell holding bits: a dict (the parquet struct) or its JSON text (a CSV)."""
    if isinstance(cell, Mapping):
        return _raw_bits({k: v for k, v in cell.items() if v is not None and not pd.isna(v)}, where)
    try:
        data = json.loads(cell) if isinstance(cell, str) else None
    except json.JSONDecodeError:
        data = None
    if not isinstance(data, dict):
        raise BitConfigError(f"configs {where}: column bits must hold {{layer: bits}}")
    return _raw_bits(data, where)


def budget_cell(points) -> str:
    """The budget points that chose a config as one table cell: JSON text, '' for none (budgets_of_cell reads
    it back)."""
    return json.dumps([dict(p) for p in points]) if points else ""


def budgets_of_cell(cell) -> tuple:
    """A table cell holding the budget points of a config: a list of dicts, or its JSON text; () for none."""
    if isinstance(cell, str):
        cell = json.loads(cell) if cell.strip() else []
    if cell is None or (not isinstance(cell, (list, tuple, np.ndarray)) and pd.isna(cell)):   # parquet: an array
        return ()
    return tuple({k: float(v) for k, v in dict(p).items() if v is not None and not pd.isna(v)} for p in cell)


def json_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """The frame with its dict and list cells (bits, budget points) as JSON text, for a text format (CSV);
    `bits_of_cell` and `budgets_of_cell` read them back."""
    def cell(v):
        if isinstance(v, Mapping):
            return json.dumps(dict(v))
        if isinstance(v, (list, tuple, np.ndarray)):
            return json.dumps([dict(x) if isinstance(x, Mapping) else x for x in list(v)])
        return v
    return frame.map(cell) if hasattr(frame, "map") else frame.applymap(cell)


# ---------------------------------------------------------------------------------------------- files

def _raw_bits(bits: object, where: str) -> dict[str, int]:
    """A {name: positive int} dict as a file holds it (names are not checked against a model here)."""
    if not isinstance(bits, Mapping) or not bits:
        raise BitConfigError(f"{where}: expected a non-empty dict of layer name -> bits")
    out = {}
    for k, v in bits.items():
        if hasattr(v, "item"):
            v = v.item()
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise BitConfigError(f"{where}: entry {k!r}: {v!r}; expected a layer name mapped to a positive int")
        out[k] = v
    return out


def write_bits_json(bits: Mapping[str, int], path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(_raw_bits(dict(bits), str(path)), indent=1) + "\n")


def read_bits_json(path: str | os.PathLike) -> dict[str, int]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BitConfigError(f"{path}: cannot read a JSON bit config ({e})") from None
    return _raw_bits(data, str(path))


def hawq_bit_config_source(configs: Mapping[str, Mapping[str, int]]) -> str:
    """Python source in HAWQ's bit_config.py layout: `bit_config_dict = {"name": {'layer': bits, ...}, ...}`."""
    lines = ["bit_config_dict = {"]
    for name, bits in configs.items():
        bits = _raw_bits(dict(bits), f"config {name!r}")
        lines.append(f"{json.dumps(str(name))} : {{")
        lines += [f"{k!r}: {v}," for k, v in bits.items()]
        lines.append("},")
        lines.append("")
    lines.append("}")
    return "\n".join(lines) + "\n"


def write_hawq_bit_config(configs: Mapping[str, Mapping[str, int]], path: str | os.PathLike) -> None:
    Path(path).write_text(hawq_bit_config_source(configs))


def parse_hawq_bit_config(source: str, where: str = "bit config") -> dict[str, dict[str, int]]:
    """The configs of a bit_config.py text: the literal assigned to `bit_config_dict` (or the file's only dict
    literal). A dict of layer -> bits (a single config) comes back under the name 'bit_config'."""
    try:
        module = ast.parse(source)
    except SyntaxError as e:
        raise BitConfigError(f"{where}: not Python source ({e.msg}, line {e.lineno})") from None
    literals = []
    for node in module.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            names = [t.id for t in node.targets if isinstance(t, ast.Name)]
            literals.append((names, node.value))
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Dict):
            literals.append(([], node.value))
    chosen = [lit for names, lit in literals if "bit_config_dict" in names] or literals
    if len(chosen) != 1:
        raise BitConfigError(f"{where}: expected `bit_config_dict = {{...}}` (or one dict literal), "
                             f"found {len(literals)} dict literals")
    try:
        data = ast.literal_eval(chosen[0])
    except ValueError:
        raise BitConfigError(f"{where}: the dict holds something other than plain literals") from None
    if data and all(isinstance(v, Mapping) for v in data.values()):
        return {str(k): _raw_bits(v, f"{where}, config {k!r}") for k, v in data.items()}
    return {"bit_config": _raw_bits(data, where)}


def read_hawq_bit_config(path: str | os.PathLike) -> dict[str, dict[str, int]]:
    try:
        source = Path(path).read_text()
    except OSError as e:
        raise BitConfigError(f"{path}: cannot read ({e.strerror})") from None
    return parse_hawq_bit_config(source, str(path))


def read_bits(path: str | os.PathLike, name: str | None = None) -> dict[str, int]:
    """One `{layer: bits}` from a .json file, or from a bit_config.py (`name` picks the config; needed when the
    file holds more than one)."""
    if str(path).endswith(".py"):
        configs = read_hawq_bit_config(path)
        if name is None and len(configs) == 1:
            return next(iter(configs.values()))
        if name not in configs:
            raise BitConfigError(f"{path}: config {name!r} not found; it has {', '.join(configs)}")
        return configs[name]
    return read_bits_json(path)


def write_bits(bits: Mapping[str, int], path: str | os.PathLike, name: str = "bit_config") -> None:
    """`{layer: bits}` as JSON, or as a one-config HAWQ bit_config.py when `path` ends with .py."""
    if str(path).endswith(".py"):
        write_hawq_bit_config({name: bits}, path)
    else:
        write_bits_json(bits, path)
