"""LM pre-training: next-token prediction on the world's texts in the VLM's formats, a share of
the batches behind their scene's soft prefix, so that the frozen LM has learned to read context."""

from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from datasets import DatasetDict
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase, get_cosine_schedule_with_warmup

from vlalign.models.backbones import default_device
from vlalign.models.scene_context import (
    SceneContextError,
    bag_tensors,
    prefixed_batch,
    scene_bags,
    scene_texts,
    supervised_loss,
)


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
    total, count = token_nll(model, seqs, pad_id, batch_size, labels)
    return math.exp(total / max(count, 1))


@torch.no_grad()
def token_nll(
    model: nn.Module,
    seqs: list[list[int]],
    pad_id: int,
    batch_size: int = 64,
    labels: list[list[int]] | None = None,
) -> tuple[float, int]:
    """Summed next-token NLL (nats) and the number of tokens it covers: every predicted token,
    or the supervised ones of ``labels`` (aligned with ``seqs``, -100 = no loss)."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        ids, mask = (t.to(device) for t in pad_batch(seqs[i : i + batch_size], pad_id))
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        if labels is not None:
            lab, _ = pad_batch(labels[i : i + batch_size], -100)
            target = lab[:, 1:].to(device)
        total += F.cross_entropy(
            logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum"
        ).item()
        count += int((target != -100).sum())
    return total, count


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
    # the config schema fills every scene_prefix key; without the block it is off (text only)
    sp = cfg.get("scene_prefix") or {"side": 0}
    side = int(sp["side"])
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
        with_prefix = side > 0 and torch.rand((), generator=gen).item() < sp["fraction"]
        bags = [train_rows[i][1] for i in idx] if with_prefix else None
        batch = prefixed_batch(emb, seqs, pad, bags, sp["noise"] if with_prefix else 0.0, gen)
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
