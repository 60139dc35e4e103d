"""The byte-level BPE tokenizer trained on the world: exact round trips, VLM special tokens,
save/load as a plain HF tokenizer directory, and adapting a tokenizer that lacks the tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from vlalign.data.tokenizer import (
    ANS,
    IMAGE,
    INST,
    VLM_TOKENS,
    add_vlm_tokens,
    corpus_texts,
    load_tokenizer,
    save_tokenizer,
    train_tokenizer,
    vlm_token_ids,
)
from vlalign.data.world import generate_world

VOCAB = 400


@pytest.fixture(scope="module")
def world():
    return generate_world({}, domain="source", splits={"train": 48, "val": 8, "test": 8}, seed=3)


@pytest.fixture(scope="module")
def target_world():
    return generate_world({}, domain="target", splits={"train": 8, "val": 4, "test": 4}, seed=3)


@pytest.fixture(scope="module")
def tok(world):
    return train_tokenizer(corpus_texts(world), VOCAB)


def _row_texts(row: dict) -> dict[str, list[str]]:
    return {
        "captions": list(row["captions"]),
        "recaption": [row["recaption"]],
        "qa": [t for qa in row["qa"] for t in (qa["question"], *qa["answers"])],
        # Conversations verbatim, including the "<image>\n" placeholder of the first turn.
        "conversations": [turn["value"] for turn in row["conversations"]],
    }


def test_corpus_texts_covers_every_text_field(world) -> None:
    texts = list(corpus_texts(world))
    row = world["val"][0]
    for field, items in _row_texts(row).items():
        for text in items:
            assert text.replace(IMAGE, "").strip() in texts, (field, text)
    assert not any(IMAGE in t for t in texts)  # the placeholder is not corpus text
    assert all(isinstance(t, str) and t for t in texts)


def test_vocab_size_and_specials(tok) -> None:
    assert len(tok) == VOCAB
    ids = vlm_token_ids(tok)
    assert set(ids) == {"pad", "bos", "eos", "image", "inst", "ans"}
    assert len(set(ids.values())) == len(ids), ids  # all distinct
    assert tok.pad_token_id == ids["pad"] and tok.eos_token_id == ids["eos"]
    assert tok.unk_token_id not in ids.values()
    for token in VLM_TOKENS:
        # Each is one token, never split into bytes, even glued to text.
        assert tok(token, add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(token)]
    glued = tok(f"{IMAGE}\nWhat {INST}is{ANS}", add_special_tokens=False).input_ids
    for key in ("image", "inst", "ans"):
        assert glued.count(ids[key]) == 1


@pytest.mark.parametrize("split", ["train", "test"])  # test: texts unseen in training
def test_round_trip_all_text_fields(tok, world, split) -> None:
    for row in world[split].select(range(4)):
        for field, items in _row_texts(row).items():
            for text in items:
                ids = tok(text, add_special_tokens=False).input_ids
                assert tok.decode(ids) == text, (field, text)


def test_round_trip_other_domain_and_arbitrary_text(tok, target_world) -> None:
    # Byte-level BPE: new words (target shapes/colours), digits, unicode all round-trip.
    texts = list(corpus_texts(target_world))[:50]
    texts += ["Ünïcode ☃ — 12345 tabs\tand\nnewlines", "  leading and trailing spaces  "]
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.unk_token_id not in ids, text
        assert tok.decode(ids) == text


def test_compresses_world_text(tok, world) -> None:
    # A trained BPE must merge the world's words: far fewer tokens than bytes.
    text = world["test"][0]["recaption"]
    n_ids = len(tok(text, add_special_tokens=False).input_ids)
    assert n_ids < len(text.encode()) / 2.5, (n_ids, len(text))


def test_save_load_round_trip(tok, world, tmp_path: Path) -> None:
    out = tmp_path / "tok"
    save_tokenizer(tok, out)
    assert (out / "tokenizer.json").exists()
    for loaded in (AutoTokenizer.from_pretrained(str(out)), load_tokenizer(out)):
        assert len(loaded) == len(tok)
        assert vlm_token_ids(loaded) == vlm_token_ids(tok)
        for text in _row_texts(world["test"][1])["conversations"]:
            ids = loaded(text, add_special_tokens=False).input_ids
            assert ids == tok(text, add_special_tokens=False).input_ids
            assert loaded.decode(ids) == text
    # Atomic save: no temp leftovers next to the output.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def _bare_tokenizer(world) -> PreTrainedTokenizerFast:
    """A tokenizer like a foreign LM's: BPE with only an unk token, no pad/bos/eos/VLM tokens."""
    raw = Tokenizer(models.BPE(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False)
    raw.train_from_iterator(corpus_texts(world), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]")


def test_bare_tokenizer_lacks_vlm_tokens(world) -> None:
    bare = _bare_tokenizer(world)
    with pytest.raises(ValueError, match="special token"):
        vlm_token_ids(bare)


def test_add_vlm_tokens_to_foreign_tokenizer(world, tmp_path: Path) -> None:
    bare = _bare_tokenizer(world)
    n_before = len(bare)
    out = add_vlm_tokens(bare)
    ids = vlm_token_ids(out)  # raises if any is missing
    assert len(set(ids.values())) == len(ids)
    assert len(out) == n_before + 6  # pad, bos, eos + three VLM tokens
    assert all(i >= n_before for i in ids.values())  # appended, existing ids unchanged
    enc = out(f"{IMAGE} red circle {ANS}", add_special_tokens=False).input_ids
    assert enc[0] == ids["image"] and enc[-1] == ids["ans"]
    # Survives save/load.
    save_tokenizer(out, tmp_path / "t")
    assert vlm_token_ids(load_tokenizer(tmp_path / "t")) == ids


def test_add_vlm_tokens_keeps_existing_specials(world) -> None:
    tok = train_tokenizer(corpus_texts(world), VOCAB)  # own copy: this test mutates it
    before = vlm_token_ids(tok)
    n = len(tok)
    add_vlm_tokens(tok)
    assert len(tok) == n and vlm_token_ids(tok) == before


def test_load_tokenizer_on_non_tokenizer_dir(tmp_path: Path) -> None:
    empty = tmp_path / "not_a_tokenizer"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="not_a_tokenizer"):
        load_tokenizer(empty)
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        load_tokenizer(tmp_path / "missing_dir")


def test_encode_text_equals_the_tokenizer_call(tmp_path):
    """encode_text calls a fast tokenizer's Rust encoder directly: the ids of
    ``tok(text, add_special_tokens=False)``, VLM tokens and odd whitespace included."""
    from vlalign.data.text_formats import encode_text
    from vlalign.data.tokenizer import train_tokenizer

    texts = ["A red circle.", "  two  spaces ", "<image> a <inst> q <ans> x<eos>", "ünïcode ✓", ""]
    tok = train_tokenizer(texts * 50, vocab_size=300)
    for t in texts:
        assert encode_text(tok, t) == list(tok(t, add_special_tokens=False).input_ids), t
