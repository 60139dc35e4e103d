"""Benchmark: caption scoring of 5,000 captions with 5 references each, side by side.

Synthetic COCO-like sentences (seeded). Measured in one run:
- each metric separately with pycocoevalcap, as evaluation harnesses do (a PTB tokenization
  of both sides per metric), and rouge-score's ROUGE-1 / ROUGE-L (``score_multi`` per image);
- ``CaptionScorer`` on its first run of a split (references tokenized and saved once), on a
  later run (references loaded from that file) and with image resamples.
All must give identical scores. Writes ``bench/out/caption_scoring.json``. Not a test:

    .venv/bin/python bench/bench_caption_scoring.py [--images 5000] [--refs 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
from rouge_score.rouge_scorer import RougeScorer

from vlalign.eval.caption_metrics import CaptionScorer
from vlalign.eval.references import References
from vlalign.eval.resampling import ResampleScheme
from vlalign.io_utils import write_json_atomic

SUBJECTS = ["a man", "a woman", "two dogs", "a small cat", "a group of people", "a red car",
            "an old bus", "a young boy", "three birds", "a brown horse", "a chef", "a skier"]
VERBS = ["is standing", "sits", "runs", "is walking", "is parked", "is eating", "plays",
         "is looking", "waits", "rests"]
PLACES = ["on the beach", "in a kitchen", "next to a building", "on a snowy hill",
          "in the park", "near the river", "on a busy street", "in a field", "at the table"]
EXTRAS = ["", "", "with a frisbee", "under a blue sky", "at night", "holding an umbrella",
          "in the rain", "with friends"]


def sentence(rng: random.Random) -> str:
    words = [rng.choice(SUBJECTS), rng.choice(VERBS), rng.choice(PLACES), rng.choice(EXTRAS)]
    return " ".join(w for w in words if w).capitalize() + rng.choice([".", "", " ."])


def java_version() -> str:
    try:
        out = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr
        return out.splitlines()[0] if out else "unknown"
    except FileNotFoundError:
        return "not found"


def separately(preds: dict, refs: dict) -> tuple[dict, dict]:
    """Each metric on its own, as evaluation harnesses call pycocoevalcap: its own PTB
    tokenization of references and predictions, then the scorer (one JVM per METEOR); then
    rouge-score's ``score_multi`` on each image's raw captions."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    scores, timings = {}, {}
    for name, make in (("Bleu", lambda: Bleu(4)), ("METEOR", Meteor), ("ROUGE_L", Rouge),
                       ("CIDEr", Cider)):
        t0 = time.perf_counter()
        tok = PTBTokenizer()
        gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
        res = tok.tokenize({k: [{"caption": v}] for k, v in preds.items()})
        scorer = make()
        score, _ = scorer.compute_score(gts, res)
        if name == "METEOR":
            scorer.meteor_p.kill()
        timings[name] = time.perf_counter() - t0
        if name == "Bleu":
            scores.update({f"Bleu_{n + 1}": float(b) for n, b in enumerate(score)})
        else:
            scores[name] = float(score)
    t0 = time.perf_counter()
    rouge = RougeScorer(["rouge1", "rougeL"], use_stemmer=False)
    best = [rouge.score_multi(refs[k], preds[k]) for k in preds]
    for kind, name in (("rouge1", "ROUGE1"), ("rougeL", "ROUGEL")):
        scores[f"{name}_F"] = float(np.mean([b[kind].fmeasure for b in best]))
        scores[f"{name}_R"] = float(np.mean([b[kind].recall for b in best]))
    timings["rouge_score"] = time.perf_counter() - t0
    return scores, timings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--refs", type=int, default=5)
    ap.add_argument("--resamples", type=int, default=200)
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "caption_scoring.json"))
    args = ap.parse_args()

    rng = random.Random(0)
    refs = {f"img{i}": [sentence(rng) for _ in range(args.refs)] for i in range(args.images)}
    # half the predictions copy a reference, half are fresh sentences: realistic score ranges
    preds = {k: (v[0] if i % 2 else sentence(rng)) for i, (k, v) in enumerate(refs.items())}

    t0 = time.perf_counter()
    base_scores, base_steps = separately(preds, refs)
    base = time.perf_counter() - t0

    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        cached = References.build(refs)
        cached.save(Path(tmp) / "refs.json")
        build = time.perf_counter() - t0
        for name, resample in (("first_run", None), ("cached_references", None),
                               ("cached_references_resamples", args.resamples)):
            timings: dict[str, float] = {}
            t0 = time.perf_counter()
            refs_obj = cached if name == "first_run" else References.load(Path(tmp) / "refs.json")
            scheme = ResampleScheme("bench", args.images, resample) if resample else None
            with CaptionScorer(spice="off") as scorer:
                out = scorer.score(preds, refs, cached=refs_obj, resample=scheme,
                                   timings=timings)
            total = time.perf_counter() - t0 + (build if name == "first_run" else 0.0)
            runs[name] = {"seconds_total": total, "seconds_per_step": timings}
            if out.scores != base_scores:
                raise SystemExit(f"{name}: scores differ from pycocoevalcap: {out.scores} vs "
                                 f"{base_scores}")

    result = {
        "benchmark": "caption_scoring",
        "images": args.images,
        "references_per_image": args.refs,
        "separately_seconds_total": base,
        "separately_seconds_per_metric": base_steps,
        "vlalign": runs,
        "reference_build_seconds": build,
        "ratio_separately_over_first_run": base / runs["first_run"]["seconds_total"],
        "ratio_separately_over_cached": base / runs["cached_references"]["seconds_total"],
        "resamples": args.resamples,
        "scores": base_scores,
        "scores_identical": True,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
            "python": sys.version.split()[0],
            "java": java_version(),
            "pycocoevalcap": version("pycocoevalcap"),
            "rouge-score": version("rouge-score"),
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(args.out, result)
    print(f"{args.images} captions × {args.refs} refs: each metric separately {base:.1f}s; "
          f"vlalign {runs['first_run']['seconds_total']:.1f}s first run "
          f"({result['ratio_separately_over_first_run']:.2f}x), "
          f"{runs['cached_references']['seconds_total']:.1f}s with cached references "
          f"({result['ratio_separately_over_cached']:.2f}x), "
          f"{runs['cached_references_resamples']['seconds_total']:.1f}s with {args.resamples} "
          "image resamples; scores identical")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
