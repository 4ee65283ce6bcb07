"""The reward objective: RewardTrainingArguments and `train_heads_reward` (what `autodeco train --objective reward` runs).

    from autodeco.training import RewardTrainingArguments, train_heads_reward
    summary = train_heads_reward("runs/heads", ["problems.jsonl"], RewardTrainingArguments("runs/rl", group_size=8))

`model` is a base (fresh heads) or an AutoDeco model or directory (e.g. likelihood-trained heads, trained further);
`problems` are benchmark JSONL paths (rows `problem`, `gt`, optional `id`, `kind`; loaded and prompted exactly as
`autodeco eval` does), a Benchmark, or a list of Problems. The reward is a built-in scorer (config.reward) or a
function fn(problem, completion) -> float (reward_fn=, or config.reward_fn "file.py:func"). The base stays frozen;
only the heads train (RewardTrainer, training/reward_trainer.py). Details: docs/training.md (reward objective).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Sequence

from autodeco.evaluation.benchmarks import Benchmark, Problem, build_prompt, load_benchmark
from autodeco.evaluation.generation import Engine, check_prompts_fit
from autodeco.evaluation.rewards import REWARDS, RewardFn, resolve_reward
from autodeco.locks import OutputDirLock
from autodeco.modeling import AutoDecoModelForCausalLM
from autodeco.modeling.io import load_tokenizer
from autodeco.training.arguments import AutoDecoTrainingArguments, _help
from autodeco.training.engines import check_engine_available
from autodeco.training.reward_trainer import REWARD_LOGGED_METRICS, RewardTrainer
from autodeco.training.train import _model_config, _resume_target, load_model_for_training

__all__ = ["OBJECTIVES", "REWARD_FIELDS", "RewardSettings", "RewardTrainingArguments", "load_problems", "train_heads_reward"]

# `autodeco train --objective`: the paper's likelihood objective (the default), or policy optimisation on a reward.
OBJECTIVES = ("likelihood", "reward")


@dataclass
class RewardSettings:
    """The reward objective's own settings (each a flag of `autodeco train`, read with --objective reward)."""

    group_size: int = field(default=8, metadata=_help(
        "reward objective: G, completions sampled per problem per rollout; advantages are normalised within each "
        "group (default 8)"))
    num_iterations: int = field(default=1, metadata=_help(
        "reward objective: optimizer steps on each sampled rollout (PPO epochs); > 1 uses the clipped importance "
        "ratio (default 1)"))
    clip_epsilon: float = field(default=0.2, metadata=_help(
        "reward objective: PPO/GRPO ratio clip, rho in [1 - eps, 1 + eps] (default 0.2)"))
    kl_coef: float = field(default=0.0, metadata=_help(
        "reward objective: weight of the per-token KL penalty to the starting heads (k3 estimator; default 0 = off, "
        "e.g. 0.04)"))
    entropy_coef: float = field(default=0.0, metadata=_help(
        "reward objective: weight of an entropy bonus on the sampling distribution (default 0 = off)"))
    reward: str = field(default="auto", metadata=_help(
        "reward objective: built-in reward, the evaluation's scorer: auto (each problem's kind), math, choice or "
        "exact (default auto)"))
    reward_fn: str | None = field(default=None, metadata=_help(
        "reward objective: a Python reward instead, FILE.py:FUNC or MODULE:FUNC, called fn(problem, completion) -> "
        "float (docs/training.md)"))
    max_new_tokens: int = field(default=512, metadata=_help(
        "reward objective: tokens per sampled completion at most (default 512)"))
    generation_batch_size: int = field(default=32, metadata=_help(
        "reward objective: sequences per generate call when sampling (default 32)"))
    template: str | None = field(default=None, metadata=_help(
        "reward objective: prompt template with {problem} and {instruction} (or a file holding one), as `autodeco "
        "eval --template` (default: the eval's prompt)"))


# Fields only the reward objective reads (`autodeco train` refuses them with --objective likelihood).
REWARD_FIELDS = tuple(f.name for f in dataclasses.fields(RewardSettings))


@dataclass
class RewardTrainingArguments(RewardSettings, AutoDecoTrainingArguments):
    """AutoDecoTrainingArguments plus RewardSettings. per_device_train_batch_size counts problems: a step sees
    per_device_train_batch_size x gradient_accumulation_steps x processes problems, group_size samples each."""

    per_device_train_batch_size: int = field(default=4, metadata=_help(
        "problems per micro-batch on each device (each sampled group_size times)"))
    gradient_accumulation_steps: int = field(default=1, metadata=_help(
        "micro-batches of problems per optimizer step; the loss is the token mean over all of them"))
    max_steps: int = field(default=200, metadata=_help("optimizer steps to train for"))
    learning_rate: float = field(default=1e-4, metadata=_help(
        "peak AdamW learning rate; policy-gradient signals are noisier and sparser than the likelihood's, so the "
        "small heads take a larger step than under the likelihood objective"))
    save_steps: float = field(default=50, metadata=_help("steps between checkpoints (heads, optimizer, rollout)"))

    def _check_autodeco_fields(self) -> None:
        super()._check_autodeco_fields()
        for name in ("group_size", "num_iterations", "max_new_tokens", "generation_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be a positive integer, got {value!r}.")
        if self.group_size < 2:
            raise ValueError(f"group_size (--group-size) must be >= 2 (advantages compare samples of one problem), "
                             f"got {self.group_size}; e.g. 8.")
        if not 0 <= self.clip_epsilon < 1:
            raise ValueError(f"clip_epsilon (--clip-epsilon) must be in [0, 1), got {self.clip_epsilon}; e.g. 0.2.")
        for name in ("kl_coef", "entropy_coef"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} (--{name.replace('_', '-')}) must be >= 0, got {getattr(self, name)}.")
        if self.reward not in REWARDS:
            raise ValueError(f"reward (--reward) must be one of {', '.join(REWARDS)}, got {self.reward!r}; or pass "
                             "--reward-fn FILE.py:FUNC.")
        if self.control_share:
            raise ValueError("--control-share applies to the likelihood objective only; drop it with --objective reward.")


def load_problems(problems) -> list[Problem]:
    """Benchmark JSONL path(s), a Benchmark, or Problems -> a list of Problems (ids unique across files)."""
    if isinstance(problems, Benchmark):
        loaded = list(problems.problems)
    elif isinstance(problems, (str, os.PathLike)):
        loaded = list(load_benchmark(str(problems)).problems)
    else:
        items = list(problems)
        if items and all(isinstance(p, Problem) for p in items):
            loaded = items
        else:
            loaded = [p for spec in items for p in load_problems(spec)]
    if not loaded:
        raise ValueError("train_heads_reward: no problems to train on; pass benchmark JSONL files with 'problem' and "
                         "'gt' rows.")
    seen = set()
    for p in loaded:
        if p.id in seen:  # the same id in two files: records and error messages must name one problem
            raise ValueError(f"problem id {p.id!r} appears twice in the training problems; give each row a unique 'id'.")
        seen.add(p.id)
    return loaded


def train_heads_reward(model, problems: str | os.PathLike | Sequence | Benchmark, config: RewardTrainingArguments,
                       *, reward_fn: RewardFn | None = None, engine: Engine | None = None, tokenizer=None,
                       dtype: str = "auto", trust_remote_code: bool = False, verbose: bool = True) -> dict:
    """Train the heads on a verifiable reward (module docstring). Returns the summary: problems, heads,
    fresh_heads, steps, train_loss, the final window's reward_mean / skipped_groups / mean T / P / entropy (/ kl),
    skipped_groups_total, output_dir."""
    if not isinstance(config, RewardTrainingArguments):
        raise TypeError(f"config must be a RewardTrainingArguments, got {type(config).__name__}.")
    # Settings, reward and problems are checked before a model is loaded.
    fn = resolve_reward(config.reward, reward_fn if reward_fn is not None else config.reward_fn)
    loaded = load_problems(problems)
    resume = _resume_target(config)
    check_engine_available(config.deepspeed)
    with OutputDirLock(config.output_dir, "train"):
        config.device  # sets up this process's place in the launch (process_index)
        if isinstance(model, (str, os.PathLike)):
            label = str(model)
            fresh = _model_config(label, trust_remote_code).get("model_type") != "autodeco"
            if tokenizer is None:
                base = None if fresh else _model_config(label, trust_remote_code).get("base_model_name_or_path")
                tokenizer = load_tokenizer(label, base)
        else:
            label, fresh = "the given model", not isinstance(model, AutoDecoModelForCausalLM)
            if tokenizer is None:
                tokenizer = load_tokenizer(model.config.name_or_path,
                                           getattr(model.config, "base_model_name_or_path", None))
        prompts = [build_prompt(p, tokenizer, config.template) for p in loaded]
        model = load_model_for_training(model, config, fresh=fresh, dtype=dtype, trust_remote_code=trust_remote_code)
        check_prompts_fit(model, tokenizer, ((p.benchmark, p.id, text) for p, text in zip(loaded, prompts)))
        trainer = RewardTrainer(model=model, args=config, problems=loaded, prompts=prompts, reward_fn=fn,
                                processing_class=tokenizer, engine=engine)
        result = trainer.train(resume_from_checkpoint=resume)
        trainer.save_model(config.output_dir)
        final = next((e for e in reversed(trainer.state.log_history) if "reward_mean" in e), {})
        summary = {"problems": len(loaded), "heads": config.heads, "fresh_heads": bool(fresh),
                   "steps": result.global_step, "train_loss": result.training_loss,
                   **{k: final[k] for k in REWARD_LOGGED_METRICS if k in final},
                   "skipped_groups_total": trainer.skipped_groups_total, "output_dir": str(config.output_dir)}
        if verbose and config.process_index == 0:
            window = ", ".join(f"{k} {summary[k]:.3f}" for k in ("reward_mean", "mean_temperature", "mean_top_p",
                                                                 "entropy", "kl") if k in summary)
            print(f"Trained the heads ({'fresh' if fresh else 'loaded from ' + label}) on a reward for "
                  f"{summary['steps']} steps ({len(loaded)} problems, G = {config.group_size}).\n"
                  f"Final logging window: {window or 'no log yet'}; skipped groups (equal rewards): "
                  f"{summary['skipped_groups_total']} in all on this process.\n"
                  f"Saved heads, config and tokenizer to {config.output_dir}.", flush=True)
        return summary
