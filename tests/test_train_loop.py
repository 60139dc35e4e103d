"""The stage trainer (``vlalign.train.loop``) on the tiny world: freezing by LR 0, the LR
schedule, gradient accumulation, the frozen-feature cache, and a 4-stage chain that learns."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
from datasets import load_from_disk
from helpers import (
    TinyWorld,
    column,
    read_log,
    stage_paths,
    stage_settings,
    tiny_assets,
    train,
)

from vlalign.config import ConfigError
from vlalign.data.tokenizer import load_tokenizer, vlm_token_ids
from vlalign.models.backbones import load_image_processor, load_lm, load_vision
from vlalign.models.vlm import VisionLanguageModel
from vlalign.runs.settings import StageSettings
from vlalign.train.data import StageExamples
from vlalign.train.features import FeatureCache, build_feature_cache
from vlalign.train.loop import (
    LOG_COLUMNS,
    StepPlan,
    batch_indices,
    build_session,
    epoch_order,
    finish,
    heldout_loss,
    plan_steps,
    stage_examples,
    train_step,
)
from vlalign.train.optim import build_optimizer, lr_lambdas


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> TinyWorld:
    torch.set_num_threads(1)
    return tiny_assets(tmp_path_factory, pretrain=True)


@pytest.fixture(scope="module")
def features(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "cache"
    build_feature_cache(assets.vision, assets.data["world"], out, batch_size=64)
    return out


def _fresh_model(assets: TinyWorld, seed: int = 0, mask: str = "prefix") -> VisionLanguageModel:
    """What a first stage starts from: the backbones and a projector initialised with ``seed``."""
    tok = load_tokenizer(assets.tokenizer)
    torch.manual_seed(seed)
    return VisionLanguageModel.from_parts(
        assets.vision,
        assets.lm,
        mask_mode=mask,
        protected_token_ids=sorted(set(vlm_token_ids(tok).values())),
        noise_vocab_size=len(tok),
    )


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------ freezing
@pytest.mark.parametrize(
    ("lr", "trained"),
    [
        ({"vision": 0, "projector": 1e-3, "lm": 0}, "projector"),
        ({"vision": 0, "projector": 0, "lm": 1e-3}, "lm"),
    ],
)
def test_lr_zero_freezes_module(assets, tmp_path, lr, trained):
    result, out = train(assets, tmp_path, "s", stage_settings(lr=lr, max_steps=2))
    after = VisionLanguageModel.from_pretrained(out / "model")
    before = _fresh_model(assets)
    assert _same(after.vision, load_vision(assets.vision))
    for name in ("projector", "lm"):
        unchanged = _same(getattr(after, name), getattr(before, name))
        assert unchanged == (name != trained), f"{name}: unchanged={unchanged}"
    if trained == "lm":
        assert _same(before.lm, load_lm(assets.lm))  # the reference really is the backbone
    n_trained = sum(p.numel() for p in getattr(after, trained).parameters())
    n_total = sum(p.numel() for p in after.parameters())
    assert result["trainable_params"] == n_trained
    assert result["trainable_pct"] == pytest.approx(100 * n_trained / n_total)


# ------------------------------------------------------------------------------ the steps
def test_plan_steps_from_batch_micro_batch_and_epochs():
    settings = StageSettings.from_dict(stage_settings(micro_batch_size=4, epochs=2.5))
    assert plan_steps(96, settings, 1, "s") == StepPlan(16, 4, 6, 15)
    assert plan_steps(97, settings, 1, "s").steps_per_epoch == 7  # a short last batch
    assert plan_steps(96, settings, 2, "s") == StepPlan(16, 4, 6, 15)  # 2 x 2 micro-batches
    capped = StageSettings.from_dict(stage_settings(max_steps=4, micro_batch_size=32))
    assert plan_steps(96, capped, 1, "s") == StepPlan(16, 16, 6, 4)  # max_steps wins
    with pytest.raises(ValueError, match="micro_batch_size 4 x 3 processes"):
        plan_steps(96, settings, 3, "s")


def test_train_step_then_final_save(assets, tmp_path):
    paths = stage_paths(assets, tmp_path, "s")
    session = build_session(stage_settings(max_steps=1), paths, name="s", stage_hash="h", seed=0)
    assert session.steps.total == 1 and session.peft is None
    assert batch_indices(session, 1) == epoch_order(0, 0, session.subset)[16:32]
    before = {n: p.detach().clone() for n, p in session.unwrapped.named_parameters()}
    session.model.train()
    row = train_step(session, 0)
    assert set(row) == set(LOG_COLUMNS) and row["step"] == 1
    assert math.isfinite(row["loss"]) and row["grad_norm"] > 0
    assert row["lr"] == pytest.approx(1e-3)  # no warm-up step: round(0.1 x 1 step) = 0
    after = dict(session.unwrapped.named_parameters())
    moved = {n.split(".")[0] for n, p in after.items() if not torch.equal(p, before[n])}
    assert moved == {"projector"}  # lr 0 froze vision and lm
    assert session.scheduler.last_epoch == 1

    paths.checkpoint_dir.mkdir(parents=True)  # a leftover checkpoint dir is removed
    result = finish(session, [row])
    assert sorted(p.name for p in paths.out.iterdir()) == ["model", "stage.json", "train_log.csv"]
    assert json.loads((paths.out / "stage.json").read_text()) == json.loads(json.dumps(result))
    assert result["settings"] == session.settings.to_dict() and result["steps"] == 1
    assert read_log(paths.out)[0]["loss"] == pytest.approx(row["loss"])
    assert not paths.checkpoint_dir.exists()


class _AuxLossSession:
    """Just what train_step asks of a PEFT session: forward inputs and the loss to
    backpropagate (here the LM loss plus an auxiliary loss on the projector)."""

    def __init__(self, model: VisionLanguageModel):
        self.model = model

    def forward_kwargs(self, batch_size: int) -> dict:
        return {}

    def total_loss(self, outputs, batch) -> torch.Tensor:
        return outputs.loss + sum((p**2).sum() for p in self.model.projector.parameters())


def test_train_step_backpropagates_the_sessions_total_loss(assets, tmp_path):
    rows = []
    for aux in (False, True):
        paths = stage_paths(assets, tmp_path / str(aux), "s")
        settings = stage_settings(max_steps=1)
        session = build_session(settings, paths, name="s", stage_hash="h", seed=0)
        if aux:  # a method with an auxiliary loss (PeftSession.total_loss)
            session.peft = _AuxLossSession(session.unwrapped)
        session.model.train()
        rows.append(train_step(session, 0))
    plain, with_aux = rows
    assert with_aux["loss"] == plain["loss"]  # the log records the LM loss
    assert with_aux["grad_norm"] != pytest.approx(plain["grad_norm"], rel=1e-3)


@pytest.mark.parametrize("key", ["checkpoint_every", "warmup_ratio", "optimizer.eps"])
def test_settings_without_a_default_raise_instead_of_falling_back(assets, tmp_path, key):
    # the defaults live in TRAIN_DEFAULTS only: the trainer has none of its own
    settings = stage_settings(max_steps=1)
    section, _, sub = key.rpartition(".")
    del (settings[section] if section else settings)[sub]
    with pytest.raises(ConfigError, match=rf"stage s(\.{section})?: missing setting.*'{sub}'"):
        train(assets, tmp_path, "s", settings)
    assert not (tmp_path / "stages" / "s").exists()


# ------------------------------------------------------------------------------ LR schedule
def test_lr_lambdas_warmup_then_cosine_to_min_lr():
    groups = [{"lr": 1e-3}, {"lr": 5e-4}]
    total, warmup, min_lr = 20, 4, 1e-6
    for base, f in zip((1e-3, 5e-4), lr_lambdas(groups, "cosine", total, warmup, min_lr)):
        lrs = [base * f(s) for s in range(total + 1)]
        warm = lrs[: warmup + 1]
        assert all(b > a for a, b in zip(warm, warm[1:]))  # rising warm-up ...
        assert np.allclose(np.diff(warm), warm[1] - warm[0])  # ... linear
        assert lrs[warmup] == pytest.approx(base)  # peak at the end of warm-up
        decay = lrs[warmup:]
        assert all(b < a for a, b in zip(decay, decay[1:]))
        assert lrs[total] == pytest.approx(min_lr, rel=1e-9)  # absolute floor, every group
        mid = warmup + (total - warmup) // 2
        assert lrs[mid] == pytest.approx(min_lr + (base - min_lr) * 0.5)  # cosine half-way
    lin = lr_lambdas(groups, "linear", total, warmup, min_lr)[0]
    assert lin(total) == 0 and lin(warmup) == 1
    const = lr_lambdas(groups, "constant", total, warmup, min_lr)[0]
    assert [const(s) for s in range(warmup, total + 1)] == [1.0] * (total - warmup + 1)


def _lrs_of_8_steps(**settings: Any) -> tuple[list[float], float]:
    """The LR of each of 8 optimizer steps at base LR 2e-3, and the LR after them."""
    p = torch.nn.Parameter(torch.zeros(2, 2))
    groups = [{"params": [p], "lr": 2e-3, "weight_decay": 0.0}]
    optimizer, scheduler = build_optimizer(
        groups, StageSettings.from_dict(stage_settings(schedule="cosine", **settings)), total=8
    )
    seen = []
    for _ in range(8):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return seen, optimizer.param_groups[0]["lr"]


def test_scheduler_reaches_min_lr_after_total_steps():
    seen, last = _lrs_of_8_steps(warmup_ratio=0.25, min_lr=1e-7)
    assert seen[2] == pytest.approx(2e-3)  # warm-up of round(0.25 * 8) = 2 steps
    assert last == pytest.approx(1e-7)


def test_train_log_lr_column_follows_the_schedule(assets, tmp_path):
    base, min_lr, total, warmup = 1e-3, 1e-5, 10, 2
    settings = stage_settings(max_steps=total, warmup_ratio=0.2, min_lr=min_lr)
    _, out = train(assets, tmp_path, "s", settings)
    rows = read_log(out)
    assert column(rows, "step") == list(range(1, total + 1))
    lrs = column(rows, "lr")
    assert lrs[0] < lrs[1] < lrs[warmup] == pytest.approx(base)
    for i in range(warmup, total):  # the LR each step used: cosine from base towards min_lr
        expect = min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * (i - warmup) / 8))
        assert lrs[i] == pytest.approx(expect, rel=1e-6), i
    assert all(math.isfinite(x) and x > 0 for x in column(rows, "grad_norm"))
    assert all(x > 0 for x in column(rows, "tokens_per_s") + column(rows, "samples_per_s"))


# ------------------------------------------------------------------------------ bad batches
def test_batch_without_targets_raises(assets, tmp_path):
    # every answer of the tiny world's conversations starts after position 8: all truncated
    settings = stage_settings(text="conversations", max_length=8, max_steps=2)
    with pytest.raises(RuntimeError, match=r"stage s: .*step 0.*no supervised tokens"):
        train(assets, tmp_path, "s", settings)
    assert not (tmp_path / "stages" / "s").exists()


def test_batch_size_not_multiple_of_micro(assets, tmp_path):
    with pytest.raises(ValueError, match="batch_size 12 is not a multiple of micro_batch_size 8"):
        train(assets, tmp_path, "s", stage_settings(batch_size=12, micro_batch_size=8))


# ------------------------------------------------------------------------------ accumulation
def test_gradient_accumulation_matches_one_big_batch(assets, tmp_path):
    # recaptions differ in length, so the two micro-batches hold different token counts: a
    # per-micro-batch mean (instead of token weighting) would give a different loss / gradient
    logs = {}
    for micro in (8, 4, 2):
        settings = stage_settings(
            batch_size=8,
            micro_batch_size=micro,
            max_steps=2,
            warmup_ratio=0.0,
            lr={"vision": 0, "projector": 1e-3, "lm": 1e-3},
        )
        _, out = train(assets, tmp_path / f"m{micro}", "s", settings)
        logs[micro] = read_log(out)
    ref = logs[8]
    for micro in (4, 2):
        for r, m in zip(ref, logs[micro]):  # step 2 also checks the update was the same
            assert m["loss"] == pytest.approx(r["loss"], rel=1e-4, abs=1e-5)
            assert m["grad_norm"] == pytest.approx(r["grad_norm"], rel=1e-3)


# ------------------------------------------------------------------------------ feature cache
def test_feature_cache_rows_equal_direct_encoding(assets, features):
    cache = FeatureCache(features)
    dsd = load_from_disk(str(assets.data["world"]))
    vlm = _fresh_model(assets).eval()
    processor = load_image_processor(assets.vision)
    for split in ("train", "val", "test"):
        ds = dsd[split]
        assert cache.index["splits"][split]["image_ids"] == list(ds["image_id"])
        arr = cache.split(split)
        rows = [0, 7, len(ds) - 1]
        pixels = processor(
            images=[ds[i]["image"].convert("RGB") for i in rows], return_tensors="pt"
        )["pixel_values"]
        with torch.no_grad():
            direct = vlm.encode_images(pixels).numpy()
        assert arr.shape == (len(ds), 64, 32)  # (64 / 8)^2 patches, hidden 32
        np.testing.assert_allclose(arr[rows], direct, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="do not match"):
        tok = load_tokenizer(assets.tokenizer)
        StageExamples(
            dsd["train"].select(range(95, -1, -1)),
            tok,
            "recaption",
            64,
            features=cache,
            split_name="train",
        )
    with pytest.raises(KeyError, match="nosplit"):
        cache.split("nosplit")


def test_processed_images_are_kept_across_epochs_within_the_byte_budget(assets, monkeypatch):
    import vlalign.train.data as stage_data

    processor = load_image_processor(assets.vision)
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        return processor(*args, **kwargs)

    split = load_from_disk(str(assets.data["world"]))["train"].select(range(4))
    tok = load_tokenizer(assets.tokenizer)

    def epochs(n: int) -> list[torch.Tensor]:
        ex = StageExamples(split, tok, "captions", 64, processor=counting)
        out = []
        for epoch in range(n):
            ex.set_epoch(epoch)
            out += [ex[i]["pixel_values"] for i in range(len(ex))]
        return out

    kept = epochs(3)
    assert len(calls) == 4  # each image processed once, not once per epoch
    direct = processor(images=[r["image"].convert("RGB") for r in split],
                       return_tensors="pt")["pixel_values"]
    for k, px in enumerate(kept):
        torch.testing.assert_close(px, direct[k % 4], rtol=0, atol=0)
    calls.clear()
    monkeypatch.setattr(stage_data, "PIXEL_CACHE_BYTES", 0)  # over budget: reprocessed
    again = epochs(2)
    assert len(calls) == 8
    for a, b in zip(again, kept):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_feature_cache_path_equals_image_path(assets, features, tmp_path):
    settings = stage_settings(max_steps=6)
    r_img, out_img = train(assets, tmp_path / "img", "s", settings)
    r_feat, out_feat = train(assets, tmp_path / "feat", "s", settings, features=features)
    log_img, log_feat = read_log(out_img), read_log(out_feat)
    assert len(log_img) == len(log_feat) == 6
    np.testing.assert_allclose(column(log_feat, "loss"), column(log_img, "loss"), atol=1e-4)
    np.testing.assert_allclose(
        column(log_feat, "grad_norm"), column(log_img, "grad_norm"), rtol=1e-3
    )
    assert r_feat["heldout_loss"] == pytest.approx(r_img["heldout_loss"], abs=1e-4)
    assert r_feat["feature_cache"] == str(features) and r_img["feature_cache"] is None
    assert r_feat["image_tokens"] == r_img["image_tokens"] == 64
    # the model saved from the cache path is a complete VLM (vision tower included)
    a = VisionLanguageModel.from_pretrained(out_feat / "model")
    b = VisionLanguageModel.from_pretrained(out_img / "model")
    for pa, pb in zip(a.projector.parameters(), b.projector.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-4, rtol=1e-3)
    assert _same(a.vision, b.vision)


def test_feature_cache_with_trainable_vision_is_refused(assets, features, tmp_path):
    settings = stage_settings(max_steps=1, lr={"vision": 1e-3, "projector": 1e-3, "lm": 0})
    with pytest.raises(ValueError, match="vision"):
        train(assets, tmp_path, "s", settings, features=features)


# ------------------------------------------------------------------------------ it learns
def _head_tail(losses: list[float], k: int = 3) -> tuple[float, float]:
    return float(np.mean(losses[:k])), float(np.mean(losses[-k:]))


def test_four_stage_chain_learns(assets, features, tmp_path):
    vis_lm = {"vision": 5e-5, "projector": 1e-3, "lm": 5e-4}
    chain = [
        # stage0 and stage1 read the frozen-feature cache, as the pipeline plans them
        ("stage0", {"mask": "bidirectional", "noise": 0.2, "epochs": 3}, features),
        ("stage1", {"mask": "prefix", "epochs": 3}, features),
        ("stage2", {"lr": vis_lm, "epochs": 2}, None),
        (
            "stage3",
            {"text": "conversations", "lr": {**vis_lm, "projector": 1e-4}, "epochs": 2},
            None,
        ),
    ]
    parent, results = None, {}
    for name, over, feats in chain:
        result, out = train(
            assets, tmp_path, name, stage_settings(**over), parent=parent, features=feats
        )
        losses = column(read_log(out), "loss")
        first, last = _head_tail(losses)
        assert last < first, f"{name}: loss did not fall ({first:.3f} -> {last:.3f})"
        stage_json = json.loads((out / "stage.json").read_text())
        assert stage_json["steps"] == len(losses) == 6 * over["epochs"]
        assert stage_json["parent"] == (str(parent) if parent else None)
        for key in ("trainable_params", "trainable_pct", "heldout_loss"):
            assert stage_json[key] == pytest.approx(result[key]), key
        assert 0 < stage_json["trainable_pct"] <= 100
        assert math.isfinite(stage_json["heldout_loss"])
        assert not (tmp_path / "checkpoints" / name).exists()
        results[name] = stage_json
        parent = out
    # projector only in stage0/1 (a few % of the model); everything in stage2/3
    assert results["stage0"]["trainable_pct"] == results["stage1"]["trainable_pct"] < 20
    assert results["stage2"]["trainable_pct"] == pytest.approx(100)
    assert results["stage2"]["heldout_loss"] < results["stage1"]["heldout_loss"]

    # stage0 + stage1 beat the same model with a never-trained projector on held-out recaptions
    tok = load_tokenizer(assets.tokenizer)
    settings = stage_settings()
    paths = stage_paths(assets, tmp_path, "untrained")
    val = stage_examples(paths, "val", settings, tok, load_image_processor(assets.vision))
    untrained = heldout_loss(_fresh_model(assets, seed=0), val, tok.pad_token_id)
    assert results["stage1"]["heldout_loss"] < untrained - 0.05, (
        results["stage1"]["heldout_loss"],
        untrained,
    )


class _TermsSession(_AuxLossSession):
    """A session whose auxiliary loss has two named terms (PeftSession.total_loss keeps the
    values it added in ``last_terms``)."""

    def total_loss(self, outputs, batch) -> torch.Tensor:
        reg = sum((p**2).sum() for p in self.model.projector.parameters())
        self.last_terms = {"toy.reg": float(reg.detach()), "toy.const": 0.25}
        return outputs.loss + reg + 0.25


def test_auxiliary_loss_terms_are_logged_per_step(assets, tmp_path):
    paths = stage_paths(assets, tmp_path, "s")
    session = build_session(stage_settings(max_steps=2), paths, name="s", stage_hash="h", seed=0)
    session.peft = _TermsSession(session.unwrapped)
    session.model.train()
    row = train_step(session, 0)
    assert row["toy.const"] == pytest.approx(0.25)  # token-weighted over micro-batches: sums to 1
    reg = sum(float((p.detach() ** 2).sum()) for p in session.unwrapped.projector.parameters())
    assert 0 < row["toy.reg"] and row["toy.reg"] != pytest.approx(reg)  # before the update
    from vlalign.train.loop import _csv, log_columns

    rows = [row, train_step(session, 1)]
    assert log_columns(rows)[-2:] == ["toy.reg", "toy.const"]
    assert _csv(rows).splitlines()[0].endswith(",toy.reg,toy.const")


def test_warmup_steps_override_the_ratio():
    seen, _ = _lrs_of_8_steps(warmup_ratio=0.25, warmup_steps=5)
    assert seen[5] == pytest.approx(2e-3) and seen[4] < seen[5]  # 5 steps, not round(0.25 * 8)


def test_a_dataset_without_val_rows_records_no_heldout_loss(assets, tmp_path):
    # TextCaps, A-OKVQA and TextVQA publish no labelled val split: missing, never 0
    from datasets import Dataset, DatasetDict

    from vlalign.data.schema import FEATURES
    from vlalign.data.sources import save_dataset

    dsd = load_from_disk(str(assets.data["world"]))
    data = tmp_path / "world_no_val"
    empty = Dataset.from_dict({k: [] for k in FEATURES}, features=FEATURES)  # as sources writes
    save_dataset(DatasetDict({**dsd, "val": empty}), data)
    assert len(load_from_disk(str(data))["val"]) == 0  # an empty split loads again
    paths = stage_paths(assets, tmp_path, "s")
    paths.data = data
    from vlalign.methods.stage import peft_hook
    from vlalign.train.loop import train_stage

    result = train_stage(stage_settings(max_steps=1), paths, name="s", stage_hash="h", seed=0,
                         peft_hook=peft_hook)
    assert result["heldout_loss"] is None
    assert json.loads((paths.out / "stage.json").read_text())["heldout_loss"] is None
