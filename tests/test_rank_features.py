"""Effective rank of real tiny models (SigLIP + Qwen2): last-layer features of the image *and*
text positions of a fixed-length input (seed 003 §2.3), so that the value tells models apart and
does not depend on how long the captions are."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from datasets import DatasetDict
from helpers import build_world, lm_cfg, vision_cfg

from vlalign.cli import main as cli_main
from vlalign.data.text_formats import decode_text
from vlalign.data.tokenizer import vlm_token_ids
from vlalign.eval.runner import (
    EvalInputError,
    EvalSettings,
    evaluate_run,
    rank_curve_of_model,
    rank_record,
    rank_text_ids,
    reference_rank_curve,
)
from vlalign.models.vlm import VisionLanguageModel

# 64 px / 16 px patches = 16 image tokens; 8 text tokens; d = 48 > 16 + 8: one component per row
VISION = vision_cfg(patch_size=16)
LM = lm_cfg(hidden_size=48, intermediate_size=96)
N_IMAGE, T = 16, 8


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    torch.set_num_threads(1)
    w = build_world(tmp_path_factory.mktemp("rank_world"), {"train": 8, "val": 4, "test": 16},
                    vision=VISION, lm=LM)  # fmt: skip
    root, dsd, tok = w.root, w.datasets["world"], w.tok
    model = VisionLanguageModel.from_parts(w.vision, w.lm, mask_mode="prefix")
    model.save_pretrained(root / "stage" / "model")
    # the same images with captions of other lengths: each caption twice, or its first 2 words
    edits = {"long": lambda c: f"{c} {c}", "short": lambda c: " ".join(c.split()[:2])}
    for name, edit in edits.items():
        DatasetDict({"test": dsd["test"].map(
            lambda r, e=edit: {"captions": [e(c) for c in r["captions"]]})}
        ).save_to_disk(str(root / f"data_{name}"))
    return {"root": root, "tok": tok, "model": model, "dsd": dsd}


def _rank(world, model, data="data", **kw) -> dict:
    r = world["root"]
    return rank_curve_of_model(
        model, r / data, r / "tokenizer", r / "vision", r / "out" / data / "rank_curve.json",
        run="m", dataset="world", rank_samples=16, text_tokens=T, batch_size=8, **kw,
    )


def test_rank_text_has_a_fixed_length(world):
    tok = world["tok"]
    ids = vlm_token_ids(tok)
    short = rank_text_ids(tok, ["a red box", "two circles"], 20)
    long = rank_text_ids(tok, ["a big red box on the left and a small green circle " * 4], 20)
    for seq in (short, long):
        assert len(seq) == 20 and seq[0] == ids["bos"]
        assert ids["eos"] not in seq and ids["pad"] not in seq
    # short captions: joined, then repeated
    assert decode_text(tok, short).startswith("a red box two circles a red box")
    assert rank_text_ids(tok, ["a red box"], 1) == [ids["bos"]]
    with pytest.raises(EvalInputError, match="non-empty reference caption"):
        rank_text_ids(tok, ["", "  "], 8)


def test_curve_has_image_and_text_rows_of_fixed_shape(world):
    curve = _rank(world, world["model"])
    assert curve["positions"] == "image+text" and curve["dataset"] == "world"
    assert (curve["image_tokens"], curve["text_tokens"]) == (N_IMAGE, T)
    assert curve["k"] == list(range(1, N_IMAGE + T + 1))  # min(N + T, d) components
    assert curve["text"]["k"] == list(range(1, T + 1))
    assert curve["samples"] == 16 and curve["reference"] is None
    for c in (curve, curve["text"]):
        assert 0 < c["effective_rank"] <= 1 and c["cumulative"][-1] == pytest.approx(1.0)
    on_disk = json.loads((world["root"] / "out" / "data" / "rank_curve.json").read_text())
    assert on_disk == curve


def test_value_does_not_depend_on_caption_length(world):
    base = _rank(world, world["model"])
    for data in ("data_long", "data_short"):
        other = _rank(world, world["model"], data=data)
        # the same matrix shape whatever the captions' length, hence the same components ...
        assert other["k"] == base["k"] and other["text"]["k"] == base["text"]["k"]
        # ... and a value that moves by at most a few components (the text differs)
        assert abs(other["effective_rank"] - base["effective_rank"]) <= 3 / len(base["k"])
        assert abs(other["text"]["effective_rank"] - base["text"]["effective_rank"]) <= 2 / T


def test_rank_tells_a_collapsed_last_layer_from_a_normal_one(world):
    normal = _rank(world, world["model"])
    low = copy.deepcopy(world["model"])
    with torch.no_grad():  # the last layer's output (post-norm) squeezed onto 2 directions
        low.lm.model.norm.weight[2:] *= 1e-3
    collapsed = _rank(world, low)
    assert collapsed["effective_rank"] <= normal["effective_rank"] / 2
    assert collapsed["text"]["effective_rank"] <= normal["text"]["effective_rank"] / 2
    # image tokens that carry no image (projector zeroed): the image rows collapse
    blind = copy.deepcopy(world["model"])
    with torch.no_grad():
        for p in blind.projector.parameters():
            p.zero_()
    assert _rank(world, blind)["effective_rank"] < normal["effective_rank"]


def test_reference_lm_uses_the_same_text(world, tmp_path):
    r = world["root"]
    curve = reference_rank_curve(r / "lm", r / "data", r / "tokenizer", tmp_path / "ref.json",
                                 rank_samples=16, dataset="world", text_tokens=T)
    assert curve["run"] == "_reference_lm" and curve["dataset"] == "world"
    assert curve["positions"] == "text" and curve["reference"] == "pretrained_lm"
    assert curve["k"] == list(range(1, T + 1)) and "text" not in curve
    # the LM alone and the VLM's text rows see the same tokens: a random projector changes
    # what the text attends to, so the values are close but need not be equal
    vlm = _rank(world, world["model"])
    assert abs(curve["effective_rank"] - vlm["text"]["effective_rank"]) <= 0.5


def test_evaluate_records_both_ranks(world, tmp_path):
    r = world["root"]
    settings = EvalSettings(task="caption", num_beams=1, max_new_tokens=4, batch_size=8,
                            rank_samples=4, rank_text_tokens=T)
    metrics = evaluate_run(
        r / "stage" / "model", r / "data", r / "tokenizer", r / "vision", tmp_path, run="m",
        stage="s", dataset="world", settings=settings, model=world["model"],
    )
    values = {m["metric"]: m["value"] for m in metrics["records"]}
    curve = json.loads((tmp_path / "rank_curve.json").read_text())
    assert values["effective_rank_0.9"] == curve["effective_rank"]
    assert values["effective_rank_text_0.9"] == curve["text"]["effective_rank"]
    assert len(curve["k"]) == N_IMAGE + T


def test_rank_command_writes_the_before_peft_reference(world, tmp_path):
    r = world["root"]
    params = {"eval": {"split": "test", "rank_samples": 4, "rank_text_tokens": T,
                       "batch_size": 8}, "run": "align4_s0"}
    out = tmp_path / "runs" / "align4_s0" / "before_peft" / "world_target" / "rank_curve.json"
    cli_main(["rank", "--params", json.dumps(params), "--stage", str(r / "stage"),
              "--data", str(r / "data"), "--dataset", "world_target", "--tokenizer",
              str(r / "tokenizer"), "--vision", str(r / "vision"), "--reference", "before_peft",
              "--out", str(out)])
    curve = json.loads(out.read_text())
    assert curve["run"] == "align4_s0" and curve["dataset"] == "world_target"
    assert curve["reference"] == "before_peft" and curve["samples"] == 4


def test_features_of_different_shapes_are_refused():
    with pytest.raises(ValueError, match="one shape"):
        rank_record("m", [torch.randn(5, 4), torch.randn(6, 4)], 2, dataset="d", split="test")
