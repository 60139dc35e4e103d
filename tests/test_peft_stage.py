"""PT-PEFT inside the training pipeline (issue 5): a stage's ``peft:`` block, trained by the real
``train_stage`` with the real ``peft_hook`` on a tiny world with tiny SigLIP / Qwen2 backbones.

Orders of seed 003 as stage chains: prefix→LoRA (phase A / phase B), LoRA→prefix (LoRA frozen or
trained), parallel; save → load → identical logits and metrics; inference variants; bad blocks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft_fixtures import (
    RecordingHook,
    TinyWorld,
    build_peft_world,
    changed,
    peft_logits,
    probe_batch,
    saved_model,
    saved_peft,
    stage_settings,
    train,
)

from vlalign.data.text_formats import caption_prompt
from vlalign.data.tokenizer import load_tokenizer, vlm_token_ids
from vlalign.eval.job import EvalJob, evaluate_job, load_stage
from vlalign.eval.runner import EvalSettings, evaluate_run
from vlalign.methods.registry import owner
from vlalign.methods.stage import attach_peft, load_for_inference
from vlalign.models.backbones import load_image_processor, pixel_tensor
from vlalign.models.generation import generate
from vlalign.models.vlm import VisionLanguageModel

PREFIX = {"lr": 5e-2, "num_prefix": 4}
LORA = {"lr": 5e-2, "r": 4, "alpha": 8, "dropout": 0.0}
METHODS = {
    "prefix": {"prefix": PREFIX},
    "lora": {"lora": LORA},
    "s_adapter": {"s_adapter": {"lr": 5e-2, "bottleneck_size": 8}},
    "p_adapter": {"p_adapter": {"lr": 5e-2, "bottleneck_size": 8}},
    "full": {"full": {"lr": 1e-2}},
}


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> TinyWorld:
    torch.set_num_threads(1)
    w = build_peft_world(tmp_path_factory.mktemp("peft_stage"))
    # The aligned model every PEFT stage starts from: a projector-only first stage.
    w.base, result = train(
        w, "stage1", stage_settings("world", "recaption", {"projector": 1e-2}, max_steps=2)
    )
    assert result["peft"] == [] and not (w.base / "peft").exists()
    return w


@pytest.fixture(scope="module")
def probe(world) -> dict:
    return probe_batch(world)


def lm_key(key: str) -> bool:
    return key.startswith("lm/")


def has_lora_layers(model) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in model.lm.modules())


# ------------------------------------------------------------------------ prefix → LoRA
@pytest.fixture(scope="module")
def prefix_then_lora(world):
    """Phase A (prefix only) then phase B (LoRA + prefix), as config stages pt_prefix and
    ft_lora_prefix do it."""
    hook_a = RecordingHook()
    dir_a, res_a = train(world, "pt_prefix", stage_settings(peft={"prefix": PREFIX}), world.base,
                         hook_a)
    lora_a_present = has_lora_layers(hook_a.model)  # before train_stage strips anything
    hook_b = RecordingHook()
    dir_b, res_b = train(world, "ft_lora_prefix",
                         stage_settings(peft={"lora": LORA, "prefix": PREFIX}), dir_a, hook_b)
    return dir_a, res_a, hook_a, lora_a_present, dir_b, res_b, hook_b


def test_prefix_then_lora_phase_a_trains_only_the_prefix(world, prefix_then_lora):
    dir_a, res_a, hook, lora_present, *_ = prefix_then_lora
    assert res_a["peft"] == ["prefix"]
    assert [m.name for m in hook.session.methods] == ["prefix"]
    assert not lora_present, "LoRA must not be attached in phase A"
    # nothing of the model trains: every model parameter is frozen, only the encoder outside it
    assert not any(hook.at_attach.requires_grad.values())
    assert changed(hook.at_attach.methods["prefix"], hook.at_save.methods["prefix"])
    assert not changed(hook.at_attach.base, hook.at_save.base)
    assert not changed(saved_model(world.base), saved_model(dir_a))
    assert set(saved_peft(dir_a)) == {"prefix"}


def test_prefix_then_lora_phase_b_trains_lora_and_prefix(world, prefix_then_lora):
    dir_a, _, _, _, dir_b, res_b, hook = prefix_then_lora
    assert sorted(res_b["peft"]) == ["lora", "prefix"]
    # the prefix of phase B starts from phase A's trained prefix
    start = hook.at_attach.methods["prefix"]
    for k, v in saved_peft(dir_a)["prefix"].items():
        assert torch.equal(start[k], v), k
    # both methods trainable and both changed
    owned = {n: g for n, g in hook.at_attach.requires_grad.items() if "lora_" in n}
    assert owned and all(owned.values())
    lora_changed = changed(hook.at_attach.methods["lora"], hook.at_save.methods["lora"])
    assert {k for k in hook.at_save.methods["lora"] if "lora_B" in k} <= lora_changed
    assert changed(start, hook.at_save.methods["prefix"])
    # base LM (and vision, projector) untouched through both phases, in memory and on disk
    assert not changed(hook.at_attach.base, hook.at_save.base)
    assert not any(
        g for n, g in hook.at_attach.requires_grad.items() if "lora_" not in n
    ), "a base parameter is trainable in phase B"
    assert not changed(saved_model(world.base), saved_model(dir_b))
    saved = saved_peft(dir_b)
    assert set(saved) == {"lora", "prefix"}
    for k, v in hook.at_save.methods["lora"].items():
        assert torch.equal(saved["lora"][k], v), k


# ------------------------------------------------------------------------ LoRA → prefix
@pytest.fixture(scope="module")
def lora_stage(world) -> Path:
    out, res = train(world, "ft_lora", stage_settings(peft={"lora": LORA}), world.base)
    assert res["peft"] == ["lora"]
    return out


@pytest.mark.parametrize("lora_listed", [True, False], ids=["lora_lr", "lora_omitted"])
def test_lora_then_prefix(world, lora_stage, lora_listed):
    peft = {"prefix": PREFIX, **({"lora": LORA} if lora_listed else {})}
    hook = RecordingHook()
    out, res = train(world, "pt_prefix_after_lora", stage_settings(peft=peft), lora_stage, hook)
    assert sorted(res["peft"]) == ["lora", "prefix"]  # the parent's LoRA stays attached
    parent_lora = saved_peft(lora_stage)["lora"]
    start = hook.at_attach.methods["lora"]
    for k, v in parent_lora.items():
        assert torch.equal(start[k], v), k
    lora_grads = [g for n, g in hook.at_attach.requires_grad.items() if "lora_" in n]
    assert lora_grads and all(g is lora_listed for g in lora_grads)
    lora_changed = changed(start, hook.at_save.methods["lora"])
    if lora_listed:
        assert lora_changed
    else:
        assert not lora_changed
        assert not changed(parent_lora, saved_peft(out)["lora"])
    assert changed(hook.at_attach.methods["prefix"], hook.at_save.methods["prefix"])
    assert not changed(saved_model(world.base), saved_model(out))


# ------------------------------------------------------------------------ alternation
def test_alternation_trains_only_the_listed_method(world):
    """prefix, LoRA, prefix (seed 003 Table 9): each stage trains what it lists; the rest of
    the chain's methods stay attached and frozen."""
    parent = world.base
    for listed, peft in [("prefix", {"prefix": PREFIX}), ("lora", {"lora": LORA}),
                         ("prefix", {"prefix": PREFIX})]:
        hook = RecordingHook()
        parent, res = train(world, f"alt_{listed}", stage_settings(peft=peft), parent, hook)
        moved = {name for name, state in hook.at_attach.methods.items()
                 if changed(state, hook.at_save.methods[name])}  # fmt: skip
        assert moved == {listed}, (listed, moved)
        assert set(res["peft"]) == set(hook.at_attach.methods)
    assert set(saved_peft(parent)) == {"prefix", "lora"}
    assert not changed(saved_model(world.base), saved_model(parent))


# ------------------------------------------------------------------------ parallel
def test_parallel_trainable_count_matches_manual_count(world):
    hook = RecordingHook()
    out, res = train(world, "parallel", stage_settings(peft={"lora": LORA, "prefix": PREFIX}),
                     world.base, hook)
    stage = json.loads((out / "stage.json").read_text())
    assert stage["trainable_params"] == res["trainable_params"]
    model, encoder = hook.model, hook.session.method("prefix").module
    attached = hook.at_attach  # train_stage strips LoRA from the in-memory model when saving
    # manual count: LoRA A/B of q, k, v in every layer + the whole prefix encoder
    lm_cfg = model.lm.config
    d = lm_cfg.hidden_size
    kv = lm_cfg.num_key_value_heads * (d // lm_cfg.num_attention_heads)
    r = LORA["r"]
    per_layer = r * (d + d) + 2 * r * (d + kv)  # q: d→d, k and v: d→kv
    n_lora = lm_cfg.num_hidden_layers * per_layer
    n_prefix = sum(p.numel() for p in encoder.parameters())
    lora_names = {n for n in attached.numel if "lora_" in n}
    assert n_lora == sum(attached.numel[n] for n in lora_names)
    assert {n for n, g in attached.requires_grad.items() if g} == lora_names
    assert all(p.requires_grad for p in encoder.parameters())
    total = sum(attached.numel.values()) + n_prefix
    assert stage["trainable_params"] == n_lora + n_prefix
    assert stage["trainable_pct"] == pytest.approx(100 * (n_lora + n_prefix) / total, rel=1e-12)
    assert 0 < stage["trainable_pct"] < 100


# ------------------------------------------------------------------------ save → load → same
@pytest.fixture(scope="module")
def trained_methods(world, probe):
    out = {}
    for name, peft in METHODS.items():
        hook = RecordingHook(probe)
        stage_dir, res = train(world, f"ft_{name}", stage_settings(peft=peft), world.base, hook)
        assert res["peft"] == [name]
        out[name] = (stage_dir, hook)
    return out


def load_model(stage_dir: Path):
    model = VisionLanguageModel.from_pretrained(stage_dir / "model")
    return model, load_for_inference(model, stage_dir)


@pytest.mark.parametrize("name", list(METHODS))
def test_saved_stage_reproduces_in_memory_logits(world, probe, trained_methods, name):
    stage_dir, hook = trained_methods[name]
    assert hook.logits is not None
    model, session = load_model(stage_dir)
    assert [m.name for m in session.methods] == [name]
    # re-attached for inference: the method's own parameters are frozen
    assert not any(p.requires_grad for p in session.methods[0].trainable_parameters())
    assert torch.equal(peft_logits(model, session, probe), hook.logits)
    # the method mattered: the aligned base model alone gives other logits
    base = VisionLanguageModel.from_pretrained(world.base / "model")
    assert not torch.equal(peft_logits(base, None, probe), hook.logits)
    if name != "full":  # the saved base model is the clean one: methods live in peft/ only
        assert not changed(saved_model(world.base), saved_model(stage_dir))
        assert not has_lora_layers(model) or name == "lora"


@pytest.mark.parametrize("name", list(METHODS))
def test_evaluating_twice_gives_identical_metrics(world, trained_methods, tmp_path, name):
    stage_dir, _ = trained_methods[name]
    # Caption scoring starts two JVMs (PTB tokenizer, METEOR: ~10 s on a busy 2-core machine), so
    # captions + VQA for the prefix model only; the others are checked through the VQA answers
    # (the same greedy generation path) and the effective rank.
    task = "both" if name == "prefix" else "vqa"
    results = []
    for i in range(2):
        model, session = load_model(stage_dir)
        settings = EvalSettings(task=task, num_beams=1, max_new_tokens=8, batch_size=8,
                                spice="off", rank_samples=4)
        metrics = evaluate_run(
            stage_dir / "model", world.data["world_target"], world.tokenizer, world.vision,
            tmp_path / str(i), run=f"{name}_s0", stage=f"ft_{name}", dataset="world_target",
            settings=settings, inputs=session.inference(), model=model,
        )
        results.append(metrics)
    values = [{r["metric"]: r["value"] for r in m["records"]} for m in results]
    expected = {"VQA_acc", "effective_rank_0.9"}
    expected |= {"CIDEr", "Bleu_4"} if task == "both" else set()
    assert expected <= set(values[0])
    assert values[0] == values[1]
    preds = [(tmp_path / str(i) / "predictions.jsonl").read_text() for i in range(2)]
    assert preds[0] == preds[1] and preds[0].strip()


# ------------------------------------------------------------------------ inference variants
def test_prefix_inference_variants(world, trained_methods):
    stage_dir, _ = trained_methods["prefix"]
    model, session = load_model(stage_dir)
    model.eval()
    assert [v.label for v in session.variants()] == ["prefix_removed", "prefix_noise"]
    assert session.inference("removed")(2) == {}  # no cache: the model without its prefix
    with pytest.raises(ValueError, match="'zeros'.*offer \\['normal', 'removed', 'noise'\\]"):
        session.inference("zeros")
    tok = load_tokenizer(world.tokenizer)
    special = vlm_token_ids(tok)
    from datasets import load_from_disk

    images = load_from_disk(str(world.data["world_target"]))["test"]["image"]
    pixels = pixel_tensor(load_image_processor(world.vision), images)
    kw = {"num_beams": 1, "max_new_tokens": 8, "eos_token_id": special["eos"],
          "pad_token_id": special["pad"], "prompt_ids": [caption_prompt(tok)] * len(images)}

    def captions(variant: str) -> list[list[int]]:
        return generate(model, pixels, inputs=session.inference(variant), **kw)

    normal = captions("normal")
    assert captions("normal") == normal  # deterministic, so a difference below is the prefix's
    torch.manual_seed(0)
    assert captions("noise") != normal
    assert captions("removed") != normal


def test_evaluation_job_datasets_and_variants(world, trained_methods, tmp_path):
    """The evaluate rule's job on a prefix-tuned stage: the run's dataset at the top, a second
    dataset in its sub-directory, the prefix variants (offered by the prefix method, asked for
    by the eval block) in variant-*/, every record merged into one metrics.json."""
    stage_dir, _ = trained_methods["prefix"]
    ev = {"split": "test", "task": "vqa", "num_beams": 1, "max_new_tokens": 6, "batch_size": 8,
          "spice": "off", "rank_samples": 4, "rank_text_tokens": 8,
          "prefix_variants": ["normal", "removed", "noise"]}
    params = {"run": "prefix_s0", "seed": 0, "datasets": ["world_target", "world"], "eval": ev,
              "config": {"stages": [{"text": "captions", "max_length": 48}]}}
    job = EvalJob.from_params(
        params, data=[world.data["world_target"], world.data["world"]],
        tokenizer=world.tokenizer, vision=world.vision, out_dir=tmp_path / "run")
    assert job.text_kind == "captions" and job.settings.variants == ("normal", "removed", "noise")
    stage = load_stage(stage_dir, device="cpu")
    metrics = evaluate_job(job, stage)

    out = tmp_path / "run"
    assert json.loads((out / "metrics.json").read_text()) == metrics
    for sub in (".", "world", "variant-removed", "variant-noise"):
        assert {"predictions.jsonl", "rank_curve.json", "metrics.json"} <= {
            f.name for f in (out / sub).iterdir()}, sub
    by_stage: dict[str, list[dict]] = {}
    for rec in metrics["records"]:
        by_stage.setdefault(rec["stage"], []).append(rec)
    assert set(by_stage) == {"ft_prefix", "ft_prefix@prefix_removed", "ft_prefix@prefix_noise"}
    own = by_stage["ft_prefix"]
    assert {r["dataset"] for r in own} == {"world_target", "world"}
    stage_rows = [r for r in own if r["metric"] == "trainable_params"]
    assert [r["dataset"] for r in stage_rows] == ["world_target"]  # the stage's records once
    for variant in ("removed", "noise"):
        rows = by_stage[f"ft_prefix@prefix_{variant}"]
        assert rows and all(r["dataset"] == "world_target" for r in rows)
        assert all(r["decoding"] == {"num_beams": 1, "max_new_tokens": 6, "task": "caption",
                                     "prefix_variant": variant} for r in rows)
        assert not any(r["metric"].startswith("effective_rank") for r in rows)
        assert "CIDEr" in {r["metric"] for r in rows}
        # the variant directory holds the same numbers under the stage's own name
        sub = json.loads((out / f"variant-{variant}" / "metrics.json").read_text())
        plain = {r["metric"]: r["value"] for r in sub["records"]
                 if not r["metric"].startswith("effective_rank")}
        assert plain == {r["metric"]: r["value"] for r in rows}
    removed = {r["metric"]: r["value"] for r in by_stage["ft_prefix@prefix_removed"]}
    noise = {r["metric"]: r["value"] for r in by_stage["ft_prefix@prefix_noise"]}
    assert removed["grounding_loss_own"] != noise["grounding_loss_own"]  # different models

    # a stage whose methods offer no variant evaluates none, whatever the eval block asks
    lora = load_stage(trained_methods["lora"][0], device="cpu")
    assert lora.variants() == [] and lora.inputs()(2) == {}
    with pytest.raises(ValueError, match="offer \\['normal'\\]"):
        lora.inputs("removed")


# ------------------------------------------------------------------------ bad peft blocks
def test_peft_block_without_lr_names_the_method(world):
    with pytest.raises(ValueError, match=r"peft\.lora.*'lr'"):
        train(world, "no_lr", stage_settings(peft={"lora": {"r": 4}}), world.base)
    model = VisionLanguageModel.from_pretrained(world.base / "model")
    with pytest.raises(ValueError, match=r"peft\.s_adapter"):
        attach_peft(model, {"s_adapter": {"bottleneck_size": 4}}, None)


def test_full_while_lora_attached_is_refused(world, lora_stage):
    with pytest.raises(ValueError, match=r"'full'.*'lora'"):
        train(world, "full_on_lora", stage_settings(peft={"full": {"lr": 1e-3}}), lora_stage)
    # a LoRA parent kept frozen and full FT with lr 0 is fine (nothing of 'full' trains)
    model = VisionLanguageModel.from_pretrained(lora_stage / "model")
    session = attach_peft(model, {"full": {"lr": 0}, "prefix": PREFIX}, lora_stage)
    assert {m.name for m in session.methods} == {"lora", "full", "prefix"}
    assert set(session.groups) == {"peft.prefix"}
    assert not any(p.requires_grad for p in model.parameters() if owner(p) == "full")
