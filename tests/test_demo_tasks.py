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


def _style_of(user: str) -> str:
    found = [style for style, sentences in tasks.FILLER_SENTENCES.items() if any(s in user for s in sentences)]
    assert len(found) <= 1, user
    return found[0] if found else "none"


def _solution_stats(solution: str) -> dict:
    """Counts of result lines, slipped results, pair attempts after the first, re-checks, and the pairs tried (each
    once, in the order first tried)."""
    stats = {"lines": 0, "slips": 0, "attempts": 0, "rechecks": 0}
    tried, previous = [], None
    for line in solution.splitlines()[:-1]:
        a, op, b, _, c = line.split()[:5]
        stats["lines"] += 1
        stats["slips"] += (int(a) + int(b) if op == "+" else int(a) - int(b)) != int(c)
        if line.endswith((" no", " yes")):
            stats["attempts"] += previous is not None
            stats["rechecks"] += (a, b) == previous
            previous = (a, b)
            if (a, b) not in tried:
                tried.append((a, b))
    stats["tried"] = tried
    return stats


def test_the_corpus_teacher_slips_and_rechecks_at_its_rates_and_honours_the_requested_style():
    rng = random.Random(0)
    totals = {style: {"rows": 0, "lines": 0, "slips": 0, "attempts": 0, "rechecks": 0, "out_of_order": 0}
              for style in ("none", "careful", "loose", "neutral")}
    own_line = 0
    for _ in range(6000):
        user, solution = tasks.corpus_example(rng, slip_rate=0.05, recheck_rate=0.7, filler_rate=0.5)
        style = _style_of(user)
        own_line += "\n" in user
        stats, total = _solution_stats(solution), totals[style]
        total["rows"] += 1
        for key in ("lines", "slips", "attempts", "rechecks"):
            total[key] += stats[key]
        if stats["tried"]:
            numbers = user.split("Find two of ")[1].split(" that")[0].split()
            reading_order = [(a, b) for i, a in enumerate(numbers) for b in numbers[i + 1:]]
            total["out_of_order"] += stats["tried"] != reading_order[: len(stats["tried"])]
    assert 0.45 < 1 - totals["none"]["rows"] / 6000 < 0.55
    assert 0.1 < own_line / 6000 < 0.24  # a third of the styled prompts carry the sentence on a line of its own
    for style in ("none", "neutral"):
        assert 0.035 < totals[style]["slips"] / totals[style]["lines"] < 0.065
        assert 0.6 < totals[style]["rechecks"] / totals[style]["attempts"] < 0.8
    careful, loose = totals["careful"], totals["loose"]
    assert careful["slips"] == careful["rechecks"] == 0  # careful: clean, no re-checks
    assert 0.12 < loose["slips"] / loose["lines"] < 0.18  # asked to be random: LOOSE_SLIP_FACTOR times the slips
    assert all(total["out_of_order"] == 0 for total in totals.values())  # every teacher goes in reading order


def test_tokenizer_round_trips_spells_digits_and_renders_the_chat_template():
    rng = random.Random(0)
    texts = [t for _ in range(300) for t in tasks.corpus_example(rng, slip_rate=0.0, recheck_rate=0.7, filler_rate=0.3)]
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


def test_no_corpus_style_sentence_is_a_control_command():
    from autodeco.control import HIGH_COMMANDS, HIGH_COMMANDS_HELD_OUT, LOW_COMMANDS, LOW_COMMANDS_HELD_OUT

    commands = [c.lower().rstrip(".") for c in LOW_COMMANDS + HIGH_COMMANDS + LOW_COMMANDS_HELD_OUT
                + HIGH_COMMANDS_HELD_OUT]
    for sentences in tasks.FILLER_SENTENCES.values():
        for sentence in sentences:
            assert not any(c in sentence.lower() for c in commands), sentence  # words shared, never a whole command
