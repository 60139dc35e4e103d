"""Turn ``stages:`` and ``runs:`` of the config into a DAG of content-hashed stage nodes.

A stage's output is keyed by a hash of everything that affects it (parent stage, resolved stage
settings, data, seed, and for a first stage the backbones), so runs that share a prefix of
their chain share those checkpoints and Snakemake builds them once.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any

from vlalign.config import ConfigError, deep_merge
from vlalign.io_utils import stable_hash
from vlalign.runs.settings import TRAIN_DEFAULTS as TRAIN_DEFAULTS  # re-exported (tests, scripts)
from vlalign.runs.settings import StageSettings, kv_prefix_methods, packing_refusal, resolve


@dataclass
class StageNode:
    hash: str
    name: str
    resolved: StageSettings  # TRAIN_DEFAULTS < train: < the stage < the run's overrides, checked
    parent: str | None  # parent stage hash; None = start from the backbones
    seed: int
    dataset: str
    feature_key: str | None  # frozen-feature cache to read, or None (read images)
    chain: list[str] = field(default_factory=list)  # stage names up to and including this one
    model: dict[str, Any] = field(default_factory=dict)  # the model section its run builds with

    @property
    def settings(self) -> dict[str, Any]:
        """The resolved settings as the job receives them (a fresh plain dict: JSON-able)."""
        return self.resolved.to_dict()


@dataclass
class RunNode:
    name: str  # "<run>_s<seed>"
    base: str  # the run's name in the config
    seed: int
    stages: list[str]  # stage hashes, in order
    eval_datasets: list[str]  # the first one also gives the rank curve
    spec: dict[str, Any]


def data_identity(config: dict[str, Any], dataset: str) -> dict[str, Any]:
    spec = config["datasets"][dataset]
    ident = {"spec": spec, "seed": config["seed"]}
    if spec["source"] == "synthetic":
        ident["world"] = config["world"]
    return ident


def pretraining_data(config: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """Identities of the data a tiny backbone (or the trained tokenizer) learns from."""
    names: list[str] = []
    if kind in ("vision", "lm") and config[kind]["source"] == "tiny":
        names = list(config[kind]["pretrain"]["datasets"])
    if kind == "tokenizer" and config["tokenizer"]["source"] == "train":
        names = list(config["tokenizer"]["corpus"])
    return [data_identity(config, n) for n in names]


def feature_key(config: dict[str, Any], dataset: str) -> str:
    """Hash of (encoder, preprocessing, dataset): the vision section (and its pre-training data)
    fixes the encoder and its preprocessing (image size); the storage dtype is part of it too."""
    return stable_hash(
        {
            "encoder": config["vision"],
            "pretrain": pretraining_data(config, "vision"),
            "dtype": config["features"]["dtype"],
            "data": data_identity(config, dataset),
        }
    )


def backbone_identity(config: dict[str, Any]) -> dict[str, Any]:
    ident = {k: config.get(k) for k in ("vision", "lm", "tokenizer", "model", "world", "seed")}
    ident["pretrain"] = {k: pretraining_data(config, k) for k in ("vision", "lm", "tokenizer")}
    return ident


def resolve_stage_settings(
    config: dict[str, Any], item: str | dict[str, Any]
) -> tuple[str, StageSettings, int | None]:
    """A chain item (stage name or ``{stage: name, **overrides}``) → (name, its checked
    settings, its pinned seed or None). ConfigError names the stage and the key."""
    if isinstance(item, str):
        name, overrides = item, {}
    else:
        overrides = dict(item)
        name = overrides.pop("stage")
    if name not in config["stages"]:
        raise ConfigError(f"runs: unknown stage {name!r} (known: {sorted(config['stages'])})")
    settings, seed = resolve(
        config["train"], config["stages"][name], overrides, where=f"stages.{name}"
    )
    if settings.dataset not in config["datasets"]:
        raise ConfigError(
            f"stages.{name}.dataset: unknown dataset {settings.dataset!r} "
            f"(known: {sorted(config['datasets'])})"
        )
    return name, settings, seed


def resolve_stage(config: dict[str, Any], item: str | dict[str, Any]) -> tuple[str, dict]:
    """(name, settings as a job receives them): :func:`resolve_stage_settings` in plain form,
    for scripts that adjust a stage (bench/); the pinned seed is left out."""
    name, settings, _ = resolve_stage_settings(config, item)
    return name, settings.to_dict()


def set_path(settings: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = settings
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"grids: {dotted!r} goes through a non-mapping value")
    node[keys[-1]] = value


def _axis_label(path: str, value: Any) -> str:
    return f"{path.split('.')[-1]}{value}".replace("/", "-").replace(" ", "")


def expand_grid(gname: str, grid: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A sweep: the cartesian product of ``axes`` over a chain. An axis key is
    ``<stage>.<dotted.setting>`` (every occurrence of that stage in the chain) or
    ``*.<setting>`` (every stage); each cell becomes the run ``<grid>-<label>``."""
    axes = grid.get("axes", {})  # optional: no axes, one cell
    names = [s if isinstance(s, str) else s["stage"] for s in grid["chain"]]
    for key in axes:
        stage, _, path = key.partition(".")
        if not path or (stage != "*" and stage not in names):
            raise ConfigError(
                f"grids.{gname}.axes: {key!r} must be <stage in chain>.<setting> "
                f"or *.<setting> (chain: {names})"
            )
    runs: dict[str, dict[str, Any]] = {}
    for values in itertools.product(*axes.values()):
        chain = [({"stage": s} if isinstance(s, str) else copy.deepcopy(s)) for s in grid["chain"]]
        labels = []
        for key, value in zip(axes, values):
            stage, _, path = key.partition(".")
            for item in chain:
                if stage in ("*", item["stage"]):
                    set_path(item, path, value)
            labels.append(_axis_label(path, value))
        name = "-".join([gname, *labels]) if labels else gname
        runs[name] = {k: v for k, v in grid.items() if k not in ("axes", "chain")}
        runs[name]["chain"] = chain
        runs[name]["grid"] = gname  # tables tell sweep cells from named runs by this
    return runs


def all_runs(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``runs:`` plus every cell of every ``grids:`` entry, ``after:`` resolved."""
    runs = {name: dict(spec) for name, spec in config["runs"].items()}
    for gname, grid in config["grids"].items():
        for name, spec in expand_grid(gname, grid).items():
            if name in runs:
                raise ConfigError(f"grids.{gname}: run {name!r} already exists")
            runs[name] = spec
    out = {name: {**spec, "chain": full_chain(runs, name)} for name, spec in runs.items()}
    for name, spec in out.items():
        model = full_model(runs, name)
        if model:
            spec["model"] = model
    return out


def full_model(runs: dict[str, dict[str, Any]], name: str) -> dict[str, Any]:
    """A run's ``model:`` overrides, over those of the run it continues (``after:``): its
    base's stages are built as the base builds them, so they stay shared."""
    spec = runs[name]
    base = spec.get("after")
    inherited = full_model(runs, base) if base else {}
    return deep_merge(inherited, spec.get("model", {}))


def run_model(config: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The model section a run's stages are built with: ``model:`` and the run's overrides
    (e.g. ``projector``, the MaL variant). Only a first stage builds a projector; its hash
    holds this section, so every stage after it differs too."""
    return deep_merge(config["model"], spec.get("model", {}))


def full_chain(runs: dict[str, dict[str, Any]], name: str, seen: tuple = ()) -> list:
    """A run's chain with ``after: <run>`` expanded; the base's stages pin its first seed."""
    spec = runs[name]
    base = spec.get("after")
    if base is None:
        return list(spec["chain"])
    if base not in runs:
        raise ConfigError(f"runs.{name}.after: unknown run {base!r}")
    if base in seen:
        raise ConfigError(f"runs.{name}.after: cycle through {base!r}")
    seed = runs[base]["seeds"][0]
    pinned = [
        {**({"stage": item} if isinstance(item, str) else item), "seed": seed}
        if not (isinstance(item, dict) and "seed" in item)
        else item
        for item in full_chain(runs, base, (*seen, name))
    ]
    return pinned + list(spec["chain"])


def run_eval_settings(config: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """The eval section with a run's own ``eval:`` overrides."""
    return deep_merge(config["eval"], spec.get("eval", {}))  # a run's eval: is optional


def plan(config: dict[str, Any]) -> tuple[dict[str, StageNode], dict[str, RunNode]]:
    """Every run instance and the distinct stages they need, each stage's settings resolved
    and checked once (ConfigError names the run, the stage and the key)."""
    stages: dict[str, StageNode] = {}
    runs: dict[str, RunNode] = {}
    for run_name, spec in all_runs(config).items():
        model = run_model(config, spec)
        backbones = backbone_identity({**config, "model": model})
        for seed in spec["seeds"]:
            parent: str | None = None
            vision_trained = False
            chain_names: list[str] = []
            hashes: list[str] = []
            prefixed: list[str] = []  # K/V-prefix methods of the chain so far (stay attached)
            for item in spec["chain"]:
                try:
                    name, settings, stage_seed = resolve_stage_settings(config, item)
                except ConfigError as e:
                    raise ConfigError(f"runs.{run_name}: {e}") from None
                prefixed += [m for m in kv_prefix_methods(settings.peft) if m not in prefixed]
                if settings.packing and prefixed:  # a parent stage's prefix is still attached
                    raise ConfigError(packing_refusal(f"runs.{run_name}.{name}", prefixed))
                chain_names.append(name)
                # A stage may pin its seed (e.g. a shared base alignment under a multi-seed
                # PEFT grid); otherwise it trains with the run's seed.
                stage_seed = seed if stage_seed is None else stage_seed
                h = stable_hash(
                    {
                        "parent": parent if parent else backbones,
                        "stage": settings.semantic(),
                        "data": data_identity(config, settings.dataset),
                        "seed": stage_seed,
                    }
                )
                # The cache holds the *pre-trained* encoder's features: once a stage has
                # trained the encoder, later stages must read images.
                frozen = settings.lr["vision"] == 0
                fkey = (
                    feature_key(config, settings.dataset) if frozen and not vision_trained else None
                )
                vision_trained = vision_trained or not frozen
                stages.setdefault(
                    h,
                    StageNode(
                        h,
                        name,
                        settings,
                        parent,
                        stage_seed,
                        settings.dataset,
                        fkey,
                        list(chain_names),
                        model,
                    ),
                )
                hashes.append(h)
                parent = h
            eval_datasets = spec.get("eval_datasets") or [stages[hashes[-1]].dataset]
            for d in eval_datasets:
                if d not in config["datasets"]:
                    raise ConfigError(f"runs.{run_name}.eval_datasets: unknown dataset {d!r}")
            instance = f"{run_name}_s{seed}"
            runs[instance] = RunNode(instance, run_name, seed, hashes, list(eval_datasets), spec)
    return stages, runs
