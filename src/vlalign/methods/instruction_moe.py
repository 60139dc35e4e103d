"""Adaptive instruction mixture-of-experts (PETAL, seed 001 §3.3, Eq. 3–4).

PETAL Eq. 3–4: K experts, each an elementwise affine map of the instruction representation x,

    y_k = γ_k ⊙ x + β_k                                    (Eq. 3)
    g_k = exp G(x, y_k) / Σ_j exp G(x, y_j)                (Eq. 4)
    I_in = Σ_k g_k y_k

with the enhanced instruction ``I_in`` replacing x. Choices where the paper is open (the
first ones are this project's reading of the paper, docs/petal.md lists them all):

- *x* (assumption): the LM's input embeddings of the instruction tokens. The method hooks the
  LM's input embedding module (``lm.get_input_embeddings()``), which sees the token ids, and
  replaces its output at the instruction positions; every other position is left untouched.
- *Instruction tokens* (assumption): in the text format ``<bos> <inst> I1 <inst> I2 ... <inst>
  task_prompt <ans> target <eos>`` (VQA conversations ``<bos> <inst> question <ans> answer
  <eos> ...``), the tokens after an ``<inst>`` and before the next ``<ans>``, markers excluded
  (:func:`instruction_mask`). A span that no ``<ans>`` closes (a truncated row, a generated
  ``<inst>``) holds no instruction tokens. The ids come from the VLM's ``special_token_ids``
  (the config keys ``inst_token_id`` / ``ans_token_id`` override them, and are needed for a
  bare LM).
- *G* (assumption, "a neural network"): a small MLP on ``[mean(x); mean(y_k)]``, the means per
  row over its instruction tokens (``mean(y_k) = γ_k ⊙ mean(x) + β_k``): a hidden layer
  ``GELU(W u + b)`` (width ``gate_hidden``) shared by the experts, then one output row per
  expert, ``G_k(u) = w_kᵀ GELU(W u + b) + c_k``. Why per-expert outputs: the experts start
  identical (the identity, below); a gate that sees only ``(x, y_k)`` then gives every expert the
  same logit, so the gate is uniform, every expert gets the same gradient (AdamW keeps them equal)
  and the K experts collapse into one for the whole run. With per-expert output rows the gate is
  already row- and expert-dependent at init, the experts' gradients differ from the first step and
  they separate (tested). One gate vector per row: the row's instruction tokens all get the same
  mixture, ``I_in = (Σ_k g_k γ_k) ⊙ x + Σ_k g_k β_k``. A row without instruction tokens is
  unchanged.
- *Expert form*: Eq. 3 as printed (γ_k, β_k ∈ R^d); App. E's count (``H_t × 64 × 2 × 3``) implies
  a bottleneck per expert, which contradicts Eq. 3, so Eq. 3 is followed.
- *Init*: γ_k = 1, β_k = 0: every expert is the identity, so at initialisation the output is x
  exactly, whatever the gate (computed as ``x + (Σ g_k (γ_k − 1)) ⊙ x + Σ g_k β_k``, so no
  rounding of Σ g_k = 1 enters) and the model is the base model; G has PyTorch's default
  ``Linear`` init. K = 3 (``experts``: the paper's count plateaus at 3).

Generation: the cached path of :func:`vlalign.models.generation.generate` embeds each row's
prompt once (1-D ids, after its left pads), ``lm.generate`` then embeds single new tokens, which
are never instruction tokens; the no-cache path re-embeds ``prompt + generated`` and finds the
same spans, so both agree as long as the model does not generate ``<inst> … <ans>`` itself.
Limitation: the mean is over *all* instruction spans of a row, so in a multi-turn conversation
the first question's representation depends on the later questions too (never on answers).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlalign.methods.registry import PeftMethod, register, text_config


def instruction_mask(ids: torch.Tensor, inst_id: int, ans_id: int) -> torch.Tensor:
    """Bool mask (same shape as ``ids``, 1-D or ``(B, T)``) of the instruction tokens: after an
    ``<inst>`` with no ``<ans>`` in between, before a closing ``<ans>``; markers excluded."""
    if ids.dim() not in (1, 2):
        raise ValueError(f"token ids must be 1-D or (B, T), got shape {tuple(ids.shape)}")
    pos = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
    is_inst, is_ans = ids == inst_id, ids == ans_id
    none = torch.full_like(pos, -1)
    last_inst = torch.where(is_inst, pos, none).cummax(-1).values
    last_ans = torch.where(is_ans, pos, none).cummax(-1).values
    opened = (last_inst > last_ans) & ~is_inst  # an <ans> position has last_ans == itself
    closed = is_ans.flip(-1).long().cumsum(-1).flip(-1) > 0  # an <ans> at or after t
    return opened & closed


class InstructionMoE(nn.Module):
    """K affine experts ``y_k = γ_k ⊙ x + β_k`` mixed by a softmax gate (PETAL Eq. 3–4).

    Args:
        dim: d, the width of x (the LM hidden size).
        experts: K.
        gate_hidden: hidden width of the gate MLP G on ``[mean(x); mean(y_k)]`` (2d inputs).
    """

    def __init__(self, dim: int, experts: int = 3, gate_hidden: int = 64) -> None:
        super().__init__()
        if dim < 1 or experts < 1 or gate_hidden < 1:
            raise ValueError(
                f"instruction MoE needs dim, experts, gate_hidden >= 1; got {dim}, {experts}, "
                f"{gate_hidden}"
            )
        self.dim, self.experts = int(dim), int(experts)
        self.gamma = nn.Parameter(torch.ones(experts, dim))
        self.beta = nn.Parameter(torch.zeros(experts, dim))
        # G: a shared hidden layer, then one output row per expert (see the module doc)
        self.gate = nn.Sequential(nn.Linear(2 * dim, gate_hidden), nn.GELU())
        self.gate_out = nn.Linear(gate_hidden, experts)

    @staticmethod
    def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, d)`` mean of ``x`` ``(B, T, d)`` over the positions of ``mask`` ``(B, T)`` (0
        for a row without any)."""
        m = mask.unsqueeze(-1).to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp_min(1)

    def gates(self, mean_x: torch.Tensor) -> torch.Tensor:
        """``g`` ``(B, K)`` (Eq. 4) from the rows' mean instruction representation ``(B, d)``:
        ``softmax_k G_k([mean(x); γ_k ⊙ mean(x) + β_k])``, ``G_k(u) = w_kᵀ GELU(W u + b) + c_k``
        (W, b shared; w_k, c_k: row k of ``gate_out``)."""
        mean_y = self.gamma * mean_x.unsqueeze(1) + self.beta  # (B, K, d)
        both = torch.cat([mean_x.unsqueeze(1).expand_as(mean_y), mean_y], dim=-1)
        hidden = self.gate(both)  # (B, K, h)
        logits = (hidden * self.gate_out.weight).sum(-1) + self.gate_out.bias  # (B, K)
        return torch.softmax(logits.float(), dim=-1).to(mean_x.dtype)

    def mix(self, x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(output, g)``: :meth:`forward`'s output and the rows' gates ``(B, K)``."""
        g = self.gates(self.masked_mean(x, mask))
        scale = g @ (self.gamma - 1)  # (B, d): Σ g_k γ_k − 1 (exactly 0 at init)
        shift = g @ self.beta  # (B, d)
        out = x + scale.unsqueeze(1) * x + shift.unsqueeze(1)
        return torch.where(mask.unsqueeze(-1), out, x), g

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``x`` ``(B, T, d)`` with the positions of ``mask`` ``(B, T)`` replaced by
        ``Σ_k g_k y_k`` (the row's gate), every other position unchanged."""
        return self.mix(x, mask)[0]


@register("instruction_moe")
class InstructionMoEMethod(PeftMethod):
    """PETAL's adaptive instruction MoE (Eq. 3–4, see the module doc) as a PEFT method: an
    :class:`InstructionMoE` registered on the LM (``lm.instruction_moe``, so it follows
    ``.to()``) and a forward hook on the LM's input embeddings. :meth:`remove` takes both out."""

    defaults = {
        "experts": 3,  # K (PETAL: the gain plateaus at 3)
        "gate_hidden": 64,  # hidden width of the gate MLP G (assumption: not in the paper)
        "inst_token_id": None,  # None → the VLM's special_token_ids["inst"]
        "ans_token_id": None,  # None → the VLM's special_token_ids["ans"]
    }

    def _token_ids(self, cfg: dict[str, Any]) -> tuple[int, int]:
        specials = getattr(self.model, "special_token_ids", None) or {}
        ids = []
        for key, name in (("inst_token_id", "inst"), ("ans_token_id", "ans")):
            tid = cfg[key] if cfg[key] is not None else specials.get(name)
            if tid is None:
                raise ValueError(
                    f"PEFT method {self.name!r}: no id for the <{name}> token: the model has no "
                    f"special_token_ids[{name!r}] (a VisionLanguageModel built by "
                    f"vlalign.train.loop.build_model has it) and the config sets no {key}"
                )
            ids.append(int(tid))
        if ids[0] == ids[1]:
            raise ValueError(f"PEFT method {self.name!r}: <inst> and <ans> share the id {ids[0]}")
        return ids[0], ids[1]

    def _attach(self, lm: nn.Module, cfg: dict[str, Any]) -> nn.Module:
        self.inst_id, self.ans_id = self._token_ids(cfg)
        if hasattr(lm, self.name):
            raise ValueError(f"this LM already holds an {self.name!r} module; apply it only once")
        emb = lm.get_input_embeddings()
        ref = emb.weight
        dim = text_config(lm).hidden_size
        moe = InstructionMoE(dim, int(cfg["experts"]), int(cfg["gate_hidden"]))
        moe = moe.to(device=ref.device, dtype=ref.dtype).train(lm.training)
        lm.add_module(self.name, moe)
        self.last_gates: torch.Tensor | None = None
        self._handle: RemovableHandle = emb.register_forward_hook(self._hook(moe), with_kwargs=True)
        return moe

    def _hook(self, moe: InstructionMoE):
        def hook(module, args, kwargs, output):
            ids = args[0] if args else kwargs["input"]
            if ids.shape[-1] < 3:  # <inst> x <ans> at least: a generation step holds none
                return output
            flat = ids.dim() == 1
            ids2, x = (ids.unsqueeze(0), output.unsqueeze(0)) if flat else (ids, output)
            mask = instruction_mask(ids2, self.inst_id, self.ans_id)
            out, gates = moe.mix(x, mask)
            self.last_gates = gates.detach()  # (B, K) of the last embedding call (diagnostics)
            return out.squeeze(0) if flat else out

        return hook

    def _own_parameters(self) -> dict[str, nn.Parameter]:
        assert self.module is not None
        return {f"{self.name}.{n}": p for n, p in self.module.named_parameters()}

    def _detach(self) -> None:
        """Hook and module out: the LM is the base model again."""
        self._handle.remove()
        lm = self._require_applied()
        if getattr(lm, self.name, None) is self.module:
            delattr(lm, self.name)
