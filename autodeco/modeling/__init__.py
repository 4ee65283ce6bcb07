"""AutoDecoModelForCausalLM and what it is made of.

    >>> from autodeco.modeling import AutoDecoModelForCausalLM, HEADS_WEIGHTS_NAME

model.py: the class (construction, heads, forward, losses); generation.py: decoding modes, generate and its
traces; io.py: save/load/merge/split, model sources, tokenizers, dtypes; teacher_forcing.py: the heads' T and
P at given completion tokens. See docs/training.md and docs/engines.md.
"""

from autodeco.modeling.generation import (
    STATIC_SAMPLING_KWARGS,
    AutoDecoGenerateOutput,
    NonFiniteHeadsError,
    autodeco_generation_config,
)
from autodeco.modeling.io import (
    DTYPE_NAMES,
    DTYPES,
    HEAD_MODULES,
    HEADS_WEIGHTS_NAME,
    HUB_KWARGS,
    MERGED_WEIGHTS_NAMES,
    check_model_source,
    copy_tokenizer,
    load_tokenizer,
    looks_like_hub_id,
    resolve_dtype,
)
from autodeco.modeling.model import STATS_CHUNK_ROWS, AutoDecoCausalLMOutput, AutoDecoModelForCausalLM
from autodeco.modeling.teacher_forcing import TeacherForced, teacher_forced

__all__ = [
    "AutoDecoModelForCausalLM",
    "AutoDecoCausalLMOutput",
    "AutoDecoGenerateOutput",
    "NonFiniteHeadsError",
    "HEADS_WEIGHTS_NAME",
    "MERGED_WEIGHTS_NAMES",
    "HEAD_MODULES",
    "HUB_KWARGS",
    "STATS_CHUNK_ROWS",
    "STATIC_SAMPLING_KWARGS",
    "DTYPES",
    "DTYPE_NAMES",
    "autodeco_generation_config",
    "check_model_source",
    "looks_like_hub_id",
    "load_tokenizer",
    "copy_tokenizer",
    "resolve_dtype",
    "TeacherForced",
    "teacher_forced",
]
