"""Evaluation reports: results.json, results.md (the paper's Table 1 layout) and PNG plots.

    from autodeco.evaluation import write_reports, results_markdown
    write_reports(results, "runs/eval", plot_data=...)     # what run_evaluation calls on rank 0
    rerender_markdown("runs/eval")                           # rewrite results.md from results.json, no model

results.md: one table per metric, methods as rows, benchmarks plus their unweighted average as columns, in
percent; the best value of each column in bold. Plots (matplotlib, Agg): traces.png (an example's per-token T
and P), temperature_vs_entropy.png, oracle_grid.png. Every file is written atomically. More: docs/evaluation.md.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from autodeco.atomic import atomic_write, write_json_atomic, write_text_atomic

__all__ = [
    "write_reports",
    "results_markdown",
    "write_json_atomic",
    "write_text_atomic",
    "plot_traces",
    "plot_temperature_vs_entropy",
    "plot_oracle_grid",
    "rerender_markdown",
]

# Tokens shown as tick labels on the trace plot when the example is at most this long (beyond, labels overlap).
MAX_LABELLED_TOKENS = 48


# ------------------------------------------------------------------------------------------------ markdown


def _pct(value: float | None, decimals: int = 1) -> str:
    return "–" if value is None else f"{100 * value:.{decimals}f}"


def _table(header: list[str], rows: list[list[str]], scores: list[list[float | None]]) -> list[str]:
    """Markdown table lines; in each score column the best shown value is bold (ties: all of them)."""
    columns = len(header) - 1
    for j in range(columns):
        shown = [None if r[j] is None else round(r[j], 6) for r in scores]
        finite = [v for v in shown if v is not None]
        if not finite or len(rows) < 2:
            continue
        best = max(finite)
        for i, v in enumerate(shown):
            if v is not None and v == best:
                rows[i][j + 1] = f"**{rows[i][j + 1]}**"
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * columns]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _row_label(results: dict, spec: str) -> str:
    label = results.get("labels", {}).get(spec, spec)
    return label.replace("|", "\\|")


def results_markdown(results: dict) -> str:
    """The results.md text for a results.json dict."""
    settings = results["settings"]
    benchmarks = list(results["benchmarks"])
    methods = results["methods"]
    columns = benchmarks + ["average"]
    header = ["Method"] + [f"{b} ({results['benchmarks'][b]['problems']})" for b in benchmarks] + ["Avg"]
    cells = results["results"]
    lines = [
        "# AutoDeco evaluation",
        "",
        f"Model: `{results.get('model')}`"
        + (f" (base `{results['base_model']}`)" if results.get("base_model") not in (None, results.get("model")) else "")
        + f". {settings['n']} samples x {settings['seeds']} seeds per problem, at most "
        f"{settings['max_new_tokens']} new tokens, seed {settings['seed']}, {settings['processes']} process(es)"
        + (f", engine {settings['engine']}" if settings.get("engine", "hf") != "hf" else "") + ". "
        "Numbers are percent; column headers give the number of problems; Avg is the unweighted mean over "
        "benchmarks; the best value of each column is in bold.",
        "",
        f"## Pass@1 (%), mean ± std over {settings['seeds']} seeds",
        "",
    ]

    def values(metric: str, k: str | None = None):
        def get(cell):
            v = cell[metric]
            if k is not None:
                v = v[k]
            return v["mean"] if isinstance(v, dict) and "mean" in v else v
        return [[get(cells[m][c]) for c in columns] for m in methods]

    rows = [[_row_label(results, m)] + [f"{_pct(cells[m][c]['pass@1']['mean'])} ± {_pct(cells[m][c]['pass@1']['std'])}"
                                        for c in columns] for m in methods]
    lines += _table(header, rows, [[round(100 * v, 1) for v in r] for r in values("pass@1")])
    for metric, title in (("pass@k", "Pass@{k} (%), unbiased estimator over all n x seeds samples"),
                          ("maj@k", "Maj@{k} (%), plurality vote over the first {k} samples")):
        for k in settings["ks"]:
            if int(k) == 1:
                continue  # pass@1 is the table above; maj@1 is the first sample alone
            k = str(k)
            rows = [[_row_label(results, m)] + [_pct(cells[m][c][metric][k]) for c in columns] for m in methods]
            lines += ["", f"## {title.format(k=k)}", ""]
            lines += _table(header, rows, [[round(100 * v, 1) for v in r] for r in values(metric, k)])

    lines += ["", "## Decoding statistics (all benchmarks)", "",
              "| Method | mean T | mean P | T and P from | tokens / completion | truncated | total tokens | seconds |",
              "|---|---:|---:|---|---:|---:|---:|---:|"]
    for m in methods:
        avg = cells[m]["average"]
        source = cells[m][benchmarks[0]].get("temperature_source", "")
        t = "–" if avg["mean_temperature"] is None else f"{avg['mean_temperature']:.3f}"
        p = "–" if avg["mean_top_p"] is None else f"{avg['mean_top_p']:.3f}"
        lines.append(f"| {_row_label(results, m)} | {t} | {p} | {source} | {avg['tokens']:.1f} | "
                     f"{100 * avg.get('truncated', 0.0):.1f}% | {avg['total_tokens']:,} | {avg['seconds']:.1f} |")

    notes = list(results.get("notes", []))
    if notes:
        lines += ["", "## Notes", ""] + [f"- {note}" for note in notes]
    plots = results.get("plots", [])
    if plots:
        lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ plots


def _figure(width: float, height: float):
    # Figure + Agg canvas: no pyplot global state, no display backend, safe in worker processes and threads.
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # matplotlib: imported lazily, only when a plot is drawn
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> None:
    atomic_write(path, lambda f: fig.savefig(f, format="png"))


def _finite(values):
    return [v if v is not None and not (isinstance(v, float) and math.isnan(v)) else float("nan") for v in values]


def plot_traces(example: dict, path: str | os.PathLike) -> None:
    """T and P of each generated token of one example completion (two stacked panels)."""
    t = _finite(example["temperatures"])
    p = _finite(example["top_ps"] or [])
    x = list(range(len(t)))
    fig = _figure(max(7.0, min(16.0, 0.18 * len(t))), 5.0)
    ax_t, ax_p = fig.subplots(2, 1, sharex=True)
    ax_t.plot(x, t, color="tab:red", lw=1.2, marker="." if len(t) <= 200 else None)
    ax_t.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax_t.set_ylabel("temperature T")
    if p:
        ax_p.plot(x, p, color="tab:blue", lw=1.2, marker="." if len(p) <= 200 else None)
    ax_p.set_ylim(0, 1.05)
    ax_p.set_ylabel("top-p P")
    ax_p.set_xlabel("generated token")
    tokens = example.get("tokens") or []
    if tokens and len(tokens) <= MAX_LABELLED_TOKENS:
        ax_p.set_xticks(x)
        ax_p.set_xticklabels([repr(tok)[1:-1][:8] for tok in tokens], rotation=90, fontsize=7)
    verdict = "correct" if example.get("correct") else "wrong"
    fig.suptitle(f"{example.get('method', 'AutoDeco')}: per-token T and P\n{example.get('benchmark')}/"
                 f"{example.get('problem_id')} ({len(t)} tokens, {verdict})", fontsize=10)
    _save(fig, Path(path))


def plot_temperature_vs_entropy(examples: list[dict], path: str | os.PathLike) -> None:
    """Scatter of the heads' T against the base distribution's entropy at every generated token of `examples`."""
    fig = _figure(6.5, 5.0)
    ax = fig.subplots()
    xs_all, ys_all = [], []
    for example in examples:
        pairs = [(h, t) for h, t in zip(example["entropy"], _finite(example["temperatures"])) if t == t]
        if not pairs:
            continue
        xs, ys = zip(*pairs)
        xs_all += xs
        ys_all += ys
        ax.scatter(xs, ys, s=10, alpha=0.6, label=f"{example.get('benchmark')}/{example.get('problem_id')}")
    ax.set_xlabel("entropy of softmax(raw logits) (nats)")
    ax.set_ylabel("predicted temperature T")
    title = "Heads' temperature vs base entropy per generated token"
    if len(xs_all) > 2:
        r = _pearson(xs_all, ys_all)
        if r is not None:
            title += f"\n{len(xs_all)} tokens, Pearson r = {r:.2f}"
    ax.set_title(title)
    if examples:
        ax.legend(fontsize=7, loc="best")
    _save(fig, Path(path))


def _pearson(xs, ys) -> float | None:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)


def plot_oracle_grid(oracle: dict, path: str | os.PathLike) -> None:
    """Per benchmark a 2-row heatmap of pass@1 (%): T over the grid at P=1, and P over the grid at the best T."""
    names = list(oracle)
    # One colour scale for all benchmarks (they share the colorbar), spanning the data for contrast.
    top = max([1.0] + [100 * v for g in oracle.values() for v in g["temperature_row"] + g["top_p_row"]])
    fig = _figure(9.0, 1.0 + 1.6 * len(names))
    axes = fig.subplots(len(names), 1, squeeze=False)[:, 0]
    image = None
    for ax, name in zip(axes, names):
        grid = oracle[name]
        t_values, p_values = grid["temperatures"], grid["top_ps"]
        matrix = [[100 * v for v in grid["temperature_row"]], [100 * v for v in grid["top_p_row"]]]
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=top)
        ax.set_yticks([0, 1])
        ax.set_yticklabels(["T (P=1)", f"P (T={grid['best_temperature']:g})"])
        ax.set_xticks(range(len(t_values)))
        ax.set_xticklabels([f"{v:g}" for v in t_values])
        ax.set_xlabel("grid value (row 1: T, row 2: P)")
        for row, (values, best) in enumerate(((t_values, grid["best_temperature"]), (p_values, grid["best_top_p"]))):
            for col, value in enumerate(values):
                score = matrix[row][col]
                ax.text(col, row, f"{score:.0f}", ha="center", va="center", fontsize=8,
                        color="black" if score > 0.6 * top else "white",
                        fontweight="bold" if value == best else "normal")
                if value == best:
                    ax.add_patch(_box(col, row))
        ax.set_title(f"{name}: test-set oracle T={grid['best_temperature']:g}, P={grid['best_top_p']:g} "
                     "(pass@1 %, best boxed)", fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="pass@1 (%)", shrink=0.8)
    _save(fig, Path(path))


def _box(col: int, row: int):
    from matplotlib.patches import Rectangle  # lazily, with the other matplotlib imports

    return Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="red", lw=2)


# ------------------------------------------------------------------------------------------------ all reports


def write_reports(results: dict, output_dir: str | os.PathLike, *, plot_data: dict | None = None) -> list[Path]:
    """Write the plots `plot_data` allows, then results.json and results.md (which list the plots); returns the
    paths written. `results["plots"]` is set to the plot file names."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    plots: list[str] = []
    if plot_data:
        examples = plot_data.get("examples") or []
        if examples:
            plot_traces(examples[0], output_dir / "traces.png")
            plots.append("traces.png")
            plot_temperature_vs_entropy(examples, output_dir / "temperature_vs_entropy.png")
            plots.append("temperature_vs_entropy.png")
        if plot_data.get("oracle"):
            plot_oracle_grid(plot_data["oracle"], output_dir / "oracle_grid.png")
            plots.append("oracle_grid.png")
    results["plots"] = plots
    written += [output_dir / p for p in plots]
    write_json_atomic(output_dir / "results.json", results)
    write_text_atomic(output_dir / "results.md", results_markdown(results))
    return written + [output_dir / "results.json", output_dir / "results.md"]


def rerender_markdown(output_dir: str | os.PathLike) -> Path:
    """Rewrite OUTPUT_DIR/results.md from OUTPUT_DIR/results.json (no model needed); returns the path written."""
    path = Path(output_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run `autodeco eval` first.")
    results = json.loads(path.read_text(encoding="utf-8"))
    target = Path(output_dir) / "results.md"
    write_text_atomic(target, results_markdown(results))
    return target
