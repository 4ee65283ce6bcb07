"""Data-parallel training on 2 CPU processes (gloo) gives the heads of a single process with the same global batch.

The shipped configs/accelerate/ddp.yaml is launched with `accelerate launch --num_processes 2` on the worker
tests/_distributed_worker.py (the worker asks the Trainer for use_cpu=True, so the processes talk over gloo). Each
rank saves its heads; the test checks that both ranks agree exactly and that they match one process trained with
batch 4 on the same rows (2 processes x batch 1 x 2 accumulation steps = 4 rows per step, sequential order).
A negative control (torch.distributed.run, each process normalising by its own token count) must differ, which
shows the comparison is sharp enough to catch a wrong normalisation across processes. Also checked: every
accelerate and DeepSpeed config shipped in configs/ parses.

    .venv/bin/python -m pytest -q tests/test_distributed.py          # ~40 s on 2 cores
"""

from __future__ import annotations

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
WORKER = REPO / "tests" / "_distributed_worker.py"
CONFIGS = REPO / "configs"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(REPO))
    env.pop("ACCELERATE_USE_CPU", None)  # with it, accelerate launch would start a single process
    return env


def _run(cmd, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run `cmd` (a list, or a function of a free port giving one) from the repository root; assert it succeeds.

    A launcher whose port was taken between _free_port() and its bind (other jobs on the machine) is retried.
    """
    for _ in range(3):
        argv = [str(c) for c in (cmd(_free_port()) if callable(cmd) else cmd)]
        proc = subprocess.run(argv, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)
        port_taken = "address already in use" in proc.stderr.lower() or "EADDRINUSE" in proc.stderr
        if proc.returncode == 0 or not (callable(cmd) and port_taken):
            break
    assert proc.returncode == 0, f"{' '.join(argv)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}"
    return proc


def _heads(directory: Path, rank: int) -> dict:
    return load_file(str(directory / f"heads_rank{rank}.safetensors"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    base = save_tiny_base(root / "base")
    rng = random.Random(0)
    data = root / "train.jsonl"
    with open(data, "w", encoding="utf-8") as f:
        for _ in range(24):  # completions of 1..20 characters: processes see different token counts per step
            completion = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(1, 20)))
            f.write(json.dumps({"prompt": "Q" * rng.randint(1, 8) + ": ", "completion": completion}) + "\n")
    return root, base, data


def test_two_processes_match_one_process_with_the_same_global_batch(setup):
    root, base, data = setup
    common = ["--base", base, "--data", data, "--max-steps", 5]
    single, ddp, control = root / "single", root / "ddp", root / "per-rank-mean"

    _run([sys.executable, WORKER, *common, "--output-dir", single, "--batch-size", 4])
    _run(lambda port: [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                       CONFIGS / "accelerate" / "ddp.yaml", "--num_processes", 2, "--main_process_port", port,
                       WORKER, *common, "--output-dir", ddp, "--batch-size", 1, "--gradient-accumulation-steps", 2])

    info = json.loads((ddp / "log_history.json").read_text())
    assert info["world_size"] == 2
    assert all(name.startswith(("temperature_head.", "top_p_head.")) for name in info["trainable"])
    rank0, rank1, reference = _heads(ddp, 0), _heads(ddp, 1), _heads(single, 0)
    fresh = AutoDecoModelForCausalLM.from_base(str(base), seed=0).heads_state_dict()
    assert max((reference[k] - fresh[k]).abs().max().item() for k in fresh) > 1e-3, "heads barely moved"
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks disagree on {key}"
        torch.testing.assert_close(rank0[key], reference[key], rtol=1e-5, atol=1e-8, msg=lambda m: f"{key}: {m}")
    # Logged losses are token means over both processes: step 1 (fresh heads) matches the single process.
    first = lambda d: next(e for e in json.loads((d / "log_history.json").read_text())["log_history"] if "loss" in e)
    for key in ("loss", "temperature_loss", "top_p_loss", "mean_temperature", "mean_top_p"):
        assert first(ddp)[key] == pytest.approx(first(single)[key], rel=1e-5), key

    # Negative control: a mean of per-process means (Trainer's average_tokens_across_devices=False) must differ.
    _run(lambda port: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", 2, "--master_addr",
                       "127.0.0.1", "--master_port", port, WORKER, *common, "--output-dir", control, "--batch-size", 1,
                       "--gradient-accumulation-steps", 2, "--no-average-tokens-across-devices"])
    naive = _heads(control, 0)
    assert not all(torch.allclose(naive[k], reference[k], rtol=1e-5, atol=1e-8) for k in naive), (
        "the comparison cannot tell a per-process mean from the global token mean"
    )


def test_shipped_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    expected = {"ddp": "MULTI_GPU", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED"}
    for name, kind in expected.items():
        config = load_config_from_file(str(CONFIGS / "accelerate" / f"{name}.yaml"))
        assert config.distributed_type.value == kind, name
        assert config.mixed_precision in ("no", None), f"{name}: autocast would run the heads in low precision"
        if kind == "DEEPSPEED":
            ds_file = REPO / config.deepspeed_config["deepspeed_config_file"]
            ds = json.loads(ds_file.read_text())
            assert ds["zero_optimization"]["stage"] == int(name[-1])
            assert ds["train_micro_batch_size_per_gpu"] == "auto" and ds["gradient_accumulation_steps"] == "auto"
            assert "optimizer" not in ds, "the Trainer's optimizer (heads only) should be used"
        if kind == "FSDP":
            assert config.fsdp_config["fsdp_state_dict_type"] == "FULL_STATE_DICT"
            assert config.fsdp_config["fsdp_version"] == 2
    zero3 = json.loads((CONFIGS / "deepspeed" / "zero3.json").read_text())
    assert zero3["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


@pytest.mark.slow
def test_cli_under_accelerate_ddp(setup):
    """`autodeco train` itself on 2 processes: one summary, one heads directory, the same heads as 1 process."""
    root, base, data = setup
    flags = ["train", "--model", base, "--data", data, "--max-steps", 3, "--per-device-train-batch-size", 2,
             "--gradient-accumulation-steps", 1, "--easy-token-mask-ratio", 0, "--learning-rate", 1e-2,
             "--trainer-arg", "use_cpu=true", "--trainer-arg", "report_to=none", "--trainer-arg", "disable_tqdm=true",
             "--trainer-arg", "train_sampling_strategy=sequential", "--trainer-arg", "save_steps=2"]
    two, one = root / "cli-ddp", root / "cli-single"
    proc = _run(lambda port: [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                              CONFIGS / "accelerate" / "ddp.yaml", "--num_processes", 2, "--main_process_port", port,
                              "-m", "autodeco.cli", *flags, "--output-dir", two])
    assert proc.stdout.count("Trained the") == 1 and proc.stdout.count("Data: ") == 1, proc.stdout
    assert (two / "checkpoint-2" / "autodeco_heads.safetensors").is_file()
    _run([sys.executable, "-m", "autodeco.cli", *flags[:flags.index("--per-device-train-batch-size") + 1], 4,
          *flags[flags.index("--per-device-train-batch-size") + 2:], "--output-dir", one])
    a, b = load_file(str(two / "autodeco_heads.safetensors")), load_file(str(one / "autodeco_heads.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")  # AdamW
