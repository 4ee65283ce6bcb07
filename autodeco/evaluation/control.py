"""Do commands about randomness move the heads' T and P? (the paper's Table 3 and Figure 4)

    from autodeco.evaluation import evaluate_control
    results = evaluate_control(model, tokenizer, ["What is 2 + 3?", ...], output_dir="runs/control", n=100)

CLI: `autodeco eval-control --model DIR --prompts FILE --output-dir DIR [--n 100]`. For each problem ONE
completion is generated without a command (dynamic decoding, torch seeded once), then teacher-forced under five
prompts: no command, a seen low / high command, a held-out low / high command (problem i gets phrasing i mod
len). Per set and condition: mean T and P, the paired delta (commanded - none) and the consistency (share of
problems whose delta has the right sign). Writes results.json, results.md and control_trace.png (atomically).
The measurement in full: docs/control.md.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from autodeco.atomic import atomic_write, write_json_atomic, write_text_atomic
from autodeco.control import (
    HIGH_COMMANDS,
    HIGH_COMMANDS_HELD_OUT,
    LOW_COMMANDS,
    LOW_COMMANDS_HELD_OUT,
    insert_command,
)
from autodeco.evaluation.benchmarks import Problem, build_prompt
from autodeco.evaluation.generation import GenerationRequest, encode_prompt, generate_completions
from autodeco.modeling import teacher_forced

__all__ = ["evaluate_control", "control_markdown", "plot_control_trace", "CONDITIONS", "SETS"]

SETS = ("seen", "held_out")
CONDITIONS = ("low", "high")
SET_TITLES = {"seen": "Commands seen in training", "held_out": "Held-out phrasings (never used in training)"}
_KEYS = ("temperature", "top_p")


# ------------------------------------------------------------------------------------------------ measurement


def _check_commands(name: str, commands) -> tuple[str, ...]:
    if isinstance(commands, str) or not commands or not all(isinstance(c, str) and c.strip() for c in commands):
        raise ValueError(f"{name} must be a non-empty sequence of non-empty phrasings, got {commands!r}.")
    return tuple(commands)


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def _summary(none: list[dict], commanded: list[dict], direction: int) -> dict:
    """Means, paired delta and consistency of one condition over the problems (see docs/control.md)."""
    out: dict = {}
    for key in _KEYS:
        deltas = [c[key] - b[key] for c, b in zip(commanded, none)]
        out[f"mean_{key}"] = _mean([c[key] for c in commanded])
        out[f"delta_{key}"] = _mean(deltas)
        out[f"consistency_{key}"] = _mean([1.0 if d * direction > 0 else 0.0 for d in deltas])
    return out


def evaluate_control(
    model,
    tokenizer,
    problems: list[str],
    *,
    output_dir,
    n: int = 100,
    seed: int = 0,
    max_new_tokens: int = 512,
    template: str | None = None,
    batch_size: int = 32,
    low_commands: Sequence[str] = LOW_COMMANDS,
    high_commands: Sequence[str] = HIGH_COMMANDS,
    low_held_out: Sequence[str] = LOW_COMMANDS_HELD_OUT,
    high_held_out: Sequence[str] = HIGH_COMMANDS_HELD_OUT,
    progress: bool = True,
    notes: Sequence[str] = (),
) -> dict:
    """Measure how decoding commands move the heads' mean T and P; write results.json, results.md and
    control_trace.png to `output_dir` and return the results dict (see docs/control.md for the measurement).

    problems: raw problem texts (the user content before the chat template); the first `n` are used.
    low_commands / high_commands: the phrasings seen in training; low_held_out / high_held_out: phrasings never
    used in training (a phrasing in both is an error). `notes` are added to the report.
    """
    if not (hasattr(model, "temperature_head") and hasattr(model, "top_p_head")):
        raise ValueError(
            f"evaluate_control needs an AutoDecoModelForCausalLM (a model with temperature and top-p heads), got "
            f"{type(model).__name__}; load one with AutoDecoModelForCausalLM.from_pretrained(DIR)."
        )
    if isinstance(problems, str) or not isinstance(problems, Sequence) or not problems:
        raise ValueError(f"problems must be a non-empty list of problem texts, got {type(problems).__name__}.")
    for index, text in enumerate(problems):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"problems[{index}] must be a non-empty string, got {text!r}.")
    _positive("n", n)
    _positive("max_new_tokens", max_new_tokens)
    _positive("batch_size", batch_size)
    sets = {
        "seen": {"low": _check_commands("low_commands", low_commands),
                 "high": _check_commands("high_commands", high_commands)},
        "held_out": {"low": _check_commands("low_held_out", low_held_out),
                     "high": _check_commands("high_held_out", high_held_out)},
    }
    seen_all = set(sets["seen"]["low"]) | set(sets["seen"]["high"])
    overlap = sorted(seen_all & (set(sets["held_out"]["low"]) | set(sets["held_out"]["high"])))
    if overlap:
        raise ValueError(f"held-out phrasings must not be among the training phrasings; both hold {overlap}.")
    output_dir = Path(output_dir)
    texts = list(problems[:n])
    prompts = [build_prompt(Problem(id=f"control-{i}", problem=text, gt="", benchmark="control", kind="math"),
                            tokenizer, template) for i, text in enumerate(texts)]

    modes = [(module, module.training) for module in model.modules()]  # restored after (the Trainer's mix too)
    model.eval()
    try:
        if progress:
            print(f"eval-control: generating {len(prompts)} completions without a command (max {max_new_tokens} "
                  f"tokens, dynamic decoding, seed {seed})", file=sys.stderr, flush=True)
        torch.manual_seed(seed)
        completions = generate_completions(
            model, tokenizer, [GenerationRequest(prompt, 1, None) for prompt in prompts],
            generation_kwargs={}, max_new_tokens=max_new_tokens, batch_size=batch_size,
        )
        completions = [c[0] for c in completions]

        # Teacher-forced rows: condition "none", then (set, condition) with phrasing i mod len(set).
        labels = ["none"] + [f"{s}_{c}" for s in SETS for c in CONDITIONS]
        commands: dict[str, list[str | None]] = {"none": [None] * len(prompts)}
        for s in SETS:
            for c in CONDITIONS:
                phrasings = sets[s][c]
                commands[f"{s}_{c}"] = [phrasings[i % len(phrasings)] for i in range(len(prompts))]
        rows, where = [], []
        for label in labels:
            for i, (prompt, completion) in enumerate(zip(prompts, completions)):
                command = commands[label][i]
                text = prompt if command is None else insert_command(prompt, command, tokenizer)
                rows.append((encode_prompt(tokenizer, text), list(completion.token_ids)))
                where.append((label, i))
        with tqdm(total=len(rows), desc="eval-control: teacher forcing", unit="seq", disable=not progress,
                  file=sys.stderr) as bar:
            outputs = teacher_forced(model, rows, batch_size, on_batch=bar.update)
        traces = [(out.temperature.tolist(), out.top_p.tolist()) for out in outputs]
    finally:
        for module, training in modes:
            module.training = training

    per_prompt = [{"index": i, "tokens": len(c.token_ids), "finished": c.finished} for i, c in enumerate(completions)]
    per_token: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
    for (label, i), (t, p) in zip(where, traces):
        per_token[(label, i)] = (t, p)
        per_prompt[i][label] = {"temperature": _mean(t), "top_p": _mean(p)}
        if label != "none":
            per_prompt[i][f"{label}_command"] = commands[label][i]

    none = [row["none"] for row in per_prompt]
    results: dict = {
        "n": len(prompts),
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "template": template,
        "measurement": (
            "one completion per problem, generated without a command (dynamic decoding), then teacher-forced under "
            "each condition; mean T and P over the completion's tokens; delta = mean over problems of (commanded - "
            "no command); consistency = share of problems whose delta has the right sign (< 0 low, > 0 high)"
        ),
        "commands": {s: {c: list(sets[s][c]) for c in CONDITIONS} for s in SETS},
        "completion_tokens": {
            "mean": _mean([r["tokens"] for r in per_prompt]),
            "min": min(r["tokens"] for r in per_prompt),
            "max": max(r["tokens"] for r in per_prompt),
            "unfinished": sum(1 for r in per_prompt if not r["finished"]),
        },
        "none": {f"mean_{key}": _mean([b[key] for b in none]) for key in _KEYS},
        "notes": list(notes),
    }
    results["by_phrasing"] = {}
    for s in SETS:
        results[s] = {}
        results["by_phrasing"][s] = []
        for c, direction in (("low", -1), ("high", 1)):
            results[s][c] = _summary(none, [row[f"{s}_{c}"] for row in per_prompt], direction)
            # Each phrasing on the problems it was given to (problem i gets phrasing i mod len): an aggregate
            # consistency can hide one wording that always fails.
            for command in sets[s][c]:
                given = [row for row in per_prompt if row.get(f"{s}_{c}_command") == command]
                if given:
                    results["by_phrasing"][s].append({
                        "command": command, "condition": c, "n": len(given),
                        **_summary([row["none"] for row in given], [row[f"{s}_{c}"] for row in given], direction),
                    })
    # Figure 4 shows the problem with the longest completion (the first such), the most tokens to look at.
    trace_index = max(range(len(per_prompt)), key=lambda i: (per_prompt[i]["tokens"], -i))
    results["trace"] = {
        "problem_index": trace_index,
        "problem": texts[trace_index],
        "tokens": [tokenizer.decode([tok]) for tok in completions[trace_index].token_ids],
        "low_command": commands["seen_low"][trace_index],
        "high_command": commands["seen_high"][trace_index],
        **{label: {"temperatures": per_token[(f"seen_{label}" if label != "none" else "none", trace_index)][0],
                   "top_ps": per_token[(f"seen_{label}" if label != "none" else "none", trace_index)][1]}
           for label in ("none", "low", "high")},
    }
    results["per_prompt"] = per_prompt
    results["files"] = ["results.json", "results.md", "control_trace.png"]

    output_dir.mkdir(parents=True, exist_ok=True)
    plot_control_trace(results["trace"], output_dir / "control_trace.png")
    write_json_atomic(output_dir / "results.json", results)
    write_text_atomic(output_dir / "results.md", control_markdown(results))
    return results


# ------------------------------------------------------------------------------------------------ reports


def _signed(value: float) -> str:
    return f"{value:+.3f}"


def control_markdown(results: dict) -> str:
    """results.md: one Table-3-style table per phrasing set (rows: no command, low, high)."""
    none = results["none"]
    lines = [
        "# Instruction-based decoding control",
        "",
        f"{results['n']} problems; one completion each (no command, dynamic decoding, seed {results['seed']}, "
        f"at most {results['max_new_tokens']} tokens; mean {results['completion_tokens']['mean']:.1f} tokens), "
        "teacher-forced under each condition, so every difference is caused by the command alone. Mean T / P: over "
        "the completion's tokens, averaged over problems. Δ: mean over problems of (commanded - no command). "
        "Consistency: share of problems whose Δ has the right sign (< 0 for low, > 0 for high).",
    ]
    for s in SETS:
        lines += ["", f"## {SET_TITLES[s]}", "",
                  "| Condition | Mean T | ΔT | Consistency T | Mean P | ΔP | Consistency P |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
                  f"| No command (baseline) | {none['mean_temperature']:.3f} | – | – | {none['mean_top_p']:.3f} | – | – |"]
        for c, title in (("low", "Low-diversity command"), ("high", "High-diversity command")):
            r = results[s][c]
            lines.append(
                f"| {title} | {r['mean_temperature']:.3f} | {_signed(r['delta_temperature'])} | "
                f"{100 * r['consistency_temperature']:.0f}% | {r['mean_top_p']:.3f} | {_signed(r['delta_top_p'])} | "
                f"{100 * r['consistency_top_p']:.0f}% |"
            )
        lines += ["", "By phrasing (each on the problems it was given to):", "",
                  "| Condition | Phrasing | Problems | ΔT | Consistency T | ΔP | Consistency P |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in results.get("by_phrasing", {}).get(s, []):
            lines.append(
                f"| {r['condition']} | {r['command']} | {r['n']} | {_signed(r['delta_temperature'])} | "
                f"{100 * r['consistency_temperature']:.0f}% | {_signed(r['delta_top_p'])} | "
                f"{100 * r['consistency_top_p']:.0f}% |"
            )
    notes = list(results.get("notes", []))
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    lines += ["", "## Per-token trace", "", "![control_trace](control_trace.png)"]
    return "\n".join(lines) + "\n"


def plot_control_trace(trace: dict, path) -> None:
    """Figure 4: one completion's per-token T (top) and P (bottom) under no / low / high command."""
    # matplotlib: imported lazily, only when the figure is drawn (importing autodeco.evaluation stays light).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    length = len(trace["none"]["temperatures"])
    fig = Figure(figsize=(max(7.0, min(16.0, 0.12 * length)), 5.5), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_t, ax_p = fig.subplots(2, 1, sharex=True)
    styles = (("none", "no command", "tab:gray"), ("low", f"low: \"{trace['low_command']}\"", "tab:blue"),
              ("high", f"high: \"{trace['high_command']}\"", "tab:red"))
    x = list(range(length))
    for label, name, colour in styles:
        marker = "." if length <= 200 else None
        ax_t.plot(x, trace[label]["temperatures"], color=colour, lw=1.2, marker=marker, label=name)
        ax_p.plot(x, trace[label]["top_ps"], color=colour, lw=1.2, marker=marker, label=name)
    ax_p.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_t.set_ylabel("temperature T")
    ax_p.set_ylabel("top-p P")
    ax_p.set_xlabel("completion token (same tokens under every condition)")
    ax_t.legend(fontsize=8, loc="best")
    problem = trace.get("problem", "")
    fig.suptitle(f"Per-token T and P under decoding commands (teacher-forced): "
                 f"{problem[:60]}{'…' if len(problem) > 60 else ''}", fontsize=10)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))
