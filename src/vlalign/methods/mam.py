"""KLAFT's modified attention mechanism (``mam``): one gated dual-mask block (seed 000 §3.3).

Seed 000 Eq. 2: ``MAM(Q,K,V) = B ⊙ softmax(QKᵀ/√d + M_c)V + (1−B) ⊙ softmax(QKᵀ/√d + M_s)V``,
``B = σ(A)·1[σ(A) > μ]``, ``A = [H_I ⊕ H_T] W_b + C_b``, ``W_b ∈ R^{d_h×n}``, ``C_b ∈ R^{n×n}``,
"fed to a feedforward layer with ReLU". Resolutions (choices; the shared reading is
``/work/shared/notes/klaft-petal-reading.md``, ``docs/klaft/mam.md`` lists them all):

- **Placement** (choice; §3.1 "between the top layer … and the LM Head" vs §3.3 "on top of each
  layer"): *one* block after the LM's last decoder layer, before its final norm and head, by a
  forward hook on that layer (:func:`vlalign.methods.registry.decoder_layers`).
- **Block shape** (choice): pre-norm residual, ``h += o(MAM(norm(h)))`` then
  ``h += down(ReLU(up(norm(h))))``, RMSNorm with the LM's epsilon. Q, K, V come from the normed
  hidden states; no rotary / positional encoding inside the block (its input, the last layer's
  output, already encodes position; ``C_b`` is indexed by position). As many K/V heads as query
  heads (no GQA).
- **B gates the attention probabilities** (choice: B is n×n, V is n×d): ``B`` multiplies the two
  *probability* matrices elementwise before the product with V; one gate shared by the heads,
  or one per head with ``gate_per_head``.
- **n** (choice): ``W_b`` and ``C_b`` are sized to ``max_len`` positions and indexed by the
  **position ids** of the query (row of ``C_b``) and of the key (column of ``W_b`` and ``C_b``),
  not by tensor column, so left / right padding, packed rows and cached decoding give the same
  gate to the same pair of positions. A position ``>= max_len`` is an error naming ``max_len``.
  ``[H_I ⊕ H_T]`` is the block's (normed) input at the query position.
- **μ** (choice: not given): config ``mu``, default 0.5. The threshold is hard: ``σ(A) <= μ``
  gives exactly 0 (and zero gradient).
- **M_c** = the mask the LM's last layer received (the run's mask: ``prefix`` by default, see
  :mod:`vlalign.models.masks`; padding masked). **M_s** (choice, "independent" in Fig. 1):
  ``M_c`` restricted to pairs of the same modality — image↔image as in ``M_c``, text→text as in
  ``M_c`` (causal), no text→image (and no image→text, which ``M_c`` already forbids except under
  ``bidirectional``). Image positions are those ``< P + N`` (:mod:`vlalign.models.modality`,
  recorded at the start of every LM forward by a pre-hook, so gradient checkpointing's
  recomputation sees the same modalities).
- **Gate initialisation** (choice): ``W_b = 0`` and ``C_b = logit(gate_init)``, ``gate_init`` 0.9
  > μ: the gate starts open (B = 0.9 everywhere, mostly ``M_c``, the mask the aligned model was
  trained with). A gate starting below μ would be B = 0 with zero gradient, stuck at ``M_s``
  (text would never read the image through MAM), so ``gate_init <= mu`` is refused.
- **Identity at attach** (choice): the attention output projection and the FFN's down projection
  start at zero, so attaching MAM to an aligned model changes nothing until it trains.
- **A K/V prefix** (``prefix``): its P positions are keys of the LM's layers only; MAM attends
  the sequence's own positions (the mask's leading P columns are dropped).

Cached generation: the block's keys, values and their position ids live in the LM's own
``Cache`` as one extra layer (index = the number of decoder layers, a :class:`MamCacheLayer`),
so ``crop``, beam reordering and ``batch_repeat_interleave`` apply to it with the LM's layers.
Attention implementations: sdpa and eager (a 4D bool / additive mask or None); a BlockMask
(flex attention) is refused with an error.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.cache_utils import Cache, DynamicLayer

from vlalign.methods.registry import PeftMethod, decoder_layers, register, text_config
from vlalign.models.modality import image_end


def threshold_gate(a: torch.Tensor, mu: float) -> torch.Tensor:
    """``B = σ(A)·1[σ(A) > μ]`` (seed 000 Eq. 2): exactly 0 at or below μ, σ(A) above."""
    s = torch.sigmoid(a)
    return s * (s > mu).to(s.dtype)


def layer_mask_allowed(
    mask: Any, batch: int, q_len: int, kv_len: int, device: torch.device
) -> torch.Tensor:
    """``(B, 1, q, kv)`` bool (True: may attend) of the mask a decoder layer received, over its
    last ``kv_len`` key columns (leading columns of a K/V prefix are dropped).

    ``None`` is what sdpa gets when it may use ``is_causal`` (no padding, and one query or as
    many queries as keys): causal, aligned at the last key. A 4D tensor is bool (sdpa) or
    additive float (eager, 0 / finfo.min)."""
    if mask is None:
        q = torch.arange(q_len, device=device)[:, None]
        k = torch.arange(kv_len, device=device)[None, :]
        return (k <= q + (kv_len - q_len)).expand(batch, 1, q_len, kv_len)
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        what = f"{mask.dim()}D" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise TypeError(
            f"mam: the last decoder layer received an attention mask {what}; MAM supports "
            "sdpa and eager attention (a 4D mask or None), not flex attention"
        )
    allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
    if allowed.shape[-1] < kv_len or allowed.shape[-2] != q_len or allowed.shape[1] != 1:
        raise ValueError(
            f"mam: layer mask {tuple(mask.shape)} does not fit {q_len} queries over {kv_len} "
            "MAM keys (a cache that MAM did not fill from the start of the sequence?)"
        )
    return allowed[..., -kv_len:].expand(batch, 1, q_len, kv_len)


def modality_independent(
    allowed_c: torch.Tensor, image_q: torch.Tensor, image_k: torch.Tensor
) -> torch.Tensor:
    """``M_s``: ``allowed_c`` ``(B, 1, q, kv)`` where query and key are of the same modality
    (``image_q`` ``(B, q)``, ``image_k`` ``(B, kv)``; a choice, see the module doc)."""
    same = image_q[:, None, :, None] == image_k[:, None, None, :]
    return allowed_c & same


def masked_softmax(scores: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """Softmax over the allowed keys; a row with none allowed (a pad query) is all zeros."""
    filled = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(filled, dim=-1) * allowed.to(scores.dtype)


def dual_mask_probs(
    scores: torch.Tensor, allowed_c: torch.Tensor, allowed_s: torch.Tensor, gate: torch.Tensor
) -> torch.Tensor:
    """``B ⊙ softmax(S + M_c) + (1−B) ⊙ softmax(S + M_s)`` (seed 000 Eq. 2 before ``·V``);
    ``scores`` ``(B, h, q, kv)``, ``gate`` ``(B, 1 or h, q, kv)``."""
    return gate * masked_softmax(scores, allowed_c) + (1 - gate) * masked_softmax(scores, allowed_s)


def _at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """Softmax and gate in float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class MamCacheLayer(DynamicLayer):
    """MAM's keys / values in the LM's cache, with the position id of every cached key (the
    gate's column and the key's modality); every cache operation keeps them aligned."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.positions: torch.Tensor | None = None

    def append(
        self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append ``(B, h, q, d)`` keys/values at ``(B, q)`` positions; returns all cached."""
        k, v = super().update(keys, values)
        prev = self.positions
        self.positions = (
            positions if prev is None or prev.numel() == 0 else torch.cat([prev, positions], dim=-1)
        )
        return k, v, self.positions

    def reset(self) -> None:
        super().reset()
        self.positions = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if tokens_to_remove < 0 and self.positions is not None:
            self.positions = self.positions[:, :tokens_to_remove]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None and self.positions.numel():
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None and self.positions.numel():
            self.positions = self.positions.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None and self.positions.numel():
            self.positions = self.positions[indices]


class MamBlock(nn.Module):
    """Pre-norm gated dual-mask attention + ReLU FFN, each residual (see the module doc).

    ``W_b`` is ``gate_proj`` (``hidden → G·max_len``, G = heads with ``gate_per_head`` else 1),
    ``C_b`` is ``gate_bias`` ``(G, max_len, max_len)``."""

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        ffn_dim: int,
        max_len: int,
        mu: float,
        gate_per_head: bool,
        gate_init: float,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if hidden % num_heads:
            raise ValueError(f"mam: hidden size {hidden} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, hidden // num_heads
        self.max_len, self.mu = max_len, float(mu)
        self.gates = num_heads if gate_per_head else 1
        self.attn_norm = nn.RMSNorm(hidden, eps=eps)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, hidden)
        self.gate_proj = nn.Linear(hidden, self.gates * max_len, bias=False)  # W_b
        self.gate_bias = nn.Parameter(  # C_b
            torch.full((self.gates, max_len, max_len), math.log(gate_init / (1 - gate_init)))
        )
        self.ffn_norm = nn.RMSNorm(hidden, eps=eps)
        self.up = nn.Linear(hidden, ffn_dim)
        self.down = nn.Linear(ffn_dim, hidden)
        for layer in (self.out, self.down, self.gate_proj):  # identity, uniform gate at init
            nn.init.zeros_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        self.last_gate_stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def gate(self, x: torch.Tensor, pos_q: torch.Tensor, pos_k: torch.Tensor) -> torch.Tensor:
        """``B`` ``(B, G, q, kv)`` from the normed input ``x`` ``(B, q, d)`` at query positions
        ``pos_q`` ``(B, q)`` and key positions ``pos_k`` ``(B, kv)``."""
        batch, q_len, _ = x.shape
        wb = self.gate_proj(x).view(batch, q_len, self.gates, self.max_len)
        index = pos_k[:, None, None, :].expand(batch, q_len, self.gates, pos_k.shape[1])
        a = wb.gather(-1, index).permute(0, 2, 1, 3)  # (B, G, q, kv)
        cb = self.gate_bias[:, pos_q[:, :, None], pos_k[:, None, :]]  # (G, B, q, kv)
        return threshold_gate(_at_least_fp32(a + cb.permute(1, 0, 2, 3)), self.mu)

    def attention_probs(
        self,
        x: torch.Tensor,
        keys: torch.Tensor,
        allowed_c: torch.Tensor,
        allowed_s: torch.Tensor,
        pos_q: torch.Tensor,
        pos_k: torch.Tensor,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The mixed probabilities ``(B, h, q, kv)`` of Eq. 2 (float32 at least)."""
        q = self._heads(self.query(x)) if queries is None else queries
        q, keys = _at_least_fp32(q), _at_least_fp32(keys)
        scores = (q @ keys.transpose(-1, -2)) / math.sqrt(self.head_dim)
        gate = self.gate(x, pos_q, pos_k)
        with torch.no_grad():  # diagnostics: the gate on the text→image pairs M_c allows
            cross = (allowed_c & ~allowed_s).expand_as(gate)
            self.last_gate_stats = (
                torch.stack([(gate * cross).sum(), ((gate > 0) & cross).sum().to(gate.dtype)]),
                cross.sum().to(gate.dtype),
            )
        return dual_mask_probs(scores, allowed_c, allowed_s, gate)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        batch, length, _ = t.shape
        return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        hidden: torch.Tensor,
        layer_mask: Any,
        position_ids: torch.Tensor,
        end: int | None,
        cache: MamCacheLayer | None = None,
    ) -> torch.Tensor:
        """``hidden`` ``(B, q, d)`` after the block; ``layer_mask``: what the LM layer got;
        ``end``: first text position (None: every position is text)."""
        batch, q_len, _ = hidden.shape
        pos_q = position_ids.expand(batch, q_len).long()
        x = self.attn_norm(hidden)
        q, k, v = (self._heads(p(x)) for p in (self.query, self.key, self.value))
        if cache is not None:
            k, v, pos_k = cache.append(k, v, pos_q)
        else:
            pos_k = pos_q
        top = int(torch.maximum(pos_q.max(), pos_k.max()))
        if top >= self.max_len or int(torch.minimum(pos_q.min(), pos_k.min())) < 0:
            raise ValueError(
                f"mam: position id {top} is outside max_len {self.max_len}; raise peft.mam."
                "max_len to cover the K/V prefix + image tokens + text length"
            )
        allowed_c = layer_mask_allowed(layer_mask, batch, q_len, k.shape[-2], hidden.device)
        if end is None:
            allowed_s = allowed_c
        else:
            allowed_s = modality_independent(allowed_c, pos_q < end, pos_k < end)
        probs = self.attention_probs(x, k, allowed_c, allowed_s, pos_q, pos_k, queries=q)
        attn = (probs.to(v.dtype) @ v).transpose(1, 2).reshape(batch, q_len, -1)
        hidden = hidden + self.out(attn)
        return hidden + self.down(F.relu(self.up(self.ffn_norm(hidden))))


class _ModalityEnd:
    """The first text position of the LM forward in progress (None: all text), recorded by
    the method's pre-hook at the start of every LM forward and kept until the next one."""

    def __init__(self) -> None:
        self.end: int | None = None


@register("mam")
class MamMethod(PeftMethod):
    """KLAFT's MAM (seed 000 Eq. 2, see the module doc): a :class:`MamBlock` registered on the
    LM (``lm.mam``: it follows ``.to()`` / ``.train()``), a forward hook on the last decoder
    layer that runs it, and a pre-hook on the LM that records the image span.
    :meth:`remove` takes all three out."""

    defaults = {
        "mu": 0.5,  # μ, the gate threshold (choice: the paper gives none)
        "max_len": 512,  # n: positions W_b / C_b cover (K/V prefix + image + text)
        "num_heads": None,  # None → the LM's num_attention_heads
        "ffn_dim": None,  # None → the LM's intermediate_size
        "gate_per_head": False,  # one gate shared by the heads (choice)
        "gate_init": 0.9,  # σ(C_b) at init, > μ: the gate starts open (choice)
    }

    @classmethod
    def resolve_config(cls, cfg: Mapping[str, Any] | None) -> dict[str, Any]:
        """The base resolution, then the values checked (at plan time, like unknown keys)."""
        out = super().resolve_config(cfg)
        mu, init = out["mu"], out["gate_init"]
        for key in ("mu", "gate_init"):
            if isinstance(out[key], bool) or not isinstance(out[key], (int, float)):
                raise ValueError(f"mam: {key} must be a number, got {out[key]!r}")
        if not 0 <= mu < 1:
            raise ValueError(f"mam: mu must be in [0, 1), got {mu!r}")
        if not mu < init < 1:
            raise ValueError(
                f"mam: gate_init must be in (mu, 1) = ({mu}, 1), got {init!r}: a gate starting "
                "at or below mu is 0 with zero gradient (stuck at the modality-independent mask)"
            )
        for key in ("max_len", "num_heads", "ffn_dim"):
            v = out[key]
            if v is None and key != "max_len":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"mam: {key} must be an integer >= 1, got {v!r}")
        if not isinstance(out["gate_per_head"], bool):
            raise ValueError(
                f"mam: gate_per_head must be true or false, got {out['gate_per_head']!r}"
            )
        return out

    def _attach(self, lm: nn.Module, cfg: dict[str, Any]) -> nn.Module:
        if hasattr(lm, self.name):
            raise ValueError(f"this LM already holds a {self.name!r} module; apply mam only once")
        text = text_config(lm)
        layers = decoder_layers(lm)
        ref = next(lm.parameters())
        block = MamBlock(
            text.hidden_size,
            int(cfg["num_heads"] or text.num_attention_heads),
            int(cfg["ffn_dim"] or text.intermediate_size),
            int(cfg["max_len"]),
            float(cfg["mu"]),
            bool(cfg["gate_per_head"]),
            float(cfg["gate_init"]),
            eps=float(getattr(text, "rms_norm_eps", 1e-6)),
        )
        block = block.to(device=ref.device, dtype=ref.dtype).train(lm.training)
        lm.add_module(self.name, block)
        self._cache_index = len(layers)  # MAM's layer in the LM's cache: after the LM's own
        self._state = _ModalityEnd()
        self._handles: list[RemovableHandle] = [
            lm.register_forward_pre_hook(self._record_end),
            layers[-1].register_forward_hook(self._run_block, with_kwargs=True),
        ]
        return block

    def _record_end(self, lm: nn.Module, args: tuple) -> None:
        self._state.end = image_end(lm)

    def _cache_layer(self, cache: Cache | None) -> MamCacheLayer | None:
        """MAM's layer of ``cache`` (appended on the first call of a forward over it)."""
        if cache is None:
            return None
        layers = cache.layers
        if len(layers) == self._cache_index:
            layers.append(MamCacheLayer())
        layer = layers[self._cache_index] if len(layers) > self._cache_index else None
        if not isinstance(layer, MamCacheLayer):
            raise ValueError(
                f"mam: the cache has {len(layers)} layers where MAM expects its own at index "
                f"{self._cache_index} (after the LM's {self._cache_index} layers)"
            )
        return layer

    def _run_block(self, layer: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any):
        hidden = output[0] if isinstance(output, tuple) else output
        position_ids = kwargs.get("position_ids")
        if position_ids is None:
            raise ValueError("mam: the last decoder layer was called without position_ids")
        assert self.module is not None
        out = self.module(
            hidden,
            kwargs.get("attention_mask"),
            position_ids,
            self._state.end,
            self._cache_layer(kwargs.get("past_key_values")),
        )
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def extra_metrics(self) -> dict[str, float]:
        """``gate_mean``: mean B over the text→image pairs of the last forward that M_c allows
        (what the gate decides); ``gate_open``: the fraction of them with B > 0."""
        stats = getattr(self.module, "last_gate_stats", None)
        if stats is None or float(stats[1]) == 0:
            return {}
        (total, n_open), n = stats
        return {"gate_mean": float(total / n), "gate_open": float(n_open / n)}

    def _own_parameters(self) -> dict[str, nn.Parameter]:
        assert self.module is not None
        return {f"{self.name}.{n}": p for n, p in self.module.named_parameters()}

    def _detach(self) -> None:
        """Hooks and block out: the LM is the base model again."""
        for handle in self._handles:
            handle.remove()
        lm = self._require_applied()
        if getattr(lm, self.name, None) is self.module:
            delattr(lm, self.name)
