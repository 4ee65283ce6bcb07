"""Worker for tests/test_engines_distributed.py: `autodeco train` (autodeco.cli.main) plus a per-rank record.

    accelerate launch --config_file configs/accelerate/deepspeed_zero3.yaml --num_processes 2 \
        tests/_engines_worker.py train --model BASE --data FILE --output-dir DIR ...

It runs the real CLI; a callback added to every Trainer writes, on each rank at the end of training,
OUTPUT_DIR/engine_rank{R}.safetensors (the heads, gathered under ZeRO-3 / FSDP2) and engine_rank{R}.json (the
engine line, which parameters the optimizer holds, how far the frozen base moved, DTensor / partitioned counts).
AUTODECO_TEST_KILL_AT_STEP=N: rank 0 kills itself with SIGKILL at the end of step N (the resume test).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback


def _full(param: torch.Tensor) -> torch.Tensor:
    return param.full_tensor() if hasattr(param, "full_tensor") else param  # FSDP2 DTensor -> whole tensor


class Recorder(TrainerCallback):
    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        kill_at = int(os.environ.get("AUTODECO_TEST_KILL_AT_STEP", "0"))
        if kill_at and state.global_step == kill_at and args.process_index == 0:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_end(self, args, state, control, **kwargs):
        trainer = self.trainer
        model = trainer.accelerator.unwrap_model(trainer.model_wrapped)
        params = dict(model.named_parameters())
        gather = torch.no_grad()
        if any(hasattr(p, "ds_id") for p in params.values()):
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None)
        # The file itself: from_pretrained under ZeRO-3 would partition it (zero.Init) and compare nothing.
        reference = load_file(str(Path(model.config.base_model_name_or_path) / "model.safetensors"))
        with gather:
            full = {name: _full(p).detach().cpu().clone() for name, p in params.items()}  # collective: every rank
        heads = {k: v for k, v in full.items() if k.startswith(("temperature_head.", "top_p_head."))}
        base_change = max(float((full["llm." + k] - v).abs().max()) for k, v in reference.items()
                          if "llm." + k in full)
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
        groups = getattr(optimizer, "bit16_groups", None) or getattr(optimizer, "fp16_groups", None) or \
            [g["params"] for g in optimizer.param_groups]
        held = {id(p) for group in groups for p in group}
        out = Path(args.output_dir)
        save_file(heads, str(out / f"engine_rank{args.process_index}.safetensors"))
        record = {
            "engine": str(trainer.engine_info),
            "name": trainer.engine_info.name,
            "sharded": trainer.engine_info.sharded,
            "is_fsdp_enabled": trainer.is_fsdp_enabled,
            "is_deepspeed_enabled": trainer.is_deepspeed_enabled,
            "dtensor_parameters": sum(hasattr(p, "device_mesh") for p in params.values()),
            "partitioned_parameters": sum(hasattr(p, "ds_id") for p in params.values()),
            "parameters": len(params),
            "optimizer_parameters": sorted(n for n, p in params.items() if id(p) in held),
            "requires_grad": sorted(n for n, p in params.items() if p.requires_grad),
            "base_max_abs_change": base_change,
            "base_compared": sum("llm." + k in full for k in reference),
            "world_size": args.world_size,
            "global_step": state.global_step,
        }
        (out / f"engine_rank{args.process_index}.json").write_text(json.dumps(record, indent=1), encoding="utf-8")


def main() -> int:
    original = transformers.Trainer.__init__

    def init(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(Recorder(self))

    transformers.Trainer.__init__ = init
    from autodeco.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    sys.exit(main())
