"""The type and range of every setting, in run.yaml and on the command line, checked before any work starts.

A value of the wrong type or out of range is one line naming the key, the value and what is valid. The same
`Int` / `Float` / ... object checks a run.yaml key and, as argparse `type=`, the CLI option of that
meaning, so a bound is written once. The upper bounds keep a typo (a batch of 100000, 1000 actors) from starting work that
can only fail; `fits_in_memory` checks the batch sizes against this machine's free memory.
"""
from __future__ import annotations

import abc
import argparse
import math
from dataclasses import dataclass

from hawq_ray.contract import HawqError


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
            raise HawqError(f"{key}: {value!r} is not valid; valid: {self.valid()}")
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
            raise argparse.ArgumentTypeError(f"{text!r} is not valid; valid: {self.valid()}")
        return value


@dataclass(frozen=True)
class Int(Setting):
    convert = int
    low: int
    high: int

    def ok(self, value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.low <= value <= self.high

    def valid(self) -> str:
        return f"an integer from {self.low} to {self.high}"


@dataclass(frozen=True)
class Float(Setting):
    convert = float
    low: float
    high: float
    open_low: bool = False         # low itself is not valid

    def ok(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        return (value > self.low if self.open_low else value >= self.low) and value <= self.high

    def valid(self) -> str:
        return f"a number {'>' if self.open_low else '>='} {self.low:g} and <= {self.high:g}"


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
BYTES_PER_ELEMENT = {"sensitivity": 12, "profile": 4, "deploy": 4}


def fits_in_memory(batches: dict, elements_per_sample: int, what: str, available: int | None = None) -> None:
    """A one-line error when a batch size ({key: (batch, stage of BYTES_PER_ELEMENT)}) needs more memory for
    its activations than this machine has free (estimated from `elements_per_sample`, the model's
    `analysis.layers.activation_elements`)."""
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
