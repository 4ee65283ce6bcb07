"""Fused head losses: the training step from the final hidden states, never the logits of a whole sequence.

    out = fused_forward(model, base_kwargs, labels)      # model: AutoDecoModelForCausalLM, labels [B, S]
    out.loss.backward()                                   # gradients reach the heads only

The base runs with `logits_to_keep=1` (it computes the last position's logits only, [B, 1, V]); a forward
hook on its decoder keeps the final hidden states h [B, S, H]. Then, chunk by chunk of positions (C rows, C =
DEFAULT_CHUNK_ELEMENTS // V, 55 at V = 151,936), z = transform(h_c W^T + b) [C, V] is computed with no
gradient, where `transform` is the base's own final logit soft-capping / scaling (`logit_transform`); from
the same chunk come the top-p head's statistics (softmax of z / T), its P, and the closed-form nll, dnll/dT,
dnll/dP of both losses (autodeco/losses.py's kernels). Only [N] vectors survive a chunk, so nothing
backward needs is [S, V]: backward is a multiply (no recomputation), exactly as the chunked losses do.
The base's last-position logits are compared with this module's own every step (`check_logit_transform`),
so an unknown logit transform fails loudly instead of training on wrong logits. Memory and time:
bench/bench_train_memory.py; the design and its limits: docs/engines.md.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# Private kernels of the chunked losses (moving to autodeco/losses/likelihood.py in the redesign, issue 14).
from autodeco.config import IGNORE_INDEX
from autodeco.features import distribution_stats, scale_logits
from autodeco.losses.likelihood import (
    LOSS_MIN_TEMPERATURE,
    _compute_dtype,
    _easy_token_draws,
    _rows_per_chunk,
    _soft_top_p_chunk,
    _temperature_chunk,
    _zero_connected,
)

__all__ = ["FusedHeadOutput", "FusedLossError", "LogitTransform", "check_logit_transform", "fused_forward",
           "fused_head_losses", "logit_transform", "supports_fused_loss"]


class FusedLossError(ValueError):
    """The base cannot be trained with the fused loss (fused_loss=False uses the full logits). A ValueError, so
    the CLI reports it in one line."""


@dataclass(frozen=True)
class LogitTransform:
    """What the base applies to lm_head's output, in the base's order: x multiplier, / divisor, soft-cap."""

    multiplier: float | None = None  # Cohere: logits * logit_scale
    divisor: float | None = None  # Granite: logits / logits_scaling
    softcap: float | None = None  # Gemma 2/3: tanh(logits / cap) * cap

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        # The same ops with the same Python floats as the bases' forwards, so the result is bit-identical.
        if self.multiplier is not None:
            logits = logits * self.multiplier
        if self.divisor is not None:
            logits = logits / self.divisor
        if self.softcap is not None:
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits

    def describe(self) -> str:
        parts = [f"x {self.multiplier:g}" if self.multiplier is not None else "",
                 f"/ {self.divisor:g}" if self.divisor is not None else "",
                 f"softcap {self.softcap:g}" if self.softcap is not None else ""]
        return ", ".join(p for p in parts if p) or "none"


def logit_transform(base: torch.nn.Module) -> LogitTransform:
    """The final logit transform of a transformers causal LM, read from its config (checked every step)."""
    configs = [base.config]
    text = base.config.get_text_config(decoder=True)
    if text is not base.config:
        configs.insert(0, text)

    def first(name):
        return next((getattr(c, name) for c in configs if getattr(c, name, None) is not None), None)

    multiplier = getattr(base, "logit_scale", None)  # Cohere keeps config.logit_scale on the model
    if not isinstance(multiplier, (int, float)) or isinstance(multiplier, bool):
        multiplier = None
    divisor = first("logits_scaling")
    softcap = first("final_logit_softcapping")
    return LogitTransform(multiplier=multiplier, divisor=divisor, softcap=softcap)


def supports_fused_loss(model) -> bool:
    """Whether `model` (AutoDecoModelForCausalLM) can train with the fused loss: the base takes logits_to_keep
    and has a separate decoder module whose output feeds its output embedding, and the heads use our own feature
    arithmetic and loss (the official variants train through the full-logits path)."""
    if model.config.feature_arithmetic != "exact" or model.config.soft_top_p_official_log:
        return False
    base = model.llm
    decoder = getattr(base, "base_model", None)
    return bool(model._base_takes_logits_to_keep) and decoder is not None and decoder is not base and \
        base.get_output_embeddings() is not None


@contextlib.contextmanager
def _projection(lm_head: torch.nn.Module):
    """Yields project(h [C, H]) -> h W^T + b exactly as lm_head computes it.

    Under DeepSpeed ZeRO-3 (partitioned weight, ds_id) and FSDP2 with lm_head in its own group (DTensor weight),
    the module itself is called, so the engine's hooks gather the weight for each chunk and release it after;
    a plain weight is used directly (no module hooks, e.g. AutoDeco's hidden-state capture, per chunk).
    """
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if hasattr(weight, "ds_id") or hasattr(weight, "device_mesh") or not isinstance(lm_head, torch.nn.Linear):
        yield lm_head
    else:
        yield lambda h: F.linear(h, weight, bias)


class _Linearized(torch.autograd.Function):
    """value [N] with d value / d x = dx (and / d y = dy): the closed-form gradients the kernels computed."""

    @staticmethod
    def forward(ctx, value, x, dx, y, dy):
        ctx.save_for_backward(dx, dy if dy is not None else dx)
        ctx.has_y = y is not None
        return value.clone()

    @staticmethod
    def backward(ctx, grad):
        dx, dy = ctx.saved_tensors
        return None, grad * dx, None, (grad * dy if ctx.has_y else None), None


@dataclass
class FusedHeadOutput:
    temperature: torch.Tensor  # [B, S] float32, carries gradients to the temperature head
    top_p: torch.Tensor  # [B, S] float32, carries gradients to the top-p head
    loss: torch.Tensor  # scalar: temperature_loss + top_p_loss (the enabled ones)
    temperature_loss: torch.Tensor | None
    top_p_loss: torch.Tensor | None


def fused_head_losses(hidden, labels, *, lm_head, transform, temperature_head, top_p_head, config,
                      chunk_rows: int | None = None, generator: torch.Generator | None = None) -> FusedHeadOutput:
    """Heads and losses from hidden [B, S, H] and unshifted labels [B, S]; logits only ever [C, V].

    Equal (within float rounding of the chunked matmul) to AutoDecoModelForCausalLM.forward with labels:
    temperature_loss(z[:, :-1], T[:, :-1], labels[:, 1:]) + soft_top_p_loss(...), with the same easy-token
    draws (one torch.rand over the supervised positions, in the same order, from `generator`).
    """
    device = hidden.device.type
    # The logits as the base computes them (under the caller's autocast, e.g. Trainer bf16=True); the heads and
    # losses in float32, as AutoDecoModelForCausalLM.forward does.
    base_autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
    with torch.autocast(device_type=device, enabled=False):
        return _fused_float32(hidden, labels, lm_head, transform, temperature_head, top_p_head, config,
                              chunk_rows, generator, base_autocast)


def _fused_float32(hidden, labels, lm_head, transform, temperature_head, top_p_head, config, chunk_rows, generator,
                   base_autocast=(False, None)):
    batch, seq, width = hidden.shape
    weight = lm_head.weight
    vocab = tuple(getattr(weight, "ds_shape", None) or weight.shape)[0]  # ZeRO-3 keeps the full shape in ds_shape
    flat_hidden = hidden.reshape(-1, width)  # [B*S, H]
    temperature = temperature_head(hidden)  # [B, S]
    flat_t = temperature.reshape(-1)
    # Position (b, s) predicts labels[b, s + 1]; the last position of each row predicts nothing.
    targets = torch.full((batch, seq), IGNORE_INDEX, dtype=torch.long, device=hidden.device)
    targets[:, :-1] = labels[:, 1:].to(hidden.device)
    targets = targets.reshape(-1)
    supervised = targets != IGNORE_INDEX  # [B*S]
    rows = supervised.nonzero().squeeze(1)  # [N], in the order the chunked losses enumerate them
    n = rows.numel()
    train_t, train_p = bool(config.train_temperature), bool(config.train_top_p)
    ratio = float(config.easy_token_mask_ratio)
    draws = _easy_token_draws(n, generator, hidden.device) if train_t and ratio > 0 and n else None

    cdt = _compute_dtype(hidden, temperature)
    t_rows = flat_t[rows].to(cdt).clamp_min(LOSS_MIN_TEMPERATURE)  # [N], grads -> temperature head
    beta = t_rows.detach().reciprocal()
    buffers = {k: torch.zeros(n, dtype=cdt, device=hidden.device)
               for k in ("t_nll", "t_dt", "t_w", "p_nll", "p_dt", "p_dp", "p_w")}
    argmax = torch.zeros(n, dtype=torch.long, device=hidden.device)
    use_stats = top_p_head.use_stats
    stats_all = torch.zeros(batch * seq, 4, dtype=torch.float32, device=hidden.device) if use_stats else None
    rows_per_chunk = chunk_rows or _rows_per_chunk(None, vocab)
    done = 0  # supervised rows handled so far
    with _projection(lm_head) as project:
        for start in range(0, batch * seq, rows_per_chunk):
            stop = min(start + rows_per_chunk, batch * seq)
            h = flat_hidden[start:stop]
            t = flat_t[start:stop]
            with torch.no_grad():
                with torch.autocast(device_type=h.device.type, enabled=base_autocast[0], dtype=base_autocast[1]):
                    logits = transform(project(h))  # [C, V], the base's dtype and ops
                stats = distribution_stats(scale_logits(logits, t.detach())) if use_stats else None
                if use_stats:
                    stats_all[start:stop] = stats
                # P's values for this chunk's kernels. Nothing of a chunk outlives it (no autograd graph here): a
                # small tensor kept per chunk would pin glibc's heap above each chunk's freed [C, V] buffers.
                p = top_p_head(h, t, stats)  # [C]
            local = supervised[start:stop].nonzero().squeeze(1)
            c = local.numel()
            if c == 0:
                continue
            span = slice(done, done + c)
            done += c
            label = targets[start:stop][local]
            with torch.no_grad():
                # [c, V] for the kernels, which consume their input: the chunk itself when every row is supervised
                sup = logits if c == logits.shape[0] else logits[local]
                del logits
                if train_t:
                    nll, dt, w, am = _temperature_chunk(sup.clone() if train_p else sup, label, beta[span],
                                                        t_rows.requires_grad)
                    buffers["t_nll"][span], buffers["t_dt"][span], buffers["t_w"][span] = nll, dt, w
                    argmax[span] = am
                if train_p:
                    p_rows = p[local].to(cdt)
                    need = t_rows.requires_grad or any(q.requires_grad for q in top_p_head.parameters())
                    nll, dt, dp, w = _soft_top_p_chunk(sup, label, beta[span], p_rows, float(config.soft_top_p_alpha),
                                                       need)
                    for key, value in zip(("p_nll", "p_dt", "p_dp", "p_w"), (nll, dt, dp, w)):
                        buffers[key][span] = value
            del sup
    # P with its graph, in one call over every position, exactly as AutoDecoModelForCausalLM.forward computes it.
    top_p = top_p_head(hidden, temperature, stats_all.reshape(batch, seq, 4) if use_stats else None)
    dft = bool(config.dft)

    temperature_loss = top_p_loss = None
    if train_t:
        if n == 0:
            temperature_loss = _zero_connected(temperature)
        else:
            nll = _Linearized.apply(buffers["t_nll"], t_rows, buffers["t_dt"], None, None)
            keep = torch.ones_like(nll) if draws is None else \
                1.0 - ((argmax == targets[rows]) & (draws < ratio)).to(cdt)
            kept = keep.sum()
            temperature_loss = _zero_connected(temperature) if float(kept) == 0 else \
                ((buffers["t_w"] if dft else 1.0) * keep * nll).sum() / kept
    if train_p:
        if n == 0:
            top_p_loss = _zero_connected(temperature, top_p)
        else:
            p_rows = top_p.reshape(-1)[rows].to(cdt)
            nll = _Linearized.apply(buffers["p_nll"], t_rows, buffers["p_dt"], p_rows, buffers["p_dp"])
            top_p_loss = ((buffers["p_w"] if dft else 1.0) * nll).sum() / n
    enabled = [x for x in (temperature_loss, top_p_loss) if x is not None]
    total = sum(enabled[1:], enabled[0]) if enabled else temperature.new_zeros(())
    return FusedHeadOutput(temperature, top_p, total, temperature_loss, top_p_loss)


def check_logit_transform(reference: torch.Tensor, hidden_last: torch.Tensor, lm_head, transform) -> None:
    """Raise FusedLossError unless transform(lm_head(hidden_last)) equals the base's own logits `reference`."""
    with torch.no_grad(), _projection(lm_head) as project:
        ours = transform(project(hidden_last)).float()
    reference = reference.float()
    scale = reference.abs().amax().clamp_min(1.0)
    tol = 1e-5 if reference.dtype == torch.float32 and hidden_last.dtype == torch.float32 else 2e-2
    error = (ours - reference).abs().amax() / scale
    if not bool(error <= tol):
        raise FusedLossError(
            f"The fused loss recomputes the base's logits as lm_head(h) with final transform "
            f"({transform.describe()}), but they differ from the base's own by {float(error):.2e} (relative): "
            "this base transforms its logits in a way autodeco does not know. Train with the full logits instead "
            "(AutoDecoTrainer(fused_loss=False); CLI: autodeco train --no-fused-loss)."
        )


def fused_forward(model, base_kwargs: dict, labels: torch.Tensor, *, chunk_rows: int | None = None):
    """Run `model.llm` for training without full logits -> (base outputs with logits [B, 1, V], FusedHeadOutput).

    `base_kwargs` are what AutoDecoModelForCausalLM.forward passes to its base (no logits_to_keep).
    """
    if not supports_fused_loss(model):
        raise FusedLossError(
            f"{type(model.llm).__name__} does not take logits_to_keep or has no separate decoder module: the fused "
            "loss cannot skip its full logits. Train with fused_loss=False."
        )
    base = model.llm
    captured = []
    # The decoder's output (last_hidden_state) is the input of the output embedding in transformers' causal LMs;
    # check_logit_transform verifies it every step.
    handle = base.base_model.register_forward_hook(
        lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output.last_hidden_state))
    try:
        outputs = base(**{**base_kwargs, "logits_to_keep": 1, "output_hidden_states": False})
    finally:
        handle.remove()
    if len(captured) != 1:
        raise FusedLossError(f"expected one decoder call in {type(base).__name__}'s forward, saw {len(captured)}.")
    hidden = captured[0]
    if hidden.shape[:2] != labels.shape:
        raise FusedLossError(f"decoder output {tuple(hidden.shape)} does not match labels {tuple(labels.shape)}.")
    lm_head = base.get_output_embeddings()
    transform = logit_transform(base)
    check_logit_transform(outputs.logits[:, -1:], hidden[:, -1:], lm_head, transform)  # [B, 1, V]: the base's shape
    heads = fused_head_losses(hidden, labels, lm_head=lm_head, transform=transform,
                              temperature_head=model.temperature_head, top_p_head=model.top_p_head,
                              config=model.config, chunk_rows=chunk_rows)
    return outputs, heads
