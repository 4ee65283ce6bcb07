"""Evaluation benchmarks: load problems, build prompts, score completions.

    >>> from autodeco.evaluation.benchmarks import load_benchmark, build_prompt, score
    >>> bench = load_benchmark("shared/benchmarks/aime24.jsonl")          # name "aime24", kind "math"
    >>> prompt = build_prompt(bench.problems[0], tokenizer)                # chat template when it has one
    >>> score(bench.problems[0], completion)                               # math-verify / letter match

A benchmark is a JSONL file, one problem per line: ``{"problem": str, "gt": str, "id": optional}``; its name is
the file stem. The kind is inferred ("choice" when every gt is a letter A-J, else "math"); "exact" must be
given. Files are UTF-8 (a byte-order mark is allowed). Malformed files fail with the file name, the 1-based line
and what is wrong. A spec that is not a path
is a Hugging Face dataset, ``"org/name[:config][:split]"`` (needs ``datasets``). More: docs/benchmarks.md and
docs/evaluation.md.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from autodeco.evaluation.answers import CHOICE_LETTERS, score_choice, score_exact
from autodeco.evaluation.verify import score_math, score_math_many

__all__ = [
    "Problem",
    "Benchmark",
    "KINDS",
    "DEFAULT_MATH_INSTRUCTION",
    "DEFAULT_CHOICE_INSTRUCTION",
    "load_benchmark",
    "build_prompt",
    "score",
    "score_many",
    "score_completions",
]

KINDS = ("math", "choice", "exact")
# The paper's prompts: reason, then put the final answer within \boxed{} (scoring reads the last box).
DEFAULT_MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
DEFAULT_CHOICE_INSTRUCTION = (
    "Please reason step by step, and put the letter of your final answer choice (A, B, C, ...) within \\boxed{}."
)

# Column names tried, in order, for Hugging Face datasets (JSONL files must use "problem" and "gt").
_HF_PROBLEM_COLUMNS = ("problem", "question", "Problem", "Question", "prompt", "input")
_HF_ANSWER_COLUMNS = ("gt", "answer", "Answer", "final_answer", "target", "label")
_HF_ID_COLUMNS = ("id", "ID", "problem_id", "question_id", "unique_id")


@dataclass
class Problem:
    id: str
    problem: str
    gt: str
    benchmark: str
    kind: str  # "math" | "choice" | "exact"


@dataclass
class Benchmark:
    name: str
    kind: str
    problems: list[Problem] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.problems)


def _is_choice_gt(gt: str) -> bool:
    return len(gt) == 1 and gt in CHOICE_LETTERS


def _infer_kind(gts: list[str]) -> str:
    return "choice" if gts and all(_is_choice_gt(gt) for gt in gts) else "math"


def _check_kind(kind: str | None) -> None:
    if kind is not None and kind not in KINDS:
        raise ValueError(f"Unknown benchmark kind {kind!r}: use one of {', '.join(KINDS)} (or None to infer it).")


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer (or None for all problems), got {limit!r}.")


def _gt_string(value, where: str) -> str:
    """`gt` as a string: JSON numbers are accepted (AIME answers are often stored as ints)."""
    if isinstance(value, str):
        text = value.strip()
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        text = str(value)
    else:
        raise ValueError(f"{where}: field 'gt' must be a string or a number, got {type(value).__name__} {value!r}.")
    if not text:
        raise ValueError(f"{where}: field 'gt' is empty.")
    return text


def _finish(name: str, rows: list[tuple[str, str, str, str]], kind: str | None, limit: int | None, source: str) -> Benchmark:
    """rows: (id, problem, gt, where) → Benchmark, with kind inference/validation and the limit."""
    if not rows:
        raise ValueError(f"{source}: the benchmark has no problems (each line must be a JSON object with 'problem' and 'gt').")
    if kind is None:
        kind = _infer_kind([gt for _, _, gt, _ in rows])
    elif kind == "choice":
        for _, _, gt, where in rows:
            if not _is_choice_gt(gt):
                raise ValueError(
                    f"{where}: kind 'choice' needs 'gt' to be a single capital letter A-J, got {gt!r} "
                    f"(use kind='math' or None to infer it)."
                )
    if limit is not None:
        rows = rows[:limit]
    problems = [Problem(id=pid, problem=text, gt=gt, benchmark=name, kind=kind) for pid, text, gt, _ in rows]
    return Benchmark(name=name, kind=kind, problems=problems)


def _load_jsonl(path: Path, kind: str | None, limit: int | None) -> Benchmark:
    name = path.stem
    rows: list[tuple[str, str, str, str]] = []
    seen: dict[str, int] = {}
    file_kind = None  # an optional per-line "kind" field (e.g. "exact", which is never inferred)
    with path.open("rb") as handle:  # decoded per line, so a non-UTF-8 line is named
        for line_number, raw in enumerate(handle, start=1):
            where = f"{path} line {line_number}"
            try:  # utf-8-sig: a UTF-8 byte-order mark (Windows editors) is dropped, as `train --data` does
                line = raw.decode("utf-8-sig" if line_number == 1 else "utf-8")
            except UnicodeDecodeError as error:
                raise ValueError(f"{where}: not UTF-8 text ({error.reason} at byte {error.start}); re-save the file "
                                 "as UTF-8.") from None
            if not line.strip():
                continue  # blank lines (a trailing newline at the end) are not problems
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: invalid JSON ({error.msg} at column {error.colno}).") from None
            if not isinstance(record, dict):
                raise ValueError(f"{where}: expected a JSON object with 'problem' and 'gt', got {type(record).__name__}.")
            for required in ("problem", "gt"):
                if required not in record:
                    found = ", ".join(map(repr, record)) or "none"
                    raise ValueError(
                        f"{where}: missing required field {required!r} (found fields: {found}); each line needs "
                        f"'problem' (the question) and 'gt' (the reference answer). Is this a benchmark in another "
                        f"format?"
                    )
            text = record["problem"]
            if not isinstance(text, str):
                raise ValueError(f"{where}: field 'problem' must be a string, got {type(text).__name__}.")
            if not text.strip():
                raise ValueError(f"{where}: field 'problem' is empty.")
            gt = _gt_string(record["gt"], where)
            problem_id = record.get("id")
            if problem_id is None:
                problem_id = f"{name}-{line_number}"
            elif isinstance(problem_id, bool) or not isinstance(problem_id, (str, int)):
                raise ValueError(f"{where}: field 'id' must be a string or an integer, got {type(problem_id).__name__}.")
            problem_id = str(problem_id)
            if problem_id in seen:
                raise ValueError(f"{where}: duplicate id {problem_id!r} (first used on line {seen[problem_id]}).")
            seen[problem_id] = line_number
            row_kind = record.get("kind")
            if row_kind is not None:
                if row_kind not in KINDS:
                    raise ValueError(f"{where}: field 'kind' must be one of {', '.join(KINDS)}, got {row_kind!r}.")
                if file_kind is not None and row_kind != file_kind:
                    raise ValueError(f"{where}: field 'kind' is {row_kind!r} but an earlier line says {file_kind!r}; "
                                     "a benchmark file has one kind.")
                file_kind = row_kind
            rows.append((problem_id, text, gt, where))
    return _finish(name, rows, kind if kind is not None else file_kind, limit, str(path))


def _load_hf(spec: str, kind: str | None, limit: int | None) -> Benchmark:
    try:
        import datasets  # optional dependency (Hugging Face dataset specs only): imported lazily
    except ImportError:
        raise ImportError(
            f"{spec!r} is not a file, so it was taken as a Hugging Face dataset, which needs the 'datasets' "
            f"package (pip install datasets). For a local benchmark pass the path of a .jsonl file."
        ) from None
    parts = spec.split(":")
    if len(parts) > 3:
        raise ValueError(f"Dataset spec {spec!r}: use 'org/name', 'org/name:split' or 'org/name:config:split'.")
    dataset_name = parts[0]
    config = parts[1] if len(parts) == 3 else None
    split = parts[-1] if len(parts) >= 2 else "test"
    data = datasets.load_dataset(dataset_name, config, split=split)
    columns = list(data.column_names)

    def pick(candidates: tuple[str, ...], what: str, required: bool = True) -> str | None:
        for column in candidates:
            if column in columns:
                return column
        if required:
            raise ValueError(
                f"Dataset {spec!r} has no {what} column (looked for {', '.join(candidates)}; it has {', '.join(columns)})."
            )
        return None

    problem_column = pick(_HF_PROBLEM_COLUMNS, "problem")
    answer_column = pick(_HF_ANSWER_COLUMNS, "answer")
    id_column = pick(_HF_ID_COLUMNS, "id", required=False)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", dataset_name.rsplit("/", 1)[-1])
    rows: list[tuple[str, str, str, str]] = []
    seen: dict[str, int] = {}
    for index, record in enumerate(data):
        where = f"dataset {spec} row {index}"
        text = record[problem_column]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"{where}: column {problem_column!r} must be a non-empty string.")
        gt = _gt_string(record[answer_column], where)
        problem_id = str(record[id_column]) if id_column else f"{name}-{index + 1}"
        if problem_id in seen:
            raise ValueError(f"{where}: duplicate id {problem_id!r} (first used in row {seen[problem_id]}).")
        seen[problem_id] = index
        rows.append((problem_id, text, gt, where))
    return _finish(name, rows, kind, limit, f"dataset {spec}")


def load_benchmark(spec: str, *, kind: str | None = None, limit: int | None = None) -> Benchmark:
    """Load a benchmark from a JSONL file (see the module docstring) or a Hugging Face dataset name.

    kind: "math", "choice" or None to infer it from the answers. limit: keep only the first `limit`
    problems (the whole file is still validated).
    """
    _check_kind(kind)
    _check_limit(limit)
    path = Path(spec).expanduser()
    if path.is_file():
        return _load_jsonl(path, kind, limit)
    if path.suffix in (".jsonl", ".json") or path.is_dir():
        raise FileNotFoundError(f"Benchmark file {spec!r} does not exist (or is a directory).")
    return _load_hf(spec, kind, limit)


def build_prompt(problem: Problem, tokenizer=None, template: str | None = None) -> str:
    """The prompt text for a problem: the problem and the kind's instruction, in the tokenizer's chat
    template (one user turn, generation prompt added) when it has one, else as plain text.

    template: overrides the default "{problem}\\n\\n{instruction}". Only the ``{problem}`` and
    ``{instruction}`` placeholders are substituted (literally, not with str.format), so LaTeX braces such
    as ``\\boxed{}`` need no escaping.
    """
    if problem.kind not in KINDS:
        raise ValueError(f"Problem {problem.id!r} has unknown kind {problem.kind!r}; expected one of {', '.join(KINDS)}.")
    instruction = DEFAULT_CHOICE_INSTRUCTION if problem.kind == "choice" else DEFAULT_MATH_INSTRUCTION
    if template is None:
        content = f"{problem.problem}\n\n{instruction}"
    else:
        if "{problem}" not in template:
            raise ValueError(f"Prompt template must contain the placeholder {{problem}}; got {template!r}.")
        # One pass over the template: a problem that itself contains "{instruction}" stays untouched.
        content = re.sub(
            r"\{(problem|instruction)\}",
            lambda match: problem.problem if match.group(1) == "problem" else instruction,
            template,
        )
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    # Base model without a chat template: plain text, ending on a newline so the answer starts fresh.
    return content + "\n"


def score(problem: Problem, completion: str) -> bool:
    """Whether `completion` answers `problem` correctly (score_math or score_choice by problem.kind)."""
    if problem.kind == "math":
        return score_math(completion, problem.gt)
    if problem.kind == "choice":
        return score_choice(completion, problem.gt)
    if problem.kind == "exact":
        return score_exact(completion, problem.gt)
    raise ValueError(f"Problem {problem.id!r} has unknown kind {problem.kind!r}; expected one of {', '.join(KINDS)}.")


def score_many(problems: list[Problem], completions: list[str]) -> list[bool]:
    """score() for many (problem, completion) pairs: the math ones are verified together on all
    math-verify workers (deduplicated and cached), which is much faster than one score() at a time."""
    if len(problems) != len(completions):
        raise ValueError(f"score_many: {len(problems)} problems but {len(completions)} completions.")
    results = [False] * len(problems)
    math_indices = []
    for index, (problem, completion) in enumerate(zip(problems, completions)):
        if problem.kind == "math":
            math_indices.append(index)
        else:
            results[index] = score(problem, completion)  # letters: cheap, and raises on an unknown kind
    verdicts = score_math_many([(completions[i], problems[i].gt) for i in math_indices])
    for index, verdict in zip(math_indices, verdicts):
        results[index] = verdict
    return results


def score_completions(problem: Problem, completions: list[str]) -> list[bool]:
    """Whether each completion answers `problem` (score_many: math answers verified in one batch, deduplicated and
    cached)."""
    return [bool(v) for v in score_many([problem] * len(completions), list(completions))]
