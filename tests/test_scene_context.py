"""The soft scene prefix of the LM's pre-training (vlalign.models.scene_context)."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_tokenizer

from vlalign.config import ConfigError, check_references
from vlalign.data.text_formats import IGNORE_INDEX
from vlalign.data.tokenizer import vlm_token_ids
from vlalign.data.world import generate_world, position_name
from vlalign.models.scene_context import (
    SceneContextError,
    bag_tensors,
    prefix_embeddings,
    prefixed_batch,
    scene_bags,
    scene_texts,
)


@pytest.fixture(scope="module")
def world():
    return generate_world(None, domain="source", splits={"train": 32, "val": 8, "test": 4}, seed=0)


@pytest.fixture(scope="module")
def tok(world):
    return make_tokenizer(world)


def _ids(tok, words):
    return [i for w in words for i in tok(" " + w, add_special_tokens=False).input_ids]


def test_bags_hold_the_words_of_each_patch_cell(world, tok) -> None:
    row = world["train"][0]
    scene = json.loads(row["meta"])
    bags = scene_bags(row["meta"], tok, side=6)
    assert len(bags) == 36
    background = _ids(tok, [f"{scene['background']} background"])
    for o in scene["objects"]:
        texture = [] if o["texture"] == "plain" else [o["texture"]]
        words = [o["size"], o["colour"], *texture, o["shape"], position_name(o["row"], o["col"], 3)]
        # a 3x3 grid on 6x6 patches: each cell is a 2x2 block of patches
        for dr in (0, 1):
            for dc in (0, 1):
                assert bags[(2 * o["row"] + dr) * 6 + 2 * o["col"] + dc] == _ids(tok, words)
    occupied = {(o["row"], o["col"]) for o in scene["objects"]}
    empty = [p for p in range(36) if (p // 6 // 2, p % 6 // 2) not in occupied]
    assert empty and all(bags[p] == background for p in empty)


def test_rows_without_objects_are_refused(tok) -> None:
    with pytest.raises(SceneContextError, match="no scene objects"):
        scene_bags(json.dumps({"source": "coco"}), tok, side=2)


def test_prefix_is_the_mean_embedding_and_noise_is_seeded(tok) -> None:
    emb = torch.nn.Embedding(len(tok), 16)
    bags = [bag_tensors([[1, 2], [3]]), bag_tensors([[4], [5, 6, 7]])]
    clean = prefix_embeddings(emb, bags, noise=0.0)
    assert clean.shape == (2, 2, 16)
    assert torch.allclose(clean[1, 1], emb.weight[[5, 6, 7]].mean(0))
    a = prefix_embeddings(emb, bags, 0.2, torch.Generator().manual_seed(3))
    b = prefix_embeddings(emb, bags, 0.2, torch.Generator().manual_seed(3))
    assert torch.equal(a, b) and not torch.allclose(a, clean)
    rel = (a - clean).norm(dim=-1).mean() / clean.norm(dim=-1).mean()
    assert 0.05 < rel < 0.5, rel


def test_prefixed_batch_layout(world, tok) -> None:
    emb = torch.nn.Embedding(len(tok), 8)
    texts = scene_texts(world["train"][0], tok)
    # captions, recaption, QA and the conversation, each in the VLM's format (leading <bos>)
    assert len(texts) == len(world["train"][0]["captions"]) + 3
    bos = vlm_token_ids(tok)["bos"]
    assert all(x[0] == bos and y[0] == IGNORE_INDEX for x, y in texts)
    ids, labels = texts[-1]  # a conversation: the loss is on the answers only
    assert IGNORE_INDEX in labels[1:] and set(labels) - {IGNORE_INDEX}
    seqs = [texts[0], texts[-1]]
    bags = [bag_tensors(scene_bags(world["train"][i]["meta"], tok, 2)) for i in (0, 1)]
    plain = prefixed_batch(emb, seqs, tok.pad_token_id)
    pre = prefixed_batch(emb, seqs, tok.pad_token_id, bags)
    width = max(len(x) for x, _ in seqs)
    assert plain["inputs_embeds"].shape == (2, width, 8)
    assert pre["inputs_embeds"].shape == (2, 4 + width, 8)
    assert (pre["labels"][:, :5] == IGNORE_INDEX).all()  # prefix and <bos> are never targets
    assert torch.equal(pre["labels"][:, 4:], plain["labels"])
    assert pre["position_ids"][0, :6].tolist() == list(range(6))  # prefix, then text
    n0 = len(seqs[0][0])
    assert pre["labels"][0, 4 : 4 + n0].tolist() == list(seqs[0][1])
    assert (pre["attention_mask"][0, 4 + n0 :] == 0).all()  # padding stays masked


def test_scene_prefix_side_must_match_the_vision_patches() -> None:
    config = {
        "datasets": {"world": {}},
        "tokenizer": {"source": "train", "corpus": ["world"]},  # validated configs always have one
        "vision": {"source": "tiny", "config": {"image_size": 48, "patch_size": 8},
                   "pretrain": {"datasets": ["world"]}},  # fmt: skip
        "lm": {"source": "tiny", "config": {"hidden_size": 8},
               "pretrain": {"datasets": ["world"], "scene_prefix": {"side": 8}}},  # fmt: skip
    }
    with pytest.raises(ConfigError, match="scene_prefix.side is 8 but the vision tower has 6x6"):
        check_references(config)
    config["lm"]["pretrain"]["scene_prefix"]["side"] = 6
    check_references(config)
