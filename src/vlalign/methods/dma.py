"""Dynamic mode approximation (``dma``): PETAL's parameter-efficient update (seed 001, §3.2).

PETAL Eq. 2: ``H^m = Γ W₀ X^m + (Σ_{r=1..R} λ_r^m (u_r ∘ v_r ∘ p_r)) X^m`` — a CP decomposition
of the stacked weight updates with factors U, V, P shared by the modalities, a coefficient
vector ``λ^m ∈ R^R`` per modality m and a learnable "threshold" Γ on the frozen weight. U and P
are Gaussian, V is zero (ΔW = 0 at init), R = 64. Resolutions (choices; docs/petal.md lists
them all):

- **Third CP mode = the stacked target matrices.** The J target matrices of one weight shape
  ``(d_out, d_in)`` (by default ``q/k/v/o_proj`` of every layer; under GQA q/o and k/v form two
  shapes) form a ``d_out × d_in × J`` tensor with the CP update
  ``ΔW_j = U diag(λ^m ⊙ P_j) Vᵀ``, ``U ∈ R^{d_out×R}``, ``V ∈ R^{d_in×R}``, ``P ∈ R^{J×R}``
  (row ``P_j`` of matrix j). App. E's count has an ``R³`` term (a Tucker core, as in the
  authors' Aurora-based code) that contradicts CP vectors: we follow Eq. 2's CP form.
- **λ per modality, chosen per token**: ``λ^image`` at image-token positions, ``λ^text`` at
  text positions (the mask of :mod:`vlalign.models.modality`, read from each LM forward's
  position ids). One pair of λ per shape group (each group is its own CP decomposition; a λ
  shared by groups would tie unrelated components). λ starts at ones (the paper initialises it
  randomly; ones make the two modalities start equal, so the modality split is learned).
- **Γ: one scalar per target matrix**, initialised to 1, scaling ``W₀`` only; the bias is not
  scaled (Eq. 2 has no bias). ``gamma: false`` removes it (ablation V4).
- **Budget** (``budget:`` sizes ``rank``): per rank and shape ``d_out + d_in + J + 2`` parameters
  (a column of U and V, one of P, the two λ), plus one Γ per matrix.
- **Init scales** (``init_std`` for U, default 0.02; ``p_init_std`` for P, default 1.0): see
  the comment on :attr:`DmaMethod.defaults`. V, the input-side factor, is zero, so ΔW = 0
  exactly at init (the authors' released code zeroes the output-side factor instead).
- **Dropout** (``dropout``, default 0) on the input of the DMA path only.

Forward of a wrapped ``nn.Linear`` (matrix j, token t of modality m(t)):
``y = Γ_j (x W₀ᵀ) + b + ((x V) ⊙ (λ^{m(t)} ⊙ P_j)) Uᵀ``.

The wrappers (:class:`DmaLinear`, keeping the base layer as ``<name>.base_layer`` like peft)
replace the targeted layers; the factors live once per shape on the LM as ``lm.dma.<d_out>x<d_in>``
(so they follow ``.to()`` / ``.train()``), saved as ``dma.<d_out>x<d_in>.{U,V,P,lambda_image,
lambda_text,gamma}``. :meth:`DmaMethod.merge_and_unload` folds ``Γ W₀ + ΔW`` into the base weights
when ``λ^image == λ^text`` (then ΔW does not depend on the modality and the fold is exact).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlalign.methods.registry import PeftMethod, register
from vlalign.models.modality import image_token_mask

Shape = tuple[int, int]  # (d_out, d_in)


class ModalityState:
    """The image-token mask of the LM forward in progress, shared by every :class:`DmaLinear`
    of one method. Set by the method's forward pre-hook on the LM at the start of every LM
    forward and kept until the next one, so that gradient checkpointing's recomputation of a
    layer during the backward pass sees the mask of the forward it recomputes."""

    def __init__(self) -> None:
        self.image_mask: torch.Tensor | None = None


class DmaFactors(nn.Module):
    """The CP factors of one weight shape ``(d_out, d_in)`` over its ``J`` target matrices:
    ``U (d_out, R)``, ``V (d_in, R)`` (zero), ``P (J, R)``, ``lambda_image``/``lambda_text``
    ``(R,)`` (ones) and ``gamma (J,)`` (ones; None without Γ). λ and Γ are 1-D, so the optimiser
    groups them with the no-decay parameters."""

    def __init__(
        self,
        shape: Shape,
        n_matrices: int,
        rank: int,
        init_std: float,
        p_init_std: float,
        gamma: bool,
        dtype: torch.dtype | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__()
        d_out, d_in = shape
        kw: dict[str, Any] = {"dtype": dtype, "device": device}
        self.U = nn.Parameter(torch.empty(d_out, rank, **kw))
        self.V = nn.Parameter(torch.zeros(d_in, rank, **kw))
        self.P = nn.Parameter(torch.empty(n_matrices, rank, **kw))
        nn.init.normal_(self.U, std=init_std)
        nn.init.normal_(self.P, std=p_init_std)
        self.lambda_image = nn.Parameter(torch.ones(rank, **kw))
        self.lambda_text = nn.Parameter(torch.ones(rank, **kw))
        if gamma:
            self.gamma = nn.Parameter(torch.ones(n_matrices, **kw))
        else:
            self.register_parameter("gamma", None)

    def coefficients(self, j: int, image_mask: torch.Tensor | None) -> torch.Tensor:
        """``λ^{m(t)} ⊙ P_j``: ``(..., R)`` per token under ``image_mask`` (True: image), or
        ``(R,)`` with ``λ^text`` for every token when there is no mask."""
        if image_mask is None:
            lam = self.lambda_text
        else:
            lam = torch.where(image_mask.unsqueeze(-1), self.lambda_image, self.lambda_text)
        return lam * self.P[j]

    def delta_weight(self, j: int, modality: str = "text") -> torch.Tensor:
        """``ΔW_j = U diag(λ^m ⊙ P_j) Vᵀ`` ``(d_out, d_in)`` for ``modality`` image or text."""
        if modality not in ("image", "text"):
            raise ValueError(f"modality must be 'image' or 'text', got {modality!r}")
        lam = self.lambda_image if modality == "image" else self.lambda_text
        return (self.U * (lam * self.P[j])) @ self.V.T

    def scale(self, j: int) -> torch.Tensor | None:
        """Γ_j (None without Γ)."""
        return None if self.gamma is None else self.gamma[j]


class DmaLinear(nn.Module):
    """A targeted ``nn.Linear`` with the DMA update: ``Γ_j (x W₀ᵀ) + b + ((x V) ⊙ (λ^m ⊙ P_j)) Uᵀ``.

    ``base_layer`` is the original layer (frozen by the method); ``factors`` and ``state`` are
    shared with the other wrapped layers and are *not* children (the factors are registered
    once on the LM)."""

    def __init__(
        self,
        base_layer: nn.Linear,
        factors: DmaFactors,
        index: int,
        state: ModalityState,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.index = index
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # plain attributes: nn.Module.__setattr__ would register the shared factors once per
        # wrapped layer (duplicate parameter names)
        self.__dict__["factors"] = factors
        self.__dict__["state"] = state

    @property
    def weight(self) -> nn.Parameter:
        return self.base_layer.weight

    @property
    def bias(self) -> nn.Parameter | None:
        return self.base_layer.bias

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, j = self.factors, self.index
        out = F.linear(x, self.base_layer.weight)
        gamma = f.scale(j)
        if gamma is not None:
            out = out * gamma  # Γ scales W₀ only; the bias stays unscaled (Eq. 2 has no bias)
        if self.base_layer.bias is not None:
            out = out + self.base_layer.bias
        mask = self.state.image_mask
        if mask is not None and mask.shape != x.shape[:-1]:
            try:
                torch.broadcast_shapes(mask.shape, x.shape[:-1])
            except RuntimeError:
                raise ValueError(
                    f"dma: image-token mask {tuple(mask.shape)} does not fit the input "
                    f"{tuple(x.shape)} of a wrapped layer (a layer called outside the LM "
                    "forward whose mask was recorded?)"
                ) from None
        h = self.dropout(x) @ f.V  # (..., R)
        return out + (h * f.coefficients(j, mask)) @ f.U.T

    def merged_weight(self) -> torch.Tensor:
        """``Γ_j W₀ + ΔW_j`` with λ^text (exact for every token only if λ^image == λ^text)."""
        f, j = self.factors, self.index
        w = self.base_layer.weight.float()
        gamma = f.scale(j)
        if gamma is not None:
            w = w * gamma.float()
        return w + f.delta_weight(j, "text").float()

    def extra_repr(self) -> str:
        return f"index={self.index}"


def target_layers(lm: nn.Module, targets: list[str]) -> dict[Shape, list[tuple[str, nn.Linear]]]:
    """The LM's ``nn.Linear`` layers whose last name component is in ``targets``, grouped by
    weight shape ``(d_out, d_in)``, in module order (the row order of each group's P)."""
    names = set(targets)
    groups: dict[Shape, list[tuple[str, nn.Linear]]] = {}
    for name, module in lm.named_modules():
        if name.rsplit(".", 1)[-1] not in names:
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"dma: target {name} is a {type(module).__name__}, not an nn.Linear (is another "
                "method already wrapping it?)"
            )
        shape = (module.out_features, module.in_features)
        groups.setdefault(shape, []).append((name, module))
    if not groups:
        raise ValueError(f"dma: no linear layer named {sorted(names)} in the LM")
    return groups


def _group_key(shape: Shape) -> str:
    return f"{shape[0]}x{shape[1]}"


@register("dma")
class DmaMethod(PeftMethod):
    wraps_base_layers = True  # the targeted projections become DmaLinear wrappers
    budget_key = "rank"
    # init_std (U) 0.02: a usual transformer weight scale. p_init_std (P) 1.0: λ ⊙ P_j is a
    # per-matrix gain of each rank-one component, of order 1 like λ (ones); with P at 0.02 too,
    # the first steps of V (Adam moves it by ~lr per step) change ΔW 50x less and training
    # starts that much slower. Measured on the default tiny LM (width 128, 2 layers), 60 AdamW
    # steps at lr 1e-3 memorising 16 random rows: loss 6.02 -> 5.32 with P at 1.0, -> 5.66 with
    # P at 0.02, LoRA (r 16, q/k/v) -> 5.45. A choice: the paper gives no scales.
    defaults = {
        "rank": 64,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
        "gamma": True,
        "init_std": 0.02,
        "p_init_std": 1.0,
        "dropout": 0.0,
    }

    @staticmethod
    def _check(cfg: Mapping[str, Any]) -> None:
        rank = cfg["rank"]  # None: a budget sizes it when the method is applied
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"dma: rank must be an integer >= 1, got {rank!r}")
        targets = cfg["target_modules"]
        if isinstance(targets, str) or not targets or not all(isinstance(t, str) for t in targets):
            raise ValueError(f"dma: target_modules must be a list of names, got {targets!r}")
        if not isinstance(cfg["gamma"], bool):
            raise ValueError(f"dma: gamma must be true or false, got {cfg['gamma']!r}")
        for key in ("init_std", "p_init_std"):
            if not float(cfg[key]) > 0:
                raise ValueError(
                    f"dma: {key} must be > 0 (a zero factor never trains), got {cfg[key]!r}"
                )
        if not 0 <= float(cfg["dropout"]) < 1:
            raise ValueError(f"dma: dropout must be in [0, 1), got {cfg['dropout']!r}")

    @classmethod
    def resolve_config(cls, cfg: Mapping[str, Any] | None) -> dict[str, Any]:
        """The base resolution, then the values checked (at plan time, like unknown keys)."""
        out = super().resolve_config(cfg)
        cls._check(out)
        return out

    @staticmethod
    def parameter_count(groups: Mapping[Shape, list[Any]], gamma: bool) -> tuple[int, int]:
        """``(parameters per rank, fixed parameters)`` of DMA on ``groups``: per rank and shape
        ``d_out + d_in + J + 2`` (a column of U, V, P and the two λ); fixed: Γ, one per
        matrix."""
        per_rank = sum(d_out + d_in + len(mats) + 2 for (d_out, d_in), mats in groups.items())
        fixed = sum(len(mats) for mats in groups.values()) if gamma else 0
        return per_rank, fixed

    def size_for_budget(self, lm: nn.Module, n_params: int, cfg: Mapping[str, Any]) -> int:
        """Largest rank whose factors (and Γ) fit in ``n_params``."""
        groups = target_layers(lm, list(cfg["target_modules"]))
        per_rank, fixed = self.parameter_count(groups, bool(cfg["gamma"]))
        if n_params < per_rank + fixed:
            raise ValueError(
                f"dma budget {cfg['budget']!r} ({n_params} parameters) is below rank 1 "
                f"({per_rank + fixed} parameters on {sorted(cfg['target_modules'])})"
            )
        return (n_params - fixed) // per_rank

    def _attach(self, lm: nn.Module, cfg: dict[str, Any]) -> nn.Module:
        rank = int(cfg["rank"])
        if hasattr(lm, self.name):
            raise ValueError(f"this LM already has a {self.name!r} module; apply dma only once")
        groups = target_layers(lm, list(cfg["target_modules"]))
        self._state = ModalityState()
        self._wrapped: list[tuple[nn.Module, str, DmaLinear]] = []
        factors = nn.ModuleDict()
        for shape, mats in groups.items():
            ref = mats[0][1].weight
            group = DmaFactors(
                shape,
                len(mats),
                rank,
                float(cfg["init_std"]),
                float(cfg["p_init_std"]),
                bool(cfg["gamma"]),
                dtype=ref.dtype,
                device=ref.device,
            )
            factors[_group_key(shape)] = group
            for j, (name, linear) in enumerate(mats):
                wrapper = DmaLinear(linear, group, j, self._state, float(cfg["dropout"]))
                wrapper.train(linear.training)
                parent_name, _, child = name.rpartition(".")
                parent = lm.get_submodule(parent_name) if parent_name else lm
                setattr(parent, child, wrapper)
                self._wrapped.append((parent, child, wrapper))
        factors.train(lm.training)
        lm.add_module(self.name, factors)
        self._hook: RemovableHandle = lm.register_forward_pre_hook(
            self._record_modality, with_kwargs=True
        )
        return factors

    def _record_modality(self, lm: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        # position ids are a keyword argument in every LM call of the project (VLM forward,
        # generate); without them (or without a recorded image end) every token is text
        self._state.image_mask = image_token_mask(lm, kwargs.get("position_ids"))

    def _own_parameters(self) -> dict[str, nn.Parameter]:
        assert self.module is not None
        return {f"{self.name}.{n}": p for n, p in self.module.named_parameters()}

    def groups(self) -> dict[str, DmaFactors]:
        """Shape key (``"<d_out>x<d_in>"``) → its factors."""
        assert self.module is not None
        return dict(self.module.items())  # type: ignore[arg-type]

    def adapted_modules(self) -> list[str]:
        """LM module names wrapped by DMA, in the row order of each group's P."""
        lm = self._require_applied()
        return [n for n, m in lm.named_modules() if isinstance(m, DmaLinear)]

    def extra_metrics(self) -> dict[str, float]:
        """``gamma_abs_dev``: mean ``|Γ − 1|`` over the target matrices (with Γ);
        ``lambda_gap``: ``‖λ^image − λ^text‖`` over every group's λ together."""
        out: dict[str, float] = {}
        with torch.no_grad():
            groups = list(self.groups().values())
            gammas = [g.gamma.float() for g in groups if g.gamma is not None]
            if gammas:
                out["gamma_abs_dev"] = float((torch.cat(gammas) - 1).abs().mean())
            gap = sum(
                float(((g.lambda_image.float() - g.lambda_text.float()) ** 2).sum()) for g in groups
            )
            out["lambda_gap"] = gap**0.5
        return out

    def _unwrap(self) -> None:
        lm = self._require_applied()
        for parent, child, wrapper in self._wrapped:
            setattr(parent, child, wrapper.base_layer)
        self._wrapped = []
        self._hook.remove()
        self._state.image_mask = None
        if hasattr(lm, self.name):
            delattr(lm, self.name)

    def _detach(self) -> None:
        # unmerged: the base model stays the one DMA was trained on
        self._unwrap()

    def merge_and_unload(self) -> nn.Module:
        """Fold ``Γ_j W₀ + ΔW_j`` into each target's base weight and put the plain ``nn.Linear``
        layers back (the LM can then be saved with ``save_pretrained``); the method is detached
        afterwards. Exact only when ``λ^image == λ^text`` in every group (ΔW then does not
        depend on the token's modality); otherwise ValueError and nothing changes (the
        wrapped forward stays exact)."""
        lm = self._require_applied()
        differ = [
            key
            for key, g in self.groups().items()
            if not torch.equal(g.lambda_image, g.lambda_text)
        ]
        if differ:
            raise ValueError(
                f"dma: cannot merge, λ^image != λ^text in groups {differ}: the update depends "
                "on each token's modality, which one weight matrix cannot express; keep the "
                "method attached (its wrapped forward is exact)"
            )
        with torch.no_grad():
            for _, _, wrapper in self._wrapped:
                weight = wrapper.base_layer.weight
                weight.copy_(wrapper.merged_weight().to(weight.dtype))
        self._unwrap()
        self.lm, self.module = None, None
        return lm
