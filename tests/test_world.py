"""The embedded synthetic world: determinism, schema, text/scene consistency, pixels."""

from __future__ import annotations

import json
import re
import time
from collections import Counter

import numpy as np
import pytest
from datasets import Image as ImageFeature

from vlalign.data.schema import FEATURES, SPLITS
from vlalign.data.world import (
    ATTRIBUTES,
    COLOURS,
    DOMAIN_ATTRIBUTES,
    N_ANNOTATORS,
    generate_world,
    position_name,
    scene_label_classes,
    scene_labels,
    texture_colour,
)

SMALL = {"train": 48, "val": 16, "test": 16}


@pytest.fixture(scope="module")
def source():
    return generate_world({}, "source", splits=SMALL, seed=0)


@pytest.fixture(scope="module")
def target():
    return generate_world({}, "target", splits=SMALL, seed=0)


def rows(dd):
    for split in SPLITS:
        yield from dd[split]


def objects_of(row) -> list[dict]:
    return json.loads(row["meta"])["objects"]


def raw(dd):
    """Every column with images as their encoded bytes (for byte-exact comparison)."""
    return {s: dd[s].cast_column("image", ImageFeature(decode=False)).to_dict() for s in SPLITS}


def majority(answers: list[str]) -> str:
    return Counter(answers).most_common(1)[0][0]


def test_deterministic_and_seed_dependent(source):
    again = generate_world({}, "source", splits=SMALL, seed=0)
    assert raw(again) == raw(source)
    other = raw(generate_world({}, "source", splits=SMALL, seed=1))
    ref = raw(source)
    assert other["train"]["meta"] != ref["train"]["meta"]
    assert other["train"]["image"] != ref["train"]["image"]


def test_schema_sizes_ids(source, target):
    for dd, prefix in ((source, "src"), (target, "tgt")):
        assert set(dd) == set(SPLITS)
        ids = []
        for split in SPLITS:
            ds = dd[split]
            assert ds.features == FEATURES
            assert len(ds) == SMALL[split]
            assert set(ds["split"]) == {split}
            assert all(re.fullmatch(rf"{prefix}-{split}-\d{{6}}", i) for i in ds["image_id"])
            ids += ds["image_id"]
        assert len(ids) == len(set(ids))
        img = dd["train"][0]["image"]
        assert img.mode == "RGB" and img.size == (64, 64)


def test_splits_overrides_config_and_empty_split():
    dd = generate_world({"splits": {"train": 3, "val": 2, "test": 1}}, splits={"val": 0})
    assert [len(dd[s]) for s in SPLITS] == [3, 0, 1]
    assert dd["val"].features == FEATURES


def test_scenes_valid_unique_and_disjoint_across_splits(source, target):
    for dd, domain in ((source, "source"), (target, "target")):
        vocab = DOMAIN_ATTRIBUTES[domain]
        keys_by_split = {}
        for split in SPLITS:
            keys = []
            for row in dd[split]:
                meta = json.loads(row["meta"])
                assert meta["domain"] == domain
                objs = meta["objects"]
                assert 1 <= len(objs) <= 4
                cells = [(o["row"], o["col"]) for o in objs]
                assert len(cells) == len(set(cells)), f"two objects share a cell in {row['meta']}"
                for o in objs:
                    assert 0 <= o["row"] < 3 and 0 <= o["col"] < 3
                    for attr in ("shape", "colour", "size", "texture"):
                        assert o[attr] in vocab[attr]
                keys.append(json.dumps(objs, sort_keys=True))
            assert len(keys) == len(set(keys)), f"{split} repeats a scene"
            keys_by_split[split] = set(keys)
        assert not keys_by_split["train"] & keys_by_split["val"]
        assert not keys_by_split["train"] & keys_by_split["test"]
        assert not keys_by_split["val"] & keys_by_split["test"]


def test_splits_disjoint_in_a_tiny_scene_space():
    # 2x2 grid, one plain object: 320 possible scenes, so independent draws would collide.
    cfg = {"grid": 2, "max_objects": 1, "texture_prob": 0.0, "image_size": 16}
    dd = generate_world(cfg, splits={"train": 60, "val": 40, "test": 40}, seed=2)
    metas = {s: set(dd[s]["meta"]) for s in SPLITS}
    assert [len(metas[s]) for s in SPLITS] == [60, 40, 40]
    assert not (metas["train"] & metas["val"] or metas["train"] & metas["test"])
    assert not metas["val"] & metas["test"]


def full_phrase(o: dict) -> str:
    tex = "" if o["texture"] == "plain" else f" {o['texture']}"
    return f"{o['size']} {o['colour']}{tex} {o['shape']}"


def test_recaption_is_complete_and_ordered(source, target):
    number = ["zero", "one", "two", "three", "four"]
    for row in list(rows(source)) + list(rows(target)):
        objs = objects_of(row)
        sentences = row["recaption"].rstrip(".").split(". ")
        assert re.fullmatch(
            rf"The image shows {number[len(objs)]} objects? on a [a-z ]+", sentences[0]
        )
        assert len(sentences) == 1 + len(objs)
        parsed = []  # one sentence per object, in row-major order, with every attribute
        for sentence in sentences[1:]:
            m = re.fullmatch(r"In the ([a-z ]+) there is an? ([a-z ]+)", sentence)
            assert m, sentence
            parsed.append((m[1], m[2]))
        assert parsed == [(position_name(o["row"], o["col"], 3), full_phrase(o)) for o in objs]
        assert all(o["colour"] in row["recaption"] and o["shape"] in row["recaption"] for o in objs)


def test_short_captions(source, target):
    all_caps = []
    for row in list(rows(source)) + list(rows(target)):
        caps = row["captions"]
        assert len(caps) >= 5
        assert all(c.strip() for c in caps)
        assert len({c.lower().rstrip(".") for c in caps}) == len(caps), caps
        all_caps += caps
    joined = " ".join(all_caps).lower()
    # human-style variety: synonyms, casing, incomplete captions
    assert "ball" in joined and "box" in joined
    assert any(c.isupper() for c in all_caps) and any(c[0].islower() for c in all_caps)
    incomplete = 0
    for row in rows(source):
        shapes = [o["shape"] for o in objects_of(row)]
        if len(shapes) > 2:
            incomplete += any(
                sum(s in c.lower() for s in set(shapes)) < len(set(shapes)) for c in row["captions"]
            )
    assert incomplete > 0


def object_by_reference(ref: str, objs: list[dict]) -> dict:
    for o in objs:
        if ref == f"object in the {position_name(o['row'], o['col'], 3)}" or ref == o["shape"]:
            return o
    raise AssertionError(f"reference {ref!r} matches no object in {objs}")


def test_qa_consistent_with_scene(source, target):
    kinds = Counter()
    varied = 0
    for row in list(rows(source)) + list(rows(target)):
        objs = objects_of(row)
        assert len(row["qa"]) == 4
        assert row["qa"][0]["question"].startswith("how many")
        for item in row["qa"]:
            q, answers = item["question"], item["answers"]
            assert len(answers) == N_ANNOTATORS and all(answers)
            ans = majority(answers)
            assert answers.count(ans) >= 6
            varied += len(set(answers)) > 1
            if m := re.fullmatch(r"how many (objects|shapes) (are there|are in the image)\?", q):
                kinds["count"] += 1
                assert ans == str(len(objs))
            elif m := re.fullmatch(r"how many (\w+) objects are there\?", q):
                kinds["count_colour"] += 1
                assert ans == str(sum(o["colour"] == m[1] for o in objs))
            elif m := re.fullmatch(r"what color is the (.+)\?", q):
                kinds["colour"] += 1
                assert ans == object_by_reference(m[1], objs)["colour"]
            elif m := re.fullmatch(r"what shape is in the (.+)\?", q):
                kinds["shape"] += 1
                assert ans == object_by_reference(f"object in the {m[1]}", objs)["shape"]
            elif m := re.fullmatch(r"is the (.+) small or large\?", q):
                kinds["size"] += 1
                assert ans == object_by_reference(m[1], objs)["size"]
            elif m := re.fullmatch(r"where is the (.+)\?", q):
                kinds["position"] += 1
                words = m[1].split()
                hits = [o for o in objs if all(w in o.values() for w in words)]
                assert len(hits) == 1, (q, objs)
                assert ans == position_name(hits[0]["row"], hits[0]["col"], 3)
            elif m := re.fullmatch(r"is there an? (\w+) (\w+)\?", q):
                kinds["yesno"] += 1
                present = any((o["colour"], o["shape"]) == (m[1], m[2]) for o in objs)
                assert ans == ("yes" if present else "no")
            else:
                raise AssertionError(f"unexpected question {q!r}")
    assert set(kinds) == {"count", "count_colour", "colour", "shape", "size", "position", "yesno"}
    assert varied > 0  # annotators disagree sometimes, so soft VQA accuracy is meaningful


def test_conversations_llava_format(source, target):
    for row in list(rows(source)) + list(rows(target)):
        conv = row["conversations"]
        assert len(conv) == 2 * 3
        assert [t["from"] for t in conv] == ["human", "gpt"] * 3
        assert conv[0]["value"].startswith("<image>\n")
        assert all("<image>" not in t["value"] for t in conv[1:])
        assert all(t["value"].strip() for t in conv)
        n = len(objects_of(row))
        for q, a in zip(conv[0::2], conv[1::2]):
            if q["value"].endswith("How many objects are in the picture?"):
                word = ["zero", "one", "two", "three", "four"][n]
                assert word in a["value"]


def words(dd) -> set[str]:
    text = []
    for row in rows(dd):
        text += row["captions"] + [row["recaption"]]
        text += [t["value"] for t in row["conversations"]]
        text += [item["question"] for item in row["qa"]]
    return set(re.findall(r"[a-z]+", " ".join(text).lower()))


def test_target_domain_is_shifted(source, target):
    src_words, tgt_words = words(source), words(target)
    new_vocab = set()
    for attr in ("shape", "colour", "texture"):
        new = set(DOMAIN_ATTRIBUTES["target"][attr]) - set(DOMAIN_ATTRIBUTES["source"][attr])
        assert new, f"target has no new {attr}"
        new_vocab |= new
    new_words = {w for v in new_vocab for w in v.split()}
    assert new_words & tgt_words and not new_words & src_words
    assert (tgt_words - src_words) >= {"hexagon", "cross"}
    # shared grammar: most of the target vocabulary is known from the source
    assert len(tgt_words & src_words) > 0.7 * len(tgt_words)
    # different background: the corner pixel (always empty-ish background) differs a lot
    src_px = np.asarray(source["train"][0]["image"], dtype=float)[0, 0]
    tgt_px = np.asarray(target["train"][0]["image"], dtype=float)[0, 0]
    assert np.abs(src_px - tgt_px).max() > 50
    for attr in ATTRIBUTES:
        for domain in ("source", "target"):
            assert set(DOMAIN_ATTRIBUTES[domain][attr]) <= set(ATTRIBUTES[attr])


def cell_centre(o: dict, size: int = 64, grid: int = 3) -> tuple[int, int]:
    cell = size / grid
    return int((o["row"] + 0.5) * cell), int((o["col"] + 0.5) * cell)


def test_pixels_show_the_objects(source, target):
    tol = 30.0
    checked_plain = checked_textured = 0
    areas: dict[tuple, list[int]] = {}
    for row in list(rows(source)) + list(rows(target)):
        img = np.asarray(row["image"], dtype=float)
        for o in objects_of(row):
            y, x = cell_centre(o)
            px = img[y, x]
            d_colour = np.abs(px - COLOURS[o["colour"]]).max()
            d_shade = np.abs(px - texture_colour(o["colour"])).max()
            if o["texture"] == "plain":
                assert d_colour < tol, (row["image_id"], o, px)
                checked_plain += 1
                # area of the object in its cell: large objects cover much more than small ones
                y0, x0 = o["row"] * 64 // 3, o["col"] * 64 // 3
                patch = img[y0 : y0 + 21, x0 : x0 + 21]
                area = int((np.abs(patch - COLOURS[o["colour"]]).max(axis=-1) < tol).sum())
                areas.setdefault((o["shape"], o["size"]), []).append(area)
            else:
                assert min(d_colour, d_shade) < tol, (row["image_id"], o, px)
                checked_textured += 1
        # empty cells show background, not an object colour
        occupied = {(o["row"], o["col"]) for o in objects_of(row)}
        for r in range(3):
            for c in range(3):
                if (r, c) not in occupied:
                    px = img[cell_centre({"row": r, "col": c})]
                    assert min(np.abs(px - rgb).max() for rgb in COLOURS.values()) > 20
    assert checked_plain > 50 and checked_textured > 10
    compared = 0
    for shape in ATTRIBUTES["shape"]:
        if (shape, "large") in areas and (shape, "small") in areas:
            assert min(areas[(shape, "large")]) > 1.5 * max(areas[(shape, "small")]), shape
            compared += 1
    assert compared >= 5


def test_textures_are_drawn():
    dd = generate_world(
        {"texture_prob": 1.0}, "source", splits={"train": 12, "val": 0, "test": 0}, seed=3
    )
    for row in dd["train"]:
        img = np.asarray(row["image"], dtype=float)
        for o in objects_of(row):
            assert o["texture"] != "plain"
            y0, x0 = o["row"] * 64 // 3, o["col"] * 64 // 3
            patch = img[y0 : y0 + 21, x0 : x0 + 21]
            shade = (np.abs(patch - texture_colour(o["colour"])).max(axis=-1) < 30).sum()
            base = (np.abs(patch - COLOURS[o["colour"]]).max(axis=-1) < 30).sum()
            assert shade >= 3 and base > shade / 2, (o, shade, base)
    plain = generate_world({"texture_prob": 0.0}, splits={"train": 12, "val": 0, "test": 0})
    assert all(o["texture"] == "plain" for row in plain["train"] for o in objects_of(row))


def test_config_knobs():
    cfg = {
        "image_size": 48,
        "grid": 2,
        "max_objects": 2,
        "captions_per_image": 7,
        "qa_per_image": 6,
        "conversation_turns": 1,
    }
    dd = generate_world(cfg, "target", splits={"train": 10, "val": 2, "test": 2}, seed=5)
    for row in dd["train"]:
        assert row["image"].size == (48, 48)
        assert 1 <= len(objects_of(row)) <= 2
        assert len(row["captions"]) == 7 and len(row["qa"]) == 6
        assert len(row["conversations"]) == 2
        assert json.loads(row["meta"])["grid"] == 2


@pytest.mark.parametrize(
    ("cfg", "key"),
    [
        ({"grid": 1}, "grid"),
        ({"image_size": "64"}, "image_size"),
        ({"max_objects": 10}, "max_objects"),
        ({"texture_prob": 1.5}, "texture_prob"),
        ({"captions_per_image": 0}, "captions_per_image"),
        ({"splits": {"train": -1}}, "splits.train"),
        ({"splits": {"dev": 3}}, "dev"),
        ({"colours": 3}, "colours"),
    ],
)
def test_bad_config_names_the_key(cfg, key):
    with pytest.raises(ValueError, match=re.escape(key)):
        generate_world(cfg, splits={"train": 1, "val": 1, "test": 1})


def test_bad_domain_and_too_many_scenes():
    with pytest.raises(ValueError, match="domain"):
        generate_world({}, "elsewhere")
    with pytest.raises(ValueError, match="splits.train"):
        generate_world(
            {"grid": 2, "max_objects": 1, "texture_prob": 0.0},
            splits={"train": 500, "val": 0, "test": 0},
        )


def test_scene_labels(source):
    classes = scene_label_classes(3)
    for row in source["train"]:
        objs = objects_of(row)
        labels = scene_labels(row["meta"])
        assert set(labels) == set(classes)
        assert all(0 <= v < classes[k] for k, v in labels.items())
        assert labels["count"] == len(objs)
        occupied = {(o["row"], o["col"]): o for o in objs}
        for r in range(3):
            for c in range(3):
                o = occupied.get((r, c))
                for attr in ("shape", "colour", "size", "texture"):
                    want = 0 if o is None else 1 + ATTRIBUTES[attr].index(o[attr])
                    assert labels[f"r{r}c{c}_{attr}"] == want
    with pytest.raises(ValueError, match="JSON"):
        scene_labels("{not json")
    bad = json.dumps({"objects": [{"row": 0, "col": 0, "shape": "blob", "colour": "red",
                                   "size": "small", "texture": "plain"}]})  # fmt: skip
    with pytest.raises(ValueError, match="shape"):
        scene_labels(bad)


def test_default_world_is_fast():
    start = time.perf_counter()
    dd = generate_world({})
    elapsed = time.perf_counter() - start
    assert [len(dd[s]) for s in SPLITS] == [400, 64, 64]
    assert elapsed < 30, f"default world took {elapsed:.1f}s"
