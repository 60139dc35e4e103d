"""Vision → LM projectors (seed 002 §3.1; KLAFT "MaL" variants) and their stand-alone save/load.

Every projector maps ``(B, N, d_vision)`` image tokens to ``(B, N, d_lm)`` LM input embeddings and
carries a ``projector_config`` dict (kind, dims, kwargs) so that it can be rebuilt from disk
without the rest of the VLM.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from vlalign.io_utils import atomic_path

CONFIG_NAME = "projector.json"
WEIGHTS_NAME = "model.safetensors"


class MLP2xGELU(nn.Module):
    """LLaVA-1.5 style ``Linear → GELU → Linear`` (the paper's projector)."""

    def __init__(self, d_vision: int, d_lm: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or d_lm
        self.fc1 = nn.Linear(d_vision, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, d_lm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LinearProjector(nn.Module):
    """A single affine map (LLaVA-1 / KLAFT MaL linear variant)."""

    def __init__(self, d_vision: int, d_lm: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d_vision, d_lm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class TransformerProjector(nn.Module):
    """KLAFT MaL transformer variant: a small bidirectional (unmasked) pre-norm transformer over
    the image tokens in the vision width, then a linear map to the LM width."""

    def __init__(
        self,
        d_vision: int,
        d_lm: int,
        num_layers: int = 2,
        num_heads: int = 4,
        ffn_mult: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if d_vision % num_heads:
            raise ValueError(
                f"transformer projector: d_vision={d_vision} not divisible by num_heads={num_heads}"
            )
        layer = nn.TransformerEncoderLayer(
            d_model=d_vision,
            nhead=num_heads,
            dim_feedforward=ffn_mult * d_vision,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # enable_nested_tensor only matters with a padding mask, which image tokens never have.
        self.encoder = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_vision)
        self.proj = nn.Linear(d_vision, d_lm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(self.encoder(x)))


DEFAULT_PROJECTOR = "mlp2x_gelu"

PROJECTORS: dict[str, type[nn.Module]] = {
    "mlp2x_gelu": MLP2xGELU,
    "linear": LinearProjector,
    "transformer": TransformerProjector,
}


def build_projector(kind: str, d_vision: int, d_lm: int, **kwargs: Any) -> nn.Module:
    """Build a fresh projector ``d_vision → d_lm`` of a registered ``kind`` (default recipe:
    ``DEFAULT_PROJECTOR``).

    Extra ``kwargs`` go to the projector class (e.g. ``hidden`` for ``mlp2x_gelu``,
    ``num_layers``/``num_heads`` for ``transformer``).
    """
    if kind not in PROJECTORS:
        raise ValueError(f"unknown projector kind {kind!r}; registered: {sorted(PROJECTORS)}")
    if d_vision <= 0 or d_lm <= 0:
        raise ValueError(f"projector dims must be positive, got d_vision={d_vision}, d_lm={d_lm}")
    module = PROJECTORS[kind](d_vision, d_lm, **kwargs)
    module.projector_config = {"kind": kind, "d_vision": d_vision, "d_lm": d_lm, "kwargs": kwargs}
    return module


def save_projector(module: nn.Module, directory: str | os.PathLike) -> None:
    """Write ``projector.json`` (kind, dims, kwargs) + ``model.safetensors`` atomically."""
    cfg = getattr(module, "projector_config", None)
    if cfg is None:
        raise ValueError(
            f"{type(module).__name__} has no projector_config; build it with build_projector()"
        )
    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    with atomic_path(directory, is_dir=True) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME))
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def load_projector(directory: str | os.PathLike) -> nn.Module:
    """Rebuild a projector saved with :func:`save_projector` (strict state-dict load)."""
    directory = Path(directory)
    cfg_path = directory / CONFIG_NAME
    if not cfg_path.is_file():
        raise FileNotFoundError(f"projector config not found: {cfg_path}")
    cfg = json.loads(cfg_path.read_text())
    for key in ("kind", "d_vision", "d_lm"):
        if key not in cfg:
            raise ValueError(f"{cfg_path}: missing key {key!r}")
    module = build_projector(cfg["kind"], cfg["d_vision"], cfg["d_lm"], **cfg.get("kwargs", {}))
    module.load_state_dict(load_file(str(directory / WEIGHTS_NAME)), strict=True)
    return module
