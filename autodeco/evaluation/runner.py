"""Evaluation runner: sample every (method, benchmark, problem, seed), score it, and write the paper's tables.

    from autodeco.evaluation.runner import run_evaluation
    from autodeco.evaluation.benchmarks import load_benchmark
    from autodeco.evaluation.methods import parse_methods

    results = run_evaluation(model, tokenizer, [load_benchmark("aime24.jsonl")],
                             parse_methods("greedy, default, oracle, meanshift, autodeco"),
                             n=16, seeds=8, ks=(1, 16), output_dir="runs/eval")

CLI: `autodeco eval --model DIR --benchmarks FILE... --methods LIST --output-dir DIR` (autodeco/evaluation/eval_cli.py);
several processes: `accelerate launch -m autodeco.evaluation.eval_cli eval ...`.

What is computed
----------------
A *work item* is one (method, benchmark, problem, seed): `n` samples of one prompt, generated in one `generate` call
(`num_return_sequences`, at most `batch_size` sequences per call, KV cache on), seeded with
`torch.manual_seed(sampling_seed(...))`, a hash of (seed, method spec, benchmark, problem id, seed index). So each item
is reproducible on its own, whatever else runs and on however many processes. Greedy decoding is deterministic: it
runs once per problem (seed 0, one sequence; up to `batch_size` problems per call, left padded) and that completion
stands for all n x seeds samples (std over seeds is 0).

Packed sampling (`pack_samples=True`, CLI `--pack-samples`; off by default): for small models, where the per-call
overhead of `generate` dominates, sampled items of the same method, benchmark, seed index and n are grouped into
*units* of consecutive problems (problem order), at most max(1, batch_size // n) problems per unit, and each unit is
ONE `generate` call over its left-padded prompts with `num_return_sequences=n`, seeded once with
`torch.manual_seed(sampling_seed(seed, method spec, benchmark, <first problem id of the unit>, seed index))` (the
`sampling_seed` every record of the unit stores). A problem's samples then depend on its unit, so packed results are
reproducible given the same batch_size and item list (the problems, methods, n, seeds), not item by item; the units
are formed over the phase's whole item list (not only the pending items), so a resumed run reproduces the
uninterrupted one (a unit with any item missing is regenerated whole; only the missing records are written), and they
do not depend on the number of processes. `pack_samples` and `batch_size` enter the settings hash (the record key)
only in packed mode, so packed and unpacked records never mix and unpacked keys are unchanged. Greedy items, the
oracle's phases and meanshift work as without packing.

Metrics per (method, benchmark), in results.json (fractions) and results.md (percent):
- pass@1: the mean correctness of the n samples of each problem, averaged over problems, for each seed; reported as
  mean +- sample std (ddof=1) over the seeds.
- pass@k: the unbiased estimator (scoring.pass_at_k) over all N = n x seeds samples of a problem, averaged over
  problems (all samples: the lowest-variance unbiased estimate). Needs k <= n x seeds, checked before any work.
- maj@k: plurality vote (scoring.majority_correct) over the first k samples of a problem (seed 0's n samples first,
  then seed 1's, ...), averaged over problems.
- mean_temperature / mean_top_p: token-weighted means over generated tokens (up to and including EOS) of the values
  each token was sampled with: the heads' for AutoDeco, the constants for static methods, EDT's own per-token T for
  EDT, and for greedy the heads' predictions (labelled: greedy does not use them).
- tokens: mean generated tokens per completion; total_tokens; seconds: generation + scoring wall time summed over
  work items (process seconds: under several processes it exceeds the elapsed time).

`oracle` (the paper's expert-tuned static baseline, tuned here on the evaluated problems themselves, so labelled
"test-set oracle (T=..., P=...)"): static T in ORACLE_TEMPERATURES at P=1, then P in ORACLE_TOP_PS at the best T,
each with `oracle_n` samples x `oracle_seeds` seeds (default n, seeds). The best is chosen *per benchmark* by mean
pass@1 (the paper tunes per benchmark); ties go to the larger value (closer to the model's own distribution). If
oracle_n/oracle_seeds are smaller than n/seeds, the chosen (T, P) is then rerun with n x seeds and that is reported.

`meanshift`: static sampling at the mean T and mean P of the heads (rounded to 3 decimals), over the supervised tokens
of `calibration_files` (diagnostics.meanshift_from_calibration) when given, else over the tokens AutoDeco generated in
this evaluation (all benchmarks pooled; the `autodeco` items are run first if not requested). The source is reported.

Files in `output_dir`
---------------------
- records.jsonl: one JSON line per finished work item (completions, correctness, extracted answers, token counts,
  T/P sums and means, seconds), appended, flushed and fsynced as each finishes. A rerun with the same arguments skips
  every item whose key (method spec, benchmark, problem id, seed, n, prompt and a hash of the generation settings and
  model) is present, so a killed run loses only the work in flight. A torn last line (killed mid-write) is cut off on
  the next run. `batch_size` is not part of the key (except with packed sampling): records are reused across batch
  sizes (they are samples of the same distribution; bit-identical reruns need the same batch size).
- results.json, results.md, *.png (report.py), meanshift.json (calibration means, reused on reruns): written
  atomically (temporary file + os.replace), never half-written.

Several processes (`accelerator`: an accelerate Accelerator or PartialState): the pending work items are dealt
round-robin to the processes; each writes records.rank{R}.jsonl; after a barrier (wait_for_everyone) rank 0 merges
them into records.jsonl and writes the reports. The oracle's two stages and meanshift need everyone's results, so the
run has up to three phases with a barrier between them. Every rank returns the same results dict.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from autodeco.atomic import atomic_write
from autodeco.evaluation import benchmarks as benchmarks_module
from autodeco.evaluation import scoring
from autodeco.evaluation.benchmarks import Benchmark, Problem, build_prompt
from autodeco.evaluation.methods import (
    ORACLE_TEMPERATURES,
    ORACLE_TOP_PS,
    Method,
    generation_kwargs,
    parse_methods,
    static_method,
)

__all__ = [
    "run_evaluation",
    "generate_completions",
    "GenerationRequest",
    "Completion",
    "RecordStore",
    "compute_metrics",
    "encode_prompt",
    "sampling_seed",
    "model_fingerprint",
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_BATCH_SIZE",
]

DEFAULT_MAX_NEW_TOKENS = 2048
DEFAULT_BATCH_SIZE = 32
RECORDS_NAME = "records.jsonl"
# Bumped when a change makes old records incomparable (prompt encoding, what a record holds).
RECORD_FORMAT = 1
# Work items that keep a full per-token example (token ids, T, P) for the plots: sample 0 of seed 0 of the first
# EXAMPLE_PROBLEMS problems of each benchmark. Keeping every trace would make records.jsonl huge.
EXAMPLE_PROBLEMS = 2
# Methods whose examples can show the heads' T driving the sampling (plots of traces and T against entropy).
DYNAMIC_KINDS = ("autodeco", "autodeco-temperature-only", "autodeco-top-p-only")
# Completion tokens per example the teacher-forced entropy forward looks at (bounds its [tokens, vocab] logits).
ENTROPY_MAX_TOKENS = 1024
MEANSHIFT_DECIMALS = 3


# ------------------------------------------------------------------------------------------------ generation


@dataclass
class GenerationRequest:
    """`num_samples` completions of `prompt`; `seed` seeds torch before sampling (None: deterministic decoding).

    `group` (optional, any hashable): consecutive seeded requests with the same non-None group, seed and num_samples
    are sampled together after one `torch.manual_seed(seed)` (packed sampling; see generate_completions).
    """

    prompt: str
    num_samples: int
    seed: int | None = None
    group: object = None


@dataclass
class Completion:
    """One generated sequence, cut after its first EOS.

    token_ids: the generated ids (EOS included); temperatures / top_ps: the value each of those tokens was sampled
    with (None when the model reports none, e.g. a plain base model).
    """

    text: str
    token_ids: list[int]
    temperatures: list[float] | None = None
    top_ps: list[float] | None = None
    finished: bool = True  # ended with EOS (False: cut off at max_new_tokens)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def encode_prompt(tokenizer, text: str) -> list[int]:
    """Token ids of a formatted prompt, as autodeco.data tokenises training prompts but without a doubled BOS.

    The tokenizer's own special tokens are added (a plain-text prompt gets its BOS), any it appends after the text
    (an EOS would tell the model the document ended) is dropped, and a BOS the chat template already wrote is not
    doubled.
    """
    ids = list(tokenizer(text)["input_ids"])
    plain = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    for start in range(len(ids) - len(plain) + 1):
        if ids[start : start + len(plain)] == plain:
            ids = ids[: start + len(plain)]
            break
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    if not ids:
        raise ValueError(f"The prompt {text[:60]!r} encodes to no tokens; a prompt needs at least one token.")
    return ids


def _eos_ids(model, tokenizer) -> list[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def _pad_id(tokenizer, eos_ids: list[int]) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if eos_ids:
        return eos_ids[0]
    return 0


class _TemperatureRecorder(LogitsProcessor):
    """Wraps a processor with a `temperatures(scores)` method (EDT) and records the T it applies at each step."""

    def __init__(self, inner):
        self.inner = inner
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.steps.append(self.inner.temperatures(scores).detach().float().cpu())
        return self.inner(input_ids, scores)


def _with_recorders(kwargs: dict) -> tuple[dict, list[_TemperatureRecorder]]:
    processors = kwargs.get("logits_processor")
    if not processors:
        return kwargs, []
    recorders, wrapped = [], LogitsProcessorList()
    for proc in processors:
        if hasattr(proc, "temperatures"):
            proc = _TemperatureRecorder(proc)
            recorders.append(proc)
        wrapped.append(proc)
    return {**kwargs, "logits_processor": wrapped}, recorders


def _generate_batch(model, tokenizer, prompts: list[list[int]], num_return_sequences: int, kwargs: dict,
                    max_new_tokens: int) -> list[Completion]:
    """One `generate` call over left-padded prompts; returns len(prompts) * num_return_sequences completions."""
    eos_ids = _eos_ids(model, tokenizer)
    pad = _pad_id(tokenizer, eos_ids)
    width = max(len(p) for p in prompts)
    device = model.device
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    kwargs, recorders = _with_recorders(kwargs)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        max_new_tokens=max_new_tokens,
        num_return_sequences=num_return_sequences,
        return_dict_in_generate=True,
        pad_token_id=pad,
        **kwargs,
    )
    generated = out.sequences[:, width:].cpu()
    temperatures = getattr(out, "temperatures", None)
    top_ps = getattr(out, "top_ps", None)
    if recorders and generated.shape[1]:
        # EDT: the temperature the processor applied, not the static T=1 the traces show.
        temperatures = torch.stack(recorders[-1].steps[: generated.shape[1]], dim=1)
    completions = []
    eos_tensor = torch.tensor(eos_ids) if eos_ids else None
    for row in range(generated.shape[0]):
        ids = generated[row]
        length = ids.shape[0]
        finished = False
        if eos_tensor is not None and length:
            hits = torch.isin(ids, eos_tensor).nonzero()
            if hits.numel():
                length = int(hits[0, 0]) + 1
                finished = True
        ids = ids[:length].tolist()
        t = temperatures[row, :length].float().cpu().tolist() if temperatures is not None else None
        p = top_ps[row, :length].float().cpu().tolist() if top_ps is not None else None
        completions.append(Completion(tokenizer.decode(ids, skip_special_tokens=True), ids, t, p, finished))
    return completions


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def generate_completions(model, tokenizer, requests: Sequence[GenerationRequest], *, generation_kwargs: dict,
                         max_new_tokens: int, batch_size: int) -> list[list[Completion]]:
    """Completions for each request, in order (request i -> `requests[i].num_samples` completions).

    A seeded request is sampled on its own: `torch.manual_seed(seed)`, then its samples in calls of at most
    `batch_size` sequences (`num_return_sequences`), so its result depends only on the request and batch_size.
    Packed: consecutive seeded requests sharing a non-None `group`, the seed and num_samples (n) are sampled after
    one `torch.manual_seed(seed)`, in calls of max(1, batch_size // n) left-padded prompts x n sequences (when
    n > batch_size: prompt by prompt, in chunks of batch_size sequences), so their result depends on the whole group
    and batch_size.
    Unseeded requests (deterministic decoding) share calls: up to `batch_size` sequences, prompts left padded.
    Out of GPU memory, the call is retried with half the batch (and the same seed) down to one sequence.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    encoded = [encode_prompt(tokenizer, r.prompt) for r in requests]
    results: list[list[Completion] | None] = [None] * len(requests)
    size = batch_size
    index = 0
    while index < len(requests):
        request = requests[index]
        try:
            if request.seed is not None:
                group = [index]
                while (request.group is not None and group[-1] + 1 < len(requests)
                       and requests[group[-1] + 1].group == request.group
                       and requests[group[-1] + 1].seed == request.seed
                       and requests[group[-1] + 1].num_samples == request.num_samples):
                    group.append(group[-1] + 1)
                ns = request.num_samples
                torch.manual_seed(request.seed)
                if ns <= size:  # whole prompts per call: row j * ns + r is sample r of the call's prompt j
                    per_call = size // ns
                    for start in range(0, len(group), per_call):
                        part = group[start : start + per_call]
                        flat = _generate_batch(model, tokenizer, [encoded[i] for i in part], ns, generation_kwargs,
                                               max_new_tokens)
                        for j, i in enumerate(part):
                            results[i] = flat[j * ns : (j + 1) * ns]
                else:  # one prompt's samples in chunks of `size` sequences
                    for i in group:
                        done: list[Completion] = []
                        while len(done) < ns:
                            chunk = min(size, ns - len(done))
                            done += _generate_batch(model, tokenizer, [encoded[i]], chunk, generation_kwargs,
                                                    max_new_tokens)
                        results[i] = done
                index = group[-1] + 1
            else:
                group = [index]
                total = request.num_samples
                while (group[-1] + 1 < len(requests) and requests[group[-1] + 1].seed is None
                       and requests[group[-1] + 1].num_samples == request.num_samples
                       and total + request.num_samples <= size):
                    group.append(group[-1] + 1)
                    total += request.num_samples
                flat = _generate_batch(model, tokenizer, [encoded[i] for i in group], request.num_samples,
                                       generation_kwargs, max_new_tokens)
                for j, i in enumerate(group):
                    results[i] = flat[j * request.num_samples : (j + 1) * request.num_samples]
                index = group[-1] + 1
        except RuntimeError as exc:  # torch's OutOfMemoryError is a RuntimeError
            if not _is_oom(exc) or size == 1:
                raise
            size = max(1, size // 2)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            warnings.warn(f"Out of memory while generating; retrying with at most {size} sequences per call.")
    return results  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------ keys and seeds


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def sampling_seed(base_seed: int, method_spec: str, benchmark: str, problem_id: str, seed_index: int) -> int:
    """The torch seed of one work item: a hash, so items are independent and reproducible in any order."""
    digest = hashlib.sha256(f"{base_seed}|{method_spec}|{benchmark}|{problem_id}|{seed_index}".encode()).hexdigest()
    return int(digest[:15], 16)  # < 2**60: any torch seed


def model_fingerprint(model) -> str:
    """Identifies the model that made a record: base name, dtype and, for AutoDeco, a hash of the heads' weights."""
    config = getattr(model, "config", None)
    parts = {
        "name": getattr(config, "base_model_name_or_path", None) or getattr(config, "name_or_path", None),
        "type": type(model).__name__,
        "dtype": str(getattr(model, "dtype", "")),
    }
    heads = getattr(model, "heads_state_dict", None)
    if callable(heads):
        digest = hashlib.sha256()
        for name, tensor in sorted(heads().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
        parts["heads"] = digest.hexdigest()
    return _sha(parts)[:16]


# ------------------------------------------------------------------------------------------------ records


class RecordStore:
    """The records files of an output directory: append one JSON line per finished item, read them all back.

    Single process: records.jsonl. Several processes: each rank appends to records.rank{R}.jsonl and rank 0 later
    merges them into records.jsonl (`merge`). Every line is flushed and fsynced, so after a kill at most the last
    line is torn; `repair` cuts it off, and readers skip lines that are not complete JSON.
    """

    def __init__(self, output_dir: str | os.PathLike, rank: int = 0, world_size: int = 1, name: str = RECORDS_NAME):
        self.dir = Path(output_dir)
        self.rank = rank
        self.world_size = world_size
        self.main = self.dir / name
        self._stem = name[: -len(".jsonl")] if name.endswith(".jsonl") else name
        self.path = self.main if world_size == 1 else self.dir / f"{self._stem}.rank{rank}.jsonl"
        self._file = None

    @staticmethod
    def repair(path: Path) -> int:
        """Cut a torn last line (no trailing newline) off `path`; returns the bytes removed."""
        if not path.is_file():
            return 0
        with open(path, "rb+") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            if size == 0:
                return 0
            # Scan back from the end for the last newline; a complete file ends with one.
            block = 1 << 16
            pos = size
            while pos > 0:
                start = max(0, pos - block)
                f.seek(start)
                chunk = f.read(pos - start)
                cut = chunk.rfind(b"\n")
                if cut >= 0:
                    keep = start + cut + 1
                    break
                pos = start
            else:
                keep = 0
            if keep < size:
                f.truncate(keep)
                f.flush()
                os.fsync(f.fileno())
            return size - keep

    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        removed = self.repair(self.path)
        if removed:
            warnings.warn(f"{self.path}: removed a torn last line ({removed} bytes) left by an interrupted run.")
        self._file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def append(self, record: dict) -> None:
        if self._file is None:
            self.open()
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def files(self) -> list[Path]:
        ranks = sorted(self.dir.glob(f"{self._stem}.rank*.jsonl"), key=lambda p: p.name)
        return [p for p in [self.main, *ranks] if p.is_file()]

    def read(self, keep_completions: bool = False) -> dict[str, dict]:
        """key -> record over every records file (first occurrence wins). Completions are dropped unless asked
        for: aggregation needs only correctness, answers and counts, and completions can be gigabytes."""
        records: dict[str, dict] = {}
        for path in self.files():
            for record in _iter_records(path):
                if record["key"] in records:
                    continue
                if not keep_completions:
                    record.pop("completions", None)
                records[record["key"]] = record
        return records

    def merge(self) -> int:
        """Rank 0: fold every records.rank*.jsonl into records.jsonl (atomically), then delete them; returns the
        number of records in records.jsonl. Duplicates (same key) are kept once."""
        ranks = [p for p in self.files() if p != self.main]
        if not ranks:
            return sum(1 for _ in _iter_records(self.main)) if self.main.is_file() else 0
        seen: set[str] = set()

        def write(out) -> None:
            for path in [self.main, *ranks]:
                if not path.is_file():
                    continue
                for line, record in _iter_lines(path):
                    if record["key"] not in seen:
                        seen.add(record["key"])
                        out.write(line.encode("utf-8"))

        atomic_write(self.main, write)
        for path in ranks:  # after the replace: a crash in between leaves duplicates, which readers skip
            path.unlink()
        return len(seen)


def _iter_lines(path: Path) -> Iterable[tuple[str, dict]]:
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.endswith("\n"):
                break  # torn last line: the item is redone
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{path}:{lineno}: not a complete JSON record; ignored (the item will be redone).")
                continue
            if isinstance(record, dict) and "key" in record:
                yield line, record


def _iter_records(path: Path) -> Iterable[dict]:
    for _, record in _iter_lines(path):
        yield record


# ------------------------------------------------------------------------------------------------ work items


@dataclass
class WorkItem:
    method: Method  # decodable: oracle/meanshift already resolved to static
    benchmark: str
    problem_index: int
    problem: Problem
    seed: int  # seed index 0..seeds-1 (greedy: 0)
    n: int  # samples generated (greedy: 1)
    prompt: str
    key: str = ""
    deterministic: bool = False


@dataclass
class _Context:
    model: object
    tokenizer: object
    output_dir: Path
    max_new_tokens: int
    batch_size: int
    base_seed: int
    template: str | None
    settings_hash: str
    rank: int
    world_size: int
    progress: bool
    pack_samples: bool = False
    prompts: dict = field(default_factory=dict)  # (benchmark, problem index) -> prompt text


def _is_greedy(method: Method) -> bool:
    return method.kind == "greedy"


def _make_items(ctx: _Context, method: Method, benchmark: Benchmark, n: int, seeds: int) -> list[WorkItem]:
    items = []
    greedy = _is_greedy(method)
    for index, problem in enumerate(benchmark.problems):
        prompt = ctx.prompts[(benchmark.name, index)]
        for seed in range(1 if greedy else seeds):
            item = WorkItem(method, benchmark.name, index, problem, seed, 1 if greedy else n, prompt,
                            deterministic=greedy)
            item.key = _sha([RECORD_FORMAT, method.spec, benchmark.name, problem.id, seed, item.n, ctx.settings_hash,
                             hashlib.sha256(prompt.encode()).hexdigest()])[:32]
            items.append(item)
    return items


def _units(items: list[WorkItem], batch_size: int, pack_samples: bool = False) -> list[list[WorkItem]]:
    """Group items into the units that are generated together and dealt to processes. Greedy items of one method
    and benchmark share calls (up to batch_size prompts). Every sampled item is its own unit, unless
    `pack_samples`: then sampled items of one method, benchmark, seed index and n form units of consecutive problems
    (in list order), at most max(1, batch_size // n) per unit. The grouping depends only on the item list, so
    results do not depend on the number of processes."""
    units: list[list[WorkItem]] = []
    open_units: dict[tuple, list[WorkItem]] = {}  # packed: the last unit of each (method, benchmark, seed, n)
    for item in items:
        last = units[-1] if units else None
        if (item.deterministic and last and last[0].deterministic and last[0].method == item.method
                and last[0].benchmark == item.benchmark and len(last) < batch_size):
            last.append(item)
        elif pack_samples and not item.deterministic:
            group = (item.method.spec, item.benchmark, item.seed, item.n)
            unit = open_units.get(group)
            if unit is not None and len(unit) < max(1, batch_size // item.n):
                unit.append(item)
            else:
                open_units[group] = [item]
                units.append(open_units[group])
        else:
            units.append([item])
    return units


def score_completions(problem: Problem, completions: list[str]) -> list[bool]:
    """Whether each completion answers `problem` (benchmarks.score_many: math answers verified in one batch,
    deduplicated and cached). A module function so tests can stub it."""
    return [bool(v) for v in benchmarks_module.score_many([problem] * len(completions), list(completions))]


def _summarise(values: list[float] | None) -> tuple[float, int]:
    if not values:
        return 0.0, 0
    finite = [v for v in values if v == v and not math.isinf(v)]
    return float(sum(finite)), len(finite)


def _run_unit(ctx: _Context, unit: list[WorkItem]) -> list[dict]:
    method = unit[0].method
    kwargs = generation_kwargs(method)
    if ctx.pack_samples and not unit[0].deterministic:
        # One seed for the unit (that of its first problem), its prompts sampled together.
        first = unit[0]
        seed = sampling_seed(ctx.base_seed, method.spec, first.benchmark, first.problem.id, first.seed)
        requests = [GenerationRequest(item.prompt, item.n, seed, group=first.key) for item in unit]
    else:
        requests = [
            GenerationRequest(item.prompt, item.n, None if item.deterministic else
                              sampling_seed(ctx.base_seed, method.spec, item.benchmark, item.problem.id, item.seed))
            for item in unit
        ]
    start = time.perf_counter()
    completions = generate_completions(ctx.model, ctx.tokenizer, requests, generation_kwargs=kwargs,
                                       max_new_tokens=ctx.max_new_tokens, batch_size=ctx.batch_size)
    records = []
    for item, request, samples in zip(unit, requests, completions):
        texts = [c.text for c in samples]
        correct = score_completions(item.problem, texts)
        answers = [scoring.extract_answer(text, item.problem.kind) for text in texts]
        t_sum = p_sum = 0.0
        t_count = p_count = 0
        for c in samples:
            s, k = _summarise(c.temperatures)
            t_sum, t_count = t_sum + s, t_count + k
            s, k = _summarise(c.top_ps)
            p_sum, p_count = p_sum + s, p_count + k
        record = {
            "key": item.key,
            "method": method.spec,
            "benchmark": item.benchmark,
            "problem_id": item.problem.id,
            "problem_index": item.problem_index,
            "seed": item.seed,
            "n": item.n,
            "deterministic": item.deterministic,
            "sampling_seed": request.seed,
            "settings": ctx.settings_hash,
            "gt": item.problem.gt,
            "completions": texts,
            "correct": correct,
            "answers": answers,
            "tokens": [c.num_tokens for c in samples],
            "finished": [c.finished for c in samples],
            "temperature_sum": t_sum,
            "temperature_tokens": t_count,
            "top_p_sum": p_sum,
            "top_p_tokens": p_count,
            "mean_temperature": t_sum / t_count if t_count else None,
            "mean_top_p": p_sum / p_count if p_count else None,
        }
        if item.seed == 0 and item.problem_index < EXAMPLE_PROBLEMS and samples:
            first = samples[0]
            record["example"] = {"prompt_ids": encode_prompt(ctx.tokenizer, item.prompt), "token_ids": first.token_ids,
                                 "temperatures": first.temperatures, "top_ps": first.top_ps}
        records.append(record)
    seconds = (time.perf_counter() - start) / max(1, len(records))
    for record in records:
        record["seconds"] = seconds
        record["rank"] = ctx.rank  # which process made it (for the logs; results never depend on it)
    return records


def _execute(ctx: _Context, store: RecordStore, items: list[WorkItem], done: set[str], desc: str) -> None:
    """Run the pending items of this phase that fall to this rank, appending each record as it finishes.

    Packed sampling: sampled units are formed over the phase's whole item list, so they do not depend on what an
    interrupted run finished; a unit with any pending item is regenerated whole and only its pending records are
    written."""
    pending, seen = [], set()
    for item in items:
        if item.key in seen:
            continue
        seen.add(item.key)
        if item.key not in done or (ctx.pack_samples and not item.deterministic):
            pending.append(item)
    units = [unit for unit in _units(pending, ctx.batch_size, ctx.pack_samples)
             if any(item.key not in done for item in unit)]
    mine = units[ctx.rank :: ctx.world_size]
    if not mine:
        return
    bar = None
    if ctx.progress:
        from tqdm.auto import tqdm

        total = sum(1 for u in mine for item in u if item.key not in done)
        bar = tqdm(total=total, desc=desc if ctx.world_size == 1 else f"{desc} [rank {ctx.rank}]",
                   unit="item", file=sys.stderr, dynamic_ncols=True, position=ctx.rank)
    try:
        for unit in mine:
            written = 0
            for record in _run_unit(ctx, unit):
                if record["key"] in done:  # packed: a finished item of a unit that is regenerated
                    continue
                store.append(record)
                done.add(record["key"])
                written += 1
            if bar is not None:
                bar.update(written)
    finally:
        if bar is not None:
            bar.close()


# ------------------------------------------------------------------------------------------------ metrics


def _sample_std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def compute_metrics(records_by_problem: list[list[dict]], *, n: int, seeds: int, ks: Sequence[int]) -> dict:
    """Metrics of one (method, benchmark) from its records: records_by_problem[i] = problem i's records in seed
    order (a deterministic method: one record standing for every seed and sample). See the module docstring."""
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
            pass_k[k].append(scoring.pass_at_k(total, sum(correct), k))
            maj_k[k].append(bool(scoring.majority_correct(answers[:k], correct[:k])))
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
        "pass@1": {"mean": sum(seed_means) / len(seed_means), "std": _sample_std(seed_means), "per_seed": seed_means},
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


def _average(cells: list[dict], ks: Sequence[int]) -> dict:
    """The paper's Avg column: the unweighted mean over benchmarks; its std over seeds of per-seed averages."""
    seeds = min(len(c["pass@1"]["per_seed"]) for c in cells)
    per_seed = [sum(c["pass@1"]["per_seed"][s] for c in cells) / len(cells) for s in range(seeds)]
    mean = lambda values: sum(values) / len(values)
    return {
        "pass@1": {"mean": mean([c["pass@1"]["mean"] for c in cells]), "std": _sample_std(per_seed), "per_seed": per_seed},
        "pass@k": {str(k): mean([c["pass@k"][str(k)] for c in cells]) for k in ks},
        "maj@k": {str(k): mean([c["maj@k"][str(k)] for c in cells]) for k in ks},
        "mean_temperature": _weighted([c for c in cells], "mean_temperature"),
        "mean_top_p": _weighted([c for c in cells], "mean_top_p"),
        "tokens": sum(c["total_tokens"] for c in cells) / max(1, sum(c["completions"] for c in cells)),
        "total_tokens": sum(c["total_tokens"] for c in cells),
        "completions": sum(c["completions"] for c in cells),
        "truncated": sum(c["truncated"] * c["completions"] for c in cells) / max(1, sum(c["completions"] for c in cells)),
        "seconds": sum(c["seconds"] for c in cells),
    }


def _weighted(cells: list[dict], key: str) -> float | None:
    pairs = [(c[key], c["total_tokens"]) for c in cells if c[key] is not None and c["total_tokens"]]
    if not pairs:
        return None
    return sum(v * w for v, w in pairs) / sum(w for _, w in pairs)


def _records_for(records: dict[str, dict], items: list[WorkItem], benchmark: Benchmark) -> list[list[dict]]:
    by_problem: list[list[dict]] = [[] for _ in benchmark.problems]
    missing = [item for item in items if item.key not in records]
    if missing:
        item = missing[0]
        raise RuntimeError(
            f"{len(missing)} work item(s) have no record after the run, e.g. {item.method.spec} on "
            f"{item.benchmark}/{item.problem.id} seed {item.seed}; rerun the same command to finish them."
        )
    for item in sorted(items, key=lambda i: (i.problem_index, i.seed)):
        by_problem[item.problem_index].append(records[item.key])
    return by_problem


# ------------------------------------------------------------------------------------------------ entry point


class _SingleProcess:
    process_index = 0
    num_processes = 1

    def wait_for_everyone(self):
        pass


def _validate(benchmarks, methods, n, seeds, ks, oracle_n, oracle_seeds, batch_size, max_new_tokens, calibration_files):
    for name, value in (("n", n), ("seeds", seeds), ("batch_size", batch_size), ("max_new_tokens", max_new_tokens),
                        ("oracle_n", oracle_n), ("oracle_seeds", oracle_seeds)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if not ks:
        raise ValueError("ks is empty: give at least one k for pass@k / maj@k (e.g. ks=(1, 16)).")
    for k in ks:
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}.")
        if k > n * seeds:
            raise ValueError(
                f"k={k} needs at least {k} samples per problem, but n={n} x seeds={seeds} gives {n * seeds}: raise "
                f"n or seeds, or drop k={k}."
            )
    if not methods:
        raise ValueError("No methods to evaluate; pass e.g. methods=parse_methods('greedy, autodeco').")
    if not benchmarks:
        raise ValueError("No benchmarks to evaluate; load one with benchmarks.load_benchmark(PATH).")
    names = [b.name for b in benchmarks]
    for b in benchmarks:
        if not b.problems:
            raise ValueError(f"Benchmark '{b.name}' has no problems; check its file.")
        if names.count(b.name) > 1:
            raise ValueError(f"Two benchmarks are named '{b.name}'; give the files different names.")
        ids = [p.id for p in b.problems]
        if len(set(ids)) != len(ids):
            dup = next(i for i in ids if ids.count(i) > 1)
            raise ValueError(f"Benchmark '{b.name}': problem id '{dup}' occurs more than once; ids must be unique.")
    for path in calibration_files or ():
        if not Path(path).is_file():
            raise FileNotFoundError(f"Calibration file '{path}' does not exist; pass JSONL training-format files.")


def run_evaluation(
    model,
    tokenizer,
    benchmarks: list[Benchmark],
    methods: list[Method] | str,
    *,
    n: int = 16,
    seeds: int = 8,
    ks: Sequence[int] = (1, 16),
    output_dir: str | os.PathLike,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    batch_size: int = DEFAULT_BATCH_SIZE,
    calibration_files: Sequence[str | os.PathLike] | None = None,
    template: str | None = None,
    accelerator=None,
    oracle_n: int | None = None,
    oracle_seeds: int | None = None,
    seed: int = 0,
    plots: bool = True,
    progress: bool = True,
    pack_samples: bool = False,
) -> dict:
    """Evaluate `methods` on `benchmarks` and write records.jsonl, results.json, results.md and plots to
    `output_dir`; returns the results.json content. See the module docstring for what each number means.

    pack_samples: sample up to max(1, batch_size // n) problems per `generate` call (much faster for small models;
    results then depend on batch_size; see "Packed sampling" in the module docstring)."""
    if isinstance(methods, str):
        methods = parse_methods(methods)
    methods = list(methods)
    ks = tuple(int(k) for k in ks)
    oracle_n = n if oracle_n is None else oracle_n
    oracle_seeds = seeds if oracle_seeds is None else oracle_seeds
    _validate(benchmarks, methods, n, seeds, ks, oracle_n, oracle_seeds, batch_size, max_new_tokens, calibration_files)
    state = accelerator if accelerator is not None else _SingleProcess()
    output_dir = Path(output_dir)
    if output_dir.is_file():
        raise ValueError(f"output_dir '{output_dir}' is a file; pass a directory.")
    rank, world = int(state.process_index), int(state.num_processes)
    model.eval()

    settings = {
        "format": RECORD_FORMAT,
        "max_new_tokens": max_new_tokens,
        "template": template,
        "seed": seed,
        "model": model_fingerprint(model),
    }
    if pack_samples:  # packed results depend on the grouping; unpacked keys stay as they were
        settings["pack_samples"] = True
        settings["batch_size"] = batch_size
    ctx = _Context(model, tokenizer, output_dir, max_new_tokens, batch_size, seed, template, _sha(settings)[:16], rank,
                   world, progress, bool(pack_samples))
    for b in benchmarks:
        for i, problem in enumerate(b.problems):
            ctx.prompts[(b.name, i)] = build_prompt(problem, tokenizer, template)

    store = RecordStore(output_dir, rank, world)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        if world > 1:
            RecordStore.repair(store.main)
    state.wait_for_everyone()
    store.open()  # each rank repairs its own file
    state.wait_for_everyone()

    kinds = {m.kind for m in methods}
    autodeco = next(m for m in parse_methods("autodeco"))
    meanshift_info = None
    if "meanshift" in kinds and calibration_files:
        meanshift_info = _meanshift_from_calibration(ctx, list(calibration_files), state)

    # Phase 1: everything that needs no one else's results.
    items: list[WorkItem] = []
    for method in methods:
        for b in benchmarks:
            if method.kind == "oracle":
                for t in ORACLE_TEMPERATURES:
                    items += _make_items(ctx, static_method(t, 1.0), b, oracle_n, oracle_seeds)
            elif method.kind == "meanshift":
                if meanshift_info is not None:
                    items += _make_items(ctx, meanshift_info["method"], b, n, seeds)
                else:
                    items += _make_items(ctx, autodeco, b, n, seeds)
            else:
                items += _make_items(ctx, method, b, n, seeds)
    done = set(store.read())
    try:
        _execute(ctx, store, items, done, "evaluating")
        state.wait_for_everyone()

        # Phase 2: the oracle's P row at each benchmark's best T; meanshift from AutoDeco's own tokens.
        records = store.read()
        oracle_info: dict[str, dict] = {}
        items = []
        if "oracle" in kinds:
            for b in benchmarks:
                t_row = {t: _pass1(records, _make_items(ctx, static_method(t, 1.0), b, oracle_n, oracle_seeds), b)
                         for t in ORACLE_TEMPERATURES}
                best_t = _argmax(t_row)
                oracle_info[b.name] = {"temperature_row": t_row, "best_temperature": best_t}
                for p in ORACLE_TOP_PS:
                    items += _make_items(ctx, static_method(best_t, p), b, oracle_n, oracle_seeds)
        if "meanshift" in kinds and meanshift_info is None:
            meanshift_info = _meanshift_from_records(records, [i for b in benchmarks for i in _make_items(ctx, autodeco, b, n, seeds)])
            for b in benchmarks:
                items += _make_items(ctx, meanshift_info["method"], b, n, seeds)
        if items:
            _execute(ctx, store, items, set(records), "oracle top-p / meanshift")
        state.wait_for_everyone()

        # Phase 3: the chosen oracle (T, P) at the full n x seeds, when the search used fewer samples.
        records = store.read()
        items = []
        for b in benchmarks if "oracle" in kinds else ():
            info = oracle_info[b.name]
            best_t = info["best_temperature"]
            p_row = {p: _pass1(records, _make_items(ctx, static_method(best_t, p), b, oracle_n, oracle_seeds), b)
                     for p in ORACLE_TOP_PS}
            info["top_p_row"] = p_row
            info["best_top_p"] = _argmax(p_row)
            info["method"] = static_method(best_t, info["best_top_p"])
            items += _make_items(ctx, info["method"], b, n, seeds)
        if items:
            _execute(ctx, store, items, set(records), "oracle at full n")
    finally:
        store.close()
    state.wait_for_everyone()

    if rank == 0:
        store.merge()
        records = store.read()
        results = _assemble(ctx, benchmarks, methods, records, n=n, seeds=seeds, ks=ks, oracle_info=oracle_info,
                            meanshift_info=meanshift_info, oracle_n=oracle_n, oracle_seeds=oracle_seeds,
                            batch_size=batch_size, calibration_files=calibration_files, pack_samples=pack_samples)
        from autodeco.evaluation import report

        plot_data = _plot_data(ctx, benchmarks, methods, records, oracle_info) if plots else None
        report.write_reports(results, output_dir, plot_data=plot_data)
    state.wait_for_everyone()
    return json.loads((output_dir / "results.json").read_text(encoding="utf-8"))


def _pass1(records: dict, items: list[WorkItem], benchmark: Benchmark) -> float:
    by_problem = _records_for(records, items, benchmark)
    total = [sum(r["correct"]) / len(r["correct"]) for rs in by_problem for r in rs]
    return sum(total) / len(total)


def _argmax(row: dict[float, float]) -> float:
    """The grid value with the highest pass@1; ties go to the larger value (closer to sampling the model as is)."""
    best = None
    for value in sorted(row, reverse=True):
        if best is None or row[value] > row[best]:
            best = value
    return best


def _meanshift_from_calibration(ctx: _Context, files: list, state) -> dict:
    """Mean head T and P over the calibration data's supervised tokens; rank 0 computes (or reuses meanshift.json)
    and every rank reads the file."""
    from autodeco.evaluation import report

    path = ctx.output_dir / "meanshift.json"
    ident = {"files": [str(Path(f).resolve()) for f in files],
             "sizes": [Path(f).stat().st_size for f in files],
             "mtimes": [Path(f).stat().st_mtime_ns for f in files],
             "model": model_fingerprint(ctx.model)}
    if ctx.rank == 0:
        cached = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
        if not cached or cached.get("ident") != ident:
            from autodeco.evaluation.diagnostics import meanshift_from_calibration

            t, p = meanshift_from_calibration(ctx.model, ctx.tokenizer, [str(f) for f in files])
            cached = {"ident": ident, "temperature": float(t), "top_p": float(p)}
            report.write_json_atomic(path, cached)
    state.wait_for_everyone()
    cached = json.loads(path.read_text(encoding="utf-8"))
    return _meanshift_info(cached["temperature"], cached["top_p"], "calibration data",
                           f"mean head T and P over the supervised tokens of {', '.join(str(f) for f in files)}")


def _meanshift_from_records(records: dict, items: list[WorkItem]) -> dict:
    missing = [i for i in items if i.key not in records]
    if missing:
        raise RuntimeError(f"meanshift: {len(missing)} AutoDeco work items have no record; rerun to finish them.")
    rs = [records[i.key] for i in items]
    t_count = sum(r["temperature_tokens"] for r in rs)
    p_count = sum(r["top_p_tokens"] for r in rs)
    if not t_count or not p_count:
        raise ValueError("meanshift: AutoDeco generated no tokens to average T and P over; pass calibration files.")
    t = sum(r["temperature_sum"] for r in rs) / t_count
    p = sum(r["top_p_sum"] for r in rs) / p_count
    return _meanshift_info(t, p, "AutoDeco's generated tokens",
                           f"mean head T and P over the {t_count} tokens AutoDeco generated in this evaluation")


def _meanshift_info(t: float, p: float, source: str, description: str) -> dict:
    t_r = max(round(float(t), MEANSHIFT_DECIMALS), 10.0 ** -MEANSHIFT_DECIMALS)
    p_r = min(max(round(float(p), MEANSHIFT_DECIMALS), 10.0 ** -MEANSHIFT_DECIMALS), 1.0)
    return {"method": static_method(t_r, p_r), "temperature": t_r, "top_p": p_r, "raw_temperature": float(t),
            "raw_top_p": float(p), "source": source, "description": description}


def _temperature_source(method: Method) -> str:
    return {
        "greedy": "heads' predictions (greedy decoding does not use them)",
        "autodeco": "heads (dynamic)",
        "autodeco-temperature-only": "heads' T, P = 1",
        "autodeco-top-p-only": "T = 1, heads' P",
        "edt": "EDT's per-token T",
        "min_p": "T = 1, P = 1 with min-p filtering",
    }.get(method.kind, "static")


def _fmt(x: float) -> str:
    return format(x, ".10g")


def _assemble(ctx, benchmarks, methods, records, *, n, seeds, ks, oracle_info, meanshift_info, oracle_n, oracle_seeds,
              batch_size, calibration_files, pack_samples=False) -> dict:
    results: dict[str, dict] = {}
    labels: dict[str, str] = {}
    notes: list[str] = []
    for method in methods:
        row: dict[str, dict] = {}
        for b in benchmarks:
            if method.kind == "oracle":
                resolved = oracle_info[b.name]["method"]
                t, p = resolved.params
                label = f"test-set oracle (T={_fmt(t)}, P={_fmt(p)})"
            elif method.kind == "meanshift":
                resolved = meanshift_info["method"]
                label = (f"MeanShift (T={_fmt(meanshift_info['temperature'])}, P={_fmt(meanshift_info['top_p'])}, "
                         f"from {meanshift_info['source']})")
            else:
                resolved, label = method, method.label
            items = _make_items(ctx, resolved, b, n, seeds)
            cell = compute_metrics(_records_for(records, items, b), n=n, seeds=seeds, ks=ks)
            cell["label"] = label
            cell["spec"] = resolved.spec
            cell["temperature_source"] = _temperature_source(resolved)
            if method.kind == "oracle":
                info = oracle_info[b.name]
                cell["search_seconds"] = sum(
                    records[i.key]["seconds"]
                    for value_items in (
                        [_make_items(ctx, static_method(t_, 1.0), b, oracle_n, oracle_seeds) for t_ in ORACLE_TEMPERATURES]
                        + [_make_items(ctx, static_method(info["best_temperature"], p_), b, oracle_n, oracle_seeds)
                           for p_ in ORACLE_TOP_PS if p_ != 1.0]
                    )
                    for i in value_items
                )
            row[b.name] = cell
        row["average"] = _average([row[b.name] for b in benchmarks], ks)
        if method.kind == "oracle":
            row["average"]["label"] = "test-set oracle (per-benchmark T, P)"
            labels[method.spec] = "test-set oracle"
        elif method.kind == "meanshift":
            row["average"]["label"] = row[benchmarks[0].name]["label"]
            labels[method.spec] = row[benchmarks[0].name]["label"]
        else:
            row["average"]["label"] = method.label
            labels[method.spec] = method.label
        results[method.spec] = row

    oracle = {}
    for name, info in oracle_info.items():
        oracle[name] = {
            "temperature": info["best_temperature"],
            "top_p": info["best_top_p"],
            "temperature_row": {_fmt(t): v for t, v in info["temperature_row"].items()},
            "top_p_row": {_fmt(p): v for p, v in info["top_p_row"].items()},
            "oracle_n": oracle_n,
            "oracle_seeds": oracle_seeds,
        }
    if oracle:
        notes.append(
            "test-set oracle: static T searched over " + ", ".join(map(_fmt, ORACLE_TEMPERATURES)) + " at P=1, then P over "
            + ", ".join(map(_fmt, ORACLE_TOP_PS)) + f" at the best T, per benchmark, by mean pass@1 on the evaluated "
            f"problems themselves ({oracle_n} samples x {oracle_seeds} seeds per grid point): "
            + "; ".join(f"{b}: T={_fmt(v['temperature'])}, P={_fmt(v['top_p'])}" for b, v in oracle.items())
            + ". Tuned on the test problems, it is an optimistic static baseline, not a fair one."
        )
    meanshift = None
    if meanshift_info is not None:
        meanshift = {k: v for k, v in meanshift_info.items() if k != "method"}
        meanshift["spec"] = meanshift_info["method"].spec
        notes.append(f"MeanShift: static T={_fmt(meanshift_info['temperature'])}, P={_fmt(meanshift_info['top_p'])}, "
                     f"the {meanshift_info['description']}.")
    if any(m.kind == "greedy" for m in methods):
        notes.append("greedy: deterministic, decoded once per problem; that completion stands for all samples "
                     "(std over seeds 0). Its T and P are the heads' predictions, which greedy decoding ignores.")
    config = getattr(ctx.model, "config", None)
    return {
        "model": getattr(ctx.model, "name_or_path", None) or getattr(config, "name_or_path", None),
        "base_model": getattr(config, "base_model_name_or_path", None),
        "settings": {
            "n": n, "seeds": seeds, "ks": list(ks), "max_new_tokens": ctx.max_new_tokens, "batch_size": batch_size,
            "template": ctx.template, "seed": ctx.base_seed, "oracle_n": oracle_n, "oracle_seeds": oracle_seeds,
            "processes": ctx.world_size, "calibration_files": [str(f) for f in calibration_files or ()],
            "pack_samples": bool(pack_samples), "settings_hash": ctx.settings_hash,
        },
        "benchmarks": {b.name: {"problems": len(b.problems), "kind": b.kind} for b in benchmarks},
        "methods": [m.spec for m in methods],
        "labels": labels,
        "results": results,
        "oracle": oracle,
        "meanshift": meanshift,
        "notes": notes,
        "metric_definitions": {
            "pass@1": "mean correctness of the n samples per problem, averaged over problems; mean and sample std "
                      "(ddof=1) over seeds",
            "pass@k": "unbiased estimator over all n x seeds samples per problem, averaged over problems",
            "maj@k": "plurality vote over the first k samples (seed-major order), averaged over problems",
            "mean_temperature": "token-weighted mean T over generated tokens (see temperature_source)",
            "tokens": "mean generated tokens per completion (EOS included)",
            "truncated": "share of completions cut off at max_new_tokens (no EOS)",
            "seconds": "generation + scoring time summed over work items",
        },
    }


# ------------------------------------------------------------------------------------------------ plot data


def _plot_data(ctx, benchmarks, methods, records, oracle_info) -> dict:
    """What the plots need: example traces of a dynamic method and the base entropy at each of their tokens."""
    data: dict = {"oracle": {}, "examples": []}
    for name, info in oracle_info.items():
        data["oracle"][name] = {
            "temperatures": list(info["temperature_row"]),
            "temperature_row": list(info["temperature_row"].values()),
            "best_temperature": info["best_temperature"],
            "top_ps": list(info["top_p_row"]),
            "top_p_row": list(info["top_p_row"].values()),
            "best_top_p": info["best_top_p"],
        }
    # The full method first, then the single-head ablations, whatever order the methods were listed in.
    dynamic = sorted((m for m in methods if m.kind in DYNAMIC_KINDS), key=lambda m: DYNAMIC_KINDS.index(m.kind))
    if not dynamic and any(m.kind == "meanshift" for m in methods):
        dynamic = parse_methods("autodeco")  # its records were made for meanshift
    if not dynamic:
        return data
    method = dynamic[0]
    wanted = [(b.name, i) for b in benchmarks for i in range(min(EXAMPLE_PROBLEMS, len(b.problems)))]
    for name, index in wanted:
        # Any finished record of this run's settings will do (its n does not matter for one example).
        record = next((r for r in records.values() if r["method"] == method.spec and r["benchmark"] == name
                       and r["problem_index"] == index and r["seed"] == 0 and r.get("example")
                       and r["settings"] == ctx.settings_hash), None)
        if record is None:
            continue
        example = record["example"]
        if not example.get("temperatures") or not example["token_ids"]:
            continue
        entropy = _token_entropies(ctx.model, example["prompt_ids"], example["token_ids"])
        data["examples"].append({
            "method": method.label,
            "benchmark": name,
            "problem_id": record["problem_id"],
            "tokens": [ctx.tokenizer.decode([t]) for t in example["token_ids"]],
            "temperatures": example["temperatures"],
            "top_ps": example["top_ps"],
            "entropy": entropy,
            "correct": bool(record["correct"][0]),
        })
    return data


@torch.no_grad()
def _token_entropies(model, prompt_ids: list[int], token_ids: list[int]) -> list[float]:
    """Entropy (nats) of softmax(raw logits) at each generated token, by one teacher-forced forward.

    Only the positions that predict the completion are kept (logits_to_keep), at most ENTROPY_MAX_TOKENS of them.
    """
    token_ids = token_ids[:ENTROPY_MAX_TOKENS]
    ids = torch.tensor([prompt_ids + token_ids], device=model.device)
    keep = len(token_ids) + 1
    out = model(input_ids=ids, logits_to_keep=keep)
    logits = out.logits[0, -keep:-1].float()  # position j predicts completion token j
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p.masked_fill(torch.isinf(log_p), 0.0)).sum(-1)
    return entropy.cpu().tolist()
