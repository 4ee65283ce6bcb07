"""The math-verify worker process of autodeco.evaluation.verify (a script, not a module to import).

    python _verify_worker.py --autodeco-math-verify-worker     # started by verify._MathVerifyPool, never by hand

Reads {"seq", "gold", "answer", "timeout"} JSON lines on stdin and writes {"seq", "ok", "timed_out"} lines on
stdout (first a {"ready": true} line, or {"error": ...} when math-verify cannot be imported). It imports only
the standard library and math-verify, never autodeco or torch, so it starts in a second or two; that is why it
is run by path as a script rather than as `python -m autodeco...` (which would import the package, and torch).
"""

import functools
import json
import logging
import os
import sys
import time

WORKER_FLAG = "--autodeco-math-verify-worker"  # verify._WORKER_FLAG
_WORKER_MEMORY_LIMIT = 4 << 30  # bytes of address space per worker: a runaway 9^9^9^9 fails fast instead


def serve() -> None:
    """Read {"seq", "gold", "answer", "timeout"} JSON lines on stdin; write {"seq", "ok"} lines on stdout."""
    # Running as a script puts this file's folder first on sys.path; its module names (benchmarks, ...)
    # must not shadow anything math-verify or sympy imports.
    if sys.path and os.path.abspath(sys.path[0] or ".") == os.path.dirname(os.path.abspath(__file__)):
        sys.path.pop(0)
    out = sys.stdout
    try:
        import resource  # POSIX only: imported here so a platform without it still runs the worker

        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = _WORKER_MEMORY_LIMIT if hard == resource.RLIM_INFINITY else min(_WORKER_MEMORY_LIMIT, hard)
        if soft == resource.RLIM_INFINITY or soft > limit:
            resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass  # no resource module (Windows) or not allowed: the wall-clock limit still applies
    try:
        from math_verify import parse, verify  # optional dependency: a missing one is reported to the parent

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




if __name__ == "__main__" and WORKER_FLAG in sys.argv[1:]:
    serve()
