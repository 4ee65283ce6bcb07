"""The headroom probe (autodeco/demo/probe.py): which tokens the hand schedule treats as choices, and that the probe
measures, writes and resumes."""

from __future__ import annotations

import json

import pytest
import torch

from autodeco.demo import probe as probe_module
from autodeco.demo import tasks
from autodeco.demo.base import load_base, render_prompt
from autodeco.demo.probe import TokenKindSchedule, run_probe
from autodeco.evaluation.benchmarks import Benchmark, Problem
from autodeco.sampling import dynamic_logits


@pytest.fixture(scope="module")
def base():
    return load_base()


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


@pytest.mark.parametrize("completion, choice", [
    ("", True),                          # a pairs solution starts with a choice
    ("23 + 4", True),                    # inside the two numbers
    ("23 + 41 = ", False),               # the sum is arithmetic
    ("23 + 41 = 64 no\n", True),         # the next line's first number
    ("23 + 41 = 64 no\n23 + 35 = 58 yes\n\\boxed{2", False),  # copying the answer
])
def test_the_hand_schedule_samples_choices_hot_and_everything_else_cold(base, completion, choice):
    _, tokenizer = base
    schedule = TokenKindSchedule(tokenizer, choice_t=2.0, precise_t=0.3, choice_p=0.7)
    pairs = _ids(tokenizer, render_prompt("Find two of 23 41 17 35 that add up to 58.") + completion)
    arith = _ids(tokenizer, render_prompt("Start at 37, then + 8, - 5, + 9, - 3.") + completion)
    width = max(len(pairs), len(arith))
    rows = torch.tensor([[0] * (width - len(pairs)) + pairs, [0] * (width - len(arith)) + arith])
    assert schedule.temperatures(rows).tolist() == pytest.approx([2.0 if choice else 0.3, 0.3])
    assert schedule.top_ps(rows).tolist() == pytest.approx([0.7 if choice else 1.0, 1.0])
    # AutoDeco's distribution with those T and P: at a choice the nucleus of mass 0.7 keeps the two live tokens.
    scores = torch.tensor([[4.0, 3.5, 0.0, 0.0, 0.0]] * 2)
    expected = dynamic_logits(scores, schedule.temperatures(rows), schedule.top_ps(rows))
    assert torch.equal(schedule(rows, scores), expected)
    assert torch.isfinite(expected[0]).sum() == (2 if choice else 5)


def _benchmark(count: int) -> Benchmark:
    rows = [p.as_benchmark_row() for p in tasks.generate_problems("test", count, seed=0)]
    return Benchmark("demo", "exact", [Problem(r["id"], r["problem"], r["gt"], "demo", "exact") for r in rows])


def test_the_probe_measures_every_setting_writes_them_and_resumes(base, tmp_path, monkeypatch):
    model, tokenizer = base
    output = tmp_path / "probe.json"
    kwargs = dict(output=output, n=2, seeds=2, max_new_tokens=48, batch_size=16, template="{problem}",
                  grid=(0.1, 1.0))
    result = run_probe(model, tokenizer, _benchmark(4), **kwargs)
    assert set(result["static"]) == {"0.1", "1"} and result["hand"] is not None
    for row in [*result["static"].values(), result["hand"]]:
        assert 0 <= row["pass1"] <= 100 and set(row["families"]) == {"arith", "pairs"}
    best = max(result["static"], key=lambda t: result["static"][t]["pass1"])
    assert result["best_static_t"] == float(best)
    assert result["headroom"] == pytest.approx(result["hand"]["pass1"] - result["static"][best]["pass1"])
    assert json.loads(output.read_text()) == result

    def no_sampling(*args, **kwargs):
        raise AssertionError("a finished setting was sampled again")

    monkeypatch.setattr(probe_module, "generate_completions", no_sampling)
    assert run_probe(model, tokenizer, _benchmark(4), **kwargs) == result  # resumed whole from probe.json
    with pytest.raises(AssertionError, match="sampled again"):  # other settings are not mistaken for done ones
        run_probe(model, tokenizer, _benchmark(4), **{**kwargs, "n": 1})
