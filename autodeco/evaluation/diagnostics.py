"""Teacher-forced diagnostics of AutoDeco's heads on reference completions: MeanShift values and the
inverse-temperature gain decomposition.

    >>> from autodeco.evaluation import decompose
    >>> from autodeco.evaluation.diagnostics import meanshift_from_calibration
    >>> t, p = meanshift_from_calibration(model, tokenizer, "calib.jsonl")   # MeanShift's static T, P
    >>> print(decompose(model, tokenizer, "calib.jsonl", batch_size=8)["summary"])

Rows are `{"prompt", "completion"}` (or chat) JSONL read with autodeco.data.load_examples; only supervised
tokens count. With z the raw logits, y the label, beta = 1/T and delta = beta - mean(beta): exact gain =
log softmax(beta z)[y] - log softmax(beta_bar z)[y], approx = g delta - v delta^2 / 2 with g = z_y - E_p[z],
v = Var_p[z] under p = softmax(beta_bar z). Summaries: total gains, alignment efficiency, curvature share.
CLI: `autodeco eval --diagnose FILE --model DIR`. The derivation and memory notes: docs/evaluation.md.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch

from autodeco.config import IGNORE_INDEX
from autodeco.data import DataCollatorForCompletion, load_examples
from autodeco.sampling import MIN_TEMPERATURE

__all__ = [
    "teacher_forced_predictions",
    "meanshift_from_calibration",
    "decompose",
    "token_terms",
    "decomposition_summary",
]

# Elements of a float64 [rows, V] buffer per chunk of supervised rows (32 MiB): bounds the per-token math's
# memory independently of the data size; a handful of such buffers are alive at once.
CHUNK_ELEMENTS = 1 << 22
# "No variation" thresholds for the alignment efficiency, which is then defined as 0 (nothing to align)
# instead of 0/0 or a cosine of rounding noise. rms(delta) <= DELTA_RTOL * beta_bar: the heads' T is constant
# (a float32 T resolves relative changes of ~6e-8, float64 noise is ~1e-16, so 1e-12 separates the two);
# E[g^2] <= G_SQUARED_EPS: every reference token sits exactly at the mean logit (e.g. uniform logits).
DELTA_RTOL = 1e-12
G_SQUARED_EPS = 1e-30


def _check_model(model) -> None:
    if not (hasattr(model, "temperature_head") and hasattr(model, "top_p_head")):
        raise TypeError(
            f"The diagnostics need an AutoDecoModelForCausalLM (a model with temperature and top-p heads), got "
            f"{type(model).__name__}. Load one with AutoDecoModelForCausalLM.from_pretrained(heads_dir)."
        )


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")


def token_terms(logits: torch.Tensor, labels: torch.Tensor, beta: torch.Tensor, beta_bar: float) -> dict:
    """The decomposition's per-token terms for rows of raw logits.

    Args:
        logits: [n, V] raw logits of the position predicting each label (any float dtype).
        labels: [n] long, the reference tokens.
        beta: [n] the heads' inverse temperatures 1/T.
        beta_bar: the constant inverse temperature to expand around.

    Returns a dict of [n] tensors: `delta` (beta - beta_bar, float64), `g`, `v` (float32, under
    p = softmax(beta_bar z)), `exact_gain` and `approx_gain` (float64).
    """
    if logits.dim() != 2 or labels.shape != logits.shape[:1] or beta.shape != labels.shape:
        raise ValueError(
            f"token_terms expects logits [n, V], labels [n], beta [n]; got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}, {tuple(beta.shape)}."
        )
    labels = labels.to(logits.device).long().unsqueeze(-1)  # [n, 1]
    # float64: for constant heads beta == beta_bar exactly (see _mean_beta), so delta and the gains are exactly 0.
    beta = beta.to(device=logits.device, dtype=torch.float64)  # [n]
    delta = beta - float(beta_bar)  # [n]

    z = logits.to(torch.float32)  # [n, V]
    log_p = torch.log_softmax(z * float(beta_bar), dim=-1)  # [n, V]
    p = log_p.exp()
    alive = p > 0  # -inf logits (masked vocabulary) contribute nothing, rather than 0 * inf = nan
    mean_z = torch.where(alive, p * z, 0.0).sum(-1, keepdim=True)  # [n, 1]  E_p[z]
    g = (z.gather(-1, labels) - mean_z).squeeze(-1)  # [n]
    v = torch.where(alive, p * (z - mean_z).square(), 0.0).sum(-1)  # [n]  Var_p[z], two-pass for stability

    # The exact gain is a small difference of two log-probabilities: float64 keeps the cancellation harmless.
    z64 = logits.to(torch.float64)
    at_beta = torch.log_softmax(z64 * beta.unsqueeze(-1), dim=-1).gather(-1, labels)
    at_bar = torch.log_softmax(z64 * float(beta_bar), dim=-1).gather(-1, labels)
    exact = (at_beta - at_bar).squeeze(-1)  # [n]
    approx = g.double() * delta - v.double() * delta.square() / 2  # [n]
    return {"delta": delta, "g": g, "v": v, "exact_gain": exact, "approx_gain": approx}


def _inverse_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """beta = 1/T [N] float64, with T clamped at MIN_TEMPERATURE as the sampler does."""
    return 1.0 / temperature.clamp_min(MIN_TEMPERATURE).double()


def _mean_beta(temperature: torch.Tensor) -> float:
    """Mean inverse temperature, computed as beta_0 + mean(beta - beta_0): for constant heads this is beta_0
    exactly (a plain float64 sum of N equal values can round), so delta is exactly 0; it is also more
    accurate when the betas are close to each other."""
    beta = _inverse_temperature(temperature)
    return float(beta[0] + (beta - beta[0]).mean())


def _load(tokenizer, data_files, max_length: int) -> list[dict]:
    paths: Sequence[str | Path] = [data_files] if isinstance(data_files, (str, Path)) else list(data_files)
    examples, _ = load_examples(paths, tokenizer, max_length=max_length)
    return examples


@torch.no_grad()
def _run(model, tokenizer, examples: list[dict], batch_size: int, beta_bar: float | None, return_logits: bool) -> dict:
    """One teacher-forced pass over `examples`; see teacher_forced_predictions for the result."""
    # Not modeling.teacher_forced: this pass keeps the collator's right-padded training batches, their labels and
    # full [B, L, V] logits for the decomposition.
    collator = DataCollatorForCompletion(tokenizer)
    device = model.get_input_embeddings().weight.device
    temperatures, top_ps, labels_out, logits_out = [], [], [], []
    terms: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(examples), batch_size):
        batch = collator(examples[start : start + batch_size])
        out = model(
            input_ids=batch["input_ids"].to(device),
            attention_mask=batch["attention_mask"].to(device),
            use_cache=False,  # one pass over whole sequences: a KV cache would only cost memory
        )
        # Position t predicts token t + 1: logits, T, P [B, L-1] against labels[:, 1:].
        labels = batch["labels"][:, 1:].to(device)  # [B, L-1]
        rows = (labels != IGNORE_INDEX).nonzero(as_tuple=True)  # (batch index [n], position [n])
        if rows[0].numel() == 0:
            continue
        logits = out.logits[:, :-1]  # [B, L-1, V], a view
        t = out.temperature[:, :-1][rows].float()  # [n]
        temperatures.append(t.cpu())
        top_ps.append(out.top_p[:, :-1][rows].float().cpu())
        y = labels[rows]  # [n]
        labels_out.append(y.cpu())
        chunk = max(1, CHUNK_ELEMENTS // logits.shape[-1])
        for i in range(0, y.numel(), chunk):
            piece = (rows[0][i : i + chunk], rows[1][i : i + chunk])
            z = logits[piece].float()  # [c, V] gathered chunk: the [n, V] rows are never built at once
            if return_logits:
                logits_out.append(z.cpu())
            if beta_bar is not None:
                # The sampler clamps T at MIN_TEMPERATURE, so the decomposition uses the same inverse temperature.
                beta = _inverse_temperature(t[i : i + chunk])
                for key, value in token_terms(z, y[i : i + chunk], beta, beta_bar).items():
                    terms.setdefault(key, []).append(value.cpu())
        del out, logits
    if not temperatures:
        raise ValueError("The data has no supervised tokens to evaluate (every completion was truncated away?).")
    result = {
        "temperature": torch.cat(temperatures),
        "top_p": torch.cat(top_ps),
        "labels": torch.cat(labels_out),
    }
    result["n_tokens"] = int(result["temperature"].numel())
    result["n_examples"] = len(examples)
    if beta_bar is not None:
        result["beta_bar"] = float(beta_bar)
        result.update({key: torch.cat(values) for key, values in terms.items()})
    if return_logits:
        result["logits"] = torch.cat(logits_out)
    return result


def teacher_forced_predictions(
    model,
    tokenizer,
    data_files,
    *,
    max_length: int = 4096,
    batch_size: int = 4,
    beta_bar: float | None = None,
    return_logits: bool = False,
) -> dict:
    """Run `model` teacher-forced over the completions in `data_files` (JSONL path or list of paths).

    Returns a dict over the N supervised tokens, in data order:
        temperature [N], top_p [N]  float32, the heads' predictions at the position predicting each token;
        labels [N]                  the reference tokens;
        n_tokens, n_examples        ints.
    With `beta_bar` also: beta_bar and the `token_terms` around it, delta, g, v, exact_gain, approx_gain [N].
    With `return_logits=True` also logits [N, V] float32 (small data only: N * V * 4 bytes).
    """
    _check_model(model)
    _check_batch_size(batch_size)
    if beta_bar is not None and not (math.isfinite(beta_bar) and beta_bar > 0):
        raise ValueError(f"beta_bar must be a finite inverse temperature > 0, got {beta_bar!r}.")
    examples = _load(tokenizer, data_files, max_length)
    return _run(model, tokenizer, examples, batch_size, beta_bar, return_logits)


def meanshift_from_calibration(model, tokenizer, data_files, **kw) -> tuple[float, float]:
    """MeanShift's static (T, P): the mean predicted temperature and top-p over the supervised tokens.

    `kw` go to teacher_forced_predictions (max_length, batch_size).
    """
    pred = teacher_forced_predictions(model, tokenizer, data_files, **kw)
    # float64 sums: a float32 mean over millions of tokens would drift.
    return float(pred["temperature"].double().mean()), float(pred["top_p"].double().mean())


def decomposition_summary(pred: dict) -> dict:
    """Aggregate the per-token terms of `teacher_forced_predictions(..., beta_bar=...)` into the report dict
    (see `decompose`)."""
    missing = [k for k in ("temperature", "top_p", "beta_bar", "delta", "g", "v", "exact_gain", "approx_gain") if k not in pred]
    if missing:
        raise ValueError(f"decomposition_summary needs teacher_forced_predictions(..., beta_bar=...); missing {missing}.")
    n = int(pred["delta"].numel())
    if n == 0:
        raise ValueError("decomposition_summary: no tokens.")
    delta = pred["delta"].double()
    g = pred["g"].double()
    v = pred["v"].double()
    first_order = g * delta  # [N]
    curvature = v * delta.square() / 2  # [N]
    e_g_delta = float(first_order.mean())
    e_g2, e_delta2 = float(g.square().mean()), float(delta.square().mean())
    beta_bar = float(pred["beta_bar"])
    varies = math.sqrt(e_delta2) > DELTA_RTOL * beta_bar and e_g2 > G_SQUARED_EPS
    alignment = e_g_delta / math.sqrt(e_g2 * e_delta2) if varies else 0.0
    report = {
        "n_tokens": n,
        "beta_bar": beta_bar,
        "temperature_of_mean_beta": 1.0 / beta_bar,
        "mean_temperature": float(pred["temperature"].double().mean()),
        "mean_top_p": float(pred["top_p"].double().mean()),
        "rms_delta": math.sqrt(e_delta2),
        "total_gain_exact": float(pred["exact_gain"].double().sum()),
        "total_gain_approx": float(pred["approx_gain"].double().sum()),
        "first_order_gain": float(first_order.sum()),
        "curvature_cost": float(curvature.sum()),
        "alignment_efficiency": alignment,
        # Strict ">": a token whose delta is 0 has neither gain nor cost and does not count as curvature-dominated.
        "curvature_share": float((curvature > first_order.abs()).double().mean()),
    }
    report["meanshift_temperature"] = report["mean_temperature"]  # MeanShift decodes at the arithmetic mean T
    report["meanshift_top_p"] = report["mean_top_p"]
    report["mean_gain_per_token"] = report["total_gain_exact"] / n
    report["mean_gain_per_token_approx"] = report["total_gain_approx"] / n
    report["summary"] = (
        f"{n:,} supervised tokens. Heads' mean T {report['mean_temperature']:.4f} (MeanShift's T), mean P "
        f"{report['mean_top_p']:.4f}; mean beta {beta_bar:.4f} (T = {1 / beta_bar:.4f}), rms delta "
        f"{report['rms_delta']:.4g}.\n"
        f"Log-likelihood gain of the per-token temperatures over constant T = 1/mean beta: "
        f"{report['total_gain_exact']:.4g} nats exact ({report['mean_gain_per_token']:.4g}/token), "
        f"{report['total_gain_approx']:.4g} by the 2nd-order approximation = "
        f"{report['first_order_gain']:.4g} first-order gain - {report['curvature_cost']:.4g} curvature cost.\n"
        f"Alignment efficiency {alignment:.3f} (cosine of g and delta; 1 = temperature moves all go the right "
        f"way, 0 = unaligned or no variation); curvature outweighs the first-order gain on "
        f"{report['curvature_share']:.1%} of tokens."
    )
    return report


def decompose(model, tokenizer, data_files, **kw) -> dict:
    """The inverse-temperature gain decomposition of the heads on the completions in `data_files`.

    Two teacher-forced passes: the first finds beta_bar = mean(1/T), the second computes the per-token terms
    around it. `kw` go to teacher_forced_predictions (max_length, batch_size).

    Returns: n_tokens, beta_bar, temperature_of_mean_beta (1/beta_bar), mean_temperature, mean_top_p,
    meanshift_temperature / meanshift_top_p (= the means: what MeanShift decodes with), rms_delta,
    total_gain_exact, total_gain_approx, first_order_gain, curvature_cost, mean_gain_per_token(_approx),
    alignment_efficiency, curvature_share and `summary`, a few lines of text.
    """
    _check_model(model)
    for key in ("beta_bar", "return_logits"):
        if key in kw:
            raise ValueError(f"decompose computes {key} itself; call teacher_forced_predictions to set it.")
    max_length = kw.pop("max_length", 4096)
    batch_size = kw.pop("batch_size", 4)
    if kw:
        raise TypeError(f"decompose got unexpected keyword arguments {sorted(kw)}; it takes max_length, batch_size.")
    _check_batch_size(batch_size)
    examples = _load(tokenizer, data_files, max_length)
    first = _run(model, tokenizer, examples, batch_size, None, False)
    beta_bar = _mean_beta(first["temperature"])
    second = _run(model, tokenizer, examples, batch_size, beta_bar, False)
    return decomposition_summary(second)
