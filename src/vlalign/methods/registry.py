"""PEFT method registry and the :class:`PeftMethod` base (PT-PEFT, seed 003).

A method is a class registered with ``@register("name")``. One instance is attached to one model
with :meth:`PeftMethod.apply` and then owns exactly its parameters: it lists them for the
optimiser, freezes/unfreezes them (phase A / phase B of ``prefix→X``), saves and restores only
them. Methods compose: ``prefix`` + ``lora`` / ``s_adapter`` / ``p_adapter`` / ``full`` can be
applied to the same model in any order.

Composition rule for ``requires_grad``: every parameter a method owns is tagged with the method
name (an attribute on the ``Parameter``). ``apply(..., freeze_base=True)`` freezes every
*untagged* parameter of the model (vision, projector, LM), so applying a second method never
re-freezes what an earlier one made trainable. Word embeddings and the LM head are frozen for
every method unless its config sets ``train_embeddings`` / ``train_lm_head`` (seed 003 B.5).

On disk (:meth:`PeftMethod.save`): ``<dir>/peft_method.json`` (name, resolved config) and
``<dir>/weights.safetensors`` (only the method's own tensors).

Life cycle: everything a caller needs from a method is a hook of :class:`PeftMethod`, composed
over a stage's methods by :class:`vlalign.methods.stage.PeftSession`, so no caller ever names a
method:

- attach: :meth:`~PeftMethod.apply` (``_attach``), :meth:`~PeftMethod.check_composition`;
- train: :meth:`~PeftMethod.forward_kwargs` (inputs of each forward),
  :meth:`~PeftMethod.extra_loss` (added to the LM loss), :meth:`~PeftMethod.extra_metrics`;
- save / load: :meth:`~PeftMethod.save`, :meth:`~PeftMethod.from_pretrained`;
- inference: :meth:`~PeftMethod.inference_state` (inputs of each generation / scoring forward,
  per inference variant: :attr:`~PeftMethod.variants`);
- evaluation: :meth:`~PeftMethod.generation_stats` (per-row statistics of one batch of
  generations, e.g. KLAFT's r_TCM: the evaluation averages them into metrics of the dataset
  and writes the per-row details into ``predictions.jsonl``);
- removal: :meth:`~PeftMethod.remove` (``_detach``) undoes the attachment.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from vlalign.io_utils import atomic_path

PEFT_METHODS: dict[str, type[PeftMethod]] = {}
METHOD_FILE = "peft_method.json"
WEIGHTS_FILE = "weights.safetensors"
COMPOSITION_FILE = "peft_methods.json"
FORMAT_VERSION = 1
_OWNER_ATTR = "_vlalign_peft_owner"
# config keys every method accepts (embeddings and head frozen by default, as seed 003 trains them)
COMMON_DEFAULTS: dict[str, Any] = {"train_embeddings": False, "train_lm_head": False}
BUDGET = "budget"
_SHARE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")

M = TypeVar("M", bound="type[PeftMethod]")


def register(name: str) -> Callable[[M], M]:
    """Class decorator: make a :class:`PeftMethod` subclass available as ``name``."""

    def deco(cls: M) -> M:
        if name in PEFT_METHODS and PEFT_METHODS[name] is not cls:
            raise ValueError(f"PEFT method {name!r} is already registered by {PEFT_METHODS[name]}")
        cls.name = name
        PEFT_METHODS[name] = cls
        return cls

    return deco


def get_method(name: str) -> type[PeftMethod]:
    """The registered class for ``name``; ValueError listing the known names otherwise."""
    import vlalign.methods  # noqa: F401  (the package import registers the built-in methods)

    if name not in PEFT_METHODS:
        raise ValueError(f"unknown PEFT method {name!r}; known: {sorted(PEFT_METHODS)}")
    return PEFT_METHODS[name]


# ---------------------------------------------------------------------------- model helpers
def get_lm(model: nn.Module) -> nn.Module:
    """The decoder LM of a ``VisionLanguageModel`` (``model.lm``), or ``model`` itself."""
    lm = getattr(model, "lm", None)
    if isinstance(lm, nn.Module) and hasattr(lm, "config"):
        return lm
    if not hasattr(model, "config"):
        raise TypeError(
            f"{type(model).__name__} is neither a HF decoder LM (no .config) "
            "nor a model with an .lm"
        )
    return model


def text_config(lm: nn.Module) -> Any:
    cfg = lm.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's list of decoder layers (each with ``self_attn`` and ``mlp``), e.g.
    ``Qwen2ForCausalLM.model.layers``."""
    for module in lm.modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) > 0
            and all(hasattr(m, "self_attn") and hasattr(m, "mlp") for m in module)
        ):
            return module
    raise ValueError(f"{type(lm).__name__}: no ModuleList of decoder layers with self_attn/mlp")


def embedding_parameters(lm: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(word embedding params, LM head params)``; with tied weights both hold the same tensor."""
    emb = lm.get_input_embeddings()
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    return list(emb.parameters()), list(head.parameters()) if head is not None else []


def owner(param: nn.Parameter) -> str | None:
    return getattr(param, _OWNER_ATTR, None)


def tag_parameters(params: Iterable[nn.Parameter], name: str) -> None:
    """Mark ``params`` as owned by PEFT method ``name`` (see the module doc)."""
    for p in params:
        setattr(p, _OWNER_ATTR, name)


def freeze_untagged(model: nn.Module) -> None:
    """Freeze every parameter of ``model`` that no applied PEFT method owns."""
    for p in model.parameters():
        if owner(p) is None:
            p.requires_grad_(False)


def unique_parameters(modules: Iterable[nn.Module | None]) -> Iterator[nn.Parameter]:
    seen: set[int] = set()
    for module in modules:
        if module is None:
            continue
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield p


def count_trainable(
    *modules: nn.Module | None, also: Iterable[nn.Parameter] = ()
) -> tuple[int, float]:
    """``(trainable params, 100 * trainable / total)`` over the union of ``modules`` (shared or
    tied parameters counted once), e.g. ``count_trainable(vlm, prefix_encoder)``; ``also``:
    parameters counted as trained though frozen now (trained earlier in a chain)."""
    params = list(unique_parameters(modules))
    also_ids = {id(p) for p in also}
    total = sum(p.numel() for p in params)
    n = sum(p.numel() for p in params if p.requires_grad or id(p) in also_ids)
    return n, (100.0 * n / total if total else 0.0)


def check_budget(value: Any, method: str) -> None:
    """A ``budget:`` is a parameter count (int >= 1) or a share of the LM (``"0.26%"``)."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return
    m = _SHARE.match(value) if isinstance(value, str) else None
    if m and 0 < float(m.group(1)) < 100:
        return
    raise ValueError(
        f"PEFT method {method!r}: budget {value!r} must be a parameter count (an integer >= 1) "
        "or a share of the LM's parameters such as '0.26%' (0 < share < 100)"
    )


def lm_base_parameters(lm: nn.Module) -> int:
    """Parameters of the LM itself (tied counted once), without those PEFT methods added to it
    (LoRA matrices, adapters); what a ``budget`` share is a share of."""
    return sum(
        p.numel()
        for p in unique_parameters([lm])
        if owner(p) is None or not get_method(owner(p)).adds_parameters
    )


def budget_params(lm: nn.Module, budget: int | str) -> int:
    """A budget (:func:`check_budget`) as a parameter count on ``lm``."""
    if isinstance(budget, str):
        return int(float(budget.strip().rstrip("%")) / 100 * lm_base_parameters(lm))
    return int(budget)


# ---------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class GeneratedBatch:
    """One batch of generations as the evaluation made them (:meth:`PeftMethod.generation_stats`):
    ``task`` ("caption" / "vqa"), the encoder ``image_features`` ``(B, N, d_vision)``, the
    ``prompts`` and the ``generated`` ids (eos cut) per row, the inference ``inputs``
    (``B → forward inputs``, :class:`vlalign.methods.stage.InferenceInputs`) and the
    ``mask_mode`` generation ran under (None: the model's)."""

    task: str
    image_features: torch.Tensor
    prompts: Sequence[Sequence[int]]
    generated: Sequence[Sequence[int]]
    inputs: Callable[[int], Mapping[str, Any]] | None = None
    mask_mode: str | None = None


@dataclass(frozen=True)
class GenerationStats:
    """What a method measures on a :class:`GeneratedBatch`, one value per row: ``metrics`` (name →
    a number or None per row; the dataset's metric is the mean over its non-None rows) and
    ``details`` (key → any JSON value per row, written into that row's ``predictions.jsonl``
    line as ``<method>.<key>``)."""

    metrics: Mapping[str, Sequence[float | None]] = field(default_factory=dict)
    details: Mapping[str, Sequence[Any]] = field(default_factory=dict)


# ---------------------------------------------------------------------------- base class
class PeftMethod:
    """Base of every PEFT method. Subclasses set ``defaults`` and implement :meth:`_attach` and
    :meth:`_own_parameters`; the other hooks have do-nothing defaults: override
    :meth:`forward_kwargs` / :meth:`inference_state` if the forward needs inputs (e.g. a K/V
    cache), :meth:`extra_loss` for an auxiliary loss, :meth:`extra_metrics` for diagnostics,
    :meth:`_detach` if attaching changed the LM (hooks, replaced layers, added modules)."""

    name: ClassVar[str] = ""
    defaults: ClassVar[dict[str, Any]] = {}
    # inference variants besides "normal" (:meth:`inference_state`), e.g. prefix's "removed"
    variants: ClassVar[tuple[str, ...]] = ()
    # True if attaching replaces LM layers by wrappers (LoRA): a method training the LM's own
    # weights cannot be trained next to it (:meth:`check_composition`)
    wraps_base_layers: ClassVar[bool] = False
    # False for a method that only trains the LM's own weights (``full``)
    adds_parameters: ClassVar[bool] = True
    # the config key a ``budget:`` sizes (LoRA ``r``, an adapter's ``bottleneck_size``, the
    # prefix encoder's width); None: the method takes no budget
    budget_key: ClassVar[str | None] = None
    # True if the training forward gets a K/V prefix (``past_key_values``): such a method
    # cannot train on packed rows (``train.packing``), refused when the plan is built
    kv_prefix: ClassVar[bool] = False

    def __init__(self) -> None:
        self.cfg: dict[str, Any] = {}
        # what apply() was given (a VisionLanguageModel or a bare HF LM), for methods that hook
        # more than the LM (e.g. the VLM's projector); the LM itself is ``lm``
        self.model: nn.Module | None = None
        self.lm: nn.Module | None = None
        self.module: nn.Module | None = None

    # -- to implement ------------------------------------------------------------------
    def _attach(self, lm: nn.Module, cfg: dict[str, Any]) -> nn.Module:
        """Attach to ``lm``; return the module holding the new parameters."""
        raise NotImplementedError

    def _own_parameters(self) -> dict[str, nn.Parameter]:
        """Name → parameter for what this method trains (embeddings/head excluded)."""
        raise NotImplementedError

    def forward_kwargs(self, batch_size: int) -> dict[str, Any]:
        """Extra keyword arguments of one training / held-out forward over ``batch_size`` rows
        (e.g. ``past_key_values``: a fresh prefix cache; ``output_hidden_states=True`` for a
        head on the hidden states). Composed by :func:`merge_inputs`."""
        return {}

    def extra_loss(
        self, outputs: Any, batch: Mapping[str, Any]
    ) -> torch.Tensor | Mapping[str, torch.Tensor] | None:
        """An auxiliary loss of one training forward (``outputs``: the model's output for
        ``batch``), added to the LM loss by the training loop; None: no extra loss. A mapping
        names several terms (their sum is added; each is logged per step as
        ``<method>.<term>``, a single tensor as ``<method>.loss``). The method weights each
        itself (e.g. from its config)."""
        return None

    def extra_metrics(self) -> dict[str, float]:
        """Scalar diagnostics of the method's state (e.g. a gate's mean opening), recorded as
        ``<method>.<key>`` with the stage's trainable-parameter counts."""
        return {}

    def inference_state(
        self, batch_size: int, variant: str = "normal", generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        """Inputs of one inference forward over ``batch_size`` rows (generation, the rank and
        grounding forwards): today ``past_key_values``, a fresh cache of P positions that the
        forward may mutate. Called again for every forward. ``variant`` is "normal" or one of
        :attr:`variants`; ``generator`` is seeded the same (the run's seed) on every call, so a
        random variant gives the same tensors to every forward. Default: no inputs."""
        return {}

    def generation_stats(self, model: nn.Module, batch: GeneratedBatch) -> GenerationStats | None:
        """Per-row statistics of one batch of evaluation generations (``model``: the evaluated
        model, in eval mode; it may run forwards with ``batch.inputs``). Called by the
        evaluation once per generation batch; None (default): nothing to measure."""
        return None

    def size_for_budget(self, lm: nn.Module, n_params: int, cfg: Mapping[str, Any]) -> int:
        """The largest value of :attr:`budget_key` whose parameters on ``lm`` fit in
        ``n_params`` (ValueError if even the smallest does not); only methods with a
        ``budget_key`` implement it."""
        raise NotImplementedError

    @classmethod
    def _check_budget_config(cls, cfg: Mapping[str, Any]) -> None:
        """Refuse (ValueError) a resolved config whose other keys a budget cannot size."""

    def check_composition(
        self, methods: Sequence[PeftMethod], lrs: Mapping[str, float]
    ) -> None:
        """Refuse (ValueError) a stage where this method cannot be trained / attached next to
        ``methods`` (all of the stage's, this one included) with learning rates ``lrs``."""

    def _detach(self) -> None:
        """Undo what :meth:`_attach` changed in ``self.lm`` (hooks, wrapped layers, modules
        added to it). A method whose module lives outside the model has nothing to undo."""

    # -- lifecycle ----------------------------------------------------------------------
    @classmethod
    def resolve_config(cls, cfg: Mapping[str, Any] | None) -> dict[str, Any]:
        """Defaults + ``cfg``; unknown keys → ValueError naming them. A ``budget`` (methods
        with a :attr:`budget_key`) is checked here, at plan time, and leaves its key None: the
        size is computed from the LM when the method is applied (:meth:`size_for_budget`)."""
        known = {**COMMON_DEFAULTS, **cls.defaults}
        if cls.budget_key is not None:
            known[BUDGET] = None
        cfg = dict(cfg or {})
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            raise ValueError(
                f"PEFT method {cls.name!r}: unknown config keys {unknown}; known: {sorted(known)}"
            )
        out = {**known, **cfg}
        if out.get(BUDGET) is not None:
            check_budget(out[BUDGET], cls.name)
            if cfg.get(cls.budget_key) is not None:
                raise ValueError(
                    f"PEFT method {cls.name!r}: set budget ({out[BUDGET]!r}) or "
                    f"{cls.budget_key} ({cfg[cls.budget_key]!r}), not both: the budget sizes "
                    f"{cls.budget_key}"
                )
            out[cls.budget_key] = None
            cls._check_budget_config(out)
        return out

    @property
    def applied(self) -> bool:
        return self.lm is not None

    def _require_applied(self) -> nn.Module:
        if self.lm is None:
            raise RuntimeError(f"PEFT method {self.name!r} has not been applied to a model yet")
        return self.lm

    def apply(
        self,
        model: nn.Module,
        cfg: Mapping[str, Any] | None = None,
        freeze_base: bool = True,
    ) -> nn.Module:
        """Attach to ``model`` (a ``VisionLanguageModel`` or a HF decoder LM) and make this
        method's parameters trainable. ``_attach`` gets the LM; ``model`` itself is
        ``self.model`` (set before ``_attach``), for a method that hooks the VLM around the LM
        (its projector: ``info_bottleneck``). With ``freeze_base`` every parameter not owned by
        an applied method is frozen first. Returns the module holding the new parameters (e.g.
        the prefix encoder; the LM itself for ``full``)."""
        if self.applied:
            raise RuntimeError(f"PEFT method {self.name!r} is already applied; make a new one")
        self.cfg = self.resolve_config(cfg)
        lm = get_lm(model)
        if self.cfg.get(BUDGET) is not None:
            assert self.budget_key is not None
            n = budget_params(lm, self.cfg[BUDGET])
            self.cfg[self.budget_key] = self.size_for_budget(lm, n, self.cfg)
        if freeze_base:
            freeze_untagged(model)
        self.model, self.lm = model, lm
        try:
            self.module = self._attach(lm, self.cfg)
        except BaseException:
            self.model = self.lm = None
            raise
        tag_parameters(self.trainable_parameters(), self.name)
        self.set_trainable(True)
        return self.module

    def named_trainable_parameters(self) -> dict[str, nn.Parameter]:
        """Own parameters plus, if the config says so, ``lm.``-prefixed embedding/head params."""
        lm = self._require_applied()
        named = dict(self._own_parameters())
        emb, head = embedding_parameters(lm)
        ids = {id(p) for p in named.values()}
        lm_names = {id(p): n for n, p in lm.named_parameters(remove_duplicate=False)}
        for flag, params in (("train_embeddings", emb), ("train_lm_head", head)):
            if self.cfg.get(flag):
                for p in params:
                    if id(p) not in ids:
                        ids.add(id(p))
                        named[f"lm.{lm_names[id(p)]}"] = p
        return named

    def trainable_parameters(self, model: nn.Module | None = None) -> list[nn.Parameter]:
        """The parameters this method trains (``model`` is accepted for protocol symmetry)."""
        return list(self.named_trainable_parameters().values())

    def set_trainable(self, trainable: bool) -> None:
        """Unfreeze (phase B, parallel) or freeze (e.g. X during ``prefix→X`` phase A) this
        method's parameters; embeddings/head stay frozen unless the config unfreezes them."""
        own = self.named_trainable_parameters()
        lm = self._require_applied()
        emb, head = embedding_parameters(lm)
        # a method that owns the whole LM (full FT) must still leave frozen embeddings frozen
        frozen = set()
        if not self.cfg.get("train_embeddings"):
            frozen |= {id(p) for p in emb}
        if not self.cfg.get("train_lm_head"):
            frozen |= {id(p) for p in head}
        tied = {id(p) for p in emb} & {id(p) for p in head}
        if tied and self.cfg.get("train_embeddings") != self.cfg.get("train_lm_head"):
            raise ValueError(
                f"PEFT method {self.name!r}: word embeddings and LM head are tied; set "
                "train_embeddings and train_lm_head to the same value"
            )
        for p in own.values():
            p.requires_grad_(trainable and id(p) not in frozen)

    def count_trainable(self, model: nn.Module) -> tuple[int, float]:
        """Trainable parameters (all methods together) over ``model`` + this method's module."""
        return count_trainable(model, self.module)

    def remove(self) -> None:
        """Take this method out of the model: the LM is the base model again (e.g. before
        ``save_pretrained``), its parameters lose the method's tag, and this instance is
        detached (apply a new one to attach again). ``module`` stays readable: the trained
        parameters can still be inspected."""
        self._require_applied()
        params = self.trainable_parameters()
        self._detach()
        for p in params:
            if owner(p) == self.name:
                delattr(p, _OWNER_ATTR)
        self.model = self.lm = None

    # -- persistence --------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        """This method's tensors only (detached), keyed by stable names."""
        return {k: p.detach() for k, p in self.named_trainable_parameters().items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "state") -> None:
        """Copy ``state`` into this method's parameters; key or shape mismatch → ValueError."""
        named = self.named_trainable_parameters()
        missing, unexpected = sorted(set(named) - set(state)), sorted(set(state) - set(named))
        if missing or unexpected:
            raise ValueError(
                f"{source}: PEFT method {self.name!r} state mismatch; missing keys {missing[:8]}, "
                f"unexpected keys {unexpected[:8]}"
            )
        with torch.no_grad():
            for key, p in named.items():
                t = state[key]
                if t.shape != p.shape:
                    raise ValueError(
                        f"{source}: {key!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}"
                    )
                p.copy_(t.to(device=p.device, dtype=p.dtype))

    def save(self, directory: str | os.PathLike) -> Path:
        """Atomically write ``peft_method.json`` + ``weights.safetensors`` into ``directory``."""
        self._require_applied()
        meta = {"format_version": FORMAT_VERSION, "method": self.name, "config": self.cfg}
        # safetensors refuses shared storage: clone (tied params are deduplicated by name already)
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}
        with atomic_path(directory, is_dir=True) as tmp:
            save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"method": self.name})
            (tmp / METHOD_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return Path(directory)

    def load(self, directory: str | os.PathLike) -> None:
        """Restore weights saved by :meth:`save` into this (already applied) method."""
        self._require_applied()
        meta = read_method_meta(directory)
        if meta["method"] != self.name:
            raise ValueError(
                f"{Path(directory) / METHOD_FILE}: holds method {meta['method']!r}, "
                f"not {self.name!r}"
            )
        weights = Path(directory) / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"missing PEFT weights file {weights}")
        self.load_state_dict(load_file(str(weights)), source=str(weights))

    @classmethod
    def from_pretrained(
        cls, model: nn.Module, directory: str | os.PathLike, freeze_base: bool = True
    ) -> PeftMethod:
        """Apply the saved method (its saved config) to ``model`` and load its weights."""
        meta = read_method_meta(directory)
        method_cls = get_method(meta["method"]) if cls is PeftMethod else cls
        method = method_cls()
        cfg = dict(meta["config"])
        # the saved size is the one trained: re-apply it, keep the budget it came from
        has_budget, budget = BUDGET in cfg, cfg.pop(BUDGET, None)
        method.apply(model, cfg, freeze_base=freeze_base)
        if has_budget:
            method.cfg[BUDGET] = budget
        method.load(directory)
        return method

    def __repr__(self) -> str:
        state = "applied" if self.applied else "not applied"
        return f"{type(self).__name__}(name={self.name!r}, {state}, cfg={self.cfg})"


def read_method_meta(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / METHOD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"not a saved PEFT method directory (no {path})")
    meta = json.loads(path.read_text())
    for key in ("method", "config"):
        if key not in meta:
            raise ValueError(f"{path}: missing key {key!r}")
    return meta


# ---------------------------------------------------------------------------- composition
def apply_methods(
    model: nn.Module,
    specs: Sequence[tuple[str, Mapping[str, Any] | None]] | Mapping[str, Mapping[str, Any] | None],
    freeze_base: bool = True,
) -> list[PeftMethod]:
    """Apply several methods in order, e.g. ``[("prefix", {}), ("lora", {"r": 8})]``."""
    items = list(specs.items()) if isinstance(specs, Mapping) else list(specs)
    methods = []
    for name, cfg in items:
        method = get_method(name)()
        method.apply(model, cfg, freeze_base=freeze_base)
        methods.append(method)
    return methods


def concat_caches(caches: Sequence[Cache]) -> Cache:
    """One cache holding the positions of ``caches`` one after the other, layer by layer (two
    K/V-prefix methods: attention sees both prefixes)."""
    if len(caches) == 1:
        return caches[0]
    n_layers = {len(c.layers) for c in caches}
    if len(n_layers) != 1:
        raise ValueError(f"PEFT caches to concatenate have different layer counts {n_layers}")
    return DynamicCache([
        (
            torch.cat([c.layers[i].keys for c in caches], dim=-2),
            torch.cat([c.layers[i].values for c in caches], dim=-2),
        )
        for i in range(n_layers.pop())
    ])


def _same(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):  # no elementwise ==
        return False
    return bool(a == b)


def merge_inputs(parts: Iterable[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Compose ``(method name, forward inputs)`` pairs into one set of forward keyword
    arguments: ``past_key_values`` caches are concatenated (:func:`concat_caches`), any other
    key may be given twice only with the same value."""
    out: dict[str, Any] = {}
    by: dict[str, str] = {}
    caches: list[Cache] = []
    for name, kwargs in parts:
        for k, v in kwargs.items():
            if k == "past_key_values":
                if v is not None:
                    caches.append(v)
                continue
            if k in out and not _same(out[k], v):
                raise ValueError(
                    f"PEFT methods {by[k]!r} and {name!r} supply different values for forward "
                    f"argument {k!r}"
                )
            out[k], by[k] = v, by.get(k, name)
    if caches:
        out["past_key_values"] = concat_caches(caches)
    return out


def forward_kwargs(methods: Iterable[PeftMethod], batch_size: int) -> dict[str, Any]:
    """Merged extra training-forward inputs of ``methods`` (:func:`merge_inputs`)."""
    return merge_inputs((m.name, m.forward_kwargs(batch_size)) for m in methods)


def save_methods(methods: Sequence[PeftMethod], directory: str | os.PathLike) -> Path:
    """Write each method into ``<dir>/<i>_<name>/`` plus ``<dir>/peft_methods.json``."""
    directory = Path(directory)
    with atomic_path(directory, is_dir=True) as tmp:
        entries = []
        for i, m in enumerate(methods):
            sub = f"{i}_{m.name}"
            m.save(tmp / sub)
            entries.append({"method": m.name, "dir": sub})
        meta = {"format_version": FORMAT_VERSION, "methods": entries}
        (tmp / COMPOSITION_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def load_methods(
    model: nn.Module, directory: str | os.PathLike, freeze_base: bool = True
) -> list[PeftMethod]:
    """Inverse of :func:`save_methods`: re-apply every method to ``model`` and load weights."""
    path = Path(directory) / COMPOSITION_FILE
    if not path.is_file():
        raise FileNotFoundError(f"not a saved PEFT composition (no {path})")
    entries = json.loads(path.read_text()).get("methods")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: 'methods' must be a list")
    return [
        PeftMethod.from_pretrained(model, Path(directory) / e["dir"], freeze_base=freeze_base)
        for e in entries
    ]
