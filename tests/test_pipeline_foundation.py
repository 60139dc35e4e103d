"""The foundation of the DAG (datasets → tokenizer → backbones) run by the real Snakemake CLI on
``tests/configs/tiny.yaml``: outputs load with the libraries' own loaders, every job leaves a log
and a benchmark, a rerun is a no-op, and a config change reruns exactly what depends on it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml
from datasets import load_from_disk
from transformers import AutoImageProcessor, AutoTokenizer

from vlalign.config import load_config
from vlalign.data.schema import FEATURES, SPLITS
from vlalign.data.tokenizer import load_tokenizer, vlm_token_ids
from vlalign.models import backbones as bb

pytestmark = pytest.mark.slow

TIMEOUT = 420
# Every job of the foundation, as (rule, wildcard) → the log / benchmark stem under results/.
JOBS = {
    "dataset/world": "dataset/world",
    "dataset/world_target": "dataset/world_target",
    "tokenizer": "tokenizer",
    "backbone/vision": "backbone/vision",
    "backbone/lm": "backbone/lm",
}


def _targets(results: Path, cfg: dict) -> list[str]:
    # The foundation outputs, not `all`: `all` grows with the later rule families, and this test
    # must stay a quick check of the first ones.
    return [
        *(str(results / "data" / name) for name in cfg["datasets"]),
        str(results / "tokenizer"),
        str(results / "backbones" / "vision"),
        str(results / "backbones" / "lm"),
    ]


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


@pytest.fixture(scope="module")
def tiny_cfg(tiny_config_path: Path) -> dict:
    return load_config(tiny_config_path)


@pytest.fixture(scope="module")
def pipeline(snakemake, tiny_config_path: Path, tiny_cfg: dict, tmp_path_factory):
    """Run the foundation once; returns (results dir, common args, first run's output)."""
    results = tmp_path_factory.mktemp("pipeline") / "results"
    common = ["--configfile", str(tiny_config_path), "--config", f"results_dir={results}"]
    proc = snakemake(["--cores", "2", *_targets(results, tiny_cfg), *common], timeout=TIMEOUT)
    if proc.returncode != 0:
        logs = "\n".join(
            f"--- {p}\n{_tail(p.read_text(), 1500)}" for p in sorted(results.glob("logs/**/*.log"))
        )
        pytest.fail(f"snakemake failed ({proc.returncode}):\n{_tail(proc.stdout)}\n{logs}")
    return results, common, proc.stdout


def test_first_run_ran_every_job(pipeline) -> None:
    _, _, out = pipeline
    for rule, n in [("dataset", 2), ("tokenizer", 1), ("backbone", 2)]:
        assert out.count(f"rule {rule}:") == n, (rule, _tail(out))


def test_datasets_load_with_schema(pipeline, tiny_cfg: dict) -> None:
    results, _, _ = pipeline
    for name, spec in tiny_cfg["datasets"].items():
        dsd = load_from_disk(str(results / "data" / name))
        assert set(dsd) == set(SPLITS), name
        for split in SPLITS:
            ds = dsd[split]
            assert ds.features == FEATURES, (name, split)
            assert len(ds) == spec["splits_sizes"][split], (name, split)
            assert set(ds["split"]) == {split}
            metas = [json.loads(m) for m in ds["meta"]]
            assert {m["domain"] for m in metas} == {spec["domain"]}
            assert all(1 <= len(m["objects"]) <= tiny_cfg["world"]["max_objects"] for m in metas)
            assert all(im.size == (tiny_cfg["world"]["image_size"],) * 2 for im in ds["image"])
    # Splits never share a scene.
    dsd = load_from_disk(str(results / "data" / "world"))
    ids = [i for s in SPLITS for i in dsd[s]["image_id"]]
    assert len(ids) == len(set(ids))


def test_tokenizer_loads(pipeline, tiny_cfg: dict) -> None:
    results, _, _ = pipeline
    tok = load_tokenizer(results / "tokenizer")
    assert len(tok) == tiny_cfg["tokenizer"]["vocab_size"]
    ids = vlm_token_ids(tok)
    assert len(set(ids.values())) == len(ids)
    # Trained on both corpora: target-domain words round-trip.
    text = "There is a teal hexagon on a dark blue background."
    assert tok.decode(tok(text, add_special_tokens=False).input_ids) == text


def test_backbones_load_with_from_pretrained(pipeline, tiny_cfg: dict) -> None:
    results, _, _ = pipeline
    vdir, ldir = results / "backbones" / "vision", results / "backbones" / "lm"
    vision = bb.load_vision(vdir)
    for key, value in tiny_cfg["vision"]["config"].items():
        assert getattr(vision.config, key) == value, key
    processor = AutoImageProcessor.from_pretrained(str(vdir))
    dsd = load_from_disk(str(results / "data" / "world"))
    pix = bb.pixel_tensor(processor, dsd["test"]["image"][:2])
    assert vision(pixel_values=pix).last_hidden_state.shape[-1] == vision.config.hidden_size

    lm = bb.load_lm(ldir)
    tok = AutoTokenizer.from_pretrained(str(results / "tokenizer"))
    assert lm.config.vocab_size == len(tok)
    assert lm.config.hidden_size == tiny_cfg["lm"]["config"]["hidden_size"]
    # The LM directory carries the same tokenizer.
    assert AutoTokenizer.from_pretrained(str(ldir)).get_vocab() == tok.get_vocab()

    for d, kind in [(vdir, "vision"), (ldir, "lm")]:
        metrics = json.loads((d / bb.METRICS_FILE).read_text())
        assert metrics["pretrained_here"] is True, kind
        assert metrics["steps"] == tiny_cfg[kind]["pretrain"]["steps"], kind
    lm_metrics = json.loads((ldir / bb.METRICS_FILE).read_text())
    assert lm_metrics["heldout_perplexity"] > 1.0
    v_metrics = json.loads((vdir / bb.METRICS_FILE).read_text())
    assert set(v_metrics["probe_accuracy"]) == {"shape", "colour", "size", "count", "position"}


def test_every_job_wrote_log_and_benchmark(pipeline) -> None:
    results, _, _ = pipeline
    logs = {p.relative_to(results / "logs").with_suffix("").as_posix()
            for p in (results / "logs").rglob("*.log")}  # fmt: skip
    assert logs == set(JOBS.values())
    for stem in JOBS.values():
        log = (results / "logs" / f"{stem}.log").read_text()
        assert "INFO vlalign" in log, stem  # the job's own logging landed in its log
        bench = results / "benchmarks" / f"{stem}.tsv"
        with bench.open() as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
        assert len(rows) == 1, stem
        assert {"s", "max_rss"} <= set(rows[0]), (stem, rows[0].keys())
        assert float(rows[0]["s"]) > 0, stem
        assert rows[0]["max_rss"] not in ("", "NA"), stem
    benches = {p.relative_to(results / "benchmarks").with_suffix("").as_posix()
               for p in (results / "benchmarks").rglob("*.tsv")}  # fmt: skip
    assert benches == set(JOBS.values())


def test_second_run_is_noop(snakemake, pipeline, tiny_cfg: dict) -> None:
    results, common, _ = pipeline
    proc = snakemake(["--cores", "2", *_targets(results, tiny_cfg), *common], timeout=TIMEOUT)
    assert proc.returncode == 0, _tail(proc.stdout)
    assert "Nothing to be done" in proc.stdout, _tail(proc.stdout)


def _override(tmp_path: Path, data: dict) -> str:
    path = tmp_path / "override.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_lm_change_reruns_only_lm_backbone(
    snakemake, pipeline, tiny_cfg: dict, tiny_config_path: Path, tmp_path: Path
) -> None:
    results, _, _ = pipeline
    steps = tiny_cfg["lm"]["pretrain"]["steps"] + 1
    # Nested numbers cannot go through --config (Snakemake parses nested values as strings),
    # so the override is a second config file, merged onto the first.
    override = _override(tmp_path, {"lm": {"pretrain": {"steps": steps}}})
    args = ["--configfile", str(tiny_config_path), override, "--config", f"results_dir={results}"]
    proc = snakemake(["-n", *_targets(results, tiny_cfg), *args])
    assert proc.returncode == 0, _tail(proc.stdout)
    assert "Params have changed" in proc.stdout
    assert proc.stdout.count("rule backbone:") == 1 and "wildcards: kind=lm" in proc.stdout
    for rule in ("dataset", "tokenizer"):
        assert f"rule {rule}:" not in proc.stdout, rule


def test_world_change_reruns_dataset_rule(
    snakemake, pipeline, tiny_cfg: dict, tiny_config_path: Path, tmp_path: Path
) -> None:
    results, _, _ = pipeline
    new_max = tiny_cfg["world"]["max_objects"] - 1
    override = _override(tmp_path, {"world": {"max_objects": new_max}})
    args = ["--configfile", str(tiny_config_path), override, "--config", f"results_dir={results}"]
    dry = snakemake(["-n", *_targets(results, tiny_cfg), *args])
    assert dry.returncode == 0, _tail(dry.stdout)
    assert dry.stdout.count("rule dataset:") == 2, _tail(dry.stdout)
    assert "Params have changed" in dry.stdout
    # Everything downstream of the data follows.
    assert "rule tokenizer:" in dry.stdout and dry.stdout.count("rule backbone:") == 2

    world_dir = results / "data" / "world"
    before = (world_dir / "dataset_dict.json").stat().st_mtime_ns
    proc = snakemake(["--cores", "2", str(world_dir), *args], timeout=TIMEOUT)
    assert proc.returncode == 0, _tail(proc.stdout)
    assert "rule dataset:" in proc.stdout
    assert (world_dir / "dataset_dict.json").stat().st_mtime_ns != before
    dsd = load_from_disk(str(world_dir))
    counts = [len(json.loads(m)["objects"]) for s in SPLITS for m in dsd[s]["meta"]]
    assert max(counts) <= new_max


def test_all_target_includes_the_foundation(
    snakemake, tiny_config_path, tiny_cfg, tmp_path
) -> None:
    results = tmp_path / "fresh"
    proc = snakemake(
        ["-n", "all", "--configfile", str(tiny_config_path), "--config", f"results_dir={results}"]
    )
    assert proc.returncode == 0, _tail(proc.stdout)
    for target in _targets(results, tiny_cfg):
        assert f"output: {target}" in proc.stdout, target
    assert not results.exists()
