"""Load and validate a pipeline config: the checks the Snakefile runs before any job
(``workflow/rules/common.smk`` calls :func:`validate_config`)."""

from __future__ import annotations

import copy
import functools
from importlib.resources import as_file, files
from pathlib import Path
from typing import Any

import yaml

# The source checkout, for the scripts and tests run from it (bench/, tests/). The package reads
# no repo file through it: the schema ships inside the package, so an installed vlalign works.
REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA = files("vlalign") / "schemas" / "config.schema.yaml"


class ConfigError(ValueError):
    """A config value is wrong; the message names the file and key."""


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


@functools.cache
def load_schema() -> dict[str, Any]:
    """The config schema (``vlalign/schemas/config.schema.yaml``), parsed once; do not mutate."""
    return yaml.safe_load(SCHEMA.read_text())


def _defaults_of(props: dict[str, Any]) -> dict[str, Any]:
    return {k: copy.deepcopy(v["default"]) for k, v in props.items() if "default" in v}


def schema_defaults(section: str) -> dict[str, Any]:
    """The defaults the schema fills into a top-level section given as ``{}`` (e.g. ``model``):
    for callers handed no config section, so that the schema stays their one home."""
    return _defaults_of(load_schema()["properties"][section].get("properties", {}))


def dataset_defaults() -> dict[str, Any]:
    """The defaults the schema fills into each ``datasets:`` entry (``on_error``, ...)."""
    entry = load_schema()["properties"]["datasets"]["additionalProperties"]
    return _defaults_of(entry["properties"])


def validate_config(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate against the JSON schema (filling defaults in place), resolve the ``world:``
    section (its keys, defaults and ranges live in :mod:`vlalign.data.world`) and cross-check
    references. Stage settings are resolved and checked when the plan is built
    (:func:`vlalign.runs.plan.plan`)."""
    from snakemake.utils import validate

    try:
        with as_file(SCHEMA) as path:
            validate(config, str(path), set_default=True)
    except Exception as e:  # snakemake wraps jsonschema errors in WorkflowError
        raise ConfigError(f"{source}: {e}") from None
    config["world"] = resolve_world(config["world"], source)
    check_references(config, source)
    # recaptioned datasets join `datasets` (with their content keys), for stages to name
    from vlalign.data.recaption import expand_recaptions  # lazy: needs the plan for run:

    expand_recaptions(config, source)
    return config


def resolve_world(world: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """The ``world:`` section with its defaults, validated by the world generator itself."""
    from vlalign.data.world import resolve_scene_config  # lazy: imports datasets, PIL

    try:
        return resolve_scene_config(world)
    except ValueError as e:
        raise ConfigError(f"{source}: {e}") from None  # "world config: 'grid' must be ..."


def check_references(config: dict[str, Any], source: str = "config") -> None:
    """Keys that name other config entries must name existing ones (on a config the schema has
    validated, its defaults filled in)."""
    names = set(config["datasets"])

    def need(key: str, name: str) -> None:
        if name not in names:
            raise ConfigError(
                f"{source}: {key} names dataset {name!r}, which is not under 'datasets' "
                f"(known: {sorted(names)})"
            )

    for kind in ("vision", "lm"):
        spec = config.get(kind, {})
        if spec.get("source") == "tiny" and not spec.get("config"):
            raise ConfigError(f"{source}: {kind}.source is 'tiny' but {kind}.config (the model "
                              "sizes) is missing")
    tok = config["tokenizer"]
    if tok["source"] == "train":
        for name in tok["corpus"]:
            need("tokenizer.corpus", name)
    for kind in ("vision", "lm"):
        if config.get(kind, {}).get("source") == "tiny":
            for name in config[kind]["pretrain"]["datasets"]:
                need(f"{kind}.pretrain.datasets", name)
    _check_scene_prefix(config, source)
    _check_downloads(config, source)
    if tok["source"] == "train" and config.get("lm", {}).get("source") not in (None, "tiny"):
        raise ConfigError(
            f"{source}: tokenizer.source 'train' needs lm.source 'tiny'; "
            "a pre-trained LM brings its own tokenizer (tokenizer.source: from_lm)"
        )


def _check_downloads(config: dict[str, Any], source: str) -> None:
    """A ``download`` block belongs to a ``urls:`` source (vlalign.data.download), whose
    ``header: false`` needs the column ``names``."""
    for name, spec in config["datasets"].items():
        block, is_urls = spec.get("download"), spec.get("source", "").startswith("urls:")
        if block is not None and not is_urls:
            raise ConfigError(f"{source}: datasets.{name}.download is only for a URL list "
                              f"(source urls:<path>), not source {spec.get('source')!r}")
        if is_urls and block and block.get("header") is False and not block.get("names"):
            raise ConfigError(f"{source}: datasets.{name}.download.header is false: give the "
                              f"column names in datasets.{name}.download.names")


def _check_scene_prefix(config: dict[str, Any], source: str) -> None:
    """The LM's pre-training prefix must have the shape of the image block it will read."""
    lm, vision = config.get("lm", {}), config.get("vision", {})
    if lm.get("source") != "tiny" or vision.get("source") != "tiny":
        return
    side = lm["pretrain"]["scene_prefix"]["side"]
    if not side:
        return
    from transformers import SiglipVisionConfig  # its defaults are the tiny tower's

    vc = SiglipVisionConfig(**vision["config"])
    patches = vc.image_size // vc.patch_size
    if side != patches:
        raise ConfigError(
            f"{source}: lm.pretrain.scene_prefix.side is {side} but the vision tower has "
            f"{patches}x{patches} patches (vision.config.image_size / patch_size)"
        )


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML config, merge ``overrides`` onto it and validate the result."""
    config = load_yaml(path)
    if overrides:
        config = deep_merge(config, overrides)
    return validate_config(config, source=str(path))


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Merge ``override`` onto a copy of ``base`` (mappings merge, the rest replaces)."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_source(source: str) -> tuple[str, str | None, str | None]:
    """``hf:org/name@rev`` → ("hf", "org/name", "rev"); ``local:p`` → ("local", "p", None)."""
    if source in ("tiny", "synthetic"):
        return source, None, None
    kind, sep, rest = source.partition(":")
    if not sep or kind not in ("hf", "local") or not rest:
        raise ConfigError(
            f"bad source {source!r}: expected tiny, synthetic, hf:<id>[@rev] or local:<path>"
        )
    if kind == "hf":
        ident, _, rev = rest.partition("@")
        return "hf", ident, rev or None
    return "local", rest, None
