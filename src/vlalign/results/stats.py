"""Intervals over training seeds and paired comparisons of two arms (docs/results.md).

Two kinds of data, two procedures:
- **A value per seed** (a loss, an effective rank): the t interval of the mean over seeds, and a
  paired t-test on the per-seed differences of two arms (the seeds they share).
- **A corpus score per seed with its image resamples** (CIDEr, BLEU, ... from
  :mod:`vlalign.eval.resampling`): a hierarchical bootstrap, which draws seeds with replacement
  and then, for each drawn seed, one image resample of that seed's run. A paired comparison
  draws the same seeds and the same image resample for both arms (every run on a dataset split
  shares its resamples), so image difficulty and seed cancel where they can.

With few seeds the outer level has little to draw from: three seeds give an interval that is
too narrow on the seed side; the t procedures pay for it with a wide t quantile instead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from scipy import stats as _st

DEFAULT_LEVEL = 0.95
DEFAULT_BOOTSTRAP = 2000
SEEDS_T = "t over seeds"
HIERARCHICAL = "bootstrap over seeds, then images"


@dataclass(frozen=True)
class SeedValue:
    """One seed's value of a metric and, for a corpus metric, its image resamples (all of
    one scheme: the same images for every run of the scheme)."""

    value: float
    resamples: np.ndarray | None = None
    scheme: str | None = None


@dataclass(frozen=True)
class Interval:
    mean: float
    std: float | None  # sample std over seeds (None: one seed)
    lo: float | None
    hi: float | None
    n: int  # seeds
    method: str | None  # SEEDS_T | HIERARCHICAL | None (no interval)


@dataclass(frozen=True)
class Comparison:
    """``diff`` = mean over shared seeds of (arm − baseline), its interval and two-sided p."""

    diff: float
    lo: float
    hi: float
    p: float
    n: int  # shared seeds
    method: str


def _resampled(values: Mapping[object, SeedValue]) -> bool:
    return all(v.resamples is not None and len(v.resamples) for v in values.values())


def _scheme_of(values: Mapping[object, SeedValue], where: str) -> str | None:
    schemes = {v.scheme for v in values.values()}
    if len(schemes) > 1:
        raise ValueError(f"{where}: resamples of different schemes {sorted(map(str, schemes))}")
    return schemes.pop() if schemes else None


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def interval(
    values: Mapping[object, SeedValue],
    *,
    level: float = DEFAULT_LEVEL,
    kind: str = "auto",
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> Interval:
    """Mean ± std over seeds and a ``level`` interval of the mean.

    ``kind``: "auto" (hierarchical bootstrap where every seed has resamples, else t), "seeds"
    (always t over seeds), "none" (no interval). Fewer than two seeds: no interval.
    """
    xs = np.array([v.value for v in values.values()], dtype=float)
    n = len(xs)
    if n == 0:
        raise ValueError("interval of no values")
    mean = float(xs.mean())
    std = float(xs.std(ddof=1)) if n >= 2 else None
    if n < 2 or kind == "none":
        return Interval(mean, std, None, None, n, None)
    if kind == "auto" and _resampled(values):
        _scheme_of(values, "interval")
        boot = _hierarchical(list(values.values()), None, n_boot, _rng(seed))
        lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
        return Interval(mean, std, float(lo), float(hi), n, HIERARCHICAL)
    half = float(_st.t.ppf((1 + level) / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, std, mean - half, mean + half, n, SEEDS_T)


def _hierarchical(
    arm: list[SeedValue], base: list[SeedValue] | None, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """Bootstrap means of ``arm`` (minus ``base``, seed for seed and image resample for image
    resample, when given): seeds drawn with replacement, then one image resample per draw."""
    n = len(arm)
    r = min(len(v.resamples) for v in arm + (base or []))
    a = np.stack([v.resamples[:r] for v in arm])
    if base is not None:
        a = a - np.stack([v.resamples[:r] for v in base])
    seeds = rng.integers(0, n, (n_boot, n))
    images = rng.integers(0, r, (n_boot, n))
    return a[seeds, images].mean(axis=1)


def compare(
    arm: Mapping[object, SeedValue],
    baseline: Mapping[object, SeedValue],
    *,
    level: float = DEFAULT_LEVEL,
    kind: str = "auto",
    n_boot: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> Comparison | None:
    """Paired difference ``arm − baseline`` over the seeds both have (None: fewer than two
    shared seeds — image resamples alone say nothing of the seed-to-seed spread)."""
    shared = [s for s in arm if s in baseline]
    if len(shared) < 2:
        return None
    a = [arm[s] for s in shared]
    b = [baseline[s] for s in shared]
    d = np.array([x.value - y.value for x, y in zip(a, b)])
    diff, n = float(d.mean()), len(d)
    both = {**{("a", s): v for s, v in zip(shared, a)}, **{("b", s): v for s, v in zip(shared, b)}}
    if kind == "auto" and _resampled(both):
        _scheme_of(both, "compare")
        boot = _hierarchical(a, b, n_boot, _rng(seed))
        lo, hi = np.quantile(boot, [(1 - level) / 2, (1 + level) / 2])
        p = bootstrap_p(boot)
        return Comparison(diff, float(lo), float(hi), p, n, HIERARCHICAL)
    sd = float(d.std(ddof=1))
    q = float(_st.t.ppf((1 + level) / 2, n - 1))
    if sd == 0.0:
        p = 1.0 if diff == 0.0 else 0.0
        return Comparison(diff, diff, diff, p, n, SEEDS_T)
    t = diff / (sd / math.sqrt(n))
    p = float(2 * _st.t.sf(abs(t), n - 1))
    half = q * sd / math.sqrt(n)
    return Comparison(diff, diff - half, diff + half, p, n, SEEDS_T)


def bootstrap_p(boot: np.ndarray) -> float:
    """Two-sided p of "the difference is 0" from bootstrap differences: twice the smaller
    share on either side of 0, each counted with the +1 of a Monte Carlo p-value."""
    m = len(boot)
    below = (np.count_nonzero(boot <= 0) + 1) / (m + 1)
    above = (np.count_nonzero(boot >= 0) + 1) / (m + 1)
    return float(min(1.0, 2 * min(below, above)))


VERDICTS = ("holds", "contradicted", "inconclusive")


def verdict(comparison: Comparison | None, expected: str, alpha: float) -> str:
    """``holds``: significant (p < alpha) in the expected direction ("higher": arm > baseline,
    "lower": arm < baseline); ``contradicted``: significant the other way; else
    ``inconclusive`` (also when there is nothing to compare)."""
    if expected not in ("higher", "lower"):
        raise ValueError(f"expected must be 'higher' or 'lower', got {expected!r}")
    if comparison is None or comparison.p >= alpha or comparison.diff == 0:
        return "inconclusive"
    agrees = (comparison.diff > 0) == (expected == "higher")
    return "holds" if agrees else "contradicted"
