"""Helpers of the PT-PEFT stage tests (test_peft_stage): their tiny world, stage settings as the
planner resolves them, a recording ``peft_hook`` and readers of what a trained stage saved
(``model/`` and ``peft/``). Configs and the world builder are the shared ones of helpers.py.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from helpers import TinyWorld, build_world, lm_cfg, stage_paths, vision_cfg
from safetensors.torch import load_file
from torch import nn

from vlalign.config import deep_merge
from vlalign.data.tokenizer import load_tokenizer
from vlalign.methods.registry import COMPOSITION_FILE, WEIGHTS_FILE, owner
from vlalign.methods.stage import PeftSession, peft_hook
from vlalign.models.backbones import load_image_processor
from vlalign.models.vlm import VisionLanguageModel
from vlalign.runs.plan import TRAIN_DEFAULTS
from vlalign.train.data import collate
from vlalign.train.loop import stage_examples, train_stage

# A smaller world than the generator's default (32 px, fewer objects and texts): the PEFT tests
# train many short stages and compare logits, not what is learned.
WORLD_CFG = {
    "image_size": 32,
    "grid": 3,
    "max_objects": 3,
    "captions_per_image": 5,
    "qa_per_image": 2,
    "conversation_turns": 2,
}
SPLITS = {"train": 16, "val": 4, "test": 6}
DATASETS = {"world": "source", "world_target": "target"}
VISION_CFG = vision_cfg(image_size=32)  # the world's 32 px images: 16 patch tokens
# initializer_range 0.1: with near-zero weights a perturbed prefix rarely changes an argmax
LM_CFG = lm_cfg(initializer_range=0.1)
FROZEN = {"vision": 0, "projector": 0, "lm": 0}


def build_peft_world(root: Path, seed: int = 0) -> TinyWorld:
    """Datasets ``world`` (source) and ``world_target``, a tokenizer on both and untrained
    backbones."""
    return build_world(root, SPLITS, datasets=DATASETS, world_cfg=WORLD_CFG, vision=VISION_CFG,
                       lm=LM_CFG, seed=seed)  # fmt: skip


def stage_settings(
    dataset: str = "world_target",
    text: str = "captions",
    lr: dict[str, float] | None = None,
    peft: dict[str, Any] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Complete stage settings, as ``vlalign.runs.plan`` resolves them (defaults + stage)."""
    stage = {
        "dataset": dataset,
        "text": text,
        "lr": dict(lr or FROZEN),
        "mask": "prefix",
        "max_steps": 3,
        "batch_size": 8,
        "micro_batch_size": 8,
        "max_length": 48,
        "warmup_ratio": 0.0,
        "schedule": "constant",  # every step moves the trained weights
        "checkpoint_every": 1000,
        "peft": peft,
        **overrides,
    }
    return deep_merge(TRAIN_DEFAULTS, stage)


def train(
    world: TinyWorld,
    label: str,
    settings: dict[str, Any],
    parent: Path | None = None,
    hook: Any = peft_hook,
    seed: int = 0,
) -> tuple[Path, dict[str, Any]]:
    """Run ``train_stage`` into a fresh stage dir; returns (dir, the stage.json dict)."""
    paths = stage_paths(world, world.root, world.stage_dir(label).name, parent,
                        dataset=settings["dataset"])  # fmt: skip
    result = train_stage(
        settings, paths, name=label, stage_hash=f"{label[:12]:<12}", seed=seed, peft_hook=hook
    )
    return paths.out, result


def probe_batch(world: TinyWorld, n: int = 4, dataset: str = "world_target") -> dict:
    """A fixed caption batch (val split) for comparing logits."""
    settings = stage_settings(dataset=dataset)
    paths = stage_paths(world, world.root, "unused", dataset=dataset)
    tok = load_tokenizer(world.tokenizer)
    ex = stage_examples(paths, "val", settings, tok, load_image_processor(world.vision))
    return collate([ex[i] for i in range(min(n, len(ex)))], tok.pad_token_id)


@torch.no_grad()
def peft_logits(
    model: VisionLanguageModel, session: PeftSession | None, batch: dict
) -> torch.Tensor:
    """Eval-mode logits of ``model`` with the session's forward inputs (e.g. the prefix cache)."""
    was_training = model.training
    model.eval()
    try:
        kw = session.forward_kwargs(len(batch["input_ids"])) if session else {}
        return model(**batch, **kw).logits.detach().clone()
    finally:
        model.train(was_training)


def base_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters no PEFT method owns, by their plain name (peft's ``.base_layer`` removed)."""
    return {
        n.replace(".base_layer", ""): p.detach().clone()
        for n, p in model.named_parameters()
        if owner(p) is None
    }


def method_states(session: PeftSession | None) -> dict[str, dict[str, torch.Tensor]]:
    if session is None:
        return {}
    return {m.name: {k: v.clone() for k, v in m.state_dict().items()} for m in session.methods}


@dataclass
class Snapshot:
    methods: dict[str, dict[str, torch.Tensor]]
    base: dict[str, torch.Tensor]
    requires_grad: dict[str, bool]  # every parameter of the model (PEFT-owned included)
    numel: dict[str, int]


def snapshot(model: nn.Module, session: PeftSession | None) -> Snapshot:
    return Snapshot(
        method_states(session),
        base_parameters(model),
        {n: p.requires_grad for n, p in model.named_parameters()},
        {n: p.numel() for n, p in model.named_parameters()},
    )


class RecordingHook:
    """The real :func:`vlalign.methods.stage.peft_hook`, plus a record of the model and session it
    produced: a snapshot right after attaching, and one (with ``probe`` logits) just before the
    trainer saves the stage — i.e. of the in-memory model as trained."""

    def __init__(self, probe: dict | None = None):
        self.probe = probe
        self.model: VisionLanguageModel | None = None
        self.session: PeftSession | None = None
        self.at_attach: Snapshot | None = None
        self.at_save: Snapshot | None = None
        self.logits: torch.Tensor | None = None

    def __call__(self, model, settings, parent_dir):
        session = peft_hook(model, settings, parent_dir)
        self.model, self.session = model, session
        self.at_attach = snapshot(model, session)
        if session is not None:
            save = session.save

            def recording_save(directory: Path) -> None:
                self.at_save = snapshot(model, session)
                if self.probe is not None:
                    self.logits = peft_logits(model, session, self.probe)
                save(directory)

            session.save = recording_save  # instance attribute: this session only
        return session


def saved_peft(stage_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    """``{method: {key: tensor}}`` as written to ``<stage>/peft/``; {} when there is none."""
    root = stage_dir / "peft"
    if not root.is_dir():
        return {}
    entries = json.loads((root / COMPOSITION_FILE).read_text())["methods"]
    return {e["method"]: load_file(str(root / e["dir"] / WEIGHTS_FILE)) for e in entries}


def saved_model(stage_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of ``<stage>/model/`` (vision, projector, LM), keyed ``<file>:<name>``."""
    out = {}
    for f in sorted((stage_dir / "model").rglob("*.safetensors")):
        rel = f.relative_to(stage_dir / "model").as_posix()
        out.update({f"{rel}:{k}": v for k, v in load_file(str(f)).items()})
    if not out:
        raise FileNotFoundError(f"no safetensors under {stage_dir / 'model'}")
    return out


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> set[str]:
    """Keys whose tensors differ (the key sets must match)."""
    assert set(before) == set(after), sorted(set(before) ^ set(after))[:8]
    return {k for k in before if not torch.equal(before[k], after[k])}
