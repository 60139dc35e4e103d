"""Bottleneck adapters (seed 003: S-Adapter and P-Adapter, as in LLM-Adapters / Hu et al. 2023).

- **S-Adapter** (sequential, Houlsby et al. 2019): after the attention block and after the MLP,
  before each residual add: ``y ← y + up(act(down(y)))``.
- **P-Adapter** (parallel, He et al. 2021): next to the MLP: ``mlp(x) + s·up(act(down(x)))``
  with ``x`` the MLP input.

``up`` is zero-initialised, so an adapted model computes exactly the base model at init.

Why our own: peft 0.21 has no bottleneck adapters and AdapterHub does not import with
transformers 5. Mechanism: forward hooks on ``layer.self_attn`` / ``layer.mlp`` of every decoder
layer, with the adapter registered as a child of the hooked module (``mlp.s_adapter.down...``).
Hooks leave the base model's parameter names untouched (wrapping would rename them and break
loading pretrained weights), and being children the adapters follow ``.to()``, ``.train()`` and
``parameters()``. v5 decoder layers return a tensor, ``self_attn`` a ``(output, weights)`` tuple:
the hook handles both. :meth:`BottleneckMethod.remove` takes the adapters out again (e.g. before
``lm.save_pretrained``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from vlalign.methods.registry import PeftMethod, decoder_layers, register, text_config

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
LOCATIONS = ("attn", "mlp")


class Bottleneck(nn.Module):
    """``up(act(down(x)))`` with ``up`` zero-initialised (the adapter starts as the zero map)."""

    def __init__(self, dim: int, bottleneck: int, activation: str = "gelu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; expected {sorted(ACTIVATIONS)}")
        if bottleneck < 1:
            raise ValueError(f"bottleneck_size must be >= 1, got {bottleneck}")
        self.down = nn.Linear(dim, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


def bottleneck_params(dim: int, bottleneck: int) -> int:
    return 2 * dim * bottleneck + bottleneck + dim


def bottleneck_for_budget(lm: nn.Module, n_params: int, locations: tuple[str, ...]) -> int:
    """Largest bottleneck size whose adapters (one per layer and location) use at most
    ``n_params`` parameters — to match trainable-parameter counts across methods."""
    cfg = text_config(lm)
    n_adapters = cfg.num_hidden_layers * len(locations)
    d = cfg.hidden_size
    b = (n_params // n_adapters - d) // (2 * d + 1)
    if b < 1:
        raise ValueError(
            f"a budget of {n_params} parameters is too small for {n_adapters} adapters"
        )
    return int(b)


def _check_locations(locations: Any) -> tuple[str, ...]:
    locs = tuple(locations)
    bad = [x for x in locs if x not in LOCATIONS]
    if bad or not locs or len(set(locs)) != len(locs):
        raise ValueError(f"adapter locations {list(locs)} invalid; choose from {LOCATIONS}")
    return locs


class BottleneckMethod(PeftMethod):
    """Shared implementation; ``parallel`` decides sequential (S) vs parallel (P) placement."""

    parallel = False
    defaults: dict[str, Any] = {}
    budget_key = "bottleneck_size"

    def size_for_budget(self, lm: nn.Module, n_params: int, cfg: Mapping[str, Any]) -> int:
        return bottleneck_for_budget(lm, n_params, _check_locations(cfg["locations"]))

    def _attach(self, lm: nn.Module, cfg: dict[str, Any]) -> nn.Module:
        locations = _check_locations(cfg["locations"])
        size, act = int(cfg["bottleneck_size"]), str(cfg["activation"])
        scale = float(cfg.get("scaling", 1.0))
        dim = text_config(lm).hidden_size
        ref = next(lm.parameters())
        self._handles: list[RemovableHandle] = []
        self._hosts: list[nn.Module] = []
        adapters = nn.ModuleDict()
        for i, layer in enumerate(decoder_layers(lm)):
            for loc in locations:
                host = layer.self_attn if loc == "attn" else layer.mlp
                if hasattr(host, self.name):
                    raise ValueError(f"layer {i} {loc} already has a {self.name!r} adapter")
                adapter = Bottleneck(dim, size, act).to(device=ref.device, dtype=ref.dtype)
                adapter.train(host.training)
                host.add_module(self.name, adapter)
                hook = (
                    self._parallel_hook(adapter, scale)
                    if self.parallel
                    else self._seq_hook(adapter)
                )
                self._handles.append(host.register_forward_hook(hook, with_kwargs=True))
                self._hosts.append(host)
                adapters[f"layers_{i}_{loc}"] = adapter
        return adapters

    @staticmethod
    def _seq_hook(adapter: Bottleneck):  # y + A(y) on the block output
        def hook(module, args, kwargs, output):
            if isinstance(output, tuple):  # self_attn: (attn_output, attn_weights)
                y = output[0]
                return (y + adapter(y), *output[1:])
            return output + adapter(output)

        return hook

    @staticmethod
    def _parallel_hook(adapter: Bottleneck, scale: float):  # block(x) + s·A(x)
        def hook(module, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            if isinstance(output, tuple):
                return (output[0] + scale * adapter(x), *output[1:])
            return output + scale * adapter(x)

        return hook

    def _own_parameters(self) -> dict[str, nn.Parameter]:
        assert self.module is not None
        return {f"{self.name}.{n}": p for n, p in self.module.named_parameters()}

    def _detach(self) -> None:
        """Hooks and adapter modules out: the LM is the base model again."""
        for handle in self._handles:
            handle.remove()
        for host in self._hosts:
            delattr(host, self.name)
        self._handles, self._hosts = [], []


@register("s_adapter")
class SAdapterMethod(BottleneckMethod):
    parallel = False
    defaults = {"bottleneck_size": 32, "activation": "gelu", "locations": ["attn", "mlp"]}


@register("p_adapter")
class PAdapterMethod(BottleneckMethod):
    parallel = True
    defaults = {
        "bottleneck_size": 32,
        "activation": "gelu",
        "locations": ["mlp"],
        "scaling": 1.0,
    }
