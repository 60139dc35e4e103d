"""Real pycocoevalcap scoring (Java PTB tokenizer and METEOR run for real) and rouge-score's
ROUGE-1 / ROUGE-L F1 and recall."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from vlalign.eval.caption_metrics import (
    CAPTION_METRICS,
    ROUGE_SCORE_METRICS,
    CaptionMetricError,
    CaptionScorer,
    ptb_tokenize,
    rouge_scores,
    score_captions,
    spice_missing_reason,
)
from vlalign.eval.resampling import ResampleScheme

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs Java")

# distinct 4-grams per image, so CIDEr's document frequencies are informative
CAPTIONS = {
    "img1": "a brown dog runs across the green grass",
    "img2": "two red cars are parked next to a tall building",
    "img3": "a woman holds an umbrella in the heavy rain",
    "img4": "three small birds sit on a wooden fence",
}
NO_SPICE = spice_missing_reason() is not None
COCO_NAMES = [m for m in CAPTION_METRICS if m != "SPICE" or not NO_SPICE]


@pytest.fixture(scope="module")
def identical():
    """Predictions equal to their single reference (punctuation/case differ only)."""
    preds = {k: v.capitalize() + "." for k, v in CAPTIONS.items()}
    refs = {k: [v] for k, v in CAPTIONS.items()}
    return score_captions(preds, refs, spice="auto")


@pytest.fixture(scope="module")
def wrong():
    """Each image gets another image's caption; one prediction is empty (valid, scores 0)."""
    ids = list(CAPTIONS)
    preds = {k: CAPTIONS[ids[(i + 1) % len(ids)]] for i, k in enumerate(ids)}
    preds["img4"] = ""
    refs = {k: [v] for k, v in CAPTIONS.items()}
    return score_captions(preds, refs, spice="off")


def test_identical_scores_known_values(identical):
    scores, missing = identical
    assert sorted(scores) == sorted(COCO_NAMES)
    # every n-gram precision 1, brevity penalty 1 → BLEU exactly 1 (up to the 1e-9 smoothing)
    for n in range(1, 5):
        assert scores[f"Bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ROUGE_L"] == pytest.approx(1.0)
    # CIDEr-D: identical tf-idf vectors → cosine 1 for n=1..4, no length penalty, ×10
    assert scores["CIDEr"] == pytest.approx(10.0, rel=1e-6)
    # METEOR keeps a small fragmentation penalty even for a perfect match
    assert 0.9 < scores["METEOR"] <= 1.0


def test_spice_reported_missing_not_zero(identical):
    scores, missing = identical
    if NO_SPICE:
        assert "SPICE" not in scores
        assert missing == [{"metric": "SPICE", "reason": spice_missing_reason()}]
        assert "not found" in missing[0]["reason"]
    else:
        assert 0.0 < scores["SPICE"] <= 1.0 and missing == []


def test_wrong_predictions_score_lower(identical, wrong):
    right_scores, _ = identical
    wrong_scores, missing = wrong
    assert missing == [{"metric": "SPICE", "reason": "disabled"}]
    assert "SPICE" not in wrong_scores
    for name in ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr"]:
        assert math.isfinite(wrong_scores[name])
        assert 0.0 <= wrong_scores[name] < right_scores[name], name
    assert wrong_scores["CIDEr"] < 1.0


def test_partial_match_hand_computed():
    # tokens: a dog runs fast | a dog sleeps here → 2 of 4 unigrams match, same length
    scores, _ = score_captions(
        {"x": "A dog runs fast!"}, {"x": ["a dog sleeps here", "a dog sleeps here."]}, spice="off"
    )
    assert scores["Bleu_1"] == pytest.approx(0.5)
    # LCS 2, precision = recall = 0.5 → F_beta = 0.5 for any beta
    assert scores["ROUGE_L"] == pytest.approx(0.5)
    assert 0.0 < scores["METEOR"] < 0.9


def test_tokenizer_matches_pycocoevalcap():
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    caps = ["A man's hat, (red) -- on the table.", "", "Isn't it... \"great\"?", "ok"]
    ref = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(caps)})
    assert ptb_tokenize(caps) == [ref[i][0] for i in range(len(caps))]


def test_tokenizer_keeps_alignment_with_line_separators():
    # pycocoevalcap only replaces "\n"; Java also breaks lines at \r and U+2028
    out = ptb_tokenize(["a cat\u2028sits", "one\rtwo", "last dog."])
    assert out == ["a cat sits", "one two", "last dog"]


@pytest.mark.parametrize(
    ("preds", "refs", "match"),
    [
        ({}, {"a": ["x"]}, "predictions is empty"),
        ({"a": "x", "b": "y"}, {"a": ["x"]}, "'b' has a prediction but no references"),
        ({"a": "x"}, {"a": []}, "'a' has an empty reference list"),
        ({"a": "x"}, {"a": "x y"}, "'a' must be a list of strings"),
        ({"a": None}, {"a": ["x"]}, "prediction for image id 'a' must be a string"),
        ({"a": "x"}, {"a": ["x", 3]}, "reference 1 of image id 'a'"),
    ],
)
def test_bad_input_raises(preds, refs, match):
    with pytest.raises(ValueError, match=match):
        score_captions(preds, refs, spice="off")


def test_punctuation_only_reference_rejected():
    with pytest.raises(ValueError, match="reference 1 of image id 'a' is empty after tokenization"):
        score_captions({"a": "a dog"}, {"a": ["a dog", "..."]}, spice="off")


def test_spice_modes():
    with pytest.raises(ValueError, match="spice must be one of"):
        score_captions({"a": "x"}, {"a": ["x"]}, spice="maybe")
    if NO_SPICE:
        with pytest.raises(CaptionMetricError, match="SPICE required but unavailable"):
            score_captions({"a": "x"}, {"a": ["x"]}, spice="require")


# --- rouge-score's ROUGE-1 / ROUGE-L F1 and recall (seed 001) ----------------------------------
# Two images by hand (rouge-score's tokens: lower-case, punctuation dropped):
# img_a: "a dog runs on the grass" (6) vs "the dog runs fast" (4): unigrams the, dog, runs match
#   → P 3/6, R 3/4, F1 0.6; LCS "dog runs" = 2 → P 2/6, R 2/4, F1 0.4.
# img_b: "red car parked" (3) vs three references:
#   "red car parked outside a big old house" (8): P 1, R 3/8, F1 6/11 (LCS 3: the same)
#   "a red car" (3): 2 match, P = R = F1 = 2/3 (LCS "red car" = 2: the same)  ← best F
#   "red" (1): P 1/3, R 1, F1 0.5 (LCS 1: the same)                           ← best recall
# score_multi keeps the best-F reference's score: R = 2/3, not the best recall 1.
ROUGE_PREDS = {"img_a": "A dog runs on the grass.", "img_b": "Red car, parked!"}
ROUGE_REFS = {
    "img_a": ["The dog runs fast."],
    "img_b": ["red car parked outside a big old house", "A red car.", "Red."],
}
ROUGE_HAND = {  # per image: ROUGE1_F, ROUGE1_R, ROUGEL_F, ROUGEL_R
    "img_a": (0.6, 0.75, 0.4, 0.5),
    "img_b": (2 / 3, 2 / 3, 2 / 3, 2 / 3),
}


def test_rouge_scores_by_hand_and_best_reference():
    per_image = rouge_scores(list(ROUGE_PREDS.values()), list(ROUGE_REFS.values()))
    assert set(per_image) == set(ROUGE_SCORE_METRICS)
    for k, image in enumerate(ROUGE_PREDS):
        got = [per_image[m][k] for m in ROUGE_SCORE_METRICS]
        assert got == pytest.approx(ROUGE_HAND[image], abs=1e-12), image
    # the best of the references by F, each scored alone: the multi-reference F is their max
    alone = [rouge_scores(["red car parked"], [[r]]) for r in ROUGE_REFS["img_b"]]
    for m in ("ROUGE1_F", "ROUGEL_F"):
        assert per_image[m][1] == pytest.approx(max(a[m][0] for a in alone))
    assert [a["ROUGE1_R"][0] for a in alone] == pytest.approx([3 / 8, 2 / 3, 1.0])
    assert per_image["ROUGE1_R"][1] == pytest.approx(2 / 3)  # the best-F reference's recall
    # reference order only matters on ties: reversed, the same reference wins
    rev = rouge_scores([ROUGE_PREDS["img_b"]], [ROUGE_REFS["img_b"][::-1]])
    assert [rev[m][0] for m in ROUGE_SCORE_METRICS] == pytest.approx(ROUGE_HAND["img_b"])


def test_rouge_scores_follow_the_candidate():
    other = rouge_scores(["a blue bus"], [ROUGE_REFS["img_b"]])  # only "a" matches "A red car."
    assert other["ROUGE1_F"][0] == pytest.approx(1 / 3)  # P 1/3, R 1/3 (also vs the 8-word ref:
    assert other["ROUGE1_R"][0] == pytest.approx(1 / 3)  # P 1/3, R 1/8 → F 2/11 < 1/3)
    empty = rouge_scores([""], [ROUGE_REFS["img_b"]])
    assert all(empty[m][0] == 0.0 for m in ROUGE_SCORE_METRICS)
    # word order: the same unigrams, "the dog runs" reversed → LCS 1: ROUGE-1 unchanged,
    # ROUGE-L P 1/6, R 1/4, F1 0.2
    shuffled = rouge_scores(["grass runs dog on the a"], [ROUGE_REFS["img_a"]])
    assert shuffled["ROUGE1_F"][0] == pytest.approx(0.6)
    assert shuffled["ROUGEL_F"][0] == pytest.approx(0.2)
    assert shuffled["ROUGEL_R"][0] == pytest.approx(0.25)


def test_scorer_reports_rouge_means_on_raw_text_with_resamples():
    scheme = ResampleScheme("rouge", 2, 5)
    with CaptionScorer(spice="off", meteor=False) as scorer:
        out = scorer.score(ROUGE_PREDS, ROUGE_REFS, resample=scheme)
        swapped = scorer.score({**ROUGE_PREDS, "img_b": "a blue bus"}, ROUGE_REFS)
        # "t-shirt" is one PTB token but two rouge-score tokens ("t", "shirt"): raw text scored
        shirt = scorer.score({"s": "a shirt"}, {"s": ["a t-shirt"]})
    for j, m in enumerate(ROUGE_SCORE_METRICS):
        hand = [ROUGE_HAND[i][j] for i in ROUGE_PREDS]
        assert out.scores[m] == pytest.approx(sum(hand) / 2, abs=1e-12), m
        # a resample's score is the mean over its drawn images (an image counts as often as drawn)
        want = [np.mean([hand[i] for i in idx]) for idx in scheme.indices()]
        assert out.resamples[m] == pytest.approx(want, abs=1e-12), m
        assert swapped.scores[m] < out.scores[m], m
    assert "ROUGE_L" in out.scores and out.scores["ROUGE_L"] != out.scores["ROUGEL_F"]
    assert shirt.scores["ROUGE1_R"] == pytest.approx(2 / 3)  # PTB tokens would give 1/2
    assert shirt.scores["Bleu_1"] == pytest.approx(0.5)  # pycocoevalcap still on PTB tokens


def test_rouge_score_disabled_is_listed_missing_never_zero():
    with CaptionScorer(spice="off", meteor=False, rouge_score=False) as scorer:
        out = scorer.score(ROUGE_PREDS, ROUGE_REFS)
    assert not set(ROUGE_SCORE_METRICS) & set(out.scores)
    assert {m["metric"] for m in out.missing} == {"METEOR", "SPICE", *ROUGE_SCORE_METRICS}
    assert all("rouge_score: false" in m["reason"] for m in out.missing if "ROUGE" in m["metric"])
    assert out.scores["ROUGE_L"] > 0 and out.scores["CIDEr"] > 0  # pycocoevalcap's still scored


def test_rouge_metrics_reach_the_results_db_like_coco_metrics(tmp_path):
    from vlalign.eval.runner import metric_records
    from vlalign.results.db import ingest, query, resample_map

    scheme = ResampleScheme("world/test/0", 2, 4)
    with CaptionScorer(spice="off") as scorer:
        out = scorer.score(ROUGE_PREDS, ROUGE_REFS, resample=scheme)
    assert set(CAPTION_METRICS) - {"SPICE"} == set(out.scores) == set(out.resamples)
    base = {"run": "r_s0", "stage": "stage1", "dataset": "world", "split": "test"}
    records = metric_records(base, out.scores, {"num_beams": 1}, out.resamples, scheme)
    metrics = {"schema_version": 1, "run": "r_s0", "records": records, "missing": out.missing}
    run_dir = tmp_path / "results" / "runs" / "r_s0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    db = tmp_path / "results.duckdb"
    ingest(tmp_path / "results", db)
    rows = query(db, "SELECT metric, value FROM metrics").set_index("metric")["value"]
    assert set(rows.index) == set(out.scores)
    n = query(db, "SELECT metric, count(*) AS n FROM resamples GROUP BY metric")
    assert dict(zip(n["metric"], n["n"])) == {m: 4 for m in out.scores}
    resampled = resample_map(db)
    for m in (*ROUGE_SCORE_METRICS, "ROUGE_L"):
        assert rows[m] == pytest.approx(out.scores[m])
        key, values = resampled[("r_s0", "stage1", "world", "test", m)]
        assert key == scheme.key and values == pytest.approx(out.resamples[m])
