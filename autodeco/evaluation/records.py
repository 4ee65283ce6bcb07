"""Records of an evaluation (or of the data builder's samples): the JSONL store, the keys, the seeds.

    store = RecordStore("runs/eval")          # records.jsonl; records.rank{R}.jsonl under several processes
    store.append(record); records = store.read()   # key -> record

Every key and settings hash is built here (eval_settings_hash / item_key for the evaluation, data_settings_hash /
sample_key for the data builder), so what identifies a record is defined in one place. sampling_seed derives a
work item's torch seed; model_fingerprint identifies the model (base, dtype, a hash of the heads' weights).
Every line is flushed and fsynced; a torn last line is cut off on the next run. See docs/evaluation.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Iterable

from autodeco.atomic import atomic_write

__all__ = [
    "RecordStore",
    "RECORDS_NAME",
    "RECORD_FORMAT",
    "sampling_seed",
    "model_fingerprint",
    "eval_settings_hash",
    "item_key",
    "problem_content",
    "data_settings_hash",
    "sample_key",
]

RECORDS_NAME = "records.jsonl"
# Bumped when a change makes old records incomparable (prompt encoding, what a record holds, what a key covers).
# 2: keys include the benchmark row's content (problem text, gold, kind), so an edited row is never scored from
#    old records.
RECORD_FORMAT = 2


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



# ------------------------------------------------------------------------------------------------ keys


def eval_settings_hash(model, *, max_new_tokens: int, template: str | None, seed: int, pack_samples: bool,
                       batch_size: int, engine: str = "hf") -> str:
    """The hash of everything besides the work item that determines an evaluation record (part of every key).

    `engine`: the generation engine's name; another engine samples other tokens from the same seeds, so a non-"hf"
    name enters the hash (and "hf" does not, so records written before engines existed keep their keys)."""
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
    if engine != "hf":
        settings["engine"] = engine
    return _sha(settings)[:16]


def problem_content(problem) -> str:
    """A hash of everything in a benchmark row that determines its records: id, problem text, gold and kind. A row
    edited under the same id (a fixed gold, a reworded problem) gets new keys, so it is regenerated and rescored."""
    return _sha([problem.id, problem.problem, problem.gt, problem.kind])


def item_key(settings_hash: str, method_spec: str, benchmark: str, problem, seed: int, n: int, prompt: str) -> str:
    """The record key of one evaluation work item: (method, benchmark, the problem row's content, seed index, n,
    settings, prompt). `problem` is the benchmark's Problem (problem_content: id, text, gold, kind)."""
    return _sha([RECORD_FORMAT, method_spec, benchmark, problem_content(problem), seed, n, settings_hash,
                 hashlib.sha256(prompt.encode()).hexdigest()])[:32]


def data_settings_hash(model, *, method_spec: str, n: int, max_new_tokens: int, template: str | None,
                       seed: int, engine: str = "hf") -> str:
    """The data builder's settings hash (part of every sample key); `engine` as in eval_settings_hash."""
    settings = {"data": 1, "spec": method_spec, "n": n, "max_new_tokens": max_new_tokens, "template": template,
                "seed": seed, "model": model_fingerprint(model)}
    if engine != "hf":
        settings["engine"] = engine
    return _sha(settings)[:16]


def sample_key(settings_hash: str, benchmark: str, problem, prompt: str) -> str:
    """The key of one problem's samples in the data builder's OUTPUT.samples.jsonl (the row's content included,
    as in item_key: a changed gold is re-judged, not reused)."""
    return _sha([RECORD_FORMAT, settings_hash, benchmark, problem_content(problem),
                 hashlib.sha256(prompt.encode()).hexdigest()])[:32]


# ------------------------------------------------------------------------------------------------ the store


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
