"""The decoding-control vocabulary: commands like "Answer with low randomness." that should move the heads' T and P.

    >>> from autodeco.control import LOW_COMMANDS, insert_command
    >>> prompt = insert_command(chat_prompt, "Answer with low randomness.", tokenizer)   # into the user message

LOW_COMMANDS / HIGH_COMMANDS are used in training; *_HELD_OUT are wordings training never sees, so an evaluation
can tell memorised phrasings from understanding. The paired data is autodeco.data.ControlDataset, the loss
autodeco.losses.control_margin_loss. save/load_control_settings (the settings file written beside trained heads)
stay here until the training package takes them. See docs/control.md (paper sec. 5, Table 3).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

from autodeco.atomic import write_json_atomic

__all__ = [
    "LOW_COMMANDS",
    "HIGH_COMMANDS",
    "LOW_COMMANDS_HELD_OUT",
    "HIGH_COMMANDS_HELD_OUT",
    "LOW",
    "HIGH",
    "CONTROL_SETTINGS_NAME",
    "insert_command",
    "insert_command_into_messages",
    "user_turn_suffix",
    "check_command",
    "save_control_settings",
    "load_control_settings",
]

# Used in training (drawn uniformly for each commanded twin).
LOW_COMMANDS: tuple[str, ...] = (
    "Answer with low randomness.",
    "Be precise and deterministic.",
    "Generate your answer with low diversity.",
    "Respond in a focused, conservative way.",
    "Use as little creativity as possible.",
    "Please be careful and consistent.",
)
HIGH_COMMANDS: tuple[str, ...] = (
    "Answer with high randomness.",
    "Be creative and diverse.",
    "Generate your answer with high diversity.",
    "Respond in an exploratory, adventurous way.",
    "Use as much creativity as possible.",
    "Please be playful and unpredictable.",
)
# Never used in training: how well control generalises to wordings the heads have not seen.
LOW_COMMANDS_HELD_OUT: tuple[str, ...] = (
    "Keep the randomness of your answer minimal.",
    "Stay predictable and avoid surprises.",
    "Reply in a strict, methodical manner.",
)
HIGH_COMMANDS_HELD_OUT: tuple[str, ...] = (
    "Let your answer be wild and surprising.",
    "Make the response as varied as you can.",
    "Take risks and try unusual ideas.",
)

LOW, HIGH = -1, 1  # directions: the commanded mean should be below (low) or above (high) the plain one
# Written beside the trained heads by `autodeco train --control-share ...`: which phrasings training saw.
CONTROL_SETTINGS_NAME = "autodeco_control.json"
_SENTINEL = "\u2063AUTODECO_COMMAND_SENTINEL\u2063"


def check_command(command) -> None:
    if not isinstance(command, str) or not command.strip():
        raise ValueError(f"command must be a non-empty string such as 'Answer with low randomness.', got {command!r}.")


def user_turn_suffix(tokenizer) -> str | None:
    """What the tokenizer's chat template writes after a user message's content up to the generation prompt's end
    (e.g. "<|im_end|>\\n<|im_start|>assistant\\n"), or None when there is no chat template or it cannot tell.

    Found by rendering one user turn whose content is a sentinel and taking the text after the sentinel.
    """
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        return None
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": _SENTINEL}], tokenize=False, add_generation_prompt=True
        )
    except Exception:  # a template that refuses a lone user turn (jinja2 errors of any kind): no suffix known
        return None
    if not isinstance(text, str) or text.count(_SENTINEL) != 1:
        return None
    return text.split(_SENTINEL, 1)[1]


def insert_command(prompt: str, command: str, tokenizer=None) -> str:
    """`prompt` with `command` at the end of its (last) user message.

    prompt: an already formatted prompt. When the tokenizer has a chat template and the prompt ends with the
    template's user-turn suffix (see user_turn_suffix), the command goes right before that suffix, on a line of
    its own. Otherwise (no chat template, or a prompt the template did not write) the command is appended to the
    prompt's text, before its trailing whitespace (so "problem\\n" becomes "problem\\ncommand\\n").
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string (a formatted prompt), got {type(prompt).__name__}.")
    check_command(command)
    suffix = user_turn_suffix(tokenizer)
    if suffix and prompt.endswith(suffix):
        body = prompt[: len(prompt) - len(suffix)]
        return f"{body}\n{command}{suffix}" if body.strip() else f"{body}{command}{suffix}"
    body = prompt.rstrip()
    tail = prompt[len(body):]
    return f"{body}\n{command}{tail}" if body else f"{command}{tail}"


def insert_command_into_messages(messages: list[dict], command: str) -> list[dict]:
    """A copy of chat `messages` whose last user message has "\\n" + `command` appended to its content."""
    check_command(command)
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}.")
    users = [i for i, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        roles = [m.get("role") if isinstance(m, dict) else type(m).__name__ for m in messages]
        raise ValueError(
            f"messages has no user message (roles: {roles}), so there is nowhere to put the command {command!r}; "
            "add a user turn."
        )
    out = copy.deepcopy(messages)
    last = out[users[-1]]
    content = last.get("content")
    if not isinstance(content, str):
        raise ValueError(
            f"messages[{users[-1]}].content must be a string to append the command to, got {type(content).__name__}."
        )
    last["content"] = f"{content}\n{command}" if content.strip() else command
    return out


# ---------------------------------------------------------------------------------------------------- settings


def save_control_settings(directory, *, share: float, margin: float, weight: float, seed: int,
                          low_commands: Sequence[str] = LOW_COMMANDS, high_commands: Sequence[str] = HIGH_COMMANDS,
                          extra: dict | None = None) -> Path:
    """Write CONTROL_SETTINGS_NAME beside the heads: the control options and the phrasings training saw."""
    path = Path(directory) / CONTROL_SETTINGS_NAME
    write_json_atomic(path, {
        "share": share, "margin": margin, "weight": weight, "seed": seed,
        "low_commands": list(low_commands), "high_commands": list(high_commands),
        "low_commands_held_out": list(LOW_COMMANDS_HELD_OUT), "high_commands_held_out": list(HIGH_COMMANDS_HELD_OUT),
        **(extra or {}),
    })
    return path


def load_control_settings(directory) -> dict | None:
    """The CONTROL_SETTINGS_NAME json of a model directory, or None when it has none (not trained with control)."""
    path = Path(directory) / CONTROL_SETTINGS_NAME
    if not path.is_file():
        return None
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}); delete it or rewrite it with save_control_settings.") from None
    for key in ("low_commands", "high_commands"):
        value = settings.get(key)
        if not (isinstance(value, list) and value and all(isinstance(v, str) and v.strip() for v in value)):
            raise ValueError(f"{path}: '{key}' must be a non-empty list of phrasings, got {value!r}.")
    return settings
