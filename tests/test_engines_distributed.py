"""DeepSpeed ZeRO-2, ZeRO-3 and FSDP2 really tested: 2 CPU processes on gloo, the shipped configs, `autodeco train`.

Each engine runs `accelerate launch --config_file configs/accelerate/<engine>.yaml --num_processes 2` on
tests/_engines_worker.py, which is `autodeco.cli.main` plus a per-rank record (see there); one test runs the
documented `-m autodeco.cli train` itself. Checked: the engine really is on (DeepSpeed ZeRO stage, FSDP2 with
DTensor parameters: accelerate on CPU would silently run DDP without autodeco/training/engines.py's shim), the first log
line names it, both ranks end with identical heads equal to one process with the same global batch (plain SGD,
so any normalisation error shows), the optimizer holds the heads only, the frozen base never moves (gathered
under ZeRO-3 / FSDP2), checkpoints are heads-only and load with from_pretrained, and a DeepSpeed run killed
with SIGKILL resumes to the same heads. Bad input: a DeepSpeed JSON whose batch sizes disagree with the
trainer's ends in one line on every rank, and a missing DeepSpeed names the extra to install.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_engines_distributed.py   # ~5 min on 2 busy cores

Measured on 2 busy cores: each engine's run 25-65 s, each resume 55-60 s (two launches; the ZeRO-2 one is marked
slow, ZeRO-3's runs by default), the documented command 50 s, the batch-size mismatch 45 s.

DeepSpeed compiles a C++ extension on its first distributed init (about 1 min on an idle 2-core machine, 3-7 min
on a busy one), cached in $TORCH_EXTENSIONS_DIR; unset, these tests use <venv>/torch_extensions (under `make
test`: .venv/torch_extensions) and put the venv's bin first on PATH, since another `ninja` forces a rebuild.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from autodeco import AutoDecoModelForCausalLM
from autodeco.testing import save_tiny_base

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "_engines_worker.py"
CONFIGS = REPO / "configs"
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason='DeepSpeed not installed: pip install "autodeco[deepspeed]"')
HEAD_PREFIXES = ("temperature_head.", "top_p_head.")
# Plain SGD, no clipping, constant lr: the update is linear in the gradient, so a wrong loss normalisation across
# processes or accumulation steps shows in the heads (as in tests/test_distributed.py).
FLAGS = ["--max-steps", 4, "--easy-token-mask-ratio", 0, "--learning-rate", 10.0, "--seed", 0,
         "--trainer-arg", "optim=sgd", "--trainer-arg", "lr_scheduler_type=constant", "--trainer-arg", "warmup_steps=0",
         "--trainer-arg", "max_grad_norm=0", "--trainer-arg", "report_to=none", "--trainer-arg", "disable_tqdm=true",
         "--trainer-arg", "train_sampling_strategy=sequential", "--trainer-arg", "save_steps=2",
         "--trainer-arg", "logging_steps=1", "--max-length", 64]
TWO_PROCESSES = ["--per-device-train-batch-size", 1, "--gradient-accumulation-steps", 2]  # 2 x 1 x 2 = 4 rows/step
ONE_PROCESS = ["--per-device-train-batch-size", 4, "--gradient-accumulation-steps", 1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ)
    venv_bin = str(Path(sys.executable).parent)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO),
               PATH=venv_bin + os.pathsep + env.get("PATH", ""))
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions"))
    env.pop("ACCELERATE_USE_CPU", None)  # with it, accelerate launch would start a single process
    env.update(extra)
    return env


def _launch(config: str, entry: list, flags: list, *, check: bool = True, timeout: int = 900, **env):
    """accelerate launch of `entry` (the worker, or -m autodeco.cli) with the shipped `config`, from the repo root."""
    for _ in range(3):
        argv = [str(c) for c in [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config,
                                 "--num_processes", 2, "--main_process_port", _free_port(), *entry, *flags]]
        proc = subprocess.run(argv, cwd=REPO, env=_env(**env), capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0 or "address already in use" not in proc.stderr.lower():
            break
    if check:
        assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return proc


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    base = save_tiny_base(root / "base")
    rng = random.Random(0)
    data = root / "train.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for _ in range(24):  # completions of 1..20 characters: ranks see different token counts per step
            completion = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 20)))
            f.write(json.dumps({"prompt": "Q" * rng.randint(1, 8) + ": ", "completion": completion}) + "\n")
    single = root / "single"
    proc = subprocess.run([sys.executable, str(WORKER), "train", "--model", str(base), "--data", str(data),
                           "--output-dir", str(single), *map(str, FLAGS), *map(str, ONE_PROCESS)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert "Engine: single process; parameters not sharded." in proc.stdout
    return root, base, data, load_file(str(single / "engine_rank0.safetensors"))


def _records(directory: Path) -> list[tuple[dict, dict]]:
    return [(json.loads((directory / f"engine_rank{r}.json").read_text()),
             load_file(str(directory / f"engine_rank{r}.safetensors"))) for r in range(2)]


def _assert_heads_equal(a: dict, b: dict, what: str, rtol: float = 1e-6) -> None:
    assert set(a) == set(b) and a, what
    for key in a:
        scale = b[key].abs().max().clamp_min(1e-6)
        error = float((a[key] - b[key]).abs().max() / scale)
        assert error <= rtol, f"{what}: {key} differs by {error:.2e} (relative) > {rtol:g}"


ENGINES = {
    "deepspeed_zero2": dict(name="DeepSpeed", stage=2, sharded=False, line="Engine: DeepSpeed ZeRO stage 2 on 2 processes"),
    "deepspeed_zero3": dict(name="DeepSpeed", stage=3, sharded=True, line="Engine: DeepSpeed ZeRO stage 3 on 2 processes"),
    "fsdp": dict(name="FSDP2", stage=None, sharded=True, line="Engine: FSDP2 on 2 processes; parameters sharded"),
}


@pytest.mark.parametrize("engine", [pytest.param(e, marks=needs_deepspeed if e.startswith("deepspeed") else ())
                                    for e in ENGINES])
def test_engine_matches_one_process_and_keeps_the_base_frozen(setup, engine):
    root, base, data, reference = setup
    expected = ENGINES[engine]
    out = root / engine
    proc = _launch(CONFIGS / "accelerate" / f"{engine}.yaml", [WORKER],
                   ["train", "--model", base, "--data", data, "--output-dir", out, *FLAGS, *TWO_PROCESSES])
    engine_lines = [line for line in proc.stdout.splitlines() if line.startswith("Engine: ")]
    assert len(engine_lines) == 1 and engine_lines[0].startswith(expected["line"]), proc.stdout
    (info0, heads0), (info1, heads1) = _records(out)
    for info in (info0, info1):
        assert info["world_size"] == 2 and info["global_step"] == 4
        assert info["name"] == expected["name"] and info["sharded"] == expected["sharded"]
        assert info["is_deepspeed_enabled"] == engine.startswith("deepspeed")
        assert info["is_fsdp_enabled"] == (engine == "fsdp")
        if engine == "fsdp":  # FSDP really on, not accelerate's silent DDP fallback on CPU
            assert info["dtensor_parameters"] == info["parameters"] > 0
        if expected["stage"] == 3:  # ZeRO-3 partitions every parameter, the frozen base's included
            assert info["partitioned_parameters"] == info["parameters"] > 0
        assert info["optimizer_parameters"] == info["requires_grad"], "the optimizer holds more than the heads"
        assert info["requires_grad"] and all(n.startswith(HEAD_PREFIXES) for n in info["requires_grad"])
        assert info["base_compared"] > 10 and info["base_max_abs_change"] == 0.0, "the frozen base moved"
    for key in heads0:
        assert torch.equal(heads0[key], heads1[key]), f"ranks disagree on {key}"
    fresh = AutoDecoModelForCausalLM.from_base(str(base), seed=0).heads_state_dict()
    assert max(float((reference[k] - fresh[k]).abs().max()) for k in fresh) > 1e-2, "heads barely moved"
    _assert_heads_equal(heads0, reference, f"{engine} vs one process")

    # Checkpoints and the final directory are heads-only, and load with from_pretrained.
    for directory in (out / "checkpoint-2", out / "checkpoint-4", out):
        heads_file = load_file(str(directory / "autodeco_heads.safetensors"))
        assert heads_file and all(k.startswith(HEAD_PREFIXES) for k in heads_file), directory
        assert not any(directory.glob("model*.safetensors")), directory
    loaded = AutoDecoModelForCausalLM.from_pretrained(str(out / "checkpoint-4"))
    _assert_heads_equal(loaded.heads_state_dict(), heads0, "checkpoint-4 as loaded", rtol=0.0)
    _assert_heads_equal(AutoDecoModelForCausalLM.from_pretrained(str(out)).heads_state_dict(), heads0, "final", 0.0)


@needs_deepspeed
@pytest.mark.parametrize("engine", [pytest.param("deepspeed_zero2", marks=pytest.mark.slow), "deepspeed_zero3"])
def test_deepspeed_resume_after_kill_continues_to_the_same_heads(setup, engine):
    root, base, data, reference = setup
    out = root / f"{engine}-killed"
    common = ["train", "--model", base, "--data", data, "--output-dir", out, *FLAGS, *TWO_PROCESSES]
    killed = _launch(CONFIGS / "accelerate" / f"{engine}.yaml", [WORKER], common, check=False,
                     AUTODECO_TEST_KILL_AT_STEP="3")
    assert killed.returncode != 0 and (out / "checkpoint-2" / "global_step2").is_dir()
    assert not (out / "checkpoint-4").exists() and not (out / "engine_rank0.json").exists()
    _launch(CONFIGS / "accelerate" / f"{engine}.yaml", [WORKER], [*common, "--resume"])
    (info0, heads0), (_, heads1) = _records(out)
    assert info0["global_step"] == 4
    for key in heads0:
        assert torch.equal(heads0[key], heads1[key]), f"ranks disagree on {key} after resuming"
    _assert_heads_equal(heads0, reference, f"{engine} resumed vs one process without interruption")


@needs_deepspeed
def test_documented_command_runs_as_it_is(setup):
    """`accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml --num_processes 2 -m autodeco.cli train`
    (no use_cpu flag: on a machine without a GPU autodeco's defaults pick the CPU)."""
    root, base, data, reference = setup
    out = root / "documented"
    proc = _launch(CONFIGS / "accelerate" / "deepspeed_zero2.yaml", ["-m", "autodeco.cli"],
                   ["train", "--model", base, "--data", data, "--output-dir", out, *FLAGS, *TWO_PROCESSES])
    assert proc.stdout.count("Engine: DeepSpeed ZeRO stage 2 on 2 processes") == 1
    assert proc.stdout.count("Trained the") == 1
    _assert_heads_equal(load_file(str(out / "autodeco_heads.safetensors")), reference, "documented command")


@needs_deepspeed
def test_deepspeed_batch_size_mismatch_is_one_line_not_a_hang(setup, tmp_path):
    root, base, data, _ = setup
    ds = json.loads((CONFIGS / "deepspeed" / "zero2.json").read_text())
    ds["train_micro_batch_size_per_gpu"] = 4
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    yaml = (CONFIGS / "accelerate" / "deepspeed_zero2.yaml").read_text()
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.replace("configs/deepspeed/zero2.json", str(tmp_path / "ds.json")))
    proc = _launch(config, ["-m", "autodeco.cli"], ["train", "--model", base, "--data", data, "--output-dir",
                                                   tmp_path / "out", *FLAGS, *TWO_PROCESSES], check=False, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("autodeco train: error: ")]
    # The same one line from each rank that got there (the launcher may stop the other rank first, since the check
    # now runs before any weights load).
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, proc.stderr[-3000:]
    assert "train_micro_batch_size_per_gpu=4 but the trainer uses 1" in errors[0]
    # No rank crashed with a traceback (the launcher's own ChildFailedError report for exit status 2 is all there is).
    assert not [line for line in proc.stderr.splitlines() if line.startswith("[rank") and "Traceback" in line]


def test_missing_deepspeed_names_the_extra(setup, monkeypatch, capsys):
    root, base, data, _ = setup
    from autodeco.training import engines
    from autodeco.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(engines.importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    code = main(["train", "--model", str(base), "--data", str(data), "--output-dir", str(root / "never"),
                 "--trainer-arg", f"deepspeed={CONFIGS / 'deepspeed' / 'zero2.json'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and 'pip install "autodeco[deepspeed]"' in err[0], err
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ImportError, match=r'pip install "autodeco\[deepspeed\]"'):
        engines.check_engine_available()
