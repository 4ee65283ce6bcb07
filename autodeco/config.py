"""AutoDecoConfig: what an AutoDeco model is made of, saved as `config.json` beside the heads.

It records the base model (its name or path, and a copy of its config, so a directory can be checked and a
merged directory rebuilt without the base at hand), the heads' shape, and the training options that the
losses read. `model_type = "autodeco"`, registered with `AutoConfig` on `import autodeco`.

    >>> from autodeco import AutoDecoConfig
    >>> AutoDecoConfig(base_model_name_or_path="Qwen/Qwen2.5-0.5B", hidden_size=896)
"""

from __future__ import annotations

from transformers import AutoConfig, PretrainedConfig

try:  # transformers >= 5.20 declares composite configs with SubConfigSpec
    from transformers.configuration_utils import SubConfigSpec
except ImportError:  # transformers 5.16.1 - 5.19 (what vLLM 0.32 pins): the older `sub_configs` mapping
    SubConfigSpec = None

# The label value PyTorch's cross-entropy (and every Hugging Face causal LM) ignores: a position that is not
# supervised. The one definition; everything in autodeco imports it from here.
IGNORE_INDEX = -100

# How the top-p head's statistics are computed (issue 12): ours, or as the official AutoDeco code does.
FEATURE_ARITHMETICS = ("exact", "official")


class AutoDecoConfig(PretrainedConfig):
    """Configuration of AutoDeco heads on a base causal LM.

    Fields:
        base_model_name_or_path: hub name or local path the heads were built on; heads-only directories load
            the base from here.
        base_config: the base model's config (a dict or config), kept so the wrapper can describe its layers
            to `generate` (cache, vocabulary) and merged directories can rebuild the base.
        hidden_size: the heads' input size; must equal the base's hidden size.
        head_hidden_size: hidden width of each head's MLP (the paper: 256).
        max_temperature: T = max_temperature * sigmoid(...) (the paper: 2.0).
        top_p_features: the top-p head also sees max prob, entropy, variance and top-5 mass of softmax(z / T).
        train_temperature / train_top_p: which heads' losses are enabled in training.
        soft_top_p_alpha: steepness of the soft top-p mask exp(-alpha * relu(c - P)) (the paper: 30).
        easy_token_mask_ratio: share of easy tokens (base argmax == label) dropped from the temperature loss.
        dft: weight each token's loss by the base model's detached probability of the label.
        feature_arithmetic: how the top-p head's distribution statistics are computed, at inference and in
            training: "exact" (ours) or "official" (the official code's eps-shifted softmax and entropy; set when
            an official checkpoint is loaded, because its heads were trained on those features). Issue 12.
        soft_top_p_official_log: the soft top-p loss takes the official log(p~ + 1e-9) instead of the exact log
            (off by default; only for reproducing the official training). Issue 12.
    """

    model_type = "autodeco"
    _BASE_IMPLEMENTATION_ATTRS = ("_attn_implementation_internal", "_experts_implementation_internal")
    if SubConfigSpec is not None:
        sub_configs_defaults = {"base_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", optional=True)}
    else:  # < 5.20: __post_init__ below turns a dict base_config into a config itself
        sub_configs = {"base_config": AutoConfig}

    base_config: dict | PretrainedConfig | None = None
    base_model_name_or_path: str | None = None
    hidden_size: int | None = None
    head_hidden_size: int = 256
    max_temperature: float = 2.0
    top_p_features: bool = True
    train_temperature: bool = True
    train_top_p: bool = True
    soft_top_p_alpha: float = 30.0
    easy_token_mask_ratio: float = 0.6
    dft: bool = True
    # Issue 12 (official checkpoints): see autodeco/official.py and docs/checkpoints.md.
    feature_arithmetic: str = "exact"
    soft_top_p_official_log: bool = False

    def __post_init__(self, **kwargs):
        if SubConfigSpec is None and isinstance(self.base_config, dict):
            # What SubConfigSpec(AutoConfig, model_type="llama") does on transformers >= 5.20.
            fields = dict(self.base_config)
            self.base_config = AutoConfig.for_model(fields.pop("model_type", "llama"), **fields)
        # The parent pushes its own (unset) attention/experts implementation down into sub-configs; a loaded
        # base already chose its own, which must survive being wrapped.
        base = self.base_config if isinstance(self.base_config, PretrainedConfig) else None
        kept = {a: getattr(base, a, None) for a in self._BASE_IMPLEMENTATION_ATTRS} if base is not None else {}
        super().__post_init__(**kwargs)
        for attr, value in kept.items():
            if value is not None:
                setattr(self.base_config, attr, value)
        if self.hidden_size is None and self.base_config is not None:
            self.hidden_size = self.base_config.get_text_config(decoder=True).hidden_size
        self._validate()

    def _validate(self) -> None:
        def fail(field: str, fix: str):
            raise ValueError(f"AutoDecoConfig.{field} = {getattr(self, field)!r} is invalid: {fix}")

        if self.hidden_size is not None and (not isinstance(self.hidden_size, int) or self.hidden_size <= 0):
            fail("hidden_size", "it must be the base model's hidden size, a positive integer.")
        if not isinstance(self.head_hidden_size, int) or self.head_hidden_size <= 0:
            fail("head_hidden_size", "use a positive integer (the paper uses 256).")
        if not self.max_temperature > 0:
            fail("max_temperature", "use a positive number (the paper uses 2.0).")
        if not self.soft_top_p_alpha > 0:
            fail("soft_top_p_alpha", "use a positive number (the paper uses 30).")
        if not 0.0 <= self.easy_token_mask_ratio <= 1.0:
            fail("easy_token_mask_ratio", "use a share in [0, 1] (the paper uses 0.6).")
        if self.feature_arithmetic not in FEATURE_ARITHMETICS:
            fail("feature_arithmetic", f"use one of {FEATURE_ARITHMETICS} ('official' for heads trained by the official code).")

    def get_text_config(self, decoder=None, encoder=None) -> PretrainedConfig:
        # The wrapper generates with the base's layers, so cache and vocabulary questions go to the base.
        if self.base_config is None:
            return super().get_text_config(decoder=decoder, encoder=encoder)
        return self.base_config.get_text_config(decoder=decoder, encoder=encoder)
