"""Shared by the paper-size benchmarks: the paper recipe's backbones (seed 002 §3.1: SigLIP
so400m-patch14-224 + Qwen2.5-0.5B) built from their configs with random weights (nothing is
downloaded), a reduced ``mid`` variant of the same architectures, a tiny LLaVA-format dataset
drawn from the synthetic world, the GPUs' bf16 peaks and the machine description.

Not a benchmark itself: ``bench_paper_smoke.py`` and ``bench_gpu.py`` import it (``bench/`` is
on ``sys.path`` when a script there runs).
"""

from __future__ import annotations

import io
import json
import os
import platform
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch

from vlalign.data.tokenizer import save_tokenizer, train_tokenizer
from vlalign.data.world import generate_world
from vlalign.models import backbones as bb

# SigLIP so400m-patch14-224 and Qwen2.5-0.5B, from their published config.json files.
PAPER_VISION: dict[str, Any] = {
    "hidden_size": 1152,
    "intermediate_size": 4304,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "image_size": 224,
    "patch_size": 14,
}
PAPER_LM: dict[str, Any] = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": True,
}
# The same architectures reduced in depth and width (a choice: small enough to run end to end
# in seconds on 2 CPU cores). The LM keeps Qwen's 151,936-row vocabulary and GQA (heads 4 / KV
# 2), the vision tower SigLIP's patch 14, at half the image side (64 image tokens, not 256).
MID_VISION: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 112,
    "patch_size": 14,
}
MID_LM: dict[str, Any] = {
    **PAPER_LM,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
SIZES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "mid": (MID_VISION, MID_LM),
    "paper": (PAPER_VISION, PAPER_LM),
}

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity), by a lower-case substring of the device
# name; the first match wins, so specific variants come before their family.
BF16_PEAK: list[tuple[str, float]] = [
    ("gh200", 989e12),
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),  # SXM
    ("h800", 989e12),
    ("b200", 2250e12),
    ("a100", 312e12),
    ("a800", 312e12),
    ("l40s", 362e12),
    ("l40", 181e12),
    ("l4", 121e12),
    ("a10", 125e12),
    ("rtx 4090", 165e12),
    ("rtx 3090", 71e12),
]


def bf16_peak(device_name: str) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None for a device not in the table."""
    name = device_name.lower()
    return next((peak for key, peak in BF16_PEAK if key in name), None)


def mfu(n_params: int, tokens_per_s: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation, 6·N·tokens/s ÷ peak (forward 2N + backward 4N per token; the
    recompute of gradient checkpointing is not counted, as usual); None without a peak."""
    if peak_flops is None:
        return None
    return 6 * n_params * tokens_per_s / peak_flops


def peak_rss_bytes() -> int:
    """This process's peak resident set size (``ru_maxrss``, KiB on Linux)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": os.getloadavg()[0],
        "torch": version("torch"),
        "transformers": version("transformers"),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    try:  # the CPU model and the memory, where Linux tells them
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["mem_total_gib"] = int(line.split()[1]) / 2**20
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
    return info


# ------------------------------------------------------------------------------ inputs
def recaption_prompt() -> str:
    return "<image>\nDescribe the image in detail."


def write_llava_dataset(root: Path, n_images: int, seed: int = 0) -> Path:
    """``n_images`` synthetic-world images as a LLaVA-ReCap-style source: ``llava.json`` (a JSON
    list of ``{id, image, conversations}``, one human prompt + one gpt recaption, the hub
    files' layout) next to ``images/<id>.png``; → the JSON file (a ``local:`` source, read with
    ``image_root`` = its directory)."""
    world = generate_world(None, splits={"train": n_images, "val": 0, "test": 0}, seed=seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "images").mkdir(exist_ok=True)
    rows = []
    for i, row in enumerate(world["train"]):
        name = f"images/{i:06d}.png"
        buf = io.BytesIO()
        row["image"].convert("RGB").save(buf, format="PNG")
        (root / name).write_bytes(buf.getvalue())
        rows.append(
            {
                "id": f"{i:06d}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": recaption_prompt()},
                    {"from": "gpt", "value": row["recaption"]},
                ],
                "data_source": "vlalign-synthetic-world",
            }
        )
    path = root / "llava.json"
    path.write_text(json.dumps(rows))
    return path


def corpus(llava_json: Path) -> list[str]:
    return [t["value"] for r in json.loads(llava_json.read_text()) for t in r["conversations"]]


def save_backbones(
    root: Path, texts: list[str], vision_cfg: dict[str, Any], lm_cfg: dict[str, Any]
) -> tuple[Path, Path]:
    """Random-init SigLIP vision tower (+ its image processor) and Qwen2 LM (+ a tokenizer) as
    ``save_pretrained`` dirs ``root/vision`` and ``root/lm``: what a hub checkpoint would be.

    The tokenizer is a small byte-level BPE trained on ``texts`` with the VLM's special tokens
    (Qwen's own vocabulary file cannot be fetched here, a choice); the LM keeps its config's
    vocabulary (151,936 rows for Qwen2.5) whatever the tokenizer's size, so the embedding and
    LM head weigh what they weigh in the paper recipe. The pipeline's ``tokenizer: from_lm``
    reads the tokenizer from the LM dir, as from the hub."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = train_tokenizer(texts, 512)
    save_tokenizer(tok, root / "tokenizer_src")
    torch.manual_seed(0)
    vision = bb.build_tiny_vision(vision_cfg)
    processor = bb.make_image_processor(vision_cfg["image_size"])
    bb.save_backbone(vision, root / "vision", {"pretrained_here": False}, extra=[processor])
    del vision
    lm = Qwen2ForCausalLM(
        Qwen2Config(
            **lm_cfg,
            pad_token_id=tok.pad_token_id,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
        )
    )
    bb.save_backbone(lm, root / "lm", {"pretrained_here": False}, extra=[tok])
    return root / "vision", root / "lm"


def count_params(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
