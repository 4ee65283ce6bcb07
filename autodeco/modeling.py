"""AutoDecoModelForCausalLM: any Hugging Face causal LM plus AutoDeco's temperature and top-p heads.

    >>> from autodeco import AutoDecoModelForCausalLM
    >>> model = AutoDecoModelForCausalLM.from_base("Qwen/Qwen2.5-0.5B")      # fresh heads on a frozen base
    >>> model.save_pretrained("heads/")                                      # config + heads only (~2 MB)
    >>> model = AutoDecoModelForCausalLM.from_pretrained("heads/")           # base from the recorded path
    >>> out = model.generate(**inputs)                                       # dynamic decoding, no other change

Forward returns the base's raw logits [B, L, V] and the heads' `temperature` and `top_p` [B, L] at the kept
positions. Inside `generate` (sampling, no static temperature/top_p given) the logits at the sampled
position are replaced by `dynamic_logits(raw, T, P)`, and the default generation config samples at T=1,
p=1, top_k=0, so `generate`, `pipeline("text-generation")` and streamers sample exactly the AutoDeco
distribution. `generate(temperature=..., top_p=...)` is static decoding with those values (heads bypassed);
`do_sample=False` is the base's greedy decoding.

Two directory layouts load with `from_pretrained` (and `AutoModelForCausalLM.from_pretrained` after
`import autodeco`):
  heads-only:  config.json + autodeco_heads.safetensors   (base loaded from config.base_model_name_or_path)
  merged:      config.json + model.safetensors[.index.json] holding base and heads (`merge` / `split` convert)
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save as save_safetensors_bytes
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, GenerationMixin, PreTrainedModel
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import cached_file

from autodeco.atomic import atomic_write, write_text_atomic
from autodeco.config import AutoDecoConfig
from autodeco.fused_loss import fused_forward
from autodeco.heads import TemperatureHead, TopPHead
from autodeco.sampling import (
    MIN_TEMPERATURE,
    NUCLEUS_WINDOW,
    distribution_stats,
    dynamic_logits,
    nucleus_filter,
    scale_logits,
)

HEADS_WEIGHTS_NAME = "autodeco_heads.safetensors"
MERGED_WEIGHTS_NAMES = ("model.safetensors", "model.safetensors.index.json")
HEAD_MODULES = ("temperature_head", "top_p_head")
# Rows of [rows, V] float32 the top-p head's statistics are computed over at once: bounds training memory.
STATS_CHUNK_ROWS = 256
# generate() kwargs that mean "static decoding with these values".
STATIC_SAMPLING_KWARGS = ("temperature", "top_p")
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


@dataclass
class AutoDecoCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the heads' predictions [B, L] and, with labels, the two head losses."""

    temperature: torch.FloatTensor | None = None
    top_p: torch.FloatTensor | None = None
    temperature_loss: torch.FloatTensor | None = None
    top_p_loss: torch.FloatTensor | None = None


@dataclass
class AutoDecoGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate(..., return_dict_in_generate=True)` output plus the per-token decoding values.

    temperatures, top_ps: [num_sequences, generated_length] float32, the T and P each generated token was
    sampled with (dynamic: the heads' values; static: the given constants; greedy: the heads' predictions,
    for inspection). Positions after a sequence's EOS (padding) are NaN.
    """

    temperatures: torch.FloatTensor | None = None
    top_ps: torch.FloatTensor | None = None


class _HiddenCapture:
    """Forward pre-hook on the base's output embedding: keeps its input, the final hidden state h_t."""

    def __init__(self):
        self.value: torch.Tensor | None = None

    def __call__(self, module, args):
        self.value = args[0]


class _GenerationState:
    """What one `generate` call decodes with, and the (T, P) recorded at each sampling forward."""

    def __init__(self, mode: str, use_temperature_head: bool = True, use_top_p_head: bool = True):
        self.mode = mode  # "dynamic" | "static" | "greedy"
        # The paper's ablations: a disabled head samples at T = 1 (resp. P = 1) instead of its prediction.
        self.use_temperature_head = use_temperature_head
        self.use_top_p_head = use_top_p_head
        # (sequence length after this forward, T [B], P [B]): the length tells sampled steps from prefill chunks.
        self.records: list[tuple[int, torch.Tensor, torch.Tensor]] = []


def _is_local_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or (os.sep in name and not _looks_like_hub_id(name))


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def _check_base_exists(name: str, what: str = "base model") -> None:
    if not os.path.exists(name) and (_is_local_path(name) or not _looks_like_hub_id(name)):
        raise FileNotFoundError(
            f"The {what} path '{name}' does not exist. Pass an existing local directory or a hub name "
            "such as 'Qwen/Qwen2.5-0.5B'."
        )


def _has_merged_weights(directory: Path) -> bool:
    return any((directory / name).exists() for name in MERGED_WEIGHTS_NAMES)


def autodeco_generation_config(base_generation_config: GenerationConfig | None) -> GenerationConfig:
    """The base's generation config with sampling at T=1, p=1, top_k=0: the heads do the rest."""
    config = copy.deepcopy(base_generation_config) if base_generation_config is not None else GenerationConfig()
    config.do_sample = True
    config.temperature = 1.0
    config.top_p = 1.0
    config.top_k = 0
    return config


class AutoDecoModelForCausalLM(PreTrainedModel, GenerationMixin):
    """A frozen base causal LM (`self.llm`) with a temperature head and a top-p head on its final hidden state."""

    config_class = AutoDecoConfig
    base_model_prefix = "llm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    # bf16/fp16 loading keeps the heads in float32: T and P are too sensitive for 8 mantissa bits.
    _keep_in_fp32_modules = list(HEAD_MODULES)
    _keep_in_fp32_modules_strict = list(HEAD_MODULES)

    def __init__(self, config: AutoDecoConfig, base_model: PreTrainedModel | None = None):
        super().__init__(config)
        if base_model is None:
            if config.base_config is None:
                raise ValueError(
                    "AutoDecoModelForCausalLM needs a base: pass `base_model=` or a config with `base_config` "
                    "(use AutoDecoModelForCausalLM.from_base(...) to wrap a model)."
                )
            base_model = AutoModelForCausalLM.from_config(config.base_config)
        base_hidden = base_model.config.get_text_config(decoder=True).hidden_size
        if config.hidden_size is None:
            config.hidden_size = base_hidden
        if config.hidden_size != base_hidden:
            raise ValueError(
                f"The heads expect hidden size {config.hidden_size} (config.hidden_size) but the base model "
                f"'{config.base_model_name_or_path}' has hidden size {base_hidden}. The heads were trained on a "
                "different base: load them with the base they were built on."
            )
        self.llm = base_model
        self.llm.requires_grad_(False)  # AutoDeco trains heads on a frozen base
        self.temperature_head = TemperatureHead(config.hidden_size, config.head_hidden_size, config.max_temperature)
        self.top_p_head = TopPHead(config.hidden_size, config.head_hidden_size, config.top_p_features)

        self._hidden_capture = _HiddenCapture()
        output_embeddings = base_model.get_output_embeddings()
        if output_embeddings is not None:
            output_embeddings.register_forward_pre_hook(self._hidden_capture)
        self._hidden_from_hook = output_embeddings is not None
        self._base_takes_logits_to_keep = "logits_to_keep" in inspect.signature(base_model.forward).parameters
        self._generation_state: _GenerationState | None = None
        self.post_init()
        self.generation_config = autodeco_generation_config(getattr(base_model, "generation_config", None))
        if output_embeddings is not None and output_embeddings.weight.device.type != "meta":
            self.temperature_head.to(output_embeddings.weight.device)
            self.top_p_head.to(output_embeddings.weight.device)

    # ------------------------------------------------------------------ construction and I/O

    def _init_weights(self, module):
        # Only the heads are ours to initialise; the base dispatches to its own _init_weights (and is loaded).
        if isinstance(module, (TemperatureHead, TopPHead)):
            module.reset_parameters()

    def reset_heads(self, seed: int | None = 0) -> None:
        """Fresh heads (T = 1, P = 0.95 everywhere), reproducible from `seed`."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        device = self.temperature_head.mlp[0].weight.device
        for head in (self.temperature_head, self.top_p_head):
            head.to("cpu")
            head.reset_parameters(generator)
            head.to(device)

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
    ) -> "AutoDecoModelForCausalLM":
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
            _check_base_exists(name)
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
        target = Path(save_directory)
        if target.exists() and any(target.iterdir()):
            raise FileExistsError(
                f"merge: '{target}' exists and is not empty; choose a new directory so nothing is overwritten."
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.merging."))
        try:
            self.config.architectures = [type(self).__name__]
            PreTrainedModel.save_pretrained(self, staging, max_shard_size=max_shard_size)
            if target.exists():
                target.rmdir()
            os.replace(staging, target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

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
        _check_base_exists(recorded, what="recorded base model")
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
        if not os.path.isdir(path) and (_is_local_path(path) or not _looks_like_hub_id(path)):
            raise FileNotFoundError(
                f"AutoDeco model directory '{path}' does not exist. Create one with `autodeco init --base BASE "
                "--output-dir DIR` or AutoDecoModelForCausalLM.from_base(...).save_pretrained(DIR)."
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
            model = super().from_pretrained(path, *model_args, config=config, **hub_kwargs, **kwargs)
            model._check_merged_heads_loaded(path)
            return model

        heads_file = resolve(HEADS_WEIGHTS_NAME)
        if heads_file is None:
            raise FileNotFoundError(
                f"'{path}' has config.json but neither {HEADS_WEIGHTS_NAME} (heads-only layout) nor "
                f"{MERGED_WEIGHTS_NAMES[0]} (merged layout). Was the save interrupted? Re-save the model."
            )
        base_name = kwargs.pop("base_model_name_or_path", None) or config.base_model_name_or_path
        if not base_name:
            raise ValueError(f"'{path}/config.json' records no base_model_name_or_path; pass base_model_name_or_path=.")
        _check_base_exists(base_name, what=f"base model recorded in '{path}/config.json'")
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

    # ------------------------------------------------------------------ base model plumbing

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

    def prepare_inputs_for_generation(self, *args, **kwargs):
        # The base knows its own input conventions (multimodal ids, sliding windows, ...).
        return self.llm.prepare_inputs_for_generation(*args, **kwargs)

    def create_masks_for_generate(self, **kwargs):
        from transformers.masking_utils import create_masks_for_generate

        kwargs["config"] = self.llm.config
        creator = getattr(self.llm, "create_masks_for_generate", create_masks_for_generate)
        return creator(**kwargs)

    # ------------------------------------------------------------------ forward

    def train(self, mode: bool = True):
        """Train mode for the heads only: the frozen base always runs as at inference (no dropout)."""
        super().train(mode)
        self.llm.eval()
        return self

    def predict_decoding(self, hidden: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Heads on hidden [B, L, H] and raw logits [B, L, V] -> (temperature [B, L], top_p [B, L]) float32."""
        temperature, top_p, _ = self._predict_decoding(hidden, logits, keep_scaled=False)
        return temperature, top_p

    def _predict_decoding(self, hidden: torch.Tensor, logits: torch.Tensor, keep_scaled: bool):
        """predict_decoding, plus, with `keep_scaled` and one position per row, the (scaled logits [B, V],
        log_z [B, 1], top-window values [B, k]) its statistics computed, for the nucleus to reuse."""
        # An autocast context (Trainer bf16=True) must not run the heads' matmuls in bf16.
        with torch.autocast(device_type=hidden.device.type, enabled=False):
            return self._predict_decoding_float32(hidden, logits, keep_scaled)

    def _predict_decoding_float32(self, hidden, logits, keep_scaled):
        temperature = self.temperature_head(hidden)
        stats = scaled = None
        keep_scaled = keep_scaled and logits.shape[1] == 1 and logits.shape[0] <= STATS_CHUNK_ROWS
        if self.config.top_p_features and keep_scaled:
            with torch.no_grad():
                # One position per sequence, exactly the scaled logits the nucleus will filter: keep them.
                flat_scaled = scale_logits(logits[:, 0], temperature.detach()[:, 0])
                stats, log_z, top_values = distribution_stats(flat_scaled, window=NUCLEUS_WINDOW)
                scaled = (flat_scaled, log_z, top_values)
                stats = stats[:, None]
        elif self.config.top_p_features:
            with torch.no_grad():  # the statistics are features of a detached T: no gradient to carry
                flat_logits = logits.reshape(-1, logits.shape[-1])
                flat_t = temperature.detach().reshape(-1)
                stats = torch.cat(
                    [
                        distribution_stats(scale_logits(flat_logits[i : i + STATS_CHUNK_ROWS], flat_t[i : i + STATS_CHUNK_ROWS]))
                        for i in range(0, flat_logits.shape[0], STATS_CHUNK_ROWS)
                    ]
                ).reshape(*temperature.shape, -1)
        top_p = self.top_p_head(hidden, temperature, stats)
        return temperature, top_p, scaled

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        past_key_values=None,
        fused_loss: bool = False,
        **kwargs,
    ) -> AutoDecoCausalLMOutput:
        """Base forward plus heads. Shapes: input_ids [B, S]; logits [B, K, V]; temperature, top_p [B, K], where K
        is the number of kept positions (`logits_to_keep`, 0 = all). `past_key_values` is accepted as the older
        name of `cache`. With `labels` [B, S] the losses are computed (labels shifted as for any causal LM).
        `fused_loss=True` (with labels; what AutoDecoTrainer passes in training) computes them chunk by chunk from
        the final hidden states (autodeco/fused_loss.py): logits then holds the last position only [B, 1, V]."""
        if past_key_values is not None:
            if cache is not None:
                raise ValueError("Pass either `cache` or `past_key_values` (its older name), not both.")
            cache = past_key_values
        state = self._generation_state
        past_length = cache.get_seq_length() if cache is not None and state is not None else 0

        base_kwargs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        if cache is not None:
            base_kwargs["cache"] = cache
        if self._base_takes_logits_to_keep:
            base_kwargs["logits_to_keep"] = logits_to_keep
        if not self._hidden_from_hook:
            base_kwargs["output_hidden_states"] = True
        if fused_loss and labels is not None and state is None:
            # Issue 16 hook: train without the [B, S, V] logits (autodeco/fused_loss.py).
            return self._fused_forward(base_kwargs, labels, logits_to_keep, kwargs)
        self._hidden_capture.value = None
        try:
            outputs = self.llm(**base_kwargs)
            hidden = self._hidden_capture.value if self._hidden_from_hook else outputs.hidden_states[-1]
        finally:
            self._hidden_capture.value = None
        logits = outputs.logits
        if hidden is None:
            raise RuntimeError(
                f"{type(self.llm).__name__} computed its logits without calling its output embedding module, so "
                "AutoDeco cannot see the final hidden state. Such bases are not supported."
            )
        if isinstance(logits_to_keep, int) and logits_to_keep > 0 and not self._base_takes_logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        if hidden.shape[:-1] != logits.shape[:-1]:
            hidden = hidden[:, -logits.shape[1] :]

        temperature = top_p = None
        if state is None or state.mode != "static":
            # The nucleus can reuse the statistics' scaled logits only when it samples at the head's own T
            # (the temperature-head ablation samples at T = 1).
            keep_scaled = state is not None and state.mode == "dynamic" and state.use_temperature_head
            temperature, top_p, scaled = self._predict_decoding(hidden, logits, keep_scaled)
        if state is not None and temperature is not None:
            logits = self._decode_step(state, logits, temperature, top_p, scaled, past_length, input_ids, inputs_embeds)

        loss = temperature_loss = top_p_loss = None
        if labels is not None:
            loss, temperature_loss, top_p_loss = self._losses(logits, temperature, top_p, labels, logits_to_keep)
        return AutoDecoCausalLMOutput(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states if kwargs.get("output_hidden_states") else None,
            attentions=outputs.attentions,
            temperature=temperature,
            top_p=top_p,
            temperature_loss=temperature_loss,
            top_p_loss=top_p_loss,
        )

    def _fused_forward(self, base_kwargs, labels, logits_to_keep, kwargs) -> AutoDecoCausalLMOutput:
        """forward(labels=..., fused_loss=True): see autodeco/fused_loss.py (issue 16 hook)."""
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("Training with `labels` needs logits at every position: leave logits_to_keep=0.")
        base_kwargs = {k: v for k, v in base_kwargs.items() if k != "logits_to_keep"}
        outputs, heads = fused_forward(self, base_kwargs, labels, chunk_rows=getattr(self, "fused_loss_chunk_rows", None))
        return AutoDecoCausalLMOutput(
            loss=heads.loss, logits=outputs.logits, cache=outputs.cache, hidden_states=None,
            attentions=outputs.attentions, temperature=heads.temperature, top_p=heads.top_p,
            temperature_loss=heads.temperature_loss, top_p_loss=heads.top_p_loss,
        )

    def _decode_step(self, state, logits, temperature, top_p, scaled, past_length, input_ids, inputs_embeds):
        """Record the last position's (T, P) and, when sampling dynamically, return its dynamic logits."""
        t_last, p_last = temperature[:, -1].detach(), top_p[:, -1].detach()
        if not bool(torch.isfinite(t_last).all() & torch.isfinite(p_last).all()):
            raise FloatingPointError(
                f"AutoDeco heads produced non-finite values (temperature {t_last.tolist()}, top_p {p_last.tolist()}). "
                "The base's hidden states are likely non-finite (fp16 overflow? try bf16 or float32) or the heads "
                "file is corrupted."
            )
        if not state.use_temperature_head:
            t_last = torch.ones_like(t_last)
        if not state.use_top_p_head:
            p_last = torch.ones_like(p_last)
        seq_len = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        state.records.append((past_length + seq_len, t_last.float(), p_last.float()))
        if state.mode != "dynamic":
            return logits
        # Sigmoid can saturate to exactly 0: a zero T is the greedy limit, a zero P keeps the top token.
        p_last = p_last.clamp_min(torch.finfo(torch.float32).tiny)
        if scaled is not None:  # the statistics scaled these logits by the same (clamped) T
            flat_scaled, log_z, top_values = scaled
            decoded = nucleus_filter(flat_scaled, p_last, log_z=log_z, top_values=top_values)
        else:
            decoded = dynamic_logits(logits[:, -1], t_last.clamp_min(MIN_TEMPERATURE), p_last, validate=False)
        if logits.shape[1] == 1:
            return decoded[:, None]
        logits = logits.float()  # the scaled logits would lose precision in bf16
        logits[:, -1] = decoded
        return logits

    def _losses(self, logits, temperature, top_p, labels, logits_to_keep):
        from autodeco import losses

        if temperature is None:
            raise ValueError("labels were given during static-decoding generation; call forward outside generate().")
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("Training with `labels` needs logits at every position: leave logits_to_keep=0.")
        shift_labels = labels[:, 1:].to(logits.device)
        shift_logits, shift_t, shift_p = logits[:, :-1], temperature[:, :-1], top_p[:, :-1]
        temperature_loss = top_p_loss = None
        if self.config.train_temperature:
            temperature_loss = losses.temperature_loss(
                shift_logits,
                shift_t,
                shift_labels,
                easy_token_mask_ratio=self.config.easy_token_mask_ratio,
                dft=self.config.dft,
            )
        if self.config.train_top_p:
            top_p_loss = losses.soft_top_p_loss(
                shift_logits, shift_t, shift_p, shift_labels, alpha=self.config.soft_top_p_alpha, dft=self.config.dft
            )
        enabled = [loss for loss in (temperature_loss, top_p_loss) if loss is not None]
        total = sum(enabled[1:], enabled[0]) if enabled else temperature.new_zeros(())
        return total, temperature_loss, top_p_loss

    # ------------------------------------------------------------------ generation

    def _decoding_mode(self, generation_config: GenerationConfig | None, kwargs: dict) -> str:
        config = generation_config if generation_config is not None else self.generation_config
        if not kwargs.get("do_sample", config.do_sample):
            return "greedy"
        if any(k in kwargs and kwargs[k] is not None for k in STATIC_SAMPLING_KWARGS):
            return "static"
        if generation_config is not None and (
            generation_config.temperature not in (None, 1.0) or generation_config.top_p not in (None, 1.0)
        ):
            return "static"
        return "dynamic"

    @torch.no_grad()
    def generate(
        self,
        inputs: torch.Tensor | None = None,
        generation_config: GenerationConfig | None = None,
        *,
        use_temperature_head: bool = True,
        use_top_p_head: bool = True,
        **kwargs,
    ):
        """`GenerationMixin.generate` with AutoDeco's dynamic decoding by default.

        - default (sampling, no temperature/top_p given): each token is sampled from dynamic_logits(z, T, P)
          with the heads' T and P;
        - `temperature=` and/or `top_p=` given (or a generation_config with T != 1 or P != 1): static decoding
          with exactly those values, heads bypassed (never applied twice);
        - `do_sample=False`: greedy (beam search with num_beams > 1) on the raw logits, as the base does.

        `use_temperature_head=False` samples dynamically at T = 1 with the heads' P, `use_top_p_head=False` at
        P = 1 with the heads' T: the paper's ablations.

        With `return_dict_in_generate=True` the output also holds `temperatures` and `top_ps`
        [num_sequences, generated_length] (see AutoDecoGenerateOutput).
        """
        mode = self._decoding_mode(generation_config, kwargs)
        if mode == "static":
            self._validate_static_values(generation_config, kwargs)
            if not (use_temperature_head and use_top_p_head):
                raise ValueError(
                    "use_temperature_head/use_top_p_head select which heads drive dynamic decoding; with a static "
                    "temperature/top_p the heads are not used at all. Pass one or the other."
                )
        state = _GenerationState(mode, use_temperature_head, use_top_p_head)
        previous, self._generation_state = self._generation_state, state
        try:
            out = super().generate(inputs=inputs, generation_config=generation_config, **kwargs)
        finally:
            self._generation_state = previous
        if isinstance(out, GenerateDecoderOnlyOutput):
            prompt = inputs if inputs is not None else kwargs.get("input_ids")
            out = self._with_traces(out, state, prompt, generation_config, kwargs)
        return out

    def _validate_static_values(self, generation_config, kwargs) -> None:
        config = generation_config if generation_config is not None else self.generation_config
        temperature = kwargs.get("temperature", config.temperature)
        top_p = kwargs.get("top_p", config.top_p)
        if temperature is not None and not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(
                f"generate(temperature={temperature!r}): temperature must be a number > 0. For greedy decoding "
                "pass do_sample=False; to let the heads choose, pass no temperature at all."
            )
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ValueError(f"generate(top_p={top_p!r}): top_p must be in (0, 1]; 1.0 keeps every token.")

    def _with_traces(self, out, state, prompt, generation_config, kwargs) -> AutoDecoGenerateOutput:
        sequences = out.sequences
        prompt_length = prompt.shape[-1] if prompt is not None else kwargs["inputs_embeds"].shape[1]
        generated = sequences[:, prompt_length:] if prompt is not None else sequences
        n_seq, gen_len = generated.shape
        config = generation_config if generation_config is not None else self.generation_config
        if state.mode == "static":
            t_value = kwargs.get("temperature", config.temperature) or 1.0
            p_value = kwargs.get("top_p", config.top_p) or 1.0
            temperatures = torch.full((n_seq, gen_len), float(t_value), device=sequences.device)
            top_ps = torch.full((n_seq, gen_len), float(p_value), device=sequences.device)
        else:
            # Prefill chunks end before the prompt does; steps past the end were undone by generate.
            sampled = [(t, p) for length, t, p in state.records if length >= prompt_length][:gen_len]
            if len(sampled) != gen_len or (sampled and sampled[0][0].shape[0] != n_seq):
                raise RuntimeError(
                    f"AutoDeco recorded {len(sampled)} sampling steps for {gen_len} generated tokens; this generation "
                    "mode (assisted or beam decoding?) does not support traces. Call generate without "
                    "return_dict_in_generate."
                )
            temperatures = torch.stack([t for t, _ in sampled], dim=1) if sampled else sequences.new_zeros((n_seq, 0), dtype=torch.float32)
            top_ps = torch.stack([p for _, p in sampled], dim=1) if sampled else temperatures.clone()
        eos = kwargs.get("eos_token_id", config.eos_token_id)
        if eos is not None and gen_len > 0:
            eos_ids = torch.as_tensor(eos if isinstance(eos, (list, tuple)) else [eos], device=generated.device)
            is_eos = torch.isin(generated, eos_ids).long()
            finished_before = (is_eos.cumsum(dim=1) - is_eos) > 0  # [n_seq, gen_len] padding after an EOS
            temperatures = temperatures.masked_fill(finished_before.to(temperatures.device), float("nan"))
            top_ps = top_ps.masked_fill(finished_before.to(top_ps.device), float("nan"))
        fields = {k: v for k, v in out.items()}
        return AutoDecoGenerateOutput(**fields, temperatures=temperatures, top_ps=top_ps)
