"""Generation with AutoDeco's dynamic decoding: the decoding mode of a `generate` call, its per-step state,
the substitution of dynamic logits at each sampled position, and the per-token T/P traces.

    >>> out = model.generate(**inputs, return_dict_in_generate=True)   # dynamic: the heads' T and P each step
    >>> out.temperatures, out.top_ps                                    # [num_sequences, generated_length]

Modes: dynamic (sampling, no static temperature/top_p given), static (temperature=/top_p= given: heads
bypassed), greedy (do_sample=False). The default generation config samples at T=1, p=1, top_k=0, so
`generate`, pipelines and streamers sample exactly the AutoDeco distribution. `AutoDecoGenerationMixin` holds
these methods for AutoDecoModelForCausalLM. See docs/engines.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers import GenerationConfig
from transformers.generation.utils import GenerateDecoderOnlyOutput
from transformers.masking_utils import create_masks_for_generate

from autodeco.features import MIN_TEMPERATURE
from autodeco.sampling import dynamic_logits, nucleus_filter

__all__ = [
    "NonFiniteHeadsError",
    "AutoDecoGenerateOutput",
    "AutoDecoGenerationMixin",
    "STATIC_SAMPLING_KWARGS",
    "autodeco_generation_config",
]

# generate() kwargs that mean "static decoding with these values".
STATIC_SAMPLING_KWARGS = ("temperature", "top_p")


class NonFiniteHeadsError(FloatingPointError, ValueError):
    """The heads produced NaN/inf T or P while generating: a problem of the model or its inputs (non-finite base
    hidden states, corrupt weights), not of the code. A ValueError too, so the CLI reports it in one line (exit 2);
    a FloatingPointError, as it always was, for callers that catch that."""


@dataclass
class AutoDecoGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate(..., return_dict_in_generate=True)` output plus the per-token decoding values.

    temperatures, top_ps: [num_sequences, generated_length] float32, the T and P each generated token was
    sampled with (dynamic: the heads' values; static: the given constants; greedy: the heads' predictions,
    for inspection). Positions after a sequence's EOS (padding) are NaN.
    """

    temperatures: torch.FloatTensor | None = None
    top_ps: torch.FloatTensor | None = None


class _GenerationState:
    """What one `generate` call decodes with, and the (T, P) recorded at each sampling forward."""

    def __init__(self, mode: str, use_temperature_head: bool = True, use_top_p_head: bool = True):
        self.mode = mode  # "dynamic" | "static" | "greedy"
        # The paper's ablations: a disabled head samples at T = 1 (resp. P = 1) instead of its prediction.
        self.use_temperature_head = use_temperature_head
        self.use_top_p_head = use_top_p_head
        # (sequence length after this forward, T [B], P [B]): the length tells sampled steps from prefill chunks.
        self.records: list[tuple[int, torch.Tensor, torch.Tensor]] = []


def autodeco_generation_config(base_generation_config: GenerationConfig | None) -> GenerationConfig:
    """The base's generation config with sampling at T=1, p=1, top_k=0: the heads do the rest."""
    config = copy.deepcopy(base_generation_config) if base_generation_config is not None else GenerationConfig()
    config.do_sample = True
    config.temperature = 1.0
    config.top_p = 1.0
    config.top_k = 0
    return config


class AutoDecoGenerationMixin:
    """generate() with dynamic decoding, its traces, and the per-step logits substitution forward() calls."""

    def prepare_inputs_for_generation(self, *args, **kwargs):
        # The base knows its own input conventions (multimodal ids, sliding windows, ...).
        return self.llm.prepare_inputs_for_generation(*args, **kwargs)

    def create_masks_for_generate(self, **kwargs):
        kwargs["config"] = self.llm.config
        creator = getattr(self.llm, "create_masks_for_generate", create_masks_for_generate)
        return creator(**kwargs)

    def _decode_step(self, state, logits, temperature, top_p, scaled, past_length, input_ids, inputs_embeds):
        """Record the last position's (T, P) and, when sampling dynamically, return its dynamic logits."""
        t_last, p_last = temperature[:, -1].detach(), top_p[:, -1].detach()
        if not bool(torch.isfinite(t_last).all() & torch.isfinite(p_last).all()):
            raise NonFiniteHeadsError(
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
