"""Load and validate a pipeline config (the same checks the Snakefile runs before any job)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
SCHEMA_PATH = REPO_ROOT / "workflow" / "schemas" / "config.schema.yaml"


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


def validate_config(config: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Validate against the JSON schema (filling defaults in place) and cross-check references."""
    from snakemake.utils import validate

    try:
        validate(config, str(SCHEMA_PATH), set_default=True)
    except Exception as e:  # snakemake wraps jsonschema errors in WorkflowError
        raise ConfigError(f"{source}: {e}") from None
    check_references(config, source)
    return config


def check_references(config: dict[str, Any], source: str = "config") -> None:
    """Keys that name other config entries must name existing ones."""
    names = set(config.get("datasets", {}))

    def need(key: str, name: str) -> None:
        if name not in names:
            raise ConfigError(
                f"{source}: {key} names dataset {name!r}, which is not under 'datasets' "
                f"(known: {sorted(names)})"
            )

    world = config.get("world", {})
    if world and world.get("image_size", 64) < 8 * world.get("grid", 3):
        raise ConfigError(f"{source}: world.image_size {world['image_size']} is too small for "
                          f"world.grid {world['grid']} (needs >= 8 x grid)")
    for kind in ("vision", "lm"):
        spec = config.get(kind, {})
        if spec.get("source") == "tiny" and not spec.get("config"):
            raise ConfigError(f"{source}: {kind}.source is 'tiny' but {kind}.config (the model "
                              "sizes) is missing")
    tok = config.get("tokenizer", {})
    if tok.get("source", "train") == "train":
        for name in tok.get("corpus", []):
            need("tokenizer.corpus", name)
    if config.get("vision", {}).get("source") == "tiny":
        for name in config["vision"]["pretrain"]["datasets"]:
            need("vision.pretrain.datasets", name)
    if config.get("lm", {}).get("source") == "tiny":
        for name in config["lm"]["pretrain"]["datasets"]:
            need("lm.pretrain.datasets", name)
    _check_scene_prefix(config, source)
    if tok.get("source") == "train" and config.get("lm", {}).get("source", "tiny") != "tiny":
        raise ConfigError(
            f"{source}: tokenizer.source 'train' needs lm.source 'tiny'; "
            "a pre-trained LM brings its own tokenizer (tokenizer.source: from_lm)"
        )


def _check_scene_prefix(config: dict[str, Any], source: str) -> None:
    """The LM's pre-training prefix must have the shape of the image block it will read."""
    lm, vision = config.get("lm", {}), config.get("vision", {})
    side = lm.get("pretrain", {}).get("scene_prefix", {}).get("side", 0)
    if not side or lm.get("source") != "tiny" or vision.get("source") != "tiny":
        return
    vc = vision.get("config", {})
    patches = vc.get("image_size", 224) // vc.get("patch_size", 16)
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
