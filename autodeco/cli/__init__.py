"""The `autodeco` command line: the only place argparse lives; every command is a thin wrapper over the library.

    autodeco init | generate | merge | split      heads on a base, generation, directory layouts   (cli/model.py)
    autodeco train                                train the heads on a frozen base                 (cli/train.py)
    autodeco data | eval                          rejection-sampled data; the paper's tables       (cli/eval.py)
    autodeco eval-control                         do randomness commands move T and P?             (cli/control.py)
    autodeco demo                                 the whole pipeline on a bundled tiny model       (cli/demo.py)
    autodeco report | tiny-base | demo-problems | demo-base    developer tools                    (cli/tools.py)

`autodeco COMMAND --help` explains every flag. Errors in what you pass (missing paths, bad values) are reported in
one line naming the problem, with exit status 2; `autodeco --debug COMMAND ...` (or AUTODECO_DEBUG=1) re-raises
them to show the traceback. `python -m autodeco` and `python -m autodeco.cli` run it too.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

import torch

from autodeco.cli import control as control_commands
from autodeco.cli import convert as convert_commands
from autodeco.cli import demo as demo_commands
from autodeco.cli import eval as eval_commands
from autodeco.cli import model as model_commands
from autodeco.cli import tools as tool_commands
from autodeco.cli import train as train_commands
from autodeco.cli.args import CommandParser

__all__ = ["USER_ERRORS", "build_parser", "main", "run_parsed"]

# Mistakes in what the user passed: reported in one line, exit status 2, no traceback (--debug shows it).
# ValueError includes the library's own user-facing classes (e.g. modeling.NonFiniteHeadsError); FileExistsError
# includes locks.OutputDirLocked.
USER_ERRORS = (FileNotFoundError, FileExistsError, ValueError, ImportError)
DEBUG_ENV = "AUTODECO_DEBUG"


def one_line(message: object) -> str:
    """An error message on one line: the newlines of quoted library text (transformers' OSErrors) collapsed."""
    return re.sub(r"\s*\n\s*", " ", str(message).strip())


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "").strip().lower() in ("1", "true", "yes")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autodeco",
        description="Learned per-token temperature and top-p for Hugging Face causal LMs (AutoDeco).",
    )
    parser.add_argument("--debug", action="store_true",
                        help=f"show the traceback of an error instead of its one-line message (or set {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=CommandParser)
    model_commands.register(sub)
    train_commands.register(sub)
    eval_commands.register(sub)
    control_commands.register(sub)
    convert_commands.register(sub)
    demo_commands.register(sub)
    tool_commands.register(sub)
    return parser


def run_parsed(args: argparse.Namespace) -> int:
    """Run a parsed subcommand (`args.func`), turning USER_ERRORS into one line on stderr and exit status 2
    (re-raised instead with --debug or AUTODECO_DEBUG=1)."""
    try:
        args.func(args)
    except USER_ERRORS as exc:
        if _debug(args):
            raise
        print(f"autodeco {args.command}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Under accelerate / torchrun (train, data, eval): close the process group while every rank is alive;
        # exiting with it open can abort a rank at teardown and fail the launch after a finished run.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_parsed(build_parser().parse_args(argv))
