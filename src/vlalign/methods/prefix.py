"""Prefix-tuning with the PT-PEFT prefix encoder (seed 003 §3, App. B.1 Fig. 6, Table 10).

Why our own module and not peft's ``PrefixTuningConfig``: peft rejects 4D masks,
cannot ``generate(inputs_embeds=...)``, cannot coexist with LoRA in one PeftModel, and nesting
loses the LoRA weights on save. Here the prefix is a plain ``nn.Module`` whose forward returns a
fresh ``DynamicCache`` of P key/value positions per layer; pass it as ``past_key_values`` and give
the attention mask P leading visible columns and position ids starting at P (the VLM forward and
``vlalign.models.generation.generate(inputs=...)`` do both).

Encoder (Fig. 6): ``e_i = E_prefix[i] + E_type[0]`` (the prefix *type* embedding is added like
BERT's token-type embedding) → Li & Liang MLP ``Linear → Tanh → Linear`` → per layer K and V of
shape ``(num_key_value_heads, P, head_dim)`` (GQA-aware). Table 10's ablations are config flags:
``use_type_embedding=False`` ("- prefix type embedding"), ``use_mlp=False`` ("- prefix MLP": the
embedding *is* the K/V), both ("- prefix encoder").

After training, :meth:`PrefixEncoder.freeze_to_prefixes` evaluates the encoder once and returns a
:class:`FrozenPrefix` holding the plain K/V tensors: identical outputs, no encoder at inference.
Saved and loaded as every method is (:meth:`PeftMethod.save`), encoder or frozen K/V alike.

Limitation: a cache-based prefix does not survive gradient checkpointing (v5's
``GradientCheckpointingLayer`` drops ``past_key_values``); :class:`PrefixMethod` refuses it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from vlalign.methods.registry import PeftMethod, register, tag_parameters, text_config

PREFIX_VARIANTS = ("normal", "removed", "noise")


def kv_geometry(lm_config: Any) -> tuple[int, int, int]:
    """``(num_layers, num_key_value_heads, head_dim)`` of a HF decoder config (GQA-aware)."""
    cfg = lm_config.get_text_config() if hasattr(lm_config, "get_text_config") else lm_config
    n_heads = cfg.num_attention_heads
    n_kv = getattr(cfg, "num_key_value_heads", None) or n_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // n_heads
    return int(cfg.num_hidden_layers), int(n_kv), int(head_dim)


class PrefixModule(nn.Module):
    """Common interface: :meth:`kv` → ``(layers, 2, kv_heads, P, head_dim)``; forward → cache."""

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, num_prefix: int):
        super().__init__()
        if min(num_layers, num_kv_heads, head_dim, num_prefix) < 1:
            raise ValueError(
                f"prefix geometry must be positive, got layers={num_layers}, "
                f"kv_heads={num_kv_heads}, head_dim={head_dim}, num_prefix={num_prefix}"
            )
        self.num_layers, self.num_kv_heads = num_layers, num_kv_heads
        self.head_dim, self.num_prefix = head_dim, num_prefix

    def kv(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        batch_size: int,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> DynamicCache:
        """A *fresh* ``DynamicCache`` with P positions per layer (the LM appends to it)."""
        kv = self.kv()
        if dtype is not None or device is not None:
            kv = kv.to(dtype=dtype or kv.dtype, device=device or kv.device)
        kv = kv.unsqueeze(2).expand(-1, -1, batch_size, -1, -1, -1)  # (L, 2, B, h, P, d)
        return DynamicCache([(kv[i, 0], kv[i, 1]) for i in range(self.num_layers)])


class PrefixEncoder(PrefixModule):
    """Learnable prefix embeddings + prefix type embedding → MLP → per-layer K/V (Fig. 6).

    Args:
        num_layers, num_kv_heads, head_dim: LM geometry (:func:`kv_geometry`).
        num_prefix: P (default 16; seed 003 App. C: gains plateau around 16).
        embed_dim: width of the prefix/type embeddings fed to the MLP (:meth:`for_lm` uses the
            LM hidden size, the width of the LM's own token embeddings).
        encoder_hidden: MLP hidden width (:meth:`for_lm`: the LM hidden size).
        use_type_embedding / use_mlp: Table 10 ablations (see module doc).
        dropout: dropout on the produced K/V during training (0 = none).
    """

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        num_prefix: int = 16,
        embed_dim: int = 512,
        encoder_hidden: int = 512,
        use_type_embedding: bool = True,
        use_mlp: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__(num_layers, num_kv_heads, head_dim, num_prefix)
        self.out_dim = num_layers * 2 * num_kv_heads * head_dim
        self.use_type_embedding, self.use_mlp = bool(use_type_embedding), bool(use_mlp)
        self.embed_dim = int(embed_dim) if use_mlp else self.out_dim
        self.encoder_hidden, self.dropout_p = int(encoder_hidden), float(dropout)
        self.prefix_embedding = nn.Embedding(num_prefix, self.embed_dim)
        # one "prefix" token type, added to every prefix position like a token-type embedding
        self.type_embedding = nn.Embedding(1, self.embed_dim) if use_type_embedding else None
        self.mlp = (
            nn.Sequential(
                nn.Linear(self.embed_dim, self.encoder_hidden),
                nn.Tanh(),
                nn.Linear(self.encoder_hidden, self.out_dim),
            )
            if use_mlp
            else None
        )
        self.dropout = nn.Dropout(self.dropout_p)

    @classmethod
    def for_lm(cls, lm: nn.Module, **kwargs: Any) -> PrefixEncoder:
        """Build for a HF LM, on its device; ``embed_dim``/``encoder_hidden`` default to the
        LM hidden size."""
        cfg = text_config(lm)
        layers, n_kv, head_dim = kv_geometry(cfg)
        kwargs.setdefault("embed_dim", cfg.hidden_size)
        kwargs.setdefault("encoder_hidden", cfg.hidden_size)
        device = next(lm.parameters()).device
        return cls(layers, n_kv, head_dim, **kwargs).to(device)

    def kv(self) -> torch.Tensor:
        x = self.prefix_embedding.weight  # (P, E)
        if self.type_embedding is not None:
            x = x + self.type_embedding.weight[0]
        if self.mlp is not None:
            x = self.mlp(x)
        x = self.dropout(x)
        # (P, L*2*h*d) → (L, 2, h, P, d): the layout DynamicCache wants per layer
        x = x.view(self.num_prefix, self.num_layers, 2, self.num_kv_heads, self.head_dim)
        return x.permute(1, 2, 3, 0, 4)

    @torch.no_grad()
    def freeze_to_prefixes(self) -> FrozenPrefix:
        """Evaluate the encoder once (eval mode: no dropout) into plain K/V tensors."""
        was_training = self.training
        self.eval()
        try:
            kv = self.kv().detach().clone()
        finally:
            self.train(was_training)
        return FrozenPrefix(kv)


class FrozenPrefix(PrefixModule):
    """Plain prefix K/V ``(layers, 2, kv_heads, P, head_dim)``, no encoder (inference form).

    Stored as a ``Parameter`` with ``requires_grad=False`` so it moves with ``.to()`` and could
    still be trained directly if wanted."""

    def __init__(self, kv: torch.Tensor, trainable: bool = False) -> None:
        if kv.dim() != 5 or kv.shape[1] != 2:
            raise ValueError(
                f"prefix kv must be (layers, 2, kv_heads, P, head_dim), got {kv.shape}"
            )
        layers, _, n_kv, p, head_dim = kv.shape
        super().__init__(layers, n_kv, head_dim, p)
        self.prefix_kv = nn.Parameter(kv.detach().clone(), requires_grad=trainable)

    def kv(self) -> torch.Tensor:
        return self.prefix_kv


def prefix_variant(
    prefix: PrefixModule, mode: str, generator: torch.Generator | None = None
) -> PrefixModule | None:
    """Inference variants of seed 003 Table 5.

    - ``normal``: the prefix as trained, frozen into plain K/V.
    - ``removed``: ``None`` — run without any prefix (no cache, no extra mask columns).
    - ``noise``: a :class:`FrozenPrefix` whose K and V are i.i.d. Gaussian noise with the same
      mean and std as the trained K (resp. V) *of each layer* (statistics over heads, positions
      and channels), so the noise has the trained prefix's scale but none of its content. It is
      drawn from ``generator`` (default: seed 0, never torch's unseeded global generator).
    """
    if mode not in PREFIX_VARIANTS:
        raise ValueError(f"unknown prefix variant {mode!r}; expected one of {PREFIX_VARIANTS}")
    if mode == "removed":
        return None
    frozen = prefix.freeze_to_prefixes() if isinstance(prefix, PrefixEncoder) else prefix
    kv = frozen.kv().detach()
    if mode == "normal":
        return FrozenPrefix(kv)
    dims = (2, 3, 4)
    mean = kv.float().mean(dim=dims, keepdim=True)
    std = kv.float().std(dim=dims, keepdim=True)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    noise = torch.randn(kv.shape, generator=generator, dtype=torch.float32)
    return FrozenPrefix((mean.cpu() + std.cpu() * noise).to(device=kv.device, dtype=kv.dtype))


def prefix_position_ids(attention_mask: torch.Tensor, num_prefix: int) -> torch.Tensor:
    """``P + cumsum(mask) - 1`` (pads clamped): explicit positions behind a K/V prefix. RoPE is
    not shift-invariant once un-rotated prefix keys exist, so always pass these."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0) + num_prefix


@register("prefix")
class PrefixMethod(PeftMethod):
    """Prefix-tuning as a registry method. The encoder is *not* inserted into the model: it is
    ``self.module`` and feeds each forward through :meth:`forward_kwargs` (training) or
    :meth:`inference_state` (generation and scoring), as ``past_key_values``. At every call it
    follows the LM's train/eval mode and device (moving it before the first optimiser step
    keeps AdamW state consistent; the parameters stay the same objects). Inference variants of
    seed 003 Table 5: ``removed``, ``noise`` (:func:`prefix_variant`)."""

    kv_prefix = True  # its K/V prefix is not supported on packed rows (train.packing)
    defaults = {
        "num_prefix": 16,
        "embed_dim": None,  # None → LM hidden size
        "encoder_hidden": None,  # None → LM hidden size
        "use_type_embedding": True,
        "use_mlp": True,
        "dropout": 0.0,
        "frozen": False,  # True: plain K/V (after :meth:`freeze`), nothing trainable
    }
    variants = tuple(v for v in PREFIX_VARIANTS if v != "normal")
    # the MLP width: P prefix vectors span at most P dimensions, so a width >= P loses nothing
    budget_key = "encoder_hidden"

    @classmethod
    def _check_budget_config(cls, cfg: Mapping[str, Any]) -> None:
        if not cfg["use_mlp"] or cfg["frozen"]:
            raise ValueError(
                "PEFT method 'prefix': a budget sizes the prefix MLP (encoder_hidden); it needs "
                "use_mlp: true and frozen: false"
            )

    def size_for_budget(self, lm: nn.Module, n_params: int, cfg: Mapping[str, Any]) -> int:
        """Largest MLP width H with P·E (+E type) + E·H + H + H·O + O <= ``n_params``
        (E: embedding width, O: K/V width of all layers)."""
        text = text_config(lm)
        layers, n_kv, head_dim = kv_geometry(text)
        e = cfg["embed_dim"] or text.hidden_size
        out = layers * 2 * n_kv * head_dim
        fixed = cfg["num_prefix"] * e + (e if cfg["use_type_embedding"] else 0) + out
        width = (n_params - fixed) // (e + 1 + out)
        if width < 1:
            raise ValueError(
                f"prefix budget {cfg['budget']!r} ({n_params} parameters) is below the "
                f"smallest prefix encoder ({fixed + e + 1 + out} parameters)"
            )
        return int(width)

    def _attach(self, lm: nn.Module, cfg: dict[str, Any]) -> nn.Module:
        names = [k for k in self.defaults if k != "frozen" and cfg[k] is not None]
        encoder = PrefixEncoder.for_lm(lm, **{k: cfg[k] for k in names})
        # a saved frozen prefix is restored into a same-shaped FrozenPrefix by load()
        return encoder.freeze_to_prefixes() if cfg["frozen"] else encoder

    def _own_parameters(self) -> dict[str, nn.Parameter]:
        assert self.module is not None
        return {f"prefix.{n}": p for n, p in self.module.named_parameters()}

    def _follow_lm(self) -> torch.nn.Parameter:
        """Put the encoder (it lives outside the model) in the LM's mode and on its device;
        returns an LM parameter (its dtype and device are the cache's)."""
        lm = self._require_applied()
        param = next(lm.parameters())
        assert self.module is not None
        self.module.train(lm.training)
        if next(self.module.parameters()).device != param.device:
            self.module.to(param.device)
        return param

    def cache_fn(self, batch_size: int) -> DynamicCache:
        """A fresh prefix cache in the LM's dtype/device."""
        lm = self._require_applied()
        checkpointing = getattr(lm, "is_activation_checkpointing", None)
        if checkpointing is None:  # older transformers
            checkpointing = getattr(lm, "is_gradient_checkpointing", False)
        if checkpointing and lm.training:
            raise RuntimeError(
                "prefix-tuning needs past_key_values, which gradient checkpointing drops in "
                "transformers 5 (GradientCheckpointingLayer); disable gradient checkpointing"
            )
        param = self._follow_lm()
        assert self.module is not None
        return self.module(batch_size, dtype=param.dtype, device=param.device)

    def forward_kwargs(self, batch_size: int) -> dict[str, Any]:
        return {"past_key_values": self.cache_fn(batch_size)}

    def inference_state(
        self, batch_size: int, variant: str = "normal", generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """The trained prefix (``normal``), none (``removed``: no cache, no extra mask columns)
        or noise of its per-layer statistics (``noise``, drawn from ``generator``)."""
        if variant == "normal":
            return {"past_key_values": self.cache_fn(batch_size)}
        param = self._follow_lm()
        assert self.module is not None
        prefix = prefix_variant(self.module, variant, generator=generator)
        if prefix is None:
            return {}
        return {"past_key_values": prefix(batch_size, dtype=param.dtype, device=param.device)}

    def set_trainable(self, trainable: bool) -> None:
        super().set_trainable(trainable and not self.cfg["frozen"])

    def freeze(self) -> FrozenPrefix:
        """Replace the encoder by its frozen K/V (inference form; nothing trainable remains;
        :meth:`save` then stores the plain K/V)."""
        self._require_applied()
        if isinstance(self.module, PrefixEncoder):
            self.module = self.module.freeze_to_prefixes()
            self.cfg["frozen"] = True
            tag_parameters(self.module.parameters(), self.name)
        self.set_trainable(False)
        assert isinstance(self.module, FrozenPrefix)
        return self.module
