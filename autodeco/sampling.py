"""Per-row temperature and nucleus (top-p) filtering: the math of AutoDeco's dynamic decoding.

Every row of logits gets its own temperature T and top-p P (as vLLM's v1 sampler does), and the result is a
plain logits tensor: `logits / T` with every token outside the nucleus set to -inf. Sampling from it at
T=1, p=1 is sampling from the AutoDeco distribution, so any stock sampler (transformers' `generate`,
`pipeline`, a serving engine) can consume it unchanged.

    >>> from autodeco.sampling import dynamic_logits
    >>> out = dynamic_logits(logits, temperature, top_p)   # logits [N, V], temperature [N], top_p [N]

The nucleus is the smallest set of most probable tokens whose probability reaches P (at least one token),
exactly what transformers' `TemperatureLogitsWarper` followed by `TopPLogitsWarper(min_tokens_to_keep=1)`
computes. Instead of sorting the whole vocabulary each step, it takes the probabilities of a top-k window
normalised by a full-vocabulary log-sum-exp; only rows whose nucleus does not fit in the window are sorted.
When a group of exactly equal logits straddles the nucleus boundary, the nucleus takes the lowest token ids
of the group. (transformers resolves such ties by the order of its unstable sort, which varies with the
vocabulary size; both keep the same number of tokens with the same values.)

All math is float32, whatever the model's dtype.
"""

from __future__ import annotations

import torch

try:
    import numpy as _np
except ImportError:  # without numpy the full-sort fallback uses torch.sort (much slower on CPU)
    _np = None

# A temperature below this is treated as this: the distribution is already one-hot in float32, and dividing
# by a smaller number would only risk overflow.
MIN_TEMPERATURE = 1e-4
# Tokens ranked beyond this window are only looked at (with a full sort) when the window holds less than P.
NUCLEUS_WINDOW = 64
# Number of distribution statistics the top-p head sees: max prob, entropy, variance, top-5 mass.
NUM_DISTRIBUTION_STATS = 4
TOP_MASS_K = 5


def _as_row_tensor(value, n_rows: int, name: str, device: torch.device) -> torch.Tensor:
    """A per-row float32 tensor [N] from a float, a 0-d tensor or an [N] tensor."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.dim() == 0:
        return t.expand(n_rows)
    if t.dim() != 1 or t.shape[0] != n_rows:
        raise ValueError(
            f"`{name}` must be a float or a tensor of shape [{n_rows}] (one value per row of logits), "
            f"got shape {tuple(t.shape)}."
        )
    return t


def validate_temperature_top_p(temperature: torch.Tensor, top_p: torch.Tensor) -> None:
    """Raise ValueError naming the first bad row when T <= 0, P outside (0, 1], or either is not finite."""
    bad_t = ~(torch.isfinite(temperature) & (temperature > 0))
    bad_p = ~(torch.isfinite(top_p) & (top_p > 0) & (top_p <= 1))
    if bool(bad_t.any()):
        row = int(bad_t.nonzero()[0, 0])
        raise ValueError(
            f"`temperature` must be a finite number > 0, got {float(temperature[row])} at row {row}. "
            "For greedy decoding use do_sample=False instead of temperature 0."
        )
    if bool(bad_p.any()):
        row = int(bad_p.nonzero()[0, 0])
        raise ValueError(
            f"`top_p` must be in (0, 1], got {float(top_p[row])} at row {row}. Use top_p=1.0 to keep every token."
        )


def scale_logits(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """logits [..., V] / temperature [...] in float32, with T clamped below at MIN_TEMPERATURE."""
    t = temperature.to(torch.float32).clamp_min(MIN_TEMPERATURE)
    return logits.to(torch.float32) / t.unsqueeze(-1)


def distribution_stats(scaled: torch.Tensor, *, window: int | None = None):
    """Statistics of softmax(scaled) the top-p head sees: [..., V] -> [..., 4] float32.

    Columns: max probability, entropy (nats), unbiased variance of the probability vector over the
    vocabulary, and the mass of the 5 most probable tokens (the official AutoDeco features).
    With `window`, returns (stats, log_z [..., 1], top-`window` values of `scaled` [..., k] descending),
    which `nucleus_filter` can reuse instead of recomputing them.
    """
    scaled = scaled.to(torch.float32)
    vocab = scaled.shape[-1]
    log_z = torch.logsumexp(scaled, dim=-1, keepdim=True)  # [..., 1]
    log_p = scaled - log_z  # [..., V]
    p = log_p.exp()
    # log p = -inf only where p = 0: clamped to the most negative float, p * log p is 0 there, not nan.
    entropy = -(p * log_p.clamp_min(torch.finfo(torch.float32).min)).sum(-1)
    top_values = scaled.topk(min(max(window or 0, TOP_MASS_K), vocab), dim=-1).values  # descending
    top = (top_values[..., :TOP_MASS_K] - log_z).exp()  # [..., 5]: the 5 largest probabilities
    variance = ((p * p).sum(-1) - 1.0 / vocab) / max(vocab - 1, 1)
    stats = torch.stack([top[..., 0], entropy, variance.clamp_min(0.0), top.sum(-1)], dim=-1)
    return (stats, log_z, top_values) if window else stats


def _keep_count(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """How many of the descending-sorted tokens the nucleus keeps: those whose preceding mass is < P."""
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # [N, k], exclusive prefix sums
    return (mass_before < top_p.unsqueeze(-1)).sum(-1).clamp_min(1)  # [N]


def _sort_descending(x: torch.Tensor) -> torch.Tensor:
    """Values of x [R, V] sorted descending along rows; on CPU numpy's SIMD sort (~10x torch.sort at V = 152k)."""
    if x.device.type == "cpu" and _np is not None and x.dtype in (torch.float32, torch.float64):
        return torch.from_numpy(_np.sort(x.detach().neg().numpy(), axis=1)).neg_()
    return x.sort(dim=-1, descending=True).values


def nucleus_filter(
    scaled: torch.Tensor,
    top_p: torch.Tensor,
    window: int = NUCLEUS_WINDOW,
    *,
    log_z: torch.Tensor | None = None,
    top_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Set every token of `scaled` [N, V] (already temperature-scaled) outside row i's top-p_i nucleus to -inf.

    Rows with P >= 1 are returned unchanged. Returns a new tensor; `scaled` is not modified.
    `log_z` [N, 1] (logsumexp of `scaled`) and `top_values` [N, >= window] (its descending top values), as
    `distribution_stats(scaled, window=...)` returns them, skip recomputing those.
    """
    n_rows, vocab = scaled.shape
    filtered_rows = (top_p < 1.0).nonzero().squeeze(-1)  # [M]
    if filtered_rows.numel() == 0:
        return scaled.clone()
    if filtered_rows.numel() < n_rows:
        out = scaled.clone()
        out[filtered_rows] = nucleus_filter(
            scaled[filtered_rows], top_p[filtered_rows], window,
            log_z=None if log_z is None else log_z[filtered_rows],
            top_values=None if top_values is None else top_values[filtered_rows],
        )
        return out

    k = min(window, vocab)
    if log_z is None:
        log_z = torch.logsumexp(scaled, dim=-1, keepdim=True)  # [N, 1] over the full vocabulary
    if top_values is None or top_values.shape[-1] < k:
        top_values = scaled.topk(k, dim=-1).values  # [N, k] descending
    top_values = top_values[:, :k]
    top_probs = (top_values - log_z).exp()
    keep = _keep_count(top_probs, top_p)  # [N]
    # The window decides the nucleus only if it holds at least P; otherwise the whole row must be sorted.
    uncovered = (keep >= k) & (top_probs.sum(-1) < top_p) if k < vocab else torch.zeros_like(keep, dtype=torch.bool)
    boundary = top_values.gather(-1, (keep - 1).clamp_max(k - 1).unsqueeze(-1))  # [N, 1]
    if bool(uncovered.any()):
        rows = uncovered.nonzero().squeeze(-1)
        sorted_values = _sort_descending(scaled[rows])  # [R, V]
        sorted_probs = (sorted_values - log_z[rows]).exp()
        keep[rows] = _keep_count(sorted_probs, top_p[rows])
        boundary[rows] = sorted_values.gather(-1, (keep[rows] - 1).unsqueeze(-1))

    kept = scaled >= boundary  # [N, V]
    if bool((kept.sum(-1) == keep).all()):  # the usual case: no tie group straddles the boundary
        return scaled.masked_fill(~kept, float("-inf"))
    above = scaled > boundary  # [N, V]
    at_boundary = scaled == boundary
    ties_needed = keep - above.sum(-1)  # [N] how many boundary-valued tokens the nucleus takes
    # Usually exactly the boundary token itself; only a partial tie group needs ranking by token id.
    partial = ties_needed < at_boundary.sum(-1)
    if bool(partial.any()):
        # A deterministic choice among equal logits: the lowest token ids.
        tie_rank = at_boundary.cumsum(-1)  # [N, V]
        at_boundary = at_boundary & (tie_rank <= ties_needed.unsqueeze(-1))
    return scaled.masked_fill(~(above | at_boundary), float("-inf"))


def dynamic_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor | float,
    top_p: torch.Tensor | float,
    *,
    validate: bool = True,
) -> torch.Tensor:
    """AutoDeco's per-token decoding distribution as logits.

    Args:
        logits: [N, V] raw logits, any float dtype.
        temperature: [N] (or a float for every row), > 0.
        top_p: [N] (or a float for every row), in (0, 1].
        validate: check T and P and raise ValueError naming the bad row; internal callers that have
            already sanitised head outputs pass False.

    Returns:
        [N, V] float32: `logits / T` with every token outside the nucleus of mass P set to -inf, equal row by
        row to transformers' TemperatureLogitsWarper(T) then TopPLogitsWarper(P, min_tokens_to_keep=1).
    """
    if logits.dim() != 2:
        raise ValueError(
            f"`logits` must have shape [N, V], got {tuple(logits.shape)}; flatten leading dimensions first "
            "(logits.reshape(-1, logits.shape[-1]))."
        )
    n_rows = logits.shape[0]
    temperature = _as_row_tensor(temperature, n_rows, "temperature", logits.device)
    top_p = _as_row_tensor(top_p, n_rows, "top_p", logits.device)
    if validate:
        validate_temperature_top_p(temperature, top_p)
    return nucleus_filter(scale_logits(logits, temperature), top_p)
