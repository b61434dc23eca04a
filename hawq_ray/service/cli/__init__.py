"""`hawq-ray` command line: one subcommand per stage.

Each subcommand lives in a module of this package with a `register(subparsers)` function that adds its
parser and sets `func`. Every subcommand prints a short table; with `--json` the last line is one JSON
object. Bad input exits with status 2 and a one-line reason; Ctrl-C with status 130 and one line (finished stages are kept,
so the same command resumes).
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from hawq_ray.contract import HawqError

COMMAND_MODULES = ("quant", "sensitivity", "profile", "solve", "validate", "finetune", "deploy", "export", "run")


class OneLineParser(argparse.ArgumentParser):
    """Bad options are one line (the command, the option, what is valid) and exit status 2, not a usage dump."""
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
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
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:            # --help (0), or a bad option: its one line is printed already (2)
        return e.code
    try:
        return args.func(args) or 0
    except HawqError as e:
        print(f"hawq-ray {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hawq-ray {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
