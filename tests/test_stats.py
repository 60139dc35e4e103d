"""Intervals and paired comparisons against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vlalign.results.stats import (
    HIERARCHICAL,
    SEEDS_T,
    SeedValue,
    bootstrap_p,
    compare,
    interval,
    verdict,
)


def _vals(xs, resamples=None, scheme="s"):
    return {
        i: SeedValue(x, None if resamples is None else np.asarray(resamples[i]), scheme)
        for i, x in enumerate(xs)
    }


def test_t_interval_by_hand():
    iv = interval(_vals([1.0, 2.0, 3.0]))
    # mean 2, sd 1, t(0.975, 2) = 4.302653: 2 ± 4.302653 / sqrt(3)
    assert iv.method == SEEDS_T and iv.n == 3
    assert iv.mean == 2.0 and iv.std == pytest.approx(1.0)
    assert iv.lo == pytest.approx(2 - 4.302653 / math.sqrt(3), abs=1e-5)
    assert iv.hi == pytest.approx(2 + 4.302653 / math.sqrt(3), abs=1e-5)


def test_one_seed_has_no_interval():
    iv = interval(_vals([5.0]))
    assert iv.std is None and iv.lo is None and iv.method is None


def test_paired_t_by_hand_and_not_significant_at_0_01():
    a, b = _vals([3.0, 4.0, 6.0]), _vals([1.0, 2.0, 3.0])
    c = compare(a, b)
    # d = [2, 2, 3]: mean 7/3, sd 0.57735, t = 7.0; df 2: sf(t) = (1 - t / sqrt(t² + 2)) / 2
    p = 1 - 7 / math.sqrt(51)
    assert c.method == SEEDS_T and c.n == 3
    assert c.diff == pytest.approx(7 / 3)
    assert c.p == pytest.approx(p, rel=1e-6)  # 0.0198
    assert verdict(c, "higher", 0.05) == "holds"
    assert verdict(c, "higher", 0.01) == "inconclusive"
    assert verdict(c, "lower", 0.05) == "contradicted"


def test_a_noisy_difference_is_not_significant():
    c = compare(_vals([1.0, -1.0, 0.5]), _vals([0.0, 0.0, 0.0]))
    assert c.p > 0.5 and c.lo < 0 < c.hi
    assert verdict(c, "higher", 0.01) == "inconclusive"


def test_comparison_pairs_only_shared_seeds():
    a = {0: SeedValue(2.0), 1: SeedValue(3.0), 7: SeedValue(100.0)}
    b = {0: SeedValue(1.0), 1: SeedValue(1.5), 2: SeedValue(-50.0)}
    c = compare(a, b)
    assert c.n == 2 and c.diff == pytest.approx(1.25)
    assert compare({0: SeedValue(1.0)}, {1: SeedValue(0.0)}) is None


def test_hierarchical_bootstrap_is_reproducible_and_seeded():
    rng = np.random.default_rng(1)
    vals = _vals([0.5, 0.6, 0.55], [rng.normal(m, 0.05, 200) for m in (0.5, 0.6, 0.55)])
    one, two = interval(vals, seed=3), interval(vals, seed=3)
    assert one.method == HIERARCHICAL and (one.lo, one.hi) == (two.lo, two.hi)
    assert (interval(vals, seed=4).lo, interval(vals, seed=4).hi) != (one.lo, one.hi)
    assert one.lo < one.mean < one.hi
    # "seeds" ignores the resamples: the t interval of the three values
    assert interval(vals, kind="seeds").method == SEEDS_T


def test_paired_bootstrap_cancels_what_both_arms_share():
    # image difficulty is shared (the same resample moves both arms): the difference is
    # exactly 0.01 in every resample, so it is significant though each arm varies 100x more
    rng = np.random.default_rng(0)
    shared = [rng.normal(0, 1.0, 300) for _ in range(3)]
    base = _vals([0.0, 0.0, 0.0], shared)
    arm = _vals([0.01, 0.01, 0.01], [s + 0.01 for s in shared])
    c = compare(arm, base, n_boot=1000)
    assert c.method == HIERARCHICAL
    assert c.lo == pytest.approx(0.01) and c.hi == pytest.approx(0.01)
    assert c.p == pytest.approx(2 / 1001)
    # unpaired, the same arms' intervals overlap completely
    assert interval(arm).lo < interval(base).hi


def test_bootstrap_p_two_sided():
    assert bootstrap_p(np.array([1.0] * 99)) == pytest.approx(2 / 100)
    assert bootstrap_p(np.array([-1.0, 1.0] * 50)) == 1.0


def test_mixed_schemes_are_refused():
    a = {0: SeedValue(1.0, np.ones(5), "world/test/0"), 1: SeedValue(1.0, np.ones(5), "x")}
    with pytest.raises(ValueError, match="different schemes"):
        interval(a)


def test_one_shared_seed_is_no_comparison_even_with_resamples():
    one = {0: SeedValue(1.0, np.ones(50), "s")}
    other = {0: SeedValue(0.0, np.zeros(50), "s"), 1: SeedValue(0.0, np.zeros(50), "s")}
    assert compare(one, other) is None
