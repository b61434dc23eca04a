"""`hawq-ray` command line: one subcommand per stage.

Each subcommand lives in a module of this package with a `register(subparsers)` function that adds its
parser and sets `func`. Every subcommand prints a short table; with `--json` the last line is one JSON
object. Bad input exits with status 2 and a one-line reason.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from hawq_ray.contract import HawqError

COMMAND_MODULES = ("quant", "sensitivity", "profile", "solve", "finetune", "deploy", "export", "run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hawq-ray", description="HAWQ-V3 mixed-precision bit allocation, fine-tuning and integer-only "
        "deployment on Ray: one subcommand per stage.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"hawq_ray.service.cli.{name}").register(sub)
    return parser


def print_json(obj) -> None:
    print(json.dumps(obj, default=_jsonable))


def _jsonable(x):
    import numpy as np
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except HawqError as e:
        print(f"hawq-ray {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
