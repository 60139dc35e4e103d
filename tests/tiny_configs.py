"""Configs of the tiny SigLIP / Qwen2 models the model-level tests build from scratch.

Factories, not shared objects: ``set_attn_implementation`` edits a config in place, so every
test module takes its own copy.
"""

from __future__ import annotations

from transformers import Qwen2Config, SiglipVisionConfig

N_IMG = 16  # (32 / 8) ** 2 patch tokens


def vision_config() -> SiglipVisionConfig:
    return SiglipVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
    )


def lm_config() -> Qwen2Config:
    # initializer_range 0.1 (not 0.02): with near-zero random weights every mask mode and
    # prefix variant would produce the same argmax tokens and comparisons would prove nothing.
    return Qwen2Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.1,
    )
