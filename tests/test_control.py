"""Instruction-based decoding control (autodeco/control.py, evaluation/control.py, cli/control.py): command insertion,
the margin loss, paired batches, training with control on a tiny llama (CPU), eval-control end to end, and that
control off trains exactly as before.

    .venv/bin/python -m pytest -q tests/test_control.py
"""

from __future__ import annotations

import argparse
import json
import random

import pytest
import torch

from autodeco import AutoDecoModelForCausalLM
from autodeco.cli import main as cli_main
from autodeco.control import (
    CONTROL_SETTINGS_NAME,
    HIGH,
    HIGH_COMMANDS,
    HIGH_COMMANDS_HELD_OUT,
    LOW,
    LOW_COMMANDS,
    LOW_COMMANDS_HELD_OUT,
    insert_command,
    insert_command_into_messages,
)
from autodeco.config import IGNORE_INDEX
from autodeco.data import AutoDecoDataset, ControlDataset, DataCollatorForCompletion, DataCollatorWithControl
from autodeco.losses import completion_means, control_margin_loss
from autodeco.evaluation.benchmarks import Problem, build_prompt
from autodeco.cli.control import add_eval_control_parser
from autodeco.evaluation.control import evaluate_control
from autodeco.evaluation.generation import GenerationRequest, generate_completions
from autodeco.testing import build_char_tokenizer, build_tiny_model, save_tiny_base
from autodeco.cli import build_parser
from autodeco.cli.train import cmd_train, parse_trainer_args
from autodeco.training import (
    CONTROL_LOGGED_METRICS,
    AutoDecoTrainer,
    build_training_arguments,
    head_state,
)

# Qwen-style: a default system turn when the conversation has none.
SYSTEM_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<s>system\nYou are helpful.</s>\n{% endif %}"
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


def chat_prompt(tokenizer, content: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def write_rows(path, tokenizer, n=8, seed=0, messages=False):
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            question = f"Q{i}: {rng.randint(0, 99)} + {rng.randint(0, 99)}?"
            completion = "".join(rng.choice("abcd ") for _ in range(10))
            if messages:
                row = {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": completion}]}
            else:
                row = {"prompt": chat_prompt(tokenizer, question), "completion": completion}
            f.write(json.dumps(row) + "\n")
    return path


def make_model():
    return AutoDecoModelForCausalLM.from_base(build_tiny_model("llama", seed=0), seed=0, easy_token_mask_ratio=0.0)


def make_args(output_dir, **overrides):
    kwargs = dict(max_steps=30, per_device_train_batch_size=4, gradient_accumulation_steps=1, learning_rate=1e-2,
                  warmup_steps=0, use_cpu=True, report_to="none", dataloader_num_workers=0, disable_tqdm=True,
                  logging_steps=5, save_strategy="no")
    kwargs.update(overrides)
    return build_training_arguments(output_dir, **kwargs)


# ---------------------------------------------------------------------------------------------------- insertion


def test_insert_command_puts_it_at_the_end_of_the_user_message(tokenizer):
    problem = Problem(id="p", problem="What is 2 + 3?", gt="5", benchmark="b", kind="math")
    prompt = build_prompt(problem, tokenizer)
    content = build_prompt(problem, None).rstrip("\n")  # the user content build_prompt put in the template
    out = insert_command(prompt, "Be precise and deterministic.", tokenizer)
    assert out == chat_prompt(tokenizer, content + "\nBe precise and deterministic.")

    system = build_char_tokenizer()
    system.chat_template = SYSTEM_TEMPLATE
    multi = system.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Q?"}],
        tokenize=False, add_generation_prompt=True)
    assert insert_command(multi, "Answer with low randomness.", system) == system.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
         {"role": "user", "content": "Q?\nAnswer with low randomness."}], tokenize=False, add_generation_prompt=True)


def test_insert_command_without_a_chat_template_appends_before_the_trailing_newline(tokenizer):
    assert insert_command("Solve x.\n\nReason.\n", "Be creative.") == "Solve x.\n\nReason.\nBe creative.\n"
    plain = build_char_tokenizer()
    plain.chat_template = None
    assert insert_command("Q: 1+1? ", "Be creative.", plain) == "Q: 1+1?\nBe creative. "
    # A chat tokenizer, but a prompt its template did not write: appended to the text too.
    assert insert_command("raw text", "Be creative.", tokenizer) == "raw text\nBe creative."
    with pytest.raises(ValueError, match="command must be a non-empty string"):
        insert_command("x", "  ", tokenizer)
    with pytest.raises(ValueError, match="prompt must be a string"):
        insert_command(None, "Be creative.", tokenizer)


def test_insert_command_into_messages_uses_the_last_user_turn_and_copies():
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "A"},
                {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}, {"role": "assistant", "content": "D"}]
    out = insert_command_into_messages(messages, "Be creative.")
    assert [m["content"] for m in out] == ["S", "A", "B", "C\nBe creative.", "D"]
    assert messages[3]["content"] == "C"  # the input is not modified
    with pytest.raises(ValueError, match="no user message"):
        insert_command_into_messages([{"role": "system", "content": "S"}, {"role": "assistant", "content": "x"}], "Be creative.")
    with pytest.raises(ValueError, match="must be a list"):
        insert_command_into_messages("hello", "Be creative.")


def test_phrasing_sets_are_disjoint_and_large_enough():
    assert len(LOW_COMMANDS) >= 5 and len(HIGH_COMMANDS) >= 5
    assert len(LOW_COMMANDS_HELD_OUT) >= 3 and len(HIGH_COMMANDS_HELD_OUT) >= 3
    everything = LOW_COMMANDS + HIGH_COMMANDS + LOW_COMMANDS_HELD_OUT + HIGH_COMMANDS_HELD_OUT
    assert len(set(everything)) == len(everything)


# ---------------------------------------------------------------------------------------------------- loss


def test_margin_loss_values_and_gradient_direction():
    plain = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    commanded = torch.tensor([0.7, 0.45, 0.55], requires_grad=True)
    direction = torch.tensor([HIGH, LOW, LOW])
    loss = control_margin_loss(plain, commanded, direction, margin=0.1)
    # high, +0.2: satisfied (0); low, -0.05: 0.1 - 0.05 = 0.05; low but +0.05: 0.1 + 0.05 = 0.15.
    assert loss.item() == pytest.approx((0.0 + 0.05 + 0.15) / 3)
    loss.backward()
    assert commanded.grad[0] == 0 and plain.grad[0] == 0
    assert commanded.grad[1] > 0 and commanded.grad[2] > 0  # a descent step lowers the low-commanded means
    assert torch.equal(plain.grad, -commanded.grad)
    high = control_margin_loss(torch.tensor([0.5]), torch.tensor([0.45], requires_grad=True), torch.tensor([HIGH]), 0.1)
    assert high.item() == pytest.approx(0.15)
    empty = control_margin_loss(torch.zeros(0, requires_grad=True), torch.zeros(0, requires_grad=True),
                                torch.zeros(0, dtype=torch.long), 0.1)
    assert empty.item() == 0 and empty.requires_grad
    with pytest.raises(ValueError, match="same 1-D shape"):
        control_margin_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), 0.1)
    with pytest.raises(ValueError, match="margin must be >= 0"):
        control_margin_loss(torch.zeros(1), torch.zeros(1), torch.ones(1), -0.1)


def test_completion_means_use_the_shifted_supervised_positions():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]])
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 9, 9], [IGNORE_INDEX, 9, IGNORE_INDEX, IGNORE_INDEX]])
    # Row 0: labels 2 and 3 are predicted at positions 1 and 2; row 1: label 1 at position 0.
    assert completion_means(values, labels).tolist() == [2.5, 5.0]


# ---------------------------------------------------------------------------------------------------- data


@pytest.mark.parametrize("messages", [False, True])
def test_collator_pairs_each_plain_row_with_its_commanded_twin(tmp_path, tokenizer, messages):
    path = write_rows(tmp_path / "train.jsonl", tokenizer, n=10, messages=messages)
    base = AutoDecoDataset.from_jsonl(path, tokenizer, max_length=256, keep_rows=True)
    dataset = ControlDataset(base, tokenizer, share=0.5, seed=3)
    assert len(dataset.twins) == 5 and len(dataset) == 10
    again = ControlDataset(base, tokenizer, share=0.5, seed=3)
    assert {i: t["command"] for i, t in again.twins.items()} == {i: t["command"] for i, t in dataset.twins.items()}
    assert ControlDataset(base, tokenizer, share=0.5, seed=4).twins.keys() != dataset.twins.keys()

    collator = DataCollatorWithControl(tokenizer)
    indices = [0, 1, 2, 3, 4, 5, 6, 7]
    features = [dataset[i] for i in indices]
    batch = collator(features)
    pairs = batch["control_pairs"]
    twinned = [i for i in indices if i in dataset.twins]
    assert pairs.shape == (len(twinned), 3) and batch["input_ids"].shape[0] == len(indices) + len(twinned)
    plain_batch = DataCollatorForCompletion(tokenizer)([base[i] for i in indices])
    assert torch.equal(batch["input_ids"][: len(indices), : plain_batch["input_ids"].shape[1]], plain_batch["input_ids"])
    for (plain_row, twin_row, direction), index in zip(pairs.tolist(), twinned):
        twin = dataset.twins[index]
        assert plain_row == indices.index(index) and direction == twin["direction"]
        assert twin["command"] in (LOW_COMMANDS if direction == LOW else HIGH_COMMANDS)
        n = batch["attention_mask"][twin_row].sum()
        ids, labels = batch["input_ids"][twin_row, :n], batch["labels"][twin_row, :n]
        text = tokenizer.decode(ids)
        # The command sits in the user turn, right before the assistant turn starts.
        assert f"\n{twin['command']}</s>\n<s>assistant\n" in text
        # Same supervised tokens as the plain row: only the prompt differs.
        plain_labels = batch["labels"][plain_row]
        assert labels[labels != IGNORE_INDEX].tolist() == plain_labels[plain_labels != IGNORE_INDEX].tolist()
    with pytest.raises(ValueError, match="keep_rows=True"):
        ControlDataset(AutoDecoDataset.from_jsonl(path, tokenizer), tokenizer, share=0.5)
    with pytest.raises(ValueError, match=r"share \(--control-share\) must be in \[0, 1\]"):
        ControlDataset(base, tokenizer, share=1.5)


# ---------------------------------------------------------------------------------------------------- training


def _commanded_shift(model, dataset, tokenizer):
    """direction * (mean T of the twin - mean T of the plain row), per twinned row, teacher forced."""
    collator = DataCollatorWithControl(tokenizer)
    batch = collator([dataset[i] for i in sorted(dataset.twins)])
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    means = completion_means(out.temperature, batch["labels"])
    pairs = batch["control_pairs"]
    return pairs[:, 2] * (means[pairs[:, 1]] - means[pairs[:, 0]])


def test_training_with_control_moves_the_commanded_mean_temperature(tmp_path, tokenizer):
    path = write_rows(tmp_path / "train.jsonl", tokenizer, n=8)
    dataset = ControlDataset(AutoDecoDataset.from_jsonl(path, tokenizer, keep_rows=True), tokenizer, share=1.0, seed=0)
    assert {t["direction"] for t in dataset.twins.values()} == {LOW, HIGH}
    model = make_model()
    before = _commanded_shift(model, dataset, tokenizer)
    base_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    trainer = AutoDecoTrainer(model=model, args=make_args(tmp_path / "out"), train_dataset=dataset,
                              processing_class=tokenizer, data_collator=DataCollatorWithControl(tokenizer),
                              control_margin=0.2, control_weight=1.0)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "control_loss" in entry]
    assert len(logs) >= 3 and all(set(CONTROL_LOGGED_METRICS) <= set(entry) for entry in logs)
    assert logs[-1]["control_loss"] < 0.5 * logs[0]["control_loss"]
    assert logs[-1]["control_consistency_temperature"] > logs[0]["control_consistency_temperature"]
    assert "temperature_loss" in logs[-1] and "top_p_loss" in logs[-1]  # the ordinary losses keep training
    after = _commanded_shift(model, dataset, tokenizer)
    assert before.abs().max() < 1e-6  # fresh heads: T is 1 everywhere, commands change nothing
    assert (after > 0).float().mean() >= 0.75 and after.mean() > 0.05
    for key, value in model.llm.state_dict().items():
        assert torch.equal(value, base_before[key]), f"base tensor {key} changed"


def test_control_off_trains_bit_identically(tmp_path, tokenizer):
    path = write_rows(tmp_path / "train.jsonl", tokenizer, n=8)
    plain = AutoDecoDataset.from_jsonl(path, tokenizer)
    runs = []
    for name, dataset, collator in (
        ("plain", plain, None),
        ("off", ControlDataset(plain, tokenizer, share=0.0), DataCollatorWithControl(tokenizer)),
    ):
        model = AutoDecoModelForCausalLM.from_base(build_tiny_model("llama", seed=0), seed=0)  # easy-token mask 0.6
        trainer = AutoDecoTrainer(model=model, args=make_args(tmp_path / name, max_steps=4, logging_steps=1,
                                                              gradient_accumulation_steps=2, per_device_train_batch_size=2),
                                  train_dataset=dataset, processing_class=tokenizer, data_collator=collator,
                                  control_weight=3.0)
        trainer.train()
        logs = [{k: v for k, v in e.items() if k not in ("train_runtime", "train_samples_per_second",
                                                         "train_steps_per_second")} for e in trainer.state.log_history]
        runs.append((logs, head_state(model)))
    (logs_a, heads_a), (logs_b, heads_b) = runs
    assert logs_a == logs_b and not any("control_loss" in e for e in logs_b)
    for key in heads_a:
        assert torch.equal(heads_a[key], heads_b[key]), key


# ---------------------------------------------------------------------------------------------------- evaluation


def input_dependent_model():
    """Tiny llama whose heads depend on the input (fresh heads are constant, so every delta would be 0)."""
    model = AutoDecoModelForCausalLM.from_base(build_tiny_model("llama", seed=0), seed=0)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for head in (model.temperature_head, model.top_p_head):
            head.mlp[2].weight.normal_(0.0, 0.3, generator=generator)
    return model.eval()


def test_evaluate_control_end_to_end(tmp_path, tokenizer):
    model = input_dependent_model()
    problems = ["What is 1 + 2?", "Name a colour.", "Count to 3.", "unused"]
    results = evaluate_control(model, tokenizer, problems, output_dir=tmp_path / "out", n=3, seed=5, max_new_tokens=6,
                               batch_size=4, progress=False)
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"results.json", "results.md", "control_trace.png"}
    assert json.loads((tmp_path / "out" / "results.json").read_text())["n"] == 3
    per_prompt = results["per_prompt"]
    assert len(per_prompt) == 3
    for s in ("seen", "held_out"):
        for c, direction in (("low", -1), ("high", 1)):
            row = results[s][c]
            for key in ("temperature", "top_p"):
                commanded = [p[f"{s}_{c}"][key] for p in per_prompt]
                none = [p["none"][key] for p in per_prompt]
                assert 0.0 <= row[f"consistency_{key}"] <= 1.0
                assert row[f"delta_{key}"] == pytest.approx(sum(commanded) / 3 - sum(none) / 3, abs=1e-12)
                assert row[f"mean_{key}"] == pytest.approx(sum(commanded) / 3)
                right = sum(1 for a, b in zip(commanded, none) if (a - b) * direction > 0)
                assert row[f"consistency_{key}"] == pytest.approx(right / 3)
            assert row["delta_temperature"] != 0  # input-dependent heads: the command changes something
    commands = [p["seen_low_command"] for p in per_prompt]
    assert commands == list(LOW_COMMANDS[:3])  # phrasing i mod len(set)
    for s in ("seen", "held_out"):
        by_phrasing = results["by_phrasing"][s]
        for c, direction in (("low", -1), ("high", 1)):
            entries = [e for e in by_phrasing if e["condition"] == c]
            assert sum(e["n"] for e in entries) == 3 and len({e["command"] for e in entries}) == len(entries)
            for e in entries:
                given = [p for p in per_prompt if p[f"{s}_{c}_command"] == e["command"]]
                deltas = [p[f"{s}_{c}"]["temperature"] - p["none"]["temperature"] for p in given]
                assert e["n"] == len(given)
                assert e["delta_temperature"] == pytest.approx(sum(deltas) / len(deltas), abs=1e-12)
                assert e["consistency_temperature"] == sum(d * direction > 0 for d in deltas) / len(deltas)
    assert [p["held_out_high_command"] for p in per_prompt] == list(HIGH_COMMANDS_HELD_OUT[:3])

    # The no-command condition teacher-forces the generated tokens: its T and P are those the tokens were sampled with.
    torch.manual_seed(5)
    prompts = [build_prompt(Problem(f"control-{i}", t, "", "control", "math"), tokenizer) for i, t in enumerate(problems[:3])]
    completions = generate_completions(model, tokenizer, [GenerationRequest(p, 1, None) for p in prompts],
                                       generation_kwargs={}, max_new_tokens=6, batch_size=4)
    for row, (completion,) in zip(per_prompt, completions):
        assert row["tokens"] == len(completion.token_ids)
        assert row["none"]["temperature"] == pytest.approx(sum(completion.temperatures) / row["tokens"], abs=1e-5)
        assert row["none"]["top_p"] == pytest.approx(sum(completion.top_ps) / row["tokens"], abs=1e-5)
    trace = results["trace"]
    tokens = per_prompt[trace["problem_index"]]["tokens"]
    assert tokens == max(p["tokens"] for p in per_prompt)
    assert all(len(trace[k]["temperatures"]) == len(trace[k]["top_ps"]) == tokens for k in ("none", "low", "high"))

    markdown = (tmp_path / "out" / "results.md").read_text()
    assert "| No command (baseline) |" in markdown and markdown.count("| Low-diversity command |") == 2
    assert "Held-out phrasings" in markdown
    for e in results["by_phrasing"]["held_out"]:
        assert f"| {e['condition']} | {e['command']} | 1 |" in markdown
    with pytest.raises(ValueError, match="held-out phrasings must not be among the training phrasings"):
        evaluate_control(model, tokenizer, problems, output_dir=tmp_path / "x", low_held_out=[LOW_COMMANDS[0]],
                         progress=False)
    with pytest.raises(ValueError, match="problems must be a non-empty list"):
        evaluate_control(model, tokenizer, [], output_dir=tmp_path / "x", progress=False)


# ---------------------------------------------------------------------------------------------------- command line


def test_train_with_control_then_eval_control_cli(tmp_path, tokenizer, capsys):
    base = save_tiny_base(tmp_path / "base")
    data = write_rows(tmp_path / "train.jsonl", tokenizer, n=8)
    parser = build_parser()
    heads = tmp_path / "heads"
    args = parser.parse_args(["train", "--model", str(base), "--data", str(data), "--output-dir", str(heads),
                              "--max-steps", "2", "--per-device-train-batch-size", "4", "--learning-rate", "1e-2",
                              "--control-share", "0.5", "--control-seed", "1", "--trainer-arg", "use_cpu=true",
                              "--trainer-arg", "report_to=none", "--trainer-arg", "disable_tqdm=true",
                              "--trainer-arg", "logging_steps=1"])
    summary = cmd_train(args)
    out = capsys.readouterr().out
    assert "Control: 4 of 8 rows get a commanded twin" in out and summary["control"]["twins"] == 4
    settings = json.loads((heads / CONTROL_SETTINGS_NAME).read_text())
    assert settings["share"] == 0.5 and settings["seed"] == 1 and settings["low_commands"] == list(LOW_COMMANDS)

    prompts = tmp_path / "problems.jsonl"
    prompts.write_text("".join(json.dumps({"problem": f"What is {i} + {i}?", "gt": str(2 * i)}) + "\n" for i in range(3)))
    code = cli_main(["eval-control", "--model", str(heads), "--prompts", str(prompts), "--output-dir", str(tmp_path / "ev"),
                     "--n", "2", "--max-new-tokens", "4", "--device", "cpu", "--dtype", "float32"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "Commands seen in training" in captured.out and "Trained with decoding control: share 0.5" in captured.out
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["n"] == 2

    code = cli_main(["eval-control", "--model", str(heads), "--prompts", str(tmp_path / "missing.jsonl"),
                     "--output-dir", str(tmp_path / "ev2")])
    err = capsys.readouterr().err
    assert code == 2 and "--prompts" in err and "missing.jsonl" in err and "does not exist" in err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error:" in line]) == 1
    code = cli_main(["eval-control", "--model", str(heads), "--prompts", str(data), "--output-dir", str(tmp_path / "ev3")])
    err = capsys.readouterr().err
    assert code == 2 and "train.jsonl" in err and "benchmark-format" in err
    code = cli_main(["eval-control", "--model", str(base), "--prompts", str(prompts), "--output-dir", str(tmp_path / "ev4")])
    assert code == 2 and "not an AutoDeco one" in capsys.readouterr().err


def test_eval_control_help_explains_every_flag(capsys):
    parser = argparse.ArgumentParser(prog="autodeco")
    sub = add_eval_control_parser(parser.add_subparsers(dest="command", required=True))
    with pytest.raises(SystemExit):
        parser.parse_args(["eval-control", "--help"])
    text = capsys.readouterr().out
    flags = [a for a in sub._actions if a.option_strings and a.dest != "help"]
    for action in flags:
        assert action.help and action.option_strings[-1] in text
    for flag in ("--model", "--prompts", "--output-dir", "--n", "--seed", "--max-new-tokens", "--template",
                 "--batch-size", "--dtype"):
        assert flag in text


def test_parse_trainer_args_gives_the_same_result_when_called_twice():
    # HfArgumentParser rewrites TrainingArguments' field types in place; a second call (as after this file's
    # cmd_train) used to parse report_to=a,b as the string "a,b".
    first = parse_trainer_args([("report_to", "tensorboard,wandb")])
    assert parse_trainer_args([("report_to", "tensorboard,wandb")]) == first == {"report_to": ["tensorboard", "wandb"]}
