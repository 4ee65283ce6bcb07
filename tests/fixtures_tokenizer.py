"""Tiny local tokenizers for tests: nothing is downloaded.

``make_char_tokenizer()`` builds a character-level BPE (one token per printable ASCII character, plus
optional merges) wrapped in ``transformers.PreTrainedTokenizerFast``, so token counts in tests equal
character counts and ``tok.convert_ids_to_tokens`` reads back as text. Special tokens: ``<unk>``,
``<pad>``, ``<bos>``, ``<eos>``, ``<|im_start|>``, ``<|im_end|>``.

``CHATML_TEMPLATE`` / ``CHATML_TEMPLATE_WITH_MARKERS`` are ChatML-like chat templates (the second wraps
assistant output in ``{% generation %}`` markers). Both write ``<|im_end|>`` then a newline after every
turn, and ``<|im_start|>assistant\\n`` as the generation prompt.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, models, processors
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<unk>", "<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"]

# Written with Jinja string literals for the newlines: HF compiles templates with trim_blocks, which
# would eat a literal newline after a block tag.
CHATML_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

CHATML_TEMPLATE_WITH_MARKERS = (
    "{%- for m in messages -%}"
    "{{- '<|im_start|>' + m['role'] + '\\n' -}}"
    "{%- if m['role'] == 'assistant' -%}"
    "{%- generation -%}{{- m['content'] + '<|im_end|>' -}}{%- endgeneration -%}"
    "{%- else -%}{{- m['content'] + '<|im_end|>' -}}{%- endif -%}"
    "{{- '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def make_char_tokenizer(
    *,
    bos: bool = False,
    append_eos: bool = False,
    eos_token: str | None = "<eos>",
    pad_token: str | None = "<pad>",
    chat_template: str | None = None,
    merges: list[tuple[str, str]] = (),
) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer.

    bos: ``tokenizer(text)`` prepends ``<bos>`` (like Llama). append_eos: it also appends ``<eos>`` (like
    tokenizers configured with add_eos_token). merges: BPE merges, e.g. ``[("a", "b")]`` makes "ab" one token.
    """
    chars = list(string.printable)
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + chars)}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), unk_token="<unk>"))
    backend.add_special_tokens(SPECIAL_TOKENS)
    if bos or append_eos:
        single = ("<bos> " if bos else "") + "$A" + (" <eos>" if append_eos else "")
        backend.post_processor = processors.TemplateProcessing(
            single=single,
            pair=single + " $B",
            special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])],
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token=eos_token,
        pad_token=pad_token,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def supervised_spans(tokenizer, labels: list[int]) -> list[str]:
    """The supervised stretches of ``labels`` as text, one string per contiguous run of non -100 labels."""
    spans: list[str] = []
    current: list[int] = []
    for label in list(labels) + [-100]:
        if label != -100:
            current.append(label)
        elif current:
            spans.append("".join(tokenizer.convert_ids_to_tokens(current)))
            current = []
    return spans
