"""The papers' claims as data, checked against the results DB (docs/results.md#claims).

A claim file (``config/claims/*.yaml``) lists claims; each names its source (paper, table),
the metric, two arms and the direction it expects of ``arm − baseline``. An arm is a SQL query
returning ``seed`` and ``value`` (one row per seed); when it also returns a metrics row's
``run, stage, dataset, split, metric``, the comparison uses that row's image resamples (a
paired hierarchical bootstrap), otherwise a paired t-test over the shared seeds
(:mod:`vlalign.results.stats`). An arm may instead be the shorthand
``{run: <base_run>, metric: <metric>, dataset: <dataset>}`` for the run's final-stage metric
(``variant: removed`` for its prefix-removed evaluation), which expands to such a query.

Verdicts: *holds* (p < alpha in the expected direction), *contradicted* (p < alpha the other
way), *inconclusive* (anything else, including an arm without data). Nothing is hard-coded: a
claim whose data disagree says so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from vlalign.io_utils import write_text_atomic
from vlalign.results.db import RESAMPLE_KEY, query, resample_map
from vlalign.results.stats import (
    DEFAULT_BOOTSTRAP,
    Comparison,
    Interval,
    SeedValue,
    compare,
    interval,
    verdict,
)
from vlalign.results.tables import TableSpecError, format_p, latex_escape, seed_values

log = logging.getLogger(__name__)

_CLAIM_KEYS = {"name", "claim", "source", "metric", "arm", "baseline", "expected", "alpha",
               "scale", "decimals", "unit"}
_ARM_SHORTHAND = {"run", "metric", "dataset", "variant", "label"}


class ClaimSpecError(TableSpecError):
    """A claim declaration is invalid; the message names the file, claim and key."""


@dataclass(frozen=True)
class Arm:
    label: str
    query: str


@dataclass(frozen=True)
class Claim:
    name: str
    claim: str
    source: str
    metric: str
    arm: Arm
    baseline: Arm
    expected: str  # "higher" | "lower": the expected sign of arm − baseline
    alpha: float = 0.01
    scale: float = 1.0
    decimals: int = 2
    origin: str = "<dict>"


@dataclass
class ClaimResult:
    claim: Claim
    arm: Interval | None
    baseline: Interval | None
    comparison: Comparison | None
    verdict: str
    note: str = ""


def _shorthand_sql(d: dict, where: str) -> str:
    unknown = set(d) - _ARM_SHORTHAND
    if unknown or not {"run", "metric"} <= set(d):
        raise ClaimSpecError(
            f"{where}: an arm is {{query: ...}} or {{run, metric[, dataset, variant]}}; "
            f"got keys {sorted(d)}"
        )
    stage = "list_last(r.chain)"
    if d.get("variant"):
        stage += f" || '@prefix_{_sql_word(d['variant'], where)}'"
    dataset = f"AND m.dataset = '{_sql_word(d['dataset'], where)}'" if d.get("dataset") else ""
    return (
        f"SELECT r.seed, m.run, m.stage, m.dataset, m.split, m.metric, m.value "
        f"FROM metrics m JOIN runs r USING (run) "
        f"WHERE r.base_run = '{_sql_word(d['run'], where)}' "
        f"AND m.metric = '{_sql_word(d['metric'], where)}' {dataset} "
        f"AND m.split = 'test' AND m.stage = {stage}"
    )


def _sql_word(v: Any, where: str) -> str:
    s = str(v)
    if not s.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ClaimSpecError(f"{where}: {s!r} is not a plain name")
    return s


def _arm(d: Any, where: str) -> Arm:
    if not isinstance(d, dict):
        raise ClaimSpecError(f"{where}: expected a mapping")
    if "query" in d:
        if set(d) - {"query", "label"}:
            raise ClaimSpecError(f"{where}: a query arm takes only 'query' and 'label'")
        return Arm(str(d.get("label", "arm")), str(d["query"]))
    return Arm(str(d.get("label", d.get("run", "arm"))), _shorthand_sql(d, where))


def claim_from_dict(d: Any, origin: str) -> Claim:
    if not isinstance(d, dict):
        raise ClaimSpecError(f"{origin}: a claim must be a mapping")
    name = d.get("name", "?")
    where = f"{origin}: claim {name!r}"
    unknown = set(d) - _CLAIM_KEYS
    if unknown:
        raise ClaimSpecError(f"{where}: unknown key(s) {sorted(unknown)}")
    for key in ("name", "claim", "source", "metric", "arm", "baseline", "expected"):
        if key not in d:
            raise ClaimSpecError(f"{where}: missing required key {key!r}")
    if d["expected"] not in ("higher", "lower"):
        raise ClaimSpecError(f"{where}: expected must be 'higher' or 'lower'")
    alpha = float(d.get("alpha", 0.01))
    if not 0 < alpha < 1:
        raise ClaimSpecError(f"{where}: alpha must be in (0, 1)")
    return Claim(
        name=str(name),
        claim=str(d["claim"]),
        source=str(d["source"]),
        metric=str(d["metric"]),
        arm=_arm(d["arm"], f"{where}: arm"),
        baseline=_arm(d["baseline"], f"{where}: baseline"),
        expected=d["expected"],
        alpha=alpha,
        scale=float(d.get("scale", 1.0)),
        decimals=int(d.get("decimals", 2)),
        origin=origin,
    )


def load_claims(claims_dir: str | Path) -> list[Claim]:
    """Every claim of every ``*.yaml`` in ``claims_dir`` (a file: ``claims: [...]``)."""
    out: list[Claim] = []
    for path in sorted(Path(claims_dir).glob("*.yaml")):
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ClaimSpecError(f"{path}: invalid YAML ({e})") from e
        if not isinstance(doc, dict) or not isinstance(doc.get("claims"), list):
            raise ClaimSpecError(f"{path}: expected a mapping with a 'claims' list")
        out += [claim_from_dict(c, str(path)) for c in doc["claims"]]
    names = [c.name for c in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ClaimSpecError(f"{claims_dir}: duplicate claim name(s) {dup}")
    return out


def _values(db_path: str | Path, arm: Arm, resamples: dict, where: str) -> dict:
    try:
        df = query(db_path, arm.query)
    except Exception as e:  # duckdb errors: a bad query names its claim
        raise ClaimSpecError(f"{where}: query failed ({e})") from e
    missing = [c for c in ("seed", "value") if c not in df.columns]
    if missing:
        raise ClaimSpecError(f"{where}: query result lacks {missing}; got {list(df.columns)}")
    df = df[df["value"].notna()]
    if df["seed"].duplicated().any():
        raise ClaimSpecError(f"{where}: several rows for one seed; return one value per seed")
    keyed = set(RESAMPLE_KEY) <= set(df.columns)
    return seed_values(df, "value", "seed", resamples if keyed else None)


def evaluate_claim(
    db_path: str | Path, claim: Claim, resamples: dict | None = None, *, seed: int = 0
) -> ClaimResult:
    """Measure one claim: both arms' intervals, their paired difference and the verdict."""
    resamples = resample_map(db_path) if resamples is None else resamples
    where = f"{claim.origin}: claim {claim.name!r}"
    arm = _values(db_path, claim.arm, resamples, f"{where}: arm")
    base = _values(db_path, claim.baseline, resamples, f"{where}: baseline")
    if not arm or not base:
        empty = "arm" if not arm else "baseline"
        return ClaimResult(claim, None, None, None, "inconclusive", f"no data for the {empty}")
    iv_arm = interval(arm, seed=seed)
    iv_base = interval(base, seed=seed)
    cmp = compare(arm, base, n_boot=DEFAULT_BOOTSTRAP, seed=seed)
    note = "" if cmp is not None else "fewer than 2 shared seeds"
    return ClaimResult(claim, iv_arm, iv_base, cmp, verdict(cmp, claim.expected, claim.alpha),
                       note)


def evaluate_claims(db_path: str | Path, claims: list[Claim]) -> list[ClaimResult]:
    resamples = resample_map(db_path)
    return [evaluate_claim(db_path, c, resamples) for c in claims]


# ---------------------------------------------------------------------------------------------
# report


def _num(x: float | None, r: ClaimResult, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "--"
    v = x * r.claim.scale
    return f"{v:+.{r.claim.decimals}f}" if signed else f"{v:.{r.claim.decimals}f}"


def _arm_text(iv: Interval | None, r: ClaimResult) -> str:
    if iv is None:
        return "--"
    s = f"{_num(iv.mean, r)} (n={iv.n})"
    if iv.lo is not None:
        s += f" [{_num(iv.lo, r)}, {_num(iv.hi, r)}]"
    return s


def _effect_text(r: ClaimResult) -> str:
    c = r.comparison
    if c is None:
        return "--"
    lo, hi = sorted((c.lo * r.claim.scale, c.hi * r.claim.scale))
    d = r.claim.decimals
    return f"{c.diff * r.claim.scale:+.{d}f} [{lo:+.{d}f}, {hi:+.{d}f}]"


def results_frame(results: list[ClaimResult]) -> pd.DataFrame:
    rows = []
    for r in results:
        c = r.comparison
        rows.append({
            "claim": r.claim.name,
            "text": r.claim.claim,
            "source": r.claim.source,
            "metric": r.claim.metric,
            "arm": r.claim.arm.label,
            "baseline": r.claim.baseline.label,
            "expected": r.claim.expected,
            "arm_mean": None if r.arm is None else r.arm.mean * r.claim.scale,
            "baseline_mean": None if r.baseline is None else r.baseline.mean * r.claim.scale,
            "effect": None if c is None else c.diff * r.claim.scale,
            "effect_lo": None if c is None else min(c.lo, c.hi) * r.claim.scale,
            "effect_hi": None if c is None else max(c.lo, c.hi) * r.claim.scale,
            "p": None if c is None else c.p,
            "seeds": None if c is None else c.n,
            "test": None if c is None else c.method,
            "alpha": r.claim.alpha,
            "verdict": r.verdict,
            "note": r.note,
        })
    return pd.DataFrame(rows)


def to_markdown(results: list[ClaimResult]) -> str:
    lines = [
        "**Claims of the papers, measured on this DB** (effect = arm − baseline, mean over "
        "shared seeds, 95 % interval; verdict at the claim's alpha).",
        "",
        "| Claim | Source | Metric | Arm | Baseline | Effect [95 % CI] | p | Test | Verdict |",
        "|:---|:---|:---|:---|:---|:---:|:---:|:---|:---:|",
    ]
    for r in results:
        c = r.comparison
        p = "--" if c is None else format_p(c.p)
        cells = [
            r.claim.claim, r.claim.source, r.claim.metric,
            f"{r.claim.arm.label}: {_arm_text(r.arm, r)}",
            f"{r.claim.baseline.label}: {_arm_text(r.baseline, r)}",
            _effect_text(r), p, "--" if c is None else f"{c.method} (n={c.n})",
            f"**{r.verdict}**" + (f" ({r.note})" if r.note else ""),
        ]
        lines.append("| " + " | ".join(str(x).replace("|", r"\|") for x in cells) + " |")
    return "\n".join(lines) + "\n"


def to_latex(results: list[ClaimResult]) -> str:
    lines = [
        r"\begin{table}[t]", r"\centering",
        r"\caption{Claims of the papers measured on this run (effect = arm $-$ baseline, "
        r"mean over shared seeds, 95\,\% interval).}",
        r"\label{tab:claims}",
        r"\begin{tabular}{p{5.2cm}llccl}", r"\toprule",
        r"Claim & Source & Metric & Effect [95\,\% CI] & $p$ & Verdict \\", r"\midrule",
    ]
    for r in results:
        c = r.comparison
        p = "--" if c is None else format_p(c.p)
        lines.append(" & ".join(latex_escape(x) for x in (
            r.claim.claim, r.claim.source, r.claim.metric, _effect_text(r), p, r.verdict
        )) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def plot_claims(results: list[ClaimResult], out_path: Path) -> Path | None:
    """One panel per claim: both arms' means with their intervals, the verdict as title."""
    shown = [r for r in results if r.arm is not None and r.baseline is not None]
    if not shown:
        log.warning("no claim has data for both arms: no claims figure")
        return None
    from matplotlib.figure import Figure

    from vlalign.io_utils import atomic_path

    cols = min(3, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig = Figure(figsize=(3.6 * cols, 2.6 * rows), layout="constrained")
    colours = {"holds": "tab:green", "contradicted": "tab:red", "inconclusive": "tab:gray"}
    for k, r in enumerate(shown):
        ax = fig.add_subplot(rows, cols, k + 1)
        s = r.claim.scale
        for x, iv in enumerate((r.baseline, r.arm)):
            lo = iv.lo if iv.lo is not None else iv.mean
            hi = iv.hi if iv.hi is not None else iv.mean
            ax.errorbar([x], [iv.mean * s], yerr=[[(iv.mean - lo) * s], [(hi - iv.mean) * s]],
                        fmt="o", capsize=4, color=colours[r.verdict] if x else "black")
        ax.set_xticks([0, 1], [r.claim.baseline.label, r.claim.arm.label], fontsize=8)
        ax.set_xlim(-0.5, 1.5)
        ax.set_ylabel(r.claim.metric, fontsize=8)
        p = "" if r.comparison is None else f", {format_p(r.comparison.p)}"
        ax.set_title(f"{r.claim.name}\n{r.verdict}{p}", fontsize=8,
                     color=colours[r.verdict])
        ax.tick_params(labelsize=7)
    with atomic_path(out_path) as tmp:
        fig.savefig(tmp, format=out_path.suffix.lstrip("."), dpi=130)
    return out_path


def write_report(db_path: str | Path, claims_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """``claims.{md,tex,csv}`` and ``claims.png`` in ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    results = evaluate_claims(db_path, load_claims(claims_dir))
    paths = []
    for name, text in (("claims.md", to_markdown(results)), ("claims.tex", to_latex(results)),
                       ("claims.csv", results_frame(results).to_csv(index=False))):
        write_text_atomic(out_dir / name, text)
        paths.append(out_dir / name)
    fig = plot_claims(results, out_dir / "claims.png")
    if fig is None:  # the rule declares the figure: an empty one says why
        from matplotlib.figure import Figure

        from vlalign.io_utils import atomic_path

        f = Figure(figsize=(4, 1))
        f.text(0.5, 0.5, "no claim has data for both arms yet", ha="center")
        with atomic_path(out_dir / "claims.png") as tmp:
            f.savefig(tmp, format="png")
    paths.append(out_dir / "claims.png")
    for r in results:
        log.info("claim %s: %s (%s)", r.claim.name, r.verdict, _effect_text(r))
    return paths


