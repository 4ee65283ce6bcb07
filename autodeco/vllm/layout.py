"""Which AutoDeco directories vLLM can load, checked before an engine starts (and again inside the model).

    >>> from autodeco.vllm.layout import check_model_dir
    >>> info = check_model_dir("runs/merged")   # ModelDir(layout="merged", base_architecture="Qwen2ForCausalLM", ...)

A merged directory (model.safetensors[.index.json] with `llm.*` and head tensors) loads as is. A heads-only
directory loads when its recorded base is a local directory with safetensors weights; otherwise the error says to
run `autodeco merge`. Only attention decoders that vLLM registers as text-generation models can be wrapped
(hybrid / state-space / multimodal bases are refused with the list of supported architectures).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from autodeco.modeling import HEADS_WEIGHTS_NAME, MERGED_WEIGHTS_NAMES

AUTODECO_ARCHITECTURE = "AutoDecoModelForCausalLM"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Sampling fields of generation_config.json that must be neutral, or every default request would be static-scaled.
NEUTRAL_SAMPLING = {"temperature": 1.0, "top_p": 1.0, "top_k": 0}


@dataclass
class ModelDir:
    path: Path
    layout: str  # "merged" | "heads-only"
    base_architecture: str
    base_dir: Path | None  # heads-only: the local base directory its weights come from
    tokenizer_dir: Path  # where a tokenizer is (the directory itself, else the base)


def supported_architectures() -> list[str]:
    """vLLM's decoder-only text-generation architectures (what the wrapper can build as its base)."""
    from vllm.model_executor.models import registry  # optional dependency, imported lazily

    names = getattr(registry, "_TEXT_GENERATION_MODELS", None)  # the in-tree decoder-only table
    if names is None:  # another vLLM layout: every registered architecture
        names = registry.ModelRegistry.get_supported_archs()
    return sorted(set(names) - {AUTODECO_ARCHITECTURE})


def unsupported_message(arch: str | None, why: str = "vLLM does not register it as a text-generation model") -> str:
    return (
        f"AutoDeco on vLLM cannot wrap the base architecture {arch!r}: {why}. Supported base architectures "
        f"(vLLM's decoder-only text-generation models, attention-only): {', '.join(supported_architectures())}."
    )


def merge_message(path, reason: str) -> str:
    return (
        f"'{path}' is a heads-only AutoDeco directory and {reason}. vLLM needs the base weights: run "
        f"`autodeco merge --model {path} --output-dir {path}-merged` and serve the merged directory."
    )


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).exists() for name in TOKENIZER_FILES)


def check_model_dir(path) -> ModelDir:
    """Validate an AutoDeco directory for vLLM; raise ValueError / FileNotFoundError saying what to do."""
    directory = Path(path)
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"'{path}' is not a local AutoDeco directory (no config.json). vLLM serves local merged AutoDeco "
            "directories: create one with `autodeco merge`."
        )
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if config.get("model_type") != "autodeco":
        raise ValueError(
            f"'{path}' holds a {config.get('model_type')!r} model, not an AutoDeco one: serve a base model with "
            "plain vLLM, or wrap it first (`autodeco init --base ...`, then train and `autodeco merge`)."
        )
    base_config = config.get("base_config") or {}
    archs = base_config.get("architectures") or []
    arch = archs[0] if archs else None
    if arch not in supported_architectures():
        raise ValueError(unsupported_message(arch))

    if any((directory / name).exists() for name in MERGED_WEIGHTS_NAMES):
        layout, base_dir = "merged", None
    elif (directory / HEADS_WEIGHTS_NAME).exists():
        layout = "heads-only"
        recorded = config.get("base_model_name_or_path")
        if not recorded:
            raise ValueError(merge_message(path, "its config.json records no base model"))
        base_dir = Path(recorded).expanduser()
        if not base_dir.is_dir():
            raise ValueError(merge_message(path, f"its recorded base '{recorded}' is not a local directory"))
        if not any(base_dir.glob("*.safetensors")):
            raise ValueError(merge_message(path, f"its recorded base '{recorded}' has no *.safetensors weights"))
    else:
        raise FileNotFoundError(
            f"'{path}' has config.json but neither {MERGED_WEIGHTS_NAMES[0]} (merged) nor {HEADS_WEIGHTS_NAME} "
            "(heads-only). Was the save interrupted? Re-save the model."
        )
    tokenizer_dir = directory if _has_tokenizer(directory) or base_dir is None else base_dir
    return ModelDir(directory, layout, arch, base_dir, tokenizer_dir)


def generation_overrides(path) -> dict:
    """The generation_config.json sampling fields that differ from T=1, top_p=1, top_k=0 (empty if none).

    A non-neutral value there would make vLLM scale every default request statically on top of the heads;
    autodeco's engine and server override these fields back to neutral."""
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return {}
    data = json.loads(file.read_text(encoding="utf-8"))
    return {k: data[k] for k, neutral in NEUTRAL_SAMPLING.items() if k in data and data[k] not in (None, neutral)}
