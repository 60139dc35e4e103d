"""Same config, same numbers (issue 10 point 6): every random draw on the path config → metrics
derives from the config's ``seed``, so two runs of the real Snakemake CLI from empty results
directories on the same machine write identical backbones and identical metrics.

One module fixture runs the pipeline twice, into two directories: first the foundation (data →
tokenizer → ``backbone`` rule), then, in the same directories, a one-run DAG (features → one
stage with a trained projector, input noise, LoRA (dropout) and a prefix → evaluation with the
prefix ``noise`` variant). Config: ``tests/configs/tiny.yaml`` plus the smallest training and
evaluation sections (and only its ``world`` dataset).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

TIMEOUT = 420
RUN = "det_s0"

# tiny.yaml + one short run, evaluated on the caption task only (greedy, few tokens, no SPICE).
EXTRA = {
    "model": {"projector": "mlp2x_gelu", "attn_implementation": "sdpa"},
    "features": {"batch_size": 32, "dtype": "float32"},
    "train": {
        "max_steps": 2,
        "batch_size": 8,
        "micro_batch_size": 8,
        "warmup_ratio": 0.0,
        "max_length": 48,
        "checkpoint_every": 1000,
    },
    "stages": {
        "s": {
            "mask": "prefix",
            "noise": 0.2,  # stage0-style input corruption: its own seeded generator
            "dataset": "world",
            "text": "captions",
            "lr": {"vision": 0, "projector": 1.0e-3, "lm": 0},
            # LoRA's dropout (0.05 by default) draws from torch's global generator in training
            "peft": {"lora": {"lr": 2.0e-3, "r": 2, "alpha": 4},
                     "prefix": {"lr": 5.0e-3, "num_prefix": 4}},
        }
    },
    "runs": {"det": {"chain": ["s"], "seeds": [0], "eval_datasets": ["world"]}},
    "eval": {
        "split": "test",
        "task": "caption",
        "num_beams": 1,
        "max_new_tokens": 6,
        "batch_size": 8,
        "spice": "off",
        "rank_samples": 2,
        "rank_text_tokens": 4,
        "prefix_variants": ["normal", "noise"],  # noise: drawn from the run's seed
    },
}


@dataclass
class Twin:
    results: Path
    common: list[str]


def _tail(text: str, n: int = 3000) -> str:
    return text[-n:]


def _run(snakemake, twin: Twin, targets: list[str]) -> None:
    proc = snakemake(["--cores", "2", *targets, *twin.common], timeout=TIMEOUT)
    if proc.returncode != 0:
        logs = "\n".join(
            f"--- {p}\n{_tail(p.read_text(errors='replace'), 1500)}"
            for p in sorted(twin.results.glob("logs/**/*.log"))
        )
        pytest.fail(f"snakemake failed ({proc.returncode}):\n{_tail(proc.stdout)}\n{logs}")


@pytest.fixture(scope="module")
def config_path(tiny_config_path: Path, tmp_path_factory) -> Path:
    cfg = yaml.safe_load(tiny_config_path.read_text())
    del cfg["datasets"]["world_target"]  # one dataset job less per run
    cfg["tokenizer"]["corpus"] = ["world"]
    cfg.update(EXTRA)
    path = tmp_path_factory.mktemp("determinism_cfg") / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def twins(config_path: Path, tmp_path_factory) -> list[Twin]:
    out = []
    for name in ("a", "b"):
        results = tmp_path_factory.mktemp(f"determinism_{name}") / "results"
        common = ["--configfile", str(config_path), "--config", f"results_dir={results}"]
        out.append(Twin(results, common))
    return out


@pytest.fixture(scope="module")
def backbones(snakemake, twins: list[Twin]) -> list[Twin]:
    """The ``backbone`` rule (and what it needs) run into each of two empty directories."""
    for twin in twins:
        _run(snakemake, twin, [str(twin.results / "backbones" / k) for k in ("vision", "lm")])
    return twins


@pytest.fixture(scope="module")
def dags(snakemake, backbones: list[Twin]) -> list[Twin]:
    """The rest of the one-run DAG, in the same two directories."""
    for twin in backbones:
        _run(snakemake, twin, [str(twin.results / "runs" / RUN / "metrics.json")])
    return backbones


def _tensors(directory: Path) -> dict:
    files = sorted(directory.glob("*.safetensors"))
    assert files, f"no safetensors in {directory}"
    out = {}
    for f in files:
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return out


@pytest.mark.parametrize("kind", ["vision", "lm"])
def test_backbone_rule_twice_gives_identical_weights(backbones: list[Twin], kind: str) -> None:
    a, b = (_tensors(t.results / "backbones" / kind) for t in backbones)
    assert a.keys() == b.keys()
    differ = {
        k: float((a[k].float() - b[k].float()).abs().max())
        for k in a
        if a[k].shape != b[k].shape or not bool((a[k] == b[k]).all())
    }
    assert not differ, f"{kind}: {len(differ)} of {len(a)} tensors differ (max |Δw|): {differ}"


def _metrics(results: Path) -> list[tuple]:
    recs = json.loads((results / "runs" / RUN / "metrics.json").read_text())["records"]
    return sorted(
        (r["metric"], r.get("dataset"), r["stage"], json.dumps(r.get("decoding"), sort_keys=True),
         r["value"])
        for r in recs
    )


def _text(path: Path) -> str:
    assert path.is_file(), path
    return path.read_text()


def test_dag_twice_gives_identical_metrics_and_predictions(dags: list[Twin]) -> None:
    a, b = dags
    ma, mb = _metrics(a.results), _metrics(b.results)
    names = {m[0] for m in ma}
    # the run was evaluated (captions, grounding) and its noise variant too
    assert {"CIDEr", "grounding_gap"} <= names, sorted(names)
    assert any("@prefix_noise" in m[2] for m in ma), ma
    assert ma == mb, [(x, y) for x, y in zip(ma, mb) if x != y]
    run_a, run_b = a.results / "runs" / RUN, b.results / "runs" / RUN
    for rel in ("predictions.jsonl", "variant-noise/predictions.jsonl", "rank_curve.json"):
        assert _text(run_a / rel) == _text(run_b / rel), rel
    # the trained stage too: its losses and gradient norms per step (not its timings)
    logs = [sorted(t.results.glob("stages/*/train_log.csv")) for t in dags]
    assert len(logs[0]) == 1 and len(logs[1]) == 1, logs
    la, lb = (_train_log(p[0]) for p in logs)
    assert la and la == lb


def _train_log(path: Path) -> list[tuple]:
    with path.open() as f:
        return [(r["step"], r["loss"], r["lr"], r["grad_norm"]) for r in csv.DictReader(f)]
