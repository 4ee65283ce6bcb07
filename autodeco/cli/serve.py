"""`autodeco serve --model DIR [vLLM server flags]`: vLLM's OpenAI-compatible server on an AutoDeco directory.

Every flag after --model that autodeco does not know goes to vLLM's server unchanged (--host, --port, --dtype,
--tensor-parallel-size, --max-model-len, ...). The library part is autodeco.vllm.serve (docs/engines.md).
"""

from __future__ import annotations

import argparse

from autodeco.vllm.serve import serve  # imports no vLLM itself: the server runs in a vLLM subprocess


def cmd_serve(args: argparse.Namespace) -> None:
    status = serve(args.model, args.server_args)
    if status:
        raise SystemExit(status)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve an AutoDeco directory with vLLM's OpenAI-compatible server (dynamic decoding by default)",
        description="Serve a merged AutoDeco directory (or a heads-only one whose recorded base is a local directory) "
                    "with vLLM's OpenAI-compatible server. Requests at default sampling decode with the heads' T and P; "
                    "a request's temperature multiplies the heads' T, temperature 0 is greedy. Needs "
                    "`pip install \"autodeco[vllm]\"`.",
        allow_abbrev=False,  # never take a prefix of a vLLM flag for --model
        epilog="Any further flags go to vLLM's server (python -m vllm.entrypoints.openai.api_server --help).",
    )
    p.add_argument("--model", required=True, help="AutoDeco directory (merged, or heads-only with a local base)")
    p.set_defaults(func=cmd_serve, server_args=[])
    parse_known_args = p.parse_known_args

    def keep_unknown_for_vllm(args=None, namespace=None):
        # The flags this parser does not know are vLLM's: keep them, in order, instead of failing on them.
        namespace, extras = parse_known_args(args, namespace)
        namespace.server_args = list(namespace.server_args) + list(extras)
        return namespace, []

    p.parse_known_args = keep_unknown_for_vllm
