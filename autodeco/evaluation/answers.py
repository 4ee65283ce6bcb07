"""Answer extraction, normalisation and the string-level scorers (choice letters, exact boxes).

    >>> from autodeco.evaluation.answers import extract_answer, score_choice
    >>> score_choice("The answer is (C).", "C")
    True
    >>> extract_answer("Thus \\boxed{1,000 \\text{ cm}}.", "math")   # normalised, for majority voting
    '1000'

Math answers: the last ``\\boxed{...}`` (an unterminated last box falls back to the previous one), else the
last "answer is X" / "Answer: X", else the last number. Equivalence of math answers is decided by math-verify
in autodeco.evaluation.verify. Scoring never raises on a bad completion (it returns False or None), but a gold
that is not a non-empty string (or, for choice, a letter A-J) is a ValueError: it is a broken benchmark, not a
wrong answer (load_benchmark refuses such rows, and turns JSON numbers into strings). The extraction rules in
full: docs/evaluation.md.
"""

from __future__ import annotations

import re

__all__ = [
    "CHOICE_LETTERS",
    "MAX_ANSWER_CHARS",
    "score_choice",
    "score_exact",
    "extract_answer",
    "extract_math_answer",
    "extract_choice_answer",
    "extract_exact_answer",
    "normalize_math_answer",
    "last_boxed",
]

# Answers longer than this are not answers (a runaway generation inside \boxed{...}); don't parse them.
MAX_ANSWER_CHARS = 1000
# How far past "\boxed{" to look for the closing brace: bounds the work on huge malformed completions.
_MAX_BOXED_SCAN = 5000
# Only the last few \boxed occurrences are tried; more would only matter for adversarial input.
_MAX_BOXED_TRIES = 20
CHOICE_LETTERS = "ABCDEFGHIJ"


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
# A lowercase letter in a box is a choice only when it is all the box holds ("\boxed{a + b}" is no choice).
_BOXED_LOWER_LETTER_RE = re.compile(r"\(?\s*([a-j])\s*\)?\s*$")
_STANDALONE_LETTER_RE = re.compile(r"(?<![A-Za-z0-9\\])([A-J])(?![A-Za-z0-9])")


def extract_choice_answer(completion: str) -> str | None:
    """The multiple-choice letter (A-J) a completion chose, or None.

    Order: the last \\boxed{C} (also \\boxed{(C)}, \\boxed{\\text{C}}, \\boxed{C. text}); the last "answer is
    (C)" / "Answer: C"; the last standalone capital letter A-J (skipping the words "A" and "I" in prose,
    as in "I think" or "A bit"). Outside a box letters are case-sensitive (a lowercase "c" in prose is never an
    answer); a box holding only a letter is read case-insensitively: \boxed{d}, \boxed{(d)} are D.
    """
    if not isinstance(completion, str) or not completion:
        return None
    boxed = last_boxed(completion)
    if boxed is not None:
        content = boxed.strip()
        wrapped = _TEXT_WRAPPER_RE.match(content)
        if wrapped:
            content = wrapped.group(1).strip()
        letter = re.match(r"\(?\s*([A-J])\s*\)?(?![A-Za-z])", content) or _BOXED_LOWER_LETTER_RE.match(content)
        if letter:
            return letter.group(1).upper()
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
    """Whether the completion's multiple-choice letter (extract_choice_answer) equals the gold letter A-J.

    Raises ValueError when `gold` is not a capital letter A-J (optionally in parentheses): a broken benchmark row
    must not score as a wrong answer. A bad completion is simply False."""
    gold_letter = gold.strip().strip("()").strip() if isinstance(gold, str) else None
    if gold_letter is None or len(gold_letter) != 1 or gold_letter not in CHOICE_LETTERS:
        raise ValueError(f"score_choice: gold must be one capital letter A-J, got {gold!r}; fix the benchmark's gt.")
    try:
        return extract_choice_answer(completion) == gold_letter
    except Exception:  # never let a weird completion break an evaluation
        return False
