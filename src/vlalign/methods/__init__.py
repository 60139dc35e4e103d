"""PEFT methods for PT-PEFT (seed 003): prefix-tuning, LoRA, S-/P-Adapter, full fine-tuning;
and PETAL's (seed 001) dynamic mode approximation (``dma``), adaptive instruction MoE
(``instruction_moe``) and score-based information bottleneck (``info_bottleneck``).

Usage::

    from vlalign.methods import apply_methods, forward_kwargs, get_method

    prefix, lora = apply_methods(vlm, [("prefix", {"num_prefix": 16}), ("lora", {})])
    lora.set_trainable(False)                       # prefix→LoRA, phase A: prefix only
    out = vlm(..., **forward_kwargs([prefix, lora], batch_size))
    lora.set_trainable(True)                        # phase B: LoRA and the prefix

In a stage, :class:`vlalign.methods.stage.PeftSession` composes the methods' hooks (training
inputs, extra losses, inference inputs and variants, removal); generation takes
``generate(vlm, ..., inputs=session.inference())``.

A new method is one module with a ``@register("name")`` subclass of :class:`PeftMethod`
(see its hooks), imported below.
"""

from vlalign.methods import (  # noqa: F401  (registers the methods)
    adapters,
    dma,
    full,
    info_bottleneck,
    instruction_moe,
    itm,
    lora,
    mam,
    mrm,
    prefix,
    tcm,
)
from vlalign.methods.adapters import Bottleneck, bottleneck_for_budget
from vlalign.methods.info_bottleneck import InfoBottleneck, gaussian_kl, score_pool
from vlalign.methods.instruction_moe import InstructionMoE, instruction_mask
from vlalign.methods.prefix import (
    PREFIX_VARIANTS,
    FrozenPrefix,
    PrefixEncoder,
    PrefixModule,
    kv_geometry,
    prefix_position_ids,
    prefix_variant,
)
from vlalign.methods.registry import (
    PEFT_METHODS,
    PeftMethod,
    apply_methods,
    count_trainable,
    forward_kwargs,
    get_method,
    load_methods,
    merge_inputs,
    register,
    save_methods,
)

__all__ = [
    "PEFT_METHODS",
    "PREFIX_VARIANTS",
    "Bottleneck",
    "FrozenPrefix",
    "InfoBottleneck",
    "InstructionMoE",
    "PeftMethod",
    "PrefixEncoder",
    "PrefixModule",
    "apply_methods",
    "bottleneck_for_budget",
    "count_trainable",
    "forward_kwargs",
    "gaussian_kl",
    "get_method",
    "instruction_mask",
    "kv_geometry",
    "load_methods",
    "merge_inputs",
    "prefix_position_ids",
    "prefix_variant",
    "register",
    "save_methods",
    "score_pool",
]
