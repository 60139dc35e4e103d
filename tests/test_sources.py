"""Data sources → normalised schema, on tiny local copies of the real dataset layouts."""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import datasets
import PIL.Image
import pytest
from datasets import Dataset, DatasetDict, load_from_disk
from fixtures_sources import (
    AOKVQA_FEATURES,
    COCO_ROWS,
    FLICKR8K_FEATURES,
    LLAVA_FEATURES,
    OKVQA_ANSWERS,
    TEXTVQA_ANSWERS,
    aokvqa_rows,
    coco_name,
    corrupt_png,
    flickr8k_rows,
    flickr30k_features,
    flickr30k_rows,
    llava_rows,
    make_aokvqa,
    make_coco_karpathy,
    make_flickr8k,
    make_flickr30k,
    make_llava,
    make_okvqa,
    make_pathvqa,
    make_textcaps,
    make_textvqa,
    textcaps_rows,
    textvqa_rows,
    write_splits,
)

from vlalign.data.schema import FEATURES, SPLITS
from vlalign.data.sources import SourceError, load_report, load_source, save_dataset


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # No hub access in tests: the hf: route is exercised with local directory paths.
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    datasets.disable_progress_bars()


def _spec(route: str, root: Path, tmp_path: Path, **kw) -> dict:
    return {"source": f"{route}:{root}", "cache_dir": str(tmp_path / "cache"), **kw}


def _check_schema(dsd: DatasetDict) -> None:
    assert list(dsd) == list(SPLITS)
    for split, ds in dsd.items():
        assert ds.features == FEATURES
        assert list(ds.features) == list(FEATURES)
        assert all(s == split for s in ds["split"])


def _rows(dsd: DatasetDict) -> dict[str, dict]:
    return {r["image_id"]: r for s in SPLITS for r in dsd[s]}


ROUTES = ["local", "hf"]


@pytest.mark.parametrize("route", ROUTES)
def test_llava_recap_and_instruct(route, tmp_path):
    root = make_llava(tmp_path / "llava")
    dsd = load_source("recap", _spec(route, root, tmp_path, format="llava",
                                     split_fractions={"train": 0.5, "val": 0.25, "test": 0.25}))
    _check_schema(dsd)
    assert [len(dsd[s]) for s in SPLITS] == [2, 1, 1]
    rows = _rows(dsd)
    src = llava_rows()
    assert sorted(rows) == sorted(src["id"])
    for i, image_id in enumerate(src["id"]):
        r = rows[image_id]
        conv = src["conversations"][i]
        assert r["conversations"] == conv  # kept verbatim
        # ReCap rows (one human turn + one gpt answer) → recaption; multi-turn → "".
        assert r["recaption"] == (conv[1]["value"] if len(conv) == 2 else "")
        assert r["captions"] == [] and r["qa"] == []
        meta = json.loads(r["meta"])
        assert meta["data_source"] == src["data_source"][i]
        assert meta["source_split"] == "train" and meta["source_row"] == i
        want = PIL.Image.open(io.BytesIO(src["image"][i]["bytes"]))
        assert r["image"].mode == "RGB" and r["image"].size == want.size
    # Grey JPEG and RGBA PNG were converted; colour survives the conversion.
    assert rows["next_001"]["image"].getpixel((0, 0)) == (0, 0, 255)
    g = rows["000000000025"]["image"].getpixel((0, 0))
    assert g[0] == g[1] == g[2]


def test_llava_split_fractions_deterministic_and_recaption_modes(tmp_path):
    root = make_llava(tmp_path / "llava")
    spec = _spec("local", root, tmp_path, format="llava",
                 split_fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    a, b = load_source("x", spec, seed=3), load_source("x", spec, seed=3)
    assert {s: a[s]["image_id"] for s in SPLITS} == {s: b[s]["image_id"] for s in SPLITS}

    never = load_source("next", {**spec, "recaption": "never"})
    assert all(r == "" for s in SPLITS for r in never[s]["recaption"])
    with pytest.raises(SourceError, match=r"'next_recap'.*row 2, column 'conversations'"):
        load_source("next_recap", {**spec, "recaption": "always"})


def test_llava_from_save_to_disk_dir(tmp_path):
    saved = tmp_path / "saved"
    DatasetDict({"train": Dataset.from_dict(llava_rows(), features=LLAVA_FEATURES)}).save_to_disk(
        str(saved))
    files_before = sorted(p.name for p in saved.rglob("*"))
    dsd = load_source("recap", _spec("local", saved, tmp_path, format="llava",
                                     splits={"train": "train"}))
    _check_schema(dsd)
    assert len(dsd["train"]) == 4 and len(dsd["val"]) == len(dsd["test"]) == 0
    # With cache_dir the source directory is left untouched.
    assert sorted(p.name for p in saved.rglob("*")) == files_before


@pytest.mark.parametrize("route", ROUTES)
def test_coco_karpathy_split_column_and_image_root(route, tmp_path):
    root, image_root = make_coco_karpathy(tmp_path / "coco", tmp_path / "images")
    dsd = load_source("coco", _spec(route, root, tmp_path, format="coco_karpathy",
                                    image_root=str(image_root)))
    _check_schema(dsd)
    expect = {"train": {"101", "102", "105"}, "val": {"103"}, "test": {"104", "106"}}
    assert {s: set(dsd[s]["image_id"]) for s in SPLITS} == expect  # restval → train
    rows = _rows(dsd)
    for filepath, cocoid, ksplit, colour, size in COCO_ROWS:
        r = rows[str(cocoid)]
        assert r["captions"] == [f"a {colour} picture.", f"something {colour}."]
        assert r["recaption"] == "" and r["conversations"] == []
        assert r["image"].size == size and r["image"].mode == "RGB"
        meta = json.loads(r["meta"])
        assert meta["cocoid"] == cocoid and meta["karpathy_split"] == ksplit
        assert meta["filename"] == coco_name(cocoid, filepath)


def test_klaft_protocol_coco_val_as_test_and_val_drawn_from_train(tmp_path):
    """seed 000: COCO val2014 (Karpathy restval + val + test) is the test set, N random train
    pairs the validation set (val_from_train), drawn with the seed and taken out of train."""
    root, image_root = make_coco_karpathy(tmp_path / "coco", tmp_path / "images")
    spec = _spec("local", root, tmp_path, format="coco_karpathy", image_root=str(image_root),
                 split_values={"train": ["train"], "test": ["restval", "val", "test"]},
                 val_from_train=1)
    ids = {s: set(load_source("coco", spec, seed=0)[s]["image_id"]) for s in SPLITS}
    assert ids["test"] == {"102", "103", "104", "106"}
    assert len(ids["val"]) == 1 and ids["val"] | ids["train"] == {"101", "105"}
    assert not ids["val"] & ids["train"]
    draws = {frozenset(load_source("coco", spec, seed=s)["val"]["image_id"]) for s in range(8)}
    assert len(draws) == 2  # the draw follows the seed
    with pytest.raises(SourceError, match="val_from_train is 2, but the train split has 2 rows"):
        load_source("coco", {**spec, "val_from_train": 2})
    with pytest.raises(SourceError, match="val split already has 1 rows"):
        load_source("coco", {**spec, "split_values": {"train": ["train", "restval"], "val": ["val"],
                                                      "test": ["test"]}})


def test_coco_karpathy_sentence_dicts(tmp_path):
    # Karpathy's dataset_coco.json layout: sentences are {"raw", "tokens"} dicts.
    root, image_root = make_coco_karpathy(tmp_path / "coco", tmp_path / "images")
    rows = Dataset.from_parquet(str(root / "data" / "test-00000-of-00001.parquet")).to_dict()
    rows["sentences"] = [[{"raw": s, "tokens": s.split()} for s in ss] for ss in rows["sentences"]]
    single = tmp_path / "karpathy.json"
    Dataset.from_dict(rows).to_json(str(single))
    dsd = load_source("coco", _spec("local", single, tmp_path, format="coco_karpathy",
                                    image_root=str(image_root)))
    assert dsd["test"]["captions"] == [["a yellow picture.", "something yellow."],
                                       ["a orange picture.", "something orange."]]


@pytest.mark.parametrize("route", ROUTES)
def test_flickr30k_with_split_column(route, tmp_path):
    root = make_flickr30k(tmp_path / "f30k", with_split=True)
    dsd = load_source("flickr30k", _spec(route, root, tmp_path, format="flickr30k"))
    _check_schema(dsd)
    assert {s: sorted(dsd[s]["image_id"]) for s in SPLITS} == {
        "train": ["0", "1", "4"], "val": ["2"], "test": ["3"]}
    r = _rows(dsd)["2"]
    assert r["captions"] == ["a blue thing.", "the blue one.", "all blue."]
    assert r["image"].size == (10, 8)
    assert json.loads(r["meta"])["filename"] == "1002.jpg"


def test_flickr30k_without_split_column_single_file(tmp_path):
    # lmms-lab/flickr30k: one hub split, no split column → split_fractions (seeded).
    root = make_flickr30k(tmp_path / "f30k", with_split=False, n=8)
    single = next((root / "data").glob("*.parquet"))
    spec = _spec("local", single, tmp_path, format="flickr30k",
                 split_fractions={"train": 0.5, "val": 0.25, "test": 0.25})
    dsd = load_source("flickr30k", spec, seed=1)
    _check_schema(dsd)
    assert [len(dsd[s]) for s in SPLITS] == [4, 2, 2]
    assert sorted(_rows(dsd)) == [str(i) for i in range(8)]
    # Default fractions when nothing is said about splits: 0.9/0.05/0.05 of 8 rows.
    spec.pop("split_fractions")
    assert [len(d) for d in load_source("flickr30k", spec).values()] == [7, 0, 1]


@pytest.mark.parametrize("route", ROUTES)
def test_flickr8k_caption_columns_and_hub_splits(route, tmp_path):
    root = make_flickr8k(tmp_path / "f8k")
    dsd = load_source("flickr8k", _spec(route, root, tmp_path, format="flickr8k"))
    _check_schema(dsd)
    assert [len(dsd[s]) for s in SPLITS] == [3, 1, 2]  # validation → val
    r = dsd["val"][0]
    assert r["captions"] == [f"caption {i} of white." for i in range(5)]
    assert r["image_id"] == "validation-0"
    assert r["image"].getpixel((0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("route", ROUTES)
def test_pathvqa_qa_explicit_splits_and_max_rows(route, tmp_path):
    root = make_pathvqa(tmp_path / "pvqa")
    spec = _spec(route, root, tmp_path, format="pathvqa",
                 splits={"train": "train", "val": "validation", "test": "test"})
    dsd = load_source("pathvqa", spec)
    _check_schema(dsd)
    assert [len(dsd[s]) for s in SPLITS] == [3, 2, 2]
    r = dsd["train"][1]
    assert r["qa"] == [{"question": "is there tissue 0.1?", "answers": ["no"]}]
    assert r["captions"] == [] and r["recaption"] == ""
    assert r["image"].size == (10, 11)
    capped = load_source("pathvqa", {**spec, "max_rows": 1})
    assert [len(capped[s]) for s in SPLITS] == [1, 1, 1]
    assert capped["val"][0]["qa"][0]["question"] == "is there tissue 1.0?"


# --- errors -------------------------------------------------------------------------------------


def test_missing_column_names_column_and_available(tmp_path):
    root = make_flickr8k(tmp_path / "f8k")
    with pytest.raises(SourceError) as e:
        load_source("f8k", _spec("local", root, tmp_path, format="flickr30k"))
    msg = str(e.value)
    assert "'f8k'" in msg and "'caption'" in msg and "caption_0" in msg  # lists available
    # A column override fixes it (schema field → source column).
    dsd = load_source("f8k", _spec("local", root, tmp_path, format="flickr30k",
                                   columns={"captions": "caption_3", "image_id": None}))
    assert dsd["train"][0]["captions"] == ["caption 3 of red."]


def _flickr8k_with(tmp_path: Path, bad: dict[int, dict]) -> Path:
    cols = flickr8k_rows(["red", "green", "blue", "white", "black"])
    for i, patch in bad.items():
        for k, v in patch.items():
            cols[k][i] = v
    return write_splits(tmp_path / "bad8k", {"train": cols, "validation": flickr8k_rows(["cyan"]),
                                             "test": flickr8k_rows(["pink"])}, FLICKR8K_FEATURES)


def test_corrupt_image_and_empty_caption_raise(tmp_path):
    root = _flickr8k_with(tmp_path, {1: {"image": {"bytes": corrupt_png(), "path": None}}})
    with pytest.raises(SourceError, match=r"'bad8k'.*'train' row 1, column 'image'.*corrupt"):
        load_source("bad8k", _spec("local", root, tmp_path, format="flickr8k"))
    root = _flickr8k_with(tmp_path / "b", {3: {"caption_2": "  "}})
    with pytest.raises(SourceError, match=r"'bad8k'.*'train' row 3, column 'caption_2'.*empty"):
        load_source("bad8k", _spec("hf", root, tmp_path, format="flickr8k"))


def test_empty_caption_list_raises(tmp_path):
    cols = flickr30k_rows(5)
    cols["caption"][4] = []
    root = write_splits(tmp_path / "f30", {"test": cols}, flickr30k_features(True))
    with pytest.raises(SourceError, match=r"'f30'.*'test' row 4, column 'caption'.*empty"):
        load_source("f30", _spec("local", root, tmp_path, format="flickr30k"))


def test_missing_coco_image_file_raises_then_skip(tmp_path, caplog):
    root, image_root = make_coco_karpathy(tmp_path / "coco", tmp_path / "images")
    missing = image_root / "val2014" / coco_name(106, "val2014")
    missing.unlink()
    spec = _spec("local", root, tmp_path, format="coco_karpathy", image_root=str(image_root))
    with pytest.raises(SourceError) as e:
        load_source("coco", spec)
    msg = str(e.value)
    assert "'coco'" in msg and "row 1" in msg and "column 'filename'" in msg
    assert str(missing) in msg
    with caplog.at_level(logging.WARNING, logger="vlalign.data.sources"):
        dsd = load_source("coco", {**spec, "on_error": "skip"})
    assert sorted(dsd["test"]["image_id"]) == ["104"]
    assert load_report(dsd)["test"]["skipped"] == 1
    assert any("skipped 1 bad rows" in r.getMessage() for r in caplog.records)


def test_skip_drops_exactly_bad_rows_and_reports(tmp_path, caplog):
    root = _flickr8k_with(tmp_path, {1: {"image": {"bytes": corrupt_png(), "path": None}},
                                     3: {"caption_0": ""},
                                     4: {"image": {"bytes": b"not an image", "path": None}}})
    spec = _spec("local", root, tmp_path, format="flickr8k", on_error="skip")
    with caplog.at_level(logging.WARNING, logger="vlalign.data.sources"):
        dsd = load_source("bad8k", spec)
    _check_schema(dsd)
    assert dsd["train"]["image_id"] == ["train-0", "train-2"]
    assert [c[0] for c in dsd["train"]["captions"]] == ["caption 0 of red.", "caption 0 of blue."]
    report = load_report(dsd)
    assert report["train"]["skipped"] == 3 and report["train"]["rows"] == 2
    assert report["val"]["skipped"] == 0 and report["test"]["rows"] == 1
    assert any("row 3, column 'caption_0'" in m for m in report["train"]["skipped_examples"])
    assert any("skipped 3 bad rows" in r.getMessage() for r in caplog.records)
    # The report travels with the saved dataset.
    save_dataset(dsd, tmp_path / "out")
    assert load_report(load_from_disk(str(tmp_path / "out")))["train"]["skipped"] == 3


def test_bad_specs(tmp_path):
    root = make_pathvqa(tmp_path / "pvqa")
    with pytest.raises(SourceError, match="unknown format 'vqa2'"):
        load_source("p", _spec("local", root, tmp_path, format="vqa2"))
    with pytest.raises(SourceError, match=r"unknown fields \['caption'\]"):
        load_source("p", _spec("local", root, tmp_path, format="pathvqa",
                               columns={"caption": "x"}))
    with pytest.raises(SourceError, match="does not exist"):
        load_source("p", _spec("local", tmp_path / "nope", tmp_path, format="pathvqa"))
    with pytest.raises(SourceError, match="sum to 1"):
        load_source("p", _spec("local", root, tmp_path, format="pathvqa",
                               split_fractions={"train": 0.5, "test": 0.1}))
    with pytest.raises(SourceError, match=r"source splits \['dev'\] not in"):
        load_source("p", _spec("local", root, tmp_path, format="pathvqa",
                               splits={"train": "train", "val": "dev"}))
    with pytest.raises(SourceError, match="on_error"):
        load_source("p", _spec("local", root, tmp_path, format="pathvqa", on_error="ignore"))


# --- save_dataset -------------------------------------------------------------------------------


def test_save_dataset_round_trip_and_atomic_failure(tmp_path, monkeypatch):
    dsd = load_source("pathvqa", _spec("local", make_pathvqa(tmp_path / "p"), tmp_path,
                                       format="pathvqa"))
    out = tmp_path / "results" / "data" / "pathvqa"
    save_dataset(dsd, out)
    back = load_from_disk(str(out))
    assert list(back) == list(SPLITS) and back["train"].features == FEATURES
    assert back["train"]["qa"] == dsd["train"]["qa"]
    assert back["val"][0]["image"].size == dsd["val"][0]["image"].size

    # A crash after the first split was written leaves the old directory, and no temp dirs.
    real = Dataset.save_to_disk
    calls = []

    def crash_on_second(self, path, *a, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(self, path, *a, **kw)

    monkeypatch.setattr(Dataset, "save_to_disk", crash_on_second)
    fresh = tmp_path / "results" / "data" / "fresh"
    with pytest.raises(OSError, match="disk full"):
        save_dataset(dsd, fresh)
    assert not fresh.exists()
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        save_dataset(DatasetDict({s: dsd[s].select([0]) for s in SPLITS}), out)
    assert len(load_from_disk(str(out))["train"]) == 3  # old content intact
    assert os.listdir(out.parent) == ["pathvqa"]


def test_save_dataset_rejects_wrong_schema(tmp_path):
    bad = DatasetDict({s: Dataset.from_dict({"x": [1]}) for s in SPLITS})
    with pytest.raises(SourceError, match="expected the schema FEATURES"):
        save_dataset(bad, tmp_path / "bad")
    with pytest.raises(SourceError, match="splits"):
        save_dataset(DatasetDict({"train": bad["train"]}), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_synthetic_route(tmp_path):
    pytest.importorskip("vlalign.data.world")
    spec = {"source": "synthetic", "domain": "source",
            "splits_sizes": {"train": 4, "val": 2, "test": 3}}
    dsd = load_source("world", spec, world_cfg=None, seed=0)
    _check_schema(dsd)
    assert [len(dsd[s]) for s in SPLITS] == [4, 2, 3]
    again = load_source("world", spec, world_cfg=None, seed=0)
    assert dsd["train"]["captions"] == again["train"]["captions"]
    assert load_report(dsd)["train"]["rows"] == 4
    capped = load_source("world", {**spec, "max_rows": 1})
    assert [len(capped[s]) for s in SPLITS] == [1, 1, 1]


# --- seed 001 (PETAL): TextCaps, OK-VQA, A-OKVQA, TextVQA ---------------------------------------


def test_presets_are_the_config_formats():
    import yaml

    from vlalign.config import SCHEMA
    from vlalign.data.sources import PRESETS

    schema = yaml.safe_load(SCHEMA.read_text())
    fmt = schema["properties"]["datasets"]["additionalProperties"]["properties"]["format"]
    assert sorted(fmt["enum"]) == sorted(PRESETS)


@pytest.mark.parametrize("route", ROUTES)
def test_textcaps_captions_and_recipe_splits(route, tmp_path):
    root = make_textcaps(tmp_path / "textcaps")
    spec = _spec(route, root, tmp_path, format="textcaps", splits={"train": "train", "test": "val"})
    dsd = load_source("textcaps", spec)
    _check_schema(dsd)
    assert [len(dsd[s]) for s in SPLITS] == [3, 0, 2]
    src = textcaps_rows("val", ["white", "gray"])
    for i, r in enumerate(dsd["test"]):
        assert r["image_id"] == src["image_id"][i]  # the OpenImages id
        assert r["captions"] == src["caption_str"][i]  # the whole list, in order
        assert r["qa"] == [] and r["recaption"] == "" and r["conversations"] == []
        meta = json.loads(r["meta"])
        assert meta["image_name"] == src["image_name"][i] and meta["source_split"] == "val"
        assert "reference_strs" not in meta and "question" not in meta
    assert dsd["test"][1]["image"].size == (10, 7)
    # the hub's test split has no captions: taken as it comes, it fails naming the column
    with pytest.raises(SourceError, match=r"'test' row 0, column 'caption_str'.*empty caption"):
        load_source("textcaps", _spec(route, root, tmp_path, format="textcaps"))


@pytest.mark.parametrize("route", ROUTES)
def test_okvqa_keeps_every_answer(route, tmp_path):
    root = make_okvqa(tmp_path / "okvqa")
    dsd = load_source("okvqa", _spec(route, root, tmp_path, format="okvqa",
                                     splits={"test": "val2014"}))
    _check_schema(dsd)
    assert [len(dsd[s]) for s in SPLITS] == [0, 0, 3]
    rows = dsd["test"]
    assert rows["image_id"] == ["2971475", "3576", "5574212"]  # the question ids
    assert [r[0]["answers"] for r in rows["qa"]] == OKVQA_ANSWERS  # 10 each, repeats kept
    assert rows[0]["qa"][0]["question"] == "What fruit is typically added to the top of cereal?"
    meta = json.loads(rows[1]["meta"])
    assert meta["question_type"] == "seven" and meta["answer_type"] == "other"
    assert rows[2]["captions"] == [] and rows[2]["image"].getpixel((0, 0)) == (128, 128, 128)


@pytest.mark.parametrize("route", ROUTES)
def test_aokvqa_direct_answers_and_choices(route, tmp_path):
    root = make_aokvqa(tmp_path / "aokvqa")
    spec = _spec(route, root, tmp_path, format="aokvqa",
                 splits={"train": "train", "test": "validation"})
    dsd = load_source("aokvqa", spec)
    _check_schema(dsd)
    assert [len(dsd[s]) for s in SPLITS] == [3, 0, 2]
    src = aokvqa_rows(1, 2)
    r = dsd["test"][1]
    assert r["image_id"] == src["question_id"][1]
    assert r["qa"] == [{"question": src["question"][1], "answers": src["direct_answers"][1]}]
    meta = json.loads(r["meta"])
    assert meta["choices"] == ["toothpick", "food", "popsicle stick", "cigarette"]
    assert meta["correct_choice_idx"] == 3 and meta["difficult_direct_answer"] is False
    assert meta["rationales"] == ["He's smoking while riding."]


def test_aokvqa_bad_choice_index_and_empty_answers_raise(tmp_path):
    cols = aokvqa_rows(0, 3)
    cols["correct_choice_idx"][2] = 4
    root = write_splits(tmp_path / "a1", {"train": cols}, AOKVQA_FEATURES)
    with pytest.raises(SourceError, match=r"row 2, column 'correct_choice_idx'.*4 choices"):
        load_source("a", _spec("local", root, tmp_path, format="aokvqa"))
    cols = aokvqa_rows(0, 3)
    cols["direct_answers"][1] = []
    root = write_splits(tmp_path / "a2", {"train": cols}, AOKVQA_FEATURES)
    with pytest.raises(SourceError, match=r"row 1, column 'direct_answers'.*empty answer list"):
        load_source("a", _spec("local", root, tmp_path, format="aokvqa"))


@pytest.mark.parametrize("route", ROUTES)
def test_textvqa_answers_ocr_and_the_unanswered_test_split(route, tmp_path):
    root = make_textvqa(tmp_path / "textvqa")
    spec = _spec(route, root, tmp_path, format="textvqa",
                 splits={"train": "train", "test": "validation"})
    dsd = load_source("textvqa", spec)
    _check_schema(dsd)
    assert [len(dsd[s]) for s in SPLITS] == [3, 0, 2]
    src = textvqa_rows("validation", 2)
    for i, r in enumerate(dsd["test"]):
        assert r["image_id"] == str(src["question_id"][i])  # one row per question
        assert r["qa"] == [{"question": src["question"][i], "answers": TEXTVQA_ANSWERS}]
        meta = json.loads(r["meta"])
        assert meta["openimages_id"] == "0054c91397f2fe05"  # the image both questions are on
        assert meta["ocr_tokens"] == ["live", "11:38", "et"]
        assert "set_name" not in meta and "image_classes" not in meta
    # the hub's test split has empty answers: taken as it comes, it fails naming the column
    with pytest.raises(SourceError, match=r"'test' row 0, column 'answers\[0\]'.*empty answer"):
        load_source("textvqa", _spec(route, root, tmp_path, format="textvqa"))


@pytest.mark.parametrize(
    ("make", "fmt", "column", "field"),
    [
        (make_textcaps, "textcaps", "caption_str", "captions"),
        (make_okvqa, "okvqa", "answers", "answers"),
        (make_okvqa, "okvqa", "question", "question"),
        (make_aokvqa, "aokvqa", "direct_answers", "answers"),
        (make_aokvqa, "aokvqa", "choices", "choices"),
        (make_textvqa, "textvqa", "answers", "answers"),
        (make_textvqa, "textvqa", "image", "image"),
    ],
)
def test_petal_presets_name_a_missing_column(make, fmt, column, field, tmp_path):
    shard = sorted((make(tmp_path / "src") / "data").glob("*.parquet"))[0]
    ds = Dataset.from_parquet(str(shard)).remove_columns([column])
    single = tmp_path / "without.parquet"
    ds.to_parquet(str(single))
    with pytest.raises(SourceError) as e:
        load_source("petal", _spec("local", single, tmp_path, format=fmt))
    msg = str(e.value)
    assert f"missing required column '{column}' (field '{field}')" in msg
    assert f"format {fmt}" in msg and "available columns" in msg
    # a column override names another source column for the field
    if fmt == "okvqa" and column == "answers":
        ds.add_column("answer_list", OKVQA_ANSWERS).to_parquet(str(single))
        dsd = load_source("petal", _spec("local", single, tmp_path, format=fmt,
                                         columns={"answers": "answer_list"},
                                         splits={"test": "train"}))
        assert dsd["test"][0]["qa"][0]["answers"] == OKVQA_ANSWERS[0]
