"""`hawq-ray` command line: one subcommand per stage.

Each subcommand lives in a module of this package with a `register(subparsers)` function that adds its
parser and sets `func`. Every subcommand prints a short table; with `--json` the last line is one JSON
object. Bad input exits with status 2 and a one-line reason, and so does a full disk (`disk_full`); Ctrl-C with status
130 and one line (finished stages are kept, so the same command resumes).
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import shutil
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


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:            # --help (0), or a bad option: its one line is printed already (2)
        return e.code
    try:
        return args.func(args) or 0
    except HawqError as e:
        print(f"hawq-ray {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"hawq-ray {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a full disk is the user's to fix, not a bug: one line; else re-raised
        full = disk_full(e, getattr(args, "out", None))
        if full is None:
            raise
        print(f"hawq-ray {args.command}: error: {full}", file=sys.stderr)
        return 2


def _one_line(e: HawqError) -> str:
    """The error's one line; one raised in a Ray task or actor arrives wrapped (RayTaskError, whose text is a
    traceback), so its cause speaks."""
    cause = getattr(e, "cause", None)
    text = str(cause if isinstance(cause, HawqError) else e)
    return next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)


DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
LOW_SPACE = 64 << 20     # bytes free under which a failed write is taken for a full disk


def disk_full(e: BaseException, out=None) -> str | None:
    """One line for an error that a full disk (or an exhausted quota) caused, anywhere in its chain of causes
    (a Ray task's error included):
    what was being written (the file, else the pipeline stage) and what to do; None for any other error. torch
    reports a full disk as a bare RuntimeError of its writer, so that one counts when `out` has under LOW_SPACE
    free."""
    full, seen, x = None, set(), e
    while x is not None and id(x) not in seen and full is None:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno in DISK_FULL:
            full = x
        wrapped = getattr(x, "cause", None)          # a Ray task's error (RayTaskError) holds the one it raised
        x = x.__cause__ or x.__context__ or (wrapped if isinstance(wrapped, BaseException) else None)
    if full is None:
        text = str(e)
        if not (isinstance(e, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text)
                and out is not None and _free_bytes(out) < LOW_SPACE):
            return None
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    where = full.filename or getattr(e, "stage_path", None)      # `pipeline.cached_stage` names its stage
    stage = getattr(e, "stage", None)
    what = (f"the {stage} stage ({where})" if stage and where else f"the {stage} stage" if stage
            else str(where) if where else "the outputs")
    place = f" on the disk of {out}" if out else ""
    return (f"disk full ({full.strerror or os.strerror(full.errno)}) while writing {what}: free space{place} "
            f"and run the same command again; finished stages are kept")


def _free_bytes(path) -> int:
    path = os.path.abspath(path)
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return LOW_SPACE


if __name__ == "__main__":
    sys.exit(main())
