"""Grounding metrics: the caption parser on the world's own language, attribute accuracy /
object recall / CHAIR against the scenes, chance levels, distinct_ratio, missing-not-zero, the
grounding gap of a tiny real model and the `grounding` table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import build_world

from vlalign.data.world import ATTRIBUTES, DOMAIN_ATTRIBUTES, generate_world, position_phrases
from vlalign.eval.grounding import (
    ATTR_METRICS,
    GAP_METRIC,
    Mention,
    caption_grounding,
    chance_levels,
    derangement,
    distinct_ratio,
    gap_scores,
    grounding_gap,
    judge,
    objects_of,
    parse_caption,
)
from vlalign.models.backbones import make_image_processor
from vlalign.models.vlm import VisionLanguageModel
from vlalign.results.db import ingest
from vlalign.results.tables import render_table, to_latex

REPO = Path(__file__).resolve().parents[1]
SCORED = ("attr_acc_colour", "attr_acc_shape", "attr_acc_count", "attr_acc_size",
          "attr_acc_position")


@pytest.fixture(scope="module", params=["source", "target"])
def split(request):
    return generate_world(None, domain=request.param,
                          splits={"train": 0, "val": 0, "test": 64})["test"]


def _scenes(ds) -> list:
    return [objects_of(m) for m in ds["meta"]]


# ------------------------------------------------------------------------------- parser
def test_recaptions_parse_to_exactly_their_objects(split):
    for text, (objects, grid) in zip(split["recaption"], _scenes(split)):
        parsed = parse_caption(text, grid)
        assert parsed.count == len(objects), text
        expected = [
            Mention(o["shape"], o["colour"], o["size"],
                    None if o["texture"] == "plain" else o["texture"],
                    frozenset({(o["row"], o["col"])}))
            for o in objects
        ]
        assert list(parsed.mentions) == expected, text


def test_human_captions_parse_consistently(split):
    n_mentions = n_counts = 0
    for caps, (objects, grid) in zip(split["captions"], _scenes(split)):
        for text in caps:
            parsed = parse_caption(text, grid)
            for m in parsed.mentions:
                for attr in m.stated():
                    assert judge(m, objects, attr), (text, m, attr)
            if parsed.count is not None:
                assert parsed.count == len(objects), text
            n_mentions += len(parsed.mentions)
            n_counts += parsed.count is not None
    assert n_mentions > 200 and n_counts > 20  # the parser does see the captions' content


@pytest.mark.parametrize(
    ("text", "grid", "mentions", "count"),
    [
        ("THREE SHAPES ON A GRAY BACKGROUND.", 3, [], 3),
        ("One thing on a dark blue background.", 3, [], 1),  # "blue" is the background
        ("A single yellow rhombus on dark blue.", 3, [Mention("diamond", "yellow")], 1),
        ("There is a small round shape in the top left.", 3,
         [Mention("circle", size="small", cells=frozenset({(0, 0)}))], None),
        ("a picture of a large teal six-sided shape and a plus sign.", 3,
         [Mention("hexagon", "teal", "large"), Mention("cross")], None),
        ("In the top center there is a big white hatched box.", 3,
         [Mention("square", "white", "large", "hatched", frozenset({(0, 1)}))], None),
        ("a red ball in row 2, column 3", 4, [Mention("circle", "red", cells=frozenset({(1, 2)}))],
         None),
        ("Looks like a tiny blue block in the corner", 3,
         [Mention("square", "blue", "small", cells=frozenset({(0, 0), (0, 2), (2, 0), (2, 2)}))],
         None),
        ("four shapes, one of them a green star.", 3, [Mention("star", "green")], 4),
        ("No, there is no red circle.", 3, [], None),
        ("two red circles", 3, [Mention("circle", "red")], None),
    ],
)
def test_parser_cases(text, grid, mentions, count):
    parsed = parse_caption(text, grid)
    assert list(parsed.mentions) == mentions and parsed.count == count


def test_position_phrases_cover_every_cell():
    for grid in (2, 3, 4):
        phrases = position_phrases(grid)
        cells = {c for v in phrases.values() for c in v}
        assert cells == {(r, c) for r in range(grid) for c in range(grid)}
    assert position_phrases(3)["top center"] == {(0, 1)}
    assert position_phrases(3)["center"] == {(1, 1)}


# ------------------------------------------------------------------------------- scores
def test_ground_truth_scores_perfectly(split):
    scenes = _scenes(split)
    for texts in (list(split["recaption"]), [c[0] for c in split["captions"]],
                  [c[-1] for c in split["captions"]]):
        scores, missing = caption_grounding(texts, scenes)
        assert not missing, missing
        for name in SCORED:
            assert scores[name] == 1.0, (name, scores)
        assert scores["CHAIR_i"] == 0.0 and scores["CHAIR_s"] == 0.0
    rec, _ = caption_grounding(list(split["recaption"]), scenes)
    assert rec["object_recall"] == 1.0 and rec["distinct_ratio"] == 1.0


def test_shuffled_captions_score_at_most_chance(split):
    """Another image's (correct) recaption: what a model ignoring its image would write."""
    scenes = _scenes(split)
    rec = list(split["recaption"])
    shuffled = [rec[j] for j in derangement(len(rec))]
    scores, _ = caption_grounding(shuffled, scenes)
    for name in SCORED:  # chance = the best blind guess: a blind caption cannot beat it
        assert scores[name] <= scores[f"{name}_chance"] + 0.05, (name, scores)
    assert scores["attr_acc_colour"] < 0.4
    assert scores["CHAIR_i"] > 0.2 and scores["CHAIR_s"] > 0.4
    truth, _ = caption_grounding(rec, scenes)
    assert all(truth[f"{n}_chance"] == scores[f"{n}_chance"] for n in SCORED)  # data only


def test_captions_about_wrong_objects_hallucinate(split):
    scenes = _scenes(split)
    domain = json.loads(split[0]["meta"])["domain"]
    vocab = DOMAIN_ATTRIBUTES[domain]
    wrong = []
    for objects, _ in scenes:
        shape = next(s for s in vocab["shape"] if s not in {o["shape"] for o in objects})
        colour = next(c for c in vocab["colour"] if c not in {o["colour"] for o in objects})
        wrong.append(f"A {colour} {shape}.")
    scores, _ = caption_grounding(wrong, scenes)
    assert scores["CHAIR_i"] == 1.0 and scores["CHAIR_s"] == 1.0
    assert scores["attr_acc_colour"] == 0.0 and scores["attr_acc_shape"] == 0.0
    assert scores["object_recall"] == 0.0


def test_judge_keeps_attributes_apart():
    objects = [{"shape": "circle", "colour": "red", "size": "small", "texture": "plain",
                "row": 0, "col": 0},
               {"shape": "square", "colour": "blue", "size": "large", "texture": "plain",
                "row": 1, "col": 1}]
    m = Mention("circle", "red", "large", cells=frozenset({(0, 0)}))  # only the size is wrong
    assert judge(m, objects, "colour") and judge(m, objects, "shape")
    assert judge(m, objects, "position") and not judge(m, objects, "size")
    # a blue circle: no circle is blue, the best match for "circle" is the red one
    assert not judge(Mention("circle", "blue"), objects, "colour")
    assert judge(Mention("triangle", "blue"), objects, "colour")  # no triangle: any object


def test_chance_levels_by_hand():
    a = {"shape": "circle", "colour": "red", "size": "small", "row": 0, "col": 0}
    b = {"shape": "square", "colour": "red", "size": "large", "row": 1, "col": 1}
    c = {"shape": "circle", "colour": "blue", "size": "large", "row": 0, "col": 0}
    chance = chance_levels([[a, b], [c], [b]])
    assert chance["attr_acc_colour_chance"] == pytest.approx(2 / 3)  # "red": 2 of 3 images
    assert chance["attr_acc_shape_chance"] == pytest.approx(2 / 3)  # circle/square tie: first
    assert chance["attr_acc_size_chance"] == pytest.approx(1.0)  # "large" is in every image
    assert chance["attr_acc_position_chance"] == pytest.approx(2 / 3)
    assert chance["attr_acc_count_chance"] == pytest.approx(2 / 3)  # one object


def test_distinct_ratio():
    assert distinct_ratio(["A red circle.", "a red  circle", "a blue box"]) == pytest.approx(2 / 3)
    assert distinct_ratio(["x"] * 4) == 0.25


def test_missing_not_zero(split):
    scenes = _scenes(split)
    scores, missing = caption_grounding(["a red circle"] * len(scenes), scenes)
    names = {m["metric"] for m in missing}
    assert names == {"attr_acc_count", "attr_acc_size", "attr_acc_position"}
    assert not names & set(scores) and "attr_acc_count_chance" not in scores
    scores, missing = caption_grounding(["simple drawing"] * len(scenes), scenes)
    assert {"CHAIR_i", "CHAIR_s", *ATTR_METRICS} == {m["metric"] for m in missing}
    assert scores["object_recall"] == 0.0  # computable: no object was mentioned
    # a dataset without object annotations: only distinct_ratio
    scores, missing = caption_grounding(["a red circle", "a box"], [None, None], where="coco/test")
    assert set(scores) == {"distinct_ratio"}
    assert {"object_recall", "CHAIR_i", *ATTR_METRICS} <= {m["metric"] for m in missing}
    assert all("coco/test" in m["reason"] for m in missing)
    assert objects_of(json.dumps({"cocoid": 3})) is None and objects_of("") is None


def test_vocabulary_comes_from_the_world():
    # every shape and colour the world can draw is known to the parser
    for shape in ATTRIBUTES["shape"]:
        for colour in ATTRIBUTES["colour"]:
            assert parse_caption(f"a {colour} {shape}").mentions == (Mention(shape, colour),)


# ------------------------------------------------------------------------------- gap
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    w = build_world(tmp_path_factory.mktemp("grounding"), {"train": 8, "val": 2, "test": 6})
    vlm = VisionLanguageModel.from_parts(w.vision, w.lm, mask_mode="prefix")
    return {"model": vlm.eval(), "tok": w.tok, "ds": w.datasets["world"]["test"],
            "processor": make_image_processor(64)}


class _Zero(torch.nn.Module):
    """A projector whose output is zero: the LM sees the same image block for every image."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(self.inner(x))


def test_derangement_has_no_fixed_point():
    for n in (2, 3, 64):
        perm = derangement(n)
        assert sorted(perm) == list(range(n)) and all(p != i for i, p in enumerate(perm))
    with pytest.raises(ValueError):
        derangement(1)


@pytest.mark.parametrize("kind", ["recaption", "captions", "conversations", "qa"])
def test_gap_sees_the_image_and_zero_projector_gives_zero(tiny, kind):
    model, args = tiny["model"], (tiny["processor"], tiny["tok"], tiny["ds"], kind)
    first = grounding_gap(model, *args, batch_size=4)
    assert first == grounding_gap(model, *args, batch_size=4)  # deterministic
    assert first["grounding_gap"] == pytest.approx(
        first["grounding_loss_shuffled"] - first["grounding_loss_own"])
    assert abs(first["grounding_gap"]) > 1e-5  # a random projector: images change the loss
    inner = model.projector
    model.projector = _Zero(inner)
    try:
        zero = grounding_gap(model, *args, batch_size=4)
    finally:
        model.projector = inner
    assert abs(zero["grounding_gap"]) < 1e-5, zero


def test_gap_missing_not_zero(tiny):
    model, proc, tok, ds = tiny["model"], tiny["processor"], tiny["tok"], tiny["ds"]
    scores, missing = gap_scores(model, proc, tok, ds, None, where="world/test")
    assert scores == {} and missing[0]["metric"] == GAP_METRIC
    no_recap = ds.map(lambda r: {"recaption": ""})
    scores, missing = gap_scores(model, proc, tok, no_recap, "recaption")
    assert scores == {} and "no recaption" in missing[0]["reason"]
    scores, missing = gap_scores(model, proc, tok, ds.select([0]), "recaption")
    assert scores == {} and "fewer than 2" in missing[0]["reason"]


# ------------------------------------------------------------------------------- table
def test_grounding_table(tmp_path):
    results = tmp_path / "results"
    values = {"grounding_gap": 0.42, "distinct_ratio": 0.9, "attr_acc_colour": 0.8,
              "attr_acc_colour_chance": 0.34, "CHAIR_i": 0.1, "CHAIR_s": 0.2}
    for seed in (0, 1):
        run = f"recap_s{seed}"
        d = results / "runs" / run
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps(
            {"run": run, "seed": seed, "config": {},
             "chain": [{"stage": "stage0", "hash": "a"}, {"stage": "stage1", "hash": "b"}]}))
        records = [{"run": run, "stage": stage, "dataset": "world", "split": "test",
                    "metric": m, "value": v + 0.01 * seed}
                   for stage in ("stage1", "stage1@prefix_removed") for m, v in values.items()]
        (d / "metrics.json").write_text(json.dumps(
            {"schema_version": 1, "run": run, "records": records,
             "missing": [{"metric": "attr_acc_count", "reason": "no caption states a count"}]}))
    db = tmp_path / "r.duckdb"
    ingest(results, db)
    result = render_table(db, REPO / "config" / "tables" / "grounding.yaml")
    assert result.row_keys == [("chance",), ("recap",)]
    cols = {c.key: j for j, c in enumerate(result.columns)}
    assert len(cols) == 10  # every declared metric, "--" where not computed
    gap = result.cells[(("recap",), cols[("world", "grounding_gap")])]
    assert gap.mean == pytest.approx(0.425) and gap.std is not None  # nats, not ×100
    chance = result.cells[(("chance",), cols[("world", "attr_acc_colour")])]
    assert chance.mean == pytest.approx(35.0) and chance.std is None  # one value per dataset
    assert (("chance",), cols[("world", "grounding_gap")]) not in result.cells
    tex = to_latex(result)
    assert "chance (blind guess)" in tex and "CHAIR-i" in tex and "--" in tex
