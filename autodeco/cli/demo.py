"""`autodeco demo`: the paper's pipeline end to end on the bundled tiny model (autodeco.demo.pipeline.run_demo).

    autodeco demo                              # full run (make demo): about 10 minutes on 2 CPU cores
    autodeco demo --quick                      # the same pipeline at a small scale (about 2 minutes; the tests run it)
    autodeco demo --output-dir DIR             # default runs/demo (runs/demo-quick with --quick)
    autodeco demo --retrain-base               # retrain the base from its seed first (autodeco/demo/base.py)
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from autodeco.demo.pipeline import run_demo

__all__ = ["cmd_demo", "register"]


def register(subparsers) -> argparse.ArgumentParser:
    """Add `demo` to `subparsers`."""
    p = subparsers.add_parser(
        "demo", help="the paper's pipeline end to end on a tiny bundled model (no download)",
        description="Rejection-sample data from the bundled tiny base, train AutoDeco heads (with and without "
                    "decoding control), evaluate every decoding method on held-out synthetic tasks and write a report. "
                    "About 10 minutes on 2 CPU cores; --quick about 2.",
    )
    p.add_argument("--output-dir", default=None, help="where everything goes (default runs/demo, or runs/demo-quick "
                                                      "with --quick); a rerun resumes")
    p.add_argument("--quick", action="store_true", help="a small version of every step (about 2 minutes)")
    p.add_argument("--retrain-base", action="store_true",
                   help="first retrain the tiny base model from its seed into OUTPUT_DIR/base and use it "
                        "(about 30 minutes on 2 CPU cores) instead of the bundled weights")
    p.add_argument("--base-model", default=None, metavar="DIR",
                   help="use this demo base directory (e.g. one written by --retrain-base) instead of the bundled one")
    p.add_argument("--fresh", action="store_true", help="delete OUTPUT_DIR first instead of resuming")
    p.set_defaults(func=cmd_demo)
    return p


def cmd_demo(args) -> dict:
    output_dir = Path(args.output_dir or ("runs/demo-quick" if args.quick else "runs/demo"))
    if args.fresh and output_dir.exists():
        shutil.rmtree(output_dir)
    return run_demo(output_dir, quick=args.quick, retrain_base=args.retrain_base, base_model=args.base_model)
