"""`autodeco eval-control`: do commands about randomness move the heads' T and P? (the paper's Table 3)

    autodeco eval-control --model runs/heads --prompts problems.jsonl --output-dir runs/control [--n 100]

A thin wrapper over autodeco.evaluation.evaluate_control. "Seen" phrasings are those training used (the model
directory's autodeco_control.json, else autodeco.control's LOW_COMMANDS / HIGH_COMMANDS); held-out phrasings
are autodeco.control's *_HELD_OUT minus any seen one. The measurement: docs/control.md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from autodeco.cli.args import add_model_loading_flags, positive_int, read_template
from autodeco.control import (
    HIGH_COMMANDS,
    HIGH_COMMANDS_HELD_OUT,
    LOW_COMMANDS,
    LOW_COMMANDS_HELD_OUT,
    load_control_settings,
)
from autodeco.evaluation.benchmarks import load_benchmark
from autodeco.evaluation.control import control_markdown, evaluate_control
from autodeco.evaluation.loading import check_autodeco_dir, load_autodeco_model, resolve_device

__all__ = ["register", "add_eval_control_parser", "cmd_eval_control"]


def add_eval_control_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `eval-control` subcommand to `subparsers` and return its parser."""
    p = subparsers.add_parser(
        "eval-control",
        help="measure how low/high-randomness commands in the prompt move the heads' T and P (paper's Table 3)",
        description="For N problems: generate one completion without a command, teacher-force it without a command "
        "and with low- and high-randomness commands (phrasings seen in training and held-out ones), and report mean T "
        "and P, their paired change and its consistency. Writes results.json, results.md and control_trace.png.",
    )
    p.add_argument("--model", required=True, help="AutoDeco directory (heads-only or merged), e.g. trained with "
                                                  "`autodeco train --control-share 0.3`")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="benchmark-format JSONL: one {\"problem\": ..., \"gt\": ...} object per line (gt is not used)")
    p.add_argument("--output-dir", required=True, help="directory for results.json, results.md and control_trace.png")
    p.add_argument("--n", type=positive_int, default=100, help="problems to use, the first N of the file (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the no-command completions (default 0)")
    p.add_argument("--max-new-tokens", type=positive_int, default=512,
                   help="tokens per completion at most (default 512)")
    p.add_argument("--template", default=None, metavar="TEXT_OR_FILE",
                   help="prompt template with {problem} and {instruction} placeholders (or a file holding one); "
                        "default: problem, blank line, the paper's \\boxed{} instruction")
    p.add_argument("--batch-size", type=positive_int, default=32,
                   help="sequences per generate call and per teacher-forced forward (default 32)")
    add_model_loading_flags(p)
    p.set_defaults(func=cmd_eval_control)
    return p


def _load_problems(path: str) -> list[str]:
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"--prompts '{path}' does not exist (or is not a file); pass a benchmark-format JSONL file with one "
            "{\"problem\": ..., \"gt\": ...} object per line."
        )
    try:
        return [problem.problem for problem in load_benchmark(str(file)).problems]
    except ValueError as exc:
        raise ValueError(
            f"--prompts '{path}': {exc} eval-control reads benchmark-format JSONL ('problem' and 'gt' per line); "
            "training rows ('prompt'/'completion' or 'messages') are not supported."
        ) from None


def cmd_eval_control(args) -> dict:
    """Run `autodeco eval-control`; prints the tables and returns the results dict."""
    # Everything that can be wrong in the flags and files is checked before the model is loaded.
    check_autodeco_dir(args.model, "eval-control measures the heads. Train them with `autodeco train "
                                   "--control-share 0.3 ...` and pass the output directory.")
    problems = _load_problems(args.prompts)
    template = read_template(args.template)
    settings = load_control_settings(args.model) if Path(args.model).expanduser().is_dir() else None
    notes = []
    if settings is None:
        notes.append(f"'{args.model}' has no autodeco_control.json: it was not trained with `--control-share`, so "
                     "this measures the heads' untrained reaction to commands; the 'seen' phrasings are "
                     "autodeco.control's training phrasings.")
        low, high = LOW_COMMANDS, HIGH_COMMANDS
    else:
        low, high = tuple(settings["low_commands"]), tuple(settings["high_commands"])
        notes.append(f"Trained with decoding control: share {settings.get('share')}, margin {settings.get('margin')}, "
                     f"weight {settings.get('weight')} (autodeco_control.json).")
    if len(problems) < args.n:
        notes.append(f"--prompts holds {len(problems)} problems, fewer than --n {args.n}: all of them are used.")
    model, tokenizer = load_autodeco_model(args.model, dtype=args.dtype, device=resolve_device(args.device),
                                           trust_remote_code=args.trust_remote_code)
    results = evaluate_control(
        model, tokenizer, problems, output_dir=args.output_dir, n=args.n, seed=args.seed,
        max_new_tokens=args.max_new_tokens, template=template, batch_size=args.batch_size,
        low_commands=low, high_commands=high,
        low_held_out=[c for c in LOW_COMMANDS_HELD_OUT if c not in low and c not in high],
        high_held_out=[c for c in HIGH_COMMANDS_HELD_OUT if c not in low and c not in high],
        notes=notes,
    )
    print(control_markdown(results), end="")
    print(f"Wrote results.json, results.md and control_trace.png to {args.output_dir}", flush=True)
    return results


def register(subparsers) -> None:
    """Add `eval-control` to the `autodeco` command's subparsers."""
    add_eval_control_parser(subparsers)
