"""What the heads and the sampler compute from a row of logits: temperature scaling and distribution statistics.

    >>> from autodeco.features import scale_logits, distribution_stats, entropy
    >>> scaled = scale_logits(logits, temperature)     # [..., V] / T [...] in float32, T >= MIN_TEMPERATURE
    >>> stats = distribution_stats(scaled)             # [..., 4]: max prob, entropy, variance, top-5 mass
    >>> h = entropy(logits)                            # [...] nats; -inf (masked) tokens count as p log p = 0

One definition each of the shared constants and helpers that sampling, the losses and the evaluation use;
`sort_descending` / `sort_ascending` are the one numpy fallback for sorting long rows on CPU. See docs/training.md.
"""

from __future__ import annotations

import torch

try:
    import numpy as _np
except ImportError:  # optional: without numpy, sorting falls back to torch.sort (much slower on CPU)
    _np = None

# A temperature below this is treated as this when sampling: the distribution is already one-hot in float32,
# and dividing by a smaller number would only risk overflow. (The losses clamp at LOSS_MIN_TEMPERATURE.)
MIN_TEMPERATURE = 1e-4
# Number of distribution statistics the top-p head sees: max prob, entropy, variance, top-5 mass.
NUM_DISTRIBUTION_STATS = 4
TOP_MASS_K = 5

__all__ = [
    "MIN_TEMPERATURE",
    "NUM_DISTRIBUTION_STATS",
    "TOP_MASS_K",
    "scale_logits",
    "distribution_stats",
    "entropy",
    "entropy_from_log_probs",
    "sort_ascending",
    "sort_descending",
]


def scale_logits(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits [..., V] / temperature [...] in float32, with T clamped below at MIN_TEMPERATURE."""
    t = temperature.to(torch.float32).clamp_min(MIN_TEMPERATURE)
    return logits.to(torch.float32) / t.unsqueeze(-1)


def entropy_from_log_probs(log_p: torch.Tensor, dim: int = -1, probs: torch.Tensor | None = None) -> torch.Tensor:
    """-sum p log p along `dim` (nats) from normalised log-probabilities; `probs` = log_p.exp() if already computed.

    The one -inf guard: where log p = -inf (a masked token, or p underflowed), p = 0, and log p is clamped to the
    most negative finite float so that p * log p is 0, not 0 * -inf = nan. A row that is -inf everywhere has no
    distribution and gives nan.
    """
    p = log_p.exp() if probs is None else probs
    return -(p * log_p.clamp_min(torch.finfo(log_p.dtype).min)).sum(dim)


def entropy(logits_or_scaled: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entropy (nats) of softmax(x) along `dim`, for raw or temperature-scaled logits x [..., V] -> [...].

    Tokens at -inf (filtered out by a nucleus, a mask, ...) contribute 0. bf16 / fp16 inputs are computed in
    float32; float32 and float64 keep their dtype.
    """
    x = logits_or_scaled
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.to(torch.float32)
    return entropy_from_log_probs(torch.log_softmax(x, dim=dim), dim)


def distribution_stats(scaled: torch.Tensor, *, window: int | None = None):
    """Statistics of softmax(scaled) the top-p head sees: [..., V] -> [..., 4] float32.

    Columns: max probability, entropy (nats), unbiased variance of the probability vector over the
    vocabulary, and the mass of the 5 most probable tokens (the official AutoDeco features).
    With `window`, returns (stats, log_z [..., 1], top-`window` values of `scaled` [..., k] descending),
    which `autodeco.sampling.nucleus_filter` can reuse instead of recomputing them.
    """
    scaled = scaled.to(torch.float32)
    vocab = scaled.shape[-1]
    log_z = torch.logsumexp(scaled, dim=-1, keepdim=True)  # [..., 1]
    log_p = scaled - log_z  # [..., V]
    p = log_p.exp()
    entropy_ = entropy_from_log_probs(log_p, probs=p)
    top_values = scaled.topk(min(max(window or 0, TOP_MASS_K), vocab), dim=-1).values  # descending
    top = (top_values[..., :TOP_MASS_K] - log_z).exp()  # [..., 5]: the 5 largest probabilities
    variance = ((p * p).sum(-1) - 1.0 / vocab) / max(vocab - 1, 1)
    stats = torch.stack([top[..., 0], entropy_, variance.clamp_min(0.0), top.sum(-1)], dim=-1)
    return (stats, log_z, top_values) if window else stats


def _numpy_sorts(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and _np is not None and x.dtype in (torch.float32, torch.float64)


def sort_ascending(x: torch.Tensor) -> torch.Tensor:
    """Values of x [R, V] sorted ascending along the last dim (new tensor, no gradient).

    On CPU numpy's SIMD sort (~10-20x torch.sort on 152k-long rows); elsewhere, or without numpy, torch.sort.
    """
    if _numpy_sorts(x):
        return torch.from_numpy(_np.sort(x.detach().numpy(), axis=-1))
    return x.sort(dim=-1).values


def sort_descending(x: torch.Tensor) -> torch.Tensor:
    """Values of x [R, V] sorted descending along the last dim (new tensor); numpy on CPU as sort_ascending."""
    if _numpy_sorts(x):
        return sort_ascending(x.detach().neg()).neg_()
    return x.sort(dim=-1, descending=True).values
