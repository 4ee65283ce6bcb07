"""math-verify in a pool of worker processes: score_math, score_math_many, close_math_verifier.

    >>> from autodeco.evaluation.verify import score_math
    >>> score_math("... so the answer is $\\boxed{\\frac{1}{2}}$.", "0.5")
    True

The extracted, normalised answer (autodeco.evaluation.answers) is compared with math-verify, gold first. The
workers are plain `python _verify_worker.py` processes (math-verify only, never torch), started on first use and
stopped at exit or by close_math_verifier(). Each comparison has a hard wall-clock limit (`timeout`, default
5 s; a stuck worker is killed and replaced) and each worker a 4 GiB address-space limit; a timeout counts as
wrong and is not cached. score_math_many deduplicates, caches and runs all workers in parallel. Scoring never
raises on bad input; it raises RuntimeError only when math-verify cannot run at all. More: docs/evaluation.md.
"""

from __future__ import annotations

import atexit
import itertools
import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections import deque
from typing import Iterable, Sequence

from autodeco.evaluation.answers import MAX_ANSWER_CHARS, extract_math_answer, normalize_math_answer

__all__ = ["DEFAULT_MATH_TIMEOUT", "score_math", "score_math_many", "close_math_verifier"]

# Wall-clock seconds one (gold, answer) comparison may take, parsing included. Real answers verify in
# milliseconds; the limit only matters for pathological expressions.
DEFAULT_MATH_TIMEOUT = 5.0
# The worker script, run by path so it imports math-verify only (not autodeco, not torch): it starts fast.
_WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_verify_worker.py")
_WORKER_FLAG = "--autodeco-math-verify-worker"  # the worker script runs only when given it
_WORKER_START_TIMEOUT = 120.0  # importing sympy on a loaded machine can take a while
_MAX_START_FAILURES = 3
_CACHE_SIZE = 100_000


class _Worker:
    """One `python _verify_worker.py --autodeco-math-verify-worker` process, talking JSON lines over pipes."""

    def __init__(self, messages: queue.Queue):
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        self.process = subprocess.Popen(
            [sys.executable, _WORKER_SCRIPT, _WORKER_FLAG],
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
                            f"{_WORKER_SCRIPT} {_WORKER_FLAG}); see the error printed above."
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
    Raises ValueError when a gold is not a non-empty string (checked for every pair before any work).
    """
    pairs = list(pairs)
    for pair in pairs:  # a broken gold is an error, never a silent False (load_benchmark gives strings)
        gold = pair[1] if isinstance(pair, (tuple, list)) and len(pair) == 2 else None
        if not isinstance(gold, str) or not gold.strip():
            raise ValueError(f"score_math: gold must be a non-empty string, got {gold!r} ({type(gold).__name__}); "
                             "pass str(gold), or load the benchmark with load_benchmark (it converts numbers).")
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

    Never hangs (at most about `timeout` seconds of verification) and never raises on a bad completion; a gold
    that is not a non-empty string is a ValueError (an int gold would otherwise be a silent False).
    """
    return score_math_many([(completion, gold)], timeout=timeout)[0]
