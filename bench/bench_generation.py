"""Benchmark: caption generation speed with and without the KV cache (greedy).

A VLM of the embedded default's sizes (SigLIP 64 px / patch 8 → 64 image tokens, hidden 128,
2 layers; Qwen2 hidden 128, 2 layers, vocab 1024), random weights, batch 16, prompt ``[<bos>]``.
``eos_token_id=None`` forces every caption to the full ``max_new_tokens``. Reports the median
of ``--repeats`` timed runs after one warm-up, and whether the cached tokens equal the no-cache
ground truth. Writes ``bench/out/generation.json``. Not a test:

    .venv/bin/python bench/bench_generation.py [--batch 16] [--new-tokens 16 64] [--repeats 3]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from vlalign.io_utils import write_json_atomic
from vlalign.models.generation import generate
from vlalign.models.projector import build_projector
from vlalign.models.vlm import VisionLanguageModel

VISION = {"image_size": 64, "patch_size": 8, "hidden_size": 128, "intermediate_size": 256,
          "num_hidden_layers": 2, "num_attention_heads": 4}
LM = {"vocab_size": 1024, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
      "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512}
BOS, PAD = 1, 0


def build_model(device: torch.device) -> VisionLanguageModel:
    torch.manual_seed(0)
    vision = SiglipVisionModel(SiglipVisionConfig(**VISION))
    lm = Qwen2ForCausalLM(Qwen2Config(**LM, pad_token_id=PAD, bos_token_id=BOS))
    projector = build_projector("mlp2x_gelu", VISION["hidden_size"], LM["hidden_size"])
    model = VisionLanguageModel(vision, projector, lm, mask_mode="prefix",
                                attn_implementation="sdpa")
    return model.to(device).eval()


def time_generation(model, pixels, use_cache: bool, new_tokens: int, repeats: int):
    prompts = [[BOS]] * pixels.shape[0]
    kw = {"pixel_values": pixels, "prompt_ids": prompts, "num_beams": 1,
          "max_new_tokens": new_tokens, "eos_token_id": None, "pad_token_id": PAD,
          "use_cache": use_cache}
    out = generate(model, **kw)  # warm-up (and the tokens to compare)
    seconds = []
    for _ in range(repeats):
        if pixels.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        generate(model, **kw)
        if pixels.is_cuda:
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return out, statistics.median(seconds), seconds


def machine_info(device: torch.device) -> dict:
    info = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0],
        "torch": version("torch"),
        "transformers": version("transformers"),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); 1 is steadier on a busy machine")
    ap.add_argument("--out", default=str(Path(__file__).parent / "out" / "generation.json"))
    args = ap.parse_args()

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = build_model(device)
    pixels = torch.randn(args.batch, 3, VISION["image_size"], VISION["image_size"],
                         generator=torch.Generator().manual_seed(1)).to(device)
    results = []
    for n in args.new_tokens:
        row: dict = {"new_tokens": n, "batch": args.batch}
        outs = {}
        for use_cache in (True, False):
            key = "cache" if use_cache else "no_cache"
            outs[key], med, all_s = time_generation(model, pixels, use_cache, n, args.repeats)
            assert all(len(o) == n for o in outs[key]), "generation stopped early"
            row[key] = {"seconds_median": med, "seconds": all_s,
                        "captions_per_s": args.batch / med,
                        "tokens_per_s": args.batch * n / med}
        row["speedup"] = row["no_cache"]["seconds_median"] / row["cache"]["seconds_median"]
        same = sum(a == b for a, b in zip(outs["cache"], outs["no_cache"]))
        row["cache_equals_no_cache"] = f"{same}/{args.batch} captions identical"
        results.append(row)
        print(f"{n:3d} new tokens: cache {row['cache']['captions_per_s']:8.1f} captions/s, "
              f"no cache {row['no_cache']['captions_per_s']:8.1f} captions/s, "
              f"speedup x{row['speedup']:.2f}, {row['cache_equals_no_cache']}")

    write_json_atomic(args.out, {
        "benchmark": "generation",
        "model": {"vision": VISION, "lm": LM, "projector": "mlp2x_gelu", "mask_mode": "prefix",
                  "image_tokens": (VISION["image_size"] // VISION["patch_size"]) ** 2},
        "decoding": {"num_beams": 1, "eos_token_id": None, "prompt": "[<bos>]"},
        "repeats": args.repeats,
        "results": results,
        "machine": machine_info(device),
    })
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
