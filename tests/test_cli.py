"""The `autodeco` command: init -> generate -> merge -> split on a tiny local base, help texts, errors."""

import pytest
import torch

from autodeco import AutoDecoModelForCausalLM
from autodeco.cli import build_parser, main
from autodeco.testing import save_tiny_base


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("cli") / "base")


def test_init_generate_merge_split(base_dir, tmp_path, capsys):
    heads = tmp_path / "heads"
    assert main(["init", "--base", str(base_dir), "--output-dir", str(heads), "--max-temperature", "1.5"]) == 0
    assert "Wrote fresh AutoDeco heads" in capsys.readouterr().out
    assert AutoDecoModelForCausalLM.from_pretrained(heads).config.max_temperature == 1.5
    assert (heads / "tokenizer.json").exists()

    assert main(["generate", "--model", str(heads), "--prompt", "Hi", "--max-new-tokens", "5", "--show-trace", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "Per-token decoding values" in out and "(dynamic)" in out and "0.950" in out

    assert main(["generate", "--model", str(heads), "--prompt", "Hi", "--max-new-tokens", "4", "--chat", "--greedy", "--show-trace"]) == 0
    assert "greedy" in capsys.readouterr().out

    merged, split = tmp_path / "merged", tmp_path / "split"
    assert main(["merge", "--model", str(heads), "--output-dir", str(merged)]) == 0
    assert main(["split", "--model", str(merged), "--output-dir", str(split)]) == 0
    ids = torch.tensor([[4, 5, 6]])
    a = AutoDecoModelForCausalLM.from_pretrained(heads)(input_ids=ids)
    b = AutoDecoModelForCausalLM.from_pretrained(split)(input_ids=ids)
    assert torch.equal(a.temperature, b.temperature) and torch.equal(a.logits, b.logits)


def test_errors_are_one_line_with_exit_2(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert main(["init", "--base", str(tmp_path / "nobase"), "--output-dir", str(tmp_path / "o")]) == 2
    assert "base model path" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["init", "generate", "merge", "split", "train", "data", "eval"])
def test_help_explains_every_flag(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    subparser = build_parser()._subparsers._group_actions[0].choices[command]
    for action in subparser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{command} {action.option_strings} has no help"
            assert action.option_strings[-1] in text
