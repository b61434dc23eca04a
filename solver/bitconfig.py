"""Bit configurations on disk: `{layer: bits}` JSON, and HAWQ's `bit_config.py` style
(`bit_config_dict = {"name": {"layer": bits, ...}, ...}`), which is read by parsing, never by executing it."""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from typing import Mapping


class BitConfigError(ValueError):
    """A bit-config file or dict that is not `{layer name: int bits}`; the message names the file."""


def check_bits_dict(bits: object, where: str) -> dict[str, int]:
    if not isinstance(bits, Mapping) or not bits:
        raise BitConfigError(f"{where}: expected a non-empty dict of layer name -> bits")
    out = {}
    for k, v in bits.items():
        if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise BitConfigError(f"{where}: entry {k!r}: {v!r}; expected a layer name mapped to a positive int")
        out[k] = v
    return out


def write_bits_json(bits: Mapping[str, int], path: str | os.PathLike) -> None:
    Path(path).write_text(json.dumps(check_bits_dict(bits, str(path)), indent=1) + "\n")


def read_bits_json(path: str | os.PathLike) -> dict[str, int]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BitConfigError(f"{path}: cannot read a JSON bit config ({e})") from None
    return check_bits_dict(data, str(path))


def hawq_bit_config_source(configs: Mapping[str, Mapping[str, int]]) -> str:
    """Python source in HAWQ's bit_config.py layout: `bit_config_dict = {"name": {'layer': bits, ...}, ...}`."""
    lines = ["bit_config_dict = {"]
    for name, bits in configs.items():
        bits = check_bits_dict(bits, f"config {name!r}")
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
        return {str(k): check_bits_dict(v, f"{where}, config {k!r}") for k, v in data.items()}
    return {"bit_config": check_bits_dict(data, where)}


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
