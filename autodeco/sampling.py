"""Per-row temperature and nucleus (top-p) filtering: the math of AutoDeco's dynamic decoding.

    >>> from autodeco.sampling import dynamic_logits
    >>> out = dynamic_logits(logits, temperature, top_p)   # logits [N, V], temperature [N], top_p [N]

Every row gets its own T and P; the result is `logits / T` (float32) with every token outside the nucleus set
to -inf, so any stock sampler at T=1, p=1 samples the AutoDeco distribution. The nucleus is the smallest set
of most probable tokens whose mass reaches P (at least one token), as transformers' TemperatureLogitsWarper +
TopPLogitsWarper(min_tokens_to_keep=1) computes; a tie group straddling the boundary gives its lowest token
ids. A top-k window normalised by a full log-sum-exp decides most rows without sorting the vocabulary.
On CPU, data-dependent branches skip work; on other devices (CUDA) a branch-free form with no host
synchronisation computes the same values (`branch_free=`). Details: docs/engines.md.
"""

from __future__ import annotations

import torch

from autodeco.features import (  # noqa: F401  (re-exported: their home before autodeco.features)
    MIN_TEMPERATURE,
    NUM_DISTRIBUTION_STATS,
    TOP_MASS_K,
    distribution_stats,
    scale_logits,
    sort_descending,
)

# Tokens ranked beyond this window are only looked at (with a full sort) when the window holds less than P.
NUCLEUS_WINDOW = 64


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


def _keep_count(sorted_probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """How many of the descending-sorted tokens the nucleus keeps: those whose preceding mass is < P."""
    mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs  # [N, k], exclusive prefix sums
    return (mass_before < top_p.unsqueeze(-1)).sum(-1).clamp_min(1)  # [N]


def _window_nucleus(scaled, top_p, window, log_z, top_values):
    """The nucleus as the top-`window` logits see it: (k, log_z [N, 1], top_probs [N, k], keep [N], boundary [N, 1])."""
    k = min(window, scaled.shape[-1])
    if log_z is None:
        log_z = torch.logsumexp(scaled, dim=-1, keepdim=True)  # [N, 1] over the full vocabulary
    if top_values is None or top_values.shape[-1] < k:
        top_values = scaled.topk(k, dim=-1).values  # [N, k] descending
    top_values = top_values[:, :k]
    top_probs = (top_values - log_z).exp()
    keep = _keep_count(top_probs, top_p)  # [N]
    boundary = top_values.gather(-1, (keep - 1).clamp_max(k - 1).unsqueeze(-1))  # [N, 1]
    return k, log_z, top_probs, keep, boundary


def nucleus_filter(
    scaled: torch.Tensor,
    top_p: torch.Tensor,
    window: int = NUCLEUS_WINDOW,
    *,
    log_z: torch.Tensor | None = None,
    top_values: torch.Tensor | None = None,
    branch_free: bool | None = None,
) -> torch.Tensor:
    """Set every token of `scaled` [N, V] (already temperature-scaled) outside row i's top-p_i nucleus to -inf.

    Rows with P >= 1 are returned unchanged. Returns a new tensor; `scaled` is not modified.
    `log_z` [N, 1] (logsumexp of `scaled`) and `top_values` [N, >= window] (its descending top values), as
    `distribution_stats(scaled, window=...)` returns them, skip recomputing those.
    `branch_free`: None picks by device (False on CPU, True elsewhere); True computes the same values with no
    data-dependent branch (no host synchronisation), sorting every row once.
    """
    if branch_free is None:
        branch_free = scaled.device.type != "cpu"
    if branch_free:
        return _nucleus_filter_branch_free(scaled, top_p, window, log_z=log_z, top_values=top_values)
    n_rows, vocab = scaled.shape
    filtered_rows = (top_p < 1.0).nonzero().squeeze(-1)  # [M]
    if filtered_rows.numel() == 0:
        return scaled.clone()
    if filtered_rows.numel() < n_rows:
        out = scaled.clone()
        out[filtered_rows] = nucleus_filter(
            scaled[filtered_rows], top_p[filtered_rows], window, branch_free=False,
            log_z=None if log_z is None else log_z[filtered_rows],
            top_values=None if top_values is None else top_values[filtered_rows],
        )
        return out

    k, log_z, top_probs, keep, boundary = _window_nucleus(scaled, top_p, window, log_z, top_values)
    # The window decides the nucleus only if it holds at least P; otherwise the whole row must be sorted.
    uncovered = (keep >= k) & (top_probs.sum(-1) < top_p) if k < vocab else torch.zeros_like(keep, dtype=torch.bool)
    if bool(uncovered.any()):
        rows = uncovered.nonzero().squeeze(-1)
        sorted_values = sort_descending(scaled[rows])  # [R, V]
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


def _nucleus_filter_branch_free(
    scaled: torch.Tensor,
    top_p: torch.Tensor,
    window: int,
    *,
    log_z: torch.Tensor | None = None,
    top_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """nucleus_filter's values without a host synchronisation: every step of the CPU path runs on every row and
    torch.where picks what that path would have computed (a full sort for rows the window does not cover, the
    lowest-id choice among a straddling tie group, the unchanged row for P >= 1). Only shapes are branched on."""
    vocab = scaled.shape[-1]
    k, log_z, top_probs, keep, boundary = _window_nucleus(scaled, top_p, window, log_z, top_values)
    if k < vocab:  # a shape test, not a data test: the window may not hold P, so sort every row once
        uncovered = (keep >= k) & (top_probs.sum(-1) < top_p)  # [N]
        sorted_values = sort_descending(scaled)  # [N, V]
        full_keep = _keep_count((sorted_values - log_z).exp(), top_p)
        full_boundary = sorted_values.gather(-1, (full_keep - 1).unsqueeze(-1))
        keep = torch.where(uncovered, full_keep, keep)
        boundary = torch.where(uncovered.unsqueeze(-1), full_boundary, boundary)
    above = scaled > boundary  # [N, V]
    at_boundary = scaled == boundary
    ties_needed = keep - above.sum(-1)  # [N]; equals the whole tie group unless it straddles the boundary
    at_boundary = at_boundary & (at_boundary.cumsum(-1) <= ties_needed.unsqueeze(-1))  # lowest ids of the group
    drop = ~(above | at_boundary) & (top_p < 1.0).unsqueeze(-1)  # rows with P >= 1 keep everything
    return scaled.masked_fill(drop, float("-inf"))


def dynamic_logits(
    logits: torch.Tensor,
    temperature: torch.Tensor | float,
    top_p: torch.Tensor | float,
    *,
    validate: bool = True,
    branch_free: bool | None = None,
) -> torch.Tensor:
    """AutoDeco's per-token decoding distribution as logits.

    Args:
        logits: [N, V] raw logits, any float dtype.
        temperature: [N] (or a float for every row), > 0.
        top_p: [N] (or a float for every row), in (0, 1].
        validate: check T and P and raise ValueError naming the bad row; internal callers that have
            already sanitised head outputs pass False (validation synchronises with the host).
        branch_free: see `nucleus_filter` (None: by device; the branch-free form on anything but CPU).

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
    return nucleus_filter(scale_logits(logits, temperature), top_p, branch_free=branch_free)
