"""Evaluation runner: sample every (method, benchmark, problem, seed), score it, and write the paper's tables.

    from autodeco.evaluation import load_benchmark, parse_methods, run_evaluation
    results = run_evaluation(model, tokenizer, [load_benchmark("aime24.jsonl")],
                             parse_methods("greedy, default, oracle, meanshift, autodeco"),
                             n=16, seeds=8, ks=(1, 16), output_dir="runs/eval")

CLI: `autodeco eval --model DIR --benchmarks FILE... --methods LIST --output-dir DIR`; several processes:
`accelerate launch -m autodeco.cli eval ...`. A work item is one (method, benchmark, problem, seed): n samples of
one prompt, seeded by records.sampling_seed; greedy runs once per problem. Items are grouped into units (packed
sampling: several problems per call), dealt round-robin to processes, and run in up to three phases (oracle T
row, then P row and meanshift, then the chosen oracle at full n). Finished items are appended to records.jsonl,
so a rerun resumes. Metrics: metrics.py; results.json and plot data: results.py. In full: docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from autodeco.atomic import write_json_atomic
from autodeco.evaluation import diagnostics, report
from autodeco.evaluation.answers import extract_answer
from autodeco.evaluation.benchmarks import Benchmark, Problem, build_prompt, score_completions  # a global: tests stub it
from autodeco.evaluation.generation import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    Completion,
    Engine,
    GenerationRequest,
    check_prompts_fit,
    encode_prompt,
    engine_name,
    generate_completions,
    sequences_per_call,
)
from autodeco.evaluation.methods import (
    ORACLE_TEMPERATURES,
    ORACLE_TOP_PS,
    Method,
    generation_kwargs,
    parse_methods,
    static_method,
)
from autodeco.evaluation.metrics import compute_metrics
from autodeco.evaluation.records import RecordStore, eval_settings_hash, item_key, model_fingerprint, sampling_seed
from autodeco.evaluation.results import EXAMPLE_PROBLEMS, assemble_results, plot_data, records_for
from autodeco.locks import OutputDirLock

__all__ = [
    "run_evaluation",
    "score_completions",
    "WorkItem",
    "MEANSHIFT_DECIMALS",
    # Re-exported from generation / records / metrics (their old home, kept working):
    "generate_completions",
    "GenerationRequest",
    "Completion",
    "RecordStore",
    "compute_metrics",
    "encode_prompt",
    "sampling_seed",
    "model_fingerprint",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_BATCH_SIZE",
]

MEANSHIFT_DECIMALS = 3


# ------------------------------------------------------------------------------------------------ work items


@dataclass
class WorkItem:
    method: Method  # decodable: oracle/meanshift already resolved to static
    benchmark: str
    problem_index: int
    problem: Problem
    seed: int  # seed index 0..seeds-1 (greedy: 0)
    n: int  # samples generated (greedy: 1)
    prompt: str
    key: str = ""
    deterministic: bool = False


@dataclass
class _Context:
    model: object
    tokenizer: object
    output_dir: Path
    max_new_tokens: int
    batch_size: int
    base_seed: int
    template: str | None
    settings_hash: str
    rank: int
    world_size: int
    progress: bool
    pack_samples: bool = False
    prompts: dict = field(default_factory=dict)  # (benchmark, problem index) -> prompt text
    engine: Engine | None = None  # None: transformers' generate on `model`


def _is_greedy(method: Method) -> bool:
    return method.kind == "greedy"


def _make_items(ctx: _Context, method: Method, benchmark: Benchmark, n: int, seeds: int) -> list[WorkItem]:
    items = []
    greedy = _is_greedy(method)
    for index, problem in enumerate(benchmark.problems):
        prompt = ctx.prompts[(benchmark.name, index)]
        for seed in range(1 if greedy else seeds):
            item = WorkItem(method, benchmark.name, index, problem, seed, 1 if greedy else n, prompt,
                            deterministic=greedy)
            item.key = item_key(ctx.settings_hash, method.spec, benchmark.name, problem, seed, item.n, prompt)
            items.append(item)
    return items


def _units(items: list[WorkItem], batch_size: int, pack_samples: bool = False) -> list[list[WorkItem]]:
    """Group items into the units that are generated together and dealt to processes. Greedy items of one method
    and benchmark share calls (up to batch_size prompts). Every sampled item is its own unit, unless
    `pack_samples`: then sampled items of one method, benchmark, seed index and n form units of consecutive problems
    (in list order), at most max(1, batch_size // n) per unit. The grouping depends only on the item list, so
    results do not depend on the number of processes."""
    units: list[list[WorkItem]] = []
    open_units: dict[tuple, list[WorkItem]] = {}  # packed: the last unit of each (method, benchmark, seed, n)
    for item in items:
        last = units[-1] if units else None
        if (item.deterministic and last and last[0].deterministic and last[0].method == item.method
                and last[0].benchmark == item.benchmark and len(last) < batch_size):
            last.append(item)
        elif pack_samples and not item.deterministic:
            group = (item.method.spec, item.benchmark, item.seed, item.n)
            unit = open_units.get(group)
            if unit is not None and len(unit) < max(1, batch_size // item.n):
                unit.append(item)
            else:
                open_units[group] = [item]
                units.append(open_units[group])
        else:
            units.append([item])
    return units


def _summarise(values: list[float] | None) -> tuple[float, int]:
    if not values:
        return 0.0, 0
    finite = [v for v in values if v == v and not math.isinf(v)]
    return float(sum(finite)), len(finite)


def _generate(ctx: _Context, method: Method, requests: list[GenerationRequest]) -> list[list[Completion]]:
    """The one place the runner generates: through `ctx.engine` when one is given, else generate_completions (a
    module global here, so tests can stub it)."""
    if ctx.engine is not None:
        return ctx.engine.generate(requests, method=method, max_new_tokens=ctx.max_new_tokens,
                                   batch_size=ctx.batch_size)
    return generate_completions(ctx.model, ctx.tokenizer, requests, generation_kwargs=generation_kwargs(method),
                                max_new_tokens=ctx.max_new_tokens, batch_size=ctx.batch_size)


def _unit_requests(ctx: _Context, unit: list[WorkItem]) -> list[GenerationRequest]:
    method = unit[0].method
    if ctx.pack_samples and not unit[0].deterministic:
        # One seed for the unit (that of its first problem), its prompts sampled together.
        first = unit[0]
        seed = sampling_seed(ctx.base_seed, method.spec, first.benchmark, first.problem.id, first.seed)
        return [GenerationRequest(item.prompt, item.n, seed, group=first.key) for item in unit]
    return [
        GenerationRequest(item.prompt, item.n, None if item.deterministic else
                          sampling_seed(ctx.base_seed, method.spec, item.benchmark, item.problem.id, item.seed))
        for item in unit
    ]


def _run_units(ctx: _Context, units: list[list[WorkItem]]) -> list[list[dict]]:
    """Generate the units of one method in a single call (one unit, unless the engine takes several: see
    generation.Engine.sequences_per_call) and return each unit's records."""
    method = units[0][0].method
    unit_of: list[int] = []
    items: list[WorkItem] = []
    requests: list[GenerationRequest] = []
    for u, unit in enumerate(units):
        for item, request in zip(unit, _unit_requests(ctx, unit)):
            unit_of.append(u)
            items.append(item)
            requests.append(request)
    start = time.perf_counter()
    completions = _generate(ctx, method, requests)
    records = []
    for item, request, samples in zip(items, requests, completions):
        texts = [c.text for c in samples]
        correct = score_completions(item.problem, texts)
        answers = [extract_answer(text, item.problem.kind) for text in texts]
        t_sum = p_sum = 0.0
        t_count = p_count = 0
        for c in samples:
            s, k = _summarise(c.temperatures)
            t_sum, t_count = t_sum + s, t_count + k
            s, k = _summarise(c.top_ps)
            p_sum, p_count = p_sum + s, p_count + k
        record = {
            "key": item.key,
            "method": method.spec,
            "benchmark": item.benchmark,
            "problem_id": item.problem.id,
            "problem_index": item.problem_index,
            "seed": item.seed,
            "n": item.n,
            "deterministic": item.deterministic,
            "sampling_seed": request.seed,
            "settings": ctx.settings_hash,
            "gt": item.problem.gt,
            "completions": texts,
            "correct": correct,
            "answers": answers,
            "tokens": [c.num_tokens for c in samples],
            "finished": [c.finished for c in samples],
            "temperature_sum": t_sum,
            "temperature_tokens": t_count,
            "top_p_sum": p_sum,
            "top_p_tokens": p_count,
            "mean_temperature": t_sum / t_count if t_count else None,
            "mean_top_p": p_sum / p_count if p_count else None,
        }
        if item.seed == 0 and item.problem_index < EXAMPLE_PROBLEMS and samples:
            first = samples[0]
            record["example"] = {"prompt_ids": encode_prompt(ctx.tokenizer, item.prompt), "token_ids": first.token_ids,
                                 "temperatures": first.temperatures, "top_ps": first.top_ps}
        records.append(record)
    seconds = (time.perf_counter() - start) / max(1, len(records))
    by_unit: list[list[dict]] = [[] for _ in units]
    for u, record in zip(unit_of, records):
        record["seconds"] = seconds
        record["rank"] = ctx.rank  # which process made it (for the logs; results never depend on it)
        by_unit[u].append(record)
    return by_unit


def _waves(units: list[list[WorkItem]], per_call: int | None) -> list[list[list[WorkItem]]]:
    """Consecutive units of one method, up to `per_call` sequences together (at least one unit per wave);
    per_call None: one unit per wave. Records are written after each wave, so a killed run loses at most one."""
    waves: list[list[list[WorkItem]]] = []
    size = 0
    for unit in units:
        sequences = sum(item.n for item in unit)
        if (per_call is not None and waves and waves[-1][0][0].method == unit[0].method
                and size + sequences <= per_call):
            waves[-1].append(unit)
            size += sequences
        else:
            waves.append([unit])
            size = sequences
    return waves


def _execute(ctx: _Context, store: RecordStore, items: list[WorkItem], done: set[str], desc: str) -> None:
    """Run the pending items of this phase that fall to this rank, appending each record as it finishes.

    Packed sampling: sampled units are formed over the phase's whole item list, so they do not depend on what an
    interrupted run finished; a unit with any pending item is regenerated whole and only its pending records are
    written."""
    pending, seen = [], set()
    for item in items:
        if item.key in seen:
            continue
        seen.add(item.key)
        if item.key not in done or (ctx.pack_samples and not item.deterministic):
            pending.append(item)
    units = [unit for unit in _units(pending, ctx.batch_size, ctx.pack_samples)
             if any(item.key not in done for item in unit)]
    mine = units[ctx.rank :: ctx.world_size]
    if not mine:
        return
    bar = None
    if ctx.progress:
        total = sum(1 for u in mine for item in u if item.key not in done)
        bar = tqdm(total=total, desc=desc if ctx.world_size == 1 else f"{desc} [rank {ctx.rank}]",
                   unit="item", file=sys.stderr, dynamic_ncols=True, position=ctx.rank)
    try:
        for wave in _waves(mine, sequences_per_call(ctx.engine)):
            written = 0
            for unit_records in _run_units(ctx, wave):
                for record in unit_records:
                    if record["key"] in done:  # packed: a finished item of a unit that is regenerated
                        continue
                    store.append(record)
                    done.add(record["key"])
                    written += 1
            if bar is not None:
                bar.update(written)
    finally:
        if bar is not None:
            bar.close()


# ------------------------------------------------------------------------------------------------ entry point


class _SingleProcess:
    process_index = 0
    num_processes = 1

    def wait_for_everyone(self):
        pass


def _validate(benchmarks, methods, n, seeds, ks, oracle_n, oracle_seeds, batch_size, max_new_tokens, calibration_files):
    for name, value in (("n", n), ("seeds", seeds), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens),
                        ("oracle_n", oracle_n), ("oracle_seeds", oracle_seeds)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not ks:
        raise ValueError("ks is empty: give at least one k for pass@k / maj@k (e.g. ks=(1, 16)).")
    for k in ks:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        if k > n * seeds:
            raise ValueError(
                f"k={k} needs at least {k} samples per problem, but n={n} x seeds={seeds} gives {n * seeds}: raise "
                f"n or seeds, or drop k={k}."
            )
    if not methods:
        raise ValueError("No methods to evaluate; pass e.g. methods=parse_methods('greedy, autodeco').")
    if not benchmarks:
        raise ValueError("No benchmarks to evaluate; load one with benchmarks.load_benchmark(PATH).")
    names = [b.name for b in benchmarks]
    for b in benchmarks:
        if not b.problems:
            raise ValueError(f"Benchmark '{b.name}' has no problems; check its file.")
        if names.count(b.name) > 1:
            raise ValueError(f"Two benchmarks are named '{b.name}'; give the files different names.")
        ids = [p.id for p in b.problems]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"Benchmark '{b.name}': problem id '{dup}' occurs more than once; ids must be unique.")
    for path in calibration_files or ():
        if not Path(path).is_file():
            raise FileNotFoundError(f"Calibration file '{path}' does not exist; pass JSONL training-format files.")


def run_evaluation(
    model,
    tokenizer,
    benchmarks: list[Benchmark],
    methods: list[Method] | str,
    *,
    n: int = 16,
    seeds: int = 8,
    ks: Sequence[int] = (1, 16),
    output_dir: str | os.PathLike,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    calibration_files: Sequence[str | os.PathLike] | None = None,
    template: str | None = None,
    accelerator=None,
    oracle_n: int | None = None,
    oracle_seeds: int | None = None,
    seed: int = 0,
    plots: bool = True,
    progress: bool = True,
    pack_samples: bool = False,
    engine: Engine | None = None,
) -> dict:
    """Evaluate `methods` on `benchmarks` and write records.jsonl, results.json, results.md and plots to
    `output_dir`; returns the results.json content. What each number means: docs/evaluation.md.

    pack_samples: sample up to max(1, batch_size // n) problems per `generate` call (much faster for small models;
    results then depend on batch_size). engine: another generation backend (generation.Engine, e.g.
    autodeco.vllm.engine.VLLMEngine); None samples with transformers' `model.generate`. A non-"hf" engine's name
    enters the record keys. `model` is still used for the record keys, prompt-length checks, MeanShift calibration
    and plots."""
    if isinstance(methods, str):
        methods = parse_methods(methods)
    methods = list(methods)
    ks = tuple(int(k) for k in ks)
    oracle_n = n if oracle_n is None else oracle_n
    oracle_seeds = seeds if oracle_seeds is None else oracle_seeds
    _validate(benchmarks, methods, n, seeds, ks, oracle_n, oracle_seeds, batch_size, max_new_tokens, calibration_files)
    state = accelerator if accelerator is not None else _SingleProcess()
    output_dir = Path(output_dir)
    if output_dir.is_file():
        raise ValueError(f"output_dir '{output_dir}' is a file; pass a directory.")
    rank, world = int(state.process_index), int(state.num_processes)
    model.eval()

    settings_hash = eval_settings_hash(model, max_new_tokens=max_new_tokens, template=template, seed=seed,
                                       pack_samples=bool(pack_samples), batch_size=batch_size,
                                       engine=engine_name(engine))
    ctx = _Context(model, tokenizer, output_dir, max_new_tokens, batch_size, seed, template, settings_hash, rank,
                   world, progress, bool(pack_samples), engine=engine)
    for b in benchmarks:
        for i, problem in enumerate(b.problems):
            ctx.prompts[(b.name, i)] = build_prompt(problem, tokenizer, template)
    check_prompts_fit(model, tokenizer, ((b.name, p.id, ctx.prompts[(b.name, i)])
                                         for b in benchmarks for i, p in enumerate(b.problems)))

    # One run writes into an output directory at a time (autodeco.locks); under several processes the main one
    # holds the lock for all of them, before any rank opens its records file.
    lock = OutputDirLock(output_dir, "eval") if rank == 0 else contextlib.nullcontext()
    with lock:
        return _run(ctx, state, store=RecordStore(output_dir, rank, world), benchmarks=benchmarks, methods=methods,
                    n=n, seeds=seeds, ks=ks, calibration_files=calibration_files, oracle_n=oracle_n,
                    oracle_seeds=oracle_seeds, batch_size=batch_size, plots=plots, pack_samples=pack_samples)


def _run(ctx: _Context, state, *, store: RecordStore, benchmarks, methods, n, seeds, ks, calibration_files,
         oracle_n, oracle_seeds, batch_size, plots, pack_samples) -> dict:
    rank, world, output_dir = ctx.rank, ctx.world_size, ctx.output_dir
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        if world > 1:
            RecordStore.repair(store.main)
    state.wait_for_everyone()
    store.open()  # each rank repairs its own file
    state.wait_for_everyone()

    kinds = {m.kind for m in methods}
    autodeco = next(m for m in parse_methods("autodeco"))
    meanshift_info = None
    if "meanshift" in kinds and calibration_files:
        meanshift_info = _meanshift_from_calibration(ctx, list(calibration_files), state)

    # Phase 1: everything that needs no one else's results.
    items: list[WorkItem] = []
    for method in methods:
        for b in benchmarks:
            if method.kind == "oracle":
                for t in ORACLE_TEMPERATURES:
                    items += _make_items(ctx, static_method(t, 1.0), b, oracle_n, oracle_seeds)
            elif method.kind == "meanshift":
                if meanshift_info is not None:
                    items += _make_items(ctx, meanshift_info["method"], b, n, seeds)
                else:
                    items += _make_items(ctx, autodeco, b, n, seeds)
            else:
                items += _make_items(ctx, method, b, n, seeds)
    done = set(store.read())
    try:
        _execute(ctx, store, items, done, "evaluating")
        state.wait_for_everyone()

        # Phase 2: the oracle's P row at each benchmark's best T; meanshift from AutoDeco's own tokens.
        records = store.read()
        oracle_info: dict[str, dict] = {}
        items = []
        if "oracle" in kinds:
            for b in benchmarks:
                t_row = {t: _pass1(records, _make_items(ctx, static_method(t, 1.0), b, oracle_n, oracle_seeds), b)
                         for t in ORACLE_TEMPERATURES}
                best_t = _argmax(t_row)
                oracle_info[b.name] = {"temperature_row": t_row, "best_temperature": best_t}
                for p in ORACLE_TOP_PS:
                    items += _make_items(ctx, static_method(best_t, p), b, oracle_n, oracle_seeds)
        if "meanshift" in kinds and meanshift_info is None:
            meanshift_info = _meanshift_from_records(records, [i for b in benchmarks for i in _make_items(ctx, autodeco, b, n, seeds)])
            for b in benchmarks:
                items += _make_items(ctx, meanshift_info["method"], b, n, seeds)
        if items:
            _execute(ctx, store, items, set(records), "oracle top-p / meanshift")
        state.wait_for_everyone()

        # Phase 3: the chosen oracle (T, P) at the full n x seeds, when the search used fewer samples.
        records = store.read()
        items = []
        for b in benchmarks if "oracle" in kinds else ():
            info = oracle_info[b.name]
            best_t = info["best_temperature"]
            p_row = {p: _pass1(records, _make_items(ctx, static_method(best_t, p), b, oracle_n, oracle_seeds), b)
                     for p in ORACLE_TOP_PS}
            info["top_p_row"] = p_row
            info["best_top_p"] = _argmax(p_row)
            info["method"] = static_method(best_t, info["best_top_p"])
            items += _make_items(ctx, info["method"], b, n, seeds)
        if items:
            _execute(ctx, store, items, set(records), "oracle at full n")
    finally:
        store.close()
    state.wait_for_everyone()

    if rank == 0:
        store.merge()
        records = store.read()
        results = assemble_results(
            ctx, benchmarks, methods, records, lambda method, b, n_, seeds_: _make_items(ctx, method, b, n_, seeds_),
            n=n, seeds=seeds, ks=ks, oracle_info=oracle_info, meanshift_info=meanshift_info, oracle_n=oracle_n,
            oracle_seeds=oracle_seeds, batch_size=batch_size, calibration_files=calibration_files,
            pack_samples=pack_samples)
        plots_in = plot_data(ctx, benchmarks, methods, records, oracle_info) if plots else None
        report.write_reports(results, output_dir, plot_data=plots_in)
    state.wait_for_everyone()
    return json.loads((output_dir / "results.json").read_text(encoding="utf-8"))


def _pass1(records: dict, items: list[WorkItem], benchmark: Benchmark) -> float:
    by_problem = records_for(records, items, benchmark)
    total = [sum(r["correct"]) / len(r["correct"]) for rs in by_problem for r in rs]
    return sum(total) / len(total)


def _argmax(row: dict[float, float]) -> float:
    """The grid value with the highest pass@1; ties go to the larger value (closer to sampling the model as is)."""
    best = None
    for value in sorted(row, reverse=True):
        if best is None or row[value] > row[best]:
            best = value
    return best


def _meanshift_from_calibration(ctx: _Context, files: list, state) -> dict:
    """Mean head T and P over the calibration data's supervised tokens; rank 0 computes (or reuses meanshift.json)
    and every rank reads the file."""
    path = ctx.output_dir / "meanshift.json"
    ident = {"files": [str(Path(f).resolve()) for f in files],
             "sizes": [Path(f).stat().st_size for f in files],
             "mtimes": [Path(f).stat().st_mtime_ns for f in files],
             "model": model_fingerprint(ctx.model)}
    if ctx.rank == 0:
        cached = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if not cached or cached.get("ident") != ident:
            t, p = diagnostics.meanshift_from_calibration(ctx.model, ctx.tokenizer, [str(f) for f in files])
            cached = {"ident": ident, "temperature": float(t), "top_p": float(p)}
            write_json_atomic(path, cached)
    state.wait_for_everyone()
    cached = json.loads(path.read_text(encoding="utf-8"))
    return _meanshift_info(cached["temperature"], cached["top_p"], "calibration data",
                           f"mean head T and P over the supervised tokens of {', '.join(str(f) for f in files)}")


def _meanshift_from_records(records: dict, items: list[WorkItem]) -> dict:
    missing = [i for i in items if i.key not in records]
    if missing:
        raise RuntimeError(f"meanshift: {len(missing)} AutoDeco work items have no record; rerun to finish them.")
    rs = [records[i.key] for i in items]
    t_count = sum(r["temperature_tokens"] for r in rs)
    p_count = sum(r["top_p_tokens"] for r in rs)
    if not t_count or not p_count:
        raise ValueError("meanshift: AutoDeco generated no tokens to average T and P over; pass calibration files.")
    t = sum(r["temperature_sum"] for r in rs) / t_count
    p = sum(r["top_p_sum"] for r in rs) / p_count
    return _meanshift_info(t, p, "AutoDeco's generated tokens",
                           f"mean head T and P over the {t_count} tokens AutoDeco generated in this evaluation")


def _meanshift_info(t: float, p: float, source: str, description: str) -> dict:
    t_r = max(round(float(t), MEANSHIFT_DECIMALS), 10.0 ** -MEANSHIFT_DECIMALS)
    p_r = min(max(round(float(p), MEANSHIFT_DECIMALS), 10.0 ** -MEANSHIFT_DECIMALS), 1.0)
    return {"method": static_method(t_r, p_r), "temperature": t_r, "top_p": p_r, "raw_temperature": float(t),
            "raw_top_p": float(p), "source": source, "description": description}

