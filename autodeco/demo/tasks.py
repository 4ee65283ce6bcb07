"""The demo's synthetic reasoning tasks: seeded generators of problems with step-by-step solutions that end in a
\\boxed{} answer checked exactly, and train/test splits that cannot overlap.

    from autodeco.demo.tasks import generate_problems, solve
    problems = generate_problems("test", 100, seed=0)                 # 50 "arith" + 50 "pairs", test split only
    problems[0].problem, problems[0].answer                            # user text, exact gold answer
    solve(problems[0], random.Random(0))                              # a step-by-step solution (clean teacher)

    autodeco demo-problems --split test --count 6                     # print a few problems and solutions

Families: "arith" (exact multi-step arithmetic: low temperature wins) and "pairs" (a search in reading order
whose solutions need both: exact sums, where a slip is fatal, and breaking out of a re-checking habit, which only a
high temperature at the next choice does). The base's corpus (`corpus_example`) comes from an imperfect teacher (slips, re-checks, style requests);
`solve` is the clean one. A problem's split is a hash of its canonical key, so the splits never share a problem.
Details: docs/demo.md.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

__all__ = [
    "FAMILIES",
    "SPLITS",
    "DemoProblem",
    "split_of",
    "generate_problems",
    "random_problem",
    "solve",
    "corpus_example",
    "FILLER_SENTENCES",
]

FAMILIES = ("arith", "pairs")
SPLITS = ("train", "test")
TEST_SHARE = 0.1
ARITH_STEPS = 4
ARITH_MAX_VALUE = 999
PAIRS_COUNT = 4
# Candidates are two-digit numbers below 50, so every sum is a two-digit number with at most one carry.
PAIRS_RANGE = (10, 49)
# The teacher gives up after this many lines and writes the last pair it tried: keeps solutions within the demo's
# 128 new tokens (a line is about 12 tokens).
PAIRS_MAX_ATTEMPTS = 8

# Sentences a user may add to a request, by the style they ask for. A share of the base corpus carries one (before
# the problem, after it, or on a line of its own) and the teacher honours it, as the authors of any pretraining text
# would: asked to be careful it never slips or re-checks; asked to be
# loose or random it slips LOOSE_SLIP_FACTOR times as often; neutral requests change nothing. Because the request
# changes the text at every choice (which pair next, how sure each digit is), the base model has to carry it to
# every completion token, as a pretrained model carries an instruction, so the heads can see it there. What it
# should mean for the sampling temperature is left to control training (issue 6). None of these sentences is one of
# autodeco.control's command phrasings, seen or held out (a test checks it): control training must still map
# wordings the base never saw onto the style it knows.
_FILLER_OPENERS = ("Please", "Kindly", "Now", "Quick one:", "Hi!", "Thanks!", "Next:", "Okay,")
_FILLER_BODIES = {
    "careful": (
        "be careful.", "be precise.", "be exact.", "be deterministic.", "use low randomness.", "keep it predictable.",
        "be conservative.", "stay focused.", "play it safe.", "be consistent.", "keep the temperature low.",
        "with minimal variation.", "avoid any surprises.", "be less random.", "be strict.", "be methodical.",
        "low diversity please.", "no creativity needed.", "use as little variation as possible.",
        "as little randomness as you can.", "take no risks.", "less variety please.", "keep variation minimal.",
        "little randomness please.", "low randomness please.", "keep randomness low.", "reply with low variety.",
        "keep diversity low.",
    ),
    "loose": (
        "be creative.", "be more random.", "use high randomness.", "be diverse.", "vary your answer.",
        "explore freely.", "try different ideas.", "mix it up.", "go wild.", "be adventurous.",
        "raise the temperature.", "with lots of variety.", "sample widely.", "take chances.", "be unpredictable.",
        "be playful.", "surprise me.", "high diversity please.", "use as much variation as possible.",
        "as much randomness as you can.", "take big risks.", "more variety please.", "keep variation maximal.",
        "much randomness please.", "high randomness please.", "keep randomness high.", "reply with high variety.",
        "keep diversity high.",
    ),
    "neutral": ("show your work.", "think step by step.", "take your time.", "be brief.", "keep it simple.",
                "here is a problem.", "good luck."),
}
FILLER_SENTENCES = {style: tuple(f"{o} {b}" for o in _FILLER_OPENERS for b in bodies)
                    for style, bodies in _FILLER_BODIES.items()}
_STYLE_WEIGHTS = {"careful": 0.4, "loose": 0.4, "neutral": 0.2}
LOOSE_SLIP_FACTOR = 3


@dataclass(frozen=True)
class DemoProblem:
    family: str  # one of FAMILIES
    numbers: tuple[int, ...]  # arith: the operands; pairs: the candidates then the target
    ops: tuple[str, ...]  # arith: the operators; pairs: ()
    problem: str  # the user's text
    answer: str  # the exact gold answer (what \boxed{} must contain)

    @property
    def key(self) -> str:
        return f"{self.family}:{' '.join(map(str, self.numbers))}:{''.join(self.ops)}"

    @property
    def split(self) -> str:
        return split_of(self.key)

    def as_benchmark_row(self) -> dict:
        """A line of a benchmark JSONL file (autodeco.evaluation.benchmarks), kind "exact"."""
        digest = hashlib.sha256(self.key.encode()).hexdigest()[:10]
        return {"id": f"{self.family}-{digest}", "problem": self.problem, "gt": self.answer, "kind": "exact",
                "family": self.family}


def split_of(key: str) -> str:
    """'test' for TEST_SHARE of all keys, else 'train': a fixed function of the key, so splits never overlap."""
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 10_000
    return "test" if bucket < TEST_SHARE * 10_000 else "train"


def _apply(value: int, op: str, operand: int) -> int:
    return value + operand if op == "+" else value - operand if op == "-" else value * operand


def _random_arith(rng: random.Random) -> DemoProblem:
    while True:
        value = rng.randint(10, 99)
        numbers, ops = [value], []
        for _ in range(ARITH_STEPS):
            op = rng.choice("+-")
            operand = rng.randint(2, 9)
            numbers.append(operand)
            ops.append(op)
            value = _apply(value, op, operand)
        if 0 <= value <= ARITH_MAX_VALUE:
            steps = ", ".join(f"{o} {n}" for o, n in zip(ops, numbers[1:]))
            return DemoProblem("arith", tuple(numbers), tuple(ops), f"Start at {numbers[0]}, then {steps}.", str(value))


def _pair_sums(candidates: tuple[int, ...]) -> dict[tuple[int, int], int]:
    return {(i, j): candidates[i] + candidates[j] for i in range(len(candidates)) for j in range(i + 1, len(candidates))}


def _random_pairs(rng: random.Random) -> DemoProblem:
    while True:
        candidates = tuple(rng.sample(range(PAIRS_RANGE[0], PAIRS_RANGE[1] + 1), PAIRS_COUNT))
        sums = _pair_sums(candidates)
        i, j = rng.choice(sorted(sums))
        target = sums[(i, j)]
        if list(sums.values()).count(target) != 1:
            continue  # exactly one pair must fit
        text = f"Find two of {' '.join(map(str, candidates))} that add up to {target}."
        return DemoProblem("pairs", candidates + (target,), (), text, f"{candidates[i]}+{candidates[j]}")


def random_problem(family: str, rng: random.Random) -> DemoProblem:
    if family == "arith":
        return _random_arith(rng)
    if family == "pairs":
        return _random_pairs(rng)
    raise ValueError(f"Unknown task family {family!r}; choose one of {', '.join(FAMILIES)}.")


def generate_problems(split: str, count: int, seed: int, families: tuple[str, ...] = FAMILIES) -> list[DemoProblem]:
    """`count` distinct problems of `split`, families interleaved in turn (equal shares), reproducible from `seed`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}.")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be a non-negative integer, got {count!r}.")
    for family in families:
        if family not in FAMILIES:
            raise ValueError(f"Unknown task family {family!r}; choose from {', '.join(FAMILIES)}.")
    rng = random.Random(f"autodeco-demo:{split}:{seed}")
    problems, seen = [], set()
    while len(problems) < count:
        family = families[len(problems) % len(families)]
        problem = random_problem(family, rng)
        if problem.split == split and problem.key not in seen:
            seen.add(problem.key)
            problems.append(problem)
    return problems


def _slip(value: int, rng: random.Random) -> int:
    """`value` with one digit changed (never to a leading zero): an honest-looking arithmetic slip."""
    digits = list(str(value))
    position = rng.randrange(len(digits))
    choices = [d for d in "0123456789" if d != digits[position] and not (position == 0 and d == "0" and len(digits) > 1)]
    digits[position] = rng.choice(choices)
    return int("".join(digits))


def _solve_arith(problem: DemoProblem, rng: random.Random, slip_rate: float) -> str:
    value = problem.numbers[0]
    lines = []
    for op, operand in zip(problem.ops, problem.numbers[1:]):
        result = _apply(value, op, operand)
        if slip_rate and rng.random() < slip_rate:
            result = _slip(result, rng) if result > 0 else result + 1
        lines.append(f"{value} {op} {operand} = {result}")
        value = result
    lines.append(f"\\boxed{{{value}}}")
    return "\n".join(lines)


def _solve_pairs(problem: DemoProblem, rng: random.Random, slip_rate: float, recheck_rate: float) -> str:
    """Pairs in reading order, (0, 1), (0, 2), ...; before each new pair the teacher re-checks the line it just wrote
    with probability `recheck_rate` (its habit: the most likely next line when recheck_rate > 0.5, so greedy
    decoding re-checks forever, and sampling at T=1 moves on only 1 - recheck_rate of the time)."""
    *candidates, target = problem.numbers
    order = list(_pair_sums(tuple(candidates)))
    lines, position = [], 0
    while True:
        if lines and not (recheck_rate and rng.random() < recheck_rate):
            position += 1
        if position == len(order):
            position -= 1  # out of pairs (only after a slip hid the right one): commit to the last
            break
        a, b = candidates[order[position][0]], candidates[order[position][1]]
        written = a + b
        if slip_rate and rng.random() < slip_rate:
            written = _slip(written, rng)
        verdict = "yes" if written == target else "no"
        lines.append(f"{a} + {b} = {written} {verdict}")
        if verdict == "yes" or len(lines) >= PAIRS_MAX_ATTEMPTS:
            break
    i, j = order[position]
    lines.append(f"\\boxed{{{candidates[i]}+{candidates[j]}}}")
    return "\n".join(lines)


def solve(problem: DemoProblem, rng: random.Random, *, slip_rate: float = 0.0, recheck_rate: float = 0.0) -> str:
    """A step-by-step solution ending in \\boxed{answer}; with the defaults, always correct and without re-checks."""
    if problem.family == "arith":
        return _solve_arith(problem, rng, slip_rate)
    return _solve_pairs(problem, rng, slip_rate, recheck_rate)


def corpus_example(rng: random.Random, *, slip_rate: float, recheck_rate: float, filler_rate: float,
                   split: str = "train") -> tuple[str, str]:
    """One (user text, solution) pair of the base model's pretraining corpus, from the imperfect teacher. With
    probability `filler_rate` the user adds a style sentence (FILLER_SENTENCES) that the teacher honours."""
    family = rng.choice(FAMILIES)
    while True:
        problem = random_problem(family, rng)
        if problem.split == split:
            break
    user = problem.problem
    if filler_rate and rng.random() < filler_rate:
        style = rng.choices(list(_STYLE_WEIGHTS), weights=list(_STYLE_WEIGHTS.values()))[0]
        filler = rng.choice(FILLER_SENTENCES[style])
        # Before the problem, after it, or on a line of its own at the end (where autodeco.control puts commands).
        user = rng.choice((f"{filler} {user}", f"{user} {filler}", f"{user}\n{filler}"))
        if style == "careful":
            return user, solve(problem, rng)
        if style == "loose":
            slip_rate = min(1.0, LOOSE_SLIP_FACTOR * slip_rate)
    return user, solve(problem, rng, slip_rate=slip_rate, recheck_rate=recheck_rate)

