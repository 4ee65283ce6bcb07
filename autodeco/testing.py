"""Tiny random-initialised causal LMs and a local character tokenizer: no downloads, seconds to build.

Used by the test suite, the benchmarks and the quick start (before the demo model exists):

    >>> from autodeco.testing import save_tiny_base
    >>> save_tiny_base("runs/tiny-base", arch="llama")     # a random tiny base + tokenizer (CLI: autodeco tiny-base)

Every architecture is a standard transformers config with small sizes; weights are random (seeded), so the
text is gibberish but every code path (cache, padding, tied embeddings, MoE routing) is real.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)
CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " \n"
# Minimal ChatML-style template so chat code paths (data, prompts) have something real to render.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)

TINY_ARCHITECTURES = {
    "llama": dict(model_type="llama", num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", num_key_value_heads=2),
    "qwen3": dict(model_type="qwen3", num_key_value_heads=2, head_dim=16),
    "qwen3_moe": dict(
        model_type="qwen3_moe", num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=32, decoder_sparse_step=1,
    ),
    "mistral": dict(model_type="mistral", num_key_value_heads=2, sliding_window=None),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=256),
    # Issue 12: the rest of the architectures the AutoDeco paper used or that stress the logits path.
    "gpt_oss": dict(
        model_type="gpt_oss", num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
    "mixtral": dict(model_type="mixtral", num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2),
    "deepseek_v3": dict(
        model_type="deepseek_v3", num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, head_dim=8, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=2, topk_group=1, moe_intermediate_size=32, first_k_dense_replace=1,
    ),
    # Final logit soft-capping: the dynamic logits must come from the capped logits.
    "gemma2": dict(
        model_type="gemma2", num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=3.0,
    ),
    # Logit scaling: logits = lm_head(h) / logits_scaling.
    "granite": dict(model_type="granite", num_key_value_heads=2, logits_scaling=4.0),
    "phi3": dict(model_type="phi3", num_key_value_heads=2),
    "olmo2": dict(model_type="olmo2", num_key_value_heads=2),
}


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer: 4 special tokens, then one id per printable ASCII character."""
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in CHARACTERS:
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(arch: str = "llama", vocab_size: int | None = None, tie_word_embeddings: bool = False):
    """A small config of a standard architecture (hidden 64, 2 layers) matching the char tokenizer."""
    if arch not in TINY_ARCHITECTURES:
        raise ValueError(f"Unknown tiny architecture '{arch}'; choose one of {sorted(TINY_ARCHITECTURES)}.")
    vocab_size = vocab_size or len(build_char_tokenizer())
    spec = dict(TINY_ARCHITECTURES[arch])
    model_type = spec.pop("model_type")
    common = dict(vocab_size=vocab_size, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
                  tie_word_embeddings=tie_word_embeddings)
    if model_type != "gpt2":
        common.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      max_position_embeddings=256)
    return AutoConfig.for_model(model_type, **common, **spec)


def build_tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32, **config_kwargs) -> PreTrainedModel:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **config_kwargs), dtype=dtype)
    return model.eval()


def save_tiny_base(output_dir: str | Path, arch: str = "llama", seed: int = 0, **config_kwargs) -> Path:
    """Write a random tiny base and its tokenizer to `output_dir` (loadable with from_pretrained)."""
    output_dir = Path(output_dir)
    build_tiny_model(arch, seed, **config_kwargs).save_pretrained(output_dir)
    build_char_tokenizer().save_pretrained(output_dir)
    return output_dir
