"""Rejection-sampled training data: only verified, finished, distinct solutions, capped per problem; `autodeco data`.

    .venv/bin/python -m pytest -q tests/test_data_builder.py      # ~10 s
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from autodeco import AutoDecoModelForCausalLM
from autodeco.data import load_examples
from autodeco.evaluation import data_builder
from autodeco.evaluation.benchmarks import build_prompt, load_benchmark
from autodeco.evaluation.data_builder import build_training_data
from autodeco.cli import main as cli_main
from autodeco.evaluation.methods import static_method
from autodeco.evaluation.generation import Completion
from autodeco.evaluation.records import sampling_seed
from autodeco.testing import EOS_ID, save_tiny_base


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("data_builder")
    base = save_tiny_base(root / "base")
    AutoDecoModelForCausalLM.from_base(str(base)).save_pretrained(root / "autodeco")
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "autodeco")
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoDecoModelForCausalLM.from_pretrained(root / "autodeco").eval()
    return root, model, tokenizer


@pytest.fixture
def problems(tmp_path):
    path = tmp_path / "train_problems.jsonl"
    rows = [{"id": "a", "problem": "ID=a. 3+4?", "gt": "7"}, {"id": "b", "problem": "ID=b. 1+1?", "gt": "2"},
            {"id": "c", "problem": "ID=c. 2+2?", "gt": "4"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# (text, ended with EOS) per problem: duplicates up to whitespace, a wrong answer, a correct but truncated one.
SAMPLES = {
    "a": [("x \\boxed{7}", True), ("x  \\boxed{7}\n", True), ("\\boxed{3}", True), ("y \\boxed{7}", True),
          ("z \\boxed{7}", False), ("w \\boxed{7}", True)],
    "b": [("\\boxed{5}", True)] * 6,
    "c": [("so \\boxed{4}", True)] * 6,
}


class Stub:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.calls = []

    def __call__(self, model, tokenizer, requests, *, generation_kwargs, max_new_tokens, batch_size):
        self.calls.append((list(requests), generation_kwargs))
        out = []
        for r in requests:
            pid = re.search(r"ID=(\w+)", r.prompt).group(1)
            assert r.num_samples == 6 and r.seed is not None
            out.append([Completion(text, self.tokenizer(text, add_special_tokens=False)["input_ids"]
                                   + ([EOS_ID] if finished else []), None, None, finished)
                        for text, finished in SAMPLES[pid]])
        return out


def exact_scorer(problem, completions):
    return [re.search(r"\\boxed\{(\w+)\}", c).group(1) == problem.gt for c in completions]


def test_keeps_only_verified_finished_distinct_solutions_capped(tiny, problems, tmp_path, monkeypatch, capsys):
    _, model, tokenizer = tiny
    stub = Stub(tokenizer)
    monkeypatch.setattr(data_builder, "generate_completions", stub)
    monkeypatch.setattr(data_builder, "score_completions", exact_scorer)
    out = tmp_path / "train.jsonl"
    stats = build_training_data(model, tokenizer, [problems], 6, output=out, max_per_problem=2, progress=False)

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    prompts = {p.id: build_prompt(p, tokenizer) for p in load_benchmark(str(problems)).problems}
    # a: "x \boxed{7}" kept, its whitespace twin dropped, the wrong one and the truncated one dropped, capped at 2
    assert [(r["id"], r["completion"]) for r in rows] == [("a", "x \\boxed{7}"), ("a", "y \\boxed{7}"),
                                                          ("c", "so \\boxed{4}")]
    assert all(r["prompt"] == prompts[r["id"]] and r["benchmark"] == "train_problems" for r in rows)
    assert stats["benchmarks"]["train_problems"] == {"problems": 3, "samples": 18, "finished": 17, "correct": 11,
                                                     "usable": 10, "distinct": 4, "kept": 3, "problems_with_data": 2}
    assert "kept 3/18 samples" in capsys.readouterr().out
    kwargs = stub.calls[0][1]
    assert kwargs == {"do_sample": True, "temperature": 1.0, "top_p": 1.0, "top_k": 0}  # the base distribution
    examples, data_stats = load_examples([out], tokenizer)  # the training loader takes the file as is
    assert data_stats.rows_used == 3

    # Another cap only re-filters the stored samples: nothing is generated again.
    stub.calls.clear()
    stats = build_training_data(model, tokenizer, [problems], 6, output=out, progress=False, verbose=False)
    assert stub.calls == [] and stats["total"]["kept"] == 4


def test_real_model_and_cli(tiny, problems, tmp_path, capsys):
    root, _, _ = tiny
    out = tmp_path / "cli.jsonl"
    # A plain base model is accepted (heads are not needed to sample the base distribution).
    assert cli_main(["data", "--model", str(root / "base"), "--problems", str(problems), "--n", "2", "--output", str(out),
                     "--max-new-tokens", "4", "--device", "cpu", "--no-progress"]) == 0
    assert "train_problems: kept 0/6 samples" in capsys.readouterr().out  # a random model solves nothing
    assert out.is_file() and out.read_text() == ""
    samples = [json.loads(line) for line in (tmp_path / "cli.jsonl.samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(len(s["completions"]) == 2 for s in samples)

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem": "x"}) + "\n")
    assert cli_main(["data", "--model", str(root / "base"), "--problems", str(bad), "--output", str(out)]) == 2
    assert re.search(r"bad\.jsonl line 1: missing required field 'gt'", capsys.readouterr().err)
    assert cli_main(["data", "--model", str(root / "base"), "--problems", str(problems), "--output", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_per_problem must be a positive integer"):
        build_training_data(None, None, [problems], output=out, max_per_problem=0)


SPEC = static_method(1.0, 1.0).spec  # the data builder samples the base distribution


def test_packed_sampling_same_rows_fewer_calls_and_resumes(tiny, problems, tmp_path, monkeypatch):
    _, model, tokenizer = tiny
    monkeypatch.setattr(data_builder, "score_completions", exact_scorer)
    kw = dict(max_per_problem=2, batch_size=12, progress=False, verbose=False)  # 12 // n=6: 2 problems per call

    monkeypatch.setattr(data_builder, "generate_completions", Stub(tokenizer))
    build_training_data(model, tokenizer, [problems], 6, output=tmp_path / "plain.jsonl", **kw)
    expected = (tmp_path / "plain.jsonl").read_text()

    class Dies(Stub):
        def __call__(self, *args, **kwargs):
            if len(self.calls) == 1:
                raise KeyboardInterrupt("killed by the test")
            return super().__call__(*args, **kwargs)

    out = tmp_path / "packed.jsonl"
    monkeypatch.setattr(data_builder, "generate_completions", Dies(tokenizer))
    with pytest.raises(KeyboardInterrupt):
        build_training_data(model, tokenizer, [problems], 6, output=out, pack_samples=True, **kw)
    samples = [json.loads(line) for line in (tmp_path / "packed.jsonl.samples.jsonl").read_text().splitlines()]
    seed = sampling_seed(0, SPEC, "train_problems", "a", 0)
    assert [(s["problem_id"], s["sampling_seed"], s["packed_problems"]) for s in samples] == [("a", seed, 2),
                                                                                              ("b", seed, 2)]

    stub = Stub(tokenizer)
    monkeypatch.setattr(data_builder, "generate_completions", stub)
    stats = build_training_data(model, tokenizer, [problems], 6, output=out, pack_samples=True, **kw)
    (requests, _), = stub.calls  # only the pending problem is sampled on the rerun
    assert [re.search(r"ID=(\w+)", r.prompt).group(1) for r in requests] == ["c"]
    assert requests[0].seed == sampling_seed(0, SPEC, "train_problems", "c", 0)
    assert out.read_text() == expected and stats["total"]["kept"] == 3  # the same rows as unpacked sampling

    # One call samples every pending problem, under one seed and group, when batch_size allows.
    stub = Stub(tokenizer)
    monkeypatch.setattr(data_builder, "generate_completions", stub)
    build_training_data(model, tokenizer, [problems], 6, output=tmp_path / "one.jsonl", pack_samples=True,
                        **{**kw, "batch_size": 18})
    (requests, _), = stub.calls
    assert len(requests) == 3 and len({(r.seed, r.group) for r in requests}) == 1 and requests[0].group is not None


def test_packed_real_model_cli(tiny, problems, tmp_path):
    root, _, _ = tiny
    out = tmp_path / "packed.jsonl"
    assert cli_main(["data", "--model", str(root / "base"), "--problems", str(problems), "--n", "2", "--output", str(out),
                     "--max-new-tokens", "4", "--batch-size", "4", "--device", "cpu", "--no-progress",
                     "--pack-samples"]) == 0
    samples = [json.loads(line) for line in (tmp_path / "packed.jsonl.samples.jsonl").read_text().splitlines()]
    assert [s["packed_problems"] for s in samples] == [2, 2, 1] and all(len(s["completions"]) == 2 for s in samples)
