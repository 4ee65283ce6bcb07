"""autodeco: learned per-token temperature and top-p for any Hugging Face causal LM (AutoDeco, arXiv 2510.26697).

    >>> import autodeco
    >>> model = autodeco.AutoDecoModelForCausalLM.from_base("Qwen/Qwen2.5-0.5B")
    >>> model.generate(**inputs)   # samples with the heads' own T and P, token by token

Importing the package registers the "autodeco" model type with AutoConfig and AutoModelForCausalLM.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from autodeco.config import AutoDecoConfig
from autodeco.modeling import AutoDecoCausalLMOutput, AutoDecoGenerateOutput, AutoDecoModelForCausalLM
from autodeco.sampling import dynamic_logits

__version__ = "0.1.0"

AutoConfig.register("autodeco", AutoDecoConfig, exist_ok=True)
AutoModelForCausalLM.register(AutoDecoConfig, AutoDecoModelForCausalLM, exist_ok=True)

__all__ = [
    "AutoDecoConfig",
    "AutoDecoModelForCausalLM",
    "AutoDecoCausalLMOutput",
    "AutoDecoGenerateOutput",
    "dynamic_logits",
    "__version__",
]
