"""Engines in evaluation and data building, without vLLM: `--engine` / `--vllm-arg` on the command line, and an
Engine other than transformers through run_evaluation and build_training_data (same records, other keys).

The fake engine wraps the transformers engine and declares `sequences_per_call`, so the runner and the data
builder hand it many work items per call; transformers seeds every request on its own, so its completions must
equal the default path's exactly: a unit mapped to another unit's completions fails the comparison.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_eval_engines.py      # ~10 s
"""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
from transformers import AutoTokenizer

from autodeco import AutoDecoModelForCausalLM
from autodeco.cli import main
from autodeco.cli.args import typed_key_value
from autodeco.evaluation import data_builder, records, runner
from autodeco.evaluation.benchmarks import load_benchmark
from autodeco.evaluation.data_builder import build_training_data
from autodeco.evaluation.generation import TransformersEngine
from autodeco.evaluation.methods import parse_methods
from autodeco.evaluation.records import RECORD_FORMAT, RecordStore, eval_settings_hash, model_fingerprint
from autodeco.evaluation.runner import run_evaluation
from autodeco.testing import save_tiny_base

METHODS = "greedy,default,autodeco,static:0.7,0.9"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("engines")
    base = save_tiny_base(root / "base")
    model = AutoDecoModelForCausalLM.from_base(str(base))
    with torch.no_grad():  # random last layers: T and P vary per token, so the T/P sums compare something
        generator = torch.Generator().manual_seed(0)
        for head in (model.temperature_head, model.top_p_head):
            head.mlp[-1].weight.copy_(torch.randn(head.mlp[-1].weight.shape, generator=generator) * 0.5)
    model.save_pretrained(root / "autodeco")
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "autodeco")
    model = AutoDecoModelForCausalLM.from_pretrained(root / "autodeco").eval()
    return root, model, AutoTokenizer.from_pretrained(root / "autodeco")


@pytest.fixture
def bench(tmp_path):
    path = tmp_path / "b1.jsonl"
    rows = [{"id": f"p{i}", "problem": f"ID=p{i}. What is {i}+1?", "gt": str(i + 1)} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def digit_scorer(problem, completions):
    """Stands in for math-verify (a worker pool): correct when the gold digit occurs in the text."""
    return [problem.gt in c for c in completions]


class FakeEngine:
    """Another engine: transformers underneath, its own name, many work items per call."""

    name = "fake"
    sequences_per_call = 64

    def __init__(self, model, tokenizer):
        self.inner = TransformersEngine(model, tokenizer)
        self.calls = []

    def generate(self, requests, *, method, max_new_tokens, batch_size):
        self.calls.append((method.spec, len(requests)))
        return self.inner.generate(requests, method=method, max_new_tokens=max_new_tokens, batch_size=batch_size)


VOLATILE = {"key", "settings", "seconds", "rank"}


def _records(out_dir):
    return sorted(RecordStore(out_dir).read(keep_completions=True).values(),
                  key=lambda r: (r["method"], r["problem_id"], r["seed"]))


# ------------------------------------------------------------------------------------------------ library


def test_another_engine_gives_the_same_records_under_its_own_keys(tiny, bench, tmp_path, monkeypatch):
    _, model, tokenizer = tiny
    monkeypatch.setattr(runner, "score_completions", digit_scorer)
    benchmarks = [load_benchmark(str(bench))]
    kwargs = dict(n=2, seeds=2, ks=(1, 2), max_new_tokens=6, batch_size=4, plots=False, progress=False)
    hf = run_evaluation(model, tokenizer, benchmarks, METHODS, output_dir=tmp_path / "hf", **kwargs)
    engine = FakeEngine(model, tokenizer)
    fake = run_evaluation(model, tokenizer, benchmarks, METHODS, output_dir=tmp_path / "fake", engine=engine,
                          **kwargs)

    ours, theirs = _records(tmp_path / "fake"), _records(tmp_path / "hf")
    assert len(ours) == len(theirs) == 3 + 3 * 3 * 2  # greedy once per problem; 3 sampled methods x 3 x 2 seeds
    assert [set(r) for r in ours] == [set(r) for r in theirs]  # the same schema
    strip = [lambda r: {k: v for k, v in r.items() if k not in VOLATILE}][0]
    assert [strip(r) for r in ours] == [strip(r) for r in theirs]  # same seeds, completions, T/P sums
    assert not {r["key"] for r in ours} & {r["key"] for r in theirs}  # the engine is part of the key
    # Many work items per call: one call per method (12 sequences fit 64), where hf needs one per item.
    assert sorted(engine.calls) == sorted([("greedy", 3), ("default", 6), ("autodeco", 6), ("static:0.7,0.9", 6)])
    assert fake["methods"] == hf["methods"]
    assert fake["settings"]["engine"] == "fake" and hf["settings"]["engine"] == "hf"
    for method in hf["methods"]:
        a, b = fake["results"][method]["b1"], hf["results"][method]["b1"]
        assert a["pass@1"] == b["pass@1"] and a["mean_temperature"] == b["mean_temperature"]
    assert "engine fake" in (tmp_path / "fake" / "results.md").read_text()

    # Resumable: a rerun with the same engine generates nothing.
    engine.calls.clear()
    run_evaluation(model, tokenizer, benchmarks, METHODS, output_dir=tmp_path / "fake", engine=engine, **kwargs)
    assert engine.calls == []


def test_hf_keys_are_those_of_records_written_before_engines(tiny):
    _, model, _ = tiny
    before = records._sha({"format": RECORD_FORMAT, "max_new_tokens": 8, "template": None, "seed": 0,
                           "model": model_fingerprint(model)})[:16]
    now = eval_settings_hash(model, max_new_tokens=8, template=None, seed=0, pack_samples=False, batch_size=4)
    assert now == before == eval_settings_hash(model, max_new_tokens=8, template=None, seed=0, pack_samples=False,
                                               batch_size=4, engine="hf")
    assert eval_settings_hash(model, max_new_tokens=8, template=None, seed=0, pack_samples=False, batch_size=4,
                              engine="vllm") != before


def test_data_builder_through_an_engine_writes_the_same_rows(tiny, bench, tmp_path, monkeypatch):
    _, model, tokenizer = tiny
    monkeypatch.setattr(data_builder, "score_completions", digit_scorer)
    kwargs = dict(n=3, max_new_tokens=6, batch_size=4, progress=False, verbose=False)
    hf = build_training_data(model, tokenizer, [bench], output=tmp_path / "hf" / "train.jsonl", **kwargs)
    engine = FakeEngine(model, tokenizer)
    fake = build_training_data(model, tokenizer, [bench], output=tmp_path / "fake" / "train.jsonl", engine=engine,
                               **kwargs)
    assert engine.calls == [("static:1,1", 3)]  # the three problems in one call
    assert fake["total"] == hf["total"]
    assert (tmp_path / "fake" / "train.jsonl").read_text() == (tmp_path / "hf" / "train.jsonl").read_text()
    ours = RecordStore(tmp_path / "fake", name="train.jsonl.samples.jsonl").read(keep_completions=True)
    theirs = RecordStore(tmp_path / "hf", name="train.jsonl.samples.jsonl").read(keep_completions=True)
    assert [set(r) for r in ours.values()] == [set(r) for r in theirs.values()]
    assert sorted(r["completions"] for r in ours.values()) == sorted(r["completions"] for r in theirs.values())
    assert not set(ours) & set(theirs)
    engine.calls.clear()
    build_training_data(model, tokenizer, [bench], output=tmp_path / "fake" / "train.jsonl", engine=engine, **kwargs)
    assert engine.calls == []  # resumed from the samples file


# ------------------------------------------------------------------------------------------------ command line


def test_vllm_arg_values_are_typed():
    assert typed_key_value("tensor_parallel_size=8") == ("tensor_parallel_size", 8)
    assert typed_key_value("gpu-memory-utilization=0.9") == ("gpu_memory_utilization", 0.9)
    assert typed_key_value("enforce_eager=true") == ("enforce_eager", True)
    assert typed_key_value("dtype=bfloat16") == ("dtype", "bfloat16")
    assert typed_key_value("tokenizer=a=b") == ("tokenizer", "a=b")


@pytest.mark.parametrize("bad", ["tensor_parallel_size", "=8", "not a key=1"])
def test_malformed_vllm_arg_is_one_line_naming_it(bad, tiny, bench, tmp_path, capsys):
    root, _, _ = tiny
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--engine", "vllm", "--model", str(root / "autodeco"), "--benchmarks", str(bench),
              "--output-dir", str(tmp_path / "o"), "--vllm-arg", bad])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--vllm-arg" in err and f"'{bad}'" in err and "KEY=VALUE" in err


@pytest.mark.parametrize("command", ["eval", "data", "train"])
def test_engine_vllm_without_vllm_says_how_to_install(command, tiny, bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "vllm", None)  # absent, even where vLLM is installed (find_spec -> None)
    root, _, _ = tiny
    if command == "eval":
        argv = ["eval", "--benchmarks", str(bench), "--output-dir", str(tmp_path / "o")]
    elif command == "train":
        argv = ["train", "--objective", "reward", "--data", str(bench), "--output-dir", str(tmp_path / "o")]
    else:
        argv = ["data", "--problems", str(bench), "--output", str(tmp_path / "o" / "train.jsonl")]
    assert main([*argv, "--engine", "vllm", "--model", str(root / "autodeco"), "--vllm-arg", "max_model_len=64"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and 'pip install "autodeco[vllm]"' in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before anything was loaded or written


def test_vllm_arg_needs_engine_vllm_and_edt_needs_hf(tiny, bench, tmp_path, capsys):
    root, _, _ = tiny
    argv = ["eval", "--model", str(root / "autodeco"), "--benchmarks", str(bench), "--output-dir", str(tmp_path / "o")]
    assert main([*argv, "--vllm-arg", "tensor_parallel_size=2"]) == 2
    assert "only with --engine vllm" in capsys.readouterr().err
    assert main([*argv, "--engine", "vllm", "--methods", "greedy,edt"]) == 2
    assert re.search(r"edt.*--engine hf", capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_train_engine_vllm_needs_the_reward_objective_and_an_autodeco_model(tiny, bench, tmp_path, monkeypatch,
                                                                            capsys):
    monkeypatch.setattr("autodeco.cli.args.check_llm_kwargs", lambda kwargs: None)  # as if vLLM were installed
    monkeypatch.setattr("autodeco.vllm.engine.require_vllm", lambda: None)
    root, _, _ = tiny
    argv = ["train", "--data", str(bench), "--output-dir", str(tmp_path / "o"), "--engine", "vllm"]
    assert main([*argv, "--model", str(root / "autodeco")]) == 2
    assert "only --objective reward samples" in capsys.readouterr().err
    assert main([*argv, "--objective", "reward", "--model", str(root / "base")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not an AutoDeco directory" in err and "--engine hf" in err
    assert main(["train", "--objective", "reward", "--model", str(root / "autodeco"), "--data", str(bench),
                 "--output-dir", str(tmp_path / "o"), "--vllm-arg", "max_model_len=64"]) == 2
    assert "only with --engine vllm" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_engine_flag_defaults_to_hf(tiny, bench, tmp_path, monkeypatch):
    root, _, _ = tiny
    monkeypatch.setattr(runner, "score_completions", digit_scorer)
    out = tmp_path / "o"
    assert main(["eval", "--model", str(root / "autodeco"), "--benchmarks", str(bench), "--output-dir", str(out),
                 "--methods", "greedy", "--n", "1", "--seeds", "1", "--max-new-tokens", "4", "--no-plots",
                 "--no-progress", "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["engine"] == "hf" and results["methods"] == [m.spec for m in parse_methods("greedy")]
