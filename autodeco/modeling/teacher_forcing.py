"""Teacher forcing: the heads' T and P (and optionally the raw logits) at every token of given completions.

    >>> rows = [(prompt_ids, completion_ids), ...]
    >>> for r in teacher_forced(model, rows, batch_size=8):
    ...     r.temperature, r.top_p          # [m] float32, m = len(completion_ids): the values token j was scored with

Rows are sorted by length, left padded (position ids follow the attention mask, as in generate) and batched;
only the last max(m) + 1 positions are kept (logits_to_keep), so memory does not grow with prompt length.
Works with any model whose forward returns `temperature` / `top_p` (AutoDecoModelForCausalLM); with
`logits=True` it also returns the raw logits [m, V] that predicted each completion token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

__all__ = ["TeacherForced", "teacher_forced"]


@dataclass
class TeacherForced:
    """One row's values at its completion tokens: position j is what predicted completion token j."""

    temperature: torch.Tensor | None  # [m] float32; None for a model without heads (a plain base)
    top_p: torch.Tensor | None  # [m] float32; None for a model without heads
    logits: torch.Tensor | None = None  # [m, V] float32, with logits=True


@torch.no_grad()
def teacher_forced(
    model,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 8,
    *,
    logits: bool = False,
    device: str | torch.device | None = "cpu",
    on_batch: Callable[[int], None] | None = None,
) -> list[TeacherForced]:
    """Per-row TeacherForced for (prompt ids, completion ids) rows, in the order given.

    device: where the results go ("cpu" by default; None keeps them on the model's device). on_batch(n) is
    called after each batch of n rows (a progress bar's update). Each completion needs at least one token.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}.")
    for index, (_, completion) in enumerate(rows):
        if len(completion) == 0:
            raise ValueError(f"row {index} has an empty completion: there is no token to score.")
    model_device = model.get_input_embeddings().weight.device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    results: list[TeacherForced | None] = [None] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        sequences = [list(rows[i][0]) + list(rows[i][1]) for i in chunk]
        width = max(len(s) for s in sequences)
        keep = max(len(rows[i][1]) for i in chunk) + 1
        input_ids = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, W]; pad id is irrelevant (masked)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, W]
        for row, seq in enumerate(sequences):
            input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, width - len(seq):] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # [B, W]
        out = model(input_ids=input_ids.to(model_device), attention_mask=attention_mask.to(model_device),
                    position_ids=position_ids.to(model_device), use_cache=False, logits_to_keep=keep)
        heads = getattr(out, "temperature", None) is not None
        t_all = out.temperature.float() if heads else None  # [B, keep]
        p_all = out.top_p.float() if heads else None
        z_all = out.logits[:, -keep:] if logits else None  # [B, keep, V]
        if device is not None and heads:
            t_all, p_all = t_all.to(device), p_all.to(device)
        for row, index in enumerate(chunk):
            m = len(rows[index][1])
            # Kept index k is position W - keep + k; completion token j sits at W - m + j, predicted at W - m + j - 1.
            window = slice(keep - m - 1, keep - 1)
            z = None
            if z_all is not None:
                z = z_all[row, window].float()
                z = z.to(device) if device is not None else z
            results[index] = TeacherForced(t_all[row, window] if heads else None,
                                           p_all[row, window] if heads else None, z)
        if on_batch is not None:
            on_batch(len(chunk))
    return results  # type: ignore[return-value]
