"""Results database: ingest of a realistic results tree (docs/outputs.md formats), rebuild
semantics, schema versioning, read-only access and errors that name the bad file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import duckdb
import pytest
from helpers import make_results_tree, write_curve, write_json

from vlalign.config import load_config
from vlalign.results.db import (
    SCHEMA_VERSION,
    ResultsInputError,
    SchemaVersionError,
    connect_readonly,
    ingest,
    query,
)
from vlalign.runs.plan import plan
from vlalign.runs.record import (
    RECORD_FIELDS,
    RunRecord,
    RunRecordError,
    before_peft,
    build_record,
    evaluate_params,
    peft_summary,
    write_run_record,
)

REPO = Path(__file__).resolve().parents[1]

@pytest.fixture
def tree(tmp_path: Path) -> tuple[Path, Path, dict[str, int]]:
    expected = make_results_tree(tmp_path, seeds=(0, 1))
    return tmp_path / "results", tmp_path / "results" / "results.duckdb", expected


def _snapshot(db: Path) -> dict:
    con = connect_readonly(db)
    try:
        return {
            t: con.execute(f"SELECT * FROM {t} ORDER BY ALL").fetchall()
            for t in ("runs", "metrics", "missing_metrics", "train_log", "rank_curve",
                      "rank_summary")
        }
    finally:
        con.close()


def test_ingest_counts_and_idempotent(tree):
    results, db, expected = tree
    counts = ingest(results, db)
    for table, n in expected.items():
        assert counts[table] == n, table
    first = _snapshot(db)
    assert ingest(results, db) == counts
    assert _snapshot(db) == first
    assert query(db, "SELECT schema_version FROM meta")["schema_version"].tolist() == [
        SCHEMA_VERSION
    ]
    # nothing but the database itself is left in the results directory
    assert not [p for p in results.iterdir() if p.name.startswith(".results.duckdb")]


def test_runs_and_train_log_content(tree):
    results, db, _ = tree
    ingest(results, db)
    runs = query(db, "SELECT * FROM runs ORDER BY run").set_index("run")
    assert runs.loc["prefix_lora_s1", "stage_chain"] == "prefix>lora"
    assert len(json.loads(runs.loc["prefix_lora_s1", "stage_hashes"])) == 2
    assert runs.loc["recap_s0", "start_time"].hour == 8  # +02:00 stored as UTC
    # a run without metrics.json yet is still listed
    assert "pending_s0" in runs.index
    assert query(db, "SELECT count(*) AS n FROM metrics WHERE run='pending_s0'")["n"][0] == 0
    # the config is JSON that SQL can reach into
    pl = query(
        db,
        "SELECT run, CAST(json_extract(config, '$.peft.prefix_length') AS INT) AS p "
        "FROM runs WHERE run LIKE 'prefix_lora%' ORDER BY run",
    )
    # prefix_lora_p16_s*, prefix_lora_p4_s*, prefix_lora_s*
    assert pl["p"].tolist() == [16, 16, 4, 4, 16, 16]
    # a run's train log is its chain's stage logs, concatenated in chain order
    log = query(db, "SELECT * FROM train_log WHERE run='lora_prefix_s0' ORDER BY global_step")
    assert log["stage"].tolist() == ["lora"] * 9 + ["prefix"] * 8
    assert log["global_step"].tolist() == list(range(17))
    assert log["step"].tolist() == list(range(1, 10)) + list(range(1, 9))
    assert log[["loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s"]].notna().all().all()
    missing = query(db, "SELECT DISTINCT metric, reason FROM missing_metrics")
    assert missing["metric"].tolist() == ["SPICE"]
    dec = query(db, "SELECT DISTINCT json_extract(decoding, '$.num_beams')::INT AS b FROM metrics")
    assert dec["b"].tolist() == [5]


def test_rank_curves_per_dataset_positions_and_reference(tree):
    results, db, _ = tree
    ingest(results, db)
    s = query(db, "SELECT * FROM rank_summary")
    ref = s[s["run"] == "_reference_lm"]
    assert sorted(ref["dataset"]) == ["world", "world_target"]
    assert set(ref["positions"]) == {"text"} and set(ref["reference"]) == {"pretrained_lm"}
    before = s[s["reference"] == "before_peft"]
    assert set(before["run"]) == {"recap_s0", "recap_s1"}
    assert set(before["dataset"]) == {"world_target"}
    lora = s[s["run"] == "lora_s0"].set_index("positions")
    assert lora.loc["image+text", "n_components"] == 80 and lora.loc["text", "n_components"] == 16
    assert lora["dataset"].tolist() == ["world_target"] * 2 and lora["reference"].isna().all()
    curve = query(db, "SELECT * FROM rank_curve WHERE run = 'recap_s0' AND positions = 'text'")
    assert sorted(curve.groupby("dataset").size().items()) == [("world", 16), ("world_target", 16)]
    # a prefix variant's curve (2 samples) is not a row; one curve twice is an error
    write_curve(results, "lora_s0", 80, 0.5, "world_target", "variant-noise")
    assert ingest(results, db)["rank_summary"] == len(s)
    write_curve(results, "lora_s0", 80, 0.5, "world_target", "world_target")
    with pytest.raises(ResultsInputError, match=r"lora_s0/world_target/rank_curve\.json: run "
                       r"'lora_s0' already has a rank curve of image\+text positions on dataset "
                       r"'world_target'"):
        ingest(results, db)


def test_deleted_run_disappears(tree):
    results, db, expected = tree
    ingest(results, db)
    shutil.rmtree(results / "runs" / "lora_s1")
    counts = ingest(results, db)
    assert counts["runs"] == expected["runs"] - 1
    for table in ("runs", "metrics", "missing_metrics", "train_log", "rank_curve"):
        assert query(db, f"SELECT count(*) AS n FROM {table} WHERE run='lora_s1'")["n"][0] == 0


def test_schema_version_mismatch(tree):
    results, db, _ = tree
    ingest(results, db)
    con = duckdb.connect(str(db))
    con.execute("UPDATE meta SET schema_version = 99")
    con.close()
    with pytest.raises(SchemaVersionError, match=rf"version is 99.*reads version {SCHEMA_VERSION}"):
        connect_readonly(db)
    with pytest.raises(SchemaVersionError):
        query(db, "SELECT 1")
    other = db.parent / "other.duckdb"
    duckdb.connect(str(other)).close()
    with pytest.raises(SchemaVersionError, match="not a vlalign results database"):
        connect_readonly(other)
    with pytest.raises(FileNotFoundError, match="nope.duckdb"):
        connect_readonly(db.parent / "nope.duckdb")


def test_readonly_connection_cannot_write(tree):
    results, db, _ = tree
    ingest(results, db)
    con = connect_readonly(db)
    try:
        with pytest.raises(duckdb.Error, match="read-only"):
            con.execute("DELETE FROM runs")
        with pytest.raises(duckdb.Error, match="read-only"):
            con.execute("CREATE TABLE x (a INT)")
    finally:
        con.close()
    assert query(db, "SELECT count(*) AS n FROM runs")["n"][0] > 0


def _run_json(results: Path, run: str) -> dict:
    return json.loads((results / "runs" / run / "run.json").read_text())


def test_record_fields_are_the_runs_columns(tree):
    """One declared list: the record's fields are the first columns of ``runs``, filled from
    run.json as written; a field missing from a file is an error naming file and key."""
    results, db, _ = tree
    ingest(results, db)
    cols = query(db, "SELECT column_name FROM (DESCRIBE runs)")["column_name"].tolist()
    assert tuple(cols[: len(RECORD_FIELDS)]) == RECORD_FIELDS
    assert {"run", "base_run", "seed", "grid", "method_order", "prefix_length", "chain"} == set(
        RECORD_FIELDS
    )
    runs = query(db, f"SELECT {', '.join(RECORD_FIELDS)} FROM runs").set_index("run")
    cell = runs.loc["prefix_lora_p4_s1"]
    assert (cell["base_run"], cell["seed"], cell["grid"]) == ("prefix_lora_p4", 1, "plen")
    assert (cell["method_order"], cell["prefix_length"]) == ("prefix+lora", 4)
    assert list(cell["chain"]) == ["prefix", "lora"]
    recap = runs.loc["recap_s0"]
    assert recap[["grid", "method_order", "prefix_length"]].isna().all()
    assert list(recap["chain"]) == ["stage0", "stage1"]
    assert runs.loc["lora_prefix_s0", "method_order"] == "lora+prefix"
    obj = _run_json(results, "lora_s0")
    for key in RECORD_FIELDS:
        broken = {k: v for k, v in obj.items() if k != key}
        with pytest.raises(RunRecordError, match=rf"run\.json: missing key '{key}'"):
            RunRecord.from_json(broken, results / "runs/lora_s0/run.json")


def test_record_from_the_plan_round_trips_through_run_json(tmp_path, monkeypatch):
    import vlalign.runs.provenance as provenance

    monkeypatch.setattr(provenance, "device_name", lambda: "cpu")  # no torch import
    config = load_config(REPO / "tests" / "configs" / "tiny_full.yaml")
    stages, runs = plan(config)
    cell = build_record(runs["prefix_len-num_prefix2_s0"], stages, lambda h: f"r/stages/{h}")
    assert (cell.base_run, cell.seed, cell.grid) == ("prefix_len-num_prefix2", 0, "prefix_len")
    assert (cell.method_order, cell.prefix_length) == ("prefix+lora", 2)
    assert cell.stage_names == ["stage0", "stage1", "pt_prefix", "ft_lora_prefix"]
    align = build_record(runs["align_s0"], stages, lambda h: h)
    assert (align.grid, align.method_order, align.prefix_length) == (None, None, None)
    assert before_peft(runs, stages) == [("align_s0", "world_target")]
    # the evaluate rule's parameters (JSON on the command line) → run.json → the same record
    params = json.loads(json.dumps(
        evaluate_params(config, runs["prefix_lora_s1"], stages, lambda h: f"r/stages/{h}")))
    assert params["config"]["peft"]["prefix_length"] == 16 and params["datasets"]
    path = write_run_record(tmp_path / "runs" / "prefix_lora_s1", params, "2025-01-01T00:00:00")
    obj = json.loads(path.read_text())
    assert obj["record_version"] == 2 and obj["start"] == "2025-01-01T00:00:00" <= obj["end"]
    record = RunRecord.from_json(obj, path)
    assert record == build_record(runs["prefix_lora_s1"], stages, lambda h: f"r/stages/{h}")
    assert record.method_order == "prefix+lora" and record.base_run == "prefix_lora"
    with pytest.raises(RunRecordError, match="no record fields"):
        write_run_record(tmp_path, {"run": "x_s0", "seed": 0, "chain": []})


def test_peft_summary_order_and_prefix_length():
    from vlalign.methods.prefix import PrefixMethod

    chain = [{"peft": None}, {"peft": {"lora": {"r": 4}}}, {"peft": {"prefix": {"lr": 1e-3}}}]
    summary = peft_summary(chain)
    assert summary["order"] == "lora+prefix" and summary["methods"] == ["lora", "prefix"]
    # no num_prefix in the block: the prefix method's own default, not a copy of it
    assert summary["prefix_length"] == PrefixMethod.defaults["num_prefix"]
    assert peft_summary([{"peft": {"prefix": {"num_prefix": 4}}}, {"peft": None}]) is None


def test_version_1_run_json_is_read_with_derived_fields(tree):
    """run.json files written before the record (no record_version) still ingest: the fields
    come from the run name and the config's peft summary and run.grid, as those files had them."""
    results, db, _ = tree
    obj = _run_json(results, "prefix_lora_p4_s0")
    for key in ("record_version", "base_run", "grid", "method_order", "prefix_length"):
        del obj[key]
    obj["config"] = {"run": {"grid": "plen"}, "peft": {"order": "prefix+lora", "prefix_length": 4}}
    write_json(results / "runs/prefix_lora_p4_s0/run.json", obj)
    ingest(results, db)
    row = query(db, "SELECT * FROM runs WHERE run = 'prefix_lora_p4_s0'").iloc[0]
    assert (row["base_run"], row["seed"], row["grid"]) == ("prefix_lora_p4", 0, "plen")
    assert (row["method_order"], row["prefix_length"]) == ("prefix+lora", 4)
    assert list(row["chain"]) == ["prefix", "lora"]


@pytest.mark.parametrize(
    "corrupt, match",
    [
        (
            lambda r: (r / "runs/lora_s0/metrics.json").write_text("{not json"),
            r"runs/lora_s0/metrics\.json: invalid JSON",
        ),
        (
            lambda r: write_json(
                r / "runs/lora_s0/metrics.json",
                {
                    "schema_version": 1,
                    "run": "lora_s0",
                    "records": [{"metric": "CIDEr", "value": None, "stage": "lora"}],
                },
            ),
            r"runs/lora_s0/metrics\.json: records\[0\] \(CIDEr\).*not a finite number",
        ),
        (
            lambda r: write_json(
                r / "runs/lora_s0/metrics.json",
                {"schema_version": 2, "run": "lora_s0", "records": []},
            ),
            r"metrics\.json: schema_version is 2",
        ),
        (
            lambda r: write_json(r / "runs/lora_s0/run.json", {"run": "other", "chain": []}),
            r"runs/lora_s0/run\.json: 'run' is 'other'",
        ),
        (
            lambda r: write_json(
                r / "runs/lora_s0/run.json", {**_run_json(r, "lora_s0"), "record_version": 9}
            ),
            r"runs/lora_s0/run\.json: record_version is 9, this vlalign reads versions 1 and 2",
        ),
        (
            lambda r: write_json(
                r / "runs/lora_s0/run.json", {**_run_json(r, "lora_s0"), "prefix_length": "16"}
            ),
            r"runs/lora_s0/run\.json: key 'prefix_length' must be int or null, got '16'",
        ),
        (
            lambda r: write_json(
                r / "runs/lora_s0/rank_curve.json", {"k": [1, 2], "cumulative": [0.5]}
            ),
            r"rank_curve\.json: 'k' has 2 entries but 'cumulative' 1",
        ),
    ],
)
def test_bad_input_names_the_file(tree, corrupt, match):
    results, db, _ = tree
    ingest(results, db)
    before = _snapshot(db)
    corrupt(results)
    with pytest.raises(ResultsInputError, match=match):
        ingest(results, db)
    # the failed rebuild left the previous database intact and no temp files behind
    assert _snapshot(db) == before
    assert sorted(p.name for p in results.iterdir()) == ["results.duckdb", "runs", "stages"]


@pytest.mark.parametrize(
    "stats, match",
    [
        ({"rows": 3, "succeeded": 2, "failures": {}, "splits": {}}, r"missing key 'failed'"),
        ({"rows": 3, "succeeded": 2, "failed": 1, "failures": {"timeout": "1"}, "splits": {}},
         r"failures\.timeout must be a count, got '1'"),
    ],
)
def test_bad_download_stats_name_the_file(tree, stats, match):
    results, db, _ = tree
    write_json(results / "data/cc/download_stats.json", stats)
    with pytest.raises(ResultsInputError, match=r"data/cc/download_stats\.json: " + match):
        ingest(results, db)


def test_train_log_bad_columns(tree):
    results, db, _ = tree
    run = json.loads((results / "runs/recap_s0/run.json").read_text())
    csv = results / "stages" / run["chain"][1]["hash"] / "train_log.csv"
    text = csv.read_text()
    csv.write_text(text.replace(",grad_norm", ",gradnorm", 1))
    with pytest.raises(ResultsInputError, match=rf"{csv}: missing column\(s\) \['grad_norm'\]"):
        ingest(results, db)
    lines = text.splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[1], "oops", 1)
    csv.write_text("\n".join(lines) + "\n")
    with pytest.raises(ResultsInputError, match=rf"{csv}: row 4 column 'loss'.*'oops'"):
        ingest(results, db)


def test_empty_results_dir(tmp_path):
    (tmp_path / "results").mkdir()
    counts = ingest(tmp_path / "results", tmp_path / "r.duckdb")
    assert set(counts.values()) == {0}
    assert query(tmp_path / "r.duckdb", "SELECT * FROM runs").empty
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        ingest(tmp_path / "missing_dir", tmp_path / "r.duckdb")


def test_auxiliary_loss_columns_become_train_log_terms(tree):
    # a PEFT method's named extra-loss terms (PeftSession.loss_terms) are train_log.csv columns
    results, db, _ = tree
    run = json.loads((results / "runs/recap_s0/run.json").read_text())
    csv = results / "stages" / run["chain"][1]["hash"] / "train_log.csv"
    lines = csv.read_text().splitlines()
    lines[0] += ",info_bottleneck.kl,dma.loss"
    for i in range(1, len(lines)):
        lines[i] += f",{0.01 * i},{'' if i == 1 else 0.5}"  # dma.loss absent at step 1
    csv.write_text("\n".join(lines) + "\n")
    counts = ingest(results, db)
    terms = query(db, "SELECT * FROM train_log_terms WHERE run = 'recap_s0' ORDER BY term, step")
    n = len(lines) - 1
    assert counts["train_log_terms"] == len(terms) == 2 * n - 1
    kl = terms[terms["term"] == "info_bottleneck.kl"]
    assert kl["value"].tolist() == pytest.approx([0.01 * i for i in range(1, n + 1)])
    assert kl["step"].tolist() == list(range(1, n + 1))
    assert set(kl["stage"]) == {run["chain"][1]["stage"]}
    # train_log keeps its own columns, joined on (run, global_step)
    joined = query(db, "SELECT count(*) AS n FROM train_log_terms t JOIN train_log l "
                       "USING (run, stage_index, global_step) WHERE t.run = 'recap_s0'")
    assert joined["n"][0] == 2 * n - 1
