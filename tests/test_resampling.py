"""Image-resampled caption scores equal pycocoevalcap run on each resampled multiset."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import precook
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge

from vlalign.eval.caption_metrics import (
    ROUGE_SCORE_METRICS,
    CaptionScorer,
    ptb_tokenize,
    rouge_scores,
)
from vlalign.eval.resampling import (
    ResampleCheckError,
    ResampleScheme,
    cider_resamples,
    grouped_mean_resamples,
)

WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "small", "large", "on",
         "the", "left", "right", "top", "image", "shows", "two", "three", "objects", "gray"]


def _corpus(n: int, refs: int = 3, seed: int = 0) -> tuple[dict, dict]:
    rng = random.Random(seed)

    def sent() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 11)))

    gts = {f"img{i}": [sent() for _ in range(refs)] for i in range(n)}
    res = {k: (v[0] if i % 3 == 0 else sent()) for i, (k, v) in enumerate(gts.items())}
    return res, gts


def test_scheme_is_a_pure_function_of_its_key():
    a, b = ResampleScheme("world/test/0", 10, 5), ResampleScheme("world/test/0", 10, 5)
    assert np.array_equal(a.indices(), b.indices())
    assert not np.array_equal(a.indices(), ResampleScheme("world/test/1", 10, 5).indices())
    w = a.weights()
    assert w.shape == (5, 10) and np.all(w.sum(axis=1) == 10)
    for row, idx in zip(w, a.indices()):
        assert np.array_equal(row, np.bincount(idx, minlength=10))


@pytest.mark.slow
def test_every_metric_equals_pycocoevalcap_on_the_resampled_multiset():
    res, gts = _corpus(24)
    scheme = ResampleScheme("t", 24, 4)
    with CaptionScorer(spice="off") as scorer:
        out = scorer.score(res, gts, resample=scheme)
    assert set(out.resamples) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L",
                                  "CIDEr", *ROUGE_SCORE_METRICS}
    ids = list(res)
    # pycocoevalcap on the tokenized multiset (a drawn image repeated under fresh ids)
    flat = [res[i] for i in ids] + [r for i in ids for r in gts[i]]
    tok = ptb_tokenize(flat)
    tres = {i: [tok[k]] for k, i in enumerate(ids)}
    pos, tgts = len(ids), {}
    for i in ids:
        tgts[i] = tok[pos : pos + len(gts[i])]
        pos += len(gts[i])
    meteor = Meteor()
    try:
        for k, idx in enumerate(scheme.indices()):
            mres = {f"{j}_{ids[x]}": tres[ids[x]] for j, x in enumerate(idx)}
            mgts = {f"{j}_{ids[x]}": tgts[ids[x]] for j, x in enumerate(idx)}
            bleu, _ = Bleu(4).compute_score(mgts, mres, verbose=0)
            for n in range(4):
                assert out.resamples[f"Bleu_{n + 1}"][k] == pytest.approx(bleu[n], rel=1e-9)
            assert out.resamples["CIDEr"][k] == pytest.approx(
                Cider().compute_score(mgts, mres)[0], rel=1e-9)
            assert out.resamples["ROUGE_L"][k] == pytest.approx(
                Rouge().compute_score(mgts, mres)[0], rel=1e-9)
            assert out.resamples["METEOR"][k] == pytest.approx(
                meteor.compute_score(mgts, mres)[0], rel=1e-9)
            # rouge-score's: the mean over the drawn images, on the raw captions
            rouge = rouge_scores([res[ids[x]] for x in idx], [gts[ids[x]] for x in idx])
            for m in ROUGE_SCORE_METRICS:
                assert out.resamples[m][k] == pytest.approx(rouge[m].mean(), rel=1e-9)
    finally:
        meteor.meteor_p.kill()
    # the resamples differ from each other and from the full-set score: they are not copies
    assert len(set(np.round(out.resamples["CIDEr"], 9))) == 4


def test_cider_full_set_check_fails_on_a_wrong_reference():
    res, gts = _corpus(8)
    tres = {k: [v] for k, v in res.items()}
    w = ResampleScheme("t", 8, 2).weights()
    right = Cider().compute_score(gts, tres)[0]
    hyps = [precook(res[i], 4) for i in res]
    refs = [[precook(r, 4) for r in gts[i]] for i in res]
    assert cider_resamples(hyps, refs, w, right).shape == (2,)
    with pytest.raises(ResampleCheckError, match="CIDEr"):
        cider_resamples(hyps, refs, w, right + 1e-3)


@pytest.mark.slow
def test_cached_references_score_exactly_as_pycocoevalcap(tmp_path):
    """The scorer with the split's references tokenized once (saved, loaded) gives the scores
    of pycocoevalcap's own tokenizer and scorers, to the last bit; references of other
    captions are refused."""
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    from vlalign.eval.references import References

    res, gts = _corpus(30, refs=4, seed=3)
    refs = References.build(gts)
    refs.save(tmp_path / "test.json")
    loaded = References.load(tmp_path / "test.json")
    with CaptionScorer(spice="off") as scorer:
        mine = scorer.score(res, gts, cached=loaded).scores
        again = scorer.score(res, gts, cached=loaded).scores  # counts reused: same scores
    tok = PTBTokenizer()
    tgts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
    tres = tok.tokenize({k: [{"caption": v}] for k, v in res.items()})
    bleu, _ = Bleu(4).compute_score(tgts, tres, verbose=0)
    theirs = {f"Bleu_{n + 1}": b for n, b in enumerate(bleu)}
    theirs["CIDEr"] = Cider().compute_score(tgts, tres)[0]
    theirs["ROUGE_L"] = Rouge().compute_score(tgts, tres)[0]
    meteor = Meteor()
    try:
        theirs["METEOR"] = meteor.compute_score(tgts, tres)[0]
    finally:
        meteor.meteor_p.kill()
    assert mine == again
    assert set(mine) - set(theirs) == set(ROUGE_SCORE_METRICS)  # rouge-score's, not pycocoevalcap's
    assert {k: float(v) for k, v in theirs.items()} == {k: mine[k] for k in theirs}
    other = {k: [v[0] + " again"] + v[1:] for k, v in gts.items()}
    with pytest.raises(ValueError, match="do not match"), CaptionScorer(spice="off") as scorer:
        scorer.score(res, other, cached=loaded)


def test_meteor_disabled_is_missing_never_zero():
    res, gts = _corpus(6)
    with CaptionScorer(spice="off", meteor=False) as scorer:
        out = scorer.score(res, gts, resample=ResampleScheme("t", 6, 3))
    assert "METEOR" not in out.scores and "METEOR" not in out.resamples
    assert {"metric": "METEOR", "reason": "disabled (eval.meteor: false)"} in out.missing
    assert scorer._meteor is None  # no JVM was started
    assert {"Bleu_4", "ROUGE_L", "CIDEr"} <= set(out.scores)


def test_grouped_mean_resamples_are_the_mean_over_the_drawn_images_questions():
    # VQA accuracy: 3 images with 2, 1 and 3 questions
    groups, values = [0, 0, 1, 2, 2, 2], [1.0, 0.0, 1.0, 0.0, 0.0, 1.0]
    scheme = ResampleScheme("t/test/0", 3, count=50)
    out = grouped_mean_resamples("VQA_acc", groups, values, scheme.weights(), 0.5)
    for r, idx in enumerate(scheme.indices()):  # by hand: each drawn image brings its questions
        drawn = [v for i in idx for g, v in zip(groups, values) if g == i]
        assert out[r] == pytest.approx(sum(drawn) / len(drawn))
    assert len(set(np.round(out, 6))) > 1
    with pytest.raises(ResampleCheckError):
        grouped_mean_resamples("VQA_acc", groups, values, scheme.weights(), 0.6)
