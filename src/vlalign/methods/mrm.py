"""Masked region modelling (KLAFT, seed 000 §3.2, Eq. 7) as a PEFT method (``mrm``).

The paper masks 15 % of the visual tokens and regresses them with an L2 loss,
``L_MRM = E ||v̂_m − v_m||²``. What a masked token is replaced by, what the target is and what
predicts it are not given. Resolutions (``docs/klaft/mrm_itm.md``), each a **choice**:

- *Where* (choice, from the project's reading notes): the masking happens at the **projector
  input**, a forward pre-hook on the VLM's projector (KLAFT's MaL): the encoder features of the
  masked positions are replaced by one learned mask embedding ``e_mask ∈ R^{d_vision}``.
- *Which positions* (choice): per image, ``k = round(mask_ratio · N)`` (half up) positions,
  clamped to ``[1, N − 1]`` so that at least one is masked and one is visible, drawn uniformly
  without replacement from torch's global RNG (which the trainer seeds and checkpoints, as for
  ``info_bottleneck``'s ε); :meth:`MaskedRegionModelling.draw_positions` is the one place that
  draws (a test replaces it). Only when the image has more than one token (N ≤ 1: no masking,
  no loss term) and only in training mode: generation, scoring and the held-out loss
  (``model.eval()``) see the unmasked features and add nothing. Nor while the method is frozen
  (``set_trainable(False)``: re-attached from a parent stage, phase A of a chain): its loss is
  not added then, so masking would only corrupt the stage's input (choice).
- *Target* (choice): the frozen encoder feature ``v_m`` (``d_vision``) of each masked position,
  i.e. the projector's input before masking, detached.
- *Prediction* (choice): an MLP ``d_lm → head_hidden → d_vision`` (GELU) on the LM's last-layer
  (post-norm) hidden state at the masked image position; the projector keeps the token order,
  so image token i of the LM input is encoder token i (methods appending tokens after the N
  image tokens, ``itm``/``info_bottleneck``, do not move it).
- *Reduction* (choice): mean over the masked tokens and over the ``d_vision`` dimensions
  (``||v̂ − v||² / d_vision``, MSE) rather than the sum over dimensions: λ then means the same
  for encoders of any width (SigLIP's 1152 would make the summed loss dominate the CE).
- *Weight*: ``lambda`` (default 0.1, Eq. 9's λ_MRM); :meth:`MRMMethod.extra_loss` returns the
  already weighted term ``{"mrm": λ · L_MRM}`` (logged as ``mrm.mrm``).
- *Init* (choice): ``e_mask ~ N(0, 0.02²)`` (BERT's embedding init); the head's layers have
  PyTorch's default ``Linear`` init. In eval mode the method changes nothing (the logits of the
  model with ``mrm`` attached equal those of the base model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlalign.methods.registry import PeftMethod, register, text_config

MASK_INIT_STD = 0.02


def masked_count(n_tokens: int, ratio: float) -> int:
    """Masked tokens of an image of ``n_tokens`` (> 1): ``round(ratio · N)`` half up, clamped to
    ``[1, N − 1]`` (a choice, see the module doc)."""
    return min(max(int(ratio * n_tokens + 0.5), 1), n_tokens - 1)


def check_fraction(method: str, key: str, value: Any, low_open: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"PEFT method {method!r}: {key} must be a number, got {value!r}")
    ok = (0 < value < 1) if low_open else (value >= 0)
    if not ok:
        want = "in (0, 1)" if low_open else ">= 0"
        raise ValueError(f"PEFT method {method!r}: {key} must be {want}, got {value!r}")
    return float(value)


def check_width(method: str, key: str, value: Any, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        extra = " or null" if allow_none else ""
        raise ValueError(f"PEFT method {method!r}: {key} must be an integer >= 1{extra}, "
                         f"got {value!r}")
    return value


def require_vlm_projector(method: PeftMethod, lm: nn.Module, what: str) -> nn.Module:
    """The VLM's projector; ValueError when ``apply`` got a bare LM (no image tokens)."""
    model = method.model
    projector = getattr(model, "projector", None)
    if model is lm or not isinstance(projector, nn.Module):
        raise ValueError(
            f"PEFT method {method.name!r} needs a VisionLanguageModel: it {what}, and "
            f"{type(model).__name__} has no projector"
        )
    if hasattr(model, method.name):
        raise ValueError(f"this model already holds an {method.name!r} module; apply it once")
    return projector


def hidden_states_of(method: str, outputs: Any) -> torch.Tensor:
    """``outputs.hidden_states`` ``(B, N + T, H)``; a clear error when the forward did not
    return them (it was not given this method's :meth:`forward_kwargs`)."""
    hidden = getattr(outputs, "hidden_states", None)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise RuntimeError(
            f"PEFT method {method!r}: the training forward returned no last-layer hidden "
            "states; pass the method's forward_kwargs (output_hidden_states=True) to it"
        )
    return hidden


class MaskedRegionModelling(nn.Module):
    """The mask embedding and the regression head of KLAFT's MRM (seed 000 Eq. 7)."""

    def __init__(self, d_vision: int, d_lm: int, head_hidden: int | None = None) -> None:
        super().__init__()
        hidden = head_hidden or d_lm
        self.mask_embedding = nn.Parameter(torch.randn(d_vision) * MASK_INIT_STD)
        self.head = nn.Sequential(nn.Linear(d_lm, hidden), nn.GELU(), nn.Linear(hidden, d_vision))

    def draw_positions(self, batch: int, n_tokens: int, k: int, device) -> torch.Tensor:
        """``(B, k)`` distinct positions per row, uniform, from torch's global RNG."""
        return torch.rand(batch, n_tokens, device=device).argsort(dim=-1)[:, :k]

    def mask(self, feats: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``feats`` ``(B, N, d_vision)`` with the rows of ``positions`` replaced by e_mask."""
        keep = torch.ones(feats.shape[:2], dtype=torch.bool, device=feats.device)
        keep.scatter_(1, positions, False)
        return torch.where(keep[..., None], feats, self.mask_embedding.to(feats.dtype))


def gather_tokens(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``x[b, positions[b, j]]`` ``(B, k, D)`` of ``x`` ``(B, L, D)``."""
    return x.gather(1, positions[..., None].expand(-1, -1, x.shape[-1]))


def mrm_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_m ||v̂_m − v_m||² / d_vision`` (float32; the reduction is a choice, module doc)."""
    return F.mse_loss(pred.float(), target.float())


@dataclass
class _Masked:
    """What the last training forward masked: positions ``(B, k)``, targets ``(B, k, d)``."""

    positions: torch.Tensor
    targets: torch.Tensor
    n_tokens: int


@register("mrm")
class MRMMethod(PeftMethod):
    """KLAFT's masked region modelling (seed 000 Eq. 7, see the module doc): a
    :class:`MaskedRegionModelling` registered on the VLM (``vlm.mrm``: it follows ``.to()`` and
    ``.train()``/``.eval()``) and a forward pre-hook on ``vlm.projector`` masking its input in
    training mode. Needs a ``VisionLanguageModel``. :meth:`remove` takes hook and module out."""

    defaults = {
        "mask_ratio": 0.15,  # share of each image's visual tokens masked (seed 000 §3.2)
        "lambda": 0.1,  # λ_MRM of Eq. 9
        "head_hidden": None,  # width of the regression MLP's hidden layer (None: d_lm; choice)
    }

    @classmethod
    def resolve_config(cls, cfg: Mapping[str, Any] | None) -> dict[str, Any]:
        out = super().resolve_config(cfg)
        check_fraction(cls.name, "mask_ratio", out["mask_ratio"])
        check_fraction(cls.name, "lambda", out["lambda"], low_open=False)
        check_width(cls.name, "head_hidden", out["head_hidden"], allow_none=True)
        return out

    def _attach(self, lm: nn.Module, cfg: dict[str, Any]) -> nn.Module:
        projector = require_vlm_projector(self, lm, "masks the projector's input features")
        model = self.model
        d_vision = getattr(projector, "projector_config", {}).get("d_vision")
        if d_vision is None:
            d_vision = model.vision.config.hidden_size
        ref = next(projector.parameters())
        module = MaskedRegionModelling(
            int(d_vision), text_config(lm).hidden_size, cfg["head_hidden"]
        ).to(device=ref.device, dtype=ref.dtype).train(model.training)
        model.add_module(self.name, module)
        self.ratio, self.weight = float(cfg["mask_ratio"]), float(cfg["lambda"])
        self.last: _Masked | None = None
        self._trained_forward = False
        self.masking = True  # set_trainable (called by apply) keeps it
        self._handle: RemovableHandle = projector.register_forward_pre_hook(self._pre_hook)
        return module

    def set_trainable(self, trainable: bool) -> None:
        """Also switches the masking: a frozen MRM (re-attached from a parent stage, or phase A
        of a chain) adds no loss (the session adds only trained methods' terms), so masking its
        input would only corrupt what the stage trains on (a choice)."""
        super().set_trainable(trainable)
        self.masking = trainable

    @property
    def active(self) -> bool:
        """Masking this forward: training mode and the method trained."""
        return self.module.training and self.masking

    def _pre_hook(self, projector: nn.Module, args: tuple):
        module = self.module
        if not self.active:
            return None
        (feats, *rest) = args
        self._trained_forward, self.last = True, None
        batch, n = feats.shape[:2]
        if n <= 1:  # one visual token: nothing left to predict it from (module doc)
            return None
        k = masked_count(n, self.ratio)
        positions = module.draw_positions(batch, n, k, feats.device)
        if positions.shape != (batch, k):
            raise RuntimeError(
                f"PEFT method {self.name!r}: draw_positions gave shape "
                f"{tuple(positions.shape)}, expected {(batch, k)}"
            )
        positions = positions.to(feats.device)
        self.last = _Masked(positions, gather_tokens(feats, positions).detach(), n)
        return (module.mask(feats, positions), *rest)

    def forward_kwargs(self, batch_size: int) -> dict[str, Any]:
        """The loss reads the last-layer hidden states of the training forward only."""
        return {"output_hidden_states": True} if self.active else {}

    def extra_loss(self, outputs: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
        """``{"mrm": λ · L_MRM}`` of the last training forward (the one of ``outputs``); None
        when its images had a single token. Consumes the masking record."""
        masked, trained = self.last, self._trained_forward
        self.last, self._trained_forward = None, False
        if not trained:
            raise RuntimeError(
                f"PEFT method {self.name!r}: extra_loss without a training-mode forward before "
                "it (the projector hook masks in training mode only)"
            )
        if masked is None:
            return None
        hidden = hidden_states_of(self.name, outputs)
        if hidden.shape[0] != masked.positions.shape[0]:
            raise RuntimeError(
                f"PEFT method {self.name!r}: the last training forward had "
                f"{masked.positions.shape[0]} rows, these outputs {hidden.shape[0]}"
            )
        if outputs.num_image_tokens < masked.n_tokens:
            raise RuntimeError(
                f"PEFT method {self.name!r}: {outputs.num_image_tokens} image tokens for "
                f"{masked.n_tokens} encoder tokens; the projector must keep one token per feature"
            )
        pred = self.module.head(gather_tokens(hidden, masked.positions).to(self.module_dtype))
        return {"mrm": self.weight * mrm_loss(pred, masked.targets)}

    @property
    def module_dtype(self) -> torch.dtype:
        return self.module.mask_embedding.dtype

    def extra_metrics(self) -> dict[str, float]:
        return {"mask_embedding_norm": float(self.module.mask_embedding.detach().norm())}

    def _own_parameters(self) -> dict[str, nn.Parameter]:
        assert self.module is not None
        return {f"{self.name}.{n}": p for n, p in self.module.named_parameters()}

    def _detach(self) -> None:
        self._handle.remove()
        self.last, self._trained_forward = None, False
        if getattr(self.model, self.name, None) is self.module:
            delattr(self.model, self.name)
