"""The whole DAG (issues 4–6) by the real Snakemake CLI on ``tests/configs/tiny_full.yaml``:
data → tokenizer → backbones → features → stages (shared prefixes trained once) → PEFT stages →
evaluation → DuckDB → tables / plots; then up-to-date checks, a forced single evaluation, the
Snakemake report, and config validation before any job.

The DAG runs once per module (a few minutes on 2 busy CPU cores).
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from vlalign.config import load_config
from vlalign.eval.caption_metrics import spice_missing_reason
from vlalign.eval.grounding import ATTR_METRICS, OBJECT_METRICS
from vlalign.results.db import query
from vlalign.runs.plan import RunNode, StageNode, plan

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "configs" / "tiny_full.yaml"
TIMEOUT = 900
COCO_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr")
STAGE_METRICS = ("trainable_params", "trainable_pct", "heldout_loss")
DB_TABLES = ("runs", "metrics", "missing_metrics", "train_log", "rank_curve", "rank_summary")
TABLE_NAMES = sorted(p.stem for p in (REPO / "config" / "tables").glob("*.yaml"))


@dataclass
class Dag:
    results: Path
    common: list[str]  # --configfile / --config arguments of every call
    stdout: str
    stages: dict[str, StageNode]
    runs: dict[str, RunNode]


def _tail(text: str, n: int = 4000) -> str:
    return text[-n:]


def _logs(results: Path) -> str:
    return "\n".join(
        f"--- {p}\n{_tail(p.read_text(errors='replace'), 1500)}"
        for p in sorted(results.glob("logs/**/*.log"))
    )


@pytest.fixture(scope="module")
def cfg() -> dict:
    return load_config(CONFIG)


@pytest.fixture(scope="module")
def dag(snakemake, cfg: dict, tmp_path_factory) -> Dag:
    results = tmp_path_factory.mktemp("full_dag") / "results"
    common = ["--configfile", str(CONFIG), "--config", f"results_dir={results}"]
    proc = snakemake(["--cores", "2", "all", *common], timeout=TIMEOUT)
    if proc.returncode != 0:
        pytest.fail(f"snakemake all failed ({proc.returncode}):\n{_tail(proc.stdout)}\n"
                    f"{_logs(results)}")
    stages, runs = plan(cfg)
    return Dag(results, common, proc.stdout, stages, runs)


def _jobs(stdout: str, rule: str) -> int:
    return len(re.findall(rf"^(?:local)?rule {rule}:", stdout, flags=re.M))


def _metrics(dag: Dag, run: str) -> dict:
    return json.loads((dag.results / "runs" / run / "metrics.json").read_text())


# ------------------------------------------------------------------------ the DAG itself
def test_every_stage_trained_once_and_shared(dag: Dag, cfg: dict) -> None:
    out = dag.stdout
    assert _jobs(out, "train_stage") == len(dag.stages), _tail(out)
    assert _jobs(out, "evaluate") == len(dag.runs), _tail(out)
    for rule in ("aggregate", "tables", "plots", "tokenizer"):
        assert _jobs(out, rule) == 1, rule
    # the pre-trained LM's reference curve on each evaluated dataset; align_s0 (the model
    # before PEFT) on prefix_lora's dataset
    evaluated = {d for node in dag.runs.values() for d in node.eval_datasets}
    assert _jobs(out, "reference_rank") == len(evaluated) == 2
    assert _jobs(out, "rank_before_peft") == 1
    # one training log per stage hash, and a stage directory for each
    logs = {p.stem for p in (dag.results / "logs" / "train_stage").glob("*.log")}
    assert logs == set(dag.stages)
    assert {p.name for p in (dag.results / "stages").iterdir()} == set(dag.stages)
    for h in dag.stages:
        assert out.count(f"wildcards: hash={h}") == 1, h
    # align's stage1 is the second stage of every run; both prefix_lora seeds reuse it
    align_stage1 = dag.runs["align_s0"].stages[1]
    assert dag.stages[align_stage1].name == "stage1"
    expected = {f"{r}_s{s}" for r, spec in cfg["runs"].items() for s in spec["seeds"]}
    expected |= {"prefix_len-num_prefix2_s0", "prefix_len-num_prefix16_s0",
                 "petal_few_shot-max_train_samples8_s0"}
    assert set(dag.runs) == expected
    # the grid cell equal to prefix_lora_s0 is the same stages (trained once), another run
    assert dag.runs["prefix_len-num_prefix16_s0"].stages == dag.runs["prefix_lora_s0"].stages
    for name, node in dag.runs.items():
        assert node.stages[1] == align_stage1, name
    s0, s1 = dag.runs["prefix_lora_s0"].stages, dag.runs["prefix_lora_s1"].stages
    assert s0[:2] == s1[:2] and s0[2:] != s1[2:]  # the PEFT stages follow the run's seed
    for h in dag.stages:
        stage = json.loads((dag.results / "stages" / h / "stage.json").read_text())
        assert stage["hash"] == h and stage["name"] == dag.stages[h].name
        assert stage["steps"] == cfg["train"]["max_steps"]


def test_every_job_wrote_log_and_benchmark(dag: Dag) -> None:
    logs = {p.relative_to(dag.results / "logs").with_suffix("").as_posix()
            for p in (dag.results / "logs").rglob("*.log")}  # fmt: skip
    benches = {p.relative_to(dag.results / "benchmarks").with_suffix("").as_posix()
               for p in (dag.results / "benchmarks").rglob("*.tsv")}  # fmt: skip
    assert logs == benches
    assert {f"evaluate/{r}" for r in dag.runs} | {f"train_stage/{h}" for h in dag.stages} <= logs


def test_run_metrics_contract(dag: Dag) -> None:
    spice_reason = spice_missing_reason()
    for run, node in dag.runs.items():
        m = _metrics(dag, run)
        assert m["run"] == run and m["schema_version"] == 1
        stages = {r["stage"] for r in m["records"] if "@" not in r["stage"]}
        assert stages == {dag.stages[node.stages[-1]].name}, run
        main = {r["metric"]: r["value"] for r in m["records"] if "@" not in r["stage"]}
        ranks = {"effective_rank_0.9", "effective_rank_text_0.9"}
        assert set(COCO_METRICS) | {"VQA_acc", *ranks, *STAGE_METRICS} <= set(main)
        for name in COCO_METRICS:
            assert 0.0 <= main[name] <= 1.0 + 1e-9, (run, name)
        assert 0.0 < main["effective_rank_0.9"] <= 1.0
        assert 0.0 < main["effective_rank_text_0.9"] <= 1.0
        assert main["trainable_params"] > 0 and 0 < main["trainable_pct"] < 100
        for rec in m["records"]:
            assert rec["decoding"]["num_beams"] == 1 and rec["split"] == "test"
        if spice_reason is not None:  # no CoreNLP jars: SPICE is missing, never 0
            assert all(r["metric"] != "SPICE" for r in m["records"]), run
            assert "SPICE" in {x["metric"] for x in m["missing"]}, run
        curve = json.loads((dag.results / "runs" / run / "rank_curve.json").read_text())
        assert curve["effective_rank"] == pytest.approx(main["effective_rank_0.9"])
        preds = (dag.results / "runs" / run / "predictions.jsonl").read_text().splitlines()
        assert preds and all("prediction" in json.loads(x) for x in preds)


def test_captions_are_not_trivial(dag: Dag) -> None:
    # a pipeline that only ever decodes <eos> would score 0 everywhere and still "pass"
    lines = (dag.results / "runs" / "align_s0" / "predictions.jsonl").read_text().splitlines()
    preds = [json.loads(x)["prediction"] for x in lines if json.loads(x)["task"] == "caption"]
    assert any(p.strip() for p in preds), preds
    bleu1 = [r["value"] for run in dag.runs for r in _metrics(dag, run)["records"]
             if r["metric"] == "Bleu_1"]  # fmt: skip
    assert max(bleu1) > 0


def test_prefix_variant_records(dag: Dag) -> None:
    # only prefix_lora asks for the removed-prefix variant (its run-level eval override)
    for run in dag.runs:
        variants = {r["stage"] for r in _metrics(dag, run)["records"] if "@" in r["stage"]}
        if run.startswith("prefix_lora_"):
            assert variants == {"ft_lora_prefix@prefix_removed"}, run
            recs = [r for r in _metrics(dag, run)["records"] if "@" in r["stage"]]
            assert {r["metric"] for r in recs} >= set(COCO_METRICS)
            assert all(r["decoding"]["prefix_variant"] == "removed" for r in recs)
        else:
            assert not variants, run


def test_run_json_provenance(dag: Dag) -> None:
    for run, node in dag.runs.items():
        info = json.loads((dag.results / "runs" / run / "run.json").read_text())
        assert info["run"] == run and info["seed"] == node.seed and info["recipe"] == "tiny_full"
        assert [c["hash"] for c in info["chain"]] == node.stages
        assert [c["stage"] for c in info["chain"]] == [dag.stages[h].name for h in node.stages]
        assert re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown", info["git_commit"])
        for pkg in ("torch", "transformers", "peft", "snakemake", "pycocoevalcap", "duckdb"):
            assert info["packages"][pkg] == importlib.metadata.version(pkg), pkg
        assert info["start"] <= info["end"] and isinstance(info["device"], str) and info["device"]
        peft = info["config"].get("peft")
        if run == "align_s0":
            assert peft is None
            continue
        grid = info["config"]["run"].get("grid")
        if info["config"]["run"].get("study") == "petal":  # PETAL's cells: their own methods
            expected = "lora" if run == "petal_lora64_s0" else "dma+instruction_moe+info_bottleneck"
            assert peft["order"] == expected and "prefix_length" not in peft, run
            continue
        assert peft["order"] == "prefix+lora", run
        if run.startswith("prefix_lora_"):
            assert peft["prefix_length"] == 16 and grid is None
        else:
            assert grid == "prefix_len"
            assert peft["prefix_length"] == int(run.split("num_prefix")[1].split("_")[0])
    if shutil.which("git"):  # inside a git checkout the commit is the checkout's
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                              capture_output=True, text=True)
        if head.returncode == 0:
            info = json.loads((dag.results / "runs" / "align_s0" / "run.json").read_text())
            assert info["git_commit"].split("-")[0] == head.stdout.strip()


# ------------------------------------------------------------------------ DuckDB
def _counts(db: Path) -> dict[str, int]:
    return {t: int(query(db, f"SELECT count(*) AS n FROM {t}")["n"][0]) for t in DB_TABLES}


def test_results_db(dag: Dag) -> None:
    db = dag.results / "results.duckdb"
    counts = _counts(db)
    for table in ("runs", "metrics", "train_log", "rank_curve"):
        assert counts[table] > 0, table
    runs = query(db, "SELECT run, stage_chain, seed FROM runs ORDER BY run")
    assert list(runs["run"]) == sorted(dag.runs)
    chains = dict(zip(runs["run"], runs["stage_chain"]))
    assert chains["prefix_lora_s1"] == "stage0>stage1>pt_prefix>ft_lora_prefix"
    n_records = sum(len(_metrics(dag, r)["records"]) for r in dag.runs)
    assert counts["metrics"] == n_records
    # the train log holds every chain stage's steps, per run
    steps = query(db, "SELECT run, count(*) AS n, count(DISTINCT stage_hash) AS s "
                      "FROM train_log GROUP BY run")  # fmt: skip
    for run, n, s in zip(steps["run"], steps["n"], steps["s"]):
        node = dag.runs[run]
        assert s == len(node.stages) and n == sum(
            len((dag.results / "stages" / h / "train_log.csv").read_text().splitlines()) - 1
            for h in node.stages
        ), run
    # rank rows: every run on its dataset (image+text and text positions), the pre-trained LM
    # on each dataset (text), the model before PEFT on the PEFT runs' dataset
    rows = query(db, "SELECT run, dataset, positions, coalesce(reference, '') AS reference "
                     "FROM rank_summary")  # fmt: skip
    got = set(zip(rows["run"], rows["dataset"], rows["positions"], rows["reference"]))
    expected = {(r, node.eval_datasets[0], pos, "") for r, node in dag.runs.items()
                for pos in ("image+text", "text")}  # fmt: skip
    expected |= {("_reference_lm", d, "text", "pretrained_lm") for d in ("world", "world_target")}
    expected |= {("align_s0", "world_target", pos, "before_peft") for pos in ("image+text", "text")}
    assert got == expected
    missing = set(query(db, "SELECT DISTINCT metric FROM missing_metrics")["metric"])
    if spice_missing_reason() is not None:
        assert "SPICE" in missing
    # 3-step models may write captions that state no attribute: those metrics are missing
    assert missing - {"SPICE"} <= {*ATTR_METRICS, *OBJECT_METRICS}, missing


def test_petal_cells_train_both_tasks_and_log_their_terms(dag: Dag) -> None:
    # PETAL (seed 001): one model per cell scored on captions and VQA, behind its prompts; the
    # information bottleneck's KL term logged per step, in the stage log and the database
    db = dag.results / "results.duckdb"
    metrics = {r["metric"] for r in _metrics(dag, "petal_s0")["records"]}
    assert {"CIDEr", "ROUGE1_F", "ROUGEL_R", "VQA_acc", "grounding_gap"} <= metrics
    assert {"dma.lambda_gap", "dma.gamma_abs_dev"} <= metrics  # the methods' diagnostics
    stage = dag.runs["petal_s0"].stages[-1]
    with (dag.results / "stages" / stage / "train_log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows and all(float(r["info_bottleneck.kl"]) > 0 for r in rows)
    terms = query(db, "SELECT term, count(*) AS n, min(value) AS lo FROM train_log_terms "
                      "WHERE run = 'petal_s0' GROUP BY term")  # fmt: skip
    assert terms["term"].tolist() == ["info_bottleneck.kl"] and terms["n"][0] == len(rows)
    assert query(db, "SELECT count(*) AS n FROM train_log_terms WHERE run = 'petal_lora64_s0'"
                 )["n"][0] == 0  # LoRA adds no term
    # the few-shot cell trained on exactly its 8 samples
    few = dag.runs["petal_few_shot-max_train_samples8_s0"].stages[-1]
    assert json.loads((dag.results / "stages" / few / "stage.json").read_text())[
        "train_samples"] == 8
    # the trainable share differs between PETAL and LoRA (a table of identical columns is void)
    pct = {r: next(x["value"] for x in _metrics(dag, r)["records"]
                   if x["metric"] == "trainable_pct") for r in ("petal_s0", "petal_lora64_s0")}
    assert pct["petal_s0"] != pct["petal_lora64_s0"]


def test_reingest_keeps_counts(dag: Dag, tmp_path: Path) -> None:
    db = tmp_path / "again.duckdb"
    shutil.copy(dag.results / "results.duckdb", db)
    proc = subprocess.run(
        [sys.executable, "-m", "vlalign", "results", "ingest", "--results", str(dag.results),
         "--db", str(db)],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    printed = dict(line.split("\t") for line in proc.stdout.strip().splitlines())
    before = _counts(dag.results / "results.duckdb")
    assert {t: int(printed[t]) for t in DB_TABLES} == before
    assert _counts(db) == before


# ------------------------------------------------------------------------ tables and plots
def test_every_table_rendered(dag: Dag) -> None:
    assert TABLE_NAMES
    for name in TABLE_NAMES:
        for ext in ("tex", "csv", "md"):
            path = dag.results / "tables" / f"{name}.{ext}"
            assert path.is_file() and path.stat().st_size > 0, path
        tex = (dag.results / "tables" / f"{name}.tex").read_text()
        assert "\\toprule" in tex and "\\bottomrule" in tex, name
    def rows(name: str) -> list[dict]:
        with (dag.results / "tables" / f"{name}.csv").open() as f:
            return list(csv.DictReader(f))

    methods = {next(iter(r.values())) for r in rows("peft_methods")}
    assert {"prefix_lora", "prefix_len-num_prefix2", "prefix_len-num_prefix16"} <= methods
    # the sweep's cells, one row per prefix length (the cell equal to prefix_lora included)
    assert sorted(int(r["prefix_length"]) for r in rows("ablation_prefix_length")) == [2, 16]
    # named runs only, at the default prefix length 16; a study's runs (PETAL) have their own
    assert [next(iter(r.values())) for r in rows("ablation_order")] == ["prefix_lora"]
    assert "petal" not in methods and "petal_lora64" not in methods
    assert [r["method"] for r in rows("petal_ablation")] == ["petal", "petal_lora64"]
    assert [(r["shots"], r["method"]) for r in rows("petal_few_shot")] == [
        ("8", "petal"), ("all", "petal"), ("all", "lora64")]
    assert list((dag.results / "plots").glob("*.png"))


# ------------------------------------------------------------------------ reruns
def test_single_run_target_is_up_to_date(snakemake, dag: Dag) -> None:
    target = dag.results / "runs" / "align_s0" / "metrics.json"
    proc = snakemake(["--cores", "1", str(target), *dag.common], timeout=TIMEOUT)
    assert proc.returncode == 0, _tail(proc.stdout)
    assert "Nothing to be done" in proc.stdout, _tail(proc.stdout)


def test_report_contains_tables_and_plots(snakemake, dag: Dag, tmp_path: Path) -> None:
    report = tmp_path / "report.zip"
    proc = snakemake(["--report", str(report), *dag.common], timeout=TIMEOUT)
    assert proc.returncode == 0, _tail(proc.stdout)
    names = zipfile.ZipFile(report).namelist()
    for name in TABLE_NAMES:
        assert any(n.endswith(f"{name}.md") for n in names), name
    assert any(n.endswith(".png") for n in names), names[:20]
    assert any(n.endswith("report.html") for n in names)


def test_forcerun_reruns_exactly_that_evaluation(snakemake, dag: Dag) -> None:
    run = "align_s0"
    target = dag.results / "runs" / run / "metrics.json"
    watched = [dag.results / "runs" / r / "metrics.json" for r in dag.runs]
    watched += [dag.results / "stages" / h / "stage.json" for h in dag.stages]
    before = {p: p.stat().st_mtime_ns for p in watched}
    old = json.loads(target.read_text())
    proc = snakemake(["--cores", "2", str(target), "--forcerun", "evaluate", *dag.common],
                     timeout=TIMEOUT)
    assert proc.returncode == 0, _tail(proc.stdout)
    assert _jobs(proc.stdout, "evaluate") == 1 and f"wildcards: run={run}" in proc.stdout
    assert len(re.findall(r"^(?:local)?rule \w+:", proc.stdout, flags=re.M)) == 1
    after = {p: p.stat().st_mtime_ns for p in watched}
    assert after[target] > before[target]
    assert {p for p in watched if after[p] != before[p]} == {target}
    # greedy decoding of the same stage: the same metrics again
    new = json.loads(target.read_text())
    assert {(r["stage"], r["metric"]): r["value"] for r in new["records"]} == {
        (r["stage"], r["metric"]): r["value"] for r in old["records"]
    }


# ------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "bad, word",
    [
        ({"bogus_option": 1}, "bogus_option"),
        ({"stages": {"stage1": {"bogus_setting": 2}}}, "bogus_setting"),
        ({"eval": {"prefix_variant": ["removed"]}}, "prefix_variant"),
    ],
    ids=["top_level", "stage", "eval"],
)
def test_unknown_config_key_fails_before_any_job(
    snakemake, tmp_path: Path, bad: dict, word: str
) -> None:
    override = tmp_path / "bad.yaml"
    override.write_text(yaml.safe_dump(bad))
    results = tmp_path / "results"
    proc = snakemake(["--cores", "1", "all", "--configfile", str(CONFIG), str(override),
                      "--config", f"results_dir={results}"], timeout=300)
    assert proc.returncode != 0
    assert word in proc.stdout, _tail(proc.stdout)
    assert not re.search(r"^(?:local)?rule \w+:", proc.stdout, flags=re.M), _tail(proc.stdout)
    assert not results.exists()
