"""Argument types and shared flags for every `autodeco` command: one definition each.

Types raise argparse.ArgumentTypeError, which argparse turns into a one-line usage error (exit 2).
CommandParser is the parser class of every subcommand (autodeco.cli.build_parser): a plain ArgumentParser, except
that `add_parser(..., dataclass_types=D)` adds every field of the dataclass D as a flag (HfArgumentParser).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from transformers import HfArgumentParser

from autodeco.vllm.engine import check_llm_kwargs  # imports no vLLM itself

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")


class CommandParser(HfArgumentParser):
    """The parser of one `autodeco` subcommand: an ArgumentParser with argparse's plain help layout; given
    `dataclass_types`, each dataclass field becomes a `--field_name` / `--field-name` flag (the train command)."""

    def __init__(self, dataclass_types=None, *, formatter_class=argparse.HelpFormatter, **kwargs):
        super().__init__(dataclass_types, formatter_class=formatter_class, **kwargs)


def _number(text: str, cast, what: str):
    try:
        return cast(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got '{text}'") from None


def positive_int(text: str) -> int:
    value = _number(text, int, "a positive integer")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "a positive number")
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float, "a number >= 0")
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value}")
    return value


def ratio(text: str) -> float:
    value = _number(text, float, "a number in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def k_list(text: str) -> list[int]:
    """'1,16' -> [1, 16] (sorted, unique, each >= 1)."""
    values = []
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        try:
            value = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers like 1,16, got '{text}'") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"every k must be >= 1, got {value}")
        values.append(value)
    if not values:
        raise argparse.ArgumentTypeError("give at least one k, e.g. 1,16")
    return sorted(set(values))


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. save_steps=50), got '{text}'")
    return key.strip().replace("-", "_"), value


def typed_value(text: str):
    """A flag's VALUE as Python: an int, a float, true/false (bool), none (None), or the string itself."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def typed_key_value(text: str) -> tuple[str, object]:
    """KEY=VALUE with VALUE typed (typed_value): 'tensor_parallel_size=8' -> ('tensor_parallel_size', 8)."""
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. gpu_memory_utilization=0.9), got '{text}'")
    return key, typed_value(value)


def read_template(value: str | None, flag: str = "--template") -> str | None:
    """A prompt template given literally (it contains {problem}) or as the path of a file holding one."""
    if value is None:
        return None
    path = Path(value)
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    if "{problem}" not in value:
        raise ValueError(f"{flag} '{value}': neither a file nor a template containing {{problem}}.")
    return value


def add_model_loading_flags(p: argparse.ArgumentParser) -> None:
    """--dtype, --device and --trust-remote-code, as every command that loads a model for inference takes them."""
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="dtype of the base model (the heads stay float32); auto = bfloat16 on a CUDA GPU that "
                        "supports it, else float32")
    p.add_argument("--device", default="auto",
                   help="torch device; auto = this process's GPU under accelerate launch, else cuda if available, "
                        "else cpu")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the base model's own modelling code from its repository (off by default)")


ENGINES = ("hf", "vllm")


def add_engine_flags(p: argparse.ArgumentParser, engine_help: str) -> None:
    """--engine {hf,vllm} and the repeatable --vllm-arg KEY=VALUE (read back by `vllm_kwargs`)."""
    p.add_argument("--engine", choices=ENGINES, default="hf", help=engine_help)
    p.add_argument("--vllm-arg", type=typed_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="with --engine vllm: an argument of vllm.LLM, repeatable (tensor_parallel_size=8, "
                        "gpu_memory_utilization=0.9, max_model_len=40960, ...); VALUE is read as int, float, "
                        "true/false or else a string")


def vllm_kwargs(args) -> dict | None:
    """The vllm.LLM arguments of --engine vllm (None for --engine hf), checked before any model loads."""
    if args.engine != "vllm":
        if args.vllm_arg:
            raise ValueError(f"--vllm-arg {args.vllm_arg[0][0]}=...: only with --engine vllm.")
        return None
    kwargs = dict(args.vllm_arg)
    if args.dtype != "auto":
        kwargs.setdefault("dtype", args.dtype)
    if args.trust_remote_code:
        kwargs.setdefault("trust_remote_code", True)
    try:
        check_llm_kwargs(kwargs)  # also: is vLLM installed?
    except ValueError as exc:
        raise ValueError(f"--vllm-arg: {exc}") from None
    return kwargs
