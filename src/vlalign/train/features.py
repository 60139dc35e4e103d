"""Frozen-feature cache: every image encoded once by the frozen vision encoder.

Stored per split as ``<split>.npy`` (``(n_images, n_tokens, d_vision)``, memory-mapped on read)
plus ``index.json`` with the image ids in row order. The directory name is the feature key
(hash of encoder, preprocessing and dataset, see ``vlalign.runs.plan.feature_key``), so every
run that freezes the same encoder on the same data shares one cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from datasets import load_from_disk
from tqdm.auto import tqdm

from vlalign.io_utils import atomic_path
from vlalign.models.backbones import default_device, load_image_processor, load_vision

INDEX = "index.json"


@torch.no_grad()
def build_feature_cache(
    vision_dir: str | Path,
    data_dir: str | Path,
    out: str | Path,
    batch_size: int = 64,
    dtype: str = "float32",
) -> dict:
    device = default_device()
    model = load_vision(vision_dir).to(device).eval()
    processor = load_image_processor(vision_dir)
    dsd = load_from_disk(str(data_dir))
    index = {"vision": str(vision_dir), "data": str(data_dir), "dtype": dtype, "splits": {}}
    with atomic_path(out, is_dir=True) as tmp:
        for split, ds in dsd.items():
            if len(ds) == 0:
                continue
            arr = None
            for start in tqdm(
                range(0, len(ds), batch_size), desc=f"features {split}", mininterval=2
            ):
                rows = ds[start : start + batch_size]
                pixels = processor(
                    images=[im.convert("RGB") for im in rows["image"]], return_tensors="pt"
                )["pixel_values"]
                feats = model(pixel_values=pixels.to(device)).last_hidden_state.float().cpu()
                if arr is None:  # shape known after the first batch
                    arr = np.lib.format.open_memmap(
                        tmp / f"{split}.npy",
                        mode="w+",
                        dtype=dtype,
                        shape=(len(ds), *feats.shape[1:]),
                    )
                arr[start : start + len(feats)] = feats.numpy().astype(dtype)
            arr.flush()
            index["splits"][split] = {
                "n": len(ds),
                "image_ids": list(ds["image_id"]),
                "shape": list(arr.shape),
            }
            del arr
        (tmp / INDEX).write_text(json.dumps(index) + "\n")
    return index


class FeatureCache:
    """Read side: ``cache[split][row]`` → ``(n_tokens, d_vision)`` array."""

    def __init__(self, directory: str | Path):
        self.dir = Path(directory)
        index_path = self.dir / INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{self.dir}: not a feature cache (no {INDEX})")
        self.index = json.loads(index_path.read_text())
        self._arrays: dict[str, np.ndarray] = {}

    def split(self, split: str) -> np.ndarray:
        if split not in self.index["splits"]:
            raise KeyError(f"{self.dir}: no features for split {split!r}")
        if split not in self._arrays:
            self._arrays[split] = np.load(self.dir / f"{split}.npy", mmap_mode="r")
        return self._arrays[split]

    def check_ids(self, split: str, image_ids: list[str]) -> None:
        """The cache must be row-aligned with the dataset it is used with."""
        if self.index["splits"][split]["image_ids"] != list(image_ids):
            raise ValueError(
                f"{self.dir}: cached image ids of split {split!r} do not match the dataset"
            )
