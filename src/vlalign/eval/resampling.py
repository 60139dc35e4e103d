"""Corpus caption scores recomputed on image resamples (the inner level of the hierarchical
bootstrap in :mod:`vlalign.results.stats`).

A resample draws the test images with replacement; its score is the corpus score pycocoevalcap
would give on that multiset (a drawn image counts as often as it was drawn, in CIDEr's document
frequencies too). Every run evaluated on the same images gets the same resamples (they depend
only on :class:`ResampleScheme`), so two runs can be compared image for image.

From per-image sufficient statistics, the ones pycocoevalcap's scorers compute (the reference
side from :class:`~vlalign.eval.references.References`):
- BLEU-1..4: pycocoevalcap's per-image counts (hypothesis length, closest reference length,
  guessed and matched n-grams), summed with the resample's weights;
- ROUGE-L: pycocoevalcap's corpus score is the mean of its per-image scores; so are
  rouge-score's ROUGE-1 / ROUGE-L F1 and recall (``ROUGE1_F`` ... ``ROUGEL_R``);
- CIDEr-D: its idf weights are ``log N - log max(1, df)`` with df counted over the resample, so
  each resample re-weights n-grams. ``min(tf_h idf, tf_r idf) = min(tf_h, tf_r) idf`` (idf >= 0),
  so every dot product and norm is linear in idf², one sparse product per resample;
- METEOR: the jar's segment statistics (lengths, matches per module, chunks), summed with the
  resample's weights and put through METEOR's formula (nothing re-aligned, no JVM call).
Every family is checked against pycocoevalcap's full-set score before it is returned.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import sparse

DEFAULT_RESAMPLES = 200
# pycocoevalcap's CIDEr-D: n-gram orders, length-penalty sigma, scale
_CIDER_N, _CIDER_SIGMA, _CIDER_SCALE = 4, 6.0, 10.0


class ResampleCheckError(RuntimeError):
    """A resampled metric did not reproduce pycocoevalcap's score on the full image set."""


@dataclass(frozen=True)
class ResampleScheme:
    """Which resamples: ``count`` draws of ``n_images`` indices, seeded by ``key`` (dataset,
    split and the config's seed) so that every run on the same images gets the same draws."""

    key: str
    n_images: int
    count: int = DEFAULT_RESAMPLES

    def indices(self) -> np.ndarray:
        """``(count, n_images)`` image indices (with replacement)."""
        seed = int.from_bytes(hashlib.sha256(self.key.encode()).digest()[:8], "little")
        return np.random.default_rng(seed).integers(0, self.n_images, (self.count, self.n_images))

    def weights(self) -> np.ndarray:
        """``(count, n_images)``: how often each image is drawn in each resample."""
        idx = self.indices()
        w = np.zeros((self.count, self.n_images))
        np.add.at(w, (np.repeat(np.arange(self.count), self.n_images), idx.ravel()), 1.0)
        return w

    def as_dict(self) -> dict:
        return {"key": self.key, "n_images": self.n_images, "count": self.count}


def _check(name: str, full: float, reference: float) -> None:
    if not math.isclose(full, reference, rel_tol=1e-9, abs_tol=1e-12):
        raise ResampleCheckError(
            f"{name}: the resampling statistics give {full!r} on the full image set, "
            f"pycocoevalcap {reference!r}"
        )


def bleu_resamples(
    comps: Sequence[dict], weights: np.ndarray, reference: Sequence[float]
) -> dict[str, np.ndarray]:
    """BLEU-1..4 per resample from pycocoevalcap's per-image counts (``BleuScorer.ctest``:
    hypothesis length, reference lengths, guessed and matched n-grams; ``closest`` length)."""
    stats = np.array(
        [
            [c["testlen"], min((abs(r - c["testlen"]), r) for r in c["reflen"])[1]]
            + list(c["guess"]) + list(c["correct"])
            for c in comps
        ],
        dtype=float,
    )
    out = {}
    for name, w in (("full", np.ones((1, len(comps)))), ("resamples", weights)):
        tot = w @ stats  # (R, 10): testlen, reflen, guess[4], correct[4]
        bleu = np.ones(len(w))
        ratio = (tot[:, 0] + 1e-15) / (tot[:, 1] + 1e-9)
        penalty = np.where(ratio < 1, np.exp(1 - 1 / np.maximum(ratio, 1e-300)), 1.0)
        for k in range(4):
            bleu = bleu * ((tot[:, 6 + k] + 1e-15) / (tot[:, 2 + k] + 1e-9))
            out.setdefault(name, []).append(bleu ** (1.0 / (k + 1)) * penalty)
    for k in range(4):
        _check(f"Bleu_{k + 1}", float(out["full"][k][0]), reference[k])
    return {f"Bleu_{k + 1}": out["resamples"][k] for k in range(4)}


def mean_resamples(
    name: str, per_image: Sequence[float], weights: np.ndarray, reference: float
) -> np.ndarray:
    """A corpus score that is the mean of per-image scores (ROUGE-L, rouge-score's ROUGE)."""
    s = np.asarray(per_image, dtype=float)
    _check(name, float(s.mean()), reference)
    return weights @ s / len(s)


def grouped_mean_resamples(
    name: str,
    groups: Sequence[int],
    values: Sequence[float],
    weights: np.ndarray,
    reference: float,
) -> np.ndarray:
    """A corpus score that is the mean over items grouped by image (VQA accuracy: the questions
    of each image): per resample, the mean over the drawn images' items (an image drawn twice
    counts its questions twice). ``groups[k]``: the image index of item ``k``."""
    g = np.asarray(groups, dtype=int)
    v = np.asarray(values, dtype=float)
    n = weights.shape[1]
    sums = np.bincount(g, weights=v, minlength=n)
    counts = np.bincount(g, minlength=n).astype(float)
    _check(name, float(sums.sum() / counts.sum()), reference)
    drawn = weights @ counts
    return np.divide(weights @ sums, drawn, out=np.full(len(weights), np.nan), where=drawn > 0)


def cider_resamples(
    hyps: Sequence[dict], refs: Sequence[Sequence[dict]], weights: np.ndarray, reference: float
) -> np.ndarray:
    """CIDEr-D per resample, its document frequencies counted over the resample, from
    pycocoevalcap's term frequencies (``precook``) of each hypothesis and its references."""
    vocab: dict[tuple, int] = {}
    col = lambda g: vocab.setdefault(g, len(vocab))  # noqa: E731
    # one row per (image, reference, order) for the products, per (image, order) for the
    # hypothesis norm; entries are (row, n-gram column, value)
    a_rows, a_cols, a_vals, c_vals = [], [], [], []
    b_rows, b_cols, b_vals = [], [], []
    p_rows, p_cols = [], []
    penalty, ref_row_image, n_refs = [], [], []
    for i_img, (hyp, cooked_refs) in enumerate(zip(hyps, refs)):
        hyp_len = sum(c for g, c in hyp.items() if len(g) == 2)  # pycocoevalcap: bigram count
        for g, c in hyp.items():
            b_rows.append(i_img * _CIDER_N + len(g) - 1)
            b_cols.append(col(g))
            b_vals.append(float(c) ** 2)
        present = set()
        n_refs.append(len(cooked_refs))
        for ref in cooked_refs:
            row0 = len(penalty) * _CIDER_N
            ref_len = sum(c for g, c in ref.items() if len(g) == 2)
            penalty.append(math.exp(-((hyp_len - ref_len) ** 2) / (2 * _CIDER_SIGMA**2)))
            ref_row_image.append(i_img)
            for g, c in ref.items():
                a_rows.append(row0 + len(g) - 1)
                a_cols.append(col(g))
                a_vals.append(float(min(hyp.get(g, 0), c) * c))
                c_vals.append(float(c) ** 2)
                present.add(g)
        for g in present:
            p_rows.append(i_img)
            p_cols.append(vocab[g])
    n, v, n_ref_rows = len(hyps), len(vocab), len(penalty) * _CIDER_N
    a = sparse.csr_matrix((a_vals, (a_rows, a_cols)), shape=(n_ref_rows, v))
    c = sparse.csr_matrix((c_vals, (a_rows, a_cols)), shape=(n_ref_rows, v))
    b = sparse.csr_matrix((b_vals, (b_rows, b_cols)), shape=(n * _CIDER_N, v))
    presence = sparse.csr_matrix((np.ones(len(p_rows)), (p_rows, p_cols)), shape=(n, v))
    ref_image = np.repeat(np.asarray(ref_row_image), _CIDER_N)  # image of each a/c row
    pen = np.repeat(np.asarray(penalty), _CIDER_N)
    h_rows = ref_image * _CIDER_N + np.arange(n_ref_rows) % _CIDER_N
    divisor = _CIDER_N * np.asarray(n_refs, dtype=float)

    def corpus(w: np.ndarray) -> np.ndarray:
        df = np.asarray(presence.T @ w.T).T  # (R, V) documents containing each n-gram
        q = (math.log(n) - np.log(np.maximum(df, 1.0))) ** 2  # idf² per resample
        dot, norm_r2 = (a @ q.T), (c @ q.T)  # (rows, R)
        norm_h = np.sqrt(b @ q.T)[h_rows]  # the hypothesis norm of each row's image and order
        denom = norm_h * np.sqrt(norm_r2)
        val = np.divide(dot, denom, out=np.zeros_like(dot), where=denom != 0) * pen[:, None]
        per_image = np.zeros((n, len(w)))
        np.add.at(per_image, ref_image, val)
        per_image = per_image / divisor[:, None] * _CIDER_SCALE
        return (w * per_image.T).sum(axis=1) / n

    _check("CIDEr", float(corpus(np.ones((1, n)))[0]), reference)
    return np.concatenate([corpus(weights[k : k + 50]) for k in range(0, len(weights), 50)])


# METEOR 1.5's English parameters (``-l en``, task "rank"): alpha, beta, gamma, delta and the
# weights of its exact, stem, synonym and paraphrase modules (Denkowski & Lavie, 2014)
_METEOR_ALPHA, _METEOR_BETA, _METEOR_GAMMA, _METEOR_DELTA = 0.85, 0.20, 0.60, 0.75
_METEOR_WEIGHTS = (1.0, 0.6, 0.8, 0.6)
_METEOR_STATS = 23  # test/ref lengths, test/ref function words, 4 x 4 module matches, chunks,
# test/ref word matches


def meteor_from_stats(totals: np.ndarray) -> np.ndarray:
    """METEOR of summed segment statistics ``(R, 23)`` (the jar's ``EVAL`` aggregate; sum
    :func:`_segment_rows`):
    weighted precision and recall over content and function words, their harmonic mean
    weighted by alpha, times one minus the fragmentation penalty gamma (chunks / mean
    matches)^beta."""
    t = np.asarray(totals, dtype=float)
    d = _METEOR_DELTA
    mods = t[:, 4:20].reshape(len(t), 4, 4)  # test content, ref content, test fn, ref fn
    w = np.asarray(_METEOR_WEIGHTS)
    test_m = ((d * mods[:, :, 0] + (1 - d) * mods[:, :, 2]) * w).sum(axis=1)
    ref_m = ((d * mods[:, :, 1] + (1 - d) * mods[:, :, 3]) * w).sum(axis=1)
    test_len = d * (t[:, 0] - t[:, 2]) + (1 - d) * t[:, 2]
    ref_len = d * (t[:, 1] - t[:, 3]) + (1 - d) * t[:, 3]
    p = np.divide(test_m, test_len, out=np.zeros(len(t)), where=test_len > 0)
    r = np.divide(ref_m, ref_len, out=np.zeros(len(t)), where=ref_len > 0)
    den = _METEOR_ALPHA * p + (1 - _METEOR_ALPHA) * r
    fmean = np.divide(p * r, den, out=np.zeros(len(t)), where=den > 0)
    chunks, matched = t[:, 20], (t[:, 21] + t[:, 22]) / 2
    frag = np.divide(chunks, matched, out=np.zeros(len(t)), where=matched > 0)
    return fmean * (1 - _METEOR_GAMMA * frag**_METEOR_BETA)


def _segment_rows(stats: Sequence[str]) -> np.ndarray:
    """The jar's segment statistics as rows; a perfect segment (every word matched, in one
    chunk) counts no chunk, as the jar sums them (so it is not penalised, alone or not)."""
    rows = np.array([[float(x) for x in s.split()] for s in stats])
    if rows.ndim != 2 or rows.shape[1] != _METEOR_STATS:
        raise ResampleCheckError(
            f"METEOR statistics have {rows.shape[-1]} fields, expected {_METEOR_STATS}"
        )
    perfect = (rows[:, 21] == rows[:, 0]) & (rows[:, 22] == rows[:, 1]) & (rows[:, 20] == 1)
    rows[perfect, 20] = 0.0
    return rows


def meteor_resamples(stats: Sequence[str], weights: np.ndarray, reference: float) -> np.ndarray:
    """METEOR per resample from the jar's segment statistics (``SCORE`` lines), summed with
    the resample's weights; checked against the jar's own aggregate of the full set."""
    rows = _segment_rows(stats)
    _check("METEOR", float(meteor_from_stats(rows.sum(axis=0, keepdims=True))[0]), reference)
    return meteor_from_stats(weights @ rows)
