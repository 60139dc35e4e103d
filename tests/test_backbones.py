"""Tiny backbones of the real architectures: pre-training measurably learns the world, and the
saved directories load back with ``from_pretrained`` exactly like hub checkpoints."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import WIDER, lm_cfg, lm_config, make_tokenizer, vision_cfg
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    Qwen2ForCausalLM,
    SiglipConfig,
    SiglipModel,
    SiglipVisionModel,
)

from vlalign.config import ConfigError
from vlalign.data.tokenizer import corpus_texts
from vlalign.data.world import generate_world
from vlalign.models import backbones as bb
from vlalign.models.scene_context import scene_texts
from vlalign.pretrain import lm as plm
from vlalign.pretrain import vision as pvis

# WIDER than the shared backbones, 2 vision layers: the pre-training thresholds below were
# measured on these sizes.
LM_CFG = lm_cfg(**WIDER, num_key_value_heads=2)
LM_PRETRAIN = {"steps": 200, "batch_size": 16, "lr": 3e-3, "max_length": 64}
VISION_CFG = vision_cfg(num_hidden_layers=2, **WIDER)
VISION_PRETRAIN = {"steps": 200, "batch_size": 32, "lr": 2e-3}
GRID, MAX_OBJECTS = 3, 4


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # On a shared 2-core box two torch threads contend badly (measured ~10x slower under load).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world():
    cfg = {"image_size": 64, "grid": GRID, "max_objects": MAX_OBJECTS}
    return generate_world(cfg, splits={"train": 256, "val": 64, "test": 16}, seed=0)


@pytest.fixture(scope="module")
def tok(world):
    return make_tokenizer(world)


def _val_seqs(tok, world) -> list[list[int]]:
    texts = list(corpus_texts({"val": world["val"]}))
    return plm.encode_texts(tok, texts, LM_PRETRAIN["max_length"])[:512]


@pytest.fixture(scope="module")
def lm_run(world, tok):
    """(model, metrics, untrained held-out perplexity): pre-trained once for the session."""
    torch.manual_seed(0)
    model = bb.build_tiny_lm(LM_CFG, tok)
    untrained = plm.lm_perplexity(model, _val_seqs(tok, world), tok.pad_token_id)
    metrics = plm.pretrain_lm(model, tok, [world], LM_PRETRAIN, seed=0)
    return model.eval(), metrics, untrained


@pytest.fixture(scope="module")
def vision_run(world):
    torch.manual_seed(0)
    model = bb.build_tiny_vision(VISION_CFG)
    processor = bb.make_image_processor(model.config.image_size)
    metrics = pvis.pretrain_vision(
        model, processor, world, VISION_PRETRAIN, grid=GRID, max_objects=MAX_OBJECTS, seed=0
    )
    return model.eval(), processor, metrics


# ------------------------------------------------------------------------------ building
def test_tiny_lm_matches_tokenizer(tok) -> None:
    model = bb.build_tiny_lm(LM_CFG, tok)
    assert isinstance(model, Qwen2ForCausalLM)
    c = model.config
    assert c.vocab_size == len(tok)
    assert (c.pad_token_id, c.bos_token_id, c.eos_token_id) == (
        tok.pad_token_id,
        tok.bos_token_id,
        tok.eos_token_id,
    )
    assert model.get_output_embeddings().weight.data_ptr() == (
        model.get_input_embeddings().weight.data_ptr()
    )  # tied, as in Qwen2.5-0.5B


def test_encode_texts_frames_and_truncates(tok) -> None:
    seqs = plm.encode_texts(tok, ["a red circle", "word " * 100], max_length=16)
    for s in seqs:
        assert s[0] == tok.bos_token_id and s[-1] == tok.eos_token_id
    assert len(seqs[1]) == 16
    ids, mask = plm.pad_batch(seqs, tok.pad_token_id)
    assert ids.shape == mask.shape == (2, 16)
    assert int(mask[0].sum()) == len(seqs[0])
    assert (ids[0][mask[0] == 0] == tok.pad_token_id).all()


# ------------------------------------------------------------------------------ LM learns
def test_untrained_lm_perplexity_is_near_uniform(lm_run, tok) -> None:
    # Sanity check of the metric itself: random init ≈ uniform over the vocabulary.
    _, _, untrained = lm_run
    assert 0.5 * len(tok) < untrained < 2.0 * len(tok), untrained


def test_lm_pretraining_lowers_heldout_perplexity(lm_run, tok) -> None:
    _, metrics, untrained = lm_run
    ppl = metrics["heldout_perplexity"]
    assert metrics["uniform_perplexity"] == float(len(tok))
    assert ppl < 0.1 * len(tok), metrics
    assert ppl < untrained / 10, (ppl, untrained)
    assert metrics["train_loss_last"] < metrics["train_loss_first"] - 1.0, metrics
    assert metrics["steps"] == LM_PRETRAIN["steps"] and metrics["pretrained_here"] is True
    assert metrics["heldout_texts"] > 0


def test_lm_reported_perplexity_is_reproducible(lm_run, tok, world) -> None:
    model, metrics, _ = lm_run
    rows = world["val"].select_columns(["captions", "recaption", "qa", "conversations"])
    n = LM_PRETRAIN["max_length"]
    texts = [(x[:n], y[:n]) for row in rows for x, y in scene_texts(row, tok)][:1024]
    again = plm.lm_perplexity(  # batching-invariant
        model, [x for x, _ in texts], tok.pad_token_id, batch_size=7, labels=[y for _, y in texts]
    )
    assert again == pytest.approx(metrics["heldout_perplexity"], rel=1e-3)


@pytest.mark.parametrize("empty_splits", [("val",), ("train", "val")])
def test_lm_pretrain_empty_corpus_raises(tok, world, empty_splits) -> None:
    data = {s: world[s].select([]) if s in empty_splits else world[s] for s in ("train", "val")}
    model = bb.build_tiny_lm({**LM_CFG, "num_hidden_layers": 1}, tok)
    with pytest.raises(ValueError, match="empty"):
        plm.pretrain_lm(model, tok, [data], {**LM_PRETRAIN, "steps": 1})


# ------------------------------------------------------------------------------ vision learns
def _majority(train_values: list, val_values: list) -> set[float]:
    """Val accuracy of always predicting the most frequent train value (each one, if tied)."""
    counts = Counter(train_values)
    top = max(counts.values())
    return {
        round(sum(v == best for v in val_values) / len(val_values), 6)
        for best, n in counts.items()
        if n == top
    }


def test_vision_chance_level_is_majority_class(vision_run, world) -> None:
    _, _, metrics = vision_run

    def objects(split):
        return [o for m in world[split]["meta"] for o in json.loads(m)["objects"]]

    def counts(split):
        return [len(json.loads(m)["objects"]) for m in world[split]["meta"]]

    chance = metrics["chance_accuracy"]
    for attr in ("colour", "shape", "size"):
        expected = _majority([o[attr] for o in objects("train")], [o[attr] for o in objects("val")])
        assert round(chance[attr], 6) in expected, (attr, chance[attr], expected)
    assert round(chance["count"], 6) in _majority(counts("train"), counts("val"))


@pytest.mark.parametrize("attr", ["colour", "count"])
def test_vision_probe_far_above_chance(vision_run, attr: str) -> None:
    _, _, metrics = vision_run
    acc, chance = metrics["probe_accuracy"][attr], metrics["chance_accuracy"][attr]
    assert acc > chance + 0.3, (attr, acc, chance)


def test_vision_pretraining_metrics(vision_run) -> None:
    _, _, metrics = vision_run
    assert metrics["train_loss_last"] < 0.5 * metrics["train_loss_first"], metrics
    assert set(metrics["probe_accuracy"]) == {"shape", "colour", "size", "count", "position"}
    # Averaged over the four attribute probes, clearly above chance (shape is the hardest at
    # this size).
    acc, chance = metrics["probe_accuracy"], metrics["chance_accuracy"]
    above = [acc[a] - chance[a] for a in ("shape", "colour", "size", "count")]
    assert sum(above) / len(above) > 0.2, metrics
    assert set(metrics["vocab"]["colour"]) <= {
        "red", "green", "blue", "yellow", "purple", "orange", "white", "black"
    }  # fmt: skip


def test_patch_cells_tile_the_scene_grid() -> None:
    # 6 x 6 patches on a 3 x 3 grid: 2 x 2 patches per cell, row-major
    cells = pvis.patch_cells(36, 3).view(6, 6)
    assert cells[0, :].tolist() == [0, 0, 1, 1, 2, 2]
    assert cells[:, 0].tolist() == [0, 0, 3, 3, 6, 6]
    assert cells[5, 5] == 8 and torch.bincount(cells.flatten()).tolist() == [4] * 9


def test_position_objective_keeps_where_object_patches_are(world, vision_run) -> None:
    """Without it the attribute heads pool by location and object patches lose their cell; the
    objective must make it readable from each patch (the probe: cell of object patches)."""
    _, _, without = vision_run
    torch.manual_seed(0)
    model = bb.build_tiny_vision(VISION_CFG)
    processor = bb.make_image_processor(model.config.image_size)
    with_position = pvis.pretrain_vision(
        model, processor, world, {**VISION_PRETRAIN, "position": True},
        grid=GRID, max_objects=MAX_OBJECTS, seed=0,
    )  # fmt: skip
    acc = with_position["probe_accuracy"]["position"]
    assert acc > 0.6 and acc > without["probe_accuracy"]["position"] + 0.2, (acc, without)
    assert "grid cell" in with_position["objective"] and "grid cell" not in without["objective"]
    assert with_position["probe_accuracy"]["colour"] > without["chance_accuracy"]["colour"] + 0.3


# ------------------------------------------------------------------------------ save / load
def _pixels(processor, world, n: int = 4) -> torch.Tensor:
    return bb.pixel_tensor(processor, world["test"]["image"][:n])


def test_vision_save_and_load_identical(vision_run, world, tmp_path: Path) -> None:
    model, processor, metrics = vision_run
    out = tmp_path / "vision"
    bb.save_backbone(model, out, metrics, extra=[processor])
    loaded = bb.load_vision(out).eval()
    assert isinstance(loaded, SiglipVisionModel)
    loaded_proc = AutoImageProcessor.from_pretrained(str(out))
    pix = _pixels(processor, world)
    assert torch.equal(_pixels(loaded_proc, world), pix)
    assert torch.equal(_pixels(bb.load_image_processor(out), world), pix)
    assert pix.shape[-1] == VISION_CFG["image_size"]
    assert -1.0 <= float(pix.min()) and float(pix.max()) <= 1.0  # SigLIP rescaling
    with torch.no_grad():
        a = model(pixel_values=pix).last_hidden_state
        b = loaded(pixel_values=pix).last_hidden_state
    assert torch.equal(a, b)
    saved = json.loads((out / bb.METRICS_FILE).read_text())
    assert saved["probe_accuracy"] == pytest.approx(metrics["probe_accuracy"])
    assert saved["pretrained_here"] is True


def test_lm_save_and_load_identical(lm_run, tok, tmp_path: Path) -> None:
    model, metrics, _ = lm_run
    out = tmp_path / "lm"
    bb.save_backbone(model, out, metrics, extra=[tok])
    loaded = bb.load_lm(out).eval()
    assert isinstance(loaded, Qwen2ForCausalLM)
    loaded_tok = AutoTokenizer.from_pretrained(str(out))
    text = "There is a small red circle in the top left."
    ids = loaded_tok(text, return_tensors="pt").input_ids
    assert ids.tolist() == tok(text, return_tensors="pt").input_ids.tolist()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, loaded(input_ids=ids).logits)
    saved = json.loads((out / bb.METRICS_FILE).read_text())
    assert saved["heldout_perplexity"] == pytest.approx(metrics["heldout_perplexity"])


# ------------------------------------------------------------------------------ fetch (hf:/local:)
def test_fetch_pretrained_local_lm(lm_run, tok, tmp_path: Path) -> None:
    model, metrics, _ = lm_run
    src = tmp_path / "src_lm"
    bb.save_backbone(model, src, metrics, extra=[tok])
    out = tmp_path / "fetched"
    bb.fetch_pretrained("lm", f"local:{src}", out)
    fetched = bb.load_lm(out).eval()
    ids = torch.tensor([[tok.bos_token_id, 10, 20, 30]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fetched(input_ids=ids).logits)
    assert json.loads((out / bb.METRICS_FILE).read_text()) == {
        "source": f"local:{src}",
        "pretrained_here": False,
    }


def test_fetch_pretrained_local_vision(vision_run, world, tmp_path: Path) -> None:
    model, processor, metrics = vision_run
    src = tmp_path / "src_vision"
    bb.save_backbone(model, src, metrics, extra=[processor])
    out = tmp_path / "fetched"
    bb.fetch_pretrained("vision", f"local:{src}", out)
    fetched = bb.load_vision(out).eval()
    pix = _pixels(bb.load_image_processor(out), world)
    assert torch.equal(pix, _pixels(processor, world))
    with torch.no_grad():
        a = model(pixel_values=pix).last_hidden_state
        assert torch.equal(a, fetched(pixel_values=pix).last_hidden_state)
    assert json.loads((out / bb.METRICS_FILE).read_text())["pretrained_here"] is False


def test_fetch_full_siglip_checkpoint_yields_vision_tower(tmp_path: Path) -> None:
    # The paper's so400m checkpoint is a full SigLIP (text + vision): only the tower is kept.
    torch.manual_seed(0)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2}  # fmt: skip
    full = SiglipModel(
        SiglipConfig(
            text_config={**small, "vocab_size": 50, "max_position_embeddings": 16},
            vision_config={**small, "image_size": 32, "patch_size": 8},
        )
    ).eval()
    src = tmp_path / "siglip_full"
    full.save_pretrained(str(src))
    bb.make_image_processor(32).save_pretrained(str(src))
    out = tmp_path / "vision"
    bb.fetch_pretrained("vision", f"local:{src}", out)
    tower = bb.load_vision(out).eval()
    assert isinstance(tower, SiglipVisionModel)
    assert sum(p.numel() for p in tower.parameters()) < sum(p.numel() for p in full.parameters())
    pix = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = full.vision_model(pixel_values=pix).last_hidden_state
        assert torch.equal(a, tower(pixel_values=pix).last_hidden_state)


def test_fetch_pretrained_errors(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="ftp:x"):
        bb.fetch_pretrained("lm", "ftp:x", out)
    with pytest.raises(ValueError, match="audio"):
        bb.fetch_pretrained("audio", f"local:{tmp_path}", out)
    missing = tmp_path / "no_such_model"
    with pytest.raises(OSError, match="no_such_model"):
        bb.fetch_pretrained("lm", f"local:{missing}", out)
    assert not out.exists()  # atomic: nothing half-written
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def _hub_like_tokenizer():
    """A pre-trained LM's tokenizer: its own BPE, no VLM tokens (add_vlm_tokens adds them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["a red circle", "two blue squares"] * 20,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|end|>"],
                                                show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|end|>")


@pytest.mark.parametrize("tied, spare", [(True, 8), (False, 8), (True, 0)])
def test_added_vlm_tokens_start_at_the_mean_row(tied: bool, spare: int) -> None:
    """A fetched LM's rows for the VLM tokens (new to it) are the mean of its pre-trained rows,
    in the head too when untied; an embedding without spare rows grows first."""
    from transformers import Qwen2ForCausalLM

    from vlalign.data.tokenizer import add_vlm_tokens, vlm_token_ids
    from vlalign.models.backbones import init_added_token_rows

    tok = _hub_like_tokenizer()
    base = tok.vocab_size
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(lm_config(vocab_size=base + spare, tie_word_embeddings=tied))
    before = lm.get_input_embeddings().weight[:base].clone()
    add_vlm_tokens(tok)
    ids = vlm_token_ids(tok)
    new = init_added_token_rows(lm, tok, ids.values())
    assert new and all(i >= base for i in new) and len(new) == len(tok) - base
    emb = lm.get_input_embeddings().weight
    assert emb.shape[0] >= len(tok)
    assert torch.equal(emb[:base], before)  # the pre-trained rows are untouched
    for i in new:
        assert torch.allclose(emb[i], before.mean(0))
        if not tied:
            head = lm.get_output_embeddings().weight
            assert torch.allclose(head[i], head[:base].mean(0))


def test_a_tokenizer_the_lm_was_trained_with_is_left_alone(tok) -> None:
    from transformers import Qwen2ForCausalLM

    from vlalign.data.tokenizer import vlm_token_ids
    from vlalign.models.backbones import init_added_token_rows

    lm = Qwen2ForCausalLM(lm_config(vocab_size=len(tok)))
    before = lm.get_input_embeddings().weight.clone()
    assert init_added_token_rows(lm, tok, vlm_token_ids(tok).values()) == []
    assert torch.equal(lm.get_input_embeddings().weight, before)
