"""autodeco.vllm.traces: the chunked teacher-forced pass gives the heads' values at every sampled position.

No vLLM needed: this runs in both environments (transformers 5.16.1 and the newest).
"""

from __future__ import annotations

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
