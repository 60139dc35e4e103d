"""Per-module learning rates (0 = frozen) as AdamW parameter groups, and the LR schedules."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from vlalign.runs.settings import MODULES, StageSettings


def freeze_by_lr(model: nn.Module, lr: Mapping[str, float]) -> None:
    """A module whose learning rate is 0 is frozen: no gradients, no optimizer state. ``lr``
    has every module of MODULES (resolved stage settings)."""
    for name in MODULES:
        trainable = float(lr[name]) > 0
        for p in getattr(model, name).parameters():
            p.requires_grad_(trainable)


def param_groups(
    model: nn.Module,
    lr: Mapping[str, float],
    weight_decay: float,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """One decay / no-decay pair of groups per trainable module (biases and norms: no decay).

    ``extra`` maps a group name to ``(params, lr)`` for parameters outside the three modules
    (PEFT methods)."""
    groups = []
    # PEFT groups first: their parameters may live inside the LM, whose own LR may be 0.
    named: dict[str, list] = {}
    lrs = dict(lr)
    for name, (params, group_lr) in (extra or {}).items():
        named[name] = [(f"{name}.{i}", p) for i, p in enumerate(params) if p.requires_grad]
        lrs[name] = group_lr
    for name in MODULES:
        named[name] = [
            (n, p) for n, p in getattr(model, name).named_parameters() if p.requires_grad
        ]
    seen: set[int] = set()
    for name, params in named.items():
        if float(lrs[name]) <= 0:
            continue
        params = [(n, p) for n, p in params if id(p) not in seen]
        seen.update(id(p) for _, p in params)
        decay = [p for n, p in params if p.ndim >= 2]
        no_decay = [p for n, p in params if p.ndim < 2]
        for plist, wd in ((decay, weight_decay), (no_decay, 0.0)):
            if plist:
                groups.append(
                    {"params": plist, "lr": float(lrs[name]), "weight_decay": wd, "name": name}
                )
    if not groups:
        raise ValueError("nothing to train: every learning rate is 0")
    return groups


def lr_lambdas(
    groups: list[dict[str, Any]], schedule: str, total: int, warmup: int, min_lr: float
) -> list[Callable[[int], float]]:
    """Linear warm-up, then cosine decay to absolute ``min_lr``, linear decay to 0, or constant."""

    def make(base: float) -> Callable[[int], float]:
        floor = min(min_lr / base, 1.0) if base > 0 else 0.0

        def f(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if schedule == "constant":
                return 1.0
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            if schedule == "linear":
                return 1.0 - progress
            return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        return f

    return [make(g["lr"]) for g in groups]


def build_optimizer(
    groups: list[dict[str, Any]], settings: StageSettings, total: int
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``groups`` and the stage's warm-up + schedule over ``total`` steps."""
    opt = settings.optimizer
    optimizer = torch.optim.AdamW(groups, betas=opt.betas, eps=opt.eps)
    # warmup_steps (a count, e.g. PETAL's 1,000) overrides warmup_ratio (a share of the steps)
    steps = settings.warmup_steps
    warmup = min(steps, total) if steps is not None else round(settings.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambdas(groups, settings.schedule, total, warmup, settings.min_lr)
    )
    return optimizer, scheduler
