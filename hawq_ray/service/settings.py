"""The type and range of every setting, in run.yaml and on the command line, checked before any work starts.

A value of the wrong type or out of range is one line naming the key, the value and what is valid. The same
`Int` / `Float` / ... object checks a run.yaml key and, as argparse `type=`, the CLI option of that
meaning, so a bound is written once. The upper bounds keep a typo (a batch of 100000, 1000 actors) from starting work that
can only fail; `fits_in_memory` checks the batch sizes against this machine's free memory. `read_yaml_mapping`
reads run.yaml within bounds (1 MiB, nesting, values after YAML aliases expand), and every error shows a bad value
through `brief` (about 80 characters at most), so no input makes an error message slow or huge.
"""
from __future__ import annotations

import abc
import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from hawq_ray.contract import HawqError
from hawq_ray.contract.errors import brief


class Setting(abc.ABC):
    convert = None                 # how a CLI option's text becomes a value (int, float); None: kept as text

    @abc.abstractmethod
    def valid(self) -> str:
        """What is valid, in words, for the one-line error."""

    @abc.abstractmethod
    def ok(self, value) -> bool:
        """Whether `value` is of the type and in the range."""

    def check(self, value, key: str):
        if not self.ok(value):
            raise HawqError(f"{key}: {brief(value)} is not valid; valid: {self.valid()}")
        return value

    def parse(self, text: str):
        try:
            return type(self).convert(text) if type(self).convert else text
        except ValueError:
            return text                # not a number: `ok` rejects it, and the error shows the text

    def __call__(self, text: str):
        """As argparse `type=` (e.g. `type=BATCH`): the option's text parsed and checked; argparse names the
        option in the error."""
        value = self.parse(text)
        if not self.ok(value):
            raise argparse.ArgumentTypeError(f"{brief(text)} is not valid; valid: {self.valid()}")
        return value


@dataclass(frozen=True)
class Int(Setting):
    convert = int
    low: int
    high: int
    optional: bool = False         # null is valid too

    def ok(self, value) -> bool:
        if value is None:
            return self.optional
        return isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high

    def valid(self) -> str:
        return f"an integer from {self.low} to {self.high}" + (" or null" if self.optional else "")


@dataclass(frozen=True)
class Float(Setting):
    convert = float
    low: float
    high: float
    open_low: bool = False         # low itself is not valid
    optional: bool = False         # null is valid too

    def ok(self, value) -> bool:
        if value is None:
            return self.optional
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return (value > self.low if self.open_low else value >= self.low) and value <= self.high

    def valid(self) -> str:
        return (f"a number {'>' if self.open_low else '>='} {self.low:g} and <= {self.high:g}"
                + (" or null" if self.optional else ""))


@dataclass(frozen=True)
class Bool(Setting):
    def ok(self, value) -> bool:
        return isinstance(value, bool)

    def valid(self) -> str:
        return "true or false"


@dataclass(frozen=True)
class Text(Setting):
    optional: bool = True

    def ok(self, value) -> bool:
        return (value is None and self.optional) or (isinstance(value, str) and value != "")

    def valid(self) -> str:
        return "a string" + (" or null" if self.optional else "")


@dataclass(frozen=True)
class Choice(Setting):
    values: tuple

    def ok(self, value) -> bool:
        return isinstance(value, str) and value in self.values

    def valid(self) -> str:
        return ", ".join(self.values)


@dataclass(frozen=True)
class TargetSpec(Setting):
    """A TVM target: a string ("llvm", "cuda", JSON) or a mapping (checked in full by deploy.target later)."""
    def ok(self, value) -> bool:
        return (isinstance(value, str) and value != "") or isinstance(value, dict)

    def valid(self) -> str:
        return 'a target string such as "llvm" or "cuda", or a mapping such as {kind: llvm, mcpu: skylake}'


# ---- bounds, each written once --------------------------------------------------------------------------
BATCH = Int(1, 1024)              # images per batch of a kernel, a deployed module or a Hessian shard
ACTORS = Int(1, 256)
EPOCHS = Int(1, 10000)
COUNT = Int(1, 1000)              # rounds, inputs, batches, samples
ITERATIONS = Int(1, 100000)
RANK = Int(0, 4096)               # deflation basis of the Hessian traces; 0: plain Hutchinson
SEED = Int(0, 2**32 - 1)
TOLERANCE = Float(0.0, 1.0)       # relative stderr of a trace; 0: run every iteration
SAMPLES = Int(1, 10**9)           # images of a split
MILLISECONDS = Float(0.0, 60000.0, open_low=True)
LEARNING_RATE = Float(0.0, 10.0, open_low=True)
WEIGHT_DECAY = Float(0.0, 1.0)
FRACTION = Float(0.0, 1.0)
ACCURACY_DROP = Float(0.0, 100.0, optional=True)   # top-1 points below fp32 an accuracy target allows; null: none
RESOURCES_PER_TRIAL = Float(0.0, 1024.0)


def check_mapping(values: dict, schema: dict, where: str = "") -> None:
    """Check every key of `values` that `schema` ({key: Setting or nested schema}) types."""
    for key, spec in schema.items():
        name = f"{where}{key}"
        if isinstance(spec, dict):
            check_mapping(values[key], spec, f"{name}.")
        else:
            spec.check(values[key], name)


# bytes per activation element a stage holds: fp32 values; Hessian-vector products keep the graph of the
# gradient too (about three copies); a compiled module stores INT32 (or int8) values
BYTES_PER_ELEMENT = {"sensitivity": 12, "profile": 4, "deploy": 4,
                     "finetune": 32}   # QAT: int64 codes, the float surrogate and what autograd keeps of both


def fits_in_memory(batches: dict, elements_per_sample: int, what: str, available: int | None = None) -> None:
    """A one-line error when a batch size ({key: (batch, stage of BYTES_PER_ELEMENT)}) needs more memory for
    its activations than this machine has free (estimated from `elements_per_sample`, the model's
    `quant.layers.activation_elements`)."""
    if available is None:
        import psutil
        available = psutil.virtual_memory().available
    for key, (batch, stage) in batches.items():
        per_sample = elements_per_sample * BYTES_PER_ELEMENT[stage]
        need = batch * per_sample
        if need > available:
            raise HawqError(f"{key}: {batch} needs about {need / 2**30:.1f} GiB of activations for {what}, more "
                            f"than the {available / 2**30:.1f} GiB free here; valid: at most "
                            f"{max(0, available // per_sample)}")


# ---- run.yaml -------------------------------------------------------------------------------------------
CONFIG_MAX_BYTES = 1 << 20        # a run.yaml holds a few dozen settings: a few KiB
CONFIG_MAX_VALUES = 10000         # YAML values (nodes) once every alias is expanded
CONFIG_MAX_DEPTH = 32             # levels of nesting
CONFIG_VALID = "a UTF-8 YAML mapping of settings, at most 1 MiB, like the README's run.yaml"


def read_yaml_mapping(path, what: str = "run config") -> dict:
    """The mapping a small YAML file holds, read safely: a one-line HawqError naming the file (and the line) when
    it is not a regular readable file of at most CONFIG_MAX_BYTES, not UTF-8, not YAML, not a mapping, has
    a key twice in one mapping, or nests or expands (through aliases, e.g. a "billion laughs" file) beyond
    CONFIG_MAX_DEPTH levels or CONFIG_MAX_VALUES values. Anchors and aliases within those bounds are kept: they
    let a run.yaml name one target mapping for both profile and deploy. An empty file (or one of comments only)
    holds no settings: {}."""
    import yaml
    name = f"{what} {path}"
    p = Path(path)
    if p.is_dir():
        raise HawqError(f"{name} is a folder; valid: {CONFIG_VALID}")
    if not p.exists():
        raise HawqError(f"{name}: no such file; valid: {CONFIG_VALID}")
    if not p.is_file():
        raise HawqError(f"{name} is not a regular file; valid: {CONFIG_VALID}")
    try:
        with p.open("rb") as f:
            data = f.read(CONFIG_MAX_BYTES + 1)
    except OSError as e:
        raise HawqError(f"{name} cannot be read ({e.strerror or e}); valid: {CONFIG_VALID}") from None
    if len(data) > CONFIG_MAX_BYTES:
        raise HawqError(f"{name} is larger than {CONFIG_MAX_BYTES >> 20} MiB; valid: {CONFIG_VALID}")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HawqError(f"{name} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        f"valid: {CONFIG_VALID}") from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)(text)
    try:
        node = loader.get_single_node()
        if node is None:                 # empty, or only comments (a template): no settings, the defaults
            return {}
        _check_yaml_nodes(node, name)
        user = loader.construct_document(node)
    except HawqError:
        raise
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join(str(e.problem or e.context or "").split())
        raise HawqError(f"{name} is not valid YAML{where}: {problem}; valid: {CONFIG_VALID}") from None
    except yaml.YAMLError as e:          # e.g. a control character (ReaderError)
        reason = brief((str(e).splitlines() or [type(e).__name__])[0], 120).strip("'\"")
        raise HawqError(f"{name} is not valid YAML ({reason}); valid: {CONFIG_VALID}") from None
    except (ValueError, OverflowError, RecursionError) as e:   # a value its constructor refuses
        reason = brief((str(e).splitlines() or [type(e).__name__])[0], 120).strip("'\"")
        raise HawqError(f"{name}: a value cannot be read ({reason}); valid: {CONFIG_VALID}") from None
    finally:
        loader.dispose()
    if not isinstance(user, dict):
        raise HawqError(f"{name} holds a {type(user).__name__} ({brief(user)}), not a mapping of settings; "
                        f"valid: {CONFIG_VALID}")
    return user


def _check_yaml_nodes(root, name: str) -> None:
    """Bounds on a composed YAML document before any value is built: its nesting depth, its size with every alias
    expanded (an alias node is the very node of its anchor, so a shared node counts once per use), no alias to
    itself, no key twice in a mapping (YAML would keep the last one silently), no integer of over 100 digits
    (Python refuses to read one of over 4300)."""
    import yaml

    def children(node):
        if isinstance(node, yaml.SequenceNode):
            return node.value
        if isinstance(node, yaml.MappingNode):
            return [n for pair in node.value for n in pair]
        return []

    def line(node):
        return f" at line {node.start_mark.line + 1}" if node.start_mark else ""

    size, open_ = {}, set()
    stack = [(root, 0, False)]
    while stack:
        node, depth, finished = stack.pop()
        key = id(node)
        if finished:
            open_.discard(key)
            size[key] = 1 + sum(size[id(c)] for c in children(node))
            if size[key] > CONFIG_MAX_VALUES:
                raise HawqError(f"{name}: the value{line(node)} holds more than {CONFIG_MAX_VALUES} values (YAML "
                                f"aliases expanded); valid: {CONFIG_VALID}, with few aliases")
            continue
        if key in size:
            continue
        if key in open_:
            raise HawqError(f"{name}: the alias{line(node)} refers to a value that contains it; "
                            f"valid: {CONFIG_VALID}")
        if depth > CONFIG_MAX_DEPTH:
            raise HawqError(f"{name}: the value{line(node)} is nested more than {CONFIG_MAX_DEPTH} levels deep; "
                            f"valid: {CONFIG_VALID}")
        if isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:int" and len(node.value) > 100:
            raise HawqError(f"{name}: the integer{line(node)} has {len(node.value)} digits; valid: {CONFIG_VALID}, "
                            f"whose numbers fit their settings' ranges")
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for k, _ in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    if (k.tag, k.value) in seen:
                        raise HawqError(f"{name}: key {brief(k.value)}{line(k)} appears twice in one mapping; "
                                        f"valid: each key once")
                    seen.add((k.tag, k.value))
        open_.add(key)
        stack.append((node, depth, True))
        stack.extend((c, depth + 1, False) for c in children(node))


def merge_settings(into: dict, new, where: str, flat: tuple = ("budgets",)) -> None:
    """`new`'s keys into `into` ({key: default}), nested mappings key by key except the keys in `flat`, which are
    replaced whole; a key `into` does not have is a one-line error naming it and listing the valid ones."""
    if not isinstance(new, dict):
        raise HawqError(f"{where}: {brief(new)} is not valid; valid: a mapping of settings")
    for k, v in new.items():
        if k not in into:
            raise HawqError(f"{where}: unknown setting {brief(k)}; valid: {', '.join(sorted(into))}")
        if isinstance(into[k], dict) and k not in flat:
            if not isinstance(v, dict):
                raise HawqError(f"{where}: setting {k!r} must be a mapping, not {brief(v)}; valid: a mapping of "
                                f"{', '.join(sorted(into[k]))}")
            merge_settings(into[k], v, f"{where}.{k}", ())
        else:
            into[k] = v


BUDGET_RESOURCES = ("size", "bops", "latency", "activation", "memory")   # solver.ilp.BUDGET_KEYS' fractions


def check_budgets(budgets) -> None:
    """run.yaml's `budgets`: {resource: [fraction r in [0, 1], ...]}."""
    if not isinstance(budgets, dict):
        raise HawqError(f"budgets: {brief(budgets)} is not valid; valid: a mapping such as {{size: [0.25, 0.5]}}")
    for resource, values in budgets.items():
        if resource not in BUDGET_RESOURCES:
            raise HawqError(f"budgets: unknown resource {brief(resource)}; valid: {', '.join(BUDGET_RESOURCES)} "
                            f"(fractions r in [0, 1])")
        if not isinstance(values, list) or not all(FRACTION.ok(v) for v in values):
            raise HawqError(f"budgets.{resource}: {brief(values)} is not valid; valid: a list of fractions from "
                            f"0 to 1")
