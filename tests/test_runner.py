"""The evaluation runner and `autodeco eval`: exact metrics, resume, torn lines, oracle, meanshift, processes, CLI.

Most tests replace `runner.generate_completions` with a stub that returns completions from a table, so every metric
can be checked against hand-computed values; a few run the real tiny model end to end.

    .venv/bin/python -m pytest -q tests/test_runner.py      # ~50 s on 2 busy cores, 30 s of it the 2-process run
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from autodeco import AutoDecoModelForCausalLM
from autodeco.evaluation import runner
from autodeco.evaluation.benchmarks import load_benchmark
from autodeco.cli import main as eval_main
from autodeco.cli.eval import add_eval_parser
from autodeco.evaluation.methods import ORACLE_TEMPERATURES, parse_methods, static_method
from autodeco.evaluation.runner import Completion, RecordStore, run_evaluation, sampling_seed
from autodeco.evaluation.answers import extract_answer
from autodeco.testing import EOS_ID, save_tiny_base

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny AutoDeco directory whose temperature head varies from token to token (so traces are not flat)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("runner")
    base = save_tiny_base(root / "base")
    model = AutoDecoModelForCausalLM.from_base(str(base))
    with torch.no_grad():  # fresh heads predict T = 1 everywhere; random last layers make T depend on the token
        generator = torch.Generator().manual_seed(0)
        for head in (model.temperature_head, model.top_p_head):
            last = head.mlp[-1] if hasattr(head, "mlp") else None
            if last is not None and hasattr(last, "weight"):
                last.weight.copy_(torch.randn(last.weight.shape, generator=generator) * 0.5)
    model.save_pretrained(root / "autodeco")
    AutoTokenizer.from_pretrained(base).save_pretrained(root / "autodeco")
    model = AutoDecoModelForCausalLM.from_pretrained(root / "autodeco").eval()
    tokenizer = AutoTokenizer.from_pretrained(root / "autodeco")
    return root, model, tokenizer


def write_benchmark(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def b1(tmp_path):
    return write_benchmark(tmp_path / "b1.jsonl", [{"id": "p0", "problem": "ID=p0. What is 3+4?", "gt": "7"},
                                                   {"id": "p1", "problem": "ID=p1. What is 1+1?", "gt": "2"}])


@pytest.fixture
def b2(tmp_path):
    return write_benchmark(tmp_path / "b2.jsonl", [{"id": "q0", "problem": "ID=q0. What is 2*3?", "gt": "6"}])


def exact_scorer(problem, completions):
    """Stands in for math-verify: the extracted answer must equal the gt."""
    return [extract_answer(c, problem.kind) == problem.gt for c in completions]


class Stub:
    """Stands in for runner.generate_completions.

    `answers(spec, problem_id, seed_index, kwargs, num_samples) -> list of answer strings (None: no answer)`; the
    work item behind a request is found from its seed (sampling_seed over `specs`). Every call is logged.
    """

    def __init__(self, tokenizer, answers, specs, benchmarks, seeds=8, fail_after=None, temperatures=None):
        self.tokenizer = tokenizer
        self.answers = answers
        self.calls: list[dict] = []
        self.fail_after = fail_after
        self.temperatures = temperatures  # kwargs -> (T list, P list) per completion
        self.by_seed = {}
        for spec in specs:
            for bench, ids in benchmarks.items():
                for pid in ids:
                    for s in range(seeds):
                        self.by_seed[sampling_seed(0, spec, bench, pid, s)] = (spec, pid, s)

    def __call__(self, model, tokenizer, requests, *, generation_kwargs, max_new_tokens, batch_size):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed by the test")
        self.calls.append({"requests": list(requests), "kwargs": generation_kwargs})
        out = []
        for r in requests:
            pid = re.search(r"ID=(\w+)", r.prompt).group(1)
            spec, _, s = self.by_seed.get(r.seed, ("greedy", pid, None))
            texts = ["no answer here" if a is None else f"so \\boxed{{{a}}}"
                     for a in self.answers(spec, pid, s, generation_kwargs, r.num_samples)]
            completions = []
            for text in texts:
                ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [EOS_ID]
                if self.temperatures is not None:
                    t, p = self.temperatures(generation_kwargs, len(ids))
                else:
                    t = [generation_kwargs.get("temperature", 1.0)] * len(ids)
                    p = [generation_kwargs.get("top_p", 1.0)] * len(ids)
                completions.append(Completion(text, ids, t, p, True))
            out.append(completions)
        return out


def strip_timing(results: dict) -> dict:
    """results.json without wall-clock fields, for comparing runs."""
    text = json.dumps(results, sort_keys=True)
    return json.loads(re.sub(r'"(search_)?seconds": [0-9.e+-]+', '"seconds": 0', text))


# ------------------------------------------------------------------------------------------------ exact metrics

TABLE = {  # (problem, seed) -> answers of its n=4 samples
    ("p0", 0): ["7", "7", "3", "7"], ("p0", 1): ["3", "3", None, "7"],
    ("p1", 0): ["2", "5", "5", "5"], ("p1", 1): ["5", "5", "5", "5"],
}


def table_answers(spec, pid, s, kwargs, n):
    if spec == "greedy":
        return {"p0": ["7"], "p1": ["3"]}[pid]
    return TABLE[(pid, s)]


def test_metrics_match_hand_computed_values(tiny, b1, tmp_path, monkeypatch):
    _, model, tokenizer = tiny
    stub = Stub(tokenizer, table_answers, ["default"], {"b1": ["p0", "p1"]})
    monkeypatch.setattr(runner, "generate_completions", stub)
    monkeypatch.setattr(runner, "score_completions", exact_scorer)
    results = run_evaluation(model, tokenizer, [load_benchmark(str(b1))], parse_methods("greedy,default"), n=4, seeds=2,
                             ks=(1, 2, 8), output_dir=tmp_path / "out", plots=False, progress=False)

    cell = results["results"]["default"]["b1"]
    # per seed: seed 0 = mean(3/4, 1/4) = 0.5, seed 1 = mean(1/4, 0) = 0.125
    assert cell["pass@1"]["per_seed"] == [0.5, 0.125]
    assert cell["pass@1"]["mean"] == pytest.approx(0.3125)
    assert cell["pass@1"]["std"] == pytest.approx(0.375 / math.sqrt(2))
    # pass@2 over N = 8 samples: p0 (c=4) 1 - C(4,2)/C(8,2) = 22/28; p1 (c=1) 1 - C(7,2)/C(8,2) = 7/28
    assert cell["pass@k"]["2"] == pytest.approx((22 / 28 + 7 / 28) / 2)
    assert cell["pass@k"]["1"] == pytest.approx(0.3125) and cell["pass@k"]["8"] == 1.0
    # maj@2: p0 [7, 7] right; p1 [2, 5] tie -> first to the top count (2) right. maj@8: p0 7 (4 votes) right, p1 5 wrong
    assert cell["maj@k"] == {"1": 1.0, "2": 1.0, "8": 0.5}
    assert cell["mean_temperature"] == 1.0 and cell["mean_top_p"] == 1.0
    assert cell["completions"] == 16 and cell["label"] == "default (T=1 P=1)"

    greedy = results["results"]["greedy"]["b1"]
    assert greedy["pass@1"] == {"mean": 0.5, "std": 0.0, "per_seed": [0.5, 0.5]}
    assert greedy["pass@k"] == {"1": 0.5, "2": 0.5, "8": 0.5} and greedy["maj@k"]["8"] == 0.5
    assert greedy["completions"] == 2  # decoded once per problem
    greedy_calls = [c for c in stub.calls if c["kwargs"].get("do_sample") is False]
    assert len(greedy_calls) == 1 and [r.num_samples for r in greedy_calls[0]["requests"]] == [1, 1]
    assert all(r.seed is None for r in greedy_calls[0]["requests"])
    # the average column of a single benchmark is that benchmark
    assert results["results"]["default"]["average"]["pass@1"]["mean"] == pytest.approx(0.3125)

    lines = (tmp_path / "out" / "records.jsonl").read_text().splitlines()
    assert len(lines) == 2 + 4  # greedy: one record per problem (one unit, one line each); default: 2 x 2
    record = json.loads(lines[-1])
    for field in ("completions", "correct", "answers", "tokens", "mean_temperature", "mean_top_p", "seconds"):
        assert field in record


def test_k_larger_than_samples_is_refused_before_any_work(tiny, b1, tmp_path, monkeypatch):
    _, model, tokenizer = tiny
    monkeypatch.setattr(runner, "generate_completions", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(ValueError, match=r"k=9 needs at least 9 samples.*n=4 x seeds=2 gives 8"):
        run_evaluation(model, tokenizer, [load_benchmark(str(b1))], parse_methods("default"), n=4, seeds=2, ks=(1, 9),
                       output_dir=tmp_path / "out", progress=False)


# ------------------------------------------------------------------------------------------------ resume


def run_table(model, tokenizer, b1, out, **kw):
    return run_evaluation(model, tokenizer, [load_benchmark(str(b1))], parse_methods("greedy,default"), n=4, seeds=2,
                          ks=(1, 8), output_dir=out, plots=False, progress=False, **kw)


def test_killed_run_resumes_with_only_the_remaining_work(tiny, b1, tmp_path, monkeypatch):
    _, model, tokenizer = tiny
    monkeypatch.setattr(runner, "score_completions", exact_scorer)
    make = lambda **kw: Stub(tokenizer, table_answers, ["default"], {"b1": ["p0", "p1"]}, **kw)

    monkeypatch.setattr(runner, "generate_completions", make())
    reference = run_table(model, tokenizer, b1, tmp_path / "full")

    killed = make(fail_after=3)
    monkeypatch.setattr(runner, "generate_completions", killed)
    with pytest.raises(KeyboardInterrupt):
        run_table(model, tokenizer, b1, tmp_path / "resumed")
    assert len((tmp_path / "resumed" / "records.jsonl").read_text().splitlines()) == 2 + 2  # greedy unit + 2 items
    assert not (tmp_path / "resumed" / "results.json").exists()

    resumed = make()
    monkeypatch.setattr(runner, "generate_completions", resumed)
    results = run_table(model, tokenizer, b1, tmp_path / "resumed")
    assert len(resumed.calls) == 5 - 3  # 1 greedy unit + 4 sampled items in all, 3 done before the kill
    assert strip_timing(results) == strip_timing(reference)

    again = make()
    monkeypatch.setattr(runner, "generate_completions", again)
    run_table(model, tokenizer, b1, tmp_path / "resumed")
    assert again.calls == []  # everything finished: nothing is redone


def test_torn_last_line_is_cut_and_its_item_redone(tiny, b1, tmp_path, monkeypatch):
    _, model, tokenizer = tiny
    monkeypatch.setattr(runner, "score_completions", exact_scorer)
    make = lambda: Stub(tokenizer, table_answers, ["default"], {"b1": ["p0", "p1"]})
    monkeypatch.setattr(runner, "generate_completions", make())
    reference = run_table(model, tokenizer, b1, tmp_path / "out")

    path = tmp_path / "out" / "records.jsonl"
    text = path.read_text()
    last_start = text.rstrip("\n").rfind("\n") + 1
    path.write_text(text[: last_start + (len(text) - last_start) // 2])  # a kill in the middle of the last write

    stub = make()
    monkeypatch.setattr(runner, "generate_completions", stub)
    with pytest.warns(UserWarning, match="torn last line"):
        results = run_table(model, tokenizer, b1, tmp_path / "out")
    assert len(stub.calls) == 1
    lines = path.read_text().splitlines()
    assert len(lines) == 6 and all(json.loads(line) for line in lines)
    assert strip_timing(results) == strip_timing(reference)


def test_real_model_resume_reproduces_the_uninterrupted_samples(tiny, b1, tmp_path, monkeypatch):
    _, model, tokenizer = tiny
    monkeypatch.setattr(runner, "score_completions", exact_scorer)
    kw = dict(n=3, seeds=2, ks=(1,), max_new_tokens=6, batch_size=2, plots=False, progress=False)  # n > batch: 2 calls
    methods = parse_methods("autodeco")
    run_evaluation(model, tokenizer, [load_benchmark(str(b1))], methods, output_dir=tmp_path / "a", **kw)

    real, calls = runner.generate_completions, []

    def dies_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(runner, "generate_completions", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_evaluation(model, tokenizer, [load_benchmark(str(b1))], methods, output_dir=tmp_path / "b", **kw)
    monkeypatch.setattr(runner, "generate_completions", real)
    run_evaluation(model, tokenizer, [load_benchmark(str(b1))], methods, output_dir=tmp_path / "b", **kw)

    read = lambda d: {k: (r["completions"], r["tokens"], r["temperature_sum"])
                      for k, r in RecordStore(d).read(keep_completions=True).items()}
    a, b = read(tmp_path / "a"), read(tmp_path / "b")
    assert len(a) == 4 and a == b


# ------------------------------------------------------------------------------------------------ oracle


def oracle_fraction(bench, t, p):
    """Share of correct samples at static (T, P): b1 peaks at T=0.7 then P=0.8; b2 at T=0.3 (tied with 0.2) then P=0.5."""
    if bench == "b1":
        if p == 1.0:
            return {0.7: 0.5, 0.6: 0.25}.get(t, 0.0)
        return {0.8: 1.0, 0.3: 0.5}.get(p, 0.0) if t == 0.7 else 0.0
    if p == 1.0:
        return {0.3: 0.5, 0.2: 0.5}.get(t, 0.0)
    return {0.5: 1.0}.get(p, 0.0) if t == 0.3 else 0.0


def test_oracle_picks_the_best_t_then_p_per_benchmark(tiny, b1, b2, tmp_path, monkeypatch):
    _, model, tokenizer = tiny
    gts = {"p0": "7", "p1": "2", "q0": "6"}

    def answers(spec, pid, s, kwargs, n):
        bench = "b2" if pid.startswith("q") else "b1"
        right = round(n * oracle_fraction(bench, kwargs["temperature"], kwargs["top_p"]))
        return [gts[pid]] * right + ["0"] * (n - right)

    stub = Stub(tokenizer, answers, [], {})
    monkeypatch.setattr(runner, "generate_completions", stub)
    monkeypatch.setattr(runner, "score_completions", exact_scorer)
    results = run_evaluation(model, tokenizer, [load_benchmark(str(b1)), load_benchmark(str(b2))],
                             parse_methods("oracle"), n=4, seeds=2, ks=(1,), oracle_n=2, oracle_seeds=1,
                             output_dir=tmp_path / "out", progress=False)

    assert (results["oracle"]["b1"]["temperature"], results["oracle"]["b1"]["top_p"]) == (0.7, 0.8)
    assert (results["oracle"]["b2"]["temperature"], results["oracle"]["b2"]["top_p"]) == (0.3, 0.5)  # tie -> larger T
    assert results["oracle"]["b1"]["temperature_row"]["0.7"] == 0.5
    assert results["oracle"]["b1"]["top_p_row"]["0.8"] == 1.0
    cell = results["results"]["oracle"]["b1"]
    assert cell["label"] == "test-set oracle (T=0.7, P=0.8)" and cell["spec"] == "static:0.7,0.8"
    assert cell["n"] == 4 and cell["seeds"] == 2 and cell["pass@1"]["mean"] == 1.0  # rerun at the full n x seeds
    assert results["results"]["oracle"]["b2"]["label"] == "test-set oracle (T=0.3, P=0.5)"

    grid_b1 = {(c["kwargs"]["temperature"], c["kwargs"]["top_p"], c["requests"][0].num_samples) for c in stub.calls
               if "ID=p" in c["requests"][0].prompt}
    assert {(t, 1.0, 2) for t in ORACLE_TEMPERATURES} <= grid_b1
    assert len(grid_b1) == 10 + 9 + 1  # T row, P row (P=1 shared with the T row), chosen (T, P) at n=4
    assert (0.7, 0.8, 4) in grid_b1
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| test-set oracle |" in md and "b1: T=0.7, P=0.8; b2: T=0.3, P=0.5" in md
    assert (tmp_path / "out" / "oracle_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------------ meanshift


def test_meanshift_from_autodeco_records(tiny, b1, tmp_path, monkeypatch):
    _, model, tokenizer = tiny

    def temperatures(kwargs, length):
        if not kwargs:  # AutoDeco: T alternates 0.4, 0.8 along the completion, P 0.9
            return [0.4 if i % 2 == 0 else 0.8 for i in range(length)], [0.9] * length
        return [kwargs["temperature"]] * length, [kwargs["top_p"]] * length

    seen_kwargs = []
    stub = Stub(tokenizer, lambda spec, pid, s, kw, n: seen_kwargs.append(dict(kw)) or ["7"] * n, ["autodeco"],
                {"b1": ["p0", "p1"]}, temperatures=temperatures)
    monkeypatch.setattr(runner, "generate_completions", stub)
    monkeypatch.setattr(runner, "score_completions", exact_scorer)
    results = run_evaluation(model, tokenizer, [load_benchmark(str(b1))], parse_methods("meanshift"), n=2, seeds=2,
                             ks=(1,), output_dir=tmp_path / "out", progress=False, plots=False)
    tokens = len(tokenizer("so \\boxed{7}", add_special_tokens=False)["input_ids"]) + 1
    expected_t = round(sum(0.4 if i % 2 == 0 else 0.8 for i in range(tokens)) / tokens, 3)
    info = results["meanshift"]
    assert (info["temperature"], info["top_p"]) == (expected_t, 0.9) and info["source"] == "AutoDeco's generated tokens"
    assert {"temperature": expected_t, "top_p": 0.9} in seen_kwargs  # the static run used exactly those
    assert {} in seen_kwargs  # AutoDeco ran first, though not requested ...
    assert list(results["results"]) == ["meanshift"]  # ... and is not reported
    label = results["results"]["meanshift"]["b1"]["label"]
    assert label == f"MeanShift (T={expected_t:g}, P=0.9, from AutoDeco's generated tokens)"


def test_meanshift_from_calibration_file(tiny, b1, tmp_path, monkeypatch):
    _, model, tokenizer = tiny
    from autodeco.evaluation import diagnostics

    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps({"prompt": "Q: 1+1?\n", "completion": "so \\boxed{2}"}) + "\n"
                     + json.dumps({"prompt": "Q: 3+4?\n", "completion": "it is 7"}) + "\n")
    t, p = diagnostics.meanshift_from_calibration(model, tokenizer, [str(calib)])
    assert abs(t - 1.0) > 1e-3  # the perturbed head does not predict T = 1
    stub = Stub(tokenizer, lambda *a: ["7"] * a[-1], [], {})
    monkeypatch.setattr(runner, "generate_completions", stub)
    monkeypatch.setattr(runner, "score_completions", exact_scorer)
    kw = dict(n=1, seeds=1, ks=(1,), output_dir=tmp_path / "out", progress=False, plots=False,
              calibration_files=[calib])
    results = run_evaluation(model, tokenizer, [load_benchmark(str(b1))], parse_methods("meanshift"), **kw)
    spec = static_method(round(t, 3), round(p, 3)).spec
    assert results["results"]["meanshift"]["b1"]["spec"] == spec
    assert results["meanshift"]["source"] == "calibration data" and "from calibration data" in (
        tmp_path / "out" / "results.md").read_text()
    assert all(c["kwargs"] == {"temperature": round(t, 3), "top_p": round(p, 3)} for c in stub.calls)

    # A rerun reuses meanshift.json instead of running over the calibration data again.
    monkeypatch.setattr(diagnostics, "meanshift_from_calibration", lambda *a, **k: pytest.fail("recomputed"))
    assert run_evaluation(model, tokenizer, [load_benchmark(str(b1))], parse_methods("meanshift"), **kw)["meanshift"][
        "temperature"] == round(t, 3)


# ------------------------------------------------------------------------------------------------ real model


def test_real_model_end_to_end_with_plots(tiny, b1, b2, tmp_path, monkeypatch):
    _, model, tokenizer = tiny
    results = run_evaluation(model, tokenizer, [load_benchmark(str(b1)), load_benchmark(str(b2))],
                             parse_methods("greedy, autodeco, edt"), n=2, seeds=2, ks=(1, 4), max_new_tokens=8,
                             batch_size=4, output_dir=tmp_path / "out", progress=False)
    out = tmp_path / "out"
    for name in ("results.json", "results.md", "records.jsonl", "traces.png", "temperature_vs_entropy.png"):
        assert (out / name).is_file(), name
    records = RecordStore(out).read(keep_completions=True)
    assert len(records) == 3 + 2 * 3 * 2  # greedy: one per problem; autodeco, edt: problems x seeds
    auto = [r for r in records.values() if r["method"] == "autodeco"]
    t_sum = sum(r["temperature_sum"] for r in auto)
    t_tokens = sum(r["temperature_tokens"] for r in auto)
    assert results["results"]["autodeco"]["average"]["mean_temperature"] == pytest.approx(t_sum / t_tokens)
    assert t_tokens == sum(sum(r["tokens"]) for r in auto)
    edt = results["results"]["edt"]["average"]["mean_temperature"]
    assert edt is not None and edt < 1.0  # EDT's own T (<= T0 = 1), not the T = 1 of the static traces
    assert results["results"]["greedy"]["b1"]["pass@1"]["std"] == 0.0
    example = next(r["example"] for r in auto if r.get("example"))
    assert len(example["temperatures"]) == len(example["token_ids"]) and len(set(example["temperatures"])) > 1
    md = (out / "results.md").read_text()
    assert "| Method | b1 (2) | b2 (1) | Avg |" in md and "![traces](traces.png)" in md


def test_generation_is_reproducible_chunked_and_padded_correctly(tiny):
    _, model, tokenizer = tiny
    gen = lambda requests, kwargs, batch: runner.generate_completions(
        model, tokenizer, requests, generation_kwargs=kwargs, max_new_tokens=6, batch_size=batch)
    seeded = [runner.GenerationRequest("<s>user\nHi</s>\n<s>assistant\n", 3, seed=123)]
    a, b = gen(seeded, {}, 2), gen(seeded, {}, 2)
    assert [c.token_ids for c in a[0]] == [c.token_ids for c in b[0]] and len(a[0]) == 3
    assert [c.temperatures for c in a[0]] == [c.temperatures for c in b[0]]
    # Greedy prompts of different lengths share a left-padded call and decode as they do alone.
    prompts = ["Short?\n", "A much longer prompt than that one?\n"]
    together = gen([runner.GenerationRequest(p, 1) for p in prompts], {"do_sample": False}, 8)
    alone = [gen([runner.GenerationRequest(p, 1)], {"do_sample": False}, 8)[0] for p in prompts]
    assert [c[0].token_ids for c in together] == [c[0].token_ids for c in alone]
    assert runner.encode_prompt(tokenizer, "<s>user\nx") == tokenizer("<s>user\nx", add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------------------ processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_single_process_results(tiny, b1, b2, tmp_path):
    root, _, _ = tiny
    flags = ["eval", "--model", root / "autodeco", "--benchmarks", b1, b2, "--methods", "greedy,autodeco,meanshift",
             "--n", 2, "--seeds", 2, "--k", "1,4", "--max-new-tokens", 6, "--batch-size", 2, "--device", "cpu",
             "--no-progress", "--no-plots"]
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    env.pop("ACCELERATE_USE_CPU", None)
    single = subprocess.run([sys.executable, "-m", "autodeco.cli", *map(str, flags), "--output-dir",
                             str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    for _ in range(3):  # the port may be taken between _free_port() and the bind
        two = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                              str(REPO / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
                              "--main_process_port", str(_free_port()), "-m", "autodeco.cli",
                              *map(str, flags), "--output-dir", str(tmp_path / "two")],
                             env=env, capture_output=True, text=True, timeout=300)
        if two.returncode == 0 or "address already in use" not in two.stderr.lower():
            break
    assert two.returncode == 0, two.stderr[-5000:]
    assert two.stdout.count("# AutoDeco evaluation") == 1  # rank 0 alone reports
    assert not list((tmp_path / "two").glob("records.rank*.jsonl"))  # merged
    one_results = json.loads((tmp_path / "one" / "results.json").read_text())
    two_results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two_results["settings"].pop("processes") == 2 and one_results["settings"].pop("processes") == 1
    assert strip_timing(two_results) == strip_timing(one_results)
    records = {d: RecordStore(tmp_path / d).read(True) for d in ("one", "two")}
    assert {r["rank"] for r in records["two"].values()} == {0, 1}  # the work was shared
    drop = lambda rs: {k: {f: v for f, v in r.items() if f not in ("seconds", "rank")} for k, r in rs.items()}
    assert drop(records["two"]) == drop(records["one"])


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_errors_are_one_line_naming_the_problem(tiny, b1, tmp_path, capsys):
    root, _, _ = tiny
    model = str(root / "autodeco")
    bad = write_benchmark(tmp_path / "bad.jsonl", [{"problem": "x", "gt": "1"}, {"problem": "no answer"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases = [
        (["--benchmarks", str(bad)], r"bad\.jsonl line 2: missing required field 'gt'"),
        (["--benchmarks", str(b1), "--methods", "greedy,nucleus"], r"Unknown method 'nucleus'\. Valid methods: greedy, default"),
        (["--benchmarks", str(b1), "--n", "2", "--seeds", "2", "--k", "1,5"], r"--k 5: .* --n 2 x --seeds 2 gives 4"),
        (["--benchmarks", str(empty)], r"empty\.jsonl: the benchmark has no problems"),
        (["--benchmarks", str(tmp_path / "missing.jsonl")], r"missing\.jsonl' does not exist"),
        (["--benchmarks", str(b1), "--calibration", str(b1)], r"--calibration only sets MeanShift"),
        ([], r"--benchmarks is required"),
    ]
    for extra, pattern in cases:
        assert eval_main(["eval", "--model", model, "--output-dir", str(tmp_path / "o"), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert re.search(pattern, err), (pattern, err)
    assert eval_main(["eval", "--model", str(root / "base"), "--benchmarks", str(b1), "--output-dir", str(tmp_path)]) == 2
    assert "plain 'llama' model, not an AutoDeco one" in capsys.readouterr().err


def test_cli_eval_and_diagnose_on_the_tiny_model(tiny, b1, tmp_path, capsys):
    root, _, _ = tiny
    out = tmp_path / "out"
    assert eval_main(["eval", "--model", str(root / "autodeco"), "--benchmarks", str(b1), "--methods", "default,autodeco",
                      "--n", "2", "--seeds", "1", "--max-new-tokens", "5", "--output-dir", str(out), "--device", "cpu",
                      "--no-progress", "--no-plots", "--template", "Solve: {problem}\n{instruction}"]) == 0
    assert "| AutoDeco |" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["ks"] == [1, 2] and results["settings"]["template"].startswith("Solve: ")
    record = json.loads((out / "records.jsonl").read_text().splitlines()[0])
    assert record["gt"] == "7" and len(record["correct"]) == 2  # scored by the real math-verify scorer

    calib = tmp_path / "calib.jsonl"
    calib.write_text(json.dumps({"prompt": "Q?\n", "completion": "so \\boxed{2}"}) + "\n")
    assert eval_main(["eval", "--diagnose", str(calib), "--model", str(root / "autodeco"), "--output-dir",
                      str(tmp_path / "diag"), "--device", "cpu"]) == 0
    assert "supervised tokens" in capsys.readouterr().out
    assert json.loads((tmp_path / "diag" / "diagnostics.json").read_text())["n_tokens"] > 0


def test_every_flag_has_help(capsys):
    import argparse

    from autodeco.cli.eval import add_data_parser

    parser = argparse.ArgumentParser(prog="autodeco")
    subparsers = parser.add_subparsers(dest="command")
    sub = add_eval_parser(subparsers)
    for action in sub._actions + add_data_parser(subparsers)._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, action.option_strings
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--help"])
    text = capsys.readouterr().out
    for flag in ("--oracle-n", "--oracle-seeds", "--calibration", "--diagnose", "--k", "--limit", "--template",
                 "--pack-samples"):
        assert flag in text


# ------------------------------------------------------------------------------------------------ packed sampling


class EchoModel:
    """Stands in for a causal LM's `generate`: every sequence echoes its own prompt (padding dropped), then one token
    drawn from torch's global RNG (so seeding matters; a fixed one when do_sample=False), then EOS, and reports
    T = 0.5, P = 0.9 per token. Each call's (prompts, num_return_sequences) is logged; `fail_after` calls kill it."""

    device = torch.device("cpu")

    def __init__(self, fail_after=None):
        from types import SimpleNamespace

        self.config = SimpleNamespace(name_or_path="echo")
        self.generation_config = SimpleNamespace(eos_token_id=EOS_ID)
        self.calls: list[tuple[int, int]] = []
        self.fail_after = fail_after

    def eval(self):
        return self

    def generate(self, input_ids, attention_mask, max_new_tokens, num_return_sequences, return_dict_in_generate,
                 pad_token_id, do_sample=True, **kwargs):
        from types import SimpleNamespace

        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed by the test")
        self.calls.append((input_ids.shape[0], num_return_sequences))
        ids = input_ids.repeat_interleave(num_return_sequences, 0)
        mask = attention_mask.repeat_interleave(num_return_sequences, 0).bool()
        rows = [row[m].tolist() + [int(torch.randint(4, 56, ())) if do_sample else 10, EOS_ID]
                for row, m in zip(ids, mask)]
        width = max(len(r) for r in rows)
        generated = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        return SimpleNamespace(sequences=torch.cat([ids, generated], 1), temperatures=torch.full(generated.shape, 0.5),
                               top_ps=torch.full(generated.shape, 0.9))


def echo_scorer(problem, completions):
    """A completion is right when it echoes its own problem's prompt: checks prompt/completion alignment."""
    return [f"ID={problem.id}." in c for c in completions]


@pytest.fixture
def b5(tmp_path):
    return write_benchmark(tmp_path / "b5.jsonl", [{"id": f"p{i}", "problem": f"ID=p{i}. What is {i}+1?", "gt": str(i + 1)}
                                                   for i in range(5)])


def records_without_timing(directory):
    return {k: {f: v for f, v in r.items() if f not in ("seconds", "rank")}
            for k, r in RecordStore(directory).read(keep_completions=True).items()}


def test_generate_completions_packs_a_group_into_one_seeded_call():
    from autodeco.testing import build_char_tokenizer

    tokenizer, model = build_char_tokenizer(), EchoModel()
    prompts = [f"ID=x{i}. " + "pad " * i for i in range(3)]  # different lengths: left padded
    gen = lambda requests, batch: runner.generate_completions(model, tokenizer, requests, generation_kwargs={},
                                                              max_new_tokens=4, batch_size=batch)
    packed = [runner.GenerationRequest(p, 2, seed=7, group="g") for p in prompts]
    out = gen(packed, 4)
    assert model.calls == [(2, 2), (1, 2)]  # batch 4 // n 2 = 2 prompts per call, one seed for the group
    assert [len(c) for c in out] == [2, 2, 2]
    assert all(f"ID=x{i}." in c.text for i, cs in enumerate(out) for c in cs)  # row j * n + r -> prompt j
    assert [[c.token_ids for c in cs] for cs in gen(packed, 4)] == [[c.token_ids for c in cs] for cs in out]
    model.calls.clear()
    gen([runner.GenerationRequest(p, 3, seed=7, group="g") for p in prompts[:2]], 2)  # n > batch: per prompt
    assert model.calls == [(1, 2), (1, 1), (1, 2), (1, 1)]
    model.calls.clear()
    # A group of one is sampled exactly as an ungrouped request with the same seed.
    alone = gen([runner.GenerationRequest(prompts[0], 2, seed=7)], 4)
    assert [c.token_ids for c in alone[0]] == [c.token_ids for c in gen([packed[0]], 4)[0]]


def test_packed_evaluation_groups_aligns_resumes_and_reproduces(b5, tmp_path, monkeypatch):
    from autodeco.testing import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    monkeypatch.setattr(runner, "score_completions", echo_scorer)
    bench = load_benchmark(str(b5))
    kw = dict(n=2, seeds=2, ks=(1, 4), max_new_tokens=4, batch_size=6, plots=False, progress=False)
    run = lambda model, out, **extra: run_evaluation(model, tokenizer, [bench], parse_methods("greedy,autodeco"),
                                                     output_dir=tmp_path / out, **{**kw, **extra})

    model = EchoModel()
    results = run(model, "packed", pack_samples=True)
    # greedy: one call of 5 prompts; autodeco: per seed, units of 6 // 2 = 3 problems: [p0 p1 p2], [p3 p4]
    assert sorted(model.calls) == sorted([(5, 1), (3, 2), (2, 2), (3, 2), (2, 2)])
    records = records_without_timing(tmp_path / "packed")
    sampled = [r for r in records.values() if r["method"] == "autodeco"]
    assert len(sampled) == 10 and all(len(r["completions"]) == 2 == len(r["correct"]) for r in sampled)
    assert all(all(r["correct"]) for r in records.values())  # every completion echoes its own problem's prompt
    first = {p: "p0" if int(p[1]) < 3 else "p3" for p in ("p0", "p1", "p2", "p3", "p4")}
    assert all(r["sampling_seed"] == sampling_seed(0, "autodeco", "b5", first[r["problem_id"]], r["seed"])
               for r in sampled)
    assert results["results"]["autodeco"]["b5"]["pass@1"]["mean"] == 1.0 and results["settings"]["pack_samples"]

    # A rerun finds every record; a fresh run with the same batch_size reproduces them.
    again = EchoModel()
    assert strip_timing(run(again, "packed", pack_samples=True)) == strip_timing(results) and again.calls == []
    run(EchoModel(), "packed2", pack_samples=True)
    assert records_without_timing(tmp_path / "packed2") == records

    # Unpacked: one call per sampled item, and no key is shared (nor with another packed batch_size).
    unpacked = EchoModel()
    run(unpacked, "unpacked")
    assert len(unpacked.calls) == 1 + 10
    assert not set(records) & set(records_without_timing(tmp_path / "unpacked"))
    run(EchoModel(), "packed4", pack_samples=True, batch_size=4)
    assert not set(records) & set(records_without_timing(tmp_path / "packed4"))

    # Killed after two calls, then resumed: the same records as the uninterrupted run.
    with pytest.raises(KeyboardInterrupt):
        run(EchoModel(fail_after=2), "killed", pack_samples=True)
    assert 0 < len(records_without_timing(tmp_path / "killed")) < len(records)
    run(EchoModel(), "killed", pack_samples=True)
    assert records_without_timing(tmp_path / "killed") == records

    # A unit with one record missing is regenerated whole (one call) and only that record is written back.
    path = tmp_path / "packed" / "records.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    missing = next(i for i, line in enumerate(lines) if json.loads(line)["problem_id"] == "p1"
                   and json.loads(line)["method"] == "autodeco")
    path.write_text("".join(lines[:missing] + lines[missing + 1 :]))
    resumed = EchoModel()
    run(resumed, "packed", pack_samples=True)
    assert resumed.calls == [(3, 2)] and records_without_timing(tmp_path / "packed") == records
    assert len(path.read_text().splitlines()) == len(lines)


def test_packed_oracle_and_meanshift(b5, tmp_path, monkeypatch):
    from autodeco.testing import build_char_tokenizer

    monkeypatch.setattr(runner, "score_completions", echo_scorer)
    model = EchoModel()
    results = run_evaluation(model, build_char_tokenizer(), [load_benchmark(str(b5))], parse_methods("oracle,meanshift"),
                             n=2, seeds=1, ks=(1,), max_new_tokens=4, batch_size=6, oracle_n=1, output_dir=tmp_path,
                             plots=False, progress=False, pack_samples=True)
    # every completion is right: ties go to the largest T and P; meanshift takes the heads' reported T, P
    assert (results["oracle"]["b5"]["temperature"], results["oracle"]["b5"]["top_p"]) == (max(ORACLE_TEMPERATURES), 1.0)
    assert (results["meanshift"]["temperature"], results["meanshift"]["top_p"]) == (0.5, 0.9)
    # oracle grid (10 T + 9 P, n=1: all 5 problems per call), its rerun at n=2, autodeco and meanshift (3 + 2 each)
    assert len(model.calls) == 19 + 3 * 2
    assert results["results"]["oracle"]["b5"]["completions"] == 10
