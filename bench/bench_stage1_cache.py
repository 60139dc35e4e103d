"""Benchmark: stage1 training throughput reading the frozen-feature cache vs. reading images.

Default mode: the embedded default's sizes (config/config.yaml: SigLIP 64 px / patch 8, hidden
128, 2 layers; Qwen2 hidden 128, 2 layers) on a synthetic world of 256 training images, with
stage1's resolved settings (``vlalign.runs.plan.resolve_stage``). Both paths run the real
``train_stage`` on the same data and machine, alternating, ``--repeats`` times each; samples/s
and tokens/s come from its ``train_log.csv`` (median over steps after ``--skip`` warm-up steps,
and total samples / total step time). The cache's one-off build time and the number of epochs
after which it pays for itself are reported too. Backbones: ``results/backbones/*`` and
``results/tokenizer`` when they exist (``--backbones auto``), else built from the config with
random weights (throughput does not depend on them). Writes ``bench/out/stage1_cache.json``.

``--paper-size``: SigLIP so400m-224 + Qwen2.5-0.5B built from their configs (random init, no
download), the paper recipe's stage2 settings (everything trainable, global batch 128, micro 16,
gradient checkpointing) in bf16 autocast on a GPU: samples/s, tokens/s, peak memory and MFU
(6·N·tokens/s ÷ the GPU's dense bf16 peak). Exits with a message when there is no GPU. Writes
``bench/out/stage2_paper.json``. Not a test:

    .venv/bin/python bench/bench_stage1_cache.py [--steps 16] [--repeats 2] [--threads 1]
    .venv/bin/python bench/bench_stage1_cache.py --paper-size [--steps 6] [--micro 16]
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from vlalign.config import REPO_ROOT, deep_merge, load_config, load_yaml
from vlalign.data.sources import save_dataset
from vlalign.data.tokenizer import corpus_texts, load_tokenizer, save_tokenizer, train_tokenizer
from vlalign.data.world import generate_world
from vlalign.io_utils import write_json_atomic
from vlalign.models import backbones as bb
from vlalign.runs.plan import resolve_stage
from vlalign.train.features import build_feature_cache
from vlalign.train.loop import StagePaths, train_stage
from vlalign.train.optim import MODULES

sys.path.insert(0, str(Path(__file__).resolve().parent))
# the paper-size configs, the bf16 peaks and the machine description have one home
from paper_size import PAPER_LM, PAPER_VISION, bf16_peak, machine_info  # noqa: E402

OUT_DIR = Path(__file__).parent / "out"

# ------------------------------------------------------------------------------ inputs
def build_world(root: Path, world_cfg: dict, n_train: int, seed: int) -> Path:
    dsd = generate_world(world_cfg, splits={"train": n_train, "val": 16, "test": 16}, seed=seed)
    save_dataset(dsd, root / "data")
    return root / "data"


def default_backbones(
    root: Path, config: dict, data: Path, choice: str
) -> tuple[Path, Path, Path, str]:
    """(tokenizer, vision, lm, where they came from): a results dir's, or built here."""
    if choice != "build":
        results = REPO_ROOT / config["results_dir"] if choice == "auto" else Path(choice)
        found = (
            results / "tokenizer",
            results / "backbones" / "vision",
            results / "backbones" / "lm",
        )
        if all((p / n).exists() for p, n in zip(found, ("tokenizer.json", *["config.json"] * 2))):
            return (*found, f"pre-trained ({results})")
        if choice != "auto":
            raise FileNotFoundError(f"{results}: no tokenizer/ and backbones/{{vision,lm}}/")
    from datasets import load_from_disk

    tok = train_tokenizer(
        corpus_texts(load_from_disk(str(data))), config["tokenizer"]["vocab_size"]
    )
    save_tokenizer(tok, root / "tokenizer")
    torch.manual_seed(0)
    vision = bb.build_tiny_vision(config["vision"]["config"])
    processor = bb.make_image_processor(vision.config.image_size)
    bb.save_backbone(vision, root / "vision", {"pretrained_here": False}, extra=[processor])
    lm = bb.build_tiny_lm(config["lm"]["config"], tok)
    bb.save_backbone(lm, root / "lm", {"pretrained_here": False}, extra=[tok])
    return root / "tokenizer", root / "vision", root / "lm", "built from config, random weights"


# ------------------------------------------------------------------------------ measuring
def summarise(rows: list[dict[str, float]], skip: int) -> dict[str, Any]:
    """Throughput of the steps after ``skip`` warm-up steps."""
    timed = rows[skip:] if len(rows) > skip else rows
    seconds = [r["samples"] / r["samples_per_s"] for r in timed]
    tokens = [r["tokens_per_s"] * s for r, s in zip(timed, seconds)]
    return {
        "steps_timed": len(timed),
        "samples_per_s": sum(r["samples"] for r in timed) / sum(seconds),
        "tokens_per_s": sum(tokens) / sum(seconds),
        "samples_per_s_median": statistics.median(r["samples_per_s"] for r in timed),
        "tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in timed),
        "step_seconds_median": statistics.median(seconds),
        "tokens_per_sample": sum(tokens) / sum(r["samples"] for r in timed),
    }


def run_stage(settings: dict, paths: StagePaths, name: str) -> tuple[list[dict], dict, float]:
    """Train; → (log rows with ``samples`` added, stage.json dict, wall seconds incl. load/save)."""
    t0 = time.perf_counter()
    result = train_stage(settings, paths, name=name, stage_hash=name, seed=0)
    wall = time.perf_counter() - t0
    with open(paths.out / "train_log.csv", newline="") as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    n, batch = result["train_samples"], settings["batch_size"]
    per_epoch = math.ceil(n / batch)
    for i, r in enumerate(rows):  # the last batch of an epoch may be short
        r["samples"] = min(batch, n - (i % per_epoch) * batch)
    return rows, result, wall


def bench_cache(args: argparse.Namespace) -> dict[str, Any]:
    config = load_config(REPO_ROOT / "config" / "config.yaml")
    _, settings = resolve_stage(config, "stage1")
    settings = {**settings, "max_steps": args.steps, "checkpoint_every": 10**9}
    with tempfile.TemporaryDirectory(prefix="bench_stage1_") as tmp:
        root = Path(tmp)
        data = build_world(root, config["world"], args.train_images, config["seed"])
        tokenizer, vision, lm, origin = default_backbones(root, config, data, args.backbones)
        print(f"backbones: {origin}")
        t0 = time.perf_counter()
        fc = config["features"]
        index = build_feature_cache(vision, data, root / "features", fc["batch_size"], fc["dtype"])
        cache_s = time.perf_counter() - t0
        cache_bytes = sum(f.stat().st_size for f in (root / "features").iterdir())
        runs: dict[str, list[dict]] = {"images": [], "features": []}
        first_loss: dict[str, float] = {}
        for rep in range(args.repeats):
            for mode in ("images", "features"):
                name = f"{mode}{rep}"
                paths = StagePaths(
                    out=root / "stages" / name,
                    checkpoint_dir=root / "ckpt" / name,
                    tokenizer=tokenizer,
                    vision=vision,
                    lm=lm,
                    data=data,
                    features=root / "features" if mode == "features" else None,
                )
                rows, result, wall = run_stage(settings, paths, name)
                first_loss.setdefault(mode, rows[0]["loss"])
                summary = summarise(rows, args.skip)
                summary["stage_wall_seconds"] = wall
                runs[mode].append(summary)
                print(
                    f"{mode:>8} #{rep}: {summary['samples_per_s']:7.1f} samples/s "
                    f"{summary['tokens_per_s']:9.0f} tokens/s  (stage wall {wall:.1f} s)"
                )
        n_train = index["splits"]["train"]["n"]
    best = {m: max(runs[m], key=lambda s: s["samples_per_s"]) for m in runs}
    med = {m: statistics.median(s["samples_per_s"] for s in runs[m]) for m in runs}
    epoch_s = {m: n_train / med[m] for m in runs}
    saved = epoch_s["images"] - epoch_s["features"]
    return {
        "benchmark": "stage1_cache",
        "question": "stage1 throughput reading the frozen-feature cache vs. images + encoder",
        "backbones": origin,
        "model": {
            "vision": config["vision"].get("config"),
            "lm": config["lm"].get("config"),
            "projector": config["model"]["projector"],
        },
        "stage": "stage1",
        "settings": settings,
        "train_images": n_train,
        "cache": {
            "build_seconds": cache_s,
            "bytes": cache_bytes,
            "train_shape": index["splits"]["train"]["shape"],
            "dtype": config["features"]["dtype"],
        },
        "runs": runs,
        "samples_per_s_median": med,
        "best": best,
        "speedup_samples_per_s": med["features"] / med["images"],
        # each repeat runs both paths back to back: the paired ratio is less exposed to load
        "speedup_per_repeat": [
            f["samples_per_s"] / i["samples_per_s"]
            for i, f in zip(runs["images"], runs["features"])
        ],
        "epoch_seconds": epoch_s,
        # the cache is built once per (encoder, dataset) and shared by stage0, stage1 and every
        # run that freezes the same encoder on the same data
        "break_even_epochs": cache_s / saved if saved > 0 else None,
        "first_step_loss": first_loss,
        "repeats": args.repeats,
        "skip_warmup_steps": args.skip,
        "machine": machine_info(),
    }


# ------------------------------------------------------------------------------ paper size
def paper_models(root: Path, tok, vision_cfg: dict, lm_cfg: dict, device: str) -> tuple[Path, Path]:
    """SigLIP + Qwen2 from configs, random init (on the GPU: fast), saved as HF dirs."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        vision = bb.build_tiny_vision(vision_cfg)
        lm = Qwen2ForCausalLM(
            Qwen2Config(
                **lm_cfg,
                pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id,
            )
        )
    processor = bb.make_image_processor(vision_cfg["image_size"])
    bb.save_backbone(vision, root / "vision", {"pretrained_here": False}, extra=[processor])
    bb.save_backbone(lm, root / "lm", {"pretrained_here": False}, extra=[tok])
    del vision, lm
    if device == "cuda":
        torch.cuda.empty_cache()
    return root / "vision", root / "lm"


def paper_stage2_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The paper recipe's stage2, as the pipeline resolves it, for ``args.steps`` steps."""
    config = deep_merge({"train": {}}, load_yaml(REPO_ROOT / "config" / "recipes" / "paper.yaml"))
    _, settings = resolve_stage(config, "stage2")
    settings.update(max_steps=args.steps, checkpoint_every=10**9)
    settings["batch_size"] = args.batch or settings["batch_size"]
    settings["micro_batch_size"] = args.micro or settings["micro_batch_size"]
    if args.no_gradient_checkpointing:
        settings["gradient_checkpointing"] = False
    return settings


def measure_stage2(
    settings: dict, vision_cfg: dict, lm_cfg: dict, skip: int, device: str = "cuda"
) -> dict[str, Any]:
    """Train stage2 (everything trainable) on the world; throughput, memory, MFU."""
    cuda = device == "cuda"
    with tempfile.TemporaryDirectory(prefix="bench_stage2_") as tmp:
        root = Path(tmp)
        world = {"image_size": vision_cfg["image_size"]}
        data = build_world(root, world, settings["batch_size"] * settings["max_steps"], seed=0)
        from datasets import load_from_disk

        tok = train_tokenizer(corpus_texts(load_from_disk(str(data))), 1024)
        save_tokenizer(tok, root / "tokenizer")
        tok = load_tokenizer(root / "tokenizer")
        vision, lm = paper_models(root, tok, vision_cfg, lm_cfg, device)
        paths = StagePaths(
            out=root / "stages" / "stage2",
            checkpoint_dir=root / "ckpt",
            tokenizer=root / "tokenizer",
            vision=vision,
            lm=lm,
            data=data,
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        rows, result, wall = run_stage(settings, paths, "stage2-paper-size")
        peak_mem = torch.cuda.max_memory_allocated() if cuda else None
        from vlalign.models.vlm import VisionLanguageModel

        model = VisionLanguageModel.from_pretrained(paths.out / "model")
        n = {k: sum(p.numel() for p in getattr(model, k).parameters()) for k in MODULES}
    summary = summarise(rows, skip)
    total = sum(n.values())
    gpu = torch.cuda.get_device_name(0) if cuda else None
    peak = bf16_peak(gpu) if gpu else None
    img_tokens = result["image_tokens"]
    # 6·N per token (forward + backward); per module: the encoder sees only the image tokens
    flops_6n = 6 * total * summary["tokens_per_s"]
    flops_mod = (
        6
        * summary["samples_per_s"]
        * (n["vision"] * img_tokens + (n["projector"] + n["lm"]) * summary["tokens_per_sample"])
    )
    return {
        "benchmark": "stage2_paper_size",
        "model": {
            "vision": vision_cfg,
            "lm": lm_cfg,
            "params": n,
            "params_total": total,
            "image_tokens": img_tokens,
            "init": "random (configs only, no download)",
        },
        "settings": settings,
        "precision": result["mixed_precision"],
        "first_loss": rows[0]["loss"],
        "last_loss": rows[-1]["loss"],
        **summary,
        "stage_wall_seconds": wall,
        "peak_memory_gib": peak_mem / 2**30 if peak_mem is not None else None,
        "bf16_peak_flops": peak,
        "mfu_6N": flops_6n / peak if peak else None,
        "mfu_per_module": flops_mod / peak if peak else None,
        "mfu_note": "6·N·tokens/s ÷ dense bf16 peak (N = all parameters, tokens = image + "
        "text tokens through the LM); per_module counts the encoder on image tokens only; "
        "gradient checkpointing's recompute is not counted, as usual for MFU",
        "machine": machine_info(),
    }


def bench_paper(args: argparse.Namespace) -> dict[str, Any] | None:
    if not torch.cuda.is_available():
        print(
            "--paper-size needs a CUDA GPU (bf16 stage2 of a 0.9 B-parameter model); "
            "none is visible: nothing measured.",
            file=sys.stderr,
        )
        return None
    return measure_stage2(paper_stage2_settings(args), PAPER_VISION, PAPER_LM, args.skip)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per run (default: 16 = one epoch; paper size: 6)",
    )
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps not timed")
    ap.add_argument("--train-images", type=int, default=256)
    ap.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads; 1 is steadier on a busy machine"
    )
    ap.add_argument(
        "--backbones",
        default="auto",
        help="auto (results/ if built, else build) | build | <results dir>",
    )
    ap.add_argument("--paper-size", action="store_true")
    ap.add_argument("--batch", type=int, default=None, help="paper size: global batch")
    ap.add_argument("--micro", type=int, default=None, help="paper size: micro-batch")
    ap.add_argument("--no-gradient-checkpointing", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.paper_size:
        args.steps = args.steps or 6
        report = bench_paper(args)
        if report is None:
            return 0
        out = args.out or OUT_DIR / "stage2_paper.json"
        print(
            f"stage2 paper size on {report['machine'].get('gpu')}: "
            f"{report['samples_per_s']:.1f} samples/s, {report['tokens_per_s']:.0f} tokens/s, "
            f"peak {report['peak_memory_gib']:.1f} GiB, MFU {report['mfu_6N']}"
        )
    else:
        args.steps = args.steps or 16
        report = bench_cache(args)
        out = args.out or OUT_DIR / "stage1_cache.json"
        print(
            f"feature cache x{report['speedup_samples_per_s']:.2f} samples/s "
            f"(cache built in {report['cache']['build_seconds']:.1f} s, "
            f"break-even after {report['break_even_epochs']} epochs)"
        )
    write_json_atomic(out, report)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
