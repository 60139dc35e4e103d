"""Helpers shared by the test modules: one set of tiny backbone configs, one builder of a tiny
world (datasets + tokenizer + backbones) and the stage-training helpers of the trainer tests.

Imported as ``from helpers import ...`` (tests/ is on sys.path). Heavy libraries are imported
inside the functions: modules that build no model do not pay for them.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pytest
    from datasets import DatasetDict
    from transformers import PreTrainedTokenizerFast, Qwen2Config, SiglipVisionConfig

    from vlalign.train.loop import StagePaths

# ------------------------------------------------------------------------------ tiny configs
VOCAB = 400  # BPE vocabulary of every tokenizer trained on the world
# The backbones of the world-level tests. A test that needs other sizes derives them with
# vision_cfg(...) / lm_cfg(...) and says why at the call site.
VISION: Mapping[str, Any] = MappingProxyType({
    "image_size": 64,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
})
LM: Mapping[str, Any] = MappingProxyType({
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 512,
})
# Twice as wide (heads too): the override of the tests whose numbers need width 64.
WIDER: Mapping[str, Any] = MappingProxyType(
    {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
)
N_IMG = 16  # image tokens of vision_config(): (32 / 8) ** 2


def vision_cfg(**overrides: Any) -> dict[str, Any]:
    """A fresh copy of :data:`VISION` with ``overrides``."""
    return {**VISION, **overrides}


def lm_cfg(**overrides: Any) -> dict[str, Any]:
    """A fresh copy of :data:`LM` with ``overrides``."""
    return {**LM, **overrides}


# The model-level tests (no world, no tokenizer) spell width 64, vocabulary 64 and 16 image
# tokens in their shape and parameter-count assertions: WIDER, 2 vision layers, 32 px images.
# Factories, not shared objects: ``set_attn_implementation`` edits a config in place.
def vision_config(**overrides: Any) -> SiglipVisionConfig:
    from transformers import SiglipVisionConfig

    cfg = vision_cfg(image_size=32, num_hidden_layers=2, **WIDER)
    return SiglipVisionConfig(**{**cfg, **overrides})


def lm_config(**overrides: Any) -> Qwen2Config:
    from transformers import Qwen2Config

    # initializer_range 0.1 (not 0.02): with near-zero random weights every mask mode and
    # prefix variant would produce the same argmax tokens and comparisons would prove nothing.
    cfg = lm_cfg(vocab_size=64, num_key_value_heads=2, initializer_range=0.1, **WIDER)
    return Qwen2Config(**{**cfg, **overrides})


# ------------------------------------------------------------------------------ tiny world
def make_tokenizer(*datasets: DatasetDict) -> PreTrainedTokenizerFast:
    """The BPE tokenizer trained on every text of ``datasets``."""
    from vlalign.data.tokenizer import corpus_texts, train_tokenizer

    return train_tokenizer([t for dsd in datasets for t in corpus_texts(dsd)], VOCAB)


@dataclass
class TinyWorld:
    """What :func:`build_world` saved under ``root``, and the objects it saved."""

    root: Path
    data: dict[str, Path]  # dataset name → save_dataset dir (train/val/test)
    tokenizer: Path
    vision: Path  # SigLIP tower + image processor + metrics, as the backbone rule saves it
    lm: Path  # Qwen2 LM + tokenizer + metrics
    datasets: dict[str, DatasetDict] = field(repr=False)
    tok: PreTrainedTokenizerFast = field(repr=False)
    base: Path | None = None  # a first stage later stages follow (set by the tests)
    _n: int = field(default=0, repr=False)

    def stage_dir(self, label: str) -> Path:
        """A fresh numbered stage directory under ``root/stages``."""
        self._n += 1
        return self.root / "stages" / f"{self._n:02d}_{label}"


def build_world(
    root: Path,
    splits: Mapping[str, int],
    *,
    datasets: Mapping[str, str] = MappingProxyType({"world": "source"}),
    world_cfg: Mapping[str, Any] | None = None,
    vision: Mapping[str, Any] = VISION,
    lm: Mapping[str, Any] = LM,
    pretrain: tuple[Mapping[str, Any], Mapping[str, Any]] | None = None,
    seed: int = 0,
) -> TinyWorld:
    """Synthetic datasets (name → domain, generated with ``seed``; the first saved at
    ``root/data``, the others at ``root/data_<name>``), a BPE tokenizer on all of them and tiny
    SigLIP / Qwen2 backbones (initial weights of seed 0), pre-trained when ``pretrain`` gives
    (vision, LM) pre-training settings, saved exactly like the pipeline's backbone rule."""
    import torch

    from vlalign.data.sources import save_dataset
    from vlalign.data.tokenizer import save_tokenizer
    from vlalign.data.world import SCENE_DEFAULTS, generate_world
    from vlalign.models import backbones as bb
    from vlalign.pretrain import lm as plm
    from vlalign.pretrain import vision as pvis

    torch.manual_seed(seed)
    dsds: dict[str, DatasetDict] = {}
    data: dict[str, Path] = {}
    for i, (name, domain) in enumerate(datasets.items()):
        dsds[name] = generate_world(world_cfg, domain=domain, splits=splits, seed=seed)
        data[name] = root / ("data" if i == 0 else f"data_{name}")
        save_dataset(dsds[name], data[name])
    tok = make_tokenizer(*dsds.values())
    save_tokenizer(tok, root / "tokenizer")

    vision_model = bb.build_tiny_vision(dict(vision))
    processor = bb.make_image_processor(vision["image_size"])
    lm_model = bb.build_tiny_lm(dict(lm), tok)
    if pretrain:
        scene = {**SCENE_DEFAULTS, **(world_cfg or {})}
        v_metrics = pvis.pretrain_vision(
            vision_model, processor, next(iter(dsds.values())), dict(pretrain[0]),
            grid=scene["grid"], max_objects=scene["max_objects"], seed=0,
        )
        lm_metrics = plm.pretrain_lm(lm_model, tok, list(dsds.values()), dict(pretrain[1]), seed=0)
    else:
        v_metrics = lm_metrics = {"pretrained_here": False}
    bb.save_backbone(vision_model.cpu(), root / "vision", v_metrics, extra=[processor])
    bb.save_backbone(lm_model.cpu(), root / "lm", lm_metrics, extra=[tok])
    return TinyWorld(root, data, root / "tokenizer", root / "vision", root / "lm", dsds, tok)


# ------------------------------------------------------------------------------ trainer tests
# The world of the trainer tests: 96 images / batch 16 = 6 optimizer steps per epoch.
TRAIN_SPLITS = MappingProxyType({"train": 96, "val": 16, "test": 16})
# The LM has to know the text for "stage0+1 beat an untrained projector" to mean much: it is
# pre-trained, and WIDER so that 150 steps teach it the world.
TRAIN_LM = MappingProxyType(lm_cfg(**WIDER, num_key_value_heads=2))
LM_PRETRAIN = MappingProxyType({"steps": 150, "batch_size": 32, "lr": 3e-3, "max_length": 128})
VISION_PRETRAIN = MappingProxyType({"steps": 30, "batch_size": 32, "lr": 1e-3})

TINY_STAGE: Mapping[str, Any] = MappingProxyType({
    "dataset": "world",
    "text": "recaption",
    "mask": "prefix",
    "lr": {"vision": 0, "projector": 1e-3, "lm": 0},
    "batch_size": 16,
    "micro_batch_size": 16,
    "max_length": 96,
    "warmup_ratio": 0.1,
    "checkpoint_every": 10_000,
})

_CACHE: dict[bool, TinyWorld] = {}


def tiny_assets(tmp_path_factory: pytest.TempPathFactory, pretrain: bool = True) -> TinyWorld:
    """The trainer tests' world, built once per pytest process (even when several modules ask
    for it); backbones pre-trained when ``pretrain``."""
    if pretrain not in _CACHE:
        root = tmp_path_factory.mktemp("train_assets_pt" if pretrain else "train_assets")
        _CACHE[pretrain] = build_world(
            root, TRAIN_SPLITS, lm=TRAIN_LM,
            pretrain=(VISION_PRETRAIN, LM_PRETRAIN) if pretrain else None,
        )
    return _CACHE[pretrain]


def stage_settings(**overrides: Any) -> dict[str, Any]:
    """Every setting a stage job receives: TRAIN_DEFAULTS < TINY_STAGE < ``overrides``."""
    from vlalign.config import deep_merge
    from vlalign.runs.settings import TRAIN_DEFAULTS

    return deep_merge(deep_merge(TRAIN_DEFAULTS, dict(TINY_STAGE)), overrides)


def stage_paths(
    world: TinyWorld,
    root: Path,
    name: str,
    parent: Path | None = None,
    features: Path | None = None,
    dataset: str = "world",
) -> StagePaths:
    """The paths of stage ``name`` (``root/stages/<name>``) trained on ``world.data[dataset]``."""
    from vlalign.train.loop import StagePaths

    return StagePaths(
        out=root / "stages" / name,
        checkpoint_dir=root / "checkpoints" / name,
        tokenizer=world.tokenizer,
        vision=world.vision,
        lm=world.lm,
        data=world.data[dataset],
        parent=parent,
        features=features,
    )


def train(
    world: TinyWorld,
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

    paths = stage_paths(world, root, name, parent, features, dataset=settings["dataset"])
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
