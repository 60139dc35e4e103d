"""Backbones: tiny SigLIP / Qwen2 models of the real architectures, pre-trained on the world, or
pre-trained checkpoints fetched by id. Both end as ``save_pretrained`` directories that the rest
of the pipeline loads with ``from_pretrained(path)`` — the call that loads hub checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from datasets import DatasetDict
from torch import nn
from tqdm.auto import tqdm
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
    get_cosine_schedule_with_warmup,
)

from vlalign.config import parse_source
from vlalign.io_utils import atomic_path, write_json_atomic
from vlalign.models.scene_context import (
    SceneContextError,
    bag_tensors,
    prefixed_batch,
    scene_bags,
    scene_texts,
    supervised_loss,
)

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


# --------------------------------------------------------------------------------------------
# LM pre-training: text-only next-token prediction on captions, recaptions, QA, conversations
# --------------------------------------------------------------------------------------------
def encode_texts(
    tokenizer: PreTrainedTokenizerBase, texts: list[str], max_length: int
) -> list[list[int]]:
    if not texts:  # transformers 5 raises IndexError on an empty batch
        return []
    ids = tokenizer(texts, add_special_tokens=False).input_ids
    return [[tokenizer.bos_token_id, *x[: max_length - 2], tokenizer.eos_token_id] for x in ids]


def pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


@torch.no_grad()
def lm_perplexity(
    model: nn.Module,
    seqs: list[list[int]],
    pad_id: int,
    batch_size: int = 64,
    labels: list[list[int]] | None = None,
) -> float:
    """Token-level perplexity (exp of the mean next-token NLL) over every predicted token, or
    over the supervised ones of ``labels`` (aligned with ``seqs``, -100 = no loss)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        ids, mask = (t.to(device) for t in pad_batch(seqs[i : i + batch_size], pad_id))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        if labels is not None:
            lab, _ = pad_batch(labels[i : i + batch_size], -100)
            target = lab[:, 1:].to(device)
        total += F.cross_entropy(
            logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        count += int((target != -100).sum())
    return math.exp(total / max(count, 1))


def _scene_rows(dsd: DatasetDict, split: str, tok, max_length: int, side: int) -> list[tuple]:
    """``(texts, bags)`` per row: its texts in the VLM formats, truncated, and (``side > 0``)
    its scene prefix bags."""
    rows = dsd[split].select_columns(["captions", "recaption", "qa", "conversations", "meta"])
    out = []
    for i, row in enumerate(rows):
        texts = [(x[:max_length], y[:max_length]) for x, y in scene_texts(row, tok)]
        if not texts:
            continue
        try:
            bags = bag_tensors(scene_bags(row["meta"], tok, side)) if side else None
        except SceneContextError as e:
            raise SceneContextError(
                f"lm.pretrain.scene_prefix: {split} row {i}: {e}; set scene_prefix.side: 0 "
                "to pre-train on text alone"
            ) from None
        out.append((texts, bags))
    return out


@torch.no_grad()
def _mean_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> float:
    total, count = 0.0, 0
    for b in batches:
        loss, n = supervised_loss(model, b)
        total += loss.item() * n
        count += n
    return total / max(count, 1)


def scene_prefix_metrics(
    model: nn.Module, rows: list[tuple], pad_id: int, batch_size: int = 64
) -> dict[str, float]:
    """Held-out loss of every text behind its own scene prefix, another scene's (rows rolled by
    one) and none: the proof that the LM reads its context (``scene_prefix_gap`` > 0)."""
    model.eval()
    emb = model.get_input_embeddings()
    pairs = [(i, t) for i, (texts, _) in enumerate(rows) for t in texts]
    out = {}
    for name, shift in (("own", 0), ("shuffled", 1), ("none", None)):
        batches = []
        for s in range(0, len(pairs), batch_size):
            chunk = pairs[s : s + batch_size]
            bags = (
                None if shift is None
                else [rows[(i + shift) % len(rows)][1] for i, _ in chunk]
            )  # fmt: skip
            batches.append(prefixed_batch(emb, [t for _, t in chunk], pad_id, bags))
        out[name] = _mean_loss(model, batches)
    return {
        "heldout_loss_scene_prefix": out["own"],
        "heldout_loss_shuffled_prefix": out["shuffled"],
        "heldout_loss_no_prefix": out["none"],
        "scene_prefix_gap": out["shuffled"] - out["own"],
    }


def pretrain_lm(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    train: list[DatasetDict],
    cfg: dict[str, Any],
    seed: int = 0,
) -> dict[str, Any]:
    """Pre-train a causal LM on the world's text in the VLM's formats; a ``scene_prefix.fraction``
    of the batches put each text behind its scene's soft prefix (:mod:`scene_context`). Returns
    held-out metrics."""
    torch.manual_seed(seed)
    device = default_device()
    model.to(device).train()
    sp = cfg.get("scene_prefix") or {}
    side = int(sp.get("side", 0))
    train_rows, val_rows = [], []
    for dsd in train:
        train_rows += _scene_rows(dsd, "train", tokenizer, cfg["max_length"], side)
        val_rows += _scene_rows(dsd, "val", tokenizer, cfg["max_length"], side)
    if not train_rows or not val_rows:
        raise ValueError("LM pre-training corpus is empty (no texts in the train/val splits)")
    pad = tokenizer.pad_token_id
    emb = model.get_input_embeddings()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, max(1, cfg["steps"] // 20), cfg["steps"])
    gen = torch.Generator().manual_seed(seed)
    start, losses = time.time(), []
    for _step in tqdm(range(cfg["steps"]), desc="pretrain lm", mininterval=2):
        idx = torch.randint(len(train_rows), (cfg["batch_size"],), generator=gen).tolist()
        pick = torch.randint(1 << 30, (len(idx),), generator=gen).tolist()
        seqs = [train_rows[i][0][k % len(train_rows[i][0])] for i, k in zip(idx, pick)]
        with_prefix = side > 0 and torch.rand((), generator=gen).item() < sp.get("fraction", 0.8)
        bags = [train_rows[i][1] for i in idx] if with_prefix else None
        batch = prefixed_batch(emb, seqs, pad, bags, sp.get("noise", 0.0), gen)
        loss, _ = supervised_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    val_texts = [t for texts, _ in val_rows for t in texts][:1024]
    metrics = {
        "objective": "next-token prediction on captions, recaptions, QA and conversations"
        + (", a share behind their scene's soft prefix" if side else ""),
        "steps": cfg["steps"],
        "train_loss_first": losses[0],
        "train_loss_last": sum(losses[-10:]) / len(losses[-10:]),
        # over what the VLM's stages supervise: captions and answers
        "heldout_perplexity": lm_perplexity(
            model, [x for x, _ in val_texts], pad, labels=[y for _, y in val_texts]
        ),
        "uniform_perplexity": float(len(tokenizer)),
        "heldout_texts": len(val_texts),
        "pretrained_here": True,
    }
    if side:
        metrics.update(scene_prefix_metrics(model, val_rows[:256], pad))
        metrics["scene_prefix"] = {"side": side, **{k: v for k, v in sp.items() if k != "side"}}
    metrics["seconds"] = time.time() - start
    return metrics


# --------------------------------------------------------------------------------------------
# Vision pre-training: per-grid-cell attribute prediction (shape, colour, size) + object count
# --------------------------------------------------------------------------------------------
ATTRS = ("shape", "colour", "size")


def scene_targets(
    metas: list[str], grid: int, vocab: dict[str, list[str]]
) -> dict[str, torch.Tensor]:
    """Per cell: attribute class index (0 = empty cell); per image: object count."""
    out = {a: torch.zeros(len(metas), grid * grid, dtype=torch.long) for a in ATTRS}
    out["count"] = torch.zeros(len(metas), dtype=torch.long)
    for i, m in enumerate(metas):
        objects = json.loads(m)["objects"]
        out["count"][i] = len(objects)
        for o in objects:
            cell = o["row"] * grid + o["col"]
            for a in ATTRS:
                values = vocab[a]
                out[a][i, cell] = values.index(o[a]) + 1 if o[a] in values else 0
    return out


class AttributeHeads(nn.Module):
    """Pools patch tokens onto the scene grid so that spatial information must live in them."""

    def __init__(self, hidden: int, grid: int, vocab: dict[str, list[str]], max_objects: int):
        super().__init__()
        self.grid = grid
        self.heads = nn.ModuleDict({a: nn.Linear(hidden, len(vocab[a]) + 1) for a in ATTRS})
        self.count = nn.Linear(hidden, max_objects + 1)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        b, n, h = tokens.shape
        side = int(math.isqrt(n))
        fmap = tokens.transpose(1, 2).reshape(b, h, side, side)
        cells = F.adaptive_avg_pool2d(fmap, self.grid).flatten(2).transpose(1, 2)  # (b, g*g, h)
        out = {a: head(cells) for a, head in self.heads.items()}
        out["count"] = self.count(tokens.mean(1))
        return out


def pixel_tensor(processor, images: list) -> torch.Tensor:
    return processor(images=[im.convert("RGB") for im in images], return_tensors="pt")[
        "pixel_values"
    ]


def _probe_accuracy(
    heads: AttributeHeads, feats: torch.Tensor, tgt: dict[str, torch.Tensor]
) -> dict[str, float]:
    with torch.no_grad():
        out = heads(feats)
    acc = {}
    for a in ATTRS:
        occupied = tgt[a] > 0  # accuracy on cells holding an object: empty cells are easy
        pred = out[a].argmax(-1)
        acc[a] = float((pred[occupied] == tgt[a][occupied]).float().mean())
    acc["count"] = float((out["count"].argmax(-1) == tgt["count"]).float().mean())
    return acc


def _majority_accuracy(
    train_tgt: dict[str, torch.Tensor], tgt: dict[str, torch.Tensor]
) -> dict[str, float]:
    """Chance level: always predict the most frequent (non-empty) class seen in training."""
    acc = {}
    for a in ATTRS:
        occ = train_tgt[a][train_tgt[a] > 0]
        best = int(torch.mode(occ).values) if occ.numel() else 1
        occupied = tgt[a] > 0
        acc[a] = float((tgt[a][occupied] == best).float().mean())
    best = int(torch.mode(train_tgt["count"]).values)
    acc["count"] = float((tgt["count"] == best).float().mean())
    return acc


def pretrain_vision(
    model: SiglipVisionModel,
    processor,
    data: DatasetDict,
    cfg: dict[str, Any],
    grid: int,
    max_objects: int,
    seed: int = 0,
) -> dict[str, Any]:
    """Train the encoder with attribute heads, then fit a fresh linear probe on frozen features."""
    torch.manual_seed(seed)
    device = default_device()
    train, val = data["train"], data["val"]
    vocab = {
        a: sorted({o[a] for m in train["meta"] for o in json.loads(m)["objects"]}) for a in ATTRS
    }
    x_train, x_val = pixel_tensor(processor, train["image"]), pixel_tensor(processor, val["image"])
    t_train = scene_targets(train["meta"], grid, vocab)
    t_val = scene_targets(val["meta"], grid, vocab)
    heads = AttributeHeads(model.config.hidden_size, grid, vocab, max_objects).to(device)
    model.to(device).train()
    params = list(model.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.01)
    sched = get_cosine_schedule_with_warmup(opt, max(1, cfg["steps"] // 20), cfg["steps"])
    gen = torch.Generator().manual_seed(seed)
    start, losses = time.time(), []
    for _step in tqdm(range(cfg["steps"]), desc="pretrain vision", mininterval=2):
        idx = torch.randint(len(x_train), (cfg["batch_size"],), generator=gen)
        out = heads(model(pixel_values=x_train[idx].to(device)).last_hidden_state)
        loss = sum(
            F.cross_entropy(out[a].flatten(0, 1), t_train[a][idx].flatten().to(device))
            for a in ATTRS
        )
        loss = loss + F.cross_entropy(out["count"], t_train["count"][idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    probe = fit_linear_probe(model, heads.grid, vocab, max_objects, x_train, t_train, seed)
    with torch.no_grad():
        feats_val = encode(model, x_val)
    return {
        "objective": "per-cell attribute (shape, colour, size) and object-count prediction",
        "steps": cfg["steps"],
        "train_loss_first": losses[0],
        "train_loss_last": sum(losses[-10:]) / len(losses[-10:]),
        "probe_accuracy": _probe_accuracy(probe.cpu(), feats_val, t_val),
        "chance_accuracy": _majority_accuracy(t_train, t_val),
        "probe": "fresh linear heads on frozen features, trained on train, scored on val",
        "vocab": vocab,
        "seconds": time.time() - start,
        "pretrained_here": True,
    }


@torch.no_grad()
def encode(model: nn.Module, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    device = next(model.parameters()).device
    chunks = [
        model(pixel_values=pixels[i : i + batch_size].to(device)).last_hidden_state.cpu()
        for i in range(0, len(pixels), batch_size)
    ]
    return torch.cat(chunks)


def fit_linear_probe(
    model, grid, vocab, max_objects, x_train, t_train, seed, steps: int = 300
) -> AttributeHeads:
    """The probe measures what the frozen features hold, independent of the pre-training heads."""
    torch.manual_seed(seed + 1)
    feats = encode(model, x_train)
    probe = AttributeHeads(feats.shape[-1], grid, vocab, max_objects)
    opt = torch.optim.AdamW(probe.parameters(), lr=1e-2)
    for _ in range(steps):
        out = probe(feats)
        loss = sum(F.cross_entropy(out[a].flatten(0, 1), t_train[a].flatten()) for a in ATTRS)
        loss = loss + F.cross_entropy(out["count"], t_train["count"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return probe


def save_backbone(model: nn.Module, out: str | Path, metrics: dict[str, Any], extra=()) -> None:
    """``save_pretrained`` the model (and processor/tokenizer) plus its metrics, atomically."""
    with atomic_path(out, is_dir=True) as tmp:
        model.save_pretrained(str(tmp))
        for obj in extra:
            obj.save_pretrained(str(tmp))
        write_json_atomic(Path(tmp) / METRICS_FILE, metrics)
