"""`autodeco convert`: AutoDeco directories between our format and the official one (issue 12; docs/checkpoints.md).

    autodeco convert --to autodeco --model OFFICIAL_DIR --output-dir OURS_DIR
    autodeco convert --to official --model OURS_DIR --output-dir OFFICIAL_DIR
"""

from __future__ import annotations

import argparse

from autodeco.official import convert


def cmd_convert(args: argparse.Namespace) -> None:
    target = convert(args.model, args.output_dir, to=args.to)
    print(f"Wrote the {args.to} format of {args.model} to {target}")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="convert an AutoDeco directory to/from the official AutoDeco format",
        description="Rename the head tensors and translate config.json between our layout and the official "
                    "AutoDeco code's (github.com/Zacks917/AutoDeco); tensors are copied bit for bit, no base is loaded.",
    )
    p.add_argument("--to", required=True, choices=("autodeco", "official"), help="the format to write")
    p.add_argument("--model", required=True, help="local AutoDeco directory to convert (heads-only or merged)")
    p.add_argument("--output-dir", required=True, help="new (or empty) directory to write the converted model to")
    p.set_defaults(func=cmd_convert)
