"""Vision pre-training: per-grid-cell attribute prediction (shape, colour, size), the object
count and (``position``, off by default) each patch's grid cell, then a fresh linear probe on the
frozen features measures what they hold.

Why the position target: the attribute heads pool patches by location, so nothing asks a patch
token to keep *where* it is, and an object's patches lose it (on the default encoder a linear
probe reads the cell of 30 % of the patches that show an object, 77 % of all patches). A real
ViT's patch tokens carry their position; without it a projector that maps tokens one by one
cannot tell the LM where an object is (docs/grounding.md, "Where an object is")."""

from __future__ import annotations

import json
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from datasets import DatasetDict
from torch import nn
from tqdm.auto import tqdm
from transformers import SiglipVisionModel, get_cosine_schedule_with_warmup

from vlalign.models.backbones import default_device, encode, pixel_tensor

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
    """Pools patch tokens onto the scene grid so that spatial information must live in them;
    the ``position`` head reads each patch token alone (its grid cell)."""

    def __init__(self, hidden: int, grid: int, vocab: dict[str, list[str]], max_objects: int):
        super().__init__()
        self.grid = grid
        self.heads = nn.ModuleDict({a: nn.Linear(hidden, len(vocab[a]) + 1) for a in ATTRS})
        self.count = nn.Linear(hidden, max_objects + 1)
        self.position = nn.Linear(hidden, grid * grid)

    def forward(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        b, n, h = tokens.shape
        side = int(math.isqrt(n))
        fmap = tokens.transpose(1, 2).reshape(b, h, side, side)
        cells = F.adaptive_avg_pool2d(fmap, self.grid).flatten(2).transpose(1, 2)  # (b, g*g, h)
        out = {a: head(cells) for a, head in self.heads.items()}
        out["count"] = self.count(tokens.mean(1))
        out["position"] = self.position(tokens)  # (b, n, g*g)
        return out


def patch_cells(n_patches: int, grid: int) -> torch.Tensor:
    """The grid cell (row-major index) of each patch of a row-major square patch grid."""
    side = math.isqrt(n_patches)
    rows, cols = torch.arange(n_patches) // side, torch.arange(n_patches) % side
    return (rows * grid // side) * grid + cols * grid // side


def occupied_patches(cell_targets: torch.Tensor, n_patches: int, grid: int) -> torch.Tensor:
    """(images, patches) bool: the patch lies in a cell that holds an object."""
    return (cell_targets > 0)[:, patch_cells(n_patches, grid)]


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
    # the position of the patches that show an object: those whose position was lost
    n = out["position"].shape[1]
    on_object = occupied_patches(tgt["shape"], n, heads.grid)
    cells = patch_cells(n, heads.grid).expand_as(on_object)
    pred = out["position"].argmax(-1)
    acc["position"] = float((pred[on_object] == cells[on_object]).float().mean())
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
    # the most frequent cell among the objects' cells
    occ = train_tgt["shape"] > 0
    best = int(torch.mode(occ.nonzero()[:, 1]).values) if occ.any() else 0
    occupied = tgt["shape"] > 0
    acc["position"] = float((occupied.nonzero()[:, 1] == best).float().mean())
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
    """Train the encoder with attribute heads, then fit a fresh linear probe on frozen features.
    ``cfg["position"]`` (default off): each patch token also learns its grid cell."""
    position = bool(cfg.get("position", False))
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
        if position:
            loss = loss + _position_loss(out["position"], heads.grid)
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
        "objective": "per-cell attribute (shape, colour, size) and object-count prediction"
        + (", each patch's grid cell" if position else ""),
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
        loss = loss + _position_loss(out["position"], grid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return probe


def _position_loss(logits: torch.Tensor, grid: int) -> torch.Tensor:
    b, n, _ = logits.shape
    target = patch_cells(n, grid).to(logits.device).expand(b, n)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())
