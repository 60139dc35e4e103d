"""Which positions of an LM forward are image tokens: the one owner of that question.

A :class:`~vlalign.models.vlm.VisionLanguageModel` lays a sequence out as
``[K/V prefix: P positions, in the cache] [N image tokens] [text]`` and gives every LM forward
explicit position ids, so *position ids* identify the image, not the column of a tensor:

- ``VisionLanguageModel.forward``: ``position_ids_from_mask(full_mask, P)`` gives the image
  tokens positions ``P..P+N-1`` (the image block has no padding) and every text token a
  position ``>= P+N`` (right pads repeat the last real position, also ``>= P+N`` once one text
  token is real);
- cached generation (:mod:`vlalign.models.generation`) prefills the image at ``P..P+N-1``, then
  ``lm.generate`` derives the position ids from ``cumsum(attention_mask) - 1`` over
  ``[P+N-1 cached placeholders | left pads | last image token | prompt]``: the re-fed last image
  token gets ``P+N-1``, the prompt and each generated token ``>= P+N`` (the left pads get a
  filler position, they are masked out anyway).

A column index would differ between these paths (the cached steps see one column; left pads
shift the prompt), a position id does not. So the VLM records the first text position ``P+N``
on its LM before each LM call (:func:`set_image_end`, scoped by :func:`image_tokens`), and a
PEFT method that treats the modalities differently reads :func:`image_token_mask` from the
``position_ids`` of each LM forward (a forward pre-hook on the LM with ``with_kwargs=True``).
An LM forward outside the VLM (text-only scoring, a bare LM) has no recorded end: every token
is text.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

IMAGE_END_ATTR = "_vlalign_image_end"


def set_image_end(lm: nn.Module, end: int | None) -> None:
    """Record on ``lm`` the first text position ``end`` (= P + N) of its next forwards; positions
    ``< end`` are image tokens (or the K/V prefix, which no forward computes). None: no image
    (every token is text)."""
    if end is not None:
        if isinstance(end, bool) or int(end) != end or end < 0:
            raise ValueError(f"image end must be a position >= 0 or None, got {end!r}")
        end = int(end)
    # a plain attribute (nn.Module.__setattr__ keeps ints out of parameters and buffers)
    setattr(lm, IMAGE_END_ATTR, end)


def image_end(lm: nn.Module) -> int | None:
    """The end recorded by :func:`set_image_end` (None if none is)."""
    return getattr(lm, IMAGE_END_ATTR, None)


@contextmanager
def image_tokens(lm: nn.Module, end: int | None) -> Iterator[None]:
    """:func:`set_image_end` for the LM calls inside the ``with`` block; the previous value is
    restored afterwards, so a later LM call outside a VLM forward sees no image."""
    previous = image_end(lm)
    set_image_end(lm, end)
    try:
        yield
    finally:
        set_image_end(lm, previous)


def image_token_mask(lm: nn.Module, position_ids: torch.Tensor | None) -> torch.Tensor | None:
    """``(B, T)`` bool mask, True at the image tokens of a forward with ``position_ids`` (the
    LM's ``position_ids`` keyword argument): ``position_ids < end``. None when no end is recorded
    or the forward has no explicit position ids: then every token is text."""
    end = image_end(lm)
    if end is None or position_ids is None:
        return None
    return position_ids < end
