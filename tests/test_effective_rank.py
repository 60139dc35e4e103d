"""Singular-value curve and effective rank (seed 003 §2.3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vlalign.eval.effective_rank import effective_rank, rank_curve_record, singular_value_curve


def test_rank_one_features_one_component_reaches_one():
    rng = np.random.default_rng(0)
    feats = [np.outer(rng.normal(size=6), rng.normal(size=16)) for _ in range(5)]
    curve = singular_value_curve(feats)
    assert curve.shape == (6,)  # min(L, d) components
    assert curve[0] == pytest.approx(1.0, abs=1e-9)
    assert effective_rank(curve) == pytest.approx(1 / 6)


def test_orthonormal_rows_give_linear_curve():
    # all singular values equal → cumulative k/M → ceil(0.9 M)/M exactly
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(32, 20)))  # 32×20 with orthonormal columns
    curve = singular_value_curve([q.T * 3.0])  # 20 tokens × 32 dims
    np.testing.assert_allclose(curve, np.arange(1, 21) / 20, atol=1e-12)
    assert effective_rank(curve) == pytest.approx(math.ceil(0.9 * 20) / 20)


def test_isotropic_random_features_near_point_nine():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(24, 2048, generator=g) for _ in range(4)]
    er = effective_rank(singular_value_curve(feats))
    # near-flat spectrum: 0.9 up to one component of granularity (1/24)
    assert abs(er - 0.9) <= 1 / 24 + 1e-9


def test_curve_monotone_ending_at_one_and_padding():
    rng = np.random.default_rng(2)
    # different lengths, and anisotropic scales so the curve is concave
    feats = [rng.normal(size=(n, 12)) * np.geomspace(1, 0.01, 12) for n in (3, 7, 12, 20)]
    curve = singular_value_curve(feats)
    assert curve.shape == (12,)
    assert np.all(np.diff(curve) >= 0) and curve[-1] == 1.0
    # independent computation of Eq. 3-5 with explicit zero padding
    padded = np.zeros((len(feats), 12))
    for i, f in enumerate(feats):
        s = np.linalg.svd(f, compute_uv=False)
        padded[i, : len(s)] = s / s.sum()
    np.testing.assert_allclose(curve, np.cumsum(padded.mean(0)), atol=1e-12)
    assert effective_rank(curve) < 0.9  # concentrated spectrum


def test_collapsed_representation_has_lower_rank_than_isotropic():
    rng = np.random.default_rng(3)
    iso = [rng.normal(size=(16, 64)) for _ in range(3)]
    low = [rng.normal(size=(16, 3)) @ rng.normal(size=(3, 64)) + 1e-3 * rng.normal(size=(16, 64))
           for _ in range(3)]
    assert effective_rank(singular_value_curve(low)) < effective_rank(singular_value_curve(iso))


def test_record_matches_contract():
    feats = [torch.randn(5, 8, dtype=torch.bfloat16) for _ in range(3)]
    rec = rank_curve_record("run_a", feats, threshold=0.9)
    assert set(rec) == {"run", "k", "cumulative", "threshold", "effective_rank"}
    assert rec["run"] == "run_a" and rec["k"] == [1, 2, 3, 4, 5]
    assert len(rec["cumulative"]) == 5 and rec["cumulative"][-1] == 1.0
    assert 0 < rec["effective_rank"] <= 1 and rec["threshold"] == 0.9
    assert all(isinstance(v, float) for v in rec["cumulative"])


def test_threshold_one_needs_every_nonzero_component():
    x = np.diag([3.0, 2.0, 1.0, 0.0])  # rank 3 of 4
    assert effective_rank(singular_value_curve([x]), threshold=1.0) == pytest.approx(3 / 4)


def test_bad_input():
    with pytest.raises(ValueError, match="features is empty"):
        singular_value_curve([])
    with pytest.raises(ValueError, match=r"features\[1\] must be a 2-D"):
        singular_value_curve([np.ones((2, 3)), np.ones(3)])
    with pytest.raises(ValueError, match=r"features\[0\] is all zeros"):
        singular_value_curve([np.zeros((2, 3))])
    with pytest.raises(ValueError, match=r"features\[0\] contains NaN"):
        singular_value_curve([np.full((2, 3), np.nan)])
    with pytest.raises(ValueError, match="threshold"):
        effective_rank(np.array([0.5, 1.0]), threshold=0.0)
    with pytest.raises(ValueError, match="non-decreasing"):
        effective_rank(np.array([0.6, 0.5, 1.0]))
