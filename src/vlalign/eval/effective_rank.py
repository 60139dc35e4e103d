"""Effective rank of last-layer representations (PT-PEFT, seed 003 §2.3, Table 1, Fig. 4).

For each sample k the model's last-layer output is an L_k × d matrix F_k (one row per token).
Its singular values s_k = [σ_1 ≥ … ≥ σ_M] are normalised to sum to 1 (Eq. 3), the normalised
vectors are averaged over the K samples (Eq. 4) and cumulatively summed (Eq. 5). The *effective
rank* is the fraction of components needed for the cumulative curve to reach 0.9.

"Components" of one sample are its M_k = min(L_k, d) singular values (all that an L×d matrix
has; zero singular values are kept). Samples of different length are padded with zeros to the
longest M = max_k M_k before averaging, so the curve has M points and the effective rank is
``k* / M`` where k* is the first k with cumulative ≥ threshold. Features are not centred
(the paper does not centre them).

The evaluation (:mod:`vlalign.eval.runner`) feeds matrices of one fixed shape — the image
positions and a fixed number of text positions per sample — so no padding happens there and
the curve cannot be dominated by the spread of caption lengths: with variable-length
``<bos> caption <eos>`` rows (5–25 tokens) and M = the longest caption, the mass sat in the
first ~10 components for any model and 14 of 16 runs read 8/25 = 32 %.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from tqdm import tqdm

# float64 sums of normalised values can land a few ulps below an exact threshold
_TOL = 1e-9


def _as_matrix(x: torch.Tensor | np.ndarray, index: int) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2:
        raise ValueError(f"features[{index}] must be a 2-D (tokens × dim) matrix, got {a.shape}")
    if a.size == 0:
        raise ValueError(f"features[{index}] is empty: shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError(f"features[{index}] contains NaN or inf")
    return a


def singular_value_curve(features: Iterable[torch.Tensor | np.ndarray]) -> np.ndarray:
    """Cumulative averaged normalised singular values; length = max over samples of min(L, d).

    ``cumulative[i]`` is the mass of the first ``i + 1`` components; the last value is 1.
    """
    total: np.ndarray | None = None
    count = 0
    for k, x in enumerate(tqdm(features, desc="singular values", disable=None, leave=False)):
        s = np.linalg.svd(_as_matrix(x, k), compute_uv=False)  # descending
        mass = s.sum()
        if mass <= 0:
            raise ValueError(f"features[{k}] is all zeros: singular values cannot be normalised")
        s = s / mass
        if total is None:
            total = np.zeros_like(s)
        if len(s) > len(total):  # zero-pad the running sum to the longer sample
            total = np.pad(total, (0, len(s) - len(total)))
        total[: len(s)] += s
        count += 1
    if total is None:
        raise ValueError("features is empty: need at least one sample")
    cumulative = np.cumsum(total / count)
    cumulative[-1] = 1.0  # exact by construction; removes rounding drift
    return cumulative


def effective_rank(cumulative: np.ndarray, threshold: float = 0.9) -> float:
    """Fraction of components (in (0, 1]) needed for ``cumulative`` to reach ``threshold``."""
    c = np.asarray(cumulative, dtype=np.float64)
    if c.ndim != 1 or c.size == 0:
        raise ValueError(f"cumulative must be a non-empty 1-D curve, got shape {c.shape}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1], got {threshold}")
    if np.any(np.diff(c) < -_TOL):
        raise ValueError("cumulative must be non-decreasing")
    reached = np.nonzero(c >= threshold - _TOL)[0]
    if reached.size == 0:
        raise ValueError(f"cumulative never reaches {threshold} (max {c.max():.6f})")
    return float(reached[0] + 1) / c.size


def rank_curve_record(
    run: str, features: Iterable[torch.Tensor | np.ndarray], threshold: float = 0.9
) -> dict:
    """The ``runs/<run>/rank_curve.json`` object of docs/outputs.md."""
    cumulative = singular_value_curve(features)
    return {
        "run": run,
        "k": list(range(1, cumulative.size + 1)),
        "cumulative": [float(v) for v in cumulative],
        "threshold": float(threshold),
        "effective_rank": effective_rank(cumulative, threshold),
    }
