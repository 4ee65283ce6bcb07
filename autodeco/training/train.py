"""train_heads: train AutoDeco's heads on a frozen base, end to end (what `autodeco train` runs).

    from autodeco.training import AutoDecoTrainingArguments, train_heads
    summary = train_heads("Qwen/Qwen2.5-0.5B", ["train.jsonl"], AutoDecoTrainingArguments("runs/heads"))

`model` is a base (directory, hub name or loaded model: fresh heads are put on it) or an AutoDeco model (directory
or loaded: its heads train further); `data` is JSONL paths or an AutoDecoDataset. It builds the dataset (and the
decoding-control twins when config.control_share > 0), loads the model, trains with AutoDecoTrainer (resuming when
config.resume_from_checkpoint is "latest" or a checkpoint directory), saves heads + config + tokenizer (+ the
control settings) to config.output_dir and returns the summary it prints. The output directory is locked for the
run (autodeco.locks: a second run on it is refused). Details: docs/training.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from transformers import AutoConfig, PreTrainedModel

from autodeco.control import save_control_settings
from autodeco.data import AutoDecoDataset, ControlDataset, DataCollatorWithControl
from autodeco.locks import OutputDirLock
from autodeco.modeling import AutoDecoModelForCausalLM
from autodeco.modeling.io import check_model_source, load_tokenizer, resolve_dtype
from autodeco.training.arguments import AutoDecoTrainingArguments
from autodeco.training.engines import check_engine_available
from autodeco.training.trainer import CONTROL_LOGGED_METRICS, AutoDecoTrainer

__all__ = ["load_model_for_training", "train_heads"]

_SUMMARY_METRICS = ("loss", "temperature_loss", "top_p_loss", "mean_temperature", "mean_top_p", *CONTROL_LOGGED_METRICS)
_TRAINED = {"both": "temperature + top-p heads", "temperature": "temperature head", "top_p": "top-p head"}


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
    check_model_source(str(path), "--model", fix="Pass a model directory or a hub name.", directory=True)
    try:
        return AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code).to_dict()
    except OSError as exc:
        raise FileNotFoundError(
            f"--model '{name}' is not a local directory and could not be loaded as a hub model ({exc})."
        ) from None


def load_model_for_training(model, config: AutoDecoTrainingArguments, *, fresh: bool | None = None,
                            dtype: str = "auto", trust_remote_code: bool = False) -> AutoDecoModelForCausalLM:
    """The AutoDeco model to train, with this run's loss settings in its config.

    `model`: an AutoDeco model or directory (its heads, `fresh` False) or a base model or its name (fresh heads,
    seeded by config.seed, shaped by config.max_temperature / head_hidden_size). `fresh` None: read config.json.
    """
    loss_settings, shape = config.loss_settings(), config.head_shape()
    if isinstance(model, AutoDecoModelForCausalLM):
        fresh, name = False, "the given model"
    elif isinstance(model, PreTrainedModel):
        fresh, name = True, "the given base"
    else:
        name = str(model)
        if fresh is None:
            fresh = _model_config(name, trust_remote_code).get("model_type") != "autodeco"
    if not fresh:
        if shape:
            flags = ", ".join(f"--{k.replace('_', '-')}" for k in shape)
            raise ValueError(
                f"{flags} only apply to fresh heads, but '{name}' is an AutoDeco model whose heads already have that "
                "shape; drop the flag, or pass the base model to start from fresh heads."
            )
        if not isinstance(model, AutoDecoModelForCausalLM):
            model = AutoDecoModelForCausalLM.from_pretrained(
                name, dtype=resolve_dtype(dtype, on_gpu=not config.use_cpu), trust_remote_code=trust_remote_code)
        model.config.update(loss_settings)  # the losses read them from the config; saved with the heads
        return model
    kwargs = {} if isinstance(model, PreTrainedModel) else dict(
        dtype=resolve_dtype(dtype, on_gpu=not config.use_cpu), trust_remote_code=trust_remote_code)
    return AutoDecoModelForCausalLM.from_base(model if isinstance(model, PreTrainedModel) else name,
                                              seed=config.seed, **kwargs, **shape, **loss_settings)


def _resume_target(config: AutoDecoTrainingArguments):
    """config.resume_from_checkpoint -> what Trainer.train takes (True for the last checkpoint-*), checked first."""
    resume = config.resume_from_checkpoint
    if resume is None or resume is False:
        return None
    if resume is True or resume in ("latest", "true", "True"):
        if not any(Path(config.output_dir).glob("checkpoint-*")):
            raise ValueError(
                f"--resume: no checkpoint-* directory in '{config.output_dir}' to resume from; drop "
                "--resume to start fresh, or pass the checkpoint directory."
            )
        return True
    if not Path(resume).is_dir():
        raise FileNotFoundError(f"--resume '{resume}' is not a directory; pass a checkpoint-* directory or 'latest'.")
    return str(resume)


def _final_metrics(log_history: list[dict]) -> dict:
    for entry in reversed(log_history):
        if "mean_temperature" in entry:
            return entry
    return {}


def train_heads(model, data: str | os.PathLike | Sequence[str | os.PathLike] | AutoDecoDataset,
                config: AutoDecoTrainingArguments, *, tokenizer=None, dtype: str = "auto",
                trust_remote_code: bool = False, verbose: bool = True) -> dict:
    """Train the heads (module docstring); returns the summary: data, heads, fresh_heads, steps, train_loss, the
    final logging window's losses and mean T / P (and control metrics), output_dir (and control)."""
    if not isinstance(config, AutoDecoTrainingArguments):
        raise TypeError(f"config must be an AutoDecoTrainingArguments, got {type(config).__name__}.")
    # Everything that can be wrong in the settings is checked before a model is loaded.
    control = config.control()
    resume = _resume_target(config)
    # One run writes into an output directory at a time (autodeco.locks: under several processes rank 0 holds it).
    with OutputDirLock(config.output_dir, "train"):
        return _train_heads(model, data, config, control, resume, tokenizer=tokenizer, dtype=dtype,
                            trust_remote_code=trust_remote_code, verbose=verbose)


def _train_heads(model, data, config: AutoDecoTrainingArguments, control, resume, *, tokenizer, dtype: str,
                 trust_remote_code: bool, verbose: bool) -> dict:
    check_engine_available(config.deepspeed)  # a missing engine names its extra before any weights load
    config.device  # sets up this process's place in the launch: process_index reads 0 on every rank before it
    main_process = verbose and config.process_index == 0
    output_dir = config.output_dir

    # Data before weights: a bad row is reported in seconds, not after loading a large base.
    if isinstance(model, (str, os.PathLike)):
        model_label = str(model)
        model_config = _model_config(model_label, trust_remote_code)
        fresh = model_config.get("model_type") != "autodeco"
        if tokenizer is None:
            tokenizer = load_tokenizer(model_label, None if fresh else model_config.get("base_model_name_or_path"))
    else:
        model_label, fresh = "the given model", not isinstance(model, AutoDecoModelForCausalLM)
        if tokenizer is None:
            tokenizer = load_tokenizer(model.config.name_or_path, getattr(model.config, "base_model_name_or_path", None))
    if isinstance(data, (str, os.PathLike, list, tuple)):
        dataset = AutoDecoDataset.from_jsonl(data, tokenizer, max_length=config.max_length,
                                             skip_bad_rows=config.skip_bad_rows, keep_rows=control is not None)
    else:
        dataset = data
    stats = getattr(dataset, "stats", None)
    data_summary = stats.summary() if stats is not None else f"{len(dataset)} rows"
    if main_process:
        print(f"Data: {data_summary}", flush=True)
    trainer_kwargs = {}
    if control is not None:
        dataset = ControlDataset(dataset, tokenizer, share=control["share"], seed=control["seed"],
                                 max_length=config.max_length)
        trainer_kwargs = dict(data_collator=DataCollatorWithControl(tokenizer), control_margin=control["margin"],
                              control_weight=control["weight"])
        if main_process:
            print(f"Control: {dataset.summary()}; margin {control['margin']:g}, weight {control['weight']:g}.", flush=True)
    model = load_model_for_training(model, config, fresh=fresh, dtype=dtype, trust_remote_code=trust_remote_code)

    trainer = AutoDecoTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                              fused_loss=config.fused_loss, **trainer_kwargs)
    result = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(output_dir)
    if control is not None and config.process_index == 0:
        save_control_settings(output_dir, **control, extra={"twins": len(dataset.twins), "rows": len(dataset)})

    final = _final_metrics(trainer.state.log_history)
    summary = {
        "data": data_summary,
        "heads": config.heads,
        "fresh_heads": bool(fresh),
        "steps": result.global_step,
        "train_loss": result.training_loss,
        **{k: final[k] for k in _SUMMARY_METRICS if k in final},
        "output_dir": str(output_dir),
    }
    if control is not None:
        summary["control"] = {**control, "twins": len(dataset.twins)}
    if main_process:
        _print_summary(summary, fresh, model_label, config.resume_from_checkpoint if resume else None)
    return summary


def _print_summary(summary: dict, fresh: bool, model_label: str, resume) -> None:
    losses = ", ".join(f"{k} {summary[k]:.4f}" for k in ("loss", "temperature_loss", "top_p_loss") if k in summary)
    means = ", ".join(f"{label} {summary[k]:.3f}" for label, k in (("mean T", "mean_temperature"),
                                                                   ("mean P", "mean_top_p")) if k in summary)
    output_dir = summary["output_dir"]
    print(
        f"Trained the {_TRAINED[summary['heads']]} ({'fresh' if fresh else 'loaded from ' + model_label}) for "
        f"{summary['steps']} steps" + (f" (resumed from {resume})" if resume else "") + ".\n"
        f"Final logging window: {losses or 'no log yet'}; {means or 'no head statistics logged'}.\n"
        + (f"Control: loss {summary['control_loss']:.4f}, consistency T {summary['control_consistency_temperature']:.0%}"
           f" / P {summary['control_consistency_top_p']:.0%}, signed mean shift T {summary['control_delta_temperature']:+.3f}"
           f" / P {summary['control_delta_top_p']:+.3f} (commanded vs plain, same rows).\n"
           if "control_loss" in summary else "")
        + f"Saved heads, config and tokenizer to {output_dir} (checkpoints in {output_dir}/checkpoint-*).",
        flush=True,
    )
