"""The README's Python API is true: its stage-by-stage snippet runs as written, and every dotted name it cites
resolves to a module or an attribute."""
import importlib
import re
from pathlib import Path

import pytest

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_stage_snippet_runs_and_is_bit_exact():
    snippet = next(b for b in _python_blocks() if "run_program" in b)
    exec(compile(snippet, "README.md", "exec"), {})     # its own assert compares simulation and executor


def _resolve(name: str):
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


@pytest.mark.parametrize("name", sorted(set(re.findall(r"`((?:hawq_ray|actors|solver)\.[A-Za-z_.]*[A-Za-z_])",
                                                         README))))
def test_cited_names_exist(name):
    assert _resolve(name) is not None
