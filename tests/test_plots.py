"""Figures from the results DB: PNG + PDF written for real data, skipped (logged) without data;
page-sized grids with one legend, distinct colours per panel and seeds merged into one line."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from helpers import make_results_tree, write_run, write_stage
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.image import imread

from vlalign.results import plots
from vlalign.results.db import ingest
from vlalign.results.layout import DPI, line_styles, palette
from vlalign.results.plots import (
    plot_all,
    plot_loss_per_stage,
    plot_metric_vs_config,
    plot_rank_curves,
    plot_recap_vs_human,
)

# a page: at most 13.5 in wide, 17 in tall (a 13 in wide page of letter proportions)
PAGE_PX = (13.5 * DPI, 17 * DPI)


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
    height, width = img.shape[:2]
    assert width <= PAGE_PX[0] and height <= PAGE_PX[1], (png.name, width, height)


def test_plot_all(db, tmp_path):
    paths = plot_all(db, tmp_path)
    names = sorted(p.name for p in paths)
    assert names == sorted(
        f"{n}.{e}"
        for n in (
            "loss_per_stage", "recap_vs_human", "rank_curves", "CIDEr_vs_peft_prefix_length"
        )
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
    assert "no training log of base run(s) ['recap', 'human']" in caplog.text
    assert not out.exists() or not any(out.iterdir())


def test_unknown_run_or_path_is_skipped(db, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vlalign.results.plots"):
        assert plot_loss_per_stage(db, tmp_path, runs=["no_such_run"]) == []
        assert plot_rank_curves(db, tmp_path, runs=["no_such_run"]) == []
        assert plot_metric_vs_config(db, tmp_path, config_path="$.nope.x") == []
    assert "for runs ['no_such_run']" in caplog.text
    assert not any(tmp_path.iterdir())


# ------------------------------------------------------------------------------ layout


@pytest.fixture
def figures(monkeypatch) -> dict[str, Figure]:
    """The figures the plot functions save, by name (saved as usual as well)."""
    saved: dict[str, Figure] = {}
    real = plots.save

    def capture(fig: Figure, out_dir: Path, name: str) -> list[Path]:
        saved[name] = fig
        return real(fig, out_dir, name)

    monkeypatch.setattr(plots, "save", capture)
    return saved


@pytest.fixture(scope="module")
def many_stages_db(tmp_path_factory) -> Path:
    """13 stage names, 12 base runs × 2 seeds: a trunk stage0..stage3 that every run shares
    (one trained stage each), then one tail stage per run; runs 9..11 reuse tail names 0..2."""
    root = tmp_path_factory.mktemp("many_stages")
    results, rng = root / "results", np.random.default_rng(1)
    trunk = [(s, write_stage(results, s, {"trunk": 1}, rng, 6, 3.0, 0.3))
             for s in ("stage0", "stage1", "stage2", "stage3")]
    for i in range(12):
        for seed in (0, 1):
            tail = f"ft_{i % 9}"
            h = write_stage(results, tail, {"run": i, "seed": seed}, rng, 6, 2.0, 0.1 * (i + 1))
            write_run(results, f"m{i:02d}_s{seed}", seed, [*trunk, (tail, h)], {"seed": seed})
    ingest(results, root / "results.duckdb")
    return root / "results.duckdb"


def _curve_colours(ax) -> list[str]:
    # the curves in data coordinates, not the threshold line (axes coordinates in x) nor the
    # effective-rank dots (markers without a line)
    return [
        to_hex(line.get_color())
        for line in ax.get_lines()
        if line.get_transform() is ax.transData and line.get_linestyle() != "None"
    ]


def _legend_labels(fig: Figure) -> list[str]:
    return [t.get_text() for t in fig.legends[0].get_texts()]


def test_13_stages_fit_a_page_in_a_grid(many_stages_db, tmp_path, figures):
    png, _ = plot_loss_per_stage(many_stages_db, tmp_path)
    height, width = imread(png).shape[:2]
    assert width <= PAGE_PX[0] and height <= PAGE_PX[1]
    assert width < 2.5 * height  # wrapped into rows, not one strip of 13 panels
    fig = figures["loss_per_stage"]
    assert len(fig.axes) == 13  # spare cells of the 4 × 4 grid removed
    assert [ax.get_title() for ax in fig.axes[:5]] == [
        "stage0", "stage1", "stage2", "stage3", "ft_0"
    ]


def test_one_legend_and_distinct_colours_per_panel(db, many_stages_db, tmp_path, figures):
    plot_all(db, tmp_path)
    plot_loss_per_stage(many_stages_db, tmp_path, name="many")
    assert set(figures) == {
        "loss_per_stage", "recap_vs_human", "rank_curves", "CIDEr_vs_peft_prefix_length", "many"
    }
    for name, fig in figures.items():
        assert len(fig.legends) == 1, name
        assert all(ax.get_legend() is None for ax in fig.axes), name
        labels = _legend_labels(fig)
        assert len(labels) == len(set(labels)), name  # each line named once
        for ax in fig.axes:
            colours = _curve_colours(ax)
            assert colours and len(colours) == len(set(colours)), (name, ax.get_title(), colours)
    # a run keeps its colour in every panel: ft_0 holds m00 and m09, ft_1 m01 and m10
    panel = {ax.get_title(): ax for ax in figures["many"].axes}
    assert len(set(_curve_colours(panel["ft_0"])) | set(_curve_colours(panel["ft_1"]))) == 4


def test_seeds_of_a_base_run_are_one_line_with_a_band(db, tmp_path, figures):
    plot_loss_per_stage(db, tmp_path)
    fig = figures["loss_per_stage"]
    labels = _legend_labels(fig)
    assert "recap (2 seeds)" in labels and "human (2 seeds)" in labels
    assert not [label for label in labels if "_s0" in label or "_s1" in label]
    stage1 = next(ax for ax in fig.axes if ax.get_title() == "stage1")
    assert len(_curve_colours(stage1)) == 2  # recap, human: one mean line each
    assert len(stage1.collections) == 2  # and their ±std bands
    plot_loss_per_stage(db, tmp_path, name="per_seed", group_seeds=False)
    labels = _legend_labels(figures["per_seed"])
    assert {"recap_s0", "recap_s1", "human_s0", "human_s1"} <= set(labels)


def test_a_shared_stage_is_one_curve(many_stages_db, tmp_path, figures):
    plot_loss_per_stage(many_stages_db, tmp_path)
    fig = figures["loss_per_stage"]
    stage0 = fig.axes[0]
    assert _curve_colours(stage0) == [to_hex("black")]
    assert [t.get_text() for t in stage0.texts] == ["12 runs"]
    assert not stage0.collections  # the seeds trained stage0 once: no spread to show
    labels = _legend_labels(fig)
    assert labels[-1] == plots.SHARED_LABEL
    assert labels[:-1] == [f"m{i:02d} (2 seeds)" for i in range(12)]


def test_recap_vs_human(db, many_stages_db, tmp_path, figures, caplog):
    paths = plot_recap_vs_human(db, tmp_path)
    assert [p.name for p in paths] == ["recap_vs_human.png", "recap_vs_human.pdf"]
    _check_figure(*paths)
    fig = figures["recap_vs_human"]
    assert [ax.get_title() for ax in fig.axes] == ["stage0", "stage1"]
    assert _legend_labels(fig) == ["human (2 seeds)", "recap (2 seeds)"]
    assert all(len(ax.collections) == 2 for ax in fig.axes)  # ±std bands over the seeds
    out = tmp_path / "skipped"
    with caplog.at_level(logging.WARNING, logger="vlalign.results.plots"):
        assert plot_recap_vs_human(db, out, pair=("recap", "nope")) == []
        assert plot_recap_vs_human(many_stages_db, out) == []
    assert "no training log of base run(s) ['nope']; skipping plot recap_vs_human" in caplog.text
    assert "no training log of base run(s) ['recap', 'human']" in caplog.text
    assert not out.exists()
    # the pair is a parameter: any two base runs, one panel per stage name both trained
    plot_recap_vs_human(many_stages_db, tmp_path, pair=("m00", "m09"), name="m")
    assert [ax.get_title() for ax in figures["m"].axes] == [
        "stage0", "stage1", "stage2", "stage3", "ft_0"
    ]


def test_palette_and_line_styles():
    assert len(palette(9)) == 9 and len(palette(10)) == 18
    for n in (9, 18):
        colours = {to_hex(c) for c in palette(n)}
        assert len(colours) == n and to_hex("#7f7f7f") not in colours  # grey: references
    styles = line_styles(f"run{i}" for i in range(40))
    pairs = {(to_hex(s["color"]), s["linestyle"]) for s in styles.values()}
    assert len(pairs) == 40  # past 18 colours the line style tells lines apart
    assert line_styles(["b", "a"]) == line_styles(["a", "b", "a"])  # by name, not order
