"""VQAv2 soft accuracy with the official answer normalisation.

Follows ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of the official VQA API
(GT-Vision-Lab/VQA): ``processPunctuation`` then ``processDigitArticle`` (number words → digits,
articles a/an/the dropped, contraction table), and accuracy averaged over the leave-one-annotator
-out subsets: for each of the n answers, ``min(1, #matches among the other n-1 / 3)``, averaged.
For the usual 10 answers this is the average over the 10 choose 9 subsets, which is why "one
matching annotator of 10" scores 0.3, three score 0.9 and four or more score 1.0 (the simplified
``min(#matches / 3, 1)`` would give 1.0 for three).

Differences from the official script, both documented choices:
- A single-answer set is scored by exact match after normalisation (the leave-one-out rule
  would always give 0 there).
- The official script normalises ground-truth answers with ``processPunctuation`` only, because
  the released VQAv2 annotations are already normalised; our datasets may carry raw answers, so
  both prediction and answers go through the full ``normalize_answer``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Official contraction table, verbatim, including its curly apostrophes: after
# ``processPunctuation`` has replaced straight apostrophes, mapping to the curly forms keeps
# normalisation idempotent.
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn’t’ve", "couldnt’ve": "couldn’t’ve",
    "didnt": "didn’t", "doesnt": "doesn’t", "dont": "don’t", "hadnt": "hadn’t",
    "hadnt’ve": "hadn’t’ve", "hadn'tve": "hadn’t’ve", "hasnt": "hasn’t", "havent": "haven’t",
    "hed": "he’d", "hed’ve": "he’d’ve", "he’dve": "he’d’ve", "hes": "he’s", "howd": "how’d",
    "howll": "how’ll", "hows": "how’s", "Id’ve": "I’d’ve", "I’dve": "I’d’ve", "Im": "I’m",
    "Ive": "I’ve", "isnt": "isn’t", "itd": "it’d", "itd’ve": "it’d’ve", "it’dve": "it’d’ve",
    "itll": "it’ll", "let’s": "let’s", "maam": "ma’am", "mightnt": "mightn’t",
    "mightnt’ve": "mightn’t’ve", "mightn’tve": "mightn’t’ve", "mightve": "might’ve",
    "mustnt": "mustn’t", "mustve": "must’ve", "neednt": "needn’t", "notve": "not’ve",
    "oclock": "o’clock", "oughtnt": "oughtn’t", "ow’s’at": "’ow’s’at", "’ows’at": "’ow’s’at",
    "’ow’sat": "’ow’s’at", "shant": "shan’t", "shed’ve": "she’d’ve", "she’dve": "she’d’ve",
    "she’s": "she’s", "shouldve": "should’ve", "shouldnt": "shouldn’t",
    "shouldnt’ve": "shouldn’t’ve", "shouldn’tve": "shouldn’t’ve", "somebody’d": "somebodyd",
    "somebodyd’ve": "somebody’d’ve", "somebody’dve": "somebody’d’ve",
    "somebodyll": "somebody’ll", "somebodys": "somebody’s", "someoned": "someone’d",
    "someoned’ve": "someone’d’ve", "someone’dve": "someone’d’ve", "someonell": "someone’ll",
    "someones": "someone’s", "somethingd": "something’d", "somethingd’ve": "something’d’ve",
    "something’dve": "something’d’ve", "somethingll": "something’ll", "thats": "that’s",
    "thered": "there’d", "thered’ve": "there’d’ve", "there’dve": "there’d’ve",
    "therere": "there’re", "theres": "there’s", "theyd": "they’d", "theyd’ve": "they’d’ve",
    "they’dve": "they’d’ve", "theyll": "they’ll", "theyre": "they’re", "theyve": "they’ve",
    "twas": "’twas", "wasnt": "wasn’t", "wed’ve": "we’d’ve", "we’dve": "we’d’ve",
    "weve": "we've", "werent": "weren’t", "whatll": "what’ll", "whatre": "what’re",
    "whats": "what’s", "whatve": "what’ve", "whens": "when’s", "whered": "where’d",
    "wheres": "where's", "whereve": "where’ve", "whod": "who’d", "whod’ve": "who’d’ve",
    "who’dve": "who’d’ve", "wholl": "who’ll", "whos": "who’s", "whove": "who've",
    "whyll": "why’ll", "whyre": "why’re", "whys": "why’s", "wont": "won’t",
    "wouldve": "would’ve", "wouldnt": "wouldn’t", "wouldnt’ve": "wouldn’t’ve",
    "wouldn’tve": "wouldn’t’ve", "yall": "y’all", "yall’ll": "y’all’ll", "y’allll": "y’all’ll",
    "yall’d’ve": "y’all’d’ve", "y’alld’ve": "y’all’d’ve", "y’all’dve": "y’all’d’ve",
    "youd": "you’d", "youd’ve": "you’d’ve", "you’dve": "you’d’ve", "youll": "you’ll",
    "youre": "you’re", "youve": "you’ve",
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`",
          ",", "?"]
# The official pattern is "(?!<=\d)(\.)(?!\d)": a mistyped look-behind, so it removes every
# period not followed by a digit ("3.5" keeps its period, "dog." loses it). Kept as is.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _process_punctuation(text: str) -> str:
    out = text
    digit_comma = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        # punctuation next to a space (or any "1,000"-style number) is deleted, otherwise it
        # separates words: "black/white" → "black white", "dog ?" → "dog"
        if (p + " " in text or " " + p in text) or digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # the official call passes re.UNICODE (=32) positionally, i.e. as ``count``
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def _process_digit_article(text: str) -> str:
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(s: str) -> str:
    """Official VQA answer normalisation ("Two." → "2", "a dog" → "dog", "dont" → "don’t")."""
    if not isinstance(s, str):
        raise TypeError(f"answer must be a string, got {type(s).__name__}")
    s = s.replace("\n", " ").replace("\t", " ").strip()
    return _process_digit_article(_process_punctuation(s))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Soft VQA accuracy of one prediction against its annotators' answers, in [0, 1].

    One answer: exact match after normalisation. n ≥ 2 answers: official leave-one-out average of
    ``min(1, matches among the other n-1 answers / 3)`` (10 answers: 1 match → 0.3, 2 → 0.6,
    3 → 0.9, ≥4 → 1.0).
    """
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise ValueError(f"answers must be a list of strings, got {type(answers).__name__}")
    if len(answers) == 0:
        raise ValueError("answers is empty: need at least one ground-truth answer")
    pred = normalize_answer(prediction)
    gts = [normalize_answer(a) for a in answers]
    if len(gts) == 1:
        return float(pred == gts[0])
    matches = sum(g == pred for g in gts)
    # leaving out a matching annotator leaves matches-1 matches, any other leaves matches
    total = sum(min(1.0, (matches - (g == pred)) / 3.0) for g in gts)
    return total / len(gts)


def vqa_score(predictions: list[str], answers: list[list[str]]) -> float:
    """Mean ``vqa_accuracy`` over questions (raw 0..1; tables multiply by 100)."""
    if len(predictions) != len(answers):
        raise ValueError(
            f"{len(predictions)} predictions but {len(answers)} answer lists: must be equal"
        )
    if len(predictions) == 0:
        raise ValueError("no predictions to score")
    total = 0.0
    for i, (pred, ans) in enumerate(zip(predictions, answers)):
        try:
            total += vqa_accuracy(pred, ans)
        except (ValueError, TypeError) as e:
            raise ValueError(f"question {i}: {e}") from e
    return total / len(predictions)
