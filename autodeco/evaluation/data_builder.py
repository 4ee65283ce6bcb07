"""Training data for the heads by rejection sampling, as in the AutoDeco paper: sample solutions from the base
model, keep the verified-correct ones.

    from autodeco.evaluation import build_training_data
    stats = build_training_data(model, tokenizer, ["train_problems.jsonl"], n=8, output="train.jsonl",
                                max_per_problem=4)

CLI: `autodeco data --model DIR --problems FILE... --n 8 --output train.jsonl [--max-per-problem 4]`. Solutions
are sampled at static T=1, P=1, top_k=0 (heads bypassed) with a per-problem seed; a solution is kept when it
ended with EOS, verifies against `gt`, and is not a duplicate (whitespace aside); at most `max_per_problem` per
problem. Output rows: prompt (as benchmarks.build_prompt writes it), completion, id, benchmark; the samples stay
in OUTPUT.samples.jsonl, so a rerun resumes or only re-filters. Packed sampling and the details:
docs/evaluation.md.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from autodeco.atomic import write_text_atomic
from autodeco.evaluation.benchmarks import Benchmark, build_prompt, load_benchmark, score_completions
from autodeco.evaluation.generation import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    Engine,
    GenerationRequest,
    check_prompts_fit,
    engine_name,
    generate_completions,
    sequences_per_call,
)
from autodeco.evaluation.methods import generation_kwargs, static_method
from autodeco.evaluation.records import RecordStore, data_settings_hash, sample_key, sampling_seed
from autodeco.locks import OutputDirLock

__all__ = ["build_training_data", "dedup_key"]


def dedup_key(text: str) -> str:
    """Two solutions are duplicates when their text is equal up to whitespace."""
    return " ".join(text.split())


def _check_positive(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _waves(calls: list[list[tuple]], n: int, per_call: int | None) -> list[list[list[tuple]]]:
    """Consecutive calls handed to the engine together, up to `per_call` sequences (None: one call each)."""
    waves: list[list[list[tuple]]] = []
    for call in calls:
        if per_call is not None and waves and sum(len(c) for c in waves[-1]) * n + len(call) * n <= per_call:
            waves[-1].append(call)
        else:
            waves.append([call])
    return waves


def build_training_data(
    model,
    tokenizer,
    problems_files: Sequence[str | os.PathLike] | str,
    n: int = 8,
    *,
    output: str | os.PathLike,
    max_per_problem: int | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    template: str | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    limit: int | None = None,
    progress: bool = True,
    verbose: bool = True,
    pack_samples: bool = False,
    engine: Engine | None = None,
) -> dict:
    """Sample `n` solutions per problem, keep the verified, finished, distinct ones (at most `max_per_problem`
    per problem) and write them to `output` as prompt/completion JSONL. Returns (and with `verbose` prints) the
    counts per benchmark: problems, samples, finished (ended with EOS), correct, usable (correct and finished),
    distinct (usable, deduplicated), kept (after the cap), problems_with_data (>= 1 kept).

    pack_samples: sample up to max(1, batch_size // n) problems per `generate` call (see docs/evaluation.md).
    engine: another generation backend (generation.Engine, e.g. autodeco.vllm.engine.VLLMEngine), given the static
    method at (temperature, top_p); None samples with transformers' `model.generate`. A non-"hf" engine's name
    enters the sample keys; `model` still gives the keys and the prompt-length check."""
    max_new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    _check_positive("n", n)
    _check_positive("max_per_problem", max_per_problem, allow_none=True)
    _check_positive("max_new_tokens", max_new_tokens)
    _check_positive("batch_size", batch_size)
    method = static_method(temperature, top_p)  # validates T and P
    output = Path(output)
    if output.is_dir():
        raise ValueError(f"output '{output}' is a directory; pass the path of the JSONL file to write.")
    if isinstance(problems_files, (str, os.PathLike)):
        problems_files = [problems_files]
    if not problems_files:
        raise ValueError("No problem files given; pass one or more benchmark-format JSONL files.")
    benchmarks: list[Benchmark] = [load_benchmark(str(f), limit=limit) for f in problems_files]
    names = [b.name for b in benchmarks]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(f"Two problem files are named '{name}'; give them different file names.")

    # Sampling from the base distribution: explicit T, P and top_k=0, so neither AutoDeco's heads nor a plain base's
    # own generation defaults (top_k=50, T=0.7, ...) change it. An engine gets the static method instead and must
    # sample it the same way (VLLMEngine: the heads bypassed, explicit SamplingParams at top_k=0).
    kwargs = {**generation_kwargs(method), "do_sample": True, "top_k": 0}
    settings = data_settings_hash(model, method_spec=method.spec, n=n, max_new_tokens=max_new_tokens,
                                  template=template, seed=seed, engine=engine_name(engine))
    jobs = []
    for b in benchmarks:
        for index, problem in enumerate(b.problems):
            prompt = build_prompt(problem, tokenizer, template)
            key = sample_key(settings, b.name, problem, prompt)
            jobs.append((b, index, problem, prompt, key))
    check_prompts_fit(model, tokenizer, ((b.name, problem.id, prompt) for b, _, problem, prompt, _ in jobs))

    # One run writes into the output's directory at a time (autodeco.locks): its .samples.jsonl is appended to.
    output.parent.mkdir(parents=True, exist_ok=True)
    with OutputDirLock(output.parent, "data"):
        store = RecordStore(output.parent, name=output.name + ".samples.jsonl")
        done = store.read(keep_completions=True)
        model.eval()

        pending = [job for job in jobs if job[4] not in done]
        # Calls: one problem each, or (packed) up to max(1, batch_size // n) consecutive pending problems of one file.
        calls: list[list[tuple]] = []
        per_call = max(1, batch_size // n) if pack_samples else 1
        for job in pending:
            if calls and len(calls[-1]) < per_call and calls[-1][0][0] is job[0]:
                calls[-1].append(job)
            else:
                calls.append([job])
        bar = None
        if progress and pending:
            bar = tqdm(total=len(pending), desc="sampling solutions", unit="problem", dynamic_ncols=True)
        store.open()
        try:
            for wave in _waves(calls, n, sequences_per_call(engine)):
                requests, placed = [], []
                for call in wave:
                    b, _, first, _, first_key = call[0]
                    call_seed = sampling_seed(seed, method.spec, b.name, first.id, 0)
                    for job in call:
                        requests.append(GenerationRequest(job[3], n, call_seed,
                                                          group=first_key if pack_samples else None))
                        placed.append((job, call_seed, len(call)))
                if engine is not None:
                    outputs = engine.generate(requests, method=method, max_new_tokens=max_new_tokens,
                                              batch_size=batch_size)
                else:  # generate_completions: a module global, so tests can stub it
                    outputs = generate_completions(model, tokenizer, requests, generation_kwargs=kwargs,
                                                   max_new_tokens=max_new_tokens, batch_size=batch_size)
                for ((b, index, problem, prompt, key), call_seed, packed), samples in zip(placed, outputs):
                    texts = [c.text for c in samples]
                    record = {"key": key, "benchmark": b.name, "problem_id": problem.id, "prompt": prompt,
                              "completions": texts, "correct": score_completions(problem, texts),
                              "finished": [c.finished for c in samples], "tokens": [c.num_tokens for c in samples]}
                    if pack_samples:
                        record["sampling_seed"] = call_seed
                        record["packed_problems"] = packed
                    store.append(record)
                    done[key] = record
                del outputs  # the wave's completions: memory stays one wave's, however many problems
                if bar is not None:
                    bar.update(len(placed))
        finally:
            store.close()
            if bar is not None:
                bar.close()

        rows: list[dict] = []
        stats: dict[str, dict] = {}
        for b, index, problem, prompt, key in jobs:
            record = done[key]
            s = stats.setdefault(b.name, {"problems": 0, "samples": 0, "finished": 0, "correct": 0, "usable": 0,
                                          "distinct": 0, "kept": 0, "problems_with_data": 0})
            s["problems"] += 1
            seen: set[str] = set()
            kept = 0
            for text, ok, finished in zip(record["completions"], record["correct"], record["finished"]):
                s["samples"] += 1
                s["finished"] += bool(finished)
                s["correct"] += bool(ok)
                if not (ok and finished and text.strip()):
                    continue
                s["usable"] += 1
                if dedup_key(text) in seen:
                    continue
                seen.add(dedup_key(text))
                s["distinct"] += 1
                if max_per_problem is None or kept < max_per_problem:
                    kept += 1
                    rows.append({"prompt": prompt, "completion": text, "id": problem.id, "benchmark": b.name})
            s["kept"] += kept
            s["problems_with_data"] += kept > 0
        total = {k: sum(s[k] for s in stats.values()) for k in next(iter(stats.values()))}
        write_text_atomic(output, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        result = {"output": str(output), "samples_file": str(store.main), "benchmarks": stats, "total": total,
                  "n": n, "max_per_problem": max_per_problem, "temperature": temperature, "top_p": top_p}
        if verbose:
            for name, s in [*stats.items(), ("total", total)]:
                print(f"{name}: kept {s['kept']}/{s['samples']} samples ({s['correct']} correct, {s['usable']} correct and "
                      f"ended with EOS, {s['distinct']} distinct) for {s['problems_with_data']}/{s['problems']} problems",
                      flush=True)
            print(f"Wrote {len(rows)} rows to {output} (samples kept in {store.main} for reruns).", flush=True)
        return result
