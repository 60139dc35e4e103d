"""Figures from the results DB: PNG + PDF written for real data, skipped (logged) without data."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import make_results_tree
from matplotlib.image import imread

from vlalign.results.db import ingest
from vlalign.results.plots import (
    plot_all,
    plot_loss_per_stage,
    plot_metric_vs_config,
    plot_rank_curves,
)


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("plots")
    make_results_tree(root, seeds=(0, 1))
    ingest(root / "results", root / "results.duckdb")
    return root / "results.duckdb"


def _check_figure(png: Path, pdf: Path) -> None:
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size > 20_000
    img = imread(png)
    # a real figure: many distinct colours (lines, text), not a blank canvas
    assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 50
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 5_000


def test_plot_all(db, tmp_path):
    paths = plot_all(db, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        f"{n}.{e}"
        for n in ("loss_per_stage", "rank_curves", "CIDEr_vs_peft_prefix_length")
        for e in ("png", "pdf")
    )
    for stem in {p.stem for p in paths}:
        _check_figure(tmp_path / f"{stem}.png", tmp_path / f"{stem}.pdf")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic writes


def test_selected_runs_and_config_path(db, tmp_path):
    paths = plot_loss_per_stage(db, tmp_path, runs=["recap_s0", "human_s0"], name="recap_vs_human")
    assert [p.name for p in paths] == ["recap_vs_human.png", "recap_vs_human.pdf"]
    _check_figure(*paths)
    paths = plot_metric_vs_config(db, tmp_path, metric="Bleu_4", config_path="$.peft.prefix_length")
    assert paths[0].name == "Bleu_4_vs_peft_prefix_length.png"
    # the run record's column by default; a name that is neither column nor JSON path is refused
    paths = plot_metric_vs_config(db, tmp_path, metric="Bleu_4")
    assert paths[0].name == "Bleu_4_vs_prefix_length.png"
    _check_figure(*paths)
    with pytest.raises(ValueError, match=r"'prefix_len' is neither a run record column"):
        plot_metric_vs_config(db, tmp_path, config_path="prefix_len")


def test_no_data_is_skipped_with_a_message(tmp_path, caplog):
    (tmp_path / "results").mkdir()
    empty = tmp_path / "empty.duckdb"
    ingest(tmp_path / "results", empty)
    out = tmp_path / "plots"
    with caplog.at_level(logging.WARNING, logger="vlalign.results.plots"):
        assert plot_all(empty, out) == []
    assert "no training log rows" in caplog.text
    assert "no rank curves" in caplog.text
    assert "no CIDEr/test records with numeric prefix_length" in caplog.text
    assert not out.exists() or not any(out.iterdir())


def test_unknown_run_or_path_is_skipped(db, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vlalign.results.plots"):
        assert plot_loss_per_stage(db, tmp_path, runs=["no_such_run"]) == []
        assert plot_rank_curves(db, tmp_path, runs=["no_such_run"]) == []
        assert plot_metric_vs_config(db, tmp_path, config_path="$.nope.x") == []
    assert "for runs ['no_such_run']" in caplog.text
    assert not any(tmp_path.iterdir())
