"""`autodeco demo --quick` end to end (about 2 minutes on 2 CPU cores), and the bundled base model."""

from __future__ import annotations

import json

import pytest

from autodeco.demo.base import BASE_MODEL_DIR, load_base


def test_the_bundled_base_model_loads_and_is_small():
    model, tokenizer = load_base()
    assert model.config.model_type == "llama"
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert (BASE_MODEL_DIR / "model.safetensors").stat().st_size < 8 * 2**20
    assert tokenizer.chat_template and tokenizer.eos_token == "<|end|>"
    info = json.loads((BASE_MODEL_DIR / "training_info.json").read_text())
    assert info["config"]["seed"] == 0 and info["parameters"] == sum(p.numel() for p in model.parameters())


def test_load_base_names_the_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="--retrain-base"):
        load_base(tmp_path / "nowhere")


def test_quick_demo_end_to_end(tmp_path, capsys):
    from autodeco.cli import main

    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| AutoDeco (likelihood heads) |" in printed and "| AutoDeco (reward heads) |" in printed
    assert f"Report: {out / 'report.md'}" in printed
    summary = json.loads((out / "summary.json").read_text())
    for spec in ("greedy", "default", "oracle", "meanshift", "autodeco", "autodeco-temperature-only",
                 "autodeco-top-p-only", "min_p:0.1", "edt"):
        cell = summary["pass@1"][spec]
        assert 0.0 <= cell["mean"] <= 1.0
    assert set(summary["families"]["autodeco"]) == {"arith", "pairs"}
    assert set(summary["reward_heads_pass@1"]) == {"meanshift", "autodeco"}
    assert set(summary["reward_families"]["autodeco"]) == {"arith", "pairs"}
    probe = summary["probe"]
    assert probe["hand"]["pass1"] - probe["static"][f"{probe['best_static_t']:g}"]["pass1"] == probe["headroom"]
    for name in ("report.md", "decomposition.json", "eval/results.md", "eval/traces.png", "eval/oracle_grid.png",
                 "control/results.md", "control/control_trace.png", "heads/autodeco_heads.safetensors",
                 "heads-control/autodeco_heads.safetensors", "heads-reward/autodeco_heads.safetensors",
                 "eval-reward-heads/results.json", "decomposition-reward.json", "probe.json", "data/train.jsonl"):
        assert (out / name).is_file(), name
    report = (out / "report.md").read_text()
    assert "test-set oracle" in report and "MeanShift" in report and "held-out" in report
    assert "Headroom probe" in report and "reward heads" in report
    # No test problem was trained on: the training data's prompts are all train-split problems.
    test_prompts = {json.loads(line)["problem"] for line in (out / "data" / "demo_test.jsonl").open()}
    for line in (out / "data" / "train.jsonl").open():
        assert not any(p in json.loads(line)["prompt"] for p in test_prompts)
    # A rerun resumes: every step's output is reused, nothing is recomputed.
    kept = ["heads/autodeco_heads.safetensors", "heads-reward/autodeco_heads.safetensors", "eval/records.jsonl",
            "eval-reward-heads/records.jsonl", "probe.json"]
    before = {name: (out / name).read_bytes() for name in kept}
    mtimes = {name: (out / name).stat().st_mtime_ns for name in kept if name.endswith(".safetensors")}
    assert main(["demo", "--quick", "--output-dir", str(out)]) == 0
    assert {name: (out / name).read_bytes() for name in kept} == before
    assert {name: (out / name).stat().st_mtime_ns for name in mtimes} == mtimes


def test_retraining_the_base_is_seeded_and_rebuilds_the_bundled_tokenizer(tmp_path):
    from safetensors.torch import load_file

    from autodeco.demo.base import BaseTrainingConfig, train_base

    config = BaseTrainingConfig(steps=3, batch_size=8)
    first = train_base(tmp_path / "a", config, progress=False)
    train_base(tmp_path / "b", config, progress=False)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert first["history"][-1]["step"] == 2
    # The tokenizer depends only on the seed and the corpus settings, so it is the bundled one.
    bundled = json.loads((BASE_MODEL_DIR / "tokenizer.json").read_text())["model"]["vocab"]
    assert json.loads((tmp_path / "a" / "tokenizer.json").read_text())["model"]["vocab"] == bundled
    other = train_base(tmp_path / "c", BaseTrainingConfig(steps=3, batch_size=8, seed=1), progress=False)
    c = load_file(tmp_path / "c" / "model.safetensors")
    assert other["config"]["seed"] == 1 and not all((a[k] == c[k]).all() for k in a if k in c)


def test_demo_flags_are_checked(tmp_path):
    from autodeco.cli import main

    assert main(["demo", "--quick", "--retrain-base", "--base-model", str(tmp_path), "--output-dir",
                 str(tmp_path / "x")]) == 2
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--quick", "--output-dir", str(tmp_path / "file")]) == 2


def test_control_verdict_needs_both_consistencies_and_the_size_of_the_change():
    from autodeco.demo.report import control_verdicts

    def cell(delta, consistency):
        return {"delta_temperature": delta, "consistency_temperature": consistency, "delta_top_p": 0.0,
                "consistency_top_p": 0.5}

    def verdict(low, high):
        held_out = {"low": cell(0.0, 0.0), "high": cell(0.0, 0.0)}
        lines = control_verdicts({"seen": {"low": cell(*low), "high": cell(*high)}, "held_out": held_out})
        assert len(lines) == 2 and "met" not in lines[1] and "missed" not in lines[1]  # held out: reported only
        return lines[0].rsplit(": ", 1)[1]

    assert verdict((-0.1, 0.95), (0.1, 0.90)) == "met."  # the goal's bounds are inclusive
    assert verdict((-0.1, 0.94), (0.1, 0.90)) == "missed."
    assert verdict((-0.1, 0.95), (0.1, 0.89)) == "missed."
    assert verdict((-0.09, 1.0), (0.2, 1.0)) == "missed."  # |ΔT| too small
    assert verdict((-0.2, 1.0), (0.09, 1.0)) == "missed."
