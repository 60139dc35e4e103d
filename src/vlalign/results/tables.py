"""Paper tables declared as data: a YAML file = SQL over the results DB + a layout.

See docs/results.md for the declaration format. A table is rendered by running its SQL (long
format: one row per run × column key × value), pivoting row keys × column keys, aggregating over
seeds (mean ± sample std), scaling (e.g. ×100 for caption metrics), marking the best value per
column bold and the second underlined, and writing LaTeX (booktabs), CSV and Markdown.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pandas as pd
import yaml

from vlalign.io_utils import write_text_atomic
from vlalign.results.db import RESAMPLE_KEY, SCHEMA_VERSION, query, resample_map
from vlalign.results.stats import (
    DEFAULT_BOOTSTRAP,
    DEFAULT_LEVEL,
    Comparison,
    Interval,
    SeedValue,
    compare,
    interval,
)
from vlalign.runs.record import RECORD_COLUMNS

log = logging.getLogger(__name__)

MISSING = "--"
_AGGREGATES = ("mean_std", "mean", "none")
_BETTER = ("higher", "lower", None)
_INTERVALS = ("auto", "seeds", "none")
_LAYOUTS = ("below", "inline")

_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


class TableSpecError(ValueError):
    """A table declaration is invalid; the message names the YAML file and key."""


@dataclass(frozen=True)
class ColumnFormat:
    scale: float = 1.0
    decimals: int = 1
    better: str | None = "higher"


@dataclass(frozen=True)
class ExtraColumn:
    """A column from its own query (e.g. trainable %), placed before or after the pivot."""

    name: str
    label: str
    query: str
    fmt: ColumnFormat
    value: str
    seed: str | None
    position: str = "last"
    aggregate: str = "mean_std"


@dataclass(frozen=True)
class TableSpec:
    name: str
    query: str
    rows: list[str]
    columns: list[str]
    value: str = "value"
    seed: str | None = None
    aggregate: str = "mean_std"
    fmt: ColumnFormat = ColumnFormat()
    caption: str | None = None
    caption_tex: str | None = None
    label: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    row_order: list[Any] = field(default_factory=list)
    column_order: dict[str, list[Any]] = field(default_factory=dict)
    column_format: dict[str, ColumnFormat] = field(default_factory=dict)
    extra_columns: list[ExtraColumn] = field(default_factory=list)
    # rows shown but never marked best or second (a reference such as a chance level)
    unranked_rows: list[str] = field(default_factory=list)
    # intervals and paired comparisons (vlalign.results.stats; docs/results.md)
    interval: str = "auto"  # auto | seeds | none
    interval_layout: str = "below"  # below (a row under each row) | inline (in the cell)
    level: float = DEFAULT_LEVEL
    baseline: tuple | None = None  # a row key: every other row is compared with it
    alpha: float = 0.01
    bootstrap: int = DEFAULT_BOOTSTRAP
    bootstrap_seed: int = 0
    source: str = "<dict>"

    def label_of(self, value: Any) -> str:
        return self.labels.get(_key_str(value), _key_str(value))


@dataclass(frozen=True)
class Column:
    key: tuple  # one entry per level of spec.columns (extra columns: (name,))
    headers: tuple[str, ...]  # display label per header level ("" where none)
    fmt: ColumnFormat
    extra: bool = False


@dataclass
class Cell:
    mean: float
    std: float | None
    n: int
    decimals: int
    rank: str | None = None  # "best" | "second" | "significant" | None
    lo: float | None = None  # the interval of the mean (scaled like the mean)
    hi: float | None = None
    vs: Comparison | None = None  # the paired comparison with the baseline row (scaled)

    def text(self, pm: str) -> str:
        s = f"{self.mean:.{self.decimals}f}"
        if self.std is not None:
            s += f"{pm}{self.std:.{self.decimals}f}"
        return s

    def interval_text(self) -> str | None:
        if self.lo is None or self.hi is None:
            return None
        return f"[{self.lo:.{self.decimals}f}, {self.hi:.{self.decimals}f}]"

    def comparison_text(self, delta: str = "Δ") -> str | None:
        c = self.vs
        if c is None:
            return None
        d = self.decimals
        return f"{delta} {c.diff:+.{d}f} [{c.lo:+.{d}f}, {c.hi:+.{d}f}], {format_p(c.p)}"


def format_p(p: float) -> str:
    """``p=0.034``; below 0.001 as ``p<0.001`` (a Monte Carlo p has no more digits)."""
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


@dataclass
class TableResult:
    spec: TableSpec
    row_keys: list[tuple]
    columns: list[Column]
    cells: dict[tuple[tuple, int], Cell]

    @property
    def empty(self) -> bool:
        return not self.cells


# ---------------------------------------------------------------------------------------------
# declarations


def _key_str(v: Any) -> str:
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _fmt_from(d: dict, base: ColumnFormat, where: str) -> ColumnFormat:
    better = d.get("better", base.better)
    if better not in _BETTER:
        raise TableSpecError(f"{where}: 'better' must be higher, lower or null, got {better!r}")
    try:
        return ColumnFormat(
            scale=float(d.get("scale", base.scale)),
            decimals=int(d.get("decimals", base.decimals)),
            better=better,
        )
    except (TypeError, ValueError) as e:
        raise TableSpecError(f"{where}: bad scale/decimals ({e})") from e


_SPEC_KEYS = {
    "name",
    "query",
    "rows",
    "columns",
    "value",
    "seed",
    "aggregate",
    "scale",
    "decimals",
    "better",
    "caption",
    "caption_tex",
    "label",
    "labels",
    "row_order",
    "column_order",
    "column_format",
    "extra_columns",
    "unranked_rows",
    "interval",
    "interval_layout",
    "level",
    "baseline",
    "alpha",
    "bootstrap",
    "bootstrap_seed",
}
_EXTRA_KEYS = {
    "name",
    "label",
    "query",
    "value",
    "seed",
    "scale",
    "decimals",
    "better",
    "position",
    "aggregate",
}
_FORMAT_KEYS = {"scale", "decimals", "better"}


def _as_list(v: Any, where: str) -> list[str]:
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and v and all(isinstance(x, str) for x in v):
        return list(v)
    raise TableSpecError(f"{where}: expected a column name or a non-empty list of names")


def spec_from_dict(d: dict, source: str = "<dict>") -> TableSpec:
    """Validate a table declaration (parsed YAML) and return a :class:`TableSpec`."""
    if not isinstance(d, dict):
        raise TableSpecError(f"{source}: a table declaration must be a mapping")
    unknown = set(d) - _SPEC_KEYS
    if unknown:
        raise TableSpecError(
            f"{source}: unknown key(s) {sorted(unknown)}; allowed {sorted(_SPEC_KEYS)}"
        )
    for key in ("name", "query", "rows", "columns"):
        if key not in d:
            raise TableSpecError(f"{source}: missing required key {key!r}")
    name = str(d["name"])
    if not _NAME_RE.match(name):
        raise TableSpecError(f"{source}: name {name!r} must match {_NAME_RE.pattern}")
    aggregate = d.get("aggregate", "mean_std")
    if aggregate not in _AGGREGATES:
        raise TableSpecError(f"{source}: aggregate must be one of {_AGGREGATES}")
    base = _fmt_from(d, ColumnFormat(), source)
    column_format = {}
    for key, sub in (d.get("column_format") or {}).items():
        where = f"{source}: column_format.{key}"
        if not isinstance(sub, dict) or set(sub) - _FORMAT_KEYS:
            raise TableSpecError(f"{where}: expected a mapping with keys {sorted(_FORMAT_KEYS)}")
        column_format[_key_str(key)] = _fmt_from(sub, base, where)
    extras = []
    for i, e in enumerate(d.get("extra_columns") or []):
        where = f"{source}: extra_columns[{i}]"
        if not isinstance(e, dict) or set(e) - _EXTRA_KEYS or not {"name", "query"} <= set(e):
            raise TableSpecError(
                f"{where}: needs 'name' and 'query'; allowed {sorted(_EXTRA_KEYS)}"
            )
        if e.get("aggregate", aggregate) not in _AGGREGATES:
            raise TableSpecError(f"{where}: aggregate must be one of {_AGGREGATES}")
        if e.get("position", "last") not in ("first", "last"):
            raise TableSpecError(f"{where}: position must be 'first' or 'last'")
        extras.append(
            ExtraColumn(
                name=str(e["name"]),
                label=str(e.get("label", e["name"])),
                query=str(e["query"]),
                fmt=_fmt_from({"better": None, **e}, base, where),
                value=str(e.get("value", d.get("value", "value"))),
                seed=e.get("seed", d.get("seed")),
                position=e.get("position", "last"),
                aggregate=e.get("aggregate", aggregate),
            )
        )
    column_order = d.get("column_order") or {}
    columns = _as_list(d["columns"], f"{source}: columns")
    if not isinstance(column_order, dict) or set(column_order) - set(columns):
        raise TableSpecError(f"{source}: column_order must map names in 'columns' to lists")
    rows = _as_list(d["rows"], f"{source}: rows")
    interval_kind = d.get("interval", "auto")
    if interval_kind not in _INTERVALS:
        raise TableSpecError(f"{source}: interval must be one of {_INTERVALS}")
    layout = d.get("interval_layout", "below")
    if layout not in _LAYOUTS:
        raise TableSpecError(f"{source}: interval_layout must be one of {_LAYOUTS}")
    baseline = d.get("baseline")
    if baseline is not None:
        baseline = baseline if isinstance(baseline, list) else [baseline]
        if len(baseline) != len(rows):
            raise TableSpecError(
                f"{source}: baseline {d['baseline']!r} must give one value per row key {rows}"
            )
        baseline = tuple(_key_str(v) for v in baseline)
        if d.get("seed") is None:
            raise TableSpecError(f"{source}: a baseline needs 'seed' (comparisons pair seeds)")
    try:
        level, alpha = float(d.get("level", DEFAULT_LEVEL)), float(d.get("alpha", 0.01))
        n_boot = int(d.get("bootstrap", DEFAULT_BOOTSTRAP))
        boot_seed = int(d.get("bootstrap_seed", 0))
    except (TypeError, ValueError) as e:
        raise TableSpecError(f"{source}: bad level/alpha/bootstrap ({e})") from e
    if not (0 < level < 1 and 0 < alpha < 1 and n_boot >= 100):
        raise TableSpecError(f"{source}: need 0 < level, alpha < 1 and bootstrap >= 100")
    label = d.get("label")
    if label is not None and not re.match(r"^[^\s{}\\%#]+$", str(label)):
        raise TableSpecError(f"{source}: label {label!r} must not contain spaces or {{}}\\%#")
    return TableSpec(
        name=name,
        query=str(d["query"]),
        rows=rows,
        columns=columns,
        value=str(d.get("value", "value")),
        seed=d.get("seed"),
        aggregate=aggregate,
        fmt=base,
        caption=d.get("caption"),
        caption_tex=d.get("caption_tex"),
        label=label,
        labels={_key_str(k): str(v) for k, v in (d.get("labels") or {}).items()},
        row_order=list(d.get("row_order") or []),
        column_order={k: list(v) for k, v in column_order.items()},
        column_format=column_format,
        extra_columns=extras,
        unranked_rows=[_key_str(v) for v in _as_list_or_empty(d, "unranked_rows", source)],
        interval=interval_kind,
        interval_layout=layout,
        level=level,
        baseline=baseline,
        alpha=alpha,
        bootstrap=n_boot,
        bootstrap_seed=boot_seed,
        source=source,
    )


def _as_list_or_empty(d: dict, key: str, source: str) -> list:
    v = d.get(key)
    if v is None:
        return []
    if not isinstance(v, list):
        raise TableSpecError(f"{source}: {key} must be a list of row values")
    return v


def load_spec(path: str | Path) -> TableSpec:
    """A declaration file. Its ``name`` must be its file stem: the workflow knows a table's
    outputs (``<stem>.tex`` ...) from the file name before any table is rendered."""
    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise TableSpecError(f"{path}: invalid YAML ({e})") from e
    spec = spec_from_dict(d, source=str(path))
    if spec.name != path.stem:
        raise TableSpecError(
            f"{path}: name {spec.name!r} differs from the file name {path.stem!r}; "
            f"rename the file to {spec.name}.yaml or set name: {path.stem}"
        )
    return spec


def load_specs(tables_dir: str | Path) -> list[TableSpec]:
    specs = [load_spec(p) for p in sorted(Path(tables_dir).glob("*.yaml"))]
    names = [s.name for s in specs]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise TableSpecError(f"{tables_dir}: duplicate table name(s) {sorted(dup)}")
    return specs


# ---------------------------------------------------------------------------------------------
# rendering


def _py(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def _sort_key(v: Any) -> tuple:
    # Numbers before strings, numbers numerically (prefix lengths 4 < 16 < 64).
    return (0, float(v), "") if isinstance(v, int | float) else (1, 0.0, str(v))


def _ordered_key(v: Any, preferred: list[str]) -> tuple:
    """Declared values first, in declaration order; the rest in natural order."""
    s = _key_str(v)
    return (preferred.index(s), _sort_key(v)) if s in preferred else (len(preferred), _sort_key(v))


def _row_order_key(v: Any, patterns: list[str]) -> tuple:
    """``row_order``: values matching an entry (a name, or a glob such as ``"* (before PEFT)"``)
    first, in declaration order; the rest in natural order."""
    s = _key_str(v)
    hit = next((i for i, p in enumerate(patterns) if s == p or fnmatch.fnmatchcase(s, p)), None)
    return (len(patterns) if hit is None else hit, _sort_key(v))


SeedValues = dict[Any, SeedValue]


def _aggregate(
    df: pd.DataFrame,
    keys: list[str],
    value: str,
    seed: str | None,
    how: str,
    where: str,
    resamples: dict[tuple, tuple[str, np.ndarray]] | None = None,
) -> dict[tuple, SeedValues]:
    """Group key → seed → its value (with the metrics row's image resamples where the query
    returns the row's :data:`RESAMPLE_KEY` columns; without a seed column each row is its own
    "seed")."""
    out = {}
    with_key = resamples is not None and set(RESAMPLE_KEY) <= set(df.columns)
    for key, g in df.groupby(keys, sort=False, dropna=False):
        key = tuple(_py(k) for k in (key if isinstance(key, tuple) else (key,)))
        if seed is not None and g[seed].duplicated().any():
            dup = g[seed][g[seed].duplicated()].iloc[0]
            raise TableSpecError(
                f"{where}: several values for {dict(zip(keys, key))} and {seed}={dup}; "
                "make the query return one value per seed"
            )
        if how == "none" and len(g) > 1:
            raise TableSpecError(
                f"{where}: {len(g)} values for {dict(zip(keys, key))} with aggregate: none"
            )
        out[key] = seed_values(g, value, seed, resamples if with_key else None)
    return out


def seed_values(
    rows: pd.DataFrame,
    value: str,
    seed: str | None,
    resamples: dict[tuple, tuple[str, np.ndarray]] | None,
) -> SeedValues:
    """Seed → its value, with the image resamples of the metrics row it names (its
    :data:`RESAMPLE_KEY` columns) where ``resamples`` has them; without a seed column each
    row is its own "seed"."""
    values: SeedValues = {}
    for i, rec in enumerate(rows.to_dict("records")):
        hit = resamples.get(tuple(rec[k] for k in RESAMPLE_KEY)) if resamples else None
        values[_py(rec[seed]) if seed is not None else i] = SeedValue(
            float(rec[value]), None if hit is None else hit[1], None if hit is None else hit[0]
        )
    return values


def _run_query(db_path: str | Path, sql: str, needed: list[str], where: str) -> pd.DataFrame:
    try:
        df = query(db_path, sql)
    except duckdb.Error as e:  # e.g. a column the schema does not have (a renamed field)
        raise TableSpecError(
            f"{where}: query failed against schema version {SCHEMA_VERSION} ({e}); "
            f"the runs table's record columns are {list(RECORD_COLUMNS)}"
        ) from e
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise TableSpecError(
            f"{where}: query result lacks column(s) {missing}; it returned {list(df.columns)}"
        )
    df = df[df[needed[-1]].notna()]  # NULL values (e.g. from LEFT JOINs) are missing cells
    null_keys = df[needed[:-1]].isna().any(axis=1)
    if null_keys.any():
        log.warning("%s: dropping %d row(s) with NULL keys", where, int(null_keys.sum()))
        df = df[~null_keys]
    return df


def _scaled_cell(iv: Interval, vs: Comparison | None, fmt: ColumnFormat, how: str) -> Cell:
    s = fmt.scale

    def sc(x: float | None) -> float | None:
        return None if x is None else x * s

    lo, hi = sc(iv.lo), sc(iv.hi)
    if s < 0 and lo is not None:
        lo, hi = hi, lo
    if vs is not None:
        vlo, vhi = sorted((vs.lo * s, vs.hi * s))
        vs = replace(vs, diff=vs.diff * s, lo=vlo, hi=vhi)
    std = None if how != "mean_std" or iv.std is None else iv.std * abs(s)
    return Cell(iv.mean * s, std, iv.n, fmt.decimals, lo=lo, hi=hi, vs=vs)


def _baseline_row(spec: TableSpec, rows: list[tuple], where: str) -> tuple | None:
    if spec.baseline is None:
        return None
    hit = [r for r in rows if tuple(_key_str(x) for x in r) == spec.baseline]
    if not hit:
        log.warning("%s: baseline row %s has no data; no comparisons", where, spec.baseline)
        return None
    return hit[0]


def _mark_significant(result: TableResult) -> None:
    """With a baseline: a cell is marked (bold) when it beats the baseline at p < alpha in
    the column's better direction, as seed 000's tables mark "statistically superior"."""
    for (_, j), cell in result.cells.items():
        better = result.columns[j].fmt.better
        c = cell.vs
        if better is None or c is None or c.p >= result.spec.alpha or c.diff == 0:
            continue
        if (c.diff > 0) == (better == "higher"):
            cell.rank = "significant"


def _rank(result: TableResult) -> None:
    unranked = set(result.spec.unranked_rows)
    for j, col in enumerate(result.columns):
        if col.fmt.better is None:
            continue
        cells = [
            c
            for (r, jj), c in result.cells.items()
            if jj == j and not unranked & {_key_str(x) for x in r}
        ]
        # Compare at display precision so visibly equal numbers tie.
        vals = sorted(
            {round(c.mean, col.fmt.decimals) for c in cells}, reverse=col.fmt.better == "higher"
        )
        if len(cells) < 2 or len(vals) < 2:
            continue
        for c in cells:
            v = round(c.mean, col.fmt.decimals)
            if v == vals[0]:
                c.rank = "best"
            elif v == vals[1] and len(cells) >= 3:
                c.rank = "second"


def render_table(db_path: str | Path, spec: TableSpec | dict | str | Path) -> TableResult:
    """Run the table's query and pivot/aggregate/rank it into a :class:`TableResult`.

    ``spec`` is a :class:`TableSpec`, a declaration dict, or the path of a YAML declaration.
    """
    if isinstance(spec, dict):
        spec = spec_from_dict(spec)
    elif not isinstance(spec, TableSpec):
        spec = load_spec(spec)
    where = f"table {spec.name} ({spec.source})"
    keys = spec.rows + spec.columns
    needed = keys + ([spec.seed] if spec.seed else []) + [spec.value]
    df = _run_query(db_path, spec.query, needed, where)
    resamples = resample_map(db_path) if spec.interval == "auto" else None
    agg = (
        _aggregate(df, keys, spec.value, spec.seed, spec.aggregate, where, resamples)
        if len(df)
        else {}
    )
    nr = len(spec.rows)

    # Column keys: those in the data, plus every declared value of the innermost level under
    # each outer key present (e.g. all five caption metrics for each dataset), so a metric that
    # was not computed shows as "--" instead of silently vanishing.
    col_keys = {k[nr:] for k in agg}
    leaf = spec.column_order.get(spec.columns[-1], [])
    prefixes = {k[:-1] for k in col_keys} if len(spec.columns) > 1 else {()}
    col_keys |= {p + (v,) for p in prefixes for v in leaf}
    prefs = [[_key_str(p) for p in spec.column_order.get(c, [])] for c in spec.columns]
    ordered = sorted(col_keys, key=lambda k: tuple(_ordered_key(x, p) for x, p in zip(k, prefs)))
    columns = []
    for k in ordered:
        fmt = spec.column_format.get("/".join(_key_str(x) for x in k)) or spec.column_format.get(
            _key_str(k[-1]), spec.fmt
        )
        columns.append(Column(key=k, headers=tuple(spec.label_of(x) for x in k), fmt=fmt))

    row_keys = {k[:nr] for k in agg}
    extra_aggs = []
    for e in spec.extra_columns:
        ewhere = f"{where}: extra column {e.name}"
        eneeded = spec.rows + ([e.seed] if e.seed else []) + [e.value]
        edf = _run_query(db_path, e.query, eneeded, ewhere)
        eagg = _aggregate(edf, spec.rows, e.value, e.seed, e.aggregate, ewhere) if len(edf) else {}
        row_keys |= set(eagg)
        headers = ("",) * (len(spec.columns) - 1) + (e.label,)
        extra_aggs.append(
            (Column(key=(e.name,), headers=headers, fmt=e.fmt, extra=True), eagg, e.position)
        )
    columns = (
        [c for c, _, pos in extra_aggs if pos == "first"]
        + columns
        + [c for c, _, pos in extra_aggs if pos == "last"]
    )

    # row_order applies at every row level (e.g. rows [dataset, model]: reference models first
    # within each dataset)
    row_pref = [_key_str(p) for p in spec.row_order]
    rows = sorted(row_keys, key=lambda k: tuple(_row_order_key(x, row_pref) for x in k))

    cells: dict[tuple[tuple, int], Cell] = {}
    extra_by_name = {c.key[0]: a for c, a, _ in extra_aggs}
    base = _baseline_row(spec, rows, where)
    extra_how = {e.name: e.aggregate for e in spec.extra_columns}
    for j, col in enumerate(columns):
        source = extra_by_name[col.key[0]] if col.extra else agg
        suffix = () if col.extra else col.key
        for r in rows:
            values = source.get(r + suffix)
            if values is None:
                continue
            how = extra_how[col.key[0]] if col.extra else spec.aggregate
            # extra columns (e.g. trainable %) describe the row, they are not compared
            kind = "none" if col.extra or how != "mean_std" else spec.interval
            iv = interval(values, level=spec.level, kind=kind, n_boot=spec.bootstrap,
                          seed=spec.bootstrap_seed)
            vs = None
            if (base is not None and not col.extra and r != base
                    and source.get(base + suffix) is not None):
                vs = compare(values, source[base + suffix], level=spec.level,
                             kind=spec.interval if spec.interval != "none" else "seeds",
                             n_boot=spec.bootstrap, seed=spec.bootstrap_seed)
            cells[(r, j)] = _scaled_cell(iv, vs, col.fmt, how)
    result = TableResult(spec=spec, row_keys=rows, columns=columns, cells=cells)
    if base is None:
        _rank(result)
    else:
        _mark_significant(result)
    if result.empty:
        log.warning("%s: no data yet; the table is written with a 'no results' row", where)
    return result


# ---------------------------------------------------------------------------------------------
# writers

_TEX_ESCAPES = {
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "\\": r"\textbackslash{}",
    # OT1 (the default font encoding) has no < >: use math so plain pdflatex renders them.
    "<": r"$<$",
    ">": r"$>$",
    # Unicode the papers use in labels, mapped to math so plain pdflatex compiles them.
    "±": r"$\pm$",
    "×": r"$\times$",
    "→": r"$\rightarrow$",
    "←": r"$\leftarrow$",
    "Δ": r"$\Delta$",
    "Γ": r"$\Gamma$",
    "ω": r"$\omega$",
}


def latex_escape(text: Any) -> str:
    """Escape LaTeX special characters in a plain-text cell."""
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in str(text))


def _header_groups(result: TableResult, level: int) -> list[tuple[str, int]]:
    """Consecutive columns sharing key[:level+1] → (label, span); extra columns stand alone."""
    groups: list[tuple[Any, str, int]] = []
    for col in result.columns:
        ident = ("__extra__", col.key) if col.extra else col.key[: level + 1]
        if groups and groups[-1][0] == ident and not col.extra:
            groups[-1] = (ident, groups[-1][1], groups[-1][2] + 1)
        else:
            groups.append((ident, col.headers[level], 1))
    return [(label, span) for _, label, span in groups]


def _below_rows(result: TableResult, cells: list[Cell | None]) -> list:
    """Functions cell → text of the rows under a row ("below" layout): its intervals, then
    its comparison with the baseline; only those that some cell of the row has."""
    if result.spec.interval_layout != "below":
        return []
    out = []
    for fn in (Cell.interval_text, Cell.comparison_text):
        if any(c is not None and fn(c) for c in cells):
            out.append(lambda c, fn=fn: (fn(c) or "") if c is not None else "")
    return out


def _inline(cell: Cell, text: str, layout: str) -> str:
    if layout != "inline":
        return text
    extra = [t for t in (cell.interval_text(), cell.comparison_text()) if t]
    return " ".join([text, *extra])


def _cell_tex(cell: Cell | None, layout: str = "below") -> str:
    if cell is None:
        return MISSING
    text = latex_escape(_inline(cell, cell.text(" ± "), layout))
    if cell.rank in ("best", "significant"):
        return rf"\textbf{{{text}}}"
    if cell.rank == "second":
        return rf"\underline{{{text}}}"
    return text


def to_latex(result: TableResult) -> str:
    """booktabs table (``table`` float with caption/label when declared)."""
    spec, nr = result.spec, len(result.spec.rows)
    ncols = nr + max(len(result.columns), 1)
    lines = [r"\begin{table}[t]", r"\centering"]
    if spec.caption_tex or spec.caption:
        lines.append(rf"\caption{{{spec.caption_tex or latex_escape(spec.caption)}}}")
    if spec.label:
        lines.append(rf"\label{{{spec.label}}}")
    lines += [rf"\begin{{tabular}}{{{'l' * nr}{'c' * (ncols - nr)}}}", r"\toprule"]
    for level in range(len(spec.columns) - 1):
        parts, rules, pos = [""] * nr, [], nr + 1
        for label, span in _header_groups(result, level):
            parts.append(
                rf"\multicolumn{{{span}}}{{c}}{{{latex_escape(label)}}}"
                if span > 1
                else latex_escape(label)
            )
            if label:
                rules.append(rf"\cmidrule(lr){{{pos}-{pos + span - 1}}}")
            pos += span
        lines.append(" & ".join(parts) + r" \\")
        if rules:
            lines.append(" ".join(rules))
    header = [latex_escape(spec.label_of(c)) for c in spec.rows]
    header += [latex_escape(c.headers[-1]) for c in result.columns] or [""]
    lines += [" & ".join(header) + r" \\", r"\midrule"]
    if result.empty:
        lines.append(rf"\multicolumn{{{ncols}}}{{c}}{{(no results yet)}} \\")
    else:
        for r in result.row_keys:
            cells = [result.cells.get((r, j)) for j in range(len(result.columns))]
            parts = [latex_escape(spec.label_of(x)) for x in r]
            parts += [_cell_tex(c, spec.interval_layout) for c in cells]
            lines.append(" & ".join(parts) + r" \\")
            for text_of in _below_rows(result, cells):
                small = [rf"{{\scriptsize {latex_escape(t)}}}" if t else "" for t in
                         map(text_of, cells)]
                lines.append(" & ".join([""] * nr + small) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(lines) + "\n"


def _flat_header(col: Column) -> str:
    return " / ".join(h for h in col.headers if h)


def to_markdown(result: TableResult) -> str:
    """GitHub-flavoured Markdown table (bold best, <u>underlined</u> second)."""
    spec = result.spec

    def esc(s: str) -> str:
        return str(s).replace("|", r"\|")

    header = [esc(spec.label_of(c)) for c in spec.rows]
    header += [esc(_flat_header(c)) for c in result.columns]
    lines = []
    if spec.caption or spec.caption_tex:
        lines += [f"**{esc(spec.caption or spec.caption_tex)}**", ""]
    lines += [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] * len(spec.rows) + [":---:"] * len(result.columns)) + "|",
    ]
    if result.empty:
        lines.append("| (no results yet) |" + " |" * (len(header) - 1))
    for r in result.row_keys:
        parts = [esc(spec.label_of(x)) for x in r]
        cells = [result.cells.get((r, j)) for j in range(len(result.columns))]
        for cell in cells:
            text = MISSING if cell is None else _inline(cell, cell.text(" ± "),
                                                        spec.interval_layout)
            if cell is not None and cell.rank in ("best", "significant"):
                text = f"**{text}**"
            elif cell is not None and cell.rank == "second":
                text = f"<u>{text}</u>"
            parts.append(text)
        lines.append("| " + " | ".join(parts) + " |")
        for text_of in _below_rows(result, cells):
            below = [f"<sub>{esc(t)}</sub>" if t else "" for t in map(text_of, cells)]
            lines.append("| " + " | ".join([""] * len(spec.rows) + below) + " |")
    return "\n".join(lines) + "\n"


def to_dataframe(result: TableResult) -> pd.DataFrame:
    """Wide numeric table: row keys, then per column the scaled mean and ``<key>_std``.

    Missing cells are NaN (empty in CSV) so the file stays machine-readable.
    """
    spec = result.spec
    records = []
    for r in result.row_keys:
        rec: dict[str, Any] = dict(zip(spec.rows, r))
        for j, col in enumerate(result.columns):
            name = "/".join(_key_str(x) for x in col.key)
            cell = result.cells.get((r, j))
            d = col.fmt.decimals
            rec[name] = round(cell.mean, d) if cell else math.nan
            if spec.aggregate == "mean_std":
                rec[f"{name}_std"] = (
                    round(cell.std, d) if cell and cell.std is not None else math.nan
                )
                if spec.interval != "none" and not col.extra:
                    for k in ("lo", "hi"):
                        v = getattr(cell, k) if cell else None
                        rec[f"{name}_{k}"] = math.nan if v is None else round(v, d)
            if spec.baseline is not None and not col.extra:
                vs = cell.vs if cell else None
                for k in ("diff", "lo", "hi"):
                    rec[f"{name}_vs_{k}"] = math.nan if vs is None else round(getattr(vs, k), d)
                rec[f"{name}_p"] = math.nan if vs is None else vs.p
        records.append(rec)
    if not records:
        names = list(spec.rows)
        for col in result.columns:
            name = "/".join(_key_str(x) for x in col.key)
            names += [name] + ([f"{name}_std"] if spec.aggregate == "mean_std" else [])
        return pd.DataFrame(columns=names)
    return pd.DataFrame.from_records(records)


def to_csv(result: TableResult) -> str:
    return to_dataframe(result).to_csv(index=False)


def write_table(result: TableResult, out_dir: str | Path) -> list[Path]:
    """Write ``<name>.tex``, ``<name>.csv`` and ``<name>.md`` atomically; return their paths."""
    out_dir = Path(out_dir)
    paths = []
    for ext, text in (
        ("tex", to_latex(result)),
        ("csv", to_csv(result)),
        ("md", to_markdown(result)),
    ):
        path = out_dir / f"{result.spec.name}.{ext}"
        write_text_atomic(path, text)
        paths.append(path)
    return paths


def render_all(db_path: str | Path, tables_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """Render every ``*.yaml`` declaration in ``tables_dir`` into ``out_dir``."""
    specs = load_specs(tables_dir)
    if not specs:
        log.warning("no table declarations (*.yaml) in %s", tables_dir)
    paths: list[Path] = []
    for spec in specs:
        paths += write_table(render_table(db_path, spec), out_dir)
    return paths
