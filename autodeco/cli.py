"""The `autodeco` command line.

    autodeco init     --base BASE --output-dir DIR          fresh heads on a base model (heads-only directory)
    autodeco generate --model DIR --prompt TEXT [--show-trace]
    autodeco merge    --model DIR --output-dir DIR           heads-only -> self-contained (base + heads)
    autodeco split    --model DIR --output-dir DIR           self-contained -> heads-only
    autodeco train    --model BASE_OR_DIR --data FILE... --output-dir DIR   train the heads on a frozen base
    autodeco data     --model DIR --problems FILE... --output FILE          rejection-sampled training data
    autodeco eval     --model DIR --benchmarks FILE... --methods LIST --output-dir DIR   the paper's tables
    autodeco eval     --diagnose FILE --model DIR                           heads vs their own MeanShift
    autodeco eval-control --model DIR --prompts FILE --output-dir DIR      do randomness commands move T and P?
    autodeco demo     [--quick] [--output-dir DIR]           the whole pipeline on a bundled tiny model (no download)

`autodeco COMMAND --help` explains every flag. Errors in what you pass (missing paths, bad values) are
reported in one line naming the problem, with exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from autodeco.modeling.io import DTYPES, load_tokenizer, resolve_dtype  # noqa: F401  (re-exported for the old callers)
from autodeco.modeling.io import copy_tokenizer as _copy_tokenizer
# TEMPORARY (eval branch, for the integrator): make this module a package so that autodeco/cli/args.py, eval.py
# and control.py import as autodeco.cli.<name> while cli.py still exists. The train branch replaces cli.py by
# autodeco/cli/__init__.py; drop this line then.
__path__ = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "cli")]


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def cmd_init(args) -> None:
    from autodeco import AutoDecoModelForCausalLM

    overrides = dict(max_temperature=args.max_temperature, head_hidden_size=args.head_hidden_size,
                     top_p_features=not args.no_top_p_features)
    model = AutoDecoModelForCausalLM.from_base(
        args.base, seed=args.seed, dtype=DTYPES[args.dtype], trust_remote_code=args.trust_remote_code, **overrides
    )
    model.save_pretrained(args.output_dir)
    copied = _copy_tokenizer(args.base, args.output_dir)
    heads = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("llm."))
    print(f"Wrote fresh AutoDeco heads ({heads:,} parameters) for base '{model.config.base_model_name_or_path}' "
          f"to {args.output_dir}" + ("" if copied else " (no tokenizer found to copy)"))


def cmd_generate(args) -> None:
    from rich.console import Console
    from rich.table import Table

    from autodeco import AutoDecoModelForCausalLM

    model = AutoDecoModelForCausalLM.from_pretrained(args.model, dtype=DTYPES[args.dtype])
    model.to(args.device).eval()
    tokenizer = load_tokenizer(args.model, model.config.base_model_name_or_path)
    if args.chat:
        if tokenizer.chat_template is None:
            raise ValueError(f"--chat: the tokenizer of '{args.model}' has no chat template; drop --chat.")
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                               add_generation_prompt=True)
    else:
        prompt = args.prompt
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=not args.chat).to(args.device)
    gen_kwargs = dict(max_new_tokens=args.max_new_tokens, return_dict_in_generate=True)
    if args.greedy:
        gen_kwargs["do_sample"] = False
    if args.temperature is not None:
        gen_kwargs["temperature"] = args.temperature
    if args.top_p is not None:
        gen_kwargs["top_p"] = args.top_p
    if args.seed is not None:
        torch.manual_seed(args.seed)
    out = model.generate(**inputs, **gen_kwargs)
    new_tokens = out.sequences[0, inputs["input_ids"].shape[1]:]
    console = Console()
    console.print(tokenizer.decode(new_tokens, skip_special_tokens=True), markup=False, highlight=False)
    if args.show_trace:
        mode = "greedy (heads' predictions shown)" if args.greedy else (
            "static" if args.temperature is not None or args.top_p is not None else "dynamic")
        table = Table(title=f"Per-token decoding values ({mode})")
        table.add_column("#", justify="right")
        table.add_column("token")
        table.add_column("T", justify="right")
        table.add_column("P", justify="right")
        for i, token_id in enumerate(new_tokens.tolist()):
            t, p = float(out.temperatures[0, i]), float(out.top_ps[0, i])
            if t != t:  # NaN: padding after EOS
                break
            colour = "blue" if t < 0.7 else "red" if t > 1.3 else "default"
            table.add_row(str(i), repr(tokenizer.decode([token_id])), f"[{colour}]{t:.3f}[/]", f"{p:.3f}")
        console.print(table)


def cmd_merge(args) -> None:
    from autodeco import AutoDecoModelForCausalLM

    model = AutoDecoModelForCausalLM.from_pretrained(args.model)
    model.merge(args.output_dir, max_shard_size=args.max_shard_size)
    _copy_tokenizer(args.model, args.output_dir) or _copy_tokenizer(model.config.base_model_name_or_path or "", args.output_dir)
    print(f"Wrote merged model (base + heads) to {args.output_dir}")


def cmd_split(args) -> None:
    from autodeco import AutoDecoModelForCausalLM

    model = AutoDecoModelForCausalLM.from_pretrained(args.model)
    model.split(args.output_dir, base_output_dir=args.base_output_dir)
    _copy_tokenizer(args.model, args.output_dir)
    if args.base_output_dir:
        _copy_tokenizer(args.model, args.base_output_dir)
    print(f"Wrote heads-only model to {args.output_dir}" + (f" and its base to {args.base_output_dir}" if args.base_output_dir else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="autodeco",
        description="Learned per-token temperature and top-p for Hugging Face causal LMs (AutoDeco).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="wrap a base model with fresh heads and save the heads-only directory",
                       description="Create fresh AutoDeco heads on a base model and save config + heads (no base weights).")
    p.add_argument("--base", required=True, help="base causal LM: local directory or hub name (e.g. Qwen/Qwen2.5-0.5B)")
    p.add_argument("--output-dir", required=True, help="directory to write config.json, the heads and the tokenizer to")
    p.add_argument("--max-temperature", type=float, default=2.0, help="T = max_temperature * sigmoid(...) (default 2.0)")
    p.add_argument("--head-hidden-size", type=_positive_int, default=256, help="hidden width of each head MLP (default 256)")
    p.add_argument("--no-top-p-features", action="store_true",
                   help="top-p head sees only [h, T], not the distribution statistics")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh heads (default 0)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="dtype to load the base in (default auto)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the base's own modelling code (off by default)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("generate", help="generate with per-token dynamic decoding",
                       description="Generate a completion. By default every token is sampled with the heads' own "
                                   "temperature and top-p; --temperature/--top-p switch to static decoding.")
    p.add_argument("--model", required=True, help="AutoDeco directory (heads-only or merged) or hub name")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--show-trace", action="store_true", help="print a table of each generated token with its T and P")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the chat template")
    p.add_argument("--greedy", action="store_true", help="greedy decoding (the base's argmax; heads ignored)")
    p.add_argument("--temperature", type=float, help="static temperature instead of the heads' (heads bypassed)")
    p.add_argument("--top-p", type=float, help="static top-p instead of the heads' (heads bypassed)")
    p.add_argument("--seed", type=int, help="random seed for sampling")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="auto", help="dtype to load the base in (default auto)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device (default: cuda if available)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("merge", help="heads-only directory -> self-contained directory (base weights + heads)",
                       description="Write a self-contained directory holding the base weights and the heads.")
    p.add_argument("--model", required=True, help="heads-only AutoDeco directory")
    p.add_argument("--output-dir", required=True, help="new (or empty) directory for the merged model")
    p.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("split", help="self-contained directory -> heads-only directory",
                       description="Write the heads-only layout of a merged model; optionally save its base too.")
    p.add_argument("--model", required=True, help="merged AutoDeco directory")
    p.add_argument("--output-dir", required=True, help="directory for config.json + heads")
    p.add_argument("--base-output-dir", help="also save the base model here and record it as the base")
    p.set_defaults(func=cmd_split)

    # TEMPORARY wiring (eval branch): cli/__init__.py's build_parser calls these register() functions after the merge.
    from autodeco.cli import control as control_commands
    from autodeco.cli import eval as eval_commands
    from autodeco.train_cli import add_train_parser

    add_train_parser(sub)
    eval_commands.register(sub)  # data, eval
    control_commands.register(sub)  # eval-control

    from autodeco.demo.pipeline import add_demo_parser

    add_demo_parser(sub)
    return parser


# Mistakes in what the user passed: reported in one line, exit status 2, no traceback.
USER_ERRORS = (FileNotFoundError, FileExistsError, ValueError, ImportError)


def run_parsed(args: argparse.Namespace) -> int:
    """Run a parsed subcommand (`args.func`), turning USER_ERRORS into one line on stderr and exit status 2."""
    try:
        args.func(args)
    except USER_ERRORS as exc:
        print(f"autodeco {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Under accelerate / torchrun (train, data, eval): close the process group while every rank is alive;
        # exiting with it open can abort a rank at teardown and fail the launch after a finished run.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


def run_subcommand(add_parser, argv: list[str] | None = None) -> int:
    """Parse `argv` (the subcommand's name first) with only the subcommand that `add_parser(subparsers)` adds, and
    run it like `main`: for `python -m autodeco.<module> <subcommand> ...` entry points."""
    parser = argparse.ArgumentParser(prog="autodeco")
    add_parser(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return run_parsed(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    return run_parsed(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
