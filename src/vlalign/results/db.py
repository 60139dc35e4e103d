"""The results database: a DuckDB file rebuilt from the per-run files under ``results/``.

This module is the only writer of the database. Cluster jobs write their own JSON/CSV files
(docs/outputs.md); :func:`ingest` reads all of them and rebuilds the database from scratch into a
temporary file that is moved into place with ``os.replace``, so readers never see a half-written
database and a run whose directory was deleted disappears on the next ingest.
"""

from __future__ import annotations

import json
import logging
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd

from vlalign.io_utils import atomic_path
from vlalign.runs.record import RECORD_COLUMNS, ChainLink, RunRecord, RunRecordError

log = logging.getLogger(__name__)

# 2: rank curves per (run, dataset, positions); 3: the run record's columns (base_run, grid,
# method_order, prefix_length, chain) in runs; 4: resamples (image resamples of corpus metrics)
# and lm_text_loss; 5: train_log_terms (the PEFT methods' auxiliary loss terms per step);
# 6: recaption_quality (generated recaptions' metrics, data/<dataset>/recaption_quality.json);
# 7: download_stats (a downloaded URL list's row counts, data/<dataset>/download_stats.json)
SCHEMA_VERSION = 7
# Version of the metrics.json file format this reader understands (docs/outputs.md).
METRICS_FILE_VERSION = 1
TRAIN_LOG_COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s")

_DDL = {
    "meta": """CREATE TABLE meta (
        schema_version INTEGER NOT NULL, created_at TIMESTAMP, results_dir VARCHAR)""",
    # the run record's columns (vlalign.runs.record, one declaration for file and table), then
    # what the record is not: recipe, config and provenance
    "runs": f"""CREATE TABLE runs (
        {", ".join(f"{name} {sql}" for name, sql in RECORD_COLUMNS.items())},
        recipe VARCHAR, stage_chain VARCHAR, stage_hashes JSON, config JSON, git_commit VARCHAR,
        packages JSON, start_time TIMESTAMP, end_time TIMESTAMP, device VARCHAR)""",
    "metrics": """CREATE TABLE metrics (
        run VARCHAR NOT NULL, stage VARCHAR, dataset VARCHAR, split VARCHAR,
        metric VARCHAR NOT NULL, value DOUBLE NOT NULL, decoding JSON)""",
    # a metric's corpus score on each image resample (vlalign.eval.resampling); rows of the
    # same scheme_key and resample drew the same images
    "resamples": """CREATE TABLE resamples (
        run VARCHAR NOT NULL, stage VARCHAR, dataset VARCHAR, split VARCHAR,
        metric VARCHAR NOT NULL, decoding JSON, scheme_key VARCHAR NOT NULL,
        n_images INTEGER NOT NULL, resample INTEGER NOT NULL, value DOUBLE NOT NULL)""",
    # the pre-trained LM's per-token loss on each text kind of a dataset's images (seed 002
    # Fig. 5a): runs/_reference_lm/<dataset>/text_loss.json
    "lm_text_loss": """CREATE TABLE lm_text_loss (
        dataset VARCHAR NOT NULL, split VARCHAR, text VARCHAR NOT NULL, loss DOUBLE NOT NULL,
        tokens BIGINT, texts BIGINT, images BIGINT)""",
    "missing_metrics": """CREATE TABLE missing_metrics (
        run VARCHAR NOT NULL, metric VARCHAR NOT NULL, reason VARCHAR)""",
    "train_log": """CREATE TABLE train_log (
        run VARCHAR NOT NULL, stage VARCHAR NOT NULL, stage_index INTEGER NOT NULL,
        stage_hash VARCHAR, step BIGINT NOT NULL, global_step BIGINT NOT NULL, loss DOUBLE,
        lr DOUBLE, grad_norm DOUBLE, tokens_per_s DOUBLE, samples_per_s DOUBLE)""",
    # a train_log.csv's columns after TRAIN_LOG_COLUMNS: each auxiliary loss term a PEFT method
    # added at each step (``<method>.<term>``, weighted as added to the LM loss)
    "train_log_terms": """CREATE TABLE train_log_terms (
        run VARCHAR NOT NULL, stage VARCHAR NOT NULL, stage_index INTEGER NOT NULL,
        stage_hash VARCHAR, step BIGINT NOT NULL, global_step BIGINT NOT NULL,
        term VARCHAR NOT NULL, value DOUBLE)""",
    # a recaptioned dataset's generated text (vlalign.data.recaption.quality_records): length
    # statistics, caption metrics against its human captions, grounding against the world's
    "recaption_quality": """CREATE TABLE recaption_quality (
        dataset VARCHAR NOT NULL, recaption VARCHAR, split VARCHAR NOT NULL,
        metric VARCHAR NOT NULL, value DOUBLE NOT NULL)""",
    # a downloaded URL list's counts (vlalign.data.download): rows, succeeded, failed, failures
    # per reason (failed.<reason>) and rows per split (split.<split>)
    "download_stats": """CREATE TABLE download_stats (
        dataset VARCHAR NOT NULL, url_list VARCHAR, metric VARCHAR NOT NULL,
        value BIGINT NOT NULL)""",
    "rank_curve": """CREATE TABLE rank_curve (
        run VARCHAR NOT NULL, dataset VARCHAR, positions VARCHAR NOT NULL, reference VARCHAR,
        k INTEGER NOT NULL, cumulative DOUBLE NOT NULL)""",
    "rank_summary": """CREATE TABLE rank_summary (
        run VARCHAR NOT NULL, dataset VARCHAR, positions VARCHAR NOT NULL, reference VARCHAR,
        threshold DOUBLE, effective_rank DOUBLE, n_components INTEGER, samples INTEGER)""",
}
TABLES = tuple(t for t in _DDL if t != "meta")
# the columns that name a metrics row, and its resamples
RESAMPLE_KEY = ("run", "stage", "dataset", "split", "metric")


class ResultsInputError(ValueError):
    """A results file is malformed; the message names the file (and key/row/column)."""


class SchemaVersionError(RuntimeError):
    """The database was written by a different schema version (or is not a results DB)."""


# ---------------------------------------------------------------------------------------------
# reading the per-run files


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ResultsInputError(f"{path}: invalid JSON ({e})") from e


def _require(obj: dict, key: str, path: Path, types: type | tuple[type, ...]) -> Any:
    if not isinstance(obj, dict) or key not in obj:
        raise ResultsInputError(f"{path}: missing key {key!r}")
    if not isinstance(obj[key], types):
        raise ResultsInputError(
            f"{path}: key {key!r} has type {type(obj[key]).__name__}, expected {types}"
        )
    return obj[key]


def _parse_time(value: Any, path: Path, key: str) -> datetime | None:
    if value in (None, ""):
        return None
    try:
        t = datetime.fromisoformat(str(value))
    except ValueError as e:
        raise ResultsInputError(f"{path}: key {key!r} is not an ISO time: {value!r}") from e
    # Store naive UTC so times from different machines/time zones compare correctly.
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo else t


def _read_run_json(path: Path, run: str) -> tuple[dict, RunRecord]:
    """Return (runs row, record) of one run.json."""
    obj = _load_json(path)
    if not isinstance(obj, dict):
        raise ResultsInputError(f"{path}: expected a JSON object")
    name = _require(obj, "run", path, str)
    if name != run:
        raise ResultsInputError(f"{path}: 'run' is {name!r} but the directory is {run!r}")
    try:
        record = RunRecord.from_json(obj, path)
    except RunRecordError as e:
        raise ResultsInputError(str(e)) from e
    row = {
        **record.db_row(),
        "recipe": obj.get("recipe"),
        "stage_chain": ">".join(record.stage_names),
        "stage_hashes": json.dumps([link.hash for link in record.chain]),
        "config": json.dumps(obj.get("config", {}), sort_keys=True),
        "git_commit": obj.get("git_commit"),
        "packages": json.dumps(obj.get("packages", {}), sort_keys=True),
        "start_time": _parse_time(obj.get("start"), path, "start"),
        "end_time": _parse_time(obj.get("end"), path, "end"),
        "device": obj.get("device"),
    }
    return row, record


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _resample_rows(rec: dict, row: dict, where: str) -> list[dict]:
    block = rec.get("resamples")
    if block is None:
        return []
    scheme = block.get("scheme") if isinstance(block, dict) else None
    values = block.get("values") if isinstance(block, dict) else None
    if not isinstance(scheme, dict) or not {"key", "n_images"} <= set(scheme):
        raise ResultsInputError(f"{where}: resamples.scheme needs 'key' and 'n_images'")
    if not isinstance(values, list) or not all(_is_number(v) for v in values):
        raise ResultsInputError(f"{where}: resamples.values must be a list of finite numbers")
    base = {k: row[k] for k in ("run", "stage", "dataset", "split", "metric", "decoding")}
    return [
        {**base, "scheme_key": str(scheme["key"]), "n_images": int(scheme["n_images"]),
         "resample": k, "value": float(v)}
        for k, v in enumerate(values)
    ]


def _read_metrics_json(path: Path, run: str) -> tuple[list[dict], list[dict], list[dict]]:
    obj = _load_json(path)
    if not isinstance(obj, dict):
        raise ResultsInputError(f"{path}: expected a JSON object")
    version = obj.get("schema_version")
    if version != METRICS_FILE_VERSION:
        raise ResultsInputError(
            f"{path}: schema_version is {version!r}, this reader understands {METRICS_FILE_VERSION}"
        )
    if obj.get("run", run) != run:
        raise ResultsInputError(f"{path}: 'run' is {obj['run']!r} but the directory is {run!r}")
    records = _require(obj, "records", path, list)
    rows, seen, resamples = [], set(), []
    for i, rec in enumerate(records):
        where = f"{path}: records[{i}]"
        if not isinstance(rec, dict):
            raise ResultsInputError(f"{where} is not an object")
        for key in ("metric", "value"):
            if key not in rec:
                raise ResultsInputError(f"{where}: missing key {key!r}")
        if rec.get("run", run) != run:
            raise ResultsInputError(f"{where}: 'run' is {rec['run']!r}, expected {run!r}")
        if not _is_number(rec["value"]):
            # A metric that could not be computed belongs under "missing", never as 0/NaN.
            raise ResultsInputError(
                f"{where} ({rec['metric']}): value {rec['value']!r} is not a finite number; "
                "list metrics that could not be computed under 'missing'"
            )
        decoding = rec.get("decoding")
        if decoding is not None and not isinstance(decoding, dict):
            raise ResultsInputError(f"{where}: 'decoding' must be an object or null")
        row = {
            "run": run,
            "stage": rec.get("stage"),
            "dataset": rec.get("dataset"),
            "split": rec.get("split"),
            "metric": str(rec["metric"]),
            "value": float(rec["value"]),
            "decoding": None if decoding is None else json.dumps(decoding, sort_keys=True),
        }
        key = tuple(row[k] for k in ("stage", "dataset", "split", "metric", "decoding"))
        if key in seen:
            raise ResultsInputError(f"{where}: duplicate record {key}")
        seen.add(key)
        rows.append(row)
        resamples += _resample_rows(rec, row, where)
    missing = []
    for i, m in enumerate(obj.get("missing", []) or []):
        if not isinstance(m, dict) or "metric" not in m:
            raise ResultsInputError(f"{path}: missing[{i}] needs a 'metric' key")
        missing.append({"run": run, "metric": str(m["metric"]), "reason": m.get("reason")})
    return rows, missing, resamples


def _curve_part(obj: dict, path: Path, where: str) -> tuple[list, list, Any]:
    k = _require(obj, "k", path, list)
    cum = _require(obj, "cumulative", path, list)
    if len(k) != len(cum):
        raise ResultsInputError(
            f"{path}: {where}'k' has {len(k)} entries but 'cumulative' {len(cum)}"
        )
    for i, (a, b) in enumerate(zip(k, cum)):
        if not (isinstance(a, int) and not isinstance(a, bool)) or not _is_number(b):
            raise ResultsInputError(
                f"{path}: {where}entry {i} (k={a!r}, cumulative={b!r}) not numeric"
            )
    eff = obj.get("effective_rank")
    if eff is not None and not _is_number(eff):
        raise ResultsInputError(f"{path}: {where}key 'effective_rank' must be a number")
    return k, [float(c) for c in cum], eff


def _read_rank_curve(path: Path, run: str) -> tuple[list[pd.DataFrame], list[dict]]:
    """Curve rows and summary rows of one rank_curve.json: its main curve (``positions``:
    image+text, or text for a text-only model) and, if present, its ``text`` curve."""
    obj = _load_json(path)
    if not isinstance(obj, dict):
        raise ResultsInputError(f"{path}: expected a JSON object")
    threshold = obj.get("threshold")
    if threshold is not None and not _is_number(threshold):
        raise ResultsInputError(f"{path}: key 'threshold' must be a number")
    dataset, reference = obj.get("dataset"), obj.get("reference")
    parts = [(obj.get("positions", "image+text"), obj, "")]
    if obj.get("text") is not None:
        if not isinstance(obj["text"], dict):
            raise ResultsInputError(f"{path}: key 'text' must be an object")
        parts.append(("text", obj["text"], "text."))
    curves, summaries = [], []
    for positions, part, where in parts:
        k, cum, eff = _curve_part(part, path, where)
        key = {"run": run, "dataset": dataset, "positions": positions, "reference": reference}
        curves.append(pd.DataFrame({**key, "k": k, "cumulative": cum}))
        summaries.append(
            {
                **key,
                "threshold": threshold,
                "effective_rank": eff,
                "n_components": max(k) if k else None,
                "samples": obj.get("samples"),
            }
        )
    return curves, summaries


def _rank_curve_files(run_dir: Path) -> list[Path]:
    """A run's rank curves: its own (``rank_curve.json``), one per further evaluated dataset
    (``<dataset>/rank_curve.json``) and the before-PEFT references
    (``before_peft/<dataset>/rank_curve.json``); the prefix-variant sub-directories carry none."""
    files = [run_dir / "rank_curve.json"]
    for sub in (run_dir, run_dir / "before_peft"):
        if sub.is_dir():
            files += sorted(
                d / "rank_curve.json"
                for d in sub.iterdir()
                if d.is_dir() and d.name != "before_peft" and not d.name.startswith("variant-")
            )
    return [f for f in files if f.is_file()]


def _read_text_loss(path: Path) -> list[dict]:
    obj = _load_json(path)
    if not isinstance(obj, dict) or "dataset" not in obj:
        raise ResultsInputError(f"{path}: expected an object with 'dataset'")
    out = []
    for text in ("recaption", "captions"):
        part = obj.get(text)
        if part is None:  # no image has both texts: nothing to compare (never 0)
            continue
        if not isinstance(part, dict) or not _is_number(part.get("loss")):
            raise ResultsInputError(f"{path}: {text}.loss must be a finite number")
        out.append({"dataset": obj["dataset"], "split": obj.get("split"), "text": text,
                    "loss": float(part["loss"]), "tokens": part.get("tokens"),
                    "texts": part.get("texts"), "images": obj.get("images")})
    return out


def _read_train_log(path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise ResultsInputError(f"{path}: cannot parse CSV ({e})") from e
    df.columns = [c.strip() for c in df.columns]
    missing = [c for c in TRAIN_LOG_COLUMNS if c not in df.columns]
    if missing:
        raise ResultsInputError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    for col in df.columns:
        num = pd.to_numeric(df[col], errors="coerce")
        bad = num.isna() & df[col].notna() & (df[col].astype(str).str.lower() != "nan")
        if bad.any():
            row = int(bad.idxmax())
            raise ResultsInputError(
                f"{path}: row {row + 2} column {col!r} is not numeric: {df[col][row]!r}"
            )
        df[col] = num
    if df["step"].isna().any():
        raise ResultsInputError(f"{path}: column 'step' has empty values")
    df["step"] = df["step"].astype("int64")
    return df


def _stage_dir(link: ChainLink, results_dir: Path) -> Path:
    """Locate a chain stage's directory.

    ``dir`` in run.json is written relative to the workflow root (e.g. ``results/stages/<h>``);
    the hash under ``results_dir/stages`` is tried first so a moved results tree still works.
    """
    candidates = [results_dir / "stages" / link.hash]
    if link.dir is not None:
        d = Path(link.dir)
        candidates += [d] if d.is_absolute() else [d, results_dir.parent / d, results_dir / d]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def _read_recaption_quality(data_root: Path) -> list[dict]:
    """Every recaptioned dataset's quality records (``data/*/recaption_quality.json``)."""
    from vlalign.data.recaption import QUALITY_FILE

    out: list[dict] = []
    for path in sorted(data_root.glob(f"*/{QUALITY_FILE}")) if data_root.is_dir() else []:
        obj = _load_json(path)
        for i, rec in enumerate(_require(obj, "records", path, list)):
            where = f"records[{i}]"
            if not isinstance(rec, dict) or not _is_number(rec.get("value")):
                raise ResultsInputError(f"{path}: {where} needs a numeric 'value', got {rec!r}")
            out.append({k: rec.get(k) for k in ("dataset", "recaption", "split", "metric",
                                                 "value")})
    return out


def _read_download_stats(data_root: Path) -> list[dict]:
    """Every downloaded dataset's counts (``data/*/download_stats.json``), a row per count."""
    from vlalign.data.download import STATS_FILE

    out: list[dict] = []
    for path in sorted(data_root.glob(f"*/{STATS_FILE}")) if data_root.is_dir() else []:
        obj = _load_json(path)
        counts = {k: _require(obj, k, path, int) for k in ("rows", "succeeded", "failed")}
        for group, prefix in (("failures", "failed"), ("splits", "split")):
            for key, n in _require(obj, group, path, dict).items():
                if not isinstance(n, int):
                    raise ResultsInputError(f"{path}: {group}.{key} must be a count, got {n!r}")
                counts[f"{prefix}.{key}"] = n
        out += [{"dataset": path.parent.name, "url_list": obj.get("url_list"), "metric": k,
                 "value": n} for k, n in counts.items()]
    return out


def _collect(results_dir: Path) -> dict[str, pd.DataFrame]:
    runs_root = results_dir / "runs"
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results directory not found: {results_dir}")
    rows: dict[str, list] = {t: [] for t in TABLES}
    train_frames, term_frames, curve_frames = [], [], []
    run_dirs = sorted(p for p in runs_root.iterdir() if p.is_dir()) if runs_root.is_dir() else []
    for run_dir in run_dirs:
        run = run_dir.name
        run_json, metrics_json = run_dir / "run.json", run_dir / "metrics.json"
        curve_files = _rank_curve_files(run_dir)
        if not (run_json.exists() or metrics_json.exists() or curve_files):
            log.info("skipping %s: no run.json / metrics.json / rank_curve.json yet", run_dir)
            continue
        if run_json.exists():
            row, record = _read_run_json(run_json, run)
            rows["runs"].append(row)
            offset = 0
            for idx, link in enumerate(record.chain):
                csv = _stage_dir(link, results_dir) / "train_log.csv"
                if not csv.exists():
                    log.warning("%s: stage %s has no train log at %s", run_json, link.stage, csv)
                    continue
                df = _read_train_log(csv)
                df.insert(0, "run", run)
                df.insert(1, "stage", link.stage)
                df.insert(2, "stage_index", idx)
                df.insert(3, "stage_hash", link.hash)
                # global_step makes a run's whole chain plottable on one axis.
                df["global_step"] = df["step"] - (df["step"].min() if len(df) else 0) + offset
                offset = int(df["global_step"].max()) + 1 if len(df) else offset
                keys = ["run", "stage", "stage_index", "stage_hash", "step", "global_step"]
                extra = [c for c in df.columns if c not in (*keys, *TRAIN_LOG_COLUMNS)]
                if extra:
                    term_frames.append(
                        df.melt(id_vars=keys, value_vars=extra, var_name="term")
                        .dropna(subset=["value"])
                    )
                train_frames.append(df[list(dict.fromkeys([*keys, *TRAIN_LOG_COLUMNS]))])
        if metrics_json.exists():
            recs, missing, resamples = _read_metrics_json(metrics_json, run)
            rows["metrics"] += recs
            rows["resamples"] += resamples
            rows["missing_metrics"] += missing
        for loss_json in sorted(run_dir.glob("*/text_loss.json")):
            rows["lm_text_loss"] += _read_text_loss(loss_json)
        seen: dict[tuple, Path] = {}
        for curve_json in curve_files:
            curves, summaries = _read_rank_curve(curve_json, run)
            for summary in summaries:
                key = (summary["dataset"], summary["positions"], summary["reference"])
                if key in seen:
                    raise ResultsInputError(
                        f"{curve_json}: run {run!r} already has a rank curve of {key[1]} "
                        f"positions on dataset {key[0]!r} (in {seen[key]})"
                    )
                seen[key] = curve_json
            curve_frames += curves
            rows["rank_summary"] += summaries
    rows["recaption_quality"] = _read_recaption_quality(results_dir / "data")
    rows["download_stats"] = _read_download_stats(results_dir / "data")
    frames = {t: pd.DataFrame(r) for t, r in rows.items()}
    frames["train_log"] = pd.concat(train_frames, ignore_index=True) if train_frames else None
    frames["train_log_terms"] = (
        pd.concat(term_frames, ignore_index=True) if term_frames else None
    )
    frames["rank_curve"] = pd.concat(curve_frames, ignore_index=True) if curve_frames else None
    return frames


# ---------------------------------------------------------------------------------------------
# writing and reading the database


def ingest(results_dir: str | Path, db_path: str | Path) -> dict[str, int]:
    """Rebuild the database at ``db_path`` from every run under ``results_dir/runs``.

    Returns the number of rows per table. The previous database (if any) stays intact and
    readable until the new one is complete.
    """
    results_dir = Path(results_dir)
    frames = _collect(results_dir)
    counts: dict[str, int] = {}
    with atomic_path(db_path) as tmp:
        con = duckdb.connect(str(tmp))
        try:
            for ddl in _DDL.values():
                con.execute(ddl).fetchall()
            con.execute(
                "INSERT INTO meta VALUES (?, ?, ?)",
                [SCHEMA_VERSION, datetime.now(UTC).replace(tzinfo=None), str(results_dir)],
            ).fetchall()
            for table in TABLES:
                df = frames[table]
                if df is not None and len(df):
                    con.register("_frame", df)
                    con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM _frame").fetchall()
                    con.unregister("_frame")
                counts[table] = con.execute(f"SELECT count(*) FROM {table}").fetchall()[0][0]
            con.execute("CHECKPOINT").fetchall()
        finally:
            con.close()
    log.info("ingested %s into %s: %s", results_dir, db_path, counts)
    return counts


def connect_readonly(db_path: str | Path) -> duckdb.DuckDBPyConnection:
    """Open the database read-only after checking its schema version."""
    db_path = Path(db_path)
    if not db_path.is_file():
        raise FileNotFoundError(f"results database not found: {db_path} (run ingest first)")
    con = duckdb.connect(str(db_path), read_only=True)
    try:
        version = con.execute("SELECT max(schema_version) FROM meta").fetchall()[0][0]
    except duckdb.CatalogException as e:
        con.close()
        raise SchemaVersionError(f"{db_path}: not a vlalign results database (no meta)") from e
    if version != SCHEMA_VERSION:
        con.close()
        raise SchemaVersionError(
            f"{db_path}: database schema version is {version}, this vlalign reads version "
            f"{SCHEMA_VERSION}; rebuild it with `ingest` from the results directory"
        )
    return con


def query(db_path: str | Path, sql: str) -> pd.DataFrame:
    """Run one SQL query against a read-only connection and return the result as a DataFrame."""
    con = connect_readonly(db_path)
    try:
        return con.execute(sql).df()
    finally:
        con.close()


def resample_map(db_path: str | Path) -> dict[tuple, tuple[str, np.ndarray]]:
    """:data:`RESAMPLE_KEY` values → (scheme key, the row's resampled values in order)."""
    df = query(
        db_path,
        "SELECT run, stage, dataset, split, metric, scheme_key, "
        "list(value ORDER BY resample) AS vals FROM resamples GROUP BY ALL",
    )
    return {
        tuple(r[k] for k in RESAMPLE_KEY): (r["scheme_key"], np.asarray(r["vals"], dtype=float))
        for r in df.to_dict("records")
    }
