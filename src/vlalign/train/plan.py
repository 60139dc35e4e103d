"""Turn ``stages:`` and ``runs:`` of the config into a DAG of content-hashed stage nodes.

A stage's output is keyed by a hash of everything that affects it (parent stage, resolved stage
settings, data, seed, and for a first stage the backbones), so runs that share a prefix of
their chain share those checkpoints and Snakemake builds them once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from vlalign.config import ConfigError, deep_merge
from vlalign.io_utils import stable_hash

# Every stage setting has a value: these, then the config's ``train:``, then the stage's own keys.
TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 1,
    "max_steps": None,
    "batch_size": 128,
    "micro_batch_size": 16,
    "optimizer": {"betas": [0.9, 0.999], "weight_decay": 0.01, "eps": 1e-8},
    "schedule": "cosine",
    "warmup_ratio": 0.03,
    "min_lr": 1e-8,
    "max_grad_norm": 1.0,
    "max_length": 256,
    "checkpoint_every": 100,
    "gradient_checkpointing": False,
    "data_fraction": 1.0,
    "mask": "prefix",
    "noise": 0.0,
    "peft": None,
}

# Keys that only affect *how* a stage is computed, not its result: they stay out of the hash.
NON_SEMANTIC_KEYS = ("checkpoint_every",)


@dataclass
class StageNode:
    hash: str
    name: str
    settings: dict[str, Any]  # train defaults merged with the stage's own keys and overrides
    parent: str | None  # parent stage hash; None = start from the backbones
    seed: int
    dataset: str
    feature_key: str | None  # frozen-feature cache to read, or None (read images)
    chain: list[str] = field(default_factory=list)  # stage names up to and including this one


@dataclass
class RunNode:
    name: str  # "<run>_s<seed>"
    base: str  # the run's name in the config
    seed: int
    stages: list[str]  # stage hashes, in order
    eval_dataset: str
    spec: dict[str, Any]


def data_identity(config: dict[str, Any], dataset: str) -> dict[str, Any]:
    spec = config["datasets"][dataset]
    ident = {"spec": spec, "seed": config["seed"]}
    if spec["source"] == "synthetic":
        ident["world"] = config["world"]
    return ident


def feature_key(config: dict[str, Any], dataset: str) -> str:
    """Hash of (encoder, preprocessing, dataset): the vision section fixes both encoder and
    preprocessing (image size) of the frozen encoder."""
    return stable_hash({"encoder": config["vision"], "data": data_identity(config, dataset)})


def backbone_identity(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config.get(k) for k in ("vision", "lm", "tokenizer", "model", "world", "seed")}


def resolve_stage(config: dict[str, Any], item: str | dict[str, Any]) -> tuple[str, dict]:
    """A chain item (stage name or ``{stage: name, **overrides}``) → (name, settings)."""
    if isinstance(item, str):
        name, overrides = item, {}
    else:
        overrides = dict(item)
        name = overrides.pop("stage")
    if name not in config["stages"]:
        raise ConfigError(f"runs: unknown stage {name!r} (known: {sorted(config['stages'])})")
    settings = deep_merge(TRAIN_DEFAULTS, config["train"])
    settings = deep_merge(settings, config["stages"][name])
    settings = deep_merge(settings, overrides)
    if settings["dataset"] not in config["datasets"]:
        raise ConfigError(
            f"stages.{name}.dataset: unknown dataset {settings['dataset']!r} "
            f"(known: {sorted(config['datasets'])})"
        )
    return name, settings


def plan(config: dict[str, Any]) -> tuple[dict[str, StageNode], dict[str, RunNode]]:
    stages: dict[str, StageNode] = {}
    runs: dict[str, RunNode] = {}
    for run_name, spec in config.get("runs", {}).items():
        for seed in spec.get("seeds", [0]):
            parent: str | None = None
            vision_trained = False
            chain_names: list[str] = []
            hashes: list[str] = []
            for item in spec["chain"]:
                name, settings = resolve_stage(config, item)
                chain_names.append(name)
                semantic = {k: v for k, v in settings.items() if k not in NON_SEMANTIC_KEYS}
                h = stable_hash(
                    {
                        "parent": parent if parent else backbone_identity(config),
                        "stage": semantic,
                        "data": data_identity(config, settings["dataset"]),
                        "seed": seed,
                    }
                )
                # The cache holds the *pre-trained* encoder's features: once a stage has
                # trained the encoder, later stages must read images.
                frozen = settings["lr"].get("vision", 0) == 0
                fkey = (
                    feature_key(config, settings["dataset"])
                    if frozen and not vision_trained
                    else None
                )
                vision_trained = vision_trained or not frozen
                stages.setdefault(
                    h,
                    StageNode(
                        h,
                        name,
                        copy.deepcopy(settings),
                        parent,
                        seed,
                        settings["dataset"],
                        fkey,
                        list(chain_names),
                    ),
                )
                hashes.append(h)
                parent = h
            eval_dataset = spec.get("eval_dataset", stages[hashes[-1]].dataset)
            if eval_dataset not in config["datasets"]:
                raise ConfigError(f"runs.{run_name}.eval_dataset: unknown dataset {eval_dataset!r}")
            instance = f"{run_name}_s{seed}"
            runs[instance] = RunNode(instance, run_name, seed, hashes, eval_dataset, spec)
    return stages, runs
