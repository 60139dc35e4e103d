"""Vision encoder → projector → decoder LM (seed 002 §3.1), with the stage masks of seed 002 §3.2.

Sequence layout: ``[p_1..p_N (projected image tokens) | text tokens (right-padded)]``, optionally
behind a K/V prefix of P positions held in ``past_key_values`` (prefix tuning). Position ids are
always explicit, ``P + cumsum(mask) - 1``: RoPE's shift invariance does not hold once an
un-rotated K/V prefix exists.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache

from vlalign.io_utils import atomic_path
from vlalign.models.masks import (
    build_attention_mask,
    build_packed_attention_mask,
    check_mode,
    prefix_length,
)
from vlalign.models.modality import image_tokens
from vlalign.models.noise import corrupt_tokens
from vlalign.models.projector import (
    DEFAULT_PROJECTOR,
    build_projector,
    load_projector,
    save_projector,
)

VLM_CONFIG_NAME = "vlm.json"
FORMAT_VERSION = 1


@dataclass
class VLMOutput:
    """Result of :meth:`VisionLanguageModel.forward` (attribute or ``out["key"]`` access).

    - ``loss``: mean next-token CE over supervised text targets (None without labels).
    - ``logits``: ``(B, T, V)`` at the text positions (HF convention: ``logits[:, t]`` predicts
      text token ``t + 1``).
    - ``label_logits``: ``(B, T, V)`` aligned with the labels: ``label_logits[:, t]`` predicts
      text token ``t`` (``label_logits[:, 0]`` comes from the last image position).
    - ``hidden_states``: ``(B, N + T, H)`` last-layer (post-norm) hidden states of every position
      when ``output_hidden_states=True``, else None.
    - ``attention_mask``: ``(B, N + T)`` the 2D mask of the full image+text sequence.
    - ``num_image_tokens``: N.
    """

    loss: torch.Tensor | None
    logits: torch.Tensor
    label_logits: torch.Tensor
    hidden_states: torch.Tensor | None
    attention_mask: torch.Tensor
    num_image_tokens: int

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)


class VisionLanguageModel(nn.Module):
    """``vision`` (HF vision encoder, its ``last_hidden_state`` is used) → ``projector`` → ``lm``.

    Args:
        vision: e.g. ``SiglipVisionModel``.
        projector: a module from :func:`vlalign.models.projector.build_projector`.
        lm: a HF decoder LM (``PreTrainedModel`` with ``get_input_embeddings`` and
            ``logits_to_keep``), e.g. ``Qwen2ForCausalLM``; a peft-wrapped LM also works.
        mask_mode: default mask (``causal`` / ``prefix`` / ``bidirectional``).
        protected_token_ids: ids stage0 noise never corrupts (BOS/EOS/pad/...).
        noise_vocab_size: replacement tokens are drawn from ``[0, noise_vocab_size)``
            (default: the LM's ``vocab_size``; set it to the tokenizer size if the embedding
            matrix is padded).
        attn_implementation: if given, set on both backbones (``"sdpa"`` / ``"eager"``). The
            models' configs are modified in place: do not share one config object between models.
        special_token_ids: names → ids of the tokenizer's VLM tokens
            (:func:`vlalign.data.tokenizer.vlm_token_ids`: ``bos``, ``eos``, ``pad``, ``inst``,
            ``ans``, ``image``), for PEFT methods that find positions by token (the instruction
            MoE's ``<inst>`` … ``<ans>`` spans); saved in ``vlm.json``. Default: none ({}).
    """

    def __init__(
        self,
        vision: nn.Module,
        projector: nn.Module,
        lm: nn.Module,
        mask_mode: str = "prefix",
        protected_token_ids: tuple[int, ...] | list[int] = (),
        noise_vocab_size: int | None = None,
        attn_implementation: str | None = None,
        special_token_ids: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.projector = projector
        self.lm = lm
        self.mask_mode = check_mode(mask_mode)
        self.protected_token_ids = tuple(int(i) for i in protected_token_ids)
        self.noise_vocab_size = int(noise_vocab_size or lm.config.vocab_size)
        self.special_token_ids: dict[str, int] = {
            str(k): int(v) for k, v in (special_token_ids or {}).items()
        }
        if attn_implementation is not None:
            self.set_attn_implementation(attn_implementation)

    # ------------------------------------------------------------------ building blocks
    def set_attn_implementation(self, attn_implementation: str) -> None:
        for model in (self.vision, self.lm):
            if hasattr(model, "set_attn_implementation"):
                model.set_attn_implementation(attn_implementation)

    @property
    def attn_implementation(self) -> str:
        return self.lm.config._attn_implementation

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Encoder ``last_hidden_state`` ``(B, N, d_vision)`` (what the feature cache stores)."""
        param = next(self.vision.parameters())
        pixel_values = pixel_values.to(device=param.device, dtype=param.dtype)
        return self.vision(pixel_values=pixel_values).last_hidden_state

    def embed_images(
        self,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Projected image tokens ``(B, N, d_lm)`` in the LM embedding dtype, from exactly one of
        raw ``pixel_values`` or cached encoder ``image_features``."""
        if (pixel_values is None) == (image_features is None):
            raise ValueError("pass exactly one of pixel_values or image_features")
        if image_features is None:
            image_features = self.encode_images(pixel_values)
        if image_features.dim() != 3:
            raise ValueError(
                f"image_features must be (B, N, d_vision), got {tuple(image_features.shape)}"
            )
        proj_param = next(self.projector.parameters())
        feats = image_features.to(device=proj_param.device, dtype=proj_param.dtype)
        emb = self.lm.get_input_embeddings().weight
        return self.projector(feats).to(emb.dtype)

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(input_ids)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        mask_mode: str | None = None,
        noise_fraction: float = 0.0,
        generator: torch.Generator | None = None,
        past_key_values: Cache | None = None,
        output_hidden_states: bool = False,
        packing: bool | int = False,
    ) -> VLMOutput:
        """One forward over ``[image | text]``.

        ``input_ids``/``attention_mask``/``labels``: ``(B, T)`` right-padded text; ``labels`` are
        the text targets aligned with ``input_ids`` (usually a copy with -100 where no loss is
        wanted). Padding (``attention_mask == 0``) is never supervised, image positions never
        are targets; text token 0 is predicted from the last image position (LLaVA).
        ``noise_fraction > 0`` corrupts the *input* ids (stage0, :mod:`vlalign.models.noise`);
        targets stay clean. ``past_key_values``: a fresh prefix cache of P positions (it is
        mutated by the forward). ``packing``: run the LM on packed rows
        (:mod:`vlalign.models.packing`: several samples per row, no padding between them), each
        of up to ``N + packing`` positions (True: the padded width ``N + T``); the output is
        laid out as without packing and equal to it to float tolerance. Not with a K/V prefix.
        """
        mode = check_mode(mask_mode or self.mask_mode)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (B, T), got shape {tuple(input_ids.shape)}")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} != "
                f"input_ids {tuple(input_ids.shape)}"
            )
        if labels is not None and labels.shape != input_ids.shape:
            raise ValueError(f"labels {tuple(labels.shape)} != input_ids {tuple(input_ids.shape)}")

        img = self.embed_images(pixel_values, image_features)
        batch, n_img = img.shape[:2]
        if img.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{img.shape[0]} images for {input_ids.shape[0]} text rows")
        device = img.device
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device)

        text_ids = input_ids
        if noise_fraction > 0:
            text_ids = corrupt_tokens(
                input_ids,
                attention_mask,
                noise_fraction,
                self.noise_vocab_size,
                generator=generator,
                protected_ids=self.protected_token_ids,
            )
        embeds = torch.cat([img, self.embed_text(text_ids)], dim=1)
        full_mask = torch.cat([attention_mask.new_ones(batch, n_img), attention_mask], dim=1)
        is_image = torch.zeros(full_mask.shape, dtype=torch.bool, device=device)
        is_image[:, :n_img] = True

        p = prefix_length(past_key_values)
        if packing:
            if p:
                raise ValueError(
                    "packing does not support a K/V prefix (past_key_values of "
                    f"{p} positions): train without train.packing"
                )
            capacity = max(full_mask.shape[1], n_img + (0 if packing is True else int(packing)))
            hidden = self._packed_hidden(embeds, full_mask, n_img, mode, capacity)
            logits_all = self.lm.get_output_embeddings()(hidden[:, n_img - 1 :])
            return self._output(
                logits_all,
                labels,
                attention_mask,
                hidden if output_hidden_states else None,
                full_mask,
                n_img,
                device,
            )
        mask = build_attention_mask(
            self.lm.config, embeds, full_mask, is_image, mode, past_key_values
        )
        # positions < P + N are the image tokens (vlalign.models.modality)
        with image_tokens(self.lm, p + n_img):
            out = self.lm(
                inputs_embeds=embeds,
                attention_mask=mask,
                position_ids=position_ids_from_mask(full_mask, p),
                past_key_values=past_key_values,
                use_cache=past_key_values is not None,
                output_hidden_states=output_hidden_states,
                # only the last image position and the text positions need logits (N may be 256+)
                logits_to_keep=input_ids.shape[1] + 1,
            )
        hidden_all = out.hidden_states[-1] if output_hidden_states else None
        return self._output(
            out.logits, labels, attention_mask, hidden_all, full_mask, n_img, device
        )

    def _packed_hidden(
        self, embeds: torch.Tensor, full_mask: torch.Tensor, n_img: int, mode: str, capacity: int
    ) -> torch.Tensor:
        """The LM's last (post-norm) hidden states ``(B, N + T, H)`` of padded ``embeds``,
        computed on packed rows (:mod:`vlalign.models.packing`)."""
        from vlalign.models.packing import pack, pack_layout, unpack

        layout = pack_layout(full_mask, n_img, capacity)
        packed = pack(embeds, layout)
        mask = build_packed_attention_mask(
            self.lm.config, packed, layout.segment, layout.is_image, layout.position_ids, mode
        )
        # positions are per segment, so the image tokens are those < N (modality)
        with image_tokens(self.lm, n_img):
            out = self.lm(
                inputs_embeds=packed,
                attention_mask=mask,
                position_ids=layout.position_ids,
                use_cache=False,
                output_hidden_states=True,
                logits_to_keep=1,  # the logits come from the unpacked hidden states
            )
        return unpack(out.hidden_states[-1], layout, *full_mask.shape)

    def _output(
        self,
        logits_all: torch.Tensor,
        labels: torch.Tensor | None,
        attention_mask: torch.Tensor,
        hidden_all: torch.Tensor | None,
        full_mask: torch.Tensor,
        n_img: int,
        device,
    ) -> VLMOutput:
        """Loss and output from the logits ``(B, T + 1, V)`` of the last image position and
        the text positions."""
        label_logits, logits = logits_all[:, :-1], logits_all[:, 1:]

        loss = None
        if labels is not None:
            targets = labels.to(device).masked_fill(attention_mask == 0, -100)
            loss = F.cross_entropy(
                label_logits.float().reshape(-1, label_logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=-100,
            )
        return VLMOutput(
            loss=loss,
            logits=logits,
            label_logits=label_logits,
            hidden_states=hidden_all,
            attention_mask=full_mask,
            num_image_tokens=n_img,
        )

    # ------------------------------------------------------------------ persistence
    def _meta(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "mask_mode": self.mask_mode,
            "protected_token_ids": list(self.protected_token_ids),
            "noise_vocab_size": self.noise_vocab_size,
            "special_token_ids": dict(self.special_token_ids),
            "vision_class": type(self.vision).__name__,
            "lm_class": type(self.lm).__name__,
            "projector": dict(getattr(self.projector, "projector_config", {})),
        }

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Atomically write ``vision/``, ``lm/`` (HF ``save_pretrained``, safetensors),
        ``projector/`` (:func:`save_projector`) and ``vlm.json``."""
        for name, model in (("vision", self.vision), ("lm", self.lm)):
            if not isinstance(model, PreTrainedModel):
                raise TypeError(
                    f"cannot save {name}: {type(model).__name__} is not a transformers "
                    "PreTrainedModel (merge peft adapters first, e.g. merge_and_unload())"
                )
        with atomic_path(directory, is_dir=True) as tmp:
            self.vision.save_pretrained(tmp / "vision")
            self.lm.save_pretrained(tmp / "lm")
            save_projector(self.projector, tmp / "projector")
            (tmp / VLM_CONFIG_NAME).write_text(json.dumps(self._meta(), indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls,
        directory: str | os.PathLike,
        attn_implementation: str = "sdpa",
        dtype: torch.dtype | None = None,
        **overrides: Any,
    ) -> VisionLanguageModel:
        """Load a directory written by :meth:`save_pretrained`. ``overrides`` replace entries of
        ``vlm.json`` (``mask_mode``, ``protected_token_ids``, ``noise_vocab_size``,
        ``special_token_ids``; a file written before ``special_token_ids`` existed gives {})."""
        directory = Path(directory)
        meta_path = directory / VLM_CONFIG_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"not a saved VisionLanguageModel (no {meta_path})")
        meta = json.loads(meta_path.read_text())
        unknown = set(overrides) - {
            "mask_mode",
            "protected_token_ids",
            "noise_vocab_size",
            "special_token_ids",
        }
        if unknown:
            raise TypeError(f"unknown from_pretrained overrides: {sorted(unknown)}")
        meta.update(overrides)
        vision, lm = _load_backbones(
            directory / "vision", directory / "lm", attn_implementation, dtype
        )
        projector = load_projector(directory / "projector")
        if dtype is not None:
            projector = projector.to(dtype)
        return cls(
            vision,
            projector,
            lm,
            mask_mode=meta["mask_mode"],
            protected_token_ids=meta.get("protected_token_ids", ()),
            noise_vocab_size=meta.get("noise_vocab_size"),
            special_token_ids=meta.get("special_token_ids") or {},
        )

    @classmethod
    def from_parts(
        cls,
        vision_path: str | os.PathLike,
        lm_path: str | os.PathLike,
        projector_kind: str = DEFAULT_PROJECTOR,
        mask_mode: str = "prefix",
        attn_implementation: str = "sdpa",
        dtype: torch.dtype | None = None,
        protected_token_ids: tuple[int, ...] | list[int] = (),
        noise_vocab_size: int | None = None,
        special_token_ids: Mapping[str, int] | None = None,
        **projector_kwargs: Any,
    ) -> VisionLanguageModel:
        """Load the two backbones (``save_pretrained`` dirs or hub ids) and build a fresh
        projector ``vision hidden_size → lm hidden_size``."""
        vision, lm = _load_backbones(vision_path, lm_path, attn_implementation, dtype)
        d_vision = vision.config.hidden_size
        d_lm = lm.config.get_text_config().hidden_size
        projector = build_projector(projector_kind, d_vision, d_lm, **projector_kwargs)
        if dtype is not None:
            projector = projector.to(dtype)
        return cls(
            vision,
            projector,
            lm,
            mask_mode=mask_mode,
            protected_token_ids=protected_token_ids,
            noise_vocab_size=noise_vocab_size,
            special_token_ids=special_token_ids,
        )


def _load_backbones(
    vision_path, lm_path, attn_implementation: str, dtype: torch.dtype | None
) -> tuple[nn.Module, nn.Module]:
    """Both backbones with the loaders every stage uses (a full SigLIP checkpoint gives its
    vision tower)."""
    from vlalign.models.backbones import load_lm, load_vision

    kw: dict[str, Any] = {"attn_implementation": attn_implementation}
    if dtype is not None:
        kw["dtype"] = dtype
    return load_vision(vision_path, **kw), load_lm(lm_path, **kw)


def position_ids_from_mask(mask2d: torch.Tensor, prefix_len: int = 0) -> torch.Tensor:
    """``P + cumsum(mask) - 1`` (left pads clamped to P): positions of real tokens count only
    real tokens, exactly what HF ``generate`` derives from the 2D mask."""
    return (mask2d.long().cumsum(-1) - 1).clamp_min(0) + prefix_len
