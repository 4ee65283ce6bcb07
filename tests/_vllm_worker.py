"""Run vLLM on a tiny AutoDeco directory and dump what the correctness tests compare (a subprocess per model).

    python tests/_vllm_worker.py MODEL_DIR OUT.json

In its own process so each architecture gets a fresh vLLM (one engine per process is what vLLM expects).
"""

import json
import os
import sys

PROMPTS = [[1, 10, 11, 12], [1, 40, 41], [1, 5, 6, 7, 8, 9]]
FIRST_TOKEN_SAMPLES = 400


def main(model_dir: str, out_path: str) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype="float32", max_model_len=256, seed=0, enforce_eager=True, max_num_seqs=16,
              kv_cache_memory_bytes=64 << 20, distributed_executor_backend="uni", max_logprobs=-1)
    result = {"samples": [], "greedy": []}
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    sampled = llm.generate(prompts, [SamplingParams(n=6, max_tokens=10, seed=100 + i, logprobs=-1)
                                     for i in range(len(PROMPTS))], use_tqdm=False)
    for prompt, out in zip(PROMPTS, sampled):
        for c in out.outputs:
            # logprobs: one {token: logprob} per step over the whole vocabulary (-1 = all tokens).
            steps = [{str(t): lp.logprob for t, lp in step.items()} for step in c.logprobs]
            result["samples"].append({"prompt": prompt, "token_ids": list(c.token_ids), "logprobs": steps})
    first = llm.generate(prompts[:1], SamplingParams(n=FIRST_TOKEN_SAMPLES, max_tokens=1, seed=7), use_tqdm=False)
    result["first_tokens"] = [c.token_ids[0] for c in first[0].outputs]
    greedy = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    result["greedy"] = [list(o.outputs[0].token_ids) for o in greedy]
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM may spawn processes: the guard keeps them from re-running this
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    main(sys.argv[1], sys.argv[2])
