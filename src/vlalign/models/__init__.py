"""VLM building blocks: projectors, stage attention masks, stage0 noise, the VLM and generation.

Backbone builders/pre-training live in ``vlalign.models.backbones``.
"""

from vlalign.models.generation import generate
from vlalign.models.masks import MASK_MODES, build_attention_mask
from vlalign.models.noise import corrupt_tokens
from vlalign.models.projector import (
    DEFAULT_PROJECTOR,
    PROJECTORS,
    build_projector,
    load_projector,
    save_projector,
)
from vlalign.models.vlm import VisionLanguageModel, VLMOutput

__all__ = [
    "DEFAULT_PROJECTOR",
    "MASK_MODES",
    "PROJECTORS",
    "VLMOutput",
    "VisionLanguageModel",
    "build_attention_mask",
    "build_projector",
    "corrupt_tokens",
    "generate",
    "load_projector",
    "save_projector",
]
