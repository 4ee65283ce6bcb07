"""TEMPORARY home of resolve_dtype, load_tokenizer and copy_tokenizer (moved out of the old autodeco/cli.py).

The core helper's autodeco/modeling/io.py is their one home (plan.md); until that branch is merged the library
and the CLI import them from here. Integrator: point these imports at autodeco.modeling and delete this file.
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(choice: str, on_gpu: bool):
    """`--dtype` value -> torch dtype; "auto" is bfloat16 on a bf16-capable GPU, else float32."""
    if choice == "auto":
        return torch.bfloat16 if on_gpu and torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return DTYPES[choice]


def load_tokenizer(*sources: str | None):
    """The first tokenizer that loads from `sources` (an AutoDeco directory, then its base, ...)."""
    tried = []
    for source in sources:
        if not source:
            continue
        try:
            return AutoTokenizer.from_pretrained(source)
        except (OSError, ValueError, TypeError) as exc:
            tried.append(f"{source} ({exc.__class__.__name__})")
    raise FileNotFoundError(
        f"No tokenizer found in {' or '.join(tried) or 'the model'}. Save one beside the model with "
        "tokenizer.save_pretrained(DIR)."
    )


def copy_tokenizer(source: str, target: str) -> bool:
    """Save the tokenizer of `source` into `target`; False when `source` has none."""
    try:
        load_tokenizer(source).save_pretrained(target)
        return True
    except FileNotFoundError:
        return False
