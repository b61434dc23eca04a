"""The layering the code promises (docs/design.md, "Layers"), read from the sources' imports:

- `hawq_ray.contract` imports nothing else of the project;
- the core (`quant`, `ops`, `program`, `deploy`, `analysis`, `inputs`) imports neither the front
  (`hawq_ray.service`, the package's lazy API) nor `actors/`, and never imports Ray;
- `actors/` does not import the front; `solver/` imports only the contract;
- Ray is initialized in one place, `service.session`;
- no two top-level functions or classes of the project share a name (bar the CLI modules' `register` protocol);
- code and docs cite no file outside the repository.
"""
from __future__ import annotations

import ast
import subprocess
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORE = ("quant", "ops", "program", "deploy", "analysis", "inputs")


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "actors":
        return "actors"
    if parts[0] == "solver":
        return "solver"
    if parts[0] != "hawq_ray":
        return None
    if len(parts) == 1:
        return "front"          # hawq_ray/__init__: the Python API (run, load_config)
    if parts[1] == "contract":
        return "contract"
    if parts[1] == "service":
        return "front"
    return "core" if parts[1] in CORE else parts[1]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> set:
    """Every module a file imports, at the top or inside a function (the project imports absolutely only)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}: a relative import"
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def sources():
    for folder in ("hawq_ray", "actors", "solver"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_every_source_is_in_a_layer():
    assert {layer_of(module_name(p)) for p in sources()} <= {"contract", "core", "front", "actors", "solver"}


def test_layers_import_only_what_they_may():
    allowed = {"contract": {"contract"}, "core": {"contract", "core"}, "actors": {"contract", "core", "actors"},
               "solver": {"contract", "solver"}, "front": {"contract", "core", "actors", "solver", "front"}}
    bad = []
    for path in sources():
        mine = layer_of(module_name(path))
        for target in imports(path):
            theirs = layer_of(target)
            if theirs is not None and theirs not in allowed[mine]:
                bad.append(f"{path.relative_to(ROOT)} ({mine}) imports {target} ({theirs})")
            if mine == "core" and target.split(".")[0] == "ray":
                bad.append(f"{path.relative_to(ROOT)} (core) imports {target}")
    assert not bad, "\n".join(bad)


def test_the_import_reader_sees_imports_inside_functions(tmp_path):
    """The check above must not miss a lazy import (most cross-layer imports here are lazy)."""
    probe = ROOT / "hawq_ray" / "deploy" / "graph.py"
    assert "hawq_ray.ops.PROGRAM_OPS" in imports(probe)
    lazy = ROOT / "hawq_ray" / "ops" / "conv.py"
    assert "hawq_ray.deploy.conv_pool" in imports(lazy)          # imported inside lower_conv2d


def test_ray_is_initialized_only_by_the_session():
    hits = [str(p.relative_to(ROOT)) for p in sources() for node in ast.walk(ast.parse(p.read_text()))
            if isinstance(node, ast.Attribute) and node.attr == "init" and isinstance(node.value, ast.Name)
            and node.value.id == "ray"]
    assert hits and set(hits) == {"hawq_ray/service/session.py"}, hits


def test_no_two_top_level_definitions_share_a_name():
    where = defaultdict(list)
    for path in sources():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                where[node.name].append(str(path.relative_to(ROOT)))
    protocol = {"register": "hawq_ray/service/cli/",      # every CLI module's register(subparsers)
                "__getattr__": "hawq_ray/"}               # Python's lazy module attributes (PEP 562)
    twice = {name: paths for name, paths in where.items() if len(paths) > 1
             and not (name in protocol and all(p.startswith(protocol[name]) for p in paths))}
    assert not twice, twice


# The workspace files outside the repository, spelled in pieces so this file does not cite them itself.
OUTSIDE = tuple("".join(parts) for parts in ((".." + "/", "shared"), ("stack", "-facts"), ("DES", "IGN.md")))


def test_nothing_cites_files_outside_the_repository():
    tracked = subprocess.run(["git", "ls-files", "*.py", "*.md"], cwd=ROOT, capture_output=True, text=True).stdout
    hits = [f for f in tracked.split() if any(s in (ROOT / f).read_text() for s in OUTSIDE)]
    assert not hits, hits
