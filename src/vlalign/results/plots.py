"""Figures from the results database (matplotlib, Agg canvas; PNG and PDF, written atomically).

Every plot function returns the paths it wrote, or ``[]`` after logging why it skipped (no data):
an empty axes must never pass for a result.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from vlalign.io_utils import atomic_path
from vlalign.results.db import query
from vlalign.runs.record import RECORD_COLUMNS

log = logging.getLogger(__name__)

FORMATS = ("png", "pdf")


def _save(fig: Figure, out_dir: Path, name: str) -> list[Path]:
    paths = []
    for ext in FORMATS:
        path = Path(out_dir) / f"{name}.{ext}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight")
        paths.append(path)
    return paths


def _sql_str(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _display(name: str) -> str:
    # matplotlib hides legend labels starting with "_" (e.g. the _reference_lm curve).
    return name.lstrip("_").replace("_", " ") if name.startswith("_") else name


def _line(ax, x, mean, std, label: str, **style) -> None:
    """Mean line; a ±std band when several seeds were averaged."""
    (line,) = ax.plot(x, mean, label=label, **{"linewidth": 1.3, **style})
    if std is not None and std.notna().any():
        ax.fill_between(
            x,
            mean - std.fillna(0),
            mean + std.fillna(0),
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )


def plot_loss_per_stage(
    db_path: str | Path,
    out_dir: str | Path,
    runs: list[str] | None = None,
    name: str = "loss_per_stage",
    group_seeds: bool = True,
) -> list[Path]:
    """Training loss vs. step, one panel per stage name, one line per model (seed 002 Fig. 5).

    Comparing e.g. a recaptioned-text run with a human-caption run shows which converges faster.
    With ``group_seeds`` the seeds of one run (its ``base_run``) are one line (mean, ±std band);
    otherwise one line per run.
    """
    where = f"WHERE t.run IN ({', '.join(map(_sql_str, runs))})" if runs else ""
    df = query(
        db_path,
        "SELECT t.run, coalesce(r.base_run, t.run) AS model, t.stage, t.stage_index, t.step, "
        f"t.loss FROM train_log t LEFT JOIN runs r USING (run) {where} "
        "ORDER BY t.run, t.stage_index, t.step",
    )
    df = df[df["loss"].notna()]
    if df.empty:
        log.warning(
            "%s: no training log rows%s; skipping plot %s",
            db_path,
            f" for runs {runs}" if runs else "",
            name,
        )
        return []
    # Panels in chain order: stages that come first in some chain come first.
    first_index = df.groupby("stage", sort=False)["stage_index"].min()
    stages = sorted(first_index.index, key=lambda st: (first_index[st], st))
    df["line"] = df["model"] if group_seeds else df["run"]
    fig = Figure(figsize=(4.2 * len(stages), 3.4), layout="constrained")
    axes = fig.subplots(1, len(stages), squeeze=False)[0]
    for ax, stage in zip(axes, stages):
        for color, (line, g) in enumerate(df[df["stage"] == stage].groupby("line", sort=True)):
            # A stage repeated in one chain (alternation) is plotted as separate segments.
            for seg_no, (_, seg) in enumerate(g.groupby("stage_index")):
                agg = seg.groupby("step")["loss"].agg(["mean", "std"]).reset_index()
                ax.plot(
                    agg["step"],
                    agg["mean"],
                    color=f"C{color % 10}",
                    linewidth=1.3,
                    label=_display(line) if seg_no == 0 else None,
                )
                if agg["std"].notna().any():
                    ax.fill_between(
                        agg["step"],
                        agg["mean"] - agg["std"].fillna(0),
                        agg["mean"] + agg["std"].fillna(0),
                        color=f"C{color % 10}",
                        alpha=0.2,
                        linewidth=0,
                    )
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss" + (" (mean ± std over seeds)" if group_seeds else ""))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, Path(out_dir), name)


def plot_rank_curves(
    db_path: str | Path,
    out_dir: str | Path,
    runs: list[str] | None = None,
    name: str = "rank_curves",
    group_seeds: bool = True,
) -> list[Path]:
    """Cumulative normalised singular-value mass vs. fraction of components (seed 003 Fig. 4).

    One column of panels per dataset, one row per kind of positions (image + text, text alone):
    each curve sits beside the references on the same dataset (the pre-trained LM, text only;
    ``<run> (before PEFT)``). The x axis is k / n_components so curves of matrices of different
    sizes are comparable; the dashed line is the threshold (0.9) that defines the effective rank.
    Seeds of one model are averaged (±std band) unless ``group_seeds`` is false.
    """
    where = f"WHERE c.run IN ({', '.join(map(_sql_str, runs))})" if runs else ""
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
    # one colour per model in every panel; the references drawn first, in black / grey
    refs = {"_reference_lm": {"color": "black", "linestyle": "--"}}
    refs |= {
        line: {"color": "dimgrey", "linestyle": "-."}
        for line in df.loc[df["reference"] == "before_peft", "line"].unique()
    }
    others = sorted(set(df["line"]) - set(refs))
    styles = {**refs, **{line: {"color": f"C{i % 10}"} for i, line in enumerate(others)}}
    order = {line: i for i, line in enumerate([*refs, *others])}
    datasets = sorted(df["dataset"].unique())
    kinds = [p for p in ("image+text", "text") if p in set(df["positions"])]
    fig = Figure(figsize=(4.2 * len(datasets), 3.4 * len(kinds)), layout="constrained")
    axes = fig.subplots(len(kinds), len(datasets), squeeze=False)
    for i, kind in enumerate(kinds):
        for j, dataset in enumerate(datasets):
            ax = axes[i][j]
            sub = df[(df["dataset"] == dataset) & (df["positions"] == kind)]
            for line in sorted(sub["line"].unique(), key=order.get):
                g = sub[sub["line"] == line]
                agg = g.groupby("x")["cumulative"].agg(["mean", "std"]).reset_index()
                eff = g.drop_duplicates("run")["effective_rank"].mean()
                name_ = "pre-trained LM (text only)" if line == "_reference_lm" else line
                label = _display(name_) + ("" if pd.isna(eff) else f" ({100 * eff:.1f} %)")
                _line(ax, agg["x"], agg["mean"], agg["std"], label, **styles[line])
            for t in sub["threshold"].dropna().unique():
                ax.axhline(t, color="grey", linestyle="--", linewidth=1)
            ax.set_title(f"{dataset}: {kind} positions", fontsize=9)
            ax.set_xlabel("fraction of components k / n")
            ax.set_ylabel("cumulative singular-value mass")
            ax.set_ylim(0, 1.02)
            ax.set_xlim(0, 1)
            ax.grid(alpha=0.3)
            if sub.empty:
                ax.text(0.5, 0.5, "no curves", ha="center", va="center", transform=ax.transAxes)
            else:
                ax.legend(fontsize=6, title="model (effective rank)", title_fontsize=6)
    return _save(fig, Path(out_dir), name)


def plot_metric_vs_config(
    db_path: str | Path,
    out_dir: str | Path,
    metric: str = "CIDEr",
    config_path: str = "prefix_length",
    split: str = "test",
    scale: float = 100.0,
    name: str | None = None,
) -> list[Path]:
    """Metric (mean ± std over seeds) vs. a numeric run setting, one line per dataset × chain.

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
    agg = (
        df.groupby(["dataset", "stage_chain", "x"])["y"].agg(["mean", "std", "count"]).reset_index()
    )
    fig = Figure(figsize=(5.0, 3.8), layout="constrained")
    ax = fig.subplots()
    for (dataset, chain), g in agg.groupby(["dataset", "stage_chain"], sort=True):
        ax.errorbar(
            g["x"],
            g["mean"],
            yerr=g["std"].fillna(0),
            marker="o",
            capsize=3,
            label=f"{dataset}: {chain}",
        )
    ax.set_xlabel(config_path.removeprefix("$."))
    ax.set_ylabel(f"{metric} (×{scale:g})" if scale != 1 else metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, Path(out_dir), name)


def plot_all(db_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Every default figure that has data; figures without data are skipped (logged)."""
    paths = plot_loss_per_stage(db_path, out_dir)
    paths += plot_rank_curves(db_path, out_dir)
    # the file keeps the name it had when the prefix length was read from the config JSON
    paths += plot_metric_vs_config(
        db_path, out_dir, "CIDEr", "prefix_length", name="CIDEr_vs_peft_prefix_length"
    )
    return paths
