"""`autodeco eval-control`: do commands about randomness move the heads' T and P? (the paper's Table 3 and Figure 4)

    autodeco eval-control --model runs/heads --prompts problems.jsonl --output-dir runs/control [--n 100]

    from autodeco.evaluation.control_eval import evaluate_control
    results = evaluate_control(model, tokenizer, ["What is 2 + 3?", ...], output_dir="runs/control", n=100)

Measurement. For each of the first n problems (raw problem texts, put into the user message like
`autodeco.evaluation.benchmarks.build_prompt` does for a "math" problem, with `template` if given):
1. ONE completion is generated with the model's own dynamic decoding and no command (torch seeded once with
   `seed`, prompts packed into `generate` calls of up to `batch_size`).
2. That same completion is teacher-forced under five prompts: no command; a seen low command; a seen high
   command; a held-out low command; a held-out high command (each inserted into the user message with
   `autodeco.control.insert_command`; problem i uses phrasing i mod len(set) of each set, so every phrasing is
   used evenly and deterministically). For each, the mean T and mean P over the completion's tokens (EOS
   included) are recorded.
Because the tokens are the same, a difference between two conditions is caused by the command alone (a paired
comparison). Per set ({seen, held-out}) x condition ({low, high}): the mean T and P with the command, the delta
(mean over problems of the per-problem difference commanded - no command, which equals the difference of the
means) and the consistency: the share of problems whose difference has the right sign (strictly < 0 for low,
strictly > 0 for high), for T and for P.

Files in `output_dir`, written atomically: results.json (everything, including per-problem means and the trace),
results.md (two tables in Table 3's layout, seen and held-out phrasings, with the no-command baseline row), and
control_trace.png (Figure 4: the per-token T and P of the problem with the longest completion under no command
and a seen low / high command, two stacked panels).

"Seen" phrasings are those training used: the model directory's autodeco_control.json (written by
`autodeco train --control-share ...`) when it has one, else autodeco.control.LOW_COMMANDS / HIGH_COMMANDS.
Held-out phrasings are autodeco.control.LOW_COMMANDS_HELD_OUT / HIGH_COMMANDS_HELD_OUT.

This module exposes `add_eval_control_parser(subparsers)` for autodeco/cli.py; `python -m
autodeco.evaluation.control_eval eval-control ...` runs it on its own.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from autodeco.atomic import atomic_write, write_json_atomic, write_text_atomic
from autodeco.control import (
    HIGH_COMMANDS,
    HIGH_COMMANDS_HELD_OUT,
    LOW_COMMANDS,
    LOW_COMMANDS_HELD_OUT,
    insert_command,
    load_control_settings,
)

__all__ = ["evaluate_control", "control_markdown", "plot_control_trace", "add_eval_control_parser",
           "cmd_eval_control", "CONDITIONS", "SETS"]

SETS = ("seen", "held_out")
CONDITIONS = ("low", "high")
SET_TITLES = {"seen": "Commands seen in training", "held_out": "Held-out phrasings (never used in training)"}
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
_KEYS = ("temperature", "top_p")


# ------------------------------------------------------------------------------------------------ measurement


def _check_commands(name: str, commands) -> tuple[str, ...]:
    if isinstance(commands, str) or not commands or not all(isinstance(c, str) and c.strip() for c in commands):
        raise ValueError(f"{name} must be a non-empty sequence of non-empty phrasings, got {commands!r}.")
    return tuple(commands)


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


@torch.no_grad()
def _teacher_forced(model, rows: list[tuple[list[int], list[int]]], batch_size: int,
                    progress: bool) -> list[tuple[list[float], list[float]]]:
    """Per-token (T, P) at each completion token of each (prompt ids, completion ids) row, by teacher forcing.

    Rows are left padded (position ids follow the attention mask, as in generate) and sorted by length; only the
    last max(completion length) + 1 positions are kept (logits_to_keep), so memory does not grow with prompts.
    """
    from tqdm.auto import tqdm

    device = model.get_input_embeddings().weight.device
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    results: list[tuple[list[float], list[float]] | None] = [None] * len(rows)
    bar = tqdm(total=len(order), desc="eval-control: teacher forcing", unit="seq", disable=not progress,
               file=sys.stderr)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        sequences = [rows[i][0] + rows[i][1] for i in chunk]
        width = max(len(s) for s in sequences)
        keep = max(len(rows[i][1]) for i in chunk) + 1
        input_ids = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, W]; pad id is irrelevant (masked)
        attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [B, W]
        for row, seq in enumerate(sequences):
            input_ids[row, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
            attention_mask[row, width - len(seq):] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0)  # [B, W]
        out = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                    position_ids=position_ids.to(device), use_cache=False, logits_to_keep=keep)
        t_all, p_all = out.temperature.float().cpu(), out.top_p.float().cpu()  # [B, keep]
        for row, index in enumerate(chunk):
            m = len(rows[index][1])
            # Kept index k is position W - keep + k; completion token j sits at W - m + j, predicted at W - m + j - 1.
            t = t_all[row, keep - m - 1 : keep - 1]
            p = p_all[row, keep - m - 1 : keep - 1]
            results[index] = (t.tolist(), p.tolist())
        bar.update(len(chunk))
    bar.close()
    return results  # type: ignore[return-value]


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


def _summary(none: list[dict], commanded: list[dict], direction: int) -> dict:
    """Means, paired delta and consistency of one condition over the problems (see the module docstring)."""
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
    control_trace.png to `output_dir` and return the results dict (see the module docstring for the measurement).

    problems: raw problem texts (the user content before the chat template); the first `n` are used.
    low_commands / high_commands: the phrasings seen in training; low_held_out / high_held_out: phrasings never
    used in training (a phrasing in both is an error). `notes` are added to the report.
    """
    from autodeco.evaluation.benchmarks import Problem, build_prompt
    from autodeco.evaluation.runner import (
        GenerationRequest,
        encode_prompt,
        generate_completions,
    )

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
        traces = _teacher_forced(model, rows, batch_size, progress)
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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

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
    from matplotlib.ticker import MaxNLocator

    ax_p.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_t.set_ylabel("temperature T")
    ax_p.set_ylabel("top-p P")
    ax_p.set_xlabel("completion token (same tokens under every condition)")
    ax_t.legend(fontsize=8, loc="best")
    problem = trace.get("problem", "")
    fig.suptitle(f"Per-token T and P under decoding commands (teacher-forced): "
                 f"{problem[:60]}{'…' if len(problem) > 60 else ''}", fontsize=10)
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


# ------------------------------------------------------------------------------------------------ command line


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got '{text}'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_eval_control_parser(subparsers) -> argparse.ArgumentParser:
    """Add the `eval-control` subcommand to `subparsers` and return its parser."""
    p = subparsers.add_parser(
        "eval-control",
        help="measure how low/high-randomness commands in the prompt move the heads' T and P (paper's Table 3)",
        description="For N problems: generate one completion without a command, teacher-force it without a command "
        "and with low- and high-randomness commands (phrasings seen in training and held-out ones), and report mean T "
        "and P, their paired change and its consistency. Writes results.json, results.md and control_trace.png.",
    )
    p.add_argument("--model", required=True, help="AutoDeco directory (heads-only or merged), e.g. trained with "
                                                  "`autodeco train --control-share 0.3`")
    p.add_argument("--prompts", required=True, metavar="FILE",
                   help="benchmark-format JSONL: one {\"problem\": ..., \"gt\": ...} object per line (gt is not used)")
    p.add_argument("--output-dir", required=True, help="directory for results.json, results.md and control_trace.png")
    p.add_argument("--n", type=_positive_int, default=100, help="problems to use, the first N of the file (default 100)")
    p.add_argument("--seed", type=int, default=0, help="seed of the no-command completions (default 0)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=512,
                   help="tokens per completion at most (default 512)")
    p.add_argument("--template", default=None, metavar="TEXT_OR_FILE",
                   help="prompt template with {problem} and {instruction} placeholders (or a file holding one); "
                        "default: problem, blank line, the paper's \\boxed{} instruction")
    p.add_argument("--batch-size", type=_positive_int, default=32,
                   help="sequences per generate call and per teacher-forced forward (default 32)")
    from autodeco.evaluation.eval_cli import add_model_loading_flags

    add_model_loading_flags(p)
    p.set_defaults(func=cmd_eval_control)
    return p


def _read_template(value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(value)
    if "{" not in value and path.is_file():
        return path.read_text(encoding="utf-8")
    if "{problem}" not in value:
        raise ValueError(f"--template '{value}': neither a file nor a template containing {{problem}}.")
    return value


def _load_problems(path: str) -> list[str]:
    from autodeco.evaluation.benchmarks import load_benchmark

    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(
            f"--prompts '{path}' does not exist (or is not a file); pass a benchmark-format JSONL file with one "
            "{\"problem\": ..., \"gt\": ...} object per line."
        )
    try:
        return [problem.problem for problem in load_benchmark(str(file)).problems]
    except ValueError as exc:
        raise ValueError(
            f"--prompts '{path}': {exc} eval-control reads benchmark-format JSONL ('problem' and 'gt' per line); "
            "training rows ('prompt'/'completion' or 'messages') are not supported."
        ) from None


def _model_dir_check(name: str) -> None:
    path = Path(name).expanduser()
    if path.exists():
        config = path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"--model '{name}' has no config.json; pass an AutoDeco model directory.")
        try:
            model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
        except json.JSONDecodeError as exc:
            raise ValueError(f"--model '{name}': config.json is not valid JSON ({exc}).") from None
        if model_type != "autodeco":
            raise ValueError(
                f"--model '{name}' is a plain '{model_type}' model, not an AutoDeco one: eval-control measures the "
                "heads. Train them with `autodeco train --control-share 0.3 ...` and pass the output directory."
            )
    elif name.startswith((".", "/", "~")) or name.count("/") != 1:
        raise FileNotFoundError(f"--model '{name}' does not exist; pass an AutoDeco model directory (or a hub name).")


def cmd_eval_control(args) -> dict:
    """Run `autodeco eval-control`; prints the tables and returns the results dict."""
    from autodeco import AutoDecoModelForCausalLM
    from autodeco.cli import load_tokenizer, resolve_dtype

    # Everything that can be wrong in the flags and files is checked before the model is loaded.
    _model_dir_check(args.model)
    problems = _load_problems(args.prompts)
    template = _read_template(args.template)
    settings = load_control_settings(args.model) if Path(args.model).expanduser().is_dir() else None
    notes = []
    if settings is None:
        notes.append(f"'{args.model}' has no autodeco_control.json: it was not trained with `--control-share`, so "
                     "this measures the heads' untrained reaction to commands; the 'seen' phrasings are "
                     "autodeco.control's training phrasings.")
        low, high = LOW_COMMANDS, HIGH_COMMANDS
    else:
        low, high = tuple(settings["low_commands"]), tuple(settings["high_commands"])
        notes.append(f"Trained with decoding control: share {settings.get('share')}, margin {settings.get('margin')}, "
                     f"weight {settings.get('weight')} (autodeco_control.json).")
    if len(problems) < args.n:
        notes.append(f"--prompts holds {len(problems)} problems, fewer than --n {args.n}: all of them are used.")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = resolve_dtype(args.dtype, on_gpu=device.type == "cuda")
    model = AutoDecoModelForCausalLM.from_pretrained(args.model, dtype=dtype, trust_remote_code=args.trust_remote_code)
    tokenizer = load_tokenizer(args.model, model.config.base_model_name_or_path)
    model.to(device).eval()
    results = evaluate_control(
        model, tokenizer, problems, output_dir=args.output_dir, n=args.n, seed=args.seed,
        max_new_tokens=args.max_new_tokens, template=template, batch_size=args.batch_size,
        low_commands=low, high_commands=high,
        low_held_out=[c for c in LOW_COMMANDS_HELD_OUT if c not in low and c not in high],
        high_held_out=[c for c in HIGH_COMMANDS_HELD_OUT if c not in low and c not in high],
        notes=notes,
    )
    print(control_markdown(results), end="")
    print(f"Wrote results.json, results.md and control_trace.png to {args.output_dir}", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    """`python -m autodeco.evaluation.control_eval eval-control ...`, with the CLI's one-line errors."""
    from autodeco.cli import run_subcommand

    return run_subcommand(add_eval_control_parser, argv)


if __name__ == "__main__":
    sys.exit(main())
