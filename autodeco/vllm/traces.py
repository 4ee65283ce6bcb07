"""Per-token T and P of vLLM outputs: a teacher-forced pass of the transformers AutoDeco model.

vLLM returns no per-token side values from compute_logits, so the heads' T and P for a completion are recomputed
by running the same AutoDeco directory in transformers over prompt + completion: the outputs at positions
len(prompt) - 1 .. len(prompt) + len(completion) - 2 are exactly the (T, P) the heads gave each sampled token,
up to the float noise between vLLM's and transformers' kernels (~1e-6 relative in float32).

Batched per prompt (`many`): the prompt but its last token is prefilled once into a KV cache (no logits kept),
the cache is repeated to a batch, and the completions (each behind the prompt's last token) continue from it as
one right-padded batch. Right padding needs no attention mask: every row starts at the same position, and a pad
only ever follows a row's real tokens, which causal attention never lets them see. Rows are sorted longest
first and a row leaves the batch (and the cache) once its tokens are done, so short rows cost no padded chunks.

Memory does not grow with the trace beyond the KV cache itself: each row goes through in chunks of `chunk`
positions with the cache carried over, and only the chunk's logits [rows, chunk, V] exist at once (a 32K-token
trace at V = 152K would otherwise need 19 GB of float32 logits). `rows` is capped so rows * chunk * V float32
stays within `budget` bytes (at least one row; more completions than that go in several batches, each from a
copy of the prompt's cache): at V = 152K and chunk 256 that is one row, so a smaller chunk buys a wider batch.
The caches and the last chunk's outputs are dropped before the call returns, so nothing is kept from one call to
the next (a 32K-token run stays at one batch's peak).
`model=` reuses an AutoDeco model that is already loaded (the evaluation's own) instead of loading a second copy.
"""

from __future__ import annotations

import copy

import torch

from autodeco.modeling import AutoDecoModelForCausalLM

DEFAULT_BUDGET = 256 * 2**20  # bytes of float32 logits per forward: [rows, chunk, V]


class TeacherForcedTraces:
    """Callable (prompt_ids, completion_ids) -> (temperatures, top_ps), lists of len(completion_ids) floats;
    `many(prompt_ids, completions_ids)` does a list of completions of one prompt together."""

    def __init__(self, model_dir: str, *, device: str | None = None, dtype=None, chunk: int = 256, model=None,
                 budget: int = DEFAULT_BUDGET):
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"trace chunk must be a positive number of positions, got {chunk!r}.")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
            raise ValueError(f"trace budget must be a positive number of bytes (e.g. {DEFAULT_BUDGET}), "
                             f"got {budget!r}.")
        self.model_dir = model_dir
        if model is not None:  # a loaded model runs where it lives, in its dtype
            device, dtype = str(model.device), model.dtype
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or (torch.float32 if self.device == "cpu" else torch.bfloat16)
        self.chunk = chunk
        self.budget = budget
        self._model = model.eval() if model is not None else None

    @property
    def model(self):
        if self._model is None:
            model = AutoDecoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype)
            self._model = model.to(self.device).eval()
        return self._model

    def close(self) -> None:
        self._model = None

    def __call__(self, prompt_ids: list[int], completion_ids: list[int]) -> tuple[list[float], list[float]]:
        return self.many(prompt_ids, [completion_ids])[0]

    def rows_per_batch(self) -> int:
        """Completions per forward: rows * chunk * V float32 logits within the budget, at least one."""
        vocab = self.model.get_output_embeddings().weight.shape[0]
        return max(1, self.budget // (self.chunk * vocab * 4))

    @torch.no_grad()
    def many(self, prompt_ids: list[int], completions_ids: list[list[int]]) -> list[tuple[list[float], list[float]]]:
        """(temperatures, top_ps) per completion, in order; the prompt computed once for all of them."""
        completions_ids = [list(c) for c in completions_ids]
        results: list[tuple[list[float], list[float]]] = [([], []) for _ in completions_ids]
        order = sorted((i for i, c in enumerate(completions_ids) if c), key=lambda i: -len(completions_ids[i]))
        if not order:
            return results
        if not prompt_ids:
            raise ValueError("prompt_ids is empty: the first completion token needs a position that predicts it; "
                             "pass at least one prompt token (e.g. BOS).")
        prompt_cache = self._prefill(list(prompt_ids[:-1]))
        rows = self.rows_per_batch()
        batches = [order[i : i + rows] for i in range(0, len(order), rows)]
        for k, batch in enumerate(batches):
            # The last batch may extend the prompt's cache itself; earlier ones need their own copy.
            cache = prompt_cache if k == len(batches) - 1 or prompt_cache is None else copy.deepcopy(prompt_cache)
            # Each row: the prompt's last token, then the completion but its last token (nothing samples after).
            sequences = [[prompt_ids[-1]] + completions_ids[i][:-1] for i in batch]
            for i, trace in zip(batch, self._continue(cache, sequences)):
                results[i] = trace
            del cache
        del prompt_cache  # freed now, not when the next call overwrites it
        return results

    def _prefill(self, ids: list[int]):
        """The KV cache of `ids` [1, len] (None if empty), chunk by chunk, one logit kept per chunk."""
        cache = None
        for start in range(0, len(ids), self.chunk):
            piece = torch.tensor([ids[start : start + self.chunk]], device=self.device)
            out = self.model(input_ids=piece, past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = _cache_of(out)
            del out
        return cache

    def _continue(self, cache, sequences: list[list[int]]) -> list[tuple[list[float], list[float]]]:
        """(T, P) at every position of each sequence (sorted longest first), continuing a batch-1 cache."""
        if cache is not None:
            cache.batch_repeat_interleave(len(sequences))
        lengths = [len(s) for s in sequences]
        traces = [([], []) for _ in sequences]
        out = None
        for start in range(0, lengths[0], self.chunk):
            active = sum(length > start for length in lengths)  # rows are longest first: a prefix is active
            if cache is not None and out is not None and active < out.temperature.shape[0]:
                cache.batch_select_indices(torch.arange(active, device=self.device))
            end = min(start + self.chunk, lengths[0])
            # [active, end - start]; a row shorter than `end` is right-padded with its own last token
            ids = torch.tensor([s[start:end] + [s[-1]] * (end - len(s)) for s in sequences[:active]],
                               device=self.device)
            out = self.model(input_ids=ids, past_key_values=cache, use_cache=True)
            cache = _cache_of(out)
            temperature, top_p = out.temperature.float().cpu(), out.top_p.float().cpu()  # [active, end - start]
            for r in range(active):
                real = min(end, lengths[r]) - start
                traces[r][0].extend(temperature[r, :real].tolist())
                traces[r][1].extend(top_p[r, :real].tolist())
        del out, cache  # this batch's KV cache and last chunk
        return traces


def _cache_of(out):
    return out.get("cache", None) if "cache" in out else out.get("past_key_values", None)
