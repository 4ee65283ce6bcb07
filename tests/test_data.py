"""Tests for autodeco.data: JSONL rows -> input_ids/labels, bad-row reporting, truncation, the collator.

All tokenizers are built locally (tests/fixtures_tokenizer.py): one token per character, so expected
token sequences can be written as text.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from autodeco.data import (
    IGNORE_INDEX,
    AutoDecoDataset,
    DataCollatorForCompletion,
    DataError,
    DataStats,
    load_examples,
)
from fixtures_tokenizer import (
    CHATML_TEMPLATE,
    CHATML_TEMPLATE_WITH_MARKERS,
    make_char_tokenizer,
    supervised_spans,
)


def write_jsonl(path, rows) -> str:
    """Write rows (dicts are JSON-encoded, str/bytes written raw) one per line; return the path as str."""
    with open(path, "wb") as handle:
        for row in rows:
            if isinstance(row, bytes):
                handle.write(row)
            elif isinstance(row, str):
                handle.write(row.encode("utf-8"))
            else:
                handle.write(json.dumps(row).encode("utf-8"))
            handle.write(b"\n")
    return str(path)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello"},
    {"role": "assistant", "content": "Hi there"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
]


# --------------------------------------------------------------------------------------------------
# prompt / completion rows
# --------------------------------------------------------------------------------------------------


def test_prompt_completion_masks_exactly_the_prompt_and_supervises_eos(tmp_path):
    tok = make_char_tokenizer(bos=True)
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Q: 2+2?\nA:", "completion": " 4"}])
    examples, stats = load_examples(path, tok)

    (example,) = examples
    bos, eos = tok.bos_token_id, tok.eos_token_id
    prompt_ids = [bos] + ids(tok, "Q: 2+2?\nA:")  # BOS as tokenizer(prompt) adds it
    completion_ids = ids(tok, " 4") + [eos]  # no BOS before the completion; EOS appended
    assert example["input_ids"] == prompt_ids + completion_ids
    assert example["labels"] == [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    assert stats.rows_read == stats.rows_used == 1
    assert stats.supervised_tokens == len(completion_ids)
    assert stats.total_tokens == len(prompt_ids) + len(completion_ids)


def test_prompt_and_completion_are_tokenised_separately(tmp_path):
    # With the merge a+b -> "ab", tokenising "xa" + "by" as one string would hide the boundary in one token.
    tok = make_char_tokenizer(merges=[("a", "b")])
    assert len(ids(tok, "ab")) == 1
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "xa", "completion": "by"}])
    (example,), _ = load_examples(path, tok)
    assert example["input_ids"] == ids(tok, "xa") + ids(tok, "by") + [tok.eos_token_id]
    assert supervised_spans(tok, example["labels"]) == ["by<eos>"]


def test_eos_the_tokenizer_appends_to_the_prompt_is_removed(tmp_path):
    tok = make_char_tokenizer(bos=True, append_eos=True)
    assert tok("p")["input_ids"][-1] == tok.eos_token_id  # the tokenizer really appends it
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "completion": "c"}])
    (example,), _ = load_examples(path, tok)
    assert example["input_ids"] == [tok.bos_token_id] + ids(tok, "pc") + [tok.eos_token_id]


def test_completion_that_already_ends_with_eos_gets_no_second_one(tmp_path):
    tok = make_char_tokenizer()
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "completion": "c<eos>"}])
    (example,), _ = load_examples(path, tok)
    assert example["input_ids"] == ids(tok, "pc") + [tok.eos_token_id]


def test_empty_prompt_is_allowed(tmp_path):
    tok = make_char_tokenizer()
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "", "completion": "abc"}])
    (example,), _ = load_examples(path, tok)
    assert example["labels"] == example["input_ids"] == ids(tok, "abc") + [tok.eos_token_id]


def test_tokenizer_without_eos_is_a_clear_error(tmp_path):
    tok = make_char_tokenizer(eos_token=None)
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=r"train\.jsonl:1: .*eos_token"):
        load_examples(path, tok)


# --------------------------------------------------------------------------------------------------
# chat rows
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "template", [CHATML_TEMPLATE_WITH_MARKERS, CHATML_TEMPLATE], ids=["generation-markers", "incremental"]
)
def test_chat_supervises_only_assistant_content_and_end_of_turn(tmp_path, template):
    # eos = <|im_end|>, as in ChatML instruct tokenizers: both paths supervise content + <|im_end|>.
    tok = make_char_tokenizer(chat_template=template, eos_token="<|im_end|>")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    (example,), stats = load_examples(path, tok)

    assert example["input_ids"] == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert supervised_spans(tok, example["labels"]) == ["Hi there<|im_end|>", "Ciao<|im_end|>"]
    supervised = [i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX]
    assert all(example["labels"][i] == example["input_ids"][i] for i in supervised)  # unshifted
    assert stats.supervised_tokens == len("Hi there") + 1 + len("Ciao") + 1


def test_generation_markers_decide_what_is_supervised(tmp_path):
    # Markers around the content only: the end-of-turn token is then context, as the template author chose.
    template = CHATML_TEMPLATE_WITH_MARKERS.replace(
        "{%- generation -%}{{- m['content'] + '<|im_end|>' -}}{%- endgeneration -%}",
        "{%- generation -%}{{- m['content'] -}}{%- endgeneration -%}{{- '<|im_end|>' -}}",
    )
    assert template != CHATML_TEMPLATE_WITH_MARKERS
    tok = make_char_tokenizer(chat_template=template, eos_token="<|im_end|>")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    (example,), _ = load_examples(path, tok)
    assert example["input_ids"] == tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    assert supervised_spans(tok, example["labels"]) == ["Hi there", "Ciao"]


def test_markers_that_cover_nothing_fall_back_to_incremental_rendering(tmp_path):
    # The markers sit in a branch this short conversation never takes, so the mask would be all zeros.
    template = (
        "{%- if messages | length > 100 -%}{%- generation -%}{{- 'x' -}}{%- endgeneration -%}"
        "{%- else -%}" + CHATML_TEMPLATE + "{%- endif -%}"
    )
    tok = make_char_tokenizer(chat_template=template, eos_token="<|im_end|>")
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    (example,), _ = load_examples(path, tok)
    assert supervised_spans(tok, example["labels"]) == ["Hi there<|im_end|>", "Ciao<|im_end|>"]


def test_chat_incremental_with_separate_eos_supervises_whole_turn_after_header(tmp_path):
    # eos (<eos>) never appears in the turn, so nothing marks where generation stops: the whole rendered
    # turn after the generation prompt is supervised, the template's trailing newline included.
    tok = make_char_tokenizer(chat_template=CHATML_TEMPLATE)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    (example,), _ = load_examples(path, tok)
    assert supervised_spans(tok, example["labels"]) == ["Hi there<|im_end|>\n", "Ciao<|im_end|>\n"]


def test_chat_trailing_user_turn_is_not_supervised(tmp_path):
    tok = make_char_tokenizer(chat_template=CHATML_TEMPLATE, eos_token="<|im_end|>")
    messages = CONVERSATION[:3] + [{"role": "user", "content": "more?"}]
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}])
    (example,), _ = load_examples(path, tok)
    assert supervised_spans(tok, example["labels"]) == ["Hi there<|im_end|>"]


def test_chat_rows_without_a_chat_template_are_a_clear_error(tmp_path):
    tok = make_char_tokenizer()
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    with pytest.raises(DataError, match=r"chat\.jsonl:1: .*no chat template.*prompt.*chat_template"):
        load_examples(path, tok, skip_bad_rows=True)  # a set-up problem, not a bad row: never skipped


def test_template_that_is_not_prefix_stable_is_rejected(tmp_path):
    # Writes the number of turns up front, so every prefix renders differently from the whole conversation.
    template = "{{- messages | length -}}" + CHATML_TEMPLATE
    tok = make_char_tokenizer(chat_template=template)
    path = write_jsonl(tmp_path / "chat.jsonl", [{"prompt": "p", "completion": "c"}, {"messages": CONVERSATION}])
    with pytest.raises(DataError, match=r"chat\.jsonl:2: .*not prefix-stable.*generation"):
        load_examples(path, tok)


def test_conversation_the_template_refuses_is_a_bad_row(tmp_path):
    template = (
        "{%- for m in messages -%}{%- if m['role'] == 'tool' -%}"
        "{{- raise_exception('tool turns are not supported') -}}{%- endif -%}{%- endfor -%}" + CHATML_TEMPLATE
    )
    tok = make_char_tokenizer(chat_template=template)
    bad = {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}, CONVERSATION[2]]}
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}, bad])
    with pytest.raises(DataError, match=r"chat\.jsonl:2: messages: .*tool turns are not supported"):
        load_examples(path, tok)
    examples, stats = load_examples(path, tok, skip_bad_rows=True)
    assert (len(examples), stats.bad_rows) == (1, 1)


def test_chat_and_prompt_completion_rows_mix(tmp_path):
    tok = make_char_tokenizer(chat_template=CHATML_TEMPLATE_WITH_MARKERS, eos_token="<|im_end|>")
    path = write_jsonl(tmp_path / "mix.jsonl", [{"prompt": "p", "completion": "c"}, {"messages": CONVERSATION}])
    examples, stats = load_examples(path, tok)
    assert [supervised_spans(tok, e["labels"]) for e in examples] == [
        ["c<|im_end|>"],
        ["Hi there<|im_end|>", "Ciao<|im_end|>"],
    ]
    assert stats.rows_used == 2


# --------------------------------------------------------------------------------------------------
# truncation
# --------------------------------------------------------------------------------------------------


def test_long_rows_are_truncated_from_the_right_and_counted(tmp_path):
    tok = make_char_tokenizer()
    rows = [
        {"prompt": "abcd", "completion": "efghij"},  # 4 + 6 + EOS = 11 tokens -> cut to 6
        {"prompt": "0123456789", "completion": "x"},  # the prompt alone fills max_length -> dropped
        {"prompt": "ab", "completion": "c"},  # 4 tokens: untouched
    ]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    examples, stats = load_examples(path, tok, max_length=6)

    assert [e["input_ids"] for e in examples] == [ids(tok, "abcdef"), ids(tok, "abc") + [tok.eos_token_id]]
    assert supervised_spans(tok, examples[0]["labels"]) == ["ef"]
    assert (stats.rows_read, stats.rows_used, stats.truncated_rows, stats.dropped_rows) == (3, 2, 2, 1)
    assert stats.total_tokens == 6 + 4


def test_chat_truncation_keeps_surviving_assistant_tokens(tmp_path):
    tok = make_char_tokenizer(chat_template=CHATML_TEMPLATE_WITH_MARKERS, eos_token="<|im_end|>")
    full = tok.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    context = tok.apply_chat_template(CONVERSATION[:2], tokenize=True, return_dict=False, add_generation_prompt=True)
    cut = len(context) + 2  # keep "Hi" of the first assistant turn
    path = write_jsonl(tmp_path / "chat.jsonl", [{"messages": CONVERSATION}])
    (example,), stats = load_examples(path, tok, max_length=cut)
    assert example["input_ids"] == full[:cut]
    assert supervised_spans(tok, example["labels"]) == ["Hi"]
    assert stats.truncated_rows == 1


def test_everything_dropped_by_truncation_is_an_error_with_a_hint(tmp_path):
    tok = make_char_tokenizer()
    path = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "a long prompt", "completion": "x"}])
    with pytest.raises(DataError, match=r"train\.jsonl.*max_length"):
        load_examples(path, tok, max_length=4)


# --------------------------------------------------------------------------------------------------
# bad rows
# --------------------------------------------------------------------------------------------------

GOOD = {"prompt": "p", "completion": "c"}

BAD_ROWS = {
    "invalid-json": ('{"prompt": "p", "completion": ', "json"),
    "array-row": ('["p", "c"]', "row"),
    "string-row": ('"just text"', "row"),
    "neither-form": ({"text": "hello"}, "prompt"),
    "both-forms": ({"prompt": "p", "completion": "c", "messages": CONVERSATION}, "messages"),
    "missing-prompt": ({"completion": "c"}, "prompt"),
    "missing-completion": ({"prompt": "p"}, "completion"),
    "prompt-not-string": ({"prompt": ["p"], "completion": "c"}, "prompt"),
    "completion-not-string": ({"prompt": "p", "completion": 4}, "completion"),
    "completion-null": ({"prompt": "p", "completion": None}, "completion"),
    "empty-completion": ({"prompt": "p", "completion": ""}, "completion"),
    "messages-not-list": ({"messages": "hi"}, "messages"),
    "messages-empty": ({"messages": []}, "messages"),
    "message-not-object": ({"messages": [CONVERSATION[1], "hi"]}, r"messages\[1\]"),
    "message-missing-role": ({"messages": [CONVERSATION[1], {"content": "x"}]}, r"messages\[1\]\.role"),
    "message-missing-content": ({"messages": [CONVERSATION[1], {"role": "assistant"}]}, r"messages\[1\]\.content"),
    "content-not-string": (
        {"messages": [CONVERSATION[1], {"role": "assistant", "content": [{"type": "text"}]}]},
        r"messages\[1\]\.content",
    ),
    "empty-assistant-content": (
        {"messages": [CONVERSATION[1], {"role": "assistant", "content": ""}]},
        r"messages\[1\]\.content",
    ),
    "no-assistant-turn": ({"messages": CONVERSATION[:2]}, "messages"),
    "assistant-first": ({"messages": [CONVERSATION[2], CONVERSATION[1]]}, r"messages\[0\]\.role"),
    "not-utf8": (b'{"prompt": "p\xff", "completion": "c"}', "encoding"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_each_bad_row_kind_names_file_line_and_field(tmp_path, kind):
    bad, field_name = BAD_ROWS[kind]
    tok = make_char_tokenizer(chat_template=CHATML_TEMPLATE)
    # Line 3 is blank: blank lines are skipped but still counted in line numbers, so the bad row is line 4.
    path = write_jsonl(tmp_path / "data.jsonl", [GOOD, GOOD, "", bad, GOOD])
    with pytest.raises(DataError) as info:
        load_examples(path, tok)
    message = str(info.value)
    assert message.startswith(f"{path}:4: ")
    assert re.match(rf"{re.escape(path)}:4: {field_name}: ", message), message
    assert "Fix: " in message and "skip_bad_rows=True" in message


def test_skip_bad_rows_skips_and_counts_them(tmp_path):
    tok = make_char_tokenizer(chat_template=CHATML_TEMPLATE)
    kinds = list(BAD_ROWS)
    rows = [GOOD] + [BAD_ROWS[kind][0] for kind in kinds] + [GOOD, ""]
    path = write_jsonl(tmp_path / "data.jsonl", rows)
    examples, stats = load_examples(path, tok, skip_bad_rows=True)

    assert len(examples) == stats.rows_used == 2
    assert stats.bad_rows == len(kinds)
    assert stats.rows_read == len(kinds) + 2  # the trailing blank line is not a row
    assert len(stats.bad_row_examples) == 5  # only the first few reasons are kept
    assert stats.bad_row_examples[0].startswith(f"{path}:2: json: invalid JSON")
    assert stats.bad_row_examples[4].startswith(f"{path}:6: messages: the row has both")  # 5th kind: both-forms
    assert f"{len(kinds)} bad" in stats.summary()


def test_utf8_bom_and_crlf_line_endings_are_accepted(tmp_path):
    tok = make_char_tokenizer()
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n" + json.dumps(GOOD).encode() + b"\r\n")
    examples, _ = load_examples(path, tok)
    assert len(examples) == 2


def test_line_separator_inside_a_json_string_does_not_split_the_row(tmp_path):
    tok = make_char_tokenizer()
    # U+2028 is legal unescaped in JSON strings; str.splitlines() would cut the row in two there.
    path = tmp_path / "ls.jsonl"
    path.write_bytes('{"prompt": "a\u2028b", "completion": "c"}\n'.encode("utf-8"))
    (example,), _ = load_examples(path, tok)
    assert supervised_spans(tok, example["labels"]) == ["c<eos>"]


# --------------------------------------------------------------------------------------------------
# empty data, missing files, several files
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", [b"", b"\n  \n\n"], ids=["empty", "blank-lines-only"])
def test_empty_file_is_an_error_naming_it(tmp_path, content):
    tok = make_char_tokenizer()
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError, match=r"empty\.jsonl: the file is empty"):
        load_examples(path, tok)


def test_all_rows_bad_with_skipping_is_an_error_naming_the_file(tmp_path):
    tok = make_char_tokenizer()
    path = write_jsonl(tmp_path / "allbad.jsonl", ["not json", {"prompt": "p"}])
    with pytest.raises(DataError, match=r"no usable training rows in .*allbad\.jsonl.*allbad\.jsonl:1: json"):
        load_examples(path, tok, skip_bad_rows=True)


def test_missing_file_and_no_files_are_errors(tmp_path):
    tok = make_char_tokenizer()
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        load_examples(tmp_path / "nope.jsonl", tok)
    with pytest.raises(DataError, match="no training data files"):
        load_examples([], tok)


def test_bad_max_length_is_rejected(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD])
    with pytest.raises(ValueError, match="max_length"):
        load_examples(path, make_char_tokenizer(), max_length=0)


def test_several_files_are_read_in_order_and_counted_together(tmp_path):
    tok = make_char_tokenizer()
    first = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "one"}, "broken"])
    second = tmp_path / "b.jsonl"
    write_jsonl(second, [{"prompt": "p", "completion": "two"}, {"prompt": "p", "completion": "three"}])

    dataset = AutoDecoDataset.from_jsonl([first, second], tok, max_length=64, skip_bad_rows=True)
    assert len(dataset) == 3
    spans = [supervised_spans(tok, dataset[i]["labels"]) for i in range(3)]
    assert spans == [["one<eos>"], ["two<eos>"], ["three<eos>"]]
    assert isinstance(dataset.stats, DataStats)
    assert (dataset.stats.rows_read, dataset.stats.rows_used, dataset.stats.bad_rows) == (4, 3, 1)
    assert dataset.stats.bad_row_examples == [f"{first}:2: json: invalid JSON (Expecting value at column 1)"]
    # A bad row in the second file is reported against that file.
    write_jsonl(first, [{"prompt": "p", "completion": "one"}])
    write_jsonl(second, [{"prompt": "p", "completion": "two"}, {"prompt": "p", "completion": ""}])
    with pytest.raises(DataError, match=r"b\.jsonl:2: completion: empty"):
        load_examples([first, second], tok, skip_bad_rows=False)


def test_summary_reports_the_counts():
    stats = DataStats(rows_read=10, rows_used=7, bad_rows=1, bad_row_examples=["f.jsonl:3: json: invalid JSON"],
                      truncated_rows=2, dropped_rows=2, supervised_tokens=25, total_tokens=100)
    text = stats.summary()
    assert "\n" not in text
    for expected in ("10 rows read", "7 used", "1 bad", "2 truncated", "2 dropped", "100 tokens", "25 supervised",
                     "25.0%", "f.jsonl:3"):
        assert expected in text, (expected, text)


# --------------------------------------------------------------------------------------------------
# collator
# --------------------------------------------------------------------------------------------------


def test_collator_right_pads_and_masks():
    features = [
        {"input_ids": [5, 6, 7], "labels": [-100, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    batch = DataCollatorForCompletion(pad_token_id=0)(features)
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert all(t.dtype == torch.long and t.shape == (2, 3) for t in batch.values())
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]  # unshifted; -100 on padding


def test_collator_pad_to_multiple_of_and_tensor_inputs():
    features = [{"input_ids": torch.tensor([1, 2, 3, 4, 5]), "labels": torch.tensor([1, 2, 3, 4, 5])}]
    batch = DataCollatorForCompletion(pad_token_id=9, pad_to_multiple_of=4)(features)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 9, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3]
    assert batch["labels"].tolist() == [[1, 2, 3, 4, 5, -100, -100, -100]]


def test_collator_pad_id_comes_from_the_tokenizer_or_its_eos():
    assert DataCollatorForCompletion(make_char_tokenizer()).pad_token_id == make_char_tokenizer().pad_token_id
    no_pad = make_char_tokenizer(pad_token=None)
    assert no_pad.pad_token_id is None
    assert DataCollatorForCompletion(no_pad).pad_token_id == no_pad.eos_token_id
    assert DataCollatorForCompletion(no_pad, pad_token_id=42).pad_token_id == 42
    with pytest.raises(ValueError, match="pad"):
        DataCollatorForCompletion(make_char_tokenizer(pad_token=None, eos_token=None))
    with pytest.raises(ValueError, match="pad_to_multiple_of"):
        DataCollatorForCompletion(pad_token_id=0, pad_to_multiple_of=0)


def test_collator_rejects_mismatched_lengths_and_missing_labels():
    collate = DataCollatorForCompletion(pad_token_id=0)
    with pytest.raises(ValueError, match="same length"):
        collate([{"input_ids": [1, 2], "labels": [1]}])
    with pytest.raises(ValueError, match="labels"):
        collate([{"input_ids": [1, 2]}])


def test_loaded_examples_collate_into_a_consistent_batch(tmp_path):
    tok = make_char_tokenizer(bos=True)
    rows = [{"prompt": "p", "completion": "long answer"}, {"prompt": "pp", "completion": "x"}]
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    dataset = AutoDecoDataset.from_jsonl(path, tok)
    batch = DataCollatorForCompletion(tok)([dataset[0], dataset[1]])
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    assert lengths == [len(dataset[0]["input_ids"]), len(dataset[1]["input_ids"])]
    short = lengths[1]
    assert batch["input_ids"][1, short:].eq(tok.pad_token_id).all()
    supervised = batch["labels"] != IGNORE_INDEX
    assert torch.equal(batch["labels"][supervised], batch["input_ids"][supervised])
    assert supervised.sum().item() == dataset.stats.supervised_tokens
