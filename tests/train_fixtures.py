"""Shared building blocks of the trainer tests (imported by test_train_loop / test_resume).

Not a conftest: test modules wrap :func:`tiny_assets` in their own fixture. The assets are
built with the project's real building blocks (synthetic world, BPE tokenizer, tiny SigLIP /
Qwen2 backbones briefly pre-trained on the world) and cached for the whole pytest process.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from vlalign.config import deep_merge
from vlalign.runs.settings import TRAIN_DEFAULTS

SPLITS = {"train": 96, "val": 16, "test": 16}
VISION_CFG = {
    "image_size": 64,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
}
LM_CFG = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
}
LM_PRETRAIN = {"steps": 150, "batch_size": 32, "lr": 3e-3, "max_length": 128}
VISION_PRETRAIN = {"steps": 30, "batch_size": 32, "lr": 1e-3}

# A small stage: 96 images / batch 16 = 6 optimizer steps per epoch.
TINY_STAGE: dict[str, Any] = {
    "dataset": "world",
    "text": "recaption",
    "mask": "prefix",
    "lr": {"vision": 0, "projector": 1e-3, "lm": 0},
    "batch_size": 16,
    "micro_batch_size": 16,
    "max_length": 96,
    "warmup_ratio": 0.1,
    "checkpoint_every": 10_000,
}


@dataclass(frozen=True)
class TinyAssets:
    root: Path
    data: Path  # save_dataset directory (train/val/test)
    tokenizer: Path
    vision: Path  # save_pretrained SigLIP vision model + image processor
    lm: Path  # save_pretrained Qwen2 LM + tokenizer


_CACHE: dict[bool, TinyAssets] = {}


def build_assets(root: Path, pretrain: bool = True) -> TinyAssets:
    """World (96/16/16), tokenizer (vocab 400), tiny backbones; pre-trained when ``pretrain``."""
    from vlalign.data.sources import save_dataset
    from vlalign.data.tokenizer import corpus_texts, save_tokenizer, train_tokenizer
    from vlalign.data.world import generate_world
    from vlalign.models import backbones as bb
    from vlalign.pretrain import lm as plm
    from vlalign.pretrain import vision as pvis

    torch.manual_seed(0)
    dsd = generate_world(None, domain="source", splits=SPLITS, seed=0)
    save_dataset(dsd, root / "data")
    tok = train_tokenizer(corpus_texts(dsd), 400)
    save_tokenizer(tok, root / "tokenizer")

    vision = bb.build_tiny_vision(VISION_CFG)
    processor = bb.make_image_processor(VISION_CFG["image_size"])
    lm = bb.build_tiny_lm(LM_CFG, tok)
    if pretrain:
        # the LM has to know the text for "stage0+1 beat an untrained projector" to mean much
        v_metrics = pvis.pretrain_vision(
            vision, processor, dsd, VISION_PRETRAIN, grid=3, max_objects=4, seed=0
        )
        lm_metrics = plm.pretrain_lm(lm, tok, [dsd], LM_PRETRAIN, seed=0)
    else:
        v_metrics = lm_metrics = {"pretrained_here": False}
    bb.save_backbone(vision.cpu(), root / "vision", v_metrics, extra=[processor])
    bb.save_backbone(lm.cpu(), root / "lm", lm_metrics, extra=[tok])
    return TinyAssets(root, root / "data", root / "tokenizer", root / "vision", root / "lm")


def tiny_assets(tmp_path_factory: pytest.TempPathFactory, pretrain: bool = True) -> TinyAssets:
    """Build once per pytest process (session-wide even when several modules ask for it)."""
    if pretrain not in _CACHE:
        root = tmp_path_factory.mktemp("train_assets_pt" if pretrain else "train_assets")
        _CACHE[pretrain] = build_assets(root, pretrain)
    return _CACHE[pretrain]


def stage_settings(**overrides: Any) -> dict[str, Any]:
    """Every setting a stage job receives: TRAIN_DEFAULTS < TINY_STAGE < ``overrides``."""
    return deep_merge(deep_merge(TRAIN_DEFAULTS, TINY_STAGE), overrides)


def stage_paths(
    assets: TinyAssets,
    root: Path,
    name: str,
    parent: Path | None = None,
    features: Path | None = None,
):
    from vlalign.train.loop import StagePaths

    return StagePaths(
        out=root / "stages" / name,
        checkpoint_dir=root / "checkpoints" / name,
        tokenizer=assets.tokenizer,
        vision=assets.vision,
        lm=assets.lm,
        data=assets.data,
        parent=parent,
        features=features,
    )


def train(
    assets: TinyAssets,
    root: Path,
    name: str,
    settings: dict[str, Any],
    *,
    seed: int = 0,
    parent: Path | None = None,
    features: Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """Run ``train_stage`` in-process, as ``vlalign train`` does; → (stage.json dict, out dir)."""
    from vlalign.methods.stage import peft_hook
    from vlalign.train.loop import train_stage

    paths = stage_paths(assets, root, name, parent, features)
    result = train_stage(
        settings, paths, name=name, stage_hash=f"test-{name}", seed=seed, peft_hook=peft_hook
    )
    return result, paths.out


def read_log(stage_dir: Path) -> list[dict[str, float]]:
    """``train_log.csv`` rows as floats."""
    with open(stage_dir / "train_log.csv", newline="") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def column(rows: list[dict[str, float]], key: str) -> list[float]:
    return [r[key] for r in rows]


def subprocess_env() -> dict[str, str]:
    """Environment of a ``python -m vlalign`` child: offline, one thread, quiet tqdm."""
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
    }
