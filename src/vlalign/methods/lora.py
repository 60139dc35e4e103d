"""LoRA on the LM's attention projections via ``peft`` (seed 003 B.5: q, k, v; r=16, α=32,
dropout 0.05).

Injected into the *LM only* (``vlm.lm``) with ``peft.inject_adapter_in_model``: SigLIP uses the
same ``q_proj``/``k_proj``/``v_proj`` names, so targeting the whole VLM would adapt the vision
tower too. The LM stays a plain ``Qwen2ForCausalLM`` (``generate`` unchanged), only
its attention projections become ``lora.Linear`` wrappers. peft marks everything but the adapters
as frozen when injecting; we restore the previous ``requires_grad`` flags so that LoRA composes
with methods applied before it (e.g. ``full``).

The LoRA weights are saved by :meth:`PeftMethod.save` (keys = LM parameter names), independent
of any prefix (nesting under a peft prefix model lost them).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from vlalign.methods.registry import PeftMethod, register


def _tuner_layer() -> type:
    # peft is imported on first use: importing it costs ~4 s, and building the DAG (which
    # validates method blocks through the registry) needs no LoRA layer
    from peft.tuners.tuners_utils import BaseTunerLayer

    return BaseTunerLayer


@register("lora")
class LoraMethod(PeftMethod):
    wraps_base_layers = True  # q/k/v projections become lora.Linear wrappers
    budget_key = "r"
    defaults = {
        "r": 16,
        "alpha": 32,
        "dropout": 0.05,
        "target_modules": ["q_proj", "k_proj", "v_proj"],
        "adapter_name": "lora",
    }

    def size_for_budget(self, lm: nn.Module, n_params: int, cfg: Mapping[str, Any]) -> int:
        """Largest rank whose A (r × in) and B (out × r) matrices on every targeted linear
        layer fit in ``n_params``."""
        targets = set(cfg["target_modules"])
        per_rank = sum(
            m.in_features + m.out_features
            for name, m in lm.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in targets
        )
        if per_rank == 0:
            raise ValueError(f"LoRA budget: no linear layer named {sorted(targets)} in the LM")
        if n_params < per_rank:
            raise ValueError(
                f"LoRA budget {cfg['budget']!r} ({n_params} parameters) is below one rank "
                f"({per_rank} parameters on {sorted(targets)})"
            )
        return n_params // per_rank

    def _attach(self, lm: nn.Module, cfg: dict[str, Any]) -> nn.Module:
        from peft import LoraConfig, inject_adapter_in_model

        if any(isinstance(m, _tuner_layer()) for m in lm.modules()):
            raise ValueError("this LM already holds peft adapter layers; apply LoRA only once")
        peft_cfg = LoraConfig(
            r=int(cfg["r"]),
            lora_alpha=cfg["alpha"],
            lora_dropout=float(cfg["dropout"]),
            target_modules=cfg["target_modules"],
            bias="none",
        )
        flags = {id(p): p.requires_grad for p in lm.parameters()}
        try:
            inject_adapter_in_model(peft_cfg, lm, adapter_name=cfg["adapter_name"])
        except ValueError as err:  # e.g. "Target modules ... not found in the base model"
            raise ValueError(f"LoRA target_modules {cfg['target_modules']}: {err}") from err
        for p in lm.parameters():  # undo peft's "only adapters trainable" on existing params
            if id(p) in flags:
                p.requires_grad_(flags[id(p)])
        for module in lm.modules():  # new dropout modules start in train mode: follow the LM
            if isinstance(module, _tuner_layer()):
                module.train(lm.training)
        name = cfg["adapter_name"]
        layers = nn.ModuleDict()
        for mod_name, module in lm.named_modules():
            if isinstance(module, _tuner_layer()) and name in getattr(module, "lora_A", {}):
                key = mod_name.replace(".", "__")
                layers[key] = nn.ModuleDict({"A": module.lora_A[name], "B": module.lora_B[name]})
        return layers

    def _own_parameters(self) -> dict[str, nn.Parameter]:
        lm = self._require_applied()
        tag = f".{self.cfg['adapter_name']}."
        return {
            n: p for n, p in lm.named_parameters() if ("lora_A" in n or "lora_B" in n) and tag in n
        }

    def adapted_modules(self) -> list[str]:
        """LM module names that received LoRA (e.g. ``model.layers.0.self_attn.q_proj``)."""
        lm = self._require_applied()
        return [n for n, m in lm.named_modules() if isinstance(m, _tuner_layer())]

    def _unwrap(self, merge: bool) -> None:
        """Put the plain base layers back (``merge``: with ``B·A·α/r`` folded in first)."""
        lm = self._require_applied()
        for name, module in list(lm.named_modules()):
            if isinstance(module, _tuner_layer()):
                if merge:
                    module.merge(adapter_names=[self.cfg["adapter_name"]])
                parent_name, _, child = name.rpartition(".")
                parent = lm.get_submodule(parent_name) if parent_name else lm
                setattr(parent, child, module.get_base_layer())
        if hasattr(lm, "peft_config"):
            del lm.peft_config

    def _detach(self) -> None:
        # unmerged: the saved base model stays the one LoRA was trained on
        self._unwrap(merge=False)

    def merge_and_unload(self) -> nn.Module:
        """Fold ``B·A·α/r`` into the base weights and put the plain ``nn.Linear`` modules back,
        so the LM can be saved with ``save_pretrained`` and reloaded without peft. The method is
        detached afterwards (it owns no parameters any more)."""
        lm = self._require_applied()
        self._unwrap(merge=True)
        self.model, self.lm, self.module = None, None, None
        return lm
