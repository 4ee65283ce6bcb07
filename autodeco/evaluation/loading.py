"""Loading a model for `eval`, `data` and `eval-control`: the model-directory checks, the device, the processes.

    state = process_state("auto")                        # accelerate's PartialState (one or several processes)
    model, tokenizer = load_model("runs/heads", device=resolve_device("auto", state))

Everything here raises FileNotFoundError / ValueError with one line naming the path and the fix (the CLI turns
them into exit status 2). More: docs/evaluation.md.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import AutoModelForCausalLM

from autodeco import AutoDecoModelForCausalLM
from autodeco.modeling.io import check_model_source, load_tokenizer, resolve_dtype
from autodeco.validation import validate_base_dir

__all__ = ["load_model", "load_autodeco_model", "model_type", "check_autodeco_dir", "process_state",
           "resolve_device"]


def model_type(name: str, *, what: str = "a model directory") -> str | None:
    """model_type of a local model directory's config.json (None for a hub name).

    A path that does not exist is taken as a hub name only if it looks like one ("org/name")."""
    path = Path(name).expanduser()
    if check_model_source(str(path), "--model", fix=f"Pass {what} (or a hub name).", directory=True) == "hub":
        return None
    config = path / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"--model '{name}' has no config.json; pass {what}.")
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except json.JSONDecodeError as exc:
        raise ValueError(f"--model '{name}': config.json is not valid JSON ({exc}).") from None


def check_autodeco_dir(name: str, why: str) -> None:
    """Refuse a local directory that is not an AutoDeco model (`why`: what needs the heads and how to get them)."""
    kind = model_type(name, what="an AutoDeco model directory")
    if kind is not None and kind != "autodeco":
        raise ValueError(f"--model '{name}' is a plain '{kind}' model, not an AutoDeco one: {why}")


def process_state(device: str) -> PartialState:
    """accelerate's process state: one process, or this process's place under `accelerate launch`."""
    return PartialState(cpu=device == "cpu")


def resolve_device(choice: str, state: PartialState | None = None) -> torch.device:
    """`--device` -> torch device. "auto": this process's device under `state`, else cuda if available, else cpu.
    A bare "cuda" under several processes means one GPU per process."""
    if choice == "auto":
        if state is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return state.device
    device = torch.device(choice)
    if state is not None and device.type == "cuda" and device.index is None and state.num_processes > 1:
        return state.device  # one GPU per process
    return device


def load_autodeco_model(name: str, *, dtype: str = "auto", device: torch.device, trust_remote_code: bool = False):
    """(AutoDeco model, tokenizer) on `device`, in eval mode; the tokenizer from the directory, else its base."""
    torch_dtype = resolve_dtype(dtype, on_gpu=device.type == "cuda")
    model = AutoDecoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(name, model.config.base_model_name_or_path)
    return model.to(device).eval(), tokenizer


def load_model(name: str, *, dtype: str = "auto", device: torch.device, require_autodeco: bool = True,
               trust_remote_code: bool = False):
    """(model, tokenizer) on `device`, in eval mode. An AutoDeco directory loads with its heads; a plain base is
    refused when `require_autodeco`, else loaded as is."""
    kind = model_type(name)
    if kind == "autodeco" or (kind is None and require_autodeco):
        return load_autodeco_model(name, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if require_autodeco:
        raise ValueError(
            f"--model '{name}' is a plain '{kind}' model, not an AutoDeco one: evaluation needs the heads. "
            f"Create them with `autodeco init --base {name} --output-dir DIR` (or train them) and pass DIR."
        )
    if kind is not None:
        validate_base_dir(name)  # local: safetensors only (pickles refused before anything reads them)
    torch_dtype = resolve_dtype(dtype, on_gpu=device.type == "cuda")
    model = AutoModelForCausalLM.from_pretrained(name, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(name)
    return model.to(device).eval(), tokenizer
