"""Developer commands that used to be module mains, as subcommands of the one `autodeco` entry point.

    autodeco report DIR                          # re-render DIR/results.md from DIR/results.json
    autodeco tiny-base DIR [--arch llama]        # a random tiny base + char tokenizer (tests, no download)
    autodeco demo-problems [--split test]        # print a few demo problems with their solutions
    autodeco demo-base [--output-dir DIR]        # retrain the demo's tiny base from its seed (about 30 min)
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from autodeco.atomic import write_text_atomic
from autodeco.cli.args import positive_int
from autodeco.demo import tasks
from autodeco.demo.base import BASE_MODEL_DIR, BaseTrainingConfig, train_base
from autodeco.evaluation.report import results_markdown
from autodeco.testing import TINY_ARCHITECTURES, save_tiny_base

__all__ = ["cmd_demo_base", "cmd_demo_problems", "cmd_report", "cmd_tiny_base", "register"]


def cmd_report(args) -> None:
    path = Path(args.output_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `autodeco eval` first.")
    results = json.loads(path.read_text(encoding="utf-8"))
    write_text_atomic(Path(args.output_dir) / "results.md", results_markdown(results))
    print(Path(args.output_dir) / "results.md")


def cmd_tiny_base(args) -> None:
    print(save_tiny_base(args.output_dir, args.arch, args.seed))


def cmd_demo_problems(args) -> None:
    rng = random.Random(args.seed)
    for problem in tasks.generate_problems(args.split, args.count, args.seed):
        print(f"[{problem.family}] {problem.problem}   gold: {problem.answer}")
        print(tasks.solve(problem, rng, recheck_rate=0.0))
        print()


def cmd_demo_base(args) -> None:
    info = train_base(args.output_dir, BaseTrainingConfig(seed=args.seed, steps=args.steps))
    print(json.dumps({k: v for k, v in info.items() if k != "history"}, indent=2))


def register(subparsers) -> None:
    """Add report, tiny-base, demo-problems and demo-base to `subparsers`."""
    p = subparsers.add_parser("report", help="re-render OUTPUT_DIR/results.md from OUTPUT_DIR/results.json",
                              description="Rewrite the results.md of an `autodeco eval` run from its results.json.")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="an `autodeco eval` output directory")
    p.set_defaults(func=cmd_report)

    p = subparsers.add_parser("tiny-base", help="write a random tiny base model and a char tokenizer (no download)",
                              description="Write a random tiny base model and a char tokenizer, loadable with "
                                          "from_pretrained (for tests and quick experiments).")
    p.add_argument("output_dir", metavar="OUTPUT_DIR", help="directory to write the model and tokenizer into")
    p.add_argument("--arch", default="llama", choices=sorted(TINY_ARCHITECTURES), help="architecture (default llama)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.set_defaults(func=cmd_tiny_base)

    p = subparsers.add_parser("demo-problems", help="print demo problems with a clean solution each",
                              description="Print a few of the demo's synthetic problems with their clean solutions.")
    p.add_argument("--split", choices=tasks.SPLITS, default="test", help="which split (default test)")
    p.add_argument("--count", type=positive_int, default=4, help="how many problems (default 4)")
    p.add_argument("--seed", type=int, default=0, help="seed of the problems and solutions (default 0)")
    p.set_defaults(func=cmd_demo_problems)

    p = subparsers.add_parser("demo-base", help="retrain the demo's tiny base model from scratch (about 30 min)",
                              description="Train the demo's tiny base model from scratch (no download).")
    p.add_argument("--output-dir", default=str(BASE_MODEL_DIR), help=f"where to write it (default {BASE_MODEL_DIR})")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus, tokenizer and weights (default 0)")
    p.add_argument("--steps", type=positive_int, default=BaseTrainingConfig.steps,
                   help=f"optimizer steps (default {BaseTrainingConfig.steps})")
    p.set_defaults(func=cmd_demo_base)
