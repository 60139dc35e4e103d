"""Claims as data: verdicts follow the data (holds, contradicted, inconclusive), the shipped
declarations load and run against a results tree like the pipeline writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import make_results_tree

from vlalign.results.claims import (
    ClaimSpecError,
    claim_from_dict,
    evaluate_claim,
    load_claims,
    write_report,
)
from vlalign.results.db import ingest

REPO = Path(__file__).resolve().parents[1]


def _run(root: Path, run: str, seed: int, value: float, resamples=None) -> None:
    d = root / "runs" / run
    d.mkdir(parents=True)
    (d / "run.json").write_text(json.dumps({
        "run": run, "seed": seed, "recipe": "default", "config": {},
        "chain": [{"stage": "peft", "hash": f"h_{run}"}],
    }))
    rec = {"run": run, "stage": "peft", "dataset": "world_target", "split": "test",
           "metric": "CIDEr", "value": value}
    if resamples is not None:
        rec["resamples"] = {"scheme": {"key": "world_target/test/0", "n_images": 64},
                            "values": [float(x) for x in resamples]}
    (d / "metrics.json").write_text(json.dumps(
        {"schema_version": 1, "run": run, "records": [rec], "missing": []}))


CLAIM = {
    "name": "a_beats_b",
    "claim": "A beats B.",
    "source": "test",
    "metric": "CIDEr",
    "expected": "higher",
    "arm": {"run": "a", "metric": "CIDEr", "dataset": "world_target"},
    "baseline": {"run": "b", "metric": "CIDEr", "dataset": "world_target"},
}


@pytest.fixture
def db(tmp_path: Path) -> Path:
    """A is worse than B by 0.2 on every seed and image resample (B's images are A's)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "results"
    for seed in range(3):
        shared = rng.normal(1.0, 0.3, 200)
        _run(root, f"a_s{seed}", seed, 0.8, shared - 0.2)
        _run(root, f"b_s{seed}", seed, 1.0, shared)
        # c equals b up to image noise that flips sign: no evidence either way
        _run(root, f"c_s{seed}", seed, 1.0, shared + rng.normal(0, 0.05, 200))
    out = tmp_path / "r.duckdb"
    ingest(root, out)
    return out


def test_contradicted_when_the_data_say_the_opposite(db: Path):
    r = evaluate_claim(db, claim_from_dict(CLAIM, "test"))
    assert r.verdict == "contradicted"
    assert r.comparison.diff == pytest.approx(-0.2) and r.comparison.p < 0.01
    assert r.comparison.n == 3 and "bootstrap" in r.comparison.method


def test_holds_when_the_direction_is_the_one_claimed(db: Path):
    r = evaluate_claim(db, claim_from_dict({**CLAIM, "expected": "lower"}, "test"))
    assert r.verdict == "holds"


def test_inconclusive_without_evidence_or_data(db: Path):
    noisy = {**CLAIM, "arm": {"run": "c", "metric": "CIDEr", "dataset": "world_target"}}
    assert evaluate_claim(db, claim_from_dict(noisy, "test")).verdict == "inconclusive"
    absent = {**CLAIM, "arm": {"run": "nope", "metric": "CIDEr"}}
    r = evaluate_claim(db, claim_from_dict(absent, "test"))
    assert r.verdict == "inconclusive" and "no data" in r.note


def test_report_files(db: Path, tmp_path: Path):
    claims_dir = tmp_path / "claims"
    claims_dir.mkdir()
    (claims_dir / "c.yaml").write_text(yaml.safe_dump({"claims": [CLAIM]}))
    paths = write_report(db, claims_dir, tmp_path / "out")
    assert sorted(p.name for p in paths) == ["claims.csv", "claims.md", "claims.png",
                                            "claims.tex"]
    md = (tmp_path / "out" / "claims.md").read_text()
    assert "**contradicted**" in md and "A beats B." in md


@pytest.mark.parametrize("bad, match", [
    ({"expected": "more"}, "expected must be"),
    ({"colour": 1}, "unknown key"),
    ({"arm": {"run": "a"}}, "an arm is"),
    ({"arm": {"run": "a; DROP", "metric": "CIDEr"}}, "not a plain name"),
])
def test_bad_declarations_name_the_claim(bad, match):
    with pytest.raises(ClaimSpecError, match=match):
        claim_from_dict({**CLAIM, **bad}, "claims.yaml")


def test_shipped_claims_run_on_a_results_tree(tmp_path: Path):
    """Every shipped claim's queries run against a tree like the pipeline writes; the
    recap-vs-human claims find their three seeds there."""
    make_results_tree(tmp_path)
    db = tmp_path / "r.duckdb"
    ingest(tmp_path / "results", db)
    claims = load_claims(REPO / "config" / "claims")
    assert len(claims) >= 8
    by_name = {c.name: evaluate_claim(db, c) for c in claims}
    fast = by_name["recap_converges_faster"]
    assert fast.arm.n == 3 and fast.baseline.n == 3 and fast.comparison is not None
