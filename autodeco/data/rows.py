"""Training rows: JSONL reading and validation, and tokenising a row into input_ids + labels.

Each non-blank line is {"prompt": ..., "completion": ...} (prompt used as is; the completion plus EOS is
supervised) or {"messages": [{"role", "content"}, ...]} (chat template applied; only what the model emits for
assistant turns is supervised: content and end-of-turn tokens, not the role header). labels are IGNORE_INDEX
(-100) on context. Bad rows raise DataError naming file, line and field (or are skipped and counted with
skip_bad_rows=True); rows over max_length are cut from the right, and a row left with nothing supervised is
dropped.

    >>> examples, stats = load_examples(["train.jsonl"], tokenizer, max_length=4096)

The rules of chat supervision and of each error: docs/training.md ("Training data").
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from autodeco.config import IGNORE_INDEX

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "DataStats",
    "load_examples",
    "RowTokenizer",
]

# Enough reasons to see what is wrong with a file without flooding the training log.
_MAX_BAD_ROW_EXAMPLES = 5

# The same test transformers uses to decide whether a template can produce an assistant mask.
_GENERATION_MARKER = re.compile(r"\{%-?\s*generation\s*-?%\}")

_UTF8_BOM = b"\xef\xbb\xbf"

_ROW_FORMS = '{"prompt": "...", "completion": "..."} or {"messages": [{"role": "...", "content": "..."}, ...]}'


class DataError(ValueError):
    """A training data file cannot be used as it is; the message says where, why, and how to fix it."""


@dataclass
class DataStats:
    """Counts from :func:`load_examples`, for the training report.

    ``rows_read`` counts non-blank lines (bad ones included); ``rows_used`` the examples kept;
    ``truncated_rows`` rows cut to ``max_length`` (kept or not); ``dropped_rows`` rows that lost every
    supervised token to truncation; token counts are over the kept examples.
    """

    rows_read: int = 0
    rows_used: int = 0
    bad_rows: int = 0
    bad_row_examples: list[str] = field(default_factory=list)
    truncated_rows: int = 0
    dropped_rows: int = 0
    supervised_tokens: int = 0
    total_tokens: int = 0

    def summary(self) -> str:
        """One line for a log, e.g. ``"10 rows read, 8 used, 1 bad (skipped), 2 truncated, 1 dropped ..."``."""
        share = self.supervised_tokens / self.total_tokens if self.total_tokens else 0.0
        text = (
            f"{self.rows_read:,} rows read, {self.rows_used:,} used, {self.bad_rows:,} bad (skipped), "
            f"{self.truncated_rows:,} truncated to max_length, "
            f"{self.dropped_rows:,} dropped (nothing left to supervise after truncation); "
            f"{self.total_tokens:,} tokens, {self.supervised_tokens:,} supervised ({share:.1%})"
        )
        if self.bad_row_examples:
            text += f"; first bad row: {self.bad_row_examples[0]}"
        return text


class _BadRow(Exception):
    """One row is unusable; the caller adds the file and line and decides whether to skip it."""

    def __init__(self, field_name: str, problem: str, fix: str):
        super().__init__(problem)
        self.field_name = field_name
        self.problem = problem
        self.fix = fix


class _FatalRowError(Exception):
    """A row exposes a problem with the set-up (tokenizer or template), not with the row: never skipped."""


def _json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, as the person who wrote the file sees it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


# ---------------------------------------------------------------------------------------------------
# Reading and validating rows
# ---------------------------------------------------------------------------------------------------


def _iter_lines(path: Path) -> Iterator[tuple[int, str | _BadRow]]:
    """Yield ``(1-based line number, text or _BadRow)`` for every non-blank line of ``path``."""
    # Binary mode and a split on b"\n" only: str.splitlines() would also split on U+2028 and friends,
    # which JSON allows unescaped inside strings, and decoding per line lets us name the bad line.
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if lineno == 1 and raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM):]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                yield lineno, _BadRow(
                    "encoding",
                    f"not valid UTF-8 ({err.reason} at byte {err.start} of the line)",
                    "re-save the file as UTF-8",
                )
                continue
            if text.strip():
                yield lineno, text


def _parse_row(text: str) -> dict:
    """Decode and validate one line; return the row object or raise _BadRow."""
    try:
        row = json.loads(text)
    except json.JSONDecodeError as err:
        raise _BadRow(
            "json",
            f"invalid JSON ({err.msg} at column {err.colno})",
            f"each non-blank line must be one complete JSON object: {_ROW_FORMS}",
        ) from None
    if not isinstance(row, dict):
        raise _BadRow("row", f"expected a JSON object, got {_json_type(row)}", f"write each row as {_ROW_FORMS}")

    has_chat = "messages" in row
    has_completion = "prompt" in row or "completion" in row
    if has_chat and has_completion:
        raise _BadRow(
            "messages",
            'the row has both "messages" and "prompt"/"completion", so it is unclear what to train on',
            "keep one form per row",
        )
    if has_chat:
        _check_messages(row["messages"])
    elif has_completion:
        _check_prompt_completion(row)
    else:
        raise _BadRow(
            "prompt",
            f'missing: the row has neither "prompt"/"completion" nor "messages" (keys: {sorted(row)})',
            f"write each row as {_ROW_FORMS}",
        )
    return row


def _check_prompt_completion(row: dict) -> None:
    for name in ("prompt", "completion"):
        if name not in row:
            raise _BadRow(name, "missing", f'add a "{name}" string; both "prompt" and "completion" are required')
        if not isinstance(row[name], str):
            raise _BadRow(name, f"must be a string, got {_json_type(row[name])}", f'make "{name}" a JSON string')
    if row["completion"] == "":
        raise _BadRow(
            "completion", "empty: there is nothing to learn from this row", "remove the row or give it a completion"
        )


def _check_messages(messages: Any) -> None:
    fix = 'make "messages" a non-empty array of {"role": "...", "content": "..."} objects'
    if not isinstance(messages, list):
        raise _BadRow("messages", f"must be an array, got {_json_type(messages)}", fix)
    if not messages:
        raise _BadRow("messages", "empty array", fix)
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise _BadRow(where, f"must be an object, got {_json_type(message)}", fix)
        for key in ("role", "content"):
            if key not in message:
                raise _BadRow(f"{where}.{key}", "missing", fix)
            if not isinstance(message[key], str):
                raise _BadRow(
                    f"{where}.{key}", f"must be a string, got {_json_type(message[key])}", f'make "{key}" a JSON string'
                )
        if message["role"] == "assistant" and message["content"] == "":
            raise _BadRow(
                f"{where}.content",
                "empty assistant turn: there is nothing to learn from it",
                "remove the turn or give it content",
            )
    if not any(message["role"] == "assistant" for message in messages):
        raise _BadRow(
            "messages",
            'no turn with role "assistant", so nothing would be supervised',
            'add an assistant turn, or use a {"prompt", "completion"} row',
        )
    if messages[0]["role"] == "assistant":
        # An opening assistant turn has no context to condition on, and without a system/user turn before
        # it the incremental renderer has no generation prompt to separate the role header from the content.
        raise _BadRow(
            "messages[0].role",
            '"assistant" as the first turn: there is no context before it',
            "start the conversation with a system or user turn",
        )


# ---------------------------------------------------------------------------------------------------
# Tokenising
# ---------------------------------------------------------------------------------------------------


def _appended_special_count(tokenizer) -> int:
    """How many special tokens ``tokenizer(text)`` appends after the text (0 for Llama/Qwen-style tokenizers).

    The prompt keeps what the tokenizer puts *before* the text (BOS), but an appended EOS would sit between
    prompt and completion, teaching the model that the prompt ends the document; it belongs after the
    completion, where :func:`_tokenize_prompt_completion` puts it.
    """
    plain = tokenizer("x", add_special_tokens=False)["input_ids"]
    full = tokenizer("x")["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start : start + len(plain)] == plain:
            return len(full) - start - len(plain)
    return 0


def _tokenize_prompt_completion(row: dict, tokenizer, eos_id: int, strip_suffix: int) -> tuple[list[int], list[int]]:
    # Separate calls so the prompt/completion boundary is a token boundary: tokenising the concatenated
    # text could merge the last prompt characters with the first completion ones into one token.
    prompt_ids = list(tokenizer(row["prompt"], verbose=False)["input_ids"])
    if strip_suffix:
        prompt_ids = prompt_ids[: len(prompt_ids) - strip_suffix]
    completion_ids = list(tokenizer(row["completion"], add_special_tokens=False, verbose=False)["input_ids"])
    if not completion_ids or completion_ids[-1] != eos_id:  # a completion may already end with the EOS text
        completion_ids.append(eos_id)
    input_ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return input_ids, labels


class _ChatTokenizer:
    """Turns a validated ``messages`` list into ``(input_ids, labels)``; see "Chat supervision" in docs/training.md."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        template = tokenizer.get_chat_template()
        # The assistant mask needs character offsets, which only fast (Rust) tokenizers provide.
        self.use_markers = bool(_GENERATION_MARKER.search(template)) and getattr(tokenizer, "is_fast", False)
        self.eos_id = tokenizer.eos_token_id

    def __call__(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        import jinja2  # transformers needs it for any chat template, so it is present whenever we get here

        try:
            if self.use_markers:
                out = self.tokenizer.apply_chat_template(
                    messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
                )
                input_ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
                if any(mask):
                    return input_ids, [tok if keep else IGNORE_INDEX for tok, keep in zip(input_ids, mask)]
                # The markers did not cover this conversation (e.g. they sit in a branch it does not take):
                # fall through to incremental rendering rather than train on nothing.
            return self._incremental(messages)
        except jinja2.TemplateError as err:
            # Templates reject conversations they cannot render (e.g. roles that do not alternate).
            raise _BadRow(
                "messages",
                f"the chat template refused this conversation: {err}",
                "make the conversation fit the model's chat template",
            ) from None

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        # tokenize=True tokenises the rendered text with add_special_tokens=False, exactly as inference does.
        ids = self.tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=False, add_generation_prompt=add_generation_prompt
        )
        return list(ids)

    def _incremental(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        input_ids = self._render(messages, add_generation_prompt=False)
        labels = [IGNORE_INDEX] * len(input_ids)
        for index, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            # index >= 1 here: _check_messages rejects an opening assistant turn.
            start = self._prefix_length(input_ids, self._render(messages[:index], add_generation_prompt=True))
            if start is None:
                # The generation prompt is not how this template opens a stored assistant turn, so the header
                # cannot be told apart from the content: start right after the previous turn.
                start = self._prefix_length(input_ids, self._render(messages[:index], add_generation_prompt=False))
            end = self._prefix_length(input_ids, self._render(messages[: index + 1], add_generation_prompt=False))
            if start is None or end is None or end <= start:
                raise _FatalRowError(
                    f"the tokenizer's chat template is not prefix-stable: rendering messages[:{index}] and "
                    f"messages[:{index + 1}] does not give a token prefix of the whole conversation, so the "
                    f"tokens of assistant turn {index} cannot be located. Add "
                    "{% generation %}...{% endgeneration %} markers around the assistant output in the template "
                    "(transformers then marks those tokens), or write the data as prompt/completion rows with "
                    "the template applied to the prompt yourself"
                )
            turn = input_ids[start:end]
            if self.eos_id is not None and self.eos_id in turn:
                # Supervise up to the turn's last EOS: what the template writes after it is never generated.
                end = start + len(turn) - turn[::-1].index(self.eos_id)
            labels[start:end] = input_ids[start:end]
        return input_ids, labels

    @staticmethod
    def _prefix_length(full: Sequence[int], prefix: Sequence[int]) -> int | None:
        return len(prefix) if list(full[: len(prefix)]) == list(prefix) else None


class RowTokenizer:
    """Tokenises one validated row exactly as :func:`load_examples` does (before truncation).

        >>> ids, labels = RowTokenizer(tokenizer)({"prompt": "Q: 1+1?\n", "completion": "2"})

    ``__call__`` raises :class:`DataError` naming ``where`` when the row cannot be tokenised (bad fields, a
    chat row without a chat template, no EOS token). Set-up probes (the tokenizer's appended special tokens,
    the chat renderer) run once, on the first row that needs them.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.eos_id = tokenizer.eos_token_id
        self._strip_suffix: int | None = None  # probed on the first prompt/completion row
        self._chat: _ChatTokenizer | None = None  # built on the first chat row

    def __call__(self, row: dict, where: str = "row") -> tuple[list[int], list[int]]:
        try:
            if "messages" in row:
                _check_messages(row["messages"])
            else:
                _check_prompt_completion(row)
            return self.tokenize_unchecked(row)
        except _BadRow as bad:
            raise DataError(f"{where}: {bad.field_name}: {bad.problem}. Fix: {bad.fix}.") from None
        except _FatalRowError as err:
            raise DataError(f"{where}: {err}") from None

    def tokenize_unchecked(self, row: dict) -> tuple[list[int], list[int]]:
        """(input_ids, labels) of a row already validated by _parse_row; raises _BadRow / _FatalRowError."""
        tokenizer = self.tokenizer
        if "messages" in row:
            if self._chat is None:
                if not getattr(tokenizer, "chat_template", None):
                    raise _FatalRowError(
                        'this row is a chat row ("messages") but the tokenizer has no chat template. '
                        'Either write the data as {"prompt": ..., "completion": ...} rows (prompt already '
                        "formatted for the model), or set tokenizer.chat_template to a Jinja template "
                        "before loading"
                    )
                self._chat = _ChatTokenizer(tokenizer)
            return self._chat(row["messages"])
        if self.eos_id is None:
            raise _FatalRowError(
                "prompt/completion rows get tokenizer.eos_token appended, but the tokenizer has no "
                "EOS token; set tokenizer.eos_token to the token that ends a generation"
            )
        if self._strip_suffix is None:
            self._strip_suffix = _appended_special_count(tokenizer)
        return _tokenize_prompt_completion(row, tokenizer, self.eos_id, self._strip_suffix)


# ---------------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------------


def _as_path_list(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(paths, (str, Path)):
        paths = [paths]
    result = [Path(p) for p in paths]
    if not result:
        raise DataError("no training data files were given; pass one or more JSONL paths")
    return result


def load_examples(
    paths: str | Path | Sequence[str | Path],
    tokenizer,
    *,
    max_length: int = 4096,
    skip_bad_rows: bool = False,
    keep_rows: bool = False,
) -> tuple[list[dict], DataStats]:
    """Read JSONL training rows from one or more files and tokenise them.

    Returns ``(examples, stats)``; each example is ``{"input_ids": list[int], "labels": list[int]}``
    (equal lengths, at most ``max_length``; labels unshifted, ``-100`` where not supervised). With
    ``keep_rows`` each example also holds ``"row"``, the validated JSON row it came from (for
    autodeco.control, which re-tokenises rows with a decoding command inserted).
    Raises :class:`DataError` for a bad row (unless ``skip_bad_rows``), a missing or empty file, a
    chat row with a tokenizer that has no chat template, or a dataset with no usable row at all.
    """
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    files = _as_path_list(paths)
    for path in files:
        if not path.is_file():
            raise DataError(f"{path}: no such file; check the path of the training data")

    stats = DataStats()
    examples: list[dict] = []
    row_tokenizer = RowTokenizer(tokenizer)

    for path in files:
        rows_in_file = 0
        for lineno, text in _iter_lines(path):
            rows_in_file += 1
            stats.rows_read += 1
            where = f"{path}:{lineno}"
            try:
                if isinstance(text, _BadRow):
                    raise text
                row = _parse_row(text)
                input_ids, labels = row_tokenizer.tokenize_unchecked(row)
            except _BadRow as bad:
                reason = f"{where}: {bad.field_name}: {bad.problem}"
                if not skip_bad_rows:
                    raise DataError(
                        f"{reason}. Fix: {bad.fix}. (Or pass skip_bad_rows=True to skip and count bad rows.)"
                    ) from None
                stats.bad_rows += 1
                if len(stats.bad_row_examples) < _MAX_BAD_ROW_EXAMPLES:
                    stats.bad_row_examples.append(reason)
                continue
            except _FatalRowError as err:
                raise DataError(f"{where}: {err}") from None

            if len(input_ids) > max_length:
                stats.truncated_rows += 1
                # Right truncation keeps the prompt, which everything after it is conditioned on.
                input_ids, labels = input_ids[:max_length], labels[:max_length]
            supervised = sum(1 for label in labels if label != IGNORE_INDEX)
            if supervised == 0:
                stats.dropped_rows += 1
                continue
            example = {"input_ids": input_ids, "labels": labels}
            if keep_rows:
                example["row"] = row
            examples.append(example)
            stats.rows_used += 1
            stats.supervised_tokens += supervised
            stats.total_tokens += len(input_ids)

        if rows_in_file == 0:
            raise DataError(f"{path}: the file is empty (no JSONL rows); remove it from the list or fill it")

    if not examples:
        names = ", ".join(str(p) for p in files)
        hints = []
        if stats.bad_rows:
            hints.append("every row was bad: " + "; ".join(stats.bad_row_examples))
        if stats.dropped_rows:
            hints.append(
                f"{stats.dropped_rows} row(s) lost all supervised tokens to truncation; raise max_length "
                f"(now {max_length}) or shorten the prompts"
            )
        raise DataError(f"no usable training rows in {names} ({stats.summary()}). " + " ".join(hints))
    return examples, stats
