"""GPU benchmark, one command (issue 17 item 6): the paper-size model on a lent GPU.

Builds SigLIP so400m-patch14-224 + Qwen2.5-0.5B from their configs (random init, no download;
``bench/paper_size.py``) and a synthetic-world dataset with recaptions, then runs the real
``train_stage`` with the paper recipe's resolved settings (``config/recipes/paper.yaml``, bf16
autocast on the GPU, gradient checkpointing, micro-batch 16) for a few steps each:

- stage2 (everything trainable) with padded rows, then packed rows (``train.packing``,
  :mod:`vlalign.models.packing`), for each settings variant (:data:`VARIANTS`: the recipe as
  written, and without gradient checkpointing at micro-batch 32): samples/s, tokens/s, peak
  memory (``torch.cuda.max_memory_allocated``), the share of step time spent waiting for
  batches, and MFU = 6·N·tokens/s ÷ the device's dense bf16 peak (N = all parameters; the
  table in ``paper_size.BF16_PEAK``; a device not in it gets no MFU, and the report says so).
  Target: ≥ 40 % MFU for packed stage2.
- stage1 (projector only) reading the frozen-feature cache vs. reading images through the
  encoder: samples/s of each, and the cache's build time.

Throughput is the total over the steps after ``--skip`` warm-up steps (samples and
tokens of those steps ÷ their seconds, from ``train_log.csv``). Writes
``bench/out/gpu_<device>.json`` (the device name in the file name), rewritten after each
stage so that a run cut short keeps what it measured. Without a CUDA device it
prints one line and exits 0; ``--device cpu --sizes mid`` runs the same path on the CPU (a dry
run of the code: no MFU). Not a test:

    PYTHONPATH=src .venv/bin/python bench/bench_gpu.py [--steps 8] [--skip 2]
    PYTHONPATH=src .venv/bin/python bench/bench_gpu.py --device cpu --sizes mid --steps 2 --skip 0
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

OUT_DIR = Path(__file__).parent / "out"
# stage2 settings measured side by side: the paper recipe as written, and the same stage with
# the memory savers a 139 GiB / 80 GiB GPU does not need for a 0.9 B model (gradient
# checkpointing recomputes every layer's forward: about a third more compute per step)
VARIANTS: dict[str, dict[str, Any]] = {
    "recipe": {},
    "no_checkpointing_micro32": {"gradient_checkpointing": False, "micro_batch_size": 32},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--sizes", choices=["paper", "mid"], default="paper")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per measured stage")
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps not timed")
    ap.add_argument("--batch", type=int, default=None, help="global batch (recipe: 128)")
    ap.add_argument("--micro", type=int, default=None, help="micro-batch (recipe: 16)")
    ap.add_argument(
        "--variant",
        action="append",
        choices=sorted(VARIANTS),
        help="stage2 settings to measure, padded and packed (repeatable; default: all)",
    )
    ap.add_argument("--out", default=None, help="default: bench/out/gpu_<device>.json")
    return ap.parse_args(argv)


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def summarise(
    rows: list[dict[str, float]], batch: int, skip: int, waits: list[float] | None = None
) -> dict[str, Any]:
    """Throughput of the steps after ``skip``: their samples and tokens ÷ their seconds; with
    ``waits`` (seconds per step spent waiting for batches), the share of those steps' time."""
    first = skip if len(rows) > skip else 0
    timed = rows[first:]
    seconds = [batch / r["samples_per_s"] for r in timed]
    tokens = sum(r["tokens_per_s"] * s for r, s in zip(timed, seconds))
    return {
        "steps_timed": len(timed),
        "samples_per_s": batch * len(timed) / sum(seconds),
        "tokens_per_s": tokens / sum(seconds),
        "step_seconds": seconds,
        "losses": [r["loss"] for r in rows],
        "data_wait_seconds": waits,
        "data_wait_fraction": sum(waits[first:]) / sum(seconds) if waits else None,
    }


class DataWait:
    """Seconds each optimizer step waited for its batches (``StepBatches.get``: the loader's
    workers, or this process with none), recorded around the trainer's own call."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def __enter__(self) -> DataWait:
        from vlalign.train.loader import StepBatches

        self._get = StepBatches.get
        wait = self

        def timed_get(batches, step):
            t0 = time.perf_counter()
            try:
                return wait._get(batches, step)
            finally:
                wait.seconds.append(time.perf_counter() - t0)

        StepBatches.get = timed_get
        return self

    def __exit__(self, *exc) -> None:
        from vlalign.train.loader import StepBatches

        StepBatches.get = self._get


def run(settings: dict, paths, name: str, cuda: bool) -> tuple[list[dict], dict, dict]:
    """Train one stage → (its log rows, stage.json, {peak GPU bytes or None, data waits})."""
    import csv

    import torch

    from vlalign.train.loop import train_stage

    if cuda:
        gc.collect()  # a failed variant's session (out of memory) holds GPU memory until then
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with DataWait() as wait:
        result = train_stage(settings, paths, name=name, stage_hash=name, seed=0)
    peak = torch.cuda.max_memory_allocated() if cuda else None
    with open(paths.out / "train_log.csv", newline="") as f:
        rows = [{k: float(v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
    return rows, result, {"peak": peak, "data_wait": wait.seconds}


def recipe_settings(
    stage: str, args: argparse.Namespace, n_train: int, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The paper recipe's resolved ``stage`` for ``args.steps`` steps (no mid-run checkpoints),
    with ``overrides`` (a :data:`VARIANTS` entry) on top of ``--batch`` / ``--micro``."""
    from vlalign.config import REPO_ROOT, deep_merge, load_yaml
    from vlalign.runs.plan import resolve_stage

    config = deep_merge({"train": {}}, load_yaml(REPO_ROOT / "config" / "recipes" / "paper.yaml"))
    _, settings = resolve_stage(config, stage)
    settings.update(max_steps=args.steps, checkpoint_every=10**9)
    settings["batch_size"] = args.batch or settings["batch_size"]
    settings["micro_batch_size"] = args.micro or settings["micro_batch_size"]
    settings.update(overrides or {})
    settings["micro_batch_size"] = min(settings["micro_batch_size"], settings["batch_size"])
    if settings["batch_size"] * args.steps > n_train:
        raise ValueError(f"--steps {args.steps} x batch {settings['batch_size']} > {n_train} rows")
    return settings


def stage_summary(rows, result, measured, settings, skip: int) -> dict[str, Any]:
    s = summarise(rows, settings["batch_size"], skip, measured["data_wait"])
    peak = measured["peak"]
    s.update(
        peak_memory_gib=peak / 2**30 if peak is not None else None,
        precision=result["mixed_precision"],
        image_tokens=result["image_tokens"],
        trainable_params=result["trainable_params"],
        settings=settings,
    )
    return s


def measure(args: argparse.Namespace, out: Path | None = None) -> dict[str, Any]:
    """Run the stages; the report so far is rewritten to ``out`` after each one (a run cut
    short keeps what it measured)."""
    import torch
    from paper_size import SIZES, bf16_peak, count_params, machine_info, mfu, save_backbones

    from vlalign.data.sources import save_dataset
    from vlalign.data.tokenizer import corpus_texts
    from vlalign.data.world import generate_world
    from vlalign.io_utils import write_json_atomic
    from vlalign.models import backbones as bb
    from vlalign.train.features import build_feature_cache
    from vlalign.train.loop import StagePaths

    cuda = args.device == "cuda"
    vision_cfg, lm_cfg = SIZES[args.sizes]
    batch = args.batch or 128
    n_train = batch * args.steps
    gpu = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak_flops = bf16_peak(gpu) if cuda else None
    variants = args.variant or list(VARIANTS)
    report: dict[str, Any] = {
        "benchmark": "gpu",
        "device": gpu,
        "sizes": args.sizes,
        "bf16_peak_flops": peak_flops,
        "mfu_note": (
            "6·N·tokens/s ÷ dense bf16 peak; N = every VLM parameter, tokens = image + text "
            "tokens; the recompute of gradient checkpointing is not counted"
            if peak_flops
            else f"MFU not reported: no bf16 peak known for device {gpu!r}"
        ),
        "mfu_target_packed_stage2": 0.40,
        "variants": {v: VARIANTS[v] for v in variants},
        "stage2": {},
        "stage1": {},
        "machine": machine_info(),
    }

    def save() -> None:
        if out is not None:
            write_json_atomic(out, report)

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
        report["model"] = {"vision": vision_cfg, "lm": lm_cfg, "params": n_params,
                           "init": "random (configs only, no download)"}  # fmt: skip

        def paths(name: str, features: Path | None = None) -> StagePaths:
            return StagePaths(out=root / "stages" / name, checkpoint_dir=root / "ckpt" / name,
                              tokenizer=root / "hub" / "tokenizer_src", vision=vision_dir,
                              lm=lm_dir, data=root / "data", features=features)  # fmt: skip

        for variant in variants:
            report["stage2"][variant] = {}
            for packing in (False, True):
                mode = "packed" if packing else "padded"
                name = f"stage2_{variant}_{mode}"
                settings = recipe_settings("stage2", args, n_train,
                                           {**VARIANTS[variant], "packing": packing})  # fmt: skip
                try:
                    rows, result, measured = run(settings, paths(name), name, cuda)
                except torch.OutOfMemoryError as e:  # the other variants still run
                    report["stage2"][variant][mode] = {"error": f"out of memory: {e}"[:500]}
                    print(f"stage2 {variant} {mode}: out of memory", flush=True)
                    save()
                    continue
                s = stage_summary(rows, result, measured, settings, args.skip)
                # N: every parameter of the VLM (stage2 trains all of them)
                s["mfu"] = mfu(s["trainable_params"], s["tokens_per_s"], peak_flops)
                report["stage2"][variant][mode] = s
                report["model"]["params_total"] = s["trainable_params"]
                print(f"stage2 {variant} {mode}: {s['samples_per_s']:.2f} samples/s, "
                      f"{s['tokens_per_s']:.0f} tokens/s, MFU {s['mfu']}, peak "
                      f"{s['peak_memory_gib']} GiB, data wait {s['data_wait_fraction']}",
                      flush=True)  # fmt: skip
                save()
        fc = {"batch_size": 256, "dtype": "float16"}  # the recipe's features: section
        t0 = time.perf_counter()
        build_feature_cache(vision_dir, root / "data", root / "features", fc["batch_size"],
                            fc["dtype"])  # fmt: skip
        report["stage1"]["cache_build_seconds"] = time.perf_counter() - t0
        for mode, features in (("images", None), ("cached", root / "features")):
            settings = recipe_settings("stage1", args, n_train)
            rows, result, measured = run(settings, paths(f"stage1_{mode}", features),
                                         f"stage1_{mode}", cuda)  # fmt: skip
            s = stage_summary(rows, result, measured, settings, args.skip)
            s["feature_cache"] = result["feature_cache"]
            report["stage1"][mode] = s
            print(f"stage1 {mode}: {s['samples_per_s']:.2f} samples/s", flush=True)
            save()
        report["stage1"]["speedup_cached"] = (
            report["stage1"]["cached"]["samples_per_s"]
            / report["stage1"]["images"]["samples_per_s"]
        )
    save()
    return report


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
    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    out = Path(args.out) if args.out else OUT_DIR / f"gpu_{device_slug(gpu)}.json"
    report = measure(args, out)
    for variant, modes in report["stage2"].items():
        mfu = modes.get("packed", {}).get("mfu")
        print(f"{report['device']}: stage2 {variant}: packed MFU {mfu} "
              f"(target {report['mfu_target_packed_stage2']})")  # fmt: skip
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
