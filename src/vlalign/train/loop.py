"""The training loop for one stage: per-module LRs, gradient accumulation to a global batch,
bf16 autocast on GPU, checkpoint / resume, per-step log.

Resumption is exact: the data order of every epoch and the stage0 noise of every step are pure
functions of (seed, step), and the checkpoint carries model, optimizer, scheduler and RNG
state, so a killed job resumed from its last checkpoint ends at the same loss as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from datasets import load_from_disk
from tqdm.auto import tqdm

from vlalign.data.tokenizer import load_tokenizer, vlm_token_ids
from vlalign.io_utils import atomic_path, stable_hash, write_json_atomic
from vlalign.models.backbones import load_image_processor
from vlalign.models.vlm import VisionLanguageModel
from vlalign.train.data import StageExamples, collate
from vlalign.train.features import FeatureCache
from vlalign.train.optim import build_optimizer, freeze_by_lr, param_groups

log = logging.getLogger(__name__)

LOG_COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s")
STATE_FILE = "state.pt"


@dataclass
class StagePaths:
    out: Path  # the stage's declared output directory
    checkpoint_dir: Path  # NOT a Snakemake output: survives a killed / requeued job
    tokenizer: Path
    vision: Path  # pre-trained vision backbone dir (image processor; first stage weights)
    lm: Path  # pre-trained LM dir (first stage weights)
    data: Path
    parent: Path | None = None  # parent stage output dir
    features: Path | None = None  # frozen-feature cache dir


def build_model(
    settings: dict[str, Any], model_cfg: dict[str, Any], paths: StagePaths, tokenizer, seed: int
) -> VisionLanguageModel:
    specials = vlm_token_ids(tokenizer)
    kwargs = dict(
        attn_implementation=model_cfg.get("attn_implementation", "sdpa"),
        mask_mode=settings["mask"],
        protected_token_ids=sorted(set(specials.values())),
        noise_vocab_size=len(tokenizer),
    )
    if paths.parent is not None:
        return VisionLanguageModel.from_pretrained(paths.parent / "model", **kwargs)
    torch.manual_seed(seed)  # the fresh projector's initialisation
    return VisionLanguageModel.from_parts(
        paths.vision,
        paths.lm,
        projector_kind=model_cfg.get("projector", "mlp2x_gelu"),
        **kwargs,
        **model_cfg.get("projector_kwargs", {}),
    )


def stage_examples(
    paths: StagePaths, split: str, settings: dict[str, Any], tokenizer, processor
) -> StageExamples:
    dsd = load_from_disk(str(paths.data))
    if split not in dsd:
        raise ValueError(f"{paths.data}: no split {split!r}")
    features = FeatureCache(paths.features) if paths.features else None
    return StageExamples(
        dsd[split],
        tokenizer,
        settings["text"],
        settings["max_length"],
        processor=processor,
        features=features,
        split_name=split,
        name=settings["dataset"],
    )


def epoch_order(seed: int, epoch: int, subset: list[int]) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return [subset[i] for i in torch.randperm(len(subset), generator=g).tolist()]


def data_subset(n_rows: int, fraction: float, seed: int) -> list[int]:
    """A fixed random subset for data-fraction ablations (the same for every epoch)."""
    if fraction >= 1.0:
        return list(range(n_rows))
    g = torch.Generator().manual_seed(seed + 17)
    keep = max(1, round(fraction * n_rows))
    return sorted(torch.randperm(n_rows, generator=g)[:keep].tolist())


def _to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def heldout_loss(
    model: VisionLanguageModel,
    examples: StageExamples,
    pad_id: int,
    batch_size: int = 32,
    mask_mode: str | None = None,
    peft=None,
) -> float:
    """Token-weighted mean next-token loss over a split (no noise)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = _to(
            collate(
                [examples[i] for i in range(start, min(start + batch_size, len(examples)))], pad_id
            ),
            device,
        )
        n = int((batch["labels"] != -100).sum())
        extra_kw = peft.forward_kwargs(len(batch["input_ids"])) if peft else {}
        out = model(**batch, mask_mode=mask_mode, **extra_kw)
        total += out.loss.detach().item() * n
        count += n
    model.train(was_training)
    return total / max(count, 1)


def _rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def checkpoint_identity(stage_hash: str, settings: dict[str, Any]) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (interval changes are harmless)."""
    return {
        "hash": stage_hash,
        "settings": {k: v for k, v in settings.items() if k != "checkpoint_every"},
    }


def save_checkpoint(
    path: Path,
    model,
    optimizer,
    scheduler,
    step: int,
    rows: list[dict],
    peft=None,
    identity: dict[str, Any] | None = None,
) -> None:
    """Atomic: a job killed while saving keeps its previous checkpoint."""
    path.mkdir(parents=True, exist_ok=True)
    state = {
        "step": step,
        "model": trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "log": rows,
        "peft": peft.state_dict() if peft else None,
        "identity": identity,
    }
    tmp = path / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / STATE_FILE)


def load_checkpoint(
    path: Path, model, optimizer, scheduler, peft=None, identity: dict[str, Any] | None = None
) -> tuple[int, list[dict]]:
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    if identity is not None and stable_hash(state.get("identity")) != stable_hash(identity):
        raise ValueError(
            f"{path / STATE_FILE}: checkpoint was written by a stage with other "
            f"settings (hash {(state.get('identity') or {}).get('hash')}, this "
            f"stage {identity['hash']}); delete it to start this stage over"
        )
    missing = set(trainable_state(model)) - set(state["model"])
    if missing:
        raise ValueError(
            f"{path / STATE_FILE}: checkpoint lacks trainable tensors "
            f"{sorted(missing)[:5]}… (stage settings changed?)"
        )
    model.load_state_dict(state["model"], strict=False)
    if peft is not None:  # the prefix encoder lives outside the model
        peft.load_state_dict(state["peft"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["step"], state["log"]


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=LOG_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def count_parameters(model: torch.nn.Module) -> tuple[int, float]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, 100.0 * trainable / total


def train_stage(
    settings: dict[str, Any],
    paths: StagePaths,
    *,
    name: str,
    stage_hash: str,
    seed: int,
    model_cfg: dict[str, Any] | None = None,
    peft_hook=None,
) -> dict[str, Any]:
    """Train one stage and write ``paths.out`` (model/, train_log.csv, stage.json) atomically.

    ``peft_hook(model, settings, parent_dir)`` attaches PEFT methods and returns a
    ``vlalign.methods.stage.PeftSession`` (or None for a plain stage)."""
    model_cfg = model_cfg or {}
    started = datetime.now(UTC).isoformat()
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(
        mixed_precision="bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    )
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)

    tokenizer = load_tokenizer(paths.tokenizer)
    pad_id = tokenizer.pad_token_id
    model = build_model(settings, model_cfg, paths, tokenizer, seed)
    freeze_by_lr(model, settings["lr"])
    peft = peft_hook(model, settings, paths.parent) if peft_hook else None
    extra = peft.groups if peft else None
    if settings.get("gradient_checkpointing"):
        for part in (model.lm, model.vision):
            if any(p.requires_grad for p in part.parameters()):
                part.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
    n_trainable, pct = peft.count_trainable(model) if peft else count_parameters(model)

    if paths.features is not None and float(settings["lr"].get("vision", 0)) > 0:
        raise ValueError(
            f"stage {name}: a frozen-feature cache ({paths.features}) cannot train "
            "the vision encoder (lr.vision > 0); read images instead"
        )
    processor = load_image_processor(paths.vision) if paths.features is None else None
    train = stage_examples(paths, "train", settings, tokenizer, processor)
    subset = data_subset(len(train), settings.get("data_fraction", 1.0), seed)

    world = accelerator.num_processes
    global_batch = settings["batch_size"]
    micro = min(settings["micro_batch_size"], global_batch)
    if global_batch % (micro * world):
        raise ValueError(
            f"stage {name}: batch_size {global_batch} is not a multiple of "
            f"micro_batch_size {micro} x {world} processes"
        )
    steps_per_epoch = math.ceil(len(subset) / global_batch)
    total = settings.get("max_steps") or math.ceil(settings["epochs"] * steps_per_epoch)

    groups = param_groups(
        model, settings["lr"], settings.get("optimizer", {}).get("weight_decay", 0.0), extra
    )
    optimizer, scheduler = build_optimizer(groups, settings, total)
    trainable = [p for g in groups for p in g["params"]]
    model, optimizer = accelerator.prepare(model, optimizer)
    device = accelerator.device

    start_step, rows = 0, []
    identity = checkpoint_identity(stage_hash, settings)
    if (paths.checkpoint_dir / STATE_FILE).exists():
        start_step, rows = load_checkpoint(
            paths.checkpoint_dir,
            accelerator.unwrap_model(model),
            optimizer,
            scheduler,
            peft,
            identity,
        )
        log.info(
            "stage %s: resuming from step %d/%d (%s)", name, start_step, total, paths.checkpoint_dir
        )
    unwrapped = accelerator.unwrap_model(model)
    n_img_tokens = None
    model.train()
    bar = tqdm(
        range(start_step, total),
        desc=f"{name} [{stage_hash}]",
        initial=start_step,
        total=total,
        mininterval=2,
        disable=not accelerator.is_main_process,
    )
    order_epoch, order = -1, []
    for step in bar:
        t0 = time.perf_counter()
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != order_epoch:  # the order is a function of (seed, epoch): resumable
            train.set_epoch(epoch)
            order_epoch, order = epoch, epoch_order(seed, epoch, subset)
        batch_idx = order[pos * global_batch : (pos + 1) * global_batch]
        local = batch_idx[accelerator.process_index :: world]
        micro_batches = [
            collate([train[i] for i in local[j : j + micro]], pad_id)
            for j in range(0, len(local), micro)
        ]
        n_sup = sum(int((b["labels"] != -100).sum()) for b in micro_batches)
        if n_sup == 0:
            raise RuntimeError(
                f"stage {name}: the batch of step {step} has no supervised tokens (all labels "
                "are -100): the text format or truncation (max_length) drops every target"
            )
        loss_sum, n_tokens = 0.0, 0
        for k, batch in enumerate(micro_batches):
            batch = _to(batch, device)
            n = int((batch["labels"] != -100).sum())
            noise_gen = torch.Generator(device="cpu").manual_seed(seed * 7_919 + step * 131 + k)
            last = k == len(micro_batches) - 1
            ctx = accelerator.no_sync(model) if not last and world > 1 else contextlib.nullcontext()
            with ctx, accelerator.autocast():
                extra_kw = peft.forward_kwargs(len(batch["input_ids"])) if peft else {}
                out = model(
                    **batch,
                    noise_fraction=settings.get("noise", 0.0),
                    generator=noise_gen,
                    **extra_kw,
                )
                loss = out.loss * (n / n_sup)  # token-weighted mean over the global batch
                accelerator.backward(loss)
            loss_sum += out.loss.detach().item() * n
            n_img_tokens = out.num_image_tokens
            n_tokens += int(batch["attention_mask"].sum()) + out.num_image_tokens * len(
                batch["input_ids"]
            )
        max_norm = settings.get("max_grad_norm") or float("inf")
        grad_norm = float(accelerator.clip_grad_norm_(trainable, max_norm))
        lr_now = max(g["lr"] for g in optimizer.param_groups)  # the LR this step used
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        rows.append(
            {
                "step": step + 1,
                "loss": loss_sum / n_sup,
                "lr": lr_now,
                "grad_norm": grad_norm,
                "tokens_per_s": n_tokens * world / dt,
                "samples_per_s": len(batch_idx) / dt,
            }
        )
        bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", refresh=False)
        done = step + 1
        if done % settings.get("checkpoint_every", 50) == 0 and done < total:
            if accelerator.is_main_process:
                save_checkpoint(
                    paths.checkpoint_dir,
                    unwrapped,
                    optimizer,
                    scheduler,
                    done,
                    rows,
                    peft,
                    identity,
                )
            accelerator.wait_for_everyone()

    result: dict[str, Any] = {}
    if accelerator.is_main_process:
        val = stage_examples(paths, "val", settings, tokenizer, processor)
        result = {
            "name": name,
            "hash": stage_hash,
            "seed": seed,
            "settings": settings,
            "parent": str(paths.parent) if paths.parent else None,
            "steps": total,
            "epochs": total / steps_per_epoch,
            "train_samples": len(subset),
            "heldout_loss": heldout_loss(unwrapped, val, pad_id, peft=peft),
            "trainable_params": n_trainable,
            "trainable_pct": pct,
            "peft": sorted(m.name for m in peft.methods) if peft else [],
            "image_tokens": n_img_tokens,
            "device": str(device),
            "processes": world,
            "mixed_precision": accelerator.mixed_precision,
            "feature_cache": str(paths.features) if paths.features else None,
            "start": started,
            "end": datetime.now(UTC).isoformat(),
        }
        with atomic_path(paths.out, is_dir=True) as tmp:
            if peft:  # methods apart, then the clean base model
                peft.save(tmp / "peft")
                peft.strip()
            unwrapped.save_pretrained(tmp / "model")
            (tmp / "train_log.csv").write_text(_csv(rows))
            write_json_atomic(tmp / "stage.json", result)
        shutil.rmtree(paths.checkpoint_dir, ignore_errors=True)
        log.info(
            "stage %s [%s]: %d steps, held-out loss %.4f -> %s",
            name,
            stage_hash,
            total,
            result["heldout_loss"],
            paths.out,
        )
    accelerator.wait_for_everyone()
    return result
