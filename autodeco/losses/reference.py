"""Readable float64-capable references of the AutoDeco losses: the formulas written directly with autograd.

They materialise every [..., V] intermediate (that is what autodeco.losses.likelihood avoids); the tests and
`bench/bench_losses.py` compare the fast kernels to them. Same arguments as the public losses, no chunking.
"""

from __future__ import annotations

import torch

from autodeco.config import IGNORE_INDEX
from autodeco.losses.likelihood import (
    LOSS_MIN_TEMPERATURE,
    SOFT_TOP_P_EPS,
    _compute_dtype,
    _easy_token_draws,
)


def _temperature_loss_reference(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    labels: torch.Tensor,
    *,
    easy_token_mask_ratio: float = 0.6,
    dft: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    cdt = _compute_dtype(logits, temperature)
    z = logits.detach().to(cdt)  # [..., V]
    supervised = labels != IGNORE_INDEX  # [...]
    target = labels.clamp_min(0).long()
    t = temperature.to(cdt).clamp_min(LOSS_MIN_TEMPERATURE)
    log_p = torch.log_softmax(z / t[..., None], dim=-1)
    nll = -log_p.gather(-1, target[..., None]).squeeze(-1)  # [...]
    weight = torch.softmax(z, dim=-1).gather(-1, target[..., None]).squeeze(-1) if dft else torch.ones_like(nll)
    keep = supervised.clone()
    if easy_token_mask_ratio > 0 and bool(supervised.any()):
        draws = _easy_token_draws(int(supervised.sum()), generator, logits.device)
        easy = z.argmax(dim=-1) == target
        keep[supervised] = ~(easy[supervised] & (draws < easy_token_mask_ratio))
    if not bool(keep.any()):
        return temperature.sum() * 0.0
    return (weight * nll)[keep].sum() / keep.sum()


def _soft_top_p_loss_reference(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 30.0,
    dft: bool = True,
    official_log: bool = False,
) -> torch.Tensor:
    cdt = _compute_dtype(logits, temperature, top_p)
    z = logits.detach().to(cdt)  # [..., V]
    supervised = labels != IGNORE_INDEX
    target = labels.clamp_min(0).long()[..., None]
    t = temperature.to(cdt).clamp_min(LOSS_MIN_TEMPERATURE)[..., None]
    log_p = torch.log_softmax(z / t, dim=-1)  # [..., V]
    p = log_p.exp()
    sorted_p, order = p.sort(dim=-1, descending=True, stable=True)
    cum = sorted_p.cumsum(dim=-1)  # [..., V] each token's own probability included
    log_mask_sorted = -alpha * torch.relu(cum - top_p.to(cdt)[..., None])
    log_mask = torch.empty_like(log_mask_sorted).scatter(-1, order, log_mask_sorted)  # vocabulary order
    log_mass = torch.log((p * log_mask.exp()).sum(dim=-1) + SOFT_TOP_P_EPS)  # [...]
    log_p_tilde = (log_p + log_mask).gather(-1, target).squeeze(-1) - log_mass
    if official_log:  # the official code's log(p~ + 1e-9)
        log_p_tilde = torch.log(log_p_tilde.exp() + SOFT_TOP_P_EPS)
    weight = torch.softmax(z, dim=-1).gather(-1, target).squeeze(-1) if dft else torch.ones_like(log_mass)
    if not bool(supervised.any()):
        return (temperature.sum() + top_p.sum()) * 0.0
    return -(weight * log_p_tilde)[supervised].mean()
