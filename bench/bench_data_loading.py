"""Benchmark: data loading off the main process (``train.num_workers``) and padding-free packing
(``train.packing``), each side by side in one run.

1. Loading: samples/s of an image-reading stage (stage2 of the embedded default: pixel values
   through the image processor, no feature cache) with 0 and ``--workers`` DataLoader workers:
   the batches alone (``vlalign.train.loader.StepBatches``, every step's micro-batches) and the
   real ``train_stage`` (``train_log.csv``'s samples/s, median after ``--skip`` steps).
2. Packing: stage3's micro-batches (the default config's conversations, its mask and
   max_length) and a long-tailed length distribution (log-normal text lengths, truncated to
   max_length): padding fraction padded vs packed, and tokens/s (real image + text tokens) of
   the VLM's forward + backward with and without packing, alternating, median of
   ``--repeats``.

Model: the embedded default's sizes (config/config.yaml), random weights (throughput does not
depend on them). Writes ``bench/out/data_loading.json``. Not a test:

    .venv/bin/python bench/bench_data_loading.py [--workers 2] [--steps 12] [--threads 1]
"""

from __future__ import annotations

import argparse
import csv
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from bench_stage1_cache import build_world, default_backbones, machine_info

from vlalign.config import REPO_ROOT, load_config
from vlalign.data.text_formats import TextFormat
from vlalign.data.tokenizer import load_tokenizer, vlm_token_ids
from vlalign.io_utils import write_json_atomic
from vlalign.models.backbones import load_image_processor
from vlalign.models.packing import pack_layout
from vlalign.models.vlm import VisionLanguageModel
from vlalign.runs.plan import resolve_stage
from vlalign.train.data import StageExamples, collate
from vlalign.train.loader import StepBatches, granted_cpus
from vlalign.train.loop import StagePaths, epoch_order, train_stage

OUT_DIR = Path(__file__).parent / "out"


# ------------------------------------------------------------------------------ loading
def examples(data: Path, tok, processor, settings: dict, split: str = "train") -> StageExamples:
    from datasets import load_from_disk

    return StageExamples(
        load_from_disk(str(data))[split],
        tok,
        settings["text"],
        settings["max_length"],
        processor=processor,
        text_format=TextFormat.from_settings(settings),
    )


def loader_rate(ex: StageExamples, settings: dict, steps: int, workers: int) -> dict[str, Any]:
    """Samples/s of building ``steps`` steps' batches (images through the processor)."""
    gb, micro = settings["batch_size"], settings["micro_batch_size"]
    per_epoch = -(-len(ex) // gb)

    def rows(step: int) -> tuple[list[int], int]:
        epoch, pos = divmod(step, per_epoch)
        order = epoch_order(0, epoch, list(range(len(ex))))
        return order[pos * gb : (pos + 1) * gb], epoch

    batches = StepBatches(ex, rows, steps + 1, micro, ex.tok.pad_token_id, workers)
    try:
        batches.get(0)  # workers started, first step built (not timed)
        t0 = time.perf_counter()
        n = sum(batches.get(s).n_global for s in range(1, steps + 1))
        dt = time.perf_counter() - t0
    finally:
        batches.close()
    return {"workers": workers, "steps": steps, "samples": n, "samples_per_s": n / dt}


def stage_rate(settings: dict, paths: StagePaths, skip: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    train_stage(settings, paths, name=paths.out.name, stage_hash=paths.out.name, seed=0)
    wall = time.perf_counter() - t0
    with open(paths.out / "train_log.csv", newline="") as f:
        rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]
    timed = rows[skip:] or rows
    return {
        "workers": settings["num_workers"],
        "samples_per_s_median": statistics.median(r["samples_per_s"] for r in timed),
        "loss_last": rows[-1]["loss"],
        "stage_wall_seconds": wall,
    }


# ------------------------------------------------------------------------------ packing
def micro_batches(ex: StageExamples, micro: int, n: int) -> list[dict[str, torch.Tensor]]:
    order = epoch_order(0, 0, list(range(len(ex))))[: micro * n]
    pad = ex.tok.pad_token_id
    chunks = [order[j : j + micro] for j in range(0, len(order), micro)]
    return [collate([ex[i] for i in chunk], pad) for chunk in chunks]


def long_tailed(batches: list[dict], max_length: int, vocab: int, seed: int = 0) -> list[dict]:
    """The same images with log-normal text lengths (median 24, a long tail up to
    max_length) of random tokens."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in batches:
        s = len(b["input_ids"])
        lengths = (torch.randn(s, generator=g) * 1.0 + torch.log(torch.tensor(24.0))).exp()
        lengths = lengths.round().clamp(4, max_length).long()
        width = int(lengths.max())
        ids = torch.randint(4, vocab, (s, width), generator=g)
        mask = (torch.arange(width)[None] < lengths[:, None]).long()
        key = "pixel_values" if "pixel_values" in b else "image_features"
        out.append({
            "input_ids": ids, "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100), key: b[key],
        })  # fmt: skip
    return out


def step_seconds(model, batch: dict, packing: bool | int, mode: str) -> float:
    t0 = time.perf_counter()
    out = model(**batch, packing=packing, mask_mode=mode)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def packing_case(model, batches: list[dict], settings: dict, repeats: int) -> dict[str, Any]:
    n_img = model.embed_images(
        **{k: v[:1] for k, v in batches[0].items() if k in ("pixel_values", "image_features")}
    ).shape[1]
    capacity = n_img + settings["max_length"]
    real = padded = packed = 0
    for b in batches:
        full = torch.cat([torch.ones(len(b["input_ids"]), n_img, dtype=torch.long),
                          b["attention_mask"]], 1)  # fmt: skip
        layout = pack_layout(full, n_img, max(capacity, full.shape[1]))
        real += int(full.sum())
        padded += full.numel()
        packed += layout.index.numel()
    mode = settings["mask"]
    times: dict[str, list[float]] = {"padded": [], "packed": []}
    step_seconds(model, batches[0], False, mode)  # warm-up
    step_seconds(model, batches[0], settings["max_length"], mode)
    for _ in range(repeats):
        for name, packing in (("padded", False), ("packed", settings["max_length"])):
            times[name].append(sum(step_seconds(model, b, packing, mode) for b in batches))
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "micro_batches": len(batches),
        "samples": sum(len(b["input_ids"]) for b in batches),
        "image_tokens": n_img,
        "real_tokens": real,
        "padding_fraction": {"padded": 1 - real / padded, "packed": 1 - real / packed},
        "positions": {"padded": padded, "packed": packed},
        "tokens_per_s": {k: real / v for k, v in med.items()},
        "speedup_tokens_per_s": med["padded"] / med["packed"],
        "seconds": times,
    }


# ------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=None, help="default: granted CPUs - 1, >= 1")
    ap.add_argument("--steps", type=int, default=12, help="steps per loading measurement")
    ap.add_argument("--skip", type=int, default=2, help="warm-up steps of train_stage not timed")
    ap.add_argument("--train-images", type=int, default=256)
    ap.add_argument("--micro-batches", type=int, default=6, help="packing: micro-batches timed")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backbones", default="build", help="build | auto | <results dir>")
    ap.add_argument("--out", default=str(OUT_DIR / "data_loading.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    workers = args.workers or max(1, granted_cpus() - 1)

    config = load_config(REPO_ROOT / "config" / "config.yaml")
    _, s2 = resolve_stage(config, "stage2")  # reads images: the vision encoder trains
    _, s3 = resolve_stage(config, "stage3")
    report: dict[str, Any] = {"benchmark": "data_loading", "workers": workers}
    with tempfile.TemporaryDirectory(prefix="bench_loading_") as tmp:
        root = Path(tmp)
        data = build_world(root, config["world"], args.train_images, config["seed"])
        tok_dir, vision, lm, origin = default_backbones(root, config, data, args.backbones)
        report["backbones"] = origin
        tok = load_tokenizer(tok_dir)
        processor = load_image_processor(vision)

        ex = examples(data, tok, processor, s2)
        loading = [loader_rate(ex, s2, args.steps, w) for w in (0, workers)]
        stage = []
        for w in (0, workers):
            settings = {**s2, "max_steps": args.steps, "checkpoint_every": 10**9, "num_workers": w}
            paths = StagePaths(root / "stages" / f"w{w}", root / "ckpt" / f"w{w}", tok_dir,
                               vision, lm, data)  # fmt: skip
            stage.append(stage_rate(settings, paths, args.skip))
        report["loading"] = {
            "stage": "stage2",
            "settings": s2,
            "batches_only": loading,
            "batches_only_ratio": loading[1]["samples_per_s"] / loading[0]["samples_per_s"],
            "train_stage": stage,
            "train_stage_ratio": stage[1]["samples_per_s_median"]
            / stage[0]["samples_per_s_median"],
        }
        for r in loading:
            print(f"batches, {r['workers']} workers: {r['samples_per_s']:8.1f} samples/s")
        for r in stage:
            print(f"stage2,  {r['workers']} workers: {r['samples_per_s_median']:8.1f} samples/s")

        specials = vlm_token_ids(tok)
        torch.manual_seed(0)
        model = VisionLanguageModel.from_parts(
            vision, lm, projector_kind=config["model"]["projector"], mask_mode=s3["mask"],
            attn_implementation=config["model"]["attn_implementation"],
            protected_token_ids=sorted(set(specials.values())),
            **config["model"]["projector_kwargs"],
        ).train()  # fmt: skip
        ex3 = examples(data, tok, processor, s3)
        base = micro_batches(ex3, s3["micro_batch_size"], args.micro_batches)
        report["packing"] = {
            "stage": "stage3",
            "settings": s3,
            "stage3": packing_case(model, base, s3, args.repeats),
            "long_tailed": packing_case(
                model, long_tailed(base, s3["max_length"], len(tok)), s3, args.repeats
            ),
        }
    for case in ("stage3", "long_tailed"):
        r = report["packing"][case]
        pf = r["padding_fraction"]
        print(
            f"packing {case:>11}: padding {pf['padded']:.1%} -> {pf['packed']:.1%}, tokens/s "
            f"{r['tokens_per_s']['padded']:.0f} -> {r['tokens_per_s']['packed']:.0f} "
            f"(x{r['speedup_tokens_per_s']:.2f})"
        )
    report["machine"] = {**machine_info(), "granted_cpus": granted_cpus()}
    write_json_atomic(args.out, report)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
