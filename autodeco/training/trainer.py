"""AutoDecoTrainer: a `transformers.Trainer` that trains AutoDeco's temperature and top-p heads on a frozen base.

    trainer = AutoDecoTrainer(model=model, args=AutoDecoTrainingArguments("runs/heads"), train_dataset=dataset,
                              processing_class=tokenizer)
    trainer.train()                    # resume_from_checkpoint=True picks up the last checkpoint-*
    trainer.save_model()               # config.json + autodeco_heads.safetensors (+ tokenizer): no base weights

What it overrides: only the heads train (the base is frozen and kept in eval mode); `compute_loss` makes the loss
the exact mean over every supervised token of the optimizer step, whatever the split into micro-batches and
processes; the logs gain the heads' losses and mean T / P (and the decoding-control metrics when the batches
carry `control_pairs`); checkpoints hold the heads only and resume loads them with `load_heads`.
When training begins, one line names the engine (single / DDP / DeepSpeed ZeRO stage / FSDP2) and whether
parameters are sharded (training/engines.py). Full explanation: docs/training.md.
"""

from __future__ import annotations

import logging
import os

import torch
from transformers import Trainer, TrainerState, TrainingArguments
from transformers.trainer_utils import TrainOutput, get_last_checkpoint

from autodeco.losses import completion_means, control_margin_loss
from autodeco.data import IGNORE_INDEX, DataCollatorForCompletion
from autodeco.training.engines import EngineReport, check_deepspeed_batch_sizes, check_engine_available, cpu_fsdp2
from autodeco.modeling.fused_loss import supports_fused_loss
from autodeco.modeling import HEADS_WEIGHTS_NAME, AutoDecoModelForCausalLM
from autodeco.training.arguments import FORCED_TRAINING_ARGUMENTS, build_training_arguments

__all__ = [
    "AutoDecoTrainer",
    "CONTROL_LOGGED_METRICS",
    "LOGGED_METRICS",
    "head_state",
    "prepare_model_for_training",
    "trainable_parameter_names",
]

logger = logging.getLogger(__name__)

# Keys `AutoDecoTrainer.log` adds to each training log (next to the Trainer's loss, learning_rate, grad_norm).
LOGGED_METRICS = ("temperature_loss", "top_p_loss", "mean_temperature", "mean_top_p")

# Keys the log adds when the batches carry decoding-control pairs (autodeco/control.py).
CONTROL_LOGGED_METRICS = ("control_loss", "control_consistency_temperature", "control_consistency_top_p",
                          "control_delta_temperature", "control_delta_top_p")

# Slots of the per-window accumulator (one float64 tensor, so one all-reduce merges every process).
_TOKENS, _T_LOSS, _P_LOSS, _T_SUM, _P_SUM = range(5)
# Control slots: pairs, sum of per-pair margin losses, pairs on the right side (T, P), sums of signed deltas (T, P).
_PAIRS, _C_LOSS, _T_CONS, _P_CONS, _T_DELTA, _P_DELTA = range(5, 11)
_SLOTS = 11


def prepare_model_for_training(model: AutoDecoModelForCausalLM) -> None:
    """Freeze the base and every head whose loss is off; the remaining head parameters require grad.

    Raises ValueError when the config trains neither head (nothing would learn).
    """
    config = model.config
    if not (config.train_temperature or config.train_top_p):
        raise ValueError(
            "config.train_temperature and config.train_top_p are both False: no head would train. Enable at "
            "least one (CLI: --heads both|temperature|top_p)."
        )
    model.llm.requires_grad_(False)
    model.temperature_head.requires_grad_(bool(config.train_temperature))
    model.top_p_head.requires_grad_(bool(config.train_top_p))


def trainable_parameter_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that require grad (what the optimizer receives)."""
    return [name for name, p in model.named_parameters() if p.requires_grad]


class AutoDecoTrainer(Trainer):
    """`transformers.Trainer` for AutoDeco heads: head-only optimisation, exact token-mean loss under gradient
    accumulation and data parallelism, head metrics in the logs, heads-only checkpoints (docs/training.md).

    `args` defaults to `AutoDecoTrainingArguments("autodeco_output")`; the data collator defaults to
    `DataCollatorForCompletion(processing_class)`. `control_margin` and `control_weight` set the decoding-control
    term, used only for batches that carry `control_pairs` (autodeco.data.DataCollatorWithControl).
    """

    def __init__(self, model: AutoDecoModelForCausalLM | None = None, args: TrainingArguments | None = None,
                 data_collator=None, train_dataset=None, eval_dataset=None, processing_class=None, *,
                 control_margin: float = 0.1, control_weight: float = 1.0, fused_loss: bool = True, **kwargs):
        if not (isinstance(control_margin, (int, float)) and control_margin >= 0):
            raise ValueError(f"control_margin (--control-margin) must be a number >= 0, got {control_margin!r}; e.g. 0.1.")
        if not (isinstance(control_weight, (int, float)) and control_weight >= 0):
            raise ValueError(f"control_weight (--control-weight) must be a number >= 0, got {control_weight!r}; e.g. 1.0.")
        self.control_margin = float(control_margin)
        self.control_weight = float(control_weight)
        if not isinstance(model, AutoDecoModelForCausalLM):
            raise TypeError(
                f"AutoDecoTrainer trains an AutoDecoModelForCausalLM, got {type(model).__name__}. Wrap the base "
                "with AutoDecoModelForCausalLM.from_base(...) or load heads with .from_pretrained(...)."
            )
        prepare_model_for_training(model)
        if args is None:
            args = build_training_arguments("autodeco_output")
        for key, value in FORCED_TRAINING_ARGUMENTS.items():
            if getattr(args, key) != value:
                logger.info("AutoDecoTrainer: setting TrainingArguments.%s = %r (was %r).", key, value, getattr(args, key))
                setattr(args, key, value)
        if args.n_gpu > 1:
            # nn.DataParallel would split every micro-batch again behind the loss normalisation's back.
            raise ValueError(
                f"AutoDecoTrainer does not support torch.nn.DataParallel ({args.n_gpu} GPUs in one process). Launch "
                "one process per GPU instead: `accelerate launch --config_file configs/accelerate/ddp.yaml -m "
                "autodeco.cli train ...` (or torchrun), or expose one GPU with CUDA_VISIBLE_DEVICES."
            )
        if data_collator is None and processing_class is not None:
            data_collator = DataCollatorForCompletion(processing_class)
        # Issue 16 hooks (autodeco/training/engines.py): a missing engine names its extra; a DeepSpeed JSON whose batch sizes
        # disagree with ours is one line on every rank, before any collective could hang.
        check_engine_available(args.deepspeed)
        check_deepspeed_batch_sizes(args)
        # Issue 16 hook (autodeco/modeling/fused_loss.py): training forwards compute the losses from the hidden states,
        # never the [B, S, V] logits; False keeps the full-logits path.
        self.fused_loss = bool(fused_loss)
        self.engine_info = None  # set when training begins (EngineReport), e.g. "Engine: FSDP2 on 2 processes; ..."
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        # Our compute_loss normalises by num_items_in_batch, so have the Trainer count it (it only does for models
        # that take loss kwargs), over labels[:, 1:] since the model shifts labels like any causal LM.
        self.model_accepts_loss_kwargs = True
        self._loss_shifts_labels = True
        self._window: torch.Tensor | None = None  # [_SLOTS] float64 sums over the current logging window
        self._window_has = {"temperature_loss": False, "top_p_loss": False}
        self.add_callback(EngineReport(self))  # issue 16 hook: the first training log line names the engine

    def create_accelerator_and_postprocess(self):
        # Issue 16 hook (autodeco/training/engines.py): FSDP2 on CPU processes, which accelerate would silently run as DDP.
        with cpu_fsdp2():
            return super().create_accelerator_and_postprocess()

    # ------------------------------------------------------------------ loss

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """Forward with labels; returns the micro-batch's share of the step's token-mean loss (docs/training.md)."""
        unwrapped = self.accelerator.unwrap_model(model)
        if unwrapped.llm.training:
            unwrapped.llm.eval()  # the frozen base is measured as it decodes: no dropout
        pairs = inputs.get("control_pairs")  # [K, 3] (plain row, twin row, direction) or None
        if pairs is not None:
            inputs = {k: v for k, v in inputs.items() if k != "control_pairs"}
        labels = inputs["labels"]  # [B, S], unshifted
        fused = self.fused_loss and unwrapped.training and supports_fused_loss(unwrapped)
        outputs = model(**inputs, fused_loss=True) if fused else model(**inputs)  # issue 16 hook
        loss = outputs.loss  # scalar: temperature_loss + top_p_loss, each a mean over this micro-batch's tokens
        supervised = labels[:, 1:] != IGNORE_INDEX  # [B, S-1]: position i predicts label i + 1
        n_micro = supervised.sum()
        if unwrapped.training:
            self._accumulate(outputs, supervised, n_micro)
        if num_items_in_batch is not None:
            n_total = torch.as_tensor(num_items_in_batch, device=loss.device).clamp_min(1)
            loss = loss * n_micro.to(loss.device, loss.dtype) / n_total.to(loss.dtype)
            if self.args.average_tokens_across_devices:
                # num_items_in_batch counts every process's tokens and DDP averages gradients over processes:
                # undo that average, as Trainer.compute_loss does for models that take loss kwargs.
                loss = loss * (self.accelerator.num_processes // self.get_tp_size())
            self.loss_is_scaled_for_ga = True
        else:
            self.loss_is_scaled_for_ga = False  # Trainer divides the micro-batch mean by the accumulation steps
        if pairs is not None and pairs.shape[0] > 0:
            control = self._control_loss(unwrapped, outputs, labels, pairs)
            if self.loss_is_scaled_for_ga:  # else the Trainer divides the whole loss by the accumulation steps
                control = control / max(1, int(getattr(self, "current_gradient_accumulation_steps", 1) or 1))
            loss = loss + control.to(loss.device, loss.dtype)
        return (loss, outputs) if return_outputs else loss

    def _control_loss(self, unwrapped, outputs, labels: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """control_weight * (margin loss on mean T + on mean P) over the K pairs of this micro-batch (docs/training.md)."""
        pairs = pairs.to(outputs.temperature.device)
        plain, twin, direction = pairs[:, 0], pairs[:, 1], pairs[:, 2]  # [K] each
        config = unwrapped.config
        total = outputs.temperature.new_zeros((), dtype=torch.float32)
        stats = []
        for values, trains in ((outputs.temperature, config.train_temperature), (outputs.top_p, config.train_top_p)):
            means = completion_means(values, labels)  # [B + K]
            plain_mean, twin_mean = means[plain], means[twin]  # [K]
            margin_loss = control_margin_loss(plain_mean, twin_mean, direction, self.control_margin)
            if trains:
                total = total + margin_loss
            stats.append((margin_loss.detach() if trains else None, (direction * (twin_mean - plain_mean)).detach()))
        if unwrapped.training:
            with torch.no_grad():
                row = torch.zeros(_SLOTS, dtype=torch.float64, device=pairs.device)
                k = pairs.shape[0]
                row[_PAIRS] = k
                for margin_loss, _ in stats:
                    if margin_loss is not None:
                        row[_C_LOSS] += margin_loss.double().to(row.device) * k
                (_, t_signed), (_, p_signed) = stats
                row[_T_CONS] = (t_signed > 0).sum().double()
                row[_P_CONS] = (p_signed > 0).sum().double()
                row[_T_DELTA] = t_signed.double().sum()
                row[_P_DELTA] = p_signed.double().sum()
                self._window = row if self._window is None else self._window + row.to(self._window.device)
        return self.control_weight * total

    def _accumulate(self, outputs, supervised: torch.Tensor, n_micro: torch.Tensor) -> None:
        with torch.no_grad():
            n = n_micro.double()
            row = torch.zeros(_SLOTS, dtype=torch.float64, device=n.device)
            row[_TOKENS] = n
            for slot, key in ((_T_LOSS, "temperature_loss"), (_P_LOSS, "top_p_loss")):
                value = getattr(outputs, key)
                if value is not None:
                    row[slot] = value.detach().double().to(n.device) * n
                    self._window_has[key] = True
            mask = supervised.to(outputs.temperature.device)
            row[_T_SUM] = outputs.temperature[:, :-1][mask].double().sum().to(n.device)  # T [B, S] -> [B, S-1]
            row[_P_SUM] = outputs.top_p[:, :-1][mask].double().sum().to(n.device)
            self._window = row if self._window is None else self._window + row.to(self._window.device)

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the head metrics of the logging window to each training log (every process calls this together)."""
        if "loss" in logs and self._window is not None:
            window = self._window.to(self.args.device)
            if self.args.world_size > 1:
                window = self.accelerator.reduce(window, reduction="sum")
            tokens = float(window[_TOKENS])
            if tokens > 0:
                for slot, key in ((_T_LOSS, "temperature_loss"), (_P_LOSS, "top_p_loss")):
                    if self._window_has[key]:
                        logs[key] = float(window[slot]) / tokens
                logs["mean_temperature"] = float(window[_T_SUM]) / tokens
                logs["mean_top_p"] = float(window[_P_SUM]) / tokens
            pairs = float(window[_PAIRS])
            if pairs > 0:
                logs["control_loss"] = float(window[_C_LOSS]) / pairs
                logs["control_consistency_temperature"] = float(window[_T_CONS]) / pairs
                logs["control_consistency_top_p"] = float(window[_P_CONS]) / pairs
                logs["control_delta_temperature"] = float(window[_T_DELTA]) / pairs
                logs["control_delta_top_p"] = float(window[_P_DELTA]) / pairs
            self._window = None
        super().log(logs, start_time)

    # ------------------------------------------------------------------ heads-only checkpoints

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """Trainer.train, except that resuming a checkpoint that already reached max_steps trains nothing: the
        Trainer would run one more step and write checkpoint-(max_steps + 1). The heads and the state are those
        of the checkpoint; train_loss is the mean of its logged losses (a checkpoint keeps no running total)."""
        finished = self._finished_checkpoint(resume_from_checkpoint)
        if finished is None:
            return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        self.state = TrainerState.load_from_json(os.path.join(finished, "trainer_state.json"))
        self.accelerator.unwrap_model(self.model).load_heads(os.path.join(finished, HEADS_WEIGHTS_NAME))
        losses = [entry["loss"] for entry in self.state.log_history if "loss" in entry]
        loss = sum(losses) / len(losses) if losses else float("nan")
        logger.info("%s already reached max_steps = %d: nothing left to train.", finished, self.args.max_steps)
        return TrainOutput(self.state.global_step, loss, {"train_loss": loss})

    def _finished_checkpoint(self, resume_from_checkpoint) -> str | None:
        """The checkpoint to resume when its global_step is already >= max_steps (max_steps > 0), else None."""
        if not resume_from_checkpoint or self.args.max_steps <= 0 or not self._loads_heads_itself():
            return None
        checkpoint = (get_last_checkpoint(self.args.output_dir) if resume_from_checkpoint is True
                      else str(resume_from_checkpoint))
        if checkpoint is None or not os.path.isfile(os.path.join(checkpoint, HEADS_WEIGHTS_NAME)):
            return None
        try:
            step = TrainerState.load_from_json(os.path.join(checkpoint, "trainer_state.json")).global_step
        except (OSError, ValueError):
            return None  # the Trainer's own resume reports it
        return checkpoint if step >= self.args.max_steps else None

    def _loads_heads_itself(self) -> bool:
        # FSDP and DeepSpeed restore their own (sharded) model state; a plain or DDP model takes the heads file.
        return not (self.is_fsdp_enabled or self.is_deepspeed_enabled)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        heads_file = os.path.join(resume_from_checkpoint, HEADS_WEIGHTS_NAME)
        if os.path.isfile(heads_file) and self._loads_heads_itself():
            target = self.accelerator.unwrap_model(model if model is not None else self.model)
            target.load_heads(heads_file)
            logger.info("Loaded AutoDeco heads from %s.", heads_file)
            return
        try:
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        except ValueError as exc:
            raise ValueError(
                f"Cannot resume from '{resume_from_checkpoint}': it has no {HEADS_WEIGHTS_NAME} ({exc}). Resume from a "
                "checkpoint-* directory written by AutoDecoTrainer (an interrupted save leaves none)."
            ) from exc

    def _load_best_model(self) -> None:
        heads_file = os.path.join(self.state.best_model_checkpoint, HEADS_WEIGHTS_NAME)
        if os.path.isfile(heads_file) and self._loads_heads_itself():
            self.accelerator.unwrap_model(self.model).load_heads(heads_file)
            logger.info("Loaded the best AutoDeco heads from %s.", heads_file)
            return
        super()._load_best_model()


def head_state(model: AutoDecoModelForCausalLM) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the heads' tensors (for comparisons in tests and scripts)."""
    return {k: v.detach().cpu().clone() for k, v in model.heads_state_dict().items()}
