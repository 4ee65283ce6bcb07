"""The decoding-control settings file written beside trained heads (OUTPUT_DIR/autodeco_control.json).

    save_control_settings("runs/heads", share=0.3, margin=0.1, weight=1.0, seed=42)
    load_control_settings("runs/heads")      # the dict, or None for heads trained without control

It records the control options and the phrasings training saw, which `autodeco eval-control` reads to tell seen
from held-out commands (docs/control.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from autodeco.atomic import write_json_atomic
from autodeco.control import HIGH_COMMANDS, HIGH_COMMANDS_HELD_OUT, LOW_COMMANDS, LOW_COMMANDS_HELD_OUT

__all__ = ["CONTROL_SETTINGS_NAME", "load_control_settings", "save_control_settings"]

CONTROL_SETTINGS_NAME = "autodeco_control.json"


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
