"""Peak memory and time of one AutoDeco training step: full logits (today) vs the fused loss (autodeco/modeling/fused_loss.py).

    python bench/bench_train_memory.py                          # 2K/8K/16K supervised tokens, 2 layers (~15 min, 2 cores)
    python bench/bench_train_memory.py --tokens 8192 --layers 24   # the whole 0.5B shape (slow: the base dominates)
    python bench/bench_train_memory.py --tokens 256 --vocab 4096   # quick check

The base is Qwen2.5-0.5B-shaped and random (hidden 896, 14 heads, 2 KV heads, intermediate 4864, vocabulary
151,936, tied embeddings, float32), with --layers decoder layers (default 2: the base's own activations are not
what is measured, and each layer adds the same to every variant). One sequence: a 64-token prompt, then --tokens
supervised tokens. A step is forward + backward of both heads' losses (AutoDecoModelForCausalLM.forward with
labels; fused_loss=True for "fused"), easy-token masking at the paper's 0.6 from the same seed.
Each variant runs in a fresh subprocess (this script with --worker): after the model exists and a 32-token
warm-up step ran, the RSS high-water mark is reset (/proc/self/clear_refs, as bench/bench_losses.py does), and
peak extra memory = VmHWM after the step - RSS before it. "base" is the base's forward alone (logits_to_keep=1,
no heads): what the base's activations cost, which no loss can avoid. Losses and head gradients of today and
fused are compared in the same run (relative max error). Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_losses import PeakMemory  # noqa: E402

PROMPT = 64
GOAL_MEMORY_RATIO = 1 / 4
GOAL_TIME_RATIO = 1.1
GOAL_RTOL = 1e-5


def build_model(layers: int, vocab: int, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    from autodeco import AutoDecoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=layers, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=vocab, tie_word_embeddings=True, max_position_embeddings=32768 + PROMPT,
        rope_theta=1e6, attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return AutoDecoModelForCausalLM.from_base(base, seed=0).train()


def make_batch(tokens: int, vocab: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (1, PROMPT + tokens), generator=gen)
    labels = input_ids.clone()
    labels[:, :PROMPT + 1] = -100  # the completion's first token is predicted from the prompt's last
    labels[:, -1] = input_ids[:, -1]
    return {"input_ids": input_ids, "labels": labels}


def step(model, batch, variant: str):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)  # the easy-token mask draws
    if variant == "base":
        with torch.no_grad():
            model.llm(input_ids=batch["input_ids"], logits_to_keep=1)
        return None
    out = model(**batch, fused_loss=variant == "fused")
    out.loss.backward()
    return out


def worker(args) -> None:
    torch.set_num_threads(args.threads)
    model = build_model(args.layers, args.vocab, args.seed)
    step(model, make_batch(32, args.vocab, 0), args.variant)  # warm-up: kernels, thread pools, lazy imports
    batch = make_batch(args.tokens, args.vocab, args.seed)
    model.zero_grad(set_to_none=True)
    memory = PeakMemory()
    wall0 = time.perf_counter()
    out = step(model, batch, args.variant)
    wall = time.perf_counter() - wall0
    peak = memory.extra_mb()
    result = {"variant": args.variant, "tokens": args.tokens, "wall_s": wall, "peak_extra_mb": peak}
    if out is not None:
        result.update(loss=float(out.loss), temperature_loss=float(out.temperature_loss), top_p_loss=float(out.top_p_loss))
        if args.save:
            grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
            torch.save({"losses": {k: getattr(out, k).detach() for k in ("loss", "temperature_loss", "top_p_loss")},
                        "grads": grads}, args.save)
    print(json.dumps(result))


def spawn(args, variant: str, tokens: int, save: str = "") -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--variant", variant, "--tokens", str(tokens),
           "--layers", str(args.layers), "--vocab", str(args.vocab), "--seed", str(args.seed),
           "--threads", str(args.threads)] + (["--save", save] if save else [])
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.malloc_mmap_threshold:
        # glibc keeps freed [chunk, V] buffers in its heap (RSS stays high); a fixed mmap threshold returns them.
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"  {variant:>5} {tokens:>6} tokens: peak extra {result['peak_extra_mb']:9.1f} MB, step {result['wall_s']:7.1f} s",
          flush=True)
    return result


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="2048,8192,16384", help="supervised tokens per step, comma-separated")
    parser.add_argument("--compare-tokens", type=int, default=8192, help="where today and fused are compared")
    parser.add_argument("--today-tokens", default="2048,8192", help="lengths today's path runs at (16K needs ~11 GB)")
    parser.add_argument("--layers", type=int, default=2, help="decoder layers of the 0.5B-shaped base (24 = all)")
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--malloc-mmap-threshold", type=int, default=0, metavar="BYTES",
                        help="set MALLOC_MMAP_THRESHOLD_ for the workers (e.g. 131072): the allocation peak without "
                             "glibc's heap retention (default: glibc's defaults, what a user's process sees)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", choices=("today", "fused", "base"), help=argparse.SUPPRESS)
    parser.add_argument("--save", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.tokens = int(args.tokens)
        return worker(args)

    lengths = [int(t) for t in args.tokens.split(",")]
    today_lengths = {int(t) for t in args.today_tokens.split(",") if t}
    print(f"Qwen2.5-0.5B-shaped random base, {args.layers} layers, vocabulary {args.vocab:,}, float32, "
          f"{args.threads} threads, torch {torch.__version__}"
          + (f", MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}" if args.malloc_mmap_threshold else ""), flush=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for tokens in lengths:
            save = tokens == args.compare_tokens
            # today and fused alternate, so a busy machine slows both alike
            for variant in ("today", "fused", "base"):
                if variant == "today" and tokens not in today_lengths:
                    continue
                path = os.path.join(tmp, f"{variant}{tokens}.pt") if save and variant != "base" else ""
                results[(variant, tokens)] = spawn(args, variant, tokens, path)
        compare = args.compare_tokens
        accuracy = {}
        if ("today", compare) in results and ("fused", compare) in results:
            a = torch.load(os.path.join(tmp, f"fused{compare}.pt"))
            b = torch.load(os.path.join(tmp, f"today{compare}.pt"))
            accuracy["losses"] = max(rel_error(a["losses"][k], b["losses"][k]) for k in b["losses"])
            accuracy["head_grads"] = max(rel_error(a["grads"][k], b["grads"][k]) for k in b["grads"])
            assert set(a["grads"]) == set(b["grads"]) and all(k.startswith(("temperature_head", "top_p_head"))
                                                               for k in a["grads"])

    print("\n| tokens | variant | peak extra MB | step s | heads' extra over the base's forward MB |")
    print("|---:|---|---:|---:|---:|")
    for (variant, tokens), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        base = results.get(("base", tokens))
        over = f"{r['peak_extra_mb'] - base['peak_extra_mb']:.0f}" if base and variant != "base" else ""
        print(f"| {tokens:,} | {variant} | {r['peak_extra_mb']:.0f} | {r['wall_s']:.1f} | {over} |")
    if accuracy:
        today, fused = results[("today", compare)], results[("fused", compare)]
        memory_ratio = fused["peak_extra_mb"] / today["peak_extra_mb"]
        time_ratio = fused["wall_s"] / today["wall_s"]
        print(f"\nAt {compare:,} supervised tokens, same run: fused / today peak memory = {memory_ratio:.3f} "
              f"(goal <= {GOAL_MEMORY_RATIO:.2f}: {'met' if memory_ratio <= GOAL_MEMORY_RATIO else 'NOT met'}); "
              f"step time = {time_ratio:.2f}x (goal <= {GOAL_TIME_RATIO}x: "
              f"{'met' if time_ratio <= GOAL_TIME_RATIO else 'NOT met'}); max relative error, losses "
              f"{accuracy['losses']:.1e}, head gradients {accuracy['head_grads']:.1e} (goal <= {GOAL_RTOL:g}: "
              f"{'met' if max(accuracy.values()) <= GOAL_RTOL else 'NOT met'}).")
    fused = [(t, results[("fused", t)], results.get(("base", t))) for t in lengths if ("fused", t) in results]
    if len(fused) > 1 and all(b for _, _, b in fused):
        overs = ", ".join(f"{t:,}: {r['peak_extra_mb'] - b['peak_extra_mb']:.0f} MB" for t, r, b in fused)
        print(f"Fused peak beyond the base's own forward, by length: {overs}.")


if __name__ == "__main__":
    main()
