"""Tests of autodeco.evaluation.benchmarks: JSONL loading and validation, prompts, scoring dispatch,
and the real benchmark files in ../shared/benchmarks when that folder exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from autodeco.evaluation import answers, verify
from autodeco.evaluation.benchmarks import (
    DEFAULT_CHOICE_INSTRUCTION,
    DEFAULT_MATH_INSTRUCTION,
    Benchmark,
    Problem,
    build_prompt,
    load_benchmark,
    score,
    score_many,
)
from autodeco.evaluation.verify import score_math_many
from autodeco.testing import build_char_tokenizer

SHARED_BENCHMARKS = Path(__file__).parents[2] / "shared" / "benchmarks"
MATH_FILES = ["aime24", "aime25", "brumo25", "hmmt25", "beyondaime"]
CHOICE_FILES = ["gpqa_diamond", "mmlu_pro_lite"]


def write_jsonl(path: Path, lines: list) -> Path:
    """Write `lines` (dicts are JSON-encoded, strings written verbatim) one per line."""
    path.write_text("".join((json.dumps(line) if not isinstance(line, str) else line) + "\n" for line in lines))
    return path


# ------------------------------------------------------------------------------------------------ loading


def test_load_jsonl_math_defaults(tmp_path):
    path = write_jsonl(tmp_path / "mini_aime.jsonl", [
        {"problem": "1+1?", "gt": "2"},
        "",  # blank lines are skipped but still count for line numbers
        {"problem": "Half of 1?", "gt": "\\frac{1}{2}"},
        {"problem": "An int gt", "gt": 204},
    ])
    bench = load_benchmark(str(path))
    assert isinstance(bench, Benchmark)
    assert (bench.name, bench.kind, len(bench.problems)) == ("mini_aime", "math", 3)
    assert [p.id for p in bench.problems] == ["mini_aime-1", "mini_aime-3", "mini_aime-4"]
    assert [p.gt for p in bench.problems] == ["2", "\\frac{1}{2}", "204"]
    assert bench.problems[0] == Problem(id="mini_aime-1", problem="1+1?", gt="2", benchmark="mini_aime", kind="math")


def test_load_jsonl_choice_inferred_ids_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "quiz.jsonl", [
        {"id": "q1", "problem": "Pick.\nA. x\nB. y", "gt": "B"},
        {"id": 7, "problem": "Pick again.", "gt": "J"},
        {"id": "q3", "problem": "And again.", "gt": "A"},
    ])
    bench = load_benchmark(str(path), limit=2)
    assert bench.kind == "choice"
    assert [(p.id, p.kind, p.gt) for p in bench.problems] == [("q1", "choice", "B"), ("7", "choice", "J")]
    # An explicit kind wins over inference.
    assert load_benchmark(str(path), kind="math").kind == "math"


def test_mixed_answers_infer_math(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [{"problem": "p", "gt": "A"}, {"problem": "q", "gt": "12"}])
    assert load_benchmark(str(path)).kind == "math"
    with pytest.raises(ValueError, match=r"mixed\.jsonl line 2: kind 'choice' needs 'gt' to be a single capital letter"):
        load_benchmark(str(path), kind="choice")


@pytest.mark.parametrize(
    "lines, message",
    [
        ([{"problem": "p", "gt": "1"}, '{"problem": "q", "gt": '], r"bad\.jsonl line 2: invalid JSON"),
        ([{"problem": "p"}], r"bad\.jsonl line 1: missing required field 'gt'"),
        ([{"gt": "1"}], r"bad\.jsonl line 1: missing required field 'problem'"),
        ([{"problem": 5, "gt": "1"}], r"bad\.jsonl line 1: field 'problem' must be a string"),
        ([{"problem": "  ", "gt": "1"}], r"bad\.jsonl line 1: field 'problem' is empty"),
        ([{"problem": "p", "gt": ["1"]}], r"bad\.jsonl line 1: field 'gt' must be a string or a number"),
        ([{"problem": "p", "gt": True}], r"bad\.jsonl line 1: field 'gt' must be a string or a number"),
        ([{"problem": "p", "gt": ""}], r"bad\.jsonl line 1: field 'gt' is empty"),
        ([["p", "1"]], r"bad\.jsonl line 1: expected a JSON object"),
        ([{"problem": "p", "gt": "1", "id": [1]}], r"bad\.jsonl line 1: field 'id' must be"),
        ([{"id": "a", "problem": "p", "gt": "1"}, {"id": "a", "problem": "q", "gt": "2"}],
         r"bad\.jsonl line 2: duplicate id 'a' \(first used on line 1\)"),
        # A default id can collide with an explicit one.
        ([{"problem": "p", "gt": "1"}, {"id": "bad-1", "problem": "q", "gt": "2"}], r"line 2: duplicate id 'bad-1'"),
        ([], r"bad\.jsonl: the benchmark has no problems"),
        (["", "   "], r"bad\.jsonl: the benchmark has no problems"),
    ],
)
def test_load_jsonl_errors_name_file_and_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "bad.jsonl", lines)
    with pytest.raises(ValueError, match=message):
        load_benchmark(str(path))


def test_load_benchmark_argument_errors(tmp_path):
    path = write_jsonl(tmp_path / "ok.jsonl", [{"problem": "p", "gt": "1"}])
    with pytest.raises(ValueError, match="Unknown benchmark kind 'code'"):
        load_benchmark(str(path), kind="code")
    with pytest.raises(ValueError, match="limit must be a positive integer"):
        load_benchmark(str(path), limit=0)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_benchmark(str(tmp_path / "missing.jsonl"))


# ------------------------------------------------------------------------------------------------ prompts


def _problem(kind: str = "math") -> Problem:
    return Problem(id="t-1", problem="What is $\\frac{1}{2}+\\frac{1}{2}$? {instruction}", gt="1", benchmark="t", kind=kind)


def test_build_prompt_uses_the_chat_template():
    tokenizer = build_char_tokenizer()
    prompt = build_prompt(_problem(), tokenizer)
    assert prompt.startswith("<s>user\n")
    assert prompt.endswith("</s>\n<s>assistant\n")  # add_generation_prompt=True
    assert _problem().problem in prompt and DEFAULT_MATH_INSTRUCTION in prompt
    assert DEFAULT_CHOICE_INSTRUCTION in build_prompt(_problem("choice"), tokenizer)


def test_build_prompt_without_a_chat_template():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = None
    expected = f"{_problem().problem}\n\n{DEFAULT_MATH_INSTRUCTION}\n"
    assert build_prompt(_problem(), tokenizer) == expected
    assert build_prompt(_problem(), None) == expected


def test_build_prompt_custom_template():
    # Placeholders are substituted literally: \boxed{} needs no escaping, and a problem containing the
    # text "{instruction}" is not expanded a second time.
    template = "Q: {problem}\nA ({instruction}) \\boxed{}:"
    prompt = build_prompt(_problem(), None, template=template)
    assert prompt == f"Q: {_problem().problem}\nA ({DEFAULT_MATH_INSTRUCTION}) \\boxed{{}}:\n"
    chat = build_prompt(_problem(), build_char_tokenizer(), template=template)
    assert chat.startswith("<s>user\nQ: ") and chat.endswith("<s>assistant\n")
    with pytest.raises(ValueError, match=r"\{problem\}"):
        build_prompt(_problem(), None, template="no placeholder")


def test_score_dispatches_on_kind():
    math_problem = Problem(id="m", problem="p", gt="\\frac{1}{2}", benchmark="b", kind="math")
    choice_problem = Problem(id="c", problem="p", gt="C", benchmark="b", kind="choice")
    assert score(math_problem, "so \\boxed{0.5}") is True
    assert score(math_problem, "so \\boxed{0.6}") is False
    assert score(choice_problem, "The answer is (C).") is True
    assert score(choice_problem, "The answer is (D).") is False
    problems = [math_problem, choice_problem, math_problem, choice_problem]
    completions = ["\\boxed{1/2}", "\\boxed{C}", "\\boxed{2}", "Answer: A"]
    assert score_many(problems, completions) == [True, True, False, False]
    with pytest.raises(ValueError, match="unknown kind 'code'"):
        score(Problem(id="x", problem="p", gt="1", benchmark="b", kind="code"), "1")


# ------------------------------------------------------------------------------------------------ real files


def _shared(name: str) -> Path:
    if not SHARED_BENCHMARKS.is_dir():
        pytest.skip(f"{SHARED_BENCHMARKS} is not present (the real benchmark files live outside the repository)")
    path = SHARED_BENCHMARKS / f"{name}.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is not present")
    return path


def _wrong(gt: str) -> str:
    """A close but wrong answer: the next integer, or the expression plus one."""
    return str(int(gt) + 1) if gt.isdigit() else f"{gt}+1"


@pytest.mark.parametrize("name", MATH_FILES)
def test_real_math_benchmarks_load_and_every_gt_verifies(name):
    bench = load_benchmark(str(_shared(name)))
    assert bench.name == name and bench.kind == "math" and len(bench.problems) >= 30
    assert len({p.id for p in bench.problems}) == len(bench.problems)
    gts = [p.gt for p in bench.problems]
    assert score_math_many([(f"... so the answer is \\boxed{{{gt}}}.", gt) for gt in gts]) == [True] * len(gts)
    assert score_math_many([(f"... \\boxed{{{_wrong(gt)}}}", gt) for gt in gts]) == [False] * len(gts)
    # The gold itself must be understood by math-verify (not only string-equal to itself), or an
    # equivalent answer in another form could never be scored correct.
    golds = [answers.normalize_math_answer(gt) for gt in gts]
    assert verify._POOL.run([(gold, gold) for gold in golds], 10.0) == [True] * len(gts)


@pytest.mark.parametrize("name", CHOICE_FILES)
def test_real_choice_benchmarks_load_as_choice(name):
    bench = load_benchmark(str(_shared(name)))
    assert bench.kind == "choice" and len(bench.problems) >= 100
    assert all(p.kind == "choice" and p.gt in "ABCDEFGHIJ" for p in bench.problems)
    assert all(score(p, f"The answer is ({p.gt}).") for p in bench.problems)


def test_ifeval_is_rejected_with_field_and_line():
    path = _shared("ifeval")
    with pytest.raises(ValueError, match=r"ifeval\.jsonl line 1: missing required field 'problem'.*'prompt'"):
        load_benchmark(str(path))


def test_exact_kind_scores_the_last_box_character_for_character(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"problem": "Find two of 23 41 17 35 that add up to 58.", "gt": "23+35", "kind": "exact"}\n')
    bench = load_benchmark(str(path))
    assert bench.kind == "exact"
    problem = bench.problems[0]
    assert score(problem, "23 + 41 = 64 no\n23 + 35 = 58 yes\n\\boxed{23 + 35}")
    assert not score(problem, "\\boxed{35+23}")  # exact: another spelling is another answer
    assert not score(problem, "\\boxed{58}")
    assert not score(problem, "\\boxed{23+35+1}")  # the whole box must match, not contain the answer
    assert not score(problem, "23 + 35 = 58")  # no box, no answer
    assert answers.extract_answer("\\boxed{ 23+ 35 }", "exact") == "23+35"


def test_row_kinds_must_agree(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text('{"problem": "a", "gt": "1", "kind": "exact"}\n{"problem": "b", "gt": "2", "kind": "math"}\n')
    with pytest.raises(ValueError, match=r"line 2: field 'kind' is 'math'"):
        load_benchmark(str(path))
