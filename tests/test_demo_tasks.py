"""The demo's synthetic tasks and its tokenizer: splits, exact answers, the imperfect teacher, round trips."""

from __future__ import annotations

import random
import re

import pytest

from autodeco.demo import tasks
from autodeco.demo.base import CHAT_TEMPLATE, build_tokenizer, render_prompt
from autodeco.evaluation.benchmarks import Problem, score


def _as_problem(p: tasks.DemoProblem) -> Problem:
    row = p.as_benchmark_row()
    return Problem(row["id"], row["problem"], row["gt"], "demo", row["kind"])


def test_splits_are_disjoint_and_a_fixed_function_of_the_problem():
    train = tasks.generate_problems("train", 400, seed=0)
    test = tasks.generate_problems("test", 200, seed=0)
    other_test = tasks.generate_problems("test", 200, seed=7)
    assert {p.split for p in train} == {"train"} and {p.split for p in test} == {"test"}
    assert not {p.key for p in train} & {p.key for p in test + other_test}
    assert len({p.key for p in test}) == 200  # distinct within a split
    assert [p.family for p in test[:4]] == ["arith", "pairs", "arith", "pairs"]
    assert tasks.generate_problems("test", 200, seed=0) == test  # reproducible from the seed
    # About TEST_SHARE of all problems are test problems.
    rng = random.Random(3)
    drawn = [tasks.random_problem(f, rng).split for f in tasks.FAMILIES for _ in range(1000)]
    assert 0.07 < drawn.count("test") / len(drawn) < 0.13


@pytest.mark.parametrize("family", tasks.FAMILIES)
def test_clean_solutions_are_step_by_step_and_exactly_right(family):
    rng = random.Random(0)
    problems = [p for p in tasks.generate_problems("train", 60, seed=1) if p.family == family]
    for p in problems:
        solution = tasks.solve(p, rng)
        assert score(_as_problem(p), solution), (p.problem, solution)
        lines = solution.splitlines()
        assert lines[-1] == f"\\boxed{{{p.answer}}}"
        for line in lines[:-1]:  # every step's arithmetic is right
            a, op, b, _, c = line.split()[:5]
            assert {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c)
        if family == "pairs":
            assert lines[-2].endswith(" yes") and all(line.endswith(" no") for line in lines[:-2])
            tried = [tuple(line.split()[0:3:2]) for line in lines[:-1]]
            assert len(set(tried)) == len(tried)  # the clean teacher never re-checks


def test_pairs_problems_have_exactly_one_answer():
    rng = random.Random(5)
    drawn = [tasks.random_problem("pairs", rng) for _ in range(3000)]  # two-pair ties are rare: draw many
    for p in tasks.generate_problems("test", 100, seed=3) + drawn:
        if p.family == "pairs":
            *candidates, target = p.numbers
            fits = [(a, b) for i, a in enumerate(candidates) for b in candidates[i + 1:] if a + b == target]
            assert len(fits) == 1 and p.answer == f"{fits[0][0]}+{fits[0][1]}"


def test_the_corpus_teacher_slips_and_rechecks_at_its_rates():
    rng = random.Random(0)
    slips = lines = rechecks = attempts = filler = 0
    for _ in range(3000):
        user, solution = tasks.corpus_example(rng, slip_rate=0.1, recheck_rate=0.3, filler_rate=0.25)
        filler += sum(user.count(c) for c in ".!:") > 1  # the problem is one sentence, a filler another
        steps = solution.splitlines()[:-1]
        previous = None
        for line in steps:
            a, op, b, _, c = line.split()[:5]
            lines += 1
            slips += {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] != int(c)
            if line.endswith((" no", " yes")):
                attempts += previous is not None
                rechecks += (a, b) == previous
                previous = (a, b)
    assert 0.08 < slips / lines < 0.12
    assert 0.2 < rechecks / attempts < 0.4
    assert 0.2 < filler / 3000 < 0.3


def test_tokenizer_round_trips_spells_digits_and_renders_the_chat_template():
    rng = random.Random(0)
    texts = [t for _ in range(300) for t in tasks.corpus_example(rng, slip_rate=0.0, recheck_rate=0.3, filler_rate=0.3)]
    tokenizer = build_tokenizer(texts, vocab_size=200)
    assert tokenizer.chat_template == CHAT_TEMPLATE
    for text in texts[:50] + ["Answer with LOW randomness, please!", "x\n\ny  z"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert tokenizer.unk_token_id not in ids
    pieces = tokenizer.tokenize("123 + 45 = 168")
    assert [p for p in pieces if re.search(r"\d", p)] == list("12345168")
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "Start at 12, then + 30."}], tokenize=False,
                                             add_generation_prompt=True)
    assert rendered == render_prompt("Start at 12, then + 30.")
    assert tokenizer.eos_token == "<|end|>" and tokenizer.convert_tokens_to_ids("<|end|>") == tokenizer.eos_token_id


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split must be one of"):
        tasks.generate_problems("dev", 3, seed=0)
    with pytest.raises(ValueError, match="Unknown task family 'chess'"):
        tasks.generate_problems("test", 3, seed=0, families=("chess",))
    with pytest.raises(ValueError, match="count must be"):
        tasks.generate_problems("test", -1, seed=0)
