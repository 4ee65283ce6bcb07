"""Training AutoDeco heads on a frozen base: the settings dataclass, the Trainer, and `train_heads`.

    from autodeco.training import AutoDecoTrainingArguments, train_heads
    summary = train_heads("Qwen/Qwen2.5-0.5B", ["train.jsonl"], AutoDecoTrainingArguments("runs/heads"))

arguments.py (AutoDecoTrainingArguments: the paper's defaults with reasons, autodeco's own fields),
trainer.py (AutoDecoTrainer), train.py (train_heads, load_model_for_training), reward.py + reward_trainer.py (the
reward objective: RewardTrainingArguments, train_heads_reward, RewardTrainer); the decoding-control settings file is
autodeco.control's (re-exported here). Command line: `autodeco train` (autodeco/cli/train.py); docs/training.md.
"""

from autodeco.training.arguments import (
    DEFAULT_TRAINING_ARGUMENTS,
    FORCED_TRAINING_ARGUMENTS,
    HEADS_CHOICES,
    AutoDecoTrainingArguments,
    build_training_arguments,
)
from autodeco.control import CONTROL_SETTINGS_NAME, load_control_settings, save_control_settings
from autodeco.training.train import load_model_for_training, train_heads
from autodeco.training.reward import (
    OBJECTIVES,
    REWARD_FIELDS,
    RewardSettings,
    RewardTrainingArguments,
    load_problems,
    train_heads_reward,
)
from autodeco.training.reward_trainer import REWARD_LOGGED_METRICS, RewardTrainer
from autodeco.training.engines import describe_engine
from autodeco.training.trainer import (
    CONTROL_LOGGED_METRICS,
    LOGGED_METRICS,
    AutoDecoTrainer,
    head_state,
    prepare_model_for_training,
    trainable_parameter_names,
)

__all__ = [
    "AutoDecoTrainer",
    "AutoDecoTrainingArguments",
    "CONTROL_LOGGED_METRICS",
    "CONTROL_SETTINGS_NAME",
    "DEFAULT_TRAINING_ARGUMENTS",
    "FORCED_TRAINING_ARGUMENTS",
    "HEADS_CHOICES",
    "LOGGED_METRICS",
    "OBJECTIVES",
    "REWARD_LOGGED_METRICS",
    "REWARD_FIELDS",
    "RewardSettings",
    "RewardTrainer",
    "RewardTrainingArguments",
    "build_training_arguments",
    "describe_engine",
    "head_state",
    "load_control_settings",
    "load_model_for_training",
    "prepare_model_for_training",
    "save_control_settings",
    "train_heads",
    "trainable_parameter_names",
    "load_problems",
    "train_heads_reward",
]
