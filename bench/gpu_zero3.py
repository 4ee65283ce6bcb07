"""DeepSpeed ZeRO-3 on one GPU: peak memory and step time of a heads' training step, fused loss vs full logits.

    pip install "autodeco[deepspeed]"
    python bench/gpu_zero3.py                                   # 0.5B-shaped bf16 base, 8,192-token sequences
    python bench/gpu_zero3.py --layers 24 --tokens 16384 --steps 5
    python bench/gpu_zero3.py --device cpu --layers 1 --vocab 4096 --tokens 256 --steps 2   # smoke test, no GPU

For a lent GPU (not run on the CPU-only machine where it was written; the smoke test above was). The base is
Qwen2.5-0.5B-shaped and random (hidden 896, 24 layers, vocabulary 151,936, tied embeddings) in bfloat16; the
heads stay float32. Each variant ("fused": AutoDecoTrainer's default, "full": fused_loss=False) runs in a fresh
subprocess: AutoDecoTrainer with configs/deepspeed/zero3.json (batch sizes "auto", so filled from the trainer),
one process (world size 1, env set here), --steps optimizer steps on one --tokens-long sequence each (64-token
prompt, the rest supervised). Reported: torch.cuda.max_memory_allocated over the run (parameters included),
the median step time from step 2 on, and the loss of each step (fused and full should agree to ~1e-5).
Print a markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PROMPT = 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n, tokens, vocab, seed):
        gen = torch.Generator().manual_seed(seed)
        self.rows = []
        for _ in range(n):
            ids = torch.randint(0, vocab, (PROMPT + tokens,), generator=gen)
            labels = ids.clone()
            labels[:PROMPT] = -100
            self.rows.append({"input_ids": ids, "labels": labels})

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def worker(args) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, TrainerCallback

    from autodeco import AutoDecoModelForCausalLM
    from autodeco.training import AutoDecoTrainer, build_training_arguments

    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    config = AutoConfig.for_model(
        "qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=args.layers, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=args.vocab, tie_word_embeddings=True,
        max_position_embeddings=args.tokens + PROMPT, attn_implementation="sdpa")
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = AutoDecoModelForCausalLM.from_base(base, seed=0, easy_token_mask_ratio=0.0)
    ds = json.loads((REPO / "configs" / "deepspeed" / "zero3.json").read_text())
    training_args = build_training_arguments(
        args.output_dir, max_steps=args.steps, per_device_train_batch_size=1, gradient_accumulation_steps=1,
        learning_rate=1e-4, warmup_steps=0, deepspeed=ds, save_strategy="no", report_to="none", logging_steps=1,
        disable_tqdm=True, use_cpu=not cuda, dataloader_pin_memory=False)
    times, losses = [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t0)

        def on_log(self, args_, state, control, logs=None, **k):
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer = AutoDecoTrainer(model=model, args=training_args, data_collator=_collate,
                              train_dataset=_Rows(args.steps, args.tokens, args.vocab, 0),
                              fused_loss=args.variant == "fused", callbacks=[Timer()])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    print(json.dumps({"variant": args.variant, "engine": str(trainer.engine_info), "peak_gib": peak,
                      "step_s": statistics.median(times[1:] or times), "losses": losses}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192, help="supervised tokens per sequence (after a 64-token prompt)")
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="the base's dtype")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--variants", default="fused,full")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--output-dir", default="runs/gpu_zero3", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu_zero3.py: no CUDA device; run it on a GPU machine (or --device cpu for the smoke test).")
    rows = []
    for variant in args.variants.split(","):
        env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
               "LOCAL_RANK": "0", "WORLD_SIZE": "1", "PYTHONPATH": str(REPO)}
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # the venv's ninja first
        cmd = [sys.executable, __file__, "--worker", "--variant", variant, *(
            f"--{k}={v}" for k, v in (("tokens", args.tokens), ("layers", args.layers), ("vocab", args.vocab),
                                      ("steps", args.steps), ("dtype", args.dtype), ("device", args.device)))]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{variant}: failed\n{proc.stderr[-4000:]}")
            rows.append({"variant": variant, "failed": True})
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print(f"\n{args.layers}-layer 0.5B-shaped {args.dtype} base, vocabulary {args.vocab:,}, {args.tokens:,} supervised "
          f"tokens per step, DeepSpeed ZeRO-3, 1 {args.device} device\n")
    print("| variant | peak GiB | step s | losses |\n|---|---:|---:|---|")
    for r in rows:
        if r.get("failed"):
            print(f"| {r['variant']} | failed | | |")
        else:
            print(f"| {r['variant']} | {r['peak_gib']:.2f} | {r['step_s']:.2f} | {', '.join(f'{x:.5f}' for x in r['losses'])} |")


if __name__ == "__main__":
    main()
