"""Model-directory and input validation in one place (issue 15): one-line errors naming the file, field and fix.

    validate_model_dir(path)        an AutoDeco directory: layout, config.json types, head dtypes/shapes/finiteness
    validate_base_dir(path)         a local base model directory: config.json, safetensors weights only
    check_input_file(path, flag)    an input file that exists and is not a directory
    check_prompt_fits(id, n, ctx)   a benchmark prompt that fits the model's context (never truncated)
    context_length(config)          the context length a (base) config.json dict declares, or None

Each raises FileNotFoundError (something missing) or ValueError (something wrong) whose message is ONE line; the CLI
reports those with exit status 2. Nothing here loads model weights: head tensors are read from safetensors (small).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open

from autodeco.heads import TemperatureHead, TopPHead

__all__ = ["validate_model_dir", "validate_base_dir", "check_input_file", "check_prompt_fits", "context_length",
           "read_config", "HEADS_WEIGHTS_NAME", "MERGED_WEIGHTS_NAMES"]

HEADS_WEIGHTS_NAME = "autodeco_heads.safetensors"  # the same names as the modeling module's (checked in tests)
MERGED_WEIGHTS_NAMES = ("model.safetensors", "model.safetensors.index.json")
HEAD_PREFIXES = ("temperature_head.", "top_p_head.")
PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.bin", "tf_model.h5",
                   "flax_model.msgpack")
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

# config.json fields of an AutoDeco directory: (kind, required, fix)
_BOOL_FIELDS = ("top_p_features", "train_temperature", "train_top_p", "dft")
_POSITIVE_NUMBER_FIELDS = {"max_temperature": "2.0", "soft_top_p_alpha": "30"}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def read_config(path: str | Path) -> dict:
    """config.json of a model directory as a dict; errors name the file (and the JSON error's line and column)."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"'{path}' has no config.json; pass a model directory (one written by save_pretrained).")
    try:
        config = json.loads(file.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8 JSON.") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{file}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); fix or re-save "
                         "the file (save_pretrained writes it).") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(config).__name__}; re-save the model's config.")
    return config


def _check_path_is_dir(path: Path, what: str) -> None:
    if not path.exists():
        raise FileNotFoundError(f"The {what} '{path}' does not exist; pass an existing model directory.")
    if not path.is_dir():
        raise ValueError(f"The {what} '{path}' is a file, not a model directory; pass the directory holding config.json.")


def _check_config_fields(config: dict, file: Path) -> None:
    def fail(field, expected):
        raise ValueError(f"{file}: field '{field}' is {json.dumps(config[field])} ({type(config[field]).__name__}); "
                         f"{expected}.")

    for field in _BOOL_FIELDS:
        if field in config and not isinstance(config[field], bool):
            fail(field, "it must be a JSON boolean, true or false (without quotes)")
    for field, paper in _POSITIVE_NUMBER_FIELDS.items():
        if field in config and not (_is_number(config[field]) and math.isfinite(config[field]) and config[field] > 0):
            fail(field, f"it must be a positive number (the paper uses {paper})")
    if "easy_token_mask_ratio" in config:
        value = config["easy_token_mask_ratio"]
        if not (_is_number(value) and 0.0 <= value <= 1.0):
            fail("easy_token_mask_ratio", "it must be a number in [0, 1] (the paper uses 0.6)")
    if "head_hidden_size" in config and not _is_positive_int(config["head_hidden_size"]):
        fail("head_hidden_size", "it must be a positive integer (the paper uses 256)")
    base_config = config.get("base_config")
    if base_config is not None and not isinstance(base_config, dict):
        fail("base_config", "it must be the base model's config (a JSON object) or null")
    base_hidden = _base_hidden_size(base_config or {})
    if config.get("hidden_size") is None:
        if base_hidden is None:
            raise ValueError(f"{file}: field 'hidden_size' is missing and there is no base_config to take it from; set "
                             "it to the base model's hidden size (or re-create the directory with `autodeco init`).")
    elif not _is_positive_int(config["hidden_size"]):
        fail("hidden_size", "it must be the base model's hidden size, a positive integer")
    elif base_hidden is not None and config["hidden_size"] != base_hidden:
        raise ValueError(f"{file}: field 'hidden_size' is {config['hidden_size']} but the recorded base_config's hidden "
                         f"size is {base_hidden}; the heads were built for another base: re-create them with `autodeco init`.")
    name = config.get("base_model_name_or_path")
    if name is not None and not (isinstance(name, str) and name.strip()):
        fail("base_model_name_or_path", "it must be the base model's local path or hub name (a non-empty string)")


def _base_hidden_size(base_config: dict) -> int | None:
    text = base_config.get("text_config") if isinstance(base_config.get("text_config"), dict) else base_config
    for key in ("hidden_size", "n_embd", "d_model"):
        if _is_positive_int(text.get(key)):
            return text[key]
    return None


def _expected_head_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    hidden = config.get("hidden_size") or _base_hidden_size(config.get("base_config") or {})
    width = config.get("head_hidden_size", 256)
    with torch.device("meta"):
        heads = {"temperature_head": TemperatureHead(hidden, width, float(config.get("max_temperature", 2.0))),
                 "top_p_head": TopPHead(hidden, width, use_stats=config.get("top_p_features", True))}
    return {f"{name}.{key}": tuple(t.shape) for name, head in heads.items() for key, t in head.state_dict().items()}


def _open_safetensors(file: Path):
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; the model directory is incomplete: re-save it.")
    if file.stat().st_size < 8:
        raise ValueError(f"{file}: not a safetensors file ({file.stat().st_size} bytes; truncated or empty): re-save the "
                         "model (or restore it from a checkpoint-* directory).")
    try:
        return safe_open(str(file), framework="pt")
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: all mean the same to the user
        raise ValueError(f"{file}: not a readable safetensors file ({_one_line(exc)}); it is truncated or corrupt: "
                         "re-save the model (or restore it from a checkpoint-* directory).") from None


def _check_head_tensors(files: dict[str, Path], expected: dict[str, tuple[int, ...]], directory: Path) -> None:
    """files: tensor name -> the safetensors file holding it (only head tensors are read)."""
    missing = sorted(set(expected) - set(files))
    if missing:
        where = ", ".join(sorted({str(f) for f in files.values()})) or str(directory)
        raise ValueError(f"{where}: missing head tensors {missing}; it was saved by another AutoDeco configuration "
                         "(top_p_features / head_hidden_size differ) or is not an AutoDeco model: re-create it.")
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        try:
            with _open_safetensors(file) as f:
                for name in names:
                    piece = f.get_slice(name)
                    dtype, shape = piece.get_dtype(), tuple(piece.get_shape())
                    if dtype not in FLOAT_DTYPES:
                        raise ValueError(f"{file}: head tensor '{name}' has dtype {dtype.lower().replace('i', 'int')} "
                                         f"({dtype}); head weights must be floating point (float32, bfloat16 or "
                                         "float16): re-save the heads from a model.")
                    if shape != expected[name]:
                        raise ValueError(f"{file}: head tensor '{name}' has shape {shape}, config.json implies "
                                         f"{expected[name]}; check hidden_size / head_hidden_size / top_p_features.")
                    tensor = f.get_tensor(name)
                    bad = int((~torch.isfinite(tensor)).sum())
                    if bad:
                        kinds = sorted({"NaN" if math.isnan(v) else ("inf" if v > 0 else "-inf")
                                        for v in tensor[~torch.isfinite(tensor)].flatten()[:1000].tolist()})
                        raise ValueError(f"{file}: head tensor '{name}' holds {bad} non-finite values "
                                         f"({', '.join(kinds)}); the heads are corrupt (a diverged training run?): "
                                         "retrain or restore them from a checkpoint-* directory.")
        except ValueError:
            raise
        except Exception as exc:  # noqa: BLE001 - a file that fails while reading tensors: truncated
            raise ValueError(f"{file}: could not read head tensors ({_one_line(exc)}); it is truncated or corrupt: "
                             "re-save the model.") from None


def _merged_head_files(directory: Path) -> dict[str, Path]:
    index = directory / MERGED_WEIGHTS_NAMES[1]
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{index}: not a safetensors index (a JSON object with a 'weight_map'); re-save the "
                             "model with `autodeco merge`.") from None
        return {name: directory / shard for name, shard in weight_map.items() if name.startswith(HEAD_PREFIXES)}
    file = directory / MERGED_WEIGHTS_NAMES[0]
    with _open_safetensors(file) as f:
        return {name: file for name in f.keys() if name.startswith(HEAD_PREFIXES)}


def _check_recorded_base(directory: Path, name: str, file: Path) -> None:
    base = Path(os.path.expanduser(name))
    if not base.is_absolute() and not base.exists() and not name.startswith("."):
        return  # a hub name: checked when it is loaded
    if base.exists() and base.resolve() == directory.resolve():
        raise ValueError(f"{file}: base_model_name_or_path '{name}' is this AutoDeco directory itself; set it to the "
                         "base model the heads were trained on (a local directory or hub name).")
    _check_path_is_dir(base, f"base model recorded in {file}")
    base_type = read_config(base).get("model_type")
    if base_type == "autodeco":
        raise ValueError(f"{file}: base_model_name_or_path '{name}' is itself an AutoDeco directory; set it to the "
                         "plain base model (the base_model_name_or_path recorded in that directory's config.json).")
    validate_base_dir(base)


def validate_model_dir(path: str | Path, *, base_model_name_or_path: str | None = None) -> None:
    """Check a local AutoDeco directory (heads-only or merged) without loading the base; raise on the first problem.

    Checks: a directory with config.json that parses as a JSON object with model_type "autodeco"; field types
    (booleans are JSON booleans, numbers numbers, hidden_size present or derivable from base_config and equal to
    it); the layout (autodeco_heads.safetensors, or model.safetensors[.index.json]; pickles refused); head tensors
    readable, floating point, shaped as config.json implies and finite; for heads-only, a recorded base that is
    not this directory nor another AutoDeco directory, and when local, a valid base directory
    (`base_model_name_or_path` replaces the recorded base, as from_pretrained's override does).
    """
    directory = Path(path)
    _check_path_is_dir(directory, "AutoDeco model directory")
    config = read_config(directory)
    file = directory / "config.json"
    model_type = config.get("model_type")
    if model_type != "autodeco":
        raise ValueError(f"{file}: model_type is {json.dumps(model_type)}, not \"autodeco\": '{directory}' is a plain "
                         "model, not an AutoDeco one; wrap it first with `autodeco init --base DIR --output-dir NEW_DIR`.")
    _check_config_fields(config, file)
    expected = _expected_head_shapes(config)
    if (directory / HEADS_WEIGHTS_NAME).exists():
        name = base_model_name_or_path or config.get("base_model_name_or_path")
        if not name:
            raise ValueError(f"{file}: field 'base_model_name_or_path' is missing; a heads-only directory loads its "
                             "base from there: set it to the base's local path or hub name.")
        heads_file = directory / HEADS_WEIGHTS_NAME
        with _open_safetensors(heads_file) as f:
            names = list(f.keys())
        unexpected = sorted(set(names) - set(expected))
        if unexpected:
            missing = sorted(set(expected) - set(names))
            raise ValueError(f"{heads_file}: " + (f"missing head tensors {missing}, " if missing else "")
                             + f"unexpected tensors {unexpected[:5]}; it was saved by another AutoDeco "
                             "configuration or is not an AutoDeco heads file: re-create it.")
        _check_head_tensors({n: heads_file for n in names}, expected, directory)
        _check_recorded_base(directory, name, file)
        return
    if any((directory / n).exists() for n in MERGED_WEIGHTS_NAMES):
        _check_head_tensors(_merged_head_files(directory), expected, directory)
        return
    _refuse_pickles(directory)
    raise FileNotFoundError(f"'{directory}' has config.json but neither {HEADS_WEIGHTS_NAME} (heads-only layout) nor "
                            f"{MERGED_WEIGHTS_NAMES[0]} (merged layout); was the save interrupted? Re-save the model.")


def _refuse_pickles(directory: Path) -> None:
    pickles = [n for n in PICKLED_WEIGHTS if (directory / n).exists()]
    if pickles:
        raise ValueError(f"'{directory}' holds only {pickles[0]}: only safetensors are read (a pickle can run code when "
                         "loaded); convert it once with AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR) "
                         "in a session you trust.")


def validate_base_dir(path: str | Path) -> None:
    """Check a local base model directory before it is loaded: config.json parses, it is not an AutoDeco directory,
    and its weights are safetensors (pytorch_model.bin and other pickles are refused before anything reads them)."""
    directory = Path(path)
    _check_path_is_dir(directory, "base model")
    config = read_config(directory)
    if config.get("model_type") == "autodeco":
        raise ValueError(f"'{directory}' is an AutoDeco directory, not a base model; pass the plain base it was built on "
                         f"(its config.json records it as base_model_name_or_path: {config.get('base_model_name_or_path')!r}).")
    if not isinstance(config.get("model_type"), str):
        raise ValueError(f"{directory / 'config.json'}: no 'model_type' field; this is not a transformers model "
                         "directory: pass a directory written by save_pretrained.")
    if any(directory.glob("*.safetensors")) or (directory / MERGED_WEIGHTS_NAMES[1]).exists():
        return
    _refuse_pickles(directory)
    raise FileNotFoundError(f"'{directory}' has config.json but no *.safetensors weights; save the model with "
                            "save_pretrained (or pass the directory that holds its weights).")


def check_input_file(path: str | Path, flag: str) -> Path:
    """An input file for `flag` (e.g. "--data"): it exists and is a file. Returns it as a Path."""
    file = Path(path)
    if file.is_dir():
        raise ValueError(f"{flag} '{file}' is a directory; pass the JSONL file(s) inside it (e.g. {flag} {file}/*.jsonl).")
    if not file.exists():
        raise FileNotFoundError(f"{flag} '{file}' does not exist; check the path.")
    return file


def context_length(config: dict) -> int | None:
    """The context length a (base) config.json dict declares (max_position_embeddings, n_positions, ...), or None.
    For an AutoDeco config, the recorded base_config's."""
    if config.get("model_type") == "autodeco" and isinstance(config.get("base_config"), dict):
        config = config["base_config"]
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx"):
        if _is_positive_int(text.get(key)):
            return text[key]
    return None


def check_prompt_fits(problem_id: str, prompt_tokens: int, context: int | None, *, source: str = "") -> None:
    """Refuse a benchmark prompt of `prompt_tokens` tokens that does not fit in `context` (a truncated problem is a
    different problem, so it is never truncated). Call for every prompt before any generation."""
    if context is None or prompt_tokens < context:
        return
    where = f"{source}: " if source else ""
    raise ValueError(f"{where}problem {problem_id!r}: its prompt is {prompt_tokens} tokens but the model's context is "
                     f"{context} tokens, leaving no room to answer; shorten or remove the problem (it is never "
                     "truncated), or evaluate a model with a longer context.")
