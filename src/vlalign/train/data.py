"""Stage data: one normalised split → (image, input_ids, labels) examples, and their batches.

Text formats live in ``vlalign.data.text_formats`` (shared with generation, so training and
evaluation can never disagree on them).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import Dataset

from vlalign.data.text_formats import PLAIN, TextFormat, conversation_ids, qa_turns
from vlalign.train.features import FeatureCache

TEXT_KINDS = ("recaption", "captions", "conversations", "qa", "captions_qa")
# kinds whose text for a row changes with the epoch (the caption chosen; caption or QA)
EPOCH_KINDS = ("captions", "captions_qa")


CACHE_ROWS = 100_000  # splits up to this size keep their token ids in memory
# Processed images kept in memory, up to this many bytes: a stage reading images (no feature
# cache: the encoder was trained by an earlier stage) decodes and resizes each one once, not once
# per epoch (8 epochs of a PEFT stage on 192 images: its 17.6 s job took 16.3 s with it).
PIXEL_CACHE_BYTES = 512 * 2**20


class StageExamples(Dataset):
    """Examples of one split for one stage's ``text`` kind.

    ``captions`` picks one human caption per image and epoch (``set_epoch``), so an epoch sees
    each image once whatever the text kind: recaption and human-caption runs see the same images.
    ``captions_qa`` (multi-task: PETAL's captioning and VQA instructions in one stage) gives
    each image a human caption in one epoch and its QA pairs in the next, half of the images
    each way in every epoch.
    Images come from a frozen-feature cache when given, else through the image processor.
    ``text_format``: the instructions before each target (the stage's ``prompts``).
    """

    def __init__(
        self,
        split,
        tokenizer,
        text: str,
        max_length: int,
        processor=None,
        features: FeatureCache | None = None,
        split_name: str = "train",
        name: str = "dataset",
        text_format: TextFormat = PLAIN,
    ):
        if text not in TEXT_KINDS:
            raise ValueError(f"unknown text kind {text!r} (one of {TEXT_KINDS})")
        text_format.check(text)
        self.format = text_format
        if len(split) == 0:
            raise ValueError(f"{name}: split {split_name!r} is empty")
        if features is None and processor is None:
            raise ValueError("need an image processor or a feature cache")
        self.text, self.tok, self.max_length = text, tokenizer, max_length
        self.processor, self.name, self.split_name = processor, name, split_name
        self.rows = split.select_columns(
            ["image_id", "captions", "recaption", "qa", "conversations"]
        )
        self.images = split if features is None else None
        self.features = None
        if features is not None:
            features.check_ids(split_name, split["image_id"])
            self.features = features.split(split_name)
        self.epoch = 0
        self._pixels: dict[int, torch.Tensor] = {}
        self._pixel_bytes = 0
        # token ids are a function of (row, caption chosen): computed once, reused by every
        # epoch (12 epochs of stage1 tokenized each text 12 times); bounded for real datasets
        self._ids: dict[tuple[int, int], tuple[list[int], list[int]]] | None = (
            {} if len(split) <= CACHE_ROWS else None
        )

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.rows)

    def token_ids(self, i: int) -> tuple[list[int], list[int]]:
        if self._ids is None:
            return self._token_ids(i)
        key = (i, self.epoch if self.text in EPOCH_KINDS else 0)
        if key not in self._ids:
            self._ids[key] = self._token_ids(i)
        return self._ids[key]

    def _token_ids(self, i: int) -> tuple[list[int], list[int]]:
        row = self.rows[i]
        if self.text == "recaption":
            if not row["recaption"]:
                raise ValueError(f"{self.name}: image {row['image_id']} has no recaption")
            ids, labels = self.format.caption_ids(self.tok, row["recaption"])
        elif self.text == "captions" or (self.text == "captions_qa" and (i + self.epoch) % 2 == 0):
            caps = row["captions"]
            if not caps:
                raise ValueError(f"{self.name}: image {row['image_id']} has no captions")
            turn = i + self.epoch if self.text == "captions" else (i + self.epoch) // 2
            ids, labels = self.format.caption_ids(self.tok, caps[turn % len(caps)])
        elif self.text == "conversations":
            turns = row["conversations"]
            if not turns:
                raise ValueError(f"{self.name}: image {row['image_id']} has no conversation")
            ids, labels = conversation_ids(self.tok, turns)
        else:
            if not row["qa"]:
                raise ValueError(f"{self.name}: image {row['image_id']} has no qa pairs")
            ids, labels = conversation_ids(self.tok, qa_turns(row["qa"]), self.format)
        return ids[: self.max_length], labels[: self.max_length]

    def __getitem__(self, i: int) -> dict[str, Any]:
        ids, labels = self.token_ids(i)
        item: dict[str, Any] = {"input_ids": ids, "labels": labels}
        if self.features is not None:
            item["image_features"] = torch.from_numpy(self.features[i].copy())
        else:
            item["pixel_values"] = self.pixel_values(i)
        return item

    def pixel_values(self, i: int) -> torch.Tensor:
        """Image ``i`` through the processor; kept while under PIXEL_CACHE_BYTES (collate
        stacks it into a new tensor, so the kept one is never written to)."""
        if i in self._pixels:
            return self._pixels[i]
        image = self.images[i]["image"].convert("RGB")
        pixels = self.processor(images=[image], return_tensors="pt")["pixel_values"][0]
        if self._pixel_bytes + pixels.nbytes <= PIXEL_CACHE_BYTES:
            self._pixels[i] = pixels
            self._pixel_bytes += pixels.nbytes
        return pixels


def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad text; stack image features or pixels."""
    width = max(len(it["input_ids"]) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), -100, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for r, it in enumerate(items):
        n = len(it["input_ids"])
        ids[r, :n] = torch.tensor(it["input_ids"])
        labels[r, :n] = torch.tensor(it["labels"])
        mask[r, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    key = "image_features" if "image_features" in items[0] else "pixel_values"
    batch[key] = torch.stack([it[key] for it in items])
    return batch
