"""Results database (DuckDB), paper tables from SQL, and plots. See docs/results.md."""

from __future__ import annotations

import argparse
import logging

from vlalign.config import REPO_ROOT
from vlalign.results.db import (
    SCHEMA_VERSION,
    ResultsInputError,
    SchemaVersionError,
    connect_readonly,
    ingest,
    query,
)

__all__ = [
    "SCHEMA_VERSION",
    "ResultsInputError",
    "SchemaVersionError",
    "connect_readonly",
    "ingest",
    "query",
    "main",
]


def main(argv: list[str] | None = None) -> int:
    """``ingest`` / ``tables`` / ``claims`` / ``plots`` / ``query`` entry point (for the CLI and Snakemake)."""
    p = argparse.ArgumentParser(prog="vlalign results", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ingest", help="rebuild the DuckDB file from results/runs")
    s.add_argument("--results", default="results")
    s.add_argument("--db", default="results/results.duckdb")
    s = sub.add_parser("tables", help="render config/tables/*.yaml to .tex/.csv/.md")
    s.add_argument("--db", default="results/results.duckdb")
    # default: the checkout's declarations, wherever the command runs from
    s.add_argument("--tables-dir", default=str(REPO_ROOT / "config" / "tables"))
    s.add_argument("--out", default="results/tables")
    s = sub.add_parser("claims", help="check config/claims/*.yaml: claims.{md,tex,csv,png}")
    s.add_argument("--db", default="results/results.duckdb")
    s.add_argument("--claims-dir", default=str(REPO_ROOT / "config" / "claims"))
    s.add_argument("--out", default="results/claims")
    s = sub.add_parser("plots", help="write the default figures (PNG + PDF)")
    s.add_argument("--db", default="results/results.duckdb")
    s.add_argument("--out", default="results/plots")
    s = sub.add_parser("query", help="run one SQL query and print the result")
    s.add_argument("--db", default="results/results.duckdb")
    s.add_argument("sql")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.cmd == "ingest":
        for table, n in ingest(args.results, args.db).items():
            print(f"{table}\t{n}")
    elif args.cmd == "tables":
        from vlalign.results.tables import render_all

        for path in render_all(args.db, args.tables_dir, args.out):
            print(path)
    elif args.cmd == "claims":
        from vlalign.results.claims import write_report

        for path in write_report(args.db, args.claims_dir, args.out):
            print(path)
    elif args.cmd == "plots":
        from vlalign.results.plots import plot_all

        for path in plot_all(args.db, args.out):
            print(path)
    else:
        print(query(args.db, args.sql).to_string(index=False))
    return 0
