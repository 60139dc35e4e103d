"""Score-based information bottleneck (PETAL, seed 001 §3.4, Eq. 5–9).

The paper: normalised attention weights ``α_i = softmax(H_iᵀ H_j)`` (Eq. 5) pool the features
into ``Ĥ = Σ_i α_i H_i``, on which an information-bottleneck objective ``max I(Z;Y) − η I(Z;X)``
(Eq. 6, with the mutual informations of Eq. 7–8) gives ``L_IB`` (Eq. 9), optimised together with
the task cross-entropy. H, the estimator of both mutual informations, η and how Z reaches the
model are not given. Resolutions used here (docs/petal.md lists them all),
each an **assumption**:

- *H* (assumption): this project has no Q-Former; H ``(B, N, d)`` are the projected image tokens
  (the output of the VLM's projector).
- *Scores* (assumption; Eq. 5 leaves ``H_j`` open): the query is the mean image token
  ``q = mean_i H_i`` (no parameters), ``α_i = softmax_i(H_i · q / √d)``, ``Ĥ = Σ_i α_i H_i``
  (one vector per image).
- *Z* (assumption): a variational bottleneck (Alemi et al. 2017) ``q(z|x) = N(μ(Ĥ),
  diag σ(Ĥ)²)``, ``μ`` and ``log σ`` linear heads ``d → z_dim``; ``z = μ + σ ⊙ ε`` (ε from
  torch's global RNG, which the trainer seeds and checkpoints) in training mode, ``z = μ`` in
  eval mode (generation, scoring, held-out loss: ``model.eval()``).
- *How Z enters the model* (assumption): ``z`` is mapped back to d by a linear layer and
  **appended as one extra soft image token** after the N image tokens, by a forward hook on the
  VLM's projector: the training forward, the scoring forwards and generation all see N + 1
  image tokens (``VLMOutput.num_image_tokens == N + 1``).
- *I(Z;X)* (assumption): bounded above by ``KL(q(z|x) ‖ N(0, I)) = ½ Σ_j (μ_j² + σ_j² − 1 −
  2 log σ_j)`` (closed form, summed over the z dimensions, mean over the batch:
  :func:`gaussian_kl`).
- *I(Z;Y)* (assumption): bounded below (up to a constant) by minus the task cross-entropy with z
  injected, which the trainer already minimises; so ``−L_IB = CE + η·KL`` and the method adds
  only ``η·KL``.
- *η* (assumption): config ``eta``, default 1e-3.
- *Init*: PyTorch's default ``Linear`` init for the three layers; unlike the instruction MoE the
  method is not the identity at init (the extra token exists from the first forward).

:meth:`InfoBottleneckMethod.extra_loss` returns the mapping ``{"kl": η·KL}`` — a named term,
already weighted, the trainer adds to the LM loss and logs as ``info_bottleneck.kl``. A mapping
of named terms is an allowed return type of :meth:`PeftMethod.extra_loss` besides one tensor.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlalign.methods.registry import PeftMethod, register, text_config


def gaussian_kl(mu: torch.Tensor, log_sigma: torch.Tensor) -> torch.Tensor:
    """``KL(N(μ, diag σ²) ‖ N(0, I))`` per row, summed over the last dimension:
    ``½ Σ (μ² + σ² − 1 − 2 log σ)`` (float32)."""
    mu, log_sigma = mu.float(), log_sigma.float()
    return 0.5 * (mu.square() + torch.exp(2 * log_sigma) - 1 - 2 * log_sigma).sum(-1)


def score_pool(h: torch.Tensor) -> torch.Tensor:
    """``Ĥ = Σ_i α_i H_i`` ``(B, d)`` with ``α_i = softmax_i(H_i · q / √d)``, ``q = mean_i H_i``
    (PETAL Eq. 5 with the mean image token as the query, an assumption)."""
    q = h.mean(dim=1, keepdim=True)  # (B, 1, d)
    scores = (h * q).sum(-1) / math.sqrt(h.shape[-1])  # (B, N)
    alpha = torch.softmax(scores.float(), dim=-1).to(h.dtype)
    return (alpha.unsqueeze(-1) * h).sum(1)


class InfoBottleneck(nn.Module):
    """Score pooling → ``q(z|x) = N(μ, diag σ²)`` → one soft token (PETAL Eq. 5–9, see the
    module doc). ``dim``: d, the width of the image tokens; ``z_dim``: the width of z."""

    def __init__(self, dim: int, z_dim: int = 32) -> None:
        super().__init__()
        if dim < 1 or z_dim < 1:
            raise ValueError(f"info bottleneck needs dim, z_dim >= 1; got {dim}, {z_dim}")
        self.mu = nn.Linear(dim, z_dim)
        self.log_sigma = nn.Linear(dim, z_dim)
        self.decoder = nn.Linear(z_dim, dim)

    def encode(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(μ, log σ)``, each ``(B, z_dim)``, of the image tokens ``h`` ``(B, N, d)``."""
        pooled = score_pool(h)
        return self.mu(pooled), self.log_sigma(pooled)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(tokens (B, N + 1, d), KL per row (B,))``: ``h`` with the soft token of z
        appended; z sampled in training mode, ``z = μ`` in eval mode."""
        mu, log_sigma = self.encode(h)
        z = mu
        if self.training:
            z = mu + torch.exp(log_sigma) * torch.randn_like(mu)
        token = self.decoder(z).to(h.dtype)
        return torch.cat([h, token.unsqueeze(1)], dim=1), gaussian_kl(mu, log_sigma)


@register("info_bottleneck")
class InfoBottleneckMethod(PeftMethod):
    """PETAL's score-based information bottleneck (Eq. 5–9, see the module doc) as a PEFT
    method: an :class:`InfoBottleneck` registered on the VLM (``vlm.info_bottleneck``: it follows
    ``.to()`` and ``.train()``/``.eval()``) and a forward hook on ``vlm.projector`` appending the
    soft token. Needs a ``VisionLanguageModel`` (a bare LM has no image tokens: ValueError).
    :meth:`remove` takes hook and module out (N image tokens again)."""

    defaults = {
        "z_dim": 32,  # width of z (assumption)
        "eta": 1e-3,  # η: weight of KL(q(z|x) ‖ N(0, I)), the bound on I(Z;X) (assumption)
    }

    def _attach(self, lm: nn.Module, cfg: dict[str, Any]) -> nn.Module:
        model = self.model
        projector = getattr(model, "projector", None)
        if model is lm or not isinstance(projector, nn.Module):
            raise ValueError(
                f"PEFT method {self.name!r} needs a VisionLanguageModel: it appends a soft token "
                f"to the projected image tokens, and {type(model).__name__} has no projector"
            )
        if hasattr(model, self.name):
            raise ValueError(f"this model already holds an {self.name!r} module; apply it once")
        ref = next(projector.parameters())
        ib = InfoBottleneck(text_config(lm).hidden_size, int(cfg["z_dim"]))
        ib = ib.to(device=ref.device, dtype=ref.dtype).train(model.training)
        model.add_module(self.name, ib)
        self.eta = float(cfg["eta"])
        self.last_kl: torch.Tensor | None = None
        self._handle: RemovableHandle = projector.register_forward_hook(self._hook(ib))
        return ib

    def _hook(self, ib: InfoBottleneck):
        def hook(module, args, output):
            tokens, kl = ib(output)
            if ib.training:  # the KL of the last training forward, for extra_loss
                self.last_kl = kl
            return tokens

        return hook

    def extra_loss(self, outputs: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """``{"kl": η · mean_batch KL(q(z|x) ‖ N(0, I))}`` of the last training forward (the one
        of ``outputs``), computed by the projector hook; consumed by this call."""
        kl, self.last_kl = self.last_kl, None
        if kl is None:
            raise RuntimeError(
                f"PEFT method {self.name!r}: extra_loss without a training-mode forward before "
                "it (the KL is computed by the projector hook in training mode only)"
            )
        rows = getattr(outputs, "logits", None)
        if rows is not None and rows.shape[0] != kl.shape[0]:
            raise RuntimeError(
                f"PEFT method {self.name!r}: the last training forward had {kl.shape[0]} rows, "
                f"these outputs {rows.shape[0]}"
            )
        return {"kl": self.eta * kl.mean()}

    def _own_parameters(self) -> dict[str, nn.Parameter]:
        assert self.module is not None
        return {f"{self.name}.{n}": p for n, p in self.module.named_parameters()}

    def _detach(self) -> None:
        """Hook and module out: the VLM has its N image tokens again."""
        self._handle.remove()
        self.last_kl = None
        if getattr(self.model, self.name, None) is self.module:
            delattr(self.model, self.name)
