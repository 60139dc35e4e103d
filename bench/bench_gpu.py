"""GPU benchmark, one command (issue 17 item 6): the paper-size model on a lent GPU.

Builds SigLIP so400m-patch14-224 + Qwen2.5-0.5B from their configs (random init, no download;
``bench/paper_size.py``) and a synthetic-world dataset with recaptions, then runs the real
``train_stage`` with the paper recipe's resolved settings (``config/recipes/paper.yaml``, bf16
autocast on the GPU, gradient checkpointing, micro-batch 16) for a few steps each:

- stage2 (everything trainable) with padded rows, then packed rows (``train.packing``,
  :mod:`vlalign.models.packing`): samples/s, tokens/s, peak memory
  (``torch.cuda.max_memory_allocated``) and MFU = 6·N·tokens/s ÷ the device's dense bf16 peak
  (N = all parameters; the table in ``paper_size.BF16_PEAK``; a device not in it gets no MFU,
  and the report says so). Target: ≥ 40 % MFU for packed stage2.
- stage1 (projector only) reading the frozen-feature cache vs. reading images through the
  encoder: samples/s of each, and the cache's build time.

Throughput is the total over the steps after ``--skip`` warm-up steps (samples and
tokens of those steps ÷ their seconds, from ``train_log.csv``). Writes
``bench/out/gpu_<device>.json`` (the device name in the file name). Without a CUDA device it
prints one line and exits 0; ``--device cpu --sizes mid`` runs the same path on the CPU (a dry
run of the code: no MFU). Not a test:

    PYTHONPATH=src .venv/bin/python bench/bench_gpu.py [--steps 8] [--skip 2]
    PYTHONPATH=src .venv/bin/python bench/bench_gpu.py --device cpu --sizes mid --steps 2 --skip 0
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

OUT_DIR = Path(__file__).parent / "out"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--sizes", choices=["paper", "mid"], default="paper")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per measured stage")
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps not timed")
    ap.add_argument("--batch", type=int, default=None, help="global batch (recipe: 128)")
    ap.add_argument("--micro", type=int, default=None, help="micro-batch (recipe: 16)")
    ap.add_argument("--out", default=None, help="default: bench/out/gpu_<device>.json")
    return ap.parse_args(argv)


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def summarise(rows: list[dict[str, float]], batch: int, skip: int) -> dict[str, Any]:
    """Throughput of the steps after ``skip``: their samples and tokens ÷ their seconds."""
    timed = rows[skip:] if len(rows) > skip else rows
    seconds = [batch / r["samples_per_s"] for r in timed]
    tokens = sum(r["tokens_per_s"] * s for r, s in zip(timed, seconds))
    return {
        "steps_timed": len(timed),
        "samples_per_s": batch * len(timed) / sum(seconds),
        "tokens_per_s": tokens / sum(seconds),
        "step_seconds": seconds,
        "losses": [r["loss"] for r in rows],
    }


def run(settings: dict, paths, name: str, cuda: bool) -> tuple[list[dict], dict, int | None]:
    """Train one stage → (its log rows, stage.json, peak GPU bytes or None)."""
    import csv

    import torch

    from vlalign.train.loop import train_stage

    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    result = train_stage(settings, paths, name=name, stage_hash=name, seed=0)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    with open(paths.out / "train_log.csv", newline="") as f:
        rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    return rows, result, peak


def recipe_settings(stage: str, args: argparse.Namespace, n_train: int) -> dict[str, Any]:
    """The paper recipe's resolved ``stage`` for ``args.steps`` steps (no mid-run checkpoints)."""
    from vlalign.config import REPO_ROOT, deep_merge, load_yaml
    from vlalign.runs.plan import resolve_stage

    config = deep_merge({"train": {}}, load_yaml(REPO_ROOT / "config" / "recipes" / "paper.yaml"))
    _, settings = resolve_stage(config, stage)
    settings.update(max_steps=args.steps, checkpoint_every=10**9)
    settings["batch_size"] = args.batch or settings["batch_size"]
    settings["micro_batch_size"] = min(args.micro or settings["micro_batch_size"],
                                       settings["batch_size"])  # fmt: skip
    if settings["batch_size"] * args.steps > n_train:
        raise ValueError(f"--steps {args.steps} x batch {settings['batch_size']} > {n_train} rows")
    return settings


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from paper_size import SIZES, bf16_peak, count_params, machine_info, mfu, save_backbones

    from vlalign.data.sources import save_dataset
    from vlalign.data.tokenizer import corpus_texts
    from vlalign.data.world import generate_world
    from vlalign.models import backbones as bb
    from vlalign.train.features import build_feature_cache
    from vlalign.train.loop import StagePaths

    cuda = args.device == "cuda"
    vision_cfg, lm_cfg = SIZES[args.sizes]
    batch = args.batch or 128
    n_train = batch * args.steps
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak_flops = bf16_peak(gpu) if cuda else None
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        root = Path(tmp)
        world = {"image_size": vision_cfg["image_size"]}
        dsd = generate_world(world, splits={"train": n_train, "val": 8, "test": 8}, seed=0)
        save_dataset(dsd, root / "data")
        vision_dir, lm_dir = save_backbones(root / "hub", list(corpus_texts(dsd)), vision_cfg,
                                            lm_cfg)  # fmt: skip
        n_params = {
            "vision": count_params(bb.load_vision(vision_dir)),
            "lm": count_params(bb.load_lm(lm_dir)),
        }

        def paths(name: str, features: Path | None = None) -> StagePaths:
            return StagePaths(out=root / "stages" / name, checkpoint_dir=root / "ckpt" / name,
                              tokenizer=root / "hub" / "tokenizer_src", vision=vision_dir,
                              lm=lm_dir, data=root / "data", features=features)  # fmt: skip

        report: dict[str, Any] = {"stage2": {}, "stage1": {}}
        for packing in (False, True):
            mode = "packed" if packing else "padded"
            settings = {**recipe_settings("stage2", args, n_train), "packing": packing}
            rows, result, peak_mem = run(settings, paths(f"stage2_{mode}"), f"stage2_{mode}", cuda)
            s = summarise(rows, settings["batch_size"], args.skip)
            s.update(
                peak_memory_gib=peak_mem / 2**30 if peak_mem is not None else None,
                precision=result["mixed_precision"],
                image_tokens=result["image_tokens"],
                trainable_params=result["trainable_params"],
                settings=settings,
            )
            report["stage2"][mode] = s
            print(f"stage2 {mode}: {s['samples_per_s']:.2f} samples/s, "
                  f"{s['tokens_per_s']:.0f} tokens/s", flush=True)  # fmt: skip
        # N: every parameter of the VLM (stage2 trains all of them: its trainable count)
        n_all = report["stage2"]["padded"]["trainable_params"]
        for s in report["stage2"].values():
            s["mfu"] = mfu(n_all, s["tokens_per_s"], peak_flops)
        fc = {"batch_size": 256, "dtype": "float16"}  # the recipe's features: section
        t0 = time.perf_counter()
        build_feature_cache(vision_dir, root / "data", root / "features", fc["batch_size"],
                            fc["dtype"])  # fmt: skip
        cache_s = time.perf_counter() - t0
        for mode, features in (("images", None), ("cached", root / "features")):
            settings = recipe_settings("stage1", args, n_train)
            rows, result, peak_mem = run(settings, paths(f"stage1_{mode}", features),
                                         f"stage1_{mode}", cuda)  # fmt: skip
            s = summarise(rows, settings["batch_size"], args.skip)
            s.update(peak_memory_gib=peak_mem / 2**30 if peak_mem is not None else None,
                     feature_cache=result["feature_cache"])  # fmt: skip
            report["stage1"][mode] = s
            print(f"stage1 {mode}: {s['samples_per_s']:.2f} samples/s", flush=True)
        report["stage1"]["cache_build_seconds"] = cache_s
        report["stage1"]["speedup_cached"] = (
            report["stage1"]["cached"]["samples_per_s"]
            / report["stage1"]["images"]["samples_per_s"]
        )
    return {
        "benchmark": "gpu",
        "device": gpu,
        "sizes": args.sizes,
        "model": {"vision": vision_cfg, "lm": lm_cfg, "params": n_params, "params_total": n_all,
                  "init": "random (configs only, no download)"},  # fmt: skip
        "bf16_peak_flops": peak_flops,
        "mfu_note": (
            "6·N·tokens/s ÷ dense bf16 peak; N = every VLM parameter, tokens = image + text "
            "tokens; the recompute of gradient checkpointing is not counted"
            if peak_flops
            else f"MFU not reported: no bf16 peak known for device {gpu!r}"
        ),
        "mfu_target_packed_stage2": 0.40,
        **report,
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "bench_gpu: no CUDA device visible (torch.cuda.is_available() is False): nothing "
            "measured; --device cpu --sizes mid runs the code path on the CPU"
        )
        return 0
    import logging

    logging.basicConfig(level=logging.WARNING)
    report = measure(args)
    out = Path(args.out) if args.out else OUT_DIR / f"gpu_{device_slug(report['device'])}.json"
    from vlalign.io_utils import write_json_atomic

    write_json_atomic(out, report)
    packed = report["stage2"]["packed"]
    print(f"{report['device']}: packed stage2 MFU {packed['mfu']} "
          f"(target {report['mfu_target_packed_stage2']}); wrote {out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
