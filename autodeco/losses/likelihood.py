"""The AutoDeco head losses (arXiv 2510.26697, sec. 3) as chunked closed-form autograd kernels.

    temperature_loss(logits, temperature, labels, *, easy_token_mask_ratio=0.6, dft=True, generator=None,
                     chunk_size=None)
    soft_top_p_loss(logits, temperature, top_p, labels, *, alpha=30.0, dft=True, chunk_size=None)

logits [..., V] (aligned with labels, no shift, no gradient into them), temperature / top_p [...] (carry
gradients), labels [...] long with IGNORE_INDEX where unsupervised. Each returns the mean over supervised
positions of w_t * nll_t (w_t = softmax(logits)[label] when `dft`). The forward pass computes, chunk by chunk
of supervised rows, the loss and its closed-form d/dT, d/dP, so peak memory is one chunk's [C, V] buffers;
backward is a multiply. The readable autograd formulas are in autodeco.losses.reference. Formulas, memory
and benchmarks: docs/training.md, docs/benchmarks.md (`python bench/bench_losses.py`).
"""

from __future__ import annotations

import math

import torch

from autodeco.config import IGNORE_INDEX
from autodeco.features import sort_ascending

# Added to sum(p * m) before the log: keeps log finite when every mask underflows (huge alpha).
SOFT_TOP_P_EPS = 1e-9
# T is clamped from below before dividing the logits; below it the loss is flat in T (zero gradient). Not the
# sampler's clamp (autodeco.features.MIN_TEMPERATURE, 1e-4).
LOSS_MIN_TEMPERATURE = 1e-3
# Rows per chunk default to DEFAULT_CHUNK_ELEMENTS // V (55 rows at V = 151,936): a float32 [chunk, V]
# buffer is then just under 32 MiB and the soft top-p kernel keeps ~4-5 alive (measured 135 MB peak with
# glibc forced to unmap freed blocks; 250-420 MB with its default heap, which keeps some). Smaller chunks
# cost more than they save: every op over a chunk is a parallel region, and on a busy 2-core machine each
# region pays a scheduling delay, so 4x smaller chunks ran 3x slower there.
DEFAULT_CHUNK_ELEMENTS = 1 << 23

__all__ = [
    "IGNORE_INDEX",
    "SOFT_TOP_P_EPS",
    "LOSS_MIN_TEMPERATURE",
    "DEFAULT_CHUNK_ELEMENTS",
    "temperature_loss",
    "soft_top_p_loss",
]


# ----------------------------------------------------------------------------------------------------
# Input handling shared by the fast path and the references
# ----------------------------------------------------------------------------------------------------


def _check_inputs(logits: torch.Tensor, per_position: dict[str, torch.Tensor], labels: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() < 1:
        raise ValueError(
            f"logits must be a floating tensor shaped [..., V], got "
            f"{f'{logits.dtype} {tuple(logits.shape)}' if isinstance(logits, torch.Tensor) else type(logits).__name__};"
            " pass the base model's raw logits (e.g. outputs.logits)."
        )
    expected = tuple(logits.shape[:-1])
    for name, tensor in {**per_position, "labels": labels}.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"{name} must be a torch.Tensor shaped {expected} (logits.shape[:-1]), got {type(tensor).__name__}."
            )
        if tuple(tensor.shape) != expected:
            hint = (
                " squeeze the trailing 1 (e.g. .squeeze(-1))"
                if tuple(tensor.shape) == expected + (1,)
                else " give one value per logits position, and align labels with logits before calling"
                " (no shift is done here)"
            )
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)} but logits has shape {tuple(logits.shape)}, so {name} must be "
                f"{expected} (logits.shape[:-1]);{hint}."
            )
        if tensor.device != logits.device:
            raise ValueError(f"{name} is on {tensor.device} but logits is on {logits.device}; move them to one device.")
    for name, tensor in per_position.items():
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor, got {tensor.dtype}; pass the head's output as float.")
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
        raise ValueError(
            f"labels must be an integer tensor (token ids, {IGNORE_INDEX} = ignore), got {labels.dtype}; "
            "use labels.long()."
        )
    vocab = logits.shape[-1]
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        value = int(labels[bad].reshape(-1)[0])
        raise ValueError(
            f"labels contains {value}, outside [0, {vocab}) for a vocabulary of {vocab}; use token ids of the base "
            f"vocabulary and {IGNORE_INDEX} for positions that are not supervised."
        )


def _check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(
            f"chunk_size must be a positive int (rows per chunk) or None for the default, got {chunk_size!r}."
        )


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # float32 numerics for bf16/fp16/fp32 inputs; float64 only when a caller asks for it (tests, gradcheck).
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _rows_per_chunk(chunk_size: int | None, vocab: int) -> int:
    return chunk_size if chunk_size is not None else max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1))


def _zero_connected(*tensors: torch.Tensor) -> torch.Tensor:
    # Sum of an empty slice: exactly 0 with all-zero gradients, never NaN even if an input holds inf/NaN.
    total = sum(t.reshape(-1)[:0].sum() for t in tensors)
    return total.to(_compute_dtype(*tensors))


def _easy_token_draws(n: int, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # One draw per supervised position, in flattened order, on the generator's own device, then moved: the
    # same seed gives the same mask whatever the chunking or the logits' device.
    gen_device = generator.device if generator is not None else torch.device("cpu")
    return torch.rand(n, generator=generator, device=gen_device).to(device)


# ----------------------------------------------------------------------------------------------------
# Per-chunk kernels. Each takes a [C, V] copy of the supervised rows it may overwrite and returns [C]
# vectors; nothing [C, V] outlives the call.
# ----------------------------------------------------------------------------------------------------


def _sort_descending_with_rank(
    raw: torch.Tensor, label: torch.Tensor, cdt: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """raw [C, V] (consumed), label [C] -> (s [C, V], rank [C, 1], s_y [C, 1]) with s = -z sorted ascending
    (i.e. z sorted descending, negated) in dtype cdt, s_y = -z_y, and rank the label's position in that order.

    Only the sorted values are needed, not the permutation: tied tokens have equal probabilities, so the
    sequence of sorted probabilities (hence c, m, Z) does not depend on how ties are ordered. The label's
    rank is found by binary search, ties broken by vocabulary index (bf16 logits tie a lot), so the loss is
    the deterministic function of the logits a stable sort would give. Sorting -z ascending serves both
    numpy's sort and searchsorted, and negation makes -0.0 and +0.0 compare equal as floats should.
    On CPU the sort is numpy's (SIMD quicksort: ~20x faster than torch.sort on 152k-long rows here).
    """
    # [C, V] -z, unsorted, kept until the rank is known: ties at the label need the vocabulary order.
    neg = raw.neg_() if raw.dtype == cdt else torch.neg(raw.to(cdt))
    neg_y = neg.gather(1, label[:, None])  # [C, 1]
    ascending = sort_ascending(neg)
    rank = torch.searchsorted(ascending, neg_y, side="left")  # tokens strictly above the label
    n_equal = torch.searchsorted(ascending, neg_y, side="right") - rank
    tied = (n_equal > 1).squeeze(1).nonzero().squeeze(1)
    if tied.numel():
        index = torch.arange(neg.shape[1], device=neg.device)[None, :]
        before = (neg[tied] == neg_y[tied]) & (index < label[tied, None])
        rank[tied] += before.sum(dim=1, keepdim=True)
    return ascending, rank, neg_y


def _cumsum(x: torch.Tensor) -> torch.Tensor:
    """Cumulative sum along dim 1 (new tensor), accurate to the output's rounding.

    Over ~10^5 terms a float32 running sum would drift by ~1e-5 near c = 1, which alpha = 30 turns into a
    3e-4 error on log m. The CPU kernel already accumulates float32 in float64; elsewhere we do it ourselves.
    """
    if x.device.type == "cpu" or x.dtype == torch.float64:
        return x.cumsum(dim=1)
    return x.to(torch.float64).cumsum_(dim=1).to(x.dtype)


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[C, V], [C, V] -> [C] row-wise dot products."""
    return torch.linalg.vecdot(a, b)


def _soft_top_p_chunk(
    raw: torch.Tensor, label: torch.Tensor, beta: torch.Tensor, top_p: torch.Tensor, alpha: float, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """raw [C, V] logits (consumed), label [C], beta = 1/T [C], top_p [C] -> nll, d nll/dT, d nll/dP, w (all [C]).

    With p = softmax(beta z), sorted descending, c = cumsum(p), m = exp(-alpha relu(c - P)), Z = sum p m:
        nll       = -(log p_y + log m_y - log(Z + eps))
        d nll/dP  = -alpha [c_y > P] + alpha sum_{c_j > P} p_j m_j / (Z + eps)
        d nll/dbeta = -(z_y - E z) + alpha [c_y > P] g_y
                      + (sum_j p_j m_j (z_j - E z) - alpha sum_{c_j > P} p_j m_j g_j) / (Z + eps)
    where E z = sum p z, g_j = d c_j / d beta = cumsum over the sorted order of p_k (z_k - E z), and
    d nll/dT = -beta^2 d nll/dbeta. Everything is done in sorted order: the order depends only on the raw
    logits (beta > 0 rescales them), so p, c, m never need to be scattered back to vocabulary order.
    """
    cdt = beta.dtype
    s, pos, s_y = _sort_descending_with_rank(raw, label, cdt)  # [C, V] -z ascending, [C, 1] label rank
    del raw
    s_max = s[:, :1].clone()  # -max z
    z = torch.sub(s_max, s, out=s)  # [C, V] z - max z, sorted descending: <= 0, so exp(beta z) cannot overflow
    z_y = (s_max - s_y).squeeze(1)  # [C]

    weight = (z_y - torch.exp(z).sum(dim=1).log()).exp()  # softmax(z)[y] at T = 1
    # e = p * total: leaving p unnormalised saves a pass over [C, V]; the row scalars absorb total instead.
    e = torch.mul(z, beta[:, None]).exp_()  # [C, V]
    total = e.sum(dim=1)  # >= 1: the max contributes exp(0)
    log_p_y = beta * z_y - total.log()
    mean_z = _rowdot(e, z) / total
    z -= mean_z[:, None]  # [C, V] z - E z
    dz_y = z_y - mean_z

    cum = _cumsum(e)  # [C, V] c * total
    c_y = cum.gather(1, pos).squeeze(1) / total
    excess = cum.sub_((top_p * total)[:, None]).clamp_min_(0)  # relu(c - P) * total, [C, V]
    tail = excess > 0  # [C, V]; a suffix of each sorted row (c is non-decreasing)
    em = excess.mul_((-alpha / total)[:, None]).exp_().mul_(e)  # [C, V] e_j m_j, exactly e_j inside the nucleus
    del excess, cum
    mass = em.sum(dim=1) / total  # Z
    denom = mass + SOFT_TOP_P_EPS

    excess_y = (c_y - top_p).clamp_min(0)
    nll = -(log_p_y - alpha * excess_y - denom.log())
    if not need_grad:
        return nll, torch.zeros_like(nll), torch.zeros_like(nll), weight

    tail_y = (excess_y > 0).to(cdt)
    shift_mass = _rowdot(em, z) / total  # sum p m (z - E z)
    em.mul_(tail)  # [C, V] e m restricted to the tail
    del tail
    tail_mass = em.sum(dim=1) / total
    g = _cumsum(e.mul_(z))  # [C, V] total * d c_j / d beta
    del e, z
    g_y = g.gather(1, pos).squeeze(1) / total
    tail_g = _rowdot(g, em) / (total * total)

    d_top_p = alpha * (tail_mass / denom - tail_y)
    d_beta = -dz_y + alpha * tail_y * g_y + (shift_mass - alpha * tail_g) / denom
    return nll, -d_beta * beta * beta, d_top_p, weight


def _temperature_chunk(
    raw: torch.Tensor, label: torch.Tensor, beta: torch.Tensor, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """raw [C, V] (consumed), label [C], beta = 1/T [C] -> nll, d nll/dT, w, base argmax (all [C]).

    nll = logsumexp(beta z) - beta z_y, d nll/dbeta = E_p z - z_y, d nll/dT = -beta^2 d nll/dbeta.
    """
    cdt = beta.dtype
    # One pass for both: the max to shift by, and its first index (on the raw values) for the easy-token rule.
    z_max, argmax = raw.max(dim=1, keepdim=True)
    z = raw.to(cdt) if raw.dtype != cdt else raw  # [C, V]
    del raw
    z -= z_max.to(cdt)
    z_y = z.gather(1, label[:, None]).squeeze(1)
    weight = (z_y - torch.exp(z).sum(dim=1).log()).exp()  # softmax(z)[y] at T = 1
    p = torch.mul(z, beta[:, None]).exp_()  # [C, V] unnormalised
    total = p.sum(dim=1)
    nll = total.log() - beta * z_y
    if not need_grad:
        return nll, torch.zeros_like(nll), weight, argmax.squeeze(1)
    mean_z = _rowdot(p, z) / total
    return nll, -(mean_z - z_y) * beta * beta, weight, argmax.squeeze(1)


# ----------------------------------------------------------------------------------------------------
# Autograd Functions: forward runs the chunks and stores d nll/dT (and d nll/dP); backward multiplies.
# ----------------------------------------------------------------------------------------------------


def _gather_rows(logits: torch.Tensor, rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """logits [..., V] (any strides), rows [N] flat positions over logits.shape[:-1] -> a fresh [C, V] copy of
    the rows rows[start:stop], which the kernels may overwrite. One chunk at a time: never the whole [N, V],
    and never a reshape of logits, which would copy all of it when it is a view such as logits[:, :-1]."""
    index = rows[start:stop]
    lead = logits.shape[:-1]
    if logits.device.type != "cpu":
        return logits[torch.unravel_index(index, lead)]
    # On CPU, index_select / advanced indexing over long rows can be 10-50x slower than memcpy with 2 threads
    # here; supervised positions come in runs (whole completions), so copy each run of rows as one slice.
    out = torch.empty((index.numel(), logits.shape[-1]), dtype=logits.dtype)
    ids = index.tolist()
    last = lead[-1] if lead else 1
    run = 0
    for k in range(1, len(ids) + 1):
        if k == len(ids) or ids[k] != ids[k - 1] + 1 or ids[k] % last == 0:
            outer, first = divmod(ids[run], last)
            prefix = []
            for size in reversed(lead[:-1]):
                outer, i = divmod(outer, size)
                prefix.append(i)
            out[run:k].copy_(logits[tuple(reversed(prefix))][first : first + k - run])
            run = k
    return out


class _SoftTopPNLL(torch.autograd.Function):
    """(logits [..., V], rows [N], labels [N], T [N], P [N]) -> (nll [N], w [N]); grads for T and P only."""

    @staticmethod
    def forward(ctx, logits, rows, labels, temperature, top_p, alpha, chunk_size):
        need_grad = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        beta = temperature.reciprocal()
        outputs = [torch.empty_like(temperature) for _ in range(4)]  # nll, dT, dP, w
        for start in range(0, rows.numel(), chunk_size):
            stop = min(start + chunk_size, rows.numel())
            results = _soft_top_p_chunk(
                _gather_rows(logits, rows, start, stop),
                labels[start:stop],
                beta[start:stop],
                top_p[start:stop],
                alpha,
                need_grad,
            )
            for out, value in zip(outputs, results):
                out[start:stop] = value
        nll, d_temperature, d_top_p, weight = outputs
        ctx.save_for_backward(d_temperature, d_top_p)
        ctx.mark_non_differentiable(weight)
        return nll, weight

    @staticmethod
    def backward(ctx, grad_nll, grad_weight):
        d_temperature, d_top_p = ctx.saved_tensors
        return None, None, None, grad_nll * d_temperature, grad_nll * d_top_p, None, None


class _TemperatureNLL(torch.autograd.Function):
    """(logits [..., V], rows [N], labels [N], T [N]) -> (nll [N], w [N], argmax [N]); grad for T only."""

    @staticmethod
    def forward(ctx, logits, rows, labels, temperature, chunk_size):
        need_grad = ctx.needs_input_grad[3]
        beta = temperature.reciprocal()
        nll, d_temperature, weight = (torch.empty_like(temperature) for _ in range(3))
        argmax = torch.empty_like(labels)
        for start in range(0, rows.numel(), chunk_size):
            stop = min(start + chunk_size, rows.numel())
            results = _temperature_chunk(
                _gather_rows(logits, rows, start, stop), labels[start:stop], beta[start:stop], need_grad
            )
            for out, value in zip((nll, d_temperature, weight, argmax), results):
                out[start:stop] = value
        ctx.save_for_backward(d_temperature)
        ctx.mark_non_differentiable(weight, argmax)
        return nll, weight, argmax

    @staticmethod
    def backward(ctx, grad_nll, grad_weight, grad_argmax):
        (d_temperature,) = ctx.saved_tensors
        return None, None, None, grad_nll * d_temperature, None


def _supervised(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> logits [..., V] detached (no copy), rows [N] flat supervised positions, labels [N]."""
    flat_labels = labels.reshape(-1)
    rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    return logits.detach(), rows, flat_labels[rows].long()


# ----------------------------------------------------------------------------------------------------
# Public losses
# ----------------------------------------------------------------------------------------------------


def temperature_loss(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    labels: torch.Tensor,
    *,
    easy_token_mask_ratio: float = 0.6,
    dft: bool = True,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Mean over kept supervised positions of w * CE(softmax(logits / T), label); gradient reaches T only.

    logits [..., V], temperature [...], labels [...] (IGNORE_INDEX = not supervised). A supervised position
    whose base argmax equals its label is dropped with probability `easy_token_mask_ratio` (draws from
    `generator`, or the global RNG when None). `chunk_size` = rows per chunk (default: fits
    DEFAULT_CHUNK_ELEMENTS). Returns a float32 scalar (float64 if an input is float64); 0 with zero
    gradient when no position is kept.
    """
    _check_inputs(logits, {"temperature": temperature}, labels)
    ratio = float(easy_token_mask_ratio)
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(
            f"easy_token_mask_ratio must be in [0, 1] (the probability of dropping an easy token), got "
            f"{easy_token_mask_ratio!r}; use 0 to keep every token, 1 to drop every easy token."
        )
    _check_chunk_size(chunk_size)
    cdt = _compute_dtype(logits, temperature)
    base, rows, row_labels = _supervised(logits, labels)
    if rows.numel() == 0:
        return _zero_connected(temperature)
    draws = _easy_token_draws(rows.numel(), generator, logits.device) if ratio > 0 else None
    t = temperature.reshape(-1)[rows].to(cdt).clamp_min(LOSS_MIN_TEMPERATURE)  # [N]
    nll, weight, argmax = _TemperatureNLL.apply(
        base, rows, row_labels, t, _rows_per_chunk(chunk_size, logits.shape[-1])
    )
    keep = torch.ones_like(nll) if draws is None else 1.0 - ((argmax == row_labels) & (draws < ratio)).to(cdt)
    kept = keep.sum()
    if float(kept) == 0:
        return _zero_connected(temperature)
    return ((weight if dft else 1.0) * keep * nll).sum() / kept


def soft_top_p_loss(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 30.0,
    dft: bool = True,
    chunk_size: int | None = None,
    official_log: bool = False,
) -> torch.Tensor:
    """Mean over supervised positions of w * -log p~[label], p~ the soft nucleus of softmax(logits / T) at P.

    `official_log=True` takes -log(p~[label] + SOFT_TOP_P_EPS) as the official AutoDeco code does (it saturates
    at ~20.7 nats); the default is the exact log. Issue 12.

    logits [..., V], temperature [...], top_p [...], labels [...] (IGNORE_INDEX = not supervised). `alpha`
    is the steepness of the soft cut. Gradients reach T and P. `chunk_size` = rows per chunk (default:
    fits DEFAULT_CHUNK_ELEMENTS). Returns a float32 scalar (float64 if an input is float64); 0 with zero
    gradients when no position is supervised.
    """
    _check_inputs(logits, {"temperature": temperature, "top_p": top_p}, labels)
    alpha_value = float(alpha)
    if not alpha_value > 0 or math.isinf(alpha_value):
        raise ValueError(
            f"alpha must be a finite number > 0 (the steepness of the soft top-p mask), got {alpha!r}; "
            "the paper uses 30."
        )
    _check_chunk_size(chunk_size)
    cdt = _compute_dtype(logits, temperature, top_p)
    base, rows, row_labels = _supervised(logits, labels)
    if rows.numel() == 0:
        return _zero_connected(temperature, top_p)
    t = temperature.reshape(-1)[rows].to(cdt).clamp_min(LOSS_MIN_TEMPERATURE)  # [N]
    p = top_p.reshape(-1)[rows].to(cdt)  # [N]
    nll, weight = _SoftTopPNLL.apply(
        base, rows, row_labels, t, p, alpha_value, _rows_per_chunk(chunk_size, logits.shape[-1])
    )
    if official_log:  # -log(p~ + eps) from -log p~; autograd scales the kernel's gradient by p~ / (p~ + eps)
        nll = -torch.log(torch.exp(-nll) + SOFT_TOP_P_EPS)
    return ((weight if dft else 1.0) * nll).sum() / nll.numel()
