"""The two AutoDeco heads: per-token temperature and top-p predicted from the base model's final hidden state.

    T = max_temperature * sigmoid(MLP_T(h))                     h: [..., H]      -> T: [...]
    P = sigmoid(MLP_P([h, T.detach(), stats(softmax(z / T))]))  stats: [..., 4]  -> P: [...]

Each MLP is Linear(in, head_hidden_size) - ReLU - Linear(head_hidden_size, 1), as in the paper. The heads
compute in float32 whatever the base dtype, so a bf16 base does not quantise T and P.

Fresh heads start at T = 1 and P = INITIAL_TOP_P for every token (the last layer's weights are zero), so an
untrained model decodes like plain sampling with a mild nucleus, and training moves them from there.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from autodeco.features import NUM_DISTRIBUTION_STATS

INITIAL_TEMPERATURE = 1.0
INITIAL_TOP_P = 0.95


def _logit(x: float) -> float:
    return math.log(x / (1.0 - x))


class HeadMLP(nn.Sequential):
    """Linear(in, hidden) - ReLU - Linear(hidden, 1); `forward` returns [..., 1] float32 pre-activations."""

    def __init__(self, in_features: int, hidden: int):
        super().__init__(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, _, last = self
        # Upcast weights too, so heads stay float32 even if a user casts the whole model to bf16.
        x = torch.relu(nn.functional.linear(x.float(), first.weight.float(), first.bias.float()))
        return nn.functional.linear(x, last.weight.float(), last.bias.float())

    def reset_to_constant(self, output_bias: float, generator: torch.Generator | None = None) -> None:
        first, _, last = self
        with torch.no_grad():
            bound = 1.0 / math.sqrt(first.in_features)
            first.weight.uniform_(-bound, bound, generator=generator)
            first.bias.uniform_(-bound, bound, generator=generator)
            last.weight.zero_()
            last.bias.fill_(output_bias)


class TemperatureHead(nn.Module):
    """h [..., H] -> T [...] in (0, max_temperature)."""

    def __init__(self, hidden_size: int, head_hidden_size: int, max_temperature: float):
        super().__init__()
        self.max_temperature = float(max_temperature)
        self.mlp = HeadMLP(hidden_size, head_hidden_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.max_temperature * torch.sigmoid(self.mlp(hidden).squeeze(-1))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # Start at T = 1 when the range allows it, else in the middle of the range.
        start = min(INITIAL_TEMPERATURE / self.max_temperature, 0.5)
        self.mlp.reset_to_constant(_logit(start), generator)


class TopPHead(nn.Module):
    """[h, T, stats] -> P [...] in (0, 1). Without `use_stats` the input is [h, T]."""

    def __init__(self, hidden_size: int, head_hidden_size: int, use_stats: bool = True):
        super().__init__()
        self.use_stats = use_stats
        in_features = hidden_size + 1 + (NUM_DISTRIBUTION_STATS if use_stats else 0)
        self.mlp = HeadMLP(in_features, head_hidden_size)

    def forward(self, hidden: torch.Tensor, temperature: torch.Tensor, stats: torch.Tensor | None) -> torch.Tensor:
        # T is an input feature, not something this head may push on: its gradient stays in the temperature head.
        features = [hidden.float(), temperature.detach().float().unsqueeze(-1)]
        if self.use_stats:
            if stats is None:
                raise ValueError("TopPHead(use_stats=True) needs `stats` of shape [..., 4]; got None.")
            features.append(stats.float())
        return torch.sigmoid(self.mlp(torch.cat(features, dim=-1)).squeeze(-1))

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        self.mlp.reset_to_constant(_logit(INITIAL_TOP_P), generator)
