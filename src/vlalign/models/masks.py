"""Attention masks for ``[image tokens | text tokens]`` sequences (seed 002 §3.2, Fig. 3).

| mode            | image→image | image→text | text→image | text→text |
|-----------------|-------------|------------|------------|-----------|
| ``causal``      | causal      | no         | yes        | causal    |
| ``prefix``      | all         | no         | yes        | causal    |
| ``bidirectional``| all        | all        | all        | all       |

Padding keys are masked in every mode. The image block is assumed to precede the text (the VLM
layout), which is what makes "image never sees text" hold under ``prefix``.

Why not a hand-made bool 4D mask: eager attention computes ``scores + mask`` and silently treats
a bool mask as 0/1 (see the transformers-5 notes). ``create_causal_mask`` returns the right type
for whatever ``attn_implementation`` is active (float additive for eager, bool for sdpa, BlockMask
for flex). ``block_sequence_ids`` gives the same mask as an ``or_mask_function`` but without
vmap (≈6× cheaper); ids are in ABSOLUTE kv coordinates, so a KV prefix of length P gets P
leading ``-1`` entries. ``allow_is_causal_skip=False`` guarantees a materialised mask: a ``None``
mask on sdpa would mean *causal*, which is wrong for ``bidirectional``.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask

MASK_MODES = ("causal", "prefix", "bidirectional")


def check_mode(mode: str) -> str:
    if mode not in MASK_MODES:
        raise ValueError(f"unknown mask mode {mode!r}; expected one of {MASK_MODES}")
    return mode


def prefix_length(past_key_values: Cache | None) -> int:
    """Number of cached (prefix) positions every query may attend to."""
    return 0 if past_key_values is None else int(past_key_values.get_seq_length())


def build_attention_mask(
    lm_config,
    inputs_embeds: torch.Tensor,
    attention_mask_2d: torch.Tensor,
    is_image: torch.Tensor,
    mode: str,
    past_key_values: Cache | None = None,
    materialize: bool = False,
) -> torch.Tensor | dict:
    """The ``attention_mask=`` for one HF decoder-LM forward over ``inputs_embeds``.

    Args:
        lm_config: the LM config (its ``_attn_implementation`` decides the mask type).
        inputs_embeds: ``(B, L, H)`` the current (uncached) input embeddings.
        attention_mask_2d: ``(B, L)`` 1 = real token, 0 = padding, for the current positions only.
        is_image: ``(B, L)`` bool, True at image-token positions.
        mode: one of :data:`MASK_MODES`.
        past_key_values: a cache holding P positions (e.g. a prefix-tuning K/V prefix) that every
            query may attend to; the mask then has ``P + L`` kv columns, the first P visible.
        materialize: for ``causal``, return a 4D mask instead of the 2D fast path.

    Returns:
        ``causal`` (not materialised): the 2D padding mask ``(B, P + L)``; the LM builds the causal
        mask itself (sdpa ``is_causal`` fast path when there is no padding). Otherwise a 4D mask
        ``(B, 1, L, P + L)``: float additive (0 / finfo.min) on eager, bool on sdpa.
    """
    check_mode(mode)
    if attention_mask_2d.dim() != 2 or is_image.shape != attention_mask_2d.shape:
        raise ValueError(
            f"attention_mask_2d {tuple(attention_mask_2d.shape)} and is_image "
            f"{tuple(is_image.shape)} must both be (B, L)"
        )
    if inputs_embeds.shape[:2] != attention_mask_2d.shape:
        raise ValueError(
            f"inputs_embeds {tuple(inputs_embeds.shape)} does not match attention_mask_2d "
            f"{tuple(attention_mask_2d.shape)} in (B, L)"
        )
    _check_full_attention(lm_config)

    batch = attention_mask_2d.shape[0]
    p = prefix_length(past_key_values)
    mask2d = attention_mask_2d.to(device=inputs_embeds.device, dtype=torch.long)
    if p:
        mask2d = torch.cat([mask2d.new_ones(batch, p), mask2d], dim=1)
    if mode == "causal" and not materialize:
        return mask2d

    is_image = is_image.to(device=inputs_embeds.device, dtype=torch.bool)
    if mode == "causal":
        block = torch.full_like(is_image, -1, dtype=torch.long)
    elif mode == "prefix":
        block = torch.where(is_image, 0, -1)
    else:  # bidirectional: one block spanning every current position
        block = torch.zeros_like(is_image, dtype=torch.long)
    if p:  # absolute kv coordinates: prefix columns are plain causal (= visible to every query)
        block = torch.cat([block.new_full((batch, p), -1), block], dim=1)
    return create_causal_mask(
        config=lm_config,
        inputs_embeds=inputs_embeds,
        attention_mask=mask2d,
        past_key_values=past_key_values if p else None,
        block_sequence_ids=None if mode == "causal" else block,
        allow_is_causal_skip=False,
    )


def _check_full_attention(lm_config) -> None:
    layer_types = set(getattr(lm_config, "layer_types", None) or ["full_attention"])
    if layer_types != {"full_attention"}:
        raise NotImplementedError(
            f"LM layer types {sorted(layer_types)}: only full-attention LMs are supported "
            "(sliding-window layers would need a per-layer-type mask dict)"
        )


def build_packed_attention_mask(
    lm_config,
    inputs_embeds: torch.Tensor,
    segment: torch.Tensor,
    is_image: torch.Tensor,
    position_ids: torch.Tensor,
    mode: str,
) -> torch.Tensor:
    """The 4D ``attention_mask=`` of packed rows (:mod:`vlalign.models.packing`): ``mode``
    inside each segment, nothing across segments.

    ``segment`` ``(R, C)``: the sample of each position (-1 = row padding); ``position_ids``
    restart at 0 at each segment and at the row padding. Built by ``create_causal_mask`` as the
    padded masks are (so the mask type follows ``attn_implementation``): without a 2D mask it
    detects the segments from ``position_ids`` (HF's packed-sequence path: causal within a
    segment, never across), and ``block_sequence_ids`` — the segment's id on its image block
    (``prefix``) or on all its positions (``bidirectional``) — opens the bidirectional blocks.
    Row padding is a segment of its own, attended by nothing real. No K/V prefix."""
    check_mode(mode)
    _check_full_attention(lm_config)
    if not (segment.shape == is_image.shape == position_ids.shape == inputs_embeds.shape[:2]):
        raise ValueError(
            f"segment {tuple(segment.shape)}, is_image {tuple(is_image.shape)}, position_ids "
            f"{tuple(position_ids.shape)} and inputs_embeds {tuple(inputs_embeds.shape)} must "
            "agree in (R, C)"
        )
    device = inputs_embeds.device
    segment = segment.to(device)
    if mode == "causal":
        block = None
    elif mode == "prefix":
        block = torch.where(is_image.to(device), segment, -1)
    else:
        block = segment
    return create_causal_mask(
        config=lm_config,
        inputs_embeds=inputs_embeds,
        attention_mask=None,
        past_key_values=None,
        position_ids=position_ids.to(device),
        block_sequence_ids=block,
        allow_is_causal_skip=False,
    )


def reference_mask(
    attention_mask_2d: torch.Tensor, is_image: torch.Tensor, mode: str, prefix_len: int = 0
) -> torch.Tensor:
    """Plain-tensor bool mask ``(B, 1, L, P + L)`` (True = may attend), written straight from the
    table of seed 002 Fig. 3. Used by tests and for inspection; do not pass it to an eager model."""
    check_mode(mode)
    batch, length = attention_mask_2d.shape
    q = torch.arange(length)[:, None]
    kv = torch.arange(length)[None, :]
    img = is_image.bool().cpu()
    img_q, img_kv = img[:, :, None], img[:, None, :]
    causal = (kv <= q)[None]
    if mode == "causal":
        allowed = causal.expand(batch, -1, -1)
    elif mode == "prefix":
        allowed = (img_q & img_kv) | (~img_q & causal)  # image sees only image; text is causal
    else:
        allowed = torch.ones(batch, length, length, dtype=torch.bool)
    allowed = allowed & attention_mask_2d.bool().cpu()[:, None, :]
    if prefix_len:
        allowed = torch.cat([torch.ones(batch, length, prefix_len, dtype=torch.bool), allowed], 2)
    return allowed[:, None]
