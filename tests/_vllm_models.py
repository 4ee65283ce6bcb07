"""Tiny random AutoDeco models for the vLLM tests and benchmark: vLLM's CPU attention needs head_dim 64.

Heads are randomised (not the fresh T = 1, P = 0.95 constants) so T and P vary from token to token and the
nucleus actually cuts: a test that passes with constant heads would prove little.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from autodeco import AutoDecoModelForCausalLM
from autodeco.testing import BOS_ID, EOS_ID, PAD_ID, build_char_tokenizer

# Per architecture: the config fields beyond the shared small shape (hidden 128 = 2 heads x head_dim 64).
ARCHS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"]),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"]),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"]),
    "qwen3_moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1),
    "gpt_oss": dict(model_type="gpt_oss", architectures=["GptOssForCausalLM"], num_local_experts=4,
                    num_experts_per_tok=2, sliding_window=32, layer_types=["sliding_attention", "full_attention"]),
}


def tiny_base_config(arch: str, vocab_size: int, **overrides):
    spec = dict(ARCHS[arch])
    model_type = spec.pop("model_type")
    fields = dict(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                  bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False)
    fields.update(spec)
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


def randomise_heads(model: AutoDecoModelForCausalLM, seed: int = 0, scale: float = 1.0) -> None:
    """Give the heads' output layers random weights so T and P vary per token (T around 1, P around 0.6-0.95)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for head in (model.temperature_head, model.top_p_head):
            last = head.mlp[2]
            last.weight.copy_(torch.randn(last.weight.shape, generator=g) * scale / last.weight.shape[1] ** 0.5)


def build_autodeco(directory, arch: str = "llama", seed: int = 0, layout: str = "merged", logit_scale: float = 6.0,
                   **overrides) -> Path:
    """Write a tiny random base + randomised heads to `directory` (merged layout, or heads-only + <dir>-base/).

    The output embedding is scaled by `logit_scale` so the random base's distributions are peaked like a real
    LM's (a near-uniform one would put almost every token in every nucleus)."""
    directory = Path(directory)
    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_config(tiny_base_config(arch, len(tokenizer), **overrides), dtype=torch.float32)
    base.eval()
    with torch.no_grad():
        base.get_output_embeddings().weight.mul_(logit_scale)
    base_dir = directory.parent / f"{directory.name}-base"
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    model = AutoDecoModelForCausalLM.from_base(str(base_dir), seed=seed)
    randomise_heads(model, seed)
    if layout == "merged":
        model.merge(directory)
    else:
        model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
