"""PEFT inside a training stage: what a stage's ``peft:`` block means.

``peft: {prefix: {lr: 1e-3, num_prefix: 16}, lora: {lr: 1e-4, r: 16}}`` lists the methods this
stage *trains*, each with its learning rate (0 = attached but frozen) and method config.
Methods saved by the parent stage are re-attached first (frozen unless listed again), so a
chain expresses every PT-PEFT order of seed 003:

- ``X``: one stage with ``{X: ...}``;
- ``prefix→X``: ``{prefix: ...}`` then ``{X: ..., prefix: ...}`` (phase B trains both);
- ``X→prefix``: ``{X: ...}`` then ``{prefix: ..., X: ...}``;
- parallel: one stage with ``{prefix: ..., X: ...}``;
- alternation: ``prefix, X, prefix, X, …`` with the epochs split between them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlalign.methods.registry import (
    PeftMethod,
    count_trainable,
    forward_kwargs,
    get_method,
    load_methods,
    save_methods,
)

PEFT_DIR = "peft"
log = logging.getLogger(__name__)


class PeftSession:
    """The PEFT methods attached to one model for one stage."""

    def __init__(self, methods: list[PeftMethod], lrs: dict[str, float]):
        self.methods = methods
        self.lrs = lrs

    @property
    def groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        """Optimizer groups of the methods trained in this stage."""
        return {
            f"peft.{m.name}": (m.trainable_parameters(), self.lrs[m.name])
            for m in self.methods
            if self.lrs.get(m.name, 0) > 0
        }

    def forward_kwargs(self, batch_size: int) -> dict[str, Any]:
        return forward_kwargs(self.methods, batch_size)

    def method(self, name: str) -> PeftMethod | None:
        return next((m for m in self.methods if m.name == name), None)

    def prefix_cache_fn(self, variant: str = "normal", seed: int = 0) -> Callable | None:
        """``generate(prefix_cache_fn=...)``; ``variant`` removed / noise (seed 003 Table 5);
        the noise is drawn from a generator seeded with ``seed`` (the run's seed)."""
        prefix = self.method("prefix")
        if prefix is None:
            return None
        if variant == "normal":
            return prefix.cache_fn
        return prefix.variant_cache_fn(variant, generator=torch.Generator().manual_seed(seed))

    def count_trainable(self, model: nn.Module) -> tuple[int, float]:
        return count_trainable(model, *[m.module for m in self.methods])

    def state_dict(self) -> dict[str, dict]:
        return {m.name: m.state_dict() for m in self.methods}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for m in self.methods:
            m.load_state_dict(state[m.name], source="checkpoint")

    def save(self, directory: Path) -> None:
        save_methods(self.methods, directory)

    def strip(self) -> None:
        """Take the methods out of the LM so that ``save_pretrained`` writes the clean base
        (adapters unhooked, LoRA layers replaced by their unmerged base layers). The session
        is unusable afterwards."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        for m in reversed(self.methods):
            if hasattr(m, "remove"):
                m.remove()
            elif m.name == "lora" and m.lm is not None:
                lm = m.lm
                for name, module in list(lm.named_modules()):
                    if isinstance(module, BaseTunerLayer):
                        parent_name, _, child = name.rpartition(".")
                        parent = lm.get_submodule(parent_name) if parent_name else lm
                        setattr(parent, child, module.get_base_layer())
                if hasattr(lm, "peft_config"):
                    del lm.peft_config


def attach_peft(
    model: nn.Module, peft_cfg: dict[str, Any] | None, parent_dir: Path | None
) -> PeftSession | None:
    """Re-attach the parent's methods (frozen), then attach / unfreeze this stage's."""
    saved = parent_dir / PEFT_DIR if parent_dir is not None else None
    methods = load_methods(model, saved, freeze_base=False) if saved and saved.is_dir() else []
    if not methods and not peft_cfg:
        return None
    for m in methods:
        m.set_trainable(False)
    lrs: dict[str, float] = {}
    for name, cfg in (peft_cfg or {}).items():
        cfg = dict(cfg or {})
        if "lr" not in cfg:
            raise ValueError(f"peft.{name}: needs an 'lr' (0 keeps it attached but frozen)")
        lrs[name] = float(cfg.pop("lr"))
        method = next((m for m in methods if m.name == name), None)
        if method is not None:
            differ = {k: v for k, v in cfg.items() if method.cfg.get(k) != v}
            if differ:  # the parent's trained method keeps its own shape
                log.warning(
                    "peft.%s: attached from the parent stage; ignoring %s (parent has %s)",
                    name,
                    differ,
                    {k: method.cfg.get(k) for k in differ},
                )
        if method is None:
            method = get_method(name)()
            method.apply(model, cfg, freeze_base=False)
            methods.append(method)
        method.set_trainable(lrs[name] > 0)
    if lrs.get("full", 0) > 0 and any(m.name == "lora" for m in methods):
        raise ValueError(
            "peft: training 'full' while 'lora' is attached is not supported "
            "(the saved base model would mix LoRA and fine-tuned weights)"
        )
    return PeftSession(methods, lrs)


def peft_hook(model: nn.Module, settings: dict[str, Any], parent_dir: Path | None):
    """The trainer's hook (``vlalign.train.loop.train_stage(peft_hook=...)``)."""
    return attach_peft(model, settings.get("peft"), parent_dir)


def load_for_inference(model: nn.Module, stage_dir: Path) -> PeftSession | None:
    """Methods of a trained stage, attached to its loaded model (all frozen), for evaluation."""
    session = attach_peft(model, None, stage_dir)
    for p in model.parameters():
        p.requires_grad_(False)
    return session
