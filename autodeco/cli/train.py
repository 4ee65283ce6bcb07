"""`autodeco train`: train the temperature and top-p heads on a frozen base from JSONL data (training.train_heads).

    autodeco train --model Qwen/Qwen2.5-0.5B --data train.jsonl --output-dir runs/heads           # fresh heads
    autodeco train --model runs/heads --data more.jsonl --output-dir runs/heads2 --heads top_p    # continue
    autodeco train ... --resume                    # continue the last checkpoint-* in --output-dir
    autodeco train ... --save-steps 50 --report-to none        # every TrainingArguments field is a flag
    autodeco train ... --control-share 0.3 [--control-margin 0.1] [--control-weight 1.0]   # decoding control
    autodeco train --objective reward --model runs/heads --data problems.jsonl --output-dir runs/rl --group-size 8
    accelerate launch --config_file configs/accelerate/ddp.yaml -m autodeco.cli train ...        # several GPUs

The subcommand's parser is an HfArgumentParser over AutoDecoTrainingArguments and RewardSettings (the parser class of every
subcommand is autodeco.cli.args.CommandParser), so each field is a flag; `--trainer-arg KEY=VALUE` stays as a
compatibility alias for the TrainingArguments fields. Defaults and their reasons: autodeco/training/arguments.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import typing

from transformers import TrainingArguments

from autodeco.cli.args import (
    DTYPE_CHOICES,
    CommandParser,
    add_engine_flags,
    key_value,
    non_negative_float,
    positive_float,
    positive_int,
    ratio,
    read_template,
    vllm_kwargs,
)
from autodeco.training import (
    FORCED_TRAINING_ARGUMENTS,
    OBJECTIVES,
    REWARD_FIELDS,
    AutoDecoTrainingArguments,
    RewardSettings,
    RewardTrainingArguments,
    train_heads,
    train_heads_reward,
)
from autodeco.validation import check_input_file
from autodeco.vllm.engine import VLLMEngine  # imports no vLLM itself: only VLLMEngine() does

__all__ = ["cmd_train", "parse_trainer_args", "register"]

# TrainingArguments fields that had their own flag before every field became one: `--trainer-arg` must not set
# them a second way.
DEDICATED_FLAGS = {
    "output_dir": "--output-dir",
    "max_steps": "--max-steps",
    "learning_rate": "--learning-rate",
    "per_device_train_batch_size": "--per-device-train-batch-size",
    "gradient_accumulation_steps": "--gradient-accumulation-steps",
    "seed": "--seed",
    "resume_from_checkpoint": "--resume",
}
TRAINER_ARG_HELP = (
    "python -c \"import transformers; help(transformers.TrainingArguments)\" lists them, or see "
    "https://huggingface.co/docs/transformers/main_classes/trainer#transformers.TrainingArguments"
)
# Stricter argparse types than the dataclass annotations give (a usage error names the flag, exit 2).
_TYPES = {
    "max_steps": positive_int, "per_device_train_batch_size": positive_int, "gradient_accumulation_steps": positive_int,
    "learning_rate": positive_float, "max_length": positive_int, "easy_token_mask_ratio": ratio,
    "soft_top_p_alpha": positive_float, "max_temperature": positive_float, "head_hidden_size": positive_int,
    "control_share": ratio, "control_margin": non_negative_float, "control_weight": non_negative_float,
    "group_size": positive_int, "num_iterations": positive_int, "clip_epsilon": ratio, "kl_coef": non_negative_float,
    "entropy_coef": non_negative_float, "max_new_tokens": positive_int, "generation_batch_size": positive_int,
}
_METAVARS = {"control_share": "SHARE", "control_margin": "MARGIN", "control_weight": "WEIGHT", "control_seed": "SEED",
             "group_size": "G", "reward_fn": "FILE.py:FUNC", "template": "TEXT_OR_FILE"}
_FIELDS = tuple(f.name for f in dataclasses.fields(RewardTrainingArguments) if f.init)
_LIKELIHOOD_DEFAULTS = {f.name: f.default for f in dataclasses.fields(AutoDecoTrainingArguments) if f.init}
# Fields whose default depends on --objective: the parser leaves them unset, and the objective's dataclass fills them.
_OBJECTIVE_DEFAULTS = {f.name: f.default for f in dataclasses.fields(RewardTrainingArguments)
                       if f.name in _LIKELIHOOD_DEFAULTS and f.default != _LIKELIHOOD_DEFAULTS[f.name]}
_TRAINER_FIELDS = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
# Fields whose default is computed when the dataclass is built (use_cpu: no accelerator here; report_to: is
# tensorboard installed): the parser leaves them unset unless given, so the dataclass computes them.
_COMPUTED_DEFAULTS = tuple(f.name for f in dataclasses.fields(AutoDecoTrainingArguments)
                           if f.init and f.default_factory is not dataclasses.MISSING
                           and f.default_factory.__module__.startswith("autodeco"))


def register(subparsers) -> argparse.ArgumentParser:
    """Add `train` to `subparsers` (made by autodeco.cli.build_parser, whose parser class is CommandParser)."""
    p = subparsers.add_parser(
        "train",
        dataclass_types=[AutoDecoTrainingArguments, RewardSettings],
        usage="autodeco train [--objective likelihood|reward] --model BASE_OR_AUTODECO_DIR --data FILE [FILE ...] "
              "--output-dir DIR [--heads HEADS] [--resume [CHECKPOINT_DIR]] [--control-share SHARE] [--group-size G] "
              "[--reward-fn FILE.py:FUNC] [any flag below ...]",
        help="train the temperature / top-p heads on a frozen base from JSONL data",
        description="Train AutoDeco heads on a frozen base model with transformers' Trainer. Checkpoints "
        "(heads + optimizer/scheduler/RNG state) go to OUTPUT_DIR/checkpoint-*; the final heads, config and "
        "tokenizer to OUTPUT_DIR. Every transformers.TrainingArguments field is a flag (--save-steps 50, "
        "--lr-scheduler-type linear, --report-to none, ...); the defaults that differ from Trainer's follow the paper.",
        epilog="Several processes: accelerate launch --config_file configs/accelerate/ddp.yaml -m autodeco.cli train ...",
    )
    actions = {a.dest: a for a in p._actions if a.option_strings}
    actions["output_dir"].required = True
    actions["output_dir"].help = "directory for checkpoints (checkpoint-*) and the final heads, config and tokenizer"
    for dest, kind in _TYPES.items():
        actions[dest].type = kind
    for dest, metavar in _METAVARS.items():
        actions[dest].metavar = metavar
    for dest, reward_default in _OBJECTIVE_DEFAULTS.items():
        actions[dest].help = (f"{actions[dest].help.rstrip()} (default {_LIKELIHOOD_DEFAULTS[dest]:g}; "
                              f"{reward_default:g} with --objective reward)")
    p.add_argument("--objective", default="likelihood", metavar="OBJECTIVE",
                   help="likelihood (default): the paper's losses on {prompt, completion} rows; reward: heads-only "
                        "policy optimisation (GRPO-style) with a verifiable reward on benchmark rows {problem, gt} "
                        "(docs/training.md)")
    p.add_argument("--model", required=True,
                   help="AutoDeco directory (heads are loaded and trained further) or a plain base causal LM "
                        "(directory or hub name; fresh heads are created on it)")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE",
                   help="one or more JSONL files of {\"prompt\", \"completion\"} or {\"messages\"} rows; with "
                        "--objective reward, benchmark files of {\"problem\", \"gt\"} rows (optional id, kind), "
                        "prompted as `autodeco eval` prompts them")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT_DIR",
                   dest="resume_from_checkpoint",
                   help="resume from a checkpoint directory, or with no value (or 'latest') from the last "
                        "checkpoint-* in --output-dir: heads, optimizer, scheduler and RNG state are restored")
    p.add_argument("--no-dft", action="store_const", const=False, dest="dft",
                   help="do not weight each token's loss by the base's probability of the label (DFT weighting is on "
                        "by default)")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="dtype of the frozen base (the heads always train in float32); auto = bfloat16 on a CUDA "
                        "GPU that supports it, else float32")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the base model's own modelling code from its repository (off by default)")
    add_engine_flags(p, "reward objective: the engine that samples the rollouts; hf = transformers' generate "
                        "(default), vllm = vLLM in this process, the heads copied into it before every rollout "
                        "(--model must then be an AutoDeco directory, e.g. likelihood-trained heads)")
    p.add_argument("--trainer-arg", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="compatibility alias: set a transformers.TrainingArguments field (repeatable), e.g. "
                        "save_steps=50, report_to=none, bf16=true; list fields take comma-separated values")
    p.set_defaults(func=cmd_train, **{name: None for name in (*_COMPUTED_DEFAULTS, *_OBJECTIVE_DEFAULTS, *REWARD_FIELDS)})
    return p


def _trainer_arg_actions() -> dict[str, argparse.Action]:
    parser = argparse.ArgumentParser(add_help=False)
    subparsers = parser.add_subparsers(parser_class=CommandParser)
    train = register(subparsers)
    actions = {}
    for action in train._actions:
        # Fields that default to True also get a `--no_<name>` store-false action; type from the positive one.
        if action.dest in _TRAINER_FIELDS and not isinstance(action, (argparse._StoreFalseAction,
                                                                      argparse._StoreConstAction)):
            actions.setdefault(action.dest, action)
    return actions


def parse_trainer_args(pairs: list[tuple[str, str]]) -> dict:
    """`--trainer-arg` pairs [(key, text)] -> {key: typed value}, typed by the train parser's own flags.

    Raises ValueError for unknown keys (with close matches and where to find valid ones), keys that have a
    dedicated flag or are fixed, and values the field's type rejects.
    """
    if not pairs:
        return {}
    actions = _trainer_arg_actions()
    hints = typing.get_type_hints(TrainingArguments)
    result = {}
    for key, text in pairs:
        if key not in _TRAINER_FIELDS:
            close = difflib.get_close_matches(key, sorted(_TRAINER_FIELDS), n=3)
            raise ValueError(
                f"--trainer-arg {key}={text}: '{key}' is not a transformers.TrainingArguments field"
                + (f" (did you mean {', '.join(close)}?)" if close else "")
                + f". Valid keys are the TrainingArguments fields: {TRAINER_ARG_HELP}."
            )
        if key in DEDICATED_FLAGS:
            raise ValueError(f"--trainer-arg {key}=...: use {DEDICATED_FLAGS[key]} instead.")
        if key in FORCED_TRAINING_ARGUMENTS:
            raise ValueError(
                f"--trainer-arg {key}=...: AutoDeco training fixes {key} = {FORCED_TRAINING_ARGUMENTS[key]!r}."
            )
        action = actions.get(key)
        try:
            if action is None:
                value = text
            elif action.nargs in ("+", "*") or ("list[" in str(hints.get(key)) and "," in text):
                # e.g. report_to: `str | list[str]`, a single str flag for HfArgumentParser
                value = [action.type(v.strip()) if action.type else v.strip() for v in text.split(",") if v.strip()]
            else:
                value = action.type(text) if action.type else text
        except (TypeError, ValueError, argparse.ArgumentTypeError) as exc:
            raise ValueError(f"--trainer-arg {key}={text}: invalid value for {key} ({exc}).") from None
        if action is not None and action.choices is not None:
            bad = [v for v in (value if isinstance(value, list) else [value]) if v not in action.choices]
            if bad:
                raise ValueError(
                    f"--trainer-arg {key}={text}: {bad[0]!r} is not one of {', '.join(map(str, action.choices))}."
                )
        result[key] = value
    return result


def _objective(args: argparse.Namespace) -> str:
    objective = getattr(args, "objective", "likelihood")
    if objective not in OBJECTIVES:
        raise ValueError(f"--objective {objective!r} is not one of {', '.join(OBJECTIVES)}; use likelihood (the "
                         "default) or reward.")
    return objective


def training_arguments(args: argparse.Namespace) -> AutoDecoTrainingArguments:
    """The parsed `train` flags (and `--trainer-arg` pairs) as AutoDecoTrainingArguments, or as
    RewardTrainingArguments with --objective reward."""
    reward = _objective(args) == "reward"
    unset = {*_COMPUTED_DEFAULTS, *_OBJECTIVE_DEFAULTS, *REWARD_FIELDS}  # None: the dataclass's default
    values = {name: getattr(args, name) for name in _FIELDS if hasattr(args, name)
              and not (name in unset and getattr(args, name) is None)}
    if not reward:
        given = [name for name in REWARD_FIELDS if name in values]
        if given:
            raise ValueError(f"--{given[0].replace('_', '-')} applies to --objective reward only; add --objective "
                             "reward, or drop the flag.")
    values.update(parse_trainer_args(getattr(args, "trainer_arg", [])))
    if reward and "template" in values:
        values["template"] = read_template(values["template"])
    return (RewardTrainingArguments if reward else AutoDecoTrainingArguments)(**values)


def cmd_train(args: argparse.Namespace) -> dict:
    """Run `autodeco train`; returns the summary it prints (a dict, for scripts and tests)."""
    objective = _objective(args)
    for path in args.data:  # a directory or a missing file, named with the flag, before anything loads
        check_input_file(path, "--data")
    llm_kwargs = vllm_kwargs(args)
    if llm_kwargs is not None and objective != "reward":
        raise ValueError("--engine vllm: only --objective reward samples while training; drop --engine.")
    config = training_arguments(args)
    if objective == "reward":
        engine = None
        if llm_kwargs is not None:
            engine = VLLMEngine(args.model, traces=False, **llm_kwargs)  # reads config.json; vLLM loads later
            if not engine.is_autodeco:
                raise ValueError(f"--engine vllm: '{args.model}' is not an AutoDeco directory, and vLLM samples from "
                                 "one; train heads first (autodeco train --objective likelihood) and pass them as "
                                 "--model, or use --engine hf.")
        try:
            return train_heads_reward(args.model, args.data, config, dtype=args.dtype,
                                      trust_remote_code=args.trust_remote_code, engine=engine)
        finally:
            if engine is not None:
                engine.close()
    return train_heads(args.model, args.data, config, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
