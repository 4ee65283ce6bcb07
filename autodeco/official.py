"""The official AutoDeco checkpoint format (github.com/Zacks917/AutoDeco): detect, translate, load, convert.

    >>> AutoDecoModelForCausalLM.from_pretrained("Jadeislaw/AutoDeco-R1-Distill-Qwen-7B",
    ...                                          base_model_name_or_path="deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")
    >>> convert("official_dir", "ours_dir", to="autodeco")      # or to="official"; CLI: autodeco convert

Official layouts: a flat `AutoDecoModelForCausalLMConfig` config.json (every base field at the top level plus
`base_model_type`, `enable_temperature_head` / `enable_top_p_head` (older: `train_temp` / `train_top_p`),
`use_enhanced_features`, `temperature_hidden_size`, `top_p_hidden_size`) and either heads only
(`model.safetensors`, first release `autodeco_heads.safetensors`: `temp_head.mlp.{0,2}.*`, `top_p_head.mlp.{0,2}.*`)
or merged (`llm.<base key>` + heads, sharded with an index). Their top-p features differ slightly from ours
(`official_distribution_stats`); a loaded official checkpoint records `feature_arithmetic="official"` so its
heads see the features they were trained on. Details and the released checkpoints: docs/checkpoints.md.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import cached_file

from autodeco.atomic import atomic_directory
from autodeco.config import AutoDecoConfig

# Our head module names -> the official ones (the MLP indices 0 and 2 are the same in both).
HEAD_PREFIXES = {"temperature_head.": "temp_head.", "top_p_head.": "top_p_head."}
OFFICIAL_HEAD_PREFIXES = tuple(HEAD_PREFIXES.values())
LLM_PREFIX = "llm."
OFFICIAL_HEADS_NAMES = ("model.safetensors", "autodeco_heads.safetensors")  # current release, first release
INDEX_NAME = "model.safetensors.index.json"
OUR_HEADS_NAME = "autodeco_heads.safetensors"  # = autodeco.modeling.HEADS_WEIGHTS_NAME
# The official code hard-codes these.
OFFICIAL_HEAD_HIDDEN_SIZE = 256
OFFICIAL_MAX_TEMPERATURE = 2.0
# Official feature arithmetic: softmax(z / (T + 1e-8)), entropy -(p * log(p + 1e-8)).sum().
OFFICIAL_TEMPERATURE_EPS = 1e-8
OFFICIAL_ENTROPY_EPS = 1e-8
OFFICIAL_TOP_K = 5
OFFICIAL_STATS_CHUNK_ROWS = 256  # rows of [rows, V] float32 at once (as modeling.STATS_CHUNK_ROWS)
# Fields the official config adds to the flat base fields; any one of them marks an official config.
OFFICIAL_FIELDS = (
    "base_model_type", "base_model_name_or_path", "enable_temperature_head", "enable_top_p_head",
    "use_enhanced_features", "temperature_hidden_size", "top_p_hidden_size", "train_temp", "train_top_p",
)
# Fields only the official code writes (not `train_top_p`: AutoDecoConfig has a field of that name too, so one of
# our configs that lost its base_config would look official; the older official configs also carry `train_temp`).
OFFICIAL_MARKERS = ("enable_temperature_head", "enable_top_p_head", "use_enhanced_features", "train_temp",
                    "base_model_type")
# Where an official config written by `convert(..., to="official")` keeps our own fields (the official code
# ignores unknown fields), so ours -> official -> ours loses nothing.
AUTODECO_FIELDS_KEY = "autodeco"
KEPT_FIELDS = ("head_hidden_size", "max_temperature", "top_p_features", "train_temperature", "train_top_p",
               "soft_top_p_alpha", "easy_token_mask_ratio", "dft", "feature_arithmetic", "soft_top_p_official_log")
# Flat keys that belong to the wrapper, not to the base config.
WRAPPER_KEYS = set(OFFICIAL_FIELDS) | {AUTODECO_FIELDS_KEY, "model_type", "architectures", "auto_map",
                                       "transformers_version", "_name_or_path"}
EXPECTED_LAYOUTS = (
    "an AutoDeco directory: config.json plus autodeco_heads.safetensors (heads-only) or model.safetensors"
    "[.index.json] (merged), or an official one: a flat config.json with enable_temperature_head/base_model_type "
    "plus model.safetensors or autodeco_heads.safetensors holding only temp_head.*/top_p_head.* (heads-only) or "
    "llm.* and head tensors (merged)"
)


# ---------------------------------------------------------------------------------------------- features


def official_distribution_stats(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """The official top-p features of softmax(logits / (T + 1e-8)): [..., V], [...] -> [..., 4] float32.

    Columns as `sampling.distribution_stats`: max probability, entropy -(p * log(p + 1e-8)).sum(), unbiased
    variance of p over the vocabulary, top-5 mass. bf16/fp16 inputs are upcast to float32 first (bf16 -> fp32 is
    exact); the official code, run on a bf16 model, would round each step to bf16 instead.
    """
    scaled = logits.float() / (temperature.float() + OFFICIAL_TEMPERATURE_EPS).unsqueeze(-1)
    probs = torch.softmax(scaled, dim=-1)
    entropy = -(probs * torch.log(probs + OFFICIAL_ENTROPY_EPS)).sum(-1)
    top = probs.topk(min(OFFICIAL_TOP_K, probs.shape[-1]), dim=-1).values
    return torch.stack([top[..., 0], entropy, probs.var(dim=-1), top.sum(-1)], dim=-1)


def official_stats_chunked(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """`official_distribution_stats` over logits [B, L, V], T [B, L] in row chunks (bounded memory) -> [B, L, 4]."""
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_t = temperature.reshape(-1)
    chunks = [
        official_distribution_stats(flat_logits[i : i + OFFICIAL_STATS_CHUNK_ROWS], flat_t[i : i + OFFICIAL_STATS_CHUNK_ROWS])
        for i in range(0, flat_logits.shape[0], OFFICIAL_STATS_CHUNK_ROWS)
    ]
    return torch.cat(chunks).reshape(*temperature.shape, -1)


# ---------------------------------------------------------------------------------------------- keys


def to_official_key(key: str) -> str:
    """'temperature_head.mlp.0.weight' -> 'temp_head.mlp.0.weight'; base keys ('llm.*') are unchanged."""
    for ours, theirs in HEAD_PREFIXES.items():
        if key.startswith(ours):
            return theirs + key[len(ours):]
    return key


def to_autodeco_key(key: str) -> str:
    """'temp_head.mlp.0.weight' -> 'temperature_head.mlp.0.weight'; base keys ('llm.*') are unchanged."""
    for ours, theirs in HEAD_PREFIXES.items():
        if key.startswith(theirs):
            return ours + key[len(theirs):]
    return key


def _is_official_head_key(key: str) -> bool:
    return key.startswith(OFFICIAL_HEAD_PREFIXES)


# ---------------------------------------------------------------------------------------------- configs


def is_official_config(raw: dict) -> bool:
    """A config.json dict written by the official code (flat, no `base_config`)."""
    return raw.get("model_type") == "autodeco" and "base_config" not in raw and any(k in raw for k in OFFICIAL_MARKERS)


def base_config_from_official(raw: dict):
    """The base model's config rebuilt from the flat official fields; None when transformers does not know the
    base type (remote-code bases such as Llama-Nemotron's DeciLM: the base's own config is used instead)."""
    base_type = raw.get("base_model_type")
    if not base_type:
        return None
    fields = {k: v for k, v in raw.items() if k not in WRAPPER_KEYS}
    try:
        return AutoConfig.for_model(base_type, **fields)
    except (ValueError, KeyError):
        return None


def autodeco_config_from_official(raw: dict, head_tensors: dict[str, torch.Tensor] | None = None) -> AutoDecoConfig:
    """Our AutoDecoConfig for an official config dict (and, if given, its head tensors, official or our names)."""
    kept = dict(raw.get(AUTODECO_FIELDS_KEY) or {})
    enable_t = raw.get("enable_temperature_head", raw.get("train_temp"))
    enable_p = raw.get("enable_top_p_head", raw.get("train_top_p"))
    hidden = raw.get("temperature_hidden_size") or raw.get("hidden_size")
    head_hidden = OFFICIAL_HEAD_HIDDEN_SIZE
    if head_tensors:
        first = head_tensors.get("temp_head.mlp.0.weight", head_tensors.get("temperature_head.mlp.0.weight"))
        if first is not None:
            head_hidden, hidden = int(first.shape[0]), int(first.shape[1])
    fields = dict(
        head_hidden_size=head_hidden,
        max_temperature=OFFICIAL_MAX_TEMPERATURE,
        top_p_features=bool(raw.get("use_enhanced_features", True)),
        train_temperature=True if enable_t is None else bool(enable_t),
        train_top_p=True if enable_p is None else bool(enable_p),
        # Heads trained by the official code saw the official features; converted heads of ours keep theirs.
        feature_arithmetic="official",
    )
    fields.update({k: v for k, v in kept.items() if k in KEPT_FIELDS})
    return AutoDecoConfig(
        base_model_name_or_path=raw.get("base_model_name_or_path"),
        base_config=base_config_from_official(raw),
        hidden_size=hidden,
        **fields,
    )


def official_config_from_autodeco(config: AutoDecoConfig) -> dict:
    """The flat official config dict for our config; ValueError for what the official code cannot express."""
    if config.head_hidden_size != OFFICIAL_HEAD_HIDDEN_SIZE or config.max_temperature != OFFICIAL_MAX_TEMPERATURE:
        raise ValueError(
            f"The official AutoDeco code hard-codes head_hidden_size={OFFICIAL_HEAD_HIDDEN_SIZE} and "
            f"max_temperature={OFFICIAL_MAX_TEMPERATURE}; these heads have head_hidden_size={config.head_hidden_size}, "
            f"max_temperature={config.max_temperature}, so they cannot be written in the official format."
        )
    if config.base_config is None:
        raise ValueError("The config records no base_config; the official format needs every base field. "
                         "Load the model with its base and save it again first.")
    base = config.base_config.to_dict()
    flat = {k: v for k, v in base.items() if k not in ("architectures", "auto_map", "transformers_version", "_name_or_path")}
    flat.update(
        model_type="autodeco",
        architectures=["AutoDecoModelForCausalLM"],
        base_model_type=base["model_type"],
        base_model_name_or_path=config.base_model_name_or_path,
        enable_temperature_head=bool(config.train_temperature),
        enable_top_p_head=bool(config.train_top_p),
        use_enhanced_features=bool(config.top_p_features),
        temperature_hidden_size=config.hidden_size,
        top_p_hidden_size=config.hidden_size,
    )
    flat[AUTODECO_FIELDS_KEY] = {k: getattr(config, k) for k in KEPT_FIELDS}
    return flat


# ---------------------------------------------------------------------------------------------- layouts


@dataclass
class Layout:
    """What `detect_layout` found: kind is 'official-heads' or 'official-merged'."""

    kind: str
    raw_config: dict
    heads_file: str | None = None  # official-heads: the file holding the heads
    shard_files: list[str] = field(default_factory=list)  # official-merged: every weights file
    index_file: str | None = None


def _resolver(path: str, hub_kwargs: dict):
    def resolve(name: str) -> str | None:
        return cached_file(path, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)

    return resolve


def _found(path: str) -> str:
    if os.path.isdir(path):
        names = sorted(os.listdir(path))
        return f"found {names[:20]}" + (" ..." if len(names) > 20 else "")
    return "found no such local directory (looked it up as a hub name)"


def _keys_of(file: str) -> list[str]:
    with safe_open(file, framework="pt") as f:
        return list(f.keys())


def read_config_dict(path: str, hub_kwargs: dict | None = None) -> dict:
    """config.json of `path` as a dict; ValueError naming what was found when there is none."""
    config_file = _resolver(path, hub_kwargs or {})("config.json")
    if config_file is None:
        raise ValueError(f"'{path}' is not an AutoDeco model directory: {_found(path)}, no config.json. Expected {EXPECTED_LAYOUTS}.")
    with open(config_file, encoding="utf-8") as f:
        return json.load(f)


def detect_layout(path: str, hub_kwargs: dict | None = None) -> Layout | None:
    """The official layout of `path`, or None when it is not an official directory (then it is ours or nothing).

    Raises ValueError naming what was found and what was expected for a directory without config.json, or with
    an official config but no official weights.
    """
    hub_kwargs = hub_kwargs or {}
    raw = read_config_dict(path, hub_kwargs)
    if not is_official_config(raw):
        return None
    resolve = _resolver(path, hub_kwargs)
    index_file = resolve(INDEX_NAME)
    if index_file is not None:
        with open(index_file, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        if not any(_is_official_head_key(k) for k in weight_map):
            raise ValueError(f"'{path}/{INDEX_NAME}' maps no temp_head.*/top_p_head.* tensors: not an AutoDeco merge. "
                             f"Expected {EXPECTED_LAYOUTS}.")
        shards = [resolve(name) for name in sorted(set(weight_map.values()))]
        return Layout("official-merged", raw, shard_files=shards, index_file=index_file)
    for name in OFFICIAL_HEADS_NAMES:
        file = resolve(name)
        if file is None:
            continue
        keys = _keys_of(file)
        heads = [k for k in keys if _is_official_head_key(k)]
        if heads and len(heads) == len(keys):
            return Layout("official-heads", raw, heads_file=file)
        if heads and any(k.startswith(LLM_PREFIX) for k in keys):
            return Layout("official-merged", raw, shard_files=[file])
        raise ValueError(f"'{path}/{name}' holds {len(keys)} tensors (e.g. {keys[:3]}) but no official heads "
                         f"(temp_head.*, top_p_head.*) next to an official config. Expected {EXPECTED_LAYOUTS}.")
    raise ValueError(f"'{path}' has an official AutoDeco config.json but no weights: {_found(path)}. Expected {EXPECTED_LAYOUTS}.")


def _read_official_heads(layout: Layout) -> dict[str, torch.Tensor]:
    """Head tensors under OUR names, in their stored dtype."""
    files = [layout.heads_file] if layout.heads_file else layout.shard_files
    heads = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if _is_official_head_key(key):
                    heads[to_autodeco_key(key)] = f.get_tensor(key)
    return heads


# ---------------------------------------------------------------------------------------------- loading


def _check_head_shapes(heads: dict, model, path: str, base_name: str) -> None:
    expected = model.heads_state_dict()
    missing, unexpected = sorted(set(expected) - set(heads)), sorted(set(heads) - set(expected))
    if missing or unexpected:
        raise ValueError(f"Official heads in '{path}' do not match: missing {[to_official_key(k) for k in missing]}, "
                         f"unexpected {[to_official_key(k) for k in unexpected]}.")
    for key, tensor in heads.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(f"'{path}': tensor '{to_official_key(key)}' has shape {tuple(tensor.shape)}, the model "
                             f"built on '{base_name}' expects {tuple(expected[key].shape)}.")


def _hidden_size_of(model: PreTrainedModel) -> int:
    return model.config.get_text_config(decoder=True).hidden_size


def _load_base(base_name: str, recorded: bool, path: str, model_args, base_kwargs) -> PreTrainedModel:
    hint = ("pass base_model_name_or_path= (CLI: --base) with a local copy or the hub name of the base, e.g. "
            "deepseek-ai/DeepSeek-R1-Distill-Qwen-7B")
    where = f"recorded in '{path}/config.json'" if recorded else "given"
    looks_local = base_name.startswith((".", "/", "~")) or len(base_name.split("/")) != 2
    if looks_local and not os.path.exists(base_name):
        # Official checkpoints record a path on the authors' cluster.
        raise FileNotFoundError(f"The base model '{base_name}' {where} does not exist on this machine; {hint}.")
    try:
        return AutoModelForCausalLM.from_pretrained(base_name, *model_args, **base_kwargs)
    except OSError as exc:
        raise FileNotFoundError(f"The base model '{base_name}' {where} could not be loaded ({exc}); {hint}.") from exc


def load_official(cls, path: str, layout: Layout, *, base_model_name_or_path=None, model_args=(), hub_kwargs=None, **kwargs):
    """Build `cls` (AutoDecoModelForCausalLM) from an official directory; kwargs go to the base's from_pretrained."""
    hub_kwargs = hub_kwargs or {}
    heads = _read_official_heads(layout)
    config = autodeco_config_from_official(layout.raw_config, heads)
    if layout.kind == "official-merged":
        if config.base_config is None:
            raise ValueError(
                f"'{path}' is an official merged checkpoint of a '{layout.raw_config.get('base_model_type')}' base, "
                "which transformers cannot build without remote code. Load the heads-only checkpoint with "
                "base_model_name_or_path= and trust_remote_code=True instead (docs/checkpoints.md)."
            )
        if base_model_name_or_path:
            config.base_model_name_or_path = str(base_model_name_or_path)  # recorded only: the weights are here
        key_mapping = {r"^temp_head\.": "temperature_head."}  # the one head prefix that differs
        model = PreTrainedModel.from_pretrained.__func__(
            cls, path, *model_args, config=config, key_mapping=key_mapping, **hub_kwargs, **kwargs
        )
        loaded = model.heads_state_dict()
        if any(not torch.equal(loaded[k].float(), v.float()) for k, v in heads.items() if k in loaded):
            raise ValueError(f"The heads of official merged checkpoint '{path}' did not load; re-create it.")
        return model

    recorded = not base_model_name_or_path or base_model_name_or_path == layout.raw_config.get("base_model_name_or_path")
    base_name = str(base_model_name_or_path or layout.raw_config.get("base_model_name_or_path") or "")
    if not base_name:
        raise ValueError(f"'{path}/config.json' records no base_model_name_or_path; pass base_model_name_or_path=.")
    base_kwargs = {k: v for k, v in hub_kwargs.items() if k not in ("revision", "subfolder")}
    base = _load_base(base_name, recorded, path, model_args, {**base_kwargs, **kwargs})
    base_hidden = _hidden_size_of(base)
    if config.hidden_size != base_hidden:
        raise ValueError(
            f"The official heads in '{path}' were trained on a base with hidden size {config.hidden_size} "
            f"(temp_head.mlp.0.weight is {tuple(heads['temperature_head.mlp.0.weight'].shape)}), but the base "
            f"'{base_name}' has hidden size {base_hidden}. Pass the base the heads were trained on."
        )
    config.base_config = base.config
    config.base_model_name_or_path = os.path.abspath(base_name) if os.path.isdir(base_name) else base_name
    model = cls(config, base_model=base)
    _check_head_shapes(heads, model, path, base_name)
    for name in ("temperature_head", "top_p_head"):
        prefix = f"{name}."
        getattr(model, name).load_state_dict({k[len(prefix):]: v for k, v in heads.items() if k.startswith(prefix)})
    model.name_or_path = model.config._name_or_path = path
    return model


# ---------------------------------------------------------------------------------------------- conversion


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _copy_extras(source: Path, target: Path, skip) -> None:
    """Tokenizer and other side files (not weights, not config.json) from source to target."""
    if not source.is_dir():
        return
    for item in source.iterdir():
        if item.is_file() and item.name != "config.json" and not item.name.endswith(".safetensors") \
                and item.name != INDEX_NAME and not skip(item.name):
            shutil.copy2(item, target / item.name)


def _rename_weights(files: list[str], index_file: str | None, target: Path, rename, heads_only_name: str | None):
    """Copy safetensors files to target with every key renamed by `rename` (values untouched, bit for bit)."""
    if heads_only_name is not None:  # one heads file, written under its layout's name
        with safe_open(files[0], framework="pt") as f:
            tensors = {rename(k): f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(target / heads_only_name), metadata={"format": "pt"})
        return
    for file in files:
        with safe_open(file, framework="pt") as f:
            metadata = f.metadata() or {"format": "pt"}
            tensors = {rename(k): f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(target / Path(file).name), metadata=metadata)
    if index_file is not None:
        with open(index_file, encoding="utf-8") as f:
            index = json.load(f)
        index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
        _write_json(target / INDEX_NAME, index)


def _our_layout(path: Path) -> tuple[str, list[str], str | None]:
    index = path / INDEX_NAME
    if index.exists():
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        return "merged", [str(path / s) for s in shards], str(index)
    if (path / "model.safetensors").exists():
        return "merged", [str(path / "model.safetensors")], None
    if (path / OUR_HEADS_NAME).exists():
        return "heads", [str(path / OUR_HEADS_NAME)], None
    raise ValueError(f"'{path}' is not an AutoDeco directory: {_found(str(path))}. Expected {EXPECTED_LAYOUTS}.")


def convert(model_dir, output_dir, to: str = "autodeco") -> Path:
    """Convert a local AutoDeco directory between our format and the official one, file by file (no base loaded).

    to="official": ours (heads-only or merged) -> official (model.safetensors heads-only, or merged shards);
    to="autodeco": official (any layout) -> ours. Tensors are copied bit for bit in their stored dtype, only
    renamed; the config is translated. `output_dir` must be new or empty. Returns output_dir.
    """
    if to not in ("autodeco", "official"):
        raise ValueError(f"convert(to={to!r}): use 'autodeco' or 'official'.")
    source, target = Path(model_dir), Path(output_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"convert: '{source}' is not a local directory.")
    raw = read_config_dict(str(source))
    official = is_official_config(raw)
    with atomic_directory(target, "convert") as staging:
        if to == "official":
            if official:
                raise ValueError(f"convert: '{source}' is already in the official format.")
            config = AutoDecoConfig.from_dict(raw)
            kind, files, index = _our_layout(source)
            _rename_weights(files, index, staging, to_official_key, OFFICIAL_HEADS_NAMES[0] if kind == "heads" else None)
            _write_json(staging / "config.json", official_config_from_autodeco(config))
        else:
            if not official:
                raise ValueError(f"convert: '{source}' is not an official AutoDeco directory (its config.json has no "
                                 f"{'/'.join(OFFICIAL_MARKERS[:3])}); it is already ours or not AutoDeco at all.")
            layout = detect_layout(str(source))
            config = autodeco_config_from_official(raw, _read_official_heads(layout))
            config.architectures = ["AutoDecoModelForCausalLM"]
            if layout.kind == "official-heads":
                _rename_weights([layout.heads_file], None, staging, to_autodeco_key, OUR_HEADS_NAME)
            else:
                if config.base_config is None:
                    raise ValueError(f"convert: the base type '{raw.get('base_model_type')}' of '{source}' needs "
                                     "remote code; convert its heads-only checkpoint instead.")
                _rename_weights(layout.shard_files, layout.index_file, staging, to_autodeco_key, None)
            (staging / "config.json").write_text(config.to_json_string(use_diff=True), encoding="utf-8")
        _copy_extras(source, staging, skip=lambda name: name in OFFICIAL_HEADS_NAMES)
    return target
