"""The layering the code promises (docs/design.md, "Layers"), read from the sources' imports:

- each module of `hawq_ray/`, `actors/`, `solver/` and `bench/` is in a layer (`LAYERS`) and imports only the
  layers below it that `MAY_IMPORT` names: the three back ends of the op semantics (the QAT interpreter, TVM,
  ONNX) not each other, the core never the front, `solver/` only the contract;
- no import circle among the project's files (module-level and in-function imports alike);
- the op semantics and what is below them import neither TVM nor ONNX; the core never imports Ray;
- Ray is started in one place, `service.session` (`connect`), bench scripts included;
- the checker itself reports a planted forbidden import of each kind and a planted circle;
- no two top-level functions or classes of the package share a name (bar the CLI modules' `register` protocol);
- code and docs cite no file outside the repository;
- one name for each layer-table column: outside `hawq_ray/contract/`, no code of `hawq_ray/`, `actors/` or
  `solver/` names one by a string literal (`table["params"]`); it writes `table[COL.params]`,
  `table[omega_col(4)]` (`hawq_ray.contract.table`), and the checker reports a planted literal.

An import is every way a file names a module: `import a.b`, `import a.b as c`, `from a import b` (the module
a.b where b is one, else a), relative imports, `importlib.import_module("a.b")` and `__import__("a.b")` with a
literal name (a formatted name with a literal prefix `"a.{x}"` counts as every module under a), at the top of
a file or inside a function.
"""
from __future__ import annotations

import ast
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("hawq_ray", "actors", "solver", "bench")

# The layer of a module is that of the longest prefix below naming it (a package, or one module of a package
# whose files sit in two layers).
LAYERS = {
    "hawq_ray": "front",                     # hawq_ray/__init__ alone: the Python API (run, load_config)
    "hawq_ray.service": "front",
    "hawq_ray.contract": "contract",
    "hawq_ray.inputs": "inputs",
    "hawq_ray.program": "program",
    "hawq_ray.program.executor": "executor",  # these four run programs through the op registry
    "hawq_ray.program.ranges": "executor",
    "hawq_ray.program.rewrites": "executor",
    "hawq_ray.program.random": "executor",
    "hawq_ray.quant": "primitives",
    "hawq_ray.quant.graph": "qat",
    "hawq_ray.quant.capture": "qat",         # torch.export's graph read through the op registry
    "hawq_ray.quant.qat": "qat",
    "hawq_ray.quant.finetune": "qat",
    "hawq_ray.quant.layers": "qat",          # the layer table of a traced model
    "hawq_ray.ops": "ops",
    "hawq_ray.deploy": "tvm",
    "hawq_ray.onnx": "onnx",
    "hawq_ray.analysis": "analysis",
    "actors": "actors",
    "solver": "solver",
    "bench": "bench",
}
_BELOW_OPS = {"contract", "program", "primitives"}
_CORE = {"contract", "inputs", "program", "primitives", "ops", "executor", "qat", "tvm", "onnx", "analysis"}
MAY_IMPORT = {
    "contract": set(),
    "inputs": {"contract"},
    "program": {"contract"},
    "primitives": {"contract", "program"},
    "ops": _BELOW_OPS,
    "executor": _BELOW_OPS | {"ops"},
    "qat": _BELOW_OPS | {"ops", "executor", "inputs"},
    "tvm": _BELOW_OPS | {"ops", "executor"},
    "onnx": _BELOW_OPS | {"ops", "executor"},
    "analysis": _CORE - {"analysis"},
    "front": _CORE | {"actors", "solver"},
    "actors": _CORE,
    "solver": {"contract"},
    "bench": _CORE | {"front", "actors", "solver"},
}
# Third-party packages a layer must not import: the core knows nothing of Ray; op semantics and what lies
# below them are neither TVM's nor ONNX's; the ONNX exporter does not reach TVM.
FORBIDDEN = {layer: {"ray"} for layer in _CORE}
for _layer in ("contract", "inputs", "program", "primitives", "ops", "executor"):
    FORBIDDEN[_layer] |= {"tvm", "onnx", "onnxruntime"}
FORBIDDEN["onnx"] |= {"tvm"}
FORBIDDEN["solver"] = {"ray", "tvm", "torch", "onnx"}


def layer_of(module: str) -> str | None:
    """The layer of a project module; None for a module outside the project (or a new folder of `hawq_ray/`
    no entry of LAYERS places: `hawq_ray` itself names the package's `__init__` alone)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS and (prefix != "hawq_ray" or n == len(parts)):
            return LAYERS[prefix]
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_sources() -> dict:
    """{module: (source text, is a package)} of every .py file of FOLDERS."""
    return {module_name(p): (p.read_text(), p.name == "__init__.py")
            for folder in FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))}


def _literal_import(call: ast.Call) -> str | None:
    """The module an `importlib.import_module(...)` / `__import__(...)` call names by a literal (a formatted
    name: its literal prefix ending in '.*')."""
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name not in ("import_module", "__import__") or not call.args:
        return None
    arg = call.args[0]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value
    if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
        prefix = arg.values[0].value
        return prefix.rstrip(".") + ".*" if prefix.endswith(".") else None
    return None


def imports(source: str, module: str, is_package: bool = False, known=frozenset()) -> dict:
    """{imported module: line} of every import in `source` (the text of `module`), wherever it stands.
    `known`: the project's module names, to tell `from a import b` of a module b from that of a name."""
    package = module if is_package else module.rpartition(".")[0]
    out = {}

    def add(name, line):
        if name.endswith(".*"):           # every project module under a formatted name's literal prefix
            stem = name[:-2]
            # (a `__main__` is run, never imported)
            names = [m for m in known if m.startswith(stem + ".") and not m.endswith(".__main__")] or [stem]
        else:
            names = [name]
        for n in names:
            out.setdefault(n, line)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for a in node.names:
                add(a.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for a in node.names:
                sub = f"{base}.{a.name}" if base else a.name
                add(sub if sub in known else base, node.lineno)
        elif isinstance(node, ast.Call):
            name = _literal_import(node)
            if name:
                add(name, node.lineno)
    return out


def import_graph(sources: dict) -> dict:
    """{module: {imported module: line}} for `project_sources()`-shaped `sources`."""
    known = frozenset(sources)
    return {m: imports(text, m, pkg, known) for m, (text, pkg) in sources.items()}


def import_cycles(graph: dict) -> list:
    """Every strongly connected component of more than one project module, each as one circle through it
    (a list of modules, the first repeated at the end), found by Tarjan's algorithm."""
    edges = {m: sorted(t for t in targets if t in graph and t != m) for m, targets in graph.items()}
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        # iterative Tarjan: (node, iterator over its edges)
        work = [(v, iter(edges[v]))]
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            for w in it:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(edges[w])))
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on_stack.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        components.append(set(comp))
    for v in sorted(edges):
        if v not in index:
            visit(v)
    return [_circle(comp, edges) for comp in components]


def _circle(comp: set, edges: dict) -> list:
    """A shortest circle through the first module of `comp` (breadth-first, inside the component)."""
    start = min(comp)
    parent, frontier = {start: None}, [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in edges[v]:
                if w == start:
                    path = [v]
                    while parent[path[-1]] is not None:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w in comp and w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(comp)


def describe_circle(circle: list, graph: dict) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(circle, circle[1:])) + f" -> {circle[-1]}"


def layer_violations(graph: dict) -> list:
    """One line per import that `MAY_IMPORT` or `FORBIDDEN` refuses."""
    bad = []
    for module, targets in sorted(graph.items()):
        mine = layer_of(module)
        for target, line in sorted(targets.items()):
            theirs = layer_of(target)
            if theirs is not None and theirs != mine and theirs not in MAY_IMPORT[mine]:
                bad.append(f"{module}:{line} ({mine}) imports {target} ({theirs})")
            if target.split(".")[0] in FORBIDDEN.get(mine, ()):
                bad.append(f"{module}:{line} ({mine}) imports {target}")
    return bad


def ray_starts(sources: dict) -> list:
    """`module:line` of every call of ray.init, however ray or init is named (`import ray as r; r.init()`,
    `from ray import init as start; start()`)."""
    hits = []
    for module, (text, _) in sorted(sources.items()):
        tree = ast.parse(text)
        rays, inits = set(), set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                rays |= {a.asname or a.name for a in node.names if a.name == "ray"}
            elif isinstance(node, ast.ImportFrom) and node.module == "ray":
                inits |= {a.asname or a.name for a in node.names if a.name == "init"}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            f = node.func
            if (isinstance(f, ast.Attribute) and f.attr == "init" and isinstance(f.value, ast.Name)
                    and f.value.id in rays) or (isinstance(f, ast.Name) and f.id in inits):
                hits.append(f"{module}:{node.lineno}")
    return hits


# ---------------------------------------------------------------------------------------------- the checks

def test_every_module_is_in_a_layer():
    assert [m for m in project_sources() if layer_of(m) is None] == []


def test_layers_import_only_what_they_may():
    bad = layer_violations(import_graph(project_sources()))
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    graph = import_graph(project_sources())
    circles = import_cycles(graph)
    assert not circles, "\n".join(describe_circle(c, graph) for c in circles)


def test_ray_is_started_only_by_the_session():
    """`service.session.connect` applies the loopback, token and watchdog safeguards: bench scripts use it too."""
    starts = ray_starts(project_sources())
    assert starts and {s.split(":")[0] for s in starts} == {"hawq_ray.service.session"}, starts


def test_every_ray_start_in_the_tests_names_its_address():
    """A bare `ray.init(num_cpus=...)` joins a cluster that another test process has running on the machine (Ray
    finds it through /tmp/ray) and then fails to start or refuses num_cpus: each test's own Ray says
    address="local", or the cluster it means."""
    bare = []
    for path in sorted((ROOT / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "init"
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "ray"
                    and not any(k.arg == "address" for k in node.keywords)):
                bare.append(f"{path.name}:{node.lineno}")
    assert not bare, bare


def test_the_checker_reports_each_kind_of_planted_import():
    """A forbidden import at the top of a file, inside a function, through an alias, relative, through
    importlib, a ray.init through an alias and an import circle: each is reported."""
    clean = project_sources()
    planted = {
        "hawq_ray.ops.planted_top": "import hawq_ray.deploy.graph\n",
        "hawq_ray.program.planted_lazy": "def f():\n    from hawq_ray.service import pipeline\n    return pipeline\n",
        "hawq_ray.deploy.planted_alias": "import ray as r\n\n\ndef f():\n    r.init(num_cpus=1)\n",
        "hawq_ray.onnx.planted_relative": "from ..deploy import graph\n",
        "hawq_ray.quant.planted_importlib": "import importlib\n\n\ndef f():\n"
                                            "    return importlib.import_module('hawq_ray.quant.qat')\n",
        "hawq_ray.deploy.planted_qat": "from hawq_ray.quant.qat import prepare\n",
        "bench.planted_start": "from ray import init as start\n\nstart()\n",
    }
    sources = clean | {m: (text, False) for m, text in planted.items()}
    report = "\n".join(layer_violations(import_graph(sources)))
    for line in ("hawq_ray.ops.planted_top:1 (ops) imports hawq_ray.deploy.graph (tvm)",
                 "hawq_ray.program.planted_lazy:2 (program) imports hawq_ray.service.pipeline (front)",
                 "hawq_ray.deploy.planted_alias:1 (tvm) imports ray",
                 "hawq_ray.onnx.planted_relative:1 (onnx) imports hawq_ray.deploy.graph (tvm)",
                 "hawq_ray.quant.planted_importlib:5 (primitives) imports hawq_ray.quant.qat (qat)",
                 "hawq_ray.deploy.planted_qat:1 (tvm) imports hawq_ray.quant.qat (qat)"):
        assert line in report, line
    assert layer_of("hawq_ray.planted_folder.module") is None         # a new folder must be placed in LAYERS
    assert {"hawq_ray.deploy.planted_alias:5", "bench.planted_start:3"} <= set(ray_starts(sources))

    # a circle: the program module importing (lazily) a quantization primitive that imports it
    text, pkg = clean["hawq_ray.program.program"]
    sources = clean | {"hawq_ray.program.program": (text + "\n\ndef _planted():\n    import hawq_ray.quant.values\n",
                                                    pkg)}
    graph = import_graph(sources)
    circles = import_cycles(graph)
    assert any(set(c) == {"hawq_ray.program.program", "hawq_ray.quant.values"} for c in circles), circles
    assert "hawq_ray.program.program (line" in "\n".join(describe_circle(c, graph) for c in circles)
    assert not any("hawq_ray.program.program" in c for c in import_cycles(import_graph(clean)))


def test_the_reader_resolves_every_form_of_import():
    known = frozenset({"hawq_ray.deploy", "hawq_ray.deploy.glue", "hawq_ray.deploy.graph", "hawq_ray.ops"})
    text = ("import numpy as np\nimport hawq_ray.deploy.glue as g\nfrom hawq_ray.deploy import graph, Value\n"
            "from . import glue\nfrom .graph import plan_groups\nfrom .. import ops\n"
            "def f():\n    import importlib\n    importlib.import_module(f'hawq_ray.deploy.{f}')\n")
    got = imports(text, "hawq_ray.deploy.kernels", False, known)
    assert set(got) == {"numpy", "hawq_ray.deploy.glue", "hawq_ray.deploy.graph", "hawq_ray.deploy",
                        "hawq_ray.ops", "importlib"}, got


def test_no_two_top_level_definitions_share_a_name():
    where = defaultdict(list)
    for module, (text, _) in project_sources().items():
        if layer_of(module) == "bench":          # scripts, each with its own main
            continue
        for node in ast.parse(text).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                where[node.name].append(module)
    protocol = {"register": "hawq_ray.service.cli.",      # every CLI module's register(subparsers)
                "__getattr__": "hawq_ray"}                # Python's lazy module attributes (PEP 562)
    twice = {name: mods for name, mods in where.items() if len(mods) > 1
             and not (name in protocol and all(m.startswith(protocol[name]) for m in mods))}
    assert not twice, twice


# The workspace files outside the repository, spelled in pieces so this file does not cite them itself.
OUTSIDE = tuple("".join(parts) for parts in ((".." + "/", "shared"), ("stack", "-facts"), ("DES", "IGN.md")))


def test_nothing_cites_files_outside_the_repository():
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.py", "*.md"],
                           cwd=ROOT, capture_output=True, text=True).stdout.split()     # new files too, moved ones not
    hits = [f for f in files if (ROOT / f).is_file() and any(s in (ROOT / f).read_text() for s in OUTSIDE)]
    assert not hits, hits


# ------------------------------------------------------------------- one name for each layer-table column

COLUMN_FOLDERS = ("hawq_ray", "actors", "solver")
# Literals equal to a layer-table column's name that name something else: (file, function, literal) -> what.
NOT_THE_LAYER_TABLE = {
    ("hawq_ray/analysis/evidence.py", "standing", "kind"): "the evidence table's kind (ilp | random | ...)",
    ("hawq_ray/service/evidence.py", "<module>", "kind"): "the evidence table's kind",
    ("hawq_ray/service/report.py", "plot_evidence", "kind"): "the evidence table's kind",
    ("hawq_ray/analysis/verify.py", "compare_values", "layer"): "a deploy manifest value's layer",
    ("hawq_ray/service/cli/quant.py", "run_verify", "layer"): "the verify tables' layer (TVM and QAT checks)",
    ("hawq_ray/program/program.py", "IntegerProgram.load", "layer"): "a saved Op's field",
    ("hawq_ray/deploy/build.py", "<module>", "params"): "the deploy manifest's params file",
    ("hawq_ray/service/module_record.py", "reusable_record", "params"): "the deploy manifest's params file",
}
# Keywords and DataFrame methods whose string argument is a column name.
_COLUMN_KEYWORDS = {"on", "left_on", "right_on", "columns", "subset", "by", "index", "values"}
_COLUMN_METHODS = {"groupby", "sort_values", "set_index", "drop_duplicates", "pop"}


def column_literals(text: str, names) -> list:
    """[(line, function, literal)] of every string constant of `text` in `names` that is used as a column
    name: a subscript's key (`t["c"]`, `t.loc[m, "c"]`, `t[["c", ...]]`), an element of a list, tuple or set
    display, either side of a comparison with `in`, `==` or `!=`, the value of a column keyword (`on="c"`),
    the first argument of a column method (`groupby("c")`), or a key of a dict display given to `DataFrame`
    or as `dtype=`. `function`: the qualified name of the enclosing function ("<module>" at the top)."""
    hits = []

    def is_name(node):
        return isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names

    def column_uses(node):
        """The constants `node` uses as column names, by the rules above."""
        if isinstance(node, ast.Subscript):
            yield node.slice
        elif isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            yield from node.elts
        elif isinstance(node, ast.Compare) and all(isinstance(op, (ast.In, ast.NotIn, ast.Eq, ast.NotEq))
                                                   for op in node.ops):
            yield node.left
            yield from node.comparators
        elif isinstance(node, ast.keyword):
            if node.arg in _COLUMN_KEYWORDS:
                yield node.value
            if node.arg == "dtype" and isinstance(node.value, ast.Dict):
                yield from node.value.keys
        elif isinstance(node, ast.Call):
            f = node.func
            fname = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
            if fname in _COLUMN_METHODS and node.args:
                yield node.args[0]
            if fname == "DataFrame":
                for a in node.args:
                    yield from (a.keys if isinstance(a, ast.Dict) else ())

    def visit(node, where):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            where = node.name if where == "<module>" else f"{where}.{node.name}"
        hits.extend((c.lineno, where, c.value) for c in column_uses(node) if is_name(c))
        for child in ast.iter_child_nodes(node):
            visit(child, where)
    visit(ast.parse(text), "<module>")
    return hits


def column_literal_report(files: dict, names) -> list:
    """`file:line (function) names column 'c' by a literal` for each hit of `column_literals` in
    {path: text} that NOT_THE_LAYER_TABLE does not excuse."""
    return [f"{path}:{line} ({where}) names column {c!r} by a literal"
            for path, text in sorted(files.items()) for line, where, c in column_literals(text, names)
            if (path, where, c) not in NOT_THE_LAYER_TABLE]


def column_sources() -> dict:
    return {p.relative_to(ROOT).as_posix(): p.read_text()
            for folder in COLUMN_FOLDERS for p in sorted((ROOT / folder).rglob("*.py"))
            if not p.relative_to(ROOT).as_posix().startswith("hawq_ray/contract/")}


def test_layer_table_columns_are_named_by_the_contract():
    from hawq_ray.contract.table import COLUMNS
    bad = column_literal_report(column_sources(), set(COLUMNS))
    assert not bad, "use hawq_ray.contract.table's COL / omega_col(b) / ... :\n" + "\n".join(bad)


def test_each_column_has_one_name():
    """COLUMNS is written through COL and the per-bit-width functions: each COL field is its own name, and
    every column is either a COL field or one of a per-bit-width function's names."""
    from dataclasses import fields

    from hawq_ray.contract.table import BIT_WIDTHS, COL, COLUMNS, delta_col, glue_col, lat_col, omega_col
    once = [getattr(COL, f.name) for f in fields(COL)]
    assert once == [f.name for f in fields(COL)]
    per_width = [f(b) for f in (delta_col, omega_col, lat_col, glue_col) for b in BIT_WIDTHS] + [lat_col(32)]
    assert sorted(COLUMNS) == sorted(once + per_width) and len(set(once + per_width)) == len(COLUMNS)


def test_every_excused_literal_is_still_there():
    """An entry of NOT_THE_LAYER_TABLE whose literal has gone is removed, so the list stays what it says."""
    from hawq_ray.contract.table import COLUMNS
    found = {(path, where, c) for path, text in column_sources().items()
             for _, where, c in column_literals(text, set(COLUMNS))}
    assert set(NOT_THE_LAYER_TABLE) <= found, set(NOT_THE_LAYER_TABLE) - found


def test_the_checker_reports_planted_column_literals():
    """Each way of naming a column by a literal is reported with its file, line and function, in a file
    already excused for another name and function; a literal that names nothing of the table is not."""
    from hawq_ray.contract.table import COLUMNS
    planted = ("import pandas as pd\n"
               "def f(t, other):\n"
               "    a = t['trace_stderr']\n"
               "    b = t.loc[t.kind == 'conv', 'macs']\n"
               "    c = t[['layer', 'omega4']]\n"
               "    d = 'fixed_bits' in t\n"
               "    e = t.merge(other, on='layer')\n"
               "    g = pd.read_csv('x.csv', dtype={'group': str})\n"
               "    h = pd.DataFrame({'params': [1]})\n"
               "    i = t.groupby('group')\n"
               "    j = ['lat32_ms', 'top1']\n"
               "    return t['config'], 'layer table', other['kind'] == 'ilp'\n")
    clean = column_sources()
    head = clean["hawq_ray/service/report.py"] + "\n\n"
    files = clean | {"hawq_ray/service/report.py": head + planted.replace("def f(", "def planted(")}
    report = column_literal_report(files, set(COLUMNS))
    want = [(3, "trace_stderr"), (4, "macs"), (5, "layer"), (5, "omega4"), (6, "fixed_bits"), (7, "layer"),
            (8, "group"), (9, "params"), (10, "group"), (11, "lat32_ms"), (12, "kind")]
    assert sorted(report) == sorted(f"hawq_ray/service/report.py:{head.count(chr(10)) + n} (planted) names "
                                    f"column {c!r} by a literal" for n, c in want), report
