"""Training losses for the AutoDeco heads: temperature, soft top-p and the control margin loss.

    >>> from autodeco.losses import temperature_loss, soft_top_p_loss
    >>> loss = temperature_loss(logits, T, labels) + soft_top_p_loss(logits, T, P, labels)
    >>> loss.backward()   # grads reach T and P (and through them the heads), never the logits

likelihood.py: the chunked closed-form kernels and the public losses; reference.py: the readable autograd
formulas the tests compare to; control.py: control_margin_loss and completion_means; reward.py: the reward
objective's policy log-probs, group advantages, clipped surrogate and KL. See docs/training.md.
"""

from autodeco.config import IGNORE_INDEX
from autodeco.losses.control import completion_means, control_margin_loss
from autodeco.losses.likelihood import (  # noqa: F401  (private kernels: imported by the tests and bench)
    DEFAULT_CHUNK_ELEMENTS,
    LOSS_MIN_TEMPERATURE,
    SOFT_TOP_P_EPS,
    _SoftTopPNLL,
    _supervised,
    _TemperatureNLL,
    soft_top_p_loss,
    temperature_loss,
)
from autodeco.losses.reward import clipped_surrogate, group_advantages, kl_penalty, policy_log_probs
from autodeco.losses.reference import _soft_top_p_loss_reference, _temperature_loss_reference  # noqa: F401

__all__ = [
    "IGNORE_INDEX",
    "SOFT_TOP_P_EPS",
    "LOSS_MIN_TEMPERATURE",
    "DEFAULT_CHUNK_ELEMENTS",
    "temperature_loss",
    "soft_top_p_loss",
    "control_margin_loss",
    "completion_means",
    "policy_log_probs",
    "group_advantages",
    "clipped_surrogate",
    "kl_penalty",
]
