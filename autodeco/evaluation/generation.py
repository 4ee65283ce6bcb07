"""Generation for the evaluation: requests in, completions (text, token ids, per-token T and P) out.

    from autodeco.evaluation.generation import GenerationRequest, generate_completions
    out = generate_completions(model, tokenizer, [GenerationRequest(prompt, 16, seed=123)],
                               generation_kwargs={}, max_new_tokens=512, batch_size=32)   # out[0]: 16 Completions

A seeded request is sampled after `torch.manual_seed(seed)`; unseeded ones (greedy) share left-padded calls;
packed requests (same `group`) share one seed and calls; CUDA out-of-memory halves the batch. `Engine` is the
interface another backend (vLLM) implements; `TransformersEngine` is the transformers one. See
docs/evaluation.md.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Protocol, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from autodeco.evaluation.methods import Method
from autodeco.evaluation.methods import generation_kwargs as method_generation_kwargs
from autodeco.validation import check_prompt_fits, context_length

__all__ = [
    "GenerationRequest",
    "Completion",
    "Engine",
    "TransformersEngine",
    "engine_name",
    "sequences_per_call",
    "encode_prompt",
    "check_prompts_fit",
    "model_context_length",
    "generate_completions",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_BATCH_SIZE",
]

DEFAULT_MAX_NEW_TOKENS = 2048
DEFAULT_BATCH_SIZE = 32


@dataclass
class GenerationRequest:
    """`num_samples` completions of `prompt`; `seed` seeds torch before sampling (None: deterministic decoding).

    `group` (optional, any hashable): consecutive seeded requests with the same non-None group, seed and num_samples
    are sampled together after one `torch.manual_seed(seed)` (packed sampling; see generate_completions).
    """

    prompt: str
    num_samples: int
    seed: int | None = None
    group: object = None


@dataclass
class Completion:
    """One generated sequence, cut after its first EOS.

    token_ids: the generated ids (EOS included); temperatures / top_ps: the value each of those tokens was sampled
    with (None when the model reports none, e.g. a plain base model).
    """

    text: str
    token_ids: list[int]
    temperatures: list[float] | None = None
    top_ps: list[float] | None = None
    finished: bool = True  # ended with EOS (False: cut off at max_new_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a formatted prompt, as autodeco.data tokenises training prompts but without a doubled BOS.

    The tokenizer's own special tokens are added (a plain-text prompt gets its BOS), any it appends after the text
    (an EOS would tell the model the document ended) is dropped, and a BOS the chat template already wrote is not
    doubled.
    """
    ids = list(tokenizer(text)["input_ids"])
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    for start in range(len(ids) - len(plain) + 1):
        if ids[start : start + len(plain)] == plain:
            ids = ids[: start + len(plain)]
            break
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    if not ids:
        raise ValueError(f"The prompt {text[:60]!r} encodes to no tokens; a prompt needs at least one token.")
    return ids


def model_context_length(model) -> int | None:
    """The context length the (base) model's config declares (max_position_embeddings, ...), or None."""
    config = getattr(getattr(model, "llm", None), "config", None) or getattr(model, "config", None)
    return context_length(config.to_dict()) if hasattr(config, "to_dict") else None


def check_prompts_fit(model, tokenizer, prompts) -> None:
    """Refuse, before any generation, a prompt with no room in the model's context: `prompts` yields (source,
    problem id, prompt text). The error names the problem and both lengths; a problem is never truncated (a
    truncated problem is a different problem). Training rows are truncated instead (docs/training.md)."""
    context = model_context_length(model)
    if context is None:
        return
    for source, problem_id, text in prompts:
        check_prompt_fits(problem_id, len(encode_prompt(tokenizer, text)), context, source=source)


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def _pad_id(tokenizer, eos_ids: list[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if eos_ids:
        return eos_ids[0]
    return 0


class _TemperatureRecorder(LogitsProcessor):
    """Wraps a processor with a `temperatures(scores)` method (EDT) and records the T it applies at each step."""

    def __init__(self, inner):
        self.inner = inner
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.steps.append(self.inner.temperatures(scores).detach().float().cpu())
        return self.inner(input_ids, scores)


def _with_recorders(kwargs: dict) -> tuple[dict, list[_TemperatureRecorder]]:
    processors = kwargs.get("logits_processor")
    if not processors:
        return kwargs, []
    recorders, wrapped = [], LogitsProcessorList()
    for proc in processors:
        if hasattr(proc, "temperatures"):
            proc = _TemperatureRecorder(proc)
            recorders.append(proc)
        wrapped.append(proc)
    return {**kwargs, "logits_processor": wrapped}, recorders


def _generate_batch(model, tokenizer, prompts: list[list[int]], num_return_sequences: int, kwargs: dict,
                    max_new_tokens: int) -> list[Completion]:
    """One `generate` call over left-padded prompts; returns len(prompts) * num_return_sequences completions."""
    eos_ids = _eos_ids(model, tokenizer)
    pad = _pad_id(tokenizer, eos_ids)
    width = max(len(p) for p in prompts)
    device = model.device
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kwargs, recorders = _with_recorders(kwargs)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_return_sequences,
        return_dict_in_generate=True,
        pad_token_id=pad,
        **kwargs,
    )
    generated = out.sequences[:, width:].cpu()
    temperatures = getattr(out, "temperatures", None)
    top_ps = getattr(out, "top_ps", None)
    if recorders and generated.shape[1]:
        # EDT: the temperature the processor applied, not the static T=1 the traces show.
        temperatures = torch.stack(recorders[-1].steps[: generated.shape[1]], dim=1)
    completions = []
    eos_tensor = torch.tensor(eos_ids) if eos_ids else None
    for row in range(generated.shape[0]):
        ids = generated[row]
        length = ids.shape[0]
        finished = False
        if eos_tensor is not None and length:
            hits = torch.isin(ids, eos_tensor).nonzero()
            if hits.numel():
                length = int(hits[0, 0]) + 1
                finished = True
        ids = ids[:length].tolist()
        t = temperatures[row, :length].float().cpu().tolist() if temperatures is not None else None
        p = top_ps[row, :length].float().cpu().tolist() if top_ps is not None else None
        completions.append(Completion(tokenizer.decode(ids, skip_special_tokens=True), ids, t, p, finished))
    return completions


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def generate_completions(model, tokenizer, requests: Sequence[GenerationRequest], *, generation_kwargs: dict,
                         max_new_tokens: int, batch_size: int) -> list[list[Completion]]:
    """Completions for each request, in order (request i -> `requests[i].num_samples` completions).

    A seeded request is sampled on its own: `torch.manual_seed(seed)`, then its samples in calls of at most
    `batch_size` sequences (`num_return_sequences`), so its result depends only on the request and batch_size.
    Packed: consecutive seeded requests sharing a non-None `group`, the seed and num_samples (n) are sampled after
    one `torch.manual_seed(seed)`, in calls of max(1, batch_size // n) left-padded prompts x n sequences (when
    n > batch_size: prompt by prompt, in chunks of batch_size sequences), so their result depends on the whole group
    and batch_size.
    Unseeded requests (deterministic decoding) share calls: up to `batch_size` sequences, prompts left padded.
    Out of GPU memory, the call is retried with half the batch (and the same seed) down to one sequence.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    encoded = [encode_prompt(tokenizer, r.prompt) for r in requests]
    results: list[list[Completion] | None] = [None] * len(requests)
    size = batch_size
    index = 0
    while index < len(requests):
        request = requests[index]
        try:
            if request.seed is not None:
                group = [index]
                while (request.group is not None and group[-1] + 1 < len(requests)
                       and requests[group[-1] + 1].group == request.group
                       and requests[group[-1] + 1].seed == request.seed
                       and requests[group[-1] + 1].num_samples == request.num_samples):
                    group.append(group[-1] + 1)
                ns = request.num_samples
                torch.manual_seed(request.seed)
                if ns <= size:  # whole prompts per call: row j * ns + r is sample r of the call's prompt j
                    per_call = size // ns
                    for start in range(0, len(group), per_call):
                        part = group[start : start + per_call]
                        flat = _generate_batch(model, tokenizer, [encoded[i] for i in part], ns, generation_kwargs,
                                               max_new_tokens)
                        for j, i in enumerate(part):
                            results[i] = flat[j * ns : (j + 1) * ns]
                else:  # one prompt's samples in chunks of `size` sequences
                    for i in group:
                        done: list[Completion] = []
                        while len(done) < ns:
                            chunk = min(size, ns - len(done))
                            done += _generate_batch(model, tokenizer, [encoded[i]], chunk, generation_kwargs,
                                                    max_new_tokens)
                        results[i] = done
                index = group[-1] + 1
            else:
                group = [index]
                total = request.num_samples
                while (group[-1] + 1 < len(requests) and requests[group[-1] + 1].seed is None
                       and requests[group[-1] + 1].num_samples == request.num_samples
                       and total + request.num_samples <= size):
                    group.append(group[-1] + 1)
                    total += request.num_samples
                flat = _generate_batch(model, tokenizer, [encoded[i] for i in group], request.num_samples,
                                       generation_kwargs, max_new_tokens)
                for j, i in enumerate(group):
                    results[i] = flat[j * request.num_samples : (j + 1) * request.num_samples]
                index = group[-1] + 1
        except RuntimeError as exc:  # torch's OutOfMemoryError is a RuntimeError
            if not _is_oom(exc) or size == 1:
                raise
            size = max(1, size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            warnings.warn(f"Out of memory while generating; retrying with at most {size} sequences per call.")
    return results  # type: ignore[return-value]


class Engine(Protocol):
    """A generation backend: what run_evaluation and build_training_data need to sample a decoding method.

    `name` identifies the backend in records ("hf" for transformers; any other name enters the settings hash, so
    records of different engines never mix). `generate` returns, for each request in order, `request.num_samples`
    Completions decoded with `method` (already resolved: never oracle/meanshift), with the same seeding contract as
    generate_completions: a seeded request is reproducible on its own (or, packed, with its group), unseeded
    requests are deterministic. Completions carry the per-token T and P each token was sampled with (None when the
    backend cannot report them).

    Optional `sequences_per_call` (int): the engine seeds every request itself, so its results do not depend on
    which other requests share a call; the callers then hand it the requests of many work items at once (up to
    that many sequences), which is what a continuous-batching engine needs to be fast. Absent or None: one work
    item (unit) per call, as transformers' seeding (`torch.manual_seed` per call) requires.
    """

    name: str

    def generate(self, requests: Sequence[GenerationRequest], *, method: Method, max_new_tokens: int,
                 batch_size: int) -> list[list[Completion]]: ...


def sequences_per_call(engine) -> int | None:
    """How many sequences `engine` takes in one call across work items (None: one work item per call)."""
    value = getattr(engine, "sequences_per_call", None) if engine is not None else None
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"engine.sequences_per_call must be a positive integer or None, got {value!r}.")
    return value


def engine_name(engine) -> str:
    """The engine's name for records: "hf" for None (transformers' generate) or an engine without a name."""
    return str(getattr(engine, "name", "hf")) if engine is not None else "hf"


@dataclass
class TransformersEngine:
    """The Engine over transformers' `model.generate` (what run_evaluation uses when given no engine)."""

    model: object
    tokenizer: object
    name: ClassVar[str] = "hf"

    def generate(self, requests: Sequence[GenerationRequest], *, method: Method, max_new_tokens: int,
                 batch_size: int) -> list[list[Completion]]:
        return generate_completions(self.model, self.tokenizer, requests,
                                    generation_kwargs=method_generation_kwargs(method),
                                    max_new_tokens=max_new_tokens, batch_size=batch_size)
