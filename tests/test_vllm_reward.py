"""Reward training with vLLM rollouts: VLLMEngine.update_heads makes vLLM sample from the trainer's current heads.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0). Skipped where vLLM is not installed.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("vllm")

from _vllm_models import build_autodeco  # noqa: E402

from autodeco import AutoDecoModelForCausalLM  # noqa: E402
from autodeco.evaluation.generation import GenerationRequest  # noqa: E402
from autodeco.evaluation.methods import parse_methods  # noqa: E402
from autodeco.training import RewardTrainingArguments, train_heads_reward  # noqa: E402
from autodeco.vllm.engine import VLLMEngine  # noqa: E402

LLM_KWARGS = dict(dtype="float32", max_model_len=256, enforce_eager=True, max_num_seqs=16,
                  kv_cache_memory_bytes=64 << 20, distributed_executor_backend="uni")
AUTODECO, GREEDY = parse_methods("autodeco, greedy")


@pytest.fixture()
def engine(tmp_path, monkeypatch):
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    model_dir = build_autodeco(tmp_path / "m", "qwen2")
    with VLLMEngine(model_dir, traces=False, **LLM_KWARGS) as engine:
        yield engine, model_dir


def _texts(engine, method, requests):
    return [[c.text for c in samples] for samples in
            engine.generate(requests, method=method, max_new_tokens=12, batch_size=64)]


def test_updated_heads_are_the_ones_vllm_samples_from(engine):
    engine, model_dir = engine
    requests = [GenerationRequest("ab", 6, seed=1), GenerationRequest("hello", 6, seed=2)]
    greedy = [samples[0] for samples in _texts(engine, GREEDY, [GenerationRequest(r.prompt, 1) for r in requests])]
    before = _texts(engine, AUTODECO, requests)
    assert any(len(set(samples)) > 1 for samples in before)  # the randomised heads sample around T = 1
    model = AutoDecoModelForCausalLM.from_pretrained(str(model_dir))
    with torch.no_grad():  # T = 2 sigmoid(-30): the sampler's floor, so every sample is the argmax path
        model.temperature_head.mlp[2].bias.fill_(-30.0)
    engine.update_heads(model.heads_state_dict())
    after = _texts(engine, AUTODECO, requests)
    assert after == [[g] * 6 for g in greedy]
    engine.close_llm()  # a model loaded later gets the updated heads too
    assert _texts(engine, AUTODECO, requests) == after
    with pytest.raises(ValueError, match="do not match the heads"):
        engine.update_heads({"temperature_head.mlp.0.weight": torch.zeros(1)})


def test_reward_training_samples_its_rollouts_with_vllm(engine, tmp_path, monkeypatch):
    engine, model_dir = engine
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": f"p{i}", "problem": text, "gt": "a", "kind": "exact"}) + "\n"
                                for i, text in enumerate(["ab", "hello", "abc", "xyz"])))
    updates = []
    update = engine.update_heads
    monkeypatch.setattr(engine, "update_heads", lambda state: (updates.append({k: v.clone() for k, v in state.items()}), update(state))[1])
    config = RewardTrainingArguments(output_dir=str(tmp_path / "rl"), max_steps=2, group_size=4,
                                     per_device_train_batch_size=2, max_new_tokens=8, learning_rate=1e-2,
                                     save_steps=100, seed=0, disable_tqdm=True, report_to="none",
                                     lr_scheduler_type="constant", warmup_steps=0)
    summary = train_heads_reward(str(model_dir), str(problems), config, engine=engine, verbose=False,
                                 reward_fn=lambda problem, completion: float(completion.token_ids[0] % 2))
    assert summary["steps"] == 2 and len(updates) == 2  # one rollout per step, each from the current heads
    assert any(not torch.equal(updates[0][k], updates[1][k]) for k in updates[0])  # the heads moved in between
