"""AutoDecoForCausalLM: the vLLM model for an AutoDeco directory, the base built by vLLM plus the two heads.

    hidden [N, H] (the sampled rows' final normed hidden states, as vLLM passes them to compute_logits)
      -> z = base.compute_logits(hidden)   [N, V]   (the base's own soft-capping / scaling included)
      -> T, P = heads(hidden, z)           [N]
      -> dynamic_logits(z, T, P)           [N, V]   logits / T, -inf outside the top-P nucleus

vLLM's sampler then samples at the request's parameters, so a request at T=1, top_p=1, top_k=0 (the default an
AutoDeco directory's generation_config.json sets) samples the AutoDeco distribution exactly as `generate()`
does, and its raw logprobs are that distribution's. Weights: `llm.*` go to the base's own loader, the heads'
tensors to float32 heads. A heads-only directory loads the base from its recorded local directory.

Config overrides read at load (vLLM `hf_overrides`): `autodeco_decoding` = "dynamic" (default) | "base" (heads
bypassed: the base's raw logits, for static methods) and `use_temperature_head` / `use_top_p_head` (False: T = 1
resp. P = 1, the paper's single-head ablations). See docs/engines.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator
from vllm.model_executor.models import interfaces
from vllm.model_executor.models.utils import AutoWeightsLoader, init_vllm_registered_model, maybe_prefix

from autodeco.heads import TemperatureHead, TopPHead
from autodeco.modeling import HEAD_MODULES
from autodeco.sampling import MIN_TEMPERATURE, NUCLEUS_WINDOW, distribution_stats, nucleus_filter, scale_logits
from autodeco.vllm.layout import check_model_dir, merge_message, supported_architectures, unsupported_message

DECODING_MODES = ("dynamic", "base")


def predict_and_filter(temperature_head, top_p_head, top_p_features: bool, hidden: torch.Tensor,
                       logits: torch.Tensor, use_temperature_head: bool = True, use_top_p_head: bool = True):
    """hidden [N, H], raw logits [N, V] -> (dynamic logits [N, V] float32, T [N], P [N]).

    The same computation as AutoDecoModelForCausalLM's sampling step: the heads in float32, the top-p head's
    statistics of softmax(z / T), the nucleus reusing those scaled logits; a disabled head samples at 1."""
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        temperature = temperature_head(hidden)  # [N]
        scaled = scale_logits(logits, temperature)  # [N, V] float32, T clamped at MIN_TEMPERATURE
        stats, log_z, top_values = distribution_stats(scaled, window=NUCLEUS_WINDOW)
        top_p = top_p_head(hidden, temperature, stats if top_p_features else None)
    if not bool(torch.isfinite(temperature).all() & torch.isfinite(top_p).all()):
        raise FloatingPointError(
            "AutoDeco heads produced non-finite temperature/top_p in vLLM: the base's hidden states are likely "
            "non-finite (fp16 overflow? serve with --dtype bfloat16 or float32) or the heads are corrupted."
        )
    p = top_p.clamp_min(torch.finfo(torch.float32).tiny) if use_top_p_head else torch.ones_like(top_p)
    if use_temperature_head:
        out = nucleus_filter(scaled, p, log_z=log_z, top_values=top_values)
    else:
        out = nucleus_filter(logits.float(), p)  # T = 1: the raw logits' nucleus
        temperature = torch.ones_like(temperature)
    return out, temperature.clamp_min(MIN_TEMPERATURE), p


def load_heads(model: nn.Module, state: dict[str, torch.Tensor]) -> int:
    """Copy head tensors, keyed as AutoDecoModelForCausalLM.heads_state_dict() ('temperature_head.mlp.0.weight',
    ...), into a loaded AutoDecoForCausalLM in place; returns how many. Runs in a vLLM worker through
    `LLM.apply_model` (VLLMEngine.update_heads), so a trainer's rollouts sample from its current heads."""
    if not isinstance(model, AutoDecoForCausalLM):
        raise ValueError(f"load_heads: the vLLM model is a {type(model).__name__}, not AutoDecoForCausalLM; load an "
                         "AutoDeco directory (not a plain base) to update its heads.")
    targets = {f"{name}.{key}": tensor for name in HEAD_MODULES
               for key, tensor in getattr(model, name).state_dict().items()}
    if set(state) != set(targets):
        raise ValueError(f"load_heads: the tensors {sorted(set(state) ^ set(targets))[:4]} do not match the heads "
                         "of this model (another head architecture?); pass heads_state_dict() of the same config.")
    with torch.no_grad():
        for key, value in state.items():
            targets[key].copy_(value.to(device=targets[key].device, dtype=targets[key].dtype))
    return len(state)


class AutoDecoForCausalLM(nn.Module):
    """vLLM model for `architectures: ["AutoDecoModelForCausalLM"]`: any supported base plus AutoDeco's heads.

    It is a wrapper, not a subclass: vLLM's optional per-model paths it does not implement stay off. In particular
    it has no `compute_logits_local`, so Model Runner V2's batch-sharded sampling (which would bypass
    compute_logits) is disabled for it with a warning, and no pipeline parallelism (not `SupportsPP`).
    """

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config  # the AutoDecoConfig
        base_config = getattr(config, "base_config", None)
        if base_config is None:
            raise ValueError("This AutoDeco config.json records no base_config; re-save it with autodeco >= 0.1.")
        arch = (base_config.architectures or [None])[0]
        if arch not in supported_architectures():
            raise ValueError(unsupported_message(arch))
        self.config = config
        self.decoding = getattr(config, "autodeco_decoding", "dynamic")
        if self.decoding not in DECODING_MODES:
            raise ValueError(f"autodeco_decoding={self.decoding!r}: use one of {DECODING_MODES}.")
        self.use_temperature_head = bool(getattr(config, "use_temperature_head", True))
        self.use_top_p_head = bool(getattr(config, "use_top_p_head", True))

        self.llm = init_vllm_registered_model(
            vllm_config, hf_config=base_config, prefix=maybe_prefix(prefix, "llm"), architectures=[arch]
        )
        for check, why in ((interfaces.is_hybrid, "it is a hybrid (state-space) model"),
                           (interfaces.is_attention_free, "it is attention-free"),
                           (interfaces.has_inner_state, "it keeps an inner recurrent state"),
                           (interfaces.supports_multimodal, "it is multimodal")):
            if check(self.llm):
                raise ValueError(unsupported_message(arch, why))
        hidden = config.hidden_size
        # The heads stay float32 whatever the serving dtype (vLLM builds modules under its default dtype).
        self.temperature_head = TemperatureHead(hidden, config.head_hidden_size, config.max_temperature).float()
        self.top_p_head = TopPHead(hidden, config.head_hidden_size, config.top_p_features).float()
        self._base_dir = self._heads_only_base(vllm_config.model_config.model)
        if hasattr(self.llm, "make_empty_intermediate_tensors"):
            self.make_empty_intermediate_tensors = self.llm.make_empty_intermediate_tensors

    def _heads_only_base(self, model_path: str) -> Path | None:
        """The recorded local base directory when `model_path` holds the heads-only layout, else None."""
        if not Path(model_path).is_dir():  # a hub name vLLM resolved itself: the merged layout
            return None
        info = check_model_dir(model_path)  # raises the `autodeco merge` message for an unreachable base
        return info.base_dir if info.layout == "heads-only" else None

    # ------------------------------------------------------------------ what vLLM calls

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.llm.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        return self.llm(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = self.llm.compute_logits(hidden_states)
        if logits is None or self.decoding == "base":  # not the last pipeline rank / heads bypassed
            return logits
        out, _, _ = predict_and_filter(
            self.temperature_head, self.top_p_head, self.config.top_p_features, hidden_states, logits,
            self.use_temperature_head, self.use_top_p_head,
        )
        return out

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded = AutoWeightsLoader(self).load_weights(weights)
        if self._base_dir is not None and not any(name.startswith("llm.") for name in loaded):
            files = sorted(str(f) for f in self._base_dir.glob("*.safetensors"))
            if not files:
                raise ValueError(merge_message(self._base_dir, "its recorded base has no *.safetensors weights"))
            base_loaded = self.llm.load_weights(safetensors_weights_iterator(files, use_tqdm_on_load=False))
            loaded |= {f"llm.{name}" for name in base_loaded}
        missing = [m for m in HEAD_MODULES if not any(name.startswith(f"{m}.") for name in loaded)]
        if missing:
            raise ValueError(
                f"The AutoDeco weights lack the {missing} tensors: not an AutoDeco merge or heads file (or corrupted). "
                "Recreate it with `autodeco merge`."
            )
        return loaded
