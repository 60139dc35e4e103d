"""Backbones: tiny SigLIP / Qwen2 models of the real architectures (pre-trained on the world by
:mod:`vlalign.pretrain`), or pre-trained checkpoints fetched by id. Both end as
``save_pretrained`` directories that the rest of the pipeline loads with
``from_pretrained(path)`` — the call that loads hub checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForCausalLM,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
)

from vlalign.config import parse_source
from vlalign.io_utils import atomic_path, write_json_atomic

METRICS_FILE = "pretrain_metrics.json"


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------------------------
# Building and loading
# --------------------------------------------------------------------------------------------
def build_tiny_vision(cfg: dict[str, Any], seed: int = 0) -> SiglipVisionModel:
    """A fresh SigLIP tower; its initial weights are a function of ``seed`` alone."""
    torch.manual_seed(seed)
    return SiglipVisionModel(SiglipVisionConfig(**cfg))


def build_tiny_lm(
    cfg: dict[str, Any], tokenizer: PreTrainedTokenizerBase, seed: int = 0
) -> Qwen2ForCausalLM:
    """A fresh Qwen2 LM; its initial weights are a function of ``seed`` alone."""
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        **cfg,
    )
    return Qwen2ForCausalLM(config)


def make_image_processor(image_size: int):
    """SigLIP preprocessing (resize, rescale to [-1, 1]); the PIL backend needs no torchvision."""
    from transformers import SiglipImageProcessorPil

    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})


def load_vision(path: str | Path, **kwargs: Any) -> nn.Module:
    """Any HF vision encoder directory; a full SigLIP/CLIP checkpoint yields its vision tower."""
    config = AutoConfig.from_pretrained(str(path))
    if getattr(config, "vision_config", None) is not None and config.model_type == "siglip":
        return SiglipVisionModel.from_pretrained(str(path), **kwargs)
    return AutoModel.from_pretrained(str(path), **kwargs)


def load_lm(path: str | Path, **kwargs: Any) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs)


def load_image_processor(path: str | Path):
    return AutoImageProcessor.from_pretrained(str(path))


def fetch_pretrained(kind: str, source: str, out: str | Path) -> None:
    """Copy a hub (``hf:id@rev``) or local checkpoint into ``out`` with ``save_pretrained``.

    The hub path is the real recipe's; CI exercises the same code through ``local:``.
    """
    scheme, ident, revision = parse_source(source)
    if scheme == "local" and not Path(ident).is_dir():
        raise FileNotFoundError(f"{kind}.source {source!r}: no such directory")
    kwargs = {"revision": revision} if revision else {}
    with atomic_path(out, is_dir=True) as tmp:
        if kind == "vision":
            if scheme == "hf":
                config = AutoConfig.from_pretrained(ident, **kwargs)
                cls = SiglipVisionModel if config.model_type == "siglip" else AutoModel
                model = cls.from_pretrained(ident, **kwargs)
            else:
                model = load_vision(ident)
            AutoImageProcessor.from_pretrained(ident, **kwargs).save_pretrained(str(tmp))
        elif kind == "lm":
            model = AutoModelForCausalLM.from_pretrained(ident, **kwargs)
        else:
            raise ValueError(f"unknown backbone kind {kind!r} (vision or lm)")
        model.save_pretrained(str(tmp))
        write_json_atomic(tmp / METRICS_FILE, {"source": source, "pretrained_here": False})


def pixel_tensor(processor, images: list) -> torch.Tensor:
    return processor(images=[im.convert("RGB") for im in images], return_tensors="pt")[
        "pixel_values"
    ]


@torch.no_grad()
def encode(model: nn.Module, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    device = next(model.parameters()).device
    chunks = [
        model(pixel_values=pixels[i : i + batch_size].to(device)).last_hidden_state.cpu()
        for i in range(0, len(pixels), batch_size)
    ]
    return torch.cat(chunks)


def save_backbone(model: nn.Module, out: str | Path, metrics: dict[str, Any], extra=()) -> None:
    """``save_pretrained`` the model (and processor/tokenizer) plus its metrics, atomically."""
    with atomic_path(out, is_dir=True) as tmp:
        model.save_pretrained(str(tmp))
        for obj in extra:
            obj.save_pretrained(str(tmp))
        write_json_atomic(Path(tmp) / METRICS_FILE, metrics)


def pretrained_here(lm_dir: str | Path) -> bool:
    """Whether the LM in ``lm_dir`` was pre-trained by this project (on its own tokenizer),
    rather than fetched from a hub or a local checkpoint (``pretrain_metrics.json``)."""
    path = Path(lm_dir) / METRICS_FILE
    return path.is_file() and bool(json.loads(path.read_text()).get("pretrained_here"))


@torch.no_grad()
def init_added_token_rows(lm: nn.Module, tokenizer, token_ids) -> list[int]:
    """Rows of tokens a fetched LM never saw (the VLM's ``<bos>``, ``<inst>``, ``<ans>``, ...
    added to its tokenizer: ids at or past ``tokenizer.vocab_size``) set to the mean of its
    pre-trained rows, in the input embeddings and an untied LM head; the embedding grows to
    ``len(tokenizer)`` first if it is smaller. Returns the ids set. A hub checkpoint's spare
    rows (Qwen2 pads 151,665 tokens to 151,936 rows) were never trained: left as they are, a
    new token's embedding would be whatever they hold."""
    base = tokenizer.vocab_size
    if len(tokenizer) > lm.get_input_embeddings().num_embeddings:
        lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new = sorted({int(i) for i in token_ids if int(i) >= base})
    if not new:
        return []
    tables = [lm.get_input_embeddings().weight]
    head = lm.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != tables[0].data_ptr():
        tables.append(head.weight)
    for w in tables:
        w[new] = w[:base].mean(dim=0).to(w.dtype)
    return new
