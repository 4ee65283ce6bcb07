"""`autodeco demo`: the paper's whole pipeline, end to end on a laptop CPU, on the demo's tiny base model and tasks.

    from autodeco.demo.pipeline import run_demo
    summary = run_demo("runs/demo", quick=True)      # CLI: autodeco demo [--quick] [--output-dir DIR] [--retrain-base]

Steps (each writes under OUTPUT_DIR; a rerun resumes): 1. problems (train and held-out test splits), 2. the headroom
probe (demo/probe.py: a hand-written per-token schedule vs a static grid, on the frozen base), 3. data (rejection
sampling from the frozen base: evaluation.build_training_data), 4. heads and 5. heads with decoding control
(training.train_heads), 6. heads trained on the verifier's reward, starting from the heads of step 4
(training.train_heads_reward), 7. evaluate every method on the test split (evaluation.run_evaluation), 8. the gain
decomposition of both head sets, 9. decoding control on held-out prompts (evaluation.evaluate_control), 10. report.md
(demo/report.py). Every step is a library call; nothing is tuned on the test split except the labelled oracle and
the probe's static grid. Seeds are fixed in DemoSettings. Details: docs/demo.md.
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

from accelerate import PartialState
from transformers import AutoModelForCausalLM, AutoTokenizer

from autodeco.modeling.io import load_tokenizer, resolve_dtype
from autodeco.atomic import write_json_atomic, write_text_atomic
from autodeco.demo import tasks
from autodeco.demo.base import BASE_MODEL_DIR, DEMO_TEMPLATE, BaseTrainingConfig, render_prompt, train_base
from autodeco.demo.probe import run_probe
from autodeco.demo.settings import FULL, QUICK, DemoSettings
from autodeco.demo.report import (control_verdicts, environment, family_table, report_markdown, results_table,
                                  reward_verdicts, verdicts)
from autodeco.evaluation.benchmarks import load_benchmark
from autodeco.evaluation.control import evaluate_control
from autodeco.evaluation.data_builder import build_training_data
from autodeco.evaluation.diagnostics import decompose
from autodeco.evaluation.runner import run_evaluation
from autodeco.modeling import AutoDecoModelForCausalLM
from autodeco.training import AutoDecoTrainingArguments, RewardTrainingArguments, train_heads, train_heads_reward

__all__ = ["DemoSettings", "FULL", "QUICK", "run_demo", "DEMO_METHODS"]

DEMO_METHODS = ("greedy, default, oracle, meanshift, autodeco-temperature-only, autodeco-top-p-only, min_p:0.1, edt, "
                "autodeco")


class _Steps:
    """Numbered progress lines on stderr, with the elapsed time."""

    def __init__(self, total: int, progress: bool):
        self.total, self.index, self.progress, self.start = total, 0, progress, time.perf_counter()

    def __call__(self, text: str) -> None:
        self.index += 1
        if self.progress:
            elapsed = time.perf_counter() - self.start
            print(f"[{self.index}/{self.total}] {text}  ({elapsed:.0f} s elapsed)", file=sys.stderr, flush=True)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))


def _clean_solutions(problems: list[tasks.DemoProblem], path: Path, seed: int) -> None:
    """Reference solutions of the test problems (clean teacher), for the teacher-forced decomposition only."""
    rng = random.Random(f"autodeco-demo-solutions:{seed}")
    _write_jsonl(path, [{"prompt": render_prompt(p.problem), "completion": tasks.solve(p, rng)} for p in problems])


def _sampling_base(base_dir: Path):
    """(model, tokenizer) of the base for rejection sampling, as `autodeco data` loads it: this process's device,
    dtype auto (bfloat16 on a bf16 GPU, else float32), eval mode."""
    device = PartialState().device
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=resolve_dtype("auto", on_gpu=device.type == "cuda"))
    return model.to(device).eval(), load_tokenizer(str(base_dir))


def run_demo(output_dir: str | Path = "runs/demo", *, quick: bool = False, retrain_base: bool = False,
             base_model: str | Path | None = None, settings: DemoSettings | None = None, progress: bool = True) -> dict:
    """Run the demo pipeline (module docstring) into `output_dir`; returns a summary dict (also summary.json).

    base_model: a demo base directory (default: the bundled BASE_MODEL_DIR; with retrain_base, OUTPUT_DIR/base)."""
    settings = settings or (QUICK if quick else FULL)
    output_dir = Path(output_dir)
    if output_dir.is_file():
        raise ValueError(f"--output-dir '{output_dir}' is a file; pass a directory.")
    output_dir.mkdir(parents=True, exist_ok=True)
    data_dir = output_dir / "data"
    data_dir.mkdir(exist_ok=True)
    step = _Steps(11 if retrain_base else 10, progress)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    def timed(name: str, since: float) -> float:
        now = time.perf_counter()
        timings[name] = round(now - since, 1)
        return now

    clock = started
    if retrain_base and base_model is not None:
        raise ValueError("--retrain-base trains a new base into OUTPUT_DIR/base; drop --base-model (or --retrain-base).")
    base_dir = Path(base_model) if base_model is not None else BASE_MODEL_DIR
    if retrain_base:
        base_dir = output_dir / "base"
        step(f"training the base model from scratch into {base_dir} (seed {settings.seed})")
        if not (base_dir / "model.safetensors").is_file():
            train_base(base_dir, BaseTrainingConfig(seed=settings.seed), progress=progress)
        clock = timed("base", clock)
    if not (Path(base_dir) / "config.json").is_file():
        raise FileNotFoundError(f"The demo base model is missing from '{base_dir}'; reinstall autodeco or run "
                                "`autodeco demo --retrain-base`.")

    # 1. problems
    step(f"writing {settings.train_problems} training and {settings.test_problems} held-out test problems")
    train_problems = tasks.generate_problems("train", settings.train_problems, seed=settings.seed + 1)
    test_problems = tasks.generate_problems("test", settings.test_problems, seed=settings.seed + 2)
    train_file, test_file = data_dir / "train_problems.jsonl", data_dir / "demo_test.jsonl"
    _write_jsonl(train_file, [p.as_benchmark_row() for p in train_problems])
    # Family by family: packed sampling then batches problems of one family, so the short arithmetic
    # completions do not wait for the longer searches.
    _write_jsonl(test_file, [p.as_benchmark_row() for f in tasks.FAMILIES for p in test_problems if p.family == f])
    solutions_file = data_dir / "test_solutions.jsonl"
    _clean_solutions(test_problems, solutions_file, settings.seed)
    clock = timed("problems", clock)

    # 2. the headroom probe on the frozen base
    step(f"headroom probe: a per-token schedule vs static T on the frozen base ({settings.probe_n} samples x "
         f"{settings.probe_seeds} seeds)")
    benchmark = load_benchmark(str(test_file))
    base, base_tokenizer = _sampling_base(base_dir)
    probe = run_probe(base, base_tokenizer, benchmark, output=output_dir / "probe.json", n=settings.probe_n,
                      seeds=settings.probe_seeds, max_new_tokens=settings.max_new_tokens,
                      batch_size=settings.generation_batch_size, template=DEMO_TEMPLATE, seed=settings.seed)
    clock = timed("probe", clock)

    # 3. rejection-sampled training data from the frozen base
    step(f"rejection sampling: {settings.samples_per_problem} samples per training problem from the base (T=1, P=1)")
    train_data = data_dir / "train.jsonl"
    stats_file = data_dir / "train_stats.json"
    if train_data.is_file() and stats_file.is_file():
        data_stats = json.loads(stats_file.read_text(encoding="utf-8"))
    else:
        data_stats = build_training_data(
            base, base_tokenizer, [str(train_file)], settings.samples_per_problem, output=str(train_data),
            max_per_problem=settings.max_per_problem, max_new_tokens=settings.max_new_tokens,
            batch_size=settings.generation_batch_size, template=DEMO_TEMPLATE, seed=settings.seed, pack_samples=True)
        write_json_atomic(stats_file, data_stats)
    clock = timed("data", clock)

    del base
    # 4. heads, 5. heads with control
    heads_dir, control_dir = output_dir / "heads", output_dir / "heads-control"

    def train_config(output: Path, **extra) -> AutoDecoTrainingArguments:
        return AutoDecoTrainingArguments(
            output_dir=str(output), max_steps=settings.heads_steps, learning_rate=settings.heads_learning_rate,
            per_device_train_batch_size=settings.heads_batch_size, gradient_accumulation_steps=1, seed=settings.seed,
            save_steps=100000, disable_tqdm=not progress, **extra)

    step(f"training the AutoDeco heads ({settings.heads_steps} steps, base frozen)")
    if not (heads_dir / "autodeco_heads.safetensors").is_file():
        train_heads(str(base_dir), [str(train_data)], train_config(heads_dir))
    clock = timed("heads", clock)
    step(f"training heads with decoding control ({settings.control_share:.0%} of prompts get a command)")
    if not (control_dir / "autodeco_heads.safetensors").is_file():
        train_heads(str(base_dir), [str(train_data)], train_config(control_dir, control_share=settings.control_share))
    clock = timed("control_heads", clock)

    # 6. heads trained on the verifier's reward (exact match), starting from the likelihood heads
    reward_dir = output_dir / "heads-reward"
    step(f"training heads on the verifier's reward ({settings.reward_steps} steps of {settings.reward_problems} "
         f"problems x {settings.reward_group_size} samples, from the heads of step 4)")
    if not (reward_dir / "autodeco_heads.safetensors").is_file():
        train_heads_reward(str(heads_dir), [str(train_file)], RewardTrainingArguments(
            output_dir=str(reward_dir), max_steps=settings.reward_steps, learning_rate=settings.reward_learning_rate,
            per_device_train_batch_size=settings.reward_problems, group_size=settings.reward_group_size,
            num_iterations=settings.reward_iterations, max_new_tokens=settings.max_new_tokens,
            generation_batch_size=settings.generation_batch_size, template=DEMO_TEMPLATE, reward="exact",
            seed=settings.seed, save_steps=100000, disable_tqdm=not progress), verbose=progress)
    clock = timed("reward_heads", clock)

    # 7. evaluation
    model = AutoDecoModelForCausalLM.from_pretrained(heads_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ks = (1, settings.n * settings.seeds)
    step(f"evaluating {DEMO_METHODS} on {len(benchmark)} test problems ({settings.n} samples x {settings.seeds} seeds)")
    eval_common = dict(n=settings.n, seeds=settings.seeds, ks=ks, max_new_tokens=settings.max_new_tokens,
                       batch_size=settings.generation_batch_size, template=DEMO_TEMPLATE, seed=settings.seed,
                       pack_samples=True, progress=progress)
    results = run_evaluation(model, tokenizer, [benchmark], DEMO_METHODS, output_dir=output_dir / "eval",
                             calibration_files=[str(train_data)], oracle_n=settings.oracle_n,
                             oracle_seeds=settings.oracle_seeds, **eval_common)
    families = family_table(results, output_dir / "eval" / "records.jsonl", settings.seeds)
    control_model = AutoDecoModelForCausalLM.from_pretrained(control_dir).eval()
    control_results = run_evaluation(control_model, tokenizer, [benchmark], "autodeco",
                                     output_dir=output_dir / "eval-control-heads", plots=False, **eval_common)
    control_results["families"] = family_table(control_results, output_dir / "eval-control-heads" / "records.jsonl",
                                                settings.seeds)
    reward_model = AutoDecoModelForCausalLM.from_pretrained(reward_dir).eval()
    reward_results = run_evaluation(reward_model, tokenizer, [benchmark], "meanshift, autodeco",
                                    output_dir=output_dir / "eval-reward-heads", calibration_files=[str(train_data)],
                                    plots=False, **eval_common)
    reward_results["families"] = family_table(reward_results, output_dir / "eval-reward-heads" / "records.jsonl",
                                              settings.seeds)
    clock = timed("evaluation", clock)

    # 8. decomposition
    step("gain decomposition of both head sets' temperatures on the test problems' clean solutions")
    decomposition = decompose(model, tokenizer, [str(solutions_file)], batch_size=32)
    write_json_atomic(output_dir / "decomposition.json", decomposition)
    reward_decomposition = decompose(reward_model, tokenizer, [str(solutions_file)], batch_size=32)
    write_json_atomic(output_dir / "decomposition-reward.json", reward_decomposition)
    clock = timed("decomposition", clock)

    # 9. control evaluation
    step(f"decoding control on {settings.control_prompts} held-out test prompts (seen and held-out phrasings)")
    control = evaluate_control(control_model, tokenizer, [p.problem for p in test_problems],
                               output_dir=output_dir / "control", n=settings.control_prompts, seed=settings.seed,
                               max_new_tokens=settings.max_new_tokens, template=DEMO_TEMPLATE,
                               batch_size=settings.generation_batch_size, progress=progress)
    no_control = evaluate_control(model, tokenizer, [p.problem for p in test_problems],
                                  output_dir=output_dir / "control-untrained", n=settings.control_prompts,
                                  seed=settings.seed, max_new_tokens=settings.max_new_tokens, template=DEMO_TEMPLATE,
                                  batch_size=settings.generation_batch_size, progress=progress)
    clock = timed("control_evaluation", clock)

    # 10. report
    step("writing the report")
    total = round(time.perf_counter() - started, 1)
    table = results_table(results, families, control_results, reward_results)
    verdict_lines = (verdicts(results, control_results) + reward_verdicts(results, reward_results, decomposition,
                                                                          reward_decomposition, probe)
                     + control_verdicts(control))
    report = report_markdown(output_dir, settings, quick, results, table, verdict_lines, decomposition, control,
                             no_control, data_stats, timings, total, retrain_base, probe=probe,
                             reward_decomposition=reward_decomposition)
    write_text_atomic(output_dir / "report.md", report)
    summary = {"output_dir": str(output_dir), "quick": quick, "settings": asdict(settings), "seconds": total,
               "timings": timings, "environment": environment(),
               "pass@1": {spec: results["results"][spec][next(iter(results["benchmarks"]))]["pass@1"]
                          for spec in results["methods"]},
               "reward_heads_pass@1": {spec: reward_results["results"][spec][next(iter(results["benchmarks"]))]["pass@1"]
                                       for spec in reward_results["methods"]},
               "probe": {k: probe[k] for k in ("static", "hand", "best_static_t", "headroom")},
               "families": families, "reward_families": reward_results["families"], "verdicts": verdict_lines, "control": control, "control_without_training": no_control,
               "decomposition": {k: v for k, v in decomposition.items() if k != "summary"},
               "reward_decomposition": {k: v for k, v in reward_decomposition.items() if k != "summary"}}
    write_json_atomic(output_dir / "summary.json", summary)
    if progress:
        print("\n".join(table), flush=True)
        print("\n".join(verdict_lines), flush=True)
        print(f"\nReport: {output_dir / 'report.md'}   plots: {output_dir / 'eval'}/*.png, "
              f"{output_dir / 'control'}/*.png   total {total:.0f} s", flush=True)
    return summary
