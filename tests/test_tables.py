"""Tables declared as YAML: exact LaTeX for known numbers, CSV/Markdown, the shipped
declarations on a realistic results tree, and pdflatex compilation of every generated .tex."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml
from helpers import make_results_tree

from vlalign.results.db import ingest
from vlalign.results.tables import (
    TableSpecError,
    latex_escape,
    load_specs,
    render_all,
    render_table,
    spec_from_dict,
    to_latex,
)

REPO = Path(__file__).resolve().parents[1]
TABLES_DIR = REPO / "config" / "tables"


def _run(root: Path, run: str, seed: int, metrics: dict[str, float], chain: str = "peft") -> None:
    d = root / "runs" / run
    d.mkdir(parents=True)
    (d / "run.json").write_text(
        json.dumps(
            {
                "run": run,
                "seed": seed,
                "recipe": "default",
                "config": {"seed": seed},
                "chain": [{"stage": s, "hash": f"h_{run}_{s}"} for s in chain.split(">")],
            }
        )
    )
    records = [
        {
            "run": run,
            "stage": chain.split(">")[-1],
            "dataset": "world_target",
            "split": "test",
            "metric": m,
            "value": v,
        }
        for m, v in metrics.items()
    ]
    (d / "metrics.json").write_text(
        json.dumps({"schema_version": 1, "run": run, "records": records, "missing": []})
    )


@pytest.fixture
def known_db(tmp_path: Path) -> Path:
    """Numbers chosen so mean, std, best and second are known by hand."""
    root = tmp_path / "results"
    _run(root, "prefix_lora_s0", 0, {"CIDEr": 1.20, "Bleu_4": 0.30, "trainable_pct": 0.54})
    _run(root, "prefix_lora_s1", 1, {"CIDEr": 1.30, "Bleu_4": 0.32, "trainable_pct": 0.54})
    _run(root, "lora_s0", 0, {"CIDEr": 1.00, "Bleu_4": 0.35, "trainable_pct": 0.5})
    _run(root, "lora_s1", 1, {"CIDEr": 1.10, "Bleu_4": 0.33, "trainable_pct": 0.5})
    _run(root, "full_ft_s0", 0, {"CIDEr": 1.15, "trainable_pct": 100.0})
    db = tmp_path / "results.duckdb"
    ingest(root, db)
    return db


METHOD_SQL = "r.base_run"  # the run record's column (known_db's run.json files are version 1)
KNOWN_SPEC = {
    "name": "known",
    "caption": "Known numbers (×100) & 50% of_it",
    "label": "tab:known",
    "query": f"""SELECT {METHOD_SQL} AS method, r.seed, m.metric, m.value
                 FROM metrics m JOIN runs r USING (run)
                 WHERE m.metric IN ('CIDEr', 'Bleu_4')""",
    "rows": "method",
    "columns": "metric",
    "seed": "seed",
    "scale": 100,
    "decimals": 1,
    "better": "higher",
    "column_order": {"metric": ["Bleu_4", "CIDEr"]},
    "labels": {"method": "Method", "Bleu_4": "B@4"},
    "extra_columns": [
        {
            "name": "trainable_pct",
            "label": "Trainable %",
            "position": "first",
            "query": f"""SELECT {METHOD_SQL} AS method, r.seed, m.value FROM metrics m
                     JOIN runs r USING (run) WHERE m.metric = 'trainable_pct'""",
            "scale": 1,
            "decimals": 2,
            "aggregate": "mean",
        }
    ],
}

KNOWN_TEX = r"""\begin{table}[t]
\centering
\caption{Known numbers ($\times$100) \& 50\% of\_it}
\label{tab:known}
\begin{tabular}{lccc}
\toprule
Method & Trainable \% & B@4 & CIDEr \\
\midrule
full\_ft & 100.00 & -- & \underline{115.0} \\
lora & 0.50 & \textbf{34.0 $\pm$ 1.4} & 105.0 $\pm$ 7.1 \\
 &  & {\scriptsize [21.3, 46.7]} & {\scriptsize [41.5, 168.5]} \\
prefix\_lora & 0.54 & 31.0 $\pm$ 1.4 & \textbf{125.0 $\pm$ 7.1} \\
 &  & {\scriptsize [18.3, 43.7]} & {\scriptsize [61.5, 188.5]} \\
\bottomrule
\end{tabular}
\end{table}
"""


def test_known_numbers_exact_latex(known_db):
    result = render_table(known_db, spec_from_dict(KNOWN_SPEC))
    # B@4 has only two values: best is bold, nothing is "second" out of two.
    # full_ft has no Bleu_4: "--", never 0.
    # Two seeds: a t interval under each row, mean ± t(0.975, 1) · std / sqrt(2) (by hand:
    # 31.0 ± 12.706 · 1.414 / 1.414 = [18.3, 43.7]).
    assert to_latex(result) == KNOWN_TEX
    cider = result.columns.index(next(c for c in result.columns if c.key == ("CIDEr",)))
    cell = result.cells[(("prefix_lora",), cider)]
    assert cell.n == 2 and math.isclose(cell.std, math.sqrt(50), rel_tol=1e-9)


def test_unranked_rows_are_shown_but_never_marked(known_db):
    # prefix_lora has the best CIDEr; declared a reference row, it keeps its value unmarked and
    # the best of the remaining rows is bold
    spec = spec_from_dict({**KNOWN_SPEC, "unranked_rows": ["prefix_lora"]})
    result = render_table(known_db, spec)
    cider = result.columns.index(next(c for c in result.columns if c.key == ("CIDEr",)))
    assert result.cells[(("prefix_lora",), cider)].rank is None
    assert result.cells[(("prefix_lora",), cider)].mean == 125.0
    assert result.cells[(("full_ft",), cider)].rank == "best"
    with pytest.raises(TableSpecError, match="unranked_rows must be a list"):
        spec_from_dict({**KNOWN_SPEC, "unranked_rows": "prefix_lora"}, source="s.yaml")


def test_lower_is_better_and_per_column_format(known_db):
    spec = spec_from_dict(
        {
            **KNOWN_SPEC,
            "better": "lower",
            "extra_columns": [],
            "column_format": {"Bleu_4": {"better": None}},
        }
    )
    tex = to_latex(render_table(known_db, spec))
    assert r"\textbf{105.0 $\pm$ 7.1}" in tex and r"\underline{115.0}" in tex
    assert r"\textbf{34.0" not in tex  # Bleu_4 highlighting switched off per column


def test_ties_are_all_bold(tmp_path):
    root = tmp_path / "results"
    for run, v in (("a_s0", 0.5), ("b_s0", 0.5004), ("c_s0", 0.25)):
        _run(root, run, 0, {"CIDEr": v})
    db = tmp_path / "r.duckdb"
    ingest(root, db)
    spec = spec_from_dict(
        {
            "name": "t",
            "query": "SELECT run, metric, value FROM metrics",
            "rows": "run",
            "columns": "metric",
            "scale": 100,
        }
    )
    tex = to_latex(render_table(db, spec))
    # 50.0 and 50.04 are equal at the displayed precision: both best
    assert r"a\_s0 & \textbf{50.0} \\" in tex and r"b\_s0 & \textbf{50.0} \\" in tex
    assert r"c\_s0 & \underline{25.0} \\" in tex


def test_multilevel_header_and_missing(tmp_path):
    root = tmp_path / "results"
    _run(root, "a_s0", 0, {"CIDEr": 1.0, "Bleu_1": 0.7})
    _run(root, "b_s0", 0, {"CIDEr": 0.9})
    db = tmp_path / "r.duckdb"
    ingest(root, db)
    spec = spec_from_dict(
        {
            "name": "ml",
            "query": "SELECT run, dataset, metric, value FROM metrics",
            "rows": "run",
            "columns": ["dataset", "metric"],
            "scale": 100,
            "column_order": {"metric": ["Bleu_1", "Bleu_4", "CIDEr"]},
            "labels": {"world_target": "World target"},
        }
    )
    tex = to_latex(render_table(db, spec))
    assert r" & \multicolumn{3}{c}{World target} \\" in tex
    assert r"\cmidrule(lr){2-4}" in tex
    assert r"run & Bleu\_1 & Bleu\_4 & CIDEr \\" in tex
    # Bleu_4 declared but never computed → "--" in both rows; b has no Bleu_1
    assert r"a\_s0 & 70.0 & -- & \textbf{100.0} \\" in tex
    assert r"b\_s0 & -- & -- & 90.0 \\" in tex


def test_escape_and_spec_errors(known_db, tmp_path):
    assert latex_escape(r"a&b%c$d#e_f{g}h~i^j\k") == (
        r"a\&b\%c\$d\#e\_f\{g\}h\textasciitilde{}i\textasciicircum{}j\textbackslash{}k"
    )
    assert latex_escape("prefix>lora → x ± y") == r"prefix$>$lora $\rightarrow$ x $\pm$ y"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**KNOWN_SPEC, "colums": "metric"}))
    with pytest.raises(TableSpecError, match=r"bad\.yaml: unknown key\(s\) \['colums'\]"):
        load_specs(tmp_path)
    spec = spec_from_dict({**KNOWN_SPEC, "value": "score"}, source="s.yaml")
    with pytest.raises(TableSpecError, match=r"s\.yaml.*lacks column\(s\) \['score'\]"):
        render_table(known_db, spec)
    # two values for the same cell and seed is ambiguous, not silently averaged
    spec = spec_from_dict(
        {
            **KNOWN_SPEC,
            "query": "SELECT 'x' AS method, 0 AS seed, "
            "metric, value FROM metrics WHERE metric = 'CIDEr'",
        }
    )
    with pytest.raises(TableSpecError, match="several values.*seed=0"):
        render_table(known_db, spec)


def test_spec_name_must_be_its_file_stem(known_db, tmp_path):
    """The DAG names a table's outputs by the file stem: a declaration naming another table
    is rejected, naming the file."""
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "other.yaml").write_text(yaml.safe_dump(KNOWN_SPEC, allow_unicode=True))
    match = r"other\.yaml: name 'known' differs from the file name 'other'"
    with pytest.raises(TableSpecError, match=match):
        load_specs(tables)
    with pytest.raises(TableSpecError, match=match):
        render_all(known_db, tables, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_column_fails_naming_the_spec(known_db):
    """A query naming a column the runs table does not have (e.g. a renamed record field) is a
    TableSpecError naming the declaration and the column, not an empty or wrong cell."""
    spec = spec_from_dict(
        {
            **KNOWN_SPEC,
            "extra_columns": [],
            "query": "SELECT r.base_run AS method, r.seed, m.metric, m.value "
            "FROM metrics m JOIN runs r USING (run) WHERE r.prefix_len = 16",
        },
        source="renamed.yaml",
    )
    with pytest.raises(TableSpecError, match=r"(?s)renamed\.yaml.*query failed.*prefix_len.*"
                       r"record columns are \['run', 'base_run'"):
        render_table(known_db, spec)


def test_render_all_writes_csv_and_markdown(known_db, tmp_path):
    tables = tmp_path / "tables"
    tables.mkdir()
    (tables / "known.yaml").write_text(yaml.safe_dump(KNOWN_SPEC, allow_unicode=True))
    out = tmp_path / "out"
    paths = render_all(known_db, tables, out)
    assert sorted(p.name for p in paths) == ["known.csv", "known.md", "known.tex"]
    assert (out / "known.tex").read_text() == KNOWN_TEX
    csv = pd.read_csv(out / "known.csv").set_index("method")
    assert csv.loc["prefix_lora", "CIDEr"] == 125.0
    assert csv.loc["prefix_lora", "CIDEr_std"] == 7.1
    assert csv.loc["lora", "trainable_pct"] == 0.5
    assert math.isnan(csv.loc["full_ft", "Bleu_4"])  # missing stays missing
    md = (out / "known.md").read_text()
    assert "| Method | Trainable % | B@4 | CIDEr |" in md
    assert "| full_ft | 100.00 | -- | <u>115.0</u> |" in md
    assert "| prefix_lora | 0.54 | 31.0 ± 1.4 | **125.0 ± 7.1** |" in md
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # atomic, no leftovers


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("shipped")
    make_results_tree(root, seeds=(0, 1, 2))
    db = root / "results.duckdb"
    ingest(root / "results", db)
    paths = render_all(db, TABLES_DIR, root / "tables")
    # a table with no data yet (before any run finished) must still compile
    empty_db = root / "empty.duckdb"
    (root / "empty").mkdir()
    ingest(root / "empty", empty_db)
    paths += render_all(empty_db, TABLES_DIR, root / "tables_empty")
    return root, paths


def test_shipped_declarations(shipped):
    root, paths = shipped
    names = {s.name for s in load_specs(TABLES_DIR)}
    assert {
        "captioning",
        "peft_methods",
        "effective_rank",
        "ablation_prefix_length",
        "ablation_order",
    } <= names
    t = root / "tables"
    cap = (t / "captioning.tex").read_text()
    assert r"\multicolumn{7}{c}{World (target)}" in cap  # B@1..4, METEOR, ROUGE-L, CIDEr
    assert cap.count(r"\textbf{") == 14  # one best per column, 2 datasets × 7 metrics
    assert "recap &" in cap and "human &" in cap
    peft = (t / "peft_methods.tex").read_text()
    assert r"prefix\_lora & 0.54 &" in peft and r"lora & 0.50 &" in peft
    assert r"& -- \\" in peft  # SPICE was never computed: "--"
    # effective rank: a dataset column; on each dataset its reference rows first (the
    # pre-trained LM on the same text, the model before PEFT), then that dataset's runs
    eff = pd.read_csv(t / "effective_rank.csv")
    assert list(eff.columns[:3]) == ["dataset", "model", "image+text"] and "text" in eff.columns
    rows = list(zip(eff["dataset"], eff["model"]))
    assert rows[:3] == [("world", "_reference_lm"), ("world", "human"), ("world", "recap")]
    assert rows[3:5] == [("world_target", "_reference_lm"), ("world_target", "recap (before PEFT)")]
    assert {m for d, m in rows[5:]} >= {"lora", "prefix_lora"}
    assert all(d == "world_target" for d, _ in rows[3:])
    eff = eff.set_index(["dataset", "model"])
    assert 0 < eff.loc[("world_target", "lora"), "image+text"] < 100
    assert pd.isna(eff.loc[("world", "_reference_lm"), "image+text"])  # text only
    assert 0 < eff.loc[("world", "_reference_lm"), "text"] < 100
    tex = (t / "effective_rank.tex").read_text()
    assert r"World (target) & Pre-trained LM (text only) & -- &" in tex
    assert r"World (target) & recap (before PEFT) &" in tex
    pl = pd.read_csv(t / "ablation_prefix_length.csv")
    assert sorted(pl["prefix_length"]) == [4, 16]  # the sweep's cells only
    order = (t / "ablation_order.tex").read_text()
    assert r"prefix $\rightarrow$ LoRA" in order and r"LoRA $\rightarrow$ prefix" in order
    assert "p4" not in order  # sweep cells stay out of the order table
    assert "(no results yet)" in (root / "tables_empty" / "captioning.tex").read_text()


@pytest.mark.skipif(
    shutil.which("pdflatex") is None,
    reason="pdflatex not on PATH (install with scripts/install_tex.sh)",
)
def test_generated_tex_compiles(shipped, known_db, tmp_path):
    root, paths = shipped
    texs = [p for p in paths if p.suffix == ".tex"]
    render_all(known_db, _known_dir(tmp_path), tmp_path / "known_out")
    texs.append(tmp_path / "known_out" / "known.tex")
    for tex in texs:
        doc = tmp_path / f"doc_{tex.parent.name}_{tex.stem}.tex"
        doc.write_text(
            "\\documentclass{article}\n\\usepackage{booktabs}\n"
            f"\\begin{{document}}\n\\input{{{tex}}}\n\\end{{document}}\n"
        )
        proc = subprocess.run(
            ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", doc.name],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, f"{tex} does not compile:\n{proc.stdout[-2000:]}"
        assert doc.with_suffix(".pdf").read_bytes().startswith(b"%PDF")
        assert "Missing character" not in doc.with_suffix(".log").read_text(errors="replace")


def _known_dir(tmp_path: Path) -> Path:
    d = tmp_path / "known_spec"
    d.mkdir()
    (d / "known.yaml").write_text(yaml.safe_dump(KNOWN_SPEC, allow_unicode=True))
    return d


def _run_resampled(root: Path, run: str, seed: int, metrics: dict[str, tuple[float, list]]):
    _run(root, run, seed, {m: v for m, (v, _) in metrics.items()})
    path = root / "runs" / run / "metrics.json"
    obj = json.loads(path.read_text())
    for rec in obj["records"]:
        values = metrics[rec["metric"]][1]
        rec["resamples"] = {"scheme": {"key": "world_target/test/0", "n_images": 64,
                                       "count": len(values)}, "values": values}
    path.write_text(json.dumps(obj))


BASELINE_SPEC = {
    "name": "vs_lora",
    "query": """SELECT r.base_run AS method, r.seed, m.run, m.stage, m.dataset, m.split,
                       m.metric, m.value
                FROM metrics m JOIN runs r USING (run)""",
    "rows": "method",
    "columns": "metric",
    "seed": "seed",
    "scale": 100,
    "baseline": "lora",
    "column_order": {"metric": ["Bleu_4", "CIDEr"]},
}


def test_baseline_rows_get_paired_differences_and_marks(tmp_path: Path):
    """CIDEr: prefix_lora beats lora by 0.1 in every image resample of every seed (p at the
    bootstrap's floor: bold); Bleu_4: a difference whose sign flips with the images (p large:
    not bold). Each arm alone varies far more than the difference."""
    rng = __import__("numpy").random.default_rng(0)
    root = tmp_path / "results"
    for seed in range(3):
        shared = rng.normal(1.0, 0.3, 200)
        noise = rng.normal(0.0, 0.05, 200)
        _run_resampled(root, f"lora_s{seed}", seed, {
            "CIDEr": (1.0, list(shared)), "Bleu_4": (0.3, list(0.3 + noise))})
        _run_resampled(root, f"prefix_lora_s{seed}", seed, {
            "CIDEr": (1.1, list(shared + 0.1)), "Bleu_4": (0.3, list(0.3 - noise))})
    db = tmp_path / "r.duckdb"
    ingest(root, db)
    result = render_table(db, spec_from_dict(BASELINE_SPEC))
    col = {c.key[0]: j for j, c in enumerate(result.columns)}
    cider = result.cells[(("prefix_lora",), col["CIDEr"])]
    bleu = result.cells[(("prefix_lora",), col["Bleu_4"])]
    assert cider.vs.diff == pytest.approx(10.0) and cider.vs.p < 0.01
    assert cider.vs.lo == pytest.approx(10.0) and cider.vs.hi == pytest.approx(10.0)
    assert cider.rank == "significant"
    assert bleu.vs.p > 0.05 and bleu.rank is None
    assert result.cells[(("lora",), col["CIDEr"])].vs is None  # the baseline itself
    tex = to_latex(result)
    assert r"$\Delta$ +10.0 [+10.0, +10.0], p$<$0.001" in tex
    assert r"\textbf{110.0 $\pm$ 0.0}" in tex
    from vlalign.results.tables import to_dataframe
    df = to_dataframe(result).set_index("method")
    assert df.loc["prefix_lora", "CIDEr_vs_diff"] == pytest.approx(10.0)
    assert df.loc["prefix_lora", "Bleu_4_p"] > 0.05
    assert math.isnan(df.loc["lora", "CIDEr_p"])


def test_baseline_needs_a_seed_column_and_a_value_per_row_key():
    with pytest.raises(TableSpecError, match="needs 'seed'"):
        spec_from_dict({**BASELINE_SPEC, "seed": None})
    with pytest.raises(TableSpecError, match="one value per row key"):
        spec_from_dict({**BASELINE_SPEC, "baseline": ["lora", "x"]})


def test_prefix_variants_table_rows_per_variant(tmp_path: Path):
    """Seed 003 Table 5: one row per (run, variant) of the runs evaluated under variants."""
    root = tmp_path / "results"
    for seed in (0, 1):
        _run(root, f"prefix_lora_s{seed}", seed, {"CIDEr": 1.0 + seed / 10, "Bleu_4": 0.3})
        path = root / "runs" / f"prefix_lora_s{seed}" / "metrics.json"
        obj = json.loads(path.read_text())
        obj["records"] += [{**r, "stage": "peft@prefix_removed", "value": r["value"] / 2}
                           for r in list(obj["records"])]
        path.write_text(json.dumps(obj))
        _run(root, f"lora_s{seed}", seed, {"CIDEr": 0.9, "Bleu_4": 0.3})
    db = tmp_path / "r.duckdb"
    ingest(root, db)
    result = render_table(db, TABLES_DIR / "prefix_variants.yaml")
    assert result.row_keys == [("prefix_lora", "normal"), ("prefix_lora", "removed")]
    cider = next(j for j, c in enumerate(result.columns) if c.key[-1] == "CIDEr")
    assert result.cells[(("prefix_lora", "removed"), cider)].mean == pytest.approx(52.5)
