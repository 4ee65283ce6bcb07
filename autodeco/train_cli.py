"""`autodeco train`: train the temperature and top-p heads on a frozen base from JSONL data.

    autodeco train --model Qwen/Qwen2.5-0.5B --data train.jsonl --output-dir runs/heads           # fresh heads
    autodeco train --model runs/heads --data more.jsonl --output-dir runs/heads2 --heads top_p    # continue
    autodeco train ... --resume                    # continue the last checkpoint-* in --output-dir
    autodeco train ... --trainer-arg save_steps=50 --trainer-arg report_to=none                    # any Trainer field
    autodeco train ... --control-share 0.3 [--control-margin 0.1] [--control-weight 1.0]   # decoding control
    accelerate launch --config_file configs/accelerate/ddp.yaml -m autodeco.cli train ...        # several GPUs

`--model` is either an AutoDeco directory (its heads are loaded and trained further) or a plain base model
(directory or hub name; fresh heads are put on it). The data format is described in autodeco/data.py. The
defaults follow the paper (see the table in autodeco/trainer.py). At the end the heads, config and tokenizer
are saved to --output-dir and a summary is printed: data statistics, steps, final losses, mean T and P.

With `--control-share S > 0` (autodeco/control.py) a seeded share S of the rows gets a twin with a low- or
high-randomness command in its user message, in the same micro-batch, and a margin ranking loss pushes the twin's
mean T and P below (low) or above (high) the plain row's; the settings and the training phrasings are saved to
OUTPUT_DIR/autodeco_control.json, which `autodeco eval-control` reads. Share 0 (the default) trains exactly as
without these flags. `cmd_train(args)` takes any argparse Namespace with the parser's fields (the demo builds one
from the parser's defaults).

This module exposes `add_train_parser(subparsers)` (registers the `train` subcommand, whose handler is
`cmd_train`) for autodeco/cli.py; `python -m autodeco.train_cli --help` also runs it on its own.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import sys
import typing
from pathlib import Path


from autodeco.cli import load_tokenizer, resolve_dtype
from autodeco.trainer import CONTROL_LOGGED_METRICS, DEFAULT_TRAINING_ARGUMENTS, FORCED_TRAINING_ARGUMENTS

HEADS_CHOICES = {"both": (True, True), "temperature": (True, False), "top_p": (False, True)}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
# TrainingArguments fields that have their own flag: `--trainer-arg` must not set them a second way.
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


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {value}")
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {value}")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. save_steps=50), got '{text}'")
    return key.strip().replace("-", "_"), value


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `train` subcommand to `subparsers` (from ArgumentParser.add_subparsers) and return its parser."""
    defaults = DEFAULT_TRAINING_ARGUMENTS
    p = subparsers.add_parser(
        "train",
        help="train the temperature / top-p heads on a frozen base from JSONL data",
        description="Train AutoDeco heads on a frozen base model with transformers' Trainer. Checkpoints "
        "(heads + optimizer/scheduler/RNG state) go to OUTPUT_DIR/checkpoint-*; the final heads, config and "
        "tokenizer to OUTPUT_DIR.",
        epilog="Any other transformers.TrainingArguments field is set with --trainer-arg KEY=VALUE (repeatable), "
        "e.g. --trainer-arg save_steps=50 --trainer-arg lr_scheduler_type=linear --trainer-arg report_to=none. "
        "Several processes: accelerate launch --config_file configs/accelerate/ddp.yaml -m autodeco.cli train ...",
    )
    p.add_argument("--model", required=True,
                   help="AutoDeco directory (heads are loaded and trained further) or a plain base causal LM "
                        "(directory or hub name; fresh heads are created on it)")
    p.add_argument("--data", required=True, nargs="+", metavar="FILE",
                   help="one or more JSONL files of {\"prompt\", \"completion\"} or {\"messages\"} rows")
    p.add_argument("--output-dir", required=True,
                   help="directory for checkpoints (checkpoint-*) and the final heads, config and tokenizer")
    p.add_argument("--heads", choices=sorted(HEADS_CHOICES), default="both",
                   help="which head(s) to train; the other stays frozen and bit-identical (default both)")
    p.add_argument("--max-steps", type=_positive_int, default=defaults["max_steps"],
                   help=f"optimizer steps to train for (default {defaults['max_steps']}, as in the paper)")
    p.add_argument("--learning-rate", type=_positive_float, default=defaults["learning_rate"],
                   help=f"peak AdamW learning rate, cosine-decayed after a 10%% warmup (default {defaults['learning_rate']})")
    p.add_argument("--per-device-train-batch-size", type=_positive_int,
                   default=defaults["per_device_train_batch_size"],
                   help=f"sequences per micro-batch on each device (default {defaults['per_device_train_batch_size']})")
    p.add_argument("--gradient-accumulation-steps", type=_positive_int,
                   default=defaults["gradient_accumulation_steps"],
                   help="micro-batches per optimizer step; the loss is the exact mean over all their supervised "
                        f"tokens (default {defaults['gradient_accumulation_steps']})")
    p.add_argument("--max-length", type=_positive_int, default=4096,
                   help="tokens per example at most; longer rows are cut from the right (default 4096)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT_DIR",
                   help="resume from a checkpoint directory, or with no value (or 'latest') from the last "
                        "checkpoint-* in --output-dir: heads, optimizer, scheduler and RNG state are restored")
    p.add_argument("--seed", type=int, default=defaults["seed"],
                   help=f"seed of the data order, the easy-token mask and fresh heads (default {defaults['seed']})")
    p.add_argument("--easy-token-mask-ratio", type=_ratio, default=None,
                   help="share of easy tokens (base argmax == label) dropped from the temperature loss "
                        "(default: the model's config; fresh heads 0.6 as in the paper)")
    p.add_argument("--no-dft", action="store_true",
                   help="do not weight each token's loss by the base's probability of the label (DFT weighting is on "
                        "by default)")
    p.add_argument("--soft-top-p-alpha", type=_positive_float, default=None,
                   help="steepness of the soft top-p mask (default: the model's config; fresh heads 30)")
    p.add_argument("--max-temperature", type=_positive_float, default=None,
                   help="fresh heads only: T = max_temperature * sigmoid(...) (default 2.0)")
    p.add_argument("--head-hidden-size", type=_positive_int, default=None,
                   help="fresh heads only: hidden width of each head MLP (default 256)")
    p.add_argument("--skip-bad-rows", action="store_true",
                   help="skip (and count) malformed data rows instead of stopping at the first one")
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="dtype of the frozen base (the heads always train in float32); auto = bfloat16 on a CUDA "
                        "GPU that supports it, else float32")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow the base model's own modelling code from its repository (off by default)")
    p.add_argument("--control-share", type=_ratio, default=0.0, metavar="SHARE",
                   help="decoding control: share of training rows that also appear with a low- or high-randomness "
                        "command in the user message, trained with a margin ranking loss on mean T and P (default 0: "
                        "off; e.g. 0.3). See autodeco/control.py")
    p.add_argument("--control-margin", type=_non_negative_float, default=0.1, metavar="MARGIN",
                   help="margin of the control ranking loss: the commanded mean T (and P) should differ from the "
                        "plain one by at least this much in the command's direction (default 0.1)")
    p.add_argument("--control-weight", type=_non_negative_float, default=1.0, metavar="WEIGHT",
                   help="weight of the control loss added to the ordinary losses (default 1.0)")
    p.add_argument("--control-seed", type=int, default=None, metavar="SEED",
                   help="seed that picks the commanded rows, their direction and phrasing (default: --seed)")
    p.add_argument("--no-fused-loss", action="store_true",
                   help="compute the losses from the base's full [batch, sequence, vocabulary] logits instead of chunk "
                        "by chunk from the hidden states (autodeco/fused_loss.py); for bases with an unknown logit "
                        "transform")
    p.add_argument("--trainer-arg", action="append", type=_key_value, default=[], metavar="KEY=VALUE",
                   help="set any other transformers.TrainingArguments field (repeatable), e.g. save_steps=50, "
                        "report_to=none, bf16=true; list fields take comma-separated values")
    p.set_defaults(func=cmd_train)
    return p


# ---------------------------------------------------------------------------------------------------- helpers


def parse_trainer_args(pairs: list[tuple[str, str]]) -> dict:
    """[(key, text)] -> {key: typed value}, typed as HfArgumentParser types TrainingArguments fields.

    Raises ValueError for unknown keys (with close matches and where to find valid ones), keys that have a
    dedicated flag or are fixed, and values the field's type rejects.
    """
    from transformers import HfArgumentParser, TrainingArguments

    if not pairs:
        return {}
    # The declared annotations, not `field.type`: HfArgumentParser rewrites the latter in place (report_to's
    # `str | list[str]` becomes `str`), which made a second call in the same process parse lists differently.
    hints = typing.get_type_hints(TrainingArguments)
    field_types = {f.name: str(hints.get(f.name, f.type)) for f in dataclasses.fields(TrainingArguments) if f.init}
    fields = set(field_types)
    parser = HfArgumentParser(TrainingArguments)
    actions = {}
    for action in parser._actions:
        # Fields that default to True also get a `--no_<name>` store-false action; type from the positive one.
        if action.dest in fields and not isinstance(action, argparse._StoreFalseAction):
            actions.setdefault(action.dest, action)
    result = {}
    for key, text in pairs:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=3)
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
            elif action.nargs in ("+", "*") or ("list[" in field_types[key] and "," in text):
                # e.g. report_to: `str | list[str]`, parsed as a plain str by HfArgumentParser
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


def _model_config(name: str, trust_remote_code: bool) -> dict:
    """The config.json of a model directory or hub name as a dict, without loading weights."""
    path = Path(name).expanduser()
    if path.is_dir():
        config_file = path / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"--model '{name}' is a directory without config.json: pass a base model directory, a hub name, "
                "or an AutoDeco directory (written by `autodeco init` / `autodeco train`)."
            )
        try:
            return json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"--model '{name}': config.json is not valid JSON ({exc}).") from None
    if name.startswith((".", "/", "~")) or os.sep in name and name.count("/") != 1:
        raise FileNotFoundError(f"--model '{name}' does not exist. Pass a model directory or a hub name.")
    from transformers import AutoConfig

    import autodeco  # noqa: F401  (registers the "autodeco" model type)

    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code).to_dict()
    except OSError as exc:
        raise FileNotFoundError(
            f"--model '{name}' is not a local directory and could not be loaded as a hub model ({exc})."
        ) from None



def load_model_for_training(args, is_autodeco: bool, use_cpu: bool = False):
    """The AutoDeco model `args.model` names, configured for this run (fresh heads unless `is_autodeco`)."""
    from autodeco import AutoDecoModelForCausalLM

    train_temperature, train_top_p = HEADS_CHOICES[args.heads]
    loss_options = {}
    if args.easy_token_mask_ratio is not None:
        loss_options["easy_token_mask_ratio"] = args.easy_token_mask_ratio
    if args.soft_top_p_alpha is not None:
        loss_options["soft_top_p_alpha"] = args.soft_top_p_alpha
    if args.no_dft:
        loss_options["dft"] = False
    loss_options.update(train_temperature=train_temperature, train_top_p=train_top_p)
    dtype = resolve_dtype(args.dtype, on_gpu=not use_cpu)

    if is_autodeco:
        fresh_only = [flag for flag, value in (("--max-temperature", args.max_temperature),
                                               ("--head-hidden-size", args.head_hidden_size)) if value is not None]
        if fresh_only:
            raise ValueError(
                f"{', '.join(fresh_only)} only apply to fresh heads, but '{args.model}' is an AutoDeco model whose "
                "heads already have that shape; drop the flag, or pass the base model to start from fresh heads."
            )
        model = AutoDecoModelForCausalLM.from_pretrained(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
        for key, value in loss_options.items():
            setattr(model.config, key, value)
        return model
    shape = {k: v for k, v in (("max_temperature", args.max_temperature), ("head_hidden_size", args.head_hidden_size))
             if v is not None}
    return AutoDecoModelForCausalLM.from_base(
        args.model, seed=args.seed, dtype=dtype, trust_remote_code=args.trust_remote_code, **shape, **loss_options
    )


def _control_options(args) -> dict | None:
    """The decoding-control options of `args` ({share, margin, weight, seed}), or None when control is off.

    A Namespace without the control fields (built before they existed) means control off.
    """
    share = getattr(args, "control_share", 0.0) or 0.0
    margin = getattr(args, "control_margin", 0.1)
    weight = getattr(args, "control_weight", 1.0)
    seed = getattr(args, "control_seed", None)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"--control-share must be in [0, 1], got {share}; e.g. 0.3 (0 turns control off).")
    if not margin >= 0:
        raise ValueError(f"--control-margin must be >= 0, got {margin}; e.g. 0.1.")
    if not weight >= 0:
        raise ValueError(f"--control-weight must be >= 0, got {weight}; e.g. 1.0.")
    if share == 0:
        return None
    return {"share": float(share), "margin": float(margin), "weight": float(weight),
            "seed": int(args.seed if seed is None else seed)}


def _final_metrics(log_history: list[dict]) -> dict:
    for entry in reversed(log_history):
        if "mean_temperature" in entry:
            return entry
    return {}


# ---------------------------------------------------------------------------------------------------- command


def cmd_train(args) -> dict:
    """Run `autodeco train`; returns the summary it prints (a dict, for scripts and tests)."""
    from autodeco.data import AutoDecoDataset
    from autodeco.trainer import AutoDecoTrainer, build_training_arguments

    # Everything that can be wrong in the flags is checked before a model is loaded.
    overrides = parse_trainer_args(args.trainer_arg)
    from autodeco.engines import check_engine_available  # issue 16 hook: before TrainingArguments needs the engine

    check_engine_available(overrides.get("deepspeed"))
    control = _control_options(args)
    resume = args.resume
    if resume is not None and resume != "latest" and not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume '{resume}' is not a directory; pass a checkpoint-* directory or 'latest'.")
    if resume == "latest" and not any(Path(args.output_dir).glob("checkpoint-*")):
        raise ValueError(
            f"--resume: no checkpoint-* directory in '{args.output_dir}' to resume from; drop "
            "--resume to start fresh, or pass the checkpoint directory."
        )
    training_args = build_training_arguments(
        args.output_dir,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        seed=args.seed,
        **overrides,
    )
    main_process = training_args.process_index == 0

    # Data before weights: a bad row is reported in seconds, not after loading a large base.
    config = _model_config(args.model, args.trust_remote_code)
    fresh = config.get("model_type") != "autodeco"
    tokenizer = load_tokenizer(args.model, None if fresh else config.get("base_model_name_or_path"))
    dataset = AutoDecoDataset.from_jsonl(args.data, tokenizer, max_length=args.max_length, skip_bad_rows=args.skip_bad_rows,
                                         keep_rows=control is not None)
    if main_process:
        print(f"Data: {dataset.stats.summary()}", flush=True)
    trainer_kwargs = {}
    if control is not None:
        from autodeco.control import ControlDataset, DataCollatorWithControl

        dataset = ControlDataset(dataset, tokenizer, share=control["share"], seed=control["seed"],
                                 max_length=args.max_length)
        trainer_kwargs = dict(data_collator=DataCollatorWithControl(tokenizer), control_margin=control["margin"],
                              control_weight=control["weight"])
        if main_process:
            print(f"Control: {dataset.summary()}; margin {control['margin']:g}, weight {control['weight']:g}.", flush=True)
    model = load_model_for_training(args, is_autodeco=not fresh, use_cpu=training_args.use_cpu)

    trainer = AutoDecoTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer,
                              fused_loss=not getattr(args, "no_fused_loss", False), **trainer_kwargs)
    result = trainer.train(resume_from_checkpoint=True if resume == "latest" else resume)
    trainer.save_model(args.output_dir)
    if control is not None and main_process:
        from autodeco.control import save_control_settings

        save_control_settings(args.output_dir, **control, extra={"twins": len(dataset.twins), "rows": len(dataset)})

    final = _final_metrics(trainer.state.log_history)
    summary = {
        "data": dataset.stats.summary(),
        "heads": args.heads,
        "fresh_heads": fresh,
        "steps": result.global_step,
        "train_loss": result.training_loss,
        **{k: final[k] for k in ("loss", "temperature_loss", "top_p_loss", "mean_temperature", "mean_top_p",
                                 *CONTROL_LOGGED_METRICS) if k in final},
        "output_dir": str(args.output_dir),
    }
    if control is not None:
        summary["control"] = {**control, "twins": len(dataset.twins)}
    if main_process:
        trained = {"both": "temperature + top-p heads", "temperature": "temperature head", "top_p": "top-p head"}[args.heads]
        losses = ", ".join(f"{k} {summary[k]:.4f}" for k in ("loss", "temperature_loss", "top_p_loss") if k in summary)
        means = ", ".join(f"{label} {summary[k]:.3f}" for label, k in (("mean T", "mean_temperature"), ("mean P", "mean_top_p"))
                          if k in summary)
        print(
            f"Trained the {trained} ({'fresh' if fresh else 'loaded from ' + args.model}) for {result.global_step} steps"
            + (f" (resumed from {resume})" if resume else "") + ".\n"
            f"Final logging window: {losses or 'no log yet'}; {means or 'no head statistics logged'}.\n"
            + (f"Control: loss {summary['control_loss']:.4f}, consistency T {summary['control_consistency_temperature']:.0%}"
               f" / P {summary['control_consistency_top_p']:.0%}, signed mean shift T {summary['control_delta_temperature']:+.3f}"
               f" / P {summary['control_delta_top_p']:+.3f} (commanded vs plain, same rows).\n"
               if "control_loss" in summary else "")
            + f"Saved heads, config and tokenizer to {args.output_dir} (checkpoints in {args.output_dir}/checkpoint-*).",
            flush=True,
        )
    return summary


def main(argv: list[str] | None = None) -> int:
    """`python -m autodeco.train_cli ...`: the train subcommand alone, with the CLI's one-line errors."""
    from autodeco.cli import run_subcommand

    return run_subcommand(add_train_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
