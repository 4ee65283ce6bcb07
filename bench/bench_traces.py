"""Teacher-forced T/P traces: one completion at a time vs a request's samples batched, in one run.

    PYTHONPATH=$PWD .venv/bin/python bench/bench_traces.py                  # 8 samples x 64 tokens, a few seconds
    PYTHONPATH=$PWD .venv/bin/python bench/bench_traces.py --samples 16 --tokens 256 --prompt 128

Builds a small random AutoDeco model (qwen2 shape, random weights: only the shape matters for speed) and times,
for one prompt and --samples completions of --tokens tokens:
  single  - TeacherForcedTraces(prompt, completion) per completion (the old path: the prompt recomputed each time);
  many    - TeacherForcedTraces.many(prompt, completions) (prompt prefilled once, cache repeated to the batch);
  padded  - the alternative: one right-padded batch of whole prompt + completion sequences, no cache sharing.
Each is timed --repeats times interleaved, the fastest run counting; prints seconds and the ratios to single.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from autodeco import AutoDecoModelForCausalLM
from autodeco.testing import build_char_tokenizer
from autodeco.vllm.traces import TeacherForcedTraces


def build_model(directory: Path, layers: int, hidden: int, vocab: int) -> AutoDecoModelForCausalLM:
    config = AutoConfig.for_model(
        "qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=1, max_position_embeddings=4096,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    base.save_pretrained(directory)
    build_char_tokenizer().save_pretrained(directory)
    model = AutoDecoModelForCausalLM.from_base(str(directory)).eval()
    with torch.no_grad():  # fresh heads give constant T and P: random ones make the diff check mean something
        for head in (model.temperature_head, model.top_p_head):
            last = head.mlp[2]
            last.weight.copy_(torch.randn(last.weight.shape) / last.weight.shape[1] ** 0.5)
    return model


@torch.no_grad()
def padded(model, prompt: list[int], completions: list[list[int]]):
    """Whole sequences as one right-padded batch (no attention mask needed: pads only follow real tokens)."""
    rows = [prompt + c[:-1] for c in completions]
    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [r[-1]] * (width - len(r)) for r in rows])  # [n, width]
    out = model(input_ids=ids, logits_to_keep=width - len(prompt) + 1)
    return [(out.temperature[i, : len(c)].tolist(), out.top_p[i, : len(c)].tolist())
            for i, c in enumerate(completions)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=64, help="prompt length in tokens")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--chunk", type=int, default=256, help="TeacherForcedTraces chunk (positions per row)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        model = build_model(Path(work) / "base", args.layers, args.hidden, args.vocab)
    tracer = TeacherForcedTraces("unused", model=model, chunk=args.chunk)
    g = torch.Generator().manual_seed(1)
    prompt = [1] + torch.randint(3, args.vocab, (args.prompt - 1,), generator=g).tolist()
    completions = [torch.randint(3, args.vocab, (args.tokens,), generator=g).tolist() for _ in range(args.samples)]
    ways = {"single": lambda: [tracer(prompt, c) for c in completions],
            "many": lambda: tracer.many(prompt, completions),
            "padded": lambda: padded(model, prompt, completions)}
    ways["many"]()  # warm-up
    best = dict.fromkeys(ways, float("inf"))
    results = {}
    for _ in range(args.repeats):
        for name, run in ways.items():
            start = time.perf_counter()
            results[name] = run()
            best[name] = min(best[name], time.perf_counter() - start)
    worst = max(abs(a - b) for name in ("many", "padded") for got, want in zip(results[name], results["single"])
                for k in (0, 1) for a, b in zip(got[k], want[k]))
    print(f"{args.samples} samples x {args.tokens} tokens, prompt {args.prompt}, qwen2 {args.layers} layers "
          f"hidden {args.hidden} vocab {args.vocab}, {torch.get_num_threads()} threads, chunk {args.chunk}, rows per batch "
          f"{min(tracer.rows_per_batch(), args.samples)}; max |diff| vs single {worst:.1e}")
    for name in ways:
        print(f"  {name:7s} {best[name]:.3f} s   single / {name}: {best['single'] / best[name]:.2f}x")


if __name__ == "__main__":
    main()
