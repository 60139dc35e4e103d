"""Padding-free packing (``train.packing``): several ``[image | text]`` samples in one LM row.

A micro-batch of S samples, laid out as usual as ``(S, L)`` rows ``[N image tokens | text,
right-padded]``, is re-laid out as ``(R, C)`` packed rows, R <= S and C <= L: each sample is a
*segment* of ``N + its text length`` positions, and segments are placed first-fit by
decreasing length into rows of capacity L (so a packed row is never wider than the padded one),
padding only at each row's end. Each segment gets its own position ids ``0 .. N + T_s - 1``
(what the padded row gives it), and the attention mask
(:func:`vlalign.models.masks.build_packed_attention_mask`) applies the stage's mask inside each
segment and nothing across segments. The LM runs on the packed rows; its last hidden states go
back to the padded layout, so the logits, the loss and everything after it are computed exactly
as for padded rows: the loss and gradients equal the padded forward's to float tolerance.

The layout is planned from the 2D mask alone (lengths), inside the forward, so it needs no
collate support and stage0 noise (drawn on the padded layout) is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackLayout:
    """Where each padded position goes.

    - ``index``: ``(R, C)`` flat index into the padded ``(S * L)`` positions; -1 = row padding.
    - ``position_ids``: ``(R, C)`` per-segment positions; row padding restarts at 0 (its own
      "segment", so HF's packed-sequence detection keeps it apart).
    - ``segment``: ``(R, C)`` the sample of each position; -1 = row padding.
    - ``is_image``: ``(R, C)`` True at image-token positions.
    - ``inverse``: ``(S * L,)`` flat packed position of each padded position; -1 = text padding.
    """

    index: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    is_image: torch.Tensor
    inverse: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.index.shape)  # type: ignore[return-value]

    def padding_fraction(self) -> float:
        return float((self.index < 0).float().mean())


def first_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins (lists of sample indices, each summing to <= ``capacity``) by first-fit decreasing;
    deterministic (ties by sample index)."""
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if lengths[i] > capacity:
            raise ValueError(f"sample {i}: length {lengths[i]} exceeds row capacity {capacity}")
        for b, free in enumerate(room):
            if lengths[i] <= free:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(capacity - lengths[i])
    return bins


def pack_layout(full_mask: torch.Tensor, n_img: int, capacity: int | None = None) -> PackLayout:
    """The packed layout of padded rows ``full_mask`` ``(S, L)`` (1 = real; the first ``n_img``
    positions of every row are its image, then its text, right-padded)."""
    n_rows, width = full_mask.shape
    capacity = width if capacity is None else capacity
    lengths = full_mask.long().sum(1).tolist()
    bins = first_fit(lengths, capacity)
    c = max(sum(lengths[i] for i in b) for b in bins)
    index = torch.full((len(bins), c), -1, dtype=torch.long)
    position = torch.zeros((len(bins), c), dtype=torch.long)
    segment = torch.full((len(bins), c), -1, dtype=torch.long)
    inverse = torch.full((n_rows * width,), -1, dtype=torch.long)
    for r, b in enumerate(bins):
        at = 0
        for i in b:
            n = lengths[i]
            src = torch.arange(i * width, i * width + n)
            index[r, at : at + n] = src
            position[r, at : at + n] = torch.arange(n)
            segment[r, at : at + n] = i
            inverse[src] = torch.arange(r * c + at, r * c + at + n)
            at += n
        position[r, at:] = torch.arange(c - at)
    is_image = (segment >= 0) & (position < n_img)
    device = full_mask.device
    return PackLayout(
        index.to(device),
        position.to(device),
        segment.to(device),
        is_image.to(device),
        inverse.to(device),
    )


def pack(x: torch.Tensor, layout: PackLayout) -> torch.Tensor:
    """``(S, L, ...)`` padded → ``(R, C, ...)`` packed (row padding: a copy of position 0)."""
    flat = x.reshape(-1, *x.shape[2:])
    return flat[layout.index.clamp_min(0)]


def unpack(y: torch.Tensor, layout: PackLayout, n_rows: int, width: int) -> torch.Tensor:
    """``(R, C, ...)`` packed → ``(S, L, ...)`` padded (text padding: a copy of position 0)."""
    flat = y.reshape(-1, *y.shape[2:])
    return flat[layout.inverse.clamp_min(0)].reshape(n_rows, width, *y.shape[2:])
