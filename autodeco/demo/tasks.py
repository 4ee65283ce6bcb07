"""The demo's synthetic reasoning tasks: seeded generators of problems with step-by-step solutions that end in a
\\boxed{} answer checked exactly, and train/test splits that cannot overlap.

    from autodeco.demo.tasks import generate_problems, solve
    problems = generate_problems("test", 100, seed=0)                 # 50 "arith" + 50 "pairs", test split only
    problems[0].problem, problems[0].answer                            # user text, exact gold answer
    solve(problems[0], random.Random(0))                              # a step-by-step solution (clean teacher)

    autodeco demo-problems --split test --count 6                     # print a few problems and solutions

Families: "arith" (exact multi-step arithmetic: low temperature wins) and "pairs" (a small search: randomness
helps). The base's corpus (`corpus_example`) comes from an imperfect teacher (slips, re-checks, style requests);
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
# The teacher gives up re-checking after this many lines and writes the answer: keeps corpus solutions short.
PAIRS_MAX_ATTEMPTS = 8

# Sentences a user may add to a request, by the style they ask for. A share of the base corpus carries one (before
# the problem, after it, or on a line of its own) and the teacher honours it, as the authors of any pretraining text
# would: asked to be careful it works through the pairs in reading order and never slips or re-checks; asked to be
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
LOOSE_SLIP_FACTOR = 5


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


def _solve_pairs(problem: DemoProblem, rng: random.Random, slip_rate: float, recheck_rate: float,
                 systematic: bool = False) -> str:
    *candidates, target = problem.numbers
    order = list(_pair_sums(tuple(candidates)))
    if systematic:
        order.reverse()  # popped from the end: (0, 1), (0, 2), ... in the order the numbers are written
    else:
        rng.shuffle(order)
    lines, previous = [], None
    answer = None
    while answer is None:
        if previous is not None and recheck_rate and rng.random() < recheck_rate:
            pair = previous  # the habit greedy decoding turns into a loop
        elif order:
            pair = order.pop()
        else:
            answer = previous  # out of pairs (only after a slip hid the right one): commit to the last
            break
        a, b = candidates[pair[0]], candidates[pair[1]]
        written = a + b
        if slip_rate and rng.random() < slip_rate:
            written = _slip(written, rng)
        verdict = "yes" if written == target else "no"
        lines.append(f"{a} + {b} = {written} {verdict}")
        previous = pair
        if verdict == "yes" or len(lines) >= PAIRS_MAX_ATTEMPTS:
            answer = pair
    lines.append(f"\\boxed{{{candidates[answer[0]]}+{candidates[answer[1]]}}}")
    return "\n".join(lines)


def solve(problem: DemoProblem, rng: random.Random, *, slip_rate: float = 0.0, recheck_rate: float = 0.0,
          systematic: bool = False) -> str:
    """A step-by-step solution ending in \\boxed{answer}; with the defaults, always correct. `systematic` tries the
    pairs of "pairs" in reading order instead of a random one."""
    if problem.family == "arith":
        return _solve_arith(problem, rng, slip_rate)
    return _solve_pairs(problem, rng, slip_rate, recheck_rate, systematic)


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
            return user, solve(problem, rng, systematic=True)
        if style == "loose":
            slip_rate = min(1.0, LOOSE_SLIP_FACTOR * slip_rate)
    return user, solve(problem, rng, slip_rate=slip_rate, recheck_rate=recheck_rate)

