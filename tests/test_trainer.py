"""AutoDecoTrainer and `autodeco train` on a tiny random llama (CPU, a few steps each): frozen base, single heads,
exact loss normalisation under gradient accumulation, bit-exact resume, heads-only checkpoints, logged metrics,
and the command line (fresh heads, AutoDeco dir, --heads, bad data, --trainer-arg, --resume, help).

    .venv/bin/python -m pytest -q tests/test_trainer.py
"""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import TrainerCallback

from autodeco import AutoDecoModelForCausalLM
from autodeco.data import AutoDecoDataset, DataCollatorForCompletion, DataError
from autodeco.modeling import HEAD_MODULES, HEADS_WEIGHTS_NAME
from autodeco.testing import build_char_tokenizer, build_tiny_model, save_tiny_base
from autodeco.modeling.io import resolve_dtype
from autodeco.cli import build_parser
from autodeco.cli import main as train_main
from autodeco.cli.train import cmd_train, parse_trainer_args
from autodeco.training import (
    DEFAULT_TRAINING_ARGUMENTS,
    LOGGED_METRICS,
    AutoDecoTrainer,
    AutoDecoTrainingArguments,
    build_training_arguments,
    head_state,
)

# ---------------------------------------------------------------------------------------------------- fixtures


def write_rows(path, n=32, seed=0):
    """JSONL rows whose completions alternate 2 short (1 char) and 2 long (25 chars): micro-batches of 1 or 2 rows
    then hold very different numbers of supervised tokens, which is what separates a token mean from a mean of
    micro-batch means."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            length = 1 if i % 4 in (0, 1) else 25
            completion = "".join(rng.choice("abcdefgh ") for _ in range(length))
            f.write(json.dumps({"prompt": "Q" * rng.randint(1, 8) + ": ", "completion": completion}) + "\n")
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    return write_rows(tmp_path_factory.mktemp("data") / "train.jsonl")


@pytest.fixture(scope="module")
def dataset(data_file, tokenizer):
    return AutoDecoDataset.from_jsonl(data_file, tokenizer, max_length=64)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("trainer") / "base")


def make_model(ratio=0.0, **config):
    return AutoDecoModelForCausalLM.from_base(build_tiny_model("llama", seed=0), seed=0, easy_token_mask_ratio=ratio, **config)


def make_args(output_dir, **overrides):
    kwargs = dict(
        max_steps=3, per_device_train_batch_size=2, gradient_accumulation_steps=2, learning_rate=1e-2, warmup_steps=0,
        use_cpu=True, report_to="none", dataloader_num_workers=0, disable_tqdm=True, logging_steps=1, save_strategy="no",
    )
    kwargs.update(overrides)
    return build_training_arguments(output_dir, **kwargs)


def make_trainer(output_dir, dataset, tokenizer, model=None, callbacks=(), trainer_cls=AutoDecoTrainer,
                 eval_dataset=None, **overrides):
    model = model if model is not None else make_model()
    trainer = trainer_cls(model=model, args=make_args(output_dir, **overrides), train_dataset=dataset,
                          eval_dataset=eval_dataset, processing_class=tokenizer, callbacks=list(callbacks))
    return model, trainer


def assert_heads_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs by {(a[key] - b[key]).abs().max().item()}"


def heads_close(a, b, rtol=1e-5, atol=1e-8) -> bool:
    return all(torch.allclose(a[k], b[k], rtol=rtol, atol=atol) for k in a)


def max_diff(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


# ---------------------------------------------------------------------------------------------------- frozen base


def test_only_heads_train_and_base_stays_bit_identical(tmp_path, dataset, tokenizer):
    model = make_model()
    model.llm.requires_grad_(True)  # a user's mistake the trainer must undo
    base_before = {k: v.clone() for k, v in model.llm.state_dict().items()}
    heads_before = head_state(model)
    model, trainer = make_trainer(tmp_path, dataset, tokenizer, model=model)
    assert not any(p.requires_grad for p in model.llm.parameters())

    trainer.train()

    assert not any(p.requires_grad for p in model.llm.parameters())
    for key, value in model.llm.state_dict().items():
        assert torch.equal(value, base_before[key]), f"base tensor {key} changed"
    head_params = {id(p) for n, p in model.named_parameters() if n.startswith(HEAD_MODULES)}
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimised == head_params
    after = head_state(model)
    assert all(not torch.equal(after[k], heads_before[k]) for k in after if k.endswith("mlp.2.weight")), "heads did not train"
    assert not model.llm.training, "the frozen base must run in eval mode (no dropout) while the heads train"


@pytest.mark.parametrize("trained", ["temperature", "top_p"])
def test_each_head_alone_leaves_the_other_bit_identical(tmp_path, dataset, tokenizer, trained):
    model = make_model(train_temperature=trained == "temperature", train_top_p=trained == "top_p")
    before = head_state(model)
    model, trainer = make_trainer(tmp_path, dataset, tokenizer, model=model)
    trainer.train()
    after = head_state(model)
    frozen_prefix = "top_p_head." if trained == "temperature" else "temperature_head."
    for key in after:
        if key.startswith(frozen_prefix):
            assert torch.equal(after[key], before[key]), f"frozen head tensor {key} changed"
        elif key.endswith("mlp.2.weight"):
            assert not torch.equal(after[key], before[key]), f"trained head tensor {key} did not change"
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    trained_module = model.temperature_head if trained == "temperature" else model.top_p_head
    assert optimised == {id(p) for p in trained_module.parameters()}
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    present, absent = ("temperature_loss", "top_p_loss") if trained == "temperature" else ("top_p_loss", "temperature_loss")
    assert all(present in e and absent not in e for e in logged)


def test_training_neither_head_is_an_error(tmp_path, dataset, tokenizer):
    with pytest.raises(ValueError, match="no head would train"):
        make_trainer(tmp_path, dataset, tokenizer, model=make_model(train_temperature=False, train_top_p=False))


def test_rejects_a_model_that_is_not_autodeco(tmp_path, dataset, tokenizer):
    with pytest.raises(TypeError, match="AutoDecoModelForCausalLM"):
        AutoDecoTrainer(model=build_tiny_model("llama"), args=make_args(tmp_path), train_dataset=dataset)


# ---------------------------------------------------------------------------------------------------- normalisation


class NaiveMeanTrainer(AutoDecoTrainer):
    """What Trainer does for a model that returns a per-micro-batch mean: divide it by the accumulation steps."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        self.loss_is_scaled_for_ga = False
        return (outputs.loss, outputs) if return_outputs else outputs.loss


def test_gradient_accumulation_gives_the_full_batch_result(tmp_path, dataset, tokenizer):
    # Precondition: the micro-batches of one step hold different numbers of supervised tokens.
    counts = [(torch.tensor(dataset[i]["labels"][1:]) != -100).sum().item() for i in range(4)]
    assert len(set(counts)) > 1, counts

    # SGD without clipping: the update is linear in the gradient, so a mis-weighted or mis-scaled loss shows
    # (Adam would hide a constant factor). Sequential order: every run sees the same 4 rows per step.
    common = dict(optim="sgd", learning_rate=10.0, max_grad_norm=0.0, lr_scheduler_type="constant",
                  train_sampling_strategy="sequential", max_steps=3)
    results = {}
    for batch, accumulation in ((4, 1), (2, 2), (1, 4)):
        model, trainer = make_trainer(tmp_path / f"{batch}x{accumulation}", dataset, tokenizer,
                                      per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation, **common)
        trainer.train()
        results[batch, accumulation] = head_state(model)
    reference = results[4, 1]
    assert max_diff(reference, head_state(make_model())) > 1e-4, "the heads barely moved: the comparison means nothing"
    for key, state in results.items():
        assert heads_close(state, reference), f"{key}: max diff {max_diff(state, reference)}"

    # The same comparison catches Trainer's naive normalisation (mean of micro-batch means).
    model, trainer = make_trainer(tmp_path / "naive", dataset, tokenizer, trainer_cls=NaiveMeanTrainer,
                                  per_device_train_batch_size=1, gradient_accumulation_steps=4, **common)
    trainer.train()
    assert not heads_close(head_state(model), reference), "the test cannot tell a mean of means from the token mean"


def test_logged_metrics_are_token_means_over_the_step(tmp_path, dataset, tokenizer):
    model, trainer = make_trainer(tmp_path, dataset, tokenizer, train_sampling_strategy="sequential",
                                  per_device_train_batch_size=1, gradient_accumulation_steps=4, max_steps=2)
    # What step 1 must report: one forward of the fresh model over its 4 rows at once.
    fresh = make_model().eval()
    batch = DataCollatorForCompletion(tokenizer)([dataset[i] for i in range(4)])
    with torch.no_grad():
        expected = fresh(**batch)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2
    for entry in logs:
        for key in ("loss", "learning_rate", *LOGGED_METRICS):
            assert key in entry, f"{key} missing from {entry}"
    first = logs[0]
    assert first["temperature_loss"] == pytest.approx(expected.temperature_loss.item(), rel=1e-5)
    assert first["top_p_loss"] == pytest.approx(expected.top_p_loss.item(), rel=1e-5)
    assert first["loss"] == pytest.approx(expected.loss.item(), rel=1e-5)
    # Fresh heads predict T = 1 and P = 0.95 everywhere; after one update the mean moves.
    assert first["mean_temperature"] == pytest.approx(1.0, abs=1e-6)
    assert first["mean_top_p"] == pytest.approx(0.95, abs=1e-6)
    assert logs[1]["mean_temperature"] != pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------------- checkpoints


class CrashAtStep(TrainerCallback):
    """Stands in for a killed job: raises after `step` optimizer steps, before anything of that step is saved."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"simulated crash at step {self.step}")


def test_resume_after_a_crash_matches_an_uninterrupted_run(tmp_path, dataset, tokenizer):
    # easy_token_mask_ratio > 0: the temperature loss draws from the global RNG, so the RNG state must be restored.
    common = dict(max_steps=6, save_strategy="steps", save_steps=2, learning_rate=1e-2)
    model, trainer = make_trainer(tmp_path / "full", dataset, tokenizer, model=make_model(ratio=0.6), **common)
    trainer.train()
    uninterrupted = head_state(model)

    run = tmp_path / "crashed"
    model, trainer = make_trainer(run, dataset, tokenizer, model=make_model(ratio=0.6), callbacks=[CrashAtStep(3)], **common)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2"]
    backup = tmp_path / "checkpoint-2-copy"
    shutil.copytree(run / "checkpoint-2", backup)

    model, trainer = make_trainer(run, dataset, tokenizer, model=make_model(ratio=0.6), **common)
    trainer.train(resume_from_checkpoint=True)  # the last checkpoint-* in output_dir
    assert trainer.state.global_step == 6
    assert_heads_equal(head_state(model), uninterrupted)

    # Negative control: the same resume without the saved RNG state draws another easy-token mask.
    (backup / "rng_state.pth").unlink()
    model, trainer = make_trainer(tmp_path / "no-rng", dataset, tokenizer, model=make_model(ratio=0.6), **common)
    trainer.train(resume_from_checkpoint=str(backup))
    assert not heads_close(head_state(model), uninterrupted), "resume without the RNG state should differ"


def test_checkpoints_hold_heads_and_training_state_but_no_base_weights(tmp_path, dataset, tokenizer):
    model, trainer = make_trainer(tmp_path, dataset, tokenizer, max_steps=2, save_strategy="steps", save_steps=1)
    trainer.train()
    checkpoint = tmp_path / "checkpoint-2"
    names = {p.name for p in checkpoint.iterdir()}
    assert {HEADS_WEIGHTS_NAME, "config.json", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json"} <= names
    assert not names & {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}
    with safe_open(str(checkpoint / HEADS_WEIGHTS_NAME), framework="pt") as f:
        keys = set(f.keys())
    assert keys == set(model.heads_state_dict())
    assert all(k.startswith(HEAD_MODULES) for k in keys)
    optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert len(optimizer_state["state"]) == len(keys), "optimizer state for parameters other than the heads"
    heads_bytes = (checkpoint / HEADS_WEIGHTS_NAME).stat().st_size
    base_bytes = sum(v.numel() * v.element_size() for v in model.llm.state_dict().values())
    assert heads_bytes < base_bytes
    fresh = make_model()
    fresh.load_heads(checkpoint / HEADS_WEIGHTS_NAME)
    assert_heads_equal(head_state(fresh), head_state(model))

    not_ours = tmp_path / "not-a-checkpoint"
    not_ours.mkdir()
    _, trainer = make_trainer(tmp_path / "again", dataset, tokenizer, max_steps=2)
    with pytest.raises(ValueError, match=f"has no {HEADS_WEIGHTS_NAME}"):
        trainer.train(resume_from_checkpoint=str(not_ours))


def test_load_best_model_at_end_loads_the_best_heads(tmp_path, dataset, tokenizer):
    model, trainer = make_trainer(
        tmp_path, dataset, tokenizer, max_steps=4, save_strategy="steps", save_steps=2, eval_strategy="steps",
        eval_steps=2, load_best_model_at_end=True, metric_for_best_model="loss", per_device_eval_batch_size=4,
        prediction_loss_only=True, eval_dataset=torch.utils.data.Subset(dataset, range(8)),
    )
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None
    from_file = make_model()
    from_file.load_heads(f"{best}/{HEADS_WEIGHTS_NAME}")
    assert_heads_equal(head_state(model), head_state(from_file))


# ---------------------------------------------------------------------------------------------------- arguments


def test_build_training_arguments_defaults_and_errors(tmp_path):
    args = build_training_arguments(tmp_path, use_cpu=True)
    for key, value in DEFAULT_TRAINING_ARGUMENTS.items():
        got = getattr(args, key)
        assert (got.value if hasattr(got, "value") else got) == value, key
    assert args.remove_unused_columns is False and args.label_names == ["labels"]
    with pytest.raises(ValueError, match="did you mean.*learning_rate"):
        build_training_arguments(tmp_path, learnin_rate=1e-3)
    with pytest.raises(ValueError, match="remove_unused_columns must be False"):
        build_training_arguments(tmp_path, remove_unused_columns=True)


def test_parse_trainer_args_types_values_like_hf_argument_parser():
    parsed = parse_trainer_args([("bf16", "true"), ("report_to", "tensorboard,wandb"), ("warmup_steps", "0.2"),
                                 ("save_total_limit", "3"), ("lr_scheduler_type", "linear"), ("dataloader_pin_memory", "false")])
    assert parsed == {"bf16": True, "report_to": ["tensorboard", "wandb"], "warmup_steps": 0.2, "save_total_limit": 3,
                      "lr_scheduler_type": "linear", "dataloader_pin_memory": False}
    with pytest.raises(ValueError, match="'bogus' is not a transformers.TrainingArguments field.*help\\(transformers.TrainingArguments\\)"):
        parse_trainer_args([("bogus", "1")])
    with pytest.raises(ValueError, match="did you mean save_steps"):
        parse_trainer_args([("save_step", "1")])
    with pytest.raises(ValueError, match="invalid value for save_total_limit"):
        parse_trainer_args([("save_total_limit", "many")])
    with pytest.raises(ValueError, match="not one of"):
        parse_trainer_args([("lr_scheduler_type", "zigzag")])
    with pytest.raises(ValueError, match="use --learning-rate"):
        parse_trainer_args([("learning_rate", "1e-3")])
    with pytest.raises(ValueError, match="fixes label_names"):
        parse_trainer_args([("label_names", "x")])


# ---------------------------------------------------------------------------------------------------- command line


def train_parser():
    return build_parser()


def cli(*argv):
    return train_parser().parse_args(["train", *map(str, argv)])


CLI_FAST = ("--max-steps", 2, "--per-device-train-batch-size", 2, "--gradient-accumulation-steps", 1,
            "--learning-rate", 1e-2, "--max-length", 64, "--trainer-arg", "use_cpu=true",
            "--trainer-arg", "report_to=none", "--trainer-arg", "disable_tqdm=true", "--trainer-arg", "logging_steps=1")


def test_cli_fresh_heads_then_continue_one_head(tmp_path, base_dir, data_file, capsys):
    first = tmp_path / "first"
    summary = cmd_train(cli("--model", base_dir, "--data", data_file, "--output-dir", first, *CLI_FAST))
    out = capsys.readouterr().out
    assert summary["fresh_heads"] and summary["steps"] == 2
    assert "32 rows read, 32 used" in out and "for 2 steps" in out and "mean T" in out and "top_p_loss" in out
    assert {HEADS_WEIGHTS_NAME, "config.json", "tokenizer.json"} <= {p.name for p in first.iterdir()}
    assert json.loads((first / "config.json").read_text())["model_type"] == "autodeco"
    trained = AutoDecoModelForCausalLM.from_pretrained(first)
    assert not torch.equal(head_state(trained)["temperature_head.mlp.2.weight"],
                           head_state(AutoDecoModelForCausalLM.from_base(base_dir, seed=42))["temperature_head.mlp.2.weight"])

    second = tmp_path / "second"
    summary = cmd_train(cli("--model", first, "--data", data_file, "--output-dir", second, "--heads", "temperature",
                            "--easy-token-mask-ratio", 0, *CLI_FAST))
    assert not summary["fresh_heads"] and "top_p_loss" not in summary
    before, after = head_state(trained), head_state(AutoDecoModelForCausalLM.from_pretrained(second))
    for key in before:
        if key.startswith("top_p_head."):
            assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["temperature_head.mlp.2.weight"], after["temperature_head.mlp.2.weight"])
    config = json.loads((second / "config.json").read_text())
    assert config.get("train_top_p") is False and config.get("easy_token_mask_ratio") == 0

    with pytest.raises(ValueError, match="only apply to fresh heads"):
        cmd_train(cli("--model", first, "--data", data_file, "--output-dir", tmp_path / "x", "--max-temperature", 1.5, *CLI_FAST))


def test_cli_resume_latest_matches_an_uninterrupted_run(tmp_path, base_dir, data_file):
    run = tmp_path / "run"
    argv = ("--model", base_dir, "--data", data_file, "--output-dir", run, *CLI_FAST, "--max-steps", 4,
            "--trainer-arg", "save_steps=2")
    cmd_train(cli(*argv))  # easy_token_mask_ratio 0.6 (fresh heads' default): the RNG matters
    with safe_open(str(run / HEADS_WEIGHTS_NAME), framework="pt") as f:
        uninterrupted = {k: f.get_tensor(k) for k in f.keys()}
    # Pretend the job died after checkpoint-2: later state gone.
    shutil.rmtree(run / "checkpoint-4")
    (run / HEADS_WEIGHTS_NAME).unlink()
    summary = cmd_train(cli(*argv, "--resume"))
    assert summary["steps"] == 4
    with safe_open(str(run / HEADS_WEIGHTS_NAME), framework="pt") as f:
        resumed = {k: f.get_tensor(k) for k in f.keys()}
    assert_heads_equal(resumed, uninterrupted)


def test_cli_errors_are_clear(tmp_path, base_dir, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n\n{"prompt": "a"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: completion: missing"):
        cmd_train(cli("--model", base_dir, "--data", bad, "--output-dir", tmp_path / "o", *CLI_FAST))
    assert train_main(["train", "--model", str(base_dir), "--data", str(bad), "--output-dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    error_lines = [line for line in err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "bad.jsonl:3" in error_lines[0] and "Traceback" not in err
    summary = cmd_train(cli("--model", base_dir, "--data", bad, "--output-dir", tmp_path / "skip", "--skip-bad-rows",
                            *CLI_FAST, "--max-steps", 1))
    assert "2 rows read, 1 used, 1 bad (skipped)" in summary["data"] and summary["steps"] == 1

    assert train_main(["train", "--model", str(base_dir), "--data", str(bad), "--output-dir", str(tmp_path / "o"),
                       "--trainer-arg", "bogus=1"]) == 2
    err = capsys.readouterr().err
    assert "'bogus' is not a transformers.TrainingArguments field" in err and "help(transformers.TrainingArguments)" in err
    assert train_main(["train", "--model", str(tmp_path / "missing"), "--data", str(bad), "--output-dir", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert train_main(["train", "--model", str(base_dir), "--data", str(bad), "--output-dir", str(tmp_path / "o"),
                       "--resume", str(tmp_path / "nope")]) == 2
    assert "--resume" in capsys.readouterr().err
    good = write_rows(tmp_path / "good.jsonl", n=4)
    assert train_main(["train", "--model", str(base_dir), "--data", str(good), "--output-dir", str(tmp_path / "never-ran"),
                       "--resume", *map(str, CLI_FAST)]) == 2
    assert "no checkpoint-* directory in" in capsys.readouterr().err


def test_cli_help_explains_every_flag(capsys):
    parser = train_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    text = capsys.readouterr().out
    subparser = parser._subparsers._group_actions[0].choices["train"]
    flags = [a for a in subparser._actions if a.option_strings and a.dest != "help"]
    assert len(flags) >= 20
    for action in flags:
        assert action.help, f"{action.option_strings} has no help"
        assert action.option_strings[-1] in text
    for flag in ("--model", "--data", "--output-dir", "--heads", "--resume", "--trainer-arg", "--skip-bad-rows",
                 "--easy-token-mask-ratio", "--no-dft", "--soft-top-p-alpha", "--max-temperature"):
        assert flag in text


def test_base_dtype_auto_is_bf16_only_on_a_bf16_gpu(monkeypatch):
    assert resolve_dtype("float16", on_gpu=True) is torch.float16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_dtype("auto", on_gpu=True) is torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", on_gpu=True) is torch.bfloat16
    assert resolve_dtype("auto", on_gpu=False) is torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", on_gpu=True) is torch.float32


# ---------------------------------------------------------------------------------------------------- library API


def test_train_heads_takes_a_loaded_model_and_a_dataset(tmp_path, dataset, tokenizer, capsys):
    from autodeco.training import train_heads

    config = AutoDecoTrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=2,
                                       gradient_accumulation_steps=1, learning_rate=1e-2, use_cpu=True,
                                       report_to="none", disable_tqdm=True, logging_steps=1, heads="temperature",
                                       easy_token_mask_ratio=0.0)
    model = make_model()
    before = head_state(model)
    summary = train_heads(model, dataset, config, tokenizer=tokenizer)
    out = capsys.readouterr().out
    assert "Engine: single process; parameters not sharded." in out
    assert summary["steps"] == 2 and summary["heads"] == "temperature" and "top_p_loss" not in summary
    assert (tmp_path / "out" / HEADS_WEIGHTS_NAME).is_file()
    after = head_state(model)
    assert all(torch.equal(after[k], before[k]) for k in after if k.startswith("top_p_head."))
    assert model.config.train_top_p is False and model.config.easy_token_mask_ratio == 0.0
    with pytest.raises(ValueError, match="only apply to fresh heads"):
        train_heads(model, dataset, AutoDecoTrainingArguments(output_dir=str(tmp_path / "x"), use_cpu=True,
                                                              head_hidden_size=8), tokenizer=tokenizer)


def test_training_arguments_check_autodeco_fields(tmp_path):
    for bad, match in ((dict(control_share=1.5), "control-share must be in"), (dict(heads="neither"), "heads"),
                       (dict(control_margin=-1.0), "control-margin must be >= 0"),
                       (dict(max_length=0), "max_length"), (dict(label_names=["x"]), "label_names must be")):
        with pytest.raises(ValueError, match=match):
            AutoDecoTrainingArguments(output_dir=str(tmp_path), use_cpu=True, **bad)
    args = AutoDecoTrainingArguments(output_dir=str(tmp_path), use_cpu=True, control_share=0.3, dft=False)
    assert args.control() == {"share": 0.3, "margin": 0.1, "weight": 1.0, "seed": 42}
    assert args.loss_settings() == {"dft": False, "train_temperature": True, "train_top_p": True}
    assert AutoDecoTrainingArguments(output_dir=str(tmp_path), use_cpu=True).control() is None
