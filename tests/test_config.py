"""Config validation: the schema, cross-references, source strings, and the same checks run by
the real Snakemake CLI before any job starts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from vlalign.config import (
    SCHEMA,
    ConfigError,
    deep_merge,
    load_config,
    load_schema,
    load_yaml,
    parse_source,
    schema_defaults,
    validate_config,
)
from vlalign.data.world import SCENE_DEFAULTS, resolve_config, resolve_scene_config

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO / "config" / "config.yaml"
PAPER = REPO / "config" / "recipes" / "paper.yaml"


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------------------ valid configs
def test_default_config_validates_and_fills_defaults() -> None:
    raw = load_yaml(DEFAULT)
    cfg = load_config(DEFAULT)
    # texture_prob is not in config.yaml: the schema default must be filled in.
    assert "texture_prob" not in raw["world"]
    assert cfg["world"]["texture_prob"] == pytest.approx(0.3)
    # Per-dataset defaults.
    for name, spec in cfg["datasets"].items():
        assert spec["on_error"] == "raise", name
        assert spec["recaption"] == "auto", name
    assert cfg["results_dir"] == raw.get("results_dir", "results")
    # What the file says is kept as written.
    assert cfg["seed"] == raw["seed"]
    assert cfg["tokenizer"]["corpus"] == raw["tokenizer"]["corpus"]
    assert cfg["vision"]["config"] == raw["vision"]["config"]


def test_tiny_test_config_validates(tiny_config_path: Path) -> None:
    cfg = load_config(tiny_config_path)
    assert set(cfg["datasets"]) == {"world", "world_target"}
    assert cfg["tokenizer"]["vocab_size"] <= 512
    # The world generator accepts the world section as validated (no cross-field surprises).
    resolve_config(cfg["world"])


def test_defaults_fill_sections_left_out(tmp_path: Path) -> None:
    minimal = {
        "datasets": {"world": {"source": "synthetic"}},
        "vision": {"source": "tiny", "config": {"hidden_size": 8}},
        "lm": {"source": "tiny", "config": {"hidden_size": 8}},
    }
    cfg = load_config(write_yaml(tmp_path / "min.yaml", minimal))
    assert cfg["seed"] == 0
    assert cfg["recipe"] == "default"
    assert cfg["world"]["grid"] == 3 and cfg["world"]["image_size"] == 64
    assert cfg["tokenizer"] == {"source": "train", "vocab_size": 1024, "corpus": ["world"]}
    assert cfg["vision"]["pretrain"]["datasets"] == ["world"]
    assert cfg["vision"]["pretrain"]["steps"] >= 1
    assert cfg["lm"]["pretrain"]["datasets"] == ["world"]
    assert cfg["datasets"]["world"]["domain"] == "source"


def test_paper_recipe_validates() -> None:
    cfg = load_config(PAPER)
    assert cfg["recipe"] == "paper"
    assert cfg["tokenizer"]["source"] == "from_lm"
    assert parse_source(cfg["vision"]["source"])[0] == "hf"
    assert parse_source(cfg["lm"]["source"])[0] == "hf"
    # A recipe replaces the default: it must not inherit the synthetic world datasets.
    assert all(spec["source"] != "synthetic" for spec in cfg["datasets"].values())


def test_paper_recipe_pins_every_hub_revision() -> None:
    cfg = load_config(PAPER)
    sources = [cfg["vision"]["source"], cfg["lm"]["source"]]
    # a recaptioned dataset is made in the DAG: its hub source is its captioner's
    sources += [spec["source"] for spec in cfg["datasets"].values()
                if not spec["source"].startswith("recaption:")]
    captioners = [r["captioner"] for r in cfg["recaptions"].values()]
    assert captioners and all(c.startswith("hf:") for c in captioners)
    for src in sources + captioners:
        kind, ident, rev = parse_source(src)
        assert kind == "hf" and ident and "/" in ident, src
        assert rev, f"{src}: hub source without an @revision"


# ------------------------------------------------------------------------------ bad configs
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ({"bogus_top": 1}, "bogus_top"),
        ({"world": {"bogus": 1}}, "bogus"),
        ({"lm": {"pretrain": {"bogus_lm_key": 1}}}, "bogus_lm_key"),
        ({"vision": {"pretrain": {"bogus_vis": 1}}}, "bogus_vis"),
        ({"datasets": {"world": {"spltis_sizes": {"train": 2}}}}, "spltis_sizes"),
        ({"tokenizer": {"typo": 1}}, "typo"),
    ],
)
def test_unknown_key_is_rejected_by_name(override: dict, named: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT, override)
    msg = str(err.value)
    assert repr(named) in msg or named in msg
    assert str(DEFAULT) in msg  # the source file is named too


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ({"seed": "x"}, ["'x'", "seed"]),
        ({"vision": {"pretrain": {"steps": -1}}}, ["-1", "steps"]),
        ({"lm": {"pretrain": {"lr": 0}}}, ["lr"]),
        ({"tokenizer": {"vocab_size": 10}}, ["10", "vocab_size"]),
        ({"world": {"grid": 1}}, ["grid"]),
        ({"datasets": {"world": {"source": "ftp:x"}}}, ["ftp:x", "source"]),
        ({"datasets": {"world": {"domain": "mars"}}}, ["mars", "domain"]),
        ({"lm": {"source": "hf:"}}, ["hf:", "source"]),
        ({"tokenizer": {"corpus": "world"}}, ["corpus"]),
    ],
)
def test_wrong_value_is_rejected_by_name(override: dict, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT, override)
    for frag in fragments:
        assert frag in str(err.value), (frag, str(err.value))


def test_empty_datasets_rejected() -> None:
    cfg = load_yaml(DEFAULT)
    cfg["datasets"] = {}
    with pytest.raises(ConfigError, match="datasets"):
        validate_config(cfg)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ({"tokenizer": {"corpus": ["world", "no_such_ds"]}}, "tokenizer.corpus"),
        ({"lm": {"pretrain": {"datasets": ["no_such_ds"]}}}, "lm.pretrain.datasets"),
        ({"vision": {"pretrain": {"datasets": ["no_such_ds"]}}}, "vision.pretrain.datasets"),
    ],
)
def test_unknown_dataset_reference_is_named(override: dict, key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(DEFAULT, override)
    msg = str(err.value)
    assert key in msg and "'no_such_ds'" in msg
    assert "world_target" in msg  # the known names are listed


def test_references_ignored_where_unused() -> None:
    # With a pre-trained LM the tokenizer corpus and LM pre-training data are not used.
    cfg = load_config(
        DEFAULT,
        {
            "tokenizer": {"source": "from_lm", "corpus": ["gone"]},
            "lm": {"source": "local:/some/lm", "pretrain": {"datasets": ["gone"]}},
        },
    )
    assert cfg["lm"]["source"] == "local:/some/lm"


def test_trained_tokenizer_needs_tiny_lm() -> None:
    with pytest.raises(ConfigError, match="tokenizer.source"):
        load_config(DEFAULT, {"lm": {"source": "hf:Qwen/Qwen2.5-0.5B@main"}})


@pytest.mark.parametrize("world", [{"grid": 5}, {"image_size": 16}])
def test_schema_valid_world_is_accepted_by_generator(world: dict) -> None:
    try:
        cfg = load_config(DEFAULT, {"world": world})
    except ConfigError:
        return  # rejected up front: fine
    resolve_config(cfg["world"])  # accepted up front: the generator must accept it too


@pytest.mark.parametrize("kind", ["vision", "lm"])
def test_tiny_backbone_without_config_is_caught_up_front(kind: str) -> None:
    cfg = load_yaml(DEFAULT)
    del cfg[kind]["config"]
    try:
        out = validate_config(cfg)
    except ConfigError as e:
        assert f"{kind}" in str(e) and "config" in str(e)
        return
    assert isinstance(out[kind].get("config"), dict)  # or a default is filled in


# ------------------------------------------------------------------------------ one home
def test_world_keys_defaults_and_ranges_have_one_home() -> None:
    # the schema defers the world section to the generator's own resolution
    assert "properties" not in load_schema()["properties"]["world"]
    assert load_config(DEFAULT)["world"] == {**SCENE_DEFAULTS, **load_yaml(DEFAULT)["world"]}
    # a bound that depends on another key: the same check up front and in the generator
    cfg = load_config(DEFAULT, {"world": {"grid": 4, "max_objects": 16, "image_size": 32}})
    assert resolve_scene_config(cfg["world"]) == cfg["world"]
    for world, key in [({"max_objects": 10}, "max_objects"), ({"captions_per_image": 4},
                       "captions_per_image"), ({"image_size": 2000}, "image_size")]:  # fmt: skip
        with pytest.raises(ValueError, match=key) as direct:
            resolve_scene_config(world)
        with pytest.raises(ConfigError) as upfront:
            load_config(DEFAULT, {"world": world})
        assert str(direct.value) in str(upfront.value)


def test_schema_ships_in_the_package_and_fills_model_defaults() -> None:
    import vlalign

    assert Path(str(SCHEMA)).is_file()
    assert Path(str(SCHEMA)).parent.parent == Path(vlalign.__file__).parent  # not a repo file
    common = (REPO / "workflow" / "rules" / "common.smk").read_text()
    # the Snakefile validates through the same function, hence the same packaged file
    assert "validate_config(config" in common and "validate(config" not in common
    minimal = load_yaml(DEFAULT)
    del minimal["model"]
    assert validate_config(minimal)["model"] == schema_defaults("model")


# ------------------------------------------------------------------------------ files
def test_missing_config_file_named(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_config(path)


def test_invalid_yaml_named(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("seed: [1, 2\nrecipe: x\n")
    with pytest.raises(ConfigError, match=re.escape(str(path))):
        load_yaml(path)


def test_non_mapping_top_level_named(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml(path)


def test_deep_merge_merges_mappings_without_mutating() -> None:
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    out = deep_merge(base, {"a": {"b": 2}, "e": {"f": 1}})
    assert out == {"a": {"b": 2, "c": [1, 2]}, "d": 1, "e": {"f": 1}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    out["a"]["c"].append(3)
    assert base["a"]["c"] == [1, 2]
    assert deep_merge({"a": {"b": 1}}, {"a": 5}) == {"a": 5}


# ------------------------------------------------------------------------------ parse_source
@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("tiny", ("tiny", None, None)),
        ("synthetic", ("synthetic", None, None)),
        ("hf:Qwen/Qwen2.5-0.5B", ("hf", "Qwen/Qwen2.5-0.5B", None)),
        ("hf:Qwen/Qwen2.5-0.5B@main", ("hf", "Qwen/Qwen2.5-0.5B", "main")),
        ("hf:org/name@0123abcd", ("hf", "org/name", "0123abcd")),
        ("local:/data/models/lm", ("local", "/data/models/lm", None)),
        ("local:relative/dir", ("local", "relative/dir", None)),
        ("local:/weird@name", ("local", "/weird@name", None)),  # '@' is no revision for paths
    ],
)
def test_parse_source(source: str, expected: tuple) -> None:
    assert parse_source(source) == expected


@pytest.mark.parametrize("source", ["", "hf:", "local:", "ftp:x", "Qwen/Qwen2.5", "tinyy", "HF:x"])
def test_parse_source_rejects(source: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_source(source)
    assert repr(source) in str(err.value)


# ------------------------------------------------------------------------------ real Snakemake
def _job_counts(output: str) -> dict[str, int]:
    """The 'Job stats' table of a Snakemake run: rule → count."""
    table = output.split("Job stats:", 1)[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, re.M)}


def test_snakemake_rejects_unknown_key_before_any_job(
    snakemake, tiny_config_path: Path, tmp_path: Path
) -> None:
    cfg = yaml.safe_load(tiny_config_path.read_text())
    cfg["world"]["bogus_world_key"] = 3
    bad = write_yaml(tmp_path / "bad.yaml", cfg)
    results = tmp_path / "results"
    proc = snakemake(["-n", "all", "--configfile", str(bad), "--config", f"results_dir={results}"])
    assert proc.returncode != 0, proc.stdout
    assert "bogus_world_key" in proc.stdout
    assert "Job stats" not in proc.stdout
    assert not results.exists()


def test_snakemake_rejects_bad_value_before_any_job(snakemake, tmp_path: Path) -> None:
    # A real run (no -n): validation must stop it before anything is built.
    results = tmp_path / "results"
    proc = snakemake(["--cores", "1", "all", "--config", f"results_dir={results}", "seed=x"])
    assert proc.returncode != 0, proc.stdout
    assert "seed" in proc.stdout and "'x'" in proc.stdout
    assert "Job stats" not in proc.stdout
    assert not results.exists()


def test_snakemake_rejects_unknown_dataset_reference(
    snakemake, tiny_config_path: Path, tmp_path: Path
) -> None:
    cfg = yaml.safe_load(tiny_config_path.read_text())
    cfg["lm"]["pretrain"]["datasets"] = ["world", "missing_ds"]
    bad = write_yaml(tmp_path / "bad.yaml", cfg)
    results = tmp_path / "results"
    proc = snakemake(["-n", "all", "--configfile", str(bad), "--config", f"results_dir={results}"])
    assert proc.returncode != 0, proc.stdout
    assert "lm.pretrain.datasets" in proc.stdout and "missing_ds" in proc.stdout
    assert not results.exists()


def test_snakemake_dry_run_paper_recipe_offline(snakemake, tmp_path: Path) -> None:
    results = tmp_path / "paper"
    proc = snakemake(
        ["-n", "all", "--configfile", str(PAPER), "--config", f"results_dir={results}"],
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout
    counts = _job_counts(proc.stdout)
    cfg = load_config(PAPER)
    recaptioned = {d for d, s in cfg["datasets"].items() if s["source"].startswith("recaption:")}
    assert counts.get("dataset") == len(cfg["datasets"]) - len(recaptioned), counts
    # COCO recaptioned by LLaVA-NeXT (docs/recaption.md): its shards, then the merge
    assert counts.get("recaption_shard") == cfg["recaptions"]["llava_next"]["shards"], counts
    assert counts.get("recaption_merge") == len(recaptioned) == 1, counts
    assert counts.get("backbone") == 2, counts
    assert counts.get("tokenizer") == 1, counts
    for name in cfg["datasets"]:
        assert f"{results}/data/{name}" in proc.stdout, name
    assert f"{results}/backbones/vision" in proc.stdout
    assert f"{results}/backbones/lm" in proc.stdout
    # The recipe replaces the default config: no synthetic world leaks in.
    assert f"{results}/data/world" not in proc.stdout
    assert not results.exists()  # a dry run writes nothing


def test_snakemake_dry_run_rejects_a_typo_in_a_peft_block(snakemake, tmp_path: Path) -> None:
    # LoRA's rank is `r`: the dry run must fail naming the stage, the method and the key, not
    # the job after the four alignment stages have trained
    bad = write_yaml(tmp_path / "bad.yaml", {"stages": {"ft_lora": {
        "peft": {"lora": {"lr": 2.0e-3, "rank": 16}}}}})  # fmt: skip
    results = tmp_path / "results"
    proc = snakemake(
        ["-n", "all", "--configfile", str(DEFAULT), str(bad), "--config", f"results_dir={results}"]
    )
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "stages.ft_lora.peft.lora" in proc.stdout and "'rank'" in proc.stdout
    assert "Job stats" not in proc.stdout
    assert not results.exists()


def test_snakemake_dry_run_rejects_a_peft_block_without_lr(snakemake, tmp_path: Path) -> None:
    cfg = load_yaml(DEFAULT)
    cfg["stages"]["ft_lora"]["peft"]["lora"].pop("lr")
    bad = write_yaml(tmp_path / "no_lr.yaml", cfg)
    results = tmp_path / "results"
    proc = snakemake(["-n", "all", "--configfile", str(bad), "--config", f"results_dir={results}"])
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert "stages.ft_lora.peft.lora: needs an 'lr'" in proc.stdout
    assert "Job stats" not in proc.stdout
