"""Scoring of model completions: math answers (math-verify), multiple-choice letters, pass@k and maj@k.

    >>> from autodeco.evaluation.scoring import score_math, score_choice, pass_at_k, extract_answer
    >>> score_math("... so the answer is $\\boxed{\\frac{1}{2}}$.", "0.5")
    True
    >>> score_choice("The answer is (C).", "C")
    True
    >>> pass_at_k(n=16, c=4, k=8)            # unbiased estimator of pass@8 from 16 samples, 4 correct
    0.96...
    >>> extract_answer("Thus \\boxed{1,000 \\text{ cm}}.", "math")   # normalised, for majority voting
    '1000'

Math answers: the last ``\\boxed{...}`` (nested braces and ``\\boxed X`` allowed; an unterminated last box,
e.g. from a truncated generation, falls back to the previous one), else the last "answer is X" /
"Answer: X", else the last number. The answer is compared with math-verify, gold first
(``verify(parse(gold), parse(answer))``), so equivalent forms count: ``0.5`` = ``\\frac12``, ``2^{99}`` =
its digits, ``1,000`` = ``1000``, ``204 minutes`` = ``204``, sets in any order, intervals.

math-verify runs in a small pool of persistent worker processes (plain ``python scoring.py`` subprocesses:
they import only math-verify, never torch). Each comparison has a hard wall-clock limit (``timeout``,
default 5 s): math-verify's own ``signal.alarm`` timeouts, which only work in a main thread, run inside the
workers (whose main thread it is) and stop most slow expressions like ``9^{9^{9^{9}}}``; a worker stuck in
something they cannot interrupt (long C-level arithmetic) is killed at the deadline and replaced. Either
way the answer counts as wrong, and timeouts are not cached. That makes scoring safe from any thread and
bounds memory (each worker runs under a 4 GiB address-space limit). Use ``score_math_many`` to score many
completions at once: identical (gold, answer) pairs are verified once, results are cached, and all
workers work in parallel. The pool starts on first use (about a second or two, to import sympy) and is
shut down at exit or by ``close_math_verifier()``.

Scoring never raises on bad input (None, huge strings, malformed LaTeX): it returns False. It raises
RuntimeError only when the verifier itself cannot run (math-verify not installed), since silently
scoring every answer as wrong would ruin an evaluation.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from typing import Iterable, Sequence

__all__ = [
    "DEFAULT_MATH_TIMEOUT",
    "score_math",
    "score_math_many",
    "score_choice",
    "extract_answer",
    "extract_math_answer",
    "extract_choice_answer",
    "normalize_math_answer",
    "pass_at_k",
    "majority_correct",
    "close_math_verifier",
]

# Wall-clock seconds one (gold, answer) comparison may take, parsing included. Real answers verify in
# milliseconds; the limit only matters for pathological expressions.
DEFAULT_MATH_TIMEOUT = 5.0
# Answers longer than this are not answers (a runaway generation inside \boxed{...}); don't parse them.
MAX_ANSWER_CHARS = 1000
# How far past "\boxed{" to look for the closing brace: bounds the work on huge malformed completions.
_MAX_BOXED_SCAN = 5000
# Only the last few \boxed occurrences are tried; more would only matter for adversarial input.
_MAX_BOXED_TRIES = 20
CHOICE_LETTERS = "ABCDEFGHIJ"

# --------------------------------------------------------------------------------------------------
# Answer extraction and normalisation (pure string work, in the calling process)
# --------------------------------------------------------------------------------------------------

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)")
_ANSWER_IS_RE = re.compile(r"answer\**\s*(?:is\b\s*:?|:)", re.IGNORECASE)
_PLAIN_NUMBER = r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?"
_NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?")
_INLINE_MATH_RE = re.compile(r"\$+([^$]+)\$+|\\\((.+?)\\\)|\\\[(.+?)\\\]")
_PROSE_WORD_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{3,}")


def _braced(text: str, open_index: int) -> str | None:
    """The content of the brace group opening at text[open_index] ('{'), or None if it never closes."""
    depth = 0
    end = min(len(text), open_index + _MAX_BOXED_SCAN)
    i = open_index
    while i < end:
        ch = text[i]
        if ch == "\\":
            i += 2  # an escaped character (\{ or \}) never opens or closes a group
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[open_index + 1 : i]
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """The content of the last well-formed \\boxed{...} (or \\fbox{...}, or \\boxed X) in `text`."""
    tries = 0
    position = len(text)
    while tries < _MAX_BOXED_TRIES:
        start = max(text.rfind("\\boxed", 0, position), text.rfind("\\fbox", 0, position))
        if start < 0:
            return None
        tries += 1
        position = start
        match = _BOXED_RE.match(text, start)
        after = match.end()
        rest = text[after : after + _MAX_BOXED_SCAN]
        stripped = rest.lstrip()
        if stripped.startswith("{"):
            content = _braced(text, after + len(rest) - len(stripped))
            if content is not None:
                return content
            continue  # unterminated (truncated generation): the previous box is the answer
        if rest[:1].isspace():
            # "\boxed 5": the argument is the next token.
            token = re.match(r"[^\s$]+", stripped)
            if token:
                return token.group(0)
    return None


def _answer_after_phrase(text: str) -> str | None:
    """The X in the last "answer is X" / "Answer: X" (rest of that line, math segment or number)."""
    last = None
    for last in _ANSWER_IS_RE.finditer(text):
        pass
    if last is None:
        return None
    line = text[last.end() : last.end() + 500].split("\n", 1)[0].strip().strip("*").strip()
    math_segment = _INLINE_MATH_RE.search(line)
    if math_segment:
        return next(group for group in math_segment.groups() if group is not None)
    # Plain text: stop at the end of the sentence, then keep it only if it is not prose ("therefore 42").
    candidate = re.split(r"\.(?:\s|$)", line, maxsplit=1)[0].strip().rstrip(".").strip()
    if candidate and not _PROSE_WORD_RE.search(candidate):
        return candidate
    # Prose: "42 minutes" keeps its number; anything else ("not obvious", "compute 3+4 = 7 first") is
    # not an answer, and the caller falls back to the last number in the completion.
    number = re.match(rf"({_PLAIN_NUMBER})\s+[A-Za-z]", candidate)
    return number.group(1) if number else None


def extract_math_answer(completion: str) -> str | None:
    """The raw final answer of a math completion (not normalised), or None when there is none."""
    if not isinstance(completion, str) or not completion:
        return None
    answer = last_boxed(completion)
    if answer is None:
        answer = _answer_after_phrase(completion)
    if answer is None:
        last = None
        for last in _NUMBER_RE.finditer(completion):
            pass
        answer = last.group(0) if last else None
    if answer is None or not answer.strip():
        return None
    return answer.strip()


# Normalisation rules, applied in order. Each keeps the mathematical meaning (math-verify still decides
# equivalence); they exist so that majority voting groups "1,000 \text{ cm}." with "1000", and so that
# math-verify sees a clean expression.
_LEFT_RIGHT_RE = re.compile(r"\\(?:left|right)(?![A-Za-z])\s*")
_LATEX_SPACING_RE = re.compile(r"\\[,;:! ]|\\q?quad(?![A-Za-z])")
_DEGREES_RE = re.compile(r"\s*(?:\^\s*\{?\s*\\circ\s*\}?|°)\s*$")
_TRAILING_TEXT_UNIT_RE = re.compile(r"\s*\\(?:text|textbf|mbox|mathrm)\s*\{[^{}]*\}\s*$")
# Words separated by mandatory whitespace (no nested ambiguity, so no catastrophic backtracking); a
# joining word means the answer lists several values ("2 and 3"), which must stay intact.
_UNIT_WORD = r"(?!(?:and|or|to|of|by|times|plus|minus|over|per)\b)[A-Za-z]{2,}"
_WORD_UNITS_RE = re.compile(rf"({_PLAIN_NUMBER})\s+{_UNIT_WORD}(?:\.?\s+{_UNIT_WORD})*\.?")
_TEXT_WRAPPER_RE = re.compile(r"^\\(?:text|textbf|mbox|mathrm)\s*\{([^{}]*)\}$")
_THOUSANDS_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SIMPLE_FRACTION_RE = re.compile(r"(-?)\\frac\s*(?:\{\s*(\d+)\s*\}|(\d))\s*(?:\{\s*(\d+)\s*\}|(\d))")
_PLAIN_FRACTION_RE = re.compile(r"(-?)(\d+)/(\d+)")
_DECIMAL_RE = re.compile(r"-?\d+\.\d*")
# Whitespace is dropped unless it separates two letters ("\pi r" must not become "\pir").
_SPACE_RE = re.compile(r"(?<![A-Za-z])\s+|\s+(?![A-Za-z])")


def normalize_math_answer(answer: str) -> str:
    """A canonical string for a math answer: no spaces, \\left/\\right, $, trailing period, units or
    degree signs; integers without thousands commas; simple fractions as \\frac{a}{b}; decimals without
    trailing zeros. Two answers with the same normal form are equivalent (the converse needs math-verify)."""
    s = answer.strip()
    # Delimiters around the whole answer: $...$, \(...\), \[...\].
    for opener, closer in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(opener) and s.endswith(closer) and len(s) >= len(opener) + len(closer):
            s = s[len(opener) : len(s) - len(closer)].strip()
    s = s.replace("\\$", "").replace("$", "")  # currency signs and stray math delimiters
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\displaystyle", "")
    s = _LEFT_RIGHT_RE.sub("", s)
    s = _LATEX_SPACING_RE.sub(" ", s)
    s = s.replace("~", " ").strip()
    s = s.rstrip(".").strip()
    s = _DEGREES_RE.sub("", s)
    wrapped = _TEXT_WRAPPER_RE.match(s)
    if wrapped:
        s = wrapped.group(1).strip()  # a purely textual answer (\text{even}) keeps its text
    else:
        # A trailing \text{...} after something else is a unit: "5\text{ cm}" -> "5" (repeatedly: "\text{ m}\text{/s}").
        while True:
            stripped = _TRAILING_TEXT_UNIT_RE.sub("", s)
            if stripped == s or not stripped:
                break
            s = stripped
    words = _WORD_UNITS_RE.fullmatch(s)
    if words:
        s = words.group(1)  # "204 minutes" -> "204"
    s = s.rstrip(".").strip()
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    s = _SPACE_RE.sub("", s)
    fraction = _SIMPLE_FRACTION_RE.fullmatch(s) or _PLAIN_FRACTION_RE.fullmatch(s)
    if fraction:
        sign, *parts = fraction.groups()
        numerator, denominator = [p for p in parts if p is not None]
        # lstrip, not int(): int() refuses strings of more than 4300 digits.
        numerator, denominator = numerator.lstrip("0") or "0", denominator.lstrip("0") or "0"
        s = f"{sign}\\frac{{{numerator}}}{{{denominator}}}"
    elif _DECIMAL_RE.fullmatch(s):
        s = s.rstrip("0").rstrip(".") if "." in s else s
        if s in ("", "-"):
            s = "0"
    return s


# "answer" in any case, the letter itself case-sensitive: "the answer is a number" is not option A.
_ANSWER_LETTER_RE = re.compile(r"(?i:answer)\**\s*(?:is\b\s*:?|:)\s*\**\s*[\(\[]?\s*(?:\\text\{\s*)?([A-J])(?![A-Za-z])")
_STANDALONE_LETTER_RE = re.compile(r"(?<![A-Za-z0-9\\])([A-J])(?![A-Za-z0-9])")


def extract_choice_answer(completion: str) -> str | None:
    """The multiple-choice letter (A-J) a completion chose, or None.

    Order: the last \\boxed{C} (also \\boxed{(C)}, \\boxed{\\text{C}}, \\boxed{C. text}); the last "answer is
    (C)" / "Answer: C"; the last standalone capital letter A-J (skipping the words "A" and "I" in prose,
    as in "I think" or "A bit"). Letters are case-sensitive: a lowercase "c" is never an answer.
    """
    if not isinstance(completion, str) or not completion:
        return None
    boxed = last_boxed(completion)
    if boxed is not None:
        content = boxed.strip()
        wrapped = _TEXT_WRAPPER_RE.match(content)
        if wrapped:
            content = wrapped.group(1).strip()
        letter = re.match(r"\(?\s*([A-J])\s*\)?(?![A-Za-z])", content)
        if letter:
            return letter.group(1)
    last = None
    for last in _ANSWER_LETTER_RE.finditer(completion):
        pass
    if last is not None:
        return last.group(1)
    # Standalone letters: the last one is almost always near the end, so look at the tail first and
    # only scan a huge completion in full when the tail has none.
    windows = [completion[-20000:], completion] if len(completion) > 20000 else [completion]
    for window in windows:
        for candidate in reversed(list(_STANDALONE_LETTER_RE.finditer(window))):
            letter = candidate.group(1)
            following = window[candidate.end() : candidate.end() + 3]
            if letter in "AI" and re.match(r"(?:\s+[a-z]|')", following):
                continue  # the English word "A" / "I", not an option
            return letter
    return None


def extract_exact_answer(completion: str) -> str | None:
    """The content of the last \\boxed{...} with all whitespace removed (None without a box): what kind "exact"
    compares, character for character, with the gold answer."""
    if not isinstance(completion, str):
        return None
    boxed = last_boxed(completion)
    if boxed is None or len(boxed) > MAX_ANSWER_CHARS:
        return None
    return "".join(boxed.split()) or None


def score_exact(completion: str, gold: str) -> bool:
    """Whether the last \\boxed{...} equals `gold` exactly, whitespace aside (e.g. "23+35" for "\\boxed{23 + 35}").
    For answers that must be checked as written (an expression naming a choice), not up to equivalence."""
    if not isinstance(gold, str) or not gold.strip():
        raise ValueError(f"score_exact: gold must be a non-empty string, got {gold!r}.")
    answer = extract_exact_answer(completion)
    return answer is not None and answer == "".join(gold.split())


def extract_answer(completion: str, kind: str) -> str | None:
    """The normalised final answer, for majority voting: kind "math" → normalize_math_answer of the
    extracted answer; kind "choice" → the letter; kind "exact" → the last box without whitespace. None when
    no answer can be found (or on bad input)."""
    if kind not in ("math", "choice", "exact"):
        raise ValueError(f"Unknown answer kind {kind!r}: use 'math', 'choice' or 'exact'.")
    try:
        if kind == "choice":
            return extract_choice_answer(completion)
        if kind == "exact":
            return extract_exact_answer(completion)
        answer = extract_math_answer(completion)
        if answer is None or len(answer) > MAX_ANSWER_CHARS:
            return None
        normalized = normalize_math_answer(answer)
        return normalized or None
    except Exception:  # never let a weird completion break an evaluation
        return None


def score_choice(completion: str, gold: str) -> bool:
    """Whether the completion's multiple-choice letter equals the gold letter (case-sensitive)."""
    try:
        if not isinstance(gold, str):
            return False
        gold_letter = gold.strip().strip("()").strip()
        if len(gold_letter) != 1 or gold_letter not in CHOICE_LETTERS:
            return False
        return extract_choice_answer(completion) == gold_letter
    except Exception:
        return False


# --------------------------------------------------------------------------------------------------
# pass@k and maj@k
# --------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimator from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i) (Chen et al., 2021), which never forms the huge binomial
    coefficients, so it is exact to float precision for any n.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"pass_at_k: {name} must be an int, got {value!r}.")
    if n < 1:
        raise ValueError(f"pass_at_k: n (samples per problem) must be >= 1, got {n}.")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c (correct samples) must be in [0, n={n}], got {c}.")
    if not 1 <= k <= n:
        raise ValueError(
            f"pass_at_k: k must be in [1, n={n}], got k={k}; pass@{k} needs at least {k} samples per problem "
            f"(sample more, or drop k={k})."
        )
    if n - c < k:
        return 1.0  # every k-subset contains a correct sample
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """maj@k: whether the plurality answer is correct.

    `answers` are normalised answers (from extract_answer), `correct` the per-sample scores. None (no
    answer) never wins; ties go to the answer that reached the top count first. The winning group's
    correctness is that of its first sample (equal normalised answers score the same). No answer at all → False.
    """
    if len(answers) != len(correct):
        raise ValueError(f"majority_correct: {len(answers)} answers but {len(correct)} correctness flags.")
    counts: Counter[str] = Counter()
    first_index: dict[str, int] = {}
    best, best_count = None, 0
    for index, answer in enumerate(answers):
        if answer is None:
            continue
        counts[answer] += 1
        first_index.setdefault(answer, index)
        if counts[answer] > best_count:  # strictly greater: an earlier leader keeps a tie
            best, best_count = answer, counts[answer]
    return best is not None and bool(correct[first_index[best]])


# --------------------------------------------------------------------------------------------------
# math-verify in worker processes
# --------------------------------------------------------------------------------------------------

_WORKER_FLAG = "--autodeco-math-verify-worker"
_WORKER_START_TIMEOUT = 120.0  # importing sympy on a loaded machine can take a while
_WORKER_MEMORY_LIMIT = 4 << 30  # bytes of address space per worker: a runaway 9^9^9^9 fails fast instead
_MAX_START_FAILURES = 3
_CACHE_SIZE = 100_000


class _Worker:
    """One `python scoring.py --autodeco-math-verify-worker` process, talking JSON lines over pipes."""

    def __init__(self, messages: queue.Queue):
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), _WORKER_FLAG],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
            text=True, encoding="utf-8", errors="replace", env=env,
        )
        self.ready = False
        self.started = time.monotonic()
        # A reader thread per worker turns blocking pipe reads into queue messages, so the pool can wait
        # on all workers at once with a timeout (portable, unlike select() on pipes).
        self._reader = threading.Thread(target=self._read, args=(messages,), daemon=True)
        self._reader.start()

    def _read(self, messages: queue.Queue) -> None:
        try:
            for line in self.process.stdout:
                messages.put((self, line))
        except (OSError, ValueError):
            pass
        finally:
            messages.put((self, None))  # end of stream: the worker exited or was killed

    def send(self, message: dict) -> None:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def kill(self) -> None:
        try:
            self.process.kill()
            self.process.wait(timeout=10)
        except Exception:
            pass
        for stream in (self.process.stdin, self.process.stdout):
            try:
                stream.close()
            except Exception:
                pass


class _MathVerifyPool:
    """Persistent math-verify workers with a hard per-comparison wall-clock limit.

    One batch runs at a time (a lock), so it is safe to call from any number of threads; inside a batch
    all workers run in parallel. A worker that overruns its deadline or dies is killed and replaced.
    """

    def __init__(self, size: int | None = None):
        self.size = size or max(1, min(4, os.cpu_count() or 1))
        self._lock = threading.Lock()
        self._messages: queue.Queue = queue.Queue()
        self._workers: list[_Worker] = []
        self._sequence = itertools.count()
        self._pid = os.getpid()
        self._start_failures = 0

    def _check_fork(self) -> None:
        # After os.fork() the child shares the parent's pipes: start its own workers, leave the parent's alone.
        if os.getpid() != self._pid:
            self._pid = os.getpid()
            self._messages = queue.Queue()
            self._workers = []

    def _spawn(self) -> _Worker:
        worker = _Worker(self._messages)
        self._workers.append(worker)
        return worker

    def _replace(self, worker: _Worker) -> None:
        if worker in self._workers:
            self._workers.remove(worker)
        worker.kill()

    def close(self) -> None:
        # Bounded wait for a running batch: at interpreter exit a daemon thread may hold the lock forever,
        # and the workers must be killed regardless.
        acquired = self._lock.acquire(timeout=10)
        try:
            for worker in list(self._workers):
                self._replace(worker)
        finally:
            if acquired:
                self._lock.release()

    def run(self, pairs: Sequence[tuple[str, str]], timeout: float, inner_timeout: int | None = None) -> list[bool | None]:
        """verify(parse(gold), parse(answer)) for each pair: True/False, or None when it timed out or crashed.

        `timeout`: hard wall-clock seconds per pair (the worker is killed past it). `inner_timeout`: whole
        seconds for math-verify's own signal-based limits inside the worker (default timeout/2, at least
        1; 0 disables them). Those stop most slow sympy work without a respawn; the hard deadline catches
        what they can't interrupt (long C-level arithmetic).
        """
        results: list[bool | None] = [None] * len(pairs)
        if not pairs:
            return results
        if inner_timeout is None:
            inner_timeout = max(1, int(timeout / 2))
        with self._lock:
            self._check_fork()
            pending = deque(range(len(pairs)))
            in_flight: dict[_Worker, tuple[int, int, float]] = {}  # worker -> (sequence, pair index, deadline)
            try:
                while len(self._workers) < min(self.size, len(pairs)):
                    self._spawn()
                while pending or in_flight:
                    for worker in list(self._workers):
                        if not pending:
                            break
                        if worker.ready and worker not in in_flight:
                            index = pending.popleft()
                            sequence = next(self._sequence)
                            gold, answer = pairs[index]
                            try:
                                worker.send({"seq": sequence, "gold": gold, "answer": answer, "timeout": inner_timeout})
                            except (OSError, ValueError):
                                pending.appendleft(index)  # its pipe broke: retry the pair on a fresh worker
                                self._replace(worker)
                                self._spawn()
                                continue
                            in_flight[worker] = (sequence, index, time.monotonic() + timeout)
                    self._wait_one(in_flight, results, len(pending))
            except BaseException:
                # Interrupted mid-batch (KeyboardInterrupt, a startup error): busy workers would answer
                # stale requests later, so replace them.
                for worker in list(in_flight):
                    self._replace(worker)
                raise
        return results

    def _wait_one(self, in_flight: dict, results: list, n_pending: int) -> None:
        """Handle one worker message (or a deadline), updating in_flight and results."""
        now = time.monotonic()
        deadlines = [deadline for _, _, deadline in in_flight.values()]
        deadlines += [w.started + _WORKER_START_TIMEOUT for w in self._workers if not w.ready]
        wait = max(0.0, min(deadlines) - now) if deadlines else 1.0
        try:
            worker, line = self._messages.get(timeout=wait)
        except queue.Empty:
            worker, line = None, None
        if worker is not None and worker in self._workers:
            if line is None:  # the worker died
                task = in_flight.pop(worker, None)
                if task is not None:
                    results[task[1]] = None  # it crashed on this pair (e.g. out of memory): not correct
                elif not worker.ready:
                    self._start_failures += 1
                    if self._start_failures >= _MAX_START_FAILURES:
                        self._replace(worker)
                        raise RuntimeError(
                            f"math-verify worker processes keep exiting at start-up ({sys.executable} "
                            f"{os.path.abspath(__file__)} {_WORKER_FLAG}); see the error printed above."
                        )
                self._replace(worker)
                if n_pending or in_flight:
                    self._spawn()
            else:
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    message = None
                if not isinstance(message, dict):
                    message = {}  # stray output (a library printing to stdout): ignore
                if message.get("ready"):
                    worker.ready = True
                    self._start_failures = 0
                elif "error" in message:
                    self._replace(worker)
                    raise RuntimeError(f"math-verify is not usable in the scoring worker: {message['error']}")
                elif worker in in_flight and message.get("seq") == in_flight[worker][0]:
                    _, index, _ = in_flight.pop(worker)
                    results[index] = None if message.get("timed_out") else bool(message.get("ok"))
        now = time.monotonic()
        for worker, (_, index, deadline) in list(in_flight.items()):
            if now >= deadline:
                del in_flight[worker]
                results[index] = None  # timed out
                self._replace(worker)
                self._spawn()
        for worker in list(self._workers):
            if not worker.ready and now >= worker.started + _WORKER_START_TIMEOUT:
                self._replace(worker)
                raise RuntimeError(
                    f"A math-verify worker did not start within {_WORKER_START_TIMEOUT:.0f} s "
                    f"(importing sympy/math-verify); is the machine overloaded?"
                )


_POOL = _MathVerifyPool()
_CACHE: dict[tuple[str, str], bool] = {}
_CACHE_LOCK = threading.Lock()
atexit.register(_POOL.close)


def close_math_verifier() -> None:
    """Stop the math-verify worker processes now (they restart on the next score_math call)."""
    _POOL.close()


def _prepare_math(completion, gold) -> tuple[str, str] | None:
    """(normalised gold, normalised answer) to verify, or None when the answer is missing or unusable."""
    if not isinstance(gold, str) or not gold.strip():
        return None
    answer = extract_math_answer(completion)
    if answer is None or len(answer) > MAX_ANSWER_CHARS:
        return None
    normalized_answer = normalize_math_answer(answer)
    if not normalized_answer:
        return None
    return normalize_math_answer(gold), normalized_answer


def score_math_many(pairs: Iterable[tuple[str, str]], *, timeout: float = DEFAULT_MATH_TIMEOUT) -> list[bool]:
    """score_math for many (completion, gold) pairs at once: deduplicated, cached and run on all workers.

    `timeout` is the wall-clock limit in seconds for each distinct comparison; overrunning counts as wrong.
    """
    pairs = list(pairs)
    scores = [False] * len(pairs)
    to_verify: dict[tuple[str, str], list[int]] = {}
    for index, pair in enumerate(pairs):
        try:
            completion, gold = pair
            prepared = _prepare_math(completion, gold)
        except Exception:
            continue
        if prepared is None:
            continue
        if prepared[0] == prepared[1]:
            scores[index] = True  # identical normal forms: no need to ask math-verify
            continue
        with _CACHE_LOCK:
            cached = _CACHE.get(prepared)
        if cached is not None:
            scores[index] = cached
        else:
            to_verify.setdefault(prepared, []).append(index)
    if to_verify:
        keys = list(to_verify)
        verdicts = _POOL.run(keys, timeout)
        with _CACHE_LOCK:
            if len(_CACHE) + len(keys) > _CACHE_SIZE:
                _CACHE.clear()
            for key, verdict in zip(keys, verdicts):
                if verdict is not None:  # a timeout may be load, not the expression: don't cache it
                    _CACHE[key] = verdict
        for key, verdict in zip(keys, verdicts):
            for index in to_verify[key]:
                scores[index] = bool(verdict)
    return scores


def score_math(completion: str, gold: str, *, timeout: float = DEFAULT_MATH_TIMEOUT) -> bool:
    """Whether the completion's final math answer is equivalent to `gold` (math-verify, gold first).

    Never hangs (at most about `timeout` seconds of verification) and never raises on bad input.
    """
    return score_math_many([(completion, gold)], timeout=timeout)[0]


# --------------------------------------------------------------------------------------------------
# The worker process itself (run as a script: imports nothing from autodeco, so it starts fast)
# --------------------------------------------------------------------------------------------------


def _worker_main() -> None:
    """Read {"seq", "gold", "answer", "timeout"} JSON lines on stdin; write {"seq", "ok"} lines on stdout."""
    # Running as a script puts this file's folder first on sys.path; its module names (benchmarks, ...)
    # must not shadow anything math-verify or sympy imports.
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    out = sys.stdout
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = _WORKER_MEMORY_LIMIT if hard == resource.RLIM_INFINITY else min(_WORKER_MEMORY_LIMIT, hard)
        if soft == resource.RLIM_INFINITY or soft > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass  # no resource module (Windows) or not allowed: the wall-clock limit still applies
    try:
        import functools
        import logging

        from math_verify import parse, verify

        # Timeouts are expected on pathological answers; the parent already counts them as wrong.
        logging.getLogger("math_verify").setLevel(logging.ERROR)
        logging.getLogger("latex2sympy2_extended").setLevel(logging.ERROR)
    except BaseException as error:  # noqa: BLE001 - report any import failure to the parent
        out.write(json.dumps({"error": f"{type(error).__name__}: {error}"}) + "\n")
        out.flush()
        return

    @functools.lru_cache(maxsize=4096)
    def parsed(text: str, timeout: int):
        # "$...$" makes math-verify read the whole answer as one LaTeX expression (its normalisation
        # handles \text units, \%, degrees, sets, intervals); plain expressions are tried too.
        return parse(f"${text}$", parsing_timeout=timeout)

    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        try:
            request = json.loads(line)
        except json.JSONDecodeError:
            continue
        ok = False
        start = time.monotonic()
        timeout = 0
        try:
            timeout = int(request.get("timeout", 5))
            gold = parsed(request["gold"], timeout)
            answer = parsed(request["answer"], timeout)
            ok = bool(gold) and bool(answer) and bool(verify(gold, answer, timeout_seconds=timeout))
        except BaseException:  # noqa: BLE001 - MemoryError, math-verify's TimeoutException, anything: wrong
            ok = False
        # math-verify turns its own timeouts into a plain False; tell the parent, which doesn't cache them
        # (on a loaded machine the same comparison may well succeed next time).
        timed_out = not ok and timeout > 0 and time.monotonic() - start >= timeout
        out.write(json.dumps({"seq": request.get("seq"), "ok": ok, "timed_out": timed_out}) + "\n")
        out.flush()


if __name__ == "__main__" and _WORKER_FLAG in sys.argv[1:]:
    _worker_main()
