"""autodeco.vllm.traces: the chunked teacher-forced pass gives the heads' values at every sampled position.

No vLLM needed: this runs in both environments (transformers 5.16.1 and the newest).
"""

from __future__ import annotations

import pytest
import torch

from _vllm_models import build_autodeco
from autodeco import AutoDecoModelForCausalLM
from autodeco.vllm.traces import TeacherForcedTraces


def test_chunked_traces_equal_one_full_forward(tmp_path):
    model_dir = build_autodeco(tmp_path / "m", "qwen3")
    model = AutoDecoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    prompt, completion = [1, 10, 11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 2]
    with torch.no_grad():
        full = model(input_ids=torch.tensor([prompt + completion[:-1]]))
    want_t = full.temperature[0, len(prompt) - 1 :]
    want_p = full.top_p[0, len(prompt) - 1 :]
    for chunk in (1, 3, 4, 64):  # chunks that start before, at and after the first sampled position
        tracer = TeacherForcedTraces(str(model_dir), device="cpu", chunk=chunk)
        t, p = tracer(prompt, completion)
        assert len(t) == len(p) == len(completion)
        assert torch.allclose(torch.tensor(t), want_t, atol=1e-5), chunk
        assert torch.allclose(torch.tensor(p), want_p, atol=1e-5), chunk
    assert tracer([1, 2], []) == ([], [])


def _one_forward(model, prompt, completion):
    """The reference: one uncached forward over prompt + completion[:-1], batch 1 (no padding anywhere)."""
    with torch.no_grad():
        full = model(input_ids=torch.tensor([prompt + completion[:-1]]))
    return full.temperature[0, len(prompt) - 1 :], full.top_p[0, len(prompt) - 1 :]


@pytest.mark.parametrize("arch", ["qwen3", "gpt_oss"])  # gpt_oss: sliding-window layers (window 32) in the cache
def test_many_equals_one_forward_per_completion(tmp_path, arch):
    model_dir = build_autodeco(tmp_path / "m", arch)
    model = AutoDecoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    prompt = [1] + list(range(10, 19))  # 10 tokens: longer than the chunks below, so prefill crosses boundaries
    lengths = [3, 0, 70, 1, 41, 9]  # very different lengths (padding must not leak), an empty completion
    completions = [[20 + (7 * i + j) % 30 for j in range(n)] for i, n in enumerate(lengths)]
    wants = [_one_forward(model, prompt, c) if c else None for c in completions]
    vocab = model.get_output_embeddings().weight.shape[0]
    for chunk, rows in ((4, None), (7, 2), (256, None)):  # rows=2: three batches, each from a copy of the cache
        budget = rows * chunk * vocab * 4 if rows else 256 * 2**20
        tracer = TeacherForcedTraces(str(model_dir), model=model, chunk=chunk, budget=budget)
        assert min(tracer.rows_per_batch(), len(completions)) == (rows or len(completions))
        got = tracer.many(prompt, completions)
        assert len(got) == len(completions)
        for c, want, (t, p) in zip(completions, wants, got):
            assert len(t) == len(p) == len(c)
            if c:
                assert torch.allclose(torch.tensor(t), want[0], atol=1e-5), (chunk, len(c))
                assert torch.allclose(torch.tensor(p), want[1], atol=1e-5), (chunk, len(c))
    single = tracer(prompt, completions[2])  # the single call: a batch of one
    assert torch.allclose(torch.tensor(single), torch.tensor(got[2]), atol=1e-5)
    one_token = tracer.many([1], completions[:3])  # a one-token prompt: nothing to prefill
    for c, (t, p) in zip(completions[:3], one_token):
        if c:
            assert torch.allclose(torch.tensor(t), _one_forward(model, [1], c)[0], atol=1e-5)


def test_many_rejects_bad_arguments(tmp_path):
    model_dir = build_autodeco(tmp_path / "m", "qwen3")
    tracer = TeacherForcedTraces(str(model_dir), device="cpu")
    assert tracer.many([], [[], []]) == [([], []), ([], [])]
    with pytest.raises(ValueError, match="prompt_ids is empty"):
        tracer.many([], [[5]])
    with pytest.raises(ValueError, match="budget"):
        TeacherForcedTraces(str(model_dir), budget=0)
