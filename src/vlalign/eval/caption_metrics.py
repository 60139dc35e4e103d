"""COCO caption metrics with pycocoevalcap, run the way ``COCOEvalCap.evaluate`` runs them.

Pipeline, as the COCO evaluation server scores: lower-case → Stanford PTBTokenizer (Java) with
pycocoevalcap's punctuation filter → Bleu(4), METEOR 1.5 (Java), ROUGE-L, CIDEr (pycocoevalcap's
``Cider`` is CIDEr-D) and, only when the Stanford CoreNLP jars are already installed, SPICE
(Java). A metric that cannot be computed is returned in ``missing`` and never as 0.

Besides COCO's metrics, ROUGE-1 and ROUGE-L F1 and recall (seed 001, PETAL, Tables 1 and 3:
``ROUGE1_F``, ``ROUGE1_R``, ``ROUGEL_F``, ``ROUGEL_R``) with Google's ``rouge-score`` package
(:func:`rouge_scores`). pycocoevalcap has no ROUGE-1, and its ``ROUGE_L`` is one F-measure with
beta = 1.2, neither the F1 nor the recall PETAL reports; the names differ so the two ROUGE-L
never mix.

Two deliberate deviations from pycocoevalcap's wrappers, neither of which changes a score:
- the PTB tokenizer is invoked with the same jar, class, flags and punctuation filter as
  ``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer``, but its temporary file goes to the
  system temp dir (not into site-packages, which may be read-only on a cluster), all captions are
  tokenized in one JVM, and the number of output lines is checked (pycocoevalcap ``zip``s and
  silently misaligns captions if a caption contains a Unicode line separator);
- the METEOR subprocess is always closed (its ``__del__`` blocks forever on the wrapper's lock if
  ``compute_score`` raised) and its stderr is drained so a chatty JVM cannot dead-lock the pipe.
"""

from __future__ import annotations

import contextlib
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocoevalcap.bleu.bleu_scorer import BleuScorer, cook_test
from pycocoevalcap.cider.cider_scorer import CiderScorer
from pycocoevalcap.cider.cider_scorer import precook as cider_precook
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.spice import get_stanford_models as _spice_models
from pycocoevalcap.tokenizer import ptbtokenizer as _ptb
from tqdm import tqdm

from vlalign.eval.references import References
from vlalign.eval.resampling import (
    ResampleScheme,
    bleu_resamples,
    cider_resamples,
    mean_resamples,
    meteor_resamples,
)

# rouge-score's ROUGE-1 / ROUGE-L F1 and recall (seed 001); not pycocoevalcap's ROUGE_L
ROUGE_SCORE_METRICS = ("ROUGE1_F", "ROUGE1_R", "ROUGEL_F", "ROUGEL_R")
CAPTION_METRICS = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L",
                   *ROUGE_SCORE_METRICS, "CIDEr", "SPICE")
SPICE_MODES = ("auto", "off", "require")

_PTB_JAR = Path(_ptb.__file__).resolve().parent / _ptb.STANFORD_CORENLP_3_4_1_JAR
_SPICE_DIR = Path(_spice_models.SPICEDIR).resolve()


class CaptionMetricError(RuntimeError):
    """A Java scorer (tokenizer, METEOR, SPICE) failed."""


def spice_missing_reason() -> str | None:
    """Why SPICE cannot run here, or None if it can. Never downloads anything.

    ``Spice()`` calls ``get_stanford_models()``, which downloads Stanford CoreNLP 3.6.0 when
    ``spice/lib/stanford-corenlp-3.6.0.jar`` is absent; SPICE's Java side also needs the
    ``-models`` jar that the same download extracts.
    """
    lib = _SPICE_DIR / _spice_models.SPICELIB
    needed = [
        _SPICE_DIR / "spice-1.0.jar",
        lib / f"{_spice_models.JAR}.jar",
        lib / f"{_spice_models.JAR}-models.jar",
    ]
    absent = [str(p) for p in needed if not p.is_file()]
    if absent:
        return "Stanford CoreNLP jars not found: " + ", ".join(absent)
    return None


def fetch_spice_models() -> None:
    """Download the Stanford CoreNLP jars SPICE needs (pycocoevalcap's own downloader; network)."""
    _spice_models.get_stanford_models()
    reason = spice_missing_reason()
    if reason is not None:
        raise CaptionMetricError(f"SPICE models still missing after download: {reason}")


def _validate(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> list[str]:
    if not isinstance(predictions, Mapping) or not isinstance(references, Mapping):
        raise TypeError("predictions and references must be dicts keyed by image id")
    if len(predictions) == 0:
        raise ValueError("predictions is empty: nothing to score")
    ids = list(predictions)
    for image_id in ids:
        pred = predictions[image_id]
        if not isinstance(pred, str):
            raise ValueError(
                f"prediction for image id {image_id!r} must be a string, got {type(pred).__name__}"
            )
        if image_id not in references:
            raise ValueError(f"image id {image_id!r} has a prediction but no references")
        refs = references[image_id]
        if isinstance(refs, str) or not isinstance(refs, Sequence):
            raise ValueError(
                f"references for image id {image_id!r} must be a list of strings, "
                f"got {type(refs).__name__}"
            )
        if len(refs) == 0:
            raise ValueError(f"image id {image_id!r} has an empty reference list")
        for j, ref in enumerate(refs):
            if not isinstance(ref, str):
                raise ValueError(
                    f"reference {j} of image id {image_id!r} must be a string, "
                    f"got {type(ref).__name__}"
                )
    return ids


def _one_line(text: str) -> str:
    # str.split() also splits on \r, \x0b, \x0c, \x85, \u2028, \u2029 — characters Java's
    # tokenizer may treat as line breaks, which would shift every following caption.
    return " ".join(text.lower().split())


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
    """Tokenize like pycocoevalcap's PTBTokenizer: Java PTBTokenizer, lower-case, drop punctuation.

    Returns one space-joined token string per input sentence (empty input → empty string).
    """
    cmd = [
        "java", "-cp", str(_PTB_JAR), "edu.stanford.nlp.process.PTBTokenizer",
        "-preserveLines", "-lowerCase", "-encoding", "UTF-8",
    ]
    lines = [_one_line(s) for s in sentences]
    if not lines:
        return []
    with tempfile.TemporaryDirectory(prefix="vlalign_ptb_") as tmp:
        path = Path(tmp) / "captions.txt"
        path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        try:
            proc = subprocess.run(cmd + [str(path)], capture_output=True, check=False)
        except FileNotFoundError as e:
            raise CaptionMetricError("java not found: the PTB tokenizer needs a JRE") from e
    if proc.returncode != 0:
        raise CaptionMetricError(
            f"PTBTokenizer exited with {proc.returncode}: "
            f"{proc.stderr.decode(errors='replace')[-2000:]}"
        )
    out = proc.stdout.decode("utf-8", errors="replace")
    # one output line (with trailing newline) per input line, empty lines included
    out_lines = out[:-1].split("\n") if out.endswith("\n") else out.split("\n")
    if len(out_lines) != len(lines):
        raise CaptionMetricError(
            f"PTBTokenizer returned {len(out_lines)} lines for {len(lines)} captions"
        )
    punct = set(_ptb.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w not in punct) for line in out_lines]


def rouge_scores(
    predictions: Sequence[str], references: Sequence[Sequence[str]]
) -> dict[str, np.ndarray]:
    """Per image, ROUGE-1 and ROUGE-L F1 and recall of its prediction against its references,
    with Google's ``rouge-score`` (which replicates ROUGE-1.5.5's defaults; no stemmer). It
    tokenizes the raw texts itself (lower-case; every run of characters other than ``a-z0-9``
    separates words, so a non-ASCII letter splits its word): the captions are scored as
    ``rouge-score`` scores them for other evaluations, not on the PTB tokens.

    Several references: ``RougeScorer.score_multi``, the library's documented behaviour — per
    ROUGE type, the reference with the highest F-measure (the first on ties) gives that type's
    Score, so ``*_R`` is the recall *of the best-F reference*, not the maximum recall over the
    references, and F and recall of one type always come from the same reference. An empty
    prediction scores 0.

    Returns ``{metric: array over images}`` for :data:`ROUGE_SCORE_METRICS`, in 0..1; the
    corpus score is the mean over images.
    """
    # imported here: rouge_score imports all of nltk and scipy.stats (~2 s of a job's start)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    out = {m: np.zeros(len(predictions)) for m in ROUGE_SCORE_METRICS}
    for k, (pred, refs) in enumerate(zip(predictions, references, strict=True)):
        best = scorer.score_multi(list(refs), pred)
        for kind, name in (("rouge1", "ROUGE1"), ("rougeL", "ROUGEL")):
            out[f"{name}_F"][k] = best[kind].fmeasure
            out[f"{name}_R"][k] = best[kind].recall
    return out


@contextlib.contextmanager
def _meteor() -> Iterator[Meteor]:
    """pycocoevalcap's Meteor with its JVM reliably shut down and its stderr drained."""
    try:
        meteor = Meteor()
    except FileNotFoundError as e:
        raise CaptionMetricError("java not found: METEOR needs a JRE") from e
    proc = meteor.meteor_p
    stderr_tail: deque[bytes] = deque(maxlen=50)

    def drain() -> None:
        for line in proc.stderr:
            stderr_tail.append(line)

    threading.Thread(target=drain, daemon=True, name="meteor-stderr").start()
    try:
        yield meteor
    except (ValueError, BrokenPipeError, OSError) as e:
        tail = b"".join(stderr_tail).decode(errors="replace")[-2000:]
        raise CaptionMetricError(f"METEOR subprocess failed ({e!r}); stderr: {tail}") from e
    finally:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        proc.kill()
        proc.wait(timeout=30)
        # Meteor.__del__ acquires this lock; a failed compute_score leaves it held.
        if meteor.lock.locked():
            meteor.lock.release()


def _run_spice(gts: dict, res: dict) -> float:
    from pycocoevalcap.spice.spice import Spice  # imported late: only when the jars exist

    score, _ = Spice().compute_score(gts, res)
    return float(score)


@dataclass
class CaptionScores:
    """What :meth:`CaptionScorer.score` returns: corpus scores (pycocoevalcap's raw scale),
    metrics not computed (``{"metric", "reason"}``) and, when a resample scheme was given,
    each metric's score per image resample (:mod:`vlalign.eval.resampling`)."""

    scores: dict[str, float]
    missing: list[dict]
    resamples: dict[str, np.ndarray] = field(default_factory=dict)


class CaptionScorer:
    """pycocoevalcap's metrics, with one METEOR JVM for every :meth:`score` call (a job's
    datasets and inference variants). Use as a context manager: the JVM is started on first
    use and always shut down on exit."""

    def __init__(self, spice: str = "auto", meteor: bool = True, rouge_score: bool = True) -> None:
        if spice not in SPICE_MODES:
            raise ValueError(f"spice must be one of {SPICE_MODES}, got {spice!r}")
        self.spice = spice
        self.meteor = meteor  # False: METEOR is listed as missing ("disabled"), never 0
        self.rouge_score = rouge_score  # False: likewise rouge-score's four metrics
        self._stack = contextlib.ExitStack()
        self._meteor: Meteor | None = None

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()
        self._meteor = None

    def _meteor_score(self, gts: dict, res: dict, ids: list) -> tuple[float, list[str]]:
        """The jar's corpus METEOR and each segment's statistics, pycocoevalcap's protocol
        (``compute_score``): one ``SCORE`` line per segment, then one ``EVAL`` line of all
        statistics, answered by a score per segment and the aggregate."""
        if self._meteor is None:  # started on first use, shared by every later call
            self._meteor = self._stack.enter_context(_meteor())
        m = self._meteor
        with m.lock:
            # Meteor's line protocol uses "|||" as separator; it only strips it from hypotheses
            stats = [m._stat(res[i][0], [r.replace("|||", "") for r in gts[i]]) for i in ids]
            m.meteor_p.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
            m.meteor_p.stdin.flush()
            for _ in stats:
                m.meteor_p.stdout.readline()
            return float(m.meteor_p.stdout.readline().strip()), stats

    def score(
        self,
        predictions: dict[str, str],
        references: dict[str, list[str]],
        *,
        resample: ResampleScheme | None = None,
        cached: References | None = None,
        timings: dict[str, float] | None = None,
    ) -> CaptionScores:
        """Score captions over the images in ``predictions``.

        Args:
            predictions: image id → generated caption (an empty string is valid and scores 0).
            references: image id → non-empty list of reference captions. Ids without a
                prediction are ignored (a reference file may cover more images).
            resample: if given, every metric is also scored on these image resamples; the
                images are taken in ``predictions``' order (``resample.n_images`` of them).
            cached: the split's tokenized references (:class:`References`, e.g. from the
                ``references`` rule): only the predictions are tokenized, and its n-gram
                counts are reused; it must cover exactly ``references``' captions of the
                scored ids (else ValueError).
            timings: if given, filled with wall seconds per step ("tokenize", "Bleu",
                "METEOR", "ROUGE_L", "rouge_score" (:data:`ROUGE_SCORE_METRICS`), "CIDEr",
                "SPICE").
        """
        ids = _validate(predictions, references)
        timings = {} if timings is None else timings
        spice = self.spice
        spice_reason = "disabled" if spice == "off" else spice_missing_reason()
        if spice == "require" and spice_reason is not None:
            raise CaptionMetricError(f"SPICE required but unavailable: {spice_reason}")
        if resample is not None and resample.n_images != len(ids):
            raise ValueError(
                f"resample scheme {resample.key!r} is for {resample.n_images} images, "
                f"got {len(ids)} predictions"
            )
        weights = resample.weights() if resample is not None else None

        t0 = time.perf_counter()
        scored = {i: references[i] for i in ids}
        if cached is None:
            cached = References.build(scored)
        elif not cached.covers(scored):
            raise ValueError(
                "cached references do not match the references of the scored images "
                "(built from another dataset split?)"
            )
        tokens = ptb_tokenize([predictions[i] for i in ids])
        timings["tokenize"] = time.perf_counter() - t0
        res = {i: [tokens[k]] for k, i in enumerate(ids)}
        gts = {i: cached.tokens[str(i)] for i in ids}

        out = CaptionScores(scores={}, missing=[])
        scores, resamples = out.scores, out.resamples
        steps = ["Bleu"] + ["METEOR"] * self.meteor + ["ROUGE_L"]
        steps += ["rouge_score"] * self.rouge_score + ["CIDEr"]
        steps += ["SPICE"] if spice_reason is None else []
        if not self.meteor:
            out.missing.append({"metric": "METEOR", "reason": "disabled (eval.meteor: false)"})
        if not self.rouge_score:
            out.missing += [
                {"metric": m, "reason": "disabled (eval.rouge_score: false)"}
                for m in ROUGE_SCORE_METRICS
            ]
        for step in tqdm(steps, desc="caption metrics", disable=None):
            t0 = time.perf_counter()
            if step == "Bleu":
                # pycocoevalcap's BleuScorer on the cached cooked references (Bleu(4) builds
                # the same scorer from the tokens)
                bleu_scorer = BleuScorer(n=4)
                bleu_scorer.crefs = [cached.bleu[str(i)] for i in ids]
                bleu_scorer.ctest = [cook_test(res[i][0], cached.bleu[str(i)]) for i in ids]
                bleu, _ = bleu_scorer.compute_score(option="closest", verbose=0)
                scores.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(bleu)})
                if weights is not None:
                    resamples.update(bleu_resamples(bleu_scorer.ctest, weights, bleu))
            elif step == "METEOR":
                scores["METEOR"], stats = self._meteor_score(gts, res, ids)
                if weights is not None:
                    resamples["METEOR"] = meteor_resamples(stats, weights, scores["METEOR"])
            elif step == "ROUGE_L":
                rouge, per_image = Rouge().compute_score(gts, res)
                scores["ROUGE_L"] = float(rouge)
                if weights is not None:
                    resamples["ROUGE_L"] = mean_resamples("ROUGE_L", per_image, weights, rouge)
            elif step == "rouge_score":
                # the raw captions (rouge-score tokenizes itself), not the PTB tokens
                by_image = rouge_scores([predictions[i] for i in ids], [scored[i] for i in ids])
                for name, values in by_image.items():
                    scores[name] = float(values.mean())
                    if weights is not None:  # a mean over images: the drawn images' mean
                        resamples[name] = mean_resamples(name, values, weights, scores[name])
            elif step == "CIDEr":
                # pycocoevalcap's CiderScorer (CIDEr-D) on the cached reference counts
                cider = CiderScorer(n=4, sigma=6.0)
                cider.crefs = [cached.cider[str(i)] for i in ids]
                cider.ctest = [cider_precook(res[i][0], 4) for i in ids]
                scores["CIDEr"] = float(cider.compute_score()[0])
                if weights is not None:
                    resamples["CIDEr"] = cider_resamples(
                        cider.ctest, cider.crefs, weights, scores["CIDEr"]
                    )
            else:
                try:
                    scores["SPICE"] = _run_spice(gts, res)
                except (subprocess.CalledProcessError, OSError, ValueError) as e:
                    if spice == "require":
                        raise CaptionMetricError(f"SPICE failed: {e!r}") from e
                    spice_reason = f"SPICE failed: {e!r}"
            timings[step] = time.perf_counter() - t0

        if spice_reason is not None:
            out.missing.append({"metric": "SPICE", "reason": spice_reason})
        return out


def score_captions(
    predictions: dict[str, str],
    references: dict[str, list[str]],
    spice: str = "auto",
    *,
    timings: dict[str, float] | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Score captions with pycocoevalcap over the images in ``predictions`` (one
    :class:`CaptionScorer` call; see :meth:`CaptionScorer.score` for the arguments).

    Returns:
        ``(scores, missing)``: scores maps the metric names (pycocoevalcap's Bleu_1..Bleu_4,
        METEOR, ROUGE_L, CIDEr, SPICE and rouge-score's ROUGE1_F, ROUGE1_R, ROUGEL_F, ROUGEL_R)
        to corpus-level floats in the raw scale (0..1, CIDEr unbounded); missing lists
        ``{"metric", "reason"}`` for metrics not computed.
    """
    with CaptionScorer(spice) as scorer:
        out = scorer.score(predictions, references, timings=timings)
    return out.scores, out.missing
