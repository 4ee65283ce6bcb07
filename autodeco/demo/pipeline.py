"""`autodeco demo`: the paper's whole pipeline, end to end on a laptop CPU, on the demo's tiny base model and tasks.

    autodeco demo                              # full run (make demo): about 10 minutes on 2 CPU cores
    autodeco demo --quick                      # the same pipeline at a small scale (about 2 minutes; the tests run it)
    autodeco demo --output-dir DIR             # default runs/demo (runs/demo-quick with --quick)
    autodeco demo --retrain-base               # retrain the base from its seed first (autodeco/demo/base.py)

    from autodeco.demo.pipeline import run_demo
    summary = run_demo("runs/demo", quick=True)

Steps (each writes under OUTPUT_DIR, and a rerun resumes: finished files are kept, evaluations resume from their
records.jsonl):
  1. problems   tasks.generate_problems: training problems (train split) and held-out test problems (test split)
                as benchmark JSONL (kind "exact"); the splits cannot overlap (tasks.split_of).
  2. data       rejection sampling from the frozen base (autodeco data): DEFAULT samples per training problem at
                T=1, P=1, keep the verified-correct ones.
  3. heads      AutoDeco heads trained on them, base frozen (autodeco train).
  4. control    heads trained the same way plus decoding-control augmentation (issue 6: autodeco train
                --control-share), so both can be compared without a command.
  5. evaluate   on the test split (autodeco eval): greedy, default (T=1, P=1), the test-set oracle (labelled:
                tuned on the test problems), MeanShift (static at the heads' mean T and P over the training data),
                the temperature-only and top-p-only ablations, min-p, EDT, AutoDeco, and AutoDeco with the
                control-trained heads. Pass@1 mean +- std over seeds, pass@k, per task family.
  6. diagnose   the inverse-temperature gain decomposition on the clean solutions of the test problems.
  7. control    autodeco eval-control on held-out test prompts, for commands seen in training and held-out ones.
  8. report     OUTPUT_DIR/report.md (every table), plus the evaluation's plots; the results table is printed.

Nothing is tuned on the test split except the oracle, which is labelled so. Seeds are fixed in DemoSettings.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import re
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from autodeco.atomic import write_json_atomic, write_text_atomic
from autodeco.demo import tasks
from autodeco.demo.base import BASE_MODEL_DIR, DEMO_TEMPLATE, BaseTrainingConfig, train_base

__all__ = ["DemoSettings", "FULL", "QUICK", "run_demo", "add_demo_parser", "DEMO_METHODS"]

DEMO_METHODS = ("greedy, default, oracle, meanshift, autodeco-temperature-only, autodeco-top-p-only, min_p:0.1, edt, "
                "autodeco")


@dataclass(frozen=True)
class DemoSettings:
    train_problems: int = 1500  # problems sampled for the heads' training data (train split)
    samples_per_problem: int = 4
    max_per_problem: int = 2
    test_problems: int = 200  # held-out problems the methods are evaluated on (test split)
    heads_steps: int = 400
    heads_batch_size: int = 16
    heads_learning_rate: float = 1e-3
    control_share: float = 0.5
    control_prompts: int = 100
    n: int = 4  # samples per problem and seed
    seeds: int = 3
    oracle_n: int = 2
    oracle_seeds: int = 2
    max_new_tokens: int = 128
    generation_batch_size: int = 256
    seed: int = 0


FULL = DemoSettings()
QUICK = DemoSettings(train_problems=240, test_problems=40, heads_steps=60, control_prompts=20, n=2, seeds=2,
                     oracle_n=1, oracle_seeds=1)


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
    import random

    from autodeco.demo.base import render_prompt

    rng = random.Random(f"autodeco-demo-solutions:{seed}")
    _write_jsonl(path, [{"prompt": render_prompt(p.problem), "completion": tasks.solve(p, rng)} for p in problems])


def _run_cli(argv: list[str]) -> object:
    """Run one `autodeco` subcommand in-process, as a user would type it; errors propagate."""
    from autodeco.cli import build_parser

    args = build_parser().parse_args(argv)
    return args.func(args)


def _family(problem_id: str) -> str:
    return problem_id.split("-", 1)[0]


def _family_table(results: dict, records_path: Path, seeds: int) -> dict[str, dict[str, tuple[float, float]]]:
    """Pass@1 (mean, std over seeds) per method and task family, from the evaluation's records."""
    by_key: dict[tuple[str, str, int], list[float]] = {}
    with records_path.open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            fraction = sum(record["correct"]) / len(record["correct"])
            by_key.setdefault((record["method"], _family(record["problem_id"]), record["seed"]), []).append(fraction)
    table: dict[str, dict[str, tuple[float, float]]] = {}
    bench = next(iter(results["benchmarks"]))
    for spec in results["methods"]:
        resolved = results["results"][spec][bench]["spec"]
        row = {}
        for family in tasks.FAMILIES:
            per_seed = [sum(v) / len(v) for s in range(seeds) if (v := by_key.get((resolved, family, s)))]
            if not per_seed:  # greedy: one deterministic decode (seed 0) stands for every seed
                continue
            mean = sum(per_seed) / len(per_seed)
            std = math.sqrt(sum((x - mean) ** 2 for x in per_seed) / (len(per_seed) - 1)) if len(per_seed) > 1 else 0.0
            row[family] = (mean, std)
        table[spec] = row
    return table


def _pm(cell: tuple[float, float] | None) -> str:
    return "—" if cell is None else f"{100 * cell[0]:.1f} ± {100 * cell[1]:.1f}"


def _results_table(results: dict, families: dict, control_results: dict | None) -> list[str]:
    bench = next(iter(results["benchmarks"]))
    ks = [k for k in results["settings"]["ks"] if k != 1]
    header = ["method", "Pass@1 (all)", *[f"Pass@1 {f}" for f in tasks.FAMILIES], *[f"pass@{k}" for k in ks], "mean T",
              "mean P"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]

    def row(label: str, cell: dict, fam: dict) -> str:
        p1 = cell["pass@1"]
        t, p = cell.get("mean_temperature"), cell.get("mean_top_p")
        values = [label, _pm((p1["mean"], p1["std"])), *[_pm(fam.get(f)) for f in tasks.FAMILIES],
                  *[f"{100 * cell['pass@k'][str(k)]:.1f}" for k in ks],
                  "—" if t is None else f"{t:.2f}", "—" if p is None else f"{p:.2f}"]
        return "| " + " | ".join(values) + " |"

    for spec in results["methods"]:
        cell = results["results"][spec][bench]
        lines.append(row(cell["label"], cell, families.get(spec, {})))
    if control_results is not None:
        cell = control_results["results"]["autodeco"][bench]
        lines.append(row("AutoDeco, heads trained with control (no command)", cell,
                         control_results.get("families", {}).get("autodeco", {})))
    return lines


def _verdicts(results: dict, control_results: dict | None) -> list[str]:
    bench = next(iter(results["benchmarks"]))
    cell = lambda spec: results["results"][spec][bench]["pass@1"]["mean"]  # noqa: E731
    auto, default, oracle, meanshift = cell("autodeco"), cell("default"), cell("oracle"), cell("meanshift")
    lines = [
        f"- AutoDeco vs default sampling: {100 * (auto - default):+.1f} points of Pass@1 (goal: at least +3): "
        f"{'met' if auto - default >= 0.03 else 'missed'}.",
        f"- AutoDeco vs the test-set oracle: {100 * (auto - oracle):+.1f} points (goal: within 1 point, i.e. >= -1): "
        f"{'met' if auto - oracle >= -0.01 else 'missed'}.",
        f"- AutoDeco vs MeanShift: {100 * (auto - meanshift):+.1f} points (goal: above): "
        f"{'met' if auto > meanshift else 'missed'}.",
    ]
    if control_results is not None:
        controlled = control_results["results"]["autodeco"][bench]["pass@1"]["mean"]
        lines.append(f"- Heads trained with control, no command: {100 * (controlled - auto):+.1f} points vs heads "
                     f"trained without (goal: no worse): {'met' if controlled >= auto - 1e-9 else 'missed'}.")
    return lines


# Issue 6's goal on held-out prompts, for the commands seen in training: consistency of the sign of the change in
# mean T (low, high) and the size of that change.
CONTROL_GOAL = {"low": 0.95, "high": 0.90, "delta_temperature": 0.1}


def _control_verdicts(control: dict) -> list[str]:
    lines = []
    for s, title in (("seen", "seen phrasings"), ("held_out", "held-out phrasings (reported, no goal)")):
        cells, met = [], True
        for c in ("low", "high"):
            r = control[s][c]
            cells.append(f"{c} ΔT {r['delta_temperature']:+.3f} at {100 * r['consistency_temperature']:.0f}% "
                         f"consistency (ΔP {r['delta_top_p']:+.3f}, {100 * r['consistency_top_p']:.0f}%)")
            met &= (r["consistency_temperature"] >= CONTROL_GOAL[c]
                    and abs(r["delta_temperature"]) >= CONTROL_GOAL["delta_temperature"])
        line = f"- Decoding control on held-out prompts, {title}: {'; '.join(cells)}"
        if s == "seen":
            line += (f" (goal: >= {CONTROL_GOAL['low']:.0%} low, >= {CONTROL_GOAL['high']:.0%} high, "
                     f"|ΔT| >= {CONTROL_GOAL['delta_temperature']}): {'met' if met else 'missed'}")
        lines.append(line + ".")
    return lines


def _environment() -> str:
    cores = torch.get_num_threads()
    return (f"{platform.system()} {platform.machine()}, {cores} torch threads, Python {platform.python_version()}, "
            f"torch {torch.__version__}, {'CUDA' if torch.cuda.is_available() else 'CPU only'}")


def run_demo(output_dir: str | Path = "runs/demo", *, quick: bool = False, retrain_base: bool = False,
             base_model: str | Path | None = None, settings: DemoSettings | None = None, progress: bool = True) -> dict:
    """Run the demo pipeline (module docstring) into `output_dir`; returns a summary dict (also summary.json).

    base_model: a demo base directory (default: the bundled BASE_MODEL_DIR; with retrain_base, OUTPUT_DIR/base)."""
    from autodeco import AutoDecoModelForCausalLM
    from autodeco.evaluation.benchmarks import load_benchmark
    from autodeco.evaluation.runner import run_evaluation

    settings = settings or (QUICK if quick else FULL)
    output_dir = Path(output_dir)
    if output_dir.is_file():
        raise ValueError(f"--output-dir '{output_dir}' is a file; pass a directory.")
    output_dir.mkdir(parents=True, exist_ok=True)
    data_dir = output_dir / "data"
    data_dir.mkdir(exist_ok=True)
    step = _Steps(9 if retrain_base else 8, progress)
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

    # 2. rejection-sampled training data from the frozen base
    step(f"rejection sampling: {settings.samples_per_problem} samples per training problem from the base (T=1, P=1)")
    train_data = data_dir / "train.jsonl"
    common_generation = ["--max-new-tokens", str(settings.max_new_tokens), "--batch-size",
                         str(settings.generation_batch_size), "--template", DEMO_TEMPLATE, "--pack-samples"]
    stats_file = data_dir / "train_stats.json"
    if train_data.is_file() and stats_file.is_file():
        data_stats = json.loads(stats_file.read_text(encoding="utf-8"))
    else:
        data_stats = _run_cli(["data", "--model", str(base_dir), "--problems", str(train_file), "--n",
                               str(settings.samples_per_problem), "--max-per-problem", str(settings.max_per_problem),
                               "--output", str(train_data), "--seed", str(settings.seed), *common_generation])
        write_json_atomic(stats_file, data_stats)
    clock = timed("data", clock)

    # 3. heads, 4. heads with control
    heads_dir, control_dir = output_dir / "heads", output_dir / "heads-control"
    train_common = ["--data", str(train_data), "--max-steps", str(settings.heads_steps), "--learning-rate",
                    str(settings.heads_learning_rate), "--per-device-train-batch-size", str(settings.heads_batch_size),
                    "--gradient-accumulation-steps", "1", "--seed", str(settings.seed), "--trainer-arg",
                    "save_steps=100000", "--trainer-arg", "disable_tqdm=" + str(not progress)]
    step(f"training the AutoDeco heads ({settings.heads_steps} steps, base frozen)")
    if not (heads_dir / "autodeco_heads.safetensors").is_file():
        _run_cli(["train", "--model", str(base_dir), "--output-dir", str(heads_dir), *train_common])
    clock = timed("heads", clock)
    step(f"training heads with decoding control ({settings.control_share:.0%} of prompts get a command)")
    if not (control_dir / "autodeco_heads.safetensors").is_file():
        _run_cli(["train", "--model", str(base_dir), "--output-dir", str(control_dir), *train_common,
                  "--control-share", str(settings.control_share)])
    clock = timed("control_heads", clock)

    # 5. evaluation
    model = AutoDecoModelForCausalLM.from_pretrained(heads_dir).eval()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    benchmark = load_benchmark(str(test_file))
    ks = (1, settings.n * settings.seeds)
    step(f"evaluating {DEMO_METHODS} on {len(benchmark)} test problems ({settings.n} samples x {settings.seeds} seeds)")
    eval_common = dict(n=settings.n, seeds=settings.seeds, ks=ks, max_new_tokens=settings.max_new_tokens,
                       batch_size=settings.generation_batch_size, template=DEMO_TEMPLATE, seed=settings.seed,
                       pack_samples=True, progress=progress)
    results = run_evaluation(model, tokenizer, [benchmark], DEMO_METHODS, output_dir=output_dir / "eval",
                             calibration_files=[str(train_data)], oracle_n=settings.oracle_n,
                             oracle_seeds=settings.oracle_seeds, **eval_common)
    families = _family_table(results, output_dir / "eval" / "records.jsonl", settings.seeds)
    control_model = AutoDecoModelForCausalLM.from_pretrained(control_dir).eval()
    control_results = run_evaluation(control_model, tokenizer, [benchmark], "autodeco",
                                     output_dir=output_dir / "eval-control-heads", plots=False, **eval_common)
    control_results["families"] = _family_table(control_results, output_dir / "eval-control-heads" / "records.jsonl",
                                                settings.seeds)
    clock = timed("evaluation", clock)

    # 6. decomposition
    step("gain decomposition of the heads' temperatures on the test problems' clean solutions")
    from autodeco.evaluation.diagnostics import decompose

    decomposition = decompose(model, tokenizer, [str(solutions_file)], batch_size=32)
    write_json_atomic(output_dir / "decomposition.json", decomposition)
    clock = timed("decomposition", clock)

    # 7. control evaluation
    step(f"decoding control on {settings.control_prompts} held-out test prompts (seen and held-out phrasings)")
    from autodeco.evaluation.control import evaluate_control

    control = evaluate_control(control_model, tokenizer, [p.problem for p in test_problems],
                               output_dir=output_dir / "control", n=settings.control_prompts, seed=settings.seed,
                               max_new_tokens=settings.max_new_tokens, template=DEMO_TEMPLATE,
                               batch_size=settings.generation_batch_size, progress=progress)
    no_control = evaluate_control(model, tokenizer, [p.problem for p in test_problems],
                                  output_dir=output_dir / "control-untrained", n=settings.control_prompts,
                                  seed=settings.seed, max_new_tokens=settings.max_new_tokens, template=DEMO_TEMPLATE,
                                  batch_size=settings.generation_batch_size, progress=progress)
    clock = timed("control_evaluation", clock)

    # 8. report
    step("writing the report")
    total = round(time.perf_counter() - started, 1)
    table = _results_table(results, families, control_results)
    verdicts = _verdicts(results, control_results) + _control_verdicts(control)
    report = _report(output_dir, settings, quick, results, table, verdicts, decomposition, control, no_control,
                     data_stats, timings, total, retrain_base)
    write_text_atomic(output_dir / "report.md", report)
    summary = {"output_dir": str(output_dir), "quick": quick, "settings": asdict(settings), "seconds": total,
               "timings": timings, "environment": _environment(),
               "pass@1": {spec: results["results"][spec][next(iter(results["benchmarks"]))]["pass@1"]
                          for spec in results["methods"]},
               "families": families, "verdicts": verdicts, "control": control, "control_without_training": no_control,
               "decomposition": {k: v for k, v in decomposition.items() if k != "summary"}}
    write_json_atomic(output_dir / "summary.json", summary)
    if progress:
        print("\n".join(table), flush=True)
        print("\n".join(verdicts), flush=True)
        print(f"\nReport: {output_dir / 'report.md'}   plots: {output_dir / 'eval'}/*.png, "
              f"{output_dir / 'control'}/*.png   total {total:.0f} s", flush=True)
    return summary


def _control_lines(control: dict, subdir: str) -> list[str]:
    """eval-control's results.md nested under a report section: its title dropped, headings one level down,
    image links relative to the report."""
    from autodeco.evaluation.control import control_markdown

    lines = []
    for line in control_markdown(control).splitlines():
        if line.startswith("# "):
            continue
        if line.startswith("#"):
            line = "#" + line
        lines.append(re.sub(r"\]\(([^/)]+\.png)\)", rf"]({subdir}/\1)", line))
    return lines


def _report(output_dir: Path, settings: DemoSettings, quick: bool, results: dict, table: list[str],
            verdicts: list[str], decomposition: dict, control: dict, no_control: dict, data_stats, timings: dict,
            total: float, retrain_base: bool) -> str:
    bench = next(iter(results["benchmarks"]))
    oracle = results["oracle"][bench]
    command = "autodeco demo" + (" --quick" if quick else "") + (" --retrain-base" if retrain_base else "")
    lines = [
        f"# AutoDeco demo{' (quick)' if quick else ''}",
        "",
        f"`{command} --output-dir {output_dir}`, {time.strftime('%Y-%m-%d')}, {_environment()}; {total:.0f} s in all "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in timings.items())}).",
        "",
        f"{settings.test_problems} held-out test problems (half `arith`, half "
        f"`pairs`), {settings.n} samples x {settings.seeds} seeds per method; heads trained {settings.heads_steps} "
        f"steps on rejection-sampled base solutions of {settings.train_problems} training problems.",
        "",
        "## Results (test split)",
        "",
        *table,
        "",
        *verdicts,
        "",
        f"The test-set oracle searched static T over {', '.join(oracle['temperature_row'])} at P=1 (Pass@1 "
        + ", ".join(f"{t}: {100 * v:.1f}" for t, v in oracle["temperature_row"].items())
        + f"), then P at T={oracle['temperature']}; it is tuned on the test problems themselves: an optimistic "
          "static baseline, not a fair one. MeanShift decodes at the heads' mean T and P over the training data.",
        "",
        *[f"- {note}" for note in results["notes"]],
        "",
        "Plots: `eval/traces.png` (one completion's per-token T and P), `eval/temperature_vs_entropy.png`, "
        "`eval/oracle_grid.png`, `control/control_trace.png`.",
        "",
        "## Gain decomposition (teacher-forced, clean solutions of the test problems)",
        "",
        decomposition["summary"],
        "",
        "## Decoding control (issue 6), heads trained with control",
        "",
        *_control_lines(control, "control"),
        "",
        "## Decoding control, heads trained without control (the same measurement)",
        "",
        *_control_lines(no_control, "control-untrained"),
        "",
        "## Rejection-sampled training data",
        "",
        "```",
        json.dumps(data_stats, indent=1, default=str)[:2000],
        "```",
        "",
    ]
    return "\n".join(lines)


def add_demo_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="the paper's pipeline end to end on a tiny bundled model (no download)",
        description="Rejection-sample data from the bundled tiny base, train AutoDeco heads (with and without "
                    "decoding control), evaluate every decoding method on held-out synthetic tasks and write a report. "
                    "About 10 minutes on 2 CPU cores; --quick about 2.",
    )
    p.add_argument("--output-dir", default=None, help="where everything goes (default runs/demo, or runs/demo-quick "
                                                      "with --quick); a rerun resumes")
    p.add_argument("--quick", action="store_true", help="a small version of every step (about 2 minutes)")
    p.add_argument("--retrain-base", action="store_true",
                   help="first retrain the tiny base model from its seed into OUTPUT_DIR/base and use it "
                        "(about 30 minutes on 2 CPU cores) instead of the bundled weights")
    p.add_argument("--base-model", default=None, metavar="DIR",
                   help="use this demo base directory (e.g. one written by --retrain-base) instead of the bundled one")
    p.add_argument("--fresh", action="store_true", help="delete OUTPUT_DIR first instead of resuming")
    p.set_defaults(func=cmd_demo)
    return p


def cmd_demo(args) -> dict:
    output_dir = Path(args.output_dir or ("runs/demo-quick" if args.quick else "runs/demo"))
    if args.fresh and output_dir.exists():
        shutil.rmtree(output_dir)
    return run_demo(output_dir, quick=args.quick, retrain_base=args.retrain_base, base_model=args.base_model)


def main(argv: list[str] | None = None) -> int:
    """`python -m autodeco.demo.pipeline [--quick] ...`: the demo subcommand alone."""
    from autodeco.cli import run_subcommand

    return run_subcommand(add_demo_parser, ["demo", *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
