"""results.md layout (the paper's Table 1: methods x benchmarks + Avg, best in bold), atomic writes, plots.

    .venv/bin/python -m pytest -q tests/test_report.py      # a few seconds
"""

from __future__ import annotations

import json
import os
import stat

import pytest

from autodeco.evaluation import report


def cell(mean, std=0.01, pass16=0.5, maj16=0.4, t=0.8, p=0.9, label="x"):
    return {"pass@1": {"mean": mean, "std": std, "per_seed": [mean]}, "pass@k": {"1": mean, "16": pass16},
            "maj@k": {"1": mean, "16": maj16}, "mean_temperature": t, "mean_top_p": p, "tokens": 100.0,
            "total_tokens": 1000, "completions": 10, "truncated": 0.1, "seconds": 2.0, "label": label,
            "temperature_source": "static"}


def make_results():
    rows = {
        "greedy": {"aime": cell(0.30, 0.0), "gpqa": cell(0.40, 0.0, pass16=0.40), "average": cell(0.35, 0.0)},
        "oracle": {"aime": cell(0.42), "gpqa": cell(0.44, pass16=0.9), "average": cell(0.43)},
        "meanshift": {"aime": cell(0.41), "gpqa": cell(0.44), "average": cell(0.425)},
        "autodeco": {"aime": cell(0.45, 0.012), "gpqa": cell(0.43), "average": cell(0.44)},
    }
    return {
        "model": "Qwen/Qwen2.5-0.5B",
        "settings": {"n": 16, "seeds": 8, "ks": [1, 16], "max_new_tokens": 2048, "seed": 0, "processes": 1},
        "benchmarks": {"aime": {"problems": 30, "kind": "math"}, "gpqa": {"problems": 198, "kind": "choice"}},
        "methods": list(rows),
        "labels": {"greedy": "greedy", "oracle": "test-set oracle",
                   "meanshift": "MeanShift (T=0.812, P=0.93, from calibration data)", "autodeco": "AutoDeco"},
        "results": rows,
        "notes": ["test-set oracle: ... aime: T=0.6, P=0.95; gpqa: T=0.7, P=1."],
    }


def test_table_layout_and_bold_best_per_column():
    md = report.results_markdown(make_results())
    lines = md.splitlines()
    start = lines.index("## Pass@1 (%), mean ± std over 8 seeds")
    table = lines[start + 2 : start + 8]
    assert table[0] == "| Method | aime (30) | gpqa (198) | Avg |"
    assert table[1] == "|---|---:|---:|---:|"
    assert table[2] == "| greedy | 30.0 ± 0.0 | 40.0 ± 0.0 | 35.0 ± 0.0 |"
    assert table[3] == "| test-set oracle | 42.0 ± 1.0 | **44.0 ± 1.0** | 43.0 ± 1.0 |"
    # ties at the shown precision are all bold
    assert table[4] == "| MeanShift (T=0.812, P=0.93, from calibration data) | 41.0 ± 1.0 | **44.0 ± 1.0** | 42.5 ± 1.0 |"
    assert table[5] == "| AutoDeco | **45.0 ± 1.2** | 43.0 ± 1.0 | **44.0 ± 1.0** |"
    assert "## Pass@16 (%)" in md and "## Maj@16 (%)" in md and "## Pass@1 (%), unbiased" not in md
    assert "| test-set oracle | **50.0** | **90.0** | **50.0** |" in md  # pass@16 table: its own bold (ties: all)
    assert "| greedy | **50.0** | 40.0 | **50.0** |" in md
    assert "## Notes" in md and "- test-set oracle:" in md
    assert "| AutoDeco | 0.800 | 0.900 | static | 100.0 | 10.0% | 1,000 | 2.0 |" in md


def test_write_reports_is_atomic_and_draws_plots(tmp_path):
    results = make_results()
    example = {"method": "AutoDeco", "benchmark": "aime", "problem_id": "1", "tokens": list("abc"),
               "temperatures": [0.5, 0.9, 1.3], "top_ps": [0.8, 0.95, 0.99], "entropy": [0.1, 1.0, 2.5], "correct": True}
    oracle = {"aime": {"temperatures": [0.1, 0.2], "temperature_row": [0.1, 0.3], "best_temperature": 0.2,
                       "top_ps": [0.5, 1.0], "top_p_row": [0.35, 0.3], "best_top_p": 0.5}}
    written = report.write_reports(results, tmp_path, plot_data={"examples": [example], "oracle": oracle})
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["oracle_grid.png", "results.json", "results.md", "temperature_vs_entropy.png", "traces.png"]
    assert {p.name for p in written} == set(names)
    for name in ("oracle_grid.png", "traces.png", "temperature_vs_entropy.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    assert json.loads((tmp_path / "results.json").read_text())["plots"] == ["traces.png", "temperature_vs_entropy.png",
                                                                            "oracle_grid.png"]
    assert "![oracle_grid](oracle_grid.png)" in (tmp_path / "results.md").read_text()
    assert stat.S_IMODE(os.stat(tmp_path / "results.md").st_mode) & 0o044  # readable by others, not mkstemp's 0600

    # A write that fails half-way leaves the previous file intact and no temporary file behind.
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(ValueError):
        report.write_json_atomic(tmp_path / "results.json", {"bad": float("nan")})
    assert (tmp_path / "results.json").read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == names


def test_rerender_from_results_json(tmp_path, capsys):
    report.write_reports(make_results(), tmp_path)
    (tmp_path / "results.md").unlink()
    # The library part of the old `python -m autodeco.evaluation.report DIR` (its exit status 2 for a missing
    # results.json is the CLI's mapping of this FileNotFoundError).
    assert report.rerender_markdown(tmp_path) == tmp_path / "results.md"
    assert "| AutoDeco |" in (tmp_path / "results.md").read_text()
    with pytest.raises(FileNotFoundError) as error:
        report.rerender_markdown(tmp_path / "nothing")
    assert "run `autodeco eval` first" in str(error.value)
