"""Image–text matching (KLAFT, seed 000 §3.2, Eq. 8) as a PEFT method (``itm``).

The paper puts a [CLS] after the image tokens and one after the text and trains them with a
triplet hinge ``max(||v_a − v_x|| − ||v_a − v_y|| + ε, 0)``, the image [CLS] as the anchor
``v_a``, its own text the positive ``v_x``, other texts the negatives ``v_y``. Resolutions
(``docs/klaft/mrm_itm.md``), each a **choice**:

- *Image [CLS]* (choice): one learned soft token appended after the image tokens by a forward
  hook on the VLM's projector (as ``info_bottleneck`` appends z), in every mode: the training
  forward, the scoring forwards and generation (cached and not) all see it
  (``VLMOutput.num_image_tokens`` grows by one). Its state ``v_a`` is the LM's last-layer
  hidden state at that position. Tokens other methods append stay where their hooks put them:
  the hook records where it put the [CLS] (N, or N + 1 behind an earlier appended token).
- *Text [CLS]* (choice): the LM's last-layer hidden state at each row's **last real text
  token** (the ``<eos>`` of a caption row, right-padded batches), not an appended token:
  appending one after each right-padded row would mean rewriting every row, label and mask
  in every caller, while the last token already attends to the whole text (causal text). As
  in the paper's single stream the text [CLS] also attends to its image under the run's mask.
- *Heads* (choice): a linear projection ``d_lm → proj_dim`` on each side (image, text);
  ``proj_dim: null`` uses the states themselves.
- *Distance* (choice, project notes): both vectors L2-normalised, Euclidean distance,
  ``ε = margin`` (0.2); the negatives of an anchor are the other rows' texts of the batch,
  either the **hardest** one (VSE++, Faghri et al. 2018; default) or the **sum** over all
  (``negatives: sum``); mean over the anchors. A batch of one row has no negative: no term
  (None, never a zero). Rows repeating one image are treated as negatives of each other (the
  batch knows no image identity).
- *Weight*: ``lambda`` (default 0.1, Eq. 9's λ_ITM); :meth:`ITMMethod.extra_loss` returns the
  already weighted term ``{"itm": λ · L_ITM}`` (logged as ``itm.itm``).
- *Init* (choice): the [CLS] vector ``~ N(0, s²)``, s the standard deviation of the LM's word
  embeddings (a token on the scale of the text tokens); the heads PyTorch's default init.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlalign.methods.mrm import (
    check_fraction,
    check_width,
    hidden_states_of,
    require_vlm_projector,
)
from vlalign.methods.registry import PeftMethod, register, text_config

NEGATIVES = ("hardest", "sum")


def triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, margin: float, negatives: str = "hardest"
) -> torch.Tensor:
    """Seed 000 Eq. 8 with in-batch negatives: rows ``anchor[i]`` / ``positive[i]`` ``(B, D)``
    are a pair, ``positive[j ≠ i]`` the negatives of ``anchor[i]``. Both sides L2-normalised,
    Euclidean distance; per anchor ``max_j`` (``hardest``) or ``Σ_j`` (``sum``) of
    ``max(d(a_i, p_i) − d(a_i, p_j) + margin, 0)``; mean over anchors (float32). B ≥ 2."""
    if anchor.shape != positive.shape or anchor.dim() != 2 or anchor.shape[0] < 2:
        raise ValueError(
            f"triplet_loss needs two (B >= 2, D) tensors, got {tuple(anchor.shape)} and "
            f"{tuple(positive.shape)}"
        )
    if negatives not in NEGATIVES:
        raise ValueError(f"negatives must be one of {NEGATIVES}, got {negatives!r}")
    a = F.normalize(anchor.float(), dim=-1)
    p = F.normalize(positive.float(), dim=-1)
    # ||a − p|| from the squared form: cdist's gradient is NaN at a zero distance
    dist = (2 - 2 * a @ p.T).clamp_min(1e-12).sqrt()  # (B, B); unit vectors
    hinge = (dist.diagonal()[:, None] - dist + margin).clamp_min(0)
    off = ~torch.eye(len(a), dtype=torch.bool, device=a.device)
    hinge = hinge.masked_fill(~off, 0)
    per_anchor = hinge.amax(1) if negatives == "hardest" else hinge.sum(1)
    return per_anchor.mean()


def last_text_positions(full_mask: torch.Tensor, n_image: int) -> torch.Tensor:
    """``(B,)`` index (in the image + text sequence) of each row's last real text token;
    ValueError for a row without text."""
    width = full_mask.shape[1]
    last = width - 1 - full_mask.flip(-1).long().argmax(-1)
    if (last < n_image).any() or not full_mask.gather(1, last[:, None]).bool().all():
        rows = (last < n_image).nonzero().flatten().tolist()
        raise ValueError(f"rows {rows} have no text token: no text [CLS] for ITM")
    return last


class ImageTextMatching(nn.Module):
    """The image [CLS] token and the two projection heads of KLAFT's ITM (seed 000 Eq. 8)."""

    def __init__(self, d_lm: int, proj_dim: int | None, init_std: float) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(d_lm) * init_std)
        self.image_head = nn.Linear(d_lm, proj_dim) if proj_dim else nn.Identity()
        self.text_head = nn.Linear(d_lm, proj_dim) if proj_dim else nn.Identity()

    def append_cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens`` ``(B, N, d)`` with the [CLS] appended: ``(B, N + 1, d)``."""
        cls = self.cls.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        return torch.cat([tokens, cls], dim=1)


@register("itm")
class ITMMethod(PeftMethod):
    """KLAFT's image–text matching (seed 000 Eq. 8, see the module doc): an
    :class:`ImageTextMatching` registered on the VLM (``vlm.itm``) and a forward hook on
    ``vlm.projector`` appending the image [CLS]. Needs a ``VisionLanguageModel``.
    :meth:`remove` takes hook and module out (the image tokens without the [CLS] again)."""

    defaults = {
        "margin": 0.2,  # ε of Eq. 8 (project notes)
        "lambda": 0.1,  # λ_ITM of Eq. 9
        "negatives": "hardest",  # hardest in-batch negative (VSE++) or "sum" over them
        "proj_dim": 256,  # width of the projection heads; null: no heads (choice)
    }

    @classmethod
    def resolve_config(cls, cfg: Mapping[str, Any] | None) -> dict[str, Any]:
        out = super().resolve_config(cfg)
        check_fraction(cls.name, "margin", out["margin"], low_open=False)
        check_fraction(cls.name, "lambda", out["lambda"], low_open=False)
        if out["negatives"] not in NEGATIVES:
            raise ValueError(
                f"PEFT method {cls.name!r}: negatives must be one of {list(NEGATIVES)}, got "
                f"{out['negatives']!r}"
            )
        check_width(cls.name, "proj_dim", out["proj_dim"], allow_none=True)
        return out

    def _attach(self, lm: nn.Module, cfg: dict[str, Any]) -> nn.Module:
        projector = require_vlm_projector(self, lm, "appends an image [CLS] to the image tokens")
        model = self.model
        emb = lm.get_input_embeddings().weight
        ref = next(projector.parameters())
        module = ImageTextMatching(
            text_config(lm).hidden_size, cfg["proj_dim"], float(emb.detach().float().std())
        ).to(device=ref.device, dtype=ref.dtype).train(model.training)
        model.add_module(self.name, module)
        self.margin, self.weight = float(cfg["margin"]), float(cfg["lambda"])
        self.negatives = str(cfg["negatives"])
        self.cls_index: int | None = None  # where the last forward put the [CLS]
        self._trained_forward = False
        self._handle: RemovableHandle = projector.register_forward_hook(self._hook)
        return module

    def _hook(self, projector: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        self.cls_index = output.shape[1]
        self._trained_forward = self.module.training
        return self.module.append_cls(output)

    def forward_kwargs(self, batch_size: int) -> dict[str, Any]:
        """The loss reads the last-layer hidden states of the training forward only."""
        return {"output_hidden_states": True} if self.module.training else {}

    def cls_states(self, outputs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """``(image [CLS] states, text [CLS] states)``, each ``(B, d_lm)``, of a forward's
        output (before the heads)."""
        hidden = hidden_states_of(self.name, outputs)
        if self.cls_index is None or self.cls_index >= outputs.num_image_tokens:
            raise RuntimeError(
                f"PEFT method {self.name!r}: no image [CLS] among the "
                f"{outputs.num_image_tokens} image tokens of this forward"
            )
        last = last_text_positions(outputs.attention_mask.to(hidden.device),
                                   outputs.num_image_tokens)
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[:, self.cls_index], hidden[rows, last]

    def extra_loss(self, outputs: Any, batch: Mapping[str, Any]) -> dict[str, torch.Tensor] | None:
        """``{"itm": λ · L_ITM}`` of the last training forward (the one of ``outputs``); None
        for a batch of one row (no negative)."""
        trained, self._trained_forward = self._trained_forward, False
        if not trained:
            raise RuntimeError(
                f"PEFT method {self.name!r}: extra_loss without a training-mode forward before it"
            )
        image, text = self.cls_states(outputs)
        if image.shape[0] < 2:
            return None
        dtype = self.module.cls.dtype
        a = self.module.image_head(image.to(dtype))
        p = self.module.text_head(text.to(dtype))
        return {"itm": self.weight * triplet_loss(a, p, self.margin, self.negatives)}

    def _own_parameters(self) -> dict[str, nn.Parameter]:
        assert self.module is not None
        return {f"{self.name}.{n}": p for n, p in self.module.named_parameters()}

    def _detach(self) -> None:
        self._handle.remove()
        self.cls_index, self._trained_forward = None, False
        if getattr(self.model, self.name, None) is self.module:
            delattr(self.model, self.name)
