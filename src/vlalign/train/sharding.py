"""The trainer's state under FSDP2 (``torch.distributed.fsdp.fully_shard``) and without it.

A sharded module holds 1/N of each parameter per rank (a ``DTensor``), so the trainer reads and
writes its state through collectives that every rank enters:

- checkpoints: the full trainable state and the full optimizer state (torch's
  ``torch.distributed.checkpoint.state_dict``), keyed by parameter name, so a checkpoint resumes
  under any process count, sharded or not;
- the stage output: :func:`gather_weights` puts the full tensors into rank 0's modules, which
  ``save_pretrained`` and the PEFT methods' savers then read as usual.

accelerate shards the model itself for ``distributed_type: FSDP`` on GPUs, but on CPU processes
it silently runs such a launch as DDP (``MULTI_CPU``). :func:`shard_on_cpu` then applies the same
FSDP2 units (one per layer class of ``fsdp_transformer_layer_cls_to_wrap``, then the root) with
gloo, so an FSDP config means sharded training everywhere and its state handling is testable on
a CPU machine.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, parse_flag_from_env
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule

# what `accelerate launch` exports from an accelerate config with distributed_type: FSDP
FSDP_FLAG = "ACCELERATE_USE_FSDP"
FSDP_LAYERS = "FSDP_TRANSFORMER_CLS_TO_WRAP"

# full tensors on rank 0 (CPU), trainable parameters only: what a checkpoint stores
_SAVE = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
# every rank passes the full tensors it read; strict=False: frozen parameters are not in it
_LOAD = StateDictOptions(full_state_dict=True, strict=False)


def fsdp_on_cpu(accelerator: Accelerator) -> bool:
    """An FSDP launch whose processes run on the CPU, which accelerate runs as DDP."""
    return accelerator.distributed_type == DistributedType.MULTI_CPU and parse_flag_from_env(
        FSDP_FLAG
    )


def fsdp_layer_classes() -> list[str]:
    """The layer classes the launch's accelerate config shards as units of their own."""
    return [name.strip() for name in os.environ.get(FSDP_LAYERS, "").split(",") if name.strip()]


def shard_on_cpu(module: torch.nn.Module, layer_classes: Sequence[str]) -> int:
    """``fully_shard`` every submodule whose class is named in ``layer_classes``, then
    ``module`` (the root holds the rest), on a CPU mesh over all processes, as accelerate's
    ``TRANSFORMER_BASED_WRAP`` does on GPUs; → the number of layer units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    wanted = set(layer_classes)
    layers = [m for m in module.modules() if type(m).__name__ in wanted]
    found = {type(m).__name__ for m in layers}
    if wanted - found:
        present = sorted({type(m).__name__ for m in module.modules()})
        raise ValueError(
            f"{FSDP_LAYERS} (fsdp_transformer_layer_cls_to_wrap of the accelerate config) names "
            f"{sorted(wanted - found)}, which the model does not have; its classes: {present}"
        )
    mesh = init_device_mesh("cpu", (torch.distributed.get_world_size(),))
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return len(layers)


def is_sharded(module: torch.nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in module.modules())


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


def full_trainable_state(root: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters' full tensors by name (on CPU; {} off rank 0 when sharded).
    A collective when ``root`` is sharded: every rank calls it."""
    return get_model_state_dict(root, options=_SAVE)


def full_optimizer_state(root: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name (full tensors; a collective as above)."""
    return get_optimizer_state_dict(root, _inner(optimizer), options=_SAVE)


def load_full_state(
    root: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
) -> None:
    """Load :func:`full_trainable_state` / :func:`full_optimizer_state` output into ``root``
    and ``optimizer``, sharding it when ``root`` is sharded (every rank calls it)."""
    set_model_state_dict(root, model_state, options=_LOAD)
    set_optimizer_state_dict(root, _inner(optimizer), optimizer_state, options=_LOAD)


def gather_weights(root: torch.nn.Module) -> None:
    """Make ``root`` an unsharded module on rank 0 (a collective; nothing without sharding):
    every parameter is replaced by its full tensor, gathered on the CPU, so that
    ``save_pretrained`` and the PEFT methods' savers read plain weights. Tied parameters stay
    one tensor. The other ranks keep their shards; ``root`` is not trained afterwards."""
    if not is_sharded(root):
        return
    full = get_model_state_dict(
        root, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not full:  # not rank 0
        return
    replaced: dict[int, torch.nn.Parameter] = {}
    for name, old in list(root.named_parameters(remove_duplicate=False)):
        owner_name, _, attr = name.rpartition(".")
        owner = root.get_submodule(owner_name)
        if id(old) not in replaced:
            replaced[id(old)] = torch.nn.Parameter(full[name], requires_grad=old.requires_grad)
        owner._parameters[attr] = replaced[id(old)]


def scalar(value: torch.Tensor | float) -> float:
    """A norm computed over sharded gradients (a ``DTensor``) or plain ones, as a float."""
    full = getattr(value, "full_tensor", None)
    return float(full() if full is not None else value)
