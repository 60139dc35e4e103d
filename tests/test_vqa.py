"""VQAv2 accuracy and the official answer normalisation."""

from __future__ import annotations

import pytest

from vlalign.eval.vqa import normalize_answer, vqa_accuracy, vqa_score


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Two.", "2"),  # number word → digit, trailing period stripped
        ("a dog", "dog"),  # articles dropped
        ("The Red Car", "red car"),
        ("Yes", "yes"),
        ("none", "0"),
        ("black/white", "black white"),  # punctuation inside a word separates
        ("dog ?", "dog"),  # punctuation next to a space is deleted
        ("1,000", "1000"),  # digit comma → all listed punctuation deleted
        ("3.5", "3.5"),  # a period before a digit stays
        ("dont", "don’t"),  # contraction table (official curly apostrophe)
        ("  ten\tapples\n", "10 apples"),
    ],
)
def test_normalize_answer_official_cases(raw, expected):
    assert normalize_answer(raw) == expected


def test_normalize_is_idempotent_on_examples():
    for raw in ["Two.", "a dog", "dont", "black/white", "1,000 cats"]:
        once = normalize_answer(raw)
        assert normalize_answer(once) == once


def test_single_answer_is_exact_match_after_normalisation():
    assert vqa_accuracy("Two.", ["2"]) == 1.0
    assert vqa_accuracy("dog", ["a dog"]) == 1.0
    assert vqa_accuracy("yes", ["no"]) == 0.0


def _official_subsets(pred: str, answers: list[str]) -> float:
    """Independent computation: average of min(1, matches/3) over all (n-1)-subsets."""
    from itertools import combinations

    n = len(answers)
    subs = list(combinations(range(n), n - 1))
    return sum(min(1.0, sum(answers[i] == pred for i in s) / 3) for s in subs) / len(subs)


@pytest.mark.parametrize(("m", "expected"), [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0),
                                             (7, 1.0), (10, 1.0)])
def test_soft_accuracy_ten_annotators(m, expected):
    answers = ["two"] * m + ["three"] * (10 - m)
    acc = vqa_accuracy("2", answers)
    assert acc == pytest.approx(expected)
    assert acc == pytest.approx(_official_subsets("2", [normalize_answer(a) for a in answers]))


def test_soft_accuracy_other_counts_match_subset_definition():
    answers = ["cat", "cat", "dog", "a cat", "bird"]
    assert vqa_accuracy("cat", answers) == pytest.approx(
        _official_subsets("cat", [normalize_answer(a) for a in answers])
    )


def test_vqa_score_mean():
    preds = ["yes", "Two", "cat"]
    answers = [["yes"], ["2"] * 10, ["dog"] * 9 + ["cat"]]
    assert vqa_score(preds, answers) == pytest.approx((1.0 + 1.0 + 0.3) / 3)


def test_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 answer lists"):
        vqa_score(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no predictions"):
        vqa_score([], [])
    with pytest.raises(ValueError, match="question 1: answers is empty"):
        vqa_score(["a", "b"], [["a"], []])
    with pytest.raises(ValueError, match="list of strings"):
        vqa_accuracy("a", "a")
    with pytest.raises(TypeError, match="answer must be a string"):
        normalize_answer(None)
