"""Benchmark: pycocoevalcap scoring of 5,000 captions with 5 references each.

Synthetic COCO-like sentences (seeded); per-metric wall time from ``score_captions(timings=)``.
Writes ``bench/out/caption_scoring.json``. Not a test:

    .venv/bin/python bench/bench_caption_scoring.py [--images 5000] [--refs 5]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import subprocess
import sys
import time
from importlib.metadata import version
from pathlib import Path

from vlalign.eval.caption_metrics import score_captions
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=5000)
    ap.add_argument("--refs", type=int, default=5)
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "caption_scoring.json"))
    args = ap.parse_args()

    rng = random.Random(0)
    refs = {f"img{i}": [sentence(rng) for _ in range(args.refs)] for i in range(args.images)}
    # half the predictions copy a reference, half are fresh sentences: realistic score ranges
    preds = {k: (v[0] if i % 2 else sentence(rng)) for i, (k, v) in enumerate(refs.items())}

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    scores, missing = score_captions(preds, refs, spice="auto", timings=timings)
    total = time.perf_counter() - t0

    result = {
        "benchmark": "caption_scoring",
        "images": args.images,
        "references_per_image": args.refs,
        "seconds_total": total,
        "seconds_per_step": timings,
        "scores": scores,
        "missing": missing,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "load_avg_1m": os.getloadavg()[0],
            "python": sys.version.split()[0],
            "java": java_version(),
            "pycocoevalcap": version("pycocoevalcap"),
        },
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json_atomic(args.out, result)
    steps = ", ".join(f"{k} {v:.2f}s" for k, v in timings.items())
    print(f"{args.images} captions × {args.refs} refs: {total:.1f}s total ({steps})")
    print({k: round(v, 4) for k, v in scores.items()}, missing)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
