"""Verifiable rewards for policy optimisation: the evaluation's scorers as rewards, or a user's Python function.

    fn = resolve_reward("math")                          # or "choice", "exact", "auto" (by each problem's kind)
    fn = load_reward_fn("my_rewards.py:reward")          # or "package.module:reward"
    rewards = compute_rewards(fn, problems, completions)  # one float per (problem, completion) pair

A reward function is called as `fn(problem, completion) -> float` (a bool counts as 0 / 1), with `problem` an
autodeco.evaluation.Problem (.id, .problem, .gt, .kind, .benchmark) and `completion` a Completion (.text,
.token_ids, .temperatures, .top_ps, .finished). The built-in scorers are exactly `autodeco eval`'s (math-verify
for "math", verified in one batch). A function that raises, or returns a non-number or NaN, stops the run with
a ValueError naming the problem id. See docs/training.md (reward objective).
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
from pathlib import Path
from typing import Callable, Sequence

from autodeco.evaluation.benchmarks import KINDS, Problem, score, score_many
from autodeco.evaluation.generation import Completion

__all__ = ["REWARDS", "RewardFn", "compute_rewards", "load_reward_fn", "resolve_reward"]

RewardFn = Callable[[Problem, Completion], float]
# Built-in rewards: a scorer of `autodeco eval` (1.0 correct, 0.0 not); "auto" scores each problem by its kind.
REWARDS = ("auto", *KINDS)


class _Scorer:
    """A built-in reward: 1.0 when `autodeco eval` would count the completion correct. `kind` None: the problem's."""

    def __init__(self, kind: str | None):
        self.kind = kind
        self.__name__ = f"reward '{kind or 'auto'}'"

    def _as(self, problem: Problem) -> Problem:
        if self.kind is None or problem.kind == self.kind:
            return problem
        return Problem(problem.id, problem.problem, problem.gt, problem.benchmark, self.kind)

    def __call__(self, problem: Problem, completion: Completion) -> float:
        return float(score(self._as(problem), completion.text))

    def many(self, problems: Sequence[Problem], completions: Sequence[Completion]) -> list[float]:
        # One math-verify batch for the whole step (deduplicated, cached), as the evaluation scores.
        return [float(v) for v in score_many([self._as(p) for p in problems], [c.text for c in completions])]


def resolve_reward(reward: str = "auto", reward_fn: RewardFn | str | None = None) -> RewardFn:
    """The reward function of a run: `reward_fn` (a callable or a "path.py:func" / "module:func" spec) when
    given, else the built-in scorer `reward` (one of REWARDS)."""
    if reward_fn is not None:
        return load_reward_fn(reward_fn) if isinstance(reward_fn, str) else _check_callable(reward_fn, "reward_fn")
    if reward not in REWARDS:
        raise ValueError(f"reward (--reward) must be one of {', '.join(REWARDS)}, got {reward!r}; or pass a "
                         "function with --reward-fn path/to/file.py:func.")
    return _Scorer(None if reward == "auto" else reward)


def _check_callable(fn, spec: str) -> RewardFn:
    if not callable(fn):
        raise ValueError(f"--reward-fn {spec}: {type(fn).__name__} object is not callable; name a function "
                         "fn(problem, completion) -> float.")
    return fn


def load_reward_fn(spec: str) -> RewardFn:
    """`path/to/file.py:func` or `package.module:func` -> the function (ValueError / FileNotFoundError naming it)."""
    target, sep, name = str(spec).rpartition(":")
    if not sep or not target or not name.isidentifier():
        raise ValueError(f"--reward-fn {spec!r}: expected FILE.py:FUNCTION or MODULE:FUNCTION, e.g. "
                         "rewards.py:reward.")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"--reward-fn {spec!r}: file '{path}' does not exist; pass FILE.py:FUNCTION.")
        module_spec = importlib.util.spec_from_file_location(f"autodeco_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: any error in it is theirs to fix, reported in one line
            raise ValueError(f"--reward-fn {spec!r}: importing '{path}' failed ({type(exc).__name__}: {exc}).") from exc
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ValueError(f"--reward-fn {spec!r}: cannot import module '{target}' ({exc}).") from exc
    if not hasattr(module, name):
        raise ValueError(f"--reward-fn {spec!r}: '{target}' has no attribute '{name}'.")
    return _check_callable(getattr(module, name), spec)


def _number(value, fn, problem: Problem) -> float:
    ok = isinstance(value, numbers.Real) and not isinstance(value, complex)
    number = float(value) if ok else math.nan
    if not ok or not math.isfinite(number):
        raise ValueError(f"reward function {getattr(fn, '__name__', fn)!r} returned {value!r} "
                         f"({type(value).__name__}) for problem id {problem.id!r}; it must return a finite number "
                         "(or a bool).")
    return number


def compute_rewards(fn: RewardFn, problems: Sequence[Problem], completions: Sequence[Completion]) -> list[float]:
    """fn(problem, completion) for each pair, as floats; a raise or a non-finite / non-number result is a ValueError
    naming the problem id."""
    if len(problems) != len(completions):
        raise ValueError(f"compute_rewards: {len(problems)} problems but {len(completions)} completions.")
    if isinstance(fn, _Scorer):
        return fn.many(problems, completions)
    rewards = []
    for problem, completion in zip(problems, completions):
        try:
            value = fn(problem, completion)
        except Exception as exc:  # the user's function: report which problem broke it, in one line
            raise ValueError(f"reward function {getattr(fn, '__name__', fn)!r} raised {type(exc).__name__}: {exc} "
                             f"for problem id {problem.id!r}.") from exc
        rewards.append(_number(value, fn, problem))
    return rewards
