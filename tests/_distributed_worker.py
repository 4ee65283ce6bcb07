"""Worker for tests/test_distributed.py: trains fresh heads on a tiny base with AutoDecoTrainer and saves them.

Run by the test under `python -m torch.distributed.run --nproc_per_node N` (CPU, gloo) or as a plain process:

    python tests/_distributed_worker.py --base DIR --data FILE --output-dir DIR --batch-size 2 --max-steps 5

Each process writes its own heads to OUTPUT_DIR/heads_rank{RANK}.safetensors, so the test can check that every
rank ends with the same heads, and rank 0 writes the log history to OUTPUT_DIR/log_history.json. The data order is
sequential: on N processes each optimizer step sees the same N * batch-size rows as one process with batch
N * batch-size, which is what makes the runs comparable.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="tiny base model directory (autodeco.testing.save_tiny_base)")
    parser.add_argument("--data", required=True, help="JSONL training rows")
    parser.add_argument("--output-dir", required=True, help="where heads_rank*.safetensors and the logs go")
    parser.add_argument("--batch-size", type=int, required=True, help="per-device micro-batch size")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--max-steps", type=int, default=5, help="optimizer steps")
    parser.add_argument("--no-average-tokens-across-devices", action="store_true",
                        help="each process normalises by its own token count (Trainer's average_tokens_across_devices="
                             "False): the mean of per-process means, which the test uses as a negative control")
    args = parser.parse_args()

    torch.set_num_threads(1)  # two processes on two cores: no oversubscription
    from transformers import AutoTokenizer

    from autodeco import AutoDecoModelForCausalLM
    from autodeco.data import AutoDecoDataset
    from autodeco.training import AutoDecoTrainer, build_training_arguments, head_state, trainable_parameter_names

    tokenizer = AutoTokenizer.from_pretrained(args.base)
    dataset = AutoDecoDataset.from_jsonl(args.data, tokenizer, max_length=64)
    # easy_token_mask_ratio 0: the mask draws come from each process's RNG, which no single process can reproduce.
    model = AutoDecoModelForCausalLM.from_base(args.base, seed=0, easy_token_mask_ratio=0.0)
    training_args = build_training_arguments(
        args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # Plain SGD without clipping: the update is linear in the gradient, so any error in the loss normalisation
        # (a missing x num_processes, a mean of per-process means) shows in the heads. Adam would hide a constant
        # factor, and clipping could too.
        optim="sgd",
        learning_rate=10.0,
        max_grad_norm=0.0,
        lr_scheduler_type="constant",
        warmup_steps=0,
        average_tokens_across_devices=not args.no_average_tokens_across_devices,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = AutoDecoTrainer(model=model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()

    out = Path(args.output_dir)
    rank = training_args.process_index
    save_file(head_state(model), str(out / f"heads_rank{rank}.safetensors"))
    if rank == 0:
        info = {"world_size": training_args.world_size, "log_history": trainer.state.log_history,
                "trainable": trainable_parameter_names(model)}
        (out / "log_history.json").write_text(json.dumps(info, indent=1), encoding="utf-8")
    if torch.distributed.is_initialized():
        # Shut gloo down while both ranks are alive: exiting with the group open can abort a rank at teardown.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
