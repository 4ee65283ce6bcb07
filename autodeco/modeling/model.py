"""AutoDecoModelForCausalLM: any Hugging Face causal LM plus AutoDeco's temperature and top-p heads.

    >>> from autodeco import AutoDecoModelForCausalLM
    >>> model = AutoDecoModelForCausalLM.from_base("Qwen/Qwen2.5-0.5B")      # fresh heads on a frozen base
    >>> model.save_pretrained("heads/")                                      # config + heads only (~2 MB)
    >>> out = model.generate(**inputs)                                       # dynamic decoding, no other change

Forward returns the base's raw logits [B, L, V] and the heads' `temperature` and `top_p` [B, L] at the kept
positions (with labels, also the two head losses). This module holds construction, the heads and forward;
saving/loading is in modeling/io.py, generation in modeling/generation.py. See docs/training.md and
docs/engines.md.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from autodeco import official
from autodeco.config import AutoDecoConfig
from autodeco.features import distribution_stats, scale_logits
from autodeco.heads import TemperatureHead, TopPHead
from autodeco.losses import soft_top_p_loss, temperature_loss
from autodeco.modeling.fused_loss import fused_forward
from autodeco.modeling.generation import AutoDecoGenerationMixin, _GenerationState, autodeco_generation_config
from autodeco.modeling.io import HEAD_MODULES, AutoDecoIOMixin
from autodeco.sampling import NUCLEUS_WINDOW

# transformers 5.20 renamed the cache argument and output field `past_key_values` -> `cache`; 5.16.1 - 5.19 (what
# vLLM 0.32 pins) still use the old name. The base is called, and our output is built, with the installed name.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

__all__ = ["AutoDecoCausalLMOutput", "AutoDecoModelForCausalLM", "STATS_CHUNK_ROWS"]

# Rows of [rows, V] float32 the top-p head's statistics are computed over at once: bounds training memory.
STATS_CHUNK_ROWS = 256


@dataclass
class AutoDecoCausalLMOutput(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the heads' predictions [B, L] and, with labels, the two head losses."""

    temperature: torch.FloatTensor | None = None
    top_p: torch.FloatTensor | None = None
    temperature_loss: torch.FloatTensor | None = None
    top_p_loss: torch.FloatTensor | None = None


class _HiddenCapture:
    """Forward pre-hook on the base's output embedding: keeps its input, the final hidden state h_t."""

    def __init__(self):
        self.value: torch.Tensor | None = None

    def __call__(self, module, args):
        self.value = args[0]


class AutoDecoModelForCausalLM(AutoDecoIOMixin, AutoDecoGenerationMixin, PreTrainedModel, GenerationMixin):
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

    # ------------------------------------------------------------------ construction (I/O: modeling/io.py)

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

    # ------------------------------------------------------------------ base model plumbing

    def get_input_embeddings(self):
        return self.llm.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.llm.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.llm.get_output_embeddings()

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
        if self.config.top_p_features and self.config.feature_arithmetic == "official":
            # Heads trained by the official code see its features, at inference and in training (issue 12).
            with torch.no_grad():
                stats = official.official_stats_chunked(logits, temperature.detach())
        elif self.config.top_p_features and keep_scaled:
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
        the final hidden states (modeling/fused_loss.py): logits then holds the last position only [B, 1, V]."""
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
            base_kwargs[CACHE_FIELD] = cache
        if self._base_takes_logits_to_keep:
            base_kwargs["logits_to_keep"] = logits_to_keep
        if not self._hidden_from_hook:
            base_kwargs["output_hidden_states"] = True
        if fused_loss and labels is not None and state is None:
            return self._fused_forward(base_kwargs, labels, logits_to_keep)
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
            **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            hidden_states=outputs.hidden_states if kwargs.get("output_hidden_states") else None,
            attentions=outputs.attentions,
            temperature=temperature,
            top_p=top_p,
            temperature_loss=temperature_loss,
            top_p_loss=top_p_loss,
        )

    def _fused_forward(self, base_kwargs: dict, labels: torch.Tensor, logits_to_keep) -> AutoDecoCausalLMOutput:
        """forward(labels=..., fused_loss=True): the losses without the [B, S, V] logits (modeling/fused_loss.py)."""
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("Training with `labels` needs logits at every position: leave logits_to_keep=0.")
        base_kwargs = {k: v for k, v in base_kwargs.items() if k != "logits_to_keep"}
        outputs, heads = fused_forward(self, base_kwargs, labels, chunk_rows=getattr(self, "fused_loss_chunk_rows", None))
        return AutoDecoCausalLMOutput(
            loss=heads.loss, logits=outputs.logits, **{CACHE_FIELD: getattr(outputs, CACHE_FIELD)},
            hidden_states=None, attentions=outputs.attentions, temperature=heads.temperature, top_p=heads.top_p,
            temperature_loss=heads.temperature_loss, top_p_loss=heads.top_p_loss,
        )

    def _losses(self, logits, temperature, top_p, labels, logits_to_keep):
        if temperature is None:
            raise ValueError("labels were given during static-decoding generation; call forward outside generate().")
        if not (isinstance(logits_to_keep, int) and logits_to_keep == 0):
            raise ValueError("Training with `labels` needs logits at every position: leave logits_to_keep=0.")
        shift_labels = labels[:, 1:].to(logits.device)
        shift_logits, shift_t, shift_p = logits[:, :-1], temperature[:, :-1], top_p[:, :-1]
        t_loss = p_loss = None
        if self.config.train_temperature:
            t_loss = temperature_loss(
                shift_logits,
                shift_t,
                shift_labels,
                easy_token_mask_ratio=self.config.easy_token_mask_ratio,
                dft=self.config.dft,
            )
        if self.config.train_top_p:
            p_loss = soft_top_p_loss(
                shift_logits, shift_t, shift_p, shift_labels, alpha=self.config.soft_top_p_alpha, dft=self.config.dft,
                official_log=self.config.soft_top_p_official_log,
            )
        enabled = [loss for loss in (t_loss, p_loss) if loss is not None]
        total = sum(enabled[1:], enabled[0]) if enabled else temperature.new_zeros(())
        return total, t_loss, p_loss
