"""A stage's resolved settings: one typed, validated object per stage of the plan.

Every setting has a value: :data:`TRAIN_DEFAULTS` (their one home), then the config's ``train:``,
then the stage's block, then a run's chain overrides (``{stage: name, epochs: 4}``). The merged
settings are checked once, when the plan is built (Snakemake's DAG build, ``vlalign plan``):

- value types and ranges by the config schema's ``stage`` definition, so a chain override is
  checked like a ``stages:`` entry;
- every key is known and every key has a value (no consumer falls back to a default of its own);
- each ``peft:`` method block by the method registry's own validation
  (``get_method(name).resolve_config``), with its defaults filled in, plus a required ``lr``; a
  null block removes the method (an ablation's chain override ``{peft: {name: null}}``).

A training job receives :meth:`StageSettings.to_dict` as JSON and rebuilds the object with
:meth:`StageSettings.from_dict`, which runs the same checks.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from vlalign.config import ConfigError, deep_merge, load_schema

TRAIN_DEFAULTS: dict[str, Any] = {
    "epochs": 1,
    "max_steps": None,  # None: epochs decide
    "batch_size": 128,
    "micro_batch_size": 16,
    "optimizer": {"betas": [0.9, 0.999], "weight_decay": 0.01, "eps": 1e-8},
    "schedule": "cosine",
    "warmup_ratio": 0.03,
    "warmup_steps": None,  # a count of steps; None: warmup_ratio's share
    "min_lr": 1e-8,
    "max_grad_norm": 1.0,  # None: no clipping
    "max_length": 256,
    "checkpoint_every": 100,
    "gradient_checkpointing": False,
    "data_fraction": 1.0,
    "max_train_samples": None,  # None: every row (or data_fraction's share)
    # vlalign.data.text_formats.TextFormat: {caption: {instructions, task}, qa: {...}}; none:
    # the plain format
    "prompts": {},
    "mask": "prefix",
    "noise": 0.0,
    "peft": None,
    # data loading off the main process (vlalign.train.loader): None = from the CPUs granted
    # (0 on a 1-2 CPU machine: batches built in the training process, as before)
    "num_workers": None,
    # several samples per row, no padding between them (vlalign.models.packing); the same loss
    # and gradients as padded rows (to float tolerance), so it is not part of the hash
    "packing": False,
    # experiment trackers (vlalign.train.trackers): tensorboard | wandb | mlflow | all; None: off
    "log_with": None,
}
MODULES = ("vision", "projector", "lm")  # the per-module learning rates; absent = 0 = frozen
# Keys that only affect *how* a stage is computed, not its result: they stay out of the hash.
NON_SEMANTIC_KEYS = ("checkpoint_every", "num_workers", "packing", "log_with")


@functools.cache
def _stage_validator() -> Any:
    import jsonschema

    schema = load_schema()
    root = {"$schema": schema["$schema"], "definitions": schema["definitions"]}
    return jsonschema.Draft202012Validator({**root, "$ref": "#/definitions/stage"})


def _check_schema(data: Mapping[str, Any], where: str) -> None:
    errors = sorted(
        _stage_validator().iter_errors(dict(data)), key=lambda e: [str(p) for p in e.path]
    )
    # a bad value also fails unevaluatedProperties for every key of its allOf branch: name the
    # value, not that echo
    errors = [e for e in errors if e.validator != "unevaluatedProperties"] or errors
    if errors:
        e = errors[0]
        key = ".".join(str(p) for p in e.path)
        raise ConfigError(f"{where}{'.' + key if key else ''}: {e.message}")


@dataclass(frozen=True)
class OptimizerSettings:
    betas: tuple[float, float]
    weight_decay: float
    eps: float

    def to_dict(self) -> dict[str, Any]:
        return {"betas": list(self.betas), "weight_decay": self.weight_decay, "eps": self.eps}


@dataclass(frozen=True)
class MethodSettings:
    """One ``peft:`` block: the method's LR (0 = attached but frozen) and its resolved config."""

    name: str
    lr: float
    config: Mapping[str, Any]  # the registry's resolve_config: its defaults filled, no lr

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, **copy.deepcopy(dict(self.config))}


def resolve_methods(peft: Mapping[str, Any] | None, where: str) -> tuple[MethodSettings, ...]:
    """Each method block checked by the registry; ConfigError names ``where``, method and key."""
    if not peft:
        return ()
    from vlalign.methods.registry import get_method  # lazy: imports torch and peft

    out = []
    for name, block in peft.items():
        key = f"{where}.peft.{name}"
        if block is None:  # removed, e.g. by an ablation's override {peft: {name: null}}
            continue
        block = dict(block)
        if "lr" not in block:
            raise ConfigError(
                f"{key}: needs an 'lr' (this method's learning rate; 0 keeps it attached "
                "but frozen)"
            )
        lr = block.pop("lr")
        if isinstance(lr, bool) or not isinstance(lr, int | float) or lr < 0:
            raise ConfigError(f"{key}.lr: must be a number >= 0, got {lr!r}")
        try:
            config = get_method(name).resolve_config(block)
        except ValueError as e:  # unknown method, unknown key
            raise ConfigError(f"{key}: {e}") from None
        out.append(MethodSettings(name, float(lr), config))
    return tuple(out)


def kv_prefix_methods(methods: tuple[MethodSettings, ...]) -> list[str]:
    """The methods among ``methods`` whose training forward gets a K/V prefix."""
    if not methods:
        return []
    from vlalign.methods.registry import get_method  # lazy: imports torch and peft

    return [m.name for m in methods if get_method(m.name).kv_prefix]


def packing_refusal(where: str, methods: list[str]) -> str:
    return (
        f"{where}: packing (train.packing) does not support a K/V prefix (past_key_values), "
        f"which {methods} give every forward: set packing: false for this stage"
    )


@dataclass(frozen=True)
class StageSettings(Mapping[str, Any]):
    """Every setting of one stage, resolved and validated.

    Read the typed attributes (``settings.checkpoint_every``, ``settings.optimizer.eps``,
    ``settings.peft``: the methods in order); mapping access (``settings["lr"]``) and
    :meth:`to_dict` give the plain form a job receives, with ``peft`` as ``{name: {lr, ...}}``
    or None."""

    dataset: str
    text: str
    lr: Mapping[str, float]  # every module of MODULES
    mask: str
    noise: float
    epochs: float
    max_steps: int | None
    batch_size: int
    micro_batch_size: int
    optimizer: OptimizerSettings
    schedule: str
    warmup_ratio: float
    warmup_steps: int | None
    min_lr: float
    max_grad_norm: float | None
    max_length: int
    checkpoint_every: int
    gradient_checkpointing: bool
    data_fraction: float
    max_train_samples: int | None
    prompts: Mapping[str, Any]
    peft: tuple[MethodSettings, ...]
    num_workers: int | None
    packing: bool
    log_with: str | None
    _plain: dict[str, Any] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        plain = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_plain"}
        plain["lr"] = dict(self.lr)
        plain["optimizer"] = self.optimizer.to_dict()
        plain["peft"] = {m.name: m.to_dict() for m in self.peft} or None
        object.__setattr__(self, "_plain", plain)

    __hash__ = None  # type: ignore[assignment]  # holds mappings: unhashable, as a dict

    @classmethod
    def setting_names(cls) -> list[str]:
        """The setting names (those of :data:`TRAIN_DEFAULTS` and a stage's own keys)."""
        return [f.name for f in fields(cls) if f.name != "_plain"]

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "stage") -> StageSettings:
        """Check complete settings (as :func:`resolve` or a job's JSON gives them) and type them.

        ConfigError names ``where`` and the key: unknown or missing keys, a value the schema
        refuses, a PEFT block the method registry refuses or one without its ``lr``."""
        names = cls.setting_names()
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ConfigError(f"{where}: unknown setting(s) {unknown}; known: {sorted(names)}")
        missing = sorted(set(names) - set(data))
        if missing:
            raise ConfigError(
                f"{where}: missing setting(s) {missing}; every setting has a value once "
                "resolved (vlalign.runs.settings.resolve: TRAIN_DEFAULTS < train: < stage)"
            )
        _check_schema(data, where)
        opt = data["optimizer"]
        opt_missing = sorted({"betas", "weight_decay", "eps"} - set(opt))
        if opt_missing:
            raise ConfigError(f"{where}.optimizer: missing setting(s) {opt_missing}")
        values = {k: copy.deepcopy(data[k]) for k in names}
        values["lr"] = {m: data["lr"].get(m, 0) for m in MODULES}
        values["optimizer"] = OptimizerSettings(
            tuple(opt["betas"]), opt["weight_decay"], opt["eps"]
        )
        values["peft"] = resolve_methods(data["peft"], where)
        from vlalign.data.text_formats import TextFormat  # lazy: imports transformers

        try:
            TextFormat.from_settings(data).check(data["text"])
        except ValueError as e:
            raise ConfigError(f"{where}: {e} (text: {data['text']})") from None
        if data["max_train_samples"] is not None and data["data_fraction"] < 1:
            raise ConfigError(
                f"{where}: set max_train_samples ({data['max_train_samples']}) or "
                f"data_fraction ({data['data_fraction']}), not both"
            )
        if data["packing"]:
            prefixed = kv_prefix_methods(values["peft"])
            if prefixed:
                raise ConfigError(packing_refusal(where, prefixed))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        """The plain, JSON-able settings (a fresh copy)."""
        return copy.deepcopy(self._plain)

    def semantic(self) -> dict[str, Any]:
        """What the stage's result depends on: :meth:`to_dict` without NON_SEMANTIC_KEYS."""
        return {k: v for k, v in self.to_dict().items() if k not in NON_SEMANTIC_KEYS}

    def method(self, name: str) -> MethodSettings | None:
        return next((m for m in self.peft if m.name == name), None)

    # Mapping access: the plain values, as the job's JSON carries them.
    def __getitem__(self, key: str) -> Any:
        return copy.deepcopy(self._plain[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._plain)

    def __len__(self) -> int:
        return len(self._plain)


def merge(
    train: Mapping[str, Any], stage: Mapping[str, Any], overrides: Mapping[str, Any]
) -> dict[str, Any]:
    """TRAIN_DEFAULTS < ``train`` < ``stage`` < ``overrides`` (mappings merge, the rest
    replaces)."""
    merged = deep_merge(TRAIN_DEFAULTS, dict(train))
    merged = deep_merge(merged, dict(stage))
    return deep_merge(merged, dict(overrides))


def resolve(
    train: Mapping[str, Any],
    stage: Mapping[str, Any],
    overrides: Mapping[str, Any] | None = None,
    where: str = "stage",
) -> tuple[StageSettings, int | None]:
    """The stage's settings and its pinned seed (None: the run's seed)."""
    merged = merge(train, stage, overrides or {})
    seed = merged.pop("seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ConfigError(f"{where}.seed: must be an integer, got {seed!r}")
    return StageSettings.from_dict(merged, where), seed


def as_stage_settings(settings: StageSettings | Mapping[str, Any], where: str) -> StageSettings:
    """``settings`` itself, or complete plain settings checked and typed (:meth:`from_dict`)."""
    if isinstance(settings, StageSettings):
        return settings
    return StageSettings.from_dict(settings, where)
