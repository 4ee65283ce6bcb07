"""autodeco.validation: every check of a model directory / input, each error one line naming the file and field."""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from autodeco import AutoDecoModelForCausalLM
from autodeco.testing import save_tiny_base
from autodeco.validation import (
    HEADS_WEIGHTS_NAME,
    MERGED_WEIGHTS_NAMES,
    check_input_file,
    check_prompt_fits,
    context_length,
    read_config,
    validate_base_dir,
    validate_model_dir,
)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    base = save_tiny_base(root / "base")
    model = AutoDecoModelForCausalLM.from_base(str(base))
    model.save_pretrained(root / "heads")
    model.merge(root / "merged")
    return base, root / "heads", root / "merged"


@pytest.fixture
def heads(dirs, tmp_path):
    return Path(shutil.copytree(dirs[1], tmp_path / "heads"))


def edit_config(directory, **fields):
    config = json.loads((directory / "config.json").read_text())
    for key, value in fields.items():
        if value is KeyError:
            config.pop(key, None)
        else:
            config[key] = value
    (directory / "config.json").write_text(json.dumps(config))


def edit_heads(directory, edit):
    tensors = load_file(str(directory / HEADS_WEIGHTS_NAME))
    edit(tensors)
    save_file(tensors, str(directory / HEADS_WEIGHTS_NAME))


def raises_one_line(exc_type, *needles):
    class Check:
        def __enter__(self):
            self.ctx = pytest.raises(exc_type)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            message = str(self.info.value)
            assert "\n" not in message, message
            for needle in needles:
                assert re.search(needle, message), (needle, message)
            return handled

    return Check()


def test_names_agree_with_the_modeling_module():
    from autodeco.modeling import HEADS_WEIGHTS_NAME as modeling_name, MERGED_WEIGHTS_NAMES as modeling_merged

    assert HEADS_WEIGHTS_NAME == modeling_name and MERGED_WEIGHTS_NAMES == tuple(modeling_merged)


def test_good_directories_pass(dirs):
    base, heads, merged = dirs
    validate_model_dir(heads)
    validate_model_dir(merged)
    validate_base_dir(base)


def test_hidden_size_may_come_from_base_config(heads):
    edit_config(heads, hidden_size=KeyError)
    validate_model_dir(heads)


@pytest.mark.parametrize("fields, needles", [
    (dict(top_p_features="false"), ("config.json", "top_p_features", '"false"', "true or false")),
    (dict(dft=1), ("config.json", "dft", "JSON boolean")),
    (dict(max_temperature="hot"), ("config.json", "max_temperature", '"hot"', "positive number")),
    (dict(max_temperature=-1), ("max_temperature", "-1")),
    (dict(max_temperature=True), ("max_temperature", "true")),
    (dict(soft_top_p_alpha=0), ("soft_top_p_alpha",)),
    (dict(easy_token_mask_ratio=1.5), ("easy_token_mask_ratio", "1.5", r"\[0, 1\]")),
    (dict(head_hidden_size=2.5), ("head_hidden_size", "2.5", "positive integer")),
    (dict(hidden_size="64"), ("hidden_size", '"64"')),
    (dict(hidden_size=32), ("hidden_size", "32", "64")),
    (dict(hidden_size=KeyError, base_config=KeyError), ("hidden_size", "missing")),
    (dict(base_config="llama"), ("base_config",)),
    (dict(base_model_name_or_path=KeyError), ("base_model_name_or_path", "missing")),
    (dict(base_model_name_or_path=""), ("base_model_name_or_path",)),
    (dict(model_type="llama"), ("model_type", "autodeco init")),
])
def test_bad_config_fields(heads, fields, needles):
    edit_config(heads, **fields)
    with raises_one_line(ValueError, re.escape(str(heads / "config.json")) if "config.json" in needles else "", *needles):
        validate_model_dir(heads)


@pytest.mark.parametrize("text", ['{"model_type": "autodeco", ', "[1, 2]", ""])
def test_config_that_is_not_a_json_object(heads, text):
    (heads / "config.json").write_text(text)
    with raises_one_line(ValueError, re.escape(str(heads / "config.json"))):
        validate_model_dir(heads)


def test_config_not_utf8(heads):
    (heads / "config.json").write_bytes(b'{"model_type": "caf\xe9"}')
    with raises_one_line(ValueError, "config.json", "UTF-8"):
        validate_model_dir(heads)


@pytest.mark.parametrize("edit, needles", [
    (lambda t: t.update({k: v.to(torch.int64) for k, v in t.items()}), ("dtype int64", "floating point")),
    (lambda t: t["temperature_head.mlp.2.weight"].fill_(float("-inf")), ("temperature_head.mlp.2.weight", "256 non-finite", "-inf")),
    (lambda t: t["top_p_head.mlp.0.bias"].__setitem__(3, float("nan")), ("top_p_head.mlp.0.bias", "1 non-finite", "NaN")),
    (lambda t: t.update({"temperature_head.mlp.2.bias": torch.zeros(2)}), ("shape", r"\(2,\)", r"\(1,\)")),
    (lambda t: t.pop("top_p_head.mlp.2.weight"), ("missing head tensors", "top_p_head.mlp.2.weight")),
    (lambda t: t.update(extra=torch.zeros(1)), ("unexpected tensors", "extra")),
])
def test_bad_head_tensors(heads, edit, needles):
    edit_heads(heads, edit)
    with raises_one_line(ValueError, re.escape(str(heads / HEADS_WEIGHTS_NAME)), *needles):
        validate_model_dir(heads)


def test_heads_shaped_for_the_other_top_p_features_setting(heads):
    edit_config(heads, top_p_features=False)
    with raises_one_line(ValueError, "top_p_head.mlp.0.weight", "shape", r"\(256, 69\)", r"\(256, 65\)"):
        validate_model_dir(heads)


@pytest.mark.parametrize("corrupt", [lambda b: b[: len(b) // 2], lambda b: b[:5], lambda b: b"", lambda b: b"\0" * 64,
                                     lambda b: b[:-7]], ids=["half", "5-bytes", "empty", "zeros", "short-tail"])
def test_corrupt_heads_file(heads, corrupt):
    file = heads / HEADS_WEIGHTS_NAME
    file.write_bytes(corrupt(file.read_bytes()))
    with raises_one_line(ValueError, re.escape(str(file)), "truncated or corrupt|truncated or empty"):
        validate_model_dir(heads)


def test_corrupt_merged_weights(dirs, tmp_path):
    merged = Path(shutil.copytree(dirs[2], tmp_path / "merged"))
    file = merged / MERGED_WEIGHTS_NAMES[0]
    file.write_bytes(file.read_bytes()[:100])
    with raises_one_line(ValueError, re.escape(str(file))):
        validate_model_dir(merged)


def test_merged_nonfinite_heads(dirs, tmp_path):
    merged = Path(shutil.copytree(dirs[2], tmp_path / "merged"))
    file = merged / MERGED_WEIGHTS_NAMES[0]
    tensors = load_file(str(file))
    tensors["temperature_head.mlp.0.bias"][0] = float("inf")
    save_file(tensors, str(file), metadata={"format": "pt"})
    with raises_one_line(ValueError, "temperature_head.mlp.0.bias", "non-finite"):
        validate_model_dir(merged)


def test_layout_errors(heads, tmp_path):
    with raises_one_line(FileNotFoundError, "does not exist"):
        validate_model_dir(tmp_path / "missing")
    (tmp_path / "some.jsonl").write_text("{}\n")
    with raises_one_line(ValueError, "some.jsonl", "is a file, not a model directory"):
        validate_model_dir(tmp_path / "some.jsonl")
    with raises_one_line(FileNotFoundError, "no config.json"):
        validate_model_dir(tmp_path)
    (heads / HEADS_WEIGHTS_NAME).unlink()
    with raises_one_line(FileNotFoundError, HEADS_WEIGHTS_NAME, "merged layout"):
        validate_model_dir(heads)


def test_recorded_base_that_is_the_directory_itself_or_autodeco(heads, dirs):
    edit_config(heads, base_model_name_or_path=str(heads))
    with raises_one_line(ValueError, "base_model_name_or_path", "this AutoDeco directory itself"):
        validate_model_dir(heads)
    edit_config(heads, base_model_name_or_path=str(dirs[2]))
    with raises_one_line(ValueError, "itself an AutoDeco directory"):
        validate_model_dir(heads)
    edit_config(heads, base_model_name_or_path=str(heads.parent / "gone"))
    with raises_one_line(FileNotFoundError, "gone", "does not exist"):
        validate_model_dir(heads)
    edit_config(heads, base_model_name_or_path="org/some-hub-model")
    validate_model_dir(heads)  # hub names are checked when loaded


def test_base_dir_checks(dirs, tmp_path):
    base, heads, _ = dirs
    pickled = Path(shutil.copytree(base, tmp_path / "pickled"))
    torch.save(load_file(str(pickled / "model.safetensors")), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with raises_one_line(ValueError, "pytorch_model.bin", "only safetensors are read"):
        validate_base_dir(pickled)
    with raises_one_line(ValueError, "is an AutoDeco directory, not a base model"):
        validate_base_dir(heads)
    (pickled / "pytorch_model.bin").unlink()
    with raises_one_line(FileNotFoundError, "no \\*.safetensors"):
        validate_base_dir(pickled)
    edit_config(pickled, model_type=KeyError)
    with raises_one_line(ValueError, "model_type"):
        validate_base_dir(pickled)


def test_heads_only_dir_whose_base_holds_a_pickle(heads, dirs, tmp_path):
    pickled = Path(shutil.copytree(dirs[0], tmp_path / "pickled"))
    torch.save({}, pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    edit_config(heads, base_model_name_or_path=str(pickled))
    with raises_one_line(ValueError, "only safetensors"):
        validate_model_dir(heads)


def test_check_input_file(tmp_path):
    with raises_one_line(ValueError, "--data", "is a directory"):
        check_input_file(tmp_path, "--data")
    with raises_one_line(FileNotFoundError, "--data", "does not exist"):
        check_input_file(tmp_path / "x.jsonl", "--data")
    (tmp_path / "x.jsonl").write_text("{}\n")
    assert check_input_file(tmp_path / "x.jsonl", "--data") == tmp_path / "x.jsonl"


def test_context_length_and_prompt_fit(dirs):
    base, heads, _ = dirs
    assert context_length(read_config(base)) == 256
    assert context_length(read_config(heads)) == 256
    assert context_length({"model_type": "gpt2", "n_positions": 1024}) == 1024
    assert context_length({"model_type": "x"}) is None
    check_prompt_fits("p0", 255, 256)
    check_prompt_fits("p0", 10**6, None)
    with raises_one_line(ValueError, "b.jsonl", "'huge'", "513 tokens", "256 tokens", "never truncated"):
        check_prompt_fits("huge", 513, 256, source="b.jsonl")
