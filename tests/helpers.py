"""Helpers shared by the test modules: one set of tiny backbone configs, one builder of a tiny
world (datasets + tokenizer + backbones), the stage-training helpers of the trainer tests and a
realistic results tree (results DB, tables and plots tests).

Imported as ``from helpers import ...`` (tests/ is on sys.path). Heavy libraries are imported
inside the functions: modules that build no model do not pay for them.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import numpy as np

from vlalign.io_utils import stable_hash

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


# ------------------------------------------------------------------------------ results tree
# Hand-written result files in the formats of docs/outputs.md (results DB, tables, plots).
CAPTION_METRICS = ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]


def write_json(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def write_stage(
    results: Path,
    stage: str,
    key: dict,
    rng: np.random.Generator,
    steps: int,
    start_loss: float,
    decay: float,
) -> str:
    """One trained stage dir with a realistic train_log.csv; returns its hash."""
    h = stable_hash({"stage": stage, **key})
    d = results / "stages" / h
    d.mkdir(parents=True, exist_ok=True)
    lines = ["step,loss,lr,grad_norm,tokens_per_s,samples_per_s"]
    for step in range(1, steps + 1):
        loss = start_loss * np.exp(-decay * step) + 0.5 + 0.05 * rng.standard_normal()
        lr = 1e-3 * 0.5 * (1 + np.cos(np.pi * step / steps))
        lines.append(
            f"{step},{loss:.5f},{lr:.3e},{rng.uniform(0.5, 3):.4f},"
            f"{rng.uniform(9000, 11000):.1f},{rng.uniform(30, 40):.2f}"
        )
    (d / "train_log.csv").write_text("\n".join(lines) + "\n")
    write_json(d / "stage.json", {"stage": stage, "hash": h})
    return h


def write_run(
    results: Path,
    run: str,
    seed: int,
    chain: list[tuple[str, str]],
    config: dict,
    recipe: str = "default",
    grid: str | None = None,
    method_order: str | None = None,
    prefix_length: int | None = None,
) -> None:
    """A run.json as the evaluate rule writes it (record_version 2, docs/outputs.md)."""
    write_json(
        results / "runs" / run / "run.json",
        {
            "record_version": 2,
            "run": run,
            "base_run": run.removesuffix(f"_s{seed}"),
            "grid": grid,
            "method_order": method_order,
            "prefix_length": prefix_length,
            "recipe": recipe,
            "seed": seed,
            "chain": [{"stage": s, "hash": h, "dir": f"results/stages/{h}"} for s, h in chain],
            "config": config,
            "git_commit": "0123abcd",
            "packages": {"torch": "2.13.0"},
            "start": "2025-05-01T10:00:00+02:00",
            "end": "2025-05-01T10:20:00+02:00",
            "device": "cpu",
        },
    )


def write_metrics(
    results: Path, run: str, stage: str, values: dict[str, dict[str, float]], missing: list[str]
) -> int:
    records = [
        {
            "run": run,
            "stage": stage,
            "dataset": ds,
            "split": "test",
            "metric": m,
            "value": v,
            "decoding": {"num_beams": 5, "max_new_tokens": 32},
        }
        for ds, mv in values.items()
        for m, v in mv.items()
    ]
    write_json(
        results / "runs" / run / "metrics.json",
        {
            "schema_version": 1,
            "run": run,
            "records": records,
            "missing": [
                {"metric": m, "reason": "Stanford CoreNLP jars not found"} for m in missing
            ],
        },
    )
    return len(records)


def _curve(n: int, alpha: float) -> dict:
    s = np.arange(1, n + 1, dtype=float) ** -alpha
    cum = np.cumsum(s / s.sum())
    eff = (int(np.searchsorted(cum, 0.9)) + 1) / n
    return {"k": list(range(1, n + 1)), "cumulative": [float(c) for c in cum],
            "effective_rank": eff}


def write_curve(
    results: Path,
    run: str,
    n: int,
    alpha: float,
    dataset: str,
    where: str = "",
    reference: str | None = None,
    text: int | None = 16,
) -> int:
    """A rank_curve.json as the evaluation writes it: an n-component image+text curve and a
    ``text``-component curve of its text rows (``text=None``: a text-only curve, as the reference
    LM's). ``where``: the sub-directory of the run dir. Returns the rank_curve rows."""
    obj = {"run": run, "dataset": dataset, "split": "test", "samples": 64, "threshold": 0.9,
           "positions": "image+text" if text else "text", "reference": reference,
           **_curve(n, alpha)}
    if text:
        obj["text"] = _curve(text, alpha / 2)
    write_json(results / "runs" / run / where / "rank_curve.json", obj)
    return n + (text or 0)


def make_results_tree(root: Path, seeds: tuple[int, ...] = (0, 1, 2)) -> dict[str, int]:
    """A results tree like the pipeline writes: stage chains, seeds, recap vs human captions,
    PEFT methods with prefix-length variants, rank curves per dataset (and the model before PEFT
    on the PEFT runs' dataset), a reference LM curve per dataset and a run still
    in progress. Returns the expected row count per table."""
    results = root / "results"
    rng = np.random.default_rng(0)
    n = {"runs": 0, "metrics": 0, "missing_metrics": 0, "train_log": 0, "rank_curve": 0,
         "rank_summary": 0}
    steps = {"stage0": 12, "stage1": 10, "prefix": 8, "lora": 9}

    def chain_of(stages: list[str], key: dict, start: float, decay: float):
        out = []
        for s in stages:
            out.append((s, write_stage(results, s, key, rng, steps[s], start, decay)))
            n["train_log"] += steps[s]
        return out

    for seed in seeds:
        # seed 002: recaptioned vs human text, stage0 > stage1
        for data, decay in (("recap", 0.25), ("human", 0.1)):
            run = f"{data}_s{seed}"
            chain = chain_of(["stage0", "stage1"], {"data": data, "seed": seed}, 4.0, decay)
            write_run(results, run, seed, chain, {"seed": seed, "data": {"text": data}})
            base = 0.75 if data == "recap" else 0.70
            vals = {
                ds: {
                    m: float(np.clip(base - 0.05 * i + 0.01 * rng.standard_normal(), 0, 1))
                    for i, m in enumerate(CAPTION_METRICS)
                }
                for ds in ("world", "world_target")
            }
            vals["world_target"]["CIDEr"] = 1.1 + 0.02 * rng.standard_normal()
            n["metrics"] += write_metrics(results, run, "stage1", vals, ["SPICE"])
            n["missing_metrics"] += 1
            n["runs"] += 1
            n["rank_curve"] += write_curve(results, run, 80, 0.7 + 0.1 * (data == "human"),
                                            "world")
            n["rank_summary"] += 2
            if data == "recap":  # the model the PEFT runs continue, on their dataset
                n["rank_curve"] += write_curve(results, run, 80, 0.75, "world_target",
                                                "before_peft/world_target", "before_peft")
                n["rank_summary"] += 2
        # seed 003: PEFT methods and orders, prefix length variants
        # (prefix_lora_p4 / _p16 are the cells of a `grids:` sweep, recorded as run.grid)
        for method, stages, plen in (
            ("lora", ["lora"], None),
            ("prefix_lora", ["prefix", "lora"], 16),
            ("prefix_lora_p4", ["prefix", "lora"], 4),
            ("prefix_lora_p16", ["prefix", "lora"], 16),
            ("lora_prefix", ["lora", "prefix"], 16),
        ):
            run = f"{method}_s{seed}"
            key = {"method": method, "seed": seed}
            chain = chain_of(stages, key, 3.0, 0.2)
            peft = {"method": "lora", "r": 16}
            if plen is not None:
                peft["prefix_length"] = plen
            config = {"seed": seed, "peft": peft}
            grid = "plen" if method.startswith("prefix_lora_p") else None
            if grid:
                config["run"] = {"grid": grid}
            write_run(results, run, seed, chain, config, grid=grid,
                       method_order="+".join(stages), prefix_length=plen)
            cider = {
                "lora": 1.17,
                "prefix_lora": 1.31,
                "prefix_lora_p4": 1.22,
                "prefix_lora_p16": 1.30,
                "lora_prefix": 1.20,
            }[method] + 0.004 * rng.standard_normal()
            vals = {
                "world_target": {
                    "Bleu_4": 0.35 + 0.01 * rng.standard_normal(),
                    "CIDEr": cider,
                    "trainable_pct": 0.54 if plen else 0.5,
                    "effective_rank_0.9": 0.5 + 0.05 * rng.standard_normal(),
                }
            }
            n["metrics"] += write_metrics(results, run, stages[-1], vals, ["SPICE"])
            n["missing_metrics"] += 1
            n["rank_curve"] += write_curve(
                results, run, 80, 0.9 + 0.3 * (method == "lora"), "world_target"
            )
            n["rank_summary"] += 2
            n["runs"] += 1
    # reference LM: a text-only curve per dataset; a run in progress: run.json only
    for dataset in ("world", "world_target"):
        n["rank_curve"] += write_curve(
            results, "_reference_lm", 16, 0.8, dataset, dataset, "pretrained_lm", text=None
        )
        n["rank_summary"] += 1
    chain = chain_of(["stage0"], {"data": "pending"}, 4.0, 0.2)
    write_run(results, "pending_s0", 0, chain, {"seed": 0})
    n["runs"] += 1
    (results / "runs" / "empty_dir").mkdir()  # a run that has not written anything yet
    return n
