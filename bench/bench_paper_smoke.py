"""Paper-size smoke run (issue 17 item 5): the paper recipe end to end on this machine, offline.

Builds random-init SigLIP so400m-patch14-224 and Qwen2.5-0.5B from their configs
(``bench/paper_size.py``; nothing is downloaded), saves them as local checkpoints with a
tokenizer, writes a tiny LLaVA-ReCap-format dataset of synthetic-world images, and points
``config/recipes/paper.yaml`` at them with a config overlay (``local:`` sources, written into
the work dir): ``datasets.coco_recap``, ``vision``, ``lm``, a small global batch, and one run
``paper_smoke`` = stage1 (a few steps, reading the frozen-feature cache) → ft_lora (the
recipe's LoRA stage, r 16 on q/k/v, on the same data). Snakemake runs the real rules on the
paper recipe + overlay, targeting the two stages (dataset, tokenizer, backbone fetch, feature
cache, train_stage). Per stage it reports the step time (``train_log.csv``), the job's peak RSS
and wall time (Snakemake's ``benchmark:`` TSV), and the trainable / total parameters.

``--sizes mid`` runs the same path with the same architectures reduced (seconds; the suite's
``tests/test_paper_smoke.py``), ``--sizes paper`` the real sizes (minutes on 2 CPU cores).
Writes ``bench/out/paper_smoke_<sizes>.json``. Not a test:

    PYTHONPATH=src .venv/bin/python bench/bench_paper_smoke.py --sizes mid
    PYTHONPATH=src .venv/bin/python bench/bench_paper_smoke.py --sizes paper --stage1-steps 2
"""

from __future__ import annotations

import argparse
import csv
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_size import SIZES, corpus, machine_info, save_backbones, write_llava_dataset  # noqa: E402

from vlalign.config import REPO_ROOT, deep_merge, load_yaml, validate_config  # noqa: E402
from vlalign.io_utils import write_json_atomic  # noqa: E402
from vlalign.runs.plan import plan  # noqa: E402

OUT_DIR = Path(__file__).parent / "out"
PAPER_RECIPE = REPO_ROOT / "config" / "recipes" / "paper.yaml"
RUN = "paper_smoke"
STAGES = ("stage1", "ft_lora")


def overlay(work: Path, llava_json: Path, hub: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The paper recipe pointed at the local inputs; everything else stays the recipe's."""
    return {
        "results_dir": str(work / "results"),
        "datasets": {
            "coco_recap": {
                "source": f"local:{llava_json}",
                "image_root": str(llava_json.parent),
                # a few images: the recipe's 1 % val / test would be empty
                "split_fractions": {"train": 0.75, "val": 0.125, "test": 0.125},
            }
        },
        "vision": {"source": f"local:{hub / 'vision'}"},
        "lm": {"source": f"local:{hub / 'lm'}"},
        "train": {"batch_size": args.batch, "micro_batch_size": args.micro},
        "runs": {
            RUN: {
                "chain": [
                    {"stage": "stage1", "max_steps": args.stage1_steps},
                    # the recipe's LoRA stage on the stage1 data (its COCO Karpathy source is a
                    # local COCO directory this machine has not got)
                    {
                        "stage": "ft_lora",
                        "dataset": "coco_recap",
                        "text": "recaption",
                        "max_steps": args.lora_steps,
                    },
                ],
                "eval_datasets": ["coco_recap"],
            }
        },
    }


def stage_hashes(configfiles: list[Path]) -> dict[str, Any]:
    """The run's stage nodes as the Snakefile plans them (same merge, validation and plan)."""
    merged: dict = {}
    for path in configfiles:
        merged = deep_merge(merged, load_yaml(path))
    config = validate_config(merged, source=" + ".join(map(str, configfiles)))
    stages, runs = plan(config)
    return {stages[h].name: stages[h] for h in runs[f"{RUN}_s{config['seed']}"].stages}


def read_tsv(path: Path) -> dict[str, float]:
    with path.open(newline="") as f:
        row = next(csv.DictReader(f, delimiter="\t"))
    out = {}
    for k, v in row.items():  # h:m:s is the seconds column again, as text
        try:
            out[k] = float(v)
        except ValueError:
            pass
    return out


def stage_report(results: Path, node) -> dict[str, Any]:
    import json

    out = results / "stages" / node.hash
    with (out / "train_log.csv").open(newline="") as f:
        rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    stage = json.loads((out / "stage.json").read_text())
    bench = read_tsv(results / "benchmarks" / "train_stage" / f"{node.hash}.tsv")
    # a step's time from its throughput (the global batch: the data has whole batches)
    step_s = [stage["settings"]["batch_size"] / r["samples_per_s"] for r in rows]
    return {
        "hash": node.hash,
        "dir": str(out),
        "steps": len(rows),
        "feature_cache": stage["feature_cache"],
        "peft": stage["peft"],
        "trainable_params": stage["trainable_params"],
        "trainable_pct": stage["trainable_pct"],
        "image_tokens": stage["image_tokens"],
        "losses": [r["loss"] for r in rows],
        "heldout_loss": stage["heldout_loss"],
        "step_seconds": step_s,
        "step_seconds_median": statistics.median(step_s),
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in rows),
        # the whole train_stage job (load, train, held-out loss, save), Snakemake's benchmark
        "job_seconds": bench.get("s"),
        "job_peak_rss_mib": bench.get("max_rss"),
    }


def run_smoke(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Build the inputs in ``work``, run Snakemake on the paper recipe + overlay; → report."""
    vision_cfg, lm_cfg = SIZES[args.sizes]
    t0 = time.perf_counter()
    llava = write_llava_dataset(work / "llava", args.images)
    save_backbones(work / "hub", corpus(llava), vision_cfg, lm_cfg)
    build_s = time.perf_counter() - t0
    overlay_path = work / "paper_smoke.yaml"
    overlay_path.write_text(yaml.safe_dump(overlay(work, llava, work / "hub", args)))
    configfiles = [PAPER_RECIPE, overlay_path]
    nodes = stage_hashes(configfiles)
    results = work / "results"
    targets = [str(results / "stages" / nodes[name].hash) for name in STAGES]
    snakemake = Path(sys.executable).with_name("snakemake")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(snakemake), "--cores", str(args.cores), "--configfile", *map(str, configfiles),
         "--", *targets],  # fmt: skip
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wall = time.perf_counter() - t0
    # exact, unlike the benchmark files' sampled max_rss: the largest process this bench has
    # waited for (transitively: Snakemake waits for its jobs), i.e. the DAG's biggest job
    children_peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    if proc.returncode != 0:
        logs = "\n".join(
            f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted(results.glob("logs/**/*.log"))
        )
        raise RuntimeError(f"snakemake failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{logs}")
    from vlalign.models import backbones as bb

    vision = bb.load_vision(work / "hub" / "vision")
    lm = bb.load_lm(work / "hub" / "lm")
    from paper_size import count_params

    params = {"vision": count_params(vision), "lm": count_params(lm)}
    del vision, lm
    jobs = {
        p.relative_to(results / "benchmarks").with_suffix("").as_posix(): read_tsv(p)
        for p in sorted((results / "benchmarks").rglob("*.tsv"))
    }
    return {
        "benchmark": "paper_smoke",
        "sizes": args.sizes,
        "model": {"vision": vision_cfg, "lm": lm_cfg, "params": params,
                  "init": "random (configs only, no download)"},  # fmt: skip
        "recipe": str(PAPER_RECIPE.relative_to(REPO_ROOT)),
        "overlay": yaml.safe_load(overlay_path.read_text()),
        "images": args.images,
        "inputs_build_seconds": build_s,
        "snakemake_seconds": wall,
        "largest_job_peak_rss_mib": children_peak_mib,
        "stages": {name: stage_report(results, nodes[name]) for name in STAGES},
        # every job of the DAG: wall seconds (s) and peak RSS (max_rss, MiB) as Snakemake's
        # benchmark: samples them
        "jobs": {k: {"seconds": v.get("s"), "peak_rss_mib": v.get("max_rss")}
                 for k, v in jobs.items()},  # fmt: skip
        "machine": machine_info(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", choices=sorted(SIZES), default="mid")
    ap.add_argument("--images", type=int, default=8, help="images in the LLaVA-format dataset")
    ap.add_argument("--batch", type=int, default=2, help="global batch (the recipe's: 128)")
    ap.add_argument("--micro", type=int, default=1, help="micro-batch (the recipe's: 16)")
    ap.add_argument("--stage1-steps", type=int, default=3)
    ap.add_argument("--lora-steps", type=int, default=2)
    ap.add_argument("--cores", type=int, default=2, help="snakemake --cores")
    ap.add_argument("--work", default=None, help="work dir (kept); default: a temp dir")
    ap.add_argument("--out", default=None, help="default: bench/out/paper_smoke_<sizes>.json")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        report = run_smoke(Path(args.work), args)
    else:
        with tempfile.TemporaryDirectory(prefix="paper_smoke_") as tmp:
            report = run_smoke(Path(tmp), args)
    out = Path(args.out) if args.out else OUT_DIR / f"paper_smoke_{args.sizes}.json"
    write_json_atomic(out, report)
    for name, s in report["stages"].items():
        print(
            f"{name}: {s['steps']} steps, median step {s['step_seconds_median']:.2f} s, "
            f"job peak RSS {s['job_peak_rss_mib']} MiB, losses {[round(x, 3) for x in s['losses']]}"
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
