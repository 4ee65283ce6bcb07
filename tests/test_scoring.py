"""Tests of autodeco.evaluation.answers, .verify and .metrics: math answers (math-verify in worker processes), letters, pass@k, maj@k."""

from __future__ import annotations

import itertools
import math
import threading
import time
from fractions import Fraction

import pytest

from autodeco.evaluation import answers, verify
from autodeco.evaluation.answers import extract_answer, normalize_math_answer, score_choice
from autodeco.evaluation.metrics import majority_correct, pass_at_k
from autodeco.evaluation.verify import score_math, score_math_many

# (completion, gold, expected)
MATH_CASES = [
    # equivalent forms
    ("so $x = \\boxed{\\frac{1}{2}}$.", "0.5", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", True),
    ("\\boxed{\\frac12}", "\\frac{1}{2}", True),
    ("\\boxed{1/9}", "\\frac{1}{9}", True),
    ("\\boxed{\\dfrac{737}{39}}", "\\frac{737}{39}", True),
    ("\\boxed{-48.62}", "-\\frac{2431}{50}", True),
    ("\\boxed{633825300114114700748351602688}", "2^{99}", True),
    ("\\boxed{2^99}", "2^{99}", True),
    ("\\boxed{\\frac{\\sqrt{570}}{12}}", "\\sqrt{\\frac{95}{24}}", True),
    ("\\boxed{(0, 1]}", "(0,1]", True),
    ("\\boxed{\\left[1, 2\\right)}", "[1,2)", True),
    ("\\boxed{3, 2}", "2,3", True),
    ("\\boxed{1,000}", "1000", True),
    ("\\boxed{1\\,000\\,000}", "1000000", True),
    ("\\boxed{204 \\text{ minutes}}", "204", True),
    ("\\boxed{5\\text{ cm}}", "5", True),
    ("\\boxed{336^\\circ}", "336^\\circ", True),
    ("\\boxed{336}", "336^\\circ", True),
    ("\\boxed{x = 5}", "5", True),
    ("\\boxed{2^{25}\\cdot 26!}", "2^{25} \\cdot 26!", True),
    # last box wins; nested braces; \boxed X; a truncated last box falls back to the previous one
    ("first \\boxed{5}, on reflection \\boxed{6}", "6", True),
    ("first \\boxed{5}, on reflection \\boxed{6}", "5", False),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", True),
    ("hence \\boxed 7.", "7", True),
    ("\\boxed{12} then \\boxed{\\frac{1", "12", True),
    # fallbacks without a box
    ("The final answer is $\\frac{3}{4}$.", "0.75", True),
    ("The answer is therefore 42.", "42", True),
    ("**Answer:** 17 apples", "17", True),
    ("first 3, then finally 42", "42", True),
    ("To find the answer: add 3+4 = 7. Doubling gives 14", "14", True),  # prose after "answer:" is skipped
    # wrong answers
    ("\\boxed{205}", "204", False),
    ("\\boxed{(0,1)}", "(0,1]", False),
    ("\\boxed{0.1111}", "\\frac{1}{9}", False),
    ("\\boxed{\\frac{-1+\\sqrt{17}}{2}}", "\\frac{-1+\\sqrt{17}}{2}, \\frac{-1-\\sqrt{17}}{2}", False),
    ("\\boxed{2^{98}}", "2^{99}", False),
    ("\\boxed{1000.5}", "1000", False),
    ("no answer here at all", "5", False),
]


@pytest.mark.parametrize("completion, gold, expected", MATH_CASES)
def test_score_math_table(completion, gold, expected):
    assert score_math(completion, gold) is expected


def test_score_math_many_matches_single_calls_and_deduplicates():
    pairs = [(completion, gold) for completion, gold, _ in MATH_CASES] * 3  # duplicates verified once
    assert score_math_many(pairs) == [expected for _, _, expected in MATH_CASES] * 3
    assert score_math_many([]) == []


@pytest.mark.parametrize(
    "completion, gold",
    [
        (None, "5"),
        (12345, "5"),
        ("", "5"),
        ("\\boxed{}", "5"),
        ("\\boxed{\\frac{1}{", "5"),
        ("\\boxed{\\frac{}{}}}}}^^_", "5"),
        ("\\boxed{" * 100_000, "5"),  # many unterminated boxes: bounded work
        ("x" * 2_000_000 + " 7", "7"),  # huge completion: still found, quickly
        ("\\boxed{" + "1+" * 5000 + "1}", "5"),  # longer than any real answer: not parsed
        ("\x00\udcff\\boxed{\udcff}", "5"),
        ("\\boxed{5}", "\\frac{"),  # malformed gold
    ],
)
def test_score_math_never_raises_on_garbage(completion, gold):
    start = time.monotonic()
    result = score_math(completion, gold)
    assert isinstance(result, bool)
    assert time.monotonic() - start < 20
    if completion == "x" * 2_000_000 + " 7":
        assert result is True


def test_pathological_expression_returns_within_the_timeout():
    score_math("\\boxed{1}", "1")  # start the workers outside the timed part
    start = time.monotonic()
    assert score_math("\\boxed{9^{9^{9^{9}}}}", "5", timeout=2) is False
    assert score_math("\\boxed{9^9^9^9}", "5", timeout=2) is False
    assert time.monotonic() - start < 15
    assert score_math("\\boxed{\\frac{2}{4}}", "0.5") is True  # the pool still works


def test_hard_timeout_kills_a_stuck_worker_and_the_pool_recovers():
    # With math-verify's own signal timeouts disabled, 9^(9^10) is one long C-level computation: only
    # the parent's deadline can stop it, by killing the worker.
    verify._POOL.run([("1", "1")], 5.0)
    start = time.monotonic()
    verdicts = verify._POOL.run([("5", "9^{9^{10}}"), ("1/2", "0.5")], 1.5, inner_timeout=0)
    assert verdicts == [None, True]
    assert time.monotonic() - start < 20
    assert verify._POOL.run([("3", "3.0")], 5.0) == [True]


def test_score_math_from_threads():
    results: dict[int, bool] = {}

    def work(index: int) -> None:
        results[index] = score_math(f"so \\boxed{{\\frac{{{index}}}{{2}}}}", str(index / 2))
        results[-1 - index] = score_math(f"\\boxed{{{index + 1}}}", str(index))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert results == {**{i: True for i in range(4)}, **{-1 - i: False for i in range(4)}}


def test_worker_start_failure_is_a_clear_error(tmp_path, monkeypatch):
    # A math_verify that cannot be imported (shadowed through PYTHONPATH) must raise, not score all-wrong.
    fake = tmp_path / "math_verify"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('simulated missing math-verify')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    pool = verify._MathVerifyPool(size=1)
    try:
        with pytest.raises(RuntimeError, match="simulated missing math-verify"):
            pool.run([("1", "1")], 5.0)
    finally:
        pool.close()


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("\\boxed{1,000 \\text{ cm}}.", "1000"),
        ("\\boxed{ \\left( 1, 2 \\right) }", "(1,2)"),
        ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}"),
        ("\\boxed{3/4}", "\\frac{3}{4}"),
        ("\\boxed{\\frac34}", "\\frac{3}{4}"),
        ("\\boxed{10.50}", "10.5"),
        ("\\boxed{42.}", "42"),
        ("The answer is 204 minutes.", "204"),
        ("\\boxed{\\$1,000}", "1000"),
        ("\\boxed{336^{\\circ}}", "336"),
        ("\\boxed{\\text{even}}", "even"),
        ("\\boxed{\\pi r^2}", "\\pi r^2"),
        ("\\boxed{2 and 3}", "2and3"),  # a joining word is not a unit: both numbers stay
        ("no digits", None),
        (None, None),
    ],
)
def test_extract_answer_math_normalises(completion, expected):
    assert extract_answer(completion, "math") == expected


def test_extract_answer_choice_and_bad_kind():
    assert extract_answer("The answer is (C).", "choice") == "C"
    assert extract_answer("no letter here", "choice") is None
    with pytest.raises(ValueError, match="math"):
        extract_answer("x", "code")


def test_normalised_forms_group_equal_answers():
    forms = ["1,000", "1000", "1000.", "$1000$", "1000 \\text{ m}", "\\boxed{1000}"[7:-1]]
    assert {normalize_math_answer(form) for form in forms} == {"1000"}


@pytest.mark.parametrize(
    "completion, gold, expected",
    [
        ("so \\boxed{C}", "C", True),
        ("\\boxed{(C)}", "C", True),
        ("\\boxed{\\text{C}}", "C", True),
        ("\\boxed{C. 42 kg}", "C", True),
        ("The answer is (C).", "C", True),
        ("Answer: C", "C", True),
        ("**Answer:** D", "D", True),
        ("The answer is (B). Wait, actually the answer is (D).", "D", True),
        ("The answer is (B). Wait, actually the answer is (D).", "B", False),
        ("Between options A and J, I pick J", "J", True),
        ("I think the best option is H", "H", True),
        ("the answer is a number, so B", "B", True),  # lowercase "a" is not option A
        ("answer: c", "C", False),  # case-sensitive outside a box
        ("\\boxed{c}", "C", True),  # a box holding only a letter: case-insensitive (issue 15)
        ("\\boxed{a + b}", "A", False),  # a lowercase letter in an expression is no choice
        ("\\boxed{C}", "D", False),
        ("\\boxed{C}", " C ", True),
        ("I am not sure", "I", False),  # the pronoun is not option I
        ("nothing", "A", False),
        (None, "A", False),
    ],
)
def test_score_choice(completion, gold, expected):
    assert score_choice(completion, gold) is expected


@pytest.mark.parametrize("gold", [None, "CC", "", 3, "K"])
def test_score_choice_with_a_broken_gold_is_an_error(gold):
    """Issue 15: a gold that is no letter A-J was a silent False; now an error naming the gold."""
    with pytest.raises(ValueError, match="gold"):
        score_choice("\\boxed{C}", gold)


@pytest.mark.parametrize("gold", [None, 5, "", "  "])
def test_score_math_with_a_broken_gold_is_an_error(gold):
    with pytest.raises(ValueError, match="gold"):
        score_math("\\boxed{5}", gold)
    with pytest.raises(ValueError, match="gold"):
        score_math_many([("\\boxed{5}", "5"), ("\\boxed{5}", gold)])


def _pass_at_k_brute_force(n: int, c: int, k: int) -> float:
    """Fraction of k-subsets of n samples (the first c correct) that contain a correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force_and_binomial_formula():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = _pass_at_k_brute_force(n, c, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
                assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)


def test_pass_at_k_is_stable_for_large_n():
    n = 1000
    for c, k in [(1, 1), (3, 500), (10, 100), (500, 400), (999, 1), (0, 1000), (1, 1000)]:
        exact = float(1 - Fraction(math.comb(n - c, k), math.comb(n, k)))
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-10, abs=1e-15)
        assert 0.0 <= pass_at_k(n, c, k) <= 1.0
    # C(5000, 2500) overflows a float; the product form doesn't care.
    assert pass_at_k(5000, 2, 2500) == pytest.approx(float(1 - Fraction(math.comb(4998, 2500), math.comb(5000, 2500))))


def test_pass_at_k_validates_arguments():
    with pytest.raises(ValueError, match=r"k must be in \[1, n=4\].*k=5"):
        pass_at_k(4, 1, 5)
    with pytest.raises(ValueError, match="k must be"):
        pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match="c"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="c"):
        pass_at_k(4, -1, 1)
    with pytest.raises(ValueError, match="n"):
        pass_at_k(0, 0, 1)
    with pytest.raises(TypeError, match="int"):
        pass_at_k(4.0, 1, 1)


def test_majority_correct():
    assert majority_correct(["5", "6", "5"], [True, False, True]) is True
    assert majority_correct(["5", "6", "6"], [True, False, False]) is False
    # None (no answer) never wins, however many there are.
    assert majority_correct([None, None, None, "7"], [False, False, False, True]) is True
    assert majority_correct([None, None], [False, False]) is False
    assert majority_correct([], []) is False
    # Ties go to the answer that reached the top count first: "b" reaches 2 before "a" does.
    assert majority_correct(["a", "b", "b", "a"], [False, True, True, False]) is True
    assert majority_correct(["a", "b"], [True, False]) is True
    assert majority_correct(["b", "a"], [True, False]) is True
    with pytest.raises(ValueError, match="2 answers but 1"):
        majority_correct(["a", "b"], [True])


def test_timeouts_are_not_cached():
    # A timeout may be machine load rather than the expression, so it must not stick in the cache.
    completion, gold = "\\boxed{9^{9^{9^{9}}}}", "7"
    assert score_math(completion, gold, timeout=2) is False
    key = (normalize_math_answer(gold), normalize_math_answer(answers.extract_math_answer(completion)))
    assert key not in verify._CACHE
    assert score_math("\\boxed{0.25}", "\\frac14") is True
    assert verify._CACHE[("\\frac{1}{4}", "0.25")] is True
