"""Metrics of an evaluation: pass@k (unbiased estimator), maj@k (plurality vote), and the per-cell summary.

    >>> from autodeco.evaluation.metrics import pass_at_k, majority_correct
    >>> pass_at_k(n=16, c=4, k=8)            # unbiased estimator of pass@8 from 16 samples, 4 correct
    0.96...

compute_metrics turns one (method, benchmark)'s records into its cell of results.json: pass@1 as mean +- sample
std (ddof=1) over seeds, pass@k over all n x seeds samples, maj@k over the first k samples (seed-major),
token-weighted mean T and P, token counts, truncation share and seconds. average_metrics is the paper's Avg
column. What each number means: docs/evaluation.md.
"""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Sequence

__all__ = ["pass_at_k", "majority_correct", "compute_metrics", "average_metrics", "sample_std"]


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


def sample_std(values: list[float]) -> float:
    """Sample standard deviation (ddof=1); 0 for fewer than two values."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


def compute_metrics(records_by_problem: list[list[dict]], *, n: int, seeds: int, ks: Sequence[int]) -> dict:
    """Metrics of one (method, benchmark) from its records: records_by_problem[i] = problem i's records in seed
    order (a deterministic method: one record standing for every seed and sample)."""
    per_seed = [[] for _ in range(seeds)]
    pass_k = {k: [] for k in ks}
    maj_k = {k: [] for k in ks}
    t_sum = p_sum = 0.0
    t_count = p_count = tokens = completions = unfinished = 0
    seconds = 0.0
    for records in records_by_problem:
        correct: list[bool] = []
        answers: list[str | None] = []
        for s in range(seeds):
            record = records[0] if records[0].get("deterministic") else records[s]
            c = list(record["correct"]) * (n if record.get("deterministic") else 1)
            a = list(record["answers"]) * (n if record.get("deterministic") else 1)
            if len(c) != n:
                raise ValueError(f"record {record['key']} holds {len(c)} samples, expected n={n}")
            per_seed[s].append(sum(c) / n)
            correct += c
            answers += a
        total = n * seeds
        for k in ks:
            pass_k[k].append(pass_at_k(total, sum(correct), k))
            maj_k[k].append(bool(majority_correct(answers[:k], correct[:k])))
        for record in records:
            t_sum += record["temperature_sum"]
            t_count += record["temperature_tokens"]
            p_sum += record["top_p_sum"]
            p_count += record["top_p_tokens"]
            tokens += sum(record["tokens"])
            completions += len(record["tokens"])
            unfinished += sum(1 for f in record.get("finished", ()) if not f)
            seconds += record["seconds"]
    seed_means = [sum(v) / len(v) for v in per_seed]
    return {
        "pass@1": {"mean": sum(seed_means) / len(seed_means), "std": sample_std(seed_means), "per_seed": seed_means},
        "pass@k": {str(k): sum(v) / len(v) for k, v in pass_k.items()},
        "maj@k": {str(k): sum(v) / len(v) for k, v in maj_k.items()},
        "mean_temperature": t_sum / t_count if t_count else None,
        "mean_top_p": p_sum / p_count if p_count else None,
        "tokens": tokens / completions if completions else 0.0,
        "total_tokens": tokens,
        "completions": completions,
        "truncated": unfinished / completions if completions else 0.0,
        "seconds": seconds,
        "problems": len(records_by_problem),
        "n": n,
        "seeds": seeds,
    }


def average_metrics(cells: list[dict], ks: Sequence[int]) -> dict:
    """The paper's Avg column: the unweighted mean over benchmarks; its std over seeds of per-seed averages."""
    seeds = min(len(c["pass@1"]["per_seed"]) for c in cells)
    per_seed = [sum(c["pass@1"]["per_seed"][s] for c in cells) / len(cells) for s in range(seeds)]
    mean = lambda values: sum(values) / len(values)
    return {
        "pass@1": {"mean": mean([c["pass@1"]["mean"] for c in cells]), "std": sample_std(per_seed), "per_seed": per_seed},
        "pass@k": {str(k): mean([c["pass@k"][str(k)] for c in cells]) for k in ks},
        "maj@k": {str(k): mean([c["maj@k"][str(k)] for c in cells]) for k in ks},
        "mean_temperature": weighted_mean([c for c in cells], "mean_temperature"),
        "mean_top_p": weighted_mean([c for c in cells], "mean_top_p"),
        "tokens": sum(c["total_tokens"] for c in cells) / max(1, sum(c["completions"] for c in cells)),
        "total_tokens": sum(c["total_tokens"] for c in cells),
        "completions": sum(c["completions"] for c in cells),
        "truncated": sum(c["truncated"] * c["completions"] for c in cells) / max(1, sum(c["completions"] for c in cells)),
        "seconds": sum(c["seconds"] for c in cells),
    }


def weighted_mean(cells: list[dict], key: str) -> float | None:
    """The cells' `key` averaged with their total_tokens as weights (None when no cell has a value)."""
    pairs = [(c[key], c["total_tokens"]) for c in cells if c[key] is not None and c["total_tokens"]]
    if not pairs:
        return None
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
