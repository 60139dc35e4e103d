"""Full fine-tuning of the LM (seed 003 "Full-FT"): every LM parameter is trained except, by
default, the word embeddings and the LM head (frozen throughout for captioning, App. B.5).

Vision encoder and projector are not touched. With tied embeddings (Qwen2.5-0.5B) embedding and
head are one tensor: ``train_embeddings`` and ``train_lm_head`` must then agree.
Saving writes the trained LM tensors only (everything but the frozen embeddings/head and the
parameters of other PEFT methods). Key names are taken when ``full`` is applied, so reload a
composition in the same order (:func:`vlalign.methods.load_methods` does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from vlalign.methods.registry import (
    PeftMethod,
    decoder_layers,
    embedding_parameters,
    owner,
    register,
)


@register("full")
class FullFineTuning(PeftMethod):
    # layers: None trains every LM weight; a list of decoder-layer indices (negative from the
    # end) trains only those layers' weights: [-1] is PETAL's "head tuning" baseline (seed 001
    # §4: only the last layer tuned)
    defaults: dict[str, Any] = {"layers": None}
    adds_parameters = False  # trains the LM's own weights: no budget, no share of its own

    def _attach(self, lm: nn.Module, cfg: dict[str, Any]) -> nn.Module:
        # fixed at attach time: parameters of methods applied before (LoRA, adapters) or after
        # stay theirs, so nothing is saved or optimised twice
        emb, head = embedding_parameters(lm)
        excluded = {id(p) for p in emb + head}  # handled by the common train_* flags
        allowed = None
        if cfg["layers"] is not None:
            layers = decoder_layers(lm)
            try:
                chosen = [layers[int(i)] for i in cfg["layers"]]
            except (IndexError, TypeError, ValueError):
                raise ValueError(
                    f"PEFT method 'full': layers {cfg['layers']!r} must be indices of the LM's "
                    f"{len(layers)} decoder layers (negative from the end)"
                ) from None
            allowed = {id(p) for layer in chosen for p in layer.parameters()}
        self._params = {
            f"lm.{n}": p
            for n, p in lm.named_parameters()
            if id(p) not in excluded and owner(p) is None and (allowed is None or id(p) in allowed)
        }
        return lm

    def _own_parameters(self) -> dict[str, nn.Parameter]:
        self._require_applied()
        return dict(self._params)

    def check_composition(self, methods: Sequence[PeftMethod], lrs: Mapping[str, float]) -> None:
        wrapping = [m.name for m in methods if m is not self and m.wraps_base_layers]
        if lrs.get(self.name, 0) > 0 and wrapping:
            raise ValueError(
                f"peft: training {self.name!r} while {', '.join(map(repr, wrapping))} is "
                f"attached is not supported (the saved base model would mix "
                f"{', '.join(wrapping)} and fine-tuned weights)"
            )
