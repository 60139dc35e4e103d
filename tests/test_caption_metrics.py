"""Real pycocoevalcap scoring (Java PTB tokenizer and METEOR run for real)."""

from __future__ import annotations

import math
import shutil

import pytest

from vlalign.eval.caption_metrics import (
    CAPTION_METRICS,
    CaptionMetricError,
    ptb_tokenize,
    score_captions,
    spice_missing_reason,
)

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
