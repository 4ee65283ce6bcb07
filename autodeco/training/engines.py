"""Distributed engines for training the heads: which one runs, and the checks and shims around them.

    describe_engine(accelerator, model) -> EngineInfo   # str(info): "Engine: DeepSpeed ZeRO stage 3 on 2 processes; ..."
    cpu_fsdp2()                        # context: lets accelerate run FSDP2 (fully_shard) on CPU processes (gloo)
    check_engine_available(deepspeed)  # ImportError naming `pip install "autodeco[deepspeed]"`
    check_deepspeed_batch_sizes(args)  # one-line ValueError when a DeepSpeed JSON disagrees with the trainer
    EngineReport(trainer)              # TrainerCallback: prints the engine line when training begins

Why the FSDP shim: accelerate's AcceleratorState switches to FSDP only for GPU-like distributed types; on CPU
processes it silently drops the FSDP plugin and the run is plain DDP. The shim does that one switch for FSDP2
(torch's fully_shard supports CPU/gloo), so configs/accelerate/fsdp.yaml really shards on a CPU machine too.
FSDP1 on CPU needs patches of accelerate's private code and is not enabled. See docs/engines.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

__all__ = ["EngineInfo", "EngineReport", "check_deepspeed_batch_sizes", "check_engine_available", "cpu_fsdp2",
           "default_use_cpu", "describe_engine"]

DEEPSPEED_EXTRA = 'pip install "autodeco[deepspeed]"'


@dataclass(frozen=True)
class EngineInfo:
    name: str  # "single" | "DDP" | "FSDP2" | "FSDP1" | "DeepSpeed"
    processes: int
    sharded: bool  # parameters (the frozen base's included) sharded across processes
    zero_stage: int | None = None
    detail: str = ""

    def __str__(self) -> str:
        engine = f"DeepSpeed ZeRO stage {self.zero_stage}" if self.name == "DeepSpeed" else self.name
        where = "process" if self.processes == 1 else f"on {self.processes} processes"
        return f"Engine: {engine} {where}; parameters {'sharded' if self.sharded else 'not sharded'}" + \
            (f" ({self.detail})" if self.detail else "") + "."


def default_use_cpu() -> bool:
    """TrainingArguments.use_cpu default: True when torch sees no accelerator (CUDA, XPU, MPS, ...)."""
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return not accelerator.is_available()
    return not torch.cuda.is_available()


def _is_dtensor(p) -> bool:
    return type(p).__name__ == "DTensor" or hasattr(p, "device_mesh") and hasattr(p, "placements")


def describe_engine(accelerator, model: torch.nn.Module | None = None) -> EngineInfo:
    """What engine `accelerator` (a prepared one: call after the model is wrapped) trains with, checked on `model`'s
    parameters where they tell (ZeRO-3 partitioned tensors carry ds_id, FSDP2-sharded ones are DTensors)."""
    from accelerate.utils import DistributedType

    kind, n = accelerator.distributed_type, accelerator.num_processes
    params = list(model.parameters()) if model is not None else []
    if kind == DistributedType.DEEPSPEED:
        stage = int(accelerator.state.deepspeed_plugin.zero_stage)
        partitioned = sum(hasattr(p, "ds_id") for p in params)
        what = {0: "nothing sharded", 1: "optimizer state sharded", 2: "optimizer state and gradients sharded",
                3: f"{partitioned} of {len(params)} parameter tensors partitioned, base included"}[stage]
        return EngineInfo("DeepSpeed", n, sharded=stage == 3 and (partitioned > 0 or model is None), zero_stage=stage,
                          detail=what)
    if kind == DistributedType.FSDP:
        version = int(getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1))
        dtensors = sum(_is_dtensor(p) for p in params)
        detail = f"{dtensors} of {len(params)} parameter tensors are DTensors" if params else ""
        return EngineInfo(f"FSDP{version}", n, sharded=dtensors > 0 if params else True, detail=detail)
    if n > 1:
        backend = getattr(accelerator.state, "backend", None) or ""
        return EngineInfo("DDP", n, sharded=False, detail=f"{backend}, each process holds the whole model".lstrip(", "))
    return EngineInfo("single", 1, sharded=False)


class EngineReport(TrainerCallback):
    """Prints (main process) and logs the engine line when training begins; `trainer.engine_info` keeps it."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        trainer = self.trainer
        model = trainer.model_wrapped if trainer.model_wrapped is not None else trainer.model
        info = describe_engine(trainer.accelerator, model)
        trainer.engine_info = info
        if state.is_world_process_zero:
            print(str(info), flush=True)


@contextlib.contextmanager
def cpu_fsdp2():
    """While active, an AcceleratorState built on CPU processes with an FSDP2 plugin really uses FSDP.

    accelerate (1.x) only moves to DistributedType.FSDP for GPU-like distributed types; on MULTI_CPU it keeps the
    plugin's settings off and runs DDP, a silent fallback. This makes exactly that switch, nothing else.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if (fsdp_plugin is not None and getattr(fsdp_plugin, "fsdp_version", 1) == 2
                and self.distributed_type == DistributedType.MULTI_CPU):
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = self.distributed_type  # as AcceleratorState does

    AcceleratorState.__init__ = init
    try:
        yield
    finally:
        AcceleratorState.__init__ = original


def _deepspeed_requested(deepspeed=None) -> bool:
    return bool(deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def check_engine_available(deepspeed=None) -> None:
    """ImportError naming the extra when DeepSpeed is asked for (TrainingArguments.deepspeed or an accelerate
    DeepSpeed config) but not installed; FSDP2 needs torch's fully_shard (torch >= 2.6)."""
    if _deepspeed_requested(deepspeed) and importlib.util.find_spec("deepspeed") is None:
        raise ImportError(f"DeepSpeed training was requested but DeepSpeed is not installed: {DEEPSPEED_EXTRA}.")
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and \
            os.environ.get("FSDP_VERSION", "1") == "2" and importlib.util.find_spec("torch.distributed.fsdp") is None:
        raise ImportError("FSDP2 training was requested but this torch has no torch.distributed.fsdp.fully_shard; "
                          "install torch >= 2.6.")


def _deepspeed_config(args) -> tuple[dict | None, str]:
    source = getattr(args, "deepspeed", None) or os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if not source or not _deepspeed_requested(source):
        return None, ""
    if isinstance(source, dict):
        return source, "the DeepSpeed config"
    try:
        with open(source, encoding="utf-8") as f:
            return json.load(f), str(source)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"DeepSpeed config '{source}' cannot be read ({exc}); pass a JSON file such as "
                         "configs/deepspeed/zero2.json (paths are relative to the launch directory).") from None


def check_deepspeed_batch_sizes(args) -> None:
    """One-line ValueError, raised identically on every rank before any collective, when a DeepSpeed config
    fixes a batch size (not "auto") that disagrees with the trainer's arguments."""
    config, source = _deepspeed_config(args)
    if config is None:
        return
    world = max(1, int(getattr(args, "world_size", 1)))
    expected = {
        "train_micro_batch_size_per_gpu": (args.per_device_train_batch_size, "--per-device-train-batch-size"),
        "gradient_accumulation_steps": (args.gradient_accumulation_steps, "--gradient-accumulation-steps"),
        "train_batch_size": (world * args.per_device_train_batch_size * args.gradient_accumulation_steps,
                             f"{world} processes x per-device batch x accumulation steps"),
    }
    for key, (value, flag) in expected.items():
        given = config.get(key, "auto")
        if given != "auto" and given != value:
            raise ValueError(f"DeepSpeed config {source} sets {key}={given} but the trainer uses {value} ({flag}); "
                             f"set \"{key}\": \"auto\" in {source} (the shipped configs do) or pass matching flags.")
