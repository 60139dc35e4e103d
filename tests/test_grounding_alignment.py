"""A projector-only stage (seed 002 stage1: vision and LM frozen) must make the model look at the
image. Grounding fails silently — captions and losses still look fine when the model writes its
language prior — so these tests compare against controls that cannot see the image:

- the same stage trained on texts paired with the wrong images (a derangement of the training
  split) reaches no grounding gap, while the real stage does, by a wide margin;
- the aligned model with its projector output zeroed scores near chance on the attribute
  metrics, the aligned model well above.

The backbones are pre-trained as the default config does, scene prefix included
(``vlalign.models.scene_context``): without it the frozen LM does not read its context and the
real stage fails these tests too.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import WIDER, TinyWorld, build_world, lm_cfg, stage_settings, train, vision_cfg

from vlalign.data.sources import save_dataset
from vlalign.data.text_formats import caption_prompt, decode_text
from vlalign.data.tokenizer import load_tokenizer
from vlalign.eval.grounding import caption_grounding, derangement, grounding_gap, objects_of
from vlalign.eval.runner import _pixels
from vlalign.models import backbones as bb
from vlalign.models.generation import generate
from vlalign.models.vlm import VisionLanguageModel

pytestmark = pytest.mark.slow

SPLITS = {"train": 384, "val": 32, "test": 48}
# Larger than the shared backbones: the grounding gap is learned, and these sizes are the ones
# whose margins the assertions below were measured on.
VISION_CFG = vision_cfg(image_size=48, num_hidden_layers=2, **WIDER)
LM_CFG = lm_cfg(hidden_size=96, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2)
LM_PRETRAIN = {"steps": 1200, "batch_size": 32, "lr": 3e-3, "max_length": 96,
               "scene_prefix": {"side": 6, "fraction": 0.8, "noise": 0.2}}  # fmt: skip
VISION_PRETRAIN = {"steps": 200, "batch_size": 64, "lr": 2e-3}
STAGE = {"text": "recaption", "mask": "prefix", "epochs": 6, "lr": {"vision": 0, "projector": 2e-3,
         "lm": 0}, "max_length": 96}  # fmt: skip


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> TinyWorld:
    w = build_world(tmp_path_factory.mktemp("grounding_assets"), SPLITS, vision=VISION_CFG,
                    lm=LM_CFG, pretrain=(VISION_PRETRAIN, LM_PRETRAIN))  # fmt: skip
    # the control: every training text behind another image (val/test untouched)
    dsd = w.datasets["world"]
    perm = derangement(len(dsd["train"]))
    wrong = dsd["train"].map(
        lambda row, i: {"recaption": dsd["train"][perm[i]]["recaption"]}, with_indices=True
    )
    save_dataset(type(dsd)({**dsd, "train": wrong}), w.root / "data_shuffled")
    return w


def _stage(assets: TinyWorld, tmp: Path, name: str, data: Path) -> VisionLanguageModel:
    settings = stage_settings(dataset="world", **STAGE)
    _, out = train(dataclasses.replace(assets, data={"world": data}), tmp, name, settings)
    return VisionLanguageModel.from_pretrained(out / "model").eval()


@pytest.fixture(scope="module")
def models(assets, tmp_path_factory) -> dict[str, VisionLanguageModel]:
    tmp = tmp_path_factory.mktemp("grounding_stages")
    return {
        "aligned": _stage(assets, tmp, "aligned", assets.data["world"]),
        "control": _stage(assets, tmp, "control", assets.root / "data_shuffled"),
    }


def _test_split(assets: TinyWorld):
    from datasets import load_from_disk

    return load_from_disk(str(assets.data["world"]))["test"]


def _gap(model, assets) -> float:
    processor = bb.load_image_processor(assets.vision)
    tok = load_tokenizer(assets.tokenizer)
    return grounding_gap(model, processor, tok, _test_split(assets), "recaption")["grounding_gap"]


def test_lm_pretraining_reads_the_scene_prefix(assets) -> None:
    m = json.loads((assets.lm / bb.METRICS_FILE).read_text())
    assert m["scene_prefix_gap"] > 0.3, m
    assert m["heldout_loss_scene_prefix"] < m["heldout_loss_no_prefix"], m


def test_projector_only_stage_grounds_and_control_does_not(models, assets) -> None:
    aligned, control = _gap(models["aligned"], assets), _gap(models["control"], assets)
    assert abs(control) < 0.05, control
    assert aligned > 0.2 and aligned > 5 * max(abs(control), 0.01), (aligned, control)


@torch.no_grad()
def _captions(model: VisionLanguageModel, assets) -> list[str]:
    tok = load_tokenizer(assets.tokenizer)
    processor = bb.load_image_processor(assets.vision)
    ds = _test_split(assets)
    feats = model.encode_images(_pixels(processor, ds["image"]))
    ids = tok.convert_tokens_to_ids
    new = generate(model, prompt_ids=[caption_prompt(tok)] * len(ds), image_features=feats,
                   num_beams=1, max_new_tokens=64, eos_token_id=ids("<eos>"),
                   pad_token_id=ids("<pad>"))  # fmt: skip
    return [decode_text(tok, x) for x in new]


def test_zeroed_projector_scores_near_chance(models, assets) -> None:
    model = models["aligned"]
    scenes = [objects_of(m) for m in _test_split(assets)["meta"]]
    seen, _ = caption_grounding(_captions(model, assets), scenes)
    last = list(model.projector.parameters())[-2:]  # fc2 weight and bias: the output is 0
    saved = [p.detach().clone() for p in last]
    try:
        for p in last:
            p.data.zero_()
        blind, _ = caption_grounding(_captions(model, assets), scenes)
    finally:
        for p, s in zip(last, saved):
            p.data.copy_(s)
    assert blind["distinct_ratio"] <= 0.1, blind  # one caption for every image
    for attr in ("colour", "count"):
        key = f"attr_acc_{attr}"
        chance = seen[f"{key}_chance"]
        blind_acc = blind.get(key, 0.0)  # missing: the caption states no such attribute
        assert blind_acc <= chance + 0.1, (attr, blind, chance)
    # the count is read first and most reliably (docs/grounding.md); colour needs more LM
    # pre-training than this fixture's 1,200 steps to be read well
    assert seen["attr_acc_count"] >= seen["attr_acc_count_chance"] + 0.3, seen
    # measured 0.43-0.53 aligned against 0.17 blind (chance 0.40)
    assert seen["attr_acc_colour"] >= blind.get("attr_acc_colour", 0.0) + 0.15, (seen, blind)
    assert seen["distinct_ratio"] >= 0.5, seen
