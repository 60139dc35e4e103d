"""Figures from the results database (matplotlib, Agg canvas; PNG and PDF, written atomically).

Every plot function returns the paths it wrote, or ``[]`` after logging why it skipped (no data):
an empty axes must never pass for a result. Layout (page-sized panel grids, one legend per
figure, a stable colour per line) is :mod:`vlalign.results.layout`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from vlalign.results.db import query
from vlalign.results.layout import FORMATS, figure_legend, grid, line_styles, page_style, save
from vlalign.runs.record import RECORD_COLUMNS

log = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "plot_all",
    "plot_loss_per_stage",
    "plot_metric_vs_config",
    "plot_rank_curves",
    "plot_recap_vs_human",
]

# Curves that several runs share (one trained stage) are drawn once in a neutral style.
SHARED_STYLES = (
    {"color": "black"},
    {"color": "dimgrey"},
    {"color": "black", "linestyle": "--"},
    {"color": "dimgrey", "linestyle": "--"},
)
SHARED_LABEL = "one trained stage shared by several runs (count at its end)"
BEFORE_PEFT_STYLES = (
    {"color": "dimgrey", "linestyle": "-."},
    {"color": "darkgrey", "linestyle": "-."},
    {"color": "dimgrey", "linestyle": ":"},
)


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _sql_list(items: Sequence[str]) -> str:
    return ", ".join(map(_sql_str, items))


def _display(name: str) -> str:
    # matplotlib hides legend labels starting with "_" (e.g. the _reference_lm curve).
    return name.lstrip("_").replace("_", " ") if name.startswith("_") else name


def _line(ax: Axes, x, mean, std, **style) -> None:
    """Mean line; a ±std band when several seeds were averaged."""
    (line,) = ax.plot(x, mean, **{"linewidth": 1.2, **style})
    if std is not None and std.notna().any():
        ax.fill_between(
            x,
            mean - std.fillna(0),
            mean + std.fillna(0),
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )


def _seeds_label(name: str, n_seeds: int) -> str:
    return _display(name) + (f" ({n_seeds} seeds)" if n_seeds > 1 else "")


# ---------------------------------------------------------------------------- training loss


def _train_log(db_path: str | Path, where: str) -> pd.DataFrame:
    """Training loss rows with the run's ``model`` (its base_run) and the trained stage's hash."""
    df = query(
        db_path,
        "SELECT t.run, coalesce(r.base_run, t.run) AS model, t.stage, t.stage_index, "
        "coalesce(t.stage_hash, t.run) AS stage_hash, t.step, t.loss "
        f"FROM train_log t LEFT JOIN runs r USING (run) {where} "
        "ORDER BY t.run, t.stage_index, t.step",
    )
    return df[df["loss"].notna()]


def _chain_order(df: pd.DataFrame) -> list[str]:
    """Stage names in chain order: stages that come first in some chain come first."""
    first_index = df.groupby("stage", sort=False)["stage_index"].min()
    return sorted(first_index.index, key=lambda st: (first_index[st], st))


def _curves(sub: pd.DataFrame, merge_shared: bool) -> list[list[str]]:
    """The lines of one stage panel, grouped by identical data: lines whose runs trained the
    same stages (same hashes, e.g. a stage0 that every chain shares) form one group."""
    trained = sub.drop_duplicates(["line", "stage_index", "stage_hash"])
    keys = {
        line: tuple(sorted(zip(g["stage_index"], g["stage_hash"])))
        for line, g in trained.groupby("line", sort=True)
    }
    if not merge_shared:
        return [[line] for line in keys]
    groups: dict[tuple, list[str]] = {}
    for line, key in keys.items():
        groups.setdefault(key, []).append(line)
    return sorted(groups.values(), key=lambda lines: (len(lines) > 1, lines))


def _draw_loss(ax: Axes, g: pd.DataFrame, style: dict[str, Any]) -> tuple[float, float]:
    """Mean ± std over the distinct trained stages of ``g``, one segment per chain position (a
    stage repeated in one chain, alternation); returns the last point."""
    # seeds that share a trained stage (same hash) are one sample, not several
    g = g.drop_duplicates(["stage_index", "stage_hash", "step"])
    for _, seg in g.groupby("stage_index"):
        agg = seg.groupby("step")["loss"].agg(["mean", "std"]).reset_index()
        _line(ax, agg["step"], agg["mean"], agg["std"], **style)
    return float(agg["step"].iloc[-1]), float(agg["mean"].iloc[-1])


def _loss_figure(
    df: pd.DataFrame, stages: list[str], ylabel: str, merge_shared: bool = True
) -> Figure:
    """One panel per stage, one curve per ``df["line"]`` in a colour stable across panels."""
    n_seeds = df.groupby("line")["run"].nunique()
    curves = {stage: _curves(df[df["stage"] == stage], merge_shared) for stage in stages}
    # colours only for the lines drawn on their own somewhere: fewer colours, more distinct
    own = sorted({ls[0] for groups in curves.values() for ls in groups if len(ls) == 1})
    styles = line_styles(own)
    fig, axes = grid(len(stages))
    shared = False
    for ax, stage in zip(axes, stages):
        sub = df[df["stage"] == stage]
        n_shared = 0
        for lines in curves[stage]:
            if len(lines) == 1:
                style = styles[lines[0]]
            else:
                style = SHARED_STYLES[n_shared % len(SHARED_STYLES)]
                n_shared += 1
            end = _draw_loss(ax, sub[sub["line"] == lines[0]], style)
            if len(lines) > 1:
                ax.annotate(
                    f"{len(lines)} runs",
                    end,
                    xytext=(-2, 4),
                    textcoords="offset points",
                    ha="right",
                    fontsize=6,
                    color=style["color"],
                    bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 0.5},
                )
        shared = shared or n_shared > 0
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.supylabel(ylabel)
    entries = {_seeds_label(line, n_seeds[line]): styles[line] for line in own}
    if shared:
        entries[SHARED_LABEL] = SHARED_STYLES[0]
    figure_legend(fig, entries)
    return fig


@page_style
def plot_loss_per_stage(
    db_path: str | Path,
    out_dir: str | Path,
    runs: list[str] | None = None,
    name: str = "loss_per_stage",
    group_seeds: bool = True,
) -> list[Path]:
    """Training loss vs. step, one panel per stage name, one line per model.

    With ``group_seeds`` the seeds of one run (its ``base_run``) are one line (mean, ±std band);
    otherwise one line per run. A stage trained once and shared by several lines (same stage
    hash) is one neutral curve labelled with the number of lines that share it.
    """
    where = f"WHERE t.run IN ({_sql_list(runs)})" if runs else ""
    df = _train_log(db_path, where)
    if df.empty:
        log.warning(
            "%s: no training log rows%s; skipping plot %s",
            db_path,
            f" for runs {runs}" if runs else "",
            name,
        )
        return []
    df["line"] = df["model"] if group_seeds else df["run"]
    ylabel = "training loss" + (" (mean ± std over seeds)" if group_seeds else "")
    return save(_loss_figure(df, _chain_order(df), ylabel), out_dir, name)


@page_style
def plot_recap_vs_human(
    db_path: str | Path,
    out_dir: str | Path,
    pair: tuple[str, ...] = ("recap", "human"),
    name: str = "recap_vs_human",
) -> list[Path]:
    """Training loss of two (or more) base runs side by side, one panel per stage all trained
    (seed 002 §4.6, Fig. 5: recaptioned text converges faster and lower than human captions).

    Each base run is the mean over its seeds with a ±std band. Skipped (logged) unless both
    base runs have training logs and share a stage name.
    """
    where = f"WHERE coalesce(r.base_run, t.run) IN ({_sql_list(pair)})"
    df = _train_log(db_path, where)
    missing = [b for b in pair if b not in set(df["model"])]
    if missing:
        log.warning(
            "%s: no training log of base run(s) %s; skipping plot %s", db_path, missing, name
        )
        return []
    common = set.intersection(*(set(g["stage"]) for _, g in df.groupby("model")))
    stages = [s for s in _chain_order(df) if s in common]
    if not stages:
        log.warning("%s: %s share no stage; skipping plot %s", db_path, list(pair), name)
        return []
    df = df[df["stage"].isin(stages)].assign(line=lambda d: d["model"])
    fig = _loss_figure(df, stages, "training loss (mean ± std over seeds)", merge_shared=False)
    fig.suptitle(" vs ".join(pair))
    return save(fig, out_dir, name)


# ---------------------------------------------------------------------------- rank curves


def _rank_styles(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """The references first, in black / greys; then one colour per model."""
    styles: dict[str, dict[str, Any]] = {}
    if (df["line"] == "_reference_lm").any():
        styles["_reference_lm"] = {"color": "black", "linestyle": "--"}
    before = sorted(df.loc[df["reference"] == "before_peft", "line"].unique())
    for i, line in enumerate(before):
        styles[line] = BEFORE_PEFT_STYLES[i % len(BEFORE_PEFT_STYLES)]
    return styles | line_styles(set(df["line"]) - set(styles))


@page_style
def plot_rank_curves(
    db_path: str | Path,
    out_dir: str | Path,
    runs: list[str] | None = None,
    name: str = "rank_curves",
    group_seeds: bool = True,
) -> list[Path]:
    """Cumulative normalised singular-value mass vs. fraction of components (seed 003 Fig. 4).

    One panel per dataset × kind of positions (image + text, text alone; datasets in columns):
    each curve sits beside the references on the same dataset (the pre-trained LM, text only;
    ``<run> (before PEFT)``). The x axis is k / n_components so curves of matrices of different
    sizes are comparable; the dashed line is the threshold (0.9) that defines the effective rank,
    and a dot marks where each curve reaches it (x = its effective rank). Seeds of one model are
    averaged (±std band) unless ``group_seeds`` is false.
    """
    where = f"WHERE c.run IN ({_sql_list(runs)})" if runs else ""
    df = query(
        db_path,
        "SELECT c.run, coalesce(r.base_run, c.run) AS model, "
        "coalesce(c.dataset, '?') AS dataset, c.positions, c.k, c.cumulative, "
        "c.reference, s.threshold, s.effective_rank, s.n_components "
        "FROM rank_curve c JOIN rank_summary s ON c.run = s.run "
        "AND c.dataset IS NOT DISTINCT FROM s.dataset AND c.positions = s.positions "
        "AND c.reference IS NOT DISTINCT FROM s.reference "
        "LEFT JOIN runs r ON r.run = c.run "
        f"{where} ORDER BY c.run, c.k",
    )
    if df.empty:
        log.warning("%s: no rank curves; skipping plot %s", db_path, name)
        return []
    df["x"] = df["k"] / df["n_components"]
    base = df["model"] if group_seeds else df["run"]
    df["line"] = base + df["reference"].map(
        lambda r: " (before PEFT)" if r == "before_peft" else ""
    )
    styles = _rank_styles(df)
    n_seeds = df.groupby("line")["run"].nunique()
    datasets = sorted(df["dataset"].unique())
    kinds = [p for p in ("image+text", "text") if p in set(df["positions"])]
    panels = [(kind, dataset) for kind in kinds for dataset in datasets]
    fig, axes = grid(len(panels), ncols=len(datasets))
    for ax, (kind, dataset) in zip(axes, panels):
        sub = df[(df["dataset"] == dataset) & (df["positions"] == kind)]
        for line in [s for s in styles if s in set(sub["line"])]:
            g = sub[sub["line"] == line]
            agg = g.groupby("x")["cumulative"].agg(["mean", "std"]).reset_index()
            _line(ax, agg["x"], agg["mean"], agg["std"], **styles[line])
            one = g.drop_duplicates("run")
            eff, thr = one["effective_rank"].mean(), one["threshold"].mean()
            if pd.notna(eff) and pd.notna(thr):
                ax.plot([eff], [thr], "o", markersize=3, color=styles[line]["color"])
        for t in sub["threshold"].dropna().unique():
            ax.axhline(t, color="grey", linestyle="--", linewidth=0.8)
        ax.set_title(f"{dataset}: {kind} positions")
        ax.set_ylim(0, 1.02)
        ax.set_xlim(0, 1)
        ax.set_xlabel("fraction of components k / n")
        ax.grid(alpha=0.3)
        if sub.empty:
            ax.text(0.5, 0.5, "no curves", ha="center", va="center", transform=ax.transAxes)
    fig.supylabel("cumulative singular-value mass")
    labels = {"_reference_lm": "pre-trained LM (text only)"}
    entries = {
        _seeds_label(labels.get(line, line), n_seeds[line]): style
        for line, style in styles.items()
    }
    title = "model (dot: effective rank, where a curve reaches the dashed threshold)"
    figure_legend(fig, entries, title=title)
    return save(fig, out_dir, name)


# ---------------------------------------------------------------------------- metric vs config


def _chain_labels(chains: Sequence[str]) -> tuple[dict[str, str], str]:
    """Chains without the stages all of them start with (each keeps one): labels, and the
    common head."""
    parts = [c.split(">") for c in chains]
    n = 0
    while n < min(map(len, parts)) - 1 and len({p[n] for p in parts}) == 1:
        n += 1
    return {c: ">".join(p[n:]) for c, p in zip(chains, parts)}, ">".join(parts[0][:n])


@page_style
def plot_metric_vs_config(
    db_path: str | Path,
    out_dir: str | Path,
    metric: str = "CIDEr",
    config_path: str = "prefix_length",
    split: str = "test",
    scale: float = 100.0,
    name: str | None = None,
) -> list[Path]:
    """Metric (mean ± std over seeds) vs. a numeric run setting, one panel per dataset, one
    line per stage chain (labelled without the stages all chains start with).

    ``config_path`` is a column of the run record (``prefix_length``: seed 003 Fig. 8) or, for a
    setting that is none, a JSON path into the run's resolved config (``$.stages[2].lr.lm``).
    Only the evaluation of the chain's final stage is used.
    """
    if config_path.startswith("$"):
        x_sql = f"TRY_CAST(json_extract_string(r.config, {_sql_str(config_path)}) AS DOUBLE)"
        what = f"config {config_path}"
    elif config_path in RECORD_COLUMNS:
        x_sql, what = f'TRY_CAST(r."{config_path}" AS DOUBLE)', config_path
    else:
        raise ValueError(
            f"plot_metric_vs_config: {config_path!r} is neither a run record column "
            f"({list(RECORD_COLUMNS)}) nor a JSON path into the config ('$.…')"
        )
    name = name or f"{metric}_vs_{config_path.removeprefix('$.').replace('.', '_')}"
    df = query(
        db_path,
        f"""SELECT {x_sql} AS x, m.dataset, r.stage_chain, r.seed, m.value * {float(scale)} AS y
            FROM metrics m JOIN runs r USING (run)
            WHERE m.metric = {_sql_str(metric)} AND m.split = {_sql_str(split)}
              AND m.stage = list_last(r.chain)""",
    )
    df = df[df["x"].notna()]
    if df.empty:
        log.warning(
            "%s: no %s/%s records with numeric %s; skipping plot %s",
            db_path,
            metric,
            split,
            what,
            name,
        )
        return []
    agg = df.groupby(["dataset", "stage_chain", "x"])["y"].agg(["mean", "std"]).reset_index()
    labels, head = _chain_labels(sorted(agg["stage_chain"].unique()))
    styles = line_styles(labels.values())
    datasets = sorted(agg["dataset"].unique())
    xs = sorted(agg["x"].unique())
    # points of one x are dodged sideways (by a fraction of the x range) so that the error
    # bars of the lines stay apart
    dodge = 0.015 * ((xs[-1] - xs[0]) or max(abs(xs[-1]), 1.0))
    fig, axes = grid(len(datasets))
    for ax, dataset in zip(axes, datasets):
        sub = agg[agg["dataset"] == dataset]
        chains = sorted(sub["stage_chain"].unique())
        for i, chain in enumerate(chains):
            g = sub[sub["stage_chain"] == chain]
            ax.errorbar(
                g["x"] + (i - (len(chains) - 1) / 2) * dodge,
                g["mean"],
                yerr=g["std"].fillna(0),
                marker="o",
                markersize=3,
                capsize=2,
                linewidth=1.2,
                **styles[labels[chain]],
            )
        ax.set_title(dataset)
        if len(xs) <= 8:
            ax.set_xticks(xs)
        ax.set_xlabel(config_path.removeprefix("$."))
        ax.grid(alpha=0.3)
    fig.supylabel((f"{metric} (×{scale:g})" if scale != 1 else metric) + ", mean ± std")
    title = "stage chain" + (f" (after {head})" if head else "")
    figure_legend(fig, {labels[c]: styles[labels[c]] for c in sorted(labels)}, title=title)
    return save(fig, out_dir, name)


@page_style
def plot_lm_text_loss(
    db_path: str | Path, out_dir: str | Path, name: str = "lm_text_loss"
) -> list[Path]:
    """The pre-trained LM's per-token cross-entropy on recaptions vs human captions of the same
    images, one pair of bars per dataset (seed 002 Fig. 5(a)); skipped (logged) without data."""
    df = query(db_path, "SELECT dataset, text, loss FROM lm_text_loss WHERE split = 'test'")
    if df.empty:
        log.warning("%s: no lm_text_loss rows (no dataset with recaptions); skipping plot %s",
                    db_path, name)
        return []
    datasets = sorted(df["dataset"].unique())
    fig, (ax,) = grid(1)
    kinds = [("recaption", "recaptions (AI)"), ("captions", "human captions")]
    colours = line_styles([k for k, _ in kinds])
    width = 0.38
    for k, (text, label) in enumerate(kinds):
        sub = df[df["text"] == text].set_index("dataset")
        xs = [i + (k - 0.5) * width for i, d in enumerate(datasets) if d in sub.index]
        ys = [sub.loc[d, "loss"] for d in datasets if d in sub.index]
        ax.bar(xs, ys, width, label=label, color=colours[text]["color"])
    ax.set_xticks(range(len(datasets)), datasets)
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_title("pre-trained LM, text only")
    figure_legend(fig, {label: {"color": colours[text]["color"]}
                        for text, label in kinds})
    return save(fig, out_dir, name)


def plot_all(db_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Every default figure that has data; figures without data are skipped (logged)."""
    paths = plot_loss_per_stage(db_path, out_dir)
    paths += plot_recap_vs_human(db_path, out_dir)
    # the loop closed in the DAG: generated recaptions (docs/recaption.md)
    paths += plot_recap_vs_human(db_path, out_dir, ("gen_recap", "recap", "human"),
                                 name="gen_recap_vs_recap_vs_human")
    paths += plot_lm_text_loss(db_path, out_dir)
    paths += plot_rank_curves(db_path, out_dir)
    # the file keeps the name it had when the prefix length was read from the config JSON
    paths += plot_metric_vs_config(
        db_path, out_dir, "CIDEr", "prefix_length", name="CIDEr_vs_peft_prefix_length"
    )
    return paths
