"""Where AutoDeco models live on disk and where they come from: save/load/merge/split, model sources, tokenizers.

Two directory layouts load with `from_pretrained` (and `AutoModelForCausalLM.from_pretrained` after
`import autodeco`):
  heads-only:  config.json + autodeco_heads.safetensors   (base loaded from config.base_model_name_or_path)
  merged:      config.json + model.safetensors[.index.json] holding base and heads (`merge` / `split` convert)

`AutoDecoIOMixin` holds those methods for AutoDecoModelForCausalLM. The helpers every loader shares:
`check_model_source(name, what)` (an existing path, or a name that looks like a hub id, else one clear error),
`load_tokenizer(*sources)`, `copy_tokenizer(source, target)`, `resolve_dtype(choice, on_gpu)`, DTYPES.
A local directory is checked in full before it loads (autodeco.validation: validate_model_dir in from_pretrained,
validate_base_dir in from_base). Every file is written atomically (autodeco.atomic). See docs/training.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors_bytes
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.utils import cached_file

from autodeco import official
from autodeco.atomic import atomic_directory, atomic_write, write_text_atomic
from autodeco.config import AutoDecoConfig
from autodeco.validation import read_config, validate_base_dir, validate_model_dir

__all__ = [
    "HEADS_WEIGHTS_NAME",
    "MERGED_WEIGHTS_NAMES",
    "HEAD_MODULES",
    "HUB_KWARGS",
    "DTYPES",
    "DTYPE_NAMES",
    "AutoDecoIOMixin",
    "check_model_source",
    "looks_like_hub_id",
    "load_tokenizer",
    "copy_tokenizer",
    "resolve_dtype",
]

HEADS_WEIGHTS_NAME = "autodeco_heads.safetensors"
MERGED_WEIGHTS_NAMES = ("model.safetensors", "model.safetensors.index.json")
HEAD_MODULES = ("temperature_head", "top_p_head")
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
# `--dtype` values (autodeco.cli.args.DTYPE_CHOICES lists the same names) -> what from_pretrained takes.
DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = tuple(DTYPES)


def resolve_dtype(choice: str, on_gpu: bool):
    """`--dtype` value -> torch dtype; "auto" is bfloat16 on a bf16-capable GPU, else float32."""
    if choice == "auto":
        return torch.bfloat16 if on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[choice]


def load_tokenizer(*sources: str | None):
    """The first tokenizer that loads from `sources` (an AutoDeco directory, then its base, ...)."""
    tried = []
    for source in sources:
        if not source:
            continue
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError) as exc:
            tried.append(f"{source} ({exc.__class__.__name__})")
    raise FileNotFoundError(
        f"No tokenizer found in {' or '.join(tried) or 'the model'}. Save one beside the model with "
        "tokenizer.save_pretrained(DIR)."
    )


def copy_tokenizer(source: str, target: str) -> bool:
    """Save the tokenizer of `source` into `target`; False (nothing written) when `source` has none."""
    try:
        load_tokenizer(source).save_pretrained(target)
        return True
    except FileNotFoundError:
        return False


def looks_like_hub_id(name: str) -> bool:
    """'owner/name': exactly two non-empty parts, and not written as a path ('.', '/', '~' first)."""
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def check_model_source(
    name: str | os.PathLike,
    what: str = "The base model path",
    *,
    fix: str = "Pass an existing local directory or a hub name such as 'Qwen/Qwen2.5-0.5B'.",
    directory: bool = False,
) -> str:
    """"local" when `name` exists on disk (a directory, with `directory`), "hub" when it looks like a hub id;
    otherwise FileNotFoundError "{what} '{name}' does not exist. {fix}" (ValueError "... is a file, not a
    directory" when `directory` and it is a file). Nothing is downloaded. `~` is not
    expanded (from_pretrained does not expand it either): callers that accept it expand it first."""
    name = str(name)
    if os.path.isdir(name) if directory else os.path.exists(name):
        return "local"
    if directory and os.path.exists(name):
        raise ValueError(f"{what} '{name}' is a file, not a directory. {fix}")
    if looks_like_hub_id(name):
        return "hub"
    raise FileNotFoundError(f"{what} '{name}' does not exist. {fix}")


def _has_merged_weights(directory: Path) -> bool:
    return any((directory / name).exists() for name in MERGED_WEIGHTS_NAMES)


class AutoDecoIOMixin:
    """from_base, save_pretrained (heads only), merge, split, from_pretrained, load_heads for the AutoDeco model."""

    @classmethod
    def from_base(
        cls,
        base: str | os.PathLike | PreTrainedModel,
        *,
        seed: int | None = 0,
        dtype: torch.dtype | str | None = None,
        device_map=None,
        trust_remote_code: bool = False,
        **config_overrides,
    ) -> PreTrainedModel:
        """Wrap `base` (a local path, a hub name, or a loaded PreTrainedModel) with fresh heads.

        `config_overrides` set AutoDecoConfig fields (e.g. `max_temperature=1.5`, `top_p_features=False`).
        """
        known = set(AutoDecoConfig.__dataclass_fields__) - {"base_config", "base_model_name_or_path", "hidden_size"}
        unknown = sorted(set(config_overrides) - known)
        if unknown:
            raise ValueError(f"Unknown AutoDecoConfig field(s) {unknown}; valid fields: {sorted(known)}.")
        if isinstance(base, PreTrainedModel):
            base_model = base
            name = base.name_or_path or base.config.name_or_path or ""
        else:
            name = str(base)
            if check_model_source(name) == "local":
                validate_base_dir(name)  # a file, an AutoDeco directory, pickled weights: refused before loading
            load_kwargs = {"trust_remote_code": trust_remote_code}
            if dtype is not None:
                load_kwargs["dtype"] = dtype
            if device_map is not None:
                load_kwargs["device_map"] = device_map
            base_model = AutoModelForCausalLM.from_pretrained(name, **load_kwargs)
        if name and os.path.isdir(name):
            name = os.path.abspath(name)  # a relative path would break as soon as the cwd changes
        config = AutoDecoConfig(base_model_name_or_path=name or None, base_config=base_model.config, **config_overrides)
        model = cls(config, base_model=base_model)
        model.reset_heads(seed)
        return model

    def heads_state_dict(self) -> dict[str, torch.Tensor]:
        """The heads' tensors only, keyed as in this model's state_dict (e.g. 'temperature_head.mlp.0.weight')."""
        return {
            f"{name}.{key}": value.detach().contiguous()
            for name in HEAD_MODULES
            for key, value in getattr(self, name).state_dict().items()
        }

    def save_pretrained(self, save_directory, *, is_main_process: bool = True, state_dict: dict | None = None, **kwargs):
        """Write config.json, generation_config.json and autodeco_heads.safetensors: no base weights.

        `state_dict` (as the Trainer passes it) may hold the whole model; only head tensors are kept.
        Every file is written to a temporary name and renamed, so an interrupted save never leaves a torn file.
        """
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"save_pretrained: '{directory}' is a file; pass a directory.")
        if _has_merged_weights(directory):
            raise ValueError(
                f"save_pretrained: '{directory}' holds a merged model (base + heads); writing heads-only files "
                "there would make it ambiguous. Save to another directory, or use merge() to update it."
            )
        if not is_main_process:
            return
        directory.mkdir(parents=True, exist_ok=True)
        if state_dict is not None:
            heads = {k: v.detach().contiguous() for k, v in state_dict.items() if k.startswith(HEAD_MODULES)}
            if not heads:
                heads = self.heads_state_dict()
        else:
            heads = self.heads_state_dict()
        heads = {k: v.cpu() for k, v in heads.items()}
        payload = save_safetensors_bytes(heads, metadata={"format": "pt", "autodeco": "heads"})
        atomic_write(directory / HEADS_WEIGHTS_NAME, lambda f: f.write(payload))
        self._save_configs(directory)

    def _save_configs(self, directory: Path) -> None:
        self.config.architectures = [type(self).__name__]
        for obj, name in ((self.config, "config.json"), (self.generation_config, "generation_config.json")):
            write_text_atomic(directory / name, obj.to_json_string(use_diff=True))

    def merge(self, save_directory, *, max_shard_size: str | int = "5GB") -> None:
        """Write a self-contained directory: base weights and heads in model.safetensors (sharded if large)."""
        with atomic_directory(save_directory, "merge") as staging:
            self.config.architectures = [type(self).__name__]
            PreTrainedModel.save_pretrained(self, staging, max_shard_size=max_shard_size)

    def split(self, save_directory, *, base_output_dir=None) -> None:
        """Write the heads-only layout. With `base_output_dir`, also save the base there and record it as the base."""
        directory = Path(save_directory)
        if base_output_dir is not None:
            base_dir = Path(base_output_dir)
            if base_dir.exists() and any(base_dir.iterdir()):
                raise FileExistsError(f"split: base_output_dir '{base_dir}' exists and is not empty.")
            self.llm.save_pretrained(base_dir)
            recorded = self.config.base_model_name_or_path
            self.config.base_model_name_or_path = str(base_dir.resolve())
            try:
                self.save_pretrained(directory)
            finally:
                self.config.base_model_name_or_path = recorded
            return
        recorded = self.config.base_model_name_or_path
        if not recorded:
            raise ValueError("split: the config records no base model; pass base_output_dir to save the base too.")
        check_model_source(recorded, "The recorded base model path")
        self.save_pretrained(directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config: AutoDecoConfig | None = None, **kwargs):
        """Load a heads-only or merged AutoDeco directory (local path or hub name).

        Keyword arguments go to the base's `from_pretrained` (dtype, device_map, attn_implementation, ...);
        `base_model_name_or_path=` overrides the recorded base of a heads-only directory.
        """
        path = str(pretrained_model_name_or_path)
        kwargs.pop("_from_auto", None)
        hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
        # Popped here so that it reaches no base/super from_pretrained (the merged route would raise TypeError).
        base_override = kwargs.pop("base_model_name_or_path", None)
        check_model_source(
            path,
            "AutoDeco model directory",
            fix="Create one with `autodeco init --base BASE --output-dir DIR` or "
            "AutoDecoModelForCausalLM.from_base(...).save_pretrained(DIR).",
            directory=True,
        )
        if os.path.isfile(os.path.join(path, "config.json")):
            # A local directory is checked in full before anything loads (autodeco.validation): config.json
            # types, layout, head dtypes/shapes/finiteness, the recorded base. Official layouts: official.py.
            if not official.is_official_config(read_config(path)):
                validate_model_dir(path, base_model_name_or_path=base_override)
        if config is None or getattr(config, "base_config", None) is None:
            # The official checkpoints' layouts (autodeco/official.py). AutoModelForCausalLM passes a config parsed
            # from their flat config.json (no base_config, which ours always have): look again.
            layout = official.detect_layout(path, hub_kwargs)
            if layout is not None:
                return official.load_official(
                    # AutoModelForCausalLM puts a base_model_name_or_path= override into the config it parsed.
                    cls, path, layout, model_args=model_args,
                    base_model_name_or_path=base_override or getattr(config, "base_model_name_or_path", None),
                    hub_kwargs=hub_kwargs, **kwargs,
                )
        if config is None:
            config = AutoConfig.from_pretrained(path, **hub_kwargs)
        if not isinstance(config, AutoDecoConfig):
            raise ValueError(
                f"'{path}' holds a '{getattr(config, 'model_type', '?')}' model, not an AutoDeco one. Wrap it with "
                "AutoDecoModelForCausalLM.from_base(...) (CLI: autodeco init --base ...)."
            )

        def resolve(filename: str) -> str | None:
            return cached_file(path, filename, _raise_exceptions_for_missing_entries=False, **hub_kwargs)

        if any(resolve(name) for name in MERGED_WEIGHTS_NAMES):
            if base_override:  # merged: the base weights are in the directory; the override is what split records
                config.base_model_name_or_path = str(base_override)
            model = super().from_pretrained(path, *model_args, config=config, **hub_kwargs, **kwargs)
            model._check_merged_heads_loaded(path)
            return model

        heads_file = resolve(HEADS_WEIGHTS_NAME)
        if heads_file is None:
            raise FileNotFoundError(
                f"'{path}' has config.json but neither {HEADS_WEIGHTS_NAME} (heads-only layout) nor "
                f"{MERGED_WEIGHTS_NAMES[0]} (merged layout). Was the save interrupted? Re-save the model."
            )
        base_name = base_override or config.base_model_name_or_path
        if not base_name:
            raise ValueError(f"'{path}/config.json' records no base_model_name_or_path; pass base_model_name_or_path=.")
        check_model_source(base_name, f"The base model recorded in '{path}/config.json' path")
        base_hub_kwargs = {k: v for k, v in hub_kwargs.items() if k not in ("revision", "subfolder")}
        base = AutoModelForCausalLM.from_pretrained(base_name, *model_args, **base_hub_kwargs, **kwargs)
        model = cls(config, base_model=base)
        model.load_heads(heads_file)
        # Like any from_pretrained model, it is known by the directory it came from, not by its base.
        model.name_or_path = model.config._name_or_path = path
        return model

    def load_heads(self, heads_file) -> None:
        """Load head tensors from a safetensors file, refusing missing, unexpected or mis-shaped tensors."""
        expected = self.heads_state_dict()
        with safe_open(str(heads_file), framework="pt") as f:
            found = set(f.keys())
            missing = sorted(set(expected) - found)
            unexpected = sorted(found - set(expected))
            if missing or unexpected:
                raise ValueError(
                    f"Heads file '{heads_file}' does not match this model: missing tensors {missing}, unexpected "
                    f"tensors {unexpected}. It was saved by a different AutoDeco configuration (e.g. "
                    "top_p_features or head_hidden_size differ) or is not an AutoDeco heads file."
                )
            tensors = {k: f.get_tensor(k) for k in expected}
        for key, tensor in tensors.items():
            if tensor.shape != expected[key].shape:
                raise ValueError(
                    f"Heads file '{heads_file}': tensor '{key}' has shape {tuple(tensor.shape)}, the model expects "
                    f"{tuple(expected[key].shape)}. Check hidden_size / head_hidden_size in config.json against the base."
                )
        for name in HEAD_MODULES:
            prefix = f"{name}."
            getattr(self, name).load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})

    def _check_merged_heads_loaded(self, path: str) -> None:
        index_file = cached_file(path, MERGED_WEIGHTS_NAMES[1], _raise_exceptions_for_missing_entries=False)
        if index_file is not None:
            with open(index_file, encoding="utf-8") as f:
                keys = set(json.load(f)["weight_map"])
        else:
            with safe_open(cached_file(path, MERGED_WEIGHTS_NAMES[0]), framework="pt") as f:
                keys = set(f.keys())
        missing = sorted(set(self.heads_state_dict()) - keys)
        if missing:
            raise ValueError(
                f"Merged model '{path}' lacks head tensors {missing}: it is not an AutoDeco merge (or is corrupted). "
                "Recreate it with `autodeco merge`."
            )
