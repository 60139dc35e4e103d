"""Scene context for pre-training the tiny LM: the text of a scene behind a soft prefix.

A frozen LM reads soft image tokens only if it has learned to take content from its context.
Text-only pre-training on independent captions never teaches that: no caption of a random scene
is predictable from anything before it, so the LM ignores its context and a projector-only stage
(seed 002 stage0/1) cannot make it look at the image (docs/grounding.md has the measurements).
A real LM brings this ability from web-scale text; the tiny one gets it here: a share of its
pre-training sequences are ``[prefix | a text of the scene]`` (in the VLM's formats) where
the prefix holds ``side × side`` continuous tokens, one per image patch, each the mean input
embedding of the words that describe the grid cell the patch lies in (size, colour, texture,
shape, position; or the background). The words, not the image, fill the prefix: the LM never
sees a pixel.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from vlalign.data.text_formats import (
    IGNORE_INDEX,
    caption_target,
    conversation_ids,
    encode_text,
    qa_turns,
)
from vlalign.data.world import position_name
from vlalign.models.vlm import position_ids_from_mask


class SceneContextError(ValueError):
    """A row cannot give a scene prefix (no objects in its ``meta``)."""


def scene_texts(
    row: dict[str, Any], tok: PreTrainedTokenizerBase
) -> list[tuple[list[int], list[int]]]:
    """``(input_ids, labels)`` of every text of a normalised row in the VLM's own formats
    (``vlalign.data.text_formats``): recaption and captions as ``<bos> text <eos>``, QA and
    conversations as turns with the loss on the answers — what the VLM's stages supervise."""
    out = [caption_target(tok, c) for c in row["captions"] if c.strip()]
    if row["recaption"]:
        out.append(caption_target(tok, row["recaption"]))
    if row["qa"]:
        out.append(conversation_ids(tok, qa_turns(row["qa"])))
    if row["conversations"]:
        out.append(conversation_ids(tok, row["conversations"]))
    return out


def _word_ids(tok: PreTrainedTokenizerBase, words: Sequence[str]) -> list[int]:
    # with a leading space, as the words appear inside a sentence
    return [i for w in words for i in _one_word_ids(tok, w)]


@functools.lru_cache(maxsize=4096)
def _one_word_ids(tok: PreTrainedTokenizerBase, word: str) -> tuple[int, ...]:
    # a scene's few dozen words recur in every bag of every row
    return tuple(encode_text(tok, " " + word))


def scene_bags(meta: str, tok: PreTrainedTokenizerBase, side: int) -> list[list[int]]:
    """Per patch of a ``side × side`` patch grid (row-major): the token ids of the words that
    describe the scene cell it lies in."""
    scene = json.loads(meta) if meta else {}
    if not isinstance(scene.get("objects"), list):
        raise SceneContextError("row has no scene objects in its meta (synthetic world only)")
    grid = int(scene.get("grid", 3))
    cells = {}
    for o in scene["objects"]:
        texture = [] if o.get("texture", "plain") == "plain" else [o["texture"]]
        place = position_name(o["row"], o["col"], grid)
        words = [o["size"], o["colour"], *texture, o["shape"], place]
        cells[(o["row"], o["col"])] = _word_ids(tok, words)
    background = _word_ids(tok, [f"{scene.get('background', 'gray')} background"])
    return [
        cells.get((r * grid // side, c * grid // side), background)
        for r in range(side)
        for c in range(side)
    ]


Bags = tuple[torch.Tensor, torch.Tensor]  # token ids and mean weights, (side², width) each


def bag_tensors(bags: Sequence[Sequence[int]]) -> Bags:
    """One scene's bags as padded ``(ids, weights)``, the weights 1/len over each bag: built once
    per row, so a training step only stacks them."""
    width = max(len(b) for b in bags)
    ids = torch.zeros(len(bags), width, dtype=torch.long)
    weight = torch.zeros(len(bags), width)
    for i, b in enumerate(bags):
        ids[i, : len(b)] = torch.tensor(list(b))
        weight[i, : len(b)] = 1.0 / len(b)
    return ids, weight


def _stack(scenes: Sequence[Bags]) -> Bags:
    width = max(ids.shape[1] for ids, _ in scenes)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]))

    return (
        torch.stack([pad(ids) for ids, _ in scenes]),
        torch.stack([pad(w) for _, w in scenes]),
    )


def prefix_embeddings(
    embedding: nn.Embedding,
    scenes: Sequence[Bags],
    noise: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(B, side², H)``: each patch the mean embedding of its bag, plus Gaussian noise of
    relative norm ``noise`` (a projector never writes exact word embeddings)."""
    ids, weight = _stack(scenes)
    device = embedding.weight.device
    vecs = (embedding(ids.to(device)) * weight.to(device)[..., None]).sum(2)
    if noise > 0:
        scale = vecs.detach().norm(dim=-1).mean() / math.sqrt(vecs.shape[-1])
        vecs = vecs + noise * scale * torch.randn(vecs.shape, generator=generator).to(device)
    return vecs


def prefixed_batch(
    embedding: nn.Embedding,
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    bags: Sequence[Bags] | None = None,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """LM inputs (``inputs_embeds``, ``attention_mask``, ``position_ids``, ``labels``) of
    right-padded ``(input_ids, labels)`` examples behind an optional scene prefix (one
    :func:`bag_tensors` per example); positions
    count prefix then text, as the VLM's image block then text."""
    device = embedding.weight.device
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (x, y) in enumerate(examples):
        ids[i, : len(x)] = torch.tensor(list(x))
        labels[i, : len(y)] = torch.tensor(list(y))
        mask[i, : len(x)] = 1
    embeds = embedding(ids.to(device))
    if bags is not None:
        pre = prefix_embeddings(embedding, bags, noise, generator)
        n = pre.shape[1]
        embeds = torch.cat([pre, embeds], dim=1)
        mask = torch.cat([mask.new_ones(len(examples), n), mask], dim=1)
        labels = torch.cat([labels.new_full((len(examples), n), IGNORE_INDEX), labels], dim=1)
    positions = position_ids_from_mask(mask)
    return {
        "inputs_embeds": embeds,
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
        "labels": labels.to(device),
    }


def supervised_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean next-token loss of a causal LM over the supervised positions of ``batch``, and their
    count. The head runs on those positions alone: with a small model the vocabulary projection
    of every prefix and prompt position is most of a step's cost."""
    labels = batch.pop("labels")
    hidden = model.get_decoder()(**batch).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    logits = model.get_output_embeddings()(hidden[keep])
    n = int(keep.sum())
    return torch.nn.functional.cross_entropy(logits.float(), targets[keep]), n
