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
import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import parse_flag_from_env
from datasets import load_from_disk
from tqdm.auto import tqdm

from vlalign.config import schema_defaults
from vlalign.data.text_formats import TextFormat
from vlalign.data.tokenizer import load_tokenizer, vlm_token_ids
from vlalign.io_utils import atomic_path, stable_hash, write_json_atomic
from vlalign.models.backbones import init_added_token_rows, load_image_processor, pretrained_here
from vlalign.models.noise import noise_seed
from vlalign.models.vlm import VisionLanguageModel
from vlalign.runs.settings import StageSettings, as_stage_settings
from vlalign.train.data import StageExamples, collate
from vlalign.train.features import FeatureCache
from vlalign.train.loader import StepBatches, resolve_num_workers
from vlalign.train.optim import build_optimizer, freeze_by_lr, param_groups
from vlalign.train.preemption import Preempted, StopSignals, checkpoint_lock, stop_requested
from vlalign.train.sharding import (
    fsdp_layer_classes,
    fsdp_on_cpu,
    full_optimizer_state,
    full_trainable_state,
    gather_weights,
    is_sharded,
    load_full_state,
    scalar,
    shard_on_cpu,
)
from vlalign.train.trackers import TRACKERS_DIR, log_row, start_trackers, tracker_dir

log = logging.getLogger(__name__)

LOG_COLUMNS = ("step", "loss", "lr", "grad_norm", "tokens_per_s", "samples_per_s")
STATE_FILE = "state.pt"
# 2: model and optimizer state keyed by parameter name, full tensors (any process count, sharded
# or not); 1 (no key): per-module tensors and the optimizer's own state_dict
CHECKPOINT_FORMAT = 2


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
    trackers: Path | None = None  # train.log_with's dir; None: <checkpoint_dir>/trackers


def build_model(
    settings: StageSettings,
    model_cfg: dict[str, Any],
    paths: StagePaths,
    tokenizer,
    seed: int,
) -> VisionLanguageModel:
    """The parent stage's model, or (first stage) the backbones with a fresh projector."""
    specials = vlm_token_ids(tokenizer)
    kwargs = dict(
        attn_implementation=model_cfg["attn_implementation"],
        mask_mode=settings.mask,
        protected_token_ids=sorted(set(specials.values())),
        noise_vocab_size=len(tokenizer),
        special_token_ids=specials,
    )
    if paths.parent is not None:
        return VisionLanguageModel.from_pretrained(paths.parent / "model", **kwargs)
    torch.manual_seed(seed)  # the fresh projector's initialisation
    model = VisionLanguageModel.from_parts(
        paths.vision,
        paths.lm,
        projector_kind=model_cfg["projector"],
        **kwargs,
        **model_cfg["projector_kwargs"],
    )
    if not pretrained_here(paths.lm):  # a fetched LM: the VLM tokens are new to it
        init_added_token_rows(model.lm, tokenizer, specials.values())
    return model


def stage_examples(
    paths: StagePaths, split: str, settings: Mapping[str, Any], tokenizer, processor
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
        text_format=TextFormat.from_settings(settings),
    )


def epoch_order(seed: int, epoch: int, subset: list[int]) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return [subset[i] for i in torch.randperm(len(subset), generator=g).tolist()]


def data_subset(
    n_rows: int, fraction: float, seed: int, count: int | None = None, name: str = "stage"
) -> list[int]:
    """A fixed random subset (the same for every epoch): ``count`` rows exactly (few-shot,
    ``max_train_samples``) or a ``fraction`` of them (data-fraction ablations), drawn from
    ``seed``; every row otherwise."""
    if count is not None:
        if count > n_rows:
            raise ValueError(
                f"{name}: max_train_samples {count} exceeds the {n_rows} rows of its train split"
            )
        keep = count
    elif fraction >= 1.0:
        return list(range(n_rows))
    else:
        keep = max(1, round(fraction * n_rows))
    g = torch.Generator().manual_seed(seed + 17)
    return sorted(torch.randperm(n_rows, generator=g)[:keep].tolist())


def _to(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def heldout_loss(
    model: torch.nn.Module,
    examples: StageExamples,
    pad_id: int,
    batch_size: int = 32,
    mask_mode: str | None = None,
) -> float:
    """Token-weighted mean next-token loss over a split (no noise). ``model``: a bare VLM, or
    the trainer's :class:`TrainForward` when PEFT methods are attached (it adds their inputs;
    a collective when sharded)."""
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
        out = model(**batch, mask_mode=mask_mode)
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


def checkpoint_identity(stage_hash: str, settings: StageSettings) -> dict[str, Any]:
    """What a checkpoint must match to be resumed (interval changes are harmless)."""
    return {"hash": stage_hash, "settings": settings.semantic()}


def save_checkpoint(
    path: Path,
    root: torch.nn.Module,
    optimizer,
    scheduler,
    step: int,
    rows: list[dict],
    identity: dict[str, Any] | None = None,
    write: bool = True,
) -> None:
    """Atomic: a job killed while saving keeps its previous checkpoint. ``root``: every module
    the optimizer trains (the trainer's :class:`TrainForward`). Every process calls it (the
    state of a sharded ``root`` is gathered by collectives); the one with ``write`` writes."""
    model_state = full_trainable_state(root)
    optimizer_state = full_optimizer_state(root, optimizer)
    if not write:
        return
    path.mkdir(parents=True, exist_ok=True)
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": step,
        "model": model_state,
        "optimizer": optimizer_state,
        "scheduler": scheduler.state_dict(),
        "rng": _rng_state(),
        "log": rows,
        "identity": identity,
    }
    tmp = path / f".{STATE_FILE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path / STATE_FILE)


def load_checkpoint(
    path: Path,
    root: torch.nn.Module,
    optimizer,
    scheduler,
    identity: dict[str, Any] | None = None,
) -> tuple[int, list[dict]]:
    """Every process reads the file and loads it (into its shards when ``root`` is sharded)."""
    file = path / STATE_FILE
    state = torch.load(file, map_location="cpu", weights_only=False)
    if identity is not None and stable_hash(state.get("identity")) != stable_hash(identity):
        raise ValueError(
            f"{file}: checkpoint was written by a stage with other "
            f"settings (hash {(state.get('identity') or {}).get('hash')}, this "
            f"stage {identity['hash']}); delete it to start this stage over"
        )
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{file}: checkpoint format {state.get('format', 1)}, this vlalign reads "
            f"{CHECKPOINT_FORMAT} (written by another version); delete it to start this stage over"
        )
    trainable = {n for n, p in root.named_parameters() if p.requires_grad}
    missing = trainable - set(state["model"])
    if missing:
        raise ValueError(
            f"{file}: checkpoint lacks trainable tensors "
            f"{sorted(missing)[:5]}… (stage settings changed?)"
        )
    load_full_state(root, optimizer, state["model"], state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return state["step"], state["log"]


def log_columns(rows: list[dict]) -> list[str]:
    """:data:`LOG_COLUMNS`, then the PEFT methods' auxiliary loss terms (``<method>.<term>``)
    in the order they first appear."""
    extra = dict.fromkeys(k for r in rows for k in r if k not in LOG_COLUMNS)
    return [*LOG_COLUMNS, *extra]


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=log_columns(rows))
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def parent_peft_trained(parent: Path | None) -> list[str]:
    """The PEFT methods the parent stage's chain trained (its ``stage.json``); a stage without
    methods written before that record existed trained none."""
    if parent is None:
        return []
    path = parent / "stage.json"
    info = json.loads(path.read_text())
    if "peft_trained" in info:
        return list(info["peft_trained"])
    if info.get("peft"):
        raise ValueError(
            f"{path}: has PEFT methods {info['peft']} but no 'peft_trained' (written by an "
            "older vlalign: retrain that stage)"
        )
    return []


def count_parameters(model: torch.nn.Module) -> tuple[int, float]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, 100.0 * trainable / total


# ---------------------------------------------------------------------------- the steps
@dataclass(frozen=True)
class StepPlan:
    """How a stage's data becomes optimizer steps."""

    global_batch: int  # samples per optimizer step, over all processes
    micro: int  # samples per forward / backward
    steps_per_epoch: int
    total: int  # optimizer steps of the stage


def plan_steps(n_samples: int, settings: StageSettings, processes: int, name: str) -> StepPlan:
    """The global batch is reached by gradient accumulation over micro-batches on every
    process; ``max_steps`` (if set) overrides ``epochs``."""
    global_batch = settings.batch_size
    micro = min(settings.micro_batch_size, global_batch)
    if global_batch % (micro * processes):
        raise ValueError(
            f"stage {name}: batch_size {global_batch} is not a multiple of "
            f"micro_batch_size {micro} x {processes} processes"
        )
    steps_per_epoch = math.ceil(n_samples / global_batch)
    total = settings.max_steps or math.ceil(settings.epochs * steps_per_epoch)
    return StepPlan(global_batch, micro, steps_per_epoch, total)


class TrainForward(torch.nn.Module):
    """The module accelerate prepares (wraps in DDP / shards with FSDP): the VLM together with
    the PEFT modules outside its tree (:meth:`PeftSession.modules_outside`, e.g. the prefix
    encoder), whose forward inputs (``PeftSession.forward_kwargs``) are computed *inside* this
    forward. Without it a prefix encoder's gradients were never all-reduced, and the ranks'
    encoders diverged. It owns no state: the VLM and the methods keep theirs (checkpoints are
    written from all of it by parameter name, stage outputs from the VLM and the methods); one
    process sees the same computation in the same order as a bare VLM forward."""

    def __init__(self, vlm: VisionLanguageModel, peft=None):
        super().__init__()
        self.vlm = vlm
        self.outside = torch.nn.ModuleList(peft.modules_outside(vlm) if peft else [])
        self.__dict__["peft"] = peft  # a plain attribute: not a module

    def forward(self, **inputs: Any):
        extra = self.peft.forward_kwargs(len(inputs["input_ids"])) if self.peft else {}
        return self.vlm(**inputs, **extra)


@dataclass
class StageSession:
    """What every step of one stage's training shares (built by :func:`build_session`)."""

    name: str
    stage_hash: str
    seed: int
    settings: StageSettings
    paths: StagePaths
    accelerator: Accelerator
    tokenizer: Any
    model: torch.nn.Module  # the TrainForward as prepared by accelerate (DDP / FSDP)
    root: TrainForward  # the same, unwrapped: every trained module, for state and held-out loss
    unwrapped: VisionLanguageModel
    peft: Any  # vlalign.methods.stage.PeftSession, or None for a plain stage
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    trainable: list[torch.nn.Parameter]
    processor: Any  # the image processor, or None when reading the frozen-feature cache
    train: StageExamples
    subset: list[int]
    steps: StepPlan
    n_trainable: int
    trainable_pct: float
    peft_trained: list[str]  # methods trained in this stage or earlier in the chain
    chain_trainable: int  # this stage's trainable params ∪ those of peft_trained (count once)
    chain_trainable_pct: float
    identity: dict[str, Any]  # what a checkpoint must match (checkpoint_identity)
    started: str
    n_image_tokens: int | None = None
    order_epoch: int = -1  # the epoch whose data order is in ``order``
    order: list[int] = field(default_factory=list)
    batches: StepBatches | None = None  # built at the first step (make_batches)

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def processes(self) -> int:
        return self.accelerator.num_processes


def process_state() -> PartialState:
    """This launch's processes. Read ``ACCELERATE_USE_CPU`` as ``AcceleratorState`` does: the
    first ``PartialState`` fixes the backend for the whole process, and without ``cpu=True`` a
    CPU launch (gloo) would make every rank a lone main process."""
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def make_accelerator(log_with: str | None = None, project_dir: Path | None = None) -> Accelerator:
    """bf16 autocast and TF32 on a GPU that has them; full precision on CPU. ``log_with``:
    accelerate's experiment trackers (``train.log_with``), writing under ``project_dir``."""
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(
        mixed_precision="bf16" if cuda and torch.cuda.is_bf16_supported() else "no",
        log_with=log_with,
        project_dir=str(project_dir) if log_with else None,
    )
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return accelerator


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_session(
    settings: StageSettings | Mapping[str, Any],
    paths: StagePaths,
    *,
    name: str,
    stage_hash: str,
    seed: int,
    model_cfg: dict[str, Any] | None = None,
    peft_hook=None,
) -> StageSession:
    """Model (PEFT attached, modules frozen by LR 0), data, optimizer and schedule of a stage,
    at step 0. ``settings`` must be complete (plain settings are checked by
    :meth:`StageSettings.from_dict`); ``model_cfg`` None = the schema's ``model:`` defaults."""
    settings = as_stage_settings(settings, f"stage {name}")
    model_cfg = schema_defaults("model") if model_cfg is None else model_cfg
    if paths.features is not None and settings.lr["vision"] > 0:
        raise ValueError(
            f"stage {name}: a frozen-feature cache ({paths.features}) cannot train "
            "the vision encoder (lr.vision > 0); read images instead"
        )
    started = datetime.now(UTC).isoformat()
    accelerator = make_accelerator(
        settings.log_with, tracker_dir(paths.checkpoint_dir, paths.trackers)
    )
    # The order of everything below fixes what the global RNG gives each draw: keep it.
    seed_everything(seed)
    tokenizer = load_tokenizer(paths.tokenizer)
    model = build_model(settings, model_cfg, paths, tokenizer, seed)
    freeze_by_lr(model, settings.lr)
    peft = peft_hook(model, settings.to_dict(), paths.parent) if peft_hook else None
    if settings.gradient_checkpointing:
        for part in (model.lm, model.vision):
            if any(p.requires_grad for p in part.parameters()):
                part.activation_checkpointing_enable(
                    activation_checkpointing_kwargs={"use_reentrant": False}
                )
    n_trainable, pct = peft.count_trainable(model) if peft else count_parameters(model)
    before = parent_peft_trained(paths.parent)
    peft_trained = peft.chain_trained(before) if peft else []
    chain_n, chain_pct = peft.count_chain(model, before) if peft else (n_trainable, pct)

    processor = load_image_processor(paths.vision) if paths.features is None else None
    train = stage_examples(paths, "train", settings, tokenizer, processor)
    subset = data_subset(
        len(train), settings.data_fraction, seed, settings.max_train_samples, f"stage {name}"
    )
    steps = plan_steps(len(subset), settings, accelerator.num_processes, name)

    root = TrainForward(model, peft)
    if fsdp_on_cpu(accelerator):  # accelerate would run the FSDP launch as DDP
        shard_on_cpu(root, fsdp_layer_classes())
    groups = param_groups(  # after sharding: its parameters replace the module's
        model, settings.lr, settings.optimizer.weight_decay, peft.groups if peft else None
    )
    optimizer, scheduler = build_optimizer(groups, settings, steps.total)
    if is_sharded(root):
        wrapped, optimizer = root, accelerator.prepare(optimizer)
    else:
        wrapped, optimizer = accelerator.prepare(root, optimizer)
    # accelerate's FSDP replaces the parameters (and the optimizer's references to them)
    trainable = [p for g in optimizer.param_groups for p in g["params"]]
    return StageSession(
        name=name,
        stage_hash=stage_hash,
        seed=seed,
        settings=settings,
        paths=paths,
        accelerator=accelerator,
        tokenizer=tokenizer,
        model=wrapped,
        root=accelerator.unwrap_model(wrapped),
        unwrapped=model,
        peft=peft,
        optimizer=optimizer,
        scheduler=scheduler,
        trainable=trainable,
        processor=processor,
        train=train,
        subset=subset,
        steps=steps,
        n_trainable=n_trainable,
        trainable_pct=pct,
        peft_trained=peft_trained,
        chain_trainable=chain_n,
        chain_trainable_pct=chain_pct,
        identity=checkpoint_identity(stage_hash, settings),
        started=started,
    )


def resume(session: StageSession) -> tuple[int, list[dict]]:
    """(first step to run, log rows so far): the checkpoint's, or (0, []) without one."""
    if not (session.paths.checkpoint_dir / STATE_FILE).exists():
        return 0, []
    start_step, rows = load_checkpoint(
        session.paths.checkpoint_dir,
        session.root,
        session.optimizer,
        session.scheduler,
        session.identity,
    )
    log.info(
        "stage %s: resuming from step %d/%d (%s)",
        session.name,
        start_step,
        session.steps.total,
        session.paths.checkpoint_dir,
    )
    return start_step, rows


def batch_indices(session: StageSession, step: int) -> list[int]:
    """The samples of optimizer step ``step`` (all processes): a function of (seed, step)."""
    epoch, pos = divmod(step, session.steps.steps_per_epoch)
    if epoch != session.order_epoch:  # the order is a function of (seed, epoch): resumable
        session.train.set_epoch(epoch)
        session.order_epoch = epoch
        session.order = epoch_order(session.seed, epoch, session.subset)
    gb = session.steps.global_batch
    return session.order[pos * gb : (pos + 1) * gb]


def make_batches(session: StageSession) -> StepBatches:
    """The stage's step batches: :func:`batch_indices` of every step (with its epoch), built
    by ``train.num_workers`` DataLoader workers (0: in this process)."""

    def rows(step: int) -> tuple[list[int], int]:
        return batch_indices(session, step), step // session.steps.steps_per_epoch

    acc = session.accelerator
    return StepBatches(
        session.train,
        rows,
        session.steps.total,
        session.steps.micro,
        session.pad_id,
        resolve_num_workers(session.settings.num_workers),
        rank=acc.process_index,
        world=session.processes,
    )


def _sum_over_processes(acc: Accelerator, values: list[float]) -> list[float]:
    """``values`` summed over the processes (all-reduce); as given with one process."""
    if acc.num_processes == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=acc.device)
    return acc.reduce(t, reduction="sum").tolist()


def train_step(session: StageSession, step: int) -> dict[str, float]:
    """One optimizer step (gradient accumulation over micro-batches); → its log row."""
    t0 = time.perf_counter()
    acc, model, settings = session.accelerator, session.model, session.settings
    world = session.processes
    if session.batches is None:
        session.batches = make_batches(session)
    step_batch = session.batches.get(step)
    micro_batches = step_batch.micro_batches
    # supervised tokens of the whole step, over all processes: every rank weighs its tokens
    # by the global count, so the all-reduced gradient is the global batch's token mean
    n_local = sum(int((b["labels"] != -100).sum()) for b in micro_batches)
    n_sup = int(_sum_over_processes(acc, [n_local])[0])
    if n_sup == 0:
        raise RuntimeError(
            f"stage {session.name}: the batch of step {step} has no supervised tokens (all "
            "labels are -100): the text format or truncation (max_length) drops every target"
        )
    loss_sum, n_tokens = 0.0, 0
    terms: dict[str, float] = {}  # the methods' auxiliary terms, token-weighted as the loss
    for k, batch in enumerate(micro_batches):
        batch = _to(batch, acc.device)
        n = int((batch["labels"] != -100).sum())
        noise_gen = torch.Generator(device="cpu").manual_seed(
            noise_seed(session.seed, step, k, acc.process_index)
        )
        last = k == len(micro_batches) - 1
        ctx = acc.no_sync(model) if not last and world > 1 else contextlib.nullcontext()
        with ctx, acc.autocast():
            out = model(  # TrainForward: the PEFT methods' inputs are added inside
                **batch,
                noise_fraction=settings.noise,
                generator=noise_gen,
                # packed rows as long as the stage's longest sample (N + max_length)
                packing=settings.max_length if settings.packing else False,
            )
            # the LM loss plus the trained methods' auxiliary losses (exactly out.loss without)
            micro_loss = session.peft.total_loss(out, batch) if session.peft else out.loss
            # token-weighted mean over the global batch; × world: DDP averages the ranks' grads
            loss = micro_loss * (n * world / n_sup)
            acc.backward(loss)
        for key, value in getattr(session.peft, "last_terms", {}).items():
            terms[key] = terms.get(key, 0.0) + value * n / n_sup
        loss_sum += out.loss.detach().item() * n  # the log's loss is the LM's
        session.n_image_tokens = out.num_image_tokens
        n_tokens += int(batch["attention_mask"].sum()) + out.num_image_tokens * len(
            batch["input_ids"]
        )
    if world > 1:  # the log's loss and terms are the global batch's, as one process logs them
        keys = sorted(terms)
        loss_sum, *values = _sum_over_processes(acc, [loss_sum, *(terms[k] for k in keys)])
        terms = dict(zip(keys, values, strict=True))
    max_norm = settings.max_grad_norm or float("inf")  # None: no clipping
    grad_norm = scalar(acc.clip_grad_norm_(session.trainable, max_norm))
    lr_now = max(g["lr"] for g in session.optimizer.param_groups)  # the LR this step used
    session.optimizer.step()
    session.scheduler.step()
    session.optimizer.zero_grad(set_to_none=True)
    dt = time.perf_counter() - t0
    return {
        "step": step + 1,
        "loss": loss_sum / n_sup,
        "lr": lr_now,
        "grad_norm": grad_norm,
        "tokens_per_s": n_tokens * world / dt,
        "samples_per_s": step_batch.n_global / dt,
        **terms,
    }


def checkpoint_due(session: StageSession, done: int) -> bool:
    """Every ``checkpoint_every`` steps, except after the last (the output follows)."""
    return done % session.settings.checkpoint_every == 0 and done < session.steps.total


def write_checkpoint(session: StageSession, done: int, rows: list[dict]) -> None:
    """The state after ``done`` steps, gathered on every process and written by the main one
    (atomically)."""
    save_checkpoint(
        session.paths.checkpoint_dir,
        session.root,
        session.optimizer,
        session.scheduler,
        done,
        rows,
        session.identity,
        write=session.accelerator.is_main_process,
    )
    session.accelerator.wait_for_everyone()


def heldout_examples(session: StageSession) -> StageExamples | None:
    """The stage dataset's val split, or None (with a warning) when it has no rows: some
    hub datasets publish no labelled val split (TextCaps, A-OKVQA, TextVQA), and their
    held-out loss is then missing rather than 0."""
    dsd = load_from_disk(str(session.paths.data))
    if "val" not in dsd or len(dsd["val"]) == 0:
        if session.accelerator.is_main_process:  # every process asks (finish)
            log.warning(
                "stage %s: dataset %s has no val rows (%s): no held-out loss",
                session.name,
                session.settings.dataset,
                session.paths.data,
            )
        return None
    return stage_examples(
        session.paths, "val", session.settings, session.tokenizer, session.processor
    )


def finish(session: StageSession, rows: list[dict]) -> dict[str, Any]:
    """Held-out loss, then ``paths.out`` (model/, peft/, train_log.csv, stage.json) written
    atomically and the checkpoint removed; → the stage.json dict ({} off the main process)."""
    acc, paths, peft = session.accelerator, session.paths, session.peft
    unwrapped = session.unwrapped
    if session.batches is not None:  # stop the loader's workers
        session.batches.close()
    # every process: a sharded model's forward and unsharding are collectives
    val = heldout_examples(session)
    heldout = heldout_loss(session.root, val, session.pad_id) if val else None
    gather_weights(session.root)
    result: dict[str, Any] = {}
    if acc.is_main_process:
        total = session.steps.total
        result = {
            "name": session.name,
            "hash": session.stage_hash,
            "seed": session.seed,
            "settings": session.settings.to_dict(),
            "parent": str(paths.parent) if paths.parent else None,
            "steps": total,
            "epochs": total / session.steps.steps_per_epoch,
            "train_samples": len(session.subset),
            # None (recorded as missing, never 0) when the dataset has no val rows
            "heldout_loss": heldout,
            "trainable_params": session.n_trainable,
            "trainable_pct": session.trainable_pct,
            "peft": sorted(m.name for m in peft.methods) if peft else [],
            "peft_trained": session.peft_trained,
            "chain_trainable_params": session.chain_trainable,
            "chain_trainable_pct": session.chain_trainable_pct,
            "image_tokens": session.n_image_tokens,
            "device": str(acc.device),
            "processes": session.processes,
            "mixed_precision": acc.mixed_precision,
            "feature_cache": str(paths.features) if paths.features else None,
            "start": session.started,
            "end": datetime.now(UTC).isoformat(),
        }
        with atomic_path(paths.out, is_dir=True) as tmp:
            if peft:  # methods apart, then the clean base model
                peft.save(tmp / "peft")
                peft.strip()
            unwrapped.save_pretrained(tmp / "model")
            (tmp / "train_log.csv").write_text(_csv(rows))
            trackers = paths.checkpoint_dir / TRACKERS_DIR
            if paths.trackers is None and trackers.is_dir():  # train.log_with's event files
                shutil.copytree(trackers, tmp / TRACKERS_DIR)
            write_json_atomic(tmp / "stage.json", result)
        shutil.rmtree(paths.checkpoint_dir, ignore_errors=True)
        log.info(
            "stage %s [%s]: %d steps, held-out loss %s -> %s",
            session.name,
            session.stage_hash,
            total,
            "missing" if result["heldout_loss"] is None else f"{result['heldout_loss']:.4f}",
            paths.out,
        )
    acc.wait_for_everyone()
    return result


def train_stage(
    settings: StageSettings | Mapping[str, Any],
    paths: StagePaths,
    *,
    name: str,
    stage_hash: str,
    seed: int,
    model_cfg: dict[str, Any] | None = None,
    peft_hook=None,
) -> dict[str, Any]:
    """Train one stage and write ``paths.out`` (model/, train_log.csv, stage.json) atomically,
    resuming from ``paths.checkpoint_dir`` when a checkpoint is there.

    ``settings``: a :class:`StageSettings`, or complete plain settings (checked by
    :meth:`StageSettings.from_dict`). ``peft_hook(model, settings_dict, parent_dir)`` attaches
    PEFT methods and returns a ``vlalign.methods.stage.PeftSession`` (or None for a plain
    stage).

    One trainer per stage: the checkpoint dir's lock fails a second one at once
    (:func:`~vlalign.train.preemption.checkpoint_lock`). On SIGTERM / SIGUSR1 the step in
    progress is finished and checkpointed, then :class:`~vlalign.train.preemption.Preempted` is
    raised (``vlalign train`` exits with its code); a rerun resumes from that step."""
    main = process_state().is_main_process
    with checkpoint_lock(paths.checkpoint_dir, name) if main else contextlib.nullcontext():
        session = build_session(
            settings,
            paths,
            name=name,
            stage_hash=stage_hash,
            seed=seed,
            model_cfg=model_cfg,
            peft_hook=peft_hook,
        )
        start_step, rows = resume(session)
        try:
            train_steps(session, start_step, rows)
        finally:
            # flush the trackers' events (also if stopped); not end_training(): it also
            # destroys the process group, which finish() (a barrier) and a next stage need
            for tracker in session.accelerator.trackers:
                tracker.finish()
        return finish(session, rows)


def train_steps(session: StageSession, start_step: int, rows: list[dict]) -> None:
    """Steps ``start_step`` .. the last, appending their log rows to ``rows``; checkpoints every
    ``checkpoint_every`` steps, and after the step in progress when a stop signal arrives."""
    acc, settings = session.accelerator, session.settings
    start_trackers(acc, session.name, session.stage_hash, session.seed, settings)
    session.model.train()
    bar = tqdm(
        range(start_step, session.steps.total),
        desc=f"{session.name} [{session.stage_hash}]",
        initial=start_step,
        total=session.steps.total,
        mininterval=2,
        disable=not acc.is_main_process,
    )
    with StopSignals() as stop:
        for step in bar:
            rows.append(train_step(session, step))
            log_row(acc, settings, rows[-1])
            bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}", refresh=False)
            if stop_requested(stop, acc):
                write_checkpoint(session, step + 1, rows)
                bar.close()
                raise Preempted(session.name, stop.received, step + 1, session.paths.checkpoint_dir)
            if checkpoint_due(session, step + 1):
                write_checkpoint(session, step + 1, rows)
