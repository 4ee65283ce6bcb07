"""Tests for autodeco/modeling/fused_loss.py: the training step from hidden states, never the logits of a whole sequence.

Run: PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/test_fused_loss.py   (~20 s on 2 CPU cores)
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM

from autodeco import AutoDecoModelForCausalLM
from autodeco.modeling.fused_loss import FusedLossError, fused_forward, logit_transform, supports_fused_loss
from autodeco.losses import IGNORE_INDEX

VOCAB = 300
# Tiny configs of bases that post-process lm_head's output: Gemma 2 soft-caps, Granite divides, Cohere multiplies.
ARCHES = {
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "gemma2": dict(model_type="gemma2", num_key_value_heads=2, head_dim=16, final_logit_softcapping=3.0,
                   query_pre_attn_scalar=16),
    "granite": dict(model_type="granite", num_key_value_heads=2, logits_scaling=4.0),
    "cohere": dict(model_type="cohere", num_key_value_heads=2, logit_scale=0.5),
}


def tiny_base(arch: str, seed: int = 0, dtype=torch.float32):
    spec = dict(ARCHES[arch])
    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **spec)
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():  # peaked distributions (random tiny bases are near uniform) so the soft cap bites
        base.get_output_embeddings().weight.mul_(40.0)
    return base


def batch(seed: int = 0, rows: int = 3, length: int = 17):
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (rows, length), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    labels = input_ids.clone()
    labels[:, :5] = IGNORE_INDEX  # prompts
    attention_mask[1, -4:] = 0  # right padding
    labels[1, -4:] = IGNORE_INDEX
    labels[rows - 1, 8:10] = IGNORE_INDEX  # a hole inside a completion
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def step(model, inputs, fused: bool, seed: int = 123):
    """One forward + backward -> (outputs, {head param: grad})."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # the easy-token mask draws from the global RNG
    out = model(**inputs, fused_loss=fused)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out, grads


def assert_rel(a, b, rtol, what):
    a, b = a.detach().double(), b.detach().double()
    err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:g}"


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_transform_reproduces_the_base_logits(arch):
    base = tiny_base(arch)
    inputs = batch()
    captured = []
    handle = base.base_model.register_forward_hook(lambda m, a, o: captured.append(o.last_hidden_state))
    with torch.no_grad():
        reference = base(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    handle.remove()
    transform = logit_transform(base)
    expected = {"llama": "none", "gemma2": "softcap 3", "granite": "/ 4", "cohere": "x 0.5"}[arch]
    assert transform.describe() == expected
    with torch.no_grad():
        ours = transform(base.get_output_embeddings()(captured[0]))
    assert torch.equal(ours, reference)  # same ops, same dtype: bit-identical
    if arch != "llama":
        raw = base.get_output_embeddings()(captured[0])
        assert not torch.allclose(raw, reference), "the transform should matter on this config"


@pytest.mark.parametrize("arch", sorted(ARCHES))
@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_losses_and_head_gradients_equal_the_full_logits_path(arch, chunk_rows):
    model = AutoDecoModelForCausalLM.from_base(tiny_base(arch), seed=0).train()
    assert supports_fused_loss(model)
    model.fused_loss_chunk_rows = chunk_rows
    inputs = batch()
    full, full_grads = step(model, inputs, fused=False)
    fused, fused_grads = step(model, inputs, fused=True)
    assert fused.logits.shape == (3, 1, VOCAB)
    for key in ("loss", "temperature_loss", "top_p_loss", "temperature", "top_p"):
        assert_rel(getattr(fused, key), getattr(full, key), 1e-5, key)
    assert set(fused_grads) == set(full_grads) and len(full_grads) == 8
    for name in full_grads:
        assert_rel(fused_grads[name], full_grads[name], 1e-5, name)
    assert all(p.grad is None for p in model.llm.parameters()), "the frozen base got a gradient"


@pytest.mark.parametrize("options", [dict(train_top_p=False), dict(train_temperature=False),
                                     dict(top_p_features=False), dict(dft=False, easy_token_mask_ratio=0.0),
                                     dict(easy_token_mask_ratio=1.0)])
def test_head_and_loss_options(options):
    model = AutoDecoModelForCausalLM.from_base(tiny_base("gemma2"), seed=0, **options).train()
    model.temperature_head.requires_grad_(model.config.train_temperature)
    model.top_p_head.requires_grad_(model.config.train_top_p)
    model.fused_loss_chunk_rows = 5
    inputs = batch(seed=1)
    full, full_grads = step(model, inputs, fused=False)
    fused, fused_grads = step(model, inputs, fused=True)
    for key in ("loss", "temperature_loss", "top_p_loss"):
        if getattr(full, key) is None:
            assert getattr(fused, key) is None, key
        else:
            assert_rel(getattr(fused, key), getattr(full, key), 1e-5, key)
    assert set(fused_grads) == set(full_grads)
    for name in full_grads:
        assert_rel(fused_grads[name], full_grads[name], 1e-5, name)


def test_no_supervised_token_gives_zero_loss_with_zero_gradient():
    model = AutoDecoModelForCausalLM.from_base(tiny_base("llama"), seed=0).train()
    inputs = batch()
    inputs["labels"][:] = IGNORE_INDEX
    out, grads = step(model, inputs, fused=True)
    assert float(out.loss.detach()) == 0.0 and all(float(g.abs().max()) == 0.0 for g in grads.values())


class _LargestVocabTensor(TorchDispatchMode):
    """Records the most rows of any new (non-view) tensor with last dimension V that an op produces."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.rows = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[-1] == self.vocab and \
                    t.untyped_storage().data_ptr() not in inputs:  # views (e.g. the weight's transpose) excluded
                self.rows = max(self.rows, t.numel() // self.vocab)
        return out


def test_forward_and_backward_never_hold_the_logits_of_a_sequence():
    model = AutoDecoModelForCausalLM.from_base(tiny_base("gemma2"), seed=0).train()
    model.fused_loss_chunk_rows = 4
    inputs = batch(rows=2, length=40)
    rows = {}
    for fused in (True, False):
        probe = _LargestVocabTensor(VOCAB)
        with probe:
            model(**inputs, fused_loss=fused).loss.backward()
        rows[fused] = probe.rows
    assert rows == {True: 4, False: 2 * 40}  # chunks of 4 rows; the full path holds [B, S, V] (the probe's control)


def test_an_unknown_logit_transform_fails_loudly():
    base = tiny_base("llama")
    base.config.logits_scaling = 2.0  # llama ignores it, so the fused loss would divide logits the base does not
    model = AutoDecoModelForCausalLM.from_base(base, seed=0).train()
    with pytest.raises(FusedLossError, match="differ from the base's own"):
        model(**batch(), fused_loss=True)
    model.llm.config.logits_scaling = None
    model(**batch(), fused_loss=True)


def test_bf16_base_matches_its_own_full_logits_path():
    model = AutoDecoModelForCausalLM.from_base(tiny_base("granite", dtype=torch.bfloat16), seed=0).train()
    model.fused_loss_chunk_rows = 6
    inputs = batch()
    full, full_grads = step(model, inputs, fused=False)
    fused, fused_grads = step(model, inputs, fused=True)
    for key in ("loss", "temperature_loss", "top_p_loss"):
        assert_rel(getattr(fused, key), getattr(full, key), 1e-5, key)
    for name in full_grads:
        assert_rel(fused_grads[name], full_grads[name], 1e-5, name)


def test_fused_forward_refuses_a_base_without_logits_to_keep():
    model = AutoDecoModelForCausalLM.from_base(tiny_base("llama"), seed=0)
    model._base_takes_logits_to_keep = False
    assert not supports_fused_loss(model)
    with pytest.raises(FusedLossError, match="logits_to_keep"):
        fused_forward(model, {"input_ids": batch()["input_ids"]}, batch()["labels"])


def test_under_autocast_the_chunk_logits_are_computed_as_the_base_computes_them():
    model = AutoDecoModelForCausalLM.from_base(tiny_base("gemma2"), seed=0).train()
    model.fused_loss_chunk_rows = 4
    inputs = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # Trainer bf16=True: the base's matmuls in bf16
        full, full_grads = step(model, inputs, fused=False)
        fused, fused_grads = step(model, inputs, fused=True)
    assert fused.temperature.dtype == torch.float32 and fused.top_p.dtype == torch.float32
    for key in ("loss", "temperature_loss", "top_p_loss"):
        assert_rel(getattr(fused, key), getattr(full, key), 1e-5, key)
    # bf16 logits from a [C, H] and a [S, H] matmul can round 1 bf16 ulp (0.4%) apart here and there: gradients
    # agree to that, not to float32 precision (in float32 they agree to 1e-5, tests above).
    for name in full_grads:
        assert_rel(fused_grads[name], full_grads[name], 2e-2, name)
