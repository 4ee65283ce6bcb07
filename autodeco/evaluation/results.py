"""Assembling an evaluation's results.json content and the data its plots need, from the records.

    results = assemble_results(ctx, benchmarks, methods, records, items_for, ...)   # called by runner on rank 0
    data = plot_data(ctx, benchmarks, methods, records, oracle_info)             # for report.write_reports

`items_for(method, benchmark, n, seeds)` gives the work items whose records make a cell (the runner's), so this
module never imports the runner. Labels: the oracle is "test-set oracle (T=..., P=...)", MeanShift says where
its T and P come from, greedy's T and P are the heads' unused predictions. The fields: docs/evaluation.md.
"""

from __future__ import annotations

import torch

from autodeco.evaluation.benchmarks import Benchmark
from autodeco.evaluation.generation import engine_name
from autodeco.evaluation.methods import ORACLE_TEMPERATURES, ORACLE_TOP_PS, Method, parse_methods, static_method
from autodeco.evaluation.metrics import average_metrics, compute_metrics
from autodeco.features import entropy
from autodeco.modeling import teacher_forced

__all__ = ["assemble_results", "plot_data", "records_for", "EXAMPLE_PROBLEMS", "DYNAMIC_KINDS"]

# Work items that keep a full per-token example (token ids, T, P) for the plots: sample 0 of seed 0 of the first
# EXAMPLE_PROBLEMS problems of each benchmark. Keeping every trace would make records.jsonl huge.
EXAMPLE_PROBLEMS = 2
# Methods whose examples can show the heads' T driving the sampling (plots of traces and T against entropy).
DYNAMIC_KINDS = ("autodeco", "autodeco-temperature-only", "autodeco-top-p-only")
# Completion tokens per example the teacher-forced entropy forward looks at (bounds its [tokens, vocab] logits).
ENTROPY_MAX_TOKENS = 1024


def records_for(records: dict[str, dict], items: list, benchmark: Benchmark) -> list[list[dict]]:
    """The records of `items` (work items of one method on `benchmark`), by problem, in seed order."""
    by_problem: list[list[dict]] = [[] for _ in benchmark.problems]
    missing = [item for item in items if item.key not in records]
    if missing:
        item = missing[0]
        raise RuntimeError(
            f"{len(missing)} work item(s) have no record after the run, e.g. {item.method.spec} on "
            f"{item.benchmark}/{item.problem.id} seed {item.seed}; rerun the same command to finish them."
        )
    for item in sorted(items, key=lambda i: (i.problem_index, i.seed)):
        by_problem[item.problem_index].append(records[item.key])
    return by_problem




def _temperature_source(method: Method) -> str:
    return {
        "greedy": "heads' predictions (greedy decoding does not use them)",
        "autodeco": "heads (dynamic)",
        "autodeco-temperature-only": "heads' T, P = 1",
        "autodeco-top-p-only": "T = 1, heads' P",
        "edt": "EDT's per-token T",
        "min_p": "T = 1, P = 1 with min-p filtering",
    }.get(method.kind, "static")


def _fmt(x: float) -> str:
    return format(x, ".10g")


def assemble_results(ctx, benchmarks, methods, records, items_for, *, n, seeds, ks, oracle_info, meanshift_info,
                     oracle_n, oracle_seeds, batch_size, calibration_files, pack_samples=False) -> dict:
    """results.json's content (before report.write_reports adds the plot names); `ctx` is the runner's context."""
    results: dict[str, dict] = {}
    labels: dict[str, str] = {}
    notes: list[str] = []
    for method in methods:
        row: dict[str, dict] = {}
        for b in benchmarks:
            if method.kind == "oracle":
                resolved = oracle_info[b.name]["method"]
                t, p = resolved.params
                label = f"test-set oracle (T={_fmt(t)}, P={_fmt(p)})"
            elif method.kind == "meanshift":
                resolved = meanshift_info["method"]
                label = (f"MeanShift (T={_fmt(meanshift_info['temperature'])}, P={_fmt(meanshift_info['top_p'])}, "
                         f"from {meanshift_info['source']})")
            else:
                resolved, label = method, method.label
            items = items_for(resolved, b, n, seeds)
            cell = compute_metrics(records_for(records, items, b), n=n, seeds=seeds, ks=ks)
            cell["label"] = label
            cell["spec"] = resolved.spec
            cell["temperature_source"] = _temperature_source(resolved)
            if method.kind == "oracle":
                info = oracle_info[b.name]
                cell["search_seconds"] = sum(
                    records[i.key]["seconds"]
                    for value_items in (
                        [items_for(static_method(t_, 1.0), b, oracle_n, oracle_seeds) for t_ in ORACLE_TEMPERATURES]
                        + [items_for(static_method(info["best_temperature"], p_), b, oracle_n, oracle_seeds)
                           for p_ in ORACLE_TOP_PS if p_ != 1.0]
                    )
                    for i in value_items
                )
            row[b.name] = cell
        row["average"] = average_metrics([row[b.name] for b in benchmarks], ks)
        if method.kind == "oracle":
            row["average"]["label"] = "test-set oracle (per-benchmark T, P)"
            labels[method.spec] = "test-set oracle"
        elif method.kind == "meanshift":
            row["average"]["label"] = row[benchmarks[0].name]["label"]
            labels[method.spec] = row[benchmarks[0].name]["label"]
        else:
            row["average"]["label"] = method.label
            labels[method.spec] = method.label
        results[method.spec] = row

    oracle = {}
    for name, info in oracle_info.items():
        oracle[name] = {
            "temperature": info["best_temperature"],
            "top_p": info["best_top_p"],
            "temperature_row": {_fmt(t): v for t, v in info["temperature_row"].items()},
            "top_p_row": {_fmt(p): v for p, v in info["top_p_row"].items()},
            "oracle_n": oracle_n,
            "oracle_seeds": oracle_seeds,
        }
    if oracle:
        notes.append(
            "test-set oracle: static T searched over " + ", ".join(map(_fmt, ORACLE_TEMPERATURES)) + " at P=1, then P over "
            + ", ".join(map(_fmt, ORACLE_TOP_PS)) + f" at the best T, per benchmark, by mean pass@1 on the evaluated "
            f"problems themselves ({oracle_n} samples x {oracle_seeds} seeds per grid point): "
            + "; ".join(f"{b}: T={_fmt(v['temperature'])}, P={_fmt(v['top_p'])}" for b, v in oracle.items())
            + ". Tuned on the test problems, it is an optimistic static baseline, not a fair one."
        )
    meanshift = None
    if meanshift_info is not None:
        meanshift = {k: v for k, v in meanshift_info.items() if k != "method"}
        meanshift["spec"] = meanshift_info["method"].spec
        notes.append(f"MeanShift: static T={_fmt(meanshift_info['temperature'])}, P={_fmt(meanshift_info['top_p'])}, "
                     f"the {meanshift_info['description']}.")
    if any(m.kind == "greedy" for m in methods):
        notes.append("greedy: deterministic, decoded once per problem; that completion stands for all samples "
                     "(std over seeds 0). Its T and P are the heads' predictions, which greedy decoding ignores.")
    config = getattr(ctx.model, "config", None)
    return {
        "model": getattr(ctx.model, "name_or_path", None) or getattr(config, "name_or_path", None),
        "base_model": getattr(config, "base_model_name_or_path", None),
        "settings": {
            "n": n, "seeds": seeds, "ks": list(ks), "max_new_tokens": ctx.max_new_tokens, "batch_size": batch_size,
            "template": ctx.template, "seed": ctx.base_seed, "oracle_n": oracle_n, "oracle_seeds": oracle_seeds,
            "processes": ctx.world_size, "calibration_files": [str(f) for f in calibration_files or ()],
            "pack_samples": bool(pack_samples), "settings_hash": ctx.settings_hash,
            "engine": engine_name(getattr(ctx, "engine", None)),
        },
        "benchmarks": {b.name: {"problems": len(b.problems), "kind": b.kind} for b in benchmarks},
        "methods": [m.spec for m in methods],
        "labels": labels,
        "results": results,
        "oracle": oracle,
        "meanshift": meanshift,
        "notes": notes,
        "metric_definitions": {
            "pass@1": "mean correctness of the n samples per problem, averaged over problems; mean and sample std "
                      "(ddof=1) over seeds",
            "pass@k": "unbiased estimator over all n x seeds samples per problem, averaged over problems",
            "maj@k": "plurality vote over the first k samples (seed-major order), averaged over problems",
            "mean_temperature": "token-weighted mean T over generated tokens (see temperature_source)",
            "tokens": "mean generated tokens per completion (EOS included)",
            "truncated": "share of completions cut off at max_new_tokens (no EOS)",
            "seconds": "generation + scoring time summed over work items",
        },
    }


# ------------------------------------------------------------------------------------------------ plot data


def plot_data(ctx, benchmarks, methods, records, oracle_info) -> dict:
    """What the plots need: example traces of a dynamic method and the base entropy at each of their tokens."""
    data: dict = {"oracle": {}, "examples": []}
    for name, info in oracle_info.items():
        data["oracle"][name] = {
            "temperatures": list(info["temperature_row"]),
            "temperature_row": list(info["temperature_row"].values()),
            "best_temperature": info["best_temperature"],
            "top_ps": list(info["top_p_row"]),
            "top_p_row": list(info["top_p_row"].values()),
            "best_top_p": info["best_top_p"],
        }
    # The full method first, then the single-head ablations, whatever order the methods were listed in.
    dynamic = sorted((m for m in methods if m.kind in DYNAMIC_KINDS), key=lambda m: DYNAMIC_KINDS.index(m.kind))
    if not dynamic and any(m.kind == "meanshift" for m in methods):
        dynamic = parse_methods("autodeco")  # its records were made for meanshift
    if not dynamic:
        return data
    method = dynamic[0]
    wanted = [(b.name, i) for b in benchmarks for i in range(min(EXAMPLE_PROBLEMS, len(b.problems)))]
    for name, index in wanted:
        # Any finished record of this run's settings will do (its n does not matter for one example).
        record = next((r for r in records.values() if r["method"] == method.spec and r["benchmark"] == name
                       and r["problem_index"] == index and r["seed"] == 0 and r.get("example")
                       and r["settings"] == ctx.settings_hash), None)
        if record is None:
            continue
        example = record["example"]
        if not example.get("temperatures") or not example["token_ids"]:
            continue
        entropy = _token_entropies(ctx.model, example["prompt_ids"], example["token_ids"])
        data["examples"].append({
            "method": method.label,
            "benchmark": name,
            "problem_id": record["problem_id"],
            "tokens": [ctx.tokenizer.decode([t]) for t in example["token_ids"]],
            "temperatures": example["temperatures"],
            "top_ps": example["top_ps"],
            "entropy": entropy,
            "correct": bool(record["correct"][0]),
        })
    return data


@torch.no_grad()
def _token_entropies(model, prompt_ids: list[int], token_ids: list[int]) -> list[float]:
    """Entropy (nats) of softmax(raw logits) at each generated token, by one teacher-forced forward.

    Only the positions that predict the completion are kept (logits_to_keep), at most ENTROPY_MAX_TOKENS of them.
    """
    token_ids = token_ids[:ENTROPY_MAX_TOKENS]
    logits = teacher_forced(model, [(prompt_ids, token_ids)], 1, logits=True)[0].logits  # [m, V]
    return entropy(logits).cpu().tolist()
