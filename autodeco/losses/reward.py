"""The reward (policy-gradient) objective's pieces for AutoDeco heads, as plain functions (GRPO-style, no critic).

    logp, ent = policy_log_probs(logits, T, P, tokens)      # logits [..., V], T / P / tokens [...] -> [N], [N]
    adv, keep = group_advantages(rewards)                  # rewards [groups, G] -> [groups, G], keep [groups]
    loss = clipped_surrogate(logp, old_logp, adv_per_token, clip_epsilon=0.2)      # [N] per-token losses
    loss = loss + kl_coef * kl_penalty(logp, ref_logp) - entropy_coef * ent

`tokens` holds the sampled token ids (IGNORE_INDEX where not sampled). The value of logp is exact: the log-prob of
the token under the hard nucleus the sampler drew it from, log softmax(z / T) renormalised over the top-P set; its
gradient in T is exact too (closed form, the set held fixed). P gets no gradient from a hard set, so its gradient
comes from the paper's soft top-p relaxation, exactly the likelihood loss's kernel (losses/likelihood.py). Chunked
like the likelihood losses: one [C, V] buffer at a time. Derivation and what is relaxed: docs/training.md.
"""

from __future__ import annotations

import torch

from autodeco.features import entropy_from_log_probs
from autodeco.losses.likelihood import (
    LOSS_MIN_TEMPERATURE,
    _check_chunk_size,
    _check_inputs,
    _gather_rows,
    _rows_per_chunk,
    _SoftTopPNLL,
    _supervised,
)
from autodeco.sampling import nucleus_filter

__all__ = ["policy_log_probs", "group_advantages", "clipped_surrogate", "kl_penalty"]


def _hard_nucleus_chunk(raw: torch.Tensor, label: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor):
    """raw [C, V] logits, label [C], T [C], top_p [C] -> log q_y, d log q_y/dT, H(q), dH/dT (all [C]).

    q = softmax(beta z) restricted to the nucleus N (the sampler's set, recomputed here). With the set fixed:
        d log q_y / d beta = z_y - E_q z,   dH / d beta = -beta Var_q z,   d / dT = -beta^2 d / d beta.
    """
    z = raw.to(temperature.dtype)
    beta = temperature.reciprocal()
    scaled = z / temperature[:, None]  # [C, V] divided, not multiplied by beta: the sampler's own rounding
    kept = torch.isfinite(nucleus_filter(scaled.float(), top_p.float()))  # [C, V] the sampler's nucleus
    # The sampled token is in the nucleus by construction; a head value recomputed in another batch layout can move
    # a boundary by one ulp, so keep it in rather than return -inf.
    kept.scatter_(1, label[:, None], True)
    log_q = torch.log_softmax(scaled.masked_fill(~kept, float("-inf")), dim=-1)  # [C, V]
    q = log_q.exp()
    z = z.masked_fill(~kept, 0.0)  # 0 * -inf would poison the moments
    mean_z = (q * z).sum(-1)
    var_z = (q * (z - mean_z[:, None]) ** 2).sum(-1)
    log_q_y = log_q.gather(1, label[:, None]).squeeze(1)
    z_y = z.gather(1, label[:, None]).squeeze(1)
    beta2 = beta * beta
    return log_q_y, -(z_y - mean_z) * beta2, entropy_from_log_probs(log_q, probs=q), beta * var_z * beta2


class _HardNucleusLogProb(torch.autograd.Function):
    """(logits [..., V], rows [N], labels [N], T [N], P [N]) -> (log q [N], H [N]); gradient for T only."""

    @staticmethod
    def forward(ctx, logits, rows, labels, temperature, top_p, chunk_size):
        outputs = [torch.empty_like(temperature) for _ in range(4)]  # log q, d/dT, H, dH/dT
        for start in range(0, rows.numel(), chunk_size):
            stop = min(start + chunk_size, rows.numel())
            results = _hard_nucleus_chunk(_gather_rows(logits, rows, start, stop), labels[start:stop],
                                          temperature[start:stop], top_p[start:stop])
            for out, value in zip(outputs, results):
                out[start:stop] = value
        log_q, d_log_q, ent, d_ent = outputs
        ctx.save_for_backward(d_log_q, d_ent)
        return log_q, ent

    @staticmethod
    def backward(ctx, grad_log_q, grad_ent):
        d_log_q, d_ent = ctx.saved_tensors
        return None, None, None, grad_log_q * d_log_q + grad_ent * d_ent, None, None


def policy_log_probs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, tokens: torch.Tensor,
                     *, alpha: float = 30.0, chunk_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability and entropy of the sampling distribution at every sampled position, flattened: ([N], [N]).

    logits [..., V] (no gradient), temperature / top_p [...] (the heads' outputs, with gradient), tokens [...] the
    sampled ids with IGNORE_INDEX elsewhere, all aligned (no shift). Value: log q(token), q = the hard nucleus of
    softmax(logits / T) at P, exactly what `generate` samples. Gradient: exact in T (set fixed); in P through the soft
    nucleus p~ = p m / sum(p m), m = exp(-alpha relu(cumsum - P)) (the likelihood loss's kernel), added with zero
    value: log q + log p~(T detached, P) - stop_grad(log p~). Entropy H(q) [N] carries its exact T gradient.
    """
    _check_inputs(logits, {"temperature": temperature, "top_p": top_p}, tokens)
    _check_chunk_size(chunk_size)
    if not float(alpha) > 0:
        raise ValueError(f"alpha must be > 0 (the soft top-p steepness), got {alpha!r}; the paper uses 30.")
    cdt = torch.float64 if torch.float64 in (logits.dtype, temperature.dtype, top_p.dtype) else torch.float32
    base, rows, labels = _supervised(logits, tokens)
    t = temperature.reshape(-1)[rows].to(cdt).clamp_min(LOSS_MIN_TEMPERATURE)  # [N]
    p = top_p.reshape(-1)[rows].to(cdt).clamp(torch.finfo(torch.float32).tiny, 1.0)  # [N], as generate clamps
    chunk = _rows_per_chunk(chunk_size, logits.shape[-1])
    log_q, ent = _HardNucleusLogProb.apply(base, rows, labels, t, p.detach(), chunk)
    if top_p.requires_grad:
        soft_nll, _ = _SoftTopPNLL.apply(base, rows, labels, t.detach(), p, float(alpha), chunk)
        log_q = log_q + (soft_nll.detach() - soft_nll)  # value unchanged; d/dP = d log p~ / dP
    return log_q, ent


def group_advantages(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO advantages: rewards [groups, G] -> ((r - mean) / std per group [groups, G], keep [groups] bool).

    std is the population standard deviation of the group. A group whose rewards are all equal (all 0, all 1, any
    constant) carries no signal: keep is False and its advantages are 0, never 0 / 0.
    """
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [groups, G] with G >= 2 (group_size), got shape {tuple(rewards.shape)}.")
    rewards = rewards.to(torch.float64)
    if not bool(torch.isfinite(rewards).all()):
        raise ValueError("rewards contain NaN or inf; a reward must be a finite number.")
    keep = rewards.amax(1) > rewards.amin(1)  # [groups]
    mean = rewards.mean(1, keepdim=True)
    std = rewards.std(1, unbiased=False, keepdim=True)
    adv = torch.where(keep[:, None], (rewards - mean) / torch.where(keep[:, None], std, 1.0), 0.0)
    return adv.float(), keep


def clipped_surrogate(log_probs: torch.Tensor, old_log_probs: torch.Tensor, advantages: torch.Tensor,
                      clip_epsilon: float = 0.2) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token PPO/GRPO loss -min(rho A, clip(rho, 1 - eps, 1 + eps) A), rho = exp(logp - old): ([N], clipped [N]).

    With old = logp.detach() (a batch's first optimisation step) rho = 1 and the gradient is A * d logp, the plain
    policy gradient; the ratio and the clip only matter when a sampled batch is reused (num_iterations > 1).
    """
    if not 0 <= clip_epsilon < 1:
        raise ValueError(f"clip_epsilon must be in [0, 1), got {clip_epsilon!r}; GRPO uses 0.2.")
    ratio = torch.exp(log_probs - old_log_probs)
    clipped_ratio = ratio.clamp(1.0 - clip_epsilon, 1.0 + clip_epsilon)
    unclipped, clipped = ratio * advantages, clipped_ratio * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).detach()


def kl_penalty(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Per-token KL(policy || reference) estimate at tokens sampled from the policy: exp(d) - d - 1, d = ref - logp.

    Non-negative, unbiased for the KL in expectation (the "k3" estimator GRPO uses); [N]. ref_log_probs come from the
    starting heads, without gradient.
    """
    d = ref_log_probs.detach() - log_probs
    return torch.exp(d) - d - 1.0
