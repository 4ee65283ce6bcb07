"""The control margin loss: commands like "Answer with low randomness." should move the heads' mean T and P.

    loss = control_margin_loss(completion_means(t_plain, labels_plain), completion_means(t_cmd, labels_cmd),
                               direction, margin=0.1)

direction [K]: +1 for a high command (the commanded mean should be higher), -1 for a low one. The trainer adds
`control_weight * (margin loss on mean T + on mean P)` for batches that carry `control_pairs`
(autodeco.data.DataCollatorWithControl). See docs/control.md.
"""

from __future__ import annotations

import torch

from autodeco.config import IGNORE_INDEX

__all__ = ["control_margin_loss", "completion_means"]


def control_margin_loss(plain_mean: torch.Tensor, commanded_mean: torch.Tensor, direction: torch.Tensor,
                        margin: float) -> torch.Tensor:
    """mean_k relu(margin - direction_k * (commanded_mean_k - plain_mean_k)): a margin ranking loss.

    plain_mean, commanded_mean: [K] a row's mean predicted T (or P) without and with the command;
    direction: [K] +1 (high command: the commanded mean should be higher) or -1 (low). Zero once every
    commanded mean is at least `margin` on the right side of its plain one. K = 0 gives 0 (kept in the graph).
    """
    if not (plain_mean.dim() == 1 and plain_mean.shape == commanded_mean.shape == direction.shape):
        raise ValueError(
            f"control_margin_loss: plain_mean {tuple(plain_mean.shape)}, commanded_mean {tuple(commanded_mean.shape)} "
            f"and direction {tuple(direction.shape)} must all be the same 1-D shape [K]."
        )
    if not margin >= 0:
        raise ValueError(f"control_margin_loss: margin must be >= 0, got {margin!r}.")
    if plain_mean.numel() == 0:
        return (commanded_mean.sum() + plain_mean.sum()) * 0.0
    direction = direction.to(commanded_mean.dtype)
    return torch.relu(margin - direction * (commanded_mean - plain_mean)).mean()


def completion_means(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Each row's mean of `values` (T or P, [B, L]) over its supervised tokens -> [B] float32.

    Position i predicts label i + 1 (as in the losses), so values[:, :-1] is averaged where labels[:, 1:] != -100.
    A row with no supervised token gives 0.
    """
    if values.shape != labels.shape:
        raise ValueError(f"completion_means: values {tuple(values.shape)} and labels {tuple(labels.shape)} differ.")
    mask = (labels[:, 1:] != IGNORE_INDEX).to(values.device)  # [B, L-1]
    shifted = values[:, :-1].float()  # [B, L-1]
    total = torch.where(mask, shifted, torch.zeros_like(shifted)).sum(dim=1)  # [B]
    return total / mask.sum(dim=1).clamp_min(1)
