"""Per-token T and P of vLLM outputs: a teacher-forced pass of the transformers AutoDeco model.

vLLM returns no per-token side values from compute_logits, so the heads' T and P for a completion are recomputed
by running the same AutoDeco directory in transformers over prompt + completion: the outputs at positions
len(prompt) - 1 .. len(prompt) + len(completion) - 2 are exactly the (T, P) the heads gave each sampled token,
up to the float noise between vLLM's and transformers' kernels (~1e-6 relative in float32).

Memory does not grow with the trace beyond the KV cache itself: the sequence goes through in chunks of `chunk`
positions with the cache carried over, and only the chunk's logits [chunk, V] exist at once (a 32K-token trace at
V = 152K would otherwise need 19 GB of float32 logits). The cache and the last chunk's outputs are dropped before
the call returns, so nothing is kept from one completion to the next (a 32K-token run stays at one trace's peak).
`model=` reuses an AutoDeco model that is already loaded (the evaluation's own) instead of loading a second copy.
"""

from __future__ import annotations

import torch

from autodeco.modeling import AutoDecoModelForCausalLM


class TeacherForcedTraces:
    """Callable (prompt_ids, completion_ids) -> (temperatures, top_ps), lists of len(completion_ids) floats."""

    def __init__(self, model_dir: str, *, device: str | None = None, dtype=None, chunk: int = 256, model=None):
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ValueError(f"trace chunk must be a positive number of positions, got {chunk!r}.")
        self.model_dir = model_dir
        if model is not None:  # a loaded model runs where it lives, in its dtype
            device, dtype = str(model.device), model.dtype
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype or (torch.float32 if self.device == "cpu" else torch.bfloat16)
        self.chunk = chunk
        self._model = model.eval() if model is not None else None

    @property
    def model(self):
        if self._model is None:
            model = AutoDecoModelForCausalLM.from_pretrained(self.model_dir, dtype=self.dtype)
            self._model = model.to(self.device).eval()
        return self._model

    def close(self) -> None:
        self._model = None

    @torch.no_grad()
    def __call__(self, prompt_ids: list[int], completion_ids: list[int]) -> tuple[list[float], list[float]]:
        if not completion_ids:
            return [], []
        model = self.model
        sequence = list(prompt_ids) + list(completion_ids[:-1])
        first = len(prompt_ids) - 1  # the position whose output sampled completion_ids[0]
        temperatures: list[float] = []
        top_ps: list[float] = []
        cache = None
        for start in range(0, len(sequence), self.chunk):
            end = min(start + self.chunk, len(sequence))
            keep = end - max(start, first)  # positions of this chunk we need (the last `keep`)
            ids = torch.tensor([sequence[start:end]], device=self.device)
            out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=max(keep, 1))
            cache = out.get("cache", None) if "cache" in out else out.get("past_key_values", None)
            if keep > 0:
                temperatures += out.temperature[0, -keep:].float().cpu().tolist()
                top_ps += out.top_p[0, -keep:].float().cpu().tolist()
        del out, cache  # this trace's KV cache and last chunk: freed now, not when the next trace overwrites them
        return temperatures, top_ps
