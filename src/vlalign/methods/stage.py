"""PEFT inside a training stage: what a stage's ``peft:`` block means.

``peft: {prefix: {lr: 1e-3, num_prefix: 16}, lora: {lr: 1e-4, r: 16}}`` lists the methods this
stage *trains*, each with its learning rate (0 = attached but frozen) and method config.
Methods saved by the parent stage are re-attached first and stay frozen unless listed again, so
a chain expresses every PT-PEFT order of seed 003 (Table 2, Table 5b):

- ``X``: one stage with ``{X: ...}``;
- ``prefix→X``: ``{prefix: ...}`` then ``{X: ..., prefix: ...}`` (phase B trains both: "we
  adjust the parameters, including prefixes", seed 003 §3);
- ``X→prefix`` (the reverse order): ``{X: ...}`` then ``{prefix: ...}`` alone — phase B trains
  only the prefix, X stays attached and frozen (listing X again would make it LoRA → parallel);
- parallel: one stage with ``{prefix: ..., X: ...}``;
- alternation: ``prefix, X, prefix, X, …`` with the epochs split between them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlalign.methods.registry import (
    GeneratedBatch,
    GenerationStats,
    PeftMethod,
    count_trainable,
    forward_kwargs,
    get_method,
    load_methods,
    merge_inputs,
    save_methods,
)

PEFT_DIR = "peft"
NORMAL = "normal"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceVariant:
    """An inference variant a method of the session offers (seed 003 Table 5: ``prefix``'s
    ``removed`` and ``noise``); ``label`` names its records (``<stage>@<label>``)."""

    method: str
    name: str

    @property
    def label(self) -> str:
        return f"{self.method}_{self.name}"


@dataclass(frozen=True)
class InferenceInputs:
    """``B → forward inputs`` of every method of a session under one variant: what
    generation and the scoring forwards call before each forward
    (``vlalign.models.generation.InputsFn``). Each method sees the variant if it offers it and
    ``normal`` otherwise, and a generator seeded with ``seed`` anew at every call."""

    methods: tuple[PeftMethod, ...]
    variant: str = NORMAL
    seed: int = 0

    def __call__(self, batch_size: int) -> dict[str, Any]:
        return merge_inputs(
            (
                m.name,
                m.inference_state(
                    batch_size,
                    self.variant if self.variant in m.variants else NORMAL,
                    torch.Generator().manual_seed(self.seed),
                ),
            )
            for m in self.methods
        )


class PeftSession:
    """The PEFT methods attached to one model for one stage: every caller (training loop,
    evaluation, generation) goes through these compositions of the methods' hooks."""

    def __init__(self, methods: list[PeftMethod], lrs: dict[str, float]):
        self.methods = methods
        self.lrs = lrs
        self.last_terms: dict[str, float] = {}  # the last total_loss's auxiliary terms

    def trained(self) -> list[PeftMethod]:
        """The methods this stage trains (lr > 0)."""
        return [m for m in self.methods if self.lrs.get(m.name, 0) > 0]

    @property
    def groups(self) -> dict[str, tuple[list[nn.Parameter], float]]:
        """Optimizer groups of the methods trained in this stage."""
        return {
            f"peft.{m.name}": (m.trainable_parameters(), self.lrs[m.name]) for m in self.trained()
        }

    # -- training --------------------------------------------------------------------------
    def forward_kwargs(self, batch_size: int) -> dict[str, Any]:
        """Extra inputs of one training / held-out forward."""
        return forward_kwargs(self.methods, batch_size)

    def loss_terms(self, outputs: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """The auxiliary loss terms of the methods this stage trains (a frozen method's loss
        would only push the others), as ``<method>.<term>``: a method's ``extra_loss`` is one
        tensor (term ``loss``) or a mapping of named terms, each weighted as it is added."""
        terms: dict[str, torch.Tensor] = {}
        for m in self.trained():
            extra = m.extra_loss(outputs, batch)
            if extra is None:
                continue
            parts = extra.items() if isinstance(extra, Mapping) else [("loss", extra)]
            for key, value in parts:
                if value is not None:
                    terms[f"{m.name}.{key}"] = value.reshape(())
        return terms

    def extra_loss(self, outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor | None:
        """Sum of :meth:`loss_terms`; None when no trained method has one. The training loop
        adds it to the LM loss of the same micro-batch."""
        terms = self.loss_terms(outputs, batch)
        return torch.stack(list(terms.values())).sum() if terms else None

    def total_loss(self, outputs: Any, batch: Mapping[str, Any]) -> torch.Tensor:
        """The loss one training forward backpropagates: the LM loss (``outputs.loss``) plus
        the auxiliary terms, whose values this forward gave are kept in :attr:`last_terms`
        (the training log's per-step columns)."""
        terms = self.loss_terms(outputs, batch)
        self.last_terms = {k: float(v.detach()) for k, v in terms.items()}
        if not terms:
            return outputs.loss
        return outputs.loss + torch.stack(list(terms.values())).sum()

    def extra_metrics(self) -> dict[str, float]:
        """Every method's diagnostics, as ``<method>.<key>``."""
        return {
            f"{m.name}.{k}": float(v) for m in self.methods for k, v in m.extra_metrics().items()
        }

    # -- inference -------------------------------------------------------------------------
    def variants(self) -> list[InferenceVariant]:
        """The inference variants the attached methods offer besides ``normal``, in method
        order; two methods offering one name → ValueError."""
        out: dict[str, InferenceVariant] = {}
        for m in self.methods:
            for v in m.variants:
                if v == NORMAL or v in out:
                    raise ValueError(
                        f"PEFT method {m.name!r}: inference variant {v!r} is already "
                        f"{'the default' if v == NORMAL else f'offered by {out[v].method!r}'}"
                    )
                out[v] = InferenceVariant(m.name, v)
        return list(out.values())

    def inference(self, variant: str = NORMAL, seed: int = 0) -> InferenceInputs:
        """The inputs of every inference forward under ``variant`` (``normal`` or one of
        :meth:`variants`); ``seed`` (the run's) seeds a random variant."""
        offered = [v.name for v in self.variants()]
        if variant != NORMAL and variant not in offered:
            raise ValueError(
                f"inference variant {variant!r}: the attached PEFT methods "
                f"{[m.name for m in self.methods]} offer {[NORMAL, *offered]}"
            )
        return InferenceInputs(tuple(self.methods), variant, seed)

    def generation_stats(self, model: nn.Module, batch: GeneratedBatch) -> GenerationStats:
        """Every method's :meth:`PeftMethod.generation_stats` of one batch of evaluation
        generations: the metrics under the names the methods give (two methods giving one name
        → ValueError), the details as ``<method>.<key>``."""
        metrics: dict[str, list[float | None]] = {}
        details: dict[str, list[Any]] = {}
        n = len(batch.generated)
        for m in self.methods:
            stats = m.generation_stats(model, batch)
            if stats is None:
                continue
            for key, values in [*stats.metrics.items(), *stats.details.items()]:
                if len(values) != n:
                    raise ValueError(
                        f"PEFT method {m.name!r}: generation stat {key!r} has {len(values)} "
                        f"values for {n} generated rows"
                    )
            for name, values in stats.metrics.items():
                if name in metrics:
                    raise ValueError(f"PEFT method {m.name!r}: metric {name!r} is given twice")
                metrics[name] = list(values)
            details.update({f"{m.name}.{k}": list(v) for k, v in stats.details.items()})
        return GenerationStats(metrics, details)

    # -- bookkeeping -----------------------------------------------------------------------
    def method(self, name: str) -> PeftMethod | None:
        return next((m for m in self.methods if m.name == name), None)

    def count_trainable(self, model: nn.Module) -> tuple[int, float]:
        return count_trainable(model, *[m.module for m in self.methods])

    def chain_trained(self, before: list[str]) -> list[str]:
        """The methods trained in this stage or (``before``: the parent's record) earlier in
        the chain: what a PT-PEFT chain fine-tunes in all."""
        return sorted(set(before) | {m.name for m in self.trained()})

    def count_chain(self, model: nn.Module, before: list[str]) -> tuple[int, float]:
        """``(params, %)`` of the union of what this stage trains and what the methods in
        ``before`` trained in earlier stages (each parameter once): seed 003 Table 2's count
        of a chain, e.g. prefix→LoRA = prefix + LoRA even when its last stage trains one."""
        unknown = sorted(set(before) - {m.name for m in self.methods})
        if unknown:
            raise ValueError(f"methods {unknown} trained earlier in the chain are not attached")
        earlier = [p for m in self.methods if m.name in before for p in m.trainable_parameters()]
        return count_trainable(model, *[m.module for m in self.methods], also=earlier)

    def modules_outside(self, model: nn.Module) -> list[nn.Module]:
        """The methods' modules holding parameters that are not in ``model``'s module tree
        (e.g. the prefix encoder, which feeds the forward through :meth:`forward_kwargs`): a
        distributed wrapper of ``model`` alone would not all-reduce / shard their gradients,
        so the trainer wraps them with it (``vlalign.train.loop.TrainForward``)."""
        inside = {id(p) for p in model.parameters()}
        return [
            m.module
            for m in self.methods
            if m.module is not None and any(id(p) not in inside for p in m.module.parameters())
        ]

    def state_dict(self) -> dict[str, dict]:
        return {m.name: m.state_dict() for m in self.methods}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for m in self.methods:
            m.load_state_dict(state[m.name], source="checkpoint")

    def save(self, directory: Path) -> None:
        save_methods(self.methods, directory)

    def strip(self) -> None:
        """Take every method out of the LM, last attached first (each undoes its own
        attachment), so that ``save_pretrained`` writes the clean base model. The session is
        unusable afterwards."""
        for m in reversed(self.methods):
            if m.applied:
                m.remove()


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
            differ = {
                k: v
                for k, v in cfg.items()
                # a budget leaves its key None until the method is sized on the LM
                if method.cfg.get(k) != v and not (v is None and k == method.budget_key)
            }
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
    for m in methods:
        m.check_composition(methods, lrs)
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
