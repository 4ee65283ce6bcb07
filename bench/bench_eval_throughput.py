"""`autodeco eval` throughput, vLLM engine vs transformers engine, on the same model and workload in one run.

    .venv-vllm/bin/python bench/bench_eval_throughput.py                          # 64 problems x 8 samples x 256
    .venv-vllm/bin/python bench/bench_eval_throughput.py --problems 8 --samples 4 --tokens 32   # a quick look

Builds a random Qwen2.5-0.5B-shaped AutoDeco model (bench_vllm.build_model: hidden 896, 24 layers, vocabulary
151,936; random weights, only the shape matters for speed) and runs the library's run_evaluation twice on one
benchmark of --problems problems, method autodeco (the heads' T and P, with per-token traces), n = --samples, one
seed, --tokens new tokens: once with engine=VLLMEngine (the vLLM load is done before the clock starts), once with
the transformers engine (--batch-size sequences per generate call, packed so that a call holds whole problems).
Scoring is stubbed (every sample scored wrong) so the comparison is generation plus the runner's bookkeeping.
Prints samples per second of each, generation-only seconds (for vLLM also the teacher-forced T/P traces' share),
and the ratio vLLM / transformers (goal >= 3x at the full workload on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench_vllm import build_model  # one definition of the benchmark model (run from bench/ as a script)


def _timed(fn, total: list[float]):
    """fn, adding the seconds each call takes to total[0]."""
    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            total[0] += time.perf_counter() - start
    return timed


def _benchmark_file(directory: Path, problems: int) -> Path:
    path = directory / "bench.jsonl"
    rows = [{"id": f"p{i}", "problem": f"What is {i} + {2 * i}? Explain.", "gt": str(3 * i)} for i in range(problems)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(engine_name: str, model_dir: Path, work: Path, args) -> dict:
    import torch

    from autodeco import AutoDecoModelForCausalLM
    from autodeco.evaluation import runner
    from autodeco.evaluation.benchmarks import load_benchmark
    from autodeco.testing import build_char_tokenizer
    from autodeco.vllm.engine import VLLMEngine

    runner.score_completions = lambda problem, completions: [False] * len(completions)
    original = runner.generate_completions
    model = AutoDecoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokenizer = build_char_tokenizer()
    benchmark = load_benchmark(str(_benchmark_file(work, args.problems)))
    generation, tracing = [0.0], [0.0]
    engine = tracer = None
    if engine_name == "vllm":
        engine = VLLMEngine(model_dir, trace_model=model, dtype="float32", max_model_len=args.tokens + 256,
                            enforce_eager=True, max_num_seqs=args.max_num_seqs, kv_cache_memory_bytes=args.kv_bytes,
                            distributed_executor_backend="uni", max_num_batched_tokens=65536)
        engine.llm("dynamic")  # the load is not what this benchmark times
        tracer = engine.tracer
        tracer.many = _timed(tracer.many, tracing)  # what _add_traces calls, once per request: timed on its own
        engine.generate = _timed(engine.generate, generation)
    else:
        runner.generate_completions = _timed(runner.generate_completions, generation)
    start = time.perf_counter()
    try:
        results = runner.run_evaluation(
            model, tokenizer, [benchmark], "autodeco", n=args.samples, seeds=1, ks=(1,),
            output_dir=work / f"eval-{engine_name}", max_new_tokens=args.tokens, batch_size=args.batch_size,
            plots=False, progress=False, pack_samples=engine_name == "hf", engine=engine)
    finally:
        seconds = time.perf_counter() - start
        if engine is not None:
            del tracer.many  # the class's method again
            engine.close()
        runner.generate_completions = original
    cell = results["results"]["autodeco"][benchmark.name]
    samples = args.problems * args.samples
    return {"seconds": seconds, "generation_seconds": generation[0], "trace_seconds": tracing[0], "samples": samples,
            "samples_per_s": samples / seconds, "mean_tokens": cell.get("tokens"),
            "mean_temperature": cell.get("mean_temperature")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=64)
    parser.add_argument("--samples", type=int, default=8, help="samples per problem (n)")
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per sample at most")
    parser.add_argument("--layers", type=int, default=24, help="decoder layers of the 0.5B shape (default 24)")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="transformers engine: sequences per generate call (packed problems; default 64)")
    parser.add_argument("--max-num-seqs", type=int, default=256, help="vLLM: sequences scheduled at once")
    parser.add_argument("--kv-bytes", type=int, default=2 << 30, help="vLLM CPU: KV cache bytes (default 2 GiB)")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = build_model(tmp / "autodeco", args.layers)
        result = {}
        for name in ("vllm", "hf"):
            result[name] = run(name, model_dir, tmp, args)
            print(f"{name} done: {result[name]}", flush=True)
    print(f"autodeco eval throughput: {args.problems} problems x {args.samples} samples x {args.tokens} new tokens, "
          f"method autodeco with T/P traces, Qwen2.5-0.5B shape ({args.layers} layers, V=151936), float32, "
          f"{os.cpu_count()} CPUs")
    for name, r in result.items():
        traces = f" of which T/P traces {r['trace_seconds']:.1f} s" if name == "vllm" else ""
        print(f"  {name:>4}: {r['samples_per_s']:.3f} samples/s ({r['seconds']:.1f} s; generation "
              f"{r['generation_seconds']:.1f} s{traces}; mean {r['mean_tokens']} tokens, mean T "
              f"{r['mean_temperature']:.4f})")
    ratio = result["vllm"]["samples_per_s"] / result["hf"]["samples_per_s"]
    print(f"  ratio vllm / hf: {ratio:.2f}x (goal >= 3x at 64 x 8 x 256 on a GPU)")
    return 0


if __name__ == "__main__":  # vLLM may spawn processes: the guard keeps them from re-running the benchmark
    sys.exit(main())
